"""The step as a Spark task runs it, without Spark: for machines with a GPU but no Java or
pyspark (the lent device machines here have neither, and cannot download them).

`jobs.engine.map_rows` hands each task's Arrow batches to `curation.step.run_batches`; this
does the same over `tasks` slices of the rows, one after another in this process, so the
figures are those of the step's own batching, prefetch and autocast, minus Spark's transfer
between the JVM and the Python worker (and minus its concurrency across tasks)."""

from __future__ import annotations

import importlib.util
import shutil


def spark_available() -> bool:
    """pyspark importable and a `java` on the PATH (or JAVA_HOME set)."""
    import os

    return importlib.util.find_spec("pyspark") is not None and bool(shutil.which("java") or os.environ.get("JAVA_HOME"))


def pick_engine(asked: str) -> str:
    if asked == "auto":
        return "spark" if spark_available() else "tasks"
    return asked


def run_as_tasks(step, rows: list[dict], tasks: int = 1) -> list[dict]:
    """`step` over `rows` in `tasks` task-sized slices, through `run_batches`; the rows back."""
    import pyarrow as pa

    from reelforge.curation.schema import ARROW_SCHEMA, rows_of
    from reelforge.curation.step import StepContext, run_batches

    table = pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)
    per = -(-len(rows) // max(1, tasks))
    out: list[dict] = []
    for start in range(0, len(rows), per):
        for b in run_batches(step, table.slice(start, per).to_batches(), StepContext()):
            out += rows_of(b)
    return out


def spark_frame(rows: list[dict], work: str, master: str):
    """(a Spark session on `master`, the rows as a cached DataFrame of the schema, one partition per
    core): what the Spark side of a step benchmark runs on."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from reelforge.curation.schema import ARROW_SCHEMA
    from reelforge.jobs.spark import get_spark, spark_schema

    spark = get_spark(master)
    pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), os.path.join(work, "rows.parquet"))
    df = spark.read.schema(spark_schema()).parquet(os.path.join(work, "rows.parquet"))
    df = df.repartition(spark.sparkContext.defaultParallelism).cache()
    df.count()
    return spark, df
