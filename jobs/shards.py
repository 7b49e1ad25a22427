"""The shard writer on Spark: live rows -> WebDataset tars of at most `max_samples` samples and
`max_bytes` bytes, in a seeded order that does not depend on the partitioning (the same bytes
on local[2] and on a cluster). The tar format, a sample's JSON and media members, and the
per-shard stats are `curation/shards.py`; this is the part that needs the whole corpus.
"""

from __future__ import annotations

import bisect
import os
from typing import Iterable, Iterator

import pyarrow as pa

from reelforge.curation.errors import MediaReadError
from reelforge.curation.schema import ARROW_SCHEMA, rows_of
from reelforge.curation.shards import RESULT_SCHEMA, ShardFile, _save_stats, encode_sample, estimate_bytes

_SUMMARY_SCHEMA = pa.schema([("pid", pa.int64()), ("n", pa.int64()), ("bytes", pa.int64())])
_FIRST_SCHEMA = pa.schema([("_order", pa.string()), ("_bw", pa.int64()), ("_cw", pa.int64())])


SMALL_ROWS = 200_000  # up to this many rows, the (id, size, order) triples are placed on the driver


def _layout(counts: list[tuple[int, int]], max_samples: int, max_bytes: int) -> list[tuple[int, int]]:
    """(byte window, count window) of every sample, given (index, byte offset) in global order."""
    return [(pos // max_bytes, i // max_samples) for i, pos in counts]


def _names(pairs: list[tuple[int, int]], prefix: str) -> dict[tuple[int, int], str]:
    pairs = sorted(set(pairs))
    width = max(6, len(str(len(pairs))))
    return {p: f"{prefix}-{i:0{width}d}.tar" for i, p in enumerate(pairs)}


def write_shards(df, out_dir: str, max_samples: int = 1000, max_bytes: int = 1 << 30,
                 shuffle: bool = True, seed: int = 0, prefix: str = "shard",
                 write_partitions: int | None = None, rows_hint: int | None = None):
    """Write live rows of `df` into shards under out_dir.

    Returns (results DataFrame [id, shard, status, reason, detail], shard names by (byte window,
    count window), the folder of per-shard stats, a DataFrame to unpersist once written).

    Only light triples (id, estimated bytes, order key) are sorted and laid out; the full rows are
    shuffled once, straight to the task writing their shard (the shard of a row is looked up by
    its order key among the shards' first keys, a broadcast of one key per shard). With
    `rows_hint` (an upper bound on the rows of `df`) at most SMALL_ROWS, the triples are laid
    out on the driver (one job); otherwise the sort, one pass of per-partition totals and one
    pass that finds each shard's first key run on the executors.
    """
    from pyspark import StorageLevel, TaskContext
    from pyspark.sql import functions as F

    os.makedirs(out_dir, exist_ok=True)
    spark = df.sparkSession
    sc = spark.sparkContext
    live = df.filter(F.col("drop_step").isNull())
    order = F.sha2(F.concat(F.lit(f"{seed}:"), F.col("id")), 256) if shuffle else F.col("id")

    def estimate(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            rows = rows_of(b)
            yield pa.RecordBatch.from_pylist(
                [{"id": r["id"], "_est": estimate_bytes(r)} for r in rows],
                schema=pa.schema([("id", pa.string()), ("_est", pa.int64())]))

    est_cols = ["id", "text", "chosen", "rejected", "meta", "messages", "captions", "media"]
    sizes = live.select(*est_cols).mapInArrow(estimate, "id string, _est long").withColumn("_order", order)
    if rows_hint is not None and rows_hint <= SMALL_ROWS:
        keyed = sizes
        trip = sorted((r["_order"], r["_est"]) for r in sizes.select("_order", "_est").collect())
        counts, pos = [], 0
        for i, (_, est) in enumerate(trip):
            counts.append((i, pos))
            pos += est
        layout = _layout(counts, max_samples, max_bytes)
        names = _names(layout, prefix)
        firsts = [(trip[i][0], names[p]) for i, p in enumerate(layout) if i == 0 or p != layout[i - 1]]
    else:
        keyed = sizes.sort("_order").persist(StorageLevel.MEMORY_AND_DISK)

        def summary(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            pid = TaskContext.get().partitionId()
            n = total = 0
            for b in batches:
                n += b.num_rows
                total += sum(b.column("_est").to_pylist())
            yield pa.RecordBatch.from_pylist([{"pid": pid, "n": n, "bytes": total}], schema=_SUMMARY_SCHEMA)

        parts = {r["pid"]: (r["n"], r["bytes"]) for r in
                 keyed.mapInArrow(summary, "pid long, n long, bytes long").collect()}
        starts: dict[int, tuple[int, int]] = {}
        idx = off = 0
        for pid in sorted(parts):
            starts[pid] = (idx, off)
            idx += parts[pid][0]
            off += parts[pid][1]
        starts_b = sc.broadcast(starts)

        def first_keys(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            """The rows that open a new (byte window, count window) pair, or the partition."""
            pid = TaskContext.get().partitionId()
            i, pos = starts_b.value.get(pid, (0, 0))
            prev = None
            out = []
            for b in batches:
                for o, est in zip(b.column("_order").to_pylist(), b.column("_est").to_pylist()):
                    p = (pos // max_bytes, i // max_samples)
                    if p != prev:
                        out.append({"_order": o, "_bw": p[0], "_cw": p[1]})
                        prev = p
                    i += 1
                    pos += est
            yield pa.RecordBatch.from_pylist(out, schema=_FIRST_SCHEMA)

        opened = sorted((r["_order"], (r["_bw"], r["_cw"])) for r in
                        keyed.mapInArrow(first_keys, "_order string, _bw long, _cw long").collect())
        names = _names([p for _, p in opened], prefix)
        firsts, last = [], None
        for o, p in opened:  # a pair that continues across a partition boundary opens once
            if p != last:
                firsts.append((o, names[p]))
                last = p
    first_b = sc.broadcast(([o for o, _ in firsts], [n for _, n in firsts]))

    def shard_of(orders):  # pandas Series of order keys -> their shard names (only this column goes to Python)
        import pandas as pd

        keys, shard_names = first_b.value
        return pd.Series([shard_names[bisect.bisect_right(keys, o) - 1] for o in orders], dtype=object)

    n_parts = write_partitions or max(1, min(len(firsts), sc.defaultParallelism * 4))
    to_write = (live.withColumn("_order", order)
                .withColumn("_shard", F.pandas_udf(shard_of, "string")(F.col("_order")))
                .repartition(n_parts, "_shard")
                .sortWithinPartitions("_shard", "_order"))
    out_schema_spark = "id string, shard string, status string, reason string, detail string"
    stats_dir = os.path.join(out_dir, ".stats")
    os.makedirs(stats_dir, exist_ok=True)

    def write(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        state: dict = {"current": None}
        try:
            yield from write_part(batches, state)
        except BaseException:
            if state["current"] is not None:  # a failed write (disk full, ...) leaves no temporary file
                state["current"].abort()
            raise

    def write_part(batches: Iterable[pa.RecordBatch], state: dict) -> Iterator[pa.RecordBatch]:
        current: ShardFile | None = None
        current_name = None
        cols = [f.name for f in ARROW_SCHEMA]
        for b in batches:
            results = []
            for r in rows_of(b):
                name = r["_shard"]
                if name != current_name:
                    if current is not None:
                        _save_stats(stats_dir, current.close())
                        state["current"] = current = None
                    current, current_name = ShardFile(os.path.join(out_dir, name)), name
                    state["current"] = current
                row = {c: r.get(c) for c in cols}
                try:
                    obj = encode_sample(row)
                except MediaReadError as e:
                    results.append({"id": row["id"], "shard": None, "status": "dropped",
                                    "reason": e.reason, "detail": e.detail})
                    continue
                except Exception as e:  # noqa: BLE001 - one bad sample never fails a shard
                    results.append({"id": row["id"], "shard": None, "status": "dropped",
                                    "reason": "write_error", "detail": f"{type(e).__name__}: {e}"[:500]})
                    continue
                current.write(obj, row["source"])
                results.append({"id": row["id"], "shard": name, "status": "kept", "reason": None,
                                "detail": None})
            yield pa.RecordBatch.from_pylist(results, schema=RESULT_SCHEMA)
        if current is not None:
            _save_stats(stats_dir, current.close())
            state["current"] = None

    results = to_write.mapInArrow(write, out_schema_spark)
    return results, names, stats_dir, keyed
