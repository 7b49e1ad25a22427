"""MinHash signatures: datasketch equality (the hash is the only difference), backends against
the slow reference, Jaccard accuracy, determinism, edge cases, LSH parameters and band hashes."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from reelforge.curation import minhash as mh

WORDS = ("the a of and to in is was for on that with as by at from his her it an be this which or are "
         "river city night light small large old new man woman child tree car road house sky cloud sun "
         "photo image shows red blue green yellow walks runs sits stands under over near behind").split()
ODD = ["Ünïcödé", "ΣΊΣΥΦΟΣ", "Straße", "İstanbul", "ｆｕｌｌ", "ﬁne", "नमस्ते", "日本語のテキスト", "😀👍🏽",
       "a+b=c", "$5", "x\u0301", "\u200bzw", "“quoted”", "—", "l'été", "C'EST", "e\u0300", "١٢٣"]
SEPS = [" ", "  ", ", ", ". ", "! ", "\n", "\t", "\u00a0", "\u3000", " - ", "... ", " (", ") ", "\u2029", "、", "。"]

BACKENDS = ["numpy"] + (["numba"] if mh.backend() == "numba" else [])


def rand_text(rng: random.Random, n_words: int, odd: float = 0.1) -> str:
    parts = []
    for _ in range(n_words):
        w = rng.choice(ODD) if rng.random() < odd else rng.choice(WORDS)
        if rng.random() < 0.1:
            w = w.upper() if rng.random() < 0.5 else w.capitalize()
        parts.append(w)
        parts.append(rng.choice(SEPS) if rng.random() < 0.3 else " ")
    return "".join(parts)


@pytest.fixture(scope="module")
def corpus() -> list[str | None]:
    rng = random.Random(7)
    texts: list[str | None] = [rand_text(rng, rng.randint(1, 40)) for _ in range(24)]
    texts += [rand_text(rng, 700, odd=0.02)]  # > 512 shingles: several kernel blocks
    texts += ["", None, "!!! ... ---", " \t\n ", "a", "A b", "one two three four five",
              "x" * 40 + " " + "Y" * 17 + " z" * 3, "word" * 50]  # empty, short, long words
    return texts


def ds_hashvalues(shingle_list: list[str], num_perm: int, seed: int, **kw) -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=seed, **kw)
    m.update_batch([s.encode("utf-8") for s in shingle_list])
    return m.hashvalues


# -- datasketch: same permutations, and the shingle hash is the only difference ------------------


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("num_perm,seed", [(1, 1), (16, 0), (128, 1), (256, 42)])
def test_permutations_are_datasketchs(scheme, num_perm, seed):
    a, b = mh.permutations(num_perm, seed, scheme)
    ds = MinHash(num_perm=num_perm, seed=seed, scheme=scheme).permutations
    assert np.array_equal(a, np.asarray(ds[0])) and np.array_equal(b, np.asarray(ds[1]))


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("num_perm,seed,unit,n", [(128, 1, "word", 5), (64, 3, "char", 5), (16, 1234, "word", 3)])
def test_like_datasketch_equals_datasketch(corpus, scheme, num_perm, seed, unit, n):
    """With datasketch's own shingle hash (sha1_hash32) our arithmetic IS datasketch's."""
    kw = {} if scheme == "affine32" else {"scheme": "legacy"}
    got = mh.signatures_like_datasketch(corpus, num_perm, n, unit, seed, scheme=scheme)
    for text, row in zip(corpus, got):
        assert np.array_equal(row, ds_hashvalues(mh.shingles(text, n, unit), num_perm, seed, **kw)), text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("num_perm,seed,unit,n", [(128, 1, "word", 5), (32, 9, "char", 4)])
def test_fast_signatures_equal_datasketch_with_our_hash(corpus, backend, scheme, num_perm, seed, unit, n):
    """The fast path == datasketch.MinHash(hashfunc=shingle_hash): only the hash function differs."""
    texts = [t for t in corpus if t is None or len(t) < 2000]  # the pure-Python hash is slow
    kw = {} if scheme == "affine32" else {"scheme": "legacy"}
    got = mh.signatures(texts, num_perm, n, unit, seed, scheme=scheme, backend=backend)
    hashfunc = functools.partial(mh.shingle_hash, unit=unit)
    for text, row in zip(texts, got):
        want = ds_hashvalues(mh.shingles(text, n, unit), num_perm, seed, hashfunc=hashfunc, **kw)
        assert np.array_equal(row, want), text


def test_default_datasketch_differs_only_by_hash(corpus):
    """Sanity: with sha1 vs xxh64 the values differ (so the tests above are not vacuous)."""
    texts = [t for t in corpus if t and len(t) < 200][:5]
    assert not np.array_equal(mh.signatures(texts, 32), mh.signatures_like_datasketch(texts, 32))


# -- the fast backends against the obvious reference ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit,n", [("word", 1), ("word", 2), ("word", 5), ("word", 9), ("char", 1), ("char", 5)])
def test_backends_equal_reference(corpus, backend, unit, n):
    want = mh.signatures_reference(corpus, 16, n, unit)
    got = mh.signatures(corpus, 16, n, unit, backend=backend)
    assert got.dtype == np.uint32 and got.shape == (len(corpus), 16)
    for text, g, w in zip(corpus, got, want):
        assert np.array_equal(g, w), text


@pytest.mark.parametrize("unit,n", [("word", 1), ("word", 3), ("char", 2)])
def test_kernel_normalisation_fuzz(unit, n):
    """Random Unicode soup: the numba kernel's own separator/case handling == normalise()."""
    rng = random.Random(11)
    pool = ([chr(c) for c in range(32, 127)] + list("\t\n\r\x0b\x0c\x1c\x85\u00a0\u2028\u3000\u200b")
            + list("ÀÉÎÕÜßæœÆŒİıΣσςЖж日本語한글ﬁﬂ½²ⅫＡｚ．，！\u0301\u0308\u093f—–…«»“”‘’¿¡§¶€£¥©®™😀👍\U0001f3fd")
            + ["\ud800"])  # a lone surrogate: impossible in Arrow, survives via surrogatepass
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(150)]
    want = mh.signatures_reference(texts, 8, n, unit)
    for backend in BACKENDS:
        got = mh.signatures(texts, 8, n, unit, backend=backend)
        bad = [t for t, g, w in zip(texts, got, want) if not np.array_equal(g, w)]
        assert not bad, (backend, bad[:3])


def test_kernel_ascii_blocks():
    """ASCII texts take the kernel's 64-bytes-a-step separator masks: every ASCII code point
    (controls included), words and separator runs across the 64-byte block edges, texts of
    63, 64, 65, 127, 128, 129 bytes, a word ending exactly at a block edge, long words."""
    rng = random.Random(13)
    pool = [chr(c) for c in range(1, 128)]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 300))) for _ in range(200)]
    texts += ["".join(rng.choice("ab ,") for _ in range(k)) for k in (63, 64, 65, 127, 128, 129, 191, 192, 193)]
    texts += ["x" * 64, "x" * 63 + " ", " " * 64 + "y", "w " * 64, "A" * 17 + " " + "b" * 16 + " " + "C" * 200]
    for unit, n in (("word", 1), ("word", 5), ("char", 3)):
        want = mh.signatures_reference(texts, 8, n, unit)
        for backend in BACKENDS:
            got = mh.signatures(texts, 8, n, unit, backend=backend)
            bad = [t for t, g, w in zip(texts, got, want) if not np.array_equal(g, w)]
            assert not bad, (unit, n, backend, bad[:3])


def test_word_and_ngram_hash_definitions():
    """The documented shingle hash, written out independently of the module's helpers."""
    def fmix64(h):
        for c in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
            h ^= h >> 33
            h = (h * c) % 2**64
        return h ^ (h >> 33)

    def word(w: bytes) -> int:
        if len(w) > 16:
            import xxhash

            return xxhash.xxh64_intdigest(w) % 2**32
        lo, hi = int.from_bytes(w[:8], "little"), int.from_bytes(w[8:16], "little")
        return fmix64((lo * 0x9E3779B185EBCA87 + hi * 0xC2B2AE3D27D4EB4F + len(w) * 0x165667B19E3779F9) % 2**64) % 2**32

    def splitmix64(i):
        z = (i + 1) * 0x9E3779B97F4A7C15 % 2**64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
        return z ^ (z >> 31)

    for shingle in ["a", "the quick brown fox jumps", "été à paris", "x" * 16 + " " + "y" * 17, "one two"]:
        ws = [word(w) for w in shingle.encode().split(b" ")]
        m = len(ws)
        want = (splitmix64(m) + sum(splitmix64(i) * w for i, w in enumerate(ws))) % 2**64 >> 32
        assert mh.shingle_hash(shingle, "word") == want, shingle
    assert mh.word_hash(b"") == fmix64(0) % 2**32


def test_xxh64_reference_and_vectorised():
    assert mh.xxh64(b"") == 0xEF46DB3751D8E999  # published test vectors
    assert mh.xxh64(b"abc") == 0x44BC2CF5AD770999
    data = bytes(random.Random(3).randrange(256) for _ in range(300))
    starts = np.array([i % 37 for i in range(120)])
    lengths = np.arange(120) * 2 % 250
    spans = mh.xxh64_spans(np.frombuffer(data, np.uint8), starts, lengths, seed=5)
    assert [int(x) for x in spans] == [mh.xxh64(data[s : s + n], 5) for s, n in zip(starts, lengths)]
    import xxhash

    for n in range(0, 300, 7):
        assert mh.xxh64(data[:n]) == xxhash.xxh64_intdigest(data[:n])
        assert mh.xxh64(data[:n], 99) == xxhash.xxh64_intdigest(data[:n], 99)


# -- accuracy --------------------------------------------------------------------------------------


def test_jaccard_estimates_track_exact_jaccard():
    """200 pairs at similarities from ~0 to 1: mean abs error < 0.05 at 128 permutations."""
    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(3000)]
    a_docs, b_docs = [], []
    for i in range(200):
        base = [rng.choice(vocab) for _ in range(rng.randint(80, 300))]
        target = i / 199  # replace a fraction p of the words so that 5-gram Jaccard ~ target
        p = 1 - (2 * target / (1 + target)) ** (1 / 5)
        other = [rng.choice(vocab) if rng.random() < p else w for w in base]
        a_docs.append(" ".join(base))
        b_docs.append(" ".join(other))
    sa, sb = mh.signatures(a_docs), mh.signatures(b_docs)
    exact = np.array([len(set(mh.shingles(a)) & set(mh.shingles(b))) / len(set(mh.shingles(a)) | set(mh.shingles(b)))
                      for a, b in zip(a_docs, b_docs)])
    est = np.array([mh.jaccard_estimate(x, y) for x, y in zip(sa, sb)])
    assert exact.min() < 0.05 and exact.max() == 1.0 and 0.3 < np.median(exact) < 0.7  # the whole range
    err = est - exact
    assert np.abs(err).mean() < 0.05, np.abs(err).mean()
    assert abs(err.mean()) < 0.015, err.mean()  # no bias


# -- determinism and batch independence ------------------------------------------------------------


def test_batch_composition_and_repeat_calls(corpus):
    texts = [t for t in corpus if t is None or len(t) < 2000]
    alone = np.stack([mh.signatures([t])[0] for t in texts])
    together = mh.signatures(texts)
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)
    shuffled = mh.signatures([texts[i] for i in order] + ["filler " * 5000])  # bigger scratch too
    assert np.array_equal(alone, together)
    assert np.array_equal(shuffled[: len(texts)], together[order])
    assert np.array_equal(mh.signatures(texts), together)
    assert np.array_equal(mh.signatures(tuple(texts)), mh.signatures(iter(texts)))


def test_same_signature_in_a_fresh_process():
    text = "The same text, in another process with another PYTHONHASHSEED."
    code = ("import sys; from reelforge.curation.minhash import signatures; "
            "print(','.join(map(str, signatures([sys.argv[1]], 16)[0])))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == ",".join(map(str, mh.signatures([text], 16)[0]))


def test_pyarrow_input():
    import pyarrow as pa

    texts = ["a b c d e f", None, "Hello, world"]
    assert np.array_equal(mh.signatures(pa.array(texts)), mh.signatures(texts))


# -- normalisation, shingles and edge cases --------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("Hello,  World!", "hello world"),
    ("  tabs\tand\nnewlines\r\n ", "tabs and newlines"),
    ("ｆｕｌｌ－ｗｉｄｔｈ ﬁne\u00a0nbsp\u3000ideographic", "full width fine nbsp ideographic"),
    ("“Quoted” — dash… l'été", "quoted dash l été"),
    ("a+b=c costs $5 <ok> 😀", "a+b=c costs $5 <ok> 😀"),  # symbols (S*) are kept
    ("नमस्ते दुनिया", "नमस्ते दुनिया"),  # combining marks (M*) are kept
    ("ΣΊΣΥΦΟΣ", "σίσυφος"),
    ("...", ""), ("", ""), (None, ""),
])
def test_normalise(text, want):
    assert mh.normalise(text) == want


def test_shingles():
    assert mh.shingles("A b, C d; e f!", 5) == ["a b c d e", "b c d e f"]
    assert mh.shingles("One two", 5) == ["one two"]  # shorter than n: the whole text
    assert mh.shingles("abcd", 3, "char") == ["abc", "bcd"]
    assert mh.shingles("ab, c", 3, "char") == ["ab ", "b c"]
    assert mh.shingles("ab", 3, "char") == ["ab"]
    assert mh.shingles("!?", 5) == [] and mh.shingles(None, 5) == []


def test_empty_and_short_documents():
    sigs = mh.signatures(["", None, "...", " \n\t", "two words", "Two, WORDS!", "ab"], 64)
    assert mh.is_empty(sigs).tolist() == [True] * 4 + [False] * 3
    assert (sigs[:4] == 0xFFFFFFFF).all()
    assert np.array_equal(sigs[4], sigs[5])  # the same normalised text
    assert np.array_equal(sigs[4], ds_hashvalues(["two words"], 64, 1,
                                                 hashfunc=functools.partial(mh.shingle_hash, unit="word")))
    assert mh.jaccard_estimate(sigs[0], sigs[1]) == 0.0  # empty texts are not near-duplicates
    assert mh.jaccard_estimate(sigs[0], sigs[4]) == 0.0
    assert mh.jaccard_estimate(sigs[4], sigs[5]) == 1.0
    assert mh.signatures([], 16).shape == (0, 16)


def test_argument_errors():
    with pytest.raises(ValueError, match="unit"):
        mh.signatures(["x"], unit="token")
    with pytest.raises(ValueError, match="n must"):
        mh.signatures(["x"], n=0)
    with pytest.raises(ValueError, match="num_perm"):
        mh.signatures(["x"], num_perm=0)
    with pytest.raises(ValueError, match="scheme"):
        mh.signatures(["x"], scheme="affine64")
    with pytest.raises(ValueError, match="bands"):
        mh.band_hashes(np.zeros((2, 16), np.uint32), 5, 4)
    with pytest.raises(ValueError, match="equal length"):
        mh.jaccard_estimate(np.zeros(4, np.uint32), np.zeros(5, np.uint32))


# -- LSH parameters and band hashes ----------------------------------------------------------------


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.5, 128), (0.9, 256), (0.7, 64)])
def test_lsh_params_are_datasketchs(threshold, num_perm):
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    assert mh.lsh_params(threshold, num_perm) == (lsh.b, lsh.r)


def test_lsh_params_0_8_128():
    assert mh.lsh_params(0.8, 128) == (9, 13)


def test_band_hashes():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, size=(4000, 128), dtype=np.uint64).astype(np.uint32)
    sigs[1] = sigs[0]
    sigs[2] = sigs[0]
    sigs[2, 5 * 13 + 3] ^= 1  # one value of band 5 differs
    bands, rows = 9, 13
    bh = mh.band_hashes(sigs, bands, rows)
    assert bh.shape == (4000, bands) and bh.dtype == np.int64
    assert np.array_equal(bh[0], bh[1])
    assert [bh[0, k] == bh[2, k] for k in range(bands)] == [k != 5 for k in range(bands)]
    # the documented definition: xxh64 of the band's little-endian uint32 bytes, seed = band index
    k = 4
    want = mh.xxh64(sigs[7, k * rows : (k + 1) * rows].astype("<u4").tobytes(), k)
    assert int(bh[7, k]) == (want - (1 << 64) if want >= 1 << 63 else want)
    # distinct band contents -> distinct hashes, also across bands (the band index is the seed)
    assert len(set(bh[3:].ravel().tolist())) == bh[3:].size
    same_values = np.tile(sigs[:1, :rows], (1, bands))  # every band holds the same 13 values
    assert len(set(mh.band_hashes(same_values, bands, rows)[0].tolist())) == bands


def test_lsh_candidates_end_to_end():
    """Near-duplicates share a band; unrelated texts do not (the Spark side's grouping)."""
    rng = random.Random(2)
    vocab = [f"w{i}" for i in range(5000)]
    base = [rng.choice(vocab) for _ in range(400)]
    near = list(base)
    for i in rng.sample(range(400), 2):  # 2 words changed: Jaccard ~0.95, P(shared band) > 0.99
        near[i] = rng.choice(vocab)
    other = [rng.choice(vocab) for _ in range(400)]
    sigs = mh.signatures([" ".join(base), " ".join(near), " ".join(other)])
    b, r = mh.lsh_params(0.8, 128)
    bh = mh.band_hashes(sigs, b, r)
    assert (bh[0] == bh[1]).any()
    assert not (bh[0] == bh[2]).any()
