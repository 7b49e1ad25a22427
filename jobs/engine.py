"""The engine: runs recipe steps over sample DataFrames. The one place steps meet Spark.

A step (`curation.step`) is plain Python: `setup(context)`, `process(batch) -> batch`,
`teardown()`. Here each step becomes a DataFrame transformation:

- a row step runs with `mapInArrow`: every task turns its Arrow batches into row dicts,
  calls the step (`curation.step.run_batches`) and hands the rows back; nothing goes to the
  driver. The task's `StepContext` carries the run's work folder and the GPUs Spark assigned;
- a step with a `cut()` (CLIP's per-source percentile) then gets its second pass: the cut is
  computed per source over the whole corpus, and the rows below it are dropped;
- a step that needs a shuffle (`step.shuffle`: exact dedup, near dedup, leakage) runs the
  Spark wiring of `jobs.shuffles`, which calls the step's plain decision functions.

Every drop decided across rows reaches the rows through one helper, `mark_drops`: the
decisions (id, drop_reason, drop_detail, dup_of) are joined back onto the rows by id, and
only live rows take them (a row keeps the first step that dropped it).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from reelforge.curation.schema import rows_of
from reelforge.curation.step import Step, StepContext, run_batches


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


def mark_drops(df: DataFrame, decisions: DataFrame, step_name: str) -> DataFrame:
    """Join drop decisions (id, drop_reason, drop_detail, dup_of; one row per id) back onto the
    rows: a live row named there leaves with `step_name`, that reason and detail, and `dup_of`
    when given; dropped rows and rows not named pass unchanged. Same columns as `df`."""
    d = decisions.select("id", F.col("drop_reason").alias("_reason"), F.col("drop_detail").alias("_detail"),
                         F.col("dup_of").alias("_dup"))
    out = df.join(d, "id", "left")
    hit = F.col("_reason").isNotNull() & F.col("drop_step").isNull()
    out = (out.withColumn("drop_reason", F.when(hit, F.col("_reason")).otherwise(F.col("drop_reason")))
           .withColumn("drop_detail", F.when(hit, F.col("_detail")).otherwise(F.col("drop_detail")))
           .withColumn("dup_of", F.when(hit & F.col("_dup").isNotNull(), F.col("_dup")).otherwise(F.col("dup_of")))
           .withColumn("drop_step", F.when(hit, F.lit(step_name)).otherwise(F.col("drop_step"))))
    return out.select(*df.columns)


_CUT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("_v", pa.float64())])


def percentile_cut(step: Step, df: DataFrame) -> DataFrame:
    """Drop each source's live rows whose `step.cut_value(row)` lies below the source's
    `cut().percentile`-th percentile (Spark's percentile_approx, accuracy 10000)."""
    cut = step.cut()

    def values(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            out = []
            for r in rows_of(b):
                if r.get("drop_step") is None:
                    v = step.cut_value(r)
                    if v is not None:
                        out.append({"id": r["id"], "source": r["source"], "_v": float(v)})
            if out:
                yield pa.RecordBatch.from_pylist(out, schema=_CUT_SCHEMA)

    vals = df.mapInArrow(values, "id string, source string, _v double")
    cuts = vals.groupBy("source").agg(F.percentile_approx("_v", cut.percentile / 100.0, 10000).alias("_cut"))
    low = (vals.join(F.broadcast(cuts), "source").filter(F.col("_v") < F.col("_cut"))
           .select("id", F.lit(cut.reason).alias("drop_reason"),
                   F.concat(F.lit(f"below the source's p{cut.percentile:g} "), F.col("_cut").cast("string"))
                   .alias("drop_detail"),
                   F.lit(None).cast("string").alias("dup_of")))
    return mark_drops(df, low, step.name)


def run_step(step: Step, df: DataFrame, workdir: str | None = None) -> DataFrame:
    """The DataFrame of samples after `step`: its shuffle, or its row pass and then its cut."""
    if step.shuffle is not None:
        from reelforge.jobs.shuffles import SHUFFLES

        if step.shuffle not in SHUFFLES:
            raise ValueError(f"step {step.name!r} asks for the shuffle {step.shuffle!r}, which the engine does not "
                             f"know: use one of {', '.join(sorted(SHUFFLES))}")
        return SHUFFLES[step.shuffle](step, df)
    if hasattr(step, "apply"):  # a step still written as a DataFrame transformation
        return step.apply(df)
    out = map_rows(step, df, StepContext(workdir=workdir))
    if step.cut() is not None:  # the cut reads the rows twice: the model runs once
        out = percentile_cut(step, out.persist(StorageLevel.MEMORY_AND_DISK))
    return out
