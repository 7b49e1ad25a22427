"""Ingest on Spark: list the sources' files on the driver (names only), read them in executors.

Every record a file holds becomes exactly one row (`curation.ingest.rows_to_batches` turns a
reader's rows into Arrow batches, a row that will not convert into a `bad_record` row), and
`check_counts` compares, per file, the records `count_records` finds with the rows ingest
wrote, so a reader that loses a tail fails the run's accounting instead of passing as balanced.
Both counts are made in the task that reads the file and come back in an accumulator with the
write, so the check costs no Spark job of its own.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import pyarrow as pa
from pyspark import Accumulator, AccumulatorParam
from pyspark.sql import DataFrame

from reelforge.curation.ingest import count_problems, rows_to_batches
from reelforge.curation.readers import FILE_REASONS, READERS, count_records
from reelforge.jobs.spark import spark_schema

LOCATION_MAP = "_location_map"  # a source mirrored from a URL (jobs.remote): option [mirror folder, URL]
_FILES = "source string, format string, path string, root string, options string"


def _files(spark, sources):
    files = [(s.name, s.format, p, s.root, json.dumps(s.options, sort_keys=True))
             for s in sources for p in s.paths]
    n = max(1, min(len(files), 4096))  # a partition per file (up to 4096), without a shuffle
    return spark.createDataFrame(spark.sparkContext.parallelize(files, n), _FILES)


class _PerFile(AccumulatorParam):
    """{(source, path): (expected, rows)} merged by key: a retried or re-run task sends the
    same entry again, so the merge is idempotent (a plain sum would count a file twice)."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:
        a.update(b)
        return a


def _record_rows(batch: pa.RecordBatch) -> int:
    """Rows of a batch that stand for records (not a row about a whole file)."""
    step, reason = batch.column("drop_step").to_pylist(), batch.column("drop_reason").to_pylist()
    return sum(not (s == "ingest" and r in FILE_REASONS) for s, r in zip(step, reason))


def _relocated(batch: pa.RecordBatch, mapping) -> pa.RecordBatch:
    """The batch with `source_location` naming the object's URL instead of its mirror copy."""
    i = batch.schema.get_field_index("source_location")
    cols = list(batch.columns)
    cols[i] = pa.array(relocate(cols[i].to_pylist(), mapping), type=cols[i].type)
    return pa.RecordBatch.from_arrays(cols, schema=batch.schema)


def relocate(values: list, mapping) -> list:
    """source_location values under the mirror folder, as the object URLs they came from."""
    d, url = mapping
    d = d.rstrip(os.sep) + os.sep
    return [f"{url}/{v[len(d):].replace(os.sep, '/')}" if isinstance(v, str) and v.startswith(d) else v
            for v in values]


def ingest(spark, sources) -> tuple[DataFrame, Accumulator]:
    """One Spark task per source file; each yields rows of the sample schema and, in the same
    task, counts the file's records (`count_records`, a reading independent of the reader's) and
    the record rows it wrote into the returned accumulator, for `check_counts`: no extra job."""
    fdf = _files(spark, sources)
    counts = spark.sparkContext.accumulator({}, _PerFile())

    def read(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for f in b.to_pylist():
                opts = json.loads(f["options"])
                mirrored = opts.pop(LOCATION_MAP, None)  # a source mirrored from a URL (jobs.remote)
                rows = 0
                for out in rows_to_batches(READERS[f["format"]](f["path"], f["source"], f["root"], opts)):
                    rows += _record_rows(out)
                    yield _relocated(out, mirrored) if mirrored else out
                counts.add({(f["source"], f["path"]): (count_records(f["format"], f["path"], opts), rows)})

    return fdf.mapInArrow(read, spark_schema()), counts


def check_counts(counts: Accumulator, sources) -> list[str]:
    """The problems `ingest`'s per-file counts show (after its rows were written), empty when
    every record of every file is there."""
    seen = counts.value
    files = [(s.name, p) for s in sources for p in s.paths]
    unread = [f"{p} ({name}) was not read by ingest" for name, p in files if (name, p) not in seen]
    return unread + count_problems({k: seen[k][0] for k in files if k in seen},
                                   {k: rows for k, (_, rows) in seen.items()})
