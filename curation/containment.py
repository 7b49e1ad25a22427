"""Media reads stay inside the corpus: which files a manifest may name, and how they are opened.

A row's media reference is resolved once, at ingest, against the roots the recipe allows
(`allowed_roots`): the manifest's folder, the source's `media_root`, and any recipe `roots`.
`resolve_media_ref` turns the reference as written (relative, absolute or `file://`) into a
canonical path (`os.path.realpath`) that lies inside one of them and names a regular file,
or raises `ContainmentError` with the ledger reason. It only looks (`lstat`), never opens, so a
FIFO cannot block it.

Every later read opens the stored canonical path with `open_regular`: no symlink in the last
component (`O_NOFOLLOW`), no blocking open (`O_NONBLOCK`), a regular file (`fstat`), and the
path must still be canonical, so a component swapped for a symlink since ingest is refused
(`outside_root`) instead of followed out of the corpus.

Reasons (the `reason` of `ContainmentError`, a `MediaReadError`):

    outside_root        the path, or a symlink on it, leads out of every allowed root
    not_a_regular_file  a directory, device, FIFO or socket
    unsupported_uri     a URI scheme other than file:// (http://, s3://, data:, concat:, ...)
    missing_file        nothing at that path (or a dangling symlink inside the roots)
    unreadable_file     there, but the worker may not read it (permissions)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from urllib.parse import unquote, urlsplit

from reelforge.curation.errors import MediaReadError

__all__ = ["ContainmentError", "allowed_roots", "resolve_media_ref", "open_regular", "file_uri_path",
           "HAVE_PROC_FD"]

# /proc/self/fd/N reopens exactly the file an fd holds (Linux): the way a checked fd is handed to ffmpeg
HAVE_PROC_FD = os.path.isdir("/proc/self/fd")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# schemes written without "//" that must not be taken for a relative file name
_OPAQUE_SCHEMES = {"data", "concat", "concatf", "subfile", "pipe", "fd", "cache", "async", "crypto", "tee",
                   "mailto", "javascript", "blob", "gopher"}


class ContainmentError(MediaReadError):
    """A media reference that leaves the corpus or is not a plain file; `reason` is the ledger code."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _canonical(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def allowed_roots(manifest_path: str, media_root: str | None, roots: list[str] | None) -> tuple[str, ...]:
    """The canonical folders a source's media may live in: the manifest's folder, `media_root`
    if given, then the recipe's `roots` (in that order, without repeats)."""
    out: list[str] = []
    for r in [os.path.dirname(os.path.abspath(manifest_path)), media_root, *(roots or [])]:
        if r is None or r == "":
            continue
        c = _canonical(file_uri_path(r) if str(r).lower().startswith("file:") else os.fspath(r))
        if c not in out:
            out.append(c)
    return tuple(out)


def file_uri_path(uri: str) -> str:
    """The absolute path a `file:` URI names (`file:///a/b`, `file://localhost/a/b`, `file:/a/b`;
    percent-escapes decoded); raises unsupported_uri for a remote host or a relative form."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        raise ContainmentError("unsupported_uri", f"{_short(uri)} is not a file URI.")
    if parts.netloc not in ("", "localhost"):
        raise ContainmentError("unsupported_uri", f"file URIs on another host are not read: {_short(uri)}.")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ContainmentError("unsupported_uri", f"a file URI must name an absolute path: {_short(uri)}.")
    return path


def _short(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    for r in roots:
        if r == os.sep or path == r or path.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def _as_path(ref: str, base: str) -> str:
    """The ref as a (not yet canonical) absolute path, or unsupported_uri."""
    m = _SCHEME.match(ref)
    if m:
        scheme = m.group(1).lower()
        if scheme == "file":
            return file_uri_path(ref)
        if ref[m.end():].startswith("//") or scheme in _OPAQUE_SCHEMES:
            raise ContainmentError("unsupported_uri",
                                   f"only local or shared-filesystem paths are read, not {scheme}: URIs.")
    return os.path.join(base, ref)  # an absolute ref stays itself


def resolve_media_ref(ref: str, base: str, roots: tuple[str, ...]) -> str:
    """The canonical absolute path of a media reference as a row wrote it (relative to `base`,
    absolute, or `file://`), when it lies inside one of `roots` (canonical, from `allowed_roots`)
    and is a regular file; raises ContainmentError otherwise. Never opens the file."""
    ref = os.fspath(ref)
    if not ref or "\x00" in ref:
        raise ContainmentError("missing_file", "an empty media path" if not ref else "a media path with a NUL byte")
    path = _as_path(ref, os.path.abspath(base))
    canon = _canonical(path)
    if not _inside(canon, roots):
        shown = canon if canon == os.path.normpath(path) else f"{path} (-> {canon})"
        raise ContainmentError("outside_root", f"{_short(shown, 400)} is outside the allowed roots {list(roots)}")
    try:
        st = os.lstat(canon)
    except FileNotFoundError as e:
        raise ContainmentError("missing_file", f"no such file: {canon}") from e
    except NotADirectoryError as e:
        raise ContainmentError("missing_file", f"no such file: {canon} (a parent is not a folder)") from e
    except OSError as e:
        raise ContainmentError("unreadable_file", f"{canon}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):  # a symlink still here is a loop realpath gave up on
        raise ContainmentError("not_a_regular_file", f"{canon} is {_kind(st.st_mode)}")
    return canon


def open_regular(path: str) -> int:
    """An fd open for reading on the regular file at `path`, which must be canonical (absolute,
    no symlink in any component: `os.path.realpath(path) == path`); raises ContainmentError.

    Opened with O_RDONLY|O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC (a FIFO or device never blocks the
    open, a symlink as the last component is refused); the fd must be a regular file (fstat),
    and the file it holds must still sit at `path` (checked again after the open through
    /proc/self/fd where there is one, so a swap between the check and the open is caught).
    O_NONBLOCK is cleared before returning. The caller closes the fd.
    """
    path = os.fspath(path)
    if not path or "\x00" in path:
        raise ContainmentError("missing_file", "an empty media path" if not path else "a media path with a NUL byte")
    if not os.path.isabs(path):
        raise ContainmentError("outside_root", f"{_short(path)} is not an absolute path")
    try:
        st = os.lstat(path)
    except FileNotFoundError as e:
        raise ContainmentError("missing_file", f"no such file: {path}") from e
    except NotADirectoryError as e:
        raise ContainmentError("missing_file", f"no such file: {path} (a parent is not a folder)") from e
    except OSError as e:
        raise ContainmentError("unreadable_file", f"{path}: {e.strerror or e}") from e
    if stat.S_ISLNK(st.st_mode):
        raise ContainmentError("outside_root", f"{path} is now a symbolic link (to {_readlink(path)})")
    if not stat.S_ISREG(st.st_mode):  # refused before the open: opening a device can have effects
        raise ContainmentError("not_a_regular_file", f"{path} is {_kind(st.st_mode)}")
    if os.path.realpath(path) != path:
        raise ContainmentError("outside_root", f"{path} now resolves to {os.path.realpath(path)}")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ContainmentError("outside_root", f"{path} is now a symbolic link") from e
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ContainmentError("missing_file", f"no such file: {path}") from e
        raise ContainmentError("unreadable_file", f"{path}: {e.strerror or e}") from e
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise ContainmentError("not_a_regular_file", f"{path} is {_kind(fst.st_mode)}")
        if HAVE_PROC_FD:
            try:
                held = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                held = path
            if held != path:
                raise ContainmentError("outside_root", f"{path} was swapped for {held}")
        elif os.path.realpath(path) != path:
            raise ContainmentError("outside_root", f"{path} now resolves to {os.path.realpath(path)}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"
