"""Parity with the released Keye-VL processors, run as oracles: `keye-vl-utils` 1.0.0 and 1.5.2
from PyPI, each installed on its own (`pip install --target .venv/peers/keye-vl-utils-VERSION`),
never in the project's site-packages. Each version runs in its own subprocess with PYTHONPATH
set to its folder, so the two never meet in one interpreter; cases go in and answers come back
as JSON.

- images, both presets: `smart_resize` with the release's own default bounds, on a random
  grid of sizes (1x1, 200:1 strips, beyond 16k x 16k); a size the release refuses (ValueError,
  aspect ratio beyond 200:1) is one we refuse too (TokenError `aspect_ratio`); a few real
  images also go through `fetch_image`.
- 1.0 video from metadata: the release's own `fetch_video` at total_pixels = 24576*28*28
  (and once at the release's default budget), with only the decoder and the pixel resize
  stood in for: the stand-in reader takes the frame count and fps from the case, and calls the
  release's `calculate_video_frame_range` and `smart_nframes` as its decord reader does; it
  returns a zero-stride tensor of the case's size, so a 4K video of 768 frames costs nothing,
  and the resize only records the size asked for. Small real videos go through the genuine
  decord reader as well.
- 1.5 video from metadata: the release's `fetch_video` with its reader stood in for the same
  way, the frame types given (all slow, as we count from metadata, and random slow/fast mixes
  for the budget search).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from reelforge.curation.tokens import (
    TokenError,
    VisualTokenConfig,
    image_tokens,
    slow_fast_sizes,
    video_nframes,
    video_tokens,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, ".venv", "peers")
V10 = VisualTokenConfig(processor="keye-vl-1.0")
V15 = VisualTokenConfig(processor="keye-vl-1.5")

ORACLE = textwrap.dedent(r'''
    import json, sys
    from types import SimpleNamespace

    import torch
    import keye_vl_utils
    from keye_vl_utils import vision_process as vp

    cases = json.load(open(sys.argv[1]))
    out = {"version_file": keye_vl_utils.__file__}

    def zeros(n, h, w):  # a video tensor of any size without memory
        return torch.zeros(1, 1, 1, 1).expand(n, 3, h, w)

    def err(e):
        return {"error": type(e).__name__, "detail": str(e)}

    res = []
    for h, w in cases.get("images", []):
        try:
            rh, rw = vp.smart_resize(h, w)
            res.append([rh, rw])
        except Exception as e:
            res.append(err(e))
    out["images"] = res

    if cases.get("fetch_images"):
        from PIL import Image
        out["fetch_images"] = [list(vp.fetch_image({"image": Image.new("RGB", (w, h))}).size[::-1])
                               for h, w in cases["fetch_images"]]

    # the size only: the resize records what it is asked for
    vp.transforms = SimpleNamespace(functional=SimpleNamespace(
        resize=lambda video, size, **kw: zeros(video.shape[0], size[0], size[1])))

    if cases.get("v10_meta"):
        cur = {}

        def reader(ele):  # the decord reader's steps, with the case's frame count and fps
            total, fps = cur["total"], cur["fps"]
            start, end, total = vp.calculate_video_frame_range(ele, total, fps)
            n = vp.smart_nframes(ele, total_frames=total, video_fps=fps)
            return zeros(n, cur["h"], cur["w"]), n / max(total, 1e-6) * fps

        vp.VIDEO_READER_BACKENDS["decord"] = vp.VIDEO_READER_BACKENDS["torchvision"] = reader
        res = []
        for c in cases["v10_meta"]:
            cur.update(c)
            ele = {"video": "metadata.mp4"}
            if c.get("total_pixels"):
                ele["total_pixels"] = c["total_pixels"]
            try:
                v = vp.fetch_video(ele)
                res.append(list(v.shape[:1]) + list(v.shape[2:]))
            except Exception as e:
                res.append(err(e))
        out["v10_meta"] = res

    if cases.get("v15_meta"):
        cur = {}

        def reader15(ele):  # frames, timestamps, frame types
            n = vp.smart_nframes(ele, total_frames=cur["total"], video_fps=cur["fps"])
            types = torch.zeros(n, dtype=torch.int32)
            if cur.get("fast"):
                types[torch.tensor(cur["fast"], dtype=torch.long)] = 1
            return zeros(n, cur["h"], cur["w"]), torch.zeros(n), types

        vp._read_video_decord = reader15
        res = []
        for c in cases["v15_meta"]:
            cur.clear()
            cur.update(c)
            try:
                _, kw = vp.fetch_video({"video": "metadata.mp4"})
                ft = kw["frame_types"].tolist()
                res.append({"frames": len(ft), "fast": int(sum(ft)), "height": kw["height"], "width": kw["width"],
                            "fast_height": kw["fast_height"], "fast_width": kw["fast_width"]})
            except Exception as e:
                res.append(err(e))
        out["v15_meta"] = res
    print(json.dumps(out))
''')

REAL_ORACLE = textwrap.dedent(r'''
    import json, sys
    import keye_vl_utils
    from keye_vl_utils import vision_process as vp

    out = []
    for path, total_pixels in json.load(open(sys.argv[1])):
        v = vp.fetch_video({"video": path, "total_pixels": total_pixels})
        out.append(list(v.shape[:1]) + list(v.shape[2:]))
    print(json.dumps(out))
''')

# subprocesses of the released processors and real video decodes: tens of seconds in all
pytestmark = pytest.mark.slow


def peer(version: str) -> str:
    path = os.path.join(PEERS, f"keye-vl-utils-{version}")
    # a missing oracle is a broken setup, never a reason to skip
    assert os.path.isdir(os.path.join(path, "keye_vl_utils")), \
        f"keye-vl-utils {version} is not installed in {path}: run `make setup`"
    return path


def run_oracle(version: str, cases, tmp_path, code: str = ORACLE):
    """The release's answers to `cases`, computed in a subprocess that sees only that release."""
    path = peer(version)
    f = tmp_path / f"cases-{version}-{abs(hash(code)) % 1000}.json"
    f.write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIDEO_MAX_PIXELS", "FORCE_KEYEVL_VIDEO_READER")}
    env["PYTHONPATH"] = path
    res = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if isinstance(out, dict):
        assert out["version_file"].startswith(path), out["version_file"]  # that release, not another
    return out


def image_grid(n: int = 600, seed: int = 13) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(1, 1), (1, 2), (27, 27), (28, 28), (14, 42), (1, 200), (200, 1), (1, 201), (201, 1), (2, 400),
           (2, 401), (3, 600), (7, 1400), (50, 10000), (10000, 50), (56, 11200), (3192, 4004), (4004, 3192),
           (16384, 16384), (16385, 16385), (20000, 30000), (50000, 50000), (100000, 500), (500, 100001),
           (3584, 3584), (4480, 3584), (4008, 4008)]
    while len(out) < n:
        mode = rng.random()
        if mode < 0.35:
            h, w = rng.randint(1, 8000), rng.randint(1, 8000)
        elif mode < 0.55:  # beyond 16k x 16k
            h, w = rng.randint(8000, 60000), rng.randint(8000, 60000)
        elif mode < 0.8:  # strips around 200:1
            h = rng.randint(1, 300)
            w = max(1, int(h * rng.uniform(150, 230)))
            if rng.random() < 0.5:
                h, w = w, h
        else:  # small, around the minimum
            h, w = rng.randint(1, 150), rng.randint(1, 150)
        out.append((h, w))
    return out


def video_grid(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    sizes = [(168, 252), (168, 300), (240, 320), (360, 640), (480, 854), (720, 1280), (1080, 1920), (1920, 1080),
             (1440, 2560), (2160, 3840), (3840, 2160), (1280, 720), (176, 144)]
    durations = [1.0, 1.5, 2.0, 3.3, 18.0, 60.0, 191.9, 192.0, 384.0, 384.5, 600.0, 682.5, 1800.0, 3600.0, 7200.0]
    cases = []
    while len(cases) < n:
        d = durations[len(cases)] if len(cases) < len(durations) else round(
            rng.choice([rng.uniform(1, 60), rng.uniform(60, 7200), 10 ** rng.uniform(0, 3.86)]), 2)
        fps = rng.choice([24.0, 25.0, 30.0, 60.0])
        h, w = rng.choice(sizes)
        cases.append({"h": h, "w": w, "fps": fps, "total": max(1, round(d * fps)), "duration": d})
    return cases


def _check_images(cfg: VisualTokenConfig, grid, answers) -> tuple[int, int]:
    refused = 0
    for (h, w), ans in zip(grid, answers, strict=True):
        if isinstance(ans, dict):  # the release refuses it
            assert ans["error"] == "ValueError" and "aspect ratio" in ans["detail"], (h, w, ans)
            with pytest.raises(TokenError) as e:
                image_tokens(h, w, cfg)
            assert e.value.reason == "aspect_ratio", (h, w)
            refused += 1
            continue
        got = image_tokens(h, w, cfg)
        assert [got["resized_height"], got["resized_width"]] == ans, (cfg.processor, h, w, got, ans)
        assert got["tokens"] == (ans[0] // 28) * (ans[1] // 28)
    return len(grid), refused


def test_image_parity_both_presets(tmp_path):
    grid = image_grid()
    small = [(1, 1), (480, 640), (3, 500), (2000, 30), (10, 10)]
    for version, cfg in (("1.0.0", V10), ("1.5.2", V15)):
        out = run_oracle(version, {"images": grid, "fetch_images": small}, tmp_path)
        n, refused = _check_images(cfg, grid, out["images"])
        assert n >= 500 and refused >= 20, (n, refused)
        assert out["fetch_images"] == [[image_tokens(h, w, cfg)[k] for k in ("resized_height", "resized_width")]
                                       for h, w in small]


def test_v10_video_parity_from_metadata(tmp_path):
    cases = video_grid(300, seed=10)
    default = [dict(c, total_pixels=None) for c in video_grid(30, seed=11)]  # the release's own budget
    report = [dict(c, total_pixels=24576 * 28 * 28) for c in cases]
    out = run_oracle("1.0.0", {"v10_meta": report + default}, tmp_path)["v10_meta"]
    released_default = VisualTokenConfig(processor="keye-vl-1.0", video_total_tokens=115200)
    for c, ans in zip(report + default, out, strict=True):
        cfg = V10 if c["total_pixels"] else released_default
        got = video_tokens(c["h"], c["w"], c["duration"], c["fps"], cfg, total_frames=c["total"])
        assert isinstance(ans, list), (c, ans)
        n, rh, rw = ans
        assert (got["frames"], got["resized_height"], got["resized_width"]) == (n, rh, rw), (c, got, ans)
        assert got["tokens"] == n * (rh // 28) * (rw // 28)
    assert len(report) >= 200
    # a video the release refuses (fewer than 2 frames) is one we refuse
    out = run_oracle("1.0.0", {"v10_meta": [{"h": 240, "w": 320, "fps": 30.0, "total": 1,
                                             "total_pixels": 24576 * 784}]}, tmp_path)["v10_meta"]
    assert out[0]["error"] == "ValueError"
    with pytest.raises(TokenError):
        video_nframes(1 / 30, 30.0, V10, total_frames=1)


def test_v15_video_parity_from_metadata_every_frame_slow(tmp_path):
    cases = video_grid(200, seed=15)
    rng = random.Random(16)
    mixed = []
    for c in video_grid(120, seed=17):  # slow/fast mixes: the budget search
        n = min(int(c["total"] / c["fps"] * 2), 65536 // 48)
        k = rng.choice([0, 1, n // 3, n // 2, n - 1, rng.randint(0, max(0, n - 1))])
        mixed.append(dict(c, fast=sorted(rng.sample(range(1, n), min(k, n - 1))) if n > 1 else []))
    out = run_oracle("1.5.2", {"v15_meta": cases + mixed}, tmp_path)["v15_meta"]
    for c, ans in zip(cases + mixed, out, strict=True):
        assert "error" not in ans, (c, ans)
        fast = len(c.get("fast", []))
        if not fast:
            got = video_tokens(c["h"], c["w"], c["duration"], c["fps"], V15, total_frames=c["total"])
            assert (got["frames"], got["resized_height"], got["resized_width"]) == (
                ans["frames"], ans["height"], ans["width"]), (c, got, ans)
        n = video_nframes(c["duration"], c["fps"], V15, total_frames=c["total"])
        assert n == ans["frames"] and fast == ans["fast"]
        s = slow_fast_sizes(c["h"], c["w"], n - fast, fast, V15)
        assert (s["resized_height"], s["resized_width"], s["fast_resized_height"], s["fast_resized_width"]) == (
            ans["height"], ans["width"], ans["fast_height"], ans["fast_width"]), (c, s, ans)


def _encode(path: str, h: int, w: int, fps: str, seconds: float) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={w}x{h}:rate={fps}", "-t", str(seconds), "-pix_fmt", "yuv420p",
                    "-c:v", "libx264", "-preset", "ultrafast", path], check=True, timeout=60)


def test_v10_real_videos_through_the_released_decord_reader(tmp_path):
    from reelforge.curation.probe import probe_video_file

    specs = [(72, 128, "24", 1.3), (96, 128, "25", 7.0), (120, 160, "30", 4.1), (64, 64, "60", 2.0),
             (160, 90, "30000/1001", 12.0), (32, 640, "30", 3.0)]
    paths = []
    for i, (h, w, fps, s) in enumerate(specs):
        p = str(tmp_path / f"v{i}.mp4")
        _encode(p, h, w, fps, s)
        paths.append(p)
    out = run_oracle("1.0.0", [[p, 24576 * 784] for p in paths], tmp_path, code=REAL_ORACLE)
    for p, (n, rh, rw) in zip(paths, out, strict=True):
        m = probe_video_file(p, 30.0)
        got = video_tokens(m["height"], m["width"], m["duration"], m["fps"], V10, total_frames=m["frames"])
        assert (got["frames"], got["resized_height"], got["resized_width"]) == (n, rh, rw), (p, m, got)


# ----------------------------------------------------------------------------- 1.5 on real videos

REAL15_ORACLE = textwrap.dedent(r'''
    import json, sys
    import cv2, decord, numpy as np
    import keye_vl_utils
    from keye_vl_utils import vision_process as vp

    cases = json.load(open(sys.argv[1]))
    out = {"version_file": keye_vl_utils.__file__, "videos": []}
    for path in cases["videos"]:
        try:
            vr = decord.VideoReader(path)
            _, kw = vp.fetch_video({"video": path})
        except Exception as e:
            out["videos"].append({"error": type(e).__name__})
            continue
        out["videos"].append({"total": len(vr), "fps": vr.get_avg_fps(), "frame_types": kw["frame_types"].tolist(),
                              "timestamps": kw["timestamps"].tolist(), "height": kw["height"], "width": kw["width"],
                              "fast_height": kw["fast_height"], "fast_width": kw["fast_width"]})
    rgb = np.load(cases["rgb"])
    out["hsv"] = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).tolist()
    print(json.dumps(out))
''')

_E = ["-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast"]
REAL15_VIDEOS = {  # name: ffmpeg arguments (inputs and filters)
    "static": ["-f", "lavfi", "-i", "color=c=blue:size=320x240:rate=30", "-t", "5"],
    "black": ["-f", "lavfi", "-i", "color=c=black:size=320x240:rate=30", "-t", "3"],  # no patch counts: all fast
    "moving": ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25", "-t", "6"],
    "cuts": ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30:d=2", "-f", "lavfi",
             "-i", "smptebars=size=320x240:rate=30:d=2", "-f", "lavfi", "-i", "mandelbrot=size=320x240:rate=30",
             "-f", "lavfi", "-i", "rgbtestsrc=size=320x240:rate=30:d=2",
             "-filter_complex", "[2]trim=duration=2[m];[0][1][m][3]concat=n=4:v=1"],
    "cellauto": ["-f", "lavfi", "-i", "cellauto=size=320x240:rate=30:rule=110", "-t", "6"],  # every frame slow
    "life": ["-f", "lavfi", "-i", "life=size=320x240:rate=30:mold=10:ratio=0.5:death_color=#C83232:"
             "life_color=#00ff00", "-t", "4"],
    "zoom": ["-f", "lavfi", "-i", "testsrc=size=640x360:rate=25", "-t", "6",
             "-vf", "zoompan=z='min(zoom+0.03,4)':d=1:s=640x360:fps=25"],
    "tall": ["-f", "lavfi", "-i", "testsrc2=size=360x640:rate=30", "-t", "5"],
    "720p": ["-f", "lavfi", "-i", "mandelbrot=size=1280x720:rate=30", "-t", "2.5"],
    "scroll_29.97": ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30000/1001", "-t", "6",
                     "-vf", "scroll=h=0.01:v=0.005"],
    "fade_hue_24": ["-f", "lavfi", "-i", "smptehdbars=size=320x240:rate=24", "-t", "6",
                    "-vf", "fade=in:st=0:d=4,hue=H=2*PI*t"],
    "gradients_1fps": ["-f", "lavfi", "-i", "gradients=size=320x240:rate=1:speed=0.1", "-t", "12"],
    "gradients_60": ["-f", "lavfi", "-i", "gradients=size=160x120:rate=60:speed=0.05", "-t", "10"],
    "noise": ["-f", "lavfi", "-i", "nullsrc=size=160x120:rate=25,geq=random(1)*255:128:128", "-t", "3"],
    "too_short": ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30", "-t", "0.3"],  # no frame at 2 fps
}


def test_v15_frame_plan_parity_on_real_videos(tmp_path):
    import numpy as np

    from reelforge.curation.frame_plan import frame_plan, hsv_u8
    from reelforge.curation.video import probe_video

    paths = []
    for name, args in REAL15_VIDEOS.items():
        p = str(tmp_path / f"{name}.mp4")
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args, *_E, p], check=True, timeout=60)
        paths.append(p)
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rgb[:8] = rgb[:8].max(axis=-1, keepdims=True)  # greys and exact ties among channels
    np.save(tmp_path / "rgb.npy", rgb)
    out = run_oracle("1.5.2", {"videos": paths, "rgb": str(tmp_path / "rgb.npy")}, tmp_path, code=REAL15_ORACLE)
    assert hsv_u8(rgb).tolist() == out["hsv"]  # OpenCV's 8-bit HSV, exactly
    slow = fast = type_diffs = 0
    for p, ans in zip(paths, out["videos"], strict=True):
        if "error" in ans:  # the release cannot read 0 frames; neither do we
            assert p.endswith("too_short.mp4"), (p, ans)
            with pytest.raises(TokenError):
                frame_plan(p)
            continue
        plan = frame_plan(p)
        assert plan["frames"] == len(ans["frame_types"]), p
        assert plan["timestamps"] == ans["timestamps"], p
        type_diffs += sum(a != b for a, b in zip(plan["frame_types"], ans["frame_types"]))
        assert plan["frame_types"] == ans["frame_types"], p
        assert (plan["resized_height"], plan["resized_width"], plan["fast_resized_height"],
                plan["fast_resized_width"]) == (ans["height"], ans["width"], ans["fast_height"], ans["fast_width"]), p
        f = sum(ans["frame_types"])
        assert plan["tokens"] == ((len(ans["frame_types"]) - f) * ans["height"] * ans["width"]
                                  + f * ans["fast_height"] * ans["fast_width"]) // 784
        # the metadata count (every frame slow) is the upper bound
        m = probe_video(p)
        assert plan["tokens"] <= video_tokens(m["height"], m["width"], m["duration"], m["fps"],
                                              total_frames=m["frames"])["tokens"], p
        slow, fast = slow + len(ans["frame_types"]) - f, fast + f
    print(f"1.5 frame plans: {len(paths) - 1} videos, {slow} slow and {fast} fast frames, {type_diffs} types differ")
    assert type_diffs == 0 and slow >= 20 and fast >= 50, (type_diffs, slow, fast)
