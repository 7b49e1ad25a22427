"""Benchmark leakage: drop every training sample that matches an evaluation item.

Three rules (`rule`), the first the default, both Keye-VL rules as the report states them:

- `keye_pretrain` (the report's pre-training rule): each image's 64-bit pHash is a bit-set (the
  set of its 1-bit positions); the sets are MinHashed (`bitset_signatures`: `num_perm` random
  permutations of the 64 positions), candidates come from LSH bands (datasketch's optimal
  bands and rows for `jaccard - candidate_margin`, as near dedup picks them for text, so a
  pair just above `jaccard` is a candidate with probability >= 0.99), and a candidate is a
  leak when the exact Jaccard of the two bit-sets is > `jaccard` (0.95). Note what that
  threshold means for a DCT pHash: its bits are the signs of 64 coefficients against their
  median, so every pHash has 32 ones (ties aside), two hashes d bits apart have Jaccard
  (32 - d/2) / (32 + d/2), 0.939 at d = 2: Jaccard > 0.95 is the same pHash. Resized and
  re-encoded copies mostly keep it; crops of a few percent mostly do not (`rule: hamming`
  catches those).
- `keye_posttrain` (the report's post-training rule): CLIP embeddings of the sample's images
  against the evaluation item's images at cosine > `image_cosine` (0.98) AND the CLIP text
  encoder's embeddings of the sample's text against the item's text at cosine > `text_cosine`
  (0.50). The model is the clip step's (`model`, `pretrained`, `model_config`, loaded with
  `filters.clip_score.load_scorer`); evaluation items are embedded once, on the driver. With
  `from_step: clip` the corpus side reuses what that CLIP step kept (`keep_embeddings: true`,
  `filters.embeddings`) when it was made by this same model: a sample's kept image embedding
  per medium, and its kept text embedding when its `text_hash` is that of the text this rule
  embeds (every turn of a conversation; the CLIP step embeds its assistant turns by default),
  so only what the CLIP step did not embed goes through the encoder here. Another model, or no
  complete folder: everything is embedded here, as without `from_step`. The step's report
  section (`_work/leakage/<name>-<hash>.json`) says which, why, and how many images and texts
  were reused and embedded.
- `hamming`: pHash Hamming distance <= `image_hamming` (10) against any evaluation image.

Under every rule, the text of every sample is also checked the way near dedup checks text
(`text: true`): exact shingle Jaccard >= `threshold` (0.8), candidates from MinHash LSH, which
catches copied benchmark questions with or without images. Any matching image drops the whole
(multi-image) sample. The reason is `leak:<set>`, so the report counts drops per evaluation set.

Evaluation sets are small (thousands of items), so they are indexed once on the driver
(`LeakageFilter.build_index`: band keys in sorted arrays, pHashes, embeddings) and the index is
broadcast; each training batch is then matched in its executor (`LeakageFilter.leaks_of`) with
no shuffle of the corpus. The decisions are the plain functions below; the engine
(`jobs.leakage.leakage`) only broadcasts the index and joins the drops back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from reelforge.curation.schema import all_text
from reelforge.curation.step import register_step
from reelforge.filters.embeddings import from_bytes, text_hash
from reelforge.filters.near_dedup import NearDedup

EVAL_PREFIX = "eval:"
# what the engine joins onto a corpus row from the kept embeddings of `from_step` (jobs.semantic.leakage_embeddings)
KEPT_IMAGES = "_kept_images"      # [{index, image}]: the kept image embedding of each medium, by its index
KEPT_TEXT = "_kept_text"          # the kept text embedding (float16 bytes)
KEPT_TEXT_HASH = "_kept_text_hash"  # text_hash of the text it is of
# counters of the corpus side, summed over the batches into the report section
COUNTERS = ("samples", "images_reused", "images_embedded", "texts_reused", "texts_embedded", "encoder_calls")
RULES = ("keye_pretrain", "keye_posttrain", "hamming")
_MASK64 = (1 << 64) - 1
_BITSET_SEED = 1


def is_eval(node_id: str) -> bool:
    return node_id.startswith(EVAL_PREFIX)


def leak_pair(a: str, b: str) -> tuple[str, str]:
    """(training sample id, evaluation item id) of an edge between one of each; an image
    contributes "<id>|<index>", which maps back to its sample (one image drops the sample)."""
    train, ev = (b, a) if is_eval(a) else (a, b)
    return train.split("|")[0], ev.split("|")[0]


def leak_drop(eval_id: str) -> tuple[str, str]:
    """(reason, detail) for a training sample matching `eval_id` ("eval:<set>:<key>"): the
    reason names the set, `leak:<set>`, so the report counts per evaluation set."""
    set_name = eval_id.split(":", 2)[1]
    return f"leak:{set_name}", "near-duplicate of evaluation item " + eval_id[len(EVAL_PREFIX):][:1000]


def leaks(edges: list[tuple[str, str]]) -> dict[str, str]:
    """Training sample id -> the evaluation item it leaks (the smallest id when several match),
    for the edges between training samples and evaluation items."""
    hits: dict[str, str] = {}
    for a, b in edges:
        if is_eval(a) == is_eval(b):
            continue
        t, e = leak_pair(a, b)
        hits[t] = min(hits.get(t, e), e)
    return hits


# -- pHash bit-sets: MinHash, LSH, exact Jaccard ----------------------------------------------------

def _u64(hashes) -> np.ndarray:
    """uint64 array of hashes given as Python ints (signed or not), numpy ints or arrays; never
    through numpy's type guess (a list mixing ints >= 2**63 and smaller ones becomes float64)."""
    if isinstance(hashes, np.ndarray):
        return hashes.astype(np.int64).view(np.uint64) if hashes.dtype.kind == "i" else hashes.astype(np.uint64)
    if not isinstance(hashes, (list, tuple)):
        hashes = [hashes]
    return np.array([int(h) & _MASK64 for h in hashes], dtype=np.uint64)


def bitset_jaccard(a, b) -> np.ndarray:
    """Exact Jaccard of pHash bit-sets, elementwise: |a & b| / |a | b| (0 where both are empty)."""
    a, b = _u64(a), _u64(b)
    inter = np.bitwise_count(a & b).astype(np.float64)
    union = np.bitwise_count(a | b).astype(np.float64)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def bitset_permutations(num_perm: int = 128, seed: int = _BITSET_SEED) -> np.ndarray:
    """uint8 (num_perm, 64): the rank of bit position j under permutation k, the same on every
    executor. A min-wise hash over a 64-element universe: exact permutations, so two sets
    agree on a signature value with probability exactly their Jaccard."""
    rng = np.random.RandomState(seed)
    return np.stack([np.argsort(rng.permutation(64)) for _ in range(num_perm)]).astype(np.uint8)


def bitset_signatures(hashes, num_perm: int = 128, seed: int = _BITSET_SEED) -> np.ndarray:
    """uint32 (N, num_perm) MinHash signatures of the pHashes' bit-sets: value k is the least
    rank, under permutation k, of a 1-bit of the hash (64 for a hash with no 1-bit)."""
    h = _u64(hashes)
    ranks = bitset_permutations(num_perm, seed)
    bits = ((h[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(bool)  # (N, 64)
    out = np.empty((len(h), num_perm), dtype=np.uint32)
    for s in range(0, len(h), 256):
        blk = bits[s:s + 256]
        out[s:s + 256] = np.where(blk[:, None, :], ranks[None, :, :], np.uint8(64)).min(axis=2)
    return out


# -- the band index of the evaluation items ---------------------------------------------------------

def band_index(keys: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per band (column of `keys`, int64 (n, bands)): its values sorted, and the row each came from."""
    out = []
    for j in range(keys.shape[1]):
        order = np.argsort(keys[:, j], kind="stable")
        out.append((keys[order, j], order.astype(np.int64)))
    return out


def band_lookup(index: list[tuple[np.ndarray, np.ndarray]], keys: np.ndarray) -> set[tuple[int, int]]:
    """(query row, indexed row) for every query row of `keys` sharing a band value with an indexed row."""
    pairs: set[tuple[int, int]] = set()
    for j, (vals, rows) in enumerate(index):
        if not len(vals):
            continue
        lo = np.searchsorted(vals, keys[:, j], side="left")
        hi = np.searchsorted(vals, keys[:, j], side="right")
        for q in np.flatnonzero(hi > lo):
            pairs.update((int(q), int(r)) for r in rows[lo[q]:hi[q]])
    return pairs


@dataclasses.dataclass
class LeakIndex:
    """What the executors need of the evaluation sets (built once on the driver, broadcast)."""

    eval_ids: list[str]                       # item -> "eval:<set>:<key>"
    text_index: list = dataclasses.field(default_factory=list)   # MinHash bands of the items' texts
    text_shingles: list = dataclasses.field(default_factory=list)  # item -> its shingle set
    image_item: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # image -> item
    image_hash: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint64))  # image -> pHash
    image_index: list = dataclasses.field(default_factory=list)  # bit-set MinHash bands (keye_pretrain)
    image_emb: np.ndarray | None = None       # image -> CLIP embedding (keye_posttrain)
    text_emb: np.ndarray | None = None        # item -> CLIP text embedding (keye_posttrain)


# -- the decisions over one batch of candidates, as plain functions ------------------------------------

def pretrain_image_hits(hashes, index: LeakIndex, jaccard: float, bands: int, rows: int, num_perm: int
                        ) -> set[tuple[int, int]]:
    """(sample image, evaluation item) pairs of the pre-training rule: LSH candidates over the
    bit-set MinHash, kept when the exact bit-set Jaccard is > `jaccard`."""
    from reelforge.curation.minhash import band_hashes

    h = _u64(hashes)
    if not len(h) or not len(index.image_hash):
        return set()
    keys = band_hashes(bitset_signatures(h, num_perm), bands, rows)
    out = set()
    for q, e in band_lookup(index.image_index, keys):
        if bitset_jaccard(h[q], index.image_hash[e])[0] > jaccard:
            out.add((q, int(index.image_item[e])))
    return out


def hamming_image_hits(hashes, index: LeakIndex, max_dist: int) -> set[tuple[int, int]]:
    """(sample image, evaluation item) pairs at pHash Hamming distance <= `max_dist`, exact
    (every sample image against every evaluation image: evaluation sets are small)."""
    h = _u64(hashes)
    out = set()
    if not len(h) or not len(index.image_hash):
        return out
    for s in range(0, len(h), 256):
        d = np.bitwise_count(h[s:s + 256, None] ^ index.image_hash[None, :])
        for q, e in zip(*np.nonzero(d <= max_dist)):
            out.add((s + int(q), int(index.image_item[e])))
    return out


def posttrain_hits(image_emb: np.ndarray, image_sample: np.ndarray, text_emb: np.ndarray, index: LeakIndex,
                   image_cosine: float, text_cosine: float) -> set[tuple[int, int]]:
    """(sample, evaluation item) pairs of the post-training rule: some image of the sample has
    cosine > `image_cosine` with an image of the item, AND the sample's text has cosine >
    `text_cosine` with the item's text. Embeddings are L2-normalised rows; `image_sample[i]` is
    the sample of image i; `text_emb[s]` the text of sample s (a NaN row: no text, no match)."""
    out: set[tuple[int, int]] = set()
    if index.image_emb is None or not len(image_emb) or not len(index.image_emb):
        return out
    sims = np.asarray(image_emb, np.float32) @ np.asarray(index.image_emb, np.float32).T
    for i, e in zip(*np.nonzero(sims > image_cosine)):
        s, item = int(image_sample[i]), int(index.image_item[e])
        if (s, item) in out:
            continue
        a, b = np.asarray(text_emb[s], np.float32), np.asarray(index.text_emb[item], np.float32)
        if a.shape == b.shape and float(a @ b) > text_cosine:  # NaN (no text on a side) compares False
            out.add((s, item))
    return out


def text_hits(step: NearDedup, texts: list[str], index: LeakIndex) -> set[tuple[int, int]]:
    """(sample, evaluation item) pairs whose texts have exact shingle Jaccard >= `threshold`,
    candidates from the MinHash bands near dedup uses."""
    from reelforge.curation.minhash import band_hashes, is_empty, lsh_params, shingles, signatures

    out: set[tuple[int, int]] = set()
    if not texts or not index.text_index:
        return out
    bands, rows = lsh_params(max(0.05, step.threshold - step.candidate_margin), step.num_perm)
    sigs = signatures(texts, num_perm=step.num_perm, n=step.ngram, unit=step.unit, seed=step.seed)
    keys = band_hashes(sigs, bands, rows)
    empty = is_empty(sigs)
    for q, e in band_lookup(index.text_index, keys):
        if empty[q]:
            continue
        sa, sb = set(shingles(texts[q], step.ngram, step.unit)), index.text_shingles[e]
        if sa and sb and len(sa & sb) / len(sa | sb) >= step.threshold:
            out.add((q, e))
    return out


@register_step("leakage")
class LeakageFilter(NearDedup):
    """Drops every training sample that matches an item of an evaluation set under `rule`
    (`keye_pretrain`, the default; `keye_posttrain`; `hamming`), or whose text is a copy of an
    item's text; the ledger reason is `leak:<set name>`, so the report counts per set.

    Evaluation sets are JSONL or Parquet files in any manifest dialect the readers know
    (question/answer text, `image` paths); their images are probed and pHashed like the corpus.
    """

    shuffle = "leakage"

    def __init__(self, eval_sets: list[dict] | None = None, rule: str = "keye_pretrain", jaccard: float = 0.95,
                 image_cosine: float = 0.98, text_cosine: float = 0.50, text: bool = True,
                 model: str = "ViT-B-32", pretrained: str = "", model_config: str = "", device: str = "auto",
                 batch_size: int = 64, from_step: str = "", **kw: Any):
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
        if rule not in RULES:
            raise ValueError(f"`rule` must be keye_pretrain (pHash bit-set Jaccard > `jaccard`), keye_posttrain "
                             f"(CLIP image cosine > `image_cosine` and text cosine > `text_cosine`) or hamming "
                             f"(pHash Hamming <= `image_hamming`), got {rule!r}")
        self.rule = rule
        if not 0 <= float(jaccard) < 1:
            raise ValueError(f"`jaccard` must be in [0, 1): a pair is a leak when its Jaccard is above it, "
                             f"got {jaccard}")
        for name, v in (("image_cosine", image_cosine), ("text_cosine", text_cosine)):
            if not -1 <= float(v) < 1:
                raise ValueError(f"`{name}` must be in [-1, 1): a pair is a leak when its cosine is above it, got {v}")
        self.jaccard = float(jaccard)
        self.image_cosine, self.text_cosine = float(image_cosine), float(text_cosine)
        self.text = bool(text)
        self.model, self.pretrained, self.model_config = model, pretrained, model_config
        self.device = device
        self.batch_size = int(batch_size)
        if not isinstance(from_step, str) or (from_step and not from_step.isidentifier()):
            raise ValueError(f"from_step must be the name of a step, such as clip, got {from_step!r}")
        if from_step and rule != "keye_posttrain":
            raise ValueError(f"from_step reuses a CLIP step's kept embeddings, which only rule keye_posttrain "
                             f"uses (rule is {rule}): drop from_step")
        self.from_step = from_step
        self._fields = json.dumps({"eval_sets": sets, "rule": rule, "jaccard": self.jaccard,
                                   "image_cosine": self.image_cosine, "text_cosine": self.text_cosine,
                                   "text": self.text, "model": model, "pretrained": pretrained,
                                   "model_config": model_config, "from_step": from_step, **kw},
                                  sort_keys=True, default=str)  # as the recipe gave them
        if rule == "keye_posttrain":
            from reelforge.filters.clip_score import check_clip_model

            if not pretrained:
                raise ValueError("rule keye_posttrain needs `pretrained` (a local CLIP checkpoint or an open_clip "
                                 "tag): a randomly initialised CLIP would make its cosines meaningless")
            if model_config and not os.path.exists(model_config):
                raise ValueError(f"model_config {model_config} does not exist")
            check_clip_model(model, pretrained, model_config)

    # -- the run's files ----------------------------------------------------------------------
    def report_name(self) -> str:
        """The file (under `_work/leakage/`) holding this step's report section: named by its
        recipe fields, so two such steps in a recipe keep apart."""
        import hashlib

        return f"{self.name}-{hashlib.sha256(self._fields.encode()).hexdigest()[:12]}.json"

    def report_path(self, workdir: str) -> str:
        return os.path.join(workdir, "leakage", self.report_name())

    # -- parameters -----------------------------------------------------------------------------
    def image_lsh_params(self) -> tuple[int, int]:
        """(bands, rows) for the bit-set MinHash: datasketch's optimum for `jaccard -
        candidate_margin` (0.80 by default: 9 bands of 13 rows of 128 permutations, a pair at
        Jaccard 0.95 is a candidate with probability 0.998)."""
        from reelforge.curation.minhash import lsh_params

        return lsh_params(max(0.05, self.jaccard - self.candidate_margin), self.num_perm)

    # -- the evaluation items -------------------------------------------------------------------
    def eval_rows(self) -> list[dict]:
        """The evaluation items as sample rows (ids "eval:<set>:<key>"), probed and pHashed here,
        once: evaluation sets are small. Items that cannot be read or probed are left out."""
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
        return [r for r in Probe().process(rows) if r["drop_step"] is None]

    def build_index(self, ev_rows: list[dict]) -> LeakIndex:
        """Index the evaluation items once (driver side): text MinHash bands and shingle sets,
        image pHashes, and per rule the bit-set MinHash bands or the CLIP embeddings."""
        from reelforge.curation.minhash import band_hashes, is_empty, lsh_params, shingles, signatures

        ev_rows = sorted(ev_rows, key=lambda r: r["id"])
        idx = LeakIndex(eval_ids=[r["id"] for r in ev_rows])
        texts = [all_text(r) for r in ev_rows]
        if self.text and texts:
            bands, rows = lsh_params(max(0.05, self.threshold - self.candidate_margin), self.num_perm)
            sigs = signatures(texts, num_perm=self.num_perm, n=self.ngram, unit=self.unit, seed=self.seed)
            keys = band_hashes(sigs, bands, rows)
            keys[is_empty(sigs)] = np.int64(0)  # never matched: the query side skips empty texts
            idx.text_index = band_index(keys)
            idx.text_shingles = [set(shingles(t, self.ngram, self.unit)) for t in texts]
        items, hashes, media = [], [], []
        for i, r in enumerate(ev_rows):
            for m in r.get("media") or []:
                if m["kind"] == "image" and m.get("phash"):
                    items.append(i)
                    hashes.append(m["phash"][0])
                    media.append(m)
        idx.image_item = np.array(items, dtype=np.int64)
        idx.image_hash = _u64(hashes) if hashes else np.zeros(0, np.uint64)
        if self.rule == "keye_pretrain" and hashes:
            b, r = self.image_lsh_params()
            idx.image_index = band_index(band_hashes(bitset_signatures(idx.image_hash, self.num_perm), b, r))
        if self.rule == "keye_posttrain":
            emb, ok = self._embed_images(media)
            keep = np.flatnonzero(ok)
            idx.image_item, idx.image_hash = idx.image_item[keep], idx.image_hash[keep]
            idx.image_emb = emb[keep]
            idx.text_emb = self._embed_texts([self.clip_text(r) for r in ev_rows])
        return idx

    # -- CLIP (keye_posttrain) ----------------------------------------------------------------------
    def _clip(self):
        from reelforge.curation.vlm import resolve_device
        from reelforge.filters.clip_score import load_scorer

        return load_scorer(self.model, self.pretrained or None, self.model_config or None,
                           resolve_device(self.device, getattr(self, "gpus", ())))

    @staticmethod
    def clip_text(row: dict) -> str:
        from reelforge.filters.clip_score import caption_of

        return caption_of(row, "all")

    def _embed_images(self, media: list[dict], stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, decoded?) of image media; an image that cannot be decoded gets a zero row.
        `stats` counts the images that went through the image encoder, and its calls."""
        from reelforge.curation.media_io import decode_visual

        if not media:
            return np.zeros((0, 1), np.float32), np.zeros(0, dtype=bool)
        sc = self._clip()
        pix, ok = [], np.zeros(len(media), dtype=bool)
        for i, m in enumerate(media):
            try:
                (im,) = decode_visual(m, 1)
                pix.append(sc.preprocess(im))
                ok[i] = True
            except Exception:  # noqa: BLE001 - an unreadable image matches nothing
                continue
        if not pix:
            return np.zeros((len(media), 1), np.float32), ok
        x = sc.torch.stack(pix)
        emb = np.concatenate([sc.embed_pixels(x[s:s + self.batch_size]) for s in range(0, len(x), self.batch_size)])
        if stats is not None:
            stats["images_embedded"] = stats.get("images_embedded", 0) + len(x)
            stats["encoder_calls"] = stats.get("encoder_calls", 0) + -(-len(x) // self.batch_size)
        out = np.zeros((len(media), emb.shape[1]), np.float32)
        out[ok] = emb
        return out, ok

    def _embed_texts(self, texts: list[str], stats: dict | None = None) -> np.ndarray:
        """CLIP text embeddings; an empty text gets a NaN row (it matches nothing). `stats`
        counts the texts that went through the text encoder, and its calls."""
        some = [i for i, t in enumerate(texts) if t.strip()]
        if not some:
            return np.full((len(texts), 1), np.nan, np.float32)
        sc = self._clip()
        emb = np.concatenate([sc.embed_texts([texts[i] for i in some[s:s + self.batch_size]])
                              for s in range(0, len(some), self.batch_size)])
        if stats is not None:
            stats["texts_embedded"] = stats.get("texts_embedded", 0) + len(some)
            stats["encoder_calls"] = stats.get("encoder_calls", 0) + -(-len(some) // self.batch_size)
        out = np.full((len(texts), emb.shape[1]), np.nan, np.float32)
        out[some] = emb
        return out

    # -- the corpus side of keye_posttrain: kept embeddings, or the encoder -------------------------------
    def _image_embeddings(self, recs: list[dict], owner: list[int], where: list[int], media: list[dict],
                          index: LeakIndex, stats: dict) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, usable?) of the image media (medium `where[i]` of sample `owner[i]`): the
        kept embedding of that medium when the row carries one (KEPT_IMAGES), else the encoder's."""
        dim = index.image_emb.shape[1] if index.image_emb is not None and index.image_emb.ndim == 2 else 0
        kept = [{e["index"]: e["image"] for e in (r.get(KEPT_IMAGES) or []) if e.get("image") is not None}
                for r in recs]
        emb = np.zeros((len(media), max(dim, 1)), np.float32)
        ok = np.zeros(len(media), dtype=bool)
        todo = []
        for k, (s, j) in enumerate(zip(owner, where)):
            b = kept[s].get(j)
            if b is not None and dim and len(b) == 2 * dim:
                emb[k], ok[k] = from_bytes(b), True
            else:
                todo.append(k)
        stats["images_reused"] = stats.get("images_reused", 0) + len(media) - len(todo)
        if todo:
            got, good = self._embed_images([media[k] for k in todo], stats)
            if got.shape[1] != emb.shape[1]:  # nothing decoded (one zero column), or no evaluation image
                good = good & (got.shape[1] == emb.shape[1])
            else:
                emb[todo] = got
            ok[todo] = good
        return emb, ok

    def _text_embeddings(self, recs: list[dict], samples: list[int], dim: int, stats: dict) -> np.ndarray:
        """(len(recs), dim) text embeddings of `samples` (NaN rows elsewhere, and for an empty
        text): the kept one when its text_hash is that of `clip_text(row)`, else the encoder's."""
        txt = np.full((len(recs), dim), np.nan, np.float32)
        todo, texts = [], []
        for s in samples:
            cap = self.clip_text(recs[s])
            if not cap.strip():
                continue  # no text: no match (a kept embedding of the empty text is not used)
            b, h = recs[s].get(KEPT_TEXT), recs[s].get(KEPT_TEXT_HASH)
            if b is not None and h is not None and len(b) == 2 * dim and h == text_hash(cap):
                txt[s] = from_bytes(b)
                stats["texts_reused"] = stats.get("texts_reused", 0) + 1
            else:
                todo.append(s)
                texts.append(cap)
        if todo:
            got = self._embed_texts(texts, stats)
            if got.shape[1] == dim:
                txt[todo] = got
        return txt

    # -- the decision over a batch of training samples -------------------------------------------------
    def leaks_of(self, recs: list[dict], index: LeakIndex, stats: dict | None = None) -> dict[str, str]:
        """Training sample id -> the evaluation item it leaks (the smallest id when several
        match), for a batch of live rows, under `rule` (plus the text rule with `text`). Under
        keye_posttrain a row carrying kept embeddings (KEPT_IMAGES, KEPT_TEXT, KEPT_TEXT_HASH)
        is not embedded again; `stats` (when given) counts what was reused and embedded."""
        stats = {} if stats is None else stats
        stats["samples"] = stats.get("samples", 0) + len(recs)
        hits: set[tuple[int, int]] = set()
        if self.text:
            hits |= text_hits(self, [all_text(r) for r in recs], index)
        owner, where, hashes, media = [], [], [], []
        for s, r in enumerate(recs):
            for j, m in enumerate(r.get("media") or []):
                if m["kind"] == "image" and (m.get("phash") or self.rule == "keye_posttrain"):
                    owner.append(s)
                    where.append(j)
                    hashes.append((m.get("phash") or [0])[0])
                    media.append(m)
        if media and len(index.image_item):
            if self.rule == "keye_pretrain":
                b, r = self.image_lsh_params()
                found = pretrain_image_hits(hashes, index, self.jaccard, b, r, self.num_perm)
                hits |= {(owner[q], e) for q, e in found}
            elif self.rule == "hamming":
                hits |= {(owner[q], e) for q, e in hamming_image_hits(hashes, index, self.image_hamming)}
            else:
                emb, ok = self._image_embeddings(recs, owner, where, media, index, stats)
                keep = np.flatnonzero(ok)
                txt = self._text_embeddings(recs, sorted({owner[i] for i in keep}), emb.shape[1], stats)
                hits |= posttrain_hits(emb[keep], np.array(owner)[keep], txt, index, self.image_cosine,
                                       self.text_cosine)
        out: dict[str, str] = {}
        for s, e in hits:
            sid, ev = recs[s]["id"], index.eval_ids[e]
            out[sid] = min(out.get(sid, ev), ev)
        return out
