"""Object storage through fsspec: `s3://`, `gs://`, `abfs://`, ... wherever a path is accepted.

One small surface that every layer uses for a location that may be a URL, so a plain path
keeps its exact local behaviour (and its local safety checks) and a URL goes through fsspec:

- credentials and endpoints come from the usual environment and config of each backend
  (for S3: AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws, AWS_ENDPOINT_URL_S3 for a private
  endpoint, or fsspec's own `FSSPEC_S3_*` variables); nothing here takes a secret as an
  argument, and `redact` strips any `user:password@` a URL carries before it is logged;
- a published object is written under a temporary name, then made final by a copy and a
  delete (object stores have no rename): a reader never sees half an object, and a re-run
  that finds a leftover temporary removes it (`remove_temps`);
- a backend error (no credentials, no bucket, access denied) becomes `StorageError`, one
  sentence naming the URL and the fix.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from typing import Any, Iterator

TMP_MARK = ".tmp-"  # the infix of a temporary object's name: `<name>.tmp-<token>`
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class StorageError(Exception):
    """A location cannot be read or written (credentials, bucket, permission): one sentence."""


def is_url(path: Any) -> bool:
    """A location fsspec must open: `scheme://...` with a scheme other than file."""
    if not isinstance(path, str):
        return False
    m = _SCHEME.match(path)
    return bool(m) and m.group(1).lower() != "file"


def redact(url: str) -> str:
    """The URL without `user:password@`: what logs, errors and reports may show."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", url) if isinstance(url, str) else url


def normalize(path: str) -> str:
    """A URL without a trailing slash (scheme kept); a local path made absolute."""
    if is_url(path):
        m = _SCHEME.match(path)
        rest = path[m.end():].rstrip("/")
        return f"{m.group(1).lower()}://{rest}"
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """`os.path.join` for a path, '/'-joining for a URL."""
    if not is_url(base):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def url_fs(url: str):
    """(fsspec filesystem, path inside it) for a URL; a path gets the local filesystem."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = _SCHEME.match(url).group(1) if _SCHEME.match(url) else "file"
        raise StorageError(f"{redact(url)}: no fsspec backend for {scheme}:// is installed ({e}); "
                           f"install it (for s3://: pip install s3fs).") from e
    except ValueError as e:
        raise StorageError(f"{redact(url)} is not a location fsspec can open ({e}).") from e


def _explain(url: str, e: BaseException, doing: str) -> StorageError:
    name = type(e).__name__
    text = str(e).splitlines()[0][:200] if str(e) else name
    if "Credentials" in name or "credential" in text.lower():
        fix = "set credentials the usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws)"
    elif isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        fix = "use credentials that may " + ("write" if doing == "write" else "read") + " there"
    elif "NoSuchBucket" in text or "bucket" in text.lower() or isinstance(e, FileNotFoundError):
        fix = "check the bucket name, or create the bucket"
    else:
        fix = "check the URL, the endpoint (AWS_ENDPOINT_URL_S3 for a private S3) and the credentials"
    return StorageError(f"cannot {doing} {redact(url)} ({name}: {redact(text)}): {fix}.")


def guarded(url: str, doing: str, fn, *args, **kw):
    """fn(*args, **kw), with a backend error turned into one StorageError sentence."""
    try:
        return fn(*args, **kw)
    except FileNotFoundError as e:
        if doing == "write":  # writing a new object: what is missing is the bucket
            raise _explain(url, e, doing) from e
        raise
    except (StorageError, IsADirectoryError, NotADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors have no common base
        raise _explain(url, e, doing) from e


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = url_fs(path)
    return bool(guarded(path, "read", fs.exists, p))


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = url_fs(path)
    return bool(guarded(path, "read", fs.isdir, p))


def listdir(path: str) -> list[str]:
    """The names directly under a folder or prefix ([] when it does not exist)."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, p = url_fs(path)
    try:
        entries = guarded(path, "read", fs.ls, p, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != p.rstrip("/")})


def size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, p = url_fs(path)
    return int(guarded(path, "read", fs.size, p))


def open_file(path: str, mode: str = "rb"):
    """A file object for a path or URL (read or write; a write to a URL is one object)."""
    if not is_url(path):
        return open(path, mode)
    fs, p = url_fs(path)
    return guarded(path, "write" if "w" in mode else "read", fs.open, p, mode)


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of a file, or of [start, end) of it (one ranged GET on a URL)."""
    if not is_url(path):
        with open(path, "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))
    fs, p = url_fs(path)
    return guarded(path, "read", fs.cat_file, p, start=start, end=end)


def makedirs(path: str) -> None:
    """A local folder is created; a URL prefix needs nothing (a bucket must exist)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def _tmp_name(url: str) -> str:
    return f"{url}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def _publish(url: str, write_local, write_object) -> None:
    """Write under a temporary name, then make it final: os.replace for a path; for a URL, copy the
    temporary object to its final name and delete it (object stores have no rename)."""
    if not is_url(url):
        tmp = f"{url}{TMP_MARK}{os.getpid()}"
        try:
            write_local(tmp)
            os.replace(tmp, url)
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)
        return
    fs, p = url_fs(url)
    tmp = _tmp_name(p)
    guarded(url, "write", write_object, fs, tmp)
    try:
        guarded(url, "write", fs.copy, tmp, p)
    finally:
        try:
            fs.rm_file(tmp)
        except FileNotFoundError:
            pass


def put_file(local: str, url: str) -> None:
    """Publish a local file at `url`: upload to a temporary object, copy it to its final name,
    delete the temporary. A reader never sees a partial object; a crash leaves only a
    `.tmp-` object that `remove_temps` clears on the next run."""
    import shutil

    _publish(url, lambda tmp: shutil.copyfile(local, tmp), lambda fs, tmp: fs.put_file(local, tmp))


def write_bytes(url: str, data: bytes) -> None:
    """Publish bytes at a path or URL atomically (temporary name, then final)."""
    def write_local(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _publish(url, write_local, lambda fs, tmp: fs.pipe_file(tmp, data))


def remove(url: str, recursive: bool = False) -> None:
    """Delete an object (or, with recursive, everything under a prefix); missing is fine."""
    if not is_url(url):
        import shutil

        if os.path.isdir(url) and not os.path.islink(url):
            if recursive:
                shutil.rmtree(url)
        elif os.path.lexists(url):
            os.remove(url)
        return
    fs, p = url_fs(url)
    try:
        guarded(url, "delete", fs.rm, p, recursive=recursive)
    except FileNotFoundError:
        pass


def walk_files(url: str) -> Iterator[tuple[str, int]]:
    """(path relative to `url`, size) of every file/object under a folder or prefix, sorted."""
    if not is_url(url):
        for d, _dirs, files in sorted(os.walk(url)):
            for f in sorted(files):
                full = os.path.join(d, f)
                yield os.path.relpath(full, url), os.path.getsize(full)
        return
    fs, p = url_fs(url)
    try:
        found = guarded(url, "read", fs.find, p, detail=True)
    except FileNotFoundError:
        return
    base = p.rstrip("/") + "/"
    for key in sorted(found):
        info = found[key]
        if info.get("type") == "directory" or not key.startswith(base):
            continue
        yield key[len(base):], int(info.get("size") or 0)


def remove_temps(url: str) -> int:
    """Delete the `.tmp-` objects a crashed publish left under a prefix; returns how many."""
    n = 0
    for rel, _ in list(walk_files(url)):
        if TMP_MARK in rel.rsplit("/", 1)[-1]:
            remove(join(url, rel))
            n += 1
    return n


def staging_dir(url: str, kind: str = "runs") -> str:
    """A local folder that stands in for a URL while a job works on it (Spark's intermediate
    Parquet, a source's mirror): `$REELFORGE_STAGING` or `~/.cache/reelforge/staging`, then
    `<kind>/<16 hex of the URL's hash>`. It must be on storage every executor sees (as `_work/` is)."""
    root = os.environ.get("REELFORGE_STAGING") or os.path.join(os.path.expanduser("~"), ".cache", "reelforge",
                                                                  "staging")
    digest = hashlib.sha256(normalize(url).encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(root), kind, digest)
