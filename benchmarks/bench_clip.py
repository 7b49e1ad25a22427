"""CLIP scoring throughput: the Spark `clip` step against a plain open_clip loop on the same images.

    .venv/bin/python benchmarks/bench_clip.py [--images 512] [--model ViT-B-32] [--master local[2]]
        [--batch 64] [--device cpu|cuda] [--repeats 3]

Random weights (nothing is downloaded): the model is created with open_clip and its state
dict saved to a temporary checkpoint that the Spark step loads through the same path a real
checkpoint takes. The plain loop decodes the same JPEGs with PIL and runs the same
preprocessing and `encode_image`/`encode_text` in batches of the same size. On a GPU
machine run it with `--model ViT-L-14 --device cuda` (bf16 autocast in the step). Medians
of `--repeats`; figures, not assertions.
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
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", choices=["auto", "spark", "tasks"], default="auto",
                    help="spark: the step in a Spark job; tasks: the step's task path without Spark "
                         "(benchmarks/task_engine.py), for a GPU machine with no Java; auto: spark when it can run")
    ap.add_argument("--tasks", type=int, default=1, help="with --engine tasks: task-sized slices of the images")
    args = ap.parse_args(argv)

    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from reelforge.curation.probe import Probe
    from reelforge.curation.schema import empty_row
    from reelforge.filters.clip_score import ClipScore

    work = tempfile.mkdtemp(prefix="bench-clip-")
    model = open_clip.create_model(args.model, pretrained=None)
    ckpt = os.path.join(work, "random.pt")
    torch.save(model.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.images):
        p = os.path.join(work, f"{i:05d}.jpg")
        base = rng.integers(0, 255, size=(30, 40, 3), dtype=np.uint8)
        Image.fromarray(base).resize((640, 480), Image.Resampling.BICUBIC).save(p, quality=90)
        r = empty_row()
        r.update(id=f"{i:05d}", kind="image_text", source="bench", source_key=str(i), source_location=p,
                 text=f"a picture of colourful noise number {i}",
                 media=[{"kind": "image", "uri": p, "member": None, "offset": None, "length": None}])
        rows.append(r)
    rows = Probe(phash=False).process_rows(rows)

    # plain open_clip loop over the same images, same batch size
    m, _, pre = open_clip.create_model_and_transforms(args.model, pretrained=ckpt, device=args.device)
    m.eval()
    tok = open_clip.get_tokenizer(args.model)

    def plain() -> float:
        t = time.perf_counter()
        for s in range(0, len(rows), args.batch):
            chunk = rows[s:s + args.batch]
            with torch.no_grad():
                x = torch.stack([pre(Image.open(r["media"][0]["uri"]).convert("RGB")) for r in chunk]).to(args.device)
                fi = torch.nn.functional.normalize(m.encode_image(x).float(), dim=-1)
                ft = torch.nn.functional.normalize(m.encode_text(tok([r["text"] for r in chunk]).to(args.device))
                                                   .float(), dim=-1)
                (fi * ft).sum(-1).cpu().numpy()
        return time.perf_counter() - t

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from task_engine import pick_engine, run_as_tasks, spark_frame

    engine = pick_engine(args.engine)
    step = ClipScore(model=args.model, pretrained=ckpt, batch_size=args.batch, device=args.device)
    step.batch_rows = args.batch
    spark = None
    if engine == "spark":
        from reelforge.jobs.engine import run_step

        spark, df = spark_frame(rows, work, args.master)

    def spark_run() -> float:
        t = time.perf_counter()
        if spark is not None:
            n = run_step(step, df).filter("scores['clip'] is not null").count()
        else:
            n = sum(1 for r in run_as_tasks(step, rows, args.tasks) if (r["scores"] or {}).get("clip") is not None)
        if n != len(rows):
            raise SystemExit(f"the step scored {n} of {len(rows)} images")
        return time.perf_counter() - t

    spark_run()  # warm-up: each Python worker loads the model once
    plain()
    where = f"Spark {args.master}" if spark is not None else f"no Spark here: the task path, {args.tasks} task(s)"
    ours = "spark step" if spark is not None else "step, task path"
    times = {ours: [], "plain open_clip": []}
    for _ in range(args.repeats):
        times[ours].append(spark_run())
        times["plain open_clip"].append(plain())
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.images / v for k, v in med.items()}
    print(f"{args.images} images 640x480 JPEG, {args.model} random weights, {args.device}, batch {args.batch}, "
          f"{where}, torch threads {torch.get_num_threads()}")
    for k in med:
        print(f"  {k:16s} {med[k]:7.2f} s  {ips[k]:8.1f} images/s")
    ratio = ips[ours] / ips["plain open_clip"]
    print(f"  ratio step/plain: {ratio:.2f}")
    print(json.dumps({"bench": "clip", "images": args.images, "model": args.model, "device": args.device,
                      "engine": engine, "images_per_s": ips, "ratio": ratio, "seconds": times}))
    if spark is not None:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
