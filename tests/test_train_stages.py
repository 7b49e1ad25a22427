"""Stages on the CPU with tiny models, from the demo's shards, through `reelforge train` (DeepSpeed, gloo)."""

from __future__ import annotations

import glob
import json
import math
import os
import tarfile
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from train_common import run_cli, seen_ids, stage, write_stage
from transformers import AutoTokenizer

from reelforge.training.loader import ShardLoader


def _weights(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True)):
        rel = os.path.relpath(f, folder)
        out.update({f"{rel}:{k}": v for k, v in load_file(f).items()})
    return out


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def test_stage1_trains_only_the_projector_and_its_loss_falls(tiny, shards, tmp_path):
    from reelforge.training.train import eval_loss

    out = str(tmp_path / "s1")
    path = write_stage(str(tmp_path / "s1.yaml"), tiny, shards, out, trainable=["projector"], steps=8,
                       data={"kinds": ["image_text"]}, optim={"lr": 2e-2},
                       output={"save_initial": True})
    run_cli("train", path)
    before, after = _weights(os.path.join(out, "initial")), _weights(os.path.join(out, "final"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.safetensors:") for k in changed), sorted(changed)[:5]
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("projector"))
    cfg = stage(path)
    assert eval_loss(cfg, os.path.join(out, "final")) < eval_loss(cfg, os.path.join(out, "initial")) - 0.01
    rep = json.load(open(os.path.join(out, "report.json")))
    assert os.path.exists(rep["loss_png"]) and rep["tokens_per_s"] > 0
    assert sum(rep["samples_per_source"].values()) > 0

    # merging two exports is the element-wise (weighted) mean of their tensors (`reelforge merge`,
    # in this process: it starts no DeepSpeed, and every run_cli above already starts the CLI afresh)
    from reelforge.jobs.cli import main

    merged = str(tmp_path / "merged")
    assert main(["merge", os.path.join(out, "initial"), os.path.join(out, "final"), "--out", merged,
                 "--weights", "1,3"]) == 0
    m = _weights(merged)
    for k in before:
        torch.testing.assert_close(m[k], 0.25 * before[k] + 0.75 * after[k], rtol=0, atol=1e-7)
    assert main(["merge", os.path.join(out, "initial"), os.path.join(out, "final"), "--out", merged]) == 0
    m = _weights(merged)
    for k in before:
        torch.testing.assert_close(m[k], (before[k] + after[k]) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name,over", [
    ("stage2", {"trainable": ["vision", "projector", "llm"], "deepspeed": {"zero_stage": 3}}),
    ("stage3", {"optim": {"schedule": "linear_to_zero", "lr": 1e-2}, "deepspeed": {"zero_stage": 1}}),
    ("sft", {"data": {"kinds": ["conversation"]}, "deepspeed": {"zero_stage": 2}}),
])
def test_lm_stages_loss_falls(tiny, shards, tmp_path, name, over):
    from reelforge.training.train import eval_loss

    out = str(tmp_path / name)
    path = write_stage(str(tmp_path / f"{name}.yaml"), tiny, shards, out, steps=6, output={"save_initial": True},
                       **over)
    run_cli("train", path)
    cfg = stage(path)
    assert eval_loss(cfg, os.path.join(out, "final")) < eval_loss(cfg, os.path.join(out, "initial")) - 0.05
    if name == "stage3":
        lrs = [r["lr"] for r in _metrics(out)]
        assert all(a > b for a, b in zip(lrs, lrs[1:])) and abs(lrs[-1] - lrs[0] / len(lrs)) < 1e-12


def test_resume_is_exact(tiny, shards, tmp_path):
    """2N steps straight == N steps, stop, resume, N steps: same samples in order, same weights."""
    over = dict(steps=6, data={"num_workers": 2, "max_len": 448}, optim={"lr": 5e-3, "schedule": "cosine"},
                trainable=["vision", "projector", "llm"])
    a = write_stage(str(tmp_path / "a.yaml"), tiny, shards, str(tmp_path / "a"), **over)
    b = write_stage(str(tmp_path / "b.yaml"), tiny, shards, str(tmp_path / "b"), **over)
    run_cli("train", a)
    run_cli("train", b, "--stop-after", "3")
    assert not os.path.exists(str(tmp_path / "b" / "final"))
    run_cli("train", b)
    ids_a, ids_b = seen_ids(str(tmp_path / "a")), seen_ids(str(tmp_path / "b"))
    assert ids_a == ids_b and len(ids_a) > 6
    wa, wb = _weights(str(tmp_path / "a" / "final")), _weights(str(tmp_path / "b" / "final"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    la, lb = _metrics(str(tmp_path / "a")), _metrics(str(tmp_path / "b"))
    assert [r["step"] for r in lb] == list(range(1, 7))
    assert all(abs(x["loss"] - y["loss"]) < 1e-6 for x, y in zip(la, lb))


def test_two_processes_see_an_epoch_exactly_once(tiny, shards, tmp_path):
    """World size 2 (gloo), ZeRO-3, one sample per step: many steps have images on one rank only (text on
    the other) or images of another number of sizes; ZeRO-3 hangs unless every rank calls the tower alike."""
    out = str(tmp_path / "dp")
    path = write_stage(str(tmp_path / "dp.yaml"), tiny, shards, out, steps=1000,
                       data={"epochs": 1, "num_workers": 2, "max_len": 4096, "pack": False},
                       trainable=["vision", "projector", "llm"], deepspeed={"zero_stage": 3})
    run_cli("train", path, nproc=2, timeout=240)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len([ln for ln in f if ln.strip()]) > 60
    got = seen_ids(out, 0) + seen_ids(out, 1)
    want = []
    for t in sorted(glob.glob(os.path.join(shards, "*.tar"))):
        with tarfile.open(t) as tf:
            want += [m.name[:-5] for m in tf if m.name.endswith(".json")]
    assert Counter(got) == Counter(want)
    assert seen_ids(out, 0) and seen_ids(out, 1)
    assert os.path.exists(os.path.join(out, "final", "projector.safetensors"))


def test_stage0_mpo_grpo_run_and_learn(tiny, shards, tmp_path):
    out0 = str(tmp_path / "s0")
    p0 = write_stage(str(tmp_path / "s0.yaml"), tiny, shards, out0, objective="vit_contrastive", steps=8,
                     model={"text_tower": tiny["text_tower"], "tokenizer": tiny["tokenizer"], "llm": None},
                     trainable=["vision"], data={"batch_size": 8, "epochs": None}, optim={"lr": 5e-3})
    run_cli("train", p0)
    m0 = _metrics(out0)
    assert sum(r["loss"] for r in m0[-3:]) < sum(r["loss"] for r in m0[:3])
    assert os.path.exists(os.path.join(out0, "final", "vision", "config.json"))
    assert os.path.exists(os.path.join(out0, "final", "text_tower", "config.json"))

    outm = str(tmp_path / "mpo")
    pm = write_stage(str(tmp_path / "mpo.yaml"), tiny, shards, outm, objective="mpo", steps=8,
                     trainable=["projector", "llm"], data={"max_len": 1024}, optim={"lr": 5e-3})
    run_cli("train", pm)
    mm = _metrics(outm)
    assert all(k in mm[0] for k in ("dpo", "bco", "sft", "delta"))
    assert sum(r["loss"] for r in mm[-3:]) < sum(r["loss"] for r in mm[:3])

    # GRPO with Keye's 3D positions (1D rollouts are checked against the old loop in
    # tests/test_grpo_positions.py); seed 5 puts a video conversation among its prompts
    outg = str(tmp_path / "grpo")
    pg = write_stage(str(tmp_path / "grpo.yaml"), tiny, shards, outg, objective="grpo", steps=3, seed=5,
                     trainable=["projector", "llm"], data={"batch_size": 2, "positions": "mrope"},
                     loss={"grpo": {"group_size": 3, "max_new_tokens": 8}})
    run_cli("train", pg)
    mg = _metrics(outg)
    assert len(mg) == 3 and all(math.isfinite(r["loss"]) and "reward" in r and "kl" in r for r in mg)
    assert os.path.exists(os.path.join(outg, "final", "llm", "config.json"))
    it = iter(ShardLoader(stage(pg)))
    items = [x for _ in range(3) for x in next(it)["items"]]
    assert [x.id for x in items] == seen_ids(outg)
    video_pad = AutoTokenizer.from_pretrained(tiny["tokenizer"]).convert_tokens_to_ids("<|video_pad|>")
    assert any(video_pad in x.input_ids for x in items)
