"""Semantic deduplication (SemDeDup, as NeMo Curator describes it): samples whose CLIP embeddings
are almost parallel are duplicates, whatever their bytes or pixels look like (re-edited short
videos, re-crops, re-encodes that defeat perceptual hashes).

1. One embedding per sample: the image embedding of its first medium (`embedding: image`) or
   its text embedding (`embedding: text`), L2-normalised, rounded to float16. They come from
   the CLIP step named `from_step` (run with `keep_embeddings: true`, `filters.embeddings`),
   or, without `from_step`, from the step's own open_clip model fields (`model`, `pretrained`,
   `model_config`, loaded with `filters.clip_score.load_scorer` in the executors). A sample
   `from_step` did not embed (a text-only sample in text mode) is embedded with the model
   recorded beside the kept embeddings, so one run never mixes two models.
2. k-means into `k` clusters (default round(sqrt(n)), at most 1000 = NeMo Curator's default
   `n_clusters`), seeded by `seed`, at most `max_iter` iterations (20, Spark ML's default; NeMo
   runs 100 on a GPU): Spark ML's KMeans in the engine (`jobs.semantic`; on 2 cores 100k x 512
   random vectors, k 316, 20 iterations took 406 s against 23 s for plain numpy Lloyd
   iterations, `benchmarks/bench_semantic_kmeans.py`), `kmeans` below for small lists. Only
   whether two near-copies share a cluster matters here, not how good the clusters are.
3. Within each cluster, every pair with cosine > 1 - `eps` is a duplicate edge (NeMo Curator's
   documented default `eps_to_extract: 0.01`, i.e. cosine > 0.99).
4. Duplicates form clusters (connected components of the edges, inside one k-means cluster),
   and each keeps one sample by the keep rule of `dedup_near` (`filters.near_dedup.rank_key`:
   highest `quality` score, then the longest text, then the smallest id). Every other member
   leaves as `semantic_duplicate` with `dup_of` naming the kept sample (NeMo keeps by distance
   to the centroid; here the keep rule is the one every dedup step of this project uses).

The run report shows, for each eps of `report_eps` (and `eps`), how many pairs and drops that
eps would give, computed from the same pairs in the same pass, so a team can choose.

Everything that decides is here, in plain functions over numpy arrays: `cluster_pairs`,
`components`, `cluster_decisions` (one k-means cluster), `kmeans` and `semantic_duplicates`
(a whole small list). The engine runs `cluster_decisions` per k-means cluster in the executors:
a cluster's embeddings must fit one executor's memory (members x dim x 4 bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import numpy as np

from reelforge.curation.step import Step, StepContext, register_step
from reelforge.filters.embeddings import from_bytes, medium_embeddings, model_tag, normalise, to_bytes
from reelforge.filters.near_dedup import RANK_PREFIX

DEFAULT_EPS = 0.01  # NeMo Curator's documented eps_to_extract
REPORT_EPS = (0.001, 0.005, 0.01, 0.05, 0.1)
MAX_DEFAULT_K = 1000  # NeMo Curator's default n_clusters
REASON = "semantic_duplicate"


def default_k(n: int) -> int:
    """Clusters for n embeddings: round(sqrt(n)), at least 1, at most 1000. The within-cluster
    pairs cost ~n^2/k and a k-means iteration ~n*k: sqrt(n) balances the two."""
    return max(1, min(MAX_DEFAULT_K, int(round(math.sqrt(max(n, 1))))))


def cluster_pairs(vecs: np.ndarray, min_cos: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows of `vecs` (unit vectors) with cosine > min_cos: (i, j, cosine)
    as arrays, computed by blocks of `block` rows (memory block x n)."""
    v = np.ascontiguousarray(vecs, dtype=np.float32)
    ii, jj, cc = [], [], []
    for a in range(0, len(v), block):
        s = v[a:a + block] @ v[a:].T  # rows a.., columns a..: the upper triangle lies here
        r, c = np.nonzero(s > min_cos)
        keep = c > r  # column index is relative to a, like the row index
        r, c = r[keep], c[keep]
        ii.append(r + a)
        jj.append(c + a)
        cc.append(s[r, c])
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64), np.concatenate(cc)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n nodes and edges (a[e], b[e]): each node's component label,
    the smallest node index of its component (roots hook to the smaller root, vectorised)."""
    parent = np.arange(n)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while True:
        while True:  # full path compression
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        ra, rb = parent[a], parent[b]
        diff = ra != rb
        if not diff.any():
            return parent
        lo, hi = np.minimum(ra[diff], rb[diff]), np.maximum(ra[diff], rb[diff])
        np.minimum.at(parent, hi, lo)


def cluster_decisions(ranks: list[str], vecs: np.ndarray, eps: float, table_eps: tuple[float, ...] = ()
                      ) -> tuple[list[tuple[str, str, float]], dict[float, tuple[int, int]]]:
    """One k-means cluster: `ranks` are the members' `rank_key`s (the id follows RANK_PREFIX
    characters), `vecs` their unit embeddings, in any order. Returns
    - the drops at `eps`: (id, kept id, cosine of the two), sorted by id;
    - for each eps of `table_eps` and `eps`: (pairs with cosine > 1 - that eps, drops it gives).
    The pairs are computed once, at the largest eps."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i][RANK_PREFIX:])  # the same on any machine
    ranks = [ranks[i] for i in order]
    v = np.asarray(vecs, dtype=np.float32)[order]
    all_eps = sorted({float(e) for e in (*table_eps, eps)})
    a, b, c = cluster_pairs(v, 1.0 - max(all_eps)) if len(ranks) > 1 else (np.zeros(0, int),) * 3
    table: dict[float, tuple[int, int]] = {}
    drops: list[tuple[str, str, float]] = []
    for e in all_eps:
        sel = c > 1.0 - e
        labels = components(len(ranks), a[sel], b[sel])
        n_drop = int(len(ranks) - len(np.unique(labels)))
        table[e] = (int(sel.sum()), n_drop)
        if e == float(eps) and n_drop:
            best: dict[int, int] = {}
            for i, lab in enumerate(labels):
                if lab not in best or ranks[i] < ranks[best[lab]]:
                    best[lab] = i
            for i, lab in enumerate(labels):
                k = best[lab]
                if k != i:
                    drops.append((ranks[i][RANK_PREFIX:], ranks[k][RANK_PREFIX:], float(v[i] @ v[k])))
    return sorted(drops), table


def kmeans(vecs: np.ndarray, k: int, seed: int = 0, max_iter: int = 20) -> np.ndarray:
    """Cluster labels of the rows of `vecs`: k-means++ seeding from `seed`, then Lloyd iterations
    until no label changes (at most `max_iter`). Deterministic for a seed; for small lists and
    tests (the engine runs Spark ML's KMeans)."""
    x = np.asarray(vecs, dtype=np.float64)
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(n)]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centers.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    c = np.stack(centers)
    labels = np.full(n, -1)
    sq = (x * x).sum(1)
    for _ in range(max_iter):
        new = np.concatenate([(sq[s:s + 8192, None] - 2 * x[s:s + 8192] @ c.T + (c * c).sum(1)).argmin(1)
                              for s in range(0, n, 8192)])
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            m = labels == j
            if m.any():
                c[j] = x[m].mean(0)
    return labels


def semantic_duplicates(ranks: list[str], vecs: np.ndarray, eps: float = DEFAULT_EPS, k: int = 0, seed: int = 0,
                        max_iter: int = 20, table_eps: tuple[float, ...] = REPORT_EPS,
                        labels: np.ndarray | None = None
                        ) -> tuple[list[tuple[str, str, float]], dict[float, tuple[int, int]]]:
    """The whole decision on a small list: k-means (`kmeans`, or the given `labels`), then
    `cluster_decisions` in each cluster. Returns (drops (id, kept id, cosine), sorted by id;
    {eps: (pairs, drops)} summed over the clusters)."""
    v = np.asarray(vecs, dtype=np.float32)
    if labels is None:
        labels = kmeans(v, k or default_k(len(ranks)), seed, max_iter)
    drops: list[tuple[str, str, float]] = []
    table: dict[float, list[int]] = {}
    for lab in np.unique(labels):
        idx = np.nonzero(labels == lab)[0]
        d, t = cluster_decisions([ranks[i] for i in idx], v[idx], eps, table_eps)
        drops += d
        for e, (p, n) in t.items():
            acc = table.setdefault(e, [0, 0])
            acc[0] += p
            acc[1] += n
    return sorted(drops), {e: (p, n) for e, (p, n) in sorted(table.items())}


def drop_detail(kept: str, cos: float, eps: float) -> str:
    """The ledger's detail of a drop (the engine writes the same with Spark's format_string)."""
    return f"semantic duplicate of {kept} (cosine {cos:.4f} > {1 - eps:g})"


@register_step("dedup_semantic")
class SemanticDedup(Step):
    """See the module docstring. The engine side is `jobs.semantic.dedup_semantic`."""

    shuffle = "dedup_semantic"
    batch_rows = 64

    def __init__(self, eps: float = DEFAULT_EPS, k: int = 0, embedding: str = "image", from_step: str = "",
                 seed: int = 0, max_iter: int = 20, report_eps: list[float] | None = None,
                 model: str = "", pretrained: str = "", model_config: str = "", device: str = "auto",
                 batch_size: int = 64, video_frames: int = 8, conversation_text: str = "assistant", **kw: Any):
        super().__init__(**kw)
        if not 0 < float(eps) < 1:
            raise ValueError(f"eps must be in (0, 1) (pairs with cosine > 1 - eps are duplicates), got {eps!r}")
        if embedding not in ("image", "text"):
            raise ValueError(f"embedding must be image or text, got {embedding!r}")
        if conversation_text not in ("assistant", "user", "all"):
            raise ValueError("conversation_text must be assistant, user or all")
        report_eps = list(REPORT_EPS if report_eps is None else report_eps)
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e < 1 for e in report_eps):
            raise ValueError(f"report_eps must be a list of numbers in (0, 1), got {report_eps!r}")
        if not from_step and not model:
            raise ValueError("name the CLIP step whose kept embeddings to reuse (`from_step: clip`, run with "
                             "keep_embeddings: true) or the open_clip `model` to embed with")
        if not isinstance(from_step, str) or (from_step and not from_step.isidentifier()):
            raise ValueError(f"from_step must be the name of a step, such as clip, got {from_step!r}")
        self.eps = float(eps)
        self.k = int(k)
        self.embedding = embedding
        self.from_step = from_step
        self.seed = int(seed)
        self.max_iter = max(1, int(max_iter))
        self.report_eps = tuple(sorted({float(e) for e in report_eps}))
        self.model, self.pretrained, self.model_config = model, pretrained, model_config
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.video_frames = int(video_frames)
        self.conversation_text = conversation_text
        self._fields = json.dumps({k: getattr(self, k) for k in (
            "eps", "k", "embedding", "from_step", "seed", "max_iter", "report_eps", "model", "pretrained",
            "model_config", "video_frames", "conversation_text")}, sort_keys=True)  # as the recipe gave them
        if model:
            from reelforge.filters.clip_score import check_clip_model

            check_clip_model(model, pretrained, model_config)

    # -- the run's files ----------------------------------------------------------------------
    def report_name(self) -> str:
        """The file (under `_work/semantic/`) holding this step's report section: named by its
        recipe fields, so two such steps in a recipe keep apart."""
        return f"{self.name}-{hashlib.sha256(self._fields.encode()).hexdigest()[:12]}.json"

    def report_path(self, workdir: str) -> str:
        return os.path.join(workdir, "semantic", self.report_name())

    def table_eps(self) -> tuple[float, ...]:
        return tuple(sorted({*self.report_eps, self.eps}))

    def use_model(self, tag: str) -> None:
        """Embed what `from_step` did not with the model that made its embeddings."""
        from reelforge.filters.embeddings import model_fields

        f = model_fields(tag)
        if self.model and model_tag(self.model, self.pretrained, self.model_config) != tag:
            raise ValueError(f"dedup_semantic names the model {self.model!r} but the embeddings of step "
                             f"{self.from_step!r} were made by {f['model']!r} ({f['pretrained']}): cosines of two "
                             "models do not compare; drop `model` or `from_step`")
        self.model, self.pretrained, self.model_config = f["model"], f["pretrained"], f["model_config"]

    # -- embeddings in the executors ----------------------------------------------------------
    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        self._scorer = None

    def _load(self):
        if getattr(self, "_scorer", None) is None:
            from reelforge.curation.vlm import resolve_device
            from reelforge.filters.clip_score import load_scorer

            gpus = self.context.gpus if getattr(self, "context", None) is not None else ()
            self._scorer = load_scorer(self.model, self.pretrained or None, self.model_config or None,
                                       resolve_device(self.device, gpus))
        return self._scorer

    def embeddable(self, row: dict) -> bool:
        """Whether the row has what this step embeds: a medium, or some text."""
        if self.embedding == "image":
            return bool(row.get("media"))
        from reelforge.filters.clip_score import caption_of

        return bool(caption_of(row, self.conversation_text))

    def embed_rows(self, rows: list[dict]) -> list[bytes | None]:
        """float16 bytes of each row's embedding (None: nothing to embed, or its media would not
        decode): the first medium's image embedding, or the text embedding; the same values
        a CLIP step with the same model keeps (`filters.embeddings`)."""
        out: list[bytes | None] = [None] * len(rows)
        todo = [i for i, r in enumerate(rows) if self.embeddable(r)]
        if not todo:
            return out
        sc = self._load()
        if self.embedding == "text":
            from reelforge.filters.clip_score import caption_of

            for s in range(0, len(todo), self.batch_size):
                part = todo[s:s + self.batch_size]
                emb = sc.embed_texts([caption_of(rows[i], self.conversation_text) for i in part])
                for i, e in zip(part, emb):
                    out[i] = to_bytes(e)
            return out
        from reelforge.curation.media_io import decode_visual

        for i in todo:
            try:
                frames = decode_visual(rows[i]["media"][0], self.video_frames)
            except Exception:  # noqa: BLE001 - a medium that will not decode is not embedded, not a failed task
                continue
            pixels = sc.torch.stack([sc.preprocess(im) for im in frames])
            emb = np.concatenate([sc.embed_pixels(pixels[s:s + self.batch_size])
                                  for s in range(0, len(pixels), self.batch_size)])
            out[i] = to_bytes(medium_embeddings(emb, [len(frames)])[0])
        return out

    def vectors(self, rows: list[dict], saved: list[bytes | None]) -> list[np.ndarray | None]:
        """Each row's unit embedding (float32 of the float16 values): the saved bytes when given,
        else embedded here; None when the row has nothing to embed."""
        need = [i for i, (r, s) in enumerate(zip(rows, saved)) if s is None]
        made = self.embed_rows([rows[i] for i in need]) if need else []
        got = list(saved)
        for i, b in zip(need, made):
            got[i] = b
        return [None if b is None else normalise(from_bytes(b)) for b in got]
