"""Probe: read each media once, hash it, and learn its size (images) or stream facts (videos).

Images are opened with Pillow; the pixel count is checked from the header *before*
decoding, so a decompression bomb costs a ledger line, not the executor. Videos are
probed with ffprobe (through ffmpeg-python) under a timeout.

Each file is opened once through `containment.open_regular` (a regular file at the canonical
path ingest stored: no device, FIFO or symlink swapped in since); images are read whole (at
most `max_bytes`), videos are hashed in pieces and ffprobe reads that same open file.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from typing import Any

from reelforge.curation.errors import MediaReadError, ProbeError  # ProbeError: importable from here as before
from reelforge.curation.media_io import (
    media_path,
    open_media,
    read_media_fd,
    stream_media_fd,
    video_source,
)
from reelforge.curation.schema import drop
from reelforge.curation.step import RowStep, register_step


def probe_image(data: bytes, max_pixels: int, with_phash: bool = False) -> dict[str, Any]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # we check the header ourselves, with our own limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            fmt = (img.format or "").lower()
            if w <= 0 or h <= 0:
                raise ProbeError("corrupt_image", f"image has size {w}x{h}")
            if w * h > max_pixels:
                raise ProbeError("too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            if fmt == "jpeg":
                # decode at reduced scale (still reads every scan, so truncation shows), but never
                # below 256 px a side: the pHash thumbnail is 32x32, and a JPEG drafted to a few dozen
                # pixels hashes differently from the same picture as PNG (format-dependent pHash)
                img.draft("RGB", (min(w, max(w // 8, 256)), min(h, max(h // 8, 256))))
            img.load()
            out: dict[str, Any] = {"format": fmt or None, "width": w, "height": h}
            if with_phash:
                from reelforge.curation.phash import phash_image

                out["phash"] = [phash_image(img)]
    except ProbeError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise ProbeError("corrupt_image", f"{type(e).__name__}: {e}") from e
    return out


def probe_video_file(path: str | int, timeout_s: float) -> dict[str, Any]:
    """format, width, height, duration, fps, frames, codec of a video (one ffprobe call,
    killed at the deadline); raises ProbeError with the ledger reason."""
    from reelforge.curation.video import probe_video

    info = probe_video(path, timeout_s)
    return {k: info.get(k) for k in _VIDEO_FIELDS}


_VIDEO_FIELDS = ("format", "width", "height", "duration", "fps", "frames", "codec")



@register_step("probe")
class Probe(RowStep):
    """Fills sha256, length, format and size (and duration, fps, frames, codec for videos).

    `frame_plan` (default true; a dict overrides numbers of the keye-vl-1.5 preset, as the tokens
    step's `visual:`): each video's Keye-VL-1.5 frame plan (`curation.frame_plan`: sampled
    indices, timestamps, slow/fast frame types, the two sizes, tokens) is computed here, in the
    executor, and stored on the medium. Probe is the step that has the video open (the checked
    fd, or the temp copy of a tar member) and already decodes its 2-fps frames; the tokens step
    reads the stored types and counts true 1.5 tokens without decoding again."""

    batch_rows = 64

    def __init__(self, max_pixels: int = 178_956_970, max_bytes: int = 2 << 30,
                 timeout_s: float = 30.0, phash: bool = True, video_codecs: list[str] | None = None,
                 max_video_pixels: int = 4096 * 4096, frame_plan: bool | dict = True, **kw: Any):
        super().__init__(**kw)
        from reelforge.curation.tokens import VisualTokenConfig

        if frame_plan is True or isinstance(frame_plan, dict):
            visual = dict(frame_plan) if isinstance(frame_plan, dict) else {}
            if visual.setdefault("processor", "keye-vl-1.5") != "keye-vl-1.5":
                raise ValueError("probe's frame_plan is the keye-vl-1.5 plan; processor must be keye-vl-1.5")
            self.plan_cfg: VisualTokenConfig | None = VisualTokenConfig.from_dict(visual)
        elif frame_plan is False or frame_plan is None:
            self.plan_cfg = None
        else:
            raise ValueError(f"frame_plan must be true, false or a dict of visual numbers, got {frame_plan!r}")
        self.phash = bool(phash)
        self.video_codecs = [c.lower() for c in video_codecs] if video_codecs else None
        self.max_video_pixels = int(max_video_pixels)
        self.max_pixels = int(max_pixels)
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)

    def process_row(self, row: dict) -> dict:
        for i, m in enumerate(row.get("media") or []):
            try:
                # one checked open (containment.open_regular): the bytes hashed and the file
                # ffprobe reads are the same file, at the canonical path ingest stored
                fd = open_media(m)
            except MediaReadError as e:
                return drop(row, self.name, e.reason, f"media {i}: {e.detail}")
            try:
                if m["kind"] == "image":
                    data = read_media_fd(fd, m, self.max_bytes)
                    if not data:
                        raise ProbeError("empty_file", f"{m.get('member') or m['uri']} has 0 bytes")
                    m["length"] = len(data)
                    m["sha256"] = hashlib.sha256(data).hexdigest()
                    m.update(probe_image(data, self.max_pixels, self.phash))
                else:
                    m.update(self._probe_video(m, fd))
            except (MediaReadError, ProbeError) as e:
                return drop(row, self.name, e.reason, f"media {i}: {e.detail}")
            finally:
                os.close(fd)
        return row

    def _probe_video(self, m: dict, fd: int) -> dict:
        """Hash the video in pieces (it is never held in memory whole), then probe it: the
        checked fd itself for a plain file, a temp copy for a tar member (ffprobe needs to seek)."""
        if m.get("offset") is None:
            length, digest = stream_media_fd(fd, m, self.max_bytes)
            if not length:
                raise ProbeError("empty_file", f"{m['uri']} has 0 bytes")
            info = self._probe_video_path(video_source(fd, media_path(m["uri"])))
            return {"length": length, "sha256": digest, **info}
        suffix = os.path.splitext(m.get("member") or "")[1].lower()
        suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ".mp4"
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            length, digest = stream_media_fd(fd, m, self.max_bytes, out=tmp)
            if not length:
                raise ProbeError("empty_file", f"{m.get('member') or m['uri']} has 0 bytes")
            info = self._probe_video_path(tmp.name)
        return {"length": length, "sha256": digest, **info}

    def _probe_video_path(self, path: str | int) -> dict:
        from reelforge.curation.video import probe_video

        full = probe_video(path, self.timeout_s)
        info = {k: full.get(k) for k in _VIDEO_FIELDS}
        if self.video_codecs is not None and (info.get("codec") or "").lower() not in self.video_codecs:
            raise ProbeError("unsupported_codec", f"codec {info.get('codec')} is not one of {self.video_codecs}")
        if info["width"] * info["height"] > self.max_video_pixels:
            raise ProbeError("too_many_pixels", f"{info['width']}x{info['height']} frames are above "
                                                f"max_video_pixels {self.max_video_pixels}")
        if self.phash and info.get("frames"):
            # the frames the model will see (2 fps, as token accounting samples them), hashed;
            # decoding them also catches files whose header is fine but whose frames are not
            from reelforge.curation.tokens import TokenError, video_nframes
            from reelforge.curation.video import frame_phashes, sample_indices

            try:
                n = video_nframes(info["duration"], info.get("fps"), total_frames=info["frames"])
            except TokenError:
                n = 0
            if n:
                info["phash"] = frame_phashes(path, sample_indices(info["frames"], n), timeout_s=self.timeout_s * 4)
        if self.plan_cfg is not None and info.get("frames") and info.get("fps"):
            from reelforge.curation.frame_plan import frame_plan, media_fields
            from reelforge.curation.tokens import TokenError

            try:
                info.update(media_fields(frame_plan(path, self.plan_cfg, info=full, timeout_s=self.timeout_s * 4)))
            except TokenError:
                pass  # a size or length the processor refuses: the tokens step drops it with the reason
        return info

