"""MinHash signatures of normalised word or character n-grams, fast, for near-duplicate removal.

What a signature is, exactly (so that anyone can recompute it in a few lines):

    normalise(text)        NFKC, lowercase, punctuation -> space, whitespace collapsed
    shingles(text, n, u)   word n-grams joined by one space, or code-point n-grams
    h(s)                   the 32-bit shingle hash, `shingle_hash(s, unit)`:
                             char: low 32 bits of xxh64(utf8(s))
                             word: ngram_hash(word_hash(w_1), ..., word_hash(w_m)), m = n words
                                   (or fewer: a text shorter than n words is one shingle), with
                             word_hash(w)  up to 16 bytes: low 32 bits of fmix64(lo * P1 + hi * P2
                                           + len * P3 mod 2**64), lo/hi = bytes 0-7/8-15 of
                                           utf8(w) little-endian (zero-padded), fmix64 =
                                           MurmurHash3's finalizer, P1..P3 = xxh64's primes;
                                           longer words: low 32 bits of xxh64(utf8(w))
                             ngram_hash(w) (c_m + sum_i c_i * w_i mod 2**64) >> 32, c_i the i-th
                                           output of SplitMix64 seeded with 0 (vector
                                           multiply-shift: strongly universal, one multiply-add
                                           per word)
    sig[k]                 min over the shingles s of perm_k(h(s)), datasketch's permutations

`perm_k` is datasketch's (>= 2.0) default "affine32" scheme, bit for bit: the hash is pre-mixed
with the 32-bit MurmurHash3 finalizer, then `a_k * h + b_k mod 2**32`, with (a_k, b_k) drawn from
`numpy.random.RandomState(seed)` exactly as `datasketch.MinHash._init_permutations` draws them.
`scheme="legacy"` gives datasketch's pre-2.0 `(a_k * h + b_k) mod (2**61 - 1)` cut to 32 bits
(also bit for bit, including datasketch's uint64 wrap-around of `a_k * h`).

Why the signatures differ from datasketch's: only the shingle hash. datasketch's default is
`sha1_hash32`, a cryptographic hash called from Python once per shingle (~1 us each); ours costs
a few ns in compiled code: every word is hashed once (a 16-byte mix, no byte loop) and each
n-gram is n multiply-adds of its word hashes, instead of hashing n words' bytes per shingle.
Both are uniform 32-bit hashes of the shingle (distinct shingles collide with probability
~2**-32 either way), so the Jaccard estimates are equally good. The tests prove the hash is the
ONLY difference: `signatures_like_datasketch` (sha1 swapped back in) equals
`datasketch.MinHash(num_perm, seed).update_batch(shingle bytes).hashvalues`, and `signatures`
equals `datasketch.MinHash(num_perm, seed, hashfunc=partial(shingle_hash, unit=unit))` on the
same shingle bytes. (Until issue 14 a word n-gram was hashed as xxh64 of its packed xxh64 word
hashes: the same estimator with other values, so signatures stored by that version do not
compare with these.)

Speed: Python does one C-level pass per document (`str.isascii`; NFKC + `lower()` for non-ASCII
texts only; `encode`). Everything else runs in one numba kernel over the batch's concatenated
UTF-8 bytes, with no Python object per word or shingle: ASCII case folding of the whole batch
8 bytes a step; for an ASCII text the separator scan takes 64 bytes a step (one vector compare
per run of ASCII separators gives a 64-bit mask; word starts and ends are its bit changes),
other texts go a code point a step; the word hashes, the n-gram hashes and the fmix32 pre-mix
are each one vectorised loop over the document; the permutations take two a pass over the
document's hashes (a min-reduction LLVM vectorises; on the reference machine, an AMD EPYC with
AVX-512, it is bound by the 32-bit multiplies, 128 x shingles of them, ~45% of the time).
Without numba, a vectorised numpy backend gives the same signatures, slower (per-document
normalisation in Python; hashing and permutations over the whole batch in numpy). See
benchmarks/bench_minhash.py for figures against datasketch and rensa.

Signatures are uint32 (N, num_perm): every value fits 32 bits in both schemes (datasketch
itself stores affine32 values as uint32), and it halves memory and shuffle bytes against uint64.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

Unit = Literal["word", "char"]
Scheme = Literal["affine32", "legacy"]
Backend = Literal["auto", "numba", "numpy"]

MAX_HASH = np.uint32(0xFFFFFFFF)  # datasketch's "empty" value: the signature of a document with no shingles
_MERSENNE_PRIME = (1 << 61) - 1
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1

# xxh64 constants (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md)
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5


# --------------------------------------------------------------------------------------------
# Normalisation and shingles (reference, pure Python)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _separator_table() -> np.ndarray:
    """uint8[0x110000]: 1 for every code point that normalise() turns into a word break.

    That is Unicode general category P* (punctuation) or `str.isspace()`; built once per process
    from this Python's `unicodedata` (~0.2 s), so the reference and the kernel agree by
    construction.
    """
    table = np.zeros(0x110000, dtype=np.uint8)
    for cp in range(0x110000):
        if _is_separator(chr(cp)):
            table[cp] = 1
    return table


def _is_separator(c: str) -> bool:
    return c.isspace() or unicodedata.category(c)[0] == "P"


def _ascii_separator_runs() -> list[tuple[int, int]]:
    """The ASCII separators as runs (first, last) of consecutive code points: the kernel's
    64-bytes-at-once classifier compares against these ranges."""
    runs: list[tuple[int, int]] = []
    for cp in range(128):
        if _is_separator(chr(cp)):
            if runs and runs[-1][1] == cp - 1:
                runs[-1] = (runs[-1][0], cp)
            else:
                runs.append((cp, cp))
    return runs


@functools.lru_cache(maxsize=1)
def _punctuation_map() -> dict[int, str]:
    table = _separator_table()
    return dict.fromkeys(np.flatnonzero(table).tolist(), " ")


def _nfkc_lower(text: str) -> str:
    """NFKC then lowercase (both C code in CPython; NFKC of ASCII text returns at once)."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return text.lower()


def _prepare_for_kernel(text: str) -> str:
    """What the numba kernel needs from Python: NFKC + lower() of non-ASCII texts only (for
    ASCII, NFKC is the identity and lower() is A-Z -> a-z, which the kernel does itself)."""
    return text if text.isascii() else unicodedata.normalize("NFKC", text).lower()


def normalise(text: str | None) -> str:
    """The text shingles are cut from: exactly, in this order,

    1. `unicodedata.normalize("NFKC", text)` (full-width letters, ligatures, compatibility
       spaces such as U+00A0 and U+3000 fold to their plain forms);
    2. `str.lower()`;
    3. every character of Unicode general category P* (Pc Pd Ps Pe Pi Pf Po: `.,;:!?'"-_()[]{}`,
       `«»`, `“”`, `—`, `。`, `、`...) becomes a space. Symbols (S*: `$+<=>^|~`, emoji) and
       combining marks (M*, essential in e.g. Devanagari) are kept;
    4. runs of whitespace (`str.isspace()`) become one space, and leading/trailing ones go.

    None counts as "". Unicode tables are those of the running Python (3.11: Unicode 14), so
    the Spark driver and workers must run the same Python minor version.
    """
    if not text:
        return ""
    return " ".join(_nfkc_lower(text).translate(_punctuation_map()).split())


def _tokens(norm: str, unit: Unit) -> list[str]:
    if unit == "word":
        return norm.split(" ")
    if unit == "char":
        return list(norm)
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def shingles(text: str | None, n: int = 5, unit: Unit = "word") -> list[str]:
    """The n-grams of normalise(text), in order, duplicates kept (MinHash ignores them).

    `unit="word"`: n consecutive words joined by one space. `unit="char"`: n consecutive code
    points (not grapheme clusters) of the normalised text, spaces included. A text with fewer
    than n tokens is one shingle, the whole normalised text (a 3-word caption still gets a
    signature, and equals only the same 3 words); an empty normalised text has no shingles.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    norm = normalise(text)
    toks = _tokens(norm, unit)
    if not norm:
        return []
    if len(toks) <= n:
        return [norm]
    sep = " " if unit == "word" else ""
    return [sep.join(toks[i : i + n]) for i in range(len(toks) - n + 1)]


# --------------------------------------------------------------------------------------------
# Hashes (reference, pure Python)
# --------------------------------------------------------------------------------------------


def _rotl64(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK64


def _round64(acc: int, lane: int) -> int:
    return (_rotl64((acc + lane * _P2) & _MASK64, 31) * _P1) & _MASK64


def xxh64(data: bytes, seed: int = 0) -> int:
    """xxHash64 of `data` (pure Python reference; equals `xxhash.xxh64_intdigest(data, seed)`)."""
    n = len(data)
    i = 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _MASK64, (seed + _P2) & _MASK64, seed & _MASK64, (seed - _P1) & _MASK64]
        while i + 32 <= n:
            for j in range(4):
                v[j] = _round64(v[j], int.from_bytes(data[i + 8 * j : i + 8 * j + 8], "little"))
            i += 32
        h = (_rotl64(v[0], 1) + _rotl64(v[1], 7) + _rotl64(v[2], 12) + _rotl64(v[3], 18)) & _MASK64
        for x in v:
            h = ((h ^ _round64(0, x)) * _P1 + _P4) & _MASK64
    else:
        h = (seed + _P5) & _MASK64
    h = (h + n) & _MASK64
    while i + 8 <= n:
        h ^= _round64(0, int.from_bytes(data[i : i + 8], "little"))
        h = (_rotl64(h, 27) * _P1 + _P4) & _MASK64
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i : i + 4], "little") * _P1) & _MASK64
        h = (_rotl64(h, 23) * _P2 + _P3) & _MASK64
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _MASK64
        h = (_rotl64(h, 11) * _P1) & _MASK64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _MASK64
    h ^= h >> 29
    h = (h * _P3) & _MASK64
    return h ^ (h >> 32)


_FMIX64_C1, _FMIX64_C2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53  # MurmurHash3's 64-bit finalizer
SHORT_WORD = 16  # bytes: longer words are hashed with xxh64


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * _FMIX64_C1) & _MASK64
    h ^= h >> 33
    h = (h * _FMIX64_C2) & _MASK64
    return h ^ (h >> 33)


def word_hash(word: bytes | str) -> int:
    """The 32-bit hash of one word (its UTF-8 bytes, already normalised), as `signatures` uses it.

    Up to SHORT_WORD (16) bytes: lo, hi = the bytes 0-7 and 8-15 as little-endian integers
    (missing bytes are 0), then the low 32 bits of fmix64(lo * P1 + hi * P2 + length * P3
    mod 2**64), fmix64 being MurmurHash3's 64-bit finalizer and P1..P3 xxh64's primes: an
    injective combination of the (lo, hi) pair for a given length, then a bijective mix, so a
    collision is one of the final 32-bit cut. Longer words: low 32 bits of xxh64 (seed 0).
    """
    if isinstance(word, str):
        word = word.encode("utf-8", "surrogatepass")
    n = len(word)
    if n > SHORT_WORD:
        return xxh64(word) & _MASK32
    lo = int.from_bytes(word[:8], "little")
    hi = int.from_bytes(word[8:], "little")
    return _fmix64((lo * _P1 + hi * _P2 + n * _P3) & _MASK64) & _MASK32


def _splitmix64(i: int) -> int:
    """Output i (0-based) of SplitMix64 seeded with 0."""
    z = ((i + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=32)
def ngram_coefficients(count: int) -> np.ndarray:
    """c_0 .. c_{count-1}, the 64-bit multipliers of `ngram_hash`: SplitMix64's first outputs
    (seed 0), uint64, read-only."""
    c = np.array([_splitmix64(i) for i in range(count)], dtype=np.uint64)
    c.flags.writeable = False
    return c


def ngram_hash(word_hashes: Sequence[int]) -> int:
    """The 32-bit hash of a word n-gram from its m 32-bit word hashes w_0 .. w_{m-1}:

        (c_m + c_0 * w_0 + ... + c_{m-1} * w_{m-1} mod 2**64) >> 32

    with c_i = `ngram_coefficients`: vector multiply-shift (Dietzfelbinger; Thorup, "High Speed
    Hashing for Integers and Strings", 2015), strongly universal for random c, i.e. any two
    different n-grams collide with probability 2**-32, and one multiply-add per word.
    """
    m = len(word_hashes)
    c = ngram_coefficients(m + 1)
    acc = int(c[m])
    for ci, w in zip(c.tolist(), word_hashes):
        acc += ci * (int(w) & _MASK32)
    return (acc & _MASK64) >> 32


def shingle_hash(shingle: bytes | str, unit: Unit = "word") -> int:
    """The 32-bit shingle hash of `signatures`.

    unit="word": `ngram_hash` of the `word_hash`es of the shingle's space-separated words, i.e.
    every word is hashed once and each n-gram costs n multiply-adds, not a hash of its bytes.
    unit="char": low 32 bits of xxh64 (seed 0) of the shingle's UTF-8 bytes. Pass
    `functools.partial(shingle_hash, unit=...)` as datasketch's `hashfunc` to reproduce
    `signatures` with `datasketch.MinHash`.
    """
    if isinstance(shingle, str):
        shingle = shingle.encode("utf-8", "surrogatepass")
    if unit == "char":
        return xxh64(shingle) & _MASK32
    if unit != "word":
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    return ngram_hash([word_hash(w) for w in shingle.split(b" ")])


# --------------------------------------------------------------------------------------------
# Permutations: datasketch's, bit for bit
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def permutations(num_perm: int = 128, seed: int = 1, scheme: Scheme = "affine32") -> tuple[np.ndarray, np.ndarray]:
    """(a, b) as `datasketch.MinHash(num_perm, seed, scheme=scheme).permutations` (read-only).

    affine32: a, b uint32, a odd. legacy: a, b uint64 below 2**61 - 1. Same RandomState calls,
    in the same order, as datasketch's `_init_permutations`.
    """
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    gen = np.random.RandomState(seed)
    if scheme == "affine32":
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    elif scheme == "legacy":
        p = np.uint64(_MERSENNE_PRIME)
        ab = np.array([(gen.randint(1, p, dtype=np.uint64), gen.randint(0, p, dtype=np.uint64))
                       for _ in range(num_perm)], dtype=np.uint64)
        a, b = np.ascontiguousarray(ab[:, 0]), np.ascontiguousarray(ab[:, 1])
    else:
        raise ValueError(f"scheme must be 'affine32' or 'legacy', got {scheme!r}")
    a.flags.writeable = False
    b.flags.writeable = False
    return a, b


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch's affine32 pre-mix (uint32 in, uint32 out)."""
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _permute_min(hashes: Iterable[int], num_perm: int, seed: int, scheme: Scheme) -> np.ndarray:
    """One signature from 32-bit shingle hashes, datasketch's `update_batch` arithmetic."""
    a, b = permutations(num_perm, seed, scheme)
    hv = np.fromiter(hashes, dtype=np.uint64)
    if hv.size == 0:
        return np.full(num_perm, MAX_HASH, dtype=np.uint32)
    if scheme == "affine32":
        phv = _fmix32_np(hv)[:, None] * a + b
    else:
        phv = ((hv[:, None] * a + b) % np.uint64(_MERSENNE_PRIME)) & np.uint64(_MASK32)
    return phv.min(axis=0).astype(np.uint32)


def signatures_like_datasketch(texts: Sequence[str | None], num_perm: int = 128, n: int = 5,
                               unit: Unit = "word", seed: int = 1,
                               scheme: Scheme = "affine32") -> np.ndarray:
    """`signatures` with datasketch's default shingle hash (`sha1_hash32`) instead of xxh64.

    Equals `datasketch.MinHash(num_perm, seed).update_batch(s.encode() for s in shingles)`
    .hashvalues for every text. Slow (a Python loop over shingles): for tests and audits.
    """
    from datasketch.hashfunc import sha1_hash32

    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for i, text in enumerate(texts):
        hs = (sha1_hash32(s.encode("utf-8", "surrogatepass")) for s in shingles(text, n, unit))
        out[i] = _permute_min(hs, num_perm, seed, scheme)
    return out


def signatures_reference(texts: Sequence[str | None], num_perm: int = 128, n: int = 5,
                         unit: Unit = "word", seed: int = 1, scheme: Scheme = "affine32") -> np.ndarray:
    """`signatures`, the slow obvious way (pure-Python xxh64 per shingle): for tests."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for i, text in enumerate(texts):
        out[i] = _permute_min((shingle_hash(s, unit) for s in shingles(text, n, unit)), num_perm, seed, scheme)
    return out


# --------------------------------------------------------------------------------------------
# Batch encoding shared by both fast backends
# --------------------------------------------------------------------------------------------


def _encode_batch(texts: Iterable[str | None], prepare, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated UTF-8 bytes of prepare(text) for every text (+ `pad` zero bytes, and with a
    pad up to a multiple of 8 bytes), writable, and int64 offsets (N + 1) of the texts in it.

    `surrogatepass` keeps lone surrogates (impossible in Arrow strings, possible in Python)
    as their 3-byte forms instead of raising.
    """
    encoded = [prepare(t).encode("utf-8", "surrogatepass") if t else b"" for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    if pad:
        encoded.append(bytes(pad + (-(int(offsets[-1]) + pad) % 8)))  # whole 8-byte words
    buf = np.frombuffer(bytearray().join(encoded), dtype=np.uint8)  # writable: the kernel folds case in place
    return buf, offsets


def _check_args(num_perm: int, n: int, unit: str) -> None:
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


# --------------------------------------------------------------------------------------------
# numpy backend: vectorised over the batch (fallback when numba is missing)
# --------------------------------------------------------------------------------------------

_U64 = np.uint64


def _rotl_np(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _U64(r)) | (x >> _U64(64 - r))


def _round_np(acc: np.ndarray, lane: np.ndarray) -> np.ndarray:
    return _rotl_np(acc + lane * _U64(_P2), 31) * _U64(_P1)


def _read_le(buf: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """Little-endian unsigned `width`-byte words of `buf` at byte positions `pos` (uint64)."""
    g = buf[pos[:, None] + np.arange(width)]
    return g.view("<u8" if width == 8 else "<u4")[:, 0].astype(np.uint64)


def xxh64_spans(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """xxh64 of every byte span buf[starts[i] : starts[i] + lengths[i]], vectorised (uint64).

    Python loops run over byte positions inside a span (up to max(length) / 32 stripe rounds,
    3 word rounds, 3 byte rounds), never over spans.
    """
    buf = np.concatenate([np.asarray(buf, dtype=np.uint8).ravel(), np.zeros(8, dtype=np.uint8)])
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    m = starts.size
    h = np.full(m, (seed + _P5) & _MASK64, dtype=np.uint64)
    pos = starts.copy()
    stripes = lengths // 32
    big = np.flatnonzero(stripes > 0)
    if big.size:
        order = big[np.argsort(-stripes[big], kind="stable")]
        ns = stripes[order]
        v = np.empty((4, order.size), dtype=np.uint64)
        v[0] = (seed + _P1 + _P2) & _MASK64
        v[1] = (seed + _P2) & _MASK64
        v[2] = seed & _MASK64
        v[3] = (seed - _P1) & _MASK64
        for r in range(int(ns[0])):
            k = int(np.count_nonzero(ns > r))  # ns is sorted descending: the active spans are a prefix
            p = pos[order[:k]]
            for j in range(4):
                v[j, :k] = _round_np(v[j, :k], _read_le(buf, p + 8 * j, 8))
            pos[order[:k]] += 32
        hb = _rotl_np(v[0], 1) + _rotl_np(v[1], 7) + _rotl_np(v[2], 12) + _rotl_np(v[3], 18)
        for j in range(4):
            hb = (hb ^ _round_np(np.zeros_like(v[j]), v[j])) * _U64(_P1) + _U64(_P4)
        h[order] = hb
    h += lengths.astype(np.uint64)
    end = starts + lengths
    for _ in range(3):
        idx = np.flatnonzero(pos + 8 <= end)
        if not idx.size:
            break
        k1 = _round_np(np.zeros(idx.size, dtype=np.uint64), _read_le(buf, pos[idx], 8))
        h[idx] = _rotl_np(h[idx] ^ k1, 27) * _U64(_P1) + _U64(_P4)
        pos[idx] += 8
    idx = np.flatnonzero(pos + 4 <= end)
    if idx.size:
        h[idx] = _rotl_np(h[idx] ^ (_read_le(buf, pos[idx], 4) * _U64(_P1)), 23) * _U64(_P2) + _U64(_P3)
        pos[idx] += 4
    for _ in range(3):
        idx = np.flatnonzero(pos < end)
        if not idx.size:
            break
        h[idx] = _rotl_np(h[idx] ^ (buf[pos[idx]].astype(np.uint64) * _U64(_P5)), 11) * _U64(_P1)
        pos[idx] += 1
    h ^= h >> _U64(33)
    h *= _U64(_P2)
    h ^= h >> _U64(29)
    h *= _U64(_P3)
    h ^= h >> _U64(32)
    return h


def _word_hashes_np(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`word_hash` of every byte span buf[starts[i] : starts[i] + lengths[i]], vectorised
    (uint64 holding 32-bit values)."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = np.concatenate([np.asarray(buf, dtype=np.uint8).ravel(), np.zeros(SHORT_WORD, dtype=np.uint8)])
    col = np.arange(SHORT_WORD)
    raw = padded[starts[:, None] + col]
    raw[col >= lengths[:, None]] = 0
    lohi = raw.view("<u8")  # (words, 2): bytes 0-7 and 8-15, little-endian
    with np.errstate(over="ignore"):
        h = lohi[:, 0] * _U64(_P1) + lohi[:, 1] * _U64(_P2) + lengths.astype(np.uint64) * _U64(_P3)
        h ^= h >> _U64(33)
        h *= _U64(_FMIX64_C1)
        h ^= h >> _U64(33)
        h *= _U64(_FMIX64_C2)
        h ^= h >> _U64(33)
    long = np.flatnonzero(lengths > SHORT_WORD)
    if long.size:
        h[long] = xxh64_spans(buf, starts[long], lengths[long])
    return h & _U64(_MASK32)


def _shingle_hashes_np(buf: np.ndarray, offsets: np.ndarray, n: int, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
    """(doc index, 32-bit shingle hash) of every shingle of already-normalised UTF-8 documents,
    sorted by document."""
    ndocs = offsets.size - 1
    doc_len = np.diff(offsets)
    if unit == "word":  # single spaces, none leading or trailing: words end at spaces and doc ends
        spaces = np.flatnonzero(buf == 32)
        nonempty = np.flatnonzero(doc_len > 0)
        tstart = np.sort(np.concatenate([offsets[nonempty], spaces + 1]))
        tend = np.sort(np.concatenate([spaces, offsets[nonempty + 1]]))
    else:  # code points start at every byte that is not a UTF-8 continuation byte
        tstart = np.flatnonzero((buf & 0xC0) != 0x80)
    tdoc = np.searchsorted(offsets, tstart, side="right") - 1
    ntok = np.bincount(tdoc, minlength=ndocs) if tstart.size else np.zeros(ndocs, dtype=np.int64)
    first = np.zeros(ndocs + 1, dtype=np.int64)
    np.cumsum(ntok, out=first[1:])
    m = np.minimum(ntok, n)  # tokens per shingle: n, or all of a shorter document's
    local = np.arange(tstart.size) - first[tdoc]
    lead = np.flatnonzero(local <= ntok[tdoc] - m[tdoc])  # tokens that start a shingle, in doc order
    docs = tdoc[lead]
    if unit == "word":
        th = _word_hashes_np(buf, tstart, tend - tstart)  # each word once
        c = ngram_coefficients(n + 1)
        md = m[docs]
        hv = c[md]  # then c_m + sum of c_i * w_i over the m words of each shingle
        last = th.size - 1
        with np.errstate(over="ignore"):
            for i in range(n):
                term = c[i] * th[np.minimum(lead + i, last)]
                hv += np.where(i < md, term, _U64(0))
        return docs, hv >> _U64(32)
    else:
        bounds = np.append(tstart, buf.size)  # documents abut: a token ends where the next one starts
        hv = xxh64_spans(buf, tstart[lead], bounds[lead + m[docs]] - tstart[lead])
    return docs, hv & _U64(_MASK32)


def _signatures_numpy(texts, num_perm, n, unit, seed, scheme, chunk_cells: int = 1 << 22) -> np.ndarray:
    buf, offsets = _encode_batch(texts, normalise)
    ndocs = offsets.size - 1
    out = np.full((ndocs, num_perm), MAX_HASH, dtype=np.uint32)
    docs, hv = _shingle_hashes_np(buf, offsets, n, unit)
    if not docs.size:
        return out
    a, b = permutations(num_perm, seed, scheme)
    if scheme == "affine32":
        hv = _fmix32_np(hv)
    step = max(1, chunk_cells // num_perm)
    for lo in range(0, docs.size, step):  # bounded memory: step x num_perm cells at a time
        d = docs[lo : lo + step]
        h = hv[lo : lo + step, None]
        if scheme == "affine32":
            phv = h * a + b
        else:
            phv = (((h * a + b) % _U64(_MERSENNE_PRIME)) & _U64(_MASK32)).astype(np.uint32)
        seg = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        mins = np.minimum.reduceat(phv, seg, axis=0)
        rows = d[seg]
        out[rows] = np.minimum(out[rows], mins)
    return out


# --------------------------------------------------------------------------------------------
# numba backend: one compiled pass per document (the same arithmetic as the reference above)
# --------------------------------------------------------------------------------------------

try:  # numba is optional: without it the numpy backend gives the same signatures, slower
    import numba as _numba
except ImportError:  # pragma: no cover - depends on the environment
    _numba = None


def _jit(fn):
    """numba.njit with an on-disk cache when this file's folder (or NUMBA_CACHE_DIR) allows one."""
    if _numba is None:
        return fn
    try:
        return _numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no cache locator, e.g. imported from a zip (spark --py-files)
        return _numba.njit(nogil=True)(fn)


_U64_P1, _U64_P2, _U64_P3, _U64_P4, _U64_P5 = (np.uint64(x) for x in (_P1, _P2, _P3, _P4, _P5))
_U64_V1 = np.uint64((_P1 + _P2) & _MASK64)
_U64_V4 = np.uint64((-_P1) & _MASK64)
_U64_M32 = np.uint64(_MASK32)
_U64_MERSENNE = np.uint64(_MERSENNE_PRIME)
_U32_C1, _U32_C2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_U32_MAX = np.uint32(0xFFFFFFFF)


@_jit
def _nb_rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@_jit
def _nb_round(acc, lane):
    return _nb_rotl(acc + lane * _U64_P2, 31) * _U64_P1


@_jit
def _nb_read64(b, i):
    """Little-endian uint64 at byte i (unsigned indices: no negative-index fix-up, so LLVM
    fuses the eight byte loads into one)."""
    u = np.uint64
    j = u(i)
    return (u(b[j]) | (u(b[j + u(1)]) << u(8)) | (u(b[j + u(2)]) << u(16)) | (u(b[j + u(3)]) << u(24))
            | (u(b[j + u(4)]) << u(32)) | (u(b[j + u(5)]) << u(40)) | (u(b[j + u(6)]) << u(48))
            | (u(b[j + u(7)]) << u(56)))


@_jit
def _nb_read32(b, i):
    u = np.uint64
    j = u(i)
    return u(b[j]) | (u(b[j + u(1)]) << u(8)) | (u(b[j + u(2)]) << u(16)) | (u(b[j + u(3)]) << u(24))


_U64_7F = np.uint64(0x7F7F7F7F7F7F7F7F)
_U64_3F = np.uint64(0x3F3F3F3F3F3F3F3F)
_U64_25 = np.uint64(0x2525252525252525)
_U64_80 = np.uint64(0x8080808080808080)


@_jit
def _nb_fold(x):
    """ASCII A-Z -> a-z in every byte of x at once (SWAR); bytes >= 0x80 are left alone."""
    h7 = x & _U64_7F
    upper = (h7 + _U64_3F) & ~(h7 + _U64_25) & ~x & _U64_80
    return x | (upper >> np.uint64(2))


@_jit
def _nb_xxh64(b, start, length, fold):
    """xxh64 (seed 0) of b[start : start + length], ASCII-lowercased on the fly if fold."""
    i = start
    end = start + length
    if length >= 32:
        v1 = _U64_V1
        v2 = _U64_P2
        v3 = np.uint64(0)
        v4 = _U64_V4
        while i + 32 <= end:
            w1 = _nb_read64(b, i)
            w2 = _nb_read64(b, i + 8)
            w3 = _nb_read64(b, i + 16)
            w4 = _nb_read64(b, i + 24)
            if fold:
                w1 = _nb_fold(w1)
                w2 = _nb_fold(w2)
                w3 = _nb_fold(w3)
                w4 = _nb_fold(w4)
            v1 = _nb_round(v1, w1)
            v2 = _nb_round(v2, w2)
            v3 = _nb_round(v3, w3)
            v4 = _nb_round(v4, w4)
            i += 32
        h = _nb_rotl(v1, 1) + _nb_rotl(v2, 7) + _nb_rotl(v3, 12) + _nb_rotl(v4, 18)
        h = (h ^ _nb_round(np.uint64(0), v1)) * _U64_P1 + _U64_P4
        h = (h ^ _nb_round(np.uint64(0), v2)) * _U64_P1 + _U64_P4
        h = (h ^ _nb_round(np.uint64(0), v3)) * _U64_P1 + _U64_P4
        h = (h ^ _nb_round(np.uint64(0), v4)) * _U64_P1 + _U64_P4
    else:
        h = _U64_P5
    h += np.uint64(length)
    while i + 8 <= end:
        w = _nb_read64(b, i)
        if fold:
            w = _nb_fold(w)
        h ^= _nb_round(np.uint64(0), w)
        h = _nb_rotl(h, 27) * _U64_P1 + _U64_P4
        i += 8
    if i + 4 <= end:
        w = _nb_read32(b, i)
        if fold:
            w = _nb_fold(w)
        h ^= w * _U64_P1
        h = _nb_rotl(h, 23) * _U64_P2 + _U64_P3
        i += 4
    while i < end:
        w = np.uint64(b[i])
        if fold:
            w = _nb_fold(w)
        h ^= w * _U64_P5
        h = _nb_rotl(h, 11) * _U64_P1
        i += 1
    h ^= h >> np.uint64(33)
    h *= _U64_P2
    h ^= h >> np.uint64(29)
    h *= _U64_P3
    h ^= h >> np.uint64(32)
    return h


@_jit
def _nb_fmix32(h):
    h ^= h >> np.uint32(16)
    h = np.uint32(h * _U32_C1)
    h ^= h >> np.uint32(13)
    h = np.uint32(h * _U32_C2)
    h ^= h >> np.uint32(16)
    return np.uint32(h)


_U64_F1, _U64_F2 = np.uint64(_FMIX64_C1), np.uint64(_FMIX64_C2)


@_jit
def _nb_fmix64(h):
    h ^= h >> np.uint64(33)
    h *= _U64_F1
    h ^= h >> np.uint64(33)
    h *= _U64_F2
    h ^= h >> np.uint64(33)
    return h


@_jit
def _nb_low_bytes(x, n):
    """The low n bytes of x (n <= 0: none, n >= 8: all). Branch-free, no shift by 64."""
    k = min(max(n, 0), 7)
    mask = (np.uint64(1) << np.uint64(8 * k)) - np.uint64(1)
    return x & (mask if n < 8 else ~np.uint64(0))


@_jit
def _nb_utf8(buf, i, c):
    """The code point of the multi-byte UTF-8 sequence at buf[i] (lead byte c >= 0x80) and its length."""
    if c < 0xE0:
        return (np.int64(c & 0x1F) << 6) | np.int64(buf[i + 1] & 0x3F), 2
    if c < 0xF0:
        return ((np.int64(c & 0x0F) << 12) | (np.int64(buf[i + 1] & 0x3F) << 6)
                | np.int64(buf[i + 2] & 0x3F)), 3
    return ((np.int64(c & 0x07) << 18) | (np.int64(buf[i + 1] & 0x3F) << 12)
            | (np.int64(buf[i + 2] & 0x3F) << 6) | np.int64(buf[i + 3] & 0x3F)), 4


@_jit
def _nb_fold_ascii(buf):
    """ASCII A-Z -> a-z over the whole (writable, 8-byte padded) buffer, 8 bytes a step; bytes
    >= 0x80 (every byte of a multi-byte UTF-8 sequence) are left alone."""
    words = buf.view(np.uint64)
    for i in range(words.size):
        words[i] = _nb_fold(words[i])


@_jit
def _nb_is_ascii(buf, s, e):
    """Whether buf[s:e] has no byte >= 0x80 (8 bytes a load: a byte-wise loop is ~30x slower)."""
    acc = np.uint64(0)
    i = s
    while i + 8 <= e:
        acc |= _nb_read64(buf, i)
        i += 8
    while i < e:
        acc |= np.uint64(buf[i])
        i += 1
    return (acc & _U64_80) == 0


if _numba is not None:
    from llvmlite import ir as _ir
    from numba.core import types as _nbtypes
    from numba.cpython.unsafe.numbers import trailing_zeros as _nb_ctz
    from numba.extending import intrinsic as _intrinsic

    _SEP_RUNS = _ascii_separator_runs()

    @_intrinsic
    def _nb_sep_mask64(typingctx, buf, i):
        """uint64 whose bit k says whether ASCII byte buf[i + k] is a separator, k < 64: one
        64-byte vector load and a compare per run of `_ascii_separator_runs` (plain LLVM vector
        IR: AVX-512 compares into a mask register, other targets get their own lowering)."""
        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            vty = _ir.VectorType(_ir.IntType(8), 64)
            vptr = builder.bitcast(builder.gep(ary.data, [args[1]]), vty.as_pointer())
            if getattr(vptr.type, "is_opaque", False):
                v = builder.load(vptr, align=1, typ=vty)
            else:
                v = builder.load(vptr, align=1)
            hit = None
            for lo, hi in _SEP_RUNS:
                if lo == hi:
                    c = builder.icmp_unsigned("==", v, _ir.Constant(vty, [lo] * 64))
                else:
                    c = builder.icmp_unsigned("<=", builder.sub(v, _ir.Constant(vty, [lo] * 64)),
                                              _ir.Constant(vty, [hi - lo] * 64))
                hit = c if hit is None else builder.or_(hit, c)
            return builder.bitcast(hit, _ir.IntType(64))

        return _nbtypes.uint64(buf, i), codegen

    @_intrinsic
    def _nb_popcount(typingctx, x):
        """The number of set bits of a uint64, as int64 (LLVM's ctpop)."""
        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])

        return _nbtypes.int64(_nbtypes.uint64), codegen


_ALL64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_KERNEL_PAD = 64  # zero bytes after the last text: the kernel reads up to 64 bytes past a text's start


@_jit
def _nb_word_bounds(buf, s, e, cls, tb):
    """The words of buf[s:e] (maximal runs of non-separator code points): tb = start, end,
    start, end, ...; returns the word count. ASCII text (buf readable to e + 64): 64 bytes a
    step, as a bit mask of separators (`_nb_sep_mask64`); the word starts and ends are where
    the mask changes, taken lowest bit first. Other text: a code point a step, without a
    branch per byte: the position is stored unconditionally and the counter only advances
    where the separator flag changes."""
    nb = 0
    if _nb_is_ascii(buf, s, e):
        carry = np.uint64(1)  # a separator before the text
        i = s
        while i < e:
            m = _nb_sep_mask64(buf, i)
            if e - i < 64:
                m |= _ALL64 << np.uint64(e - i)  # past the end counts as separators
            ch = m ^ ((m << np.uint64(1)) | carry)
            carry = m >> np.uint64(63)
            k = nb
            nb += _nb_popcount(ch)
            while ch:  # 4 unconditional stores a round: positions past nb are scratch
                tb[k] = i + np.int64(_nb_ctz(ch))
                ch &= ch - np.uint64(1)
                tb[k + 1] = i + np.int64(_nb_ctz(ch))
                ch &= ch - np.uint64(1)
                tb[k + 2] = i + np.int64(_nb_ctz(ch))
                ch &= ch - np.uint64(1)
                tb[k + 3] = i + np.int64(_nb_ctz(ch))
                ch &= ch - np.uint64(1)
                k += 4
            i += 64
        if carry == 0:
            tb[nb] = e
            nb += 1
        return nb >> 1
    prev = np.int64(1)
    i = s
    while i < e:
        c = buf[i]
        if c < 0x80:
            sp = np.int64(cls[c])
            L = 1
        else:
            cp, L = _nb_utf8(buf, i, c)
            sp = np.int64(cls[cp])
        tb[nb] = i
        nb += prev ^ sp
        prev = sp
        i += L
    if prev == 0:
        tb[nb] = e
        nb += 1
    return nb >> 1


@_jit
def _nb_word_hashes(buf, tb, ntok, th, lo, hi, ln):
    """th[t] = word_hash of word t (tb from _nb_word_bounds; buf already case-folded). The first
    16 bytes of every word (scalar loads), then all of them mixed in one branch-free loop
    (vectorised), then words over SHORT_WORD bytes redone with xxh64. lo, hi, ln: scratch."""
    for t in range(ntok):
        ws = tb[2 * t]
        lo[t] = _nb_read64(buf, ws)
        hi[t] = _nb_read64(buf, ws + 8)
        ln[t] = tb[2 * t + 1] - ws
    nlong = 0
    for t in range(ntok):
        L = ln[t]
        x = _nb_low_bytes(lo[t], L) * _U64_P1 + _nb_low_bytes(hi[t], L - 8) * _U64_P2 + np.uint64(L) * _U64_P3
        th[t] = _nb_fmix64(x) & _U64_M32
        nlong += L > SHORT_WORD
    if nlong:
        for t in range(ntok):
            if ln[t] > SHORT_WORD:
                th[t] = _nb_xxh64(buf, tb[2 * t], ln[t], False) & _U64_M32


@_jit
def _nb_ngram_hashes(th, m, ns, coef, hh):
    """hh[j] = ngram_hash(th[j : j + m]) for j < ns: c_m + sum of c_i * w_{j+i}, high 32 bits;
    one vectorised multiply-add loop per word position."""
    base = coef[m]
    for j in range(ns):
        hh[j] = base
    for i in range(m):
        ci = coef[i]
        for j in range(ns):
            hh[j] += ci * th[j + i]
    for j in range(ns):
        hh[j] >>= np.uint64(32)


@_jit
def _nb_char_tokens(buf, s, e, cls, norm, tstart):
    """Write normalise(buf[s:e]) into norm (separator runs -> one space, ASCII A-Z -> a-z) and
    the start of each of its code points into tstart (plus the end at tstart[count]); returns
    the code point count."""
    pos = 0
    ntok = 0
    pending = False
    i = s
    while i < e:
        c = buf[i]
        if c < 0x80:
            L = 1
            sp = cls[c]
        else:
            cp, L = _nb_utf8(buf, i, c)
            sp = cls[cp]
        if sp:
            pending = pos > 0
            i += L
            continue
        if pending:
            tstart[ntok] = pos
            ntok += 1
            norm[pos] = 32
            pos += 1
            pending = False
        tstart[ntok] = pos
        ntok += 1
        if L == 1:
            norm[pos] = c + 32 if 65 <= c <= 90 else c
        else:
            for k in range(L):
                norm[pos + k] = buf[i + k]
        pos += L
        i += L
    tstart[ntok] = pos
    return ntok


@_jit
def _nb_affine32_min(hh, ns, a, b, h32, out, d):
    """out[d, k] = min over j < ns of a_k * fmix32(hh[j]) + b_k mod 2**32 (datasketch's affine32).
    Two permutations per pass over the shingles: each loaded hash serves two multiply-adds, and
    the inner loop (a min-reduction over j) vectorises."""
    for j in range(ns):
        h32[j] = _nb_fmix32(np.uint32(hh[j]))
    num_perm = a.size
    k = 0
    while k + 2 <= num_perm:
        a0 = a[k]
        b0 = b[k]
        a1 = a[k + 1]
        b1 = b[k + 1]
        m0 = _U32_MAX
        m1 = _U32_MAX
        for j in range(ns):
            h = h32[j]
            m0 = min(m0, np.uint32(a0 * h + b0))
            m1 = min(m1, np.uint32(a1 * h + b1))
        out[d, k] = m0
        out[d, k + 1] = m1
        k += 2
    if k < num_perm:
        a0 = a[k]
        b0 = b[k]
        m0 = _U32_MAX
        for j in range(ns):
            m0 = min(m0, np.uint32(a0 * h32[j] + b0))
        out[d, k] = m0


@_jit
def _nb_legacy_min(hh, ns, a, b, out, d):
    """out[d, k] = min over j < ns of (a_k * hh[j] + b_k mod 2**64) mod (2**61 - 1), low 32 bits
    (datasketch's legacy scheme, including its uint64 wrap-around of a_k * h)."""
    for k in range(a.size):
        ak = a[k]
        bk = b[k]
        mn = np.uint64(_U32_MAX)
        for j in range(ns):
            x = ak * hh[j] + bk  # wraps mod 2**64, as in datasketch's uint64 numpy code
            x = (x & _U64_MERSENNE) + (x >> np.uint64(61))  # 2**61 = 1 mod p: a branch-free x % p
            x = x - _U64_MERSENNE if x >= _U64_MERSENNE else x
            mn = min(mn, x & _U64_M32)
        out[d, k] = np.uint32(mn)


@_jit
def _nb_signatures(buf, offsets, cls, n, char_unit, coef, a32, b32, a64, b64, legacy, out):
    """Fill out[d] for every document d of buf[offsets[d]:offsets[d + 1]] (NFKC'd and lowercased
    unless ASCII; ASCII A-Z are folded here, in place, so buf must be writable and a whole
    number of 8-byte words). cls: the separator table, see _separator_table. coef:
    ngram_coefficients(n + 1). Scratch memory: ~30 bytes per byte of the longest document."""
    _nb_fold_ascii(buf)
    ndocs = offsets.size - 1
    maxlen = 0
    for d in range(ndocs):
        maxlen = max(maxlen, offsets[d + 1] - offsets[d])
    size = maxlen + 2
    if char_unit:
        norm = np.empty(size + 8, dtype=np.uint8)
        tstart = np.empty(size, dtype=np.int64)
        nsh = size  # shingles: at most one per code point
        tb = np.empty(1, dtype=np.int64)
        nw = 1
    else:
        norm = np.empty(1, dtype=np.uint8)
        tstart = np.empty(1, dtype=np.int64)
        tb = np.empty(size + 8, dtype=np.int64)  # word starts and ends: at most bytes + 1, + 3 scratch
        nw = size // 2 + 1  # words: at most (bytes + 1) / 2
        nsh = nw
    th = np.empty(nw, dtype=np.uint64)
    lo = np.empty(nw, dtype=np.uint64)
    hi = np.empty(nw, dtype=np.uint64)
    ln = np.empty(nw, dtype=np.int64)
    hh = np.empty(nsh, dtype=np.uint64)
    h32 = np.empty(nsh, dtype=np.uint32)
    num_perm = out.shape[1]
    for d in range(ndocs):
        if char_unit:
            ntok = _nb_char_tokens(buf, offsets[d], offsets[d + 1], cls, norm, tstart)
        else:
            ntok = _nb_word_bounds(buf, offsets[d], offsets[d + 1], cls, tb)
        if ntok == 0:
            for k in range(num_perm):  # datasketch's empty MinHash
                out[d, k] = _U32_MAX
            continue
        m = min(n, ntok)  # tokens per shingle: n, or all of a shorter text's
        ns = ntok - m + 1
        # 32-bit shingle hashes of the whole document
        if char_unit:
            for j in range(ns):
                hh[j] = _nb_xxh64(norm, tstart[j], tstart[j + m] - tstart[j], False) & _U64_M32
        else:
            _nb_word_hashes(buf, tb, ntok, th, lo, hi, ln)
            _nb_ngram_hashes(th, m, ns, coef, hh)
        # permutations and minima
        if legacy:
            _nb_legacy_min(hh, ns, a64, b64, out, d)
        else:
            _nb_affine32_min(hh, ns, a32, b32, h32, out, d)


def _signatures_numba(texts, num_perm, n, unit, seed, scheme) -> np.ndarray:
    buf, offsets = _encode_batch(texts, _prepare_for_kernel, pad=_KERNEL_PAD)
    a, b = permutations(num_perm, seed, scheme)
    out = np.empty((offsets.size - 1, num_perm), dtype=np.uint32)
    legacy = scheme == "legacy"
    # the unused pair is a read-only placeholder too, so both schemes share one compiled kernel
    a32, b32 = permutations(1, 0, "affine32") if legacy else (a, b)
    a64, b64 = (a, b) if legacy else permutations(1, 0, "legacy")
    _nb_signatures(buf, offsets, _separator_table(), n, unit == "char", ngram_coefficients(n + 1),
                   a32, b32, a64, b64, legacy, out)
    return out


def backend() -> str:
    """'numba' when the compiled kernel is usable here, else 'numpy' (same signatures, slower)."""
    return "numba" if _numba is not None else "numpy"


def signatures(texts: Sequence[str | None], num_perm: int = 128, n: int = 5, unit: Unit = "word",
               seed: int = 1, scheme: Scheme = "affine32", backend: Backend = "auto") -> np.ndarray:
    """MinHash signatures of a batch of texts: uint32 array (len(texts), num_perm).

    Row i is MinHash over {shingle_hash(s, unit) for s in shingles(texts[i], n, unit)} with
    datasketch's permutations for (num_perm, seed, scheme), i.e. equal to
    `datasketch.MinHash(num_perm, seed, hashfunc=partial(shingle_hash, unit=unit))` updated with
    the shingles' UTF-8 bytes. A row depends only on its own text, never on the rest of the
    batch. None, "" and texts that normalise to "" get the all-0xFFFFFFFF row (datasketch's empty
    MinHash; see `is_empty`). `texts`: any iterable of str/None, or a pyarrow string array.
    backend: "auto" (numba if installed, else numpy), or force one of them.
    """
    _check_args(num_perm, n, unit)
    if scheme not in ("affine32", "legacy"):
        raise ValueError(f"scheme must be 'affine32' or 'legacy', got {scheme!r}")
    if hasattr(texts, "to_pylist"):  # pyarrow Array / ChunkedArray (Spark mapInArrow batches)
        texts = texts.to_pylist()
    elif not isinstance(texts, (list, tuple)):
        texts = list(texts)
    if backend in ("auto", "numba"):
        if _numba is not None:
            return _signatures_numba(texts, num_perm, n, unit, seed, scheme)
        if backend == "numba":
            raise RuntimeError("backend='numba' but numba is not installed")
    elif backend != "numpy":
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
    return _signatures_numpy(texts, num_perm, n, unit, seed, scheme)


# --------------------------------------------------------------------------------------------
# Estimates, LSH parameters and band hashes
# --------------------------------------------------------------------------------------------


def is_empty(sigs: np.ndarray) -> np.ndarray | bool:
    """True for signatures of documents without shingles (every value 0xFFFFFFFF).

    Leave these rows out of LSH: all empty documents share one signature, and grouping them
    would call every caption-less sample a near-duplicate of every other.
    """
    sigs = np.asarray(sigs)
    return (sigs == MAX_HASH).all(axis=-1)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal positions: the MinHash estimate of the Jaccard similarity.

    0.0 when either side is empty (no shingles): an empty text is no evidence of duplication.
    """
    sig_a = np.asarray(sig_a)
    sig_b = np.asarray(sig_b)
    if sig_a.shape != sig_b.shape or sig_a.ndim != 1:
        raise ValueError(f"need two signatures of equal length, got shapes {sig_a.shape} and {sig_b.shape}")
    if is_empty(sig_a) or is_empty(sig_b):
        return 0.0
    return float(np.count_nonzero(sig_a == sig_b)) / sig_a.size


@functools.lru_cache(maxsize=256)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising datasketch's weighted false-positive + false-negative area.

    This is `datasketch.MinHashLSH(threshold, num_perm).b, .r` (default weights 0.5/0.5),
    computed by datasketch's own `_optimal_param`.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be >= 2, got {num_perm}")
    from datasketch.lsh import _optimal_param

    b, r = _optimal_param(threshold, num_perm, 0.5, 0.5)
    return int(b), int(r)


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """int64 (N, bands): band k of row i is xxh64 of the little-endian bytes of
    sigs[i, k*rows : (k+1)*rows] as uint32, with seed k, reinterpreted as signed (Spark longs).

    Equal band contents give equal hashes; different contents collide with probability ~2**-64
    per pair (a first stray candidate pair expected after ~6e9 documents in one band), and the
    band index in the seed keeps band k's hash from matching band j's. Values of signatures
    beyond bands * rows are unused, as in datasketch's MinHashLSH. Filter `is_empty` rows first.
    """
    sigs = np.ascontiguousarray(sigs, dtype=np.uint32)
    if sigs.ndim != 2:
        raise ValueError(f"sigs must be 2-D (N, num_perm), got shape {sigs.shape}")
    if bands < 1 or rows < 1 or bands * rows > sigs.shape[1]:
        raise ValueError(f"bands * rows must be in [1, {sigs.shape[1]}], got {bands} * {rows}")
    nrows = sigs.shape[0]
    out = np.empty((nrows, bands), dtype=np.int64)
    if nrows == 0:
        return out
    flat = sigs.astype("<u4", copy=False).view(np.uint8).ravel()
    row_bytes = sigs.shape[1] * 4
    base = np.arange(nrows, dtype=np.int64) * row_bytes
    for k in range(bands):  # a loop over bands, each vectorised over all rows
        out[:, k] = xxh64_spans(flat, base + k * rows * 4, np.full(nrows, rows * 4, dtype=np.int64), seed=k).view(
            np.int64)
    return out
