"""The whole near-dup step on many short documents under local Spark: docs/s and where the
time goes (signatures + banding, candidate pairs + exact verification, components, keep rule).

    .venv/bin/python benchmarks/bench_near_dedup.py [--docs 1000000] [--master local[2]] [--dup-rate 0.05]

Documents are short (20-60 words), their words drawn at the frequencies of pydoc's help topics
(real English vocabulary shipped with Python), with `--dup-rate` of them near-copies of an
earlier document (one word replaced). Each phase
is materialised on its own (count) so its time can be read apart; the sum is a little more
than one fused run would take. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time


def make_docs(n: int, dup_rate: float, seed: int = 0) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    import numpy as np

    words = " ".join(topics[k] for k in sorted(topics)).split()
    vocab, counts = np.unique(np.array(words), return_counts=True)
    p = counts / counts.sum()
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    lengths = nrng.integers(20, 61, size=n)
    drawn = nrng.choice(len(vocab), size=int(lengths.sum()), p=p)
    docs: list[tuple[str, str]] = []
    pos = 0
    for i in range(n):
        ln = int(lengths[i])
        if docs and rng.random() < dup_rate:
            src = docs[rng.randrange(len(docs))][1].split()
            src[rng.randrange(len(src))] = str(vocab[drawn[pos]])
            docs.append((f"d{i:08d}", " ".join(src)))
        else:
            docs.append((f"d{i:08d}", " ".join(vocab[drawn[pos:pos + ln]].tolist())))
        pos += ln
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--dup-rate", type=float, default=0.05)
    args = ap.parse_args(argv)

    from pyspark.sql import functions as F

    from reelforge.curation.schema import ARROW_SCHEMA, empty_row
    from reelforge.filters.near_dedup import NearDedup
    from reelforge.jobs.components import connected_components
    from reelforge.jobs.engine import run_step
    from reelforge.jobs.shuffles import _edges, _keys
    from reelforge.jobs.spark import get_spark, spark_schema

    t0 = time.perf_counter()
    docs = make_docs(args.docs, args.dup_rate)
    work = tempfile.mkdtemp(prefix="bench-near-")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for k, text in docs:
        r = empty_row()
        r.update(id=k, kind="text", source="bench", source_key=k, source_location="-", text=text)
        rows.append(r)
    pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), os.path.join(work, "docs.parquet"))
    del rows
    gen_s = time.perf_counter() - t0
    spark = get_spark(args.master, {"spark.sql.shuffle.partitions": "16"})

    df = spark.read.schema(spark_schema()).parquet(os.path.join(work, "docs.parquet")).repartition(16).cache()
    df.count()
    step = NearDedup(threshold=0.8)
    live = df.filter(F.col("drop_step").isNull())
    phases: dict[str, float] = {}
    t = time.perf_counter()  # the step as a recipe runs it, nothing cached
    dropped = run_step(step, df).filter(F.col("drop_step") == "dedup_near").count()
    phases["whole step (fused, recomputed)"] = time.perf_counter() - t
    spark.catalog.clearCache()  # the step persists its keys: drop them so each phase computes its own
    df.cache().count()
    t = time.perf_counter()
    keys = _keys(step, live).cache()
    n_keys = keys.count()
    phases["signatures + bands"] = time.perf_counter() - t
    t = time.perf_counter()
    edges = _edges(step, keys, live).cache()
    n_edges = edges.count()
    phases["candidates + exact verification"] = time.perf_counter() - t
    t = time.perf_counter()
    comp = connected_components(edges).cache()
    n_comp_nodes = comp.count()
    phases["connected components"] = time.perf_counter() - t
    total = sum(v for k, v in phases.items() if not k.startswith("whole"))
    print(f"{args.docs} docs ({args.dup_rate:.0%} planted near-copies) on {args.master}; generated in {gen_s:.1f}s")
    print(f"{'phase':38s} {'seconds':>8s}")
    for k, v in phases.items():
        print(f"{k:38s} {v:8.1f}")
    print(f"band keys {n_keys}, verified edges {n_edges}, nodes in clusters {n_comp_nodes}, dropped {dropped}")
    print(f"docs/s (phases summed): {args.docs / total:,.0f}; docs/s (fused step): "
          f"{args.docs / phases['whole step (fused, recomputed)']:,.0f}")
    print(json.dumps({"bench": "near_dedup", "docs": args.docs, "master": args.master, "phases_s": phases,
                      "docs_per_s_phases": args.docs / total,
                      "docs_per_s_fused": args.docs / phases["whole step (fused, recomputed)"],
                      "edges": n_edges, "dropped": dropped}))
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
