"""The driver-side part of the `video_tasks` step (mixers/video_tasks.py): before the row pass, the
global pool of candidate videos for `clip_match`.

The pool is the `step.pool` live video samples (one video medium, probed, of the step's kinds) with
the smallest sha256("<seed>\\0<id>"), sorted by id: the same ids and media whatever the partitioning,
the same as `mixers.video_tasks.candidates_from_rows` over the same rows. Only those rows (id and
video medium) reach the driver; the ranking and the limit run in Spark.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def gather_candidates(step, df: DataFrame) -> list[dict]:
    """Set `step`'s candidate pool from `df` (the step's input) and return it."""
    m = F.col("media")[0]
    live = df.filter(F.col("drop_step").isNull() & (F.size("media") == 1) & (m["kind"] == "video")
                     & (F.coalesce(m["duration"], F.lit(0.0)) > 0) & (F.coalesce(m["fps"], F.lit(0.0)) > 0)
                     & (F.coalesce(m["frames"], F.lit(0)) > 0) & F.col("kind").isin(list(step.kinds)))
    key = F.sha2(F.concat(F.lit(f"{int(step.seed)}\0"), F.col("id")), 256)
    rows = (live.select("id", m.alias("m"), key.alias("h")).orderBy("h", "id").limit(int(step.pool))
            .select("id", "m").collect())
    cands = [{"id": r["id"], "media": r["m"].asDict(recursive=True)} for r in rows]
    step.set_candidates(cands)
    return step.candidates
