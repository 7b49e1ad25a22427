"""Exact dedup with Spark: equal media bytes (and, where it matters, equal normalised text).

A duplicate keeps its own ledger line with `dup_of` naming the sample that was kept, so
every decision can be inspected. The kept sample of a group is the smallest id: the
same rule on one machine and on a cluster, whatever the partitioning.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from reelforge.curation.step import Step, register_step

MEDIA_ONLY_KINDS = ("image_text", "video_text")


def normalised_text_col() -> F.Column:
    """All text of a sample, NFKC-free but case- and whitespace-insensitive."""
    msgs = F.concat_ws("\n", F.transform(F.coalesce(F.col("messages"), F.array()),
                                         lambda m: F.concat(m["role"], F.lit(": "), m["content"])))
    text = F.concat_ws("\n", F.coalesce("text", F.lit("")), msgs,
                       F.coalesce("chosen", F.lit("")), F.coalesce("rejected", F.lit("")))
    return F.lower(F.trim(F.regexp_replace(text, r"\s+", " ")))


def media_key_col() -> F.Column:
    shas = F.transform(F.coalesce(F.col("media"), F.array()), lambda m: m["sha256"])
    return F.when(F.size(shas) > 0, F.concat_ws(",", shas))


@register_step("dedup_exact")
class ExactDedup(Step):
    """Caption pairs are duplicates when their media bytes match; every other kind when
    both media and normalised text match (two questions about one image are not dups)."""

    def __init__(self, media_only_kinds: list[str] | tuple[str, ...] = MEDIA_ONLY_KINDS, **kw: Any):
        super().__init__(**kw)
        self.media_only_kinds = list(media_only_kinds)

    def apply(self, df: DataFrame) -> DataFrame:
        text_key = F.sha2(normalised_text_col(), 256)
        key = F.when(F.col("kind").isin(self.media_only_kinds) & media_key_col().isNotNull(),
                     F.concat(F.lit("m:"), media_key_col())) \
               .otherwise(F.concat(F.lit("t:"), F.coalesce(media_key_col(), F.lit("")), F.lit("|"), text_key))
        dead = df.filter(F.col("drop_step").isNotNull())
        keyed = df.filter(F.col("drop_step").isNull()).withColumn("_key", key)
        keyed = keyed.withColumn("_first", F.first("id").over(Window.partitionBy("_key").orderBy("id")))
        dup = F.col("_first") != F.col("id")
        reason = F.when(F.col("_key").startswith("m:"), F.lit("duplicate_media")).otherwise(F.lit("duplicate_text"))
        out = (keyed
               .withColumn("drop_reason", F.when(dup, reason).otherwise(F.col("drop_reason")))
               .withColumn("drop_detail", F.when(dup, F.concat(F.lit("same content as "), F.col("_first")))
                           .otherwise(F.col("drop_detail")))
               .withColumn("dup_of", F.when(dup, F.col("_first")).otherwise(F.col("dup_of")))
               .withColumn("drop_step", F.when(dup, F.lit(self.name)).otherwise(F.col("drop_step"))))
        return out.select(*df.columns).unionByName(dead)
