"""Shard-writer throughput: reelforge's writer against a plain `webdataset.ShardWriter`.

Builds N sample rows in memory (half image-text rows whose media is a small JPEG file on
disk, half ~500-char text rows), then writes the same rows, in the same order and with
the same samples per shard, twice per repeat:

  project  what one Spark write task does per sample: `encode_sample(row)` (reads the
           JPEG from disk by reference, builds the `.json` member) + `ShardFile.write`,
           and per shard `ShardFile.close()` (sha256 of the tar, rename) + its stats file;
  prepared the Spark job's write path (`jobs/shards.py`) in one process: per sample
           `prepare_sample` (the `.json` member and headers from the row, its text handed over as
           UTF-8 bytes as Arrow holds it: what the reading task does) + `complete_sample` (reads
           the JPEG, checks its sha256) + `TarStream.write`, per shard `TarStream.close()`;
  peer     `webdataset.ShardWriter(encoder=False)` given the same keys and metadata: it reads
           each JPEG from disk too and json-encodes each metadata dict (prepared from the
           schema row before the clock starts) as any webdataset user must.

The order of the two alternates between repeats; medians are quoted. It also checks that
both writers put the same members (names and bytes) into the first shard.

    .venv/bin/python benchmarks/bench_shard_writer.py [--samples 20000] [--per-shard 1000]
        [--repeats 5] [--workdir DIR] [--keep]

Figures only, no assertions on timing. The JPEGs are read from the page cache after the
first pass, and neither writer fsyncs, so this measures CPU and copying, not the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

from reelforge.curation.schema import empty_row, make_id, set_score  # noqa: E402
from reelforge.curation.shards import (  # noqa: E402
    RAW_FIELDS,
    ShardFile,
    TarStream,
    _save_stats,
    complete_sample,
    encode_json,
    encode_sample,
    media_members,
    prepare_sample,
    sample_json,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import alternate  # noqa: E402

TAR_OPTS = dict(user="reelforge", group="reelforge", mode=0o444, mtime=0)  # as ShardFile


def _words(rng: random.Random, n_chars: int) -> str:
    vocab = ("the a cat dog sits on mat red blue photo of image shows river city night light "
             "small large old new man woman child tree car road house sky cloud sun").split()
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(vocab)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def make_jpeg(rng: random.Random, path: str) -> tuple[int, int, int, str]:
    """A noisy JPEG of roughly 5-20 KB (noise keeps it from compressing away)."""
    from PIL import Image

    w, h = rng.randint(84, 144), rng.randint(84, 144)
    img = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(80, 90))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return w, h, len(data), hashlib.sha256(data).hexdigest()


def build_rows(n: int, media_dir: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    kinds = ["image_text"] * (n // 2) + ["text"] * (n - n // 2)
    rng.shuffle(kinds)
    rows = []
    for i, kind in enumerate(kinds):
        row = empty_row()
        if kind == "image_text":
            path = os.path.join(media_dir, f"{i:07d}.jpg")
            w, h, length, sha = make_jpeg(rng, path)
            row.update(kind=kind, source="bench_img", source_key=f"imgs.jsonl:{i + 1}",
                       source_location=os.path.join(media_dir, "imgs.jsonl"),
                       text=f"{_words(rng, rng.randint(40, 120))} #{i}",
                       media=[{"kind": "image", "uri": path, "member": None, "offset": None,
                               "length": length, "sha256": sha, "format": "jpeg", "width": w,
                               "height": h, "duration": None, "fps": None, "frames": None,
                               "codec": None, "phash": None}],
                       meta=json.dumps({"url": f"https://example.com/{i}.jpg", "license": "cc-by"}))
        else:
            row.update(kind=kind, source="bench_txt", source_key=f"text.jsonl:{i + 1}",
                       source_location=os.path.join(media_dir, "text.jsonl"),
                       text=f"{_words(rng, 495)} #{i}")
        row["text_tokens"] = len(row["text"]) // 4
        row["visual_tokens"] = 64 if kind == "image_text" else 0
        row["tokens"] = row["text_tokens"] + row["visual_tokens"]
        set_score(row, "quality", round(rng.random(), 4))
        row["id"] = make_id(row["source"], row["source_key"], row["text"])
        rows.append(row)
    return rows


def peer_inputs(rows: list[dict]) -> list[tuple[str, str | None, str | None, dict]]:
    """(key, media member ext, media path, metadata dict) per row: what the peer is handed.

    The peer json-encodes the dict inside the timed loop, as any webdataset user writing
    metadata must; building the dict from the schema row is the project's own extra work."""
    out = []
    for r in rows:
        members = media_members(r)
        js = sample_json(r, [f"{r['id']}.{e}" for e in members])
        if r.get("media"):
            out.append((r["id"], members[0], r["media"][0]["uri"], js))
        else:
            out.append((r["id"], None, None, js))
    return out


def run_project(rows: list[dict], out_dir: str, per_shard: int) -> float:
    os.makedirs(out_dir)
    stats_dir = os.path.join(out_dir, ".stats")
    os.makedirs(stats_dir)
    t = time.perf_counter()
    current = None
    for i, r in enumerate(rows):
        if i % per_shard == 0:
            if current is not None:
                _save_stats(stats_dir, current.close())
            current = ShardFile(os.path.join(out_dir, f"shard-{i // per_shard:06d}.tar"))
        current.write(encode_sample(r), r["source"])
    if current is not None:
        _save_stats(stats_dir, current.close())
    return time.perf_counter() - t


def prepared_inputs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(row without its RAW_FIELDS, those fields as UTF-8 bytes): how a Spark task holds a row."""
    return [({**r, **dict.fromkeys(RAW_FIELDS)}, {k: None if r[k] is None else r[k].encode() for k in RAW_FIELDS})
            for r in rows]


def run_prepared(inputs: list[tuple[dict, dict]], out_dir: str, per_shard: int) -> float:
    os.makedirs(out_dir)
    stats_dir = os.path.join(out_dir, ".stats")
    os.makedirs(stats_dir)
    t = time.perf_counter()
    current = None
    for i, (r, raw) in enumerate(inputs):
        if i % per_shard == 0:
            if current is not None:
                _save_stats(stats_dir, current.close())
            current = TarStream(os.path.join(out_dir, f"shard-{i // per_shard:06d}.tar"))
        pieces, deferred = prepare_sample(r, raw)
        current.write(complete_sample(r["id"], b"".join(pieces), deferred), r["source"])
    if current is not None:
        _save_stats(stats_dir, current.close())
    return time.perf_counter() - t


def run_peer(inputs: list, out_dir: str, per_shard: int) -> float:
    import webdataset as wds

    os.makedirs(out_dir)
    t = time.perf_counter()
    with wds.ShardWriter(os.path.join(out_dir, "shard-%06d.tar"), maxcount=per_shard, maxsize=1e15,
                         verbose=0, encoder=False, **TAR_OPTS) as sink:
        for key, ext, path, js in inputs:
            obj = {"__key__": key, "json": encode_json(js)}
            if path is not None:
                with open(path, "rb") as f:
                    obj[ext] = f.read()
            sink.write(obj)
    return time.perf_counter() - t


def time_encode_only(rows: list[dict]) -> float:
    """`encode_sample` alone: media read through `read_media_bytes` + the `.json` member."""
    t = time.perf_counter()
    for r in rows:
        encode_sample(r)
    return time.perf_counter() - t


def time_json_only(rows: list[dict]) -> float:
    """Building the `.json` member alone (the peer is handed these bytes)."""
    t = time.perf_counter()
    for r in rows:
        members = media_members(r)
        encode_json(sample_json(r, [f"{r['id']}.{e}" for e in members]))
    return time.perf_counter() - t


def time_read_only(inputs: list) -> float:
    """What the peer does before its TarWriter: open and read each JPEG."""
    t = time.perf_counter()
    for key, ext, path, js in inputs:
        obj = {"__key__": key, "json": js}
        if path is not None:
            with open(path, "rb") as f:
                obj[ext] = f.read()
    return time.perf_counter() - t


def time_hash_pass(out_dir: str) -> float:
    """sha256 over the finished tars: the hashing `ShardFile` does while it writes, alone."""
    t = time.perf_counter()
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".tar"):
            h = hashlib.sha256()
            with open(os.path.join(out_dir, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return time.perf_counter() - t


def members(path: str) -> list[tuple[str, str]]:
    with tarfile.open(path) as tf:
        return [(m.name, hashlib.sha256(tf.extractfile(m).read()).hexdigest()) for m in tf if m.isfile()]


def sha_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for the media and shards (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="bench_shard_writer-")
    os.makedirs(work, exist_ok=True)
    media_dir = os.path.join(work, "media")
    os.makedirs(media_dir, exist_ok=True)
    try:
        t = time.perf_counter()
        rows = build_rows(args.samples, media_dir, args.seed)
        inputs = peer_inputs(rows)
        prepped = prepared_inputs(rows)
        n_img = sum(1 for r in rows if r["media"])
        jpeg_bytes = [r["media"][0]["length"] for r in rows if r["media"]]
        print(f"built {len(rows)} samples ({n_img} image-text, JPEG {min(jpeg_bytes)}-{max(jpeg_bytes)} B, "
              f"mean {statistics.mean(jpeg_bytes) / 1e3:.1f} KB; {len(rows) - n_img} text) "
              f"in {time.perf_counter() - t:.1f}s under {work}")

        # first shard: same members (names and bytes)?
        check_dirs = {w: os.path.join(work, f"check-{w}") for w in ("project", "prepared", "peer")}
        run_project(rows, check_dirs["project"], args.per_shard)
        run_prepared(prepped, check_dirs["prepared"], args.per_shard)
        run_peer(inputs, check_dirs["peer"], args.per_shard)
        first = {w: os.path.join(d, "shard-000000.tar") for w, d in check_dirs.items()}
        m_proj, m_peer = members(first["project"]), members(first["peer"])
        same_members = m_proj == m_peer
        same_file = sha_file(first["project"]) == sha_file(first["peer"]) == sha_file(first["prepared"])
        n_shards = {w: len([f for f in os.listdir(d) if f.endswith(".tar")]) for w, d in check_dirs.items()}
        print(f"first shard check: project {len(m_proj)} members, peer {len(m_peer)} members, "
              f"same names and bytes: {same_members}; whole tar identical (prepared too): {same_file}; "
              f"shards project/prepared/peer: {n_shards['project']}/{n_shards['prepared']}/{n_shards['peer']}")
        parts: dict[str, list[float]] = {"encode_sample": [], "json member": [], "peer read": [],
                                         "shard sha256": []}
        for _ in range(args.repeats):
            parts["encode_sample"].append(time_encode_only(rows))
            parts["json member"].append(time_json_only(rows))
            parts["peer read"].append(time_read_only(inputs))
            parts["shard sha256"].append(time_hash_pass(check_dirs["project"]))
        for d in check_dirs.values():
            shutil.rmtree(d)

        times, out_bytes = alternate(work, args.repeats, len(rows), {
            "project": lambda d: run_project(rows, d, args.per_shard),
            "prepared": lambda d: run_prepared(prepped, d, args.per_shard),
            "peer": lambda d: run_peer(inputs, d, args.per_shard)})

        med = {w: statistics.median(v) for w, v in times.items()}
        sps = {w: len(rows) / med[w] for w in med}
        mbs = {w: out_bytes[w] / med[w] / 1e6 for w in med}
        ratio = sps["project"] / sps["peer"]
        print()
        print(f"median of {args.repeats} ({len(rows)} samples, {args.per_shard}/shard, "
              f"{out_bytes['project'] / 1e6:.1f} MB of tars)")
        print(f"{'writer':<8} {'seconds':>8} {'samples/s':>10} {'MB/s':>8}")
        for w in ("project", "prepared", "peer"):
            print(f"{w:<8} {med[w]:>8.3f} {sps[w]:>10.0f} {mbs[w]:>8.1f}")
        print(f"ratio project/peer (samples/s): {ratio:.2f}; prepared/peer: {sps['prepared'] / sps['peer']:.2f}")
        med_parts = {k: statistics.median(v) for k, v in parts.items()}
        print()
        print(f"where the difference goes (median s for all {len(rows)} samples, measured apart):")
        print(f"  project encode_sample (read media + json): {med_parts['encode_sample']:.3f}"
              f"   of which json member: {med_parts['json member']:.3f}")
        print(f"  peer read of the same media:               {med_parts['peer read']:.3f}")
        print(f"  sha256 of the shard bytes (while writing): {med_parts['shard sha256']:.3f}")
        print(f"  difference project - peer:                 {med['project'] - med['peer']:.3f}")
        print(json.dumps({
            "bench": "shard_writer", "samples": len(rows), "image_text": n_img, "per_shard": args.per_shard,
            "repeats": args.repeats, "tar_bytes": out_bytes,
            "seconds": {w: [round(s, 4) for s in v] for w, v in times.items()},
            "median_seconds": {w: round(v, 4) for w, v in med.items()},
            "samples_per_s": {w: round(v, 1) for w, v in sps.items()},
            "mb_per_s": {w: round(v, 2) for w, v in mbs.items()},
            "ratio_project_over_peer": round(ratio, 3),
            "ratio_prepared_over_peer": round(sps["prepared"] / sps["peer"], 3),
            "breakdown_median_seconds": {k: round(v, 4) for k, v in med_parts.items()},
            "first_shard_same_members": same_members, "first_shard_identical": same_file,
        }, sort_keys=True))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
