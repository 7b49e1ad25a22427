"""One place that starts Spark the way reelforge needs it, on a laptop or a cluster."""

from __future__ import annotations

import os
import sys

from reelforge.curation.tools import check_java

DEFAULT_MASTER = "local[*]"


def get_spark(master: str | None = None, conf: dict | None = None, app: str = "reelforge"):
    """A SparkSession whose Python workers run this interpreter and can import reelforge."""
    check_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    master = master or os.environ.get("REELFORGE_MASTER") or DEFAULT_MASTER
    b = (SparkSession.builder.master(master).appName(app)
         .config("spark.pyspark.python", sys.executable)
         .config("spark.sql.shuffle.partitions", "8" if master.startswith("local") else "200")
         .config("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
         .config("spark.ui.showConsoleProgress", "true" if sys.stderr.isatty() else "false")
         .config("spark.ui.enabled", "false")
         .config("spark.driver.memory", os.environ.get("REELFORGE_DRIVER_MEMORY", "2g")))
    if master.startswith("local-cluster"):
        b = b.config("spark.executor.memory", "1024m")
    log_conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")
    if os.environ.get("REELFORGE_SPARK_LOG") is None:
        opts = f"-Dlog4j2.configurationFile=file:{log_conf}"
        b = b.config("spark.driver.extraJavaOptions", opts).config("spark.executor.extraJavaOptions", opts)
    for k, v in (conf or {}).items():
        b = b.config(k, str(v))
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("REELFORGE_SPARK_LOG", "ERROR"))
    return spark


def spark_schema():
    """The Spark StructType of a sample, from its Arrow schema (`curation.schema.ARROW_SCHEMA`)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    from reelforge.curation.schema import ARROW_SCHEMA

    return from_arrow_schema(ARROW_SCHEMA)


def sample_frame(spark, rows: list[dict]):
    """A small DataFrame of sample rows built on the driver (evaluation sets: a few thousand rows)."""
    from reelforge.curation.schema import COLUMNS

    return spark.createDataFrame([tuple(r.get(c) for c in COLUMNS) for r in rows], schema=spark_schema())
