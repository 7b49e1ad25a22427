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

    from reelforge.curation.schema import ARROW_SCHEMA
    from reelforge.jobs.engine import run_step
    from reelforge.jobs.spark import get_spark, spark_schema

    spark = get_spark(args.master)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), os.path.join(work, "rows.parquet"))
    df = spark.read.schema(spark_schema()).parquet(os.path.join(work, "rows.parquet"))
    df = df.repartition(spark.sparkContext.defaultParallelism).cache()
    df.count()
    step = ClipScore(model=args.model, pretrained=ckpt, batch_size=args.batch, device=args.device)
    step.batch_rows = args.batch

    def spark_run() -> float:
        t = time.perf_counter()
        run_step(step, df).filter("scores['clip'] is not null").count()
        return time.perf_counter() - t

    spark_run()  # warm-up: each Python worker loads the model once
    plain()
    times = {"spark step": [], "plain open_clip": []}
    for _ in range(args.repeats):
        times["spark step"].append(spark_run())
        times["plain open_clip"].append(plain())
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.images / v for k, v in med.items()}
    print(f"{args.images} images 640x480 JPEG, {args.model} random weights, {args.device}, batch {args.batch}, "
          f"Spark {args.master}, torch threads {torch.get_num_threads()}")
    for k in med:
        print(f"  {k:16s} {med[k]:7.2f} s  {ips[k]:8.1f} images/s")
    ratio = ips["spark step"] / ips["plain open_clip"]
    print(f"  ratio spark/plain: {ratio:.2f}")
    print(json.dumps({"bench": "clip", "images": args.images, "model": args.model, "device": args.device,
                      "images_per_s": ips, "ratio": ratio, "seconds": times}))
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
