"""The shard writer on Spark: live rows -> WebDataset tars of at most `max_samples` samples and
`max_bytes` bytes, in a seeded order that does not depend on the partitioning (the same bytes
on local[2] and on a cluster). The tar format, a sample's JSON and media members, and the
per-shard stats are `curation/shards.py`; this is the part that needs the whole corpus.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import pyarrow as pa

from reelforge.curation.errors import MediaReadError
from reelforge.curation.schema import ARROW_SCHEMA, rows_of
from reelforge.curation.shards import RESULT_SCHEMA, ShardFile, _save_stats, encode_sample, estimate_bytes

_ASSIGN_SCHEMA = pa.schema([("id", pa.string()), ("_bw", pa.int64()), ("_cw", pa.int64())])
_SUMMARY_SCHEMA = pa.schema([("pid", pa.int64()), ("n", pa.int64()), ("bytes", pa.int64())])


def write_shards(df, out_dir: str, max_samples: int = 1000, max_bytes: int = 1 << 30,
                 shuffle: bool = True, seed: int = 0, prefix: str = "shard",
                 write_partitions: int | None = None):
    """Write live rows of `df` into shards under out_dir.

    Returns (results DataFrame [id, shard, status, reason, detail], list of shard stats).
    """
    from pyspark import StorageLevel, TaskContext
    from pyspark.sql import functions as F

    os.makedirs(out_dir, exist_ok=True)
    spark = df.sparkSession
    live = df.filter(F.col("drop_step").isNull())
    order = F.sha2(F.concat(F.lit(f"{seed}:"), F.col("id")), 256) if shuffle else F.col("id")
    def estimate(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            rows = rows_of(b)
            yield pa.RecordBatch.from_pylist(
                [{"id": r["id"], "_est": estimate_bytes(r)} for r in rows],
                schema=pa.schema([("id", pa.string()), ("_est", pa.int64())]))

    sizes = live.mapInArrow(estimate, "id string, _est long")
    keyed = sizes.withColumn("_order", order).sort("_order").persist(StorageLevel.MEMORY_AND_DISK)

    def summary(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pid = TaskContext.get().partitionId()
        n = total = 0
        for b in batches:
            n += b.num_rows
            total += sum(b.column("_est").to_pylist())
        yield pa.RecordBatch.from_pylist([{"pid": pid, "n": n, "bytes": total}], schema=_SUMMARY_SCHEMA)

    summaries = keyed.mapInArrow(summary, "pid long, n long, bytes long").collect()
    parts = {r["pid"]: (r["n"], r["bytes"]) for r in summaries}
    starts: dict[int, tuple[int, int]] = {}
    idx = off = 0
    for pid in sorted(parts):
        starts[pid] = (idx, off)
        idx += parts[pid][0]
        off += parts[pid][1]
    starts_b = spark.sparkContext.broadcast(starts)

    def assign(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pid = TaskContext.get().partitionId()
        i, pos = starts_b.value.get(pid, (0, 0))
        for b in batches:
            out = []
            for r in b.to_pylist():
                out.append({"id": r["id"], "_bw": pos // max_bytes, "_cw": i // max_samples})
                i += 1
                pos += r["_est"]
            yield pa.RecordBatch.from_pylist(out, schema=_ASSIGN_SCHEMA)

    assigned = keyed.mapInArrow(assign, "id string, _bw long, _cw long").join(keyed.select("id", "_order"), "id")
    pairs = sorted((r["_bw"], r["_cw"]) for r in assigned.select("_bw", "_cw").distinct().collect())
    width = max(6, len(str(len(pairs))))
    names = {p: f"{prefix}-{i:0{width}d}.tar" for i, p in enumerate(pairs)}
    names_b = spark.sparkContext.broadcast(names)
    shard_of = F.udf(lambda bw, cw: names_b.value[(bw, cw)], "string")
    assigned = assigned.withColumn("_shard", shard_of("_bw", "_cw")).select("id", "_order", "_shard")

    n_parts = write_partitions or max(1, min(len(pairs), spark.sparkContext.defaultParallelism * 4))
    to_write = (live.join(assigned, "id")
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
