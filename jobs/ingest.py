"""Ingest on Spark: list the sources' files on the driver (names only), read them in executors.

Every record a file holds becomes exactly one row (`curation.ingest.rows_to_batches` turns a
reader's rows into Arrow batches, a row that will not convert into a `bad_record` row), and
`check_counts` compares, per file, the records `count_records` finds with the rows ingest
wrote, so a reader that loses a tail fails the run's accounting instead of passing as balanced.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from reelforge.curation.ingest import count_problems, rows_to_batches
from reelforge.curation.readers import FILE_REASONS, READERS, count_records
from reelforge.jobs.spark import spark_schema

_FILES = "source string, format string, path string, root string, options string"
_COUNTS = pa.schema([("source", pa.string()), ("path", pa.string()), ("expected", pa.int64())])


def _files(spark, sources):
    files = [(s.name, s.format, p, s.root, json.dumps(s.options, sort_keys=True))
             for s in sources for p in s.paths]
    n = max(1, min(len(files), 4096))
    return spark.createDataFrame(files, _FILES).repartition(n)


def ingest(spark, sources) -> DataFrame:
    """One Spark task per source file; each yields rows of the sample schema."""
    fdf = _files(spark, sources)

    def read(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for f in b.to_pylist():
                yield from rows_to_batches(READERS[f["format"]](f["path"], f["source"], f["root"],
                                                                json.loads(f["options"])))

    return fdf.mapInArrow(read, spark_schema())


def check_counts(spark, ingested, sources) -> list[str]:
    """Count each file's records in executors (one small row per file comes back) and compare
    with the record rows of `ingested`; returns the problems, empty when every record is there."""

    def count(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            out = [{"source": f["source"], "path": f["path"],
                    "expected": count_records(f["format"], f["path"], json.loads(f["options"]))}
                   for f in b.to_pylist()]
            yield pa.RecordBatch.from_pylist(out, schema=_COUNTS)

    counted = _files(spark, sources).mapInArrow(count, "source string, path string, expected long")
    expected = {(r["source"], r["path"]): r["expected"] for r in counted.collect()}
    file_row = F.coalesce((F.col("drop_step") == "ingest") & F.col("drop_reason").isin(list(FILE_REASONS)),
                          F.lit(False))
    got = {(r["source"], r["source_location"]): r["count"]
           for r in ingested.filter(~file_row).groupBy("source", "source_location").count().collect()}
    return count_problems(expected, got)
