"""MinHash signature throughput: reelforge's `curation.minhash.signatures` against datasketch and rensa.

The same documents for every tool: N synthetic English-like documents of 300-1000 words
(uniform), drawn from a 4000-word vocabulary with Zipfian frequencies (s = 1.1), with
sentence capitals, commas and full stops, generated deterministically chunk by chunk (so 100k
documents never sit in memory at once). 128 permutations, word 5-grams, seed 1.

    .venv/bin/python benchmarks/bench_minhash.py [--docs 100000] [--ds-docs 2000] [--batch 2000]
        [--num-perm 128] [--n 5] [--repeat 3] [--clock cpu|wall] [--cpu 0]

Everything runs in this one process pinned to ONE core (os.sched_setaffinity), with
RAYON_NUM_THREADS=1 and RENSA_PIPELINE_QUEUE_CAP=0 so that rensa does not use a second thread
either. The clock is this process's CPU time by default (`--clock cpu`, time.process_time):
on a shared machine the time slices other processes take from the core do not count, which
is what "per core" means; `--clock wall` gives wall time. `--repeat` passes over the same
documents; within a pass every chunk of --batch documents goes through every tool in turn
(project, shingling, rensa, rensa bulk, datasketch), so a slow spell hits all alike, and each
figure printed is the median over the passes (the per-pass project/rensa ratios are printed
too). Rows:

  project            signatures(texts) per batch of --batch texts: text in, signatures out
                     (NFKC/encode, case folding, the separator scan, word and n-gram hashes,
                     permutations and minima: all of it is timed)
  datasketch         MinHash(num_perm, seed).update_batch(shingle bytes) per document, timed on
                     the first --ds-docs documents only and reported as docs/s (extrapolated)
  datasketch bulk    MinHash.bulk(list of shingle-byte lists), same subset
  rensa RMinHash     RMinHash(num_perm, seed).update(shingle strs); .digest() per document
  rensa bulk         RMinHash.digest_matrix_from_token_sets(chunk of shingle lists)

The peers need the shingles as Python lists; they are made by `curation.minhash.shingles` (the
same normalisation and the same word 5-grams as the project) and are NOT timed in the "core"
column: that column is the peers' hashing + permutations alone, their best case. The
"end-to-end" column adds the measured Python shingling time (and, for datasketch, the encode
to bytes), i.e. what a peer costs when it starts from text as the project does.

Caveat on rensa: rensa 0.5's RMinHash is no longer k-permutation MinHash: it is a bucket
sketch (3 rounds of one-bucket-per-token, inspired by Fast Similarity Sketching) whose cost is
O(shingles), not O(shingles x num_perm), and its values are not comparable with datasketch's.
The accuracy table (mean absolute error against the exact Jaccard of the shingle sets over
pairs of varied similarity) shows what each estimator gives for its speed.

The profile block splits the project's time by stage (each stage a best-of-5 of the kernel cut
after it): Python's share (NFKC for non-ASCII texts, encode, join), the case fold + separator
scan (64 bytes a step on ASCII texts), the word hashes, the n-gram multiply-shift hashes, and
fmix32 + the 128 permutations with their minima, which on an AVX-512 core is bound by the
32-bit multiplies (num_perm x shingles of them) and is about half of the total.

Prints a table and, last, one JSON line with every figure. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before rensa is imported
os.environ.setdefault("RENSA_PIPELINE_QUEUE_CAP", "0")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

from reelforge.curation import minhash as mh  # noqa: E402

VOCAB_SIZE = 4000
ZIPF_S = 1.1


def make_vocab(seed: int) -> np.ndarray:
    """4000 distinct pronounceable words (2-11 letters), most frequent first, with variants:
    [w, W (capitalised), w, (comma), w. (full stop)] -> index 4 * id + variant."""
    rng = np.random.default_rng(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch", "cl",
              "dr", "fr", "gr", "pl", "pr", "sh", "sl", "st", "th", "tr", "wh"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "d", "m", "ng", "st", "ck", "nd", "rt"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < VOCAB_SIZE:
        k = 1 + min(int(rng.geometric(0.45)) - 1, 3)  # 1-4 syllables, short ones more frequent
        w = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))]
                    + codas[rng.integers(len(codas))] for _ in range(k))
        if 2 <= len(w) <= 11 and w not in seen:
            seen.add(w)
            words.append(w)
    words.sort(key=len)  # frequent words are short, as in real text
    return np.array([v for w in words for v in (w, w.capitalize(), w + ",", w + ".")], dtype=object)


def make_docs(vocab: np.ndarray, count: int, seed: int) -> list[str]:
    """`count` documents, deterministic for (seed, count)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, VOCAB_SIZE + 1) ** ZIPF_S
    p /= p.sum()
    lens = rng.integers(300, 1001, count)
    total = int(lens.sum())
    ids = rng.choice(VOCAB_SIZE, size=total, p=p) * 4
    u = rng.random(total)
    variant = np.where(u < 0.06, 3, np.where(u < 0.12, 2, 0))  # ~6% end a sentence, ~6% take a comma
    ends = np.flatnonzero(variant == 3)
    starts = ends[ends + 1 < total] + 1
    variant[starts] = np.where(variant[starts] == 0, 1, variant[starts])  # capital after a full stop
    toks = vocab[ids + variant]
    out, o = [], 0
    for n in lens:
        out.append(" ".join(toks[o : o + n]))
        o += n
    return out


def pin_to_one_core(cpu: int | None) -> int:
    if not hasattr(os, "sched_setaffinity"):
        return -1
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[0] if cpu is None or cpu not in cpus else cpu
    os.sched_setaffinity(0, {cpu})
    return cpu


def exact_jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def accuracy(vocab: np.ndarray, num_perm: int, n: int, seed: int, pairs: int = 120) -> dict[str, float]:
    """Mean |estimate - exact Jaccard| over pairs whose similarity spans ~0..1."""
    from datasketch import MinHash

    try:
        import rensa
    except ImportError:
        rensa = None
    rng = np.random.default_rng(seed + 99)
    base = make_docs(vocab, pairs, seed + 98)
    other = make_docs(vocab, pairs, seed + 97)
    a_docs, b_docs = [], []
    for i, (x, y) in enumerate(zip(base, other)):
        xw, yw = x.split(" "), y.split(" ")
        target = i / (pairs - 1)  # take a fraction p of the words from the other document so that
        p = 1 - (2 * target / (1 + target)) ** (1 / n)  # the n-gram Jaccard is ~target: 0 .. 1
        mix = [yw[j % len(yw)] if rng.random() < p else w for j, w in enumerate(xw)]
        a_docs.append(x)
        b_docs.append(" ".join(mix))
    sa, sb = mh.signatures(a_docs, num_perm, n), mh.signatures(b_docs, num_perm, n)
    err: dict[str, list[float]] = {"project": [], "datasketch": [], "rensa": []}
    for i in range(pairs):
        sha, shb = mh.shingles(a_docs[i], n), mh.shingles(b_docs[i], n)
        j = exact_jaccard(sha, shb)
        err["project"].append(abs(mh.jaccard_estimate(sa[i], sb[i]) - j))
        ma, mb = MinHash(num_perm, seed), MinHash(num_perm, seed)
        ma.update_batch([s.encode() for s in sha])
        mb.update_batch([s.encode() for s in shb])
        err["datasketch"].append(abs(ma.jaccard(mb) - j))
        if rensa is not None:
            ra, rb = rensa.RMinHash(num_perm, seed), rensa.RMinHash(num_perm, seed)
            ra.update(sha)
            rb.update(shb)
            err["rensa"].append(abs(ra.jaccard(rb) - j))
    return {k: float(np.mean(v)) for k, v in err.items() if v}


def profile(docs: list[str], num_perm: int, n: int, seed: int, clock) -> dict[str, float] | None:
    """Microseconds per document of each stage of the numba path (best of 5 runs each, so on a
    busy machine the remainder line can come out slightly negative)."""
    if mh.backend() != "numba" or not hasattr(mh, "_nb_word_bounds"):
        return None
    import numba

    @numba.njit(nogil=True)  # no on-disk cache: it would not see edits of the kernels it calls
    def stages(buf, off, cls, n, coef, a, b, upto):
        mh._nb_fold_ascii(buf)
        size = int(np.max(off[1:] - off[:-1])) + 2
        nw = size // 2 + 1
        tb = np.empty(size + 1, np.int64)
        th, lo, hi = np.empty(nw, np.uint64), np.empty(nw, np.uint64), np.empty(nw, np.uint64)
        ln, hh, h32 = np.empty(nw, np.int64), np.empty(nw, np.uint64), np.empty(nw, np.uint32)
        out = np.empty((off.size - 1, a.size), np.uint32)
        total = 0
        for d in range(off.size - 1):
            ntok = mh._nb_word_bounds(buf, off[d], off[d + 1], cls, tb)  # case fold + separator scan
            total += ntok
            if upto == 0 or ntok == 0:
                continue
            mh._nb_word_hashes(buf, tb, ntok, th, lo, hi, ln)  # one word_hash per word
            if upto == 1:
                continue
            m = min(n, ntok)
            mh._nb_ngram_hashes(th, m, ntok - m + 1, coef, hh)  # n multiply-adds per shingle
            if upto == 2:
                continue
            mh._nb_affine32_min(hh, ntok - m + 1, a, b, h32, out, d)  # fmix32, permutations, minima
        return total

    def best(f, *args) -> float:
        f(*args)
        t = []
        for _ in range(5):
            t0 = clock()
            f(*args)
            t.append(clock() - t0)
        return min(t) / len(docs) * 1e6

    buf, off = mh._encode_batch(docs, mh._prepare_for_kernel, pad=mh._KERNEL_PAD)
    args = (buf, off, mh._separator_table(), n, mh.ngram_coefficients(n + 1), *mh.permutations(num_perm, seed))
    prep = best(mh._encode_batch, docs, mh._prepare_for_kernel, mh._KERNEL_PAD)
    upto = [best(stages, *args, k) for k in range(4)]
    total = best(mh.signatures, docs, num_perm, n, "word", seed)
    return {
        "python_prep_nfkc_encode_join": prep,
        "case_fold_and_separator_scan": upto[0],
        "word_hashes": upto[1] - upto[0],
        "ngram_multiply_shift": upto[2] - upto[1],
        "fmix32_permutations_and_min": upto[3] - upto[2],
        "other_(total_minus_stages)": total - prep - upto[3],  # each stage is a separate best-of-5
        "total": total,
    }


def one_pass(args, vocab, clock, rensa, MinHash, first: bool) -> dict:
    """One pass over the documents: per chunk, the project, then the Python shingling, then each
    peer on the same chunk (so a slow spell of the machine hits every tool alike)."""
    P, n, seed = args.num_perm, args.n, args.seed
    t = {"project": 0.0, "shingling": 0.0, "encode": 0.0, "ds": 0.0, "ds_bulk": 0.0, "rensa": 0.0, "rensa_bulk": 0.0}
    st = {"ds": 0, "words": 0, "shingles": 0, "bytes": 0, "docs": 0}
    chunk_index = 0
    prof_docs: list[str] = []
    while st["docs"] < args.docs:
        count = min(args.batch, args.docs - st["docs"])
        docs = make_docs(vocab, count, 1000 + chunk_index)
        chunk_index += 1
        if first and len(prof_docs) < 3000:
            prof_docs.extend(docs[: 3000 - len(prof_docs)])

        t0 = clock()
        sigs = mh.signatures(docs, P, n, "word", seed)
        t["project"] += clock() - t0
        assert sigs.shape == (count, P)

        t0 = clock()
        sh = [mh.shingles(d, n) for d in docs]
        t["shingling"] += clock() - t0

        if rensa is not None:
            t0 = clock()
            for s in sh:
                m = rensa.RMinHash(P, seed)
                m.update(s)
                m.digest()
            t["rensa"] += clock() - t0
            t0 = clock()
            rensa.RMinHash.digest_matrix_from_token_sets(sh, P, seed)
            t["rensa_bulk"] += clock() - t0

        k = min(count, args.ds_docs - st["ds"])
        if k > 0:
            t0 = clock()
            bsh = [[s.encode() for s in x] for x in sh[:k]]
            t["encode"] += clock() - t0
            t0 = clock()
            for x in bsh:
                m = MinHash(P, seed)
                m.update_batch(x)
                m.hashvalues  # noqa: B018
            t["ds"] += clock() - t0
            if hasattr(MinHash, "bulk"):
                t0 = clock()
                MinHash.bulk(bsh, num_perm=P, seed=seed)
                t["ds_bulk"] += clock() - t0
            st["ds"] += k
        if first:
            st["bytes"] += sum(map(len, docs))
            st["shingles"] += sum(map(len, sh))
            st["words"] += sum(d.count(" ") + 1 for d in docs)
        st["docs"] += count

    N, Nd = st["docs"], st["ds"]
    shingle_s_per_doc = t["shingling"] / N
    encode_s_per_doc = t["encode"] / Nd if Nd else 0.0
    rate = {
        "project": N / t["project"],
        "datasketch_update_batch": Nd / t["ds"] if Nd else None,
        "datasketch_bulk": Nd / t["ds_bulk"] if Nd and t["ds_bulk"] else None,
        "rensa_rminhash": N / t["rensa"] if rensa else None,
        "rensa_bulk": N / t["rensa_bulk"] if rensa else None,
    }

    def e2e(core: float | None, extra: float) -> float | None:
        return None if core is None else 1.0 / (1.0 / core + extra)

    e2e_rate = {
        "project": rate["project"],
        "datasketch_update_batch": e2e(rate["datasketch_update_batch"], shingle_s_per_doc + encode_s_per_doc),
        "datasketch_bulk": e2e(rate["datasketch_bulk"], shingle_s_per_doc + encode_s_per_doc),
        "rensa_rminhash": e2e(rate["rensa_rminhash"], shingle_s_per_doc),
        "rensa_bulk": e2e(rate["rensa_bulk"], shingle_s_per_doc),
    }

    def ratio(a, b):
        return None if a is None or b is None else a / b

    ratios = {
        "project/rensa_core": ratio(rate["project"], rate["rensa_rminhash"]),
        "project/rensa_end_to_end": ratio(rate["project"], e2e_rate["rensa_rminhash"]),
        "project/rensa_bulk_core": ratio(rate["project"], rate["rensa_bulk"]),
        "project/datasketch_core": ratio(rate["project"], rate["datasketch_update_batch"]),
        "project/datasketch_end_to_end": ratio(rate["project"], e2e_rate["datasketch_update_batch"]),
        "project/datasketch_bulk_core": ratio(rate["project"], rate["datasketch_bulk"]),
        "rensa_core/datasketch_core": ratio(rate["rensa_rminhash"], rate["datasketch_update_batch"]),
    }
    return {"rate": rate, "e2e": e2e_rate, "ratios": ratios, "shingling": 1 / shingle_s_per_doc, "stats": st,
            "prof_docs": prof_docs}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--ds-docs", type=int, default=2000, help="datasketch runs on this many of the documents")
    ap.add_argument("--batch", type=int, default=2000, help="texts per signatures() call (an Arrow batch)")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="passes over the documents; medians are reported")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: this process's CPU time (time.process_time), wall: time.perf_counter")
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the first allowed)")
    args = ap.parse_args()
    from datasketch import MinHash

    try:
        import rensa
    except ImportError:
        rensa = None
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cpu = pin_to_one_core(args.cpu)
    P, n, seed = args.num_perm, args.n, args.seed
    vocab = make_vocab(0)

    t0 = time.perf_counter()
    mh.signatures(["warm up the compiled kernel"], P, n)
    warm = time.perf_counter() - t0

    passes = [one_pass(args, vocab, clock, rensa, MinHash, first=(r == 0)) for r in range(max(1, args.repeat))]
    st = passes[0]["stats"]
    N, Nd = st["docs"], st["ds"]
    rate = {k: _median([p["rate"][k] for p in passes]) for k in passes[0]["rate"]}
    e2e_rate = {k: _median([p["e2e"][k] for p in passes]) for k in passes[0]["e2e"]}
    ratios = {k: _median([p["ratios"][k] for p in passes]) for k in passes[0]["ratios"]}
    per_pass = [p["ratios"]["project/rensa_core"] for p in passes]
    shingling = _median([p["shingling"] for p in passes])
    prof = profile(passes[0]["prof_docs"], P, n, seed, clock)
    acc = accuracy(vocab, P, n, seed)

    print(f"MinHash signatures, 1 core (cpu {cpu}), {N} docs ({st['bytes'] / N:.0f} bytes, "
          f"{st['words'] / N:.0f} words, {st['shingles'] / N:.0f} word {n}-grams per doc on average), "
          f"num_perm={P}, seed={seed}")
    print(f"backend: {mh.backend()}; first call (numba compile or cache load): {warm:.2f} s, not timed below")
    print(f"clock: {args.clock}; medians of {len(passes)} passes, every tool timed on each chunk in turn")
    print(f"Python shingling for the peers (curation.minhash.shingles): {shingling:,.0f} docs/s")
    print()
    print(f"{'':28s} {'core docs/s':>13s} {'end-to-end docs/s':>18s} {'docs timed':>11s}")
    rows = [("project signatures()", "project", N), ("datasketch update_batch", "datasketch_update_batch", Nd),
            ("datasketch MinHash.bulk", "datasketch_bulk", Nd), ("rensa RMinHash.update", "rensa_rminhash", N),
            ("rensa digest_matrix (bulk)", "rensa_bulk", N)]
    for label, key, cnt in rows:
        if rate[key] is None:
            print(f"{label:28s} {'n/a':>13s}")
            continue
        print(f"{label:28s} {rate[key]:13,.0f} {e2e_rate[key]:18,.0f} {cnt:11,d}")
    print("  (core: shingle lists given, their making not timed; end-to-end: + Python shingling"
          " (+ encode for datasketch). The project is always end-to-end: text in, signatures out.)")
    if Nd < N:
        print(f"  datasketch timed on the first {Nd} docs and extrapolated as docs/s")
    print()
    for k, v in ratios.items():
        if v is not None:
            print(f"{k:32s} {v:8.2f}x")
    if per_pass[0] is not None:
        print(f"  project/rensa_core per pass: {', '.join(f'{v:.2f}' for v in per_pass)}")
    if prof:
        print()
        print(f"where the project's time goes (us/doc, numba backend, {len(passes[0]['prof_docs'])} docs, best of 5):")
        for k, v in prof.items():
            print(f"  {k:32s} {v:7.2f}")
    print()
    print("accuracy, mean |estimate - exact Jaccard| over 120 pairs of similarity ~0..1:")
    for k, v in acc.items():
        print(f"  {k:12s} {v:.4f}")
    print(json.dumps({
        "docs": N, "datasketch_docs": Nd, "num_perm": P, "n": n, "unit": "word", "seed": seed, "cpu": cpu,
        "clock": args.clock, "repeat": len(passes), "backend": mh.backend(), "avg_bytes": st["bytes"] / N,
        "avg_shingles": st["shingles"] / N, "first_call_s": warm, "shingling_docs_per_s": shingling,
        "core_docs_per_s": rate, "end_to_end_docs_per_s": e2e_rate, "ratios": ratios,
        "project_over_rensa_core_per_pass": per_pass, "profile_us_per_doc": prof, "mae_vs_exact_jaccard": acc,
    }))


if __name__ == "__main__":
    main()
