"""The clips step: shot cuts become new samples that name their parent; accounting still holds."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest
import yaml


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("clips")
    parts = []
    for i, src in enumerate(["testsrc2", "smptebars", "mandelbrot"]):
        p = root / f"part{i}.mp4"
        _ff("-f", "lavfi", "-i", f"{src}=size=160x120:rate=25", "-t", "3", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(p))
        parts.append(p)
    (root / "list.txt").write_text("".join(f"file '{p}'\n" for p in parts))
    vids = root / "videos"
    vids.mkdir()
    _ff("-f", "concat", "-safe", "0", "-i", str(root / "list.txt"), "-c", "copy", str(vids / "joined.mp4"))
    (vids / "joined.txt").write_text("three test patterns one after another")
    _ff("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30", "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        str(vids / "single.mp4"))
    (vids / "single.txt").write_text("one shot")
    recipe = {"name": "clips", "sources": [{"name": "v", "format": "video_folder", "path": "videos/"}],
              "steps": [{"probe": {}}, {"clips": {"max_clip_s": 60, "transcode": {"max_side": 128, "fps": 15}}}],
              "output": {"path": "out", "shards": {"max_samples": 10}}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_clips_are_derived_samples_and_the_ledger_balances(spark, corpus, tmp_path):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(corpus, out=out), spark=spark, log=lambda *a: None)
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    parent = next(r for r in ledger if r["source_key"] == "joined.mp4")
    assert (parent["fate"], parent["step"], parent["reason"]) == ("dropped", "clips", "split_into_clips")
    children = sorted((r for r in ledger if r["parent_id"] == parent["id"]), key=lambda r: r["source_key"])
    assert [c["source_key"] for c in children] == [f"joined.mp4#clip{i:03d}" for i in range(3)]
    assert all(c["fate"] == "kept" for c in children)
    single = next(r for r in ledger if r["source_key"] == "single.mp4")
    assert single["fate"] == "kept" and single["parent_id"] is None  # one shot: transcoded in place
    assert rep["inputs"] == 2 and rep["derived"] == 3 and rep["kept"] == 4 and rep["balanced"]
    clips_row = next(s for s in rep["steps"] if s["step"] == "clips")
    assert (clips_row["in"], clips_row["dropped"], clips_row["derived"], clips_row["out"]) == (2, 1, 3, 4)
    # every clip is a normalised H.264 file within the transcode bounds, ~3 s long
    import webdataset as wds

    seen = 0
    for s in wds.WebDataset(sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar")), shardshuffle=False):
        meta = json.loads(s["json"])
        m = meta["media"][0]
        assert m["codec"] == "h264" and max(m["width"], m["height"]) <= 128 and m["fps"] <= 15.01
        # the clip's own 1.5 frame plan (its parent was planned at probe)
        assert m["plan"]["processor"] == "keye-vl-1.5" and m["plan"]["frame_types"][0] == 0
        assert len(m["plan"]["frame_types"]) == len(m["plan"]["frame_indices"]) == len(m["plan"]["frame_times"])
        if "clip" in meta.get("meta", {}):
            assert abs(m["duration"] - 3.0) < 0.3
            assert meta["meta"]["clip"]["parent"] == parent["id"]
        seen += 1
    assert seen == 4
