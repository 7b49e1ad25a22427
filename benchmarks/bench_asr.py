"""ASR throughput: the `asr` step (Spark, or its task path without Spark) against a plain
transformers loop (ffmpeg to 16 kHz mono, then `pipeline("automatic-speech-recognition")` over
the same audio in batches of the same size, greedy, with timestamps) on the same videos.

    .venv/bin/python benchmarks/bench_asr.py [--videos 24] [--model DIR] [--batch 8] [--new-tokens 32]
        [--device cpu|cuda] [--repeats 3] [--engine auto|spark|tasks] [--master local[2]]

Videos: espeak-ng speech (a different sentence each) muxed with a test pattern into H.264 + AAC,
3-6 s each, made here. Without --model a tiny random Whisper is built locally (nothing is
downloaded); on a GPU machine pass a real checkpoint folder (openai/whisper-small saved with
save_pretrained) and --device cuda. Both sides decode greedily, so the segments must match (the
plain side's chunks put through the step's documented rules); the script checks it. Medians of
`--repeats`; figures, not assertions.

Measured on the shared 2-core box (tiny random Whisper, CPU, 16 videos / 72 s, batch 8, 32 new
tokens, medians of 3, segments identical on both sides): task path 2.47 s vs plain 2.86 s, ratio
1.16 (load ~5-9); Spark local[2] 7.15 s vs plain 30.82 s, ratio 4.31, but the plain side swung
20-35 s under load 6-10 in that run, so that ratio says more about the box than about the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = ("hello world this is a test of speech one two three red blue green good morning people talk "
         "about music and the sound of a quiet voice today").split()


def make_videos(work: str, n: int) -> list[str]:
    import random

    rnd = random.Random(0)
    paths = []
    for i in range(n):
        wav = os.path.join(work, f"{i:04d}.wav")
        text = " ".join(rnd.choice(WORDS) for _ in range(6 + i % 8))
        subprocess.run(["espeak-ng", "-w", wav, text], check=True, timeout=60)
        p = os.path.join(work, f"{i:04d}.mp4")
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc=size=128x96:rate=10:duration={3 + i % 4}", "-i", wav, "-c:v", "libx264",
                        "-pix_fmt", "yuv420p", "-c:a", "aac", p], check=True, timeout=120)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--model", default="")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", choices=["auto", "spark", "tasks"], default="auto",
                    help="spark: the step in a Spark job; tasks: the step's task path without Spark "
                         "(benchmarks/task_engine.py); auto: spark when it can run")
    ap.add_argument("--tasks", type=int, default=1, help="with --engine tasks: task-sized slices of the videos")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import pipeline

    from reelforge.curation.asr import ASR
    from reelforge.curation.probe import Probe
    from reelforge.curation.schema import ARROW_SCHEMA, empty_row
    from reelforge.curation.tiny_whisper import build_tiny_whisper

    work = tempfile.mkdtemp(prefix="bench-asr-")
    model_dir = args.model or build_tiny_whisper(os.path.join(work, "tiny-whisper"))
    paths = make_videos(work, args.videos)
    rows = []
    for i, p in enumerate(paths):
        r = empty_row()
        r.update(id=f"{i:05d}", kind="video_text", source="bench", source_key=str(i), source_location=p,
                 text=f"speech {i}", media=[{"kind": "video", "uri": p, "member": None, "offset": None,
                                             "length": None}])
        rows.append(r)
    rows = Probe(phash=False).process_rows(rows)

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = pipeline("automatic-speech-recognition", model=model_dir, device=args.device, dtype=dtype)

    def audio_of(path: str) -> np.ndarray:
        out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", path, "-vn", "-ac", "1", "-ar",
                              "16000", "-f", "f32le", "pipe:1"], check=True, capture_output=True, timeout=120).stdout
        return np.frombuffer(out, dtype=np.float32)

    def plain() -> tuple[float, dict]:
        t = time.perf_counter()
        audios = [audio_of(p) for p in paths]
        outs = pipe([{"raw": a.copy(), "sampling_rate": 16000} for a in audios], batch_size=args.batch,
                    return_timestamps=True, generate_kwargs={"max_new_tokens": args.new_tokens, "num_beams": 1})
        dt = time.perf_counter() - t
        segs = {}
        for r, a, o in zip(rows, audios, outs):
            dur = a.size / 16000
            ss = []
            for c in o["chunks"]:
                text = c["text"].strip()
                if text:
                    s = min(max(0.0, c["timestamp"][0]), dur)
                    e = dur if c["timestamp"][1] is None else min(max(s, c["timestamp"][1]), dur)
                    ss.append({"start": round(s, 3), "end": round(e, 3), "text": text})
            segs[r["id"]] = ss
        return dt, segs

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from task_engine import pick_engine, run_as_tasks

    engine = pick_engine(args.engine)
    spark = None
    if engine == "spark":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from reelforge.jobs.engine import run_step
        from reelforge.jobs.spark import get_spark, spark_schema

        spark = get_spark(args.master)
        pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), os.path.join(work, "rows.parquet"))
        df = spark.read.schema(spark_schema()).parquet(os.path.join(work, "rows.parquet"))
        df = df.repartition(spark.sparkContext.defaultParallelism).cache()
        df.count()
    step = ASR(model=model_dir, batch_size=args.batch, max_new_tokens=args.new_tokens, device=args.device)

    def step_run() -> tuple[float, dict]:
        t = time.perf_counter()
        if spark is not None:
            got = run_step(step, df).select("id", "meta").collect()
        else:
            got = run_as_tasks(step, rows, args.tasks)
        dt = time.perf_counter() - t
        return dt, {r["id"]: json.loads(r["meta"])["asr"]["segments"] for r in got}

    step_run()  # warm-up: each Python worker loads the model once
    _, want = plain()
    ours = "spark step" if spark is not None else "step, task path"
    times: dict[str, list[float]] = {ours: [], "plain pipeline": []}
    same = True
    for _ in range(args.repeats):
        dt, got = step_run()
        times[ours].append(dt)
        same &= got == want
        times["plain pipeline"].append(plain()[0])
    audio_s = sum(float(r["media"][0]["duration"] or 0) for r in rows)
    med = {k: statistics.median(v) for k, v in times.items()}
    vps = {k: args.videos / v for k, v in med.items()}
    where = f"Spark {args.master}" if spark is not None else f"no Spark here: the task path, {args.tasks} task(s)"
    print(f"{args.videos} videos ({audio_s:.0f} s), {os.path.basename(model_dir)}, {args.device}, batch {args.batch}, "
          f"{args.new_tokens} new tokens, {where}, torch threads {torch.get_num_threads()}")
    for k in med:
        print(f"  {k:20s} {med[k]:7.2f} s  {vps[k]:8.2f} videos/s  {audio_s / med[k]:8.1f} s of video per s")
    ratio = vps[ours] / vps["plain pipeline"]
    print(f"  ratio step/plain: {ratio:.2f}   segments identical: {same}")
    print(json.dumps({"bench": "asr", "videos": args.videos, "engine": engine, "videos_per_s": vps,
                      "ratio": ratio, "identical": same, "seconds": times}))
    if spark is not None:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
