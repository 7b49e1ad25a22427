"""Visual tokens exactly as Keye-VL's released processors count them (`keye-vl-utils` 1.0.0
and 1.5.2 on PyPI; tests/test_keye_parity.py checks every rule below against both), and
text tokens from the model's own tokenizer and chat template (`text_tokens`).

`VisualTokenConfig(processor=...)` picks a preset; every number of it can be overridden.

Images (`smart_resize`, the same in both releases): round each side to the nearest multiple
of `factor` (= patch 14 x merge 2 = 28; Python's `round`, at least one factor); if the area
is above `max_pixels`, scale both sides by 1/sqrt(h*w/max_pixels) and floor to multiples of
the factor; if below `min_pixels`, scale by sqrt(min_pixels/(h*w)) and ceil; an aspect ratio
beyond `max_ratio` (200:1) is refused (ledger reason `aspect_ratio`, where the release raises
ValueError). Tokens = (h/28) * (w/28). 1.0: 4..16,384 tokens; 1.5: 4..20,480.

Videos, `keye-vl-1.0`: n = total_frames / video_fps * `video_fps` (2), clamped to
[`video_min_frames` (4), min(`video_max_frames` (768), total_frames)] and floored to a
multiple of `frame_factor` (2); fewer than 2 is refused. Each frame is resized between
`video_min_pixels` (128 tokens) and max(min(`video_max_pixels` (768 tokens),
total / n * frame_factor), int(`frame_max_floor` (1.05) * video_min_pixels)) where total is
`video_total_tokens` (the report's 24,576; the release defaults to 115,200) x 28 x 28.
Tokens = n x per-frame tokens.

Videos, `keye-vl-1.5`: n = int(total_frames / video_fps * min(`video_fps` (2), video_fps)),
never more than `video_total_tokens` (65,536) x 784 / `video_min_pixels` (48 tokens) frames
(nor `video_max_frames` when set), no even rule; none is refused. Frames are slow or fast (a
frame more than `min_frame_similarity` (0.9) similar to the last slow frame is fast; see
`curation.frame_plan`). The slow size comes from a search against the budget: the smallest
per-frame token count t in [video_min_pixels/784, video_max_pixels/784] with
slow*t + fast*max(int(`fast_token_ratio` (0.3)*t), min tokens) > budget (the upper end when
none is); slow frames are resized between video_min_pixels and t*784, fast frames up to
max(int(0.3 * slow tokens)*784, video_min_pixels). From metadata alone the frame types are
unknown and every frame counts as slow: the upper bound, and how the report counts (an 18 s
252x168 video is 36 frames x 54 = 1,944 tokens).
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


_T = 28 * 28  # pixels per token

# the released processors' numbers (keye-vl-utils' module constants), except 1.0's video
# budget, which is the report's 24,576 tokens rather than the release's 128,000*0.9
PRESETS: dict[str, dict[str, Any]] = {
    "keye-vl-1.0": dict(min_pixels=4 * _T, max_pixels=16384 * _T, video_fps=2.0, video_min_frames=4,
                        video_max_frames=768, frame_factor=2, video_min_pixels=128 * _T,
                        video_max_pixels=768 * _T, video_total_tokens=24576, frame_max_floor=1.05,
                        fast_token_ratio=None, min_frame_similarity=None, patch_similarity=None,
                        similarity_max_pixels=None),
    "keye-vl-1.5": dict(min_pixels=4 * _T, max_pixels=20480 * _T, video_fps=2.0, video_min_frames=0,
                        video_max_frames=None, frame_factor=1, video_min_pixels=48 * _T,
                        video_max_pixels=768 * _T, video_total_tokens=65536, frame_max_floor=None,
                        fast_token_ratio=0.3, min_frame_similarity=0.9, patch_similarity=0.7,
                        similarity_max_pixels=256 * _T),
}
DEFAULT_PROCESSOR = "keye-vl-1.5"


@dataclass(frozen=True)
class VisualTokenConfig:
    """A processor preset (`processor`) with any of its numbers overridden; None = the preset's."""

    processor: str = DEFAULT_PROCESSOR
    patch_size: int = 14
    merge_size: int = 2
    max_ratio: float = 200.0
    min_pixels: int | None = None
    max_pixels: int | None = None
    video_fps: float | None = None
    video_min_frames: int | None = None
    video_max_frames: int | None = None  # 1.5: None = video_total_tokens*784 / video_min_pixels
    frame_factor: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_total_tokens: int | None = None
    frame_max_floor: float | None = None  # 1.0 only
    fast_token_ratio: float | None = None  # 1.5 only, and the four below (see curation.frame_plan)
    min_frame_similarity: float | None = None
    patch_similarity: float | None = None
    similarity_max_pixels: int | None = None

    def __post_init__(self):
        preset = PRESETS.get(self.processor)
        if preset is None:
            raise ValueError(f"unknown processor {self.processor!r}; known: {sorted(PRESETS)}")
        given = {f.name for f in fields(self) if getattr(self, f.name) is not None}
        for k, v in preset.items():
            if k not in given:
                object.__setattr__(self, k, v)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def slow_fast(self) -> bool:
        return self.processor == "keye-vl-1.5"

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


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: float = 4 * 28 * 28,
                 max_pixels: float = 16384 * 28 * 28, max_ratio: float = 200.0) -> tuple[int, int]:
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


def _total_frames(duration: float, fps: float | None, total_frames: int | None) -> tuple[int, float]:
    if (not fps or fps <= 0) and total_frames and duration > 0:
        fps = total_frames / duration
    if not fps or fps <= 0 or (total_frames is None and duration <= 0):
        raise TokenError("zero_duration", f"video has duration {duration} s at {fps} fps")
    if total_frames is None:
        total_frames = max(1, int(round(duration * fps)))
    return int(total_frames), float(fps)


def video_nframes(duration: float, fps: float | None, cfg: VisualTokenConfig = VisualTokenConfig(),
                  total_frames: int | None = None, sample_fps: float | None = None) -> int:
    """Frames the processor samples from a video of `total_frames` (else duration x fps) at `fps`."""
    total_frames, fps = _total_frames(duration, fps, total_frames)
    rate = sample_fps or cfg.video_fps
    ff = cfg.frame_factor
    if cfg.processor == "keye-vl-1.0":
        want = total_frames / fps * rate
        min_frames = _ceil(cfg.video_min_frames, ff)
        max_frames = _floor(min(cfg.video_max_frames, total_frames), ff)
        n = _floor(min(max(want, min_frames), max_frames, total_frames), ff)
        if n < ff:
            raise TokenError("too_few_frames", f"a video of {total_frames} frames gives fewer than {ff} samples")
        return int(n)
    # keye-vl-1.5: the sampling rate never above the video's own, a cap from the budget
    n = int(total_frames / fps * min(rate, fps))
    cap = int(cfg.video_total_tokens * _T / cfg.video_min_pixels)
    if cfg.video_max_frames is not None:
        cap = min(cap, cfg.video_max_frames)
    n = min(max(n, min(cfg.video_min_frames or 0, total_frames)), cap)
    if ff > 1:
        n = _floor(n, ff)
    if n < 1:
        raise TokenError("too_few_frames", f"a video of {total_frames} frames at {fps:g} fps gives no sample "
                                           f"at {min(rate, fps):g} fps")
    return int(n)


def _v10_frame_max(cfg: VisualTokenConfig, n: int) -> float:
    per_frame = cfg.video_total_tokens * _T / n * cfg.frame_factor
    return max(min(cfg.video_max_pixels, per_frame), int(cfg.video_min_pixels * cfg.frame_max_floor))


def slow_tokens_limit(slow: int, fast: int, cfg: VisualTokenConfig) -> float:
    """1.5's per-slow-frame token limit: the smallest t in [min, max] tokens per frame whose
    estimate slow*t + fast*max(int(ratio*t), min) is over the budget, else the maximum."""
    lo, hi = cfg.video_min_pixels / _T, cfg.video_max_pixels / _T
    min_tokens = int(lo)
    budget = cfg.video_total_tokens * _T

    def over(t: int) -> bool:
        return (slow * t + fast * max(int(cfg.fast_token_ratio * t), min_tokens)) * _T > budget

    # the estimate grows with t: find the first t that is over, by bisection on [lo, hi)
    a, b = lo, hi
    while a < b:
        t = int(a + b) // 2
        if over(t):
            b = t
        else:
            a = t + 1
    return a


def slow_fast_sizes(height: int, width: int, slow: int, fast: int, cfg: VisualTokenConfig) -> dict:
    """1.5's slow and fast frame sizes and the video's tokens for these frame type counts."""
    f = cfg.factor
    limit = slow_tokens_limit(slow, fast, cfg)
    h, w = smart_resize(height, width, f, cfg.video_min_pixels, limit * _T, cfg.max_ratio)
    per = (h // f) * (w // f)
    fast_max = max(int(per * cfg.fast_token_ratio) * _T, cfg.video_min_pixels)
    fh, fw = smart_resize(height, width, f, cfg.video_min_pixels, fast_max, cfg.max_ratio)
    fper = (fh // f) * (fw // f)
    return {"resized_height": h, "resized_width": w, "fast_resized_height": fh, "fast_resized_width": fw,
            "tokens_per_frame": per, "fast_tokens_per_frame": fper, "tokens": slow * per + fast * fper}


def video_tokens(height: int, width: int, duration: float, fps: float | None,
                 cfg: VisualTokenConfig = VisualTokenConfig(), total_frames: int | None = None,
                 sample_fps: float | None = None) -> dict:
    """Tokens of a video from its metadata; for 1.5 every frame counts as slow (the upper bound)."""
    n = video_nframes(duration, fps, cfg, total_frames, sample_fps)
    if cfg.processor == "keye-vl-1.0":
        h, w = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, _v10_frame_max(cfg, n), cfg.max_ratio)
        per = (h // cfg.factor) * (w // cfg.factor)
        return {"frames": n, "resized_height": h, "resized_width": w, "tokens_per_frame": per, "tokens": n * per}
    s = slow_fast_sizes(height, width, n, 0, cfg)
    return {"frames": n, "resized_height": s["resized_height"], "resized_width": s["resized_width"],
            "tokens_per_frame": s["tokens_per_frame"], "tokens": s["tokens"]}


def media_tokens(m: dict, cfg: VisualTokenConfig) -> int:
    """Visual tokens of one probed media reference (a dict of the schema's Media)."""
    if m.get("width") is None or m.get("height") is None:
        raise TokenError("not_probed", "media has no size: run the probe step before tokens")
    if m["kind"] == "image":
        return image_tokens(m["height"], m["width"], cfg)["tokens"]
    return video_tokens(m["height"], m["width"], m.get("duration") or 0.0, m.get("fps"), cfg,
                        total_frames=m.get("frames"))["tokens"]
