"""The Spark side of embeddings: the CLIP step's kept embeddings (`RUN/embeddings/<step>/`) and
the `dedup_semantic` step.

- `keep_embeddings`: a CLIP step with `keep_embeddings: true` runs once over the rows, which
  come back carrying their embeddings (`filters.embeddings.ROW_KEY`); the rows are persisted,
  the embeddings written as zstd Parquet beside the run, and the rows go on without them. Run
  without the option, the step removes what an earlier run kept under its name.
- `check_embeddings`: at the start of a run, `from_step` must name an earlier step that keeps
  its embeddings, no two steps may keep them under one name, and a kept folder no step of the
  recipe keeps any more is removed: `RUN/embeddings/` holds this recipe's embeddings only.
- `dedup_semantic`: one unit vector per live sample (the kept embeddings joined by id, the rest
  embedded in the executors), Spark ML's KMeans (seeded, block solver; rows hash-partitioned and
  sorted by id first, so its sampling sees the same rows in the same order on one machine or
  many: only the summation order of Spark's aggregation can differ, in the last bits), then each
  k-means cluster is one group (`applyInArrow`) decided by `filters.semantic_dedup
  .cluster_decisions`; drops reach the rows through `jobs.shuffles.mark_drops`, and the
  eps table goes to `_work/semantic/<name>.json` for the run report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Iterable, Iterator

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from reelforge.curation.schema import ARROW_SCHEMA, rows_of
from reelforge.curation.step import Step, StepContext, run_batches
from reelforge.filters.embeddings import FOLDER as EMB_FOLDER
from reelforge.filters.embeddings import ROW_KEY, ROW_TYPE, complete, embeddings_folder
from reelforge.filters.near_dedup import rank_key
from reelforge.filters.semantic_dedup import REASON, SemanticDedup, cluster_decisions, default_k
from reelforge.jobs.shuffles import _live, mark_drops

ContextOf = Callable[[StepContext], StepContext]


def run_dir(workdir: str | None, what: str) -> str:
    """The run's output folder: the parent of its `_work` folder."""
    if not workdir:
        raise ValueError(f"{what} needs the run's output folder: run it inside a recipe run")
    return os.path.dirname(os.path.abspath(workdir))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# --- the CLIP step's kept embeddings -------------------------------------------------------------

def keep_embeddings(step: Step, df: DataFrame, workdir: str | None, context_of: ContextOf) -> DataFrame:
    """The step's row pass; with `step.keep_embeddings` its embeddings are written to
    `RUN/embeddings/<step name>/` (zstd Parquet, overwriting an earlier run's) as a side output
    of the same pass. Returns the rows (the sample schema), persisted when embeddings were kept."""
    base = StepContext(workdir=workdir)
    if not step.keep_embeddings:
        if workdir:  # what an earlier run of this step kept is not this run's
            _remove(embeddings_folder(run_dir(workdir, ""), step.name))

        def plain(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            yield from run_batches(step, batches, context_of(base))

        return df.mapInArrow(plain, df.schema)
    from pyspark.sql.pandas.types import from_arrow_schema

    folder = embeddings_folder(run_dir(workdir, f"keep_embeddings of step {step.name!r}"), step.name)
    schema = ARROW_SCHEMA.append(pa.field(ROW_KEY, ROW_TYPE))

    def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from run_batches(step, batches, context_of(base), schema)

    scored = df.mapInArrow(run, from_arrow_schema(schema)).persist(StorageLevel.MEMORY_AND_DISK)
    emb = (scored.select("id", F.explode(ROW_KEY).alias("e"))
           .select("id", F.col("e.index").alias("index"), F.col("e.image").alias("image"),
                   F.col("e.text").alias("text"), F.lit(step.model_tag()).alias("model"),
                   (F.length(F.col("e.image")) / 2).cast("int").alias("dim")))
    emb.write.mode("overwrite").option("compression", "zstd").parquet(folder)
    return scored.drop(ROW_KEY)


def check_embeddings(recipe, out: str) -> None:
    """Before the first step: every `dedup_semantic` with `from_step` follows a step of that name
    with `keep_embeddings: true`; at most one step keeps embeddings under a name; kept folders
    that no step of the recipe keeps any more are removed."""
    from reelforge.curation.errors import RecipeError

    keepers: dict[str, int] = {}
    for i, spec in enumerate(recipe.steps):
        if spec.params.get("keep_embeddings") is True:
            if spec.name in keepers:
                raise RecipeError(f"recipe field `steps[{i}].{spec.name}.keep_embeddings`: steps[{keepers[spec.name]}] "
                                  f"already keeps embeddings under the name {spec.name!r} (RUN/embeddings/"
                                  f"{spec.name}/): keep them from one of the two.")
            keepers[spec.name] = i
        src = spec.params.get("from_step") if spec.name == SemanticDedup.name else None
        if src and keepers.get(src) is None:
            raise RecipeError(f"recipe field `steps[{i}].{spec.name}.from_step` names {src!r}, but no earlier step "
                              f"{src!r} keeps its embeddings: add `keep_embeddings: true` to that step (before "
                              "this one), or drop `from_step` and give `model`.")
    root = os.path.join(out, EMB_FOLDER)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name not in keepers:
                _remove(os.path.join(root, name))


def embeddings_frame(spark, folder: str, which: str = "image", index: int = 0) -> DataFrame:
    """A kept-embeddings folder as a DataFrame (id, emb binary float16, model): medium `index`
    of each sample (0: the first) and its `which` (image or text) embedding."""
    return (spark.read.parquet(folder).filter(F.col("index") == index)
            .select("id", F.col(which).alias("emb"), "model"))


# --- dedup_semantic ------------------------------------------------------------------------------

_VEC_SCHEMA = pa.schema([("id", pa.string()), ("_rank", pa.string()), ("_v", pa.list_(pa.float32()))])
_OUT_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.string()), ("dup_of", pa.string()),
                         ("cos", pa.float64()), ("eps", pa.float64()), ("pairs", pa.int64()),
                         ("drops", pa.int64()), ("size", pa.int64())])
_OUT_DDL = "kind string, id string, dup_of string, cos double, eps double, pairs bigint, drops bigint, size bigint"


def _vectors(step: SemanticDedup, live: DataFrame, workdir: str, context_of: ContextOf) -> DataFrame:
    """(id, _rank, _v array<float>) for every live sample with an embedding."""
    spark = live.sparkSession
    if step.from_step:
        folder = embeddings_folder(run_dir(workdir, "dedup_semantic"), step.from_step)
        if not complete(folder):
            raise ValueError(f"dedup_semantic: step {step.from_step!r} kept no embeddings at {folder} (no _SUCCESS): "
                             f"run it with keep_embeddings: true before this step")
        saved = embeddings_frame(spark, folder, step.embedding)
        tags = [r["model"] for r in saved.select("model").distinct().limit(2).collect()]
        if len(tags) > 1:
            raise ValueError(f"dedup_semantic: the embeddings at {folder} come from more than one model")
        if tags:
            step.use_model(tags[0])
        rows = live.join(saved.select("id", F.col("emb").alias("_saved")), "id", "left")
    else:
        rows = live.withColumn("_saved", F.lit(None).cast("binary"))
    base = StepContext(workdir=workdir)

    def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        step.setup(context_of(base))
        try:
            for b in batches:
                recs = rows_of(b)
                for s in range(0, len(recs), step.batch_rows):
                    part = recs[s:s + step.batch_rows]
                    vecs = step.vectors(part, [r["_saved"] for r in part])
                    out = [{"id": r["id"], "_rank": rank_key(r), "_v": v.tolist()}
                           for r, v in zip(part, vecs) if v is not None]
                    if out:
                        yield pa.RecordBatch.from_pylist(out, schema=_VEC_SCHEMA)
        finally:
            step.teardown()

    return rows.mapInArrow(run, "id string, _rank string, _v array<float>")


def _decide(step: SemanticDedup) -> Callable[[pa.Table], pa.Table]:
    eps, table_eps = step.eps, step.table_eps()

    def per_cluster(t: pa.Table) -> pa.Table:
        import numpy as np

        ranks = t.column("_rank").to_pylist()
        vecs = np.array(t.column("_v").to_pylist(), dtype=np.float32)
        drops, table = cluster_decisions(ranks, vecs, eps, table_eps)
        out = [{"kind": "drop", "id": i, "dup_of": k, "cos": c} for i, k, c in drops]
        out += [{"kind": "eps", "eps": e, "pairs": p, "drops": n} for e, (p, n) in table.items()]
        out.append({"kind": "cluster", "size": len(ranks)})
        return pa.Table.from_pylist(out, schema=_OUT_SCHEMA)

    return per_cluster


def dedup_semantic(step: SemanticDedup, df: DataFrame, workdir: str | None, context_of: ContextOf) -> DataFrame:
    """Vectors -> k-means -> per cluster the pairs above 1 - eps, their components and the keep
    rule -> `semantic_duplicate` drops with `dup_of`; the eps table is written for the report."""
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    t0 = time.time()
    spark = df.sparkSession
    live = _live(df)
    parts = int(spark.conf.get("spark.sql.shuffle.partitions"))
    vec = (_vectors(step, live, workdir, context_of).repartition(parts, "id").sortWithinPartitions("id")
           .persist(StorageLevel.MEMORY_AND_DISK))
    n = vec.count()
    n_live = live.count()
    section = {"step": step.name, "embedding": step.embedding, "from_step": step.from_step or None,
               "model": step.model, "eps": step.eps, "embedded": n, "not_embedded": n_live - n,
               "k": 0, "clusters": 0, "largest_cluster": 0, "kmeans_s": 0.0, "table": []}
    decisions = None
    if n >= 2:
        k = min(n, step.k or default_k(n))
        t = time.time()
        if k == 1:  # one cluster (Spark's KMeans wants k > 1)
            assigned = vec.select(F.lit(0).alias("cluster"), "_rank", "_v")
        else:
            feats = vec.select("id", "_rank", "_v", array_to_vector("_v").alias("features"))
            model = KMeans(k=k, seed=step.seed, maxIter=step.max_iter, featuresCol="features",
                           predictionCol="cluster", solver="block").fit(feats)
            assigned = model.transform(feats).select("cluster", "_rank", "_v")
        section["kmeans_s"] = round(time.time() - t, 2)
        res = (assigned.groupBy("cluster").applyInArrow(_decide(step), _OUT_DDL)
               .persist(StorageLevel.MEMORY_AND_DISK))
        stats = {r["eps"]: (r["p"], r["d"]) for r in res.filter(F.col("kind") == "eps").groupBy("eps")
                 .agg(F.sum("pairs").alias("p"), F.sum("drops").alias("d")).collect()}
        cl = res.filter(F.col("kind") == "cluster").agg(F.count("*").alias("c"), F.max("size").alias("m")).first()
        section.update(k=k, clusters=cl["c"], largest_cluster=cl["m"] or 0,
                       table=[{"eps": e, "min_cosine": round(1 - e, 6), "pairs": int(stats.get(e, (0, 0))[0]),
                               "drops": int(stats.get(e, (0, 0))[1])} for e in step.table_eps()])
        detail = F.format_string(f"semantic duplicate of %s (cosine %.4f > {1 - step.eps:g})", "dup_of", "cos")
        decisions = res.filter(F.col("kind") == "drop").select(
            "id", F.lit(REASON).alias("drop_reason"), detail.alias("drop_detail"), "dup_of")
    section["seconds"] = round(time.time() - t0, 2)
    path = step.report_path(workdir) if workdir else None
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(section, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return df if decisions is None else mark_drops(df, decisions, step.name)
