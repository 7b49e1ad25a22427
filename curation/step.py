"""How a step runs over the schema: a Spark transformation, or per-row Python in workers.

Row steps run through `mapInArrow`, so each Python worker sees Arrow batches of the
sample schema, turns them into dicts, and hands them back; nothing goes to the driver.
A row that raises is dropped with reason `error` instead of failing the task.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from curation.schema import ARROW_SCHEMA, alive, drop


class Step:
    """A named transformation of a sample DataFrame into a sample DataFrame."""

    name: str = "step"

    def __init__(self, name: str | None = None, **params: Any):
        if name:
            self.name = name
        self.params = params

    def apply(self, df):  # pragma: no cover - interface
        raise NotImplementedError


class RowStep(Step):
    """A step that looks at one live row at a time inside Python workers."""

    batch_rows = 256

    def setup(self) -> None:
        """Called once per worker batch stream before the first row (load models here)."""

    def process(self, row: dict) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def process_rows(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            if not alive(row):
                out.append(row)
                continue
            try:
                out.append(self.process(row))
            except Exception as e:  # noqa: BLE001 - a bad sample never fails the job
                tb = traceback.format_exception_only(type(e), e)[-1].strip()
                out.append(drop(row, self.name, "error", tb))
        return out

    def apply(self, df):
        step = self

        def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            step.setup()
            yield from map_batches(batches, step.process_rows, step.batch_rows)

        return df.mapInArrow(run, df.schema)


def map_batches(batches: Iterable[pa.RecordBatch], fn: Callable[[list[dict]], list[dict]],
                batch_rows: int = 256, schema: pa.Schema = ARROW_SCHEMA) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        rows = batch.to_pylist()
        for i in range(0, len(rows), batch_rows):
            chunk = fn(rows[i:i + batch_rows])
            if chunk:
                yield pa.RecordBatch.from_pylist(chunk, schema=schema)
