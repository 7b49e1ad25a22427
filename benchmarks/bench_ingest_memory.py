"""End-to-end curation throughput and memory: many small samples through a whole recipe.

Generates `--samples` small samples as sources on disk (deterministic for a seed):
half text rows in 20 JSONL files, half tiny image-text samples (8x8..32x32 JPEG, every
4th one PNG, a few hundred bytes each) in 20 img2dataset-style tars (`key.jpg` +
`key.txt`). Every image's bytes are unique (a handful of encoded images, each copy given
its own JPEG comment / PNG tEXt chunk), except planted exact duplicates: every
`--dup-every`-th sample repeats an earlier sample's image bytes or text, so `dedup_exact`
has a known number to drop.

Then it runs the recipe `probe`, `dedup_exact`, `quality: {min_side: 1}` with shards of
10000 samples through `run_recipe(parse_recipe(raw, base_dir, out=...))` on `--master`
(default `local-cluster[2,1,1024]`: two executors of one core and 1 GiB each). A sampler
thread (psutil, every `--interval` s) records the RSS of this process tree, split into

  driver     this Python process, the driver JVM and the rest of the tree (launcher
             shells; under `local[N]` also the Python workers, reported apart);
  executor N the JVM whose command line holds `CoarseGrainedExecutorBackend
             --executor-id N` plus its Python daemon and workers.

RSS of forked Python workers counts their shared copy-on-write pages once per worker,
so the Python part of an executor is an upper bound. Spark start (session + executors
registered) is timed apart from the run. Figures only: nothing is asserted about time
or memory; it does check inputs == kept + dropped and the planted duplicate count.

    .venv/bin/python benchmarks/bench_ingest_memory.py [--samples 200000]
        [--master 'local-cluster[2,1,1024]' | --master 'local[2]'] [--repeats N] [--workdir DIR] [--keep]

With `--repeats N` the sources are generated once and the recipe runs N times, each in a
fresh child process (so each pays the driver JVM start, like a real job); times are
quoted as medians and memory as the largest peak of any repeat.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib

N_TEXT_FILES = 20
N_TARS = 20
VOCAB = ("the a cat dog sits on mat red blue photo of image shows river city night light small "
         "large old new man woman child tree car road house sky cloud sun").split()


# --- generation --------------------------------------------------------------------------

def _base_images(rng: random.Random, n: int = 12) -> list[tuple[str, bytes]]:
    """A handful of distinct tiny images, encoded once: (ext, bytes)."""
    from PIL import Image

    out = []
    for i in range(n):
        w, h = rng.randint(8, 32), rng.randint(8, 32)
        img = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
        buf = io.BytesIO()
        if i % 4 == 3:
            img.save(buf, format="PNG")
            out.append(("png", buf.getvalue()))
        else:
            img.save(buf, format="JPEG", quality=85)
            out.append(("jpg", buf.getvalue()))
    return out


def unique_copy(ext: str, data: bytes, tag: bytes) -> bytes:
    """The same image with `tag` embedded (JPEG COM segment / PNG tEXt chunk): new bytes, same pixels."""
    if ext == "jpg":
        assert data[:2] == b"\xff\xd8"
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + data[2:]
    body = b"tEXt" + b"k\x00" + tag
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    cut = 8 + 25  # signature + IHDR chunk
    return data[:cut] + chunk + data[cut:]


def _caption(rng: random.Random, i: int, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    return " ".join(rng.choice(VOCAB) for _ in range(n)) + f" #{i}"


def generate(src: str, n: int, seed: int, dup_every: int) -> dict:
    """Write the sources; return counts (with the planted duplicates)."""
    rng = random.Random(seed)
    n_text = n // 2
    n_img = n - n_text
    text_dir, wds_dir = os.path.join(src, "text"), os.path.join(src, "wds")
    os.makedirs(text_dir)
    os.makedirs(wds_dir)

    dup_text = 0
    texts: list[str] = []
    per_file = -(-n_text // N_TEXT_FILES)
    for fi in range(N_TEXT_FILES):
        lines = []
        for i in range(fi * per_file, min(n_text, (fi + 1) * per_file)):
            if dup_every and i % dup_every == dup_every - 1 and texts:
                t = texts[rng.randrange(len(texts))]  # an exact repeat of an earlier text
                dup_text += 1
            else:
                t = _caption(rng, i, 15, 50)
                texts.append(t)
            lines.append(json.dumps({"text": t, "lang": "en"}))
        with open(os.path.join(text_dir, f"part-{fi:03d}.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")

    bases = _base_images(rng)
    dup_img = 0
    img_bytes = 0
    made: list[tuple[str, bytes]] = []
    per_tar = -(-n_img // N_TARS)
    for ti in range(N_TARS):
        with tarfile.open(os.path.join(wds_dir, f"{ti:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(ti * per_tar, min(n_img, (ti + 1) * per_tar)):
                if dup_every and i % dup_every == dup_every - 1 and made:
                    ext, data = made[rng.randrange(len(made))]  # same bytes as an earlier image
                    dup_img += 1
                else:
                    ext, base = bases[i % len(bases)]
                    data = unique_copy(ext, base, f"img{i}".encode())
                    made.append((ext, data))
                img_bytes += len(data)
                key = f"{ti:05d}{i:07d}"
                for member, payload in ((f"{key}.{ext}", data),
                                        (f"{key}.txt", _caption(rng, i, 4, 16).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    info.mtime = 0
                    tf.addfile(info, io.BytesIO(payload))
    return {"text": n_text, "image_text": n_img, "dup_text": dup_text, "dup_media": dup_img,
            "mean_image_bytes": img_bytes / max(1, n_img)}


# --- memory sampler ----------------------------------------------------------------------

class Sampler(threading.Thread):
    """Peak RSS of this process tree, split into driver parts and executors."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process()
        self.interval = interval
        self.stop_event = threading.Event()
        self.phase = "start"
        self.peak: dict[str, int] = {}  # category -> peak of its summed RSS
        self.phase_peak: dict[str, dict[str, int]] = {}  # phase -> {"driver": .., "executors": ..}
        self.executor_pids: dict[str, set[int]] = {}
        self.peak_procs: dict[str, int] = {}  # group -> most Python processes seen at once
        self.samples = 0

    def _snapshot(self) -> dict[str, int]:
        ps = self.psutil
        procs = {self.root.pid: self.root}
        try:
            for p in self.root.children(recursive=True):
                procs[p.pid] = p
        except ps.Error:
            pass
        info: dict[int, tuple[int, str, int]] = {}  # pid -> (ppid, cmdline, rss)
        for pid, p in procs.items():
            try:
                with p.oneshot():
                    info[pid] = (p.ppid(), " ".join(p.cmdline()), p.memory_info().rss)
            except ps.Error:
                continue
        exec_of: dict[int, str] = {}
        for pid, (_, cmd, _) in info.items():
            if "CoarseGrainedExecutorBackend" in cmd:
                m = re.search(r"--executor-id\s+(\S+)", cmd)
                eid = m.group(1) if m else str(pid)
                exec_of[pid] = eid
                self.executor_pids.setdefault(eid, set()).add(pid)
        cats: dict[str, int] = {}
        procs_now: dict[str, int] = {}
        for pid, (_ppid, cmd, rss) in info.items():
            owner, q, seen = None, pid, 0
            while q in info and seen < 64:
                if q in exec_of:
                    owner = exec_of[q]
                    break
                q = info[q][0]
                seen += 1
            if owner is not None:
                part = "jvm" if pid in exec_of else "python"
                if part == "python":
                    procs_now[f"executor {owner}"] = procs_now.get(f"executor {owner}", 0) + 1
                for c in (f"executor {owner}", f"executor {owner} {part}"):
                    cats[c] = cats.get(c, 0) + rss
                cats["executors"] = cats.get("executors", 0) + rss
                continue
            if pid == self.root.pid:
                part = "driver python"
            elif "java" in cmd.split(" ", 1)[0] or "org.apache.spark" in cmd:
                part = "driver jvm"
            elif "pyspark.daemon" in cmd or "pyspark.worker" in cmd:
                part = "driver-side python workers"
                procs_now["driver"] = procs_now.get("driver", 0) + 1
            else:
                part = "driver other"
            cats[part] = cats.get(part, 0) + rss
            cats["driver"] = cats.get("driver", 0) + rss
        cats["total"] = cats.get("driver", 0) + cats.get("executors", 0)
        for k, v in procs_now.items():
            self.peak_procs[k] = max(self.peak_procs.get(k, 0), v)
        return cats

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                cats = self._snapshot()
            except Exception:  # noqa: BLE001 - a sampler hiccup must not end the benchmark
                cats = {}
            self.samples += 1
            for k, v in cats.items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            ph = self.phase_peak.setdefault(self.phase, {})
            for k in ("driver", "executors", "total"):
                ph[k] = max(ph.get(k, 0), cats.get(k, 0))
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


# --- main --------------------------------------------------------------------------------

def _mib(n: int) -> float:
    return n / (1 << 20)


def run_once(args: argparse.Namespace, src: str, out: str, planted: int) -> dict:
    """One Spark session, one recipe run, sampled; prints its tables and returns its figures."""
    from reelforge.jobs.recipe import parse_recipe
    from reelforge.jobs.run import run_recipe
    from reelforge.jobs.spark import get_spark

    raw = {"name": "bench_ingest_memory", "seed": args.seed,
           "sources": [{"name": "text", "format": "text", "path": "text"},
                       {"name": "wds", "format": "webdataset", "path": "wds"}],
           "steps": [{"probe": {}}, {"dedup_exact": {}}, {"quality": {"min_side": 1}}],
           "output": {"path": "out", "shards": {"max_samples": args.max_samples}}}
    if os.path.exists(out):
        shutil.rmtree(out)  # a fresh output: no step is reused from an earlier run
    recipe = parse_recipe(raw, src, out=out)

    sampler = Sampler(args.interval)
    spark = None
    try:
        sampler.start()
        sampler.phase = "spark start"
        t0 = time.perf_counter()
        spark = get_spark(args.master)  # what run_recipe would do; timed apart here
        m = re.match(r"local-cluster\[(\d+)", args.master)
        want = int(m.group(1)) if m else 0
        deadline = time.time() + 180
        while want and spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() < want + 1:
            if time.time() > deadline:
                raise RuntimeError(f"only {spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1} "
                                   f"of {want} executors registered after 180 s")
            time.sleep(0.2)
        t1 = time.perf_counter()
        start_s = t1 - t0
        print(f"spark up on {spark.sparkContext.master} in {start_s:.1f}s", flush=True)

        def log(msg: str) -> None:
            mm = re.match(r"\[\d+/\d+\] (.+?) \.\.\.$", msg.strip())
            if mm:
                sampler.phase = mm.group(1)
            elif msg.startswith("done in"):
                sampler.phase = "after run"
            print(f"  {time.perf_counter() - t0:7.1f}s  {msg}", flush=True)

        error = None
        report = None
        try:
            report = run_recipe(recipe, master=args.master, spark=spark, log=log)
        except Exception as e:  # noqa: BLE001 - report the project's failure as a figure
            error = f"{type(e).__name__}: {e}"
            print(f"run_recipe FAILED after {time.perf_counter() - t1:.1f}s: {error[:4000]}", flush=True)
        t2 = time.perf_counter()
        sampler.phase = "stop"
        spark.stop()
        spark = None
        time.sleep(2 * args.interval)
    finally:
        if sampler.is_alive():
            sampler.stop()
        if spark is not None:
            spark.stop()

    run_s = t2 - t1
    total_s = t2 - t0
    execs = sorted({k.split()[1] for k in sampler.peak if k.startswith("executor ")}, key=lambda x: (len(x), x))
    print()
    print(f"memory (peak RSS, MiB; {sampler.samples} samples every {args.interval}s)")
    print(f"  {'process group':<34} {'peak MiB':>9}")
    for k in ("driver", "driver python", "driver jvm", "driver-side python workers", "driver other"):
        if k in sampler.peak:
            print(f"  {k:<34} {_mib(sampler.peak[k]):>9.0f}"
                  + (f"   (up to {sampler.peak_procs.get('driver', 0)} Python processes)"
                     if k == "driver-side python workers" else ""))
    for e in execs:
        for k in (f"executor {e}", f"executor {e} jvm", f"executor {e} python"):
            if k in sampler.peak:
                print(f"  {k:<34} {_mib(sampler.peak[k]):>9.0f}"
                      + (f"   (up to {sampler.peak_procs.get(f'executor {e}', 0)} Python processes)"
                         if k.endswith("python") else ""))
    print(f"  {'all executors together':<34} {_mib(sampler.peak.get('executors', 0)):>9.0f}")
    print(f"  {'whole tree':<34} {_mib(sampler.peak.get('total', 0)):>9.0f}")
    restarted = {e: len(p) for e, p in sampler.executor_pids.items() if len(p) > 1}
    print(f"  executor JVMs seen: {sum(len(p) for p in sampler.executor_pids.values())} "
          f"({len(sampler.executor_pids)} executor ids)" + (f"; restarted: {restarted}" if restarted else ""))
    print("  peak per phase (driver / executors / total MiB):")
    for ph, d in sampler.phase_peak.items():
        print(f"    {ph:<16} {_mib(d.get('driver', 0)):>7.0f} {_mib(d.get('executors', 0)):>7.0f} "
              f"{_mib(d.get('total', 0)):>7.0f}")

    result: dict = {
        "master": args.master, "samples": args.samples,
        "spark_start_s": round(start_s, 2), "run_s": round(run_s, 2), "total_s": round(total_s, 2),
        "peak_rss_mib": {k: round(_mib(v), 1) for k, v in sorted(sampler.peak.items())},
        "phase_peak_mib": {ph: {k: round(_mib(v), 1) for k, v in d.items()} for ph, d in sampler.phase_peak.items()},
        "executor_jvms_seen": {e: len(p) for e, p in sampler.executor_pids.items()},
        "peak_python_procs": dict(sorted(sampler.peak_procs.items())),
        "planted_duplicates": planted,
    }
    if report is None:
        result["error"] = error
        return result

    inputs = report["inputs"]
    balanced = inputs == report["kept"] + report["dropped"]
    dedup_dropped = next((s["dropped"] for s in report["steps"] if s["step"] == "dedup_exact"), None)
    print()
    print(f"throughput: {inputs} inputs in {total_s:.1f}s end to end = {inputs / total_s:.0f} samples/s; "
          f"excluding Spark start ({start_s:.1f}s): {inputs / run_s:.0f} samples/s")
    print(f"  {'step':<14} {'in':>8} {'out':>8} {'dropped':>8} {'seconds':>8}  reasons")
    step_s = 0.0
    for s in report["steps"]:
        step_s += s["seconds"]
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "-"
        print(f"  {s['step']:<14} {s['in']:>8} {s['out']:>8} {s['dropped']:>8} {s['seconds']:>8.1f}  {reasons}")
    print(f"  {'ledger+report':<14} {'':>8} {'':>8} {'':>8} {run_s - step_s:>8.1f}  (run minus steps)")
    print(f"accounting: inputs {inputs} == kept {report['kept']} + dropped {report['dropped']}: {balanced} "
          f"(report balanced={report['balanced']}); shards {report['shards']}; "
          f"dedup dropped {dedup_dropped} of {planted} planted duplicates", flush=True)
    result.update({
        "inputs": inputs, "kept": report["kept"], "dropped": report["dropped"], "balanced": balanced,
        "shards": report["shards"], "dedup_dropped": dedup_dropped,
        "samples_per_s_end_to_end": round(inputs / total_s, 1),
        "samples_per_s_excl_start": round(inputs / run_s, 1),
        "step_seconds": {s["step"]: s["seconds"] for s in report["steps"]},
        "other_seconds": round(run_s - step_s, 2),
        "report_elapsed_s": report.get("elapsed_s"),
    })
    return result


def _median_summary(runs: list[dict]) -> dict:
    """Medians of the timings over repeats; peaks of memory are the largest seen in any repeat."""
    ok = [r for r in runs if "error" not in r]
    out: dict = {"repeats": len(runs), "failed": len(runs) - len(ok)}
    if not ok:
        return out
    for k in ("spark_start_s", "run_s", "total_s", "samples_per_s_end_to_end", "samples_per_s_excl_start",
              "other_seconds"):
        out[k] = round(statistics.median(r[k] for r in ok), 2)
    out["step_seconds"] = {s: round(statistics.median(r["step_seconds"][s] for r in ok), 2)
                           for s in ok[0]["step_seconds"]}
    keys = sorted({k for r in runs for k in r["peak_rss_mib"]})
    out["peak_rss_mib_max"] = {k: max(r["peak_rss_mib"].get(k, 0) for r in runs) for k in keys}
    out["peak_rss_mib_median"] = {k: round(statistics.median(r["peak_rss_mib"].get(k, 0) for r in runs), 1)
                                  for k in keys}
    out["balanced"] = all(r["balanced"] for r in ok)
    out["dedup_dropped"] = sorted({r["dedup_dropped"] for r in ok})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200000)
    ap.add_argument("--master", default="local-cluster[2,1,1024]")
    ap.add_argument("--repeats", type=int, default=1,
                    help="recipe runs over the same sources, each in a fresh process (fresh driver JVM); "
                         "medians are quoted when > 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dup-every", type=int, default=100,
                    help="every Nth sample repeats an earlier one (0: no planted duplicates)")
    ap.add_argument("--max-samples", type=int, default=10000, help="samples per shard")
    ap.add_argument("--interval", type=float, default=0.2, help="sampler period in seconds")
    ap.add_argument("--workdir", help="folder for sources and output (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--run-one", nargs=3, metavar=("SRC", "OUT", "PLANTED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run_one:  # a child of --repeats: one run over sources that already exist
        src, out, planted = args.run_one
        result = run_once(args, src, out, int(planted))
        print(json.dumps({"bench": "ingest_memory_run", **result}, sort_keys=True), flush=True)
        return 0 if "error" not in result else 1

    work = args.workdir or tempfile.mkdtemp(prefix="bench_ingest_memory-")
    os.makedirs(work, exist_ok=True)
    src, out = os.path.join(work, "src"), os.path.join(work, "out")
    try:
        if os.path.exists(src):
            shutil.rmtree(src)
        t = time.perf_counter()
        gen = generate(src, args.samples, args.seed, args.dup_every)
        gen_s = time.perf_counter() - t
        planted = gen["dup_text"] + gen["dup_media"]
        print(f"generated {args.samples} samples ({gen['text']} text in {N_TEXT_FILES} JSONL, "
              f"{gen['image_text']} image-text in {N_TARS} tars, mean image {gen['mean_image_bytes']:.0f} B; "
              f"planted duplicates: {gen['dup_text']} text + {gen['dup_media']} media) "
              f"in {gen_s:.1f}s under {work}", flush=True)

        if args.repeats <= 1:
            result = run_once(args, src, out, planted)
            print(json.dumps({"bench": "ingest_memory", "generate_s": round(gen_s, 2), **result}, sort_keys=True))
            return 0 if "error" not in result else 1

        runs = []
        for rep in range(args.repeats):
            print(f"\n=== repeat {rep + 1}/{args.repeats} (fresh process) ===", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--run-one", src, out, str(planted),
                   "--samples", str(args.samples), "--master", args.master, "--seed", str(args.seed),
                   "--max-samples", str(args.max_samples), "--interval", str(args.interval)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            last = None
            for line in proc.stdout:
                if line.startswith("{") and '"ingest_memory_run"' in line:
                    last = json.loads(line)
                else:
                    print(line, end="", flush=True)
            proc.wait()
            if last is None:
                last = {"error": f"run exited {proc.returncode} without figures", "peak_rss_mib": {}}
            runs.append(last)
        summ = _median_summary(runs)
        print()
        print(f"summary over {args.repeats} repeats ({summ['failed']} failed): medians of time, "
              f"largest peak memory of any repeat")
        if "total_s" in summ:
            print(f"  samples/s end to end {summ['samples_per_s_end_to_end']:.0f}, excluding Spark start "
                  f"{summ['samples_per_s_excl_start']:.0f} (start {summ['spark_start_s']:.1f}s, "
                  f"run {summ['run_s']:.1f}s)")
            print("  step seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summ["step_seconds"].items())
                  + f", ledger+report {summ['other_seconds']:.1f}")
            print("  peak MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in summ["peak_rss_mib_max"].items()
                                              if k in ("driver", "executors", "total") or
                                              (k.startswith("executor ") and len(k.split()) == 2)))
            print(f"  balanced in every repeat: {summ['balanced']}")
        print(json.dumps({"bench": "ingest_memory", "master": args.master, "samples": args.samples,
                          "generate_s": round(gen_s, 2), "planted_duplicates": planted,
                          "summary": summ, "runs": runs}, sort_keys=True))
        return 0 if summ["failed"] == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
