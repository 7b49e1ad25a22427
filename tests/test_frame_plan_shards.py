"""Issue 13: the keye-vl-1.5 frame plan is computed once, in the executors (the probe step), stored
per video medium and carried to the shard JSON; the tokens step counts true 1.5 tokens from it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

pytestmark = pytest.mark.spark


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("plan")
    vids = root / "videos"
    vids.mkdir()
    enc = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    # static: one still colour field for 3 s (every frame after the first is fast), big enough that
    # a fast frame is smaller than a slow one (both are at the 48-token floor at 224x160)
    _ff("-f", "lavfi", "-i", "color=c=0x3366aa:size=448x320:rate=10", "-t", "3", *enc, str(vids / "static.mp4"))
    # a scene cut: 2 s of one pattern, then 2 s of another
    parts = []
    for i, src in enumerate(["smptebars", "mandelbrot"]):
        p = root / f"part{i}.mp4"
        _ff("-f", "lavfi", "-i", f"{src}=size=224x160:rate=10", "-t", "2", *enc, str(p))
        parts.append(p)
    (root / "list.txt").write_text("".join(f"file '{p}'\n" for p in parts))
    _ff("-f", "concat", "-safe", "0", "-i", str(root / "list.txt"), "-c", "copy", str(vids / "cut.mp4"))
    # motion throughout
    _ff("-f", "lavfi", "-i", "testsrc2=size=160x224:rate=12", "-t", "2", *enc, str(vids / "moving.mp4"))
    for name in ("static", "cut", "moving"):
        (vids / f"{name}.txt").write_text(f"a {name} video")
    from reelforge.curation.tiny_models import build_tiny_tokenizer

    build_tiny_tokenizer(str(root / "tokenizer"), texts=["a static video", "a cut video", "a moving video"] * 20,
                         vocab_size=300)
    recipe = {"name": "plan", "sources": [{"name": "v", "format": "video_folder", "path": "videos/"}],
              "steps": [{"probe": {}}, {"tokens": {"tokenizer": "tokenizer"}}],
              "output": {"path": "out", "shards": {"max_samples": 10}}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_plan_reaches_the_shards_and_counts_true_tokens(spark, corpus, tmp_path):
    import webdataset as wds

    from reelforge.curation.frame_plan import frame_plan
    from reelforge.curation.tokens import video_tokens
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    out = tmp_path / "out"
    rep = run_recipe(load_recipe(corpus, out=str(out)), spark=spark, log=lambda *a: None)
    assert rep["kept"] == 3 and rep["balanced"]
    videos = os.path.join(os.path.dirname(corpus), "videos")
    seen = {}
    for s in wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False):
        meta = json.loads(s["json"])
        name = os.path.splitext(os.path.basename(meta["provenance"]["key"]))[0]
        (m,) = meta["media"]
        plan = m["plan"]
        direct = frame_plan(os.path.join(videos, f"{name}.mp4"))
        assert plan["processor"] == "keye-vl-1.5"
        assert plan["frame_types"] == direct["frame_types"]
        assert plan["frame_indices"] == direct["indices"]
        assert plan["frame_times"] == pytest.approx(direct["timestamps"])
        assert plan["slow_size"] == [direct["resized_height"], direct["resized_width"]]
        assert plan["fast_size"] == [direct["fast_resized_height"], direct["fast_resized_width"]]
        assert plan["tokens"] == direct["tokens"]
        assert meta["tokens"]["visual_tokens"] == plan["tokens"]  # one video: the sample's tokens are its plan's
        upper = video_tokens(m["height"], m["width"], m["duration"], m["fps"], total_frames=m["frames"])["tokens"]
        assert plan["tokens"] <= upper
        seen[name] = {**plan, "upper": upper}
    assert sorted(seen) == ["cut", "moving", "static"]
    st, cut = seen["static"]["frame_types"], seen["cut"]["frame_types"]
    assert st[0] == 0 and all(t == 1 for t in st[1:])  # a still field: every later frame is fast
    assert seen["static"]["tokens"] < seen["static"]["upper"]  # fast frames at 30%: below the all-slow bound
    half = len(cut) // 2
    assert cut[0] == 0 and 0 in cut[half - 1:half + 2]  # the cut makes a slow frame where it falls
