"""k-means for `dedup_semantic`: Spark ML's KMeans on N x D random unit vectors under local Spark,
against plain Lloyd iterations in numpy on one process (the same k, iterations and init count).

    .venv/bin/python benchmarks/bench_semantic_kmeans.py [--n 100000] [--dim 512] [--k 316] \
        [--iters 20] [--master local[2]]

Random unit vectors have no cluster structure, so every run does all `--iters` iterations: a
worst case for time per run. Spark's time counts the fit alone (the vectors are cached and
counted first); the time to move the embeddings into Spark is printed apart. Figures, not
assertions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_lloyd(x: np.ndarray, k: int, iters: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """Plain Lloyd iterations from k random rows (BLAS matmul for the distances)."""
    rng = np.random.default_rng(seed)
    c = x[rng.choice(len(x), k, replace=False)].copy()
    sq = (x * x).sum(1)
    for _ in range(iters):
        labels = np.empty(len(x), dtype=np.int64)
        for a in range(0, len(x), 16384):
            d = sq[a:a + 16384, None] - 2 * x[a:a + 16384] @ c.T + (c * c).sum(1)[None]
            labels[a:a + 16384] = d.argmin(1)
        sums = np.zeros_like(c)
        np.add.at(sums, labels, x)
        cnt = np.bincount(labels, minlength=k)
        nz = cnt > 0
        c[nz] = sums[nz] / cnt[nz, None]
    cost = float(sum(((x[labels == j] - c[j]) ** 2).sum() for j in range(k)))
    return labels, cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=0, help="0: round(sqrt(n)), the step's default")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--inits", default="k-means||", help="comma-separated: k-means||,random")
    ap.add_argument("--solvers", default="auto,row,block", help="Spark ML KMeans solvers to time")
    ap.add_argument("--skip-numpy", action="store_true")
    args = ap.parse_args()
    k = args.k or int(round(args.n ** 0.5))
    x = unit_vectors(args.n, args.dim)
    print(f"{args.n} x {args.dim} random unit vectors, k={k}, {args.iters} iterations, {os.cpu_count()} cpus")

    if not args.skip_numpy:
        t = time.time()
        _, cost = numpy_lloyd(x, k, args.iters)
        print(f"numpy Lloyd (one process): {time.time() - t:.1f} s, cost {cost:.1f}", flush=True)

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    from reelforge.jobs.spark import get_spark

    spark = get_spark(args.master)
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        path = os.path.join(d, "emb.parquet")
        pq.write_table(pa.table({"id": [f"s{i}" for i in range(args.n)],
                                 "v": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), args.dim)}), path)
        df = spark.read.parquet(path).select("id", array_to_vector("v").alias("features")).repartition(4).cache()
        df.count()
        print(f"into Spark (parquet, vectors, cached): {time.time() - t:.1f} s")
        for init in args.inits.split(","):
            for solver in args.solvers.split(","):
                t = time.time()
                model = KMeans(k=k, maxIter=args.iters, seed=0, initMode=init, tol=0.0, solver=solver).fit(df)
                fit = time.time() - t
                print(f"Spark ML KMeans ({init}, solver {solver}, {args.master}): {fit:.1f} s, "
                      f"cost {model.summary.trainingCost:.1f}, {model.summary.numIter} iterations", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
