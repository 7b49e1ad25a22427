"""The Spark side of the `leakage` step (`filters.leakage`): the evaluation index broadcast, the
corpus matched where it lies, a CLIP step's kept embeddings joined in under keye_posttrain
(`jobs.semantic.leakage_embeddings`), the drops marked with `jobs.shuffles.mark_drops`."""

from __future__ import annotations

import json
import time

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from reelforge.filters.leakage import COUNTERS, LeakageFilter, leak_drop
from reelforge.jobs.semantic import leakage_embeddings, write_section
from reelforge.jobs.shuffles import _DROP_DDL, _DROP_SCHEMA, _live, _map_rows, mark_drops


def leakage(step: LeakageFilter, df: DataFrame, workdir: str | None = None) -> DataFrame:
    """The evaluation items are indexed once on the driver (`step.build_index`: band keys,
    pHashes, CLIP embeddings) and broadcast; every batch of live rows is matched against the
    index in its executor (`step.leaks_of`), so the corpus is not shuffled. Each matching
    sample leaves as `leak:<set>` of the smallest evaluation item it matches.

    Under keye_posttrain with `from_step`, the live rows are first joined (by id: one shuffle,
    in place of the CLIP encoder) with what that CLIP step kept, when its model is the step's
    own (`jobs.semantic.leakage_embeddings`): the executors then embed only what was not kept
    (`step.leaks_of`), and the evaluation side is still embedded once, on the driver. The
    matching runs once, here (its drops persisted), so the report section (`step.report_path`:
    reused or computed and why, images and texts reused and embedded, drops per set) is written
    before the rows are marked."""
    t0 = time.time()
    kept, section = leakage_embeddings(step, df.sparkSession, workdir)
    section.update({"step": step.name, "rule": step.rule, **{k: 0 for k in COUNTERS}, "drops": {}})
    ev_rows = step.eval_rows()
    section["eval_items"] = len(ev_rows)
    if not ev_rows:
        section["seconds"] = round(time.time() - t0, 2)
        if workdir:
            write_section(step.report_path(workdir), section)
        return df
    index = df.sparkSession.sparkContext.broadcast(step.build_index(ev_rows))
    rows = _live(df) if kept is None else _live(df).join(kept, "id", "left")

    def drops(recs: list[dict]) -> list[dict]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        res = ctx.resources().get("gpu") if ctx is not None else None
        step.gpus = tuple(res.addresses) if res is not None and res.addresses else ()
        stats: dict = {}
        hits = step.leaks_of(recs, index.value, stats)
        out = [dict(zip(("id", "drop_reason", "drop_detail", "dup_of"), (sid, *leak_drop(ev), None)))
               for sid, ev in sorted(hits.items())]
        # the batch's counters ride on a row without an id (no row takes it: mark_drops joins by id)
        return out + [{"id": None, "drop_reason": None, "drop_detail": json.dumps(stats), "dup_of": None}]

    found = _map_rows(rows, drops, _DROP_SCHEMA, _DROP_DDL).persist(StorageLevel.MEMORY_AND_DISK)
    for r in found.filter(F.col("id").isNull()).select("drop_detail").collect():  # one row per batch
        for k, v in json.loads(r["drop_detail"]).items():
            section[k] = section.get(k, 0) + v
    decisions = found.filter(F.col("id").isNotNull())
    section["drops"] = {r["drop_reason"]: r["count"] for r in decisions.groupBy("drop_reason").count().collect()}
    section["seconds"] = round(time.time() - t0, 2)
    if workdir:
        write_section(step.report_path(workdir), section)
    return mark_drops(df, decisions, step.name)
