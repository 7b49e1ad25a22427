"""The whole job on a real corpus: accounting, ledger reasons, loadable shards, determinism, resume."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image


def _shard_hashes(out: str) -> dict[str, str]:
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(out, "shards", "*.tar")))}


def _ledger(out: str) -> list[dict]:
    return pq.read_table(os.path.join(out, "ledger")).to_pylist()


def test_inputs_equal_kept_plus_dropped(demo_run):
    rep, out = demo_run["report"], demo_run["out"]
    ledger = _ledger(out)
    assert rep["balanced"] and rep["inputs"] + rep["derived"] == rep["kept"] + rep["dropped"] == len(ledger)
    assert len({r["id"] for r in ledger}) == len(ledger)
    index = json.load(open(os.path.join(out, "shards", "index.json")))
    assert index["samples"] == rep["kept"] == sum(1 for r in ledger if r["fate"] == "kept")
    for s in index["shards"]:
        path = os.path.join(out, "shards", s["shard"])
        assert os.path.getsize(path) == s["bytes"]
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == s["sha256"]
        assert s["samples"] <= 64
    kept_by_source: dict[str, int] = {}
    for r in ledger:
        if r["fate"] == "kept":
            kept_by_source[r["source"]] = kept_by_source.get(r["source"], 0) + 1
    assert index["sources"] == dict(sorted(kept_by_source.items()))
    # the report's funnel adds up step by step
    steps = rep["steps"]
    assert [s["step"] for s in steps] == ["ingest", "probe", "tokens", "dedup_exact", "quality", "text_quality",
                                          "write"]
    for a, b in zip(steps, steps[1:]):
        assert a["out"] == b["in"] and a["in"] - a["dropped"] + a["derived"] == a["out"]
    assert steps[-1]["out"] == rep["kept"]
    assert os.path.getsize(os.path.join(out, "funnel.png")) > 1000
    assert "inputs =" in open(os.path.join(out, "report.md")).read()


def test_every_planted_broken_input_is_in_the_ledger(demo_run):
    planted = json.load(open(os.path.join(os.path.dirname(demo_run["recipe"]), "planted.json")))
    by_key = {(r["source"], r["source_key"]): r for r in _ledger(demo_run["out"])}
    broken = {k: v for k, v in planted.items() if isinstance(v, dict) and "reason" in v}
    assert {"truncated_jpeg", "zero_byte_video", "bad_json_line", "missing_path"} <= set(broken)
    for name, p in broken.items():
        line = by_key[(p["source"], p["source_key"])]
        assert line["fate"] == "dropped", name
        assert line["reason"] == p["reason"], (name, line)
        assert line["detail"], name


def test_planted_duplicates_point_at_what_they_duplicate(demo_run):
    ledger = _ledger(demo_run["out"])
    dups = [r for r in ledger if r["reason"] in ("duplicate_media", "duplicate_text")]
    assert len(dups) >= 5
    ids = {r["id"]: r for r in ledger}
    for d in dups:
        assert d["step"] == "dedup_exact" and ids[d["dup_of"]]["fate"] == "kept"
        assert d["dup_of"] < d["id"]  # the smallest id of a group is the one kept


def test_shards_load_with_plain_webdataset_and_media_decode(demo_run, tmp_path):
    out = demo_run["out"]
    kept = {r["id"]: r for r in _ledger(out) if r["fate"] == "kept"}
    seen = set()
    urls = sorted(glob.glob(os.path.join(out, "shards", "*.tar")))
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["id"] == sample["__key__"] and kept[meta["id"]]["shard"] == os.path.basename(sample["__url__"])
        seen.add(meta["id"])
        for m in meta.get("media", []):
            data = sample[m["member"].split(".", 1)[1]]
            assert hashlib.sha256(data).hexdigest() == m["sha256"]
            if m["kind"] == "image":
                img = Image.open(io.BytesIO(data))
                img.load()
                assert img.size == (m["width"], m["height"])
            else:
                p = tmp_path / "v.mp4"
                p.write_bytes(data)
                res = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                                      "stream=nb_read_frames", "-of", "csv=p=0", str(p)],
                                     capture_output=True, text=True, timeout=60)
                assert res.returncode == 0 and int(res.stdout.strip().split(",")[0]) > 0
    assert seen == set(kept)
    for u in urls:
        with tarfile.open(u) as tf:
            for name in tf.getnames():
                assert not name.endswith((".pyd", ".pickle", ".pkl", ".pth")), name


def test_rerun_reuses_steps_and_writes_identical_shards(spark, demo_run):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    out = demo_run["out"]
    before = _shard_hashes(out)
    logs: list[str] = []
    report = run_recipe(load_recipe(demo_run["recipe"], out=out), spark=spark, log=logs.append)
    assert sum("already done" in line for line in logs) == 6  # ingest + 5 steps resumed
    assert _shard_hashes(out) == before and report["kept"] == demo_run["report"]["kept"]


@pytest.mark.cluster
@pytest.mark.spark
def test_local_cluster_writes_the_same_shards(demo_run, local_cluster, tmp_path):
    """Separate executor processes, nothing shared with the driver: same bytes as local[2]."""
    out = str(tmp_path / "cluster")
    local_cluster.run(demo_run["recipe"], out)
    local = _shard_hashes(demo_run["out"])
    assert local and _shard_hashes(out) == local
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["master"].startswith("local-cluster") and rep["kept"] == demo_run["report"]["kept"]
