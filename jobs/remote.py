"""Runs whose sources or output live on object storage (`s3://`, or any fsspec URL).

The run itself is a local run, unchanged: a URL only changes what happens before and after it.

- **Sources on a URL** (`path: s3://b/corpus/captions.jsonl`, a prefix, or a glob) are listed on
  the driver when the recipe is read (names only, `expand_url`), then **mirrored** before ingest:
  a Spark job whose executors download every object under the source's root prefix (the media a
  manifest names relative to it included) into `storage.staging_dir(root, "sources")/files`,
  keeping the layout. An object already mirrored with the same size and ETag is not fetched again
  (`manifest.json` beside `files/` records them); one gone from the bucket is removed from the
  mirror. A key that would land outside the mirror (`..`, `.`, an empty segment, a leading `/`, a
  backslash) is never written: it is skipped and counted (`unsafe_keys`). `sources[i].max_mirror_bytes`
  caps what a source's root may hold. The readers then run on the mirror as on any local folder:
  containment, O_NOFOLLOW, size limits all apply. Ingest maps the mirror path back, so the ledger's
  (and the shards') `source_location` is the object's URL.
- **An output URL** (`--out s3://b/run`): the run proceeds in a local staging folder
  (`storage.staging_dir(url)`, or `--work DIR` / `output.work`) exactly as a local run does, reuse
  of finished steps included. Before it starts, the URL is claimed: a prefix holding objects with
  no reelforge run marker, or another recipe's, is refused in one sentence, and a missing bucket is
  a `StorageError` sentence. When the run completes, `publish` copies what it published (not
  `_work/`) to the URL: leftovers of a crashed publish (`.tmp-` objects) are removed; an object whose
  size and content already match (sha256 recorded in `_reelforge_published.json` with the ETag it
  got, or a single-part ETag equal to the file's md5) is not uploaded again; when anything changes,
  the old `shards/index.json` and `report.json` are deleted first, then the objects the previous run
  wrote and this one does not, then executors upload the new objects (temporary object, copy,
  delete: `storage.put_file`), and the driver uploads the index and the report last, report.json
  at the very end: a reader never sees an index naming a missing shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from typing import Callable

from reelforge.curation import storage
from reelforge.curation.errors import RecipeError
from reelforge.jobs.remote_paths import list_objects, safe_key, url_inside
from reelforge.jobs.run import LOCK, RUN_MARKER, _read_json  # the marker and lock a local run writes

PUBLISHED = "_reelforge_published.json"  # at the URL: {relpath: {size, sha256, etag}} of the last publish
REPORTS = ("report.json", "report.md", "report.html")
_CLEARED = ("ledger", "samples", "embeddings")  # Parquet folders: a stale part file would be read as data


# --- sources: the mirror ----------------------------------------------------------------------

def _fetch(items: list[tuple], root: str, files_dir: str) -> list[tuple]:
    """Executor side: download (rel, url, size, etag) under files_dir; (rel, size, etag, error)."""
    fs, _ = storage.url_fs(root)
    real_root = os.path.realpath(files_dir)
    out = []
    for rel, url, size, etag in items:
        dest = os.path.join(files_dir, *rel.split("/"))
        tmp = f"{dest}{storage.TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            if not safe_key(rel):
                raise ValueError("unsafe key")
            parent = os.path.dirname(dest)
            os.makedirs(parent, exist_ok=True)
            rp = os.path.realpath(parent)
            if rp != real_root and not rp.startswith(real_root + os.sep):
                raise ValueError(f"{rel} would be written outside the mirror")
            storage.guarded(url, "read", fs.get_file, fs._strip_protocol(url), tmp)
            got = os.path.getsize(tmp)
            if got != size:
                raise ValueError(f"downloaded {got} bytes, the listing said {size}")
            if os.path.islink(dest):
                os.remove(dest)
            os.replace(tmp, dest)
            out.append((rel, size, etag, None))
        except Exception as e:  # noqa: BLE001 - counted and reported; a source file missing fails the run
            out.append((rel, size, etag, f"{type(e).__name__}: {e}"[:300]))
            if os.path.lexists(tmp):
                os.remove(tmp)
    return out


def _groups(items: list[tuple], size_of, n: int) -> list[list[tuple]]:
    """Items dealt round-robin, largest first, into at most n groups (one Spark task each)."""
    groups: list[list[tuple]] = [[] for _ in range(max(1, min(n, len(items))))]
    for i, it in enumerate(sorted(items, key=size_of, reverse=True)):
        groups[i % len(groups)].append(it)
    return [g for g in groups if g]


def mirror_sources(sources, spark, log: Callable[[str], None] = print) -> tuple[list, dict]:
    """Mirror every URL source's root prefix locally (Spark executors download); returns the
    sources re-pointed at the mirror, and a summary {downloaded, skipped, bytes, unsafe_keys, ...}."""
    from reelforge.jobs.ingest import LOCATION_MAP  # ingest maps the mirror path back to the URL

    t0 = time.time()
    roots = sorted({s.remote["root"] for s in sources if s.remote})
    outer = [r for r in roots if not any(o != r and url_inside(r, o) for o in roots)]
    summary = {"roots": [storage.redact(r) for r in outer], "objects": 0, "downloaded": 0, "skipped": 0,
               "bytes_downloaded": 0, "removed": 0, "unsafe_keys": [], "failed": []}
    where: dict[str, str] = {}  # outer root -> its local files folder
    failed: set[str] = set()
    sc = spark.sparkContext
    for R in outer:
        base = storage.staging_dir(R, "sources")
        files_dir = os.path.join(base, "files")
        manifest_path = os.path.join(base, "manifest.json")
        os.makedirs(files_dir, exist_ok=True)
        listing = list_objects(R)
        objs, unsafe = {}, []
        for u, info in listing.items():
            rel = u[len(R) + 1:]
            if url_inside(u, R) and safe_key(rel):
                objs[rel] = (u, info)
            else:
                unsafe.append(rel)
        for s in sources:
            cap = (s.remote or {}).get("max_mirror_bytes")
            if s.remote and url_inside(s.remote["root"], R) and cap is not None:
                held = sum(i["size"] for u, i in objs.values() if url_inside(u, s.remote["root"]))
                if held > cap:
                    raise RecipeError(f"source {s.name}: its root {storage.redact(s.remote['root'])} holds {held} "
                                      f"bytes, over its max_mirror_bytes ({cap}): raise the cap or point the source "
                                      "at a smaller prefix.")
        old = _read_json(manifest_path)
        old = old if isinstance(old, dict) else {}
        todo, kept = [], {}
        for rel, (u, info) in sorted(objs.items()):
            local = os.path.join(files_dir, *rel.split("/"))
            prev = old.get(rel)
            if isinstance(prev, dict) and prev.get("size") == info["size"] and prev.get("etag") == info["etag"] \
                    and os.path.isfile(local) and not os.path.islink(local) and os.path.getsize(local) == info["size"]:
                kept[rel] = prev
            else:
                todo.append((rel, u, info["size"], info["etag"]))
        for rel in set(old) - set(objs):  # gone from the bucket: gone from the mirror
            local = os.path.join(files_dir, *rel.split("/")) if safe_key(rel) else None
            if local and os.path.lexists(local) and not os.path.isdir(local):
                os.remove(local)
                summary["removed"] += 1
        results = []
        if todo:
            groups = _groups(todo, lambda it: it[2], min(len(todo), sc.defaultParallelism * 4, 1024))
            results = (sc.parallelize(groups, len(groups))
                       .flatMap(lambda g, R=R, d=files_dir: _fetch(g, R, d)).collect())
        new = dict(kept)
        for rel, size, etag, err in results:
            if err is None:
                new[rel] = {"size": size, "etag": etag}
                summary["downloaded"] += 1
                summary["bytes_downloaded"] += size
            else:
                failed.add(f"{R}/{rel}")
                summary["failed"].append(f"{storage.redact(R)}/{rel}: {err}")
        tmp = f"{manifest_path}{storage.TMP_MARK}{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(new, f, sort_keys=True)
        os.replace(tmp, manifest_path)
        summary["objects"] += len(objs)
        summary["skipped"] += len(kept)
        summary["unsafe_keys"] += [f"{storage.redact(R)}/{k}" for k in sorted(unsafe)]
        where[R] = files_dir
    out = []
    for s in sources:
        if not s.remote:
            out.append(s)
            continue
        R = next(r for r in outer if url_inside(s.remote["root"], r))
        d = where[R]
        missing = [u for u in s.paths if u in failed]
        if missing:
            why = next(f for f in summary["failed"] if f.startswith(storage.redact(missing[0])))
            raise storage.StorageError(f"source {s.name}: {len(missing)} of its objects could not be mirrored "
                                       f"({why}): check the bucket and the credentials, then run again.")

        def local(u: str, R=R, d=d) -> str:
            rel = u[len(R):].strip("/")
            return os.path.join(d, *rel.split("/")) if rel else d

        out.append(dataclasses.replace(s, paths=sorted(local(u) for u in s.paths), root=local(s.remote["root"]),
                                       options={**s.options, LOCATION_MAP: [d, R]}))
    summary["seconds"] = round(time.time() - t0, 2)
    log(f"reelforge: mirrored {', '.join(summary['roots'])}: {summary['downloaded']} objects downloaded "
        f"({summary['bytes_downloaded']} bytes), {summary['skipped']} unchanged"
        + (f", {len(summary['unsafe_keys'])} unsafe keys skipped" if summary["unsafe_keys"] else "")
        + (f", {len(summary['failed'])} failed" if summary["failed"] else ""))
    return out, summary


# --- output: claim and publish ----------------------------------------------------------------

def _marker_bytes(name: str) -> bytes:
    return json.dumps({"recipe": name, "tool": "reelforge"}).encode()


def claim_url(url: str, name: str) -> None:
    """The URL is this recipe's to write: empty, or holding this recipe's run marker. Writes the
    marker (a missing bucket or no write permission is a StorageError sentence here, before any work)."""
    shown = storage.redact(url)
    fs, p = storage.url_fs(url)
    if storage.guarded(url, "read", fs.isfile, p):
        raise RecipeError(f"output {shown} is an object, not a prefix: pass --out with a prefix (a folder).")
    entries = storage.listdir(url)
    if entries:
        marker = None
        if RUN_MARKER in entries:
            try:
                marker = json.loads(storage.read_bytes(storage.join(url, RUN_MARKER)))
            except ValueError:
                marker = None
        if isinstance(marker, dict) and marker.get("recipe") == name:
            return
        if isinstance(marker, dict) and "recipe" in marker:
            raise RecipeError(f"output {shown} holds the run of recipe {marker['recipe']!r}, not {name!r}: "
                              "pass --out with another prefix (nothing was deleted).")
        listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RecipeError(f"output {shown} already holds objects reelforge did not write ({listed}): "
                          "pass --out with a new or empty prefix (nothing was deleted).")
    storage.write_bytes(storage.join(url, RUN_MARKER), _marker_bytes(name))


def _digests(path: str) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _compare(items: list[tuple]) -> list[tuple]:
    """Executor side: (rel, local, remote size, remote etag, old entry) -> (rel, size, sha256, same)."""
    out = []
    for rel, local, rsize, retag, old in items:
        size = os.path.getsize(local)
        sha, md5 = _digests(local)
        same = rsize == size and bool(retag) and (
            (isinstance(old, dict) and old.get("sha256") == sha and old.get("etag") == retag) or retag == md5)
        out.append((rel, size, sha, same))
    return out


def _upload(items: list[tuple], url: str) -> list[tuple]:
    """Executor side: publish (rel, local) at url/rel; (rel, etag)."""
    out = []
    for rel, local in items:
        out.append((rel, _put(local, storage.join(url, rel))))
    return out


def _put(local: str, target: str) -> str:
    storage.put_file(local, target)
    fs, p = storage.url_fs(target)
    fs.invalidate_cache(p)
    return str(storage.guarded(target, "read", fs.info, p).get("ETag") or "").strip('"')


def _hadoop_checksum(name: str) -> bool:
    """`.part-....parquet.crc`, `._SUCCESS.crc`: Hadoop's local checksums of Spark's files, not data."""
    return name.startswith(".") and name.endswith(".crc")


def _published_files(staging: str) -> dict[str, str]:
    """{relpath: local path} of what a finished run published in its folder (not _work/, the lock, temps)."""
    out = {}
    for rel, _size in storage.walk_files(staging):
        top = rel.split(os.sep, 1)[0]
        name = os.path.basename(rel)
        if top == "_work" or top.startswith(LOCK) or storage.TMP_MARK in name or _hadoop_checksum(name):
            continue
        out[rel.replace(os.sep, "/")] = os.path.join(staging, rel)
    return out


def publish(staging: str, url: str, spark, log: Callable[[str], None] = print, aux: str | None = None) -> dict:
    """Copy a finished run's published files from `staging` to `url` (see the module's docstring).
    Returns {uploaded, uploaded_bytes, skipped, deleted, temps_removed, files, seconds}."""
    t0 = time.time()
    shown = storage.redact(url)
    aux = aux or storage.staging_dir(url, "publish")
    files = _published_files(staging)
    # the reports name where things are: the URL, not the staging folder
    rewritten = os.path.join(aux, "reports")
    shutil.rmtree(rewritten, ignore_errors=True)
    os.makedirs(rewritten)
    for name in REPORTS:
        if name in files:
            with open(files[name], encoding="utf-8") as f:
                text = f.read()
            text = text.replace(json.dumps(staging)[1:-1], shown).replace(staging, shown)
            with open(os.path.join(rewritten, name), "w", encoding="utf-8") as f:
                f.write(text)
            files[name] = os.path.join(rewritten, name)
    temps = storage.remove_temps(url)
    fs, p = storage.url_fs(url)
    fs.invalidate_cache(p)
    remote = {u[len(url) + 1:]: info for u, info in list_objects(url).items() if url_inside(u, url)}
    old_manifest = {}
    if PUBLISHED in remote:
        try:
            old_manifest = json.loads(storage.read_bytes(storage.join(url, PUBLISHED)))
        except ValueError:
            old_manifest = {}
    old_manifest = old_manifest if isinstance(old_manifest, dict) else {}
    old_index_shards = set()
    if "shards/index.json" in remote:
        try:
            idx = json.loads(storage.read_bytes(storage.join(url, "shards/index.json")))
            old_index_shards = {f"shards/{s['shard']}" for s in idx.get("shards") or []
                                if isinstance(s, dict) and isinstance(s.get("shard"), str)}
        except (ValueError, AttributeError):
            pass

    sc = spark.sparkContext
    n_tasks = min(len(files), sc.defaultParallelism * 4, 1024) or 1
    items = [(rel, local, remote.get(rel, {}).get("size"), remote.get(rel, {}).get("etag"), old_manifest.get(rel))
             for rel, local in sorted(files.items())]
    groups = _groups(items, lambda it: os.path.getsize(it[1]), n_tasks)
    compared = sc.parallelize(groups, len(groups)).flatMap(_compare).collect() if groups else []
    info = {rel: {"size": size, "sha256": sha} for rel, size, sha, _ in compared}
    changed = sorted(rel for rel, _, _, same in compared if not same)
    stale = sorted(rel for rel in remote if rel not in files and rel not in (PUBLISHED, RUN_MARKER)
                   and (rel in old_manifest or rel in old_index_shards or rel.split("/", 1)[0] in _CLEARED
                        or rel.startswith("shards/.nv-meta/")))
    uploaded, up_bytes, etags = 0, 0, {}
    if changed or stale:
        # nothing may say "complete" while the objects change: the index and the report go first
        for rel in ("shards/index.json", "report.json"):
            if rel in remote:
                storage.remove(storage.join(url, rel))
        for rel in stale:
            storage.remove(storage.join(url, rel))
        last = ["shards/index.json", *[r for r in REPORTS if r != "report.json"], "report.json"]
        bulk = [(rel, files[rel]) for rel in changed if rel not in last]
        if bulk:
            ug = _groups(bulk, lambda it: os.path.getsize(it[1]), min(len(bulk), sc.defaultParallelism * 4, 1024))
            for rel, etag in sc.parallelize(ug, len(ug)).flatMap(lambda g, u=url: _upload(g, u)).collect():
                etags[rel] = etag
        for rel in last:  # from the driver, in this order; the index and report.json always (deleted above)
            if rel in files and (rel in changed or rel in ("shards/index.json", "report.json")):
                etags[rel] = _put(files[rel], storage.join(url, rel))
        uploaded = len(etags)
        up_bytes = sum(info[r]["size"] for r in etags)
    manifest = {rel: {**info[rel], "etag": etags.get(rel, remote.get(rel, {}).get("etag"))} for rel in sorted(files)}
    if manifest != old_manifest:
        storage.write_bytes(storage.join(url, PUBLISHED), json.dumps(manifest, sort_keys=True, indent=1).encode())
    shutil.rmtree(rewritten, ignore_errors=True)
    summary = {"url": shown, "files": len(files), "uploaded": uploaded, "uploaded_bytes": up_bytes,
               "skipped": len(files) - uploaded, "deleted": len(stale), "temps_removed": temps,
               "seconds": round(time.time() - t0, 2)}
    log(f"reelforge: published to {shown}: {uploaded} objects uploaded ({up_bytes} bytes), "
        f"{summary['skipped']} unchanged, {len(stale)} stale deleted"
        + (f", {temps} leftover temporary objects removed" if temps else ""))
    return summary


# --- the entry point --------------------------------------------------------------------------

def needs_remote(recipe) -> bool:
    return storage.is_url(recipe.output) or any(s.remote for s in recipe.sources)


def run(recipe, master: str | None = None, log: Callable[[str], None] = print, spark=None,
        work: str | None = None) -> dict:
    """`reelforge run` for any recipe: a local one goes straight to `jobs.run.run_recipe`; one with
    sources or output on a URL is mirrored, run in its staging folder, and published. Returns the
    run's report (its `paths` name the URL); `report["mirror"]` and `report["publish"]` say what
    moved (`publish["uploaded"]` counts the objects written)."""
    from reelforge.jobs.run import acquire_lock, release_lock, run_recipe

    if not needs_remote(recipe):
        return run_recipe(recipe, master=master, log=log, spark=spark)
    try:
        return _run(recipe, master, log, spark, work, acquire_lock, release_lock, run_recipe)
    except (RecipeError, storage.StorageError):
        raise
    except Exception as e:  # noqa: BLE001 - a StorageError raised in an executor comes back wrapped by Spark
        m = re.search(r"StorageError: (.+)", str(e))
        if m:
            raise storage.StorageError(m.group(1).strip()) from None
        raise


def _run(recipe, master, log, spark, work, acquire_lock, release_lock, run_recipe) -> dict:
    from reelforge.jobs.spark import get_spark

    url = recipe.output if storage.is_url(recipe.output) else None
    if url:
        claim_url(url, recipe.name)  # before any work: a foreign prefix or a missing bucket is one sentence
    if spark is None:
        spark = get_spark(master or recipe.spark.get("master"), recipe.spark.get("conf"))
    mirror = None
    sources = recipe.sources
    if any(s.remote for s in sources):
        sources, mirror = mirror_sources(sources, spark, log)
    if not url:
        report = run_recipe(dataclasses.replace(recipe, sources=sources, digests=None), master=master, log=log,
                            spark=spark)
        report["mirror"] = mirror
        return report
    staging = os.path.abspath(work or recipe.work or storage.staging_dir(url))
    aux = storage.staging_dir(url, "publish")
    os.makedirs(aux, exist_ok=True)
    lock = acquire_lock(aux, recipe.name)  # one run at a time publishes to this URL from this machine
    try:
        log(f"reelforge: output {storage.redact(url)} (staged in {staging})")
        local = dataclasses.replace(recipe, output=staging, sources=sources, digests=None)
        report = run_recipe(local, master=master, log=log, spark=spark)
        pub = publish(staging, url, spark, log, aux)
    finally:
        release_lock(lock)
    report["paths"] = {k: v.replace(staging, storage.redact(url)) if isinstance(v, str) else v
                       for k, v in (report.get("paths") or {}).items()}
    report["publish"] = pub
    report["mirror"] = mirror
    if not recipe.keep_work:
        shutil.rmtree(staging, ignore_errors=True)
    return report
