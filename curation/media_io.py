"""Reading media bytes from where a reference points: a plain file or a byte range of a tar."""

from __future__ import annotations

import os

IMAGE_EXTS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp", "bmp": "bmp",
              "gif": "gif", "tif": "tiff", "tiff": "tiff"}
VIDEO_EXTS = {"mp4", "webm", "mkv", "avi", "mov", "m4v"}


class MediaReadError(Exception):
    """A reference that cannot be read; `reason` is the ledger code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def media_kind_of(name: str) -> str | None:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def read_media_bytes(media: dict, max_bytes: int | None = None) -> bytes:
    """Read the bytes a media reference points to, or raise MediaReadError."""
    uri = media["uri"]
    if "://" in uri and not uri.startswith("file://"):
        raise MediaReadError("unsupported_uri", f"only local or shared-filesystem paths are read: {uri}")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if not os.path.exists(path):
        raise MediaReadError("missing_file", f"no such file: {path}")
    try:
        if media.get("offset") is not None:
            length = int(media.get("length") or 0)
            if max_bytes is not None and length > max_bytes:
                raise MediaReadError("too_large", f"{length} bytes > {max_bytes}")
            with open(path, "rb") as f:
                f.seek(int(media["offset"]))
                data = f.read(length)
            if len(data) != length:
                raise MediaReadError("truncated_source", f"{path}: member {media.get('member')} cut short")
            return data
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            raise MediaReadError("too_large", f"{size} bytes > {max_bytes}")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise MediaReadError("unreadable_file", f"{path}: {e}") from e


def decode_visual(media: dict, video_frames: int = 8) -> list:
    """The pixels a model looks at: an image as one RGB PIL image, a video as up to
    `video_frames` frames sampled evenly over its length (probe must have counted them)."""
    import io

    from PIL import Image

    if media["kind"] == "image":
        return [Image.open(io.BytesIO(read_media_bytes(media))).convert("RGB")]
    import tempfile

    from curation.video import decode_frames, sample_indices

    total = int(media.get("frames") or 0)
    n = max(1, min(video_frames, total))
    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        path = media["uri"]
        if media.get("offset") is not None:
            tmp.write(read_media_bytes(media))
            tmp.flush()
            path = tmp.name
        frames = decode_frames(path, sample_indices(total, n), past_end="clamp")
    return [Image.fromarray(f) for f in frames]
