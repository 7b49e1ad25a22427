"""Every kind of bad media costs one ledger line with a clear reason, and nothing else changes."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess

import pyarrow.parquet as pq
import yaml
from PIL import Image


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


def _good(root: str) -> str:
    os.makedirs(f"{root}/videos")
    os.makedirs(f"{root}/images")
    for i, src in enumerate(["testsrc2", "smptebars"]):
        _ff("-f", "lavfi", "-i", f"{src}=size=96x64:rate=25", "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            f"{root}/videos/good{i}.mp4")
        open(f"{root}/videos/good{i}.txt", "w").write(f"good clip {i}")
    with open(f"{root}/images.jsonl", "w") as f:
        for i in range(3):
            Image.new("RGB", (80 + i * 8, 60), (i * 70, 30, 90)).save(f"{root}/images/good{i}.jpg")
            f.write(json.dumps({"image": f"images/good{i}.jpg", "caption": f"good picture {i}"}) + "\n")
    recipe = {"name": "bad-media", "sources": [
        {"name": "videos", "format": "video_folder", "path": "videos/"},
        {"name": "images", "format": "jsonl", "path": "images.jsonl"}],
        "steps": [{"probe": {"timeout_s": 20, "video_codecs": ["h264", "hevc", "vp9", "av1"],
                             "max_video_pixels": 100000}},
                  {"quality": {"min_side": 8, "max_aspect": 200}}],
        "output": {"path": "out", "shards": {"max_samples": 3}}}
    path = f"{root}/recipe.yaml"
    yaml.safe_dump(recipe, open(path, "w"))
    return path


def _add_bad(root: str) -> dict[tuple[str, str], str]:
    """Add one file of each bad kind; returns (source, source_key) -> expected reason."""
    v = f"{root}/videos"
    open(f"{v}/zero_bytes.mp4", "wb").close()
    data = open(f"{v}/good0.mp4", "rb").read()
    open(f"{v}/truncated.mp4", "wb").write(data[: len(data) // 2])
    open(f"{v}/text.mp4", "w").write("not a video at all\n" * 50)
    _ff("-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", f"{v}/audio_only.mp4")
    _ff("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10", "-frames:v", "0", "-c:v", "libx264", f"{v}/no_streams.mp4")
    _ff("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10", "-t", "1", "-c:v", "mjpeg", f"{v}/mjpeg.avi")
    _ff("-f", "lavfi", "-i", "testsrc2=size=480x360:rate=10", "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        f"{v}/huge.mp4")
    for name in ("zero_bytes", "truncated", "text", "audio_only", "no_streams", "mjpeg", "huge"):
        open(f"{v}/{name}.txt", "w").write(f"a caption for {name}")
    i = f"{root}/images"
    Image.new("1", (20000, 12000)).save(f"{i}/bomb.png")  # 240 MP behind a tiny file
    Image.new("RGB", (4200, 20), (200, 0, 0)).save(f"{i}/strip.png")  # 210:1
    Image.effect_noise((300, 300), 50).convert("RGB").save(f"{i}/noise.jpg")
    open(f"{i}/truncated.jpg", "wb").write(open(f"{i}/noise.jpg", "rb").read()[:3000])
    os.remove(f"{i}/noise.jpg")
    with open(f"{root}/images.jsonl", "a") as f:
        for name in ("bomb.png", "strip.png", "truncated.jpg", "missing.jpg"):
            f.write(json.dumps({"image": f"images/{name}", "caption": f"bad {name}"}) + "\n")
    return {("videos", "zero_bytes.mp4"): "empty_file", ("videos", "truncated.mp4"): "corrupt_video",
            ("videos", "text.mp4"): "corrupt_video", ("videos", "audio_only.mp4"): "not_a_video",
            ("videos", "no_streams.mp4"): "not_a_video", ("videos", "mjpeg.avi"): "unsupported_codec",
            ("videos", "huge.mp4"): "too_many_pixels", ("images", "images.jsonl:4"): "too_many_pixels",
            ("images", "images.jsonl:5"): "aspect_ratio", ("images", "images.jsonl:6"): "corrupt_image",
            ("images", "images.jsonl:7"): "missing_file"}


def _hashes(out: str) -> dict:
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(f"{out}/shards/*.tar")}


def test_bad_media_are_ledger_lines_and_good_output_is_unchanged(spark, tmp_path):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    root = str(tmp_path / "corpus")
    recipe = _good(root)
    clean = run_recipe(load_recipe(recipe, out=str(tmp_path / "clean")), spark=spark, log=lambda *a: None)
    expected = _add_bad(root)
    dirty = run_recipe(load_recipe(recipe, out=str(tmp_path / "dirty")), spark=spark, log=lambda *a: None)
    assert clean["kept"] == dirty["kept"] == 5 and clean["dropped"] == 0
    assert dirty["inputs"] == clean["inputs"] + len(expected) and dirty["balanced"]
    ledger = {(r["source"], r["source_key"]): r
              for r in pq.read_table(str(tmp_path / "dirty" / "ledger")).to_pylist()}
    for key, reason in expected.items():
        line = ledger[key]
        assert (line["fate"], line["reason"]) == ("dropped", reason), (key, line)
        assert line["detail"]
    # the good samples' shards are byte-identical with and without the bad files beside them
    assert _hashes(str(tmp_path / "clean")) == _hashes(str(tmp_path / "dirty"))
