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

from reelforge.curation import storage
from reelforge.curation.schema import ARROW_SCHEMA, TABLE_FIELDS

SAMPLES_DIR = "samples"
SPAN_COLUMNS = ("shard", "offset", "length")
STATS_SCHEMA = pa.schema([ARROW_SCHEMA.field(n) for n in TABLE_FIELDS]
                         + [("shard", pa.string()), ("offset", pa.int64()), ("length", pa.int64())])
_SPAN_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
                          ("length", pa.int64())])


def read_sample_stats(run_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The table as Arrow (only the columns asked for); raises FileNotFoundError without it.
    `run_dir` may be a URL (s3://...): the Parquet files are read through its fsspec filesystem."""
    import pyarrow.dataset as ds

    if storage.is_url(run_dir):
        url = storage.join(run_dir, SAMPLES_DIR)
        if not storage.isdir(url):
            raise FileNotFoundError(url)
        fs, path = storage.url_fs(url)
        files = sorted(f"{path}/{rel}" for rel, _ in storage.walk_files(url)
                       if rel.endswith(".parquet") and not rel.rsplit("/", 1)[-1].startswith(("_", ".")))
        if not files:
            raise FileNotFoundError(url)
        return storage.guarded(url, "read", lambda: ds.dataset(files, format="parquet", schema=STATS_SCHEMA,
                                                                 filesystem=fs).to_table(columns=columns))
    path = os.path.join(run_dir, SAMPLES_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(path)
    return ds.dataset(path, format="parquet", schema=STATS_SCHEMA).to_table(columns=columns)
