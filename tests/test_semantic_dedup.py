"""dedup_semantic: the decision code on planted embedding near-duplicates (plain Python), its
parts against brute force, and local[2] == local-cluster on a small Spark run."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from reelforge.filters.near_dedup import components as near_components
from reelforge.filters.near_dedup import rank_key
from reelforge.filters.semantic_dedup import (
    DEFAULT_EPS,
    REPORT_EPS,
    SemanticDedup,
    cluster_decisions,
    cluster_pairs,
    components,
    default_k,
    kmeans,
    semantic_duplicates,
)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _copy_at(rng, v, cos):
    """A unit vector at exactly `cos` from unit vector v."""
    u = rng.standard_normal(len(v))
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    return cos * v + np.sqrt(1 - cos * cos) * u


def planted(seed=0, n=2000, d=512, n_near=200, n_far=200):
    """n random unit vectors, n_near copies at cosine 0.995-0.9999 and n_far at 0.9-0.97, rounded
    to float16 as kept embeddings are. Returns (ids, vectors, the true near pairs)."""
    rng = np.random.default_rng(seed)
    base = _unit(rng, n, d)
    near_src = rng.choice(n, n_near, replace=False)
    far_src = rng.choice(n, n_far, replace=False)
    near = np.stack([_copy_at(rng, base[i], rng.uniform(0.995, 0.9999)) for i in near_src])
    far = np.stack([_copy_at(rng, base[i], rng.uniform(0.9, 0.97)) for i in far_src])
    x = np.concatenate([base, near, far]).astype(np.float16).astype(np.float32)
    ids = [f"b{i:05d}" for i in range(n)] + [f"n{i:05d}" for i in range(n_near)] + [f"f{i:05d}" for i in range(n_far)]
    truth = {(f"n{j:05d}", f"b{i:05d}") for j, i in enumerate(near_src)}
    return ids, x, truth


def test_planted_near_copies_recall_precision_at_default_eps():
    ids, x, truth = planted()
    ranks = [rank_key({"id": i}) for i in ids]
    assert DEFAULT_EPS == 0.01  # NeMo Curator's documented eps_to_extract
    drops, table = semantic_duplicates(ranks, x, seed=0)
    pred = {(a, keep) for a, keep, _ in drops}
    tp = len(pred & truth)
    precision, recall = tp / max(1, len(pred)), tp / len(truth)
    print(f"planted: {len(pred)} drops, precision {precision:.3f}, recall {recall:.3f}, table {table}")
    assert precision >= 0.95 and recall >= 0.95
    assert not any(a.startswith("f") for a, _, _ in drops)  # cosine 0.9-0.97: kept at eps 0.01
    assert all(c > 1 - DEFAULT_EPS for _, _, c in drops)
    # the table: computed from the same pairs, its default-eps row is the decision, and it grows with eps
    assert set(table) == set(REPORT_EPS) and table[DEFAULT_EPS][1] == len(drops)
    pairs = [table[e][0] for e in sorted(table)]
    dropped = [table[e][1] for e in sorted(table)]
    assert pairs == sorted(pairs) and dropped == sorted(dropped)
    assert table[0.1][1] > table[DEFAULT_EPS][1]  # at eps 0.1 (cosine > 0.9) far copies go too
    # k-means is deterministic for a seed (and a different seed clusters differently)
    assert semantic_duplicates(ranks, x, seed=0) == (drops, table)
    k = default_k(len(ids))
    assert np.array_equal(kmeans(x, k, seed=3), kmeans(x, k, seed=3))
    assert not np.array_equal(kmeans(x, k, seed=3), kmeans(x, k, seed=4))


def test_decisions_equal_brute_force_over_one_cluster():
    """One cluster: pairs, components and the keep rule against plain loops and the near-dedup
    components; quality decides which sample of a cluster stays."""
    rng = np.random.default_rng(1)
    base = _unit(rng, 6, 16)
    vecs, rows = [], []
    for g in range(6):  # groups of 1-4 copies at cosine 0.993-0.9999 of one vector
        for c in range(1 + g % 4):
            vecs.append(base[g] if c == 0 else _copy_at(rng, base[g], rng.uniform(0.993, 0.9999)))
            rows.append({"id": f"s{len(rows):02d}", "scores": {"quality": float(rng.uniform())}, "text": "x" * c})
    v = np.array(vecs, dtype=np.float32)
    perm = rng.permutation(len(rows))  # input order does not matter
    ranks = [rank_key(rows[i]) for i in perm]
    drops, table = cluster_decisions(ranks, v[perm], 0.01, (0.001, 0.1))

    a, b, c = cluster_pairs(v, 0.99, block=3)
    brute = {(i, j) for i, j in itertools.combinations(range(len(v)), 2) if float(v[i] @ v[j]) > 0.99}
    assert set(zip(a.tolist(), b.tolist())) == brute and np.allclose(c, [v[i] @ v[j] for i, j in zip(a, b)])
    comp = near_components((rows[i]["id"], rows[j]["id"]) for i, j in brute)
    clusters: dict[str, list[dict]] = {}
    for r in rows:
        clusters.setdefault(comp.get(r["id"], r["id"]), []).append(r)
    want = []
    for members in clusters.values():
        best = max(members, key=lambda r: r["scores"]["quality"])
        want += [(r["id"], best["id"]) for r in members if r is not best]
    assert [(i, k) for i, k, _ in drops] == sorted(want) and len(want) == 0 + 1 + 2 + 3 + 0 + 1  # the copies
    assert table[0.01] == (len(brute), len(want))
    idx = {r["id"]: n for n, r in enumerate(rows)}
    assert all(abs(cos - float(v[idx[i]] @ v[idx[k]])) < 1e-6 for i, k, cos in drops)


def test_components_match_union_find():
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(1, 60))
        e = rng.integers(0, n, size=(int(rng.integers(0, 80)), 2))
        labels = components(n, e[:, 0], e[:, 1])
        ref = near_components((f"{a:03d}", f"{b:03d}") for a, b in e)
        for i in range(n):
            assert labels[i] == int(ref.get(f"{i:03d}", f"{i:03d}"))


def test_step_fields():
    assert default_k(1) == 1 and default_k(2400) == 49 and default_k(10 ** 8) == 1000
    with pytest.raises(ValueError, match="from_step"):
        SemanticDedup()
    with pytest.raises(ValueError, match="eps"):
        SemanticDedup(from_step="clip", eps=0)
    with pytest.raises(ValueError, match="image or text"):
        SemanticDedup(from_step="clip", embedding="audio")
    s = SemanticDedup(from_step="clip", eps=0.02, report_eps=[0.1, 0.001])
    assert s.table_eps() == (0.001, 0.02, 0.1)
    assert s.report_name() != SemanticDedup(from_step="clip", eps=0.03).report_name()


# --- Spark: one small corpus, local[2] and local-cluster -------------------------------------------

def _corpus(tmp_path):
    """12 distinct noise images, 4 of them copied (3 byte-equal after re-encoding to PNG, one resized
    by 1 pixel), and 3 text-only rows."""
    from PIL import Image

    from reelforge.curation.tiny_clip import build_tiny_clip

    build_tiny_clip(str(tmp_path / "model"))
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        im = Image.effect_noise((48, 48), 20 + 9 * i).convert("RGB").rotate(30 * i)
        im.save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"noise number {i}"})
    for i in range(4):
        im = Image.open(tmp_path / "img" / f"{i}.png")
        if i == 3:
            im = im.resize((47, 47))
        im.save(tmp_path / "img" / f"{i}_copy.png")
        rows.append({"image": f"img/{i}_copy.png", "caption": f"a copy of noise {i}"})
    rows += [{"text": f"a plain document {i}"} for i in range(3)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _semantic_drops(out: str) -> set[tuple[str, str, str]]:
    """The run's semantic_duplicate drops as (source_key, dup_of's source_key, detail), after
    checking its report's semantic section."""
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    key = {r["id"]: r["source_key"] for r in ledger}
    drops = {(key[r["id"]], key[r["dup_of"]], r["detail"]) for r in ledger if r["reason"] == "semantic_duplicate"}
    rep = json.load(open(os.path.join(out, "report.json")))
    (section,) = rep["semantic"]
    assert section["embedded"] == 16 and section["not_embedded"] == 3 and section["k"] == 3
    assert {r["eps"]: r["drops"] for r in section["table"]}[0.001] == len(drops)
    assert "Semantic dedup" in open(os.path.join(out, "report.md")).read()
    return drops


@pytest.mark.cluster
@pytest.mark.spark
def test_local_cluster_decides_the_same(spark, local_cluster, tmp_path):
    """dedup_semantic embedding in the executors (no from_step): local[2] and local-cluster
    drop the same samples with the same dup_of, and the copies are what leaves."""
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    rows = _corpus(tmp_path)
    sem = {"model": "reelforge-tiny-clip", "pretrained": "model/reelforge-tiny-clip.pt",
           "model_config": "model/reelforge-tiny-clip.json", "device": "cpu", "eps": 0.001, "k": 3, "seed": 7}
    recipe = {"name": "sem", "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"}],
              "steps": [{"probe": {}}, {"dedup_semantic": sem}],
              "output": {"path": "out", "shards": {"max_samples": 100}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(str(path), out=str(tmp_path / "local")), spark=spark, log=lambda *a: None)
    local_cluster.run(path, tmp_path / "local-cluster")
    a, b = _semantic_drops(str(tmp_path / "local")), _semantic_drops(str(tmp_path / "local-cluster"))
    assert a == b
    # the four copies leave (or their originals: the keep rule picks the longer caption, the copy's)
    pairs = {tuple(sorted((s, d))) for s, d, _ in a}
    want = {tuple(sorted((f"m.jsonl:{i + 1}", f"m.jsonl:{13 + i}"))) for i in range(4)}
    assert want <= pairs, (pairs, want)
    print(f"semantic drops: {len(a)}; planted copies: 4; rows {len(rows)}")
