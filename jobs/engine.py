"""The engine: runs recipe steps over sample DataFrames. The one place steps meet Spark.

A step (`curation.step`) is plain Python: `setup(context)`, `process(batch) -> batch`,
`teardown()`. Here each step becomes a DataFrame transformation:

- a row step runs with `mapInArrow`: every task turns its Arrow batches into row dicts,
  calls the step (`curation.step.run_batches`) and hands the rows back; nothing goes to the
  driver. The task's `StepContext` carries the run's work folder and the GPUs Spark assigned;
- a step with a `cut()` (CLIP's per-source percentile) then gets its second pass
  (`jobs.shuffles.percentile_cut`): the cut is computed per source over the whole corpus, and
  the rows below it are dropped;
- a step that needs a shuffle (`step.shuffle`: exact dedup, near dedup, leakage) runs the
  Spark wiring of `jobs.shuffles`, which calls the step's plain decision functions.

Every drop decided across rows reaches the rows through one helper, `jobs.shuffles.mark_drops`:
the decisions (id, drop_reason, drop_detail, dup_of) are joined back onto the rows by id, and
only live rows take them (a row keeps the first step that dropped it).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame

from reelforge.curation.step import Step, StepContext, run_batches
from reelforge.jobs.leakage import leakage
from reelforge.jobs.semantic import dedup_semantic, keep_embeddings
from reelforge.jobs.shuffles import SHUFFLES, percentile_cut


def task_context(base: StepContext) -> StepContext:
    """`base` plus what only the running task knows: the GPU addresses Spark gave it."""
    from pyspark import TaskContext

    gpus: tuple[str, ...] = ()
    try:
        ctx = TaskContext.get()
        res = ctx.resources().get("gpu") if ctx is not None else None
        if res is not None and res.addresses:
            gpus = tuple(res.addresses)
    except Exception:  # noqa: BLE001 - outside a task, or no resources API: no GPU named
        pass
    return dataclasses.replace(base, gpus=gpus)


def map_rows(step: Step, df: DataFrame, context: StepContext | None = None) -> DataFrame:
    """The step's `process` over every partition of `df`, in Python workers."""
    base = context or StepContext()

    def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from run_batches(step, batches, task_context(base))

    return df.mapInArrow(run, df.schema)


def run_step(step: Step, df: DataFrame, workdir: str | None = None) -> DataFrame:
    """The DataFrame of samples after `step`: its shuffle, or its row pass and then its cut."""
    if step.shuffle == "dedup_semantic":  # needs the run's folder (kept embeddings, its report section)
        return dedup_semantic(step, df, workdir, task_context)
    if step.shuffle == "leakage":  # needs the run's folder too (a CLIP step's kept embeddings, its report section)
        return leakage(step, df, workdir)
    if step.shuffle is not None:
        if step.shuffle not in SHUFFLES:
            raise ValueError(f"step {step.name!r} asks for the shuffle {step.shuffle!r}, which the engine does not "
                             f"know: use one of {', '.join(sorted([*SHUFFLES, 'dedup_semantic', 'leakage']))}")
        return SHUFFLES[step.shuffle](step, df)
    if getattr(step, "needs_candidates", False):  # video_tasks: its global clip_match pool, before the row pass
        from reelforge.jobs.video_tasks import gather_candidates

        gather_candidates(step, df)
    if getattr(step, "keep_embeddings", None) is not None:  # a CLIP step: embeddings beside the run
        out = keep_embeddings(step, df, workdir, task_context)
    else:
        out = map_rows(step, df, StepContext(workdir=workdir))
    if step.cut() is not None:  # the cut reads the rows twice: the model runs once
        out = percentile_cut(step, out.persist(StorageLevel.MEMORY_AND_DISK))
    return out
