"""The faster signatures (issue 14: word hash and n-gram hash of `curation.minhash`) change speed,
not decisions: on real text from this machine, `dedup_near`'s plain-Python path (band keys,
candidate pairs, exact Jaccard, components, keep rule: `NearDedup.edges` + `near_duplicates`)
drops exactly the samples that the exact-Jaccard ground truth drops, and exactly those it
dropped with the previous signature (xxh64 of the packed xxh64 word hashes).

No Spark: a few thousand documents, ~20 s."""

from __future__ import annotations

import glob
import math
import os
import random
import sys

import numpy as np
import pytest

from reelforge.curation import minhash as mh
from reelforge.filters.near_dedup import NearDedup, near_duplicates

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from bench_dedup_vs_datatrove import _read, _roff_to_text, edit_words  # noqa: E402

THRESHOLD = 0.8
NGRAM = 5
DOCS = 3000


def machine_paragraphs(limit: int = 12000) -> list[str]:
    """Paragraphs of >= 8 words of real text shipped on this machine, in a fixed order: pydoc's
    help topics, then man pages (section 1) and /usr/share/doc files, as many as `limit` needs
    (bench_dedup_vs_datatrove reads all of them; the first few hundred files are plenty here)."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    files = sorted(glob.glob("/usr/share/man/man1/*.gz"))[:400] + sorted(
        p for p in glob.glob("/usr/share/doc/*/*") if os.path.isfile(p))[:400]
    seen: set[str] = set()
    out: list[str] = []
    for i, src in enumerate(texts + files):
        text = src if i < len(texts) else _read(src, 200_000)
        if text and src.startswith("/usr/share/man/"):
            text = _roff_to_text(text)
        for para in (text or "").split("\n\n"):
            words = para.split()
            key = " ".join(words)
            if len(words) >= 8 and key not in seen:
                seen.add(key)
                out += [" ".join(words[j:j + 60]) for j in range(0, len(words), 60) if len(words[j:j + 60]) >= 8]
        if len(out) >= limit:
            break
    return out[:limit]


def s_curve(j, bands: int, rows: int):
    """Probability that a pair of Jaccard j shares at least one of `bands` bands of `rows` values."""
    return 1.0 - (1.0 - j ** rows) ** bands


def exact_pairs(rows: list[dict], t: float) -> dict[tuple[str, str], float]:
    """Every pair with shingle-set Jaccard >= t, exactly, with its Jaccard (prefix filtering: two
    sets with Jaccard >= t share one of their |S| - ceil(t |S|) + 1 first elements in any fixed
    order)."""
    sets = {r["id"]: frozenset(mh.shingles(r["text"], NGRAM)) for r in rows}
    index: dict[str, list[str]] = {}
    cand: set[tuple[str, str]] = set()
    for rid, s in sets.items():
        if not s:
            continue
        for sh in sorted(s)[: len(s) - math.ceil(t * len(s)) + 1]:
            for other in index.setdefault(sh, []):
                cand.add((other, rid) if other < rid else (rid, other))
            index[sh].append(rid)
    out = {}
    for a, b in cand:
        j = len(sets[a] & sets[b]) / len(sets[a] | sets[b])
        if j >= t:
            out[(a, b)] = j
    return out


GAP = (0.76, 0.93)  # no pair of the kept-set corpus has a Jaccard in here


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    paras = machine_paragraphs()
    assert len(paras) > 2000, "not enough text on this machine"
    return paras


@pytest.fixture(scope="module")
def rows(paragraphs) -> list[dict]:
    """~DOCS documents of 60-400 words drawn from the paragraphs (shared paragraphs give pairs of
    every similarity), ~13% of them planted near-copies, 60% with 0 to len/120 word edits, the
    others with len/40 to len/15 (exact Jaccard from ~0.4 to 1), then thinned so that no pair
    lies in GAP around the 0.8 threshold: whether such a pair shares a band is the hash's coin
    toss (a 5% miss at 0.8, see test_candidate_rate_follows_the_s_curve), so only without them
    is the kept set a fixed target. The pairs from 0.6 to 0.76 stay: many are candidates the
    exact check turns down."""
    rng = random.Random(14)
    vocab = [w for p in rng.sample(paragraphs, 500) for w in p.split()[:3]]
    texts: list[str] = []
    originals = int(DOCS * 0.87)
    for _ in range(originals):
        target = rng.randint(60, 400)
        words: list[str] = []
        while len(words) < target:
            words += paragraphs[rng.randrange(len(paragraphs))].split()
        texts.append(" ".join(words[:target]))
    while len(texts) < DOCS:
        w = texts[rng.randrange(originals)].split()
        light = rng.random() < 0.6  # a few edits (J ~0.9-1) or many (J ~0.5-0.8: decoys)
        k = rng.randint(0, max(1, len(w) // 120)) if light else rng.randint(len(w) // 40, len(w) // 15)
        texts.append(" ".join(edit_words(w, k, rng, vocab)))
    rng.shuffle(texts)
    out = [{"id": f"d{i:05d}", "kind": "text", "text": t, "scores": {"quality": rng.random()}}
           for i, t in enumerate(texts)]
    gone = {b for (a, b), j in exact_pairs(out, GAP[0]).items() if j < GAP[1]}
    return [r for r in out if r["id"] not in gone]


def previous_signatures(texts, num_perm=128, n=5, unit="word", seed=1, **kw) -> np.ndarray:
    """The signature before issue 14: xxh64 of the packed 4-byte low halves of each word's
    xxh64, datasketch's affine32 permutations (datasketch itself, with that hash)."""
    import xxhash
    from datasketch import MinHash

    def old_hash(s: bytes) -> int:
        return xxhash.xxh64_intdigest(b"".join((xxhash.xxh64_intdigest(w) & 0xFFFFFFFF).to_bytes(4, "little")
                                               for w in s.split(b" "))) & 0xFFFFFFFF

    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=seed, hashfunc=old_hash)
        m.update_batch([s.encode() for s in mh.shingles(text, n, unit)])
        out[i] = m.hashvalues
    return out


def test_kept_set_equals_exact_jaccard_truth_and_previous_signature(rows, monkeypatch):
    step = NearDedup(threshold=THRESHOLD, num_perm=128, ngram=NGRAM)
    pairs = exact_pairs(rows, 0.6)
    assert not [j for j in pairs.values() if GAP[0] < j < GAP[1]]
    truth = sorted(p for p, j in pairs.items() if j >= THRESHOLD)
    dropped_truth = near_duplicates(rows, truth)
    edges = step.edges(rows)  # candidates from the bands of `signatures`, verified by exact Jaccard
    assert edges == truth  # every true pair was a candidate (recall 1), and only true pairs are edges
    assert near_duplicates(rows, edges) == dropped_truth

    monkeypatch.setattr(mh, "signatures", previous_signatures)
    prev = step.edges(rows)
    assert prev == truth and near_duplicates(rows, prev) == dropped_truth

    # the corpus is not trivial: hundreds of drops, and pairs under the threshold that share a
    # band (candidates the exact check turns down)
    assert len(dropped_truth) >= 150, len(dropped_truth)
    bands, r = mh.lsh_params(THRESHOLD - step.candidate_margin, 128)
    below = [j for j in pairs.values() if j < THRESHOLD]
    assert sum(s_curve(j, bands, r) for j in below) >= 20, len(below)


def test_candidate_rate_follows_the_s_curve(paragraphs):
    """Near the threshold whether a true pair becomes a candidate is chance, and only the
    chance matters: over 400 pairs of Jaccard ~0.7-0.9 made of real text, the number sharing a
    band, with the new signature and with the previous one, is what the S-curve of the bands
    predicts (within 5 standard deviations). So the new hash behaves as a random one and the
    recall near the threshold is unchanged."""
    rng = random.Random(15)
    vocab = [w for p in rng.sample(paragraphs, 500) for w in p.split()[:3]]
    a_docs, b_docs = [], []
    for _ in range(400):
        words: list[str] = []
        while len(words) < 300:
            words += paragraphs[rng.randrange(len(paragraphs))].split()
        a_docs.append(" ".join(words[:300]))
        b_docs.append(" ".join(edit_words(words[:300], rng.randint(3, 9), rng, vocab)))
    step = NearDedup(threshold=THRESHOLD, num_perm=128, ngram=NGRAM)
    j = np.array([step.exact_jaccard(a, b) for a, b in zip(a_docs, b_docs)])
    bands, r = mh.lsh_params(THRESHOLD - step.candidate_margin, 128)
    p = s_curve(j, bands, r)
    assert (j < THRESHOLD).sum() >= 50 and (j >= THRESHOLD).sum() >= 100, np.percentile(j, [5, 50, 95])
    for sig in (mh.signatures, previous_signatures):
        ha, hb = mh.band_hashes(sig(a_docs), bands, r), mh.band_hashes(sig(b_docs), bands, r)
        hits = int((ha == hb).any(axis=1).sum())
        assert abs(hits - p.sum()) <= 5 * np.sqrt((p * (1 - p)).sum()) + 1, (sig.__name__, hits, p.sum())
