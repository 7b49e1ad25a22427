"""Near-dup quality against exact Jaccard over all pairs, and the same answer on a cluster."""

from __future__ import annotations

import itertools
import json
import os
import random

import pytest
import yaml

from curation.minhash import shingles

THRESHOLD = 0.8


def real_documents(words_per_doc: int = 150) -> list[str]:
    """Real English text shipped with Python itself (pydoc's help topics), cut into documents."""
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    return [" ".join(words[i:i + words_per_doc]) for i in range(0, len(words) - words_per_doc, words_per_doc)]


def edit(doc: str, rate: float, rng: random.Random) -> str:
    """Insertions, deletions and adjacent swaps of words, each at `rate / 3`."""
    w = doc.split()
    out: list[str] = []
    i = 0
    while i < len(w):
        x = rng.random()
        if x < rate / 3:  # delete
            i += 1
            continue
        if x < 2 * rate / 3:  # insert
            out.append(rng.choice(w))
        if x < rate and i + 1 < len(w) and x >= 2 * rate / 3:  # swap with the next word
            out += [w[i + 1], w[i]]
            i += 2
            continue
        out.append(w[i])
        i += 1
    return " ".join(out)


def _pairs_of_clusters(clusters: dict[str, str]) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    for k, c in clusters.items():
        groups.setdefault(c, []).append(k)
    return {tuple(sorted(p)) for g in groups.values() for p in itertools.combinations(sorted(g), 2)}


def _truth_clusters(docs: dict[str, str]) -> dict[str, str]:
    sh = {k: set(shingles(v, 5, "word")) for k, v in docs.items()}
    parent = {k: k for k in docs}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in itertools.combinations(sorted(docs), 2):
        sa, sb = sh[a], sh[b]
        if sa and sb and len(sa & sb) / len(sa | sb) >= THRESHOLD:
            parent[find(a)] = find(b)
    return {k: find(k) for k in docs}


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> tuple[str, dict[str, str]]:
    rng = random.Random(11)
    base = real_documents()[:320]
    docs = {f"d{i:04d}": d for i, d in enumerate(base)}
    for j in range(160):
        src = rng.randrange(len(base))
        rate = rng.choice([0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1])
        docs[f"e{j:04d}"] = edit(base[src], rate, rng)
    root = tmp_path_factory.mktemp("near")
    with open(root / "docs.jsonl", "w") as f:
        for k in sorted(docs):
            f.write(json.dumps({"id": k, "text": docs[k]}) + "\n")
    recipe = {"name": "near", "sources": [{"name": "docs", "format": "text", "path": "docs.jsonl"}],
              "steps": [{"dedup_near": {"threshold": THRESHOLD, "num_perm": 128, "ngram": 5}}],
              "output": {"path": "out", "shards": {"max_samples": 200}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(root / "recipe.yaml"), docs


def _predicted(out: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    rows = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    key = {r["id"]: r["source_key"].split("#")[1] for r in rows}
    return {key[r["id"]]: key[r["dup_of"]] if r["dup_of"] else key[r["id"]] for r in rows}


def test_text_near_dup_precision_and_recall(spark, text_corpus, tmp_path):
    from jobs.recipe import load_recipe
    from jobs.run import run_recipe

    recipe, docs = text_corpus
    out = str(tmp_path / "local")
    rep = run_recipe(load_recipe(recipe, out=out), spark=spark, log=lambda *a: None)
    truth = _pairs_of_clusters(_truth_clusters(docs))
    pred = _pairs_of_clusters(_predicted(out))
    assert len(truth) >= 80, "the planted edits must make enough true duplicates to measure"
    tp = len(truth & pred)
    precision, recall = tp / max(1, len(pred)), tp / len(truth)
    print(f"near-dup text: {len(truth)} true pairs, precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.95
    assert rep["balanced"]
    dropped = [s for s in rep["steps"] if s["step"] == "dedup_near"][0]
    assert set(dropped["reasons"]) == {"near_duplicate"}
