"""One place that starts Spark the way reelforge needs it, on a laptop or a cluster.

The driver JVM starts from a class-data-sharing archive of the classes a run loads (JDK AppCDS,
`-XX:SharedArchiveFile`): the first run on a machine records it at exit
(`-XX:ArchiveClassesAtExit`, ~150 MB under `~/.cache/reelforge/`, keyed by the Java runtime
and the pyspark install), later runs map it instead of loading and verifying Spark's classes
one by one: a few seconds less per start on 2 cores. A stale or damaged archive is ignored by
the JVM (-Xshare:auto); REELFORGE_SPARK_CDS=0 turns it off.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from reelforge.curation.tools import check_java
from reelforge.jobs.progress import enabled as progress_enabled

DEFAULT_MASTER = "local[*]"


def get_spark(master: str | None = None, conf: dict | None = None, app: str = "reelforge"):
    """A SparkSession whose Python workers run this interpreter and can import reelforge.

    Spark's web UI is on (port 4040, or the next free one: `ui_url`); REELFORGE_SPARK_UI=0 or
    `spark.ui.enabled: false` in the recipe's `spark.conf` turns it off."""
    check_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    master = master or os.environ.get("REELFORGE_MASTER") or DEFAULT_MASTER
    ours = progress_enabled()  # reelforge's own bar (jobs.progress): Spark's console bar would fight it
    ui = os.environ.get("REELFORGE_SPARK_UI", "1").strip().lower() not in ("0", "false", "no", "off")
    b = (SparkSession.builder.master(master).appName(app)
         .config("spark.pyspark.python", sys.executable)
         .config("spark.sql.shuffle.partitions", "8" if master.startswith("local") else "200")
         .config("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
         .config("spark.ui.showConsoleProgress", "true" if sys.stderr.isatty() and not ours else "false")
         .config("spark.ui.enabled", "true" if ui else "false")
         .config("spark.ui.port", os.environ.get("REELFORGE_SPARK_UI_PORT", "4040"))
         .config("spark.driver.memory", os.environ.get("REELFORGE_DRIVER_MEMORY", "2g")))
    if master.startswith("local-cluster"):
        b = b.config("spark.executor.memory", "1024m")
    log_conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")
    opts = f"-Dlog4j2.configurationFile=file:{log_conf}" if os.environ.get("REELFORGE_SPARK_LOG") is None else ""
    cds = _class_data_sharing()
    if opts or cds:
        b = b.config("spark.driver.extraJavaOptions", f"{opts} {cds}".strip())
    if opts:
        b = b.config("spark.executor.extraJavaOptions", opts)
    for k, v in (conf or {}).items():
        b = b.config(k, str(v))
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("REELFORGE_SPARK_LOG", "ERROR"))
    return spark


def ui_url(spark) -> str | None:
    """The address of the session's Spark UI, or None when it is off."""
    try:
        return spark.sparkContext.uiWebUrl
    except Exception:  # noqa: BLE001 - a session being stopped has none
        return None


def _class_data_sharing() -> str:
    """The driver's JVM option for the class-data-sharing archive: use it when it exists, else
    record it (to a temporary name, renamed by a later run once its recorder is gone and the
    file has stopped changing), else nothing while another run records it."""
    if os.environ.get("REELFORGE_SPARK_CDS", "1") == "0":
        return ""
    try:
        import glob
        import shutil

        import pyspark

        java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
        java = os.path.realpath(shutil.which(java) or java)
        key = hashlib.sha256(f"{java}|{os.path.getmtime(java)}|{pyspark.__file__}|{pyspark.__version__}"
                             .encode()).hexdigest()[:16]
        folder = os.environ.get("REELFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reelforge")
        archive = os.path.join(folder, f"spark-cds-{key}.jsa")
        quiet = "-Xlog:cds=off -Xlog:cds+dynamic=off"  # classes CDS cannot hold (signed jars) are no news
        use = f"-XX:SharedArchiveFile={archive} -Xshare:auto {quiet}"
        os.makedirs(folder, exist_ok=True)
        busy = False
        have = os.path.exists(archive)
        for tmp in glob.glob(glob.escape(archive) + ".tmp-*"):
            pid = tmp.rsplit("-", 1)[1]
            settled = time.time() - os.path.getmtime(tmp) > 30  # the JVM wrote it at its exit
            if pid.isdigit() and pid_alive(int(pid)) or not settled:
                busy = True
            elif not have and os.path.getsize(tmp) > (1 << 20):
                os.replace(tmp, archive)
                have = True
            else:  # a recording that lost the race to another (~200 MB each) or came out empty
                os.remove(tmp)
        if have:
            return use
        return "" if busy else f"-XX:ArchiveClassesAtExit={archive}.tmp-{os.getpid()} {quiet}"
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (a lock's or a recorder's holder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spark_schema():
    """The Spark StructType of a sample, from its Arrow schema (`curation.schema.ARROW_SCHEMA`)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    from reelforge.curation.schema import ARROW_SCHEMA

    return from_arrow_schema(ARROW_SCHEMA)


def sample_frame(spark, rows: list[dict]):
    """A small DataFrame of sample rows built on the driver (evaluation sets: a few thousand rows)."""
    from reelforge.curation.schema import COLUMNS

    return spark.createDataFrame([tuple(r.get(c) for c in COLUMNS) for r in rows], schema=spark_schema())
