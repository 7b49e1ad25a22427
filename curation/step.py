"""How a step runs over the schema: a Spark transformation, or per-row Python in workers.

Row steps run through `mapInArrow`, so each Python worker sees Arrow batches of the
sample schema, turns them into dicts, and hands them back; nothing goes to the driver.
A row that raises is dropped with reason `error` instead of failing the task.
"""

from __future__ import annotations

import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import pyarrow as pa

from reelforge.curation.errors import MediaReadError, ProbeError
from reelforge.curation.schema import ARROW_SCHEMA, alive, drop, rows_of


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
    _transient = ("_scorer", "_pool", "_model")  # per-worker state: never pickled to executors

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._transient}

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


class _Failed(NamedTuple):
    reason: str
    detail: str


class PrefetchRowStep(RowStep):
    """A row step split into `prepare` (decode, resize: CPU work that releases the GIL) and
    `compute` (the model). The next chunk is prepared in a background thread while the model
    works on the current one, so an accelerator never waits on JPEG or video decode."""

    prefetch = 2  # chunks prepared ahead of the model
    decode_workers = 1  # threads decoding the rows of one chunk

    def decode_rows(self, rows: list[dict], idx: list[int], fn: Callable[[dict], Any]
                    ) -> tuple[list[tuple[int, Any]], list[tuple[int, tuple[str, str]]]]:
        """fn(rows[i]) for each i in idx, in `decode_workers` threads. Returns the decoded
        [(i, value)] and the failed [(i, (reason, detail))]: media that will not decode are
        ledger lines, never a failed task."""
        def safe(i: int):
            try:
                return fn(rows[i])
            except (ProbeError, MediaReadError) as e:  # outside_root, not_a_regular_file, ... keep their code
                return _Failed(e.reason, e.detail)
            except Exception as e:  # noqa: BLE001 - undecodable media is a ledger line
                return _Failed("decode_error", f"{type(e).__name__}: {e}"[:500])

        if self.decode_workers > 1 and len(idx) > 1:
            if getattr(self, "_pool", None) is None:
                self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode")
            values = list(self._pool.map(safe, idx))
        else:
            values = [safe(i) for i in idx]
        done = [(i, v) for i, v in zip(idx, values) if not isinstance(v, _Failed)]
        failed = [(i, (v.reason, v.detail)) for i, v in zip(idx, values) if isinstance(v, _Failed)]
        return done, failed

    def prepare(self, rows: list[dict]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self, rows: list[dict], prepared: Any) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError

    def process_rows(self, rows: list[dict]) -> list[dict]:
        return self.compute(rows, self.prepare(rows))

    def apply(self, df):
        step = self

        def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            step.setup()
            chunks = (rows[i:i + step.batch_rows] for b in batches for rows in (rows_of(b),)
                      for i in range(0, len(rows), step.batch_rows))
            for chunk in prefetched(chunks, step.prepare, step.compute, step.prefetch):
                if chunk:
                    yield pa.RecordBatch.from_pylist(chunk, schema=ARROW_SCHEMA)

        return df.mapInArrow(run, df.schema)


def prefetched(chunks: Iterable[list[dict]], prepare: Callable[[list[dict]], Any],
               compute: Callable[[list[dict], Any], list[dict]], depth: int = 2) -> Iterator[list[dict]]:
    """compute(chunk, prepare(chunk)) for each chunk, in order, with up to `depth` chunks
    being prepared in a background thread while compute runs."""
    if depth <= 0:
        for chunk in chunks:
            yield compute(chunk, prepare(chunk))
        return
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        for chunk in chunks:
            pending.append((chunk, pool.submit(prepare, chunk)))
            if len(pending) > depth:
                c, fut = pending.popleft()
                yield compute(c, fut.result())
        while pending:
            c, fut = pending.popleft()
            yield compute(c, fut.result())


def map_batches(batches: Iterable[pa.RecordBatch], fn: Callable[[list[dict]], list[dict]],
                batch_rows: int = 256, schema: pa.Schema = ARROW_SCHEMA) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        rows = rows_of(batch)
        for i in range(0, len(rows), batch_rows):
            chunk = fn(rows[i:i + batch_rows])
            if chunk:
                yield pa.RecordBatch.from_pylist(chunk, schema=schema)
