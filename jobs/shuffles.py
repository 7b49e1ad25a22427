"""The Spark side of the steps that need a shuffle: exact dedup, near dedup (leakage: `jobs.leakage`).

The steps (`filters.dedup`, `filters.near_dedup`, `filters.leakage`) decide in plain Python:
a row's key, its LSH band keys, whether a candidate pair is an edge, which sample a cluster
keeps, which evaluation item a sample leaks. Here those functions run inside `mapInArrow`
tasks, and Spark does what needs the whole corpus: grouping by key, buckets and candidate
pairs, connected components (`jobs.components`), the smallest rank per cluster. The drops
reach the rows through one helper, `mark_drops` (also used by the engine's per-source
percentile cut, here too). Nothing is collected to the driver.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from reelforge.curation.schema import rows_of
from reelforge.curation.step import Step
from reelforge.filters.dedup import ExactDedup, duplicate_reason
from reelforge.filters.leakage import EVAL_PREFIX
from reelforge.filters.near_dedup import RANK_PREFIX, NearDedup, near_duplicates, rank_key
from reelforge.jobs.components import connected_components

_KEY_SCHEMA = pa.schema([("id", pa.string()), ("space", pa.string()), ("key", pa.string()),
                         ("payload", pa.list_(pa.int64()))])
_EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string())])
_DROP_SCHEMA = pa.schema([("id", pa.string()), ("drop_reason", pa.string()), ("drop_detail", pa.string()),
                          ("dup_of", pa.string())])
_DROP_DDL = "id string, drop_reason string, drop_detail string, dup_of string"
BROADCAST_ENDS = 1_000_000  # text candidate ends up to this many: their ids are broadcast (~50 MB)
ONE_TASK_ROWS = 5_000  # dedup_near of a corpus up to this many rows: one task (`_dedup_near_one_task`)


def _map_rows(df: DataFrame, fn: Callable[[list[dict]], list[dict]], schema: pa.Schema, ddl: str,
              arrow_rows: Callable = rows_of) -> DataFrame:
    """fn over the rows of each Arrow batch of `df`, in the workers: a DataFrame of its output."""

    def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            out = fn(arrow_rows(b))
            if out:
                yield pa.RecordBatch.from_pylist(out, schema=schema)

    return df.mapInArrow(run, ddl)


def _live(df: DataFrame) -> DataFrame:
    return df.filter(F.col("drop_step").isNull())


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


# --- exact dedup -------------------------------------------------------------------------------

def dedup_exact(step: ExactDedup, df: DataFrame) -> DataFrame:
    """Group the live rows by `step.key(row)`; all but the smallest id of a group leave."""
    def key(rows: list[dict]) -> list[dict]:
        return [{"id": r["id"], "_key": k, "_reason": duplicate_reason(k)} for r in rows for k in (step.key(r),)]

    keyed = _map_rows(_live(df), key, pa.schema([("id", pa.string()), ("_key", pa.string()), ("_reason", pa.string())]),
                      "id string, _key string, _reason string")
    first = keyed.groupBy("_key").agg(F.min("id").alias("_first"))
    dups = (keyed.join(first, "_key").filter(F.col("id") != F.col("_first"))
            .select("id", F.col("_reason").alias("drop_reason"),
                    F.concat(F.lit("same content as "), F.col("_first")).alias("drop_detail"),
                    F.col("_first").alias("dup_of")))
    return mark_drops(df, dups, step.name)


# --- near dedup and leakage ---------------------------------------------------------------------

def _keys(step: NearDedup, rows: DataFrame, every_image: bool = False) -> DataFrame:
    """The band keys of every row (`step.key_table`, built column-wise); a node's payload rides
    on its first key row only."""

    def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            t = step.key_table(rows_of(b), every_image)
            if t.num_rows:
                yield from t.cast(_KEY_SCHEMA).to_batches()

    return rows.mapInArrow(run, "id string, space string, key string, payload array<bigint>")


def _edges(step: NearDedup, keys: DataFrame, rows: DataFrame, across: bool = False) -> DataFrame:
    """Verified edges (a, b): pairs sharing a bucket (a bucket over `max_bucket` links each member
    to its smallest id only), checked by `step.is_edge`."""
    keys = keys.persist()
    buckets = keys.groupBy("space", "key").agg(F.collect_set("id").alias("ids")) \
        .filter(F.size("ids") > 1)
    small = buckets.filter(F.size("ids") <= step.max_bucket) \
        .select("space", F.explode("ids").alias("a"), "ids") \
        .select("space", "a", F.explode("ids").alias("b")).filter(F.col("a") < F.col("b"))
    big = buckets.filter(F.size("ids") > step.max_bucket) \
        .select("space", F.array_min("ids").alias("a"), F.explode("ids").alias("b")) \
        .filter(F.col("a") < F.col("b"))
    pairs = small.unionByName(big).distinct()
    if across:  # leakage: only pairs of one training sample and one evaluation item
        pairs = pairs.filter(F.col("a").startswith(EVAL_PREFIX) != F.col("b").startswith(EVAL_PREFIX))
    pairs = pairs.persist()
    # images and videos verify on their payloads (pHashes); texts on their text, read only for the
    # ends of text candidate pairs (a few percent of the rows): a semi-join, broadcast when the
    # ends are few enough, so the corpus's texts are filtered where they lie instead of shuffled
    payload = keys.filter(F.col("payload").isNotNull()).select("id", "space", "payload") \
        .dropDuplicates(["id", "space"])
    cand = (pairs.join(payload.withColumnRenamed("id", "a").withColumnRenamed("payload", "pa"), ["a", "space"], "left")
            .join(payload.withColumnRenamed("id", "b").withColumnRenamed("payload", "pb"), ["b", "space"], "left")
            .filter((F.col("space") == "t") | (F.col("pa").isNotNull() & F.col("pb").isNotNull())))
    tp = pairs.filter(F.col("space") == "t")
    ends = tp.select(F.col("a").alias("id")).unionByName(tp.select(F.col("b").alias("id"))).distinct()
    n_ends = ends.count()
    texts = rows.select("id", "kind", "text", "messages", "chosen", "rejected").filter(F.col("id").isNotNull()) \
        .join(F.broadcast(ends) if n_ends <= BROADCAST_ENDS else ends, "id", "left_semi")
    cand = (cand.join(texts.select(F.col("id").alias("a"), F.struct(*texts.columns).alias("ra")), "a", "left")
            .join(texts.select(F.col("id").alias("b"), F.struct(*texts.columns).alias("rb")), "b", "left"))

    def verify(recs: list[dict]) -> list[dict]:
        return [{"a": r["a"], "b": r["b"]} for r in recs
                if step.is_edge(r["space"], r["pa"], r["pb"], r["ra"], r["rb"])]

    return _map_rows(cand, verify, _EDGE_SCHEMA, "a string, b string", arrow_rows=lambda b: b.to_pylist())


def rows_hint(df: DataFrame, max_files: int = 64) -> int | None:
    """An upper bound on the rows of a DataFrame read from a few Parquet files, from their
    footers (no Spark job); None when it is not such a DataFrame or the files are many."""
    try:
        files = df.inputFiles()
    except Exception:  # noqa: BLE001 - a plan with no files behind it (built on the driver)
        return None
    if not files or len(files) > max_files:
        return None
    total = 0
    for f in files:
        u = urlparse(f)
        if u.scheme not in ("", "file") or not f.endswith(".parquet"):
            return None
        try:
            total += pq.ParquetFile(unquote(u.path)).metadata.num_rows
        except (OSError, ValueError):
            return None
    return total


def one_task_rows() -> int:
    """Corpora of up to this many rows run `dedup_near` in one task (REELFORGE_ONE_TASK_ROWS)."""
    return int(os.environ.get("REELFORGE_ONE_TASK_ROWS", ONE_TASK_ROWS))


def _dedup_near_one_task(step: NearDedup, live: DataFrame) -> DataFrame:
    """The whole of `dedup_near` for a small corpus in ONE Spark task: the live rows go to one
    partition, where the step's own list functions (`NearDedup.edges`, `near_duplicates`: the
    same keys, buckets, verification, components and keep rule as the distributed path) decide.
    One job instead of ~30 small ones: what a run of a few thousand rows spends its time on."""

    def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rows = [r for b in batches for r in rows_of(b)]
        if step.image_band_bits_auto:
            step.fit_image_bands(sum(r["kind"] in step.image_kinds for r in rows))
        dups = near_duplicates(rows, step.edges(rows))
        out = [{"id": i, "drop_reason": "near_duplicate", "drop_detail": f"near duplicate of {k}", "dup_of": k}
               for i, k in dups]
        yield pa.RecordBatch.from_pylist(out, schema=_DROP_SCHEMA)

    return live.repartition(1).mapInArrow(run, _DROP_DDL)


def dedup_near(step: NearDedup, df: DataFrame) -> DataFrame:
    """Edges -> connected components -> per component the smallest `rank_key` is kept. A corpus
    of at most `one_task_rows()` rows (Parquet footers) is decided in one task instead."""
    live = _live(df)
    hint = rows_hint(df)
    if hint is not None and hint <= one_task_rows():
        return mark_drops(df, F.broadcast(_dedup_near_one_task(step, live)), step.name)
    if step.image_band_bits_auto:  # bands as wide as the corpus needs (NearDedup.fit_image_bands)
        kinds = step.image_kinds
        step.fit_image_bands(live.filter(F.col("kind").isin(kinds)).count() if kinds else 0)
    graph: dict = {}
    comp = connected_components(_edges(step, _keys(step, live), live), info=graph)
    few = 2 * graph["edges"] <= BROADCAST_ENDS  # rows in clusters (<= 2 per edge): usually a few percent
    members = live.select("id", "scores", "text", "messages")  # what rank_key reads
    if few:  # only the rows in clusters are ranked, filtered where they lie
        members = members.join(F.broadcast(comp.select("id")), "id", "left_semi")
    ranks = _map_rows(members, lambda rows: [{"id": r["id"], "_rank": rank_key(r)} for r in rows],
                      pa.schema([("id", pa.string()), ("_rank", pa.string())]), "id string, _rank string")
    ranked = comp.join(ranks, "id")
    best = ranked.groupBy("component").agg(F.min("_rank").alias("_best"))
    keep = F.substring(F.col("_best"), RANK_PREFIX + 1, 1 << 30)
    dups = (ranked.join(best, "component").withColumn("_keep", keep).filter(F.col("_keep") != F.col("id"))
            .select("id", F.lit("near_duplicate").alias("drop_reason"),
                    F.concat(F.lit("near duplicate of "), F.col("_keep")).alias("drop_detail"),
                    F.col("_keep").alias("dup_of")))
    return mark_drops(df, F.broadcast(dups) if few else dups, step.name)  # broadcast: the rows stay put


SHUFFLES: dict[str, Callable[..., DataFrame]] = {"dedup_exact": dedup_exact, "dedup_near": dedup_near}
