"""The curation job: ingest -> recipe steps -> shards, with the ledger and the run report.

Each step's output is saved as Parquet under `<out>/_work/NN_step/` with a fingerprint
of everything that produced it (the steps, the sources and the sha256 of their content);
a re-run skips the steps whose fingerprint still matches, so a crashed job continues
instead of starting over. A step marker that cannot be read counts as "not done".

The output folder is the run's own, and the run deletes nothing it did not write:
- it must be missing, empty, or hold this recipe's run marker (`_reelforge_run.json`);
  anything else is refused in one sentence before a file is touched (so is a folder that
  holds, or lies where a source searches for, the inputs: see `jobs.recipe`);
- one run at a time: `_reelforge.lock` is created atomically with the run's pid and host;
  a second run is refused, a lock whose pid is dead on this host is taken over;
- before any shard is written, the previous run's index, report, ledger and samples table
  are removed (index first), then the shards that index (or an unfinished write) named:
  a run killed halfway leaves either the old complete output or no index and no report,
  never a report naming shards that are gone. The index and the report are written last,
  each atomically (a temporary name, then os.replace);
- a run that cannot write (disk full, read-only, I/O error) ends in one sentence
  (`OutputWriteError`) and leaves no temporary files;
- `output.keep_work: false` removes `_work/` (the step outputs, their markers, the digest cache,
  media that steps wrote there) once the run is complete, after the report: the next run then
  recomputes every step. A run that fails keeps what it finished, so a re-run resumes.

Intermediates (`_work/NN_step/`, the shard write results) are zstd-compressed Parquet.
"""

from __future__ import annotations

import errno
import glob
import importlib
import json
import os
import re
import shutil
import socket
import threading
import time
from typing import Callable

from reelforge.jobs.recipe import Recipe, RecipeError
from reelforge.jobs.spark import pid_alive

LEDGER_COLUMNS = ["id", "source", "source_key", "source_location", "kind", "fate", "shard",
                  "step", "reason", "detail", "dup_of", "parent_id"]
RUN_MARKER = "_reelforge_run.json"
LOCK = "_reelforge.lock"
STEP_MARKER = "_REELFORGE"
PENDING = "shards_pending.json"  # under _work: the shard names a write is about to make
# what a run writes at the top of its output folder (a folder holding only these is a run's)
OWNED = {"_work", "shards", "ledger", "samples", "report.json", "report.md", "report.html", "funnel.png", "embeddings",
         RUN_MARKER, LOCK}


class AccountingError(Exception):
    """Inputs != kept + dropped: something was lost, and the run must not pass silently."""


class OutputWriteError(Exception):
    """The output folder cannot take what the run writes (disk full, read-only, I/O error)."""


# --- small atomic files ------------------------------------------------------------------

def write_json_atomic(path: str, obj, **kw) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, **kw)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_json(path: str):
    """A JSON file's data, or None when it is missing, empty or corrupt."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _done(path: str, fingerprint: str) -> bool:
    marker = _read_json(os.path.join(path, STEP_MARKER))
    return isinstance(marker, dict) and marker.get("fingerprint") == fingerprint


def _mark(path: str, fingerprint: str, **extra) -> None:
    write_json_atomic(os.path.join(path, STEP_MARKER), {"fingerprint": fingerprint, **extra})


# --- the output folder: ownership and the lock ----------------------------------------------


def _legacy_run(out: str, entries: list[str], name: str) -> bool:
    """An output written before run markers existed: only the names a run writes, its step
    work folder, and (if any) an index naming this recipe."""
    if not set(entries) <= OWNED or "_work" not in entries:
        return False
    index = _read_json(os.path.join(out, "shards", "index.json"))
    return index is None or (isinstance(index, dict) and index.get("recipe") == name)


def _check_owned(out: str, name: str) -> None:
    entries = sorted(e for e in os.listdir(out) if not e.startswith(LOCK))  # the lock and its temporaries
    if not entries:
        return
    marker_path = os.path.join(out, RUN_MARKER)
    marker = _read_json(marker_path)
    if isinstance(marker, dict) and marker.get("recipe") == name:
        return
    if isinstance(marker, dict) and "recipe" in marker:
        raise RecipeError(f"output folder {out} holds the run of recipe {marker['recipe']!r}, not {name!r}: "
                          "pass --out with another folder (nothing was deleted).")
    if os.path.lexists(marker_path):
        raise RecipeError(f"output folder {out} has a run marker that cannot be read ({marker_path}): pass --out "
                          "with another folder, or delete the marker if the folder is this recipe's output.")
    if _legacy_run(out, entries, name):
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise RecipeError(f"output folder {out} already holds files reelforge did not write ({shown}): "
                      "pass --out with a new or empty folder (nothing was deleted).")


def _lock_holder(path: str) -> dict | None:
    holder = _read_json(path)
    return holder if isinstance(holder, dict) else None


def acquire_lock(out: str, name: str) -> str:
    """Create `out/_reelforge.lock` atomically (a complete file linked into place, so it is
    never seen half written); refuse when another live run holds it, take over a lock whose
    pid is dead on this host. Returns the lock path."""
    path = os.path.join(out, LOCK)
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "recipe": name, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            os.link(tmp, path)
            return path
        except FileExistsError:
            pass
        except OSError as e:  # a filesystem without hard links: O_CREAT|O_EXCL, then the content
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                return path
        finally:
            os.remove(tmp)
        holder = _lock_holder(path)
        if holder is None and os.path.exists(path) and time.time() - os.path.getmtime(path) < 10:
            time.sleep(0.5)  # a lock being written (O_EXCL fallback): look again
            holder = _lock_holder(path)
        if holder is not None and holder.get("host") == host and isinstance(holder.get("pid"), int) \
                and not pid_alive(holder["pid"]):
            stale = f"{path}.stale-{os.getpid()}"
            try:
                os.rename(path, stale)
            except FileNotFoundError:
                continue
            if _lock_holder(stale) != holder:  # another run took it over in between: give it back
                try:
                    os.link(stale, path)
                except FileExistsError:
                    pass
            os.remove(stale)
            continue
        if holder is None and not os.path.exists(path):
            continue
        who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
               if holder else "a process whose lock cannot be read")
        raise RecipeError(f"output folder {out} is in use by another reelforge run ({who}): wait for it "
                          f"to finish or pass another --out; if no run is alive, delete {path}.")
    raise RecipeError(f"output folder {out}: could not take the lock {path}; try again.")


def release_lock(path: str) -> None:
    holder = _lock_holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def claim_output(recipe: Recipe) -> str:
    """Check the output folder is this run's to write, create it, take the lock and write the
    run marker. Returns the lock path; raises RecipeError (nothing touched) otherwise."""
    out = recipe.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise RecipeError(f"output folder {out} is a file: pass --out with a folder.")
    try:
        if os.path.isdir(out):
            _check_owned(out, recipe.name)
        os.makedirs(out, exist_ok=True)
        lock = acquire_lock(out, recipe.name)
    except OSError as e:
        raise RecipeError(f"output folder {out} cannot be written ({e.strerror}): "
                          "pass --out with a folder you can write.") from e
    try:
        _check_owned(out, recipe.name)  # again, now that no other run can be writing it
        if not isinstance(_read_json(os.path.join(out, RUN_MARKER)), dict):
            write_json_atomic(os.path.join(out, RUN_MARKER), {"recipe": recipe.name, "tool": "reelforge"})
        os.makedirs(os.path.join(out, "_work"), exist_ok=True)
    except OSError as e:
        release_lock(lock)
        raise RecipeError(f"output folder {out} cannot be written ({e.strerror}): "
                          "pass --out with a folder you can write.") from e
    except BaseException:
        release_lock(lock)
        raise
    return lock


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _clear_previous_output(out: str, shard_dir: str, work: str) -> None:
    """Remove what the previous run published, the parts that say "complete" first, then the
    shards it wrote (by name: a file someone else put in shards/ stays)."""
    index = _read_json(os.path.join(shard_dir, "index.json"))
    pending = _read_json(os.path.join(work, PENDING))
    names = set()
    if isinstance(index, dict):
        names |= {s.get("shard") for s in index.get("shards") or [] if isinstance(s, dict)}
    if isinstance(pending, list):
        names |= set(pending)
    from reelforge.mixers.stats import SAMPLES_DIR

    for p in [os.path.join(shard_dir, "index.json"), os.path.join(out, "report.json"),
              os.path.join(out, "report.md"), os.path.join(out, "report.html"), os.path.join(out, "funnel.png"),
              os.path.join(out, "ledger"), os.path.join(out, SAMPLES_DIR)]:
        _remove(p)
    for name in names:
        if isinstance(name, str) and name and os.path.basename(name) == name:
            _remove(os.path.join(shard_dir, name))
    _remove_temps(out)


def _remove_temps(out: str) -> None:
    for pattern in ("*.tmp-*", "_work/*.tmp-*", "shards/*.tmp-*", "shards/.stats", "_work/report-staging"):
        for p in glob.glob(os.path.join(glob.escape(out), pattern)):
            try:
                _remove(p)
            except OSError:
                pass


# --- I/O errors as one sentence ------------------------------------------------------------

_IO_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
              errno.EROFS: "Read-only file system", errno.EIO: "Input/output error",
              errno.EFBIG: "File too large"}
_IO_TEXT = re.compile("|".join(re.escape(t) for t in _IO_ERRNOS.values()), re.I)


def io_error_message(e: BaseException) -> str | None:
    """The strerror of a write failure (disk full, quota, read-only, I/O error) behind `e`,
    also when Spark wrapped it (PythonException / Py4JJavaError text); None otherwise."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _IO_ERRNOS:
            return _IO_ERRNOS[e.errno]
        m = _IO_TEXT.search(str(e))
        if m:
            return next(t for t in _IO_ERRNOS.values() if t.lower() == m.group(0).lower())
        e = e.__cause__ or e.__context__
    return None


# --- the job -------------------------------------------------------------------------------

def run_recipe(recipe: Recipe, master: str | None = None, log: Callable[[str], None] = print,
               spark=None) -> dict:
    lock = claim_output(recipe)
    try:
        return _run(recipe, master, log, spark)
    except BaseException as e:
        _remove_temps(recipe.output)
        said = io_error_message(e) if isinstance(e, Exception) else None
        if said is not None:
            raise OutputWriteError(f"cannot write to {recipe.output}: {said}.") from e
        raise
    finally:
        release_lock(lock)


def _spark_hasher(spark):
    from reelforge.jobs.recipe import sha256_file

    def hash_many(paths: list[str]) -> dict[str, str]:
        total = sum(os.path.getsize(p) for p in paths)
        if len(paths) < 2 or total < (256 << 20):
            return {p: sha256_file(p) for p in paths}
        sc = spark.sparkContext
        rdd = sc.parallelize(paths, min(len(paths), sc.defaultParallelism * 4))
        return dict(rdd.map(lambda p: (p, sha256_file(p))).collect())

    return hash_many


def _run(recipe: Recipe, master: str | None, log: Callable[[str], None], spark) -> dict:
    from pyspark.sql import functions as F

    from reelforge.curation.shards import read_stats
    from reelforge.jobs.engine import run_step
    from reelforge.jobs.ingest import check_counts, ingest
    from reelforge.jobs.media_stamp import media_stamp
    from reelforge.jobs.progress import step_progress
    from reelforge.jobs.report import build_report, ledger_summary, write_report
    from reelforge.jobs.semantic import check_embeddings
    from reelforge.jobs.shards import write_shards
    from reelforge.jobs.spark import get_spark, spark_schema, ui_url

    t_start = time.time()
    # the funnel plot's matplotlib (~1 s of imports) loads while the driver waits on the JVM
    threading.Thread(target=_preload_matplotlib, daemon=True).start()
    out = recipe.output
    work = os.path.join(out, "_work")
    check_embeddings(recipe, out)  # from_step names an earlier keeper; RUN/embeddings/ holds this recipe's only
    if spark is None:
        spark = get_spark(master or recipe.spark.get("master"), recipe.spark.get("conf"))
    log(f"reelforge: recipe {recipe.name!r} on {spark.sparkContext.master}, output {out}")
    url = ui_url(spark)
    if url:
        log(f"Spark UI: {url}")
    recipe.digests = None  # hashed afresh for every run (unchanged files come from the cache)
    recipe.source_digests(os.path.join(work, "digests.json"), _spark_hasher(spark))
    schema = spark_schema()
    timings: dict[str, float] = {}
    n_phases = len(recipe.steps) + 2
    step_names = ["ingest"] + [s.name for s in recipe.steps]
    reused: list[str] = []  # the steps whose fingerprint matched: their _work/ output is reused

    def step_done(idx: int, name: str) -> bool:
        path = os.path.join(work, f"{idx:02d}_{name}")
        if not _done(path, recipe.fingerprint(idx)):
            return False
        log(f"[{idx + 1}/{n_phases}] {name}: already done, reusing {path}")
        reused.append(name)
        return True

    # --- a no-op re-run: the shards, ledger, samples and report of this very recipe are in place --
    shard_dir = os.path.join(out, "shards")
    shard_fp = shards_fingerprint(recipe)
    previous = _published_output(out, shard_dir, shard_fp)
    if previous is not None:  # and the media files the shards were read from are as they were then
        last = os.path.join(work, f"{len(recipe.steps):02d}_{step_names[-1]}")
        recorded = (_read_json(os.path.join(shard_dir, "index.json")) or {}).get("media_stamp")
        if not _done(last, recipe.fingerprint(len(recipe.steps))) or recorded != media_stamp(spark, last):
            previous = None  # (without _work/, keep_work: false, the media cannot be checked: recompute)
    if previous is not None:
        for idx, name in enumerate(step_names):
            step_done(idx, name)
        _remove(os.path.join(work, PENDING))
        if not recipe.keep_work:
            _remove(work)
        previous["reused"] = step_names + ["shards"]
        log(f"nothing to do: {out} already holds this recipe's shards, ledger, samples and report "
            f"(reused all {len(step_names)} steps and the shards)")
        return previous

    def stage(idx: int, name: str, build, check=None) -> str:
        path = os.path.join(work, f"{idx:02d}_{name}")
        fp = recipe.fingerprint(idx)
        if step_done(idx, name):
            marker = _read_json(os.path.join(path, STEP_MARKER)) or {}
            timings[name] = marker.get("seconds", 0.0)
            return path
        t = time.time()
        log(f"[{idx + 1}/{n_phases}] {name} ...")
        with step_progress(spark, f"[{idx + 1}/{n_phases}] {name}", log):
            build().write.mode("overwrite").option("compression", "zstd").parquet(path)
        spark.catalog.clearCache()  # what a step persisted for itself (its keys, its scored rows) is done
        timings[name] = time.time() - t
        df = spark.read.schema(schema).parquet(path)
        if check is not None:
            problems = check(df)
            if problems:
                raise AccountingError(f"{name} lost records: " + "; ".join(problems[:5])
                                      + (f"; and {len(problems) - 5} more files" if len(problems) > 5 else ""))
        _mark(path, fp, seconds=timings[name])
        log(f"      {name}: {timings[name]:.1f}s")  # its drops: in the report (no extra Spark job here)
        return path

    ingested, per_file = ingest(spark, recipe.sources)
    prev = stage(0, "ingest", lambda: ingested, check=lambda df: check_counts(per_file, recipe.sources))
    for i, spec in enumerate(recipe.steps, 1):
        step = spec.build()
        src = prev  # steps that write media (clips, modes) put them beside the run: the context's workdir
        prev = stage(i, spec.name, lambda s=step, p=src: run_step(s, spark.read.schema(schema).parquet(p), work))
    final = spark.read.schema(schema).parquet(prev)

    # --- shards ---------------------------------------------------------------------------
    t = time.time()
    log(f"[{n_phases}/{n_phases}] write shards ...")
    stamp = media_stamp(spark, prev)  # the media as the shard writer is about to read them
    _clear_previous_output(out, shard_dir, work)
    os.makedirs(shard_dir, exist_ok=True)
    sh = recipe.shards
    results_path = os.path.join(work, "write_results")
    with step_progress(spark, f"[{n_phases}/{n_phases}] write shards", log):
        results, names, stats_dir, keyed = write_shards(
            final, shard_dir, max_samples=sh["max_samples"], max_bytes=sh["max_bytes"],
            shuffle=sh["shuffle"], seed=recipe.seed, prefix=sh["prefix"], rows_hint=_parquet_rows(prev),
            source=prev)
        write_json_atomic(os.path.join(work, PENDING), sorted(names.values()))
        results.write.mode("overwrite").option("compression", "zstd").parquet(results_path)
    keyed.unpersist()
    stats = read_stats(stats_dir, names)
    shutil.rmtree(stats_dir, ignore_errors=True)
    for leftover in glob.glob(os.path.join(glob.escape(shard_dir), "*.tmp-*")):
        os.remove(leftover)
    timings["write"] = time.time() - t
    results = spark.read.parquet(results_path)

    # --- ledger -----------------------------------------------------------------------------
    dropped = final.filter(F.col("drop_step").isNotNull()).select(
        "id", "source", "source_key", "source_location", "kind", F.lit("dropped").alias("fate"),
        F.lit(None).cast("string").alias("shard"), F.col("drop_step").alias("step"),
        F.col("drop_reason").alias("reason"), F.col("drop_detail").alias("detail"), "dup_of", "parent_id")
    written = final.filter(F.col("drop_step").isNull()).select(
        "id", "source", "source_key", "source_location", "kind", "parent_id").join(results, "id", "left").select(
        "id", "source", "source_key", "source_location", "kind",
        F.coalesce(F.col("status"), F.lit("dropped")).alias("fate"), "shard",
        F.when(F.col("status") == "kept", F.lit(None)).otherwise(F.lit("write")).alias("step"),
        F.when(F.col("status") == "kept", F.lit(None))
         .otherwise(F.coalesce(F.col("reason"), F.lit("not_written"))).alias("reason"),
        F.col("detail"), F.lit(None).cast("string").alias("dup_of"), "parent_id")
    # the ledger, the samples table and the report: Spark jobs of their own, with their own bar
    with step_progress(spark, f"[{n_phases}/{n_phases}] ledger + report", log):
        ledger_path = os.path.join(out, "ledger")
        (dropped.unionByName(written).select(*LEDGER_COLUMNS)
         .repartition(max(1, len(stats) // 64 + 1)).sortWithinPartitions("id")
         .write.mode("overwrite").parquet(ledger_path))
        ledger = spark.read.parquet(ledger_path)

        inputs = _parquet_rows(os.path.join(work, "00_ingest"))
        summary = ledger_summary(ledger)
        derived, distinct_ids = summary["derived"], summary["ids"]
        kept, n_dropped = summary["kept"], summary["dropped"]
        kept_in_shards = sum(s["samples"] for s in stats)

        # per-sample token table beside the ledger: what `reelforge plan` reads instead of the shards
        from reelforge.curation.energon_meta import write_energon_meta
        from reelforge.jobs.samples import write_sample_stats
        from reelforge.mixers.stats import SAMPLES_DIR

        samples_path = os.path.join(out, SAMPLES_DIR)
        write_sample_stats(spark, final, shard_dir, [s["shard"] for s in stats], samples_path)
        in_table = _parquet_rows(samples_path)

        report = build_report(spark, recipe, final, ledger, summary, stats, inputs, timings)
    report["reused"] = list(reused)
    report["elapsed_s"] = round(time.time() - t_start, 2)
    report["paths"] = {"shards": shard_dir, "index": os.path.join(shard_dir, "index.json"),
                       "ledger": ledger_path, "samples": samples_path, "report": os.path.join(out, "report.md")}

    # the index and the report go last, each atomically: they are what says "complete"
    write_energon_meta(shard_dir, [s["shard"] for s in stats], log=log)  # .nv-meta/: Energon reads the folder
    index = {"recipe": recipe.name, "seed": recipe.seed, "shards": stats,
             "samples": kept_in_shards, "bytes": sum(s["bytes"] for s in stats),
             "sources": _sum_sources(stats), "fingerprint": shard_fp, "media_stamp": stamp}
    write_json_atomic(os.path.join(shard_dir, "index.json"), index, indent=1, sort_keys=True)
    staging = os.path.join(work, "report-staging")
    _remove(staging)
    os.makedirs(staging)
    write_report(report, staging)
    for name in sorted(os.listdir(staging), key=lambda n: n == "report.json"):  # report.json last
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    _remove(staging)
    _remove(os.path.join(work, PENDING))
    if not recipe.keep_work:  # complete: the index and the report are in place
        _remove(work)
    plus = f" + {derived} derived" if derived else ""
    log(f"done in {report['elapsed_s']:.1f}s: {inputs} inputs{plus} = {kept} kept + {n_dropped} dropped, "
        f"{len(stats)} shards")
    problems = []
    if inputs + derived != kept + n_dropped:
        problems.append(f"inputs {inputs} + derived {derived} != kept {kept} + dropped {n_dropped}")
    if distinct_ids != inputs + derived:
        problems.append(f"{inputs + derived} samples but {distinct_ids} distinct ids in the ledger")
    if kept != kept_in_shards:
        problems.append(f"ledger says {kept} kept but the shards hold {kept_in_shards}")
    if in_table != kept_in_shards:
        problems.append(f"the samples table has {in_table} rows but the shards hold {kept_in_shards}")
    if problems:
        raise AccountingError("sample accounting failed: " + "; ".join(problems))
    return report


def shards_fingerprint(recipe: Recipe) -> str:
    """What the shard phase's output depends on: the final step's fingerprint (every step, the
    sources and their content), the shard settings and the seed."""
    import hashlib

    body = {"steps": recipe.fingerprint(len(recipe.steps)), "shards": recipe.shards, "seed": recipe.seed,
            "recipe": recipe.name}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _published_output(out: str, shard_dir: str, fingerprint: str) -> dict | None:
    """The previous run's report when `out` holds the complete output of the run `fingerprint`
    names (its index records it, every shard the index names is there with its recorded size, and
    the ledger, samples table, Energon metadata and report are in place); else None."""
    from reelforge.curation.energon_meta import META_DIR, energon_available
    from reelforge.mixers.stats import SAMPLES_DIR

    index = _read_json(os.path.join(shard_dir, "index.json"))
    if not isinstance(index, dict) or index.get("fingerprint") != fingerprint:
        return None
    shards = index.get("shards")
    if not isinstance(shards, list):
        return None
    for s in shards:
        name = s.get("shard") if isinstance(s, dict) else None
        if not isinstance(name, str) or not name or os.path.basename(name) != name:
            return None
        try:
            if os.path.getsize(os.path.join(shard_dir, name)) != s.get("bytes"):
                return None
        except OSError:
            return None
    for folder in ("ledger", SAMPLES_DIR):
        if not os.path.exists(os.path.join(out, folder, "_SUCCESS")):
            return None
    for name in ("report.md", "report.html", "funnel.png"):
        if not os.path.isfile(os.path.join(out, name)):
            return None
    if shards and energon_available() and not os.path.isdir(os.path.join(shard_dir, META_DIR)):
        return None
    report = _read_json(os.path.join(out, "report.json"))
    return report if isinstance(report, dict) and report.get("recipe") == index.get("recipe") else None


def _preload_matplotlib() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # what plot_funnel sets: files, no display
        importlib.import_module("matplotlib.pyplot")
    except Exception:  # noqa: BLE001 - the report imports it again and says what is wrong
        pass


def _parquet_rows(path: str) -> int:
    """The rows of a Parquet folder Spark wrote, from the files' footers (no Spark job)."""
    import pyarrow.dataset as ds

    return ds.dataset(path, format="parquet").count_rows()


def _sum_sources(stats: list[dict]) -> dict:
    total: dict[str, int] = {}
    for s in stats:
        for k, v in s["sources"].items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))
