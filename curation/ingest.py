"""Ingest's plain part: a reader's rows as Arrow batches, and the per-file record check.

Every record a file holds becomes exactly one row. Two guards make that checkable: a row
that will not convert to Arrow (a string with a lone surrogate from a JSON escape, say) is
replaced by a `bad_record` row instead of failing the task, and `count_problems` compares,
per file, the records `count_records` finds with the rows ingest wrote. The Spark side (one
task per file, the counts gathered per file) is `jobs/ingest.py`.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import pyarrow as pa

from reelforge.curation.readers import _bad_row, one_line
from reelforge.curation.schema import ARROW_SCHEMA


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


def count_problems(expected: dict, got: dict) -> list[str]:
    """Files whose record rows differ from their counted records: {(source, path): n or None}
    against {(source, path): rows}; None (a file that could not be counted) is not checked."""
    out = []
    for (source, path), n in sorted(expected.items()):
        if n is not None and got.get((source, path), 0) != n:
            out.append(f"{path} ({source}) holds {n} records but ingest wrote {got.get((source, path), 0)} rows")
    return out
