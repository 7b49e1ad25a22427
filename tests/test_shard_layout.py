"""The Spark shard writer lays samples out the same whether the (id, size, order) triples are
placed on the driver (small runs) or on the executors (sort, per-partition totals, first keys):
the same shard names, the same bytes, the same samples per shard, windows by count and bytes."""

from __future__ import annotations

import hashlib
import os
import random
import tarfile

import pytest

from reelforge.curation.schema import empty_row, make_id
from reelforge.curation.shards import read_stats


def _rows(n: int) -> list[dict]:
    rng = random.Random(5)
    rows = []
    for i in range(n):
        r = empty_row()
        text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randrange(5, 400)))
        r.update(kind="text", source="s", source_key=f"k{i}", source_location="-", text=text)
        r["id"] = make_id("s", f"k{i}", {"text": text})
        if i % 17 == 0:
            r.update(drop_step="x", drop_reason="y")
        rows.append(r)
    return rows


def _write(spark, rows, out, rows_hint, **kw):
    from reelforge.jobs.shards import write_shards
    from reelforge.jobs.spark import sample_frame

    df = sample_frame(spark, rows).repartition(3)
    results, names, stats_dir, keyed = write_shards(df, str(out), rows_hint=rows_hint, **kw)
    res = {r["id"]: (r["shard"], r["status"]) for r in results.collect()}
    keyed.unpersist()
    stats = read_stats(stats_dir, names)
    tars = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            data = (out / name).read_bytes()
            with tarfile.open(out / name) as t:
                members = [m.name for m in t.getmembers()]
            tars[name] = (hashlib.sha256(data).hexdigest(), members)
    return res, sorted(names.values()), stats, tars


@pytest.mark.parametrize("kw", [dict(max_samples=37, max_bytes=1 << 30, shuffle=True, seed=3),
                                dict(max_samples=1000, max_bytes=40_000, shuffle=True, seed=0),
                                dict(max_samples=25, max_bytes=30_000, shuffle=False, seed=0)])
def test_driver_and_executor_layouts_write_the_same_shards(spark, tmp_path, kw):
    rows = _rows(300)
    small = _write(spark, rows, tmp_path / "small", rows_hint=len(rows), **kw)
    big = _write(spark, rows, tmp_path / "big", rows_hint=None, **kw)
    assert small == big
    res, names, stats, tars = small
    live = [r for r in rows if r["drop_step"] is None]
    assert sorted(res) == sorted(r["id"] for r in live) and {s for _, s in res.values()} == {"kept"}
    assert len(names) > 2 and sum(s["samples"] for s in stats) == len(live)
    assert all(s["samples"] <= kw["max_samples"] for s in stats)
    # a shard's samples are consecutive in the order (sha256 of seed:id, or the id), shard by shard
    order = (lambda i: hashlib.sha256(f"{kw['seed']}:{i}".encode()).hexdigest()) if kw["shuffle"] else (lambda i: i)
    flat = [m[:-len(".json")] for name in names for m in tars[name][1]]
    assert flat == sorted((r["id"] for r in live), key=order)
