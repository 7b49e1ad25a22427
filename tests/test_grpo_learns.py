"""GRPO learns (issue 15 part 5): on the toy task (training/toy.py, training/stages/grpo_toy.yaml) a tiny
random policy trained by `reelforge train` (DeepSpeed on the CPU, gloo) raises its mean reward.

The reward is the stage's rule reward (`training.losses.rewards_of`, `correct` alone: token F1 of the
completion against the keyword "blue"), logged per step to metrics.jsonl and summarised in report.json
(`reward`: per step, the mean of the first and last fifth of the run). For each of 3 seeds (the seed of
the random weights and of the stage) the last 8 of 40 steps must beat the first 8 by RISE."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml
from train_common import ROOT, run_cli

from reelforge.training.config import deep_update

pytestmark = pytest.mark.train

SEEDS = (0, 1, 2)
RISE = 0.2  # first fifth ~0.00-0.01, last fifth ~0.38-0.42 on this machine (README, GRPO)


def toy_stage(root: str, seed: int) -> str:
    """training/stages/grpo_toy.yaml as shipped, with its folders under `root` and its seed."""
    from reelforge.training.toy import build_toy_grpo

    paths = build_toy_grpo(root, seed=seed)
    with open(os.path.join(ROOT, "training", "stages", "grpo_toy.yaml")) as f:
        d = yaml.safe_load(f)
    d = deep_update(d, {"seed": seed, "model": {"vision": paths["vision"], "llm": paths["llm"]},
                        "data": {"sources": [{"name": "toy", "path": paths["shards"]}]},
                        "output": {"dir": os.path.join(root, "out")}})
    path = os.path.join(root, "grpo_toy.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return path


def test_grpo_mean_reward_rises_on_the_toy_task(tmp_path):
    figures = {}
    for seed in SEEDS:
        t0 = time.perf_counter()
        root = str(tmp_path / f"seed{seed}")
        run_cli("train", toy_stage(root, seed))
        out = os.path.join(root, "out")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        rep = json.load(open(os.path.join(out, "report.json")))["reward"]
        assert [r["step"] for r in rows] == list(range(1, 41))
        assert rep["per_step"] == [r["reward"] for r in rows] and rep["window"] == 8
        # the logged reward is the mean of the rule reward over the step's completions: `correct` alone here
        assert all(abs(r["reward"] - r["reward_correct"]) < 1e-6 and r["reward_consistency"] >= 0 for r in rows)
        assert os.path.exists(os.path.join(out, "reward.png"))
        figures[seed] = (rep["first"], rep["last"], time.perf_counter() - t0)
        print(f"seed {seed}: mean reward first 8 steps {rep['first']:.3f}, last 8 steps {rep['last']:.3f} "
              f"(+{rep['last'] - rep['first']:.3f}), {figures[seed][2]:.0f} s")
    said = "; ".join(f"seed {s}: {a:.3f} -> {b:.3f}" for s, (a, b, _) in figures.items())
    assert all(b > a + RISE for a, b, _ in figures.values()), said


def test_grpo_learns_when_sampling_below_temperature_one(tmp_path):
    """Rollouts sampled at temperature 0.7 are scored under softmax(logits / 0.7) (the policy that
    sampled them, as TRL does): the stage runs that path and the reward still rises."""
    root = str(tmp_path / "t07")
    path = toy_stage(root, 0)
    with open(path) as f:
        d = yaml.safe_load(f)
    with open(path, "w") as f:
        yaml.safe_dump(deep_update(d, {"loss": {"grpo": {"temperature": 0.7}}}), f)
    run_cli("train", path)
    rep = json.load(open(os.path.join(root, "out", "report.json")))["reward"]
    print(f"temperature 0.7, seed 0: mean reward first 8 steps {rep['first']:.3f}, last 8 steps {rep['last']:.3f}")
    assert rep["last"] > rep["first"] + RISE, rep
