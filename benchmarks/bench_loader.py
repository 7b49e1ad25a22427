"""Training-loader throughput: reelforge's ShardLoader (blend, split, decode, chat template, packing,
resumable state) against a plain `webdataset` loop over the same shards.

Writes N image-text samples (noisy JPEGs of 200-500 px, captions) as reelforge shards with the
project's own writer, then reads one epoch of them, in DataLoader workers, twice per repeat:

  project  `training.loader.ShardLoader`: per sample JPEG decode (draft mode) + resize to the
           smart_resize size, the conversation rendered by the tokenizer's chat template with
           `<|image_pad|>` repeated to the visual token count, labels masked to the answer, then
           greedy packing into rows of `--max-len` tokens, and its state handed back per batch;
  peer     `webdataset.WebDataset(urls).decode("pil")` (split_by_worker) and a map that resizes each
           image to the same smart_resize size, makes the uint8 tensor and tokenises the caption
           (no chat template, no packing), one sample at a time.

The order of the two alternates between repeats; medians are quoted. Figures only.

    .venv/bin/python benchmarks/bench_loader.py [--samples 4000] [--workers 2] [--max-len 4096]
        [--repeats 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import torch  # noqa: E402

from reelforge.curation.schema import empty_row, make_id  # noqa: E402
from reelforge.curation.shards import ShardFile, encode_sample  # noqa: E402
from reelforge.curation.tokens import VisualTokenConfig, image_tokens  # noqa: E402

VOCAB = ("the a red blue green yellow circle square triangle line picture image shows small large "
         "old new river city night light tree road house sky cloud sun on of with and").split()


def make_shards(root: str, n: int, per_shard: int, seed: int) -> list[str]:
    from PIL import Image

    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    media = os.path.join(root, "media")
    os.makedirs(media, exist_ok=True)
    urls, shards, cur = [], [], None
    for i in range(n):
        if i % per_shard == 0:
            if cur is not None:
                shards.append(cur.close())
            url = os.path.join(root, f"bench-{i // per_shard:06d}.tar")
            cur = ShardFile(url)
            urls.append(url)
        w, h = rng.randint(200, 500), rng.randint(200, 500)
        img = Image.frombytes("RGB", (w // 8, h // 8), rng.randbytes((w // 8) * (h // 8) * 3)).resize((w, h))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        path = os.path.join(media, f"{i:07d}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        row = empty_row()
        text = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(8, 40)))
        row.update(kind="image_text", source="bench", source_key=f"b:{i}", source_location=root, text=text,
                   media=[{"kind": "image", "uri": path, "member": None, "offset": None, "length": len(data),
                           "sha256": None, "format": "jpeg", "width": w, "height": h, "duration": None, "fps": None,
                           "frames": None, "codec": None, "phash": None}])
        row["id"] = make_id("bench", f"b:{i}", text)
        cur.write(encode_sample(row), "bench")
    shards.append(cur.close())
    shutil.rmtree(media)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"shards": shards, "samples": n}, f)
    return urls


def run_project(cfg, tokens: list[int]) -> tuple[float, int]:
    from reelforge.training.loader import ShardLoader

    t = time.perf_counter()
    n = 0
    for b in ShardLoader(cfg):
        n += len(b["samples"])
        tokens.append(int(b["tokens"]))
    return time.perf_counter() - t, n


class _PeerMap:
    """What a plain webdataset user writes: resize to the token rules' size, tensor, tokenise."""

    def __init__(self, tok_dir: str):
        self.tok_dir, self.tok = tok_dir, None
        self.cfg = VisualTokenConfig()

    def __call__(self, s: dict) -> dict:
        from PIL import Image
        from transformers import AutoTokenizer

        if self.tok is None:
            self.tok = AutoTokenizer.from_pretrained(self.tok_dir)
        im = s["jpg"]
        r = image_tokens(im.height, im.width, self.cfg)
        im = im.resize((r["resized_width"], r["resized_height"]), Image.BICUBIC)
        import numpy as np

        return {"id": s["__key__"], "pixels": torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1),
                "ids": self.tok(s["json"]["text"], add_special_tokens=False)["input_ids"]}


def run_peer(urls: list[str], tok_dir: str, workers: int) -> tuple[float, int]:
    import webdataset as wds

    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
          .decode("pil").map(_PeerMap(tok_dir)))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    t = time.perf_counter()
    n = sum(1 for _ in dl)
    return time.perf_counter() - t, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    from reelforge.curation.tiny_models import build_tiny_tokenizer
    from reelforge.training.config import stage_from_dict

    work = args.workdir or tempfile.mkdtemp(prefix="bench_loader-")
    try:
        t = time.perf_counter()
        shard_dir = os.path.join(work, "shards")
        urls = make_shards(shard_dir, args.samples, args.per_shard, args.seed)
        tok_dir = build_tiny_tokenizer(os.path.join(work, "tokenizer"))
        mb = sum(os.path.getsize(u) for u in urls) / 1e6
        print(f"wrote {args.samples} image-text samples in {len(urls)} shards ({mb:.1f} MB) "
              f"in {time.perf_counter() - t:.1f}s under {work}")
        cfg = stage_from_dict({
            "model": {"vision": tok_dir, "llm": tok_dir, "tokenizer": tok_dir},
            "data": {"sources": [{"name": "bench", "path": shard_dir}], "max_len": args.max_len,
                     "num_workers": args.workers, "epochs": 1, "prefetch": 4},
            "output": {"dir": os.path.join(work, "out")}})
        times: dict[str, list[float]] = {"project": [], "peer": []}
        pack_tokens: list[int] = []
        print(f"\n{'rep':>3} {'loader':<8} {'seconds':>8} {'samples/s':>10}")
        for rep in range(args.repeats):
            order = ("project", "peer") if rep % 2 == 0 else ("peer", "project")
            for w in order:
                toks: list[int] = []
                sec, n = run_project(cfg, toks) if w == "project" else run_peer(urls, tok_dir, args.workers)
                if n != args.samples:
                    raise SystemExit(f"{w} read {n} samples, expected {args.samples}")
                if w == "project":
                    pack_tokens = toks
                times[w].append(sec)
                print(f"{rep:>3} {w:<8} {sec:>8.3f} {n / sec:>10.1f}")
        med = {w: statistics.median(v) for w, v in times.items()}
        sps = {w: args.samples / med[w] for w in med}
        fill = statistics.mean(pack_tokens) / args.max_len if pack_tokens else 0.0
        ratio = sps["project"] / sps["peer"]
        print(f"\nmedian of {args.repeats} ({args.samples} samples, {args.workers} workers, max_len {args.max_len}, "
              f"{len(pack_tokens)} packed rows, fill {fill:.1%})")
        for w in ("project", "peer"):
            print(f"{w:<8} {med[w]:>8.3f} s {sps[w]:>10.1f} samples/s")
        print(f"ratio project/peer (samples/s): {ratio:.2f}")
        print(json.dumps({"bench": "loader", "samples": args.samples, "workers": args.workers,
                          "max_len": args.max_len, "repeats": args.repeats,
                          "seconds": {w: [round(s, 3) for s in v] for w, v in times.items()},
                          "samples_per_s": {w: round(v, 1) for w, v in sps.items()},
                          "ratio_project_over_peer": round(ratio, 3), "pack_fill": round(fill, 3)}, sort_keys=True))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
