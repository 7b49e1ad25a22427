"""Video primitives on the ffmpeg CLI: probe, exact frame sampling, shot detection, cutting, transcoding.

Everything here runs ffprobe/ffmpeg as a subprocess under a deadline (the `timeout_s` of each
call covers the whole call, probe included) and turns every failure on bad media into a
`ProbeError(reason, detail)`, the same exception the probe step uses, so a broken file costs
a ledger line and never an executor. Reasons:

    missing_file     the path does not exist or is not a regular file (a folder, device, FIFO, socket)
    unsupported_container  a demuxer outside DEMUXERS: an HLS playlist, an ffconcat list, ...
    empty_file       0 bytes
    corrupt_video    ffprobe cannot read it (truncated without its index, not media at all, ...)
    not_a_video      readable media without a video stream (audio only, no streams)
    zero_duration    a video stream but no positive duration
    probe_timeout    ffprobe ran past the deadline (probe_video)
    decode_timeout   decoding ran past the deadline (decode_frames, frame_phashes, detect_shots)
    decode_error     ffmpeg failed while decoding, or the stream ended early with decoder errors
    frame_out_of_range  a requested frame index is past the end of a cleanly ending stream
    transcode_timeout / transcode_error   the same for cut_clip and transcode

`decode_frames` (and `frame_phashes`) run no ffprobe unless ffmpeg fails; `scene_scores`,
`detect_shots`, `cut_clip` and `transcode` probe first, or take `info=`, a `probe_video`
result for the same path. ffmpeg comes from `tools.ffmpeg_path()` (REELFORGE_FFMPEG), ffprobe
from `tools.ffprobe_path()`.

Inputs: every function takes a path, or an fd open on a regular file (`containment.open_regular`).
The file is checked (lstat, then opened O_NONBLOCK|O_NOFOLLOW and fstat'ed: a FIFO or a device
never reaches ffmpeg, and nothing blocks) and held open; ffprobe/ffmpeg get it as
`file:/proc/self/fd/N` (the fd is passed to the child), so they read exactly the checked file.
Every input gets `-protocol_whitelist file` and `-format_whitelist DEMUXERS`: a playlist or
concat list named .mp4 cannot make ffmpeg open any other file. Each child leads its own
process group, killed whole at the deadline.

Frame indices are presentation-order indices of the decoded frames, counted from 0, the way
a decoder hands them out (PyAV's `container.decode(stream)` enumerates the same frames).

Rotation: `probe_video` reports `rotation` as the clockwise angle (0, 90, 180, 270) a player
turns the stored frames by, from the stream's display matrix (or its legacy `rotate` tag),
and `display_width`/`display_height` as the size after that turn. ffmpeg applies the same
turn by default ("autorotate"), and so do we: `decode_frames` returns upright frames
(`autorotate=False` gives the stored frames), `size` is the size of the upright frame, and
`transcode`/`cut_clip` write upright pixels with no rotation left in the output's metadata.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import stat
import subprocess
import tempfile
import threading
import time
from fractions import Fraction
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from reelforge.curation.errors import ProbeError
from reelforge.curation.tools import ffmpeg_path, ffprobe_path

__all__ = ["probe_video", "sample_indices", "frame_timestamps", "decode_frames", "frame_phashes",
           "scene_scores", "detect_shots", "split_shots", "cut_clip", "transcode"]

_MAX_VF_CHARS = 60_000  # longer select expressions go through a filter script, not argv


# ----------------------------------------------------------------------------- helpers

class _Deadline:
    def __init__(self, timeout_s: float):
        self.timeout_s = float(timeout_s)
        self.end = time.monotonic() + self.timeout_s

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


# the demuxers ffprobe/ffmpeg may use on an input (ffmpeg's -format_whitelist): containers that
# hold their media themselves. Playlists and lists of other files (hls, concat/ffconcat, dash,
# image2 globs, tee, data, subfile, lavfi, ...) are refused as unsupported_container, so a file
# in the corpus can never make ffmpeg open another one. REELFORGE_VIDEO_DEMUXERS overrides it.
DEMUXERS = os.environ.get("REELFORGE_VIDEO_DEMUXERS", "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts")
PROTOCOLS = "file"  # ffmpeg's -protocol_whitelist on every input: local files only


def _in_opts() -> dict[str, str]:
    """Input options every ffprobe/ffmpeg input gets (before its -i)."""
    return {"protocol_whitelist": PROTOCOLS, "format_whitelist": DEMUXERS}


def _in_args() -> list[str]:
    return [a for k, v in _in_opts().items() for a in (f"-{k}", v)]


def _url(path: str) -> str:
    """A local path as an ffmpeg URL: `file:` so names with ':' or a leading '-' stay names."""
    return "file:" + os.path.abspath(os.fspath(path))


class _Src:
    """An input checked and held open for ffmpeg: a regular file, non-empty, reopened by the
    child through /proc/self/fd/N (the fd is passed to it), so the name is looked up once."""

    def __init__(self, path: str | int):
        from reelforge.curation.containment import HAVE_PROC_FD, ContainmentError, open_regular

        self.own = not isinstance(path, int)
        if self.own:
            self.name = os.fspath(path)
            canon = os.path.realpath(os.path.abspath(self.name))
            try:
                self.fd = open_regular(canon)
            except ContainmentError as e:
                # video.py's contract: anything that is not a regular file is missing_file
                raise ProbeError("outside_root" if e.reason == "outside_root" else "missing_file",
                                 f"{self.name}: {e.detail}") from None
        else:
            self.fd = int(path)
            canon = _fd_name(self.fd)
            self.name = canon
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProbeError("missing_file", f"{self.name} is not a regular file")
            if st.st_size == 0:
                raise ProbeError("empty_file", f"{self.name} has 0 bytes")
            if HAVE_PROC_FD:
                self.url, self.fds = f"file:/proc/self/fd/{self.fd}", (self.fd,)
            elif self.own:
                self.url, self.fds = _url(canon), ()
            else:
                raise ValueError("a file descriptor as input needs /proc/self/fd; pass the path")
        except BaseException:
            self.close()
            raise

    def tidy(self, text: str) -> str:
        """ffmpeg's message with the file's name in place of its /proc/self/fd URL."""
        return text.replace(self.url, self.name).replace(self.url[5:], self.name)

    def close(self) -> None:
        if self.own and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "_Src":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _last_line(stderr: bytes | str | None, default: str) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else default


_NOT_ON_WHITELIST = re.compile(r"\[([\w,-]+) @ [^\]]*\] (Format|Protocol) '?([^']*?)'? ?not on whitelist")


def _refused(stderr: bytes | str | None, src: _Src | None) -> ProbeError | None:
    """unsupported_container when ffmpeg refused the input's format (a playlist, a concat list,
    ...) or a protocol it tried to open; None otherwise."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    if not stderr or "not on whitelist" not in stderr:
        return None
    m = _NOT_ON_WHITELIST.search(stderr)
    name = src.name if src is not None else "the input"
    if m and m.group(2) == "Format":
        return ProbeError("unsupported_container", f"{name} is a {m.group(1)} file, not one of the containers "
                                                   f"read ({DEMUXERS}); it is never followed to other files")
    return ProbeError("unsupported_container",
                      f"{name}: {_last_line(src.tidy(stderr) if src else stderr, 'refused by the whitelists')}")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads one: start_new_session), then the child."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.kill()


def _spawn(cmd: list[str], src: _Src | None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=src.fds if src is not None else (), start_new_session=True)


def _run(cmd: list[str], timeout_s: float, timeout_reason: str, error_reason: str,
         what: str, src: _Src | None = None) -> subprocess.CompletedProcess:
    """Run under a timeout (the child's whole process group is killed on expiry); failures are ProbeErrors."""
    if timeout_s <= 0:
        raise ProbeError(timeout_reason, f"{what}: no time left of the deadline")
    proc = _spawn(cmd, src)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        _kill_group(proc)
        proc.communicate()
        raise ProbeError(timeout_reason, f"{what} took longer than {timeout_s:.3g}s") from e
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    if proc.returncode != 0:
        refused = _refused(err, src)
        if refused is not None:
            raise refused
        text = src.tidy(err.decode("utf-8", "replace")) if src is not None else err
        raise ProbeError(error_reason, f"{what}: {_last_line(text, f'exit status {proc.returncode}')}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@lru_cache(maxsize=None)
def _ffmpeg_version(binary: str) -> tuple[int, int]:
    try:
        out = subprocess.run([binary, "-version"], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=20).stdout
        v = out.split()[2]  # "ffmpeg version 5.1.9-0+deb12u1 ..." / "ffmpeg version n6.1 ..."
        parts = v.lstrip("nN").split("-")[0].split(".")
        return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    except Exception:  # noqa: BLE001 - git builds ("N-112-g...") and the unknown are taken as new
        return 99, 0


def _ffmpeg_cmd() -> list[str]:
    return [ffmpeg_path(), "-nostdin", "-hide_banner", "-loglevel", "error"]


def _passthrough() -> dict[str, str]:
    """Output option that emits each filtered frame once, untouched (no dup/drop to a frame rate)."""
    return {"fps_mode": "passthrough"} if _ffmpeg_version(ffmpeg_path()) >= (5, 1) else {"vsync": "0"}


def _rate(s: str | None) -> float | None:
    if not s or s in ("0/0", "N/A"):
        return None
    try:
        v = float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        return None
    return v if v > 0 else None


def _rotation(stream: dict) -> int:
    """Clockwise degrees (0/90/180/270, or the rounded angle) a player turns the frames by."""
    theta = None
    for sd in stream.get("side_data_list") or []:
        if "rotation" in sd:
            try:  # the display matrix angle is counter-clockwise; ffmpeg's autorotate negates it
                theta = -float(sd["rotation"])
            except (TypeError, ValueError):
                pass
            break
    if theta is None:
        try:
            theta = float((stream.get("tags") or {}).get("rotate", 0))  # legacy tag: clockwise already
        except (TypeError, ValueError):
            theta = 0.0
    return int(round(theta)) % 360


def _display_size(info: dict, autorotate: bool = True) -> tuple[int, int]:
    """(width, height) of the frames ffmpeg hands out."""
    w, h = info["width"], info["height"]
    if autorotate and info.get("rotation") in (90, 270):
        return h, w
    return w, h


def _probe_for(src: _Src, info: dict | None, deadline: _Deadline, timeout_reason: str) -> dict:
    if info is not None:
        return info
    try:
        return _probe(src, deadline.left())
    except ProbeError as e:
        if e.reason == "probe_timeout":  # the caller's deadline, spent in the probe
            raise ProbeError(timeout_reason, f"ran past {deadline.timeout_s:.3g}s while probing") from e
        raise


# ----------------------------------------------------------------------------- probe

def probe_video(path: str | int, timeout_s: float = 30.0) -> dict[str, Any]:
    """One ffprobe call: what `probe.probe_video_file` returns, plus rotation and audio facts.

    Keys: format, width, height (stored frame size), duration (s), fps, frames, codec,
    rotation (clockwise degrees a player applies), display_width, display_height (after the
    rotation), has_audio, audio_codec.

    `path` (as everywhere in this module) is a path, or an fd open on a regular file (from
    `containment.open_regular`; ffmpeg then reads that very file, the name is not looked up again).
    """
    with _Src(path) as src:
        return _probe(src, timeout_s)


def _probe(src: _Src, timeout_s: float) -> dict[str, Any]:
    cmd = [ffprobe_path(), "-v", "error", *_in_args(), "-print_format", "json", "-show_format", "-show_streams",
           src.url]
    res = _run(cmd, timeout_s, "probe_timeout", "corrupt_video", "ffprobe", src)
    try:
        info = json.loads(res.stdout.decode("utf-8", "replace") or "{}")
    except ValueError as e:
        raise ProbeError("corrupt_video", "ffprobe printed no JSON") from e
    all_streams = info.get("streams") or []
    streams = [s for s in all_streams if s.get("codec_type") == "video"
               and not (s.get("disposition") or {}).get("attached_pic")]
    if not streams:
        raise ProbeError("not_a_video", "no video stream")
    s = streams[0]
    fmt = info.get("format") or {}
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
    audio = [a for a in all_streams if a.get("codec_type") == "audio"]
    out = {"format": container, "width": width, "height": height, "duration": duration,
           "fps": fps, "frames": frames, "codec": s.get("codec_name"), "rotation": _rotation(s),
           "has_audio": bool(audio), "audio_codec": audio[0].get("codec_name") if audio else None}
    out["display_width"], out["display_height"] = _display_size(out)
    return out


# ----------------------------------------------------------------------------- frame sampling

def sample_indices(total_frames: int, n: int) -> list[int]:
    """n frame indices spread evenly from the first to the last frame: `linspace(0, total-1, n).round()`
    in float32, as the released Keye-VL processors compute it with torch (a float64 linspace rounds
    differently on about half of the (total, n) pairs). Equal to `frame_plan.plan_indices`."""
    total_frames, n = int(total_frames), int(n)
    if total_frames <= 0 or n <= 0:
        return []
    if n == 1:
        return [0]
    # torch's CPU linspace in float32: a float32 step, start + step*i for the first half and
    # end - step*(n-1-i) after it, each a fused multiply-add (one rounding to float32: the product
    # is exact in float64); then round half to even, as torch.round
    end = np.float32(total_frames - 1)
    step = np.float64(np.float32(end / np.float32(n - 1)))
    i = np.arange(n)
    vals = np.where(i < n // 2, i * step, np.float64(end) - (n - 1 - i) * step).astype(np.float32)
    return np.rint(vals).astype(np.int64).tolist()


def frame_timestamps(indices: Sequence[int], fps: float) -> list[float]:
    """Presentation time (s, from the first frame) of each index at a constant frame rate."""
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    return [int(i) / float(fps) for i in indices]


def _select_expr(sorted_unique: list[int]) -> str:
    """`select` filter matching exactly these frame numbers (runs collapse to between())."""
    terms, i = [], 0
    while i < len(sorted_unique):
        j = i
        while j + 1 < len(sorted_unique) and sorted_unique[j + 1] == sorted_unique[j] + 1:
            j += 1
        a, b = sorted_unique[i], sorted_unique[j]
        terms.append(f"eq(n\\,{a})" if a == b else f"between(n\\,{a}\\,{b})")
        i = j + 1
    return "select=" + "+".join(terms)


def decode_frames(path: str | int, indices: Sequence[int], size: tuple[int, int] | None = None,
                  timeout_s: float = 120.0, *, past_end: str = "error", autorotate: bool = True,
                  threads: int | None = None) -> np.ndarray:
    """Decode exactly the frames with these indices as an N x H x W x 3 uint8 RGB array.

    One ffmpeg process decodes the stream up to the last wanted frame (`-frames:v`), keeps
    the wanted ones with a `select` filter on the frame number, converts (and, with
    `size=(height, width)`, bicubic-resizes) only those to rgb24, and streams them through a
    pipe straight into the returned array; nothing is written to disk. Each frame comes as a
    binary PPM (a ~15-byte "P6 width height 255" header, then the rgb24 bytes), so the frame
    size needs no ffprobe call first: ffprobe runs only when ffmpeg fails, to name the reason.
    Rows come in the order of `indices` (repeats allowed). Frames are upright (ffmpeg's
    autorotate, as players show them); `autorotate=False` gives them as stored. `threads` is
    ffmpeg's decoder `-threads` (default: ffmpeg's choice, all cores).

    If the stream ends cleanly before an index (container frame counts can overstate what
    decodes: an MP4 edit list that trims the start still counts the trimmed frames), then
    `past_end="error"` raises `frame_out_of_range` and `past_end="clamp"` returns the last
    frame for every index past it (one more decode). A stream that ends early with decoder
    errors (truncated, corrupt) is `decode_error` either way.
    """
    if past_end not in ("error", "clamp"):
        raise ValueError(f"past_end must be 'error' or 'clamp', not {past_end!r}")
    deadline = _Deadline(timeout_s)
    idx = [int(i) for i in indices]
    if any(i < 0 for i in idx):
        raise ValueError("frame indices must be >= 0")
    if size is not None and (len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0):
        raise ValueError(f"size must be (height, width) > 0, got {size!r}")
    with _Src(path) as src:
        return _decode_frames(src, idx, size, deadline, past_end, autorotate, threads)


def _decode_frames(src: _Src, idx: list[int], size: tuple[int, int] | None, deadline: _Deadline, past_end: str,
                   autorotate: bool, threads: int | None) -> np.ndarray:
    if not idx:
        info = _probe_for(src, None, deadline, "decode_timeout")
        w, h = _display_size(info, autorotate)
        return np.empty((0, int(size[0]), int(size[1]), 3) if size else (0, h, w, 3), np.uint8)
    uniq = sorted(set(idx))
    try:
        frames = _decode_selected(src, uniq, size, deadline, autorotate, threads)
    except _EndedEarly as e:
        if e.errors or e.decoded == 0:
            _probe_for(src, None, deadline, "decode_timeout")  # a precise reason for a bad file, if any
            raise ProbeError("decode_error", f"the stream ended after {e.decoded} frames, before frame "
                                             f"{uniq[e.got]}: {e.errors or 'no frame decoded'}") from None
        if past_end == "error":
            raise ProbeError("frame_out_of_range", f"frame {uniq[e.got]} requested, the video has "
                                                   f"{e.decoded} frames") from None
        return _decode_frames(src, [min(i, e.decoded - 1) for i in idx], size, deadline, "error", autorotate,
                              threads)
    except ProbeError as e:
        if e.reason == "decode_error":
            _probe_for(src, None, deadline, "decode_timeout")
        raise
    if idx == uniq:
        return frames
    pos = {v: k for k, v in enumerate(uniq)}
    return frames[[pos[i] for i in idx]]


class _EndedEarly(Exception):
    def __init__(self, got: int, decoded: int, errors: str):
        super().__init__(f"{got} frames, {decoded} decoded")
        self.got, self.decoded, self.errors = got, decoded, errors


def _decode_selected(src: _Src, uniq: list[int], size: tuple[int, int] | None, deadline: _Deadline,
                     autorotate: bool, threads: int | None) -> np.ndarray:
    # the two metadata filters print one line per decoded frame to stderr, so when the stream
    # ends early we know how many frames it had; select keeps the wanted ones
    vf = "metadata=add:key=rf:value=1,metadata=print:key=rf:file=pipe\\\\:2," + _select_expr(uniq)
    if size is not None:
        vf += f",scale={int(size[1])}:{int(size[0])}:flags=bicubic"
    in_kw: dict[str, Any] = {}
    if threads:
        in_kw["threads"] = int(threads)
    if not autorotate:
        in_kw["noautorotate"] = None
    out_kw: dict[str, Any] = {"map": "0:v:0", "format": "image2pipe", "c:v": "ppm", "pix_fmt": "rgb24",
                              "frames:v": len(uniq), **_passthrough()}
    import ffmpeg

    script = None
    try:
        if len(vf) > _MAX_VF_CHARS:  # argv strings are limited to 128 KiB on Linux
            fd, script = tempfile.mkstemp(suffix=".ffscript")
            with os.fdopen(fd, "w") as f:
                f.write(vf)
            out_kw["filter_script:v"] = script
        else:
            out_kw["vf"] = vf
        cmd = (ffmpeg.input(src.url, **in_kw, **_in_opts()).output("pipe:", **out_kw)
               .compile(cmd=_ffmpeg_cmd()))
        return _read_ppm_frames(cmd, len(uniq), deadline, src)
    finally:
        if script:
            os.unlink(script)


class _Ffmpeg:
    """An ffmpeg child whose stdout is read by the caller, killed at the deadline, stderr drained."""

    def __init__(self, cmd: list[str], deadline: _Deadline, what: str, src: _Src | None = None):
        if deadline.left() <= 0:
            raise ProbeError("decode_timeout", f"no time left of {deadline.timeout_s:.3g}s for {what}")
        self.deadline, self.what, self.src = deadline, what, src
        self.proc = _spawn(cmd, src)
        self.timed_out = threading.Event()
        self._err: list[bytes] = []
        self._drain = threading.Thread(target=lambda: self._err.append(self.proc.stderr.read()), daemon=True)
        self._drain.start()
        self._timer = threading.Timer(deadline.left(), self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self.timed_out.set()
        _kill_group(self.proc)

    def readinto(self, buf: memoryview) -> int:
        """Fill buf from stdout; fewer bytes only at the end of the stream."""
        got = 0
        while got < buf.nbytes:
            k = self.proc.stdout.readinto(buf[got:])
            if not k:
                break
            got += k
        return got

    def finish(self) -> bytes:
        """Wait for the exit; the stderr text. Raises decode_timeout / decode_error."""
        try:
            self.proc.stdout.close()
            rc = self.proc.wait()
        finally:
            self.close()
        err = b"".join(self._err)
        if self.timed_out.is_set():
            raise ProbeError("decode_timeout", f"{self.what} took longer than {self.deadline.timeout_s:.3g}s")
        if rc != 0:
            refused = _refused(err, self.src)
            if refused is not None:
                raise refused
            text = self.src.tidy(err.decode("utf-8", "replace")) if self.src is not None else err
            raise ProbeError("decode_error", f"{self.what}: {_last_line(text, f'ffmpeg exit status {rc}')}")
        return err

    def close(self) -> None:
        self._timer.cancel()
        if self.proc.poll() is None:
            _kill_group(self.proc)
            self.proc.wait()
        self._drain.join(5)


def _read_ppm_frames(cmd: list[str], n: int, deadline: _Deadline, src: _Src) -> np.ndarray:
    """Read n binary PPM frames (all one size) from ffmpeg's stdout into one array."""
    ff = _Ffmpeg(cmd, deadline, "decoding", src)
    out: np.ndarray | None = None
    got = 0
    problem = None
    err = b""
    try:
        stdout = ff.proc.stdout
        while got < n:
            header = [stdout.readline() for _ in range(3)]  # b"P6\n", b"W H\n", b"255\n"
            if not header[0]:
                break
            try:
                w, h = (int(x) for x in header[1].split())
                ok = header[0].strip() == b"P6" and header[2].strip() == b"255"
            except ValueError:
                ok = False
            if not ok:
                problem = f"unexpected frame header {b''.join(header)[:40]!r}"
                break
            if out is None:
                out = np.empty((n, h, w, 3), np.uint8)
            elif out.shape[1:3] != (h, w):
                problem = f"the frame size changes mid-stream ({out.shape[2]}x{out.shape[1]} -> {w}x{h})"
                break
            if ff.readinto(memoryview(out[got]).cast("B")) < h * w * 3:
                break
            got += 1
        if problem is None:
            err = ff.finish()
    finally:
        ff.close()
    if ff.timed_out.is_set():
        raise ProbeError("decode_timeout", f"decoding took longer than {deadline.timeout_s:.3g}s")
    if problem:
        raise ProbeError("decode_error", problem)
    if got < n or out is None:
        lines = err.decode("utf-8", "replace").splitlines()
        decoded = sum(1 for ln in lines if ln.startswith("frame:"))
        errors = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("frame:", "rf="))]
        raise _EndedEarly(got, decoded, src.tidy(errors[-1])[:300] if errors else "")
    return out


def frame_phashes(path: str | int, indices: Sequence[int], timeout_s: float = 120.0, *,
                  size: tuple[int, int] = (64, 64), past_end: str = "clamp") -> list[int]:
    """64-bit pHash (`phash.phash_rgb`) of each frame with these indices.

    Frames are decoded already shrunk to `size` by ffmpeg (bicubic, which low-passes when it
    shrinks): pHash squashes every frame to 32x32 anyway, and at 64x64 the hashes stay within
    a few bits of hashing full-size frames (0-3 bits on average, at most 8 on smooth
    gradients, where +-2 grey levels of noise alone flip up to 8) for a fraction of the
    conversion and pipe traffic. Indices past a cleanly ending stream hash its last frame (`past_end`, see
    `decode_frames`), so indices from an overstated container frame count still work.
    """
    from reelforge.curation.phash import phash_rgb

    frames = decode_frames(path, indices, size=size, timeout_s=timeout_s, past_end=past_end)
    return [phash_rgb(f) for f in frames]


# ----------------------------------------------------------------------------- shots

_THUMB = 64          # content score: frames shrunk (area average) to 64x64 YUV 4:4:4 thumbnails
_SCORE_UNIT = 50.0   # ... and scored in units of 50 grey levels of mean absolute difference
_WINDOW = 2          # neighbours on each side a frame's difference is compared with
_CHUNK = 256         # thumbnails read from the pipe at once (more than the flash window + 1)


def _parse_times(text: str) -> list[float]:
    times = []
    for line in text.splitlines():
        if line.startswith("frame:"):
            for part in line.split():
                if part.startswith("pts_time:"):
                    try:
                        times.append(float(part[9:]))
                    except ValueError:
                        times.append(float("nan"))
    return times


def _content_diffs(src: _Src, info: dict, deadline: _Deadline, threads: int | None, flash_frames: int,
                   cand_levels: float) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """Per frame k: time (s from the first frame), d_k = mean |thumb_k - thumb_{k-1}| (0..255),
    and for frames with d_k > cand_levels the smallest of |thumb_{k+j} - thumb_{k-1}| and
    |thumb_k - thumb_{k-1-j}|, j = 1..flash_frames (small when the picture before k comes back
    or the picture at k was there just before: a flash, not a cut). One decode, thumbnails streamed."""
    import ffmpeg

    t = _THUMB
    in_kw: dict[str, Any] = {"noautorotate": None}
    if threads:
        in_kw["threads"] = int(threads)
    # the two metadata filters only print each frame's pts_time (to stderr; stdout has the thumbnails)
    vf = (f"scale={t}:{t}:flags=area,format=yuv444p,metadata=add:key=rf:value=1,"
          "metadata=print:key=rf:file=pipe\\\\:2")
    cmd = (ffmpeg.input(src.url, **in_kw, **_in_opts())
           .output("pipe:", vf=vf, format="rawvideo", pix_fmt="yuv444p", map="0:v:0", **_passthrough())
           .compile(cmd=_ffmpeg_cmd()))
    fsize = 3 * t * t
    buf = np.empty((_CHUNK, 3, t, t), np.uint8)
    mv = memoryview(buf).cast("B")
    diffs: list[np.ndarray] = []
    back: dict[int, float] = {}
    hist: np.ndarray | None = None  # the frame before the current chunk, then the current chunk
    hist_start = 0                  # global index of hist[0]
    pending: list[int] = []
    n = 0
    ff = _Ffmpeg(cmd, deadline, "shot detection", src)
    try:
        while True:
            got = ff.readinto(mv)
            c = got // fsize
            if c:
                x = buf[:c].astype(np.int16)
                y = x if hist is None else np.concatenate([hist, x])
                y_start = n if hist is None else hist_start
                d = np.abs(np.diff(y, axis=0)).mean(axis=(1, 2, 3))
                d = np.concatenate([[0.0], d]) if hist is None else d[len(hist) - 1:]
                diffs.append(d.astype(np.float32))
                # flash check for earlier candidates, now that the frames after them are here
                for k in pending:
                    _flash_back(y, y_start, k, flash_frames, back)
                pending = [n + i for i in np.flatnonzero(d > cand_levels).tolist()]
                hist = y[-(c + flash_frames + 1):]  # this chunk and the frames before it the checks need
                hist_start = n + c - len(hist)
                n += c
            if got < mv.nbytes:
                break
        if hist is not None:
            for k in pending:
                _flash_back(hist, hist_start, k, flash_frames, back)
        err = ff.finish()
    finally:
        ff.close()
    d = np.concatenate(diffs) if diffs else np.zeros(0, np.float32)
    times = _parse_times(err.decode("utf-8", "replace"))
    if len(times) == len(d) and all(math.isfinite(x) for x in times) and times:
        tt = np.asarray(times, np.float64) - times[0]
    else:  # no usable timestamps: constant frame rate
        tt = np.arange(len(d), dtype=np.float64) / (info.get("fps") or 25.0)
    return tt, d, back


def _flash_back(y: np.ndarray, y_start: int, k: int, flash_frames: int, back: dict[int, float]) -> None:
    """How close the picture before k comes back after it, or the picture at k was there shortly before."""
    i = k - y_start
    if i < 1:
        return
    vals = [float(np.abs(y[i + j] - y[i - 1]).mean()) for j in range(1, flash_frames + 1) if i + j < len(y)]
    vals += [float(np.abs(y[i] - y[i - 1 - j]).mean()) for j in range(1, flash_frames + 1) if i - 1 - j >= 0]
    if vals:
        back[k] = min(vals)


def _neighbour_mean(d: np.ndarray, w: int = _WINDOW) -> np.ndarray:
    """Mean of d over the w frames on each side of each frame (frame 0, which has no d, left out)."""
    n = len(d)
    v = d.astype(np.float64).copy()
    ok = np.ones(n)
    if n:
        v[0], ok[0] = 0.0, 0.0
    cs, co = np.concatenate([[0.0], np.cumsum(v)]), np.concatenate([[0.0], np.cumsum(ok)])
    lo, hi = np.clip(np.arange(n) - w, 0, n), np.clip(np.arange(n) + w + 1, 0, n)
    tot, cnt = cs[hi] - cs[lo] - v, co[hi] - co[lo] - ok
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)


def scene_scores(path: str | int, timeout_s: float = 300.0, *, threads: int | None = None,
                 info: dict | None = None) -> list[tuple[float, float]]:
    """(time in s from the first frame, content score in [0, 1]) for every frame; see detect_shots."""
    deadline = _Deadline(timeout_s)
    with _Src(path) as src:
        info = _probe_for(src, info, deadline, "decode_timeout")
        tt, d, _ = _content_diffs(src, info, deadline, threads, 0, float("inf"))
    score = np.clip((d - _neighbour_mean(d)) / _SCORE_UNIT, 0.0, 1.0)
    return [(float(a), float(b)) for a, b in zip(tt, score)]


def _ffmpeg_scene_scores(src: _Src, deadline: _Deadline, threads: int | None) -> list[tuple[float, float]]:
    """ffmpeg's own `scene` score of every full-size frame (select filter), for method="ffmpeg"."""
    import ffmpeg

    in_kw: dict[str, Any] = {"noautorotate": None}
    if threads:
        in_kw["threads"] = int(threads)
    vf = r"select=gte(scene\,0),metadata=print:key=lavfi.scene_score:file=-"
    cmd = (ffmpeg.input(src.url, **in_kw, **_in_opts())
           .output("-", vf=vf, format="null", map="0:v:0", **_passthrough())
           .compile(cmd=_ffmpeg_cmd()))
    res = _run(cmd, deadline.left(), "decode_timeout", "decode_error", "ffmpeg scene detection", src)
    times = _parse_times(res.stdout.decode("utf-8", "replace"))
    scores = [float(ln.split("=", 1)[1]) for ln in res.stdout.decode("utf-8", "replace").splitlines()
              if ln.startswith("lavfi.scene_score=")]
    pairs = [(t, s) for t, s in zip(times, scores) if math.isfinite(t)]
    return [(t - pairs[0][0], s) for t, s in pairs] if pairs else []


def detect_shots(path: str | int, threshold: float = 0.3, min_shot_s: float = 0.5, timeout_s: float = 300.0, *,
                 method: str = "content", threads: int | None = None, info: dict | None = None) -> list[float]:
    """Cut times (s from the first frame, ascending): the time of the first frame of each new shot.

    method="content" (default): every frame is shrunk to a 64x64 YUV thumbnail (area average,
    so grain and fine texture average out) and d_k, the mean absolute difference from the
    previous thumbnail (0..255), is compared with the mean d of the 2 frames on each side:
    score_k = (d_k - mean neighbours) / 50, clipped to [0, 1]. Steady motion, pans and noise
    raise the neighbours too and score near 0; a cut scores high on its own frame. A frame
    whose score exceeds `threshold` (0.3 = 15 grey levels above its neighbours) is a cut unless
    the picture comes back within ~0.2 s (a flash). This replaces ffmpeg's `scene` score,
    min(d, |d - d_prev|)/100, which misses cuts between noisy or busy shots (see
    benchmarks/bench_shot_detection.py); method="ffmpeg" keeps that score (full-size frames,
    `select` filter) with `threshold` on its own scale.

    Then cuts closer than `min_shot_s` to a stronger cut, to the start or to the end are
    dropped, so no shot is shorter than `min_shot_s`. Gradual transitions (fades, dissolves)
    are not detected by either method.
    """
    if method not in ("content", "ffmpeg"):
        raise ValueError(f"method must be 'content' or 'ffmpeg', not {method!r}")
    deadline = _Deadline(timeout_s)
    with _Src(path) as src:
        info = _probe_for(src, info, deadline, "decode_timeout")
        return _detect_shots(src, info, deadline, threshold, min_shot_s, method, threads)


def _detect_shots(src: _Src, info: dict, deadline: _Deadline, threshold: float, min_shot_s: float, method: str,
                  threads: int | None) -> list[float]:
    fps = info.get("fps") or 25.0
    if method == "ffmpeg":
        pairs = _ffmpeg_scene_scores(src, deadline, threads)
        tt = np.asarray([p[0] for p in pairs], np.float64)
        score = np.asarray([p[1] for p in pairs], np.float64)
        is_cut = score > threshold
    elif method == "content":
        flash = int(min(12, max(2, round(0.2 * fps))))
        tt, d, back = _content_diffs(src, info, deadline, threads, flash, threshold * _SCORE_UNIT)
        m = _neighbour_mean(d)
        score = np.clip((d - m) / _SCORE_UNIT, 0.0, 1.0)
        is_cut = score > threshold
        for k in np.flatnonzero(is_cut):
            if k in back and (back[k] - m[k]) / _SCORE_UNIT <= threshold:
                is_cut[k] = False  # the picture came back: a flash or a glitch, not a new shot
    else:
        raise ValueError(f"method must be 'content' or 'ffmpeg', not {method!r}")
    if not len(tt):
        return []
    end = max(float(tt[-1]) + 1.0 / fps, float(info.get("duration") or 0.0))
    cands = sorted(((float(score[k]), float(tt[k])) for k in np.flatnonzero(is_cut) if k > 0), reverse=True)
    cuts: list[float] = []
    eps = 1e-6
    for _s, t in cands:
        if t < min_shot_s - eps or end - t < min_shot_s - eps:
            continue
        if all(abs(t - c) >= min_shot_s - eps for c in cuts):
            cuts.append(t)
    return sorted(round(c, 6) for c in cuts)


def match_cuts(detected: Sequence[float], true: Sequence[float], tol: float = 0.5) -> int:
    """True positives of a shot detector: greedy one-to-one matching of cuts within `tol` s
    (each true cut takes the nearest unused detected cut), for precision/recall/F1."""
    used: set[int] = set()
    tp = 0
    for c in true:
        best = None
        for j, d in enumerate(detected):
            if j not in used and abs(d - c) <= tol and (best is None or abs(d - c) < abs(detected[best] - c)):
                best = j
        if best is not None:
            used.add(best)
            tp += 1
    return tp


def split_shots(duration: float, cuts: Sequence[float], max_clip_s: float | None) -> list[tuple[float, float]]:
    """(start, end) clips covering [0, duration] split at the cuts; a clip longer than
    `max_clip_s` is split into the fewest equal parts no longer than it."""
    duration = float(duration or 0.0)
    if duration <= 0:
        return []
    bounds = [0.0]
    for c in sorted(float(c) for c in cuts):
        if bounds[-1] < c < duration:
            bounds.append(c)
    bounds.append(duration)
    out: list[tuple[float, float]] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        k = max(1, math.ceil((b - a) / max_clip_s - 1e-9)) if max_clip_s and max_clip_s > 0 else 1
        step = (b - a) / k
        out.extend((a + i * step, b if i == k - 1 else a + (i + 1) * step) for i in range(k))
    return out


# ----------------------------------------------------------------------------- encoding

def _even(x: float) -> int:
    return max(2, int(round(x / 2.0)) * 2)


def _encode(path: str | int, out_path: str, start: float | None, end: float | None, max_side: int | None,
            fps: float | None, crf: float, preset: str, audio: bool, timeout_s: float,
            info: dict | None) -> dict[str, Any]:
    deadline = _Deadline(timeout_s)
    with _Src(path) as src:
        info = _probe_for(src, info, deadline, "transcode_timeout")
        return _encode_src(src, out_path, start, end, max_side, fps, crf, preset, audio, deadline, info)


def _encode_src(src: _Src, out_path: str, start: float | None, end: float | None, max_side: int | None,
                fps: float | None, crf: float, preset: str, audio: bool, deadline: _Deadline,
                info: dict) -> dict[str, Any]:
    w, h = _display_size(info)  # ffmpeg autorotates first; sizes below are upright sizes
    filters = []
    if max_side and max(w, h) > int(max_side):
        s = int(max_side) / max(w, h)
        nw, nh = _even(w * s), _even(h * s)
        if max(nw, nh) > int(max_side):  # an odd max_side rounded up
            nw, nh = (nw - 2, nh) if nw >= nh else (nw, nh - 2)
        filters.append(f"scale={nw}:{nh}:flags=bicubic")
    elif w % 2 or h % 2:  # never upscale: drop the odd last column/row instead
        filters.append(f"crop={w - w % 2}:{h - h % 2}:0:0")
    if fps and (not info.get("fps") or info["fps"] > float(fps) + 1e-3):  # never raise the frame rate
        filters.append(f"fps={float(fps):g}")
    filters.append("format=yuv420p")
    import ffmpeg

    in_kw: dict[str, Any] = {}
    if start is not None and start > 0:
        in_kw["ss"] = f"{start:.6f}"
    out_kw: dict[str, Any] = {"vf": ",".join(filters), "c:v": "libx264", "preset": preset, "crf": crf,
                              "pix_fmt": "yuv420p", "movflags": "+faststart", "format": "mp4", "sn": None,
                              "dn": None, "map_chapters": "-1"}
    if end is not None:
        out_kw["t"] = f"{max(0.0, end - (start or 0.0)):.6f}"
    stream = ffmpeg.input(src.url, **in_kw, **_in_opts())
    if audio and info.get("has_audio"):
        out = ffmpeg.output(stream["v:0"], stream["a:0"], _url(out_path + ".part"),
                            **out_kw, **{"c:a": "aac", "b:a": "128k"})
    else:
        out = ffmpeg.output(stream["v:0"], _url(out_path + ".part"), **out_kw, an=None)
    cmd = out.compile(cmd=_ffmpeg_cmd(), overwrite_output=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if os.path.lexists(out_path + ".part"):  # never write through whatever a crashed run (or anyone) left
        os.unlink(out_path + ".part")
    try:
        _run(cmd, deadline.left(), "transcode_timeout", "transcode_error", "ffmpeg encode", src)
        try:
            result = probe_video(out_path + ".part", max(deadline.left(), 1.0))
        except ProbeError as e:
            raise ProbeError("transcode_error", f"the output does not probe: {e}") from e
        os.replace(out_path + ".part", out_path)
    finally:
        if os.path.lexists(out_path + ".part"):
            os.unlink(out_path + ".part")
    return result


def cut_clip(path: str | int, start: float, end: float, out_path: str, timeout_s: float = 300.0, *,
             max_side: int | None = None, fps: float | None = None, crf: float = 23, preset: str = "veryfast",
             audio: bool = True, info: dict | None = None) -> dict[str, Any]:
    """Re-encode [start, end) seconds of `path` (frame-accurate) as a normalised H.264 MP4.

    Same output as `transcode`; returns `probe_video(out_path)`.
    """
    if end <= start:
        raise ValueError(f"end ({end}) must be after start ({start})")
    return _encode(path, out_path, float(start), float(end), max_side, fps, crf, preset, audio, timeout_s, info)


def transcode(path: str | int, out_path: str, max_side: int | None = None, fps: float | None = None, crf: float = 23,
              timeout_s: float = 300.0, *, preset: str = "veryfast", audio: bool = True,
              info: dict | None = None) -> dict[str, Any]:
    """Normalised H.264 MP4: yuv420p, even upright dimensions, `+faststart`, first video stream
    (and first audio stream as AAC when `audio`), longest side at most `max_side` with the
    aspect ratio kept (never upscaled), frame rate lowered to `fps` (never raised).

    The file appears at `out_path` only when complete; returns `probe_video(out_path)`.
    """
    return _encode(path, out_path, None, None, max_side, fps, crf, preset, audio, timeout_s, info)
