"""Shards for the training tests, written by the shard writer directly: the recipe's readers and
its per-row steps run in this process (no Spark), so training tests never wait on a Spark run."""

from __future__ import annotations

import hashlib
import os

from reelforge.curation.errors import MediaReadError
from reelforge.curation.readers import READERS
from reelforge.curation.schema import alive
from reelforge.curation.shards import ShardFile, encode_sample
from reelforge.curation.step import Step


def write_shards_locally(recipe_path: str, out_dir: str, per_shard: int = 64, prefix: str = "demo") -> str:
    """Read the recipe's sources, run its row steps (probe, tokens, quality, ...; steps that need
    a shuffle such as dedup are skipped), and write the live samples into tars under `out_dir`."""
    from reelforge.jobs.recipe import load_recipe

    recipe = load_recipe(recipe_path, out=os.path.join(out_dir, "_recipe-out"))
    rows: list[dict] = []
    for s in recipe.sources:
        for p in s.paths:
            rows += list(READERS[s.format](p, s.name, s.root, dict(s.options)))
    for spec in recipe.steps:
        step = spec.build()
        if getattr(step, "shuffle", None) is not None or type(step).process is Step.process:
            continue  # dedup and leakage need the engine's shuffle
        step.setup()
        rows = step.process(rows)
        step.teardown()
    live = sorted((r for r in rows if alive(r)), key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    os.makedirs(out_dir, exist_ok=True)
    shard, written = None, 0
    for r in live:
        try:
            obj = encode_sample(r)
        except MediaReadError:
            continue
        if shard is None:
            shard = ShardFile(os.path.join(out_dir, f"{prefix}-{written // per_shard:06d}.tar"))
        shard.write(obj, r["source"])
        written += 1
        if written % per_shard == 0:
            shard.close()
            shard = None
    if shard is not None:
        shard.close()
    return out_dir
