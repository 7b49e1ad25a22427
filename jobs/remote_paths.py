"""Source and output URLs at recipe time: listing a source's objects, its root prefix, the
output kept apart from the corpus. Names only, nothing downloaded (`jobs.remote` mirrors and
publishes; `jobs.recipe` calls these while it checks a recipe)."""

from __future__ import annotations

import fnmatch
import re

from reelforge.curation import storage
from reelforge.curation.errors import RecipeError
from reelforge.curation.readers import DEFAULT_PATTERNS

# --- URLs at recipe time: listing, roots ------------------------------------------------------

def safe_key(rel: str) -> bool:
    """A key relative to a root that can be written under a local folder and stay there."""
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and "\x00" not in rel \
        and all(seg not in ("", ".", "..") for seg in rel.split("/"))


def url_inside(url: str, prefix: str) -> bool:
    url, prefix = url.rstrip("/"), prefix.rstrip("/")
    return url == prefix or url.startswith(prefix + "/")


def common_root(roots: list[str]) -> str:
    """The longest '/'-bounded prefix that holds every root."""
    parts = [r.rstrip("/").split("/") for r in roots]
    out = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        out.append(segs[0])
    return "/".join(out)


def list_objects(url: str) -> dict[str, dict]:
    """{full URL: {"size", "etag"}} of every object under a prefix."""
    fs, p = storage.url_fs(url)
    try:
        found = storage.guarded(url, "read", fs.find, p, detail=True)
    except FileNotFoundError:
        return {}
    return {fs.unstrip_protocol(k): {"size": int(v.get("size") or 0), "etag": str(v.get("ETag") or "").strip('"')}
            for k, v in found.items() if v.get("type") != "directory"}


def expand_url(path: str, fmt: str, where: str) -> tuple[list[str], str]:
    """The objects a source's URL names (a key, a prefix or a glob) and its root prefix: what
    `jobs.recipe._expand` returns for a local path. Names only; nothing is downloaded here."""
    url = storage.normalize(path)
    fs, p = storage.url_fs(url)
    if any(c in p for c in "*?["):
        head = re.split(r"[*?\[]", p, maxsplit=1)[0]
        root_p = head.rstrip("/") if head.endswith("/") else head.rsplit("/", 1)[0]
        found = sorted(fs.unstrip_protocol(k) for k, v in
                       storage.guarded(url, "read", fs.glob, p, detail=True).items() if v.get("type") != "directory")
    elif storage.guarded(url, "read", fs.isdir, p):
        root_p = p.rstrip("/")
        pats = DEFAULT_PATTERNS[fmt]
        found = sorted(u for u in list_objects(url) if any(fnmatch.fnmatch(u.rsplit("/", 1)[-1], pat) for pat in pats))
    elif storage.guarded(url, "read", fs.isfile, p):
        root_p = p.rsplit("/", 1)[0] if "/" in p else p
        found = [fs.unstrip_protocol(p)]
    else:
        raise RecipeError(f"recipe field `{where}` matches no objects ({storage.redact(url)}): check the bucket, "
                          "the key and the credentials.")
    root = fs.unstrip_protocol(root_p).rstrip("/")
    found = [u for u in found if url_inside(u, root) and safe_key(u[len(root) + 1:])]
    if not found:
        raise RecipeError(f"recipe field `{where}` matches no objects ({storage.redact(url)}): check the bucket, "
                          "the key and the credentials.")
    return found, root


def check_url_output_apart(out: str, sources) -> None:
    """An output URL must not hold a source's objects, nor lie under a source's root prefix."""
    for i, s in enumerate(sources):
        root = (s.remote or {}).get("root")
        if root and (url_inside(out, root) or url_inside(root, out)):
            raise RecipeError(f"output {storage.redact(out)} overlaps {storage.redact(root)}, the root of source "
                              f"`sources[{i}]` ({s.name}): pass --out with a prefix outside the corpus.")
