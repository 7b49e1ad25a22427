"""The per-sample statistics table of a curation run (`RUN/samples/*.parquet`).

One row per sample in the shards: the schema's fields declared `table=True` in
`curation.schema` (id, source, kind, mode, stage, tokens, the scores map, parent_id: the
planner's selectors), and where its bytes sit (shard, byte offset and length of its members
in the tar). A new column is one declaration in the schema, not an edit here. The planner
reads only this table (and the index), never the shards; the emitter copies each sample's
span into the new shards with one read. Spark writes it (`jobs/samples.py`); nothing is collected.
"""

from __future__ import annotations

import os

import pyarrow as pa

from reelforge.curation.schema import ARROW_SCHEMA, TABLE_FIELDS

SAMPLES_DIR = "samples"
SPAN_COLUMNS = ("shard", "offset", "length")
STATS_SCHEMA = pa.schema([ARROW_SCHEMA.field(n) for n in TABLE_FIELDS]
                         + [("shard", pa.string()), ("offset", pa.int64()), ("length", pa.int64())])
_SPAN_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
                          ("length", pa.int64())])


def read_sample_stats(run_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The table as Arrow (only the columns asked for); raises FileNotFoundError without it."""
    import pyarrow.dataset as ds

    path = os.path.join(run_dir, SAMPLES_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(path)
    return ds.dataset(path, format="parquet", schema=STATS_SCHEMA).to_table(columns=columns)
