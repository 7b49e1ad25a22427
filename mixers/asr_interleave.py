"""The `asr_interleave` builder: from a video whose `meta.asr` has segments (the `asr` step),
derive an interleaved sample of frames and speech ordered by time, as Keye-VL's video-ASR data:

    text  = "<image>[0.0-2.1] first words\n<image>[2.1-4.0] next words\n..."
    media = one JPEG frame per segment (decoded at the segment's middle, or its start with
            `frame_at: start`), under `<workdir>/media/asr_interleave/`

Segments are sorted by (start, end) first (whatever order they were stored in); with more than
`max_segments`, consecutive segments are merged into `max_segments` groups of about equal count
(texts joined by a space, the group spans first start .. last end). A video with fewer than
`min_segments` segments, or `no_audio`, or no `meta.asr`, passes untouched and derives nothing.

The derived sample: kind `interleaved`, `parent_id` = the video's id, id `<parent>@asr_interleave`,
a fresh `source_key` likewise, no messages, captions or token counts, and `meta.task` =
{"task": "asr_interleave", "parent": id, "params": {...}, "segments": n, "times": [[s, e], ...]}.
The parent stays alive (`parent: keep`, default) or leaves as `split_into_asr_interleave`
(`parent: drop`), so inputs + derived = kept + dropped. Nothing here is random. A video whose
frames cannot be decoded derives nothing and keeps its fate, with the reason in the parent's
`meta.task_errors.asr_interleave` (the builder never drops what it cannot build from).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Any

from reelforge.curation.errors import MediaReadError, ProbeError
from reelforge.curation.schema import IMAGE_PLACEHOLDER, alive, drop, row_meta
from reelforge.curation.step import RowStep, register_step

TASK = "asr_interleave"
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{2,64}")


_meta = row_meta  # the row's meta as a dict (curation.schema)


def ordered_segments(segments: Any) -> list[dict]:
    """The well-formed segments ({start, end, text} with numbers and non-empty text), sorted by time."""
    out = []
    for s in segments if isinstance(segments, list) else []:
        if not isinstance(s, dict):
            continue
        try:
            a, b = float(s["start"]), float(s["end"])
        except (KeyError, TypeError, ValueError):
            continue
        text = str(s.get("text") or "").strip()
        if text and a >= 0 and b >= a:
            out.append({"start": a, "end": b, "text": text})
    return sorted(out, key=lambda s: (s["start"], s["end"]))


def group_segments(segs: list[dict], max_segments: int) -> list[dict]:
    """At most `max_segments` groups of consecutive segments, of about equal count."""
    n = len(segs)
    if n <= max_segments:
        return segs
    out = []
    for g in range(max_segments):
        part = segs[g * n // max_segments:(g + 1) * n // max_segments]
        out.append({"start": part[0]["start"], "end": max(p["end"] for p in part),
                    "text": " ".join(p["text"] for p in part)})
    return out


def interleaved_text(groups: list[dict], decimals: int = 1) -> str:
    return "\n".join(f"{IMAGE_PLACEHOLDER}[{g['start']:.{decimals}f}-{g['end']:.{decimals}f}] {g['text']}"
                     for g in groups)


@register_step("asr_interleave")
class ASRInterleave(RowStep):
    batch_rows = 16

    def __init__(self, min_segments: int = 1, max_segments: int = 16, frame_at: str = "middle",
                 max_side: int | None = 448, jpeg_quality: int = 90, parent: str = "keep",
                 timeout_s: float = 120.0, **kw: Any):
        super().__init__(**kw)
        try:
            self.min_segments, self.max_segments = int(min_segments), int(max_segments)
            self.jpeg_quality, self.timeout_s = int(jpeg_quality), float(timeout_s)
            self.max_side = int(max_side) if max_side else None
        except (TypeError, ValueError) as e:
            raise ValueError(f"asr_interleave's numbers (min_segments, max_segments, max_side, jpeg_quality, "
                             f"timeout_s) must be numbers ({e})") from e
        if not 1 <= self.min_segments <= self.max_segments:
            raise ValueError(f"`min_segments` ({min_segments}) must be at least 1 and at most `max_segments` "
                             f"({max_segments})")
        if frame_at not in ("middle", "start"):
            raise ValueError(f"`frame_at` must be middle or start, got {frame_at!r}")
        if parent not in ("keep", "drop"):
            raise ValueError(f"`parent` must be keep (the video stays a sample) or drop, got {parent!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"`jpeg_quality` must be 1..100, got {jpeg_quality}")
        if self.max_side is not None and self.max_side < 28:
            raise ValueError(f"`max_side` must be at least 28 pixels (or null for the native size), got {max_side}")
        self.frame_at, self.parent = frame_at, parent
        self.workdir: str | None = None

    def task_params(self) -> dict:
        return {"min_segments": self.min_segments, "max_segments": self.max_segments, "frame_at": self.frame_at,
                "max_side": self.max_side, "jpeg_quality": self.jpeg_quality}

    def process(self, batch: list[dict]) -> list[dict]:
        out: list[dict] = []
        for row in batch:
            media = row.get("media") or []
            segs = ordered_segments((_meta(row).get("asr") or {}).get("segments")) \
                if alive(row) and len(media) == 1 and media[0].get("kind") == "video" else []
            if len(segs) < self.min_segments:
                out.append(row)
                continue
            try:
                child = self._derive(row, group_segments(segs, self.max_segments))
            except (ProbeError, MediaReadError) as e:
                out.append(self._note(row, e.reason, e.detail))
                continue
            except Exception as e:  # noqa: BLE001 - one bad video never fails the job
                out.append(self._note(row, "error", f"{type(e).__name__}: {e}"))
                continue
            if self.parent == "drop":
                drop(row, self.name, "split_into_asr_interleave", "an ASR-interleaved sample derived")
            out += [row, child]
        return out

    @staticmethod
    def _note(row: dict, reason: str, detail: str) -> dict:
        m = _meta(row)
        m.setdefault("task_errors", {})[TASK] = f"{reason}: {detail}"[:500]
        row["meta"] = json.dumps(m, sort_keys=True, ensure_ascii=False)
        return row

    def _times(self, groups: list[dict], duration: float) -> list[float]:
        ts = [g["start"] if self.frame_at == "start" else (g["start"] + g["end"]) / 2 for g in groups]
        return [min(max(0.0, t), duration) if duration > 0 else max(0.0, t) for t in ts]

    def _frames(self, row: dict, times: list[float]):
        from reelforge.curation import video
        from reelforge.curation.media_io import media_path, open_media, stream_media_fd, video_source

        m = row["media"][0]
        fd = open_media(m)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if m.get("offset") is None:
                    src: str | int = video_source(fd, media_path(m["uri"]))
                else:
                    src = os.path.join(tmp, "in.mp4")
                    with open(src, "xb") as f:
                        stream_media_fd(fd, m, out=f)
                fps, frames = m.get("fps"), m.get("frames")
                if not fps or not frames:
                    info = video.probe_video(src, self.timeout_s)
                    fps, frames = info.get("fps"), info.get("frames")
                if not fps or not frames:
                    raise ProbeError("decode_error", "the video's frame rate or frame count is unknown")
                idx = [min(int(frames) - 1, int(round(t * float(fps)))) for t in times]
                size = None
                w, h = int(m.get("width") or 0), int(m.get("height") or 0)
                if self.max_side and w and h and max(w, h) > self.max_side:
                    s = self.max_side / max(w, h)
                    size = (max(2, int(round(h * s / 2)) * 2), max(2, int(round(w * s / 2)) * 2))
                arr = video.decode_frames(src, idx, size=size, timeout_s=self.timeout_s, past_end="clamp")
        finally:
            os.close(fd)
        return arr

    def _derive(self, row: dict, groups: list[dict]) -> dict:
        from PIL import Image

        duration = float(row["media"][0].get("duration") or 0.0)
        frames = self._frames(row, self._times(groups, duration))
        root = os.path.join(os.path.realpath(self.workdir or tempfile.gettempdir()), "media", TASK)
        rid = str(row["id"])
        stem = rid if _SAFE_ID.fullmatch(rid) else hashlib.sha1(rid.encode()).hexdigest()[:24]
        dest = os.path.join(root, stem[:2])
        os.makedirs(dest, exist_ok=True)
        if os.path.realpath(dest) != dest:
            raise MediaReadError("outside_root", f"{dest} is not a plain folder of the run's work folder")
        media = []
        for k, arr in enumerate(frames):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=self.jpeg_quality)
            data = buf.getvalue()
            path = os.path.join(dest, f"{stem}_{k:03d}.jpg")
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # a retried task writes the same bytes under the same name
            m = {key: None for key in row["media"][0]}
            m.update(kind="image", uri=path, length=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     format="jpeg", width=int(arr.shape[1]), height=int(arr.shape[0]))
            media.append(m)
        child = copy.deepcopy(row)
        child.update(id=f"{rid}@{TASK}", source_key=f"{row['source_key']}@{TASK}", parent_id=rid,
                     kind="interleaved", text=interleaved_text(groups), messages=None, media=media, captions=None,
                     responses=None, chosen=None, rejected=None, text_tokens=None, visual_tokens=None, tokens=None)
        meta = _meta(row)
        meta["task"] = {"task": TASK, "parent": rid, "params": self.task_params(), "segments": len(groups),
                        "times": [[round(g["start"], 3), round(g["end"], 3)] for g in groups]}
        child["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
        return child
