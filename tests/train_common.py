"""Helpers shared by the tests/test_train_*.py files: tiny models and tiny stage YAMLs."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile

import yaml

from reelforge.training.config import load_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VISUAL = {"max_pixels": 16 * 28 * 28, "video_min_pixels": 4 * 28 * 28, "video_max_pixels": 4 * 28 * 28,
               "video_total_tokens": 32}


def tiny_models(root: str, demo_corpus: str) -> dict[str, str]:
    from reelforge.training.checkpoint import build_tiny_models

    return build_tiny_models(root, tokenizer_dir=os.path.join(os.path.dirname(demo_corpus), "tokenizer"))


def write_stage(path: str, models: dict, shards: str, out: str, **over) -> str:
    d = {"name": os.path.splitext(os.path.basename(path))[0], "objective": "lm",
         "model": {"vision": models["vision"], "llm": models["llm"]},
         "steps": 6, "seed": 0,
         "data": {"sources": [{"name": "demo", "path": shards}], "max_len": 256, "num_workers": 1,
                  "visual": TINY_VISUAL},
         "optim": {"lr": 3e-3, "schedule": "constant"},
         "deepspeed": {"zero_stage": 2},
         "output": {"dir": out}}
    from reelforge.training.config import deep_update

    d = deep_update(d, over)
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return path


def stage(path: str):
    return load_stage(path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`reelforge ARGS` in a fresh process (DeepSpeed + gloo), or under torchrun with nproc > 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "reelforge.training", *args[1:]]  # args[0] is "train"
    else:
        cmd = [sys.executable, "-m", "reelforge.jobs.cli", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def seen_ids(out: str, rank: int = 0) -> list[str]:
    import json

    with open(os.path.join(out, "seen", f"rank{rank}.jsonl")) as f:
        return [i for ln in f if ln.strip() for i in json.loads(ln)["ids"]]


def all_ids(shards: str) -> list[str]:
    """Every sample id in a folder's tars, in shard order (the multiset an exact epoch must see)."""
    ids = []
    for t in sorted(glob.glob(os.path.join(shards, "*.tar"))):
        with tarfile.open(t) as tf:
            ids += [m.name[:-5] for m in tf if m.name.endswith(".json")]
    return ids
