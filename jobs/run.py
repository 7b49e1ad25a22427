"""The curation job: ingest -> recipe steps -> shards, with the ledger and the run report.

Each step's output is saved as Parquet under `<out>/_work/NN_step/` with a fingerprint
of everything that produced it; a re-run skips the steps whose fingerprint still
matches, so a crashed job continues instead of starting over.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from typing import Callable

from jobs.recipe import Recipe, RecipeError

LEDGER_COLUMNS = ["id", "source", "source_key", "source_location", "kind", "fate", "shard",
                  "step", "reason", "detail", "dup_of", "parent_id"]


class AccountingError(Exception):
    """Inputs != kept + dropped: something was lost, and the run must not pass silently."""


def _done(path: str, fingerprint: str) -> bool:
    marker = os.path.join(path, "_REELFORGE")
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f).get("fingerprint") == fingerprint


def _mark(path: str, fingerprint: str, **extra) -> None:
    with open(os.path.join(path, "_REELFORGE"), "w") as f:
        json.dump({"fingerprint": fingerprint, **extra}, f)


def run_recipe(recipe: Recipe, master: str | None = None, log: Callable[[str], None] = print,
               spark=None) -> dict:
    from pyspark.sql import functions as F

    from curation.ingest import ingest
    from curation.schema import spark_schema
    from curation.shards import read_stats, write_shards
    from jobs.report import build_report, write_report
    from jobs.spark import get_spark

    t_start = time.time()
    out = recipe.output
    work = os.path.join(out, "_work")
    try:
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, ".writable"), "w"):
            pass
    except OSError as e:
        raise RecipeError(f"output folder {out} cannot be written ({e.strerror}): "
                          "pass --out with a folder you can write.") from e
    if spark is None:
        spark = get_spark(master or recipe.spark.get("master"), recipe.spark.get("conf"))
    log(f"reelforge: recipe {recipe.name!r} on {spark.sparkContext.master}, output {out}")
    schema = spark_schema()
    timings: dict[str, float] = {}

    def stage(idx: int, name: str, build) -> str:
        path = os.path.join(work, f"{idx:02d}_{name}")
        fp = recipe.fingerprint(idx)
        if _done(path, fp):
            log(f"[{idx + 1}/{len(recipe.steps) + 2}] {name}: already done, reusing {path}")
            with open(os.path.join(path, "_REELFORGE")) as f:
                timings[name] = json.load(f).get("seconds", 0.0)
            return path
        t = time.time()
        log(f"[{idx + 1}/{len(recipe.steps) + 2}] {name} ...")
        build().write.mode("overwrite").parquet(path)
        timings[name] = time.time() - t
        df = spark.read.schema(schema).parquet(path)
        dropped = df.filter(F.col("drop_step") == name).count()
        _mark(path, fp, seconds=timings[name])
        log(f"      {name}: {dropped} dropped, {timings[name]:.1f}s")
        return path

    prev = stage(0, "ingest", lambda: ingest(spark, recipe.sources))
    for i, spec in enumerate(recipe.steps, 1):
        step = spec.build()
        if hasattr(step, "workdir"):
            step.workdir = work  # steps that write media (clips) put them beside the run
        src = prev
        prev = stage(i, spec.name, lambda s=step, p=src: s.apply(spark.read.schema(schema).parquet(p)))
    final = spark.read.schema(schema).parquet(prev)

    # --- shards ---------------------------------------------------------------------------
    t = time.time()
    log(f"[{len(recipe.steps) + 2}/{len(recipe.steps) + 2}] write shards ...")
    shard_dir = os.path.join(out, "shards")
    if os.path.isdir(shard_dir):
        shutil.rmtree(shard_dir)  # shards are rebuilt whole: a re-run never mixes two runs
    os.makedirs(shard_dir)
    sh = recipe.shards
    results, names, stats_dir, keyed = write_shards(
        final, shard_dir, max_samples=sh["max_samples"], max_bytes=sh["max_bytes"],
        shuffle=sh["shuffle"], seed=recipe.seed, prefix=sh["prefix"])
    results_path = os.path.join(work, "write_results")
    results.write.mode("overwrite").parquet(results_path)
    keyed.unpersist()
    stats = read_stats(stats_dir, names)
    shutil.rmtree(stats_dir, ignore_errors=True)
    for leftover in glob.glob(os.path.join(shard_dir, "*.tmp-*")):
        os.remove(leftover)
    timings["write"] = time.time() - t
    results = spark.read.parquet(results_path)

    # --- ledger -----------------------------------------------------------------------------
    dropped = final.filter(F.col("drop_step").isNotNull()).select(
        "id", "source", "source_key", "source_location", "kind", F.lit("dropped").alias("fate"),
        F.lit(None).cast("string").alias("shard"), F.col("drop_step").alias("step"),
        F.col("drop_reason").alias("reason"), F.col("drop_detail").alias("detail"), "dup_of", "parent_id")
    written = final.filter(F.col("drop_step").isNull()).select(
        "id", "source", "source_key", "source_location", "kind", "parent_id").join(results, "id", "left").select(
        "id", "source", "source_key", "source_location", "kind",
        F.coalesce(F.col("status"), F.lit("dropped")).alias("fate"), "shard",
        F.when(F.col("status") == "kept", F.lit(None)).otherwise(F.lit("write")).alias("step"),
        F.when(F.col("status") == "kept", F.lit(None))
         .otherwise(F.coalesce(F.col("reason"), F.lit("not_written"))).alias("reason"),
        F.col("detail"), F.lit(None).cast("string").alias("dup_of"), "parent_id")
    ledger_path = os.path.join(out, "ledger")
    (dropped.unionByName(written).select(*LEDGER_COLUMNS)
     .repartition(max(1, len(stats) // 64 + 1)).sortWithinPartitions("id")
     .write.mode("overwrite").parquet(ledger_path))
    ledger = spark.read.parquet(ledger_path)

    inputs = spark.read.schema(schema).parquet(os.path.join(work, "00_ingest")).count()
    fates = {r["fate"]: r["count"] for r in ledger.groupBy("fate").count().collect()}
    derived = ledger.filter(F.col("parent_id").isNotNull()).count()
    distinct_ids = ledger.select("id").distinct().count()
    kept, n_dropped = fates.get("kept", 0), fates.get("dropped", 0)
    kept_in_shards = sum(s["samples"] for s in stats)

    index = {"recipe": recipe.name, "seed": recipe.seed, "shards": stats,
             "samples": kept_in_shards, "bytes": sum(s["bytes"] for s in stats),
             "sources": _sum_sources(stats)}
    with open(os.path.join(shard_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    # per-sample token table beside the ledger: what `reelforge plan` reads instead of the shards
    from mixers.stats import SAMPLES_DIR, write_sample_stats

    samples_path = os.path.join(out, SAMPLES_DIR)
    write_sample_stats(spark, final, shard_dir, [s["shard"] for s in stats], samples_path)
    in_table = spark.read.parquet(samples_path).count()

    report = build_report(spark, recipe, final, ledger, stats, inputs, timings, derived)
    report["elapsed_s"] = round(time.time() - t_start, 2)
    report["paths"] = {"shards": shard_dir, "index": os.path.join(shard_dir, "index.json"),
                       "ledger": ledger_path, "samples": samples_path, "report": os.path.join(out, "report.md")}
    write_report(report, out)
    plus = f" + {derived} derived" if derived else ""
    log(f"done in {report['elapsed_s']:.1f}s: {inputs} inputs{plus} = {kept} kept + {n_dropped} dropped, "
        f"{len(stats)} shards")
    problems = []
    if inputs + derived != kept + n_dropped:
        problems.append(f"inputs {inputs} + derived {derived} != kept {kept} + dropped {n_dropped}")
    if distinct_ids != inputs + derived:
        problems.append(f"{inputs + derived} samples but {distinct_ids} distinct ids in the ledger")
    if kept != kept_in_shards:
        problems.append(f"ledger says {kept} kept but the shards hold {kept_in_shards}")
    if in_table != kept_in_shards:
        problems.append(f"the samples table has {in_table} rows but the shards hold {kept_in_shards}")
    if problems:
        raise AccountingError("sample accounting failed: " + "; ".join(problems))
    return report


def _sum_sources(stats: list[dict]) -> dict:
    total: dict[str, int] = {}
    for s in stats:
        for k, v in s["sources"].items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))
