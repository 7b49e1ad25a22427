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
from typing import Any

import pyarrow as pa

from reelforge.curation.errors import RecipeError
from reelforge.curation.media_io import MediaReadError, read_media_bytes
from reelforge.curation.schema import from_shard_json, to_shard_json

SHARD_JSON_VERSION = 2  # major: a reader refuses a newer one (2: every schema field, scores by name)
READS_MAJOR = (1, 2)  # the shard JSON versions this reelforge reads
TAR_HEADER = 512
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
