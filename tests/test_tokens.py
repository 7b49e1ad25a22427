"""Token accounting against an independent reading of the rules, and the report's own figures."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from fractions import Fraction

import pytest

from reelforge.curation.tokens import (
    TokenError,
    VisualTokenConfig,
    image_tokens,
    smart_resize,
    video_nframes,
    video_tokens,
)

F = 28


def ref_resize(h: int, w: int, lo: int, hi: int) -> tuple[int, int] | None:
    """The issue's rule, written independently with exact rational arithmetic where it matters."""
    if Fraction(max(h, w), min(h, w)) > 200:
        return None
    rh = max(F, round(Fraction(h, F)) * F)  # Python rounds halves to even, as the processor does
    rw = max(F, round(Fraction(w, F)) * F)
    if rh * rw > hi:
        beta = math.sqrt(h * w / hi)
        rh, rw = math.floor(h / beta / F) * F, math.floor(w / beta / F) * F
    elif rh * rw < lo:
        beta = math.sqrt(lo / (h * w))
        rh, rw = math.ceil(h * beta / F) * F, math.ceil(w * beta / F) * F
    return max(rh, F), max(rw, F)


def _sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(1, 1), (10000, 10000), (1, 200), (200, 1), (1, 201), (50, 10000), (10000, 50), (27, 27), (42, 70),
           (3192, 4004), (4004, 3192)]
    while len(out) < n:
        mode = rng.random()
        if mode < 0.5:
            h, w = rng.randint(1, 10000), rng.randint(1, 10000)
        elif mode < 0.8:  # extreme aspect ratios around the 200:1 limit
            h = rng.randint(1, 60)
            w = min(10000, int(h * rng.uniform(100, 260)))
            if rng.random() < 0.5:
                h, w = w, h
        else:  # small images around the minimum
            h, w = rng.randint(1, 120), rng.randint(1, 120)
        out.append((h, w))
    return out


def test_image_tokens_match_the_rule_for_random_sizes():
    cfg = VisualTokenConfig()
    checked = refused = 0
    for h, w in _sizes(600, seed=7):
        ref = ref_resize(h, w, 4 * 28 * 28, 16384 * 28 * 28)
        if ref is None:
            with pytest.raises(TokenError) as e:
                image_tokens(h, w, cfg)
            assert e.value.reason == "aspect_ratio"
            refused += 1
            continue
        got = image_tokens(h, w, cfg)
        assert (got["resized_height"], got["resized_width"]) == ref, (h, w)
        assert got["tokens"] == (ref[0] // 28) * (ref[1] // 28)
        assert got["resized_height"] % 28 == 0 and got["resized_width"] % 28 == 0
        assert got["tokens"] <= 16384
        checked += 1
    assert checked > 400 and refused > 20


def test_the_reports_figures():
    assert image_tokens(3192, 4004)["tokens"] == 16302
    report = VisualTokenConfig(video_min_pixels=4 * 28 * 28)  # frames at native size, as the report counts
    assert video_tokens(168, 252, 18.0, 30.0, report)["tokens"] == 1944
    assert video_tokens(168, 252, 18.0, 30.0, report, sample_fps=1.0)["tokens"] == 972
    # the released processor's 128-token floor per frame upsizes those small frames
    assert video_tokens(168, 252, 18.0, 30.0)["tokens"] == 36 * 140


def ref_frames(duration: float, fps: float) -> int:
    total = max(1, round(duration * fps))
    want = total / fps * 2
    n = min(max(want, 4), min(768, total) // 2 * 2, total)
    return int(n // 2 * 2)


@pytest.mark.parametrize("fps", [24.0, 25.0, 30.0, 60.0])
def test_video_frames_and_tokens_from_half_a_second_to_two_hours(fps):
    rng = random.Random(int(fps))
    durations = [0.5, 1.0, 1.7, 2.0, 18.0, 60.0, 383.9, 384.0, 384.5, 600.0, 3600.0, 7200.0]
    durations += [round(rng.uniform(0.5, 7200), 2) for _ in range(40)]
    budget = 24576
    for d in durations:
        n = video_nframes(d, fps)
        assert n == ref_frames(d, fps), (d, fps)
        assert n % 2 == 0 and 4 <= n <= 768 and n <= round(d * fps)
        for h, w in ((720, 1280), (1080, 1920), (1920, 1080), (240, 320), (144, 256)):
            got = video_tokens(h, w, d, fps)
            frame_max = max(min(768 * 784, budget * 784 / n), 128 * 784)
            ref = ref_resize(h, w, 128 * 784, int(frame_max))
            assert (got["resized_height"], got["resized_width"]) == ref, (d, fps, h, w)
            assert got["tokens"] == n * (ref[0] // 28) * (ref[1] // 28)
            if frame_max > 128 * 784:  # the budget holds unless the per-frame floor forces more
                assert got["tokens"] <= budget


def test_too_short_video_is_refused():
    with pytest.raises(TokenError):
        video_nframes(0.0, 30.0)
    assert video_nframes(0.1, 30.0) == 2  # 3 frames: never more than the video has, even count


def test_smart_resize_never_returns_zero():
    for h, w in [(1, 200), (1, 1), (2, 399)]:
        rh, rw = smart_resize(h, w)
        assert rh >= 28 and rw >= 28


def test_cli_prints_one_json_object_per_input(tmp_path):
    res = subprocess.run([sys.executable, "-m", "reelforge.jobs.cli", "tokens", "--image", "3192x4004",
                          "--video", "168x252", "--duration", "18", "--config", '{"video_min_pixels": 3136}'],
                         capture_output=True, text=True, check=True)
    a, b = (json.loads(line) for line in res.stdout.splitlines())
    assert a["tokens"] == 16302 and b["tokens"] == 1944 and b["frames"] == 36


def test_cli_probes_files(tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (640, 480)).save(img)
    vid = tmp_path / "v.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
                    "-t", "3", "-pix_fmt", "yuv420p", str(vid)], check=True, timeout=60)
    res = subprocess.run([sys.executable, "-m", "reelforge.jobs.cli", "tokens", str(img), str(vid),
                          str(tmp_path / "no.jpg")],
                         capture_output=True, text=True)
    i, v, missing = (json.loads(line) for line in res.stdout.splitlines())
    assert i["tokens"] == image_tokens(480, 640)["tokens"] and i["probe"]["width"] == 640
    assert v["frames"] == 6 and v["probe"]["codec"] == "h264"
    assert v["tokens"] == video_tokens(240, 320, 3.0, 25.0)["tokens"]
    assert missing["error"] == "missing_file" and res.returncode == 1
