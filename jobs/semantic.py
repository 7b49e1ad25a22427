"""The Spark side of embeddings: the CLIP step's kept embeddings (`RUN/embeddings/<step>/`) and
the `dedup_semantic` step.

- `keep_embeddings`: a CLIP step with `keep_embeddings: true` runs once over the rows, which
  come back carrying their embeddings (`filters.embeddings.ROW_KEY`); the rows are persisted,
  the embeddings written as zstd Parquet beside the run, and the rows go on without them. Run
  without the option, the step removes what an earlier run kept under its name.
- `check_embeddings`: at the start of a run, `from_step` (of `dedup_semantic` or `leakage`) must
  name an earlier step that keeps its embeddings, no two steps may keep them under one name,
  and a kept folder no step of the recipe keeps any more is removed: `RUN/embeddings/` holds
  this recipe's embeddings only.
- `kept_embeddings`: the folder a `from_step` names, whether it is complete, and the model(s)
  recorded in it: how every reader finds what a CLIP step kept. `leakage_embeddings` is the
  `leakage` step's use of it (`keye_posttrain`: the corpus side's image and text embeddings,
  per sample, when the model is the step's own; otherwise the step embeds as before, and its
  report section says which and why).
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
from reelforge.filters.embeddings import ROW_KEY, ROW_TYPE, complete, embeddings_folder, same_model, text_hash
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


def write_section(path: str, section: dict) -> None:
    """A step's report section (JSON), written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(section, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


HASH_KEY = "_text_hash"  # beside ROW_KEY while the kept rows are written: `text_hash` of the caption


def _with_text_hash(b: pa.RecordBatch, which: str, schema: pa.Schema) -> pa.RecordBatch:
    """The batch with HASH_KEY filled for the rows that carry embeddings: `text_hash` of the
    caption the step embedded (`caption_of(row, which)`)."""
    import pyarrow.compute as pc

    from reelforge.filters.clip_score import caption_of

    has = pc.is_valid(b.column(ROW_KEY)).to_pylist()
    if not any(has):
        return b
    cols = {k: b.column(k).to_pylist() for k in ("text", "messages", "chosen")}
    hashes = [text_hash(caption_of({k: cols[k][i] for k in cols}, which)) if h else None for i, h in enumerate(has)]
    arrays = [b.column(i) for i in range(b.num_columns)]
    arrays[b.schema.get_field_index(HASH_KEY)] = pa.array(hashes, pa.string())
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


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
    schema = ARROW_SCHEMA.append(pa.field(ROW_KEY, ROW_TYPE)).append(pa.field(HASH_KEY, pa.string()))
    which = getattr(step, "conversation_text", "assistant")  # the text its text embeddings are of

    def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in run_batches(step, batches, context_of(base), schema):
            yield _with_text_hash(b, which, schema)

    scored = df.mapInArrow(run, from_arrow_schema(schema)).persist(StorageLevel.MEMORY_AND_DISK)
    emb = (scored.select("id", F.explode(ROW_KEY).alias("e"), HASH_KEY)
           .select("id", F.col("e.index").alias("index"), F.col("e.image").alias("image"),
                   F.col("e.text").alias("text"), F.col(HASH_KEY).alias("text_hash"),
                   F.lit(step.model_tag()).alias("model"),
                   (F.length(F.col("e.image")) / 2).cast("int").alias("dim")))
    emb.write.mode("overwrite").option("compression", "zstd").parquet(folder)
    return scored.drop(ROW_KEY, HASH_KEY)


REUSERS = ("dedup_semantic", "leakage")  # steps whose `from_step` names a step that keeps its embeddings


def check_embeddings(recipe, out: str) -> None:
    """Before the first step: every `dedup_semantic` or `leakage` with `from_step` follows a step
    of that name with `keep_embeddings: true`; at most one step keeps embeddings under a name;
    kept folders that no step of the recipe keeps any more are removed."""
    from reelforge.curation.errors import RecipeError

    keepers: dict[str, int] = {}
    for i, spec in enumerate(recipe.steps):
        if spec.params.get("keep_embeddings") is True:
            if spec.name in keepers:
                raise RecipeError(f"recipe field `steps[{i}].{spec.name}.keep_embeddings`: steps[{keepers[spec.name]}] "
                                  f"already keeps embeddings under the name {spec.name!r} (RUN/embeddings/"
                                  f"{spec.name}/): keep them from one of the two.")
            keepers[spec.name] = i
        src = spec.params.get("from_step") if spec.name in REUSERS else None
        if src and keepers.get(src) is None:
            fix = "drop `from_step` and give `model`" if spec.name == SemanticDedup.name else "drop `from_step`"
            raise RecipeError(f"recipe field `steps[{i}].{spec.name}.from_step` names {src!r}, but no earlier step "
                              f"{src!r} keeps its embeddings: add `keep_embeddings: true` to that step (before "
                              f"this one), or {fix}.")
    root = os.path.join(out, EMB_FOLDER)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name not in keepers:
                _remove(os.path.join(root, name))


def kept_embeddings(spark, workdir: str | None, from_step: str, what: str) -> tuple[str, DataFrame | None, list[str]]:
    """(folder, table, model tags) of the embeddings step `from_step` kept in this run
    (`RUN/embeddings/<from_step>/`): the table is None when the folder holds no complete write;
    the tags are the distinct `model` values in it (at most two are read: one is the normal case)."""
    folder = embeddings_folder(run_dir(workdir, what), from_step)
    if not complete(folder):
        return folder, None, []
    table = spark.read.parquet(folder)
    return folder, table, [r["model"] for r in table.select("model").distinct().limit(2).collect()]


def embeddings_frame(spark, folder: str, which: str = "image", index: int = 0) -> DataFrame:
    """A kept-embeddings folder as a DataFrame (id, emb binary float16, model): medium `index`
    of each sample (0: the first) and its `which` (image or text) embedding."""
    return (spark.read.parquet(folder).filter(F.col("index") == index)
            .select("id", F.col(which).alias("emb"), "model"))


# --- leakage (keye_posttrain) ----------------------------------------------------------------------

def leakage_embeddings(step, spark, workdir: str | None) -> tuple[DataFrame | None, dict]:
    """What a `leakage` step (`filters.leakage.LeakageFilter`) reuses of the embeddings its
    `from_step` kept: one row per sample (id; its media's kept image embeddings, by medium
    index; its kept text embedding and that text's `text_hash`) to join onto the corpus, or
    None, and the report section's first fields: `embeddings` (reused / computed), `why`, the
    folder and the model tags. Reused only under `rule: keye_posttrain`, from a complete folder
    holding one model that is the step's own (`filters.embeddings.same_model`); else the step
    embeds every corpus image and text itself, as it does without `from_step`."""
    from reelforge.filters.embeddings import model_tag
    from reelforge.filters.leakage import KEPT_IMAGES, KEPT_TEXT, KEPT_TEXT_HASH

    own = model_tag(step.model, step.pretrained, step.model_config) if step.rule == "keye_posttrain" else None
    info: dict = {"from_step": step.from_step or None, "embeddings": "computed", "model": own}
    if step.rule != "keye_posttrain":
        info.update(embeddings="none", why=f"rule {step.rule} uses no CLIP embeddings")
        return None, info
    if not step.from_step:
        info["why"] = "no from_step: the corpus's images and texts are embedded by this step"
        return None, info
    folder, table, tags = kept_embeddings(spark, workdir, step.from_step, f"leakage from_step {step.from_step!r}")
    info.update(folder=folder, kept_model=tags[0] if len(tags) == 1 else tags or None)
    if table is None:
        info["why"] = f"no complete embeddings at {folder} (no _SUCCESS): embedded by this step"
    elif not tags:
        info["why"] = f"step {step.from_step!r} kept no embeddings (the folder is empty): embedded by this step"
    elif len(tags) > 1:
        info["why"] = f"the embeddings at {folder} come from more than one model: embedded by this step"
    elif not same_model(tags[0], step.model, step.pretrained, step.model_config):
        info["why"] = (f"step {step.from_step!r} kept embeddings of another model ({tags[0]}) than this step's "
                       f"({own}): embedded by this step")
    else:
        if "text_hash" not in table.columns:  # kept before text hashes were recorded: texts are embedded again
            table = table.withColumn("text_hash", F.lit(None).cast("string"))
        per_sample = table.groupBy("id").agg(
            F.collect_list(F.struct("index", "image")).alias(KEPT_IMAGES),
            F.first("text", ignorenulls=True).alias(KEPT_TEXT),
            F.first("text_hash", ignorenulls=True).alias(KEPT_TEXT_HASH))
        info.update(embeddings="reused", why=f"the embeddings step {step.from_step!r} kept with the same model")
        return per_sample, info
    return None, info


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
        folder, table, tags = kept_embeddings(spark, workdir, step.from_step, "dedup_semantic")
        if table is None:
            raise ValueError(f"dedup_semantic: step {step.from_step!r} kept no embeddings at {folder} (no _SUCCESS): "
                             f"run it with keep_embeddings: true before this step")
        saved = embeddings_frame(spark, folder, step.embedding)
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
    if workdir:
        write_section(step.report_path(workdir), section)
    return df if decisions is None else mark_drops(df, decisions, step.name)
