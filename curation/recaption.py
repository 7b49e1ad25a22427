"""Recaptioning with a vision-language model, as Keye-VL rebuilds weak captions.

Each sample gets a prompt by task: `caption` (a detailed description of an image), `ocr`
(transcribe the text in the image) or `video` (describe the video from its evenly sampled
frames). The task is the recipe's per-source choice (`tasks: {source: ocr}`), else `video`
for videos and `caption` for images. Generation runs in batches; its length and sampling come
from the recipe. The new caption is appended to the sample's `captions` with the model and the
exact prompt; the original `text` is never overwritten, so a mixture can pick either.
A sample whose media will not decode, on which the model fails, or whose caption comes back
shorter than `min_chars` leaves with a ledger line (`on_failure: keep` keeps it uncaptioned).

Options (off by default; the default behaviour is unchanged):

- `use_asr: true`: a sample whose `meta.asr` has segments (the `asr` step) gets its speech in the
  prompt, after the task's prompt: "The audio says: <the segments' text, in time order>"
  (cut at `asr_max_chars`); the caption's `prompt` records the exact prompt given.
- `fps: 0.5 | 1 | 2` (any rate > 0): a video is shown as frames sampled at that rate (frame i
  at i / fps seconds, the nearest decoded frame), at most `max_frames` of them, instead of
  `video_frames` evenly sampled frames; an odd count repeats the last frame (Qwen-style models
  pair frames in time).
"""

from __future__ import annotations

import os
from typing import Any

from reelforge.curation.schema import drop
from reelforge.curation.step import register_step
from reelforge.curation.vlm import VLMStep

DEFAULT_PROMPTS = {
    "caption": "Describe this image in detail: the objects, their attributes and positions, the setting, "
               "and any text that appears.",
    "ocr": "Transcribe all the text in this image exactly, line by line, in reading order.",
    "video": "Describe this video in detail: the scene, the people and objects, the actions, and how they "
             "change over time.",
}


def asr_text(row: dict) -> str:
    """The speech of a sample's `meta.asr` segments, in time order, joined by spaces ("" when none)."""
    import json

    try:
        meta = json.loads(row.get("meta") or "{}")
    except ValueError:
        return ""
    asr = meta.get("asr") if isinstance(meta, dict) else None
    segs = asr.get("segments") if isinstance(asr, dict) else None
    if not isinstance(segs, list):
        return ""
    ok = [s for s in segs if isinstance(s, dict) and str(s.get("text") or "").strip()]
    ok.sort(key=lambda s: (float(s.get("start") or 0.0), float(s.get("end") or 0.0)))
    return " ".join(str(s["text"]).strip() for s in ok)


def rate_indices(frames: int, video_fps: float, fps: float, max_frames: int) -> list[int]:
    """Frame indices at `fps` frames a second: frame k at k / fps s (the nearest frame of a
    `video_fps` stream), k = 0.. while inside the `frames` frames, at most `max_frames`; at least one."""
    frames, video_fps = int(frames), float(video_fps)
    out = []
    k = 0
    while len(out) < max_frames:
        i = int(round(k * video_fps / fps))
        if i >= frames:
            break
        out.append(i)
        k += 1
    return out or [0]


def decode_at_rate(media: dict, fps: float, max_frames: int) -> list:
    """A video's frames at `fps` (see rate_indices) as RGB PIL images; probe must have run (fps, frames)."""
    import tempfile

    from PIL import Image

    from reelforge.curation.media_io import media_path, open_media, stream_media_fd, video_source
    from reelforge.curation.video import decode_frames

    if not media.get("fps") or not media.get("frames"):
        raise ValueError("the video has no frame rate or frame count: run the probe step before recaption")
    idx = rate_indices(media["frames"], media["fps"], fps, max_frames)
    fd = open_media(media)
    try:
        if media.get("offset") is None:
            arr = decode_frames(video_source(fd, media_path(media["uri"])), idx, past_end="clamp")
        else:
            with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
                stream_media_fd(fd, media, out=tmp)
                tmp.flush()
                arr = decode_frames(tmp.name, idx, past_end="clamp")
    finally:
        os.close(fd)
    return [Image.fromarray(f) for f in arr]


@register_step("recaption")
class Recaption(VLMStep):
    def __init__(self, model: str = "", model_name: str = "", prompts: dict | None = None,
                 tasks: dict | None = None, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, min_chars: int = 1,
                 on_failure: str = "drop", use_asr: bool = False, asr_max_chars: int = 2000,
                 fps: float | None = None, max_frames: int = 32, **kw: Any):
        super().__init__(model=model, **kw)
        if not isinstance(use_asr, bool):
            raise ValueError(f"`use_asr` must be true or false, got {use_asr!r}")
        self.use_asr = use_asr
        self.asr_max_chars = int(asr_max_chars)
        if self.asr_max_chars < 1:
            raise ValueError(f"`asr_max_chars` must be at least 1, got {asr_max_chars}")
        if fps is not None:
            try:
                fps = float(fps)
            except (TypeError, ValueError):
                fps = -1.0
            if not 0 < fps <= 30:
                raise ValueError("`fps` must be a frame rate above 0 and at most 30 such as 0.5, 1 or 2 "
                                 "(or unset for `video_frames` evenly sampled frames)")
        self.fps = fps
        self.max_frames = int(max_frames)
        if self.max_frames < 2:
            raise ValueError(f"`max_frames` must be at least 2, got {max_frames}")
        self.prompts = {**DEFAULT_PROMPTS, **(prompts or {})}
        self.tasks = dict(tasks or {})
        for src, task in self.tasks.items():
            if task not in self.prompts:
                raise ValueError(f"`tasks.{src}` is {task!r}: use one of {', '.join(sorted(self.prompts))} "
                                 "or add it under `prompts`")
        if on_failure not in ("drop", "keep"):
            raise ValueError("`on_failure` must be drop or keep")
        self.model_name = model_name or os.path.basename(os.path.normpath(model))
        self.max_new_tokens = int(max_new_tokens)
        self.do_sample = bool(do_sample)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.seed = int(seed)
        self.min_chars = int(min_chars)
        self.on_failure = on_failure

    def prompt_for(self, row: dict) -> tuple[str, str] | None:
        kinds = {m["kind"] for m in row.get("media") or []}
        if not kinds:
            return None
        task = self.tasks.get(row["source"]) or ("video" if "video" in kinds else "caption")
        prompt = self.prompts[task]
        if self.use_asr:
            speech = asr_text(row)
            if speech:
                prompt = f"{prompt}\nThe audio says: {speech[:self.asr_max_chars]}"
        return task, prompt

    def _visuals(self, row: dict) -> list[tuple[str, Any]]:
        if self.fps is None:
            return super()._visuals(row)
        out = []
        for m in row.get("media") or []:
            if m["kind"] != "video":
                out.extend(super()._visuals({"media": [m]}))
                continue
            frames = decode_at_rate(m, self.fps, self.max_frames)
            if len(frames) % 2:
                frames.append(frames[-1])
            out.append(("video", frames))
        return out

    def run_model(self, inputs, tasks: list[str]) -> list:
        # the seed is per batch: sampling repeats for the same batches, and greedy needs none
        return self._model.generate(inputs, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                    temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def take(self, row: dict, task: str, prompt: str, result: str) -> None:
        if len(result) < self.min_chars:
            drop(row, self.name, "empty_caption", f"{len(result)} characters < min_chars {self.min_chars}")
            return
        caps = list(row.get("captions") or [])
        caps.append({"text": result, "model": self.model_name, "prompt": prompt, "task": task})
        row["captions"] = caps

    def compute(self, rows: list[dict], prepared) -> list[dict]:
        alive_before = [row.get("drop_step") is None for row in rows]
        rows = super().compute(rows, prepared)
        if self.on_failure == "keep":  # failures keep the sample, uncaptioned
            for row, was_alive in zip(rows, alive_before):
                if was_alive and row.get("drop_step") == self.name:
                    row["drop_step"] = row["drop_reason"] = row["drop_detail"] = None
        return rows
