"""Image LSH at scale: recall and candidate counts of pHash banding schemes on synthetic hashes.

    .venv/bin/python benchmarks/bench_image_lsh.py                  # 1M and 10M hashes
    .venv/bin/python benchmarks/bench_image_lsh.py --n 1000000 --pairs-per-distance 500

What it builds: N uniformly random 64-bit hashes (numpy, vectorised), of which P per Hamming
distance d = 1..10 are planted near-copies of another hash of the set (d random bits flipped).
What it measures, for three schemes side by side:

- `old`: the former default, 24 bands of 12 random bits (`bit_bands(24, 12)`);
- `new`: the present default of `dedup_near`, `image_bands` (945) bands of 24 random bits, the
  count derived from `image_recall` 0.995 at Hamming 10 (`NearDedup().image_masks()`);
- `mih`: exact multi-index hashing, 4 disjoint chunks of 16 bits with substitution search
  within floor(10 / 4) = 2 bits per chunk (pigeonhole: a pair <= 10 bits apart has a chunk
  <= 2 bits apart, so recall is 1 by construction; every hash probes 4 x 137 buckets).

For each: recall on the planted pairs per distance (a pair is found when it shares a bucket;
the step then verifies Hamming <= 10 exactly, so recall is what banding can lose), candidate
incidences per image (sum over bands of the other members of its bucket: an upper bound on
distinct candidates, which is what the engine's pair rows cost), the largest bucket, and keys
per image (the rows the shuffle moves). Candidates of `new` are measured on a random sample of
its bands (`--sample-bands`) and scaled to all of them (bands are exchangeable), recall on all
bands. The last table extrapolates to 1e8 hashes: for uniformly random hashes a k-bit bucket
holds N / 2^k others on average, so candidates per image grow as L * N / 2^k (+ true
neighbours), linearly in N at a fixed width: a bound at 1e8 needs k >= ~24.
Real pHash bits are correlated (natural images share low-frequency sign patterns), so real
buckets are larger than these uniform-hash figures: measure on your corpus before 1e8.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from reelforge.filters.near_dedup import NearDedup, band_masks, bit_bands

R = 10  # Hamming radius


def make_hashes(n: int, per_d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, a, b, d): n random uint64 hashes whose last 10 * per_d entries are copies of
    random earlier ones with d = 1..10 random bits flipped; (a[i], b[i]) is a planted pair."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    m = R * per_d
    b = np.arange(n - m, n)
    a = rng.integers(0, n - m, size=m)
    d = np.repeat(np.arange(1, R + 1), per_d)
    flips = np.zeros(m, dtype=np.uint64)
    for i, k in enumerate(d):  # k distinct random bits
        for bit in rng.choice(64, size=k, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(bit)
    h[b] = h[a] ^ flips
    return h, a, b, d


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def band_recall(h, a, b, d, masks) -> dict[int, float]:
    x = h[a] ^ h[b]
    assert (popcount(x) == d).all()
    found = np.zeros(len(x), dtype=bool)
    for m in masks:
        found |= (x & m) == 0
    return {k: float(found[d == k].mean()) for k in range(1, R + 1)}


def band_buckets(h: np.ndarray, masks) -> tuple[float, int]:
    """(candidate incidences per image summed over the bands, largest bucket)."""
    n = len(h)
    total, biggest = 0.0, 0
    for m in masks:
        v = np.sort(h & m)
        edges = np.flatnonzero(np.r_[True, v[1:] != v[:-1], True])
        c = np.diff(edges).astype(np.float64)
        total += float((c * (c - 1)).sum()) / n
        biggest = max(biggest, int(c.max()))
    return total, biggest


def mih(h, a, b, d, chunks: int = 4, sub: int = 2) -> dict:
    w = 64 // chunks
    x = h[a] ^ h[b]
    found = np.zeros(len(x), dtype=bool)
    ball = [0]
    for k in range(1, sub + 1):
        from itertools import combinations

        ball += [sum(1 << i for i in c) for c in combinations(range(w), k)]
    ball = np.array(ball, dtype=np.int64)
    n = len(h)
    cand, biggest = 0.0, 0
    for c in range(chunks):
        shift = np.uint64(c * w)
        mask = np.uint64((1 << w) - 1)
        found |= popcount((x >> shift) & mask) <= sub
        cnt = np.bincount(((h >> shift) & mask).astype(np.int64), minlength=1 << w).astype(np.float64)
        idx = np.arange(1 << w)
        probe = np.zeros(1 << w)
        for e in ball:  # hashes within `sub` bits of chunk value v, for every v
            probe += cnt[idx ^ e]
        cand += float((cnt * (probe - 1)).sum()) / n  # minus itself
        biggest = max(biggest, int(probe.max()))
    return {"recall": {k: float(found[d == k].mean()) for k in range(1, R + 1)}, "cand": cand,
            "biggest": biggest, "keys": f"{chunks} + {chunks * len(ball)} probes", "probes": chunks * len(ball),
            "width": w}


def run(n: int, per_d: int, sample_bands: int, seed: int) -> dict:
    t0 = time.perf_counter()
    h, a, b, d = make_hashes(n, per_d, seed)
    print(f"\n== N = {n:,} hashes, {len(a):,} planted pairs ({per_d:,} at each Hamming distance 1..{R}), "
          f"made in {time.perf_counter() - t0:.1f} s")
    out = {}
    old = band_masks(bit_bands(24, 12))
    new_step = NearDedup()
    new = new_step.image_masks()
    rng = np.random.default_rng(seed + 1)
    for name, masks, k, sample in (("old", old, 12, None), ("new", new, new_step.image_band_bits, sample_bands)):
        t = time.perf_counter()
        rec = band_recall(h, a, b, d, masks)
        measured = masks if sample is None or sample >= len(masks) else masks[rng.choice(len(masks), sample,
                                                                                       replace=False)]
        cand, biggest = band_buckets(h, measured)
        cand *= len(masks) / len(measured)
        out[name] = {"recall": rec, "cand": cand, "biggest": biggest, "keys": len(masks), "width": k,
                     "bands": len(masks), "measured_bands": len(measured), "s": time.perf_counter() - t}
    t = time.perf_counter()
    out["mih"] = mih(h, a, b, d)
    out["mih"]["s"] = time.perf_counter() - t
    print(f"{'scheme':<34}{'recall d<=10':>13}{'worst d':>9}{'cand/image':>12}{'largest bucket':>16}"
          f"{'keys/image':>18}{'time s':>8}")
    for name, label in (("old", "old: 24 bands x 12 bits"),
                        ("new", f"new: {out['new']['bands']} bands x {out['new']['width']} bits"),
                        ("mih", "mih: 4 x 16-bit chunks, r'=2")):
        r = out[name]
        overall = float(np.mean(list(r["recall"].values())))
        worst = min(r["recall"].values())
        note = f" ({r['measured_bands']} bands measured)" if name == "new" else ""
        print(f"{label:<34}{overall:>13.4f}{worst:>9.4f}{r['cand']:>12.1f}{r['biggest']:>16,}"
              f"{str(r['keys']):>18}{r['s']:>8.1f}{note}")
    print("recall by Hamming distance:")
    for name in ("old", "new", "mih"):
        print(f"  {name:<4}" + " ".join(f"d{k}={v:.4f}" for k, v in out[name]["recall"].items()))
    return out


def extrapolate(results: dict[int, dict]) -> None:
    print("\n== Extrapolation (uniform random hashes): candidates per image ~ L * N / 2^k (+ true neighbours)")
    step = NearDedup()
    rows = [("old", 24, 12, 24 + 0.0), ("new", step.image_bands, step.image_band_bits, 0.0)]
    print(f"{'scheme':<30}{'N':>14}{'predicted':>12}{'measured':>12}{'mean bucket':>13}")
    for n, res in sorted(results.items()):
        for name, L, k, _ in rows:
            print(f"{name + f' ({L} x {k} bits)':<30}{n:>14,}{L * n / 2 ** k:>12.1f}{res[name]['cand']:>12.1f}"
                  f"{n / 2 ** k:>13.2f}")
        probes = res["mih"]["probes"]
        print(f"{'mih (4 x 16, r=2)':<30}{n:>14,}{probes * n / 2 ** 16:>12.1f}{res['mih']['cand']:>12.1f}"
              f"{n / 2 ** 16:>13.2f}")
    n = 10 ** 8
    print("\nat N = 1e8 (predicted, random hashes; recall does not depend on N):")
    for name, L, k, _ in rows:
        print(f"  {name} {L} x {k} bits: {L * n / 2 ** k:,.0f} candidates per image, {L} keys per image, "
              f"mean bucket {n / 2 ** k:,.1f} (max_bucket is 64: "
              f"{'buckets overflow into star edges, recall collapses' if n / 2 ** k > 64 else 'fits'})")
    print(f"  mih 4 x 16, r'=2: {548 * n / 2 ** 16:,.0f} candidates per image (548 probes into buckets of "
          f"{n / 2 ** 16:,.0f}); exact MIH needs m(r'+1) > 10, and a chunk wide enough to bound buckets at "
          f"1e8 (>= 27 bits) leaves m <= 2 chunks with r' = 5, i.e. {2 * sum(math.comb(32, j) for j in range(6)):,}"
          f" probes per hash")
    print("  bit sampling at width k needs L = ln(1 - recall) / ln(1 - p10(k)) bands, p10(k) = C(54,k)/C(64,k):")
    for k in (16, 20, 22, 24, 26, 28):
        p = math.comb(54, k) / math.comb(64, k)
        L = math.ceil(math.log(0.005) / math.log(1 - p))
        print(f"    k={k}: L={L:>5} for recall 0.995 at d=10; candidates per image {L * 1e7 / 2 ** k:>9,.0f} at 1e7, "
              f"{L * 1e8 / 2 ** k:>9,.0f} at 1e8; keys + candidates at 1e8 {L + L * 1e8 / 2 ** k:>9,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--pairs-per-distance", type=int, default=2000)
    ap.add_argument("--sample-bands", type=int, default=48, help="bands of `new` measured for candidates")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = {n: run(n, args.pairs_per_distance, args.sample_bands, args.seed) for n in args.n}
    extrapolate(results)


if __name__ == "__main__":
    main()
