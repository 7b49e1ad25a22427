"""Near-dup quality against exact Jaccard over all pairs, and the same answer on a cluster."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess

import pytest
import yaml

from reelforge.curation.minhash import shingles

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


@pytest.fixture(scope="session")  # session: the parity test that reads it runs last (conftest.py)
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


@pytest.fixture(scope="session")
def text_local_run(spark, text_corpus, tmp_path_factory) -> tuple[str, dict]:
    """The text corpus's recipe run once under local[2]: (its output folder, its report)."""
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    out = str(tmp_path_factory.mktemp("near-local") / "local")
    return out, run_recipe(load_recipe(text_corpus[0], out=out), spark=spark, log=lambda *a: None)


def test_text_near_dup_precision_and_recall(text_corpus, text_local_run):
    _, docs = text_corpus
    out, rep = text_local_run
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

    # the engine's decisions are exactly the plain-Python ones (band keys, candidate pairs,
    # exact Jaccard, components, keep rule on a list): whatever Spark does to be fast
    # (one-task components, semi-joined texts, broadcast drops) changes no decision
    import pyarrow.parquet as pq

    from reelforge.curation.schema import rows_of
    from reelforge.filters.near_dedup import NearDedup, near_duplicates

    rows = rows_of(pq.read_table(os.path.join(out, "_work", "00_ingest")))
    step = NearDedup(threshold=THRESHOLD, num_perm=128, ngram=5)
    want = dict(near_duplicates(rows, step.edges(rows)))
    got = {r["id"]: r["dup_of"] for r in pq.read_table(os.path.join(out, "ledger")).to_pylist() if r["dup_of"]}
    assert got == want and len(got) >= 80


def smooth_field(rng: random.Random, w: int, h: int, t: float = 0.0):
    """A smooth random colour field (photo-like low frequencies), drifting with t."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    r = random.Random(rng.random())
    for c in range(3):
        for _ in range(6):
            fx, fy, p = r.uniform(0.5, 6), r.uniform(0.5, 6), r.uniform(0, 6.28)
            img[..., c] += r.uniform(0.3, 1) * np.cos(2 * np.pi * (fx * x + fy * y) + p + 0.4 * t)
    img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255
    return Image.fromarray(img.astype(np.uint8))


def _video(path: str, seed: int, seconds: float = 6.0, fps: int = 10, crf: int = 23, start: float = 0.0) -> None:
    rng = random.Random(seed)
    state = rng.random()
    frames = []
    for k in range(int(seconds * fps)):
        frames.append(smooth_field(random.Random(state), 96, 64, t=start + k / fps).tobytes())
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "96x64",
                    "-r", str(fps), "-i", "-", "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p", path],
                   input=b"".join(frames), check=True, timeout=120)


def test_image_and_video_near_dups_and_leakage(spark, tmp_path):

    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    rng = random.Random(5)
    (tmp_path / "img").mkdir()
    (tmp_path / "vid").mkdir()
    rows, truth = [], set()
    bases = [smooth_field(rng, 320, 240) for _ in range(50)]
    for i, im in enumerate(bases):
        im.save(tmp_path / "img" / f"b{i:03d}.png")
        rows.append({"image": f"img/b{i:03d}.png", "caption": f"picture {i}"})
    for i in range(0, 30):
        im = bases[i]
        variant = [im.resize((192, 144)), im.crop((4, 3, 316, 237)), im][i % 3]
        variant.save(tmp_path / "img" / f"c{i:03d}.jpg", quality=[90, 90, 35][i % 3])
        rows.append({"image": f"img/c{i:03d}.jpg", "caption": f"another caption {i}"})
        truth.add((f"img/b{i:03d}.png", f"img/c{i:03d}.jpg"))
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for v in range(5):
        _video(str(tmp_path / "vid" / f"v{v}.mp4"), seed=100 + v)
        (tmp_path / "vid" / f"v{v}.txt").write_text(f"video {v}")
    for v in range(3):  # a re-encoded copy and a trimmed copy of three of them
        _video(str(tmp_path / "vid" / f"v{v}_crf.mp4"), seed=100 + v, crf=38)
        _video(str(tmp_path / "vid" / f"v{v}_trim.mp4"), seed=100 + v, seconds=4.5, start=1.0)
        for suffix in ("crf", "trim"):
            (tmp_path / "vid" / f"v{v}_{suffix}.txt").write_text(f"copy {v}")
    # an evaluation set: one question about a (re-encoded) training image, one copied text
    (tmp_path / "eval").mkdir()
    bases[40].save(tmp_path / "eval" / "q.jpg", quality=80)
    bench_text = real_documents()[3]
    (tmp_path / "eval" / "bench.jsonl").write_text(
        json.dumps({"image": "q.jpg", "question": "What colours?", "answer": "many"}) + "\n"
        + json.dumps({"question": bench_text, "answer": "x"}) + "\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": bench_text}) + "\n"
                                         + json.dumps({"text": real_documents()[4]}) + "\n")
    recipe = {"name": "near-media", "sources": [
        {"name": "images", "format": "jsonl", "path": "images.jsonl"},
        {"name": "videos", "format": "video_folder", "path": "vid/"},
        {"name": "docs", "format": "text", "path": "docs.jsonl"}],
        "steps": [{"probe": {}}, {"leakage": {"eval_sets": [{"name": "bench", "path": "eval/bench.jsonl"}]}},
                  {"dedup_near": {}}],
        "output": {"path": "out", "shards": {"max_samples": 100}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(str(tmp_path / "recipe.yaml"), out=out), spark=spark, log=lambda *a: None)

    import pyarrow.parquet as pq

    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    by_id = {r["id"]: r for r in ledger}

    # images: pairs decided by the step vs the planted copies
    img_rows = {r["id"]: r for r in ledger if r["source"] == "images"}
    manifest = [json.loads(x)["image"] for x in (tmp_path / "images.jsonl").read_text().splitlines()]
    path_of = {r["id"]: manifest[int(r["source_key"].split(":")[1]) - 1] for r in img_rows.values()}
    leaked = {r["id"] for r in ledger if (r["reason"] or "").startswith("leak:")}
    pred = {tuple(sorted((path_of[r["id"]], path_of[r["dup_of"]]))) for r in img_rows.values()
            if r["reason"] == "near_duplicate"}
    truth_live = {p for p in truth if not any(path_of[i] in p for i in leaked & set(img_rows))}
    tp = len(pred & truth_live)
    assert tp / max(1, len(pred)) >= 0.95 and tp / len(truth_live) >= 0.95, (len(pred), len(truth_live), tp)
    # videos: both copies of each of the three clustered with their original
    vids = {os.path.basename(r["source_location"]): r for r in ledger if r["source"] == "videos"}
    for v in range(3):
        keep = vids[f"v{v}.mp4"]["id"]
        group = {vids[f"v{v}.mp4"]["fate"], vids[f"v{v}_crf.mp4"]["fate"], vids[f"v{v}_trim.mp4"]["fate"]}
        assert group == {"kept", "dropped"}
        dropped = [vids[n] for n in (f"v{v}.mp4", f"v{v}_crf.mp4", f"v{v}_trim.mp4") if vids[n]["fate"] == "dropped"]
        assert len(dropped) == 2 and all(d["reason"] == "near_duplicate" for d in dropped), dropped
        assert keep in {d["dup_of"] for d in dropped} or vids[f"v{v}.mp4"]["fate"] == "dropped"
    for v in range(3, 5):
        assert vids[f"v{v}.mp4"]["fate"] == "kept"
    # leakage: the training image and the copied text are gone, named with their evaluation set
    assert {by_id[i]["reason"] for i in leaked} == {"leak:bench"} and len(leaked) == 2
    assert manifest[int(by_id[next(i for i in leaked if by_id[i]["source"] == "images")]["source_key"]
                        .split(":")[1]) - 1] == "img/b040.png"
    assert rep["balanced"]
    leak_step = next(s for s in rep["steps"] if s["step"] == "leakage")
    assert leak_step["reasons"] == {"leak:bench": 2}


@pytest.mark.cluster
@pytest.mark.spark
def test_local_cluster_decides_the_same(text_corpus, text_local_run, local_cluster, tmp_path):
    """Separate executor processes give the same near-dup decisions as local[2]."""
    cluster = str(tmp_path / "cluster")
    local_cluster.run(text_corpus[0], cluster)
    a, b = _predicted(text_local_run[0]), _predicted(cluster)
    assert a == b and any(k != v for k, v in a.items())
