"""The shard writer: WebDataset tars, written atomically and deterministically, and their index.

Which sample lands in which shard depends only on the samples and the seed, never on
how Spark partitioned them, so `local[2]` and a cluster write the same bytes:

1. kept samples are sorted by an order key (sha256 of seed + id, a global shuffle; or the
   id itself), each with an estimate of its bytes in the tar;
2. one pass over the sorted partitions gathers (count, bytes) per partition, a handful of
   numbers, from which every sample learns its global position and byte offset;
3. a sample's shard is the pair (byte window, count window) it falls in: a new shard
   starts every `max_samples` samples and whenever the running bytes cross a multiple
   of `max_bytes`; pairs are numbered in order on the driver (one row per shard);
4. samples are regrouped by shard, and each shard is written by exactly one task to a
   temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from typing import Any, Iterable, Iterator

import pyarrow as pa

from reelforge.curation.errors import RecipeError
from reelforge.curation.media_io import MediaReadError, read_media_bytes
from reelforge.curation.schema import ARROW_SCHEMA, from_shard_json, rows_of, to_shard_json

SHARD_JSON_VERSION = 2  # major: a reader refuses a newer one (2: every schema field, scores by name)
READS_MAJOR = (1, 2)  # the shard JSON versions this reelforge reads
TAR_HEADER = 512
_ASSIGN_SCHEMA = pa.schema([("id", pa.string()), ("_bw", pa.int64()), ("_cw", pa.int64())])
_SUMMARY_SCHEMA = pa.schema([("pid", pa.int64()), ("n", pa.int64()), ("bytes", pa.int64())])
RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])
EXT_OF_FORMAT = {"jpeg": "jpg", "png": "png", "webp": "webp", "mp4": "mp4", "webm": "webm",
                 "matroska": "mkv", "avi": "avi"}


def _tar_size(n: int) -> int:
    return TAR_HEADER + ((n + 511) // 512) * 512


def media_members(row: dict) -> list[str]:
    """Member suffixes of a sample's media: `jpg` for one medium, `0.jpg`, `1.mp4` for several."""
    media = row.get("media") or []
    exts = []
    for m in media:
        fmt = (m.get("format") or "").lower()
        ext = EXT_OF_FORMAT.get(fmt)
        if ext is None:  # formats a loader may not know are re-encoded (images) on write
            ext = "png" if m["kind"] == "image" else "mp4"
        exts.append(ext)
    if len(exts) == 1:
        return exts
    return [f"{i}.{e}" for i, e in enumerate(exts)]


def sample_json(row: dict, members: list[str]) -> dict:
    """The `.json` member of a sample: every field `curation.schema` declares for the shard, at its
    path (documented in README, "Shard format"); `members` are the media's member names."""
    return {"version": SHARD_JSON_VERSION, **to_shard_json(row, members)}


class ShardVersionError(RecipeError):
    """A shard written by a newer reelforge, in a JSON layout this one cannot read."""


def json_major(version: Any) -> int | None:
    """The major number of a shard JSON `version` (2, "2", "2.1" -> 2); None when it is not one."""
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version
    if isinstance(version, str) and version.split(".", 1)[0].isdigit():
        return int(version.split(".", 1)[0])
    return None


# version 1 named the scores after their columns
_V1_SCORES = {"clip_score": "clip", "quality_score": "quality", "vlm_score": "vlm"}


def parse_sample_json(data: bytes | str | dict, shard: str | None = None) -> dict:
    """A shard's `.json` member -> the sample's row view (`curation.schema.from_shard_json`).

    Reads versions 1 to SHARD_JSON_VERSION; a newer major version is refused in one sentence
    (ShardVersionError) rather than read wrongly."""
    obj = json.loads(data) if isinstance(data, (bytes, bytearray, str)) else data
    version = obj.get("version", 1)
    major = json_major(version)
    if major not in READS_MAJOR:
        raise ShardVersionError(
            f"shard {shard or '(unnamed)'} holds sample {obj.get('id', '?')} in shard JSON version {version!r}, "
            f"and this reelforge reads versions {READS_MAJOR[0]} to {READS_MAJOR[-1]}: upgrade reelforge "
            "or re-write the shards with this one.")
    if major == 1 and isinstance(obj.get("scores"), dict):
        obj = {**obj, "scores": {_V1_SCORES.get(k, k): v for k, v in obj["scores"].items()}}
    return from_shard_json(obj, shard)


def encode_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _media_payload(m: dict, ext: str) -> tuple[bytes, dict]:
    """The bytes that go into the shard for one medium, and the medium as the shard JSON must
    describe them: a re-encoded image (GIF, BMP, TIFF -> PNG) gets the format, length and
    sha256 of the PNG written, never those of the original file."""
    data = read_media_bytes(m)
    fmt = (m.get("format") or "").lower()
    if m["kind"] == "image" and fmt not in EXT_OF_FORMAT:
        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, format="PNG")
        png = buf.getvalue()
        return png, {**m, "format": "png", "length": len(png), "sha256": hashlib.sha256(png).hexdigest()}
    if m.get("sha256") is not None and hashlib.sha256(data).hexdigest() != m["sha256"]:
        # the JSON would describe other bytes than the shard holds
        raise MediaReadError("media_changed", f"{m['uri']} changed since probe (sha256 differs)")
    return data, m


def encode_sample(row: dict) -> dict:
    """Sample row -> {"__key__": id, "json": bytes, "<ext>": media bytes} (raises MediaReadError)."""
    members = media_members(row)
    obj: dict[str, Any] = {"__key__": row["id"]}
    described = []
    for m, ext in zip(row.get("media") or [], members):
        obj[ext], d = _media_payload(m, ext)
        described.append(d)
    if described:
        row = {**row, "media": described}
    obj["json"] = encode_json(sample_json(row, [f"{row['id']}.{e}" for e in members]))
    return obj


class _HashingFile:
    """A write-only file that hashes what passes through, so a shard is never read back."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed


class ShardFile:
    """One tar being written: to `<name>.tmp-<pid>`, renamed into place on close.

    The tar is byte-for-byte what `webdataset.TarWriter(encoder=False, mtime=0, ...)` writes
    (members sorted by extension, fixed owner, mode and mtime), but made with `tarfile`
    directly: importing webdataset pulls torch into every Spark Python worker (~0.5 GB).
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.f = _HashingFile(open(self.tmp, "wb"))
        self.tar = tarfile.open(fileobj=self.f, mode="w|")
        self.count = 0
        self.sources: Counter[str] = Counter()

    def write(self, obj: dict, source: str) -> None:
        key = obj["__key__"]
        for ext in sorted(k for k in obj if not k.startswith("_")):
            data = obj[ext]
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size = len(data)
            ti.mtime = 0
            ti.mode = 0o444
            ti.uname = ti.gname = "reelforge"
            self.tar.addfile(ti, io.BytesIO(data))
        self.count += 1
        self.sources[source] += 1

    def close(self) -> dict:
        self.tar.close()
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"shard": os.path.basename(self.path), "samples": self.count, "bytes": self.f.size,
                "sha256": self.f.sha.hexdigest(), "sources": dict(sorted(self.sources.items()))}

    def abort(self) -> None:
        try:
            self.tar.close()
        except Exception:  # noqa: BLE001 - the temporary file is removed either way
            pass
        try:
            self.f.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def estimate_bytes(row: dict) -> int:
    text = sum(len(row.get(k) or "") for k in ("text", "chosen", "rejected", "meta"))
    text += sum(len(m["content"]) + 32 for m in row.get("messages") or [])
    text += sum(len(c["text"]) + len(c["prompt"]) + len(c["model"]) + 64 for c in row.get("captions") or [])
    media = sum(_tar_size(int(m.get("length") or 0)) for m in row.get("media") or [])
    return _tar_size(text + 600) + media


# --- Spark side ---------------------------------------------------------------------------

def write_shards(df, out_dir: str, max_samples: int = 1000, max_bytes: int = 1 << 30,
                 shuffle: bool = True, seed: int = 0, prefix: str = "shard",
                 write_partitions: int | None = None):
    """Write live rows of `df` into shards under out_dir.

    Returns (results DataFrame [id, shard, status, reason, detail], list of shard stats).
    """
    from pyspark import StorageLevel, TaskContext
    from pyspark.sql import functions as F

    os.makedirs(out_dir, exist_ok=True)
    spark = df.sparkSession
    live = df.filter(F.col("drop_step").isNull())
    order = F.sha2(F.concat(F.lit(f"{seed}:"), F.col("id")), 256) if shuffle else F.col("id")
    def estimate(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            rows = rows_of(b)
            yield pa.RecordBatch.from_pylist(
                [{"id": r["id"], "_est": estimate_bytes(r)} for r in rows],
                schema=pa.schema([("id", pa.string()), ("_est", pa.int64())]))

    sizes = live.mapInArrow(estimate, "id string, _est long")
    keyed = sizes.withColumn("_order", order).sort("_order").persist(StorageLevel.MEMORY_AND_DISK)

    def summary(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pid = TaskContext.get().partitionId()
        n = total = 0
        for b in batches:
            n += b.num_rows
            total += sum(b.column("_est").to_pylist())
        yield pa.RecordBatch.from_pylist([{"pid": pid, "n": n, "bytes": total}], schema=_SUMMARY_SCHEMA)

    summaries = keyed.mapInArrow(summary, "pid long, n long, bytes long").collect()
    parts = {r["pid"]: (r["n"], r["bytes"]) for r in summaries}
    starts: dict[int, tuple[int, int]] = {}
    idx = off = 0
    for pid in sorted(parts):
        starts[pid] = (idx, off)
        idx += parts[pid][0]
        off += parts[pid][1]
    starts_b = spark.sparkContext.broadcast(starts)

    def assign(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pid = TaskContext.get().partitionId()
        i, pos = starts_b.value.get(pid, (0, 0))
        for b in batches:
            out = []
            for r in b.to_pylist():
                out.append({"id": r["id"], "_bw": pos // max_bytes, "_cw": i // max_samples})
                i += 1
                pos += r["_est"]
            yield pa.RecordBatch.from_pylist(out, schema=_ASSIGN_SCHEMA)

    assigned = keyed.mapInArrow(assign, "id string, _bw long, _cw long").join(keyed.select("id", "_order"), "id")
    pairs = sorted((r["_bw"], r["_cw"]) for r in assigned.select("_bw", "_cw").distinct().collect())
    width = max(6, len(str(len(pairs))))
    names = {p: f"{prefix}-{i:0{width}d}.tar" for i, p in enumerate(pairs)}
    names_b = spark.sparkContext.broadcast(names)
    shard_of = F.udf(lambda bw, cw: names_b.value[(bw, cw)], "string")
    assigned = assigned.withColumn("_shard", shard_of("_bw", "_cw")).select("id", "_order", "_shard")

    n_parts = write_partitions or max(1, min(len(pairs), spark.sparkContext.defaultParallelism * 4))
    to_write = (live.join(assigned, "id")
                .repartition(n_parts, "_shard")
                .sortWithinPartitions("_shard", "_order"))
    out_schema_spark = "id string, shard string, status string, reason string, detail string"
    stats_dir = os.path.join(out_dir, ".stats")
    os.makedirs(stats_dir, exist_ok=True)

    def write(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        state: dict = {"current": None}
        try:
            yield from write_part(batches, state)
        except BaseException:
            if state["current"] is not None:  # a failed write (disk full, ...) leaves no temporary file
                state["current"].abort()
            raise

    def write_part(batches: Iterable[pa.RecordBatch], state: dict) -> Iterator[pa.RecordBatch]:
        current: ShardFile | None = None
        current_name = None
        cols = [f.name for f in ARROW_SCHEMA]
        for b in batches:
            results = []
            for r in rows_of(b):
                name = r["_shard"]
                if name != current_name:
                    if current is not None:
                        _save_stats(stats_dir, current.close())
                        state["current"] = current = None
                    current, current_name = ShardFile(os.path.join(out_dir, name)), name
                    state["current"] = current
                row = {c: r.get(c) for c in cols}
                try:
                    obj = encode_sample(row)
                except MediaReadError as e:
                    results.append({"id": row["id"], "shard": None, "status": "dropped",
                                    "reason": e.reason, "detail": e.detail})
                    continue
                except Exception as e:  # noqa: BLE001 - one bad sample never fails a shard
                    results.append({"id": row["id"], "shard": None, "status": "dropped",
                                    "reason": "write_error", "detail": f"{type(e).__name__}: {e}"[:500]})
                    continue
                current.write(obj, row["source"])
                results.append({"id": row["id"], "shard": name, "status": "kept", "reason": None,
                                "detail": None})
            yield pa.RecordBatch.from_pylist(results, schema=RESULT_SCHEMA)
        if current is not None:
            _save_stats(stats_dir, current.close())
            state["current"] = None

    results = to_write.mapInArrow(write, out_schema_spark)
    return results, names, stats_dir, keyed


def _save_stats(stats_dir: str, stats: dict) -> None:
    path = os.path.join(stats_dir, stats["shard"] + ".json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats, f, sort_keys=True)
    os.replace(tmp, path)


def read_stats(stats_dir: str, names: dict) -> list[dict]:
    out = []
    for name in sorted(names.values()):
        p = os.path.join(stats_dir, name + ".json")
        if os.path.exists(p):
            with open(p) as f:
                out.append(json.load(f))
    return out
