"""Elastic resume: a checkpoint of N ranks x W loader workers resumes on M ranks x V workers, and every
sample left is trained on exactly once (issue 17, item 6). The sample set is exact; the order is not."""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections import Counter

import pytest
from train_common import all_ids as _all_ids
from train_common import run_cli, seen_ids, stage, write_stage

from reelforge.training.loader import ShardLoader, iter_ids

pytestmark = [pytest.mark.train, pytest.mark.slow]


def _seen_by_step(out: str) -> list[tuple[int, list[str]]]:
    """(step, ids) of every rank's seen file, however many ranks wrote them."""
    rows = []
    for f in sorted(glob.glob(os.path.join(out, "seen", "rank*.jsonl"))):
        with open(f) as fh:
            rows += [(r["step"], r["ids"]) for r in map(json.loads, filter(str.strip, fh))]
    return rows


def _ckpt_sums(folder: str) -> dict[str, float]:
    """The checkpoint's own numbers for `resume_fingerprint`: its module weights squared and summed (ZeRO-2's
    rank-0 file holds them whole) and Adam's moments summed over every rank's optimiser partition file."""
    import torch

    m = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    bufs = set(m.get("buffer_names") or [])
    out = {"weights_sq": sum(float(v.double().pow(2).sum()) for k, v in m["module"].items() if k not in bufs),
           "adam_m": 0.0, "adam_v": 0.0}
    for f in glob.glob(os.path.join(folder, "zero_pp_rank_*_optim_states.pt")):
        o = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        for st in o["state"].values():
            out["adam_m"] += float(st["exp_avg"].double().sum())
            out["adam_v"] += float(st["exp_avg_sq"].double().sum())
    return out


def _carried(log: str) -> dict[str, float]:
    line = next(ln for ln in log.splitlines() if "carried over:" in ln)
    words = line.split("carried over:", 1)[1].split()
    return {k: float(v) for k, v in zip(words[::2], words[1::2])}


def _assert_carried(log: str, ckpt: str) -> None:
    got, want = _carried(log), _ckpt_sums(ckpt)
    assert got.keys() == want.keys() and want["adam_v"] > 0, (got, want)
    for k in want:
        assert abs(got[k] - want[k]) <= 1e-6 * max(abs(want[k]), 1e-12), (k, got[k], want[k])


def test_loader_positions_move_across_sizes_twice(tiny, shards, tmp_path):
    """2 ranks x 2 workers take a few batches (their workers prefetch more, which must not count), the state
    moves to 1 x 1, which takes a few more, then to 3 x 2, which reads to the end of the epoch: together
    they see the epoch's samples once each (both splits; the second move starts from an elastic base)."""
    want = Counter(_all_ids(shards))
    for split in ("samples", "shards"):
        def cfg(workers: int, split=split):
            name = f"{split}-{workers}"
            return stage(write_stage(str(tmp_path / f"{name}.yaml"), tiny, shards, str(tmp_path / name),
                                     data={"epochs": 1, "num_workers": workers, "max_len": 1024, "split": split}))

        got, states = [], []
        for r in range(2):
            ld = ShardLoader(cfg(2), rank=r, world=2)
            got += iter_ids(ld, limit=4 + r)
            states.append(json.loads(json.dumps(ld.state_dict())))  # checkpoints hold plain JSON-able data
        ld = ShardLoader(cfg(1))
        assert ld.resume(states) is True
        got += iter_ids(ld, limit=5)
        states = [json.loads(json.dumps(ld.state_dict()))]
        assert states[0]["elastic"]["demo"]["epochs"]  # the consumed index ranges of the begun epoch
        for r in range(3):
            ld = ShardLoader(cfg(2), rank=r, world=3)
            assert ld.resume(states) is True
            got += iter_ids(ld)
        dup = sorted(k for k, v in Counter(got).items() if v > 1)
        assert Counter(got) == want, (split, dup[:5], len(got), sum(want.values()))


def test_loader_positions_in_different_epochs(tiny, shards, tmp_path):
    """Two epochs: rank 0 of 2 runs into the second epoch while rank 1 is early in the first; 1 rank x 2
    workers takes over and reads to the end: every sample exactly twice (the base holds both begun epochs)."""
    want = Counter({k: 2 * v for k, v in Counter(_all_ids(shards)).items()})

    def cfg(workers: int):
        return stage(write_stage(str(tmp_path / f"e2-{workers}.yaml"), tiny, shards, str(tmp_path / f"e2-{workers}"),
                                 data={"epochs": 2, "num_workers": workers, "max_len": 1024, "split": "samples"}))

    got, states = [], []
    ld = ShardLoader(cfg(1), rank=0, world=2)
    for b in ld:  # rank 0: into its second epoch
        got += [s["id"] for s in b["samples"]]
        if ld.state_dict()["states"][0]["sources"]["demo"]["pos"] > 10 and \
                ld.state_dict()["states"][0]["sources"]["demo"]["epoch"] == 1:
            break
    states.append(json.loads(json.dumps(ld.state_dict())))
    ld = ShardLoader(cfg(1), rank=1, world=2)
    got += iter_ids(ld, limit=3)
    states.append(json.loads(json.dumps(ld.state_dict())))
    assert states[0]["states"]["0"]["sources"]["demo"]["epoch"] == 1  # rank 0 is in its second epoch
    assert states[1]["states"]["0"]["sources"]["demo"]["epoch"] == 0
    ld = ShardLoader(cfg(2))
    assert ld.resume(states) is True
    assert set(ld.state_dict()["elastic"]["demo"]["epochs"]) == {"0", "1"}
    got += iter_ids(ld)
    assert Counter(got) == want, sorted(k for k, v in Counter(got).items() if v != want[k])[:5]


def test_train_resumes_on_another_number_of_ranks(tiny, shards, tmp_path):
    """(a) 1 rank x 2 workers trains an epoch straight, with a checkpoint at step K; (b) 2 ranks x 1 worker stop
    at step K, then 1 rank x 2 workers resumes to the end; (c) the straight run's step-K checkpoint resumes on
    2 ranks x 1 worker. In (b) and (c) the ids trained on before and after the stop are the straight run's
    set as a multiset: nothing lost, nothing twice. ZeRO-2's optimiser partitions move through DeepSpeed's
    universal checkpoint."""
    K = 3
    base = dict(steps=1000, trainable=["projector", "llm"], deepspeed={"zero_stage": 2},
                data={"epochs": 1, "max_len": 512}, output={"save_every": K})

    def stage_yaml(name: str, workers: int) -> str:
        over = json.loads(json.dumps(base))
        over["data"]["num_workers"] = workers
        return write_stage(str(tmp_path / f"{name}-{workers}.yaml"), tiny, shards, str(tmp_path / name), **over)

    everything = Counter(_all_ids(shards))

    # (a) straight, 1 rank
    straight = str(tmp_path / "straight")
    run_cli("train", stage_yaml("straight", 2))
    ids_a = seen_ids(straight, 0)
    assert Counter(ids_a) == everything  # an epoch, each sample once
    assert os.path.isdir(os.path.join(straight, "ckpt", f"step-{K}"))

    # (b) 2 ranks stop at K, 1 rank resumes
    b = str(tmp_path / "b")
    run_cli("train", stage_yaml("b", 1), "--stop-after", str(K), nproc=2, timeout=400)
    before = [i for s, ids in _seen_by_step(b) for i in ids]
    assert 0 < len(before) < len(ids_a)
    p = run_cli("train", stage_yaml("b", 2))
    assert "saved by 2 ranks x 1 workers, now 1 x 2" in p.stdout + p.stderr
    _assert_carried(p.stdout + p.stderr, os.path.join(b, "ckpt", f"step-{K}"))  # weights and Adam moments moved
    assert os.path.isdir(os.path.join(b, "ckpt", f"step-{K}-universal", "zero"))
    rows = _seen_by_step(b)
    got = [i for _, ids in rows for i in ids]
    assert Counter(got) == Counter(ids_a), sorted(k for k, v in Counter(got).items() if v > 1)[:5]
    assert max(s for s, _ in rows) > K and os.path.exists(os.path.join(b, "final", "projector.safetensors"))

    # (c) 1 rank's checkpoint at K (the straight run's own, its workers had prefetched past it), 2 ranks resume
    c = str(tmp_path / "c")
    os.makedirs(os.path.join(c, "ckpt"))
    shutil.copytree(os.path.join(straight, "ckpt", f"step-{K}"), os.path.join(c, "ckpt", f"step-{K}"))
    with open(os.path.join(c, "ckpt", "latest"), "w") as f:
        f.write(f"step-{K}")
    shutil.copytree(os.path.join(straight, "seen"), os.path.join(c, "seen"))  # resume cuts it back to step K
    p = run_cli("train", stage_yaml("c", 1), nproc=2, timeout=400)
    assert "saved by 1 ranks x 2 workers, now 2 x 1" in p.stdout + p.stderr
    _assert_carried(p.stdout + p.stderr, os.path.join(c, "ckpt", f"step-{K}"))
    rows = _seen_by_step(c)
    assert {s for s, _ in rows if s <= K} == set(range(1, K + 1))
    got = [i for _, ids in rows for i in ids]
    assert Counter(got) == Counter(ids_a), sorted(k for k, v in Counter(got).items() if v > 1)[:5]
    assert seen_ids(c, 1)  # the second rank trained on its share
