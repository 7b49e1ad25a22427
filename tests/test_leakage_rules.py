"""The leakage rules (Keye-VL's pre- and post-training decontamination, and pHash Hamming) and
the new image bands of near dedup: decisions tested as plain functions in bulk, then one small
Spark run per Keye rule.

Acceptance measured here: for each rule >= 30 planted benchmark near-copies dropped and 0 of
1,000 unrelated samples; one leaked image drops a multi-image sample; text copies dropped.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from reelforge.curation.phash import phash_image
from reelforge.filters.leakage import (
    EVAL_PREFIX,
    LeakageFilter,
    LeakIndex,
    band_index,
    bitset_jaccard,
    bitset_signatures,
    posttrain_hits,
    pretrain_image_hits,
)
from reelforge.filters.near_dedup import NearDedup, bit_bands, hamming, image_band_count

M64 = (1 << 64) - 1


# --- synthetic media -----------------------------------------------------------------------------

def drawing(rng: random.Random, w: int = 128, h: int = 96) -> Image.Image:
    """A varied synthetic picture: a random two-axis colour gradient, 3-12 random shapes
    (rectangles, ellipses, thick lines, polygons) and, half the time, pixel noise."""
    a = np.linspace(0, 1, w)[None, :, None] * np.array([rng.random() for _ in range(3)])
    b = np.linspace(0, 1, h)[:, None, None] * np.array([rng.random() for _ in range(3)])
    flip = rng.choice([1, -1])
    g = np.broadcast_to((a[:, ::flip] + b) * 127, (h, w, 3)).astype(np.uint8)
    im = Image.fromarray(g.copy())
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(3, 12)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randint(6, w // 2), y0 + rng.randint(6, h // 2)
        c = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.choice(["rect", "ellipse", "line", "poly"])
        if kind == "rect":
            d.rectangle([x0, y0, x1, y1], fill=c)
        elif kind == "ellipse":
            d.ellipse([x0, y0, x1, y1], fill=c)
        elif kind == "line":
            d.line([x0, y0, x1, y1], fill=c, width=rng.randint(2, 10))
        else:
            d.polygon([(rng.randrange(w), rng.randrange(h)) for _ in range(rng.randint(3, 6))], fill=c)
    if rng.random() < 0.5:
        noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-30, 31, (h, w, 3))
        im = Image.fromarray(np.clip(np.asarray(im).astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return im


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def near_copies(im: Image.Image) -> dict[str, Image.Image]:
    """The planted benchmark copies: resized, re-encoded JPEG, both, and cropped by 4% of each side."""
    w, h = im.size
    cw, ch = max(1, int(w * 0.02)), max(1, int(h * 0.02))
    return {"resized": im.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BILINEAR),
            "jpeg": jpeg(im, 70),
            "resized_jpeg": jpeg(im.resize((w * 2, h * 2), Image.Resampling.BICUBIC), 85),
            "cropped": im.crop((cw, ch, w - cw, h - ch))}


KINDS = ("resized", "jpeg", "resized_jpeg", "cropped")


def ph(im: Image.Image) -> int:
    return phash_image(im)


def img_row(rid: str, hashes: list[int], text: str = "") -> dict:
    return {"id": rid, "kind": "image_text" if len(hashes) == 1 else "interleaved", "text": text, "messages": None,
            "chosen": None, "rejected": None, "drop_step": None,
            "media": [{"kind": "image", "phash": [h], "sha256": None} for h in hashes]}


def eval_row(set_name: str, key: int, hashes: list[int], text: str) -> dict:
    r = img_row(f"{EVAL_PREFIX}{set_name}:q.jsonl:{key}", hashes, text)
    return r


def leak_step(tmp_path, **kw) -> LeakageFilter:
    (tmp_path / "bench.jsonl").write_text("")
    return LeakageFilter(eval_sets=[{"name": "bench", "path": str(tmp_path / "bench.jsonl")}], **kw)


@pytest.fixture(scope="module")
def planted():
    """40 benchmark pictures, their 160 near-copies, 1,000 unrelated pictures, all pHashed."""
    rng = random.Random(14)
    bench = [drawing(rng) for _ in range(40)]
    copies = [(i, k, ph(v)) for i, im in enumerate(bench) for k, v in near_copies(im).items()]
    unrelated = [ph(drawing(rng)) for _ in range(1000)]
    return [ph(im) for im in bench], copies, unrelated


# --- recipe fields ---------------------------------------------------------------------------------

def test_rule_fields_default_to_keye_and_are_validated(tmp_path):
    s = leak_step(tmp_path)
    assert (s.rule, s.jaccard, s.image_cosine, s.text_cosine, s.text) == ("keye_pretrain", 0.95, 0.98, 0.5, True)
    with pytest.raises(ValueError, match="`rule` must be keye_pretrain"):
        leak_step(tmp_path, rule="keye")
    with pytest.raises(ValueError, match="`jaccard` must be in"):
        leak_step(tmp_path, jaccard=1.5)
    with pytest.raises(ValueError, match="`image_cosine` must be in"):
        leak_step(tmp_path, rule="hamming", image_cosine=2)
    with pytest.raises(ValueError, match="keye_posttrain needs `pretrained`"):
        leak_step(tmp_path, rule="keye_posttrain")
    with pytest.raises(ValueError, match="eval_sets"):
        LeakageFilter(eval_sets=[])
    with pytest.raises(ValueError, match="only rule keye_posttrain"):
        leak_step(tmp_path, rule="hamming", from_step="clip")
    with pytest.raises(ValueError, match="from_step must be the name of a step"):
        leak_step(tmp_path, from_step="no such step")


# --- keye_pretrain: bit-set MinHash, LSH, exact Jaccard ----------------------------------------------

def test_band_parameters_are_datasketchs_optimum():
    from datasketch import MinHashLSH

    s = LeakageFilter.__new__(LeakageFilter)
    s.jaccard, s.candidate_margin, s.num_perm = 0.95, 0.15, 128
    lsh = MinHashLSH(threshold=0.80, num_perm=128)
    assert s.image_lsh_params() == (lsh.b, lsh.r) == (9, 13)
    b, r = s.image_lsh_params()
    assert 1 - (1 - 0.951 ** r) ** b > 0.99  # the probability a pair just above 0.95 is a candidate


def _bitset(bits) -> int:
    return sum(1 << int(b) for b in bits)


def test_bitset_signatures_estimate_jaccard_like_datasketch():
    """A signature value agrees with probability = the Jaccard of the bit-sets (exact
    permutations of 64 positions); datasketch's MinHash over the same positions estimates the
    same Jaccard."""
    from datasketch import MinHash

    rng = random.Random(3)
    for _ in range(20):
        a = set(rng.sample(range(64), rng.randint(20, 40)))
        b = set(rng.sample(sorted(a), len(a) * 3 // 4)) | set(rng.sample(range(64), 8))
        exact = len(a & b) / len(a | b)
        assert abs(bitset_jaccard(_bitset(a), _bitset(b))[0] - exact) < 1e-12
        sig = bitset_signatures([_bitset(a), _bitset(b)], num_perm=512)
        ours = float((sig[0] == sig[1]).mean())
        ma, mb = MinHash(num_perm=512), MinHash(num_perm=512)
        ma.update_batch([str(x).encode() for x in a])
        mb.update_batch([str(x).encode() for x in b])
        assert abs(ours - exact) < 0.08 and abs(mb.jaccard(ma) - exact) < 0.08
    assert (bitset_signatures([0]) == 64).all()  # no 1-bit: the sentinel, never a real rank
    assert (bitset_signatures([-1]) == bitset_signatures([M64])).all()  # signed longs from Arrow


def _pretrain_index(hashes: list[int], items: list[int], num_perm: int = 128, bands: int = 9, rows: int = 13):
    from reelforge.curation.minhash import band_hashes

    h = np.array([x & M64 for x in hashes], dtype=np.uint64)
    return LeakIndex(eval_ids=[f"eval:b:{i}" for i in range(max(items) + 1)], image_item=np.array(items),
                     image_hash=h, image_index=band_index(band_hashes(bitset_signatures(h, num_perm), bands, rows)))


def test_pretrain_recall_of_pairs_just_above_the_threshold():
    """Planted bit-set pairs with Jaccard in (0.95, 0.97]: >= 99% found (LSH) and all verified;
    pairs at exactly 0.95 or below never leak (the exact Jaccard decides)."""
    rng = random.Random(5)
    evals, above, at = [], [], []
    for _ in range(1500):
        size = rng.choice([rng.randint(21, 33), rng.randint(40, 63)])
        a = set(rng.sample(range(64), size))
        if size <= 33:  # one position removed: J = (s-1)/s in (0.952, 0.97]
            b = a - {rng.choice(sorted(a))}
        else:  # one removed, one added: J = (s-1)/(s+1) in (0.951, 0.969]
            b = (a - {rng.choice(sorted(a))}) | {rng.choice(sorted(set(range(64)) - a))}
        assert 0.95 < len(a & b) / len(a | b) <= 0.97
        evals.append(_bitset(a))
        above.append(_bitset(b))
        c = set(rng.sample(range(64), 20))  # 19 of 20: J = 0.95 exactly, not above
        at.append((_bitset(c), _bitset(c - {min(c)})))
    index = _pretrain_index(evals, list(range(len(evals))))
    found = pretrain_image_hits(above, index, 0.95, 9, 13, 128)
    recall = len({(q, e) for q, e in found if q == e}) / len(above)
    print(f"keye_pretrain: recall {recall:.4f} on {len(above)} pairs with Jaccard in (0.95, 0.97]")
    assert recall >= 0.99
    assert all(bitset_jaccard(above[q], evals[e])[0] > 0.95 for q, e in found)  # every hit verified
    idx_at = _pretrain_index([a for a, _ in at], list(range(len(at))))
    assert pretrain_image_hits([b for _, b in at], idx_at, 0.95, 9, 13, 128) == set()
    assert pretrain_image_hits([b for _, b in at], idx_at, 0.94, 9, 13, 128)  # the same pairs under 0.94


def test_pretrain_rule_on_real_phashes_is_the_same_hash(planted):
    """A DCT pHash has 32 ones, so Jaccard > 0.95 means no differing bit: the rule keeps the
    report's definition, and this is what it amounts to."""
    bench, copies, unrelated = planted
    assert {bin(h & M64).count("1") for h in bench + unrelated} == {32}
    for d in (2, 4):
        assert (32 - d / 2) / (32 + d / 2) < 0.95
    h = bench[0] & M64
    flip2 = h ^ (1 << next(i for i in range(64) if h >> i & 1)) ^ (1 << next(i for i in range(64) if not h >> i & 1))
    assert hamming(h, flip2) == 2 and math.isclose(bitset_jaccard(h, flip2)[0], 31 / 33)


def _decide(step: LeakageFilter, ev_rows: list[dict], rows: list[dict]) -> dict[str, str]:
    return step.leaks_of(rows, step.build_index(ev_rows))


def test_pretrain_and_hamming_drop_planted_copies_and_no_unrelated(tmp_path, planted):
    bench, copies, unrelated = planted
    ev = [eval_row("bench", i, [h], f"what is drawn in picture {i}") for i, h in enumerate(bench)]
    rows = [img_row(f"c{i:02d}_{k}", [h], "a caption") for i, k, h in copies]
    rows += [img_row(f"u{j:04d}", [h], "another caption") for j, h in enumerate(unrelated)]
    results = {}
    for rule in ("keye_pretrain", "hamming"):
        got = _decide(leak_step(tmp_path, rule=rule), ev, rows)
        want = {}  # brute force: every sample image against every benchmark image
        for r in rows:
            h = r["media"][0]["phash"][0]
            for i, b in enumerate(bench):
                ok = bitset_jaccard(h, b)[0] > 0.95 if rule == "keye_pretrain" else hamming(h, b) <= 10
                if ok:
                    want[r["id"]] = min(want.get(r["id"], ev[i]["id"]), ev[i]["id"])
        assert got == want, rule
        dropped = {k: sum(1 for i, kk, _ in copies if kk == k and f"c{i:02d}_{k}" in got) for k in KINDS}
        results[rule] = dropped
        print(f"{rule}: dropped near-copies by kind {dropped} of 40 each; unrelated dropped "
              f"{sum(1 for k in got if k.startswith('u'))} of 1000")
        assert sum(1 for k in got if k.startswith("u")) == 0
        assert all(got[f"c{i:02d}_{k}"] == ev[i]["id"] for i, k, _ in copies if f"c{i:02d}_{k}" in got)
        assert sum(dropped.values()) >= 30
    # the Hamming rule finds every copy the Keye rule finds, and the crops the Keye rule misses
    assert all(results["hamming"][k] >= results["keye_pretrain"][k] for k in results["hamming"])
    assert results["hamming"]["cropped"] > results["keye_pretrain"]["cropped"]


def test_one_leaked_image_drops_the_multi_image_sample(tmp_path, planted):
    bench, copies, unrelated = planted
    ev = [eval_row("bench", i, [h], f"question {i}") for i, h in enumerate(bench)]
    leaked = next(h for i, k, h in copies if k == "resized" and h == bench[i])  # a copy with the same pHash
    multi = img_row("multi", unrelated[:3] + [leaked] + unrelated[3:5], "five pictures")
    clean = img_row("clean", unrelated[:3] + unrelated[3:5], "five pictures")
    for rule in ("keye_pretrain", "hamming"):
        got = _decide(leak_step(tmp_path, rule=rule), ev, [multi, clean])
        assert list(got) == ["multi"], rule


# --- the text rule -------------------------------------------------------------------------------

def _questions(n: int, offset: int = 0) -> list[str]:
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    return [" ".join(words[i:i + 40]) for i in range(offset, offset + 40 * n, 40)]


def test_text_copies_drop_and_unrelated_texts_do_not(tmp_path):
    from reelforge.curation.minhash import shingles

    qs = _questions(40)
    ev = [{"id": f"{EVAL_PREFIX}textbench:q.jsonl:{i}", "kind": "text", "text": q, "messages": None, "chosen": None,
           "rejected": None, "media": []} for i, q in enumerate(qs)]
    rows = [{"id": f"copy{i:02d}", "kind": "conversation", "text": None, "chosen": None, "rejected": None,
             "media": [], "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "A"}]}
            for i, q in enumerate(qs[:35])]
    rng = random.Random(9)
    vocab = [f"w{i}" for i in range(5000)]
    rows += [{"id": f"u{j:04d}", "kind": "text", "text": " ".join(rng.choice(vocab) for _ in range(40)),
              "messages": None, "chosen": None, "rejected": None, "media": []} for j in range(1000)]
    # more real text: whatever is dropped must be a true copy (pydoc repeats a few passages)
    real = _questions(600, offset=40 * 40)
    rows += [{"id": f"r{j:04d}", "kind": "text", "text": t, "messages": None, "chosen": None, "rejected": None,
              "media": []} for j, t in enumerate(real)]
    sh = [set(shingles(q)) for q in qs]
    true_copies = {f"r{j:04d}" for j, t in enumerate(real)
                   if any(len(set(shingles(t)) & s) / len(set(shingles(t)) | s) >= 0.8 for s in sh)}
    for rule in ("keye_pretrain", "hamming"):
        got = _decide(leak_step(tmp_path, rule=rule), ev, rows)
        assert {k for k in got if k.startswith("copy")} == {f"copy{i:02d}" for i in range(35)}
        assert not [k for k in got if k.startswith("u")]
        assert {k for k in got if k.startswith("r")} == true_copies
        assert got["copy07"] == f"{EVAL_PREFIX}textbench:q.jsonl:7"
    print(f"text rule: 35 of 35 copies dropped, 0 of 1000 unrelated; {len(true_copies)} true repeats in real text")
    assert _decide(leak_step(tmp_path, text=False), ev, rows) == {}


# --- keye_posttrain: the decision over embeddings ----------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _at_cosine(v: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at cosine exactly c to unit vector v."""
    u = rng.standard_normal(v.shape)
    u = _unit(u - (u @ v) * v)
    return c * v + math.sqrt(1 - c * c) * u


def test_posttrain_needs_both_image_and_text_cosines():
    rng = np.random.default_rng(0)
    dim, n_eval = 256, 40
    ev_img, ev_txt = _unit(rng.standard_normal((n_eval, dim))), _unit(rng.standard_normal((n_eval, dim)))
    index = LeakIndex(eval_ids=[f"eval:b:{i}" for i in range(n_eval)], image_item=np.arange(n_eval),
                      image_hash=np.zeros(n_eval, np.uint64), image_emb=ev_img, text_emb=ev_txt)
    img, owner, txt, want = [], [], [], set()
    s = 0
    for e in range(n_eval):  # 40 near-copies: image cosine 0.99, text cosine 0.9 -> leak
        img.append(_at_cosine(ev_img[e], 0.99, rng))
        owner.append(s)
        txt.append(_at_cosine(ev_txt[e], 0.9, rng))
        want.add((s, e))
        s += 1
    for e in range(10):  # the image alone, or the text alone, is no leak
        img.append(_at_cosine(ev_img[e], 0.995, rng))
        owner.append(s)
        txt.append(_at_cosine(ev_txt[e], 0.45, rng))
        s += 1
        img.append(_at_cosine(ev_img[e], 0.97, rng))
        owner.append(s)
        txt.append(ev_txt[e])
        s += 1
    for _ in range(1000):  # unrelated samples
        img.append(_unit(rng.standard_normal(dim)))
        owner.append(s)
        txt.append(_unit(rng.standard_normal(dim)))
        s += 1
    # a multi-image sample: three unrelated images and one copy of item 3
    for k in range(4):
        img.append(_at_cosine(ev_img[3], 0.985, rng) if k == 2 else _unit(rng.standard_normal(dim)))
        owner.append(s)
    txt.append(_at_cosine(ev_txt[3], 0.6, rng))
    want.add((s, 3))
    got = posttrain_hits(np.array(img), np.array(owner), np.array(txt), index, 0.98, 0.50)
    assert got == want
    txt[-1] = np.full(dim, np.nan)  # a sample without text matches nothing
    assert (s, 3) not in posttrain_hits(np.array(img), np.array(owner), np.array(txt), index, 0.98, 0.50)


# --- near dedup's new image bands -------------------------------------------------------------------

def test_image_bands_find_every_planted_pair_within_hamming_10():
    step = NearDedup()  # `auto` before the engine fits it to the corpus: the 10^8 layout
    assert (step.image_band_bits, step.image_bands) == (24, image_band_count(10, 24, 0.995)) == (24, 945)
    masks = step.image_masks()
    assert len(set(masks.tolist())) == 945 and {bin(m).count("1") for m in masks.tolist()} == {24}
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2 ** 63, 3700, dtype=np.int64)
    pairs, dist = [], []
    for i in range(3700):  # 300 pairs at each distance 1..9, 1,000 at distance 10
        d = 1 + i % 10 if i < 3000 else 10
        flip = sum(1 << int(b) for b in rng.choice(64, d, replace=False))
        pairs.append((int(base[i]) & M64, (int(base[i]) & M64) ^ flip))
        dist.append(d)
    dist = np.array(dist)
    x = np.array([a ^ b for a, b in pairs], dtype=np.uint64)
    assert (np.bitwise_count(x) == dist).all()
    shared = ((x[:, None] & masks[None, :]) == 0).sum(axis=1)  # bands each pair shares
    recall10 = float((shared[dist == 10] > 0).mean())
    print(f"image bands: every planted pair at Hamming 1..9 found: {bool((shared[dist < 10] > 0).all())}; "
          f"recall at 10: {recall10:.4f} of {(dist == 10).sum()}; fewest bands shared at 1..9: "
          f"{int(shared[dist < 10].min())}")
    # bit sampling at 0.995 (design) finds ~99.5% of pairs exactly 10 bits apart and, measured on
    # 1e5 pairs each, all at <= 8 and 99.996% at 9: the planted pairs below 10 are all found
    assert (shared[dist < 10] > 0).all() and recall10 >= 0.99
    # and through the step: keys, buckets, Hamming verification, on 200 pairs among 400 random hashes
    hashes = {f"a{i:03d}": a for i, (a, _) in enumerate(pairs[:200])}
    hashes |= {f"b{i:03d}": b for i, (_, b) in enumerate(pairs[:200])}
    hashes |= {f"r{i:03d}": int(v) & M64 for i, v in enumerate(rng.integers(0, 2 ** 63, 400, dtype=np.int64))}
    rows = [{"id": k, "kind": "image_text", "media": [{"kind": "image", "phash": [h]}]} for k, h in hashes.items()]
    brute = sorted((a, b) for a, b in itertools.combinations(sorted(hashes), 2) if hamming(hashes[a], hashes[b]) <= 10)
    assert step.edges(rows) == brute and len(brute) >= 200
    # the Arrow table the engine uses carries the same keys, the payload once per node
    t = step.key_table(rows[:3] + rows[400:403])
    py = step.key_rows(rows[:3] + rows[400:403])
    assert sorted((r["id"], r["key"]) for r in t.to_pylist()) == sorted((r["id"], r["key"]) for r in py)
    assert sum(p is not None for p in t.column("payload").to_pylist()) == 6


@pytest.mark.parametrize("n_images,bits", [(100, 12), (5000, 13), (1_000_000, 20), (10_000_000, 24), (10**9, 24)])
def test_auto_band_width_follows_the_corpus_size(n_images, bits):
    """`image_band_bits: auto`: k = ceil(log2 N) clamped to 12..24 keeps a random bucket at <= 1
    other hash on average, and each width keeps recall >= 0.99 on pairs exactly 10 bits apart."""
    step = NearDedup()
    step.fit_image_bands(n_images)
    assert (step.image_band_bits, step.image_bands) == (bits, image_band_count(10, bits, 0.995))
    assert n_images / 2 ** step.image_band_bits <= 1 or bits == 24
    rng = np.random.default_rng(bits)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, 10, replace=False)) for _ in range(4000)],
                     dtype=np.uint64)
    masks = step.image_masks()
    assert {bin(m).count("1") for m in masks.tolist()} == {bits}
    found = (((flips[:, None] & masks[None, :]) == 0).sum(axis=1) > 0).mean()
    assert found >= 0.99, found
    fixed = NearDedup(image_band_bits=16)
    fixed.fit_image_bands(n_images)  # an explicit width is kept
    assert (fixed.image_band_bits, fixed.image_bands) == (16, image_band_count(10, 16, 0.995))
    with pytest.raises(ValueError, match="image_band_bits"):
        NearDedup(image_band_bits="wide")


def _media_corpus(n: int = 60, seed: int = 8) -> list[dict]:
    """Pictures and near-copies (tests/test_near_dedup.py's smooth fields and drawings), as rows."""
    from test_near_dedup import smooth_field

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        im = smooth_field(rng, 160, 120) if i % 2 else drawing(rng, 160, 120)
        rows.append({"id": f"p{i:03d}", "kind": "image_text", "media": [{"kind": "image", "phash": [ph(im)]}]})
        if i % 3 == 0:
            for k, v in near_copies(im).items():
                rows.append({"id": f"p{i:03d}{k}", "kind": "image_text",
                             "media": [{"kind": "image", "phash": [ph(v)]}]})
    return rows


def test_dedup_near_image_decisions_on_a_small_corpus_are_unchanged():
    """The former bands (24 x 12 bits) and the new ones (945 x 24 bits) give the same edges as
    brute force over all pairs at Hamming <= 10, on pictures and their near-copies."""
    rows = _media_corpus()
    brute = sorted((a["id"], b["id"]) for a, b in itertools.combinations(sorted(rows, key=lambda r: r["id"]), 2)
                   if hamming(a["media"][0]["phash"][0], b["media"][0]["phash"][0]) <= 10)
    assert len(brute) >= 40
    new = NearDedup().edges(rows)
    old = NearDedup(image_bands=24, image_band_bits=12).edges(rows)
    assert (bit_bands(24, 12) == bit_bands()).all()  # the former default bands, as before
    assert new == brute == old


# --- one Spark run per Keye rule ----------------------------------------------------------------------

def _write(im: Image.Image, path) -> None:
    im.save(path, quality=90) if str(path).endswith(".jpg") else im.save(path)


def test_spark_keye_pretrain_counts_per_set(spark, tmp_path):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    rng = random.Random(21)
    for d in ("img", "ev"):
        (tmp_path / d).mkdir()
    pics = [drawing(rng, 320, 240) for _ in range(14)]
    for i, im in enumerate(pics):
        _write(im, tmp_path / "img" / f"p{i}.png")
    # evaluation sets: A holds copies of pictures 5, 1, 2 (and a copied question), B of pictures 3, 4
    _write(pics[5].resize((240, 180)), tmp_path / "ev" / "a5.png")
    _write(pics[1], tmp_path / "ev" / "a1.jpg")
    _write(pics[2], tmp_path / "ev" / "a2.png")
    _write(pics[3], tmp_path / "ev" / "b3.png")
    _write(pics[4].resize((480, 360)), tmp_path / "ev" / "b4.png")
    q = _questions(1)[0]
    (tmp_path / "ev" / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"image": "a5.png", "question": "what is this?", "answer": "shapes"},
        {"image": "a1.jpg", "question": "colour?", "answer": "red"},
        {"image": "a2.png", "question": "count?", "answer": "3"},
        {"question": q, "answer": "yes"}]))
    (tmp_path / "ev" / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"image": "b3.png", "question": "where?", "answer": "left"},
        {"image": "b4.png", "question": "why?", "answer": "because"}]))
    from reelforge.curation.probe import probe_image

    def probed(path) -> int:  # the pHash probe computes (JPEGs decoded at 1/8 scale)
        return probe_image(path.read_bytes(), 1 << 30, True)["phash"][0]

    same = {i: probed(tmp_path / "img" / f"p{i}.png") == probed(next((tmp_path / "ev").glob(f"?{i}.*")))
            for i in range(1, 6)}
    assert all(same.values()), same  # every planted copy keeps its pHash: the Keye rule must drop it
    rows = [{"image": f"img/p{i}.png", "caption": f"picture {i}"} for i in range(14)]
    rows.append({"images": ["img/p10.png", "img/p11.png", "img/p2.png"],  # multi-image, one leaked
                 "text": "<image> <image> <image> three pictures"})
    rows.append({"images": ["img/p12.png", "img/p13.png"], "text": "<image> <image> two pictures"})
    rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "yes"}]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "leak", "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"}],
              "steps": [{"probe": {}}, {"leakage": {"eval_sets": [{"name": "setA", "path": "ev/a.jsonl"},
                                                                 {"name": "setB", "path": "ev/b.jsonl"}]}}],
              "output": {"path": "out", "shards": {"max_samples": 100}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(str(tmp_path / "recipe.yaml"), out=out), spark=spark, log=lambda *a: None)
    import pyarrow.parquet as pq

    ledger = {r["source_key"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}
    reason = {k: r["reason"] for k, r in ledger.items() if r["fate"] == "dropped"}
    assert reason == {"m.jsonl:6": "leak:setA", "m.jsonl:2": "leak:setA", "m.jsonl:3": "leak:setA",
                      "m.jsonl:4": "leak:setB", "m.jsonl:5": "leak:setB", "m.jsonl:15": "leak:setA",
                      "m.jsonl:17": "leak:setA"}, reason
    step = next(s for s in rep["steps"] if s["step"] == "leakage")
    assert step["reasons"] == {"leak:setA": 5, "leak:setB": 2}
    assert rep["balanced"]


@pytest.mark.slow
def test_spark_keye_posttrain_equals_plain_open_clip(spark, tmp_path):
    """The executors' CLIP decisions equal open_clip run directly on the same files and the
    decision function; the planted copies (image copy + copied question) are dropped."""
    import open_clip
    import torch

    from reelforge.curation.tiny_clip import build_tiny_clip
    from reelforge.filters.clip_score import caption_of
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    cfg_dir, ckpt = build_tiny_clip(str(tmp_path / "model"))
    rng = random.Random(33)
    for d in ("img", "ev"):
        (tmp_path / d).mkdir()
    pics = [drawing(rng) for _ in range(10)]
    qs = [f"question number {i} about the {w} picture" for i, w in enumerate(
        ["red", "blue", "green", "dark", "bright", "round", "square", "tiny", "large", "odd"])]
    ev = []
    for i in range(4):
        _write(pics[i], tmp_path / "ev" / f"e{i}.png")
        ev.append({"image": f"e{i}.png", "question": qs[i], "answer": "x"})
    (tmp_path / "ev" / "e.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ev))
    rows = []
    for i in range(10):
        _write(jpeg(pics[i].resize((100, 75)), 80), tmp_path / "img" / f"p{i}.jpg")
        rows.append({"image": f"img/p{i}.jpg", "caption": f"{qs[i]} x"})
    rows.append({"images": ["img/p8.jpg", "img/p1.jpg"], "text": f"<image> <image> {qs[1]} x"})  # one copy
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "leak", "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"}],
              "steps": [{"probe": {}}, {"leakage": {
                  "eval_sets": [{"name": "bench", "path": "ev/e.jsonl"}], "rule": "keye_posttrain", "text": False,
                  "model": "reelforge-tiny-clip", "pretrained": "model/reelforge-tiny-clip.pt",
                  "model_config": "model/reelforge-tiny-clip.json", "device": "cpu"}}],
              "output": {"path": "out", "shards": {"max_samples": 100}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    run_recipe(load_recipe(str(tmp_path / "recipe.yaml"), out=out), spark=spark, log=lambda *a: None)
    import pyarrow.parquet as pq

    ledger = {r["source_key"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}
    got = {k for k, r in ledger.items() if r["reason"] == "leak:bench"}

    model, _, pre = open_clip.create_model_and_transforms("reelforge-tiny-clip", pretrained=ckpt)
    model.eval()
    tok = open_clip.get_tokenizer("reelforge-tiny-clip")

    def emb_i(paths):
        with torch.no_grad():
            x = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths])
            return torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()

    def emb_t(texts):
        with torch.no_grad():
            return torch.nn.functional.normalize(model.encode_text(tok(texts)), dim=-1).numpy()

    ev_img = emb_i([tmp_path / "ev" / f"e{i}.png" for i in range(4)])
    ev_txt = emb_t([f"{q['question']} {q['answer']}" for q in ev])
    index = LeakIndex(eval_ids=[f"e{i}" for i in range(4)], image_item=np.arange(4),
                      image_hash=np.zeros(4, np.uint64), image_emb=ev_img, text_emb=ev_txt)
    want = set()
    for n, r in enumerate(rows, 1):
        paths = [tmp_path / p for p in (r.get("images") or [r["image"]])]
        text = caption_of({"text": r.get("caption") or r.get("text")}, "all")
        if posttrain_hits(emb_i(paths), np.zeros(len(paths), int), emb_t([text]), index, 0.98, 0.5):
            want.add(f"m.jsonl:{n}")
    print(f"keye_posttrain (tiny random CLIP): dropped {sorted(got)}")
    assert got == want
    assert {"m.jsonl:1", "m.jsonl:2", "m.jsonl:3", "m.jsonl:4", "m.jsonl:11"} <= got  # the planted copies


# --- keye_posttrain reusing a CLIP step's kept embeddings (from_step) ------------------------------------

def _pydoc_words() -> list[str]:
    from pydoc_data.topics import topics

    return sorted({w.lower() for k in sorted(topics) for w in topics[k].split() if w.isalpha() and len(w) > 3})


def test_posttrain_reuses_kept_embeddings_only_for_the_same_text(tmp_path):
    """leaks_of over rows carrying kept embeddings (what the engine joins on, KEPT_*): the same
    decisions as embedding them; a kept text embedding is used only when its text_hash is that of
    the text the rule embeds (a conversation's every turn; the CLIP step embedded its assistant
    turn), and what is not kept goes through the encoder, counted."""
    from reelforge.curation.tiny_clip import build_tiny_clip
    from reelforge.filters.clip_score import caption_of, load_scorer
    from reelforge.filters.embeddings import text_hash, to_bytes
    from reelforge.filters.leakage import KEPT_IMAGES, KEPT_TEXT, KEPT_TEXT_HASH

    d, ckpt = build_tiny_clip(str(tmp_path / "model"))
    cfg = os.path.join(d, "reelforge-tiny-clip.json")
    step = leak_step(tmp_path, rule="keye_posttrain", text=False, model="reelforge-tiny-clip", pretrained=ckpt,
                     model_config=cfg, device="cpu", image_cosine=0.9985, text_cosine=0.99)
    rng = random.Random(5)
    words = _pydoc_words()
    pics = [drawing(rng) for _ in range(4)]

    def medium(im: Image.Image, name: str) -> dict:
        _write(im, tmp_path / f"{name}.png")
        return {"kind": "image", "uri": str(tmp_path / f"{name}.png"), "member": None, "offset": None,
                "phash": [ph(im)]}

    qa = [(" ".join(rng.sample(words, 6)) + "?", rng.choice(words)) for _ in range(3)]
    ev = [{"id": f"{EVAL_PREFIX}bench:q.jsonl:{i}", "kind": "image_text", "text": f"{q} {a}", "messages": None,
           "chosen": None, "rejected": None, "media": [medium(pics[i], f"e{i}")]} for i, (q, a) in enumerate(qa)]
    index = step.build_index(ev)
    base = {"chosen": None, "rejected": None}
    recs = [  # a captioned copy of item 0; a conversation about a copy of item 1; an unrelated sample
        {**base, "id": "cap", "kind": "image_text", "text": ev[0]["text"], "messages": None,
         "media": [medium(near_copies(pics[0])["resized"], "c0")]},
        {**base, "id": "conv", "kind": "conversation", "text": None,
         "messages": [{"role": "user", "content": f"<image> {qa[1][0]}"}, {"role": "assistant", "content": qa[1][1]}],
         "media": [medium(near_copies(pics[1])["jpeg"], "c1")]},
        {**base, "id": "other", "kind": "image_text", "text": " ".join(rng.sample(words, 8)), "messages": None,
         "media": [medium(pics[3], "u3")]}]
    plain: dict = {}
    want = step.leaks_of(recs, index, plain)
    assert want == {"cap": ev[0]["id"], "conv": ev[1]["id"]}
    assert (plain["images_embedded"], plain["texts_embedded"], plain.get("images_reused")) == (3, 3, 0)

    sc = load_scorer("reelforge-tiny-clip", ckpt, cfg, "cpu")  # what a clip step (conversation_text: assistant) keeps
    kept = []
    for r in recs:
        cap = caption_of(r, "assistant")
        img = sc.embed_images([decode_visual_one(r["media"][0])])[0]
        kept.append({**r, KEPT_IMAGES: [{"index": 0, "image": to_bytes(img)}],
                     KEPT_TEXT: to_bytes(sc.embed_texts([cap])[0]), KEPT_TEXT_HASH: text_hash(cap)})
    stats: dict = {}
    assert step.leaks_of(kept, index, stats) == want
    # every image kept; the conversation's kept text is its assistant turn only: that one text is embedded
    assert (stats["images_reused"], stats.get("images_embedded", 0)) == (3, 0)
    assert (stats["texts_reused"], stats["texts_embedded"], stats["encoder_calls"]) == (2, 1, 1)
    # a text rewritten since the CLIP step ran (its hash differs) is embedded again, with the same decision
    kept[0] = {**kept[0], KEPT_TEXT_HASH: text_hash("an older caption")}
    stats = {}
    assert step.leaks_of(kept, index, stats) == want and stats["texts_embedded"] == 2


def decode_visual_one(m: dict) -> Image.Image:
    from reelforge.curation.media_io import decode_visual

    (im,) = decode_visual(m, 1)
    return im


def _leak_section(out: str, step: LeakageFilter) -> dict:
    with open(step.report_path(os.path.join(out, "_work"))) as f:
        return json.load(f)


def reuse_corpus(root) -> tuple[dict, dict, dict[str, set]]:
    """Under `root` (a pathlib.Path): two tiny random CLIPs (model/, and other/ with other weights),
    40 benchmark items (ev/e.jsonl: a drawing, a question, an answer) and a corpus m.jsonl of 80
    planted copies (the item's picture resized or re-encoded, with the item's text), 300 unrelated
    pictures and texts, and 40 hard negatives (the picture with another text, the text with
    another picture). Returns (the clip step's model fields, the leakage step's fields, the
    source keys of each group: planted, unrelated, hard)."""
    from reelforge.curation.tiny_clip import build_tiny_clip

    build_tiny_clip(str(root / "model"))
    build_tiny_clip(str(root / "other"), seed=1)  # the same architecture, other weights
    rng = random.Random(41)
    words = _pydoc_words()
    for d in ("img", "ev"):
        (root / d).mkdir()
    bench = [drawing(rng) for _ in range(40)]
    ev, rows = [], []
    groups: dict[str, set] = {"planted": set(), "unrelated": set(), "hard": set()}
    for i, im in enumerate(bench):
        _write(im, root / "ev" / f"e{i}.png")
        ev.append({"image": f"e{i}.png", "question": " ".join(rng.sample(words, 6)) + "?",
                   "answer": rng.choice(words)})
    (root / "ev" / "e.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ev))

    def add(im: Image.Image, name: str, caption: str, group: str) -> None:
        _write(im, root / "img" / f"{name}.png")
        rows.append({"image": f"img/{name}.png", "caption": caption})
        groups[group].add(f"m.jsonl:{len(rows)}")

    for i, im in enumerate(bench):  # 80 planted copies: the picture resized or re-encoded, the item's text
        text = f"{ev[i]['question']} {ev[i]['answer']}"
        for kind in ("resized", "jpeg"):
            add(near_copies(im)[kind], f"c{i}_{kind}", text, "planted")
    for j in range(300):  # unrelated pictures and texts
        add(drawing(rng), f"u{j}", " ".join(rng.sample(words, 8)), "unrelated")
    for i in range(20):  # the picture without the text, the text without the picture: no leak
        add(near_copies(bench[i])["resized"], f"h{i}_image", " ".join(rng.sample(words, 8)), "hard")
        add(drawing(rng), f"h{i}_text", f"{ev[i]['question']} {ev[i]['answer']}", "hard")
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = {"model": "reelforge-tiny-clip", "pretrained": "model/reelforge-tiny-clip.pt",
            "model_config": "model/reelforge-tiny-clip.json", "device": "cpu"}
    leak = {"eval_sets": [{"name": "bench", "path": "ev/e.jsonl"}], "rule": "keye_posttrain", "text": False,
            "image_cosine": 0.9985, "text_cosine": 0.99, **tiny}
    return tiny, leak, groups


@pytest.mark.slow
def test_spark_keye_posttrain_reuses_the_clip_steps_kept_embeddings(spark, tmp_path):
    """clip (keep_embeddings) then leakage (keye_posttrain, from_step: clip): the same drops as the
    same leakage step embedding everything itself, and the executors ran no CLIP encoder on the
    corpus (the step's counters, summed from the executors' batches into its report section, are
    0 with reuse and count every corpus image and text without). A leakage step whose model is
    not the one recorded with the embeddings embeds everything itself, and says why.

    The tiny random CLIP puts any two drawings at image cosine ~0.99 and any two short texts up to
    ~0.95, so the thresholds here are 0.9985 and 0.99 (planted copies: >= 0.9995 and 1.0)."""
    from reelforge.jobs.recipe import StepSpec, load_recipe
    from reelforge.jobs.run import run_recipe

    tiny, leak, groups = reuse_corpus(tmp_path)
    planted, unrelated, hard = groups["planted"], groups["unrelated"], groups["hard"]
    n = sum(len(g) for g in groups.values())
    out = str(tmp_path / "out")

    def run(leakage: dict) -> tuple[dict, dict, dict]:
        recipe = {"name": "reuse", "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"}],
                  "steps": [{"probe": {}}, {"clip": {**tiny, "keep_embeddings": True}}, {"leakage": leakage}],
                  "output": {"path": "out", "shards": {"max_samples": 1000}}}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        r = load_recipe(str(tmp_path / "recipe.yaml"), out=out)
        rep = run_recipe(r, spark=spark, log=lambda *a: None)
        import pyarrow.parquet as pq

        dropped = {r["source_key"]: r["reason"] for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()
                   if r["fate"] == "dropped"}
        section = _leak_section(out, StepSpec("leakage", r.steps[2].params).build())
        return rep, dropped, section

    rep_a, reused, sec_a = run({**leak, "from_step": "clip"})
    rep_b, computed, sec_b = run(leak)  # the clip stage is reused from the first run: only leakage runs again
    secs = {k: next(s["seconds"] for s in rep["steps"] if s["step"] == "leakage") for k, rep in
            (("reused", rep_a), ("computed", rep_b))}
    print(f"leakage with kept embeddings: {len(reused)} drops, {sec_a['seconds']} s in the step "
          f"({secs['reused']} s stage); embedding itself: {len(computed)} drops, {sec_b['seconds']} s "
          f"({secs['computed']} s stage); encoder on the corpus: {sec_a['images_embedded']} images, "
          f"{sec_a['texts_embedded']} texts, {sec_a['encoder_calls']} calls with reuse; "
          f"{sec_b['images_embedded']} images, {sec_b['texts_embedded']} texts, {sec_b['encoder_calls']} calls without")
    assert reused == computed  # the same drops, the same reasons
    assert set(reused.values()) == {"leak:bench"}
    assert len(planted & set(reused)) >= 30 and not (unrelated | hard) & set(reused)
    assert planted <= set(reused)  # every planted copy, in fact
    assert sec_a["embeddings"] == "reused" and sec_a["from_step"] == "clip" and "clip" in sec_a["why"]
    assert (sec_a["images_reused"], sec_a["texts_reused"]) == (n, n)
    assert sec_a["images_embedded"] == sec_a["texts_embedded"] == sec_a["encoder_calls"] == 0
    assert sec_a["drops"] == sec_b["drops"] == {"leak:bench": len(reused)}
    # the counters are live: without from_step the executors embed every corpus image and text
    assert sec_b["embeddings"] == "computed" and "no from_step" in sec_b["why"]
    assert (sec_b["images_embedded"], sec_b["texts_embedded"]) == (n, n) and sec_b["encoder_calls"] > 0
    assert sec_b["images_reused"] == sec_b["texts_reused"] == 0 and sec_a["samples"] == sec_b["samples"] == n
    # the run report carries the section, and report.md says what was reused
    assert rep_a["leakage"] == [sec_a] and rep_b["leakage"] == [sec_b]
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert "## Leakage (`leakage`, rule keye_posttrain)" in md and "**computed**" in md  # the last run: b

    # another model than the one recorded with the embeddings: embedded here, and the section says why
    other = {"pretrained": "other/reelforge-tiny-clip.pt", "model_config": "other/reelforge-tiny-clip.json"}
    rep_c, _, sec_c = run({**leak, **other, "from_step": "clip"})
    assert rep_c["balanced"]
    assert sec_c["embeddings"] == "computed" and "another model" in sec_c["why"], sec_c
    assert sec_c["kept_model"] != sec_c["model"] and str(tmp_path / "other") in sec_c["model"]
    assert (sec_c["images_embedded"], sec_c["texts_embedded"]) == (n, n) and sec_c["images_reused"] == 0
