"""Connected components of a duplicate graph, computed with Spark DataFrames.

The graph can be as large as the corpus, so nothing goes to the driver: labels start as
each node's own id and every round a node takes the smallest label among itself and its
neighbours (min-label propagation), until no label changes. Each node ends labelled with
the smallest id of its component: the same answer on one machine and on a cluster,
whatever the partitioning. Lineage is cut with a local checkpoint every few rounds so
long chains do not grow the query plan without bound.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def connected_components(edges: DataFrame, src: str = "a", dst: str = "b", max_rounds: int = 100,
                         checkpoint_every: int = 3) -> DataFrame:
    """Edges (src, dst) of string ids -> DataFrame (id, component) for every node with an edge."""
    und = edges.select(F.col(src).alias("a"), F.col(dst).alias("b")).filter(F.col("a") != F.col("b"))
    und = und.unionByName(und.select(F.col("b").alias("a"), F.col("a").alias("b"))).distinct()
    und = und.localCheckpoint()
    labels = und.select(F.col("a").alias("id")).distinct().withColumn("component", F.col("id"))
    for i in range(max_rounds):
        neighbour = (und.join(labels.withColumnRenamed("id", "b").withColumnRenamed("component", "lb"), "b")
                     .groupBy("a").agg(F.min("lb").alias("nl")).withColumnRenamed("a", "id"))
        new = (labels.join(neighbour, "id", "left")
               .select("id", F.least(F.col("component"), F.coalesce("nl", F.col("component"))).alias("component")))
        new = new.localCheckpoint() if (i + 1) % checkpoint_every == 0 else new.cache()
        changed = new.join(labels.withColumnRenamed("component", "old"), "id") \
            .filter(F.col("component") != F.col("old")).limit(1).count()
        labels = new
        if not changed:
            return labels
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
