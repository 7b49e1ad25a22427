"""Probe: read each media once, hash it, and learn its size (images) or stream facts (videos).

Images are opened with Pillow; the pixel count is checked from the header *before*
decoding, so a decompression bomb costs a ledger line, not the executor. Videos are
probed with ffprobe (through ffmpeg-python) under a timeout.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tempfile
import warnings
from fractions import Fraction
from typing import Any

from curation.media_io import IMAGE_EXTS, MediaReadError, read_media_bytes
from curation.schema import drop
from curation.step import RowStep
from curation.tools import ffprobe_path


class ProbeError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
                # decode at reduced scale: still reads every scan, so truncation shows
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
            out: dict[str, Any] = {"format": fmt or None, "width": w, "height": h}
            if with_phash:
                from curation.phash import phash_image

                out["phash"] = [phash_image(img)]
    except ProbeError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise ProbeError("corrupt_image", f"{type(e).__name__}: {e}") from e
    return out


def _rate(s: str | None) -> float | None:
    if not s or s in ("0/0", "N/A"):
        return None
    try:
        v = float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        return None
    return v if v > 0 else None


def probe_video_file(path: str, timeout_s: float) -> dict[str, Any]:
    import ffmpeg

    try:
        info = ffmpeg.probe(path, cmd=ffprobe_path(), timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise ProbeError("probe_timeout", f"ffprobe took longer than {timeout_s}s") from e
    except ffmpeg.Error as e:
        msg = (e.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        raise ProbeError("corrupt_video", msg[-1] if msg else "ffprobe failed") from e
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "video"
               and not (s.get("disposition") or {}).get("attached_pic")]
    if not streams:
        raise ProbeError("not_a_video", "no video stream")
    s = streams[0]
    fmt = info.get("format", {})
    duration = None
    for d in (s.get("duration"), fmt.get("duration")):
        try:
            if d is not None and float(d) > 0:
                duration = float(d)
                break
        except ValueError:
            pass
    if not duration:
        raise ProbeError("zero_duration", "video has no positive duration")
    fps = _rate(s.get("avg_frame_rate")) or _rate(s.get("r_frame_rate"))
    frames = int(s["nb_frames"]) if str(s.get("nb_frames", "")).isdigit() else (
        int(round(duration * fps)) if fps else None)
    width, height = int(s.get("width") or 0), int(s.get("height") or 0)
    if width <= 0 or height <= 0:
        raise ProbeError("corrupt_video", f"video stream has size {width}x{height}")
    container = (fmt.get("format_name") or "").split(",")[0] or None
    if container == "mov":
        container = "mp4"
    return {"format": container, "width": width, "height": height, "duration": duration,
            "fps": fps, "frames": frames, "codec": s.get("codec_name")}


class Probe(RowStep):
    """Fills sha256, length, format and size (and duration, fps, frames, codec for videos)."""

    name = "probe"
    batch_rows = 64

    def __init__(self, max_pixels: int = 178_956_970, max_bytes: int = 2 << 30,
                 timeout_s: float = 30.0, phash: bool = True, video_codecs: list[str] | None = None,
                 max_video_pixels: int = 4096 * 4096, **kw: Any):
        super().__init__(**kw)
        self.phash = bool(phash)
        self.video_codecs = [c.lower() for c in video_codecs] if video_codecs else None
        self.max_video_pixels = int(max_video_pixels)
        self.max_pixels = int(max_pixels)
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)

    def process(self, row: dict) -> dict:
        for i, m in enumerate(row.get("media") or []):
            try:
                data = read_media_bytes(m, self.max_bytes)
            except MediaReadError as e:
                return drop(row, self.name, e.reason, f"media {i}: {e.detail}")
            if not data:
                return drop(row, self.name, "empty_file", f"media {i}: {m.get('member') or m['uri']} has 0 bytes")
            m["length"] = len(data)
            m["sha256"] = hashlib.sha256(data).hexdigest()
            try:
                if m["kind"] == "image":
                    m.update(probe_image(data, self.max_pixels, self.phash))
                else:
                    m.update(self._probe_video(m, data))
            except ProbeError as e:
                return drop(row, self.name, e.reason, f"media {i}: {e.detail}")
        return row

    def _probe_video(self, m: dict, data: bytes) -> dict:
        if m.get("offset") is None:
            return self._probe_video_path(m["uri"])
        suffix = os.path.splitext(m.get("member") or "")[1] or ".mp4"
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:  # ffprobe needs to seek
            tmp.write(data)
            tmp.flush()
            return self._probe_video_path(tmp.name)

    def _probe_video_path(self, path: str) -> dict:
        from curation.video import probe_video  # kills ffprobe at the deadline

        info = probe_video(path, self.timeout_s)
        for k in ("rotation", "display_width", "display_height", "has_audio", "audio_codec"):
            info.pop(k, None)
        if self.video_codecs is not None and (info.get("codec") or "").lower() not in self.video_codecs:
            raise ProbeError("unsupported_codec", f"codec {info.get('codec')} is not one of {self.video_codecs}")
        if info["width"] * info["height"] > self.max_video_pixels:
            raise ProbeError("too_many_pixels", f"{info['width']}x{info['height']} frames are above "
                                                f"max_video_pixels {self.max_video_pixels}")
        if self.phash and info.get("frames"):
            # the frames the model will see (2 fps, as token accounting samples them), hashed;
            # decoding them also catches files whose header is fine but whose frames are not
            from curation.tokens import TokenError, video_nframes
            from curation.video import frame_phashes, sample_indices

            try:
                n = video_nframes(info["duration"], info.get("fps"), total_frames=info["frames"])
            except TokenError:
                n = 0
            if n:
                info["phash"] = frame_phashes(path, sample_indices(info["frames"], n), timeout_s=self.timeout_s * 4)
        return info


IMAGE_FORMATS = set(IMAGE_EXTS.values())
