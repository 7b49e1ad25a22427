"""Connected components on Spark equal union-find, including long chains."""

import random

from reelforge.filters.near_dedup import components
from reelforge.jobs.components import connected_components


def _union_find(edges):
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: min((y for y in parent if find(y) == find(x))) for x in parent}


def test_components_match_union_find(spark):
    rng = random.Random(1)
    chain = [(f"c{i:04d}", f"c{i + 1:04d}") for i in range(300)]  # one long chain: diameter 300
    rng.shuffle(chain)
    rand = [(f"n{rng.randrange(400):04d}", f"n{rng.randrange(400):04d}") for _ in range(300)]
    edges = chain + rand + [("x1", "x1")]
    df = spark.createDataFrame(edges, "a string, b string")
    got = {r["id"]: r["component"] for r in connected_components(df).collect()}  # one-task union-find
    rounds = {r["id"]: r["component"] for r in connected_components(df, small_edges=0).collect()}  # star rounds
    want = _union_find([e for e in edges if e[0] != e[1]])
    assert got == rounds == want == components(edges)
    assert got["c0300"] == "c0000"
