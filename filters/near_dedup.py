"""Near-duplicate removal on Spark: MinHash LSH for text, bit-sampling LSH over pHashes for
images and videos, connected components, one sample kept per cluster.

Text: signatures (`curation.minhash`) over normalised word n-grams, cut into the bands
datasketch picks for `threshold - candidate_margin` (a pair just above the threshold
shares a band with probability ~0.5 under the threshold's own parameters; the margin makes
that > 0.95); samples sharing a band are candidates, and a candidate pair is kept as an
edge only when the exact Jaccard of its shingle sets reaches the threshold, so the extra
candidates cost a comparison, never precision.
Images: 64-bit pHashes; a band is a fixed random sample of `image_band_bits` (12) of the
64 bits, `image_bands` (24) of them (bit-sampling LSH for Hamming distance: a pair 10 bits
apart shares a band with probability ~0.97; fewer bits per band find more but make bigger
buckets), and an edge needs Hamming distance <= `image_hamming` (10).
Videos: the pHashes of their sampled frames; candidates share a band of any of their first
`video_probe_frames` frames, and an edge needs most frames to match in order (the longest
common subsequence of matching frames covers `video_match` of the shorter video).

Clusters are the connected components of the edges (`curation.components`), and the sample
kept is the best by a documented, deterministic rule: highest score `quality`, then the
longest text, then the smallest id. Every other member is dropped as `near_duplicate` with
`dup_of` naming the kept sample.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from reelforge.curation.components import connected_components
from reelforge.curation.schema import all_text
from reelforge.curation.step import Step, register_step

_BITS_SEED = 20240701


def bit_bands(n_bands: int = 24, bits: int = 12, seed: int = _BITS_SEED) -> np.ndarray:
    """Fixed random bit positions per band (n_bands x bits), the same on every executor."""
    rng = np.random.RandomState(seed)
    return np.stack([rng.choice(64, size=bits, replace=False) for _ in range(n_bands)])


def phash_band_keys(h: int, bands: np.ndarray) -> list[int]:
    u = np.uint64(h & 0xFFFFFFFFFFFFFFFF)
    bitsv = (u >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    keys = []
    for i, pos in enumerate(bands):
        v = 0
        for b in bitsv[pos]:
            v = (v << 1) | int(b)
        keys.append((i << 32) | v)
    return keys


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1")


def ordered_match(a: list[int], b: list[int], max_dist: int) -> float:
    """Longest common subsequence of frames within `max_dist` bits, over the shorter length."""
    if not a or not b:
        return 0.0
    n, m = len(a), len(b)
    prev = [0] * (m + 1)
    for i in range(n):
        cur = [0] * (m + 1)
        for j in range(m):
            cur[j + 1] = prev[j] + 1 if hamming(a[i], b[j]) <= max_dist else max(prev[j + 1], cur[j])
        prev = cur
    return prev[m] / min(n, m)


@register_step("dedup_near")
class NearDedup(Step):
    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, unit: str = "word",
                 seed: int = 1, text_kinds: list[str] | None = None, image_kinds: list[str] | None = None,
                 image_hamming: int = 10, video_match: float = 0.5, video_probe_frames: int = 8,
                 max_bucket: int = 64, candidate_margin: float = 0.15, image_bands: int = 24,
                 image_band_bits: int = 12, **kw: Any):
        super().__init__(**kw)
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = float(threshold)
        self.num_perm = int(num_perm)
        self.ngram = int(ngram)
        self.unit = unit
        self.seed = int(seed)
        self.text_kinds = list(text_kinds or ["text", "interleaved"])
        self.image_kinds = list(image_kinds or ["image_text", "video_text"])
        self.image_hamming = int(image_hamming)
        self.video_match = float(video_match)
        self.video_probe_frames = int(video_probe_frames)
        self.max_bucket = int(max_bucket)
        self.candidate_margin = float(candidate_margin)
        self.image_bands = int(image_bands)
        self.image_band_bits = int(image_band_bits)

    # -- candidates ---------------------------------------------------------------------------
    def _keys(self, live: DataFrame, every_image: bool = False) -> DataFrame:
        """(id, key, payload) rows: one per band a sample falls in; payload verifies edges."""
        from reelforge.curation.minhash import band_hashes, is_empty, lsh_params, signatures

        bands, rows = lsh_params(max(0.05, self.threshold - self.candidate_margin), self.num_perm)
        step = self
        bit_b = bit_bands(self.image_bands, self.image_band_bits)

        def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                recs = b.to_pylist()
                out: list[dict] = []
                texts = [(r["id"], all_text(r)) for r in recs if every_image or r["kind"] in step.text_kinds]
                if texts:
                    sigs = signatures([t for _, t in texts], num_perm=step.num_perm, n=step.ngram,
                                      unit=step.unit, seed=step.seed)
                    hb = band_hashes(sigs, bands, rows)
                    empty = is_empty(sigs)
                    for (sid, _), hs, e in zip(texts, hb, empty):
                        if e:  # no shingles: all-max signatures would share one giant bucket
                            continue
                        for i, h in enumerate(hs):
                            out.append({"id": sid, "space": "t", "key": f"{i}:{int(h)}", "payload": None})
                for r in recs:
                    media = r.get("media") or []
                    if every_image:  # leakage: each image of any sample, as "<id>|<index>"
                        for j, m in enumerate(media):
                            if m["kind"] == "image" and m.get("phash"):
                                for k in phash_band_keys(m["phash"][0], bit_b):
                                    out.append({"id": f"{r['id']}|{j}", "space": "i", "key": str(k),
                                                "payload": m["phash"][:1]})
                        continue
                    if r["kind"] not in step.image_kinds or len(media) != 1 or not media[0].get("phash"):
                        continue
                    hashes = list(media[0]["phash"])
                    space = "i" if media[0]["kind"] == "image" else "v"
                    seen = set()
                    for h in hashes[: step.video_probe_frames] if space == "v" else hashes[:1]:
                        for k in phash_band_keys(h, bit_b):
                            if k not in seen:
                                seen.add(k)
                                out.append({"id": r["id"], "space": space, "key": str(k), "payload": hashes})
                if out:
                    yield pa.RecordBatch.from_pylist(out, schema=_KEY_SCHEMA)

        return live.mapInArrow(run, "id string, space string, key string, payload array<bigint>")

    def _edges(self, keys: DataFrame, live: DataFrame, across: bool = False) -> DataFrame:
        keys = keys.persist()
        buckets = keys.groupBy("space", "key").agg(F.collect_set("id").alias("ids")) \
            .filter(F.size("ids") > 1)
        small = buckets.filter(F.size("ids") <= self.max_bucket) \
            .select("space", F.explode("ids").alias("a"), "ids") \
            .select("space", "a", F.explode("ids").alias("b")).filter(F.col("a") < F.col("b"))
        big = buckets.filter(F.size("ids") > self.max_bucket) \
            .select("space", F.array_min("ids").alias("a"), F.explode("ids").alias("b")) \
            .filter(F.col("a") < F.col("b"))
        pairs = small.unionByName(big).distinct()
        if across:  # leakage: only pairs of one training sample and one evaluation item
            pairs = pairs.filter(F.col("a").startswith(EVAL_PREFIX) != F.col("b").startswith(EVAL_PREFIX))
        payload = keys.select("id", "space", "payload").dropDuplicates(["id", "space"])
        cand = (pairs.join(payload.withColumnRenamed("id", "a").withColumnRenamed("payload", "pa"), ["a", "space"])
                .join(payload.withColumnRenamed("id", "b").withColumnRenamed("payload", "pb"), ["b", "space"]))
        texts = live.select("id", "kind", "text", "messages", "chosen", "rejected").filter(F.col("id").isNotNull())
        cand = (cand.join(texts.select(F.col("id").alias("a"), F.struct(*texts.columns).alias("ra")), "a", "left")
                .join(texts.select(F.col("id").alias("b"), F.struct(*texts.columns).alias("rb")), "b", "left"))
        step = self

        def verify(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                out = []
                for r in b.to_pylist():
                    pa_, pb_ = r["pa"], r["pb"]
                    if r["space"] == "t":
                        ok = step.exact_jaccard(all_text(r["ra"]), all_text(r["rb"])) >= step.threshold
                    elif r["space"] == "i":
                        ok = hamming(pa_[0], pb_[0]) <= step.image_hamming
                    else:
                        ok = ordered_match(pa_, pb_, step.image_hamming) >= step.video_match
                    if ok:
                        out.append({"a": r["a"], "b": r["b"]})
                if out:
                    yield pa.RecordBatch.from_pylist(out, schema=_EDGE_SCHEMA)

        return cand.mapInArrow(verify, "a string, b string")

    def exact_jaccard(self, a: str, b: str) -> float:
        from reelforge.curation.minhash import shingles

        sa, sb = set(shingles(a, self.ngram, self.unit)), set(shingles(b, self.ngram, self.unit))
        return len(sa & sb) / len(sa | sb) if sa and sb else 0.0

    def apply(self, df: DataFrame) -> DataFrame:
        live = df.filter(F.col("drop_step").isNull())
        edges = self._edges(self._keys(live), live)
        comp = connected_components(edges)
        score = live.select("id", F.coalesce(F.col("scores").getItem("quality"), F.lit(float("-inf"))).alias("_q"),
                            (F.coalesce(F.length("text"), F.lit(0))
                             + F.coalesce(F.aggregate(F.coalesce(F.col("messages"), F.array()), F.lit(0),
                                                      lambda acc, m: acc + F.length(m["content"])),
                                          F.lit(0))).alias("_len"))
        ranked = comp.join(score, "id").withColumn(
            "_keep", F.first("id").over(Window.partitionBy("component")
                                        .orderBy(F.desc("_q"), F.desc("_len"), F.asc("id"))))
        decisions = ranked.filter(F.col("_keep") != F.col("id")).select("id", F.col("_keep").alias("_dup"))
        out = df.join(decisions, "id", "left")
        dup = F.col("_dup").isNotNull() & F.col("drop_step").isNull()
        out = (out.withColumn("drop_reason", F.when(dup, F.lit("near_duplicate")).otherwise(F.col("drop_reason")))
               .withColumn("drop_detail", F.when(dup, F.concat(F.lit("near duplicate of "), F.col("_dup")))
                           .otherwise(F.col("drop_detail")))
               .withColumn("dup_of", F.when(dup, F.col("_dup")).otherwise(F.col("dup_of")))
               .withColumn("drop_step", F.when(dup, F.lit(self.name)).otherwise(F.col("drop_step"))))
        return out.select(*df.columns)


_KEY_SCHEMA = pa.schema([("id", pa.string()), ("space", pa.string()), ("key", pa.string()),
                         ("payload", pa.list_(pa.int64()))])
_EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string())])


EVAL_PREFIX = "eval:"


@register_step("leakage")
class LeakageFilter(NearDedup):
    """Drops every training sample whose text or any image is a near-duplicate of an item of
    an evaluation set (`leak:<set name>` in the ledger, so the report counts per set).

    Evaluation sets are JSONL or Parquet files in any manifest dialect the readers know
    (question/answer text, `image` paths); their images are probed and pHashed like the
    corpus. Text: exact shingle Jaccard >= `threshold` (default 0.8) found through MinHash
    LSH; images: pHash Hamming distance <= `image_hamming`. One matching image drops the
    whole multi-image sample.
    """

    def __init__(self, eval_sets: list[dict] | None = None, **kw: Any):
        super().__init__(**kw)
        sets = eval_sets or []
        if not sets:
            raise ValueError("`eval_sets` must list the evaluation sets: [{name: ..., path: ...}]")
        for i, e in enumerate(sets):
            if not isinstance(e, dict) or "name" not in e or "path" not in e:
                raise ValueError(f"eval_sets[{i}] needs a name and a path")
            if not os.path.exists(e["path"]):
                raise ValueError(f"eval_sets[{i}].path {e['path']} does not exist")
        self.eval_sets = sets

    def _eval_rows(self, spark) -> DataFrame:
        from reelforge.curation.probe import Probe
        from reelforge.curation.readers import read_jsonl, read_parquet
        rows = []
        for e in self.eval_sets:
            reader = read_parquet if e["path"].endswith(".parquet") else read_jsonl
            for r in reader(e["path"], e["name"], os.path.dirname(e["path"]), {}):
                if r.get("kind") == "unknown":
                    continue
                meta = json.loads(r["meta"]) if r.get("meta") else {}
                qa = " ".join(str(meta[k]) for k in ("question", "answer") if meta.get(k) is not None)
                if qa:  # benchmark items: their question and answer are the text to match
                    r["text"] = f"{r['text']} {qa}" if r.get("text") else qa
                r["id"] = f"{EVAL_PREFIX}{e['name']}:{r['source_key']}"
                r["drop_step"] = r["drop_reason"] = r["drop_detail"] = None
                rows.append(r)
        rows = [r for r in Probe().process_rows(rows) if r["drop_step"] is None]  # small: probe here, once
        if not rows:
            return None
        from reelforge.curation.schema import COLUMNS, spark_schema

        return spark.createDataFrame([tuple(r[c] for c in COLUMNS) for r in rows], schema=spark_schema())

    def apply(self, df: DataFrame) -> DataFrame:
        live = df.filter(F.col("drop_step").isNull())
        ev = self._eval_rows(df.sparkSession)
        if ev is None:
            return df
        keys = self._keys(live, every_image=True).unionByName(self._keys(ev, every_image=True))
        both = live.unionByName(ev)
        edges = self._edges(keys, both, across=True)
        # map image pseudo-ids back to samples; name the evaluation set that matched
        e = edges.select(F.when(F.col("a").startswith(EVAL_PREFIX), F.col("b")).otherwise(F.col("a")).alias("t"),
                         F.when(F.col("a").startswith(EVAL_PREFIX), F.col("a")).otherwise(F.col("b")).alias("e"))
        e = e.select(F.split("t", r"\|")[0].alias("id"), F.split("e", r"\|")[0].alias("e"))
        hits = e.groupBy("id").agg(F.min("e").alias("_eval"))
        out = df.join(hits, "id", "left")
        leak = F.col("_eval").isNotNull() & F.col("drop_step").isNull()
        set_name = F.split(F.substring_index(F.col("_eval"), ":", 2), ":")[1]
        out = (out.withColumn("drop_reason", F.when(leak, F.concat(F.lit("leak:"), set_name))
                              .otherwise(F.col("drop_reason")))
               .withColumn("drop_detail",
                           F.when(leak, F.concat(F.lit("near-duplicate of evaluation item "),
                                                 F.substring(F.col("_eval"), len(EVAL_PREFIX) + 1, 1000)))
                           .otherwise(F.col("drop_detail")))
               .withColumn("drop_step", F.when(leak, F.lit(self.name)).otherwise(F.col("drop_step"))))
        return out.select(*df.columns)
