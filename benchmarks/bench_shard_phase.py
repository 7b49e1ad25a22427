"""The shard phase end to end (issue 14 part 5): a step's Parquet output -> shuffled WebDataset
tars + write results + per-shard stats, on Spark `local[2]`, against a plain pyarrow +
`webdataset.ShardWriter` script on the same input and the same 2 cores.

    .venv/bin/python benchmarks/bench_shard_phase.py [--corpus text,image] [--docs 200000]
        [--images 50000] [--repeats 3] [--work /tmp/bench-shard-phase] [--master local[2]]
        [--samples-table] [--json out.json] [--baseline OLD_jobs_shards.py]

The inputs, built once per --work and reused (the sample rows ingest leaves, as a Spark step
writes them: zstd Parquet, 8 files):
  - text: --docs documents of 150-1,000 words drawn from the real-text pool that
    bench_dedup_vs_datatrove.py builds from the machine's man pages, docs and docstrings
    (its cache, `pool-v1.txt.gz`, is shared when --pool names its folder), read from JSONL
    by the `text` reader;
  - image: --images small JPEGs (noise, ~5-20 KB, 84-144 px a side) on disk, each referenced by
    path from a JSONL manifest row with a caption, read by the `jsonl` reader, with the fields
    probe fills (length, sha256, format, width, height, pHash) set from the files.

What is timed, per repeat, wall clock:
  project  what `jobs/run.py` times as "write": `write_shards(spark.read.parquet(step), ...)`
           (1000 samples a shard, no byte limit, shuffle, seed 0), the write results written as zstd
           Parquet, the per-shard stats read and their folder removed. With --samples-table,
           `jobs/samples.write_sample_stats` after it is timed apart (not in the MB/s).
  peer     one Python script on the same Parquet: pyarrow reads the live rows, sorts them by
           sha256(seed:id) (the project's order), and 2 forked `multiprocessing` workers (one per
           core) each write a contiguous half of the shards with `webdataset.ShardWriter(
           encoder=False, maxcount=1000)`: per sample the project's own `.json` member
           (`curation.shards.sample_json`) and the media file's bytes (open + read). It checks
           nothing (no sha256 of the media against probe, no per-sample results, no stats).
  baseline with --baseline FILE: the project's timing with another version of jobs/shards.py,
           e.g. the one before issue 14 part 5 (`git show fcaa9ad:jobs/shards.py > FILE`); its
           shards are checked to be the project's, file for file.
They alternate (the order reversed on odd repeats); medians are quoted. MB/s is of sample bytes:
the data of the tar members (`.json` + media); the tar bytes (headers, padding) are printed too.
CPU seconds are measured too (this process and every process below it, the Spark JVM and its
Python workers included, or the peer and its workers; from /proc): on a box shared with other work,
wall clock follows the neighbours, CPU time much less. Before the timed runs, one run of each
checks that both wrote the same shard names and that the first shard is the same file, byte for byte.

Figures only, no assertions on timing. The box is shared: quote medians, alternate.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SEED = 0
PER_SHARD = 1000
MAX_BYTES = 1 << 40  # shards are cut by count alone, as the peer cuts them
TAR_OPTS = dict(user="reelforge", group="reelforge", mode=0o444, mtime=0)  # as curation.shards.ShardFile
INPUT_VERSION = 1


# --- the inputs --------------------------------------------------------------------------------

def _text_jsonl(path: str, n: int, pool_dir: str, seed: int) -> None:
    from bench_dedup_vs_datatrove import text_pool

    pool = text_pool(pool_dir)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            target = rng.randint(150, 1000)
            words: list[str] = []
            while len(words) < target:
                words += pool[rng.randrange(len(pool))].split()
            f.write(json.dumps({"id": f"doc{i:07d}", "text": " ".join(words[:target])}, ensure_ascii=False) + "\n")


def _image_jsonl(path: str, n: int, media_dir: str, seed: int) -> dict[str, dict]:
    """The manifest and the JPEGs; returns what probe would fill in, by file path."""
    from bench_shard_writer import _words, make_jpeg

    rng = random.Random(seed)
    os.makedirs(media_dir, exist_ok=True)
    probed = {}
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            p = os.path.join(media_dir, f"{i // 1000:04d}", f"{i:07d}.jpg")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            w, h, length, sha = make_jpeg(rng, p)
            probed[p] = {"length": length, "sha256": sha, "format": "jpeg", "width": w, "height": h,
                         "phash": [rng.getrandbits(64) - (1 << 63)]}
            f.write(json.dumps({"image": p, "caption": _words(rng, rng.randint(40, 200)),
                                "url": f"https://example.com/{i}.jpg"}) + "\n")
    return probed


def build_input(work: str, corpus: str, n: int, pool_dir: str, spark) -> str:
    """The step output for `corpus` (built once): zstd Parquet in 8 files, as a Spark step writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reelforge.curation.readers import read_jsonl, read_text
    from reelforge.curation.schema import ARROW_SCHEMA
    from reelforge.jobs.spark import spark_schema

    base = os.path.join(work, f"input-{corpus}-{n}-v{INPUT_VERSION}")
    step = os.path.join(base, "step")
    if os.path.exists(os.path.join(base, "DONE")):
        return step
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    t = time.time()
    manifest = os.path.join(base, "input.jsonl")
    if corpus == "text":
        _text_jsonl(manifest, n, pool_dir, SEED)
        rows = list(read_text(manifest, "bench_text", base, {}))
    else:
        probed = _image_jsonl(manifest, n, os.path.join(base, "media"), SEED)
        rows = list(read_jsonl(manifest, "bench_images", base, {}))
        for r in rows:
            for m in r["media"] or []:
                m.update(probed[m["uri"]])
    raw = os.path.join(base, "raw")
    os.makedirs(raw)
    for k in range(0, len(rows), 20000):
        pq.write_table(pa.Table.from_pylist(rows[k:k + 20000], schema=ARROW_SCHEMA),
                       os.path.join(raw, f"part-{k // 20000:04d}.parquet"))
    (spark.read.schema(spark_schema()).parquet(raw).repartition(8)
     .write.mode("overwrite").option("compression", "zstd").parquet(step))
    shutil.rmtree(raw)
    with open(os.path.join(base, "DONE"), "w") as f:
        f.write(json.dumps({"rows": len(rows), "seconds": round(time.time() - t, 1)}))
    print(f"built {corpus} input: {len(rows)} rows in {time.time() - t:.0f}s ({step})", flush=True)
    return step


def input_bytes(step: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(step, "*.parquet")))


# --- CPU seconds (the box is shared: wall clock depends on the neighbours, CPU time much less) -----

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_cpu() -> float:
    """CPU seconds of this process and every process below it (the Spark JVM, its Python
    workers), reaped children included; Linux /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    kids, total, todo = _children(), 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    return total


# --- the project ---------------------------------------------------------------------------------

def load_writer(path: str):
    """`write_shards` of another version of jobs/shards.py (e.g. `git show REV:jobs/shards.py`),
    imported under its own name and shipped to the Spark workers by value."""
    import importlib.util

    from pyspark import cloudpickle

    spec = importlib.util.spec_from_file_location("bench_baseline_shards", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    cloudpickle.register_pickle_by_value(mod)
    return mod.write_shards


def run_project(spark, step: str, out: str, samples_table: bool, write_shards=None) -> dict:
    """What jobs/run.py times as "write" (and, apart, the samples table)."""
    import inspect

    from reelforge.curation.shards import read_stats
    from reelforge.jobs.run import _parquet_rows
    from reelforge.jobs.spark import spark_schema

    if write_shards is None:
        from reelforge.jobs.shards import write_shards
    kw = {"source": step} if "source" in inspect.signature(write_shards).parameters else {}

    shard_dir = os.path.join(out, "shards")
    os.makedirs(shard_dir)
    final = spark.read.schema(spark_schema()).parquet(step)
    cpu, t = tree_cpu(), time.time()
    results, names, stats_dir, keyed = write_shards(
        final, shard_dir, max_samples=PER_SHARD, max_bytes=MAX_BYTES, shuffle=True, seed=SEED,
        prefix="shard", rows_hint=_parquet_rows(step), **kw)
    t_layout = time.time() - t
    results.write.mode("overwrite").option("compression", "zstd").parquet(os.path.join(out, "write_results"))
    keyed.unpersist()
    stats = read_stats(stats_dir, names)
    shutil.rmtree(stats_dir, ignore_errors=True)
    for leftover in glob.glob(os.path.join(glob.escape(shard_dir), "*.tmp-*")):
        os.remove(leftover)
    seconds, cpu = time.time() - t, tree_cpu() - cpu
    spark.catalog.clearCache()
    out_d = {"seconds": seconds, "cpu_s": cpu, "layout_s": t_layout, "shards": len(stats),
             "samples": sum(s["samples"] for s in stats)}
    if samples_table:
        from reelforge.jobs.samples import write_sample_stats

        t = time.time()
        write_sample_stats(spark, final, shard_dir, [s["shard"] for s in stats], os.path.join(out, "samples"))
        out_d["samples_table_s"] = time.time() - t
    return out_d


# --- the peer ------------------------------------------------------------------------------------

_PEER: dict = {}  # the table and the shards' row indices, inherited by the forked workers


def _peer_worker(job: tuple[int, int]) -> int:
    import webdataset as wds

    from reelforge.curation.schema import rows_of
    from reelforge.curation.shards import encode_json, media_members, sample_json

    first, last = job
    table, shards, out = _PEER["table"], _PEER["shards"], _PEER["out"]
    n = 0
    with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=PER_SHARD, maxsize=1e15, verbose=0,
                         start_shard=first, encoder=False, **TAR_OPTS) as sink:
        for s in range(first, last):
            for r in rows_of(table.take(shards[s])):
                members = media_members(r)
                obj = {"__key__": r["id"], "json": encode_json(sample_json(r, [f"{r['id']}.{e}" for e in members]))}
                for m, ext in zip(r["media"] or [], members):
                    with open(m["uri"], "rb") as f:
                        obj[ext] = f.read()
                sink.write(obj)
                n += 1
    return n


def run_peer(step: str, out: str, workers: int = 2) -> dict:
    import multiprocessing

    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import webdataset  # noqa: F401 - imported (with torch) before the clock starts, as the workers inherit it

    os.makedirs(out)
    cpu, t = tree_cpu(), time.time()
    table = ds.dataset(step, format="parquet").to_table(filter=pc.field("drop_step").is_null())
    ids = table.column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{SEED}:{ids[i]}".encode()).hexdigest())
    shards = [order[k:k + PER_SHARD] for k in range(0, len(order), PER_SHARD)]
    _PEER.update(table=table, shards=shards, out=out)
    per = -(-len(shards) // workers)
    jobs = [(w * per, min(len(shards), (w + 1) * per)) for w in range(workers) if w * per < len(shards)]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        n = sum(pool.map(_peer_worker, jobs))
        pool.close()
        pool.join()  # the workers reaped: their CPU time counts in tree_cpu
    _PEER.clear()
    return {"seconds": time.time() - t, "cpu_s": tree_cpu() - cpu, "shards": len(shards), "samples": n}


# --- measuring -----------------------------------------------------------------------------------

def member_bytes(shard_dir: str) -> tuple[int, int]:
    """(bytes of the members' data, bytes of the tar files) under shard_dir."""
    data = files = 0
    for p in glob.glob(os.path.join(shard_dir, "*.tar")):
        files += os.path.getsize(p)
        with tarfile.open(p) as tf:
            data += sum(m.size for m in tf if m.isfile())
    return data, files


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_same(spark, step: str, work: str, baseline=None) -> dict:
    """One run of each: the same shard names, and the first shard the same file; with a baseline,
    every shard of the project the same file as the baseline's."""
    proj, peer, base = (os.path.join(work, f"check-{w}-{os.getpid()}") for w in ("project", "peer", "baseline"))
    for d in (proj, peer, base):
        shutil.rmtree(d, ignore_errors=True)
    run_project(spark, step, proj, False)
    run_peer(step, peer)
    names = {w: sorted(os.path.basename(p) for p in glob.glob(os.path.join(d, "**", "*.tar"), recursive=True))
             for w, d in (("project", proj), ("peer", peer))}
    first = names["project"][0] if names["project"] else None
    same_first = bool(first) and _sha(os.path.join(proj, "shards", first)) == _sha(os.path.join(peer, first))
    data, files = member_bytes(os.path.join(proj, "shards"))
    out = {"same_names": names["project"] == names["peer"], "first_shard_identical": same_first,
           "shards": len(names["project"]), "member_bytes": data, "tar_bytes": files}
    if baseline is not None:
        run_project(spark, step, base, False, baseline)
        shas = [{n: _sha(os.path.join(d, "shards", n)) for n in sorted(os.listdir(os.path.join(d, "shards")))}
                for d in (proj, base)]
        out["baseline_identical"] = shas[0] == shas[1]
    for d in (proj, peer, base):
        shutil.rmtree(d, ignore_errors=True)
    return out


def bench_corpus(spark, corpus: str, step: str, work: str, repeats: int, samples_table: bool,
                 baseline=None) -> dict:
    check = check_same(spark, step, work, baseline)
    print(f"{corpus}: {check['shards']} shards, {check['member_bytes'] / 1e6:.0f} MB of members "
          f"({check['tar_bytes'] / 1e6:.0f} MB of tars) from {input_bytes(step) / 1e6:.0f} MB of zstd Parquet; "
          f"same shard names as the peer: {check['same_names']}, first shard identical: "
          f"{check['first_shard_identical']}" + (f"; every shard identical to the baseline's: "
                                                 f"{check['baseline_identical']}" if baseline else ""), flush=True)
    order = ["project", "peer"] + (["baseline"] if baseline else [])
    runs: dict[str, list[dict]] = {w: [] for w in order}
    for rep in range(repeats):
        for who in (order if rep % 2 == 0 else order[::-1]):
            d = os.path.join(work, f"out-{who}-{os.getpid()}")  # two benchmarks may share --work
            shutil.rmtree(d, ignore_errors=True)
            r = (run_peer(step, d) if who == "peer" else
                 run_project(spark, step, d, samples_table, baseline if who == "baseline" else None))
            runs[who].append(r)
            extra = (f"  (layout {r['layout_s']:.1f}s" + (f", samples table {r['samples_table_s']:.1f}s"
                                                            if "samples_table_s" in r else "") + ")"
                     if who != "peer" else "")
            print(f"  rep {rep} {who:<8} {r['seconds']:7.2f}s {check['member_bytes'] / r['seconds'] / 1e6:7.1f} MB/s"
                  f"  cpu {r['cpu_s']:6.1f}s" + extra, flush=True)
            shutil.rmtree(d)
    med = {w: statistics.median(r["seconds"] for r in v) for w, v in runs.items()}
    med_cpu = {w: statistics.median(r["cpu_s"] for r in v) for w, v in runs.items()}
    mbs = {w: check["member_bytes"] / s / 1e6 for w, s in med.items()}
    res = {"corpus": corpus, **check, "input_parquet_bytes": input_bytes(step),
           "seconds": {w: [round(r["seconds"], 2) for r in v] for w, v in runs.items()},
           "median_s": {w: round(s, 2) for w, s in med.items()},
           "median_cpu_s": {w: round(s, 2) for w, s in med_cpu.items()},
           "cpu_s": {w: [round(r["cpu_s"], 2) for r in v] for w, v in runs.items()},
           "mb_per_cpu_s": {w: round(check["member_bytes"] / s / 1e6, 1) for w, s in med_cpu.items()},
           "mb_per_s": {w: round(v, 1) for w, v in mbs.items()},
           "ratio_project_over_peer": round(mbs["project"] / mbs["peer"], 3),
           "layout_median_s": round(statistics.median(r["layout_s"] for r in runs["project"]), 2)}
    if samples_table:
        res["samples_table_median_s"] = round(statistics.median(r["samples_table_s"] for r in runs["project"]), 2)
    print(f"{corpus}: median of {repeats}: project {med['project']:.2f}s = {mbs['project']:.1f} MB/s, "
          f"peer {med['peer']:.2f}s = {mbs['peer']:.1f} MB/s, ratio project/peer {res['ratio_project_over_peer']:.2f}; "
          f"CPU project {med_cpu['project']:.1f}s, peer {med_cpu['peer']:.1f}s"
          + (f"; samples table {res['samples_table_median_s']:.1f}s" if samples_table else ""), flush=True)
    if baseline:
        res["ratio_baseline_over_peer"] = round(mbs["baseline"] / mbs["peer"], 3)
        res["speedup_project_over_baseline"] = round(med["baseline"] / med["project"], 2)
        print(f"{corpus}: baseline {med['baseline']:.2f}s = {mbs['baseline']:.1f} MB/s (ratio to the peer "
              f"{res['ratio_baseline_over_peer']:.2f}, CPU {med_cpu['baseline']:.1f}s); project / baseline speed "
              f"{res['speedup_project_over_baseline']:.2f}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="text,image", help="text, image or both (comma-separated)")
    ap.add_argument("--docs", type=int, default=200_000, help="text documents")
    ap.add_argument("--images", type=int, default=50_000, help="image-text samples")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/bench-shard-phase", help="inputs are built here once and reused")
    ap.add_argument("--pool", help="folder of bench_dedup_vs_datatrove's text pool cache (default: --work)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--samples-table", action="store_true", help="also time jobs/samples.py after each write")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--baseline", help="another jobs/shards.py (`git show REV:jobs/shards.py > FILE`) run as a third "
                                       "contestant on the same input, alternating; its shards are checked identical")
    args = ap.parse_args(argv)

    from reelforge.jobs.spark import get_spark

    os.makedirs(args.work, exist_ok=True)
    spark = get_spark(args.master)
    out = []
    try:
        for corpus in args.corpus.split(","):
            n = args.docs if corpus == "text" else args.images
            step = build_input(args.work, corpus, n, args.pool or args.work, spark)
            out.append(bench_corpus(spark, corpus, step, args.work, args.repeats, args.samples_table,
                                    load_writer(args.baseline) if args.baseline else None))
    finally:
        spark.stop()
    line = json.dumps({"bench": "shard_phase", "master": args.master, "repeats": args.repeats, "corpora": out},
                      sort_keys=True)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
