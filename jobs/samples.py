"""The per-sample statistics table (`RUN/samples/*.parquet`, described in `mixers/stats.py`),
written by Spark: each shard's tar headers scanned in a task, joined with the live rows."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import pyarrow as pa
from pyspark.sql import functions as F

from reelforge.curation.schema import TABLE_FIELDS
from reelforge.mixers.stats import _SPAN_SCHEMA, STATS_SCHEMA


def write_sample_stats(spark, final, shard_dir: str, shard_names: list[str], out_path: str) -> None:
    """Scan each shard's tar headers in a task (one per shard) and join with the live rows' columns."""
    def spans(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from reelforge.mixers.tarspan import scan_spans

        for b in batches:
            for name in b.column("shard").to_pylist():
                rows = [{"id": k, "shard": name, "offset": o, "length": n}
                        for k, o, n in scan_spans(os.path.join(shard_dir, name))]
                yield pa.RecordBatch.from_pylist(rows, schema=_SPAN_SCHEMA)

    names = spark.createDataFrame([(n,) for n in shard_names] or [("",)], "shard string")
    if not shard_names:
        names = names.limit(0)
    n_parts = max(1, min(len(shard_names), spark.sparkContext.defaultParallelism * 4))
    span_df = names.repartition(n_parts).mapInArrow(spans, "id string, shard string, offset long, length long")
    cols = list(TABLE_FIELDS)
    live = final.filter(F.col("drop_step").isNull()).select(*cols)
    (live.join(span_df, "id").select(*[f.name for f in STATS_SCHEMA])
     .repartition(max(1, len(shard_names) // 256 + 1)).sortWithinPartitions("shard", "offset")
     .write.mode("overwrite").parquet(out_path))
