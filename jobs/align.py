"""`reelforge align`: rounds of iterative alignment (Keye-VL's MPO rounds) from a curation recipe and a stage.

Round r runs the round's curation recipe with its `{{model}}` filled by the round's model (prompts ->
`sample` -> `reward` -> `select` pairs -> shards, in OUT/round-r/data), then `reelforge train` on the stage
with `model.init` = the round's model, `data.sources` = that round's shards and `output.dir` =
OUT/round-r/train. Round r + 1's model is round r's export, OUT/round-r/train/final. Round 1's model is
`--model`: a `reelforge train` export (what the MPO stage starts from and the `sample` step generates
with). Each round is exactly these two commands:

    reelforge run ROUND_RECIPE --out OUT/round-r/data        # the recipe with {{model}} = MODEL
    reelforge train STAGE --set model.init=MODEL --set 'data.sources=[{name: pairs, path: OUT/round-r/data/shards}]' \
        --set output.dir=OUT/round-r/train

A round whose export exists is skipped (a stopped loop resumes where it stopped: the run resumes from its
_work, the training from its checkpoint). OUT/rounds.json says per round the model, the pairs and the
training loss (first and last step).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import yaml

from reelforge.jobs.recipe import RecipeError

FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def fill(text: str, values: dict[str, str], where: str) -> str:
    """`{{name}}` -> values[name]; an unknown name is one sentence."""

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise RecipeError(f"{where} names {{{{{m.group(1)}}}}}, which reelforge align does not fill: "
                              f"use {', '.join('{{' + k + '}}' for k in values)}.")
        return values[m.group(1)]

    return FIELD.sub(sub, text)


def round_recipe(path: str, values: dict[str, str], out: str):
    """The round's recipe: `path` with its fields filled, paths still relative to its own folder."""
    from reelforge.jobs.recipe import parse_recipe

    if not os.path.exists(path):
        raise RecipeError(f"recipe file {path} does not exist: pass the path of a round's recipe YAML "
                          "(example: mixers/recipes/align/round.yaml).")
    with open(path) as f:
        text = f.read()
    if not FIELD.search(text):
        raise RecipeError(f"recipe {path} has no {{{{model}}}} field: its sample step's `model: \"{{{{model}}}}\"` "
                          "is where each round's model goes.")
    raw = yaml.safe_load(fill(text, values, f"recipe {path}"))
    return parse_recipe(raw, os.path.dirname(os.path.abspath(path)), out)


def count_pairs(run_dir: str) -> int:
    """Preference samples in a run's shards (its samples table)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    t = ds.dataset(os.path.join(run_dir, "samples"), format="parquet").to_table(columns=["kind"])
    return int(pc.sum(pc.equal(t["kind"], "preference")).as_py() or 0)


def _metrics(train_dir: str) -> list[dict]:
    path = os.path.join(train_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def train_command(stage: str, model: str, shards: str, out: str, sets: list[str], launcher: str) -> list[str]:
    over = [f"model.init={model}", "data.sources=" + json.dumps([{"name": "pairs", "path": shards}]),
            f"output.dir={out}"]
    head = shlex.split(launcher) if launcher else [sys.executable]
    return [*head, "-m", "reelforge.training", stage, *[a for s in over + list(sets) for a in ("--set", s)]]


def align(recipe: str, stage: str, model: str, rounds: int, out: str, master: str | None = None,
          sets: list[str] | None = None, launcher: str = "", log=print) -> list[dict]:
    from reelforge.jobs.run import run_recipe
    from reelforge.training.config import deep_update, load_stage, parse_override

    if rounds < 1:
        raise RecipeError(f"--rounds must be >= 1, got {rounds}.")
    out = os.path.abspath(out)
    model = os.path.abspath(model)
    if not all(os.path.isdir(os.path.join(model, p)) for p in ("vision", "llm")):
        raise RecipeError(f"--model {model} is not a `reelforge train` export (a folder with vision/ and llm/, "
                          "e.g. an SFT stage's OUT/final): the MPO stage starts from it.")
    stage = os.path.abspath(stage)
    over = {"model": {"init": model}}
    for s in sets or []:
        over = deep_update(over, parse_override(s))
    load_stage(stage, over)  # a mistake in the stage costs its sentence before any round runs
    summary: list[dict] = []
    for r in range(1, rounds + 1):
        data, train_dir = os.path.join(out, f"round-{r}", "data"), os.path.join(out, f"round-{r}", "train")
        export = os.path.join(train_dir, "final")
        values = {"model": model, "round": str(r)}
        if os.path.isdir(export):
            log(f"reelforge align: round {r} is done ({export}); skipping it")
        else:
            log(f"reelforge align: round {r}: sampling from {model}")
            run_recipe(round_recipe(recipe, values, data), master=master)
            pairs = count_pairs(data)
            if pairs == 0:
                raise RecipeError(f"round {r} derived no preference pairs (see {data}/report.json and the ledger's "
                                  "`select` reasons): the model's responses all passed or all failed; use more "
                                  "responses per prompt (`n`) or other prompts.")
            log(f"reelforge align: round {r}: {pairs} pairs in {data}/shards; training {stage}")
            cmd = train_command(stage, model, os.path.join(data, "shards"), train_dir, sets or [], launcher)
            p = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if p.returncode != 0:
                raise RecipeError(f"round {r}'s training failed (exit code {p.returncode}): "
                                  f"{' '.join(shlex.quote(c) for c in cmd)}")
        m = _metrics(train_dir)
        summary.append({"round": r, "model": model, "data": data, "pairs": count_pairs(data), "train": train_dir,
                        "export": export, "steps": len(m), "loss_first": m[0]["loss"] if m else None,
                        "loss_last": m[-1]["loss"] if m else None})
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "rounds.json"), "w") as f:
            json.dump(summary, f, indent=1)
        model = export
    for s in summary:
        loss = f"loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} over {s['steps']} steps" if s["steps"] else \
            "no metrics"
        log(f"round {s['round']}: {s['pairs']} pairs, {loss}, export {s['export']}")
    return summary
