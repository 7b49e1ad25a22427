"""Rounds of iterative alignment (issue 15 part 4 and its end-to-end acceptance): `reelforge align` runs the
shipped round recipe (mixers/recipes/align/round.yaml: prompts -> `sample` -> `reward` -> `select` pairs ->
shards) and the shipped MPO stage (training/stages/mpo_round.yaml) through `reelforge train`, twice, with
tiny local models (nothing downloaded). Round 1 samples from a tiny export A; its MPO loss falls; round 2
samples from round 1's export, and its responses (same prompts, same seeds) are not round 1's."""

from __future__ import annotations

import copy
import json
import os
import time

import pyarrow.parquet as pq
import pytest
import yaml
from test_sample import read_shards
from train_common import ROOT

from reelforge.training.config import deep_update

pytestmark = [pytest.mark.train, pytest.mark.spark]

PROMPTS = ("Name a colour.", "Say a word.", "What is the keyword?", "Give me a number.", "Pick an animal.",
           "Name a city.")
# the shipped recipe's sample step, made cheap: few responses of few tokens, on the CPU
SAMPLE = {"n": 4, "max_new_tokens": 6, "mode": "non_thinking", "batch_size": 24, "device": "cpu"}
# the shipped stage, made tiny: every pair in each step's batch, a learning rate a tiny model moves at
STAGE = {"steps": 10, "seed": 0, "data": {"max_len": 1024, "num_workers": 1},
         "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"}, "output": {"save_every": 0}}
FALL = 0.3  # the last step's MPO loss must be below the first's by this share (measured: README)


def tiny_export(root: str) -> str:
    """Model A: a tiny random SigLIP + projector + Qwen3 written as a `reelforge train` export."""
    import torch

    from reelforge.training.checkpoint import build_tiny_models, export_model
    from reelforge.training.model import ReelVLM

    parts = build_tiny_models(os.path.join(root, "parts"))
    m = ReelVLM.from_paths(parts["vision"], parts["llm"], parts["tokenizer"])
    torch.manual_seed(1)
    with torch.no_grad():  # sharper than a fresh init: a prompt's responses share some words
        for p in m.llm.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return export_model(m.state_dict(), m, os.path.join(root, "model-a"), parts["tokenizer"])


def shipped_recipe(path: str, prompts: str) -> str:
    """mixers/recipes/align/round.yaml with the test's prompts and SAMPLE; {{model}} left for align."""
    with open(os.path.join(ROOT, "mixers", "recipes", "align", "round.yaml")) as f:
        d = yaml.safe_load(f)
    assert d["steps"][0]["sample"]["model"] == "{{model}}"
    d["sources"][0]["path"] = prompts
    d["steps"][0]["sample"].update(SAMPLE)
    d["output"]["shards"]["shuffle"] = False
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return path


def shipped_stage(path: str) -> str:
    with open(os.path.join(ROOT, "training", "stages", "mpo_round.yaml")) as f:
        d = yaml.safe_load(f)
    assert d["objective"] == "mpo"
    with open(path, "w") as f:
        yaml.safe_dump(deep_update(d, STAGE), f)
    return path


def write_prompts(path: str, model: str, recipe: str) -> dict[str, str]:
    """The prompts as JSONL, each with the answer model A's response 0 gives as its reference (a sample's id
    does not depend on its meta, so the seeds do not move): in round 1, response 0 of every prompt passes and
    a response with another answer fails, so every prompt has a pair."""
    from reelforge.curation.readers import read_jsonl
    from reelforge.mixers.reward import extract_answer, normalise
    from reelforge.mixers.sample import SampleStep

    def write(answers):
        with open(path, "w") as f:
            for q, a in zip(PROMPTS, answers):
                f.write(json.dumps({"messages": [{"role": "user", "content": q}], "answer": a,
                                    "answer_type": "string"}) + "\n")
        return list(read_jsonl(path, "prompts", os.path.dirname(path), {}))

    rows = write(["?"] * len(PROMPTS))
    with open(recipe) as f:
        params = {**yaml.safe_load(f)["steps"][0]["sample"], "model": model}
    step = SampleStep(**params)
    step.setup()
    out = step.process(copy.deepcopy(rows))
    refs = [extract_answer(r["responses"][0]["text"]) for r in out]
    assert all(normalise(a) for a in refs), refs
    assert [r["id"] for r in write(refs)] == [r["id"] for r in rows]
    return dict(zip([r["source_key"] for r in rows], refs))


def sampled(run: str, step: str = "01_sample") -> dict[str, list[dict]]:
    """Each prompt's responses after a step of the round's run (01_sample; 02_reward: with rewards, passed)."""
    from reelforge.curation.schema import rows_of

    return {r["source_key"]: r["responses"] for r in rows_of(pq.read_table(os.path.join(run, "_work", step)))}


def test_two_rounds_of_sample_reward_pairs_mpo(spark, tmp_path, monkeypatch):
    import reelforge.mixers.reward  # noqa: F401 - registers the steps
    import reelforge.mixers.sample  # noqa: F401
    import reelforge.mixers.selection  # noqa: F401
    from reelforge.jobs.cli import main

    t0 = time.perf_counter()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_a = tiny_export(str(tmp_path / "models"))
    recipe = shipped_recipe(str(tmp_path / "round.yaml"), str(tmp_path / "prompts.jsonl"))
    stage = shipped_stage(str(tmp_path / "mpo_round.yaml"))
    refs = write_prompts(str(tmp_path / "prompts.jsonl"), model_a, recipe)
    out = str(tmp_path / "align")
    assert main(["align", recipe, stage, "--model", model_a, "--rounds", "2", "--out", out]) == 0
    rounds = json.load(open(os.path.join(out, "rounds.json")))
    assert [r["round"] for r in rounds] == [1, 2]
    r1, r2 = rounds
    assert r1["model"] == model_a and r2["model"] == os.path.join(out, "round-1", "train", "final")

    # round 1: every prompt's response 0 passes and another fails: one pair per prompt, in the shards
    s1 = sampled(r1["data"])
    assert set(s1) == set(refs) and all(len(v) == SAMPLE["n"] for v in s1.values())
    assert all(x["model"] == model_a for v in s1.values() for x in v)
    pairs1 = {k: v for k, v in read_shards(r1["data"]).items() if v["kind"] == "preference"}
    assert r1["pairs"] == len(pairs1) == len(PROMPTS)
    for p in pairs1.values():
        parent = next(v for k, v in s1.items() if f"{k}@pairs" == p["source_key"])
        assert p["chosen"] == parent[0]["text"] and p["rejected"] in [x["text"] for x in parent[1:]]

    # the MPO stage trained on them through `reelforge train`: its loss falls
    m1 = [json.loads(ln) for ln in open(os.path.join(r1["train"], "metrics.jsonl")) if ln.strip()]
    assert [r["step"] for r in m1] == list(range(1, STAGE["steps"] + 1))
    assert all(k in m1[0] for k in ("dpo", "bco", "sft"))
    first, last = m1[0]["loss"], m1[-1]["loss"]
    assert last < (1 - FALL) * first, (first, last)
    assert (r1["loss_first"], r1["loss_last"]) == (first, last)

    # round 2 sampled from round 1's export: its responses name that checkpoint, and for the same prompts and
    # seeds they are not round 1's (the new weights generated them)
    s2 = sampled(r2["data"])
    assert set(s2) == set(s1)
    assert all(x["model"] == r2["model"] for v in s2.values() for x in v)
    assert [[x["seed"] for x in v] for v in s2.values()] == [[x["seed"] for x in s1[k]] for k in s2]
    changed = sum(a["text"] != b["text"] for k in s1 for a, b in zip(s1[k], s2[k]))
    assert changed >= len(PROMPTS) * SAMPLE["n"] // 2, changed
    pass1 = sum(x["passed"] for v in sampled(r1["data"], "02_reward").values() for x in v)
    pass2 = sum(x["passed"] for v in sampled(r2["data"], "02_reward").values() for x in v)
    m2 = [json.loads(ln) for ln in open(os.path.join(r2["train"], "metrics.jsonl")) if ln.strip()]
    print(f"round 1: {r1['pairs']} pairs, {pass1} of {len(PROMPTS) * SAMPLE['n']} responses passed, MPO loss "
          f"{first:.4f} -> {last:.4f}; round 2: {r2['pairs']} pairs, {pass2} passed, {changed} responses changed, "
          f"MPO loss {m2[0]['loss']:.4f} -> {m2[-1]['loss']:.4f}; {time.perf_counter() - t0:.0f} s")
    assert os.path.isdir(os.path.join(r2["export"], "llm"))

