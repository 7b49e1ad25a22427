"""Ingest: list the sources' files on the driver (names only), read them in executors.

Every record a file holds becomes exactly one row. Two guards make that checkable:
a row that will not convert to Arrow (a string with a lone surrogate from a JSON escape,
say) is replaced by a `bad_record` row instead of failing the task, and `check_counts`
compares, per file, the records `count_records` finds with the rows ingest wrote, so a
reader that loses a tail fails the run's accounting instead of passing as balanced.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import pyarrow as pa

from reelforge.curation.readers import FILE_REASONS, READERS, _bad_row, count_records, one_line
from reelforge.curation.schema import ARROW_SCHEMA, spark_schema

_FILES = "source string, format string, path string, root string, options string"
_COUNTS = pa.schema([("source", pa.string()), ("path", pa.string()), ("expected", pa.int64())])


def _files(spark, sources):
    files = [(s.name, s.format, p, s.root, json.dumps(s.options, sort_keys=True))
             for s in sources for p in s.paths]
    n = max(1, min(len(files), 4096))
    return spark.createDataFrame(files, _FILES).repartition(n)


def _to_batch(rows: list[dict]) -> pa.RecordBatch:
    """Rows as one Arrow batch; a row that will not convert becomes a `bad_record` row."""
    try:
        return pa.RecordBatch.from_pylist(rows, schema=ARROW_SCHEMA)
    except Exception:  # noqa: BLE001 - find the rows that fail, keep the rest
        pass
    fixed = []
    for r in rows:
        try:
            pa.RecordBatch.from_pylist([r], schema=ARROW_SCHEMA)
            fixed.append(r)
        except Exception as e:  # noqa: BLE001 - each record is its own failure domain
            fixed.append(_bad_row(str(r.get("source")), str(r.get("source_key")), str(r.get("source_location")),
                                  "bad_record", f"the record cannot be stored: {one_line(e)}"))
    return pa.RecordBatch.from_pylist(fixed, schema=ARROW_SCHEMA)


def rows_to_batches(rows: Iterable[dict], size: int = 1024) -> Iterator[pa.RecordBatch]:
    buf: list[dict] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= size:
            yield _to_batch(buf)
            buf = []
    if buf:
        yield _to_batch(buf)


def ingest(spark, sources) -> "DataFrame":  # noqa: F821
    """One Spark task per source file; each yields rows of the sample schema."""
    fdf = _files(spark, sources)

    def read(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for f in b.to_pylist():
                yield from rows_to_batches(READERS[f["format"]](f["path"], f["source"], f["root"],
                                                                json.loads(f["options"])))

    return fdf.mapInArrow(read, spark_schema())


def count_problems(expected: dict, got: dict) -> list[str]:
    """Files whose record rows differ from their counted records: {(source, path): n or None}
    against {(source, path): rows}; None (a file that could not be counted) is not checked."""
    out = []
    for (source, path), n in sorted(expected.items()):
        if n is not None and got.get((source, path), 0) != n:
            out.append(f"{path} ({source}) holds {n} records but ingest wrote {got.get((source, path), 0)} rows")
    return out


def check_counts(spark, ingested, sources) -> list[str]:
    """Count each file's records in executors (one small row per file comes back) and compare
    with the record rows of `ingested`; returns the problems, empty when every record is there."""
    from pyspark.sql import functions as F

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
