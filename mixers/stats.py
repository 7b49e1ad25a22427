"""The per-sample statistics table of a curation run (`RUN/samples/*.parquet`).

One row per sample in the shards: the schema's fields declared `table=True` in
`curation.schema` (id, source, kind, mode, stage, tokens, the scores map, parent_id: the
planner's selectors), and where its bytes sit (shard, byte offset and length of its members
in the tar). A new column is one declaration in the schema, not an edit here. The planner
reads only this table (and the index), never the shards; the emitter copies each sample's
span into the new shards with one read. Spark writes it; nothing is collected.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import pyarrow as pa

from reelforge.curation.schema import ARROW_SCHEMA, TABLE_FIELDS

SAMPLES_DIR = "samples"
SPAN_COLUMNS = ("shard", "offset", "length")
STATS_SCHEMA = pa.schema([ARROW_SCHEMA.field(n) for n in TABLE_FIELDS]
                         + [("shard", pa.string()), ("offset", pa.int64()), ("length", pa.int64())])
_SPAN_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
                          ("length", pa.int64())])


def write_sample_stats(spark, final, shard_dir: str, shard_names: list[str], out_path: str) -> None:
    """Scan each shard's tar headers in a task (one per shard) and join with the live rows' columns."""
    from pyspark.sql import functions as F

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


def read_sample_stats(run_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The table as Arrow (only the columns asked for); raises FileNotFoundError without it."""
    import pyarrow.dataset as ds

    path = os.path.join(run_dir, SAMPLES_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(path)
    return ds.dataset(path, format="parquet", schema=STATS_SCHEMA).to_table(columns=columns)
