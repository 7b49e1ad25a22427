"""Connected components of a duplicate graph, computed with Spark DataFrames (the engine side
of near dedup; `filters.near_dedup.components` is the same answer for a small list).

The graph can be as large as the corpus, so nothing goes to the driver. The algorithm is
alternating Large-Star / Small-Star (Kiveris et al., "Connected Components in MapReduce
and Beyond", 2014): each round rewires edges towards the smallest id of a neighbourhood,
and the graph converges to one star per component, centred on the component's smallest
id, in O(log^2 n) rounds (plain min-label propagation needs as many rounds as the longest
chain, which near-copies of near-copies make long). The answer is the smallest id of each
component: the same on one machine and on a cluster, whatever the partitioning. Lineage is
cut with a local checkpoint every round so the query plan stays small.

A graph of at most `small_edges` edges (the usual case: near-duplicates are a few percent of a
corpus) skips the rounds: its edges go to ONE task, which runs union-find (smallest id per
component, the same answer) inside the query, so the whole step stays one Spark job instead of
two or three per round. Nothing goes to the driver but the edge count.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

SMALL_EDGES = 2_000_000  # union-find in one task up to this many edges (~ a few hundred MB of Python)
_COMP_SCHEMA = pa.schema([("id", pa.string()), ("component", pa.string())])


def _both(e: DataFrame) -> DataFrame:
    return e.unionByName(e.select(F.col("v").alias("u"), F.col("u").alias("v")))


def _large_star(e: DataFrame) -> DataFrame:
    """Every neighbour larger than u is linked to the smallest of u's closed neighbourhood."""
    both = _both(e)
    m = both.groupBy("u").agg(F.least(F.min("v"), F.first("u")).alias("m"))
    return (both.join(m, "u").filter(F.col("v") > F.col("u"))
            .select(F.col("v").alias("u"), F.col("m").alias("v")))


def _small_star(e: DataFrame) -> DataFrame:
    """u and its smaller neighbours are all linked to the smallest of them."""
    oriented = e.select(F.greatest("u", "v").alias("u"), F.least("u", "v").alias("v"))
    m = oriented.groupBy("u").agg(F.least(F.min("v"), F.first("u")).alias("m"))
    linked = oriented.join(m, "u").select(F.col("v").alias("u"), F.col("m").alias("v"))
    selves = m.select("u", F.col("m").alias("v"))
    return linked.unionByName(selves)


def _norm(e: DataFrame) -> DataFrame:
    """Undirected edges stored once, (larger, smaller), without self loops."""
    return (e.filter(F.col("u") != F.col("v"))
            .select(F.greatest("u", "v").alias("u"), F.least("u", "v").alias("v")).distinct())


def _union_find(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """(u, v) edges -> (id, smallest id of its component) for every node, in one task."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for b in batches:
        for u, v in zip(b.column("u").to_pylist(), b.column("v").to_pylist()):
            parent.setdefault(u, u)
            parent.setdefault(v, v)
            ru, rv = find(u), find(v)
            if ru != rv:
                parent[max(ru, rv)] = min(ru, rv)  # the root is always the smallest id seen
    ids = sorted(parent)
    comps = [find(x) for x in ids]
    for lo in range(0, len(ids), 65536):
        yield pa.RecordBatch.from_pydict({"id": ids[lo:lo + 65536], "component": comps[lo:lo + 65536]},
                                         schema=_COMP_SCHEMA)


def connected_components(edges: DataFrame, src: str = "a", dst: str = "b", max_rounds: int = 60,
                         small_edges: int = SMALL_EDGES, info: dict | None = None) -> DataFrame:
    """Edges (src, dst) of string ids -> DataFrame (id, component) for every node with an edge.
    `info`, when given, receives the number of distinct undirected edges as info["edges"]."""
    e = _norm(edges.select(F.col(src).alias("u"), F.col(dst).alias("v"))).localCheckpoint(eager=False)
    n = e.count()  # computes and keeps the edges: one job
    if info is not None:
        info["edges"] = n
    if n <= small_edges:
        return e.repartition(1).mapInArrow(_union_find, "id string, component string")
    for _ in range(max_rounds):
        new = _norm(_small_star(_norm(_large_star(e)))).localCheckpoint()
        changed = new.exceptAll(e).limit(1).count() + e.exceptAll(new).limit(1).count()
        e = new
        if not changed:
            both = _both(e)
            return both.groupBy("u").agg(F.least(F.min("v"), F.first("u")).alias("component")) \
                .withColumnRenamed("u", "id")
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
