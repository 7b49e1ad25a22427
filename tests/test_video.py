"""reelforge.curation.video on real ffmpeg-encoded media made here: exact frame selection, probe extras,
shot detection accuracy, clip cutting/transcoding, and every kind of bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess

import numpy as np
import pytest

from reelforge.curation import video
from reelforge.curation.phash import hamming, phash_rgb
from reelforge.curation.probe import ProbeError, probe_video_file
from reelforge.curation.tools import ffmpeg_path, ffprobe_path

W, H, FPS, NFRAMES = 64, 48, 25, 60


def _ff(*args: str) -> None:
    subprocess.run([ffmpeg_path(), "-nostdin", "-loglevel", "error", "-y", *args], check=True, timeout=120)


def _numbered_frames(n: int) -> np.ndarray:
    """Frame k shows k in binary: 8 blocks (2 rows x 4) black (0) or white (1), bit 0 top-left."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    bh, bw = H // 2, W // 4
    for k in range(n):
        for b in range(8):
            if k >> b & 1:
                r, c = divmod(b, 4)
                frames[k, r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = 255
    return frames


def _read_number(frame: np.ndarray) -> int:
    h, w = frame.shape[:2]
    bh, bw = h // 2, w // 4
    k = 0
    for b in range(8):
        r, c = divmod(b, 4)
        block = frame[r * bh + bh // 4:(r + 1) * bh - bh // 4, c * bw + bw // 4:(c + 1) * bw - bw // 4]
        if block.mean() > 128:
            k |= 1 << b
    return k


def _encode_raw(frames: np.ndarray, path: str, *extra: str) -> None:
    n, h, w, _ = frames.shape
    cmd = [ffmpeg_path(), "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(FPS), "-i", "pipe:", *extra, path]
    subprocess.run(cmd, input=frames.tobytes(), check=True, timeout=120)


# lavfi sources for shot videos: visually distinct, several with motion or grain
SOURCES = {
    "testsrc2": "testsrc2=s={s}:r={r}",
    "smptebars": "smptebars=s={s}:r={r}",
    "mandelbrot": "mandelbrot=s={s}:r={r}",
    "rednoise": "color=c=red:s={s}:r={r},noise=alls=40:allf=t",
    "bluenoise": "color=c=0x2040a0:s={s}:r={r},noise=alls=30:allf=t",
    "rgbtestsrc": "rgbtestsrc=s={s}:r={r}",
    "life": "life=s={s}:r={r}:mold=10:ratio=0.1:death_color=#C83232:life_color=#00ff00",
    "cellauto": "cellauto=s={s}:r={r}:rule=110",
    "sierpinski": "sierpinski=s={s}:r={r}",
}


def _shot_video(path: str, clips: list[tuple[str, float]], size: str = "128x96", rate: int = FPS) -> list[float]:
    """Concatenate lavfi clips (name, seconds); returns the true cut times."""
    parts, labels = [], []
    for i, (name, d) in enumerate(clips):
        parts.append(SOURCES[name].format(s=size, r=rate)
                     + f",trim=duration={d},setpts=PTS-STARTPTS,format=yuv420p,setsar=1[c{i}]")
        labels.append(f"[c{i}]")
    graph = ";".join(parts) + ";" + "".join(labels) + f"concat=n={len(clips)}:v=1:a=0[out]"
    _ff("-filter_complex", graph, "-map", "[out]", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "23",
        "-pix_fmt", "yuv420p", path)
    cuts, t = [], 0.0
    for _, d in clips[:-1]:
        t += d
        cuts.append(t)
    return cuts


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("video")
    frames = _numbered_frames(NFRAMES)
    m = {"numbered": str(d / "numbered.mp4"), "numbered_mkv": str(d / "numbered.mkv")}
    # lossless H.264 with B-frames (decode order != presentation order) and an edit list
    _encode_raw(frames, m["numbered"], "-c:v", "libx264", "-qp", "0", "-bf", "3", "-g", "12", "-pix_fmt", "yuv420p")
    _encode_raw(frames, m["numbered_mkv"], "-c:v", "libx264", "-crf", "18", "-bf", "2", "-pix_fmt", "yuv420p")
    m["av"] = str(d / "av.mp4")  # 320x240, 25 fps, 3 s, with audio
    _ff("-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=3", "-f", "lavfi", "-i", "sine=d=3", "-c:v", "libx264",
        "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", m["av"])
    m["odd"] = str(d / "odd.mp4")
    _ff("-f", "lavfi", "-i", "testsrc2=s=161x121:r=30:d=1", "-c:v", "libx264", "-preset", "ultrafast",
        "-pix_fmt", "yuv444p", m["odd"])
    m["rotated"] = str(d / "rotated.mp4")  # stream copy with a display matrix
    _ff("-i", m["numbered"], "-c", "copy", "-metadata:s:v:0", "rotate=90", m["rotated"])
    m["faststart"] = str(d / "faststart.mp4")
    _ff("-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=4", "-c:v", "libx264", "-preset", "ultrafast",
        "-pix_fmt", "yuv420p", "-movflags", "+faststart", m["faststart"])
    m["editlist"] = str(d / "editlist.mp4")
    _ff("-ss", "1.3", "-i", m["faststart"], "-c", "copy", m["editlist"])
    # bad inputs
    m["zero"] = str(d / "zero.mp4")
    open(m["zero"], "wb").close()
    data = open(m["av"], "rb").read()
    m["truncated"] = str(d / "truncated.mp4")  # index (moov) at the end: lost
    open(m["truncated"], "wb").write(data[: len(data) // 2])
    data = open(m["faststart"], "rb").read()
    m["truncated_faststart"] = str(d / "truncated_faststart.mp4")  # index intact, half the frames gone
    open(m["truncated_faststart"], "wb").write(data[: len(data) // 2])
    m["text"] = str(d / "text.mp4")
    open(m["text"], "w").write("not a video at all\n" * 50)
    m["audio_mp4"] = str(d / "audio_only.mp4")
    _ff("-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", m["audio_mp4"])
    m["audio_m4a"] = str(d / "audio_only.m4a")
    _ff("-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", m["audio_m4a"])
    m["missing"] = str(d / "missing.mp4")
    m["dir"] = str(d)
    return m


# ------------------------------------------------------------------ probe

def test_probe_video_matches_probe_video_file_and_adds_extras(media):
    info = video.probe_video(media["av"])
    base = probe_video_file(media["av"], 30)
    assert {k: info[k] for k in base} == base
    assert info["codec"] == "h264" and (info["width"], info["height"]) == (320, 240)
    assert info["fps"] == pytest.approx(25.0) and info["duration"] == pytest.approx(3.0, abs=0.1)
    assert info["has_audio"] is True and info["audio_codec"] == "aac"
    assert info["rotation"] == 0 and (info["display_width"], info["display_height"]) == (320, 240)
    plain = video.probe_video(media["numbered"])
    assert plain["has_audio"] is False and plain["audio_codec"] is None
    assert plain["frames"] == NFRAMES


def test_rotation_is_reported_and_applied_like_ffmpeg(media):
    info = video.probe_video(media["rotated"])
    assert info["rotation"] in (90, 270)  # ffmpeg 5.x writes `rotate=90` as a 90 degree display matrix
    assert (info["width"], info["height"]) == (W, H)
    assert (info["display_width"], info["display_height"]) == (H, W)
    upright = video.decode_frames(media["rotated"], [0, 7])
    stored = video.decode_frames(media["rotated"], [0, 7], autorotate=False)
    assert upright.shape == (2, W, H, 3) and stored.shape == (2, H, W, 3)
    # `rotation` is clockwise: the upright frame is the stored one turned clockwise by it
    for u, s in zip(upright, stored):
        assert np.array_equal(u, np.rot90(s, k=-info["rotation"] // 90))
    assert [_read_number(f) for f in stored] == [0, 7]
    resized = video.decode_frames(media["rotated"], [3], size=(32, 24))
    assert resized.shape == (1, 32, 24, 3)


# ------------------------------------------------------------------ frame sampling

def test_sample_indices_and_timestamps():
    assert video.sample_indices(100, 5) == [0, 25, 50, 74, 99]  # linspace(0, 99, 5) = 0, 24.75, 49.5, ...
    assert video.sample_indices(10, 1) == [0]
    assert video.sample_indices(3, 5) == [0, 0, 1, 2, 2]
    assert video.sample_indices(0, 4) == [] and video.sample_indices(10, 0) == []
    idx = video.sample_indices(300, 8)
    assert idx[0] == 0 and idx[-1] == 299 and idx == sorted(idx)
    assert video.frame_timestamps([0, 25, 50, 99], 25.0) == pytest.approx([0.0, 1.0, 2.0, 3.96])
    assert video.frame_timestamps([3], 30000 / 1001) == pytest.approx([3 * 1001 / 30000])
    with pytest.raises(ValueError):
        video.frame_timestamps([1], 0)


@pytest.mark.parametrize("key", ["numbered", "numbered_mkv"])
def test_decode_frames_returns_exactly_the_requested_frames(media, key):
    path = media[key]
    for idx in ([0, 3, 10, 59], video.sample_indices(NFRAMES, 8), [5], [58, 59], list(range(NFRAMES))):
        frames = video.decode_frames(path, idx)
        assert frames.shape == (len(idx), H, W, 3) and frames.dtype == np.uint8
        assert [_read_number(f) for f in frames] == idx
    frames = video.decode_frames(path, [10, 3, 3, 0])  # any order, repeats allowed
    assert [_read_number(f) for f in frames] == [10, 3, 3, 0]


def test_decode_frames_lossless_content_and_resize(media):
    frames = video.decode_frames(media["numbered"], [0, 37])
    expected = _numbered_frames(NFRAMES)[[0, 37]]
    assert np.abs(frames.astype(int) - expected).mean() < 2  # lossless luma; only rgb<->yuv rounding
    small = video.decode_frames(media["numbered"], [1, 2, 40], size=(24, 32))
    assert small.shape == (3, 24, 32, 3)
    assert [_read_number(f) for f in small] == [1, 2, 40]
    wide = video.decode_frames(media["av"], [0], size=(50, 200))
    assert wide.shape == (1, 50, 200, 3)
    assert video.decode_frames(media["numbered"], []).shape == (0, H, W, 3)


def test_decode_frames_long_selection_through_a_filter_script(media, monkeypatch):
    monkeypatch.setattr(video, "_MAX_VF_CHARS", 10)
    idx = list(range(0, NFRAMES, 2))
    assert [_read_number(f) for f in video.decode_frames(media["numbered"], idx)] == idx


def test_decode_frames_argument_and_range_errors(media):
    with pytest.raises(ValueError):
        video.decode_frames(media["numbered"], [-1])
    with pytest.raises(ValueError):
        video.decode_frames(media["numbered"], [0], size=(0, 10))
    with pytest.raises(ProbeError) as e:
        video.decode_frames(media["numbered"], [0, NFRAMES])  # one past the last frame
    assert e.value.reason == "frame_out_of_range"
    with pytest.raises(ValueError):
        video.decode_frames(media["numbered"], [0], past_end="wrap")
    frames = video.decode_frames(media["numbered"], [NFRAMES + 5, 3, NFRAMES], past_end="clamp")
    assert [_read_number(f) for f in frames] == [NFRAMES - 1, 3, NFRAMES - 1]


def test_container_frame_count_that_overstates_the_stream(media):
    # a stream copy cut at 1.3 s keeps the frames from the keyframe before it behind an edit
    # list: the container still counts all 100 frames, 67 decode
    info = video.probe_video(media["editlist"])
    assert info["frames"] == 100 and info["duration"] == pytest.approx(2.7, abs=0.05)
    idx = video.sample_indices(info["frames"], 6)
    with pytest.raises(ProbeError) as e:
        video.decode_frames(media["editlist"], idx)
    assert e.value.reason == "frame_out_of_range"
    frames = video.decode_frames(media["editlist"], idx, past_end="clamp")
    last = video.decode_frames(media["editlist"], [66])[0]
    assert frames.shape[0] == 6 and np.array_equal(frames[-1], last) and np.array_equal(frames[-2], last)
    assert len(video.frame_phashes(media["editlist"], idx)) == 6  # frame_phashes clamps by default
    assert video.decode_frames(media["numbered"], [], size=(5, 7)).shape == (0, 5, 7, 3)


def test_frame_phashes_small_decode_is_close_to_full_size(media):
    idx = video.sample_indices(75, 6)
    fast = video.frame_phashes(media["av"], idx)
    full = [phash_rgb(f) for f in video.decode_frames(media["av"], idx)]
    assert all(isinstance(h, int) and -(1 << 63) <= h < 1 << 63 for h in fast)
    dists = [hamming(a, b) for a, b in zip(fast, full)]
    assert np.mean(dists) <= 4 and max(dists) <= 8
    # different frames of the numbered video hash differently
    hs = video.frame_phashes(media["numbered"], [1, 2, 4, 8])
    assert min(hamming(a, b) for i, a in enumerate(hs) for b in hs[i + 1:]) > 8


# ------------------------------------------------------------------ shots

def test_detect_shots_f1_on_assembled_videos(tmp_path):
    rng = random.Random(7)
    names = list(SOURCES)
    tp = n_det = n_true = 0
    for v in range(6):
        clips: list[tuple[str, float]] = []
        for _ in range(rng.randint(3, 5)):
            name = rng.choice([x for x in names if not clips or x != clips[-1][0]])
            clips.append((name, round(rng.uniform(1.0, 2.5) * FPS) / FPS))
        path = str(tmp_path / f"shots{v}.mp4")
        true = _shot_video(path, clips)
        cuts = video.detect_shots(path)
        assert cuts == sorted(cuts) and all(0 < c < sum(d for _, d in clips) for c in cuts)
        tp += video.match_cuts(cuts, true)
        n_det += len(cuts)
        n_true += len(true)
    precision, recall = tp / max(n_det, 1), tp / n_true
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    assert f1 >= 0.95, (precision, recall, tp, n_det, n_true)


def test_detect_shots_ignores_flashes_and_respects_min_shot(tmp_path):
    path = str(tmp_path / "flash.mp4")
    _shot_video(path, [("testsrc2", 3.0)])
    flashed = str(tmp_path / "flashed.mp4")  # two white frames at 1.0 s: not a new shot
    _ff("-i", path, "-vf", "drawbox=x=0:y=0:w=iw:h=ih:c=white:t=fill:enable='between(n,25,26)'",
        "-c:v", "libx264", "-preset", "ultrafast", flashed)
    assert video.detect_shots(flashed) == []
    quick = str(tmp_path / "quick.mp4")  # cuts 0.4 s apart: one survives min_shot_s=0.5
    true = _shot_video(quick, [("smptebars", 1.2), ("mandelbrot", 0.4), ("rednoise", 1.2)])
    cuts = video.detect_shots(quick, min_shot_s=0.5)
    assert len(cuts) == 1 and min(abs(cuts[0] - t) for t in true) < 0.05
    assert len(video.detect_shots(quick, min_shot_s=0.2)) == 2
    assert video.detect_shots(quick, min_shot_s=1.3) == []  # no shot may be shorter than 1.3 s
    scores = video.scene_scores(quick)
    assert len(scores) == 70 and all(0.0 <= s <= 1.0 for _, s in scores)
    assert scores[0][0] == 0.0 and scores[-1][0] == pytest.approx(69 / FPS)
    ff_cuts = video.detect_shots(quick, method="ffmpeg", min_shot_s=0.2)
    assert all(min(abs(c - t) for t in true) < 0.05 for c in ff_cuts)


def test_split_shots():
    assert video.split_shots(10.0, [3.0, 7.0], 60) == [(0.0, 3.0), (3.0, 7.0), (7.0, 10.0)]
    parts = video.split_shots(10.0, [], 4.0)
    assert len(parts) == 3 and parts[0][0] == 0.0 and parts[-1][1] == 10.0
    assert all(e - s == pytest.approx(10 / 3) for s, e in parts)
    assert video.split_shots(10.0, [8.0, 2.0, 2.0, 0.0, 10.0, 12.0], None) == [(0.0, 2.0), (2.0, 8.0), (8.0, 10.0)]
    spans = video.split_shots(9.0, [1.0], 4.0)
    assert spans[0] == (0.0, 1.0) and len(spans) == 3 and spans[-1][1] == 9.0
    assert all(e - s <= 4.0 + 1e-9 for s, e in spans)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert video.split_shots(0.0, [1.0], 5.0) == []
    assert video.split_shots(4.0, [], 4.0) == [(0.0, 4.0)]


# ------------------------------------------------------------------ cut / transcode

def _stream_facts(path: str) -> tuple[dict, bytes]:
    out = subprocess.run([ffprobe_path(), "-v", "error", "-of", "json", "-show_streams", path],
                         capture_output=True, check=True, timeout=30).stdout
    streams = json.loads(out)["streams"]
    return {s["codec_type"]: s for s in streams}, open(path, "rb").read()


def test_transcode_normalises(media, tmp_path):
    out = str(tmp_path / "t.mp4")
    info = video.transcode(media["av"], out, max_side=160, fps=10)
    assert info == video.probe_video(out)
    assert info["codec"] == "h264" and (info["width"], info["height"]) == (160, 120)
    assert info["fps"] == pytest.approx(10.0) and info["duration"] == pytest.approx(3.0, abs=0.15)
    assert info["has_audio"] and info["audio_codec"] == "aac"
    streams, data = _stream_facts(out)
    assert streams["video"]["pix_fmt"] == "yuv420p"
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart
    assert not os.path.exists(out + ".part")
    # never upscale, never raise the frame rate, odd sizes become even
    same = video.transcode(media["av"], str(tmp_path / "same.mp4"), max_side=1000, fps=60, audio=False)
    assert (same["width"], same["height"], same["fps"], same["has_audio"]) == (320, 240, 25.0, False)
    odd = video.transcode(media["odd"], str(tmp_path / "odd.mp4"))
    assert (odd["width"], odd["height"]) == (160, 120)
    assert _stream_facts(str(tmp_path / "odd.mp4"))[0]["video"]["pix_fmt"] == "yuv420p"
    small = video.transcode(media["odd"], str(tmp_path / "small.mp4"), max_side=81)
    assert max(small["width"], small["height"]) <= 81 and small["width"] % 2 == 0 and small["height"] % 2 == 0
    assert small["width"] / small["height"] == pytest.approx(161 / 121, rel=0.05)
    # rotation is applied to the pixels and not left in the output
    rot = video.transcode(media["rotated"], str(tmp_path / "rot.mp4"), max_side=32)
    assert (rot["width"], rot["height"], rot["rotation"]) == (24, 32, 0)


def test_cut_clip_is_frame_accurate(media, tmp_path):
    out = str(tmp_path / "clip.mp4")
    info = video.cut_clip(media["numbered"], 1.0, 1.6, out, crf=10)  # frames 25..39
    assert info["codec"] == "h264" and (info["width"], info["height"]) == (W, H)
    assert info["duration"] == pytest.approx(0.6, abs=0.05) and info["frames"] == 15
    frames = video.decode_frames(out, list(range(15)))
    assert [_read_number(f) for f in frames] == list(range(25, 40))
    clip = video.cut_clip(media["av"], 0.5, 2.0, str(tmp_path / "av.mp4"), max_side=100)
    assert (clip["width"], clip["height"]) == (100, 76) and clip["has_audio"]
    assert clip["duration"] == pytest.approx(1.5, abs=0.1)
    with pytest.raises(ValueError):
        video.cut_clip(media["av"], 2.0, 1.0, str(tmp_path / "bad.mp4"))


# ------------------------------------------------------------------ bad input

CALLS = {
    "probe": lambda p, d: video.probe_video(p),
    "decode": lambda p, d: video.decode_frames(p, [0, 1]),
    "phash": lambda p, d: video.frame_phashes(p, [0]),
    "shots": lambda p, d: video.detect_shots(p),
    "scores": lambda p, d: video.scene_scores(p),
    "transcode": lambda p, d: video.transcode(p, os.path.join(d, "o.mp4")),
    "cut": lambda p, d: video.cut_clip(p, 0.0, 0.5, os.path.join(d, "c.mp4")),
}


@pytest.mark.parametrize("key,reason", [("zero", "empty_file"), ("truncated", "corrupt_video"),
                                        ("text", "corrupt_video"), ("audio_mp4", "not_a_video"),
                                        ("audio_m4a", "not_a_video"), ("missing", "missing_file"),
                                        ("dir", "missing_file")])
def test_bad_input_is_a_probe_error(media, tmp_path, key, reason):
    for name, call in CALLS.items():
        with pytest.raises(ProbeError) as e:
            call(media[key], str(tmp_path))
        assert e.value.reason == reason, name
    assert not os.listdir(tmp_path)  # nothing half-written


def test_truncated_stream_and_timeouts(media, tmp_path):
    path = media["truncated_faststart"]  # the header promises 100 frames; about half are there
    assert video.probe_video(path)["frames"] == 100
    assert video.decode_frames(path, [0, 5]).shape == (2, 240, 320, 3)
    for past_end in ("error", "clamp"):  # decoder errors: not a clean end
        with pytest.raises(ProbeError) as e:
            video.decode_frames(path, [0, 99], past_end=past_end)
        assert e.value.reason == "decode_error"
    with pytest.raises(ProbeError) as e:
        video.frame_phashes(path, [0, 99])
    assert e.value.reason == "decode_error"
    big = media["faststart"]
    info = video.probe_video(big)
    for call, reason in [(lambda: video.probe_video(big, timeout_s=0.001), "probe_timeout"),
                         (lambda: video.decode_frames(big, [0, 99], timeout_s=0.02), "decode_timeout"),
                         (lambda: video.detect_shots(big, timeout_s=0.02, info=info), "decode_timeout"),
                         (lambda: video.transcode(big, str(tmp_path / "x.mp4"), timeout_s=0.05, info=info),
                          "transcode_timeout")]:
        with pytest.raises(ProbeError) as e:
            call()
        assert e.value.reason == reason
    assert not os.listdir(tmp_path)
