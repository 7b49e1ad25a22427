"""What a step is, and the registry of steps by name; no Spark here (layer 1 of curation).

A step declares what it needs and produces, and works on plain Python data:

- `setup(context)` once per worker batch stream, before the first batch (load a model here);
  `context` (a `StepContext`) says where the run keeps its files and which accelerators the
  engine gave this task;
- `process(batch) -> batch` over a list of row dicts of the sample schema (`curation.schema`):
  the rows it was given, changed in place, dropped ones marked with `drop()`, never removed;
- `teardown()` after the last batch.

A step registers itself with `@register_step("name")`; the recipe loader finds steps by
importing their modules (every module of `reelforge.filters`, plus a short list of curation
and mixer modules) and reading `STEPS`. The engine (`reelforge.jobs.engine`) runs `process`
inside Spark tasks over Arrow record batches (`run_batches` here does the Arrow <-> rows part);
steps that need a shuffle (exact and near dedup, leakage) say which one in `shuffle` and keep
their decisions in plain functions the engine calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import pyarrow as pa

from reelforge.curation.errors import MediaReadError, ProbeError
from reelforge.curation.schema import ARROW_SCHEMA, alive, drop, rows_of


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the engine tells a step in `setup`: the run's work folder (steps that write media put
    them there) and the accelerators (GPU addresses) the cluster assigned to this task."""

    workdir: str | None = None
    gpus: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PercentileCut:
    """A step's second pass, run by the engine over the whole corpus after its row pass: each
    source's live rows whose `step.cut_value(row)` is below that source's `percentile`-th
    percentile (approximate) are dropped with `reason` (DataComp keeps the top share)."""

    percentile: float
    reason: str


STEPS: dict[str, type] = {}


def register_step(name: str) -> Callable[[type], type]:
    """Class decorator: the step is known to recipes as `name` (also its ledger `drop_step`)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a step name must be a word such as `quality`, got {name!r}")

    def deco(cls: type) -> type:
        old = STEPS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"step name {name!r} is taken by {old.__module__}.{old.__qualname__}; "
                             f"{cls.__module__}.{cls.__qualname__} needs another")
        cls.name = name
        STEPS[name] = cls
        return cls

    return deco


class Step:
    """A named transformation of batches of sample rows into batches of sample rows."""

    name: str = "step"
    shuffle: str | None = None  # a shuffle the engine runs for this step (dedup_exact, ...); None: rows only
    batch_rows = 256  # rows per `process` call
    _transient = ("_scorer", "_pool", "_model", "_tok", "context")  # per-worker state: never pickled

    def __init__(self, name: str | None = None, **params: Any):
        if name:
            self.name = name
        self.params = params

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._transient}

    def setup(self, context: StepContext | None = None) -> None:
        """Once per worker batch stream before the first batch (load models here)."""
        self.context = context or StepContext()
        if self.context.workdir and hasattr(self, "workdir"):
            self.workdir = self.context.workdir

    def process(self, batch: list[dict]) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError

    def process_rows(self, rows: list[dict]) -> list[dict]:
        """`process` under its former name."""
        return self.process(rows)

    def teardown(self) -> None:
        """After the last batch of a stream."""

    def cut(self) -> PercentileCut | None:
        """A per-source percentile cut the engine applies after the row pass (None: none)."""
        return None

    def cut_value(self, row: dict) -> float | None:  # pragma: no cover - interface
        """The value `cut()` ranks; None leaves the row out of the cut."""
        return None


class RowStep(Step):
    """A step that decides about one live row at a time: subclasses write `process_row(row)`;
    a row that raises is dropped with reason `error` instead of failing the task."""

    def __init_subclass__(cls, **kw: Any):
        super().__init_subclass__(**kw)
        fn = cls.__dict__.get("process")
        if fn is not None and list(inspect.signature(fn).parameters)[1:2] == ["row"]:
            # written against the per-row API, `process(row)`: that is this class's process_row
            cls.process_row = fn
            del cls.process

    def process_row(self, row: dict) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def process(self, batch: list[dict]) -> list[dict]:
        out = []
        for row in batch:
            if not alive(row):
                out.append(row)
                continue
            try:
                out.append(self.process_row(row))
            except Exception as e:  # noqa: BLE001 - a bad sample never fails the job
                tb = traceback.format_exception_only(type(e), e)[-1].strip()
                out.append(drop(row, self.name, "error", tb))
        return out


class _Failed(NamedTuple):
    reason: str
    detail: str


class PrefetchRowStep(RowStep):
    """A row step split into `prepare` (decode, resize: CPU work that releases the GIL) and
    `compute` (the model). The next chunk is prepared in a background thread while the model
    works on the current one, so an accelerator never waits on JPEG or video decode."""

    prefetch = 2  # chunks prepared ahead of the model (by `run_batches`)
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

    def process(self, batch: list[dict]) -> list[dict]:
        return self.compute(batch, self.prepare(batch))


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


def run_batches(step: Step, batches: Iterable[pa.RecordBatch], context: StepContext | None = None,
                schema: pa.Schema = ARROW_SCHEMA) -> Iterator[pa.RecordBatch]:
    """A step over a stream of Arrow batches of the schema: setup, `process` on chunks of
    `step.batch_rows` rows (a prefetching step prepares the next chunks in a thread while it
    computes the current one), teardown. What the engine runs inside each task; plain Python."""
    step.setup(context)
    try:
        n = step.batch_rows
        chunks = (rows[i:i + n] for b in batches for rows in (rows_of(b),) for i in range(0, len(rows), n))
        if isinstance(step, PrefetchRowStep):
            outs: Iterable[list[dict]] = prefetched(chunks, step.prepare, step.compute, step.prefetch)
        else:
            outs = (step.process(c) for c in chunks)
        for out in outs:
            if out:
                yield pa.RecordBatch.from_pylist(out, schema=schema)
    finally:
        step.teardown()
