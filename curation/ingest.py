"""Ingest: list the sources' files on the driver (names only), read them in executors."""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import pyarrow as pa

from curation.readers import READERS
from curation.schema import ARROW_SCHEMA, spark_schema

_FILES = "source string, format string, path string, root string, options string"


def ingest(spark, sources) -> "DataFrame":  # noqa: F821
    """One Spark task per source file; each yields rows of the sample schema."""
    files = [(s.name, s.format, p, s.root, json.dumps(s.options, sort_keys=True))
             for s in sources for p in s.paths]
    n = max(1, min(len(files), 4096))
    fdf = spark.createDataFrame(files, _FILES).repartition(n)

    def read(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for f in b.to_pylist():
                rows: list[dict] = []
                for row in READERS[f["format"]](f["path"], f["source"], f["root"], json.loads(f["options"])):
                    rows.append(row)
                    if len(rows) >= 1024:
                        yield pa.RecordBatch.from_pylist(rows, schema=ARROW_SCHEMA)
                        rows = []
                if rows:
                    yield pa.RecordBatch.from_pylist(rows, schema=ARROW_SCHEMA)

    return fdf.mapInArrow(read, spark_schema())
