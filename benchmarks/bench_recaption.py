"""Recaptioning throughput: the Spark `recaption` step against a plain transformers loop
(decode, processor, `generate` in batches of the same size) on the same images.

    .venv/bin/python benchmarks/bench_recaption.py [--images 96] [--model DIR] [--master local[2]]
        [--batch 8] [--new-tokens 16] [--device cpu|cuda] [--repeats 3]

Without --model a tiny random Qwen2.5-VL is built locally (nothing is downloaded); on a GPU
machine pass a real checkpoint folder, e.g. --model models/Qwen2.5-VL-3B-Instruct --device cuda.
Both sides decode greedily, so the captions must match; the script checks it. Medians of
`--repeats`; figures, not assertions. Spark's Python workers run torch with one thread per
task (OMP_NUM_THREADS = spark.task.cpus); on a tiny model a plain loop with all cores' threads
loses more to threading overhead than it gains, so also compare with --plain-threads 1.
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
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--model", default="")
    ap.add_argument("--vlm-size", default="tiny", choices=["tiny", "bench"],
                    help="without --model: the random model's size (bench: ~0.9B, realistic GPU shapes)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plain-threads", type=int, default=0,
                    help="torch threads of the plain loop (0: torch's default, all cores)")
    ap.add_argument("--engine", choices=["auto", "spark", "tasks"], default="auto",
                    help="spark: the step in a Spark job; tasks: the step's task path without Spark "
                         "(benchmarks/task_engine.py), for a GPU machine with no Java; auto: spark when it can run")
    ap.add_argument("--tasks", type=int, default=1, help="with --engine tasks: task-sized slices of the images")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from reelforge.curation.probe import Probe
    from reelforge.curation.recaption import DEFAULT_PROMPTS, Recaption
    from reelforge.curation.schema import empty_row
    from reelforge.curation.tiny_vlm import build_tiny_vlm

    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)

    work = tempfile.mkdtemp(prefix="bench-recaption-")
    model_dir = args.model or build_tiny_vlm(os.path.join(work, "tiny-vlm"), size=args.vlm_size)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.images):
        p = os.path.join(work, f"{i:05d}.jpg")
        base = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize((640, 480), Image.Resampling.BICUBIC).save(p, quality=90)
        r = empty_row()
        r.update(id=f"{i:05d}", kind="image_text", source="bench", source_key=str(i), source_location=p,
                 text=f"noise {i}", media=[{"kind": "image", "uri": p, "member": None, "offset": None,
                                            "length": None}])
        rows.append(r)
    rows = Probe(phash=False).process_rows(rows)
    prompt = DEFAULT_PROMPTS["caption"]

    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    chat = proc.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)

    def plain() -> tuple[float, list[str]]:
        t = time.perf_counter()
        caps: list[str] = []
        for s in range(0, len(rows), args.batch):
            chunk = rows[s:s + args.batch]
            ims = [Image.open(r["media"][0]["uri"]).convert("RGB") for r in chunk]
            inp = proc(text=[chat] * len(ims), images=ims, padding=True, return_tensors="pt").to(args.device)
            inp = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()}
            with torch.no_grad():
                out = model.generate(**inp, max_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=proc.tokenizer.pad_token_id)
            caps += [c.strip() for c in proc.tokenizer.batch_decode(out[:, inp["input_ids"].shape[1]:],
                                                                    skip_special_tokens=True)]
        return time.perf_counter() - t, caps

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from task_engine import pick_engine, run_as_tasks, spark_frame

    engine = pick_engine(args.engine)
    spark = None
    if engine == "spark":
        from reelforge.jobs.engine import run_step

        spark, df = spark_frame(rows, work, args.master)
    step = Recaption(model=model_dir, batch_size=args.batch, max_new_tokens=args.new_tokens, device=args.device,
                     min_chars=0)

    def spark_run() -> tuple[float, dict]:
        t = time.perf_counter()
        if spark is not None:
            got = run_step(step, df).select("id", "captions").collect()  # a few hundred short strings
        else:
            got = run_as_tasks(step, rows, args.tasks)
        return time.perf_counter() - t, {r["id"]: r["captions"][0]["text"] for r in got if r["captions"]}

    spark_run()  # warm-up: each Python worker loads the model once
    _, want = plain()
    ours = "spark step" if spark is not None else "step, task path"
    times: dict[str, list[float]] = {ours: [], "plain transformers": []}
    same = True
    for _ in range(args.repeats):
        dt, got = spark_run()
        times[ours].append(dt)
        same &= got == {r["id"]: c for r, c in zip(rows, want)}
        times["plain transformers"].append(plain()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.images / v for k, v in med.items()}
    where = f"Spark {args.master}" if spark is not None else f"no Spark here: the task path, {args.tasks} task(s)"
    print(f"{args.images} images 640x480 JPEG, {os.path.basename(model_dir)}, {args.device}, batch {args.batch}, "
          f"{args.new_tokens} new tokens, {where}, torch threads {torch.get_num_threads()}")
    for k in med:
        print(f"  {k:20s} {med[k]:7.2f} s  {ips[k]:8.1f} images/s")
    ratio = ips[ours] / ips["plain transformers"]
    print(f"  ratio step/plain: {ratio:.2f}   captions identical: {same}")
    print(json.dumps({"bench": "recaption", "images": args.images, "engine": engine, "images_per_s": ips,
                      "ratio": ratio, "identical": same, "seconds": times}))
    if spark is not None:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
