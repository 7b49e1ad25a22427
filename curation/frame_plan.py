"""A video's frame plan, as the released Keye-VL-1.5 processor (`keye-vl-utils` 1.5.2,
`fetch_video`) would feed it: which frames are sampled, their timestamps, which are slow and
which fast, the two frame sizes and the tokens. Computed once from the decoded frames, so
the planner and the report count true 1.5 tokens without decoding again (the metadata-only
count of `curation.tokens` treats every frame as slow: the upper bound).

The plan, step by step (tests/test_keye_parity.py checks it against the release on real
encoded videos):

- frames: `tokens.video_nframes` from the container's frame count and average frame rate
  (what decord reports); indices = linspace(0, total-1, n).round() in float32, as torch
  computes it (a float64 linspace rounds differently on long videos); timestamps = i / fps,
  as float32.
- frame types: each sampled frame is resized (bilinear, antialiased, uint8: torch's
  `interpolate`) to at most `similarity_max_pixels` (256 tokens, at least
  `video_min_pixels`), turned to 8-bit HSV (OpenCV's integer formula, H in 0..179), and cut
  into 28x28 patches. Against the last slow frame, a patch is similar when the cosine of its
  HSV vectors is above `patch_similarity` (0.7), patches black in both frames left out; a
  frame whose share of similar patches is below `min_frame_similarity` (0.9) is slow (type
  0) and the new reference, else fast (type 1). The first frame is slow.
- sizes and tokens: `tokens.slow_fast_sizes` for the slow and fast counts.

Frames are decoded upright (ffmpeg's autorotate); decord, the release's reader, ignores the
rotation, so for a rotated video the release's sizes are these transposed (same tokens).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from reelforge.curation.tokens import (
    TokenError,
    VisualTokenConfig,
    slow_fast_sizes,
    smart_resize,
    video_nframes,
    video_tokens,
)

__all__ = ["plan_indices", "plan_timestamps", "hsv_u8", "FrameTyper", "frame_plan", "plan_from_frames",
           "media_fields"]

_HSV_SHIFT = 12
# int32 is exact here: |diff * _SDIV| <= 255 * 1,044,480 and |h * _HDIV| <= 1,275 * 122,880, both < 2**31
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], np.int32)
_HDIV = np.array([0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], np.int32)


def hsv_u8(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) to HSV uint8 with OpenCV's 8-bit arithmetic: V = max, S = 255*(V-min)/V,
    H in [0, 180) in 2-degree steps, each division by a fixed-point (12-bit) reciprocal table."""
    if rgb.ndim == 4 and len(rgb) > 1:  # frame by frame: the int32 temporaries stay small (cache, no page faults)
        return np.stack([hsv_u8(f) for f in rgb])
    x = rgb.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def plan_indices(total_frames: int, n: int) -> list[int]:
    """linspace(0, total-1, n).round() in torch's float32, as the release's decord reader takes them."""
    import torch

    if n <= 0 or total_frames <= 0:
        return []
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def plan_timestamps(indices: list[int], fps: float) -> list[float]:
    """Seconds from the first frame, (1/fps) * i rounded to float32, as the release computes them."""
    step = 1.0 / fps
    return [float(t) for t in np.asarray([step * i for i in indices], np.float64).astype(np.float32)]


class FrameTyper:
    """Slow/fast types of frames fed in order (any number of batches of N x H x W x 3 uint8)."""

    def __init__(self, height: int, width: int, cfg: VisualTokenConfig):
        self.cfg = cfg
        self.size = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.similarity_max_pixels,
                                 cfg.max_ratio)
        self.ref = None  # the last slow frame's HSV patch vectors and their norms
        self.types: list[int] = []

    def _patches(self, frames: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # NCHW view of NHWC, as decoded
        small = torch.nn.functional.interpolate(t, list(self.size), mode="bilinear", antialias=True)
        hsv = torch.from_numpy(hsv_u8(small.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2).float()
        p = self.cfg.factor
        n, c, h, w = hsv.shape
        # N, C, h, p, w, p -> N, h, w, (C p p): one vector per patch, channel-major
        return hsv.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h // p, w // p, c * p * p)

    def _similarity(self, a, b) -> float:
        import torch

        na = torch.norm(a, p=2, dim=-1, keepdim=True) + 1e-8
        nb = torch.norm(b, p=2, dim=-1, keepdim=True) + 1e-8
        cos = ((a / na) * (b / nb)).sum(dim=-1)
        black = (na.squeeze(-1) < 0.01) & (nb.squeeze(-1) < 0.01)
        kept = cos[~black]
        return (kept > self.cfg.patch_similarity).float().mean().item()  # nan when all black: fast

    def feed(self, frames: np.ndarray) -> None:
        if len(frames) == 0:
            return
        with _one_torch_thread():
            for p in self._patches(frames):
                if self.ref is None or self._similarity(self.ref, p) < self.cfg.min_frame_similarity:
                    self.ref = p
                    self.types.append(0)
                else:
                    self.types.append(1)


@contextlib.contextmanager
def _one_torch_thread():
    """The typer's tensors are tiny (one frame of <= 256 patches at a time): torch's thread pool
    only spins against the other tasks of the executor (15x slower on 2 busy cores), so one thread
    while typing, restored after."""
    import torch

    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def plan_from_frames(frames: np.ndarray, indices: list[int], fps: float, cfg: VisualTokenConfig) -> dict:
    """The plan of already decoded sampled frames (N x H x W x 3 uint8, in index order)."""
    typer = FrameTyper(frames.shape[1], frames.shape[2], cfg)
    typer.feed(frames)
    return _plan(frames.shape[1], frames.shape[2], indices, fps, typer.types, cfg)


def _plan(height: int, width: int, indices: list[int], fps: float, types: list[int], cfg: VisualTokenConfig) -> dict:
    fast = int(sum(types))
    sizes = slow_fast_sizes(height, width, len(types) - fast, fast, cfg)
    return {"processor": cfg.processor, "frames": len(types), "indices": list(indices),
            "timestamps": plan_timestamps(indices, fps), "frame_types": list(types), "slow_frames": len(types) - fast,
            "fast_frames": fast, **{k: sizes[k] for k in ("resized_height", "resized_width", "fast_resized_height",
                                                          "fast_resized_width", "tokens_per_frame",
                                                          "fast_tokens_per_frame", "tokens")}}


def _video_info(path: str | int, info: dict | None, timeout_s: float, autorotate: bool) -> tuple:
    """(info, frame count, fps, height, width) of a video as its frames are decoded (upright with
    `autorotate`); a video without frames or a rate cannot be planned."""
    from reelforge.curation.video import probe_video

    info = info or probe_video(path, timeout_s)
    total, fps = info.get("frames"), info.get("fps")
    if not total or not fps:
        raise TokenError("zero_duration", f"video has {total} frames at {fps} fps")
    height, width = (info["display_height"], info["display_width"]) if autorotate else (info["height"], info["width"])
    return info, total, fps, height, width


def frame_plan(path: str | int, cfg: VisualTokenConfig | None = None, *, info: dict | None = None,
               timeout_s: float = 600.0, autorotate: bool = True, batch_bytes: int = 1 << 30) -> dict[str, Any]:
    """The frame plan of a video file (`info`: a `video.probe_video` result for it, else probed).

    keye-vl-1.0 has no frame types: its plan is the indices, timestamps and the one size.
    Frames are decoded in batches of at most `batch_bytes` of full-size RGB."""
    from reelforge.curation.video import decode_frames

    cfg = cfg or VisualTokenConfig()
    info, total, fps, height, width = _video_info(path, info, timeout_s, autorotate)
    n = video_nframes(info.get("duration") or 0.0, fps, cfg, total_frames=total)
    idx = plan_indices(total, n)
    if not cfg.slow_fast:
        v = video_tokens(height, width, info.get("duration") or 0.0, fps, cfg, total_frames=total)
        return {"processor": cfg.processor, "frames": n, "indices": idx, "timestamps": plan_timestamps(idx, fps),
                **{k: v[k] for k in ("resized_height", "resized_width", "tokens_per_frame", "tokens")}}
    typer = FrameTyper(height, width, cfg)
    step = max(1, batch_bytes // (height * width * 3))
    for a in range(0, len(idx), step):
        frames = decode_frames(path, idx[a:a + step], timeout_s=timeout_s, past_end="clamp", autorotate=autorotate)
        typer.feed(frames)
    return _plan(height, width, idx, fps, typer.types, cfg)


def media_fields(plan: dict) -> dict[str, Any]:
    """A 1.5 plan as the schema's Media fields (how the probe and clips steps store it per video)."""
    return {"frame_indices": [int(i) for i in plan["indices"]],
            "frame_times": [float(t) for t in plan["timestamps"]],
            "frame_types": [int(t) for t in plan["frame_types"]],
            "slow_size": [int(plan["resized_height"]), int(plan["resized_width"])],
            "fast_size": [int(plan["fast_resized_height"]), int(plan["fast_resized_width"])],
            "plan_tokens": int(plan["tokens"]), "plan_processor": plan["processor"]}


# --- plans at a fixed frame count (the modes step's `video_frames`) ----------------------------

def fixed_nframes(k: int, total_frames: int, cfg: VisualTokenConfig) -> int:
    """Frames the processor samples when asked for exactly `k` (the cold-start 16 and 32).

    keye-vl-1.0: the release's `nframes`, rounded to `frame_factor` (Python's round: 15 -> 16,
    17 -> 16), in [frame_factor, total]. keye-vl-1.5: the release's `smart_nframes` ignores
    `nframes` (its docstring promises it, its code reads only `fps` and `max_frames`); k frames
    are what it samples with `max_frames: k` and `fps` at least the video's own, so k, capped by
    the budget (`video_total_tokens` x 784 / `video_min_pixels` frames) and never more than the
    video has. Raises TokenError `too_few_frames` when the video has fewer frames than that."""
    if not cfg.slow_fast:
        n = round(k / cfg.frame_factor) * cfg.frame_factor
    else:
        n = min(k, int(cfg.video_total_tokens * 28 * 28 / cfg.video_min_pixels))
    if n < max(1, cfg.frame_factor) or n > total_frames:
        raise TokenError("too_few_frames", f"{k} frames asked ({n} sampled by {cfg.processor}) but the video has "
                                           f"{total_frames}")
    return int(n)


def fixed_frame_plans(path: str | int, counts: list[int], cfg: VisualTokenConfig | None = None, *,
                      info: dict | None = None, timeout_s: float = 600.0, autorotate: bool = True,
                      batch_bytes: int = 1 << 30) -> dict[int, dict[str, Any]]:
    """A video's plan at each fixed frame count in `counts` ({k: plan}, keys as `frame_plan`'s).

    keye-vl-1.5: indices linspace(0, total-1, n).round(), types and sizes from those decoded
    frames, exactly as `frame_plan` (one ffmpeg pass decodes the union of every count's frames).
    keye-vl-1.0: the release's per-frame size for n frames (`video_tokens`' rule with this n),
    every frame slow; nothing is decoded. Raises TokenError (`too_few_frames`, ...) or ProbeError."""
    from reelforge.curation.tokens import _v10_frame_max
    from reelforge.curation.video import decode_frames

    cfg = cfg or VisualTokenConfig()
    info, total, fps, height, width = _video_info(path, info, timeout_s, autorotate)
    ns = {k: fixed_nframes(k, total, cfg) for k in counts}
    idx = {k: plan_indices(total, n) for k, n in ns.items()}
    if not cfg.slow_fast:
        out = {}
        for k, n in ns.items():
            h, w = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, _v10_frame_max(cfg, n),
                                cfg.max_ratio)
            per = (h // cfg.factor) * (w // cfg.factor)
            out[k] = {"processor": cfg.processor, "frames": n, "indices": idx[k],
                      "timestamps": plan_timestamps(idx[k], fps), "frame_types": [0] * n, "slow_frames": n,
                      "fast_frames": 0, "resized_height": h, "resized_width": w, "fast_resized_height": None,
                      "fast_resized_width": None, "tokens_per_frame": per, "fast_tokens_per_frame": None,
                      "tokens": n * per}
        return out
    typers = {k: FrameTyper(height, width, cfg) for k in ns}
    uniq = sorted(set().union(*idx.values())) if idx else []
    step = max(1, batch_bytes // (height * width * 3))
    for a in range(0, len(uniq), step):
        chunk = uniq[a:a + step]
        frames = decode_frames(path, chunk, timeout_s=timeout_s, past_end="clamp", autorotate=autorotate)
        pos = {i: j for j, i in enumerate(chunk)}
        for k, ix in idx.items():  # each count's frames of this chunk, in its own order
            typers[k].feed(frames[[pos[i] for i in ix if i in pos]])
    return {k: _plan(height, width, idx[k], fps, typers[k].types, cfg) for k in ns}


def plan_media_fields(plan: dict) -> dict[str, Any]:
    """`media_fields` of a plan of either processor (a 1.0 plan has no fast size: None)."""
    if plan.get("fast_resized_height") is not None:
        return media_fields(plan)
    return {"frame_indices": [int(i) for i in plan["indices"]],
            "frame_times": [float(t) for t in plan["timestamps"]],
            "frame_types": [int(t) for t in plan["frame_types"]],
            "slow_size": [int(plan["resized_height"]), int(plan["resized_width"])], "fast_size": None,
            "plan_tokens": int(plan["tokens"]), "plan_processor": plan["processor"]}


def fixed_plan_tokens(m: dict, cfg: VisualTokenConfig) -> int | None:
    """Visual tokens of a video medium planned at a fixed frame count (`fixed_frame_plans`) with
    cfg's numbers, from its stored plan (its own frame count and types; nothing decoded); the
    medium's sizes and `plan_tokens` are updated to cfg's, as the tokens step does for probe's
    plans. None when the medium has no plan of cfg's processor. For the tokens step: a `modes`
    copy's frame count is its own, not the one `video_nframes` gives for the file."""
    from reelforge.curation.tokens import _v10_frame_max

    types, idx = m.get("frame_types"), m.get("frame_indices")
    if m.get("kind") != "video" or not types or not idx or m.get("plan_processor") != cfg.processor:
        return None
    n, fast = len(idx), sum(1 for t in types if t)

    def sizes(h: int, w: int) -> dict:
        if cfg.slow_fast:
            return slow_fast_sizes(h, w, n - fast, fast, cfg)
        rh, rw = smart_resize(h, w, cfg.factor, cfg.video_min_pixels, _v10_frame_max(cfg, n), cfg.max_ratio)
        return {"resized_height": rh, "resized_width": rw, "fast_resized_height": None, "fast_resized_width": None,
                "tokens": n * (rh // cfg.factor) * (rw // cfg.factor)}

    h, w = m["height"], m["width"]
    s = sizes(h, w)
    old = m.get("slow_size")
    if old and len(old) == 2 and s["resized_height"] != s["resized_width"] and \
            [old[0], old[1]] == [s["resized_width"], s["resized_height"]]:
        s = sizes(w, h)  # the plan was made upright (a rotated video): keep its orientation
    m["slow_size"] = [s["resized_height"], s["resized_width"]]
    m["fast_size"] = None if s["fast_resized_height"] is None else [s["fast_resized_height"], s["fast_resized_width"]]
    m["plan_tokens"] = int(s["tokens"])
    return int(s["tokens"])


__all__ += ["fixed_nframes", "fixed_frame_plans", "plan_media_fields", "fixed_plan_tokens"]
