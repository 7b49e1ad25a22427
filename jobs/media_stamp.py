"""A digest of the media files a run's kept samples name, as they are on disk now.

A source's manifest is hashed into the recipe's fingerprint, but the images and videos it names
are read only when the shards are written. A re-run that reuses the shards (nothing to do) must
see that one of them changed, was removed, or was swapped for a symlink: `media_stamp` lstat()s
every file the live rows' media name (never following a link) and folds (path, file type, size,
mtime, ctime, inode) into one order-free digest. ctime cannot be set back by a user, so an
in-place edit that keeps size and mtime still changes the stamp. One Spark job, no shuffle.
"""

from __future__ import annotations

import hashlib
import os
import stat

_MOD = 1 << 64


def _stamp_one(uri: str) -> int:
    from reelforge.curation.media_io import media_path

    try:
        path = media_path(uri)
        st = os.lstat(path)
        what = (f"{stat.S_IFMT(st.st_mode)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
                f":{st.st_dev}")
    except Exception as e:  # noqa: BLE001 - a missing or unreadable file is part of the state too
        what = f"error:{type(e).__name__}"
    return int.from_bytes(hashlib.sha256(f"{uri}\0{what}".encode()).digest()[:8], "big")


def media_stamp(spark, step_path: str) -> str:
    """The stamp of every media file named by the live rows of a step's output (Parquet)."""
    from pyspark.sql import functions as F

    from reelforge.jobs.spark import spark_schema

    df = (spark.read.schema(spark_schema()).parquet(step_path)
          .filter(F.col("drop_step").isNull() & F.col("media").isNotNull())
          .select(F.explode(F.col("media.uri")).alias("uri")).filter(F.col("uri").isNotNull()))

    def fold(rows) -> list[tuple[int, int]]:
        total = n = 0
        for r in rows:
            total = (total + _stamp_one(r.uri)) % _MOD
            n += 1
        return [(total, n)]

    parts = df.rdd.mapPartitions(fold).collect()
    total = sum(t for t, _ in parts) % _MOD
    return f"{total:016x}-{sum(n for _, n in parts)}"
