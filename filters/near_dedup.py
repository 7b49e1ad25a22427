"""Near-duplicate removal: MinHash LSH for text, bit-sampling LSH over pHashes for images and
videos, connected components, one sample kept per cluster.

Text: signatures (`curation.minhash`) over normalised word n-grams, cut into the bands
datasketch picks for `threshold - candidate_margin` (a pair just above the threshold
shares a band with probability ~0.5 under the threshold's own parameters; the margin makes
that > 0.95); samples sharing a band are candidates, and a candidate pair is kept as an
edge only when the exact Jaccard of its shingle sets reaches the threshold, so the extra
candidates cost a comparison, never precision.
Images: 64-bit pHashes; a band is a fixed random sample of `image_band_bits` of the
64 bits (bit-sampling LSH for Hamming distance), and a band key is the pHash masked to those
bits. A pair d bits apart shares a given band with probability p_d = C(64-d, k) / C(64, k);
`image_bands` (default: derived) is the least L with 1 - (1 - p_r)^L >= `image_recall`
(0.995) at r = `image_hamming` (10). `image_band_bits: auto` (the default) sizes the bands
for the corpus (`fit_image_bands`: k = ceil(log2 N) clamped to 12..24, so a random bucket
holds <= 1 other hash on average): 49 bands of 12 bits for a few thousand images, 321 of 20
at 1M, 945 bands of 24 bits from 8M images to 1e8. Why so many and so wide at scale
(benchmarks/bench_image_lsh.py measures it at 1M and 10M hashes): a random pHash lands in a
k-bit bucket with N / 2^k others, so candidates per image are L * N / 2^k plus its true
neighbours; 24 bits keep that at ~0.6 at 1M, ~560 at 10M and ~5,600 at 1e8 (buckets of ~6
random hashes at 1e8, under `max_bucket`), where the former 24 bands of 12 bits made buckets
of N / 4096 (24,000 at 1e8, far over `max_bucket`, so they fell back to star edges) and
found a pair 10 bits apart with probability 0.93 only. Exact multi-index hashing (disjoint
chunks, substitution search within floor(r/m) bits per chunk) finds every pair, but at
r = 10 its chunks are too narrow: 4 chunks of 16 bits probe 137 neighbours each, ~0.0084 * N
candidates per image (84,000 at 10M). An edge still needs Hamming distance <= `image_hamming`,
so the bands change which pairs are looked at, never what is decided.
Videos: the pHashes of their sampled frames; candidates share a band of any of their first
`video_probe_frames` frames, and an edge needs most frames to match in order (the longest
common subsequence of matching frames covers `video_match` of the shorter video).

Clusters are the connected components of the edges, and the sample kept is the best by a
documented, deterministic rule: highest score `quality`, then the longest text, then the
smallest id (`rank_key`). Every other member is dropped as `near_duplicate` with `dup_of`
naming the kept sample.

Everything that decides is here, in plain functions and methods over rows: the band keys of
a batch (`NearDedup.key_rows`), the check of a candidate pair (`NearDedup.is_edge`), the keep
rule (`rank_key`, `kept_of`) and, for small lists, the clusters (`components`). The engine
(`jobs.shuffles`) does the corpus-scale part on Spark: buckets, candidate pairs, connected
components (Large-Star/Small-Star, `jobs.components`), the smallest rank per cluster.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Callable, Iterable

import numpy as np

from reelforge.curation.schema import all_text, get_score
from reelforge.curation.step import Step, register_step

_BITS_SEED = 20240701
_MASK64 = (1 << 64) - 1


def bit_bands(n_bands: int = 24, bits: int = 12, seed: int = _BITS_SEED) -> np.ndarray:
    """Fixed random bit positions per band (n_bands x bits), the same on every executor."""
    rng = np.random.RandomState(seed)
    return np.stack([rng.choice(64, size=bits, replace=False) for _ in range(n_bands)])


AUTO_BITS_MIN, AUTO_BITS_MAX = 12, 24  # image_band_bits: auto, from a few thousand to 10^8 images


def image_band_count(hamming: int = 10, bits: int = 24, recall: float = 0.995) -> int:
    """The least number of random `bits`-bit bands for which a pair `hamming` bits apart shares
    at least one with probability >= `recall` (p = C(64 - hamming, bits) / C(64, bits) a band)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"image_band_bits must be in [1, 64], got {bits}")
    if not 0 < recall < 1:
        raise ValueError(f"image_recall must be in (0, 1), got {recall}")
    p = math.comb(64 - hamming, bits) / math.comb(64, bits) if hamming <= 64 - bits else 0.0
    if p <= 0:
        raise ValueError(f"no {bits}-bit band can avoid {hamming} differing bits of 64: lower image_band_bits")
    if p >= 1:
        return 1
    return max(1, math.ceil(math.log(1 - recall) / math.log(1 - p)))


def band_masks(bands: np.ndarray) -> np.ndarray:
    """uint64 masks, one per band of bit positions (bit i of the mask is position i, the least
    significant bit being position 0)."""
    one = np.uint64(1)
    return np.array([np.bitwise_or.reduce(one << np.asarray(b, dtype=np.uint64)) for b in bands], dtype=np.uint64)


def image_band_keys(hashes, masks: np.ndarray) -> np.ndarray:
    """uint64 (N, bands): each pHash masked to each band's bits; two hashes share band i iff
    their keys in column i are equal (the same partition as `phash_band_keys`, without the
    packing). Signed longs (as Arrow gives them) and unsigned ints give the same keys."""
    h = np.array([int(x) & _MASK64 for x in (hashes if isinstance(hashes, (list, tuple, np.ndarray)) else [hashes])],
                 dtype=np.uint64)
    return h[:, None] & masks[None, :]


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


# -- the keep rule ------------------------------------------------------------------------------

def text_length(row: dict) -> int:
    """Characters of `text` plus those of every message's content (a message without content
    makes the messages count 0, as the engine's former Spark expression did)."""
    n = len(row.get("text") or "")
    msgs = row.get("messages") or []
    if all(m is not None and m.get("content") is not None for m in msgs):
        n += sum(len(m["content"]) for m in msgs)
    return n


def _desc_float(q: float) -> int:
    """An unsigned 64-bit key that sorts floats in descending order (NaN first, as Spark's
    descending sort puts it; -0.0 equal to 0.0)."""
    if math.isnan(q):
        q = math.nan
    q = q + 0.0  # -0.0 -> 0.0
    (bits,) = struct.unpack(">Q", struct.pack(">d", q))
    asc = (bits ^ _MASK64) if bits >> 63 else (bits | (1 << 63))
    if math.isnan(q):
        asc = _MASK64
    return _MASK64 - asc


def rank_key(row: dict) -> str:
    """A string whose smallest value in a cluster names the sample kept: highest score
    `quality` (missing = -inf), then the longest text, then the smallest id. Fixed-width hex
    for the first two, so Spark's min over strings and Python's min agree."""
    q = get_score(row, "quality")
    q = -math.inf if q is None else float(q)
    return f"{_desc_float(q):016x}{_MASK64 - text_length(row):016x}{row['id']}"


RANK_PREFIX = 32  # hex characters before the id in a rank key


def kept_of(rows: list[dict]) -> str:
    """The id of the sample a cluster keeps."""
    return min(rank_key(r) for r in rows)[RANK_PREFIX:]


def components(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Connected components of a small edge list: node -> the smallest id of its component
    (what the engine's Large-Star/Small-Star answers at corpus scale). Self loops are no edge."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        if a == b:
            continue
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def near_duplicates(rows: list[dict], edges: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(id, kept id) for every member of a cluster but the kept one, on a list of live rows."""
    by_id = {r["id"]: r for r in rows}
    clusters: dict[str, list[dict]] = {}
    for node, comp in components(edges).items():
        clusters.setdefault(comp, []).append(by_id[node])
    out = []
    for members in clusters.values():
        keep = kept_of(members)
        out += [(r["id"], keep) for r in members if r["id"] != keep]
    return sorted(out)


def candidate_pairs(key_rows: Iterable[dict], max_bucket: int = 64, across: Callable[[str], bool] | None = None
                    ) -> set[tuple[str, str, str]]:
    """(space, a, b) with a < b for ids sharing a bucket (space, key); a bucket of more than
    `max_bucket` ids links each member to its smallest id only. With `across`, only pairs whose
    ends differ in across(id) (leakage: training sample vs evaluation item). The engine's
    buckets, on a list."""
    buckets: dict[tuple[str, str], set[str]] = {}
    for k in key_rows:
        buckets.setdefault((k["space"], k["key"]), set()).add(k["id"])
    pairs = set()
    for (space, _), ids in buckets.items():
        if len(ids) < 2:
            continue
        srt = sorted(ids)
        if len(srt) <= max_bucket:
            pairs |= {(space, a, b) for i, a in enumerate(srt) for b in srt[i + 1:]}
        else:
            pairs |= {(space, srt[0], b) for b in srt[1:]}
    if across is not None:
        pairs = {p for p in pairs if across(p[1]) != across(p[2])}
    return pairs


@register_step("dedup_near")
class NearDedup(Step):
    shuffle = "dedup_near"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, unit: str = "word",
                 seed: int = 1, text_kinds: list[str] | None = None, image_kinds: list[str] | None = None,
                 image_hamming: int = 10, video_match: float = 0.5, video_probe_frames: int = 8,
                 max_bucket: int = 64, candidate_margin: float = 0.15, image_bands: int | None = None,
                 image_band_bits: int | str = "auto", image_recall: float = 0.995, **kw: Any):
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
        self.image_recall = float(image_recall)
        self.image_bands_given = None if image_bands is None else int(image_bands)
        self.image_band_bits_auto = image_band_bits == "auto"
        if not self.image_band_bits_auto and (isinstance(image_band_bits, bool)
                                              or not isinstance(image_band_bits, int)):
            raise ValueError(f"image_band_bits must be a number of bits or auto, got {image_band_bits!r}")
        # until the engine sizes them for the corpus (fit_image_bands), auto means the 10^8 layout
        self._set_image_bands(AUTO_BITS_MAX if self.image_band_bits_auto else int(image_band_bits))

    def _set_image_bands(self, bits: int) -> None:
        self.image_band_bits = int(bits)
        derived = image_band_count(self.image_hamming, self.image_band_bits, self.image_recall)
        self.image_bands = derived if self.image_bands_given is None else self.image_bands_given
        if self.image_bands < 1:
            raise ValueError(f"image_bands must be at least 1 (or left out: {derived} for image_recall "
                             f"{self.image_recall} at Hamming {self.image_hamming}), got {self.image_bands}")

    def fit_image_bands(self, n_images: int) -> None:
        """`image_band_bits: auto`: the band width for a corpus of about `n_images` hashes.
        A random hash shares a k-bit bucket with N / 2^k others, so k = ceil(log2 N) keeps the
        expected random bucket at <= 1 whatever N (candidates per image ~ L * N / 2^k <= L), and
        a small corpus gets narrow bands, so few of them (`image_band_count`): 12 bits and 38
        bands up to 4k images, 24 bits and 945 bands from 8M on. Decisions do not depend on it."""
        if self.image_band_bits_auto:
            bits = math.ceil(math.log2(max(2, int(n_images))))
            self._set_image_bands(min(AUTO_BITS_MAX, max(AUTO_BITS_MIN, bits)))

    def image_masks(self) -> np.ndarray:
        """The image bands as uint64 masks: `image_bands` fixed random samples of
        `image_band_bits` bits (`bit_bands`, the same on every executor)."""
        key = (self.image_bands, self.image_band_bits)
        if getattr(self, "_masks", (None,))[0] != key:
            self._masks = (key, band_masks(bit_bands(self.image_bands, self.image_band_bits)))
        return self._masks[1]

    # -- candidates ---------------------------------------------------------------------------
    def key_rows(self, recs: list[dict], every_image: bool = False) -> list[dict]:
        """(id, space, key, payload) rows for a batch of samples: one per LSH band a sample falls
        in; `space` is t (text), i (image) or v (video); the payload verifies an edge (pHashes).
        With `every_image` (leakage) every image of every sample gets keys, as "<id>|<index>",
        and every sample's text is keyed whatever its kind."""
        out = self._text_keys(recs, every_image)
        ids, spaces, payloads, own, band, vals = self._media_keys(recs, every_image)
        for o, b, v in zip(own.tolist(), band.tolist(), vals.tolist()):
            out.append({"id": ids[o], "space": spaces[o], "key": f"{b}:{v}", "payload": payloads[o]})
        return out

    def key_table(self, recs: list[dict], every_image: bool = False):
        """`key_rows` as an Arrow table (id, space, key, payload: list<int64>), built column-wise
        (the engine's path: ~945 image keys per image), with the payload on the first row of each
        (id, space) only and null on the others (the verification reads it once per node)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        text = self._text_key_table(recs, every_image)
        ids, spaces, payloads, own, band, vals = self._media_keys(recs, every_image)
        own_a = pa.array(own, type=pa.int64())
        first = np.ones(len(own), dtype=bool)
        first[1:] = own[1:] != own[:-1]
        keys = pc.binary_join_element_wise(pc.cast(pa.array(band), pa.string()),
                                           pc.cast(pa.array(vals, type=pa.uint64()), pa.string()), ":")
        payload = pa.array(payloads, type=pa.list_(pa.int64())).take(own_a) if ids else \
            pa.array([], type=pa.list_(pa.int64()))
        payload = pc.if_else(pa.array(first), payload, pa.scalar(None, pa.list_(pa.int64())))
        media = pa.table({"id": pa.array(ids, pa.string()).take(own_a), "space": pa.array(spaces, pa.string())
                          .take(own_a), "key": keys, "payload": payload})
        if text is None:
            return media
        return pa.concat_tables([text.cast(media.schema), media])

    def _text_band_keys(self, recs: list[dict], every_image: bool) -> tuple[list[str], np.ndarray]:
        """The texts' LSH band keys: (ids of the texts with shingles, int64 (texts, bands) band
        hashes); a text without shingles gets none (all-max signatures would share one giant
        bucket)."""
        from reelforge.curation.minhash import band_hashes, is_empty, lsh_params, signatures

        texts = [(r["id"], all_text(r)) for r in recs if every_image or r["kind"] in self.text_kinds]
        if not texts:
            return [], np.zeros((0, 0), dtype=np.int64)
        bands, rows = lsh_params(max(0.05, self.threshold - self.candidate_margin), self.num_perm)
        sigs = signatures([t for _, t in texts], num_perm=self.num_perm, n=self.ngram,
                          unit=self.unit, seed=self.seed)
        keep = ~is_empty(sigs)
        return [sid for (sid, _), k in zip(texts, keep) if k], band_hashes(sigs[keep], bands, rows)

    def _text_keys(self, recs: list[dict], every_image: bool) -> list[dict]:
        ids, hb = self._text_band_keys(recs, every_image)
        return [{"id": sid, "space": "t", "key": f"{i}:{int(h)}", "payload": None}
                for sid, hs in zip(ids, hb) for i, h in enumerate(hs)]

    def _text_key_table(self, recs: list[dict], every_image: bool):
        """`_text_keys` as an Arrow table, column-wise (None when there is none): the same
        "<band>:<signed band hash>" keys, text by text, band by band."""
        import pyarrow as pa
        import pyarrow.compute as pc

        ids, hb = self._text_band_keys(recs, every_image)
        if not ids:
            return None
        n, bands = hb.shape
        band = pc.cast(pa.array(np.tile(np.arange(bands, dtype=np.int64), n)), pa.string())
        keys = pc.binary_join_element_wise(band, pc.cast(pa.array(hb.ravel()), pa.string()), ":")
        return pa.table({"id": pa.array(ids, pa.string()).take(pa.array(np.repeat(np.arange(n), bands))),
                         "space": pa.array(["t"] * (n * bands), pa.string()), "key": keys,
                         "payload": pa.nulls(n * bands, pa.list_(pa.int64()))})

    def _media_keys(self, recs: list[dict], every_image: bool):
        """The image and video band keys of a batch, column-wise: (node ids, their spaces, their
        payloads, and per key its node's index, band and masked pHash), in node order, one row
        per distinct (node, band, value): a video's probe frames that share a band value give
        one key."""
        ids: list[str] = []
        spaces: list[str] = []
        payloads: list[list[int]] = []
        owner: list[int] = []
        hashes: list[int] = []
        for r in recs:
            media = r.get("media") or []
            if every_image:
                for j, m in enumerate(media):
                    if m["kind"] == "image" and m.get("phash"):
                        owner.append(len(ids))
                        hashes.append(m["phash"][0])
                        ids.append(f"{r['id']}|{j}")
                        spaces.append("i")
                        payloads.append(list(m["phash"][:1]))
                continue
            if r["kind"] not in self.image_kinds or len(media) != 1 or not media[0].get("phash"):
                continue
            frames = list(media[0]["phash"])
            space = "i" if media[0]["kind"] == "image" else "v"
            for h in frames[: self.video_probe_frames] if space == "v" else frames[:1]:
                owner.append(len(ids))
                hashes.append(h)
            ids.append(r["id"])
            spaces.append(space)
            payloads.append(frames)
        masks = self.image_masks()
        n_bands = len(masks)
        owner_a = np.array(owner, dtype=np.int64)
        hv = np.array([h & _MASK64 for h in hashes], dtype=np.uint64)
        vals = hv[:, None] & masks[None, :]  # (frames, bands)
        band = np.broadcast_to(np.arange(n_bands, dtype=np.int64), vals.shape)
        own = np.broadcast_to(owner_a[:, None], vals.shape)
        keep = np.ones(vals.shape, dtype=bool)
        multi = np.flatnonzero(np.diff(owner_a) == 0)  # frames after the first of their video
        if len(multi):  # a value a band already gave for an earlier frame of the same video is no new key
            starts = np.flatnonzero(np.r_[True, np.diff(owner_a) != 0])
            for a, b in zip(starts, np.r_[starts[1:], len(owner_a)]):
                if b - a > 1:
                    block = vals[a:b]
                    for f in range(1, b - a):
                        keep[a + f] = (block[:f] != block[f]).all(axis=0)
        return ids, spaces, payloads, own[keep], band[keep], vals[keep]

    # -- verification -------------------------------------------------------------------------
    def exact_jaccard(self, a: str, b: str) -> float:
        from reelforge.curation.minhash import shingles

        sa, sb = set(shingles(a, self.ngram, self.unit)), set(shingles(b, self.ngram, self.unit))
        return len(sa & sb) / len(sa | sb) if sa and sb else 0.0

    def is_edge(self, space: str, payload_a: list[int] | None, payload_b: list[int] | None,
                row_a: dict | None = None, row_b: dict | None = None) -> bool:
        """Whether a candidate pair (sharing a band in `space`) is a near-duplicate: the exact
        Jaccard of the texts' shingles, the Hamming distance of two images' pHashes, or the
        ordered frame match of two videos."""
        if space == "t":
            return self.exact_jaccard(all_text(row_a), all_text(row_b)) >= self.threshold
        if space == "i":
            return hamming(payload_a[0], payload_b[0]) <= self.image_hamming
        return ordered_match(payload_a, payload_b, self.image_hamming) >= self.video_match

    def edges(self, rows: list[dict], every_image: bool = False,
              across: Callable[[str], bool] | None = None) -> list[tuple[str, str]]:
        """The verified edges among a small list of rows, in plain Python: what the engine
        finds at corpus scale (keys, buckets, candidate pairs, `is_edge`)."""
        keys = self.key_rows(rows, every_image)
        payload = {(k["id"], k["space"]): k["payload"] for k in reversed(keys)}
        by_id = {r["id"]: r for r in rows}
        return sorted((a, b) for space, a, b in candidate_pairs(keys, self.max_bucket, across)
                      if self.is_edge(space, payload[(a, space)], payload[(b, space)],
                                      by_id.get(a.split("|")[0]), by_id.get(b.split("|")[0])))
