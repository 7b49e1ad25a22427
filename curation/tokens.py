"""Token accounting exactly as Keye-VL's processor counts: visual tokens from sizes, text
tokens from the model's own tokenizer and chat template.

Images (`smart_resize`, as in the released processor): round each side to the nearest
multiple of `factor` (= patch 14 x merge 2 = 28; Python's `round`, at least one factor);
if the area is above `max_pixels`, scale both sides by 1/sqrt(h*w/max_pixels) and floor
to multiples of the factor; if below `min_pixels`, scale by sqrt(min_pixels/(h*w)) and
ceil; an aspect ratio beyond `max_ratio` (200:1) is refused. Tokens = (h/28) * (w/28).

Videos: frames are sampled at `video_fps` (2): n = duration * fps, clamped to at least
`video_min_frames` (4) and at most `video_max_frames` (768) and the frames the video has,
then floored to an even count. Each frame is resized with the same rule between
`video_min_pixels` and a maximum that the per-video budget lowers when many frames are
sampled: min(video_max_pixels, video_total_tokens * 28 * 28 / n), never below
`video_min_pixels`. Tokens = n * per-frame tokens (no temporal merging).

The defaults are the released processor's (4 to 16384 tokens per image, 128 to 768 per
video frame) with the report's per-video budget of 24,576 tokens. The report's own check
(an 18 s 252x168 video is 1,944 tokens at 2 fps) counts frames at their native size, which
`video_min_pixels: 3136` (4 tokens) reproduces; with the 128-token floor the same video is
5,040 tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


class TokenError(ValueError):
    """A size the processor refuses; `reason` is the ledger code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class VisualTokenConfig:
    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    max_ratio: float = 200.0
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    frame_factor: int = 2
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_tokens: int = 24576

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "VisualTokenConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TypeError(f"unknown visual token setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _round(n: float, f: int) -> int:
    return round(n / f) * f


def _floor(n: float, f: int) -> int:
    return math.floor(n / f) * f


def _ceil(n: float, f: int) -> int:
    return math.ceil(n / f) * f


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28, max_ratio: float = 200.0) -> tuple[int, int]:
    if height <= 0 or width <= 0:
        raise TokenError("bad_size", f"size {width}x{height} has no pixels")
    if max(height, width) / min(height, width) > max_ratio:
        raise TokenError("aspect_ratio", f"{width}x{height} is beyond {max_ratio:g}:1")
    h_bar = max(factor, _round(height, factor))
    w_bar = max(factor, _round(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = _floor(height / beta, factor)
        w_bar = _floor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil(height * beta, factor)
        w_bar = _ceil(width * beta, factor)
    return max(h_bar, factor), max(w_bar, factor)


def image_tokens(height: int, width: int, cfg: VisualTokenConfig = VisualTokenConfig()) -> dict:
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels, cfg.max_ratio)
    return {"resized_height": h, "resized_width": w, "tokens": (h // cfg.factor) * (w // cfg.factor)}


def video_nframes(duration: float, fps: float | None, cfg: VisualTokenConfig = VisualTokenConfig(),
                  total_frames: int | None = None, sample_fps: float | None = None) -> int:
    """Frames sampled from a video (the released processor's `smart_nframes`)."""
    if (not fps or fps <= 0) and total_frames and duration > 0:
        fps = total_frames / duration
    if not fps or fps <= 0 or (total_frames is None and duration <= 0):
        raise TokenError("zero_duration", f"video has duration {duration} s at {fps} fps")
    if total_frames is None:
        total_frames = max(1, int(round(duration * fps)))
    want = total_frames / fps * (sample_fps or cfg.video_fps)
    ff = cfg.frame_factor
    min_frames = _ceil(cfg.video_min_frames, ff)
    max_frames = _floor(min(cfg.video_max_frames, total_frames), ff)
    n = min(max(want, min_frames), max_frames, total_frames)
    n = _floor(n, ff)
    if n < ff:
        raise TokenError("too_few_frames", f"a video of {total_frames} frames gives fewer than {ff} samples")
    return int(n)


def video_tokens(height: int, width: int, duration: float, fps: float | None,
                 cfg: VisualTokenConfig = VisualTokenConfig(), total_frames: int | None = None,
                 sample_fps: float | None = None) -> dict:
    n = video_nframes(duration, fps, cfg, total_frames, sample_fps)
    frame_max = max(min(cfg.video_max_pixels, cfg.video_total_tokens * cfg.factor ** 2 / n), cfg.video_min_pixels)
    h, w = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, int(frame_max), cfg.max_ratio)
    per = (h // cfg.factor) * (w // cfg.factor)
    return {"frames": n, "resized_height": h, "resized_width": w, "tokens_per_frame": per, "tokens": n * per}


def media_tokens(m: dict, cfg: VisualTokenConfig) -> int:
    """Visual tokens of one probed media reference (a dict of the schema's Media)."""
    if m.get("width") is None or m.get("height") is None:
        raise TokenError("not_probed", "media has no size: run the probe step before tokens")
    if m["kind"] == "image":
        return image_tokens(m["height"], m["width"], cfg)["tokens"]
    return video_tokens(m["height"], m["width"], m.get("duration") or 0.0, m.get("fps"), cfg,
                        total_frames=m.get("frames"))["tokens"]
