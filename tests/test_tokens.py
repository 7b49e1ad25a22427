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


V10 = VisualTokenConfig(processor="keye-vl-1.0")
V15 = VisualTokenConfig(processor="keye-vl-1.5")


@pytest.mark.parametrize("cfg,max_tokens", [(V10, 16384), (V15, 20480)])
def test_image_tokens_match_the_rule_for_random_sizes(cfg, max_tokens):
    checked = refused = 0
    for h, w in _sizes(600, seed=7):
        ref = ref_resize(h, w, 4 * 28 * 28, max_tokens * 28 * 28)
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
        assert got["tokens"] <= max_tokens
        checked += 1
    assert checked > 400 and refused > 20


def test_presets_and_overrides():
    assert VisualTokenConfig() == V15  # 1.5 is the default
    assert (V10.video_total_tokens, V10.frame_factor, V10.video_min_pixels) == (24576, 2, 128 * 784)
    assert (V15.video_total_tokens, V15.frame_factor, V15.video_min_pixels, V15.max_pixels) == (65536, 1, 48 * 784,
                                                                                              20480 * 784)
    c = VisualTokenConfig.from_dict({"processor": "keye-vl-1.0", "video_total_tokens": 115200})
    assert c.video_total_tokens == 115200 and c.video_min_frames == 4
    assert VisualTokenConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown processor"):
        VisualTokenConfig(processor="keye-vl-2")
    with pytest.raises(TypeError, match="unknown visual token setting"):
        VisualTokenConfig.from_dict({"video_budget": 1})


def test_the_reports_figures():
    assert image_tokens(3192, 4004)["tokens"] == 16302  # both presets
    assert image_tokens(3192, 4004, V10)["tokens"] == 16302
    # 1.5 (the default) counts an 18 s 252x168 video as the report does, every frame slow
    assert video_tokens(168, 252, 18.0, 30.0)["tokens"] == 1944
    assert video_tokens(168, 252, 18.0, 30.0, sample_fps=1.0)["tokens"] == 972
    # 1.0's 128-token floor per frame upsizes those small frames
    assert video_tokens(168, 252, 18.0, 30.0, V10)["tokens"] == 36 * 140
    # the table: released 1.0 at the report's 24,576-token budget
    assert [video_tokens(h, w, d, 30.0, V10)["tokens"] for d, h, w in
            ((60, 720, 1280), (60, 360, 640), (18, 720, 1280))] == [46800, 35880, 25920]


def ref_frames_10(duration: float, fps: float) -> int:
    total = max(1, round(duration * fps))
    want = total / fps * 2
    n = min(max(want, 4), min(768, total) // 2 * 2, total)
    return int(n // 2 * 2)


@pytest.mark.parametrize("fps", [24.0, 25.0, 30.0, 60.0])
def test_v10_video_frames_and_tokens_from_half_a_second_to_two_hours(fps):
    rng = random.Random(int(fps))
    durations = [0.5, 1.0, 1.7, 2.0, 18.0, 60.0, 383.9, 384.0, 384.5, 600.0, 3600.0, 7200.0]
    durations += [round(rng.uniform(0.5, 7200), 2) for _ in range(40)]
    budget = 24576
    for d in durations:
        n = video_nframes(d, fps, V10)
        assert n == ref_frames_10(d, fps), (d, fps)
        assert n % 2 == 0 and 4 <= n <= 768 and n <= round(d * fps)
        for h, w in ((720, 1280), (1080, 1920), (1920, 1080), (240, 320), (144, 256)):
            got = video_tokens(h, w, d, fps, V10)
            frame_max = max(min(768 * 784, budget * 784 / n * 2), int(128 * 784 * 1.05))
            ref = ref_resize(h, w, 128 * 784, frame_max)
            assert (got["resized_height"], got["resized_width"]) == ref, (d, fps, h, w)
            assert got["tokens"] == n * (ref[0] // 28) * (ref[1] // 28)


@pytest.mark.parametrize("fps", [1.0, 24.0, 30.0, 60.0])
def test_v15_video_every_frame_slow(fps):
    rng = random.Random(int(fps) + 100)
    durations = [0.5, 1.0, 1.7, 18.0, 60.0, 682.4, 682.5, 682.9, 3600.0, 7200.0]
    durations += [round(rng.uniform(0.5, 7200), 2) for _ in range(30)]
    for d in durations:
        total = max(1, round(d * fps))
        n = video_nframes(d, fps)
        assert n == min(int(total / fps * min(2.0, fps)), 65536 // 48), (d, fps)  # no even rule, budget / min
        for h, w in ((720, 1280), (1080, 1920), (1920, 1080), (240, 320), (168, 252)):
            got = video_tokens(h, w, d, fps)
            # the smallest per-frame token count that overflows the budget, by a plain scan
            t = next((t for t in range(48, 769) if n * t > 65536), 768)
            ref = ref_resize(h, w, 48 * 784, t * 784)
            assert (got["resized_height"], got["resized_width"], got["frames"]) == (*ref, n), (d, fps, h, w)
            assert got["tokens"] == n * (ref[0] // 28) * (ref[1] // 28)


def test_v15_slow_fast_sizes_against_a_scan():
    from reelforge.curation.tokens import slow_fast_sizes

    rng = random.Random(5)
    for _ in range(300):
        slow = rng.randint(1, 400)
        fast = rng.randint(0, 1600)
        h, w = rng.choice(((720, 1280), (1080, 1920), (1920, 1080), (240, 320), (168, 252), (4000, 300)))
        t = next((t for t in range(48, 769) if slow * t + fast * max(int(0.3 * t), 48) > 65536), 768)
        rh, rw = ref_resize(h, w, 48 * 784, t * 784)
        per = (rh // 28) * (rw // 28)
        fh, fw = ref_resize(h, w, 48 * 784, max(int(per * 0.3), 48) * 784)
        got = slow_fast_sizes(h, w, slow, fast, V15)
        assert (got["resized_height"], got["resized_width"], got["fast_resized_height"],
                got["fast_resized_width"]) == (rh, rw, fh, fw), (slow, fast, h, w)
        assert got["tokens"] == slow * per + fast * (fh // 28) * (fw // 28)


def test_too_short_video_is_refused():
    with pytest.raises(TokenError):
        video_nframes(0.0, 30.0)
    assert video_nframes(0.1, 30.0, V10) == 2  # 3 frames: never more than the video has, even count
    with pytest.raises(TokenError) as e:  # 1.5 samples int(3 / 30 * 2) = 0 frames
        video_nframes(0.1, 30.0)
    assert e.value.reason == "too_few_frames"
    assert video_nframes(0.5, 30.0) == 1


def test_smart_resize_never_returns_zero():
    for h, w in [(1, 200), (1, 1), (2, 399)]:
        rh, rw = smart_resize(h, w)
        assert rh >= 28 and rw >= 28


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reelforge.jobs.cli", "tokens", *args],
                          capture_output=True, text=True, check=check)


def test_cli_prints_the_reports_figures_with_the_default_preset():
    res = _cli("--image", "3192x4004", "--video", "168x252", "--duration", "18")
    a, b = (json.loads(line) for line in res.stdout.splitlines())
    assert (a["tokens"], a["resized_height"], a["resized_width"]) == (16302, 3192, 4004)
    assert (b["tokens"], b["frames"], b["resized_height"], b["resized_width"]) == (1944, 36, 168, 252)


def test_cli_processor_and_config():
    res = _cli("--processor", "keye-vl-1.0", "--video", "720x1280", "--duration", "60", "--fps", "30")
    assert json.loads(res.stdout)["tokens"] == 46800  # the released-1.0 figure
    res = _cli("--processor", "keye-vl-1.0", "--video", "720x1280", "--duration", "60",
               "--config", '{"video_total_tokens": 12288}')
    assert json.loads(res.stdout)["tokens"] == video_tokens(
        720, 1280, 60.0, 30.0, VisualTokenConfig(processor="keye-vl-1.0", video_total_tokens=12288))["tokens"]
    bad = _cli("--processor", "keye-vl-1.0", "--image", "9x9", "--config", '{"processor": "keye-vl-1.5"}', check=False)
    assert bad.returncode != 0
    assert "upper bound" in _cli("--help").stdout


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
    # 1.5 decodes the file: frame types, slow and fast sizes (tests/test_keye_parity.py checks them)
    assert len(v["frame_types"]) == 6 and v["frame_types"][0] == 0
    slow = v["frame_types"].count(0)
    assert v["tokens"] == (slow * v["resized_height"] * v["resized_width"]
                           + (6 - slow) * v["fast_resized_height"] * v["fast_resized_width"]) // 784
    assert v["tokens"] <= video_tokens(240, 320, 3.0, 25.0)["tokens"]  # the metadata count is the upper bound
    assert missing["error"] == "missing_file" and res.returncode == 1
    res = subprocess.run([sys.executable, "-m", "reelforge.jobs.cli", "tokens", "--processor", "keye-vl-1.0",
                          str(vid)], capture_output=True, text=True, check=True)
    v = json.loads(res.stdout)
    assert v["tokens"] == video_tokens(240, 320, 3.0, 25.0, VisualTokenConfig(processor="keye-vl-1.0"))["tokens"]
    assert "frame_types" not in v
