"""Mixture emitter throughput: `reelforge mix` against a raw `webdataset.ShardWriter` of the same bytes.

Builds a curation-run folder of N small samples (four sources; `.json` members of ~0.3-1 KB,
half of the samples with a ~1-3 KB `.jpg` member of random bytes), written with the
project's shard writer, plus its per-sample table. A mixture of one stage asks for about N
samples' worth of tokens with one source upsampled past one epoch (so repeats with new keys
are part of the work) and one downsampled; it is planned, then emitted:

  project  `emit_plan`: load the table, redo the plan's selection, global shuffle, copy each
           sample's byte span from the run's shards into the stage's shards (re-keying
           repeats), sha256 of every shard, the stage index;
  peer     `webdataset.ShardWriter(encoder=False)` writing the very same samples (members read
           back from the emitted shards before the clock starts, held in memory), in the same
           order and with the same samples per shard: the raw write speed of those bytes.

Both write to the same disk; neither fsyncs. The order alternates between repeats; medians
are quoted. It also checks that the peer's shards are byte-identical to the project's.

    .venv/bin/python benchmarks/bench_mix.py [--samples 1000000] [--per-shard 5000] [--repeats 3]
        [--workers 1] [--workdir DIR] [--keep]
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
import tempfile
import time

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from reelforge.curation.shards import SHARD_JSON_VERSION, ShardFile, encode_json  # noqa: E402
from reelforge.mixers.emit import emit_plan  # noqa: E402
from reelforge.mixers.planner import plan_mixture  # noqa: E402
from reelforge.mixers.spec import parse_mixture  # noqa: E402
from reelforge.mixers.stats import STATS_SCHEMA  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import alternate, tar_bytes  # noqa: E402

TAR_OPTS = dict(user="reelforge", group="reelforge", mode=0o444, mtime=0)  # as ShardFile
SOURCES = [("captions", "image_text", 0.4), ("ocr", "image_text", 0.1), ("docs", "text", 0.3),
           ("vqa", "conversation", 0.2)]
WORDS = ("the a cat dog sits on mat red blue photo of image shows river city night light small large old new man "
         "woman child tree car road house sky cloud sun").split()


def build_run(run_dir: str, n: int, per_shard: int, seed: int) -> dict:
    """Shards written by the project's writer and the per-sample table (spans from the writer itself)."""
    rng = random.Random(seed)
    shard_dir = os.path.join(run_dir, "shards")
    os.makedirs(shard_dir)
    cols: dict[str, list] = {f.name: [] for f in STATS_SCHEMA}
    tokens_by_source: dict[str, int] = {}
    sf = None
    cum = []
    acc = 0.0
    for s in SOURCES:
        acc += s[2]
        cum.append(acc)
    for i in range(n):
        if i % per_shard == 0:
            if sf is not None:
                sf.close()
            shard = f"run-{i // per_shard:06d}.tar"
            sf = ShardFile(os.path.join(shard_dir, shard))
        x = rng.random()
        k = next(j for j, c in enumerate(cum) if x <= c)
        source, kind = SOURCES[k][0], SOURCES[k][1]
        sid = hashlib.sha1(f"{seed}:{i}".encode()).hexdigest()[:24]
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 150)))
        obj = {"__key__": sid}
        media = []
        if kind == "image_text":
            data = rng.randbytes(rng.randint(1000, 3000))
            obj["jpg"] = data
            media = [{"member": f"{sid}.jpg", "kind": "image", "format": "jpeg", "width": 64, "height": 64,
                      "length": len(data)}]
        tt, vt = len(text) // 4, (64 if media else 0)
        js = {"version": SHARD_JSON_VERSION, "id": sid, "kind": kind,
              "provenance": {"source": source, "key": f"{source}:{i}", "location": "/bench"}, "text": text,
              "tokens": {"text_tokens": tt, "visual_tokens": vt, "tokens": tt + vt}}
        if media:
            js["media"] = media
        obj["json"] = encode_json(js)
        start = sf.tar.offset
        sf.write(obj, source)
        have = {"id": sid, "source": source, "kind": kind, "shard": shard, "offset": start,
                "length": sf.tar.offset - start, "text_tokens": tt, "visual_tokens": vt, "tokens": tt + vt}
        for c in cols:  # the table's other columns (mode, scores, ...) stay null
            cols[c].append(have.get(c))
        tokens_by_source[source] = tokens_by_source.get(source, 0) + tt + vt
    if sf is not None:
        sf.close()
    os.makedirs(os.path.join(run_dir, "samples"))
    pq.write_table(pa.table(cols, schema=STATS_SCHEMA), os.path.join(run_dir, "samples", "part-0.parquet"))
    return tokens_by_source


def mixture(tokens_by_source: dict[str, int], per_shard: int) -> dict:
    total = sum(tokens_by_source.values())
    w = {k: v / total for k, v in tokens_by_source.items()}
    w["ocr"] *= 1.6  # upsampled past one epoch: repeats with new keys
    w["docs"] *= 0.8
    return {"name": "bench", "seed": 0, "stages": [{
        "name": "bench_stage", "target_tokens": int(total * 1.02), "max_epochs": 2,
        "shards": {"max_samples": per_shard, "max_bytes": "1TB"},
        "sources": [{"name": k, "weight": round(v, 6)} for k, v in w.items()]}]}


def read_back(stage_dir: str) -> list[dict]:
    import webdataset as wds

    out = []
    for s in wds.WebDataset(sorted(glob.glob(os.path.join(stage_dir, "*.tar"))), shardshuffle=False):
        out.append({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    return out


def run_peer(samples: list[dict], out_dir: str, per_shard: int) -> float:
    import webdataset as wds

    os.makedirs(out_dir)
    t = time.perf_counter()
    with wds.ShardWriter(os.path.join(out_dir, "bench_stage-%06d.tar"), maxcount=per_shard, maxsize=1e15,
                         verbose=0, encoder=False, **TAR_OPTS) as sink:
        for s in samples:
            sink.write(s)
    return time.perf_counter() - t


def run_project(plan: dict, out_dir: str, workers: int) -> float:
    t = time.perf_counter()
    emit_plan(plan, out_dir, workers=workers, log=lambda *a: None)
    return time.perf_counter() - t


def shas(d: str) -> list[str]:
    out = []
    for p in sorted(glob.glob(os.path.join(d, "**", "*.tar"), recursive=True)):
        with open(p, "rb") as f:
            out.append(hashlib.sha256(f.read()).hexdigest())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_000_000, help="samples in the generated run")
    ap.add_argument("--per-shard", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="emitter processes (the peer is one process)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for the run and the shards (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="bench_mix-")
    os.makedirs(work, exist_ok=True)
    try:
        t = time.perf_counter()
        run_dir = os.path.join(work, "run")
        tokens = build_run(run_dir, args.samples, args.per_shard, args.seed)
        print(f"built a run of {args.samples} samples ({tar_bytes(run_dir) / 1e6:.1f} MB of shards) "
              f"in {time.perf_counter() - t:.1f}s under {work}")
        t = time.perf_counter()
        plan = plan_mixture(parse_mixture(mixture(tokens, args.per_shard)), run_dir)
        st = plan["stages"][0]
        print(f"planned in {time.perf_counter() - t:.2f}s: {st['planned_samples']} samples, "
              f"{st['planned_tokens']} tokens; " + ", ".join(f"{e['name']} {e['epochs']:.2f} ep"
                                                             for e in st["entries"]))
        check = os.path.join(work, "check")
        run_project(plan, check, args.workers)
        samples = read_back(os.path.join(check, "bench_stage"))
        n = len(samples)
        assert n == st["planned_samples"], (n, st["planned_samples"])
        peer_check = os.path.join(work, "check-peer")
        run_peer(samples, peer_check, args.per_shard)
        identical = shas(os.path.join(check, "bench_stage")) == shas(peer_check)
        print(f"peer shards byte-identical to the project's: {identical}")
        shutil.rmtree(check)
        shutil.rmtree(peer_check)

        times, out_bytes = alternate(work, args.repeats, n, {
            "project": lambda d: run_project(plan, d, args.workers),
            "peer": lambda d: run_peer(samples, d, args.per_shard)})
        med = {w: statistics.median(v) for w, v in times.items()}
        sps = {w: n / med[w] for w in med}
        mbs = {w: out_bytes[w] / med[w] / 1e6 for w in med}
        ratio = sps["project"] / sps["peer"]
        print(f"\nmedian of {args.repeats} ({n} samples emitted, {args.per_shard}/shard, "
              f"{out_bytes['project'] / 1e6:.1f} MB of tars, emitter workers {args.workers})")
        print(f"{'writer':<8} {'seconds':>8} {'samples/s':>10} {'MB/s':>8}")
        for w in ("project", "peer"):
            print(f"{w:<8} {med[w]:>8.3f} {sps[w]:>10.0f} {mbs[w]:>8.1f}")
        print(f"ratio project/peer (samples/s): {ratio:.2f}")
        print(json.dumps({"bench": "mix", "samples": n, "run_samples": args.samples, "per_shard": args.per_shard,
                          "workers": args.workers, "repeats": args.repeats, "tar_bytes": out_bytes,
                          "seconds": {w: [round(s, 3) for s in v] for w, v in times.items()},
                          "samples_per_s": {w: round(v, 1) for w, v in sps.items()},
                          "mb_per_s": {w: round(v, 2) for w, v in mbs.items()},
                          "ratio_project_over_peer": round(ratio, 3), "peer_identical": identical},
                         sort_keys=True))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
