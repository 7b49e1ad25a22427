"""Sampling throughput: the `sample` step (in Spark, and in one process) against plain transformers
loops on the same prompts, in responses per second.

    .venv/bin/python benchmarks/bench_sample.py [--prompts 24] [--n 4] [--model DIR] [--master local[2]]
        [--batch 8] [--new-tokens 16] [--device cpu|cuda] [--repeats 3] [--plain-threads 0]

The peers:

- `plain seeded loop`: what reproduces the step's responses by hand: one prompt and one response at a
  time, `torch.manual_seed(seed)` then `generate(do_sample=True, ...)`; the script checks that its
  responses equal the step's, response for response (the ratio the README quotes is against this);
- `plain batched n`: what a user writes for speed: one `generate(num_return_sequences=n)` per batch
  of prompts; its responses depend on the batch (one global generator), so they are not compared.

Without --model a tiny random Qwen2.5-VL is built locally (nothing is downloaded); on a GPU machine
pass a real checkpoint folder and --device cuda. Half the prompts ask about a 640x480 JPEG, half are
text conversations. Medians of `--repeats`, the runners alternating; figures, not assertions. The
in-process step runs in the plain loops' process with their torch threads (--plain-threads); Spark's
Python workers run torch with one thread per task (OMP_NUM_THREADS = spark.task.cpus).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--model", default="")
    ap.add_argument("--vlm-size", default="tiny", choices=["tiny", "bench"])
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--batch", type=int, default=8, help="sequences per generate call (step and batched peer)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plain-threads", type=int, default=0, help="torch threads of the plain loops (0: default)")
    ap.add_argument("--no-spark", action="store_true", help="skip the Spark run (the in-process step only)")
    args = ap.parse_args(argv)

    import numpy as np
    import pyarrow as pa
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from reelforge.curation.schema import ARROW_SCHEMA, empty_row, rows_of
    from reelforge.curation.step import run_batches
    from reelforge.curation.tiny_vlm import build_tiny_vlm
    from reelforge.mixers.sample import SampleStep, asked_turns, hf_messages, response_seed, with_system

    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)
    settings = {"temperature": 0.9, "top_p": 0.9, "top_k": 0, "max_new_tokens": args.new_tokens}
    work = tempfile.mkdtemp(prefix="bench-sample-")
    model_dir = args.model or build_tiny_vlm(os.path.join(work, "tiny-vlm"), size=args.vlm_size)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.prompts):
        r = empty_row()
        r.update(id=f"{i:05d}", kind="conversation", source="bench", source_key=str(i), source_location="bench")
        if i % 2 == 0:
            p = os.path.join(work, f"{i:05d}.jpg")
            base = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
            Image.fromarray(base).resize((640, 480), Image.Resampling.BICUBIC).save(p, quality=90)
            r["media"] = [{"kind": "image", "uri": p, "member": None, "offset": None, "length": os.path.getsize(p)}]
            r["messages"] = [{"role": "user", "content": f"<image>\nHow many shapes are there in picture {i}?"}]
        else:
            r["messages"] = [{"role": "user", "content": f"Question {i}: what is {i} times {i + 1}? Explain."}]
        rows.append(r)
    total = args.prompts * args.n

    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    chats = [proc.apply_chat_template(hf_messages(with_system(asked_turns(r, "thinking"), "You are a helpful "
                                                                          "assistant.")),
                                      add_generation_prompt=True, tokenize=False) for r in rows]

    def inputs(idx: list[int]):
        ims = [Image.open(rows[i]["media"][0]["uri"]).convert("RGB") for i in idx if rows[i]["media"]]
        inp = proc(text=[chats[i] for i in idx], images=ims or None, padding=True, return_tensors="pt")
        return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.to(args.device).items()}

    def decode(ids, n_prompt: int) -> list[str]:
        return [t.strip() for t in proc.tokenizer.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)]

    def plain_seeded() -> tuple[float, list[str]]:
        t = time.perf_counter()
        out: list[str] = []
        for i, r in enumerate(rows):
            inp = inputs([i])
            for k in range(args.n):
                torch.manual_seed(response_seed(0, r["id"], k))
                with torch.no_grad():
                    ids = model.generate(**inp, do_sample=True, **settings, pad_token_id=proc.tokenizer.pad_token_id)
                out += decode(ids, inp["input_ids"].shape[1])
        return time.perf_counter() - t, out

    def plain_batched() -> tuple[float, list[str]]:
        t = time.perf_counter()
        out: list[str] = []
        per = max(1, args.batch // args.n)  # prompts per call: batch sequences
        for s in range(0, len(rows), per):
            inp = inputs(list(range(s, min(len(rows), s + per))))
            with torch.no_grad():
                ids = model.generate(**inp, do_sample=True, num_return_sequences=args.n, **settings,
                                     pad_token_id=proc.tokenizer.pad_token_id)
            out += decode(ids, inp["input_ids"].shape[1])
        return time.perf_counter() - t, out

    step = SampleStep(model=model_dir, n=args.n, seed=0, mode="thinking", batch_size=args.batch, device=args.device,
                      **settings)

    def in_process() -> tuple[float, list[str]]:  # the plain loops' process, threads and model size
        t = time.perf_counter()
        out = rows_of(pa.Table.from_batches(list(run_batches(step, [pa.RecordBatch.from_pylist(
            rows, schema=ARROW_SCHEMA)]))))
        return time.perf_counter() - t, [x["text"] for r in out for x in r["responses"]]

    runners = {"step, one process": in_process, "plain seeded loop": plain_seeded, "plain batched n": plain_batched}
    spark = None
    if not args.no_spark:
        import pyarrow.parquet as pq

        from reelforge.jobs.engine import run_step
        from reelforge.jobs.spark import get_spark, spark_schema

        spark = get_spark(args.master)
        pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), os.path.join(work, "rows.parquet"))
        df = spark.read.schema(spark_schema()).parquet(os.path.join(work, "rows.parquet"))
        df = df.repartition(spark.sparkContext.defaultParallelism).cache()
        df.count()

        def spark_run() -> tuple[float, list[str]]:
            t = time.perf_counter()
            got = {r["id"]: [x["text"] for x in r["responses"]]
                   for r in run_step(step, df).select("id", "responses").collect()}
            return time.perf_counter() - t, [x for r in rows for x in got[r["id"]]]

        spark_run()  # warm-up: each Python worker loads the model once
        runners = {"spark step": spark_run, **runners}

    step.setup()  # the in-process step's model, loaded once (as a worker keeps it)
    times: dict[str, list[float]] = {k: [] for k in runners}
    texts: dict[str, list[str]] = {}
    names = list(runners)
    for rep in range(args.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            dt, texts[name] = runners[name]()
            times[name].append(dt)
    same = {k: texts[k] == texts["plain seeded loop"] for k in texts if k.startswith(("spark", "step"))}
    med = {k: statistics.median(v) for k, v in times.items()}
    rps = {k: total / v for k, v in med.items()}
    print(f"{args.prompts} prompts (half over a 640x480 JPEG) x n={args.n}, {os.path.basename(model_dir)}, "
          f"{args.device}, batch {args.batch}, {args.new_tokens} new tokens, temperature 0.9, top_p 0.9, "
          f"Spark {args.master}, plain-loop torch threads {torch.get_num_threads()}, median of {args.repeats}")
    for k in med:
        print(f"  {k:20s} {med[k]:7.2f} s  {rps[k]:8.1f} responses/s")
    for k in same:
        print(f"  ratio {k} / plain seeded loop: {rps[k] / rps['plain seeded loop']:.2f}   "
              f"same responses: {same[k]}")
    print(f"  ratio step, one process / plain batched n: {rps['step, one process'] / rps['plain batched n']:.2f}")
    print(json.dumps({"bench": "sample", "prompts": args.prompts, "n": args.n, "responses_per_s": rps,
                      "same_responses": same, "seconds": times}))
    if spark is not None:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
