"""Reading media bytes from where a reference points: a plain file or a byte range of a tar."""

from __future__ import annotations

import os
from typing import Any

from reelforge.curation.errors import MediaReadError  # raised here; importable from here as before

IMAGE_EXTS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp", "bmp": "bmp",
              "gif": "gif", "tif": "tiff", "tiff": "tiff"}
VIDEO_EXTS = {"mp4", "webm", "mkv", "avi", "mov", "m4v"}


def media_kind_of(name: str) -> str | None:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


# the most bytes one media read may return (and so allocate); overridable per call with
# `max_bytes`, per process with REELFORGE_MAX_MEDIA_BYTES or by setting this attribute
MAX_MEDIA_BYTES = int(os.environ.get("REELFORGE_MAX_MEDIA_BYTES", 2 << 30))
_MAX_READ = 1 << 30  # bytes per os.pread call
_PIECE = 1 << 22  # bytes per piece when streaming


def media_path(uri: str) -> str:
    """The absolute local path a stored `uri` names (a path, or a file:// URI); other URI
    schemes raise unsupported_uri. Not resolved: the path is opened as it is written
    (`containment.open_regular`), so it must be the canonical path ingest stored."""
    from reelforge.curation.containment import ContainmentError, file_uri_path

    uri = os.fspath(uri)
    if uri[:5].lower() == "file:":
        return file_uri_path(uri)
    if "://" in uri:
        raise ContainmentError("unsupported_uri", f"only local or shared-filesystem paths are read, not {uri[:200]}.")
    return os.path.abspath(uri)


def open_media(media: dict) -> int:
    """A checked fd (`containment.open_regular`) on the file a media reference names."""
    from reelforge.curation.containment import open_regular

    return open_regular(media_path(media["uri"]))


def _read_exactly(fd: int, offset: int, n: int) -> bytes:
    """Up to n bytes from offset, in bounded os.pread calls (never more than n in all; one call,
    so one allocation, for a regular file up to _MAX_READ)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = os.pread(fd, min(n - got, _MAX_READ), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_media_bytes(media: dict, max_bytes: int | None = None) -> bytes:
    """Read the bytes a media reference points to, or raise MediaReadError.

    The file (the media file, or the tar a byte range lies in) is opened with
    `containment.open_regular`: a regular file at its canonical path, never a device, FIFO or
    a symlink swapped in since ingest. The read is bounded before anything is allocated: at
    most the file's size (fstat) or the member's `length`, and at most `max_bytes` (default
    `MAX_MEDIA_BYTES`), else too_large; a byte range past the end of its tar is truncated_source.
    """
    fd = open_media(media)
    try:
        return read_media_fd(fd, media, max_bytes)
    finally:
        os.close(fd)


def _media_range(fd: int, media: dict, max_bytes: int | None) -> tuple[int, int]:
    """(offset, length) of the bytes a reference names in the file open as fd, checked
    against the file's size and the byte limit before anything is read."""
    limit = MAX_MEDIA_BYTES if max_bytes is None else int(max_bytes)
    path = media.get("uri")
    size = os.fstat(fd).st_size
    if media.get("offset") is None:
        if size > limit:
            raise MediaReadError("too_large", f"{size} bytes > {limit}")
        return 0, size
    offset, length = int(media["offset"]), int(media.get("length") or 0)
    if offset < 0 or length < 0:
        raise MediaReadError("truncated_source", f"{path}: member {media.get('member')} has a bad byte range")
    if length > limit:
        raise MediaReadError("too_large", f"{length} bytes > {limit}")
    if offset + length > size:
        raise MediaReadError("truncated_source", f"{path}: member {media.get('member')} cut short "
                                                 f"({offset}+{length} > {size} bytes)")
    return offset, length


def read_media_fd(fd: int, media: dict, max_bytes: int | None = None) -> bytes:
    """`read_media_bytes` from an fd the caller opened with `open_media` (and keeps, e.g. to
    hand the same file to ffprobe afterwards)."""
    path = media.get("uri")
    try:
        offset, length = _media_range(fd, media, max_bytes)
        data = _read_exactly(fd, offset, length)  # a file that grew since fstat gives its first bytes
    except OSError as e:
        raise MediaReadError("unreadable_file", f"{path}: {e}") from e
    if len(data) != length:
        raise MediaReadError("truncated_source", f"{path}: {media.get('member') or 'the file'} cut short while read")
    return data


def stream_media_fd(fd: int, media: dict, max_bytes: int | None = None, out: Any = None) -> tuple[int, str]:
    """(length, sha256 hex) of the bytes a reference names, read in 4 MiB pieces (memory stays
    flat whatever the size), each also written to the binary file `out` when given: how videos
    are hashed and copied out of tars. Same checks and reasons as `read_media_bytes`."""
    import hashlib

    path = media.get("uri")
    h = hashlib.sha256()
    got = 0
    try:
        offset, length = _media_range(fd, media, max_bytes)
        while got < length:
            chunk = os.pread(fd, min(length - got, _PIECE), offset + got)
            if not chunk:
                break
            h.update(chunk)
            if out is not None:
                out.write(chunk)
            got += len(chunk)
    except OSError as e:
        raise MediaReadError("unreadable_file", f"{path}: {e}") from e
    if got != length:
        raise MediaReadError("truncated_source", f"{path}: {media.get('member') or 'the file'} cut short while read")
    if out is not None:
        out.flush()
    return length, h.hexdigest()


def decode_visual(media: dict, video_frames: int = 8) -> list:
    """The pixels a model looks at: an image as one RGB PIL image, a video as up to
    `video_frames` frames sampled evenly over its length (probe must have counted them)."""
    import io

    from PIL import Image

    if media["kind"] == "image":
        return [Image.open(io.BytesIO(read_media_bytes(media))).convert("RGB")]
    import tempfile

    from reelforge.curation.video import decode_frames, sample_indices

    total = int(media.get("frames") or 0)
    n = max(1, min(video_frames, total))
    if media.get("offset") is None:  # a plain file: ffmpeg reads the checked fd, never the name again
        fd = open_media(media)
        try:
            frames = decode_frames(video_source(fd, media_path(media["uri"])), sample_indices(total, n),
                                   past_end="clamp")
        finally:
            os.close(fd)
    else:
        with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
            fd = open_media(media)
            try:
                stream_media_fd(fd, media, out=tmp)
            finally:
                os.close(fd)
            frames = decode_frames(tmp.name, sample_indices(total, n), past_end="clamp")
    return [Image.fromarray(f) for f in frames]


def video_source(fd: int, path: str) -> int | str:
    """What to hand the ffmpeg helpers in curation.video for a file checked and opened as `fd`:
    the fd itself where ffmpeg can reopen it through /proc/self/fd (no second lookup of the
    name, so no window for a swap), else its canonical `path`."""
    from reelforge.curation.containment import HAVE_PROC_FD

    return fd if HAVE_PROC_FD else path
