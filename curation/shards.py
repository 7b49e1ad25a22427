"""The shard writer: WebDataset tars, written atomically and deterministically, and their index.

Which sample lands in which shard depends only on the samples and the seed, never on
how Spark partitioned them, so `local[2]` and a cluster write the same bytes:

1. every kept sample is encoded once, where its row is read: its `.json` member (and any
   medium re-encoded to PNG) as the tar bytes the shard will hold (`prepare_sample`), into a
   file of the task; what goes on is a key row: the order key (sha256 of seed + id, a global
   shuffle; or the id itself), an estimate of its bytes in the tar, and the byte range of its
   prepared bytes;
2. the key rows are laid out in order: a sample's shard is the pair (byte window, count
   window) it falls in: a new shard starts every `max_samples` samples and whenever the
   running bytes cross a multiple of `max_bytes`; pairs are numbered in order;
3. key rows (not samples) are regrouped by shard, and each shard is written by exactly one
   task, to a temporary name renamed into place: each sample's prepared bytes copied from
   their range, its media read (and checked against probe's sha256) in between
   (`complete_sample`).

The tar bytes are those of `webdataset.TarWriter(encoder=False, mtime=0, ...)` (`ShardFile`,
made with `tarfile`); the write path makes the same bytes without `tarfile` or a Python
string of the text (`tar_member`, `json_string`), tested equal.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
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


_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))  # what json.dumps makes per call


def encode_json(obj: dict) -> bytes:
    return _JSON.encode(obj).encode("utf-8")


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


# --- the write path: tar bytes without tarfile, JSON text without a Python string --------------

RAW_FIELDS = ("text", "chosen", "rejected")  # top-level strings the write path takes as UTF-8 bytes
_RECORD = 10240  # tarfile.RECORDSIZE: a finished tar is padded to a multiple of it
_NUL = bytes(TAR_HEADER)
_USER = "reelforge"
_HEAD_IDS = b"0000444\0" + b"0000000\0" * 2  # mode 0o444, uid 0, gid 0
_HEAD_MTIME = b"00000000000\0"
_HEAD_TAIL = (b"0" + bytes(100) + b"ustar\x0000" + _USER.encode().ljust(32, b"\0") * 2 + bytes(8 + 8 + 155 + 12))
_HEAD_SUM = sum(_HEAD_IDS) + sum(_HEAD_MTIME) + sum(b" " * 8) + sum(_HEAD_TAIL)
_JSON_PLAIN = bytes(c for c in range(256) if c >= 0x20 and c not in b'"\\')  # bytes JSON keeps as they are
_JSON_ESCAPE = {**{c: b"\\u%04x" % c for c in range(0x20)}, 0x22: b'\\"', 0x5C: b"\\\\", 0x08: b"\\b",
                0x09: b"\\t", 0x0A: b"\\n", 0x0C: b"\\f", 0x0D: b"\\r"}


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) `ShardFile` writes for a member: ustar built here for an ASCII name of
    at most 100 characters and a size below 8 GiB, else tarfile's own (with a pax header)."""
    if size < 8 ** 11 and len(name) <= 100 and name.isascii():
        nb, sb = name.encode("ascii"), b"%011o\0" % size
        chk = _HEAD_SUM + sum(nb) + sum(sb)
        return b"".join((nb, bytes(100 - len(nb)), _HEAD_IDS, sb, _HEAD_MTIME, b"%06o\0 " % chk, _HEAD_TAIL))
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, 0, 0o444, _USER, _USER
    return ti.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "strict")


def tar_member(name: str, pieces: list[bytes]) -> list[bytes]:
    """A member's bytes in the tar, as pieces: header, the data's pieces, padding to 512 bytes."""
    size = sum(map(len, pieces))
    return [tar_header(name, size), *pieces, _NUL[:-size % TAR_HEADER]]


def _json_escape(utf8: bytes) -> bytes:
    special = utf8.translate(None, _JSON_PLAIN)
    if special:
        if 0x5C in special:  # first: the escapes below bring backslashes of their own
            utf8 = utf8.replace(b"\\", b"\\\\")
        for c in set(special) - {0x5C}:
            utf8 = utf8.replace(bytes((c,)), _JSON_ESCAPE[c])
    return utf8


def json_string(utf8: bytes) -> bytes:
    """`json.dumps(s, ensure_ascii=False).encode()` from the UTF-8 bytes of s, never decoded:
    only '"', '\\' and control bytes are escaped, and no byte of a multi-byte character is one."""
    return b'"' + _json_escape(utf8) + b'"'


_MARK = f"\ue000{uuid.uuid4().hex}:"  # stands in for a raw string while the rest is encoded


def json_pieces(obj: dict, raw: dict[str, bytes]) -> list[bytes]:
    """`encode_json(obj)` with the top-level strings `raw` (UTF-8 bytes) in place, as pieces; each
    escaped string is a piece of its own, never copied into the rest. obj is encoded once with a
    marker string per raw key, split at the markers; should a marker occur elsewhere too (it
    never does by chance: a random token), the keys are encoded in runs instead."""
    if not raw:
        return [encode_json(obj)]
    js = encode_json({**obj, **{k: _MARK + k for k in raw}})
    marks = [(k, f'"{_MARK}{k}"'.encode()) for k in sorted(raw)]  # in the order encode_json puts them
    if any(js.count(m) != 1 for _, m in marks):
        return [_encode_json_runs(obj, {k: json_string(v) for k, v in raw.items()})]
    out = []
    for k, m in marks:
        before, js = js.split(m)
        out += [before + b'"', _json_escape(raw[k])]
        js = b'"' + js
    out.append(js)
    return out


def _encode_json_runs(obj: dict, raw: dict[str, bytes]) -> bytes:
    """encode_json of obj with raw's JSON values in place: the keys in order, runs of ordinary keys
    encoded together."""
    parts, run = [], {}
    for k in sorted([*obj, *raw]):
        if k in raw:
            if run:
                parts.append(encode_json(run)[1:-1])
                run = {}
            parts.append(b'"' + k.encode() + b'":' + raw[k])
        else:
            run[k] = obj[k]
    if run:
        parts.append(encode_json(run)[1:-1])
    return b"{" + b",".join(parts) + b"}"


def _reencoded(m: dict) -> bool:
    return m["kind"] == "image" and (m.get("format") or "").lower() not in EXT_OF_FORMAT


_DEFERRED_FIELDS = ("kind", "uri", "member", "offset", "length", "sha256", "format")  # what reading needs


def prepare_sample(row: dict, raw: dict[str, bytes | None]) -> tuple[list[bytes], list[list]]:
    """A sample's tar bytes but for the media read when its shard is written: (pieces, deferred),
    deferred = [[byte position in the pieces, member ext, media reference], ...].

    `raw` holds the RAW_FIELDS as UTF-8 bytes (row holds them as None). A sample with a medium
    re-encoded to PNG (its JSON describes the PNG) has every medium read here, in order, as
    `encode_sample` reads them (raises MediaReadError); its pieces are then complete."""
    members = media_members(row)
    media = row.get("media") or []
    data: dict[str, list[bytes]] = {}
    if any(_reencoded(m) for m in media):
        described = []
        for m, ext in zip(media, members):
            payload, d = _media_payload(m, ext)
            data[ext] = [payload]
            described.append(d)
        row = {**row, "media": described}
    js = json_pieces(sample_json(row, [f"{row['id']}.{e}" for e in members]),
                     {k: v for k, v in raw.items() if v is not None})
    if not media:
        return tar_member(f"{row['id']}.json", js), []
    data["json"] = js
    later = {ext: m for m, ext in zip(media, members) if ext not in data}
    pieces: list[bytes] = []
    deferred: list[list] = []
    pos = 0
    for ext in sorted([*data, *later]):
        if ext in later:
            deferred.append([pos, ext, {k: later[ext].get(k) for k in _DEFERRED_FIELDS}])
            continue
        member = tar_member(f"{row['id']}.{ext}", data[ext])
        pieces += member
        pos += sum(map(len, member))
    return pieces, deferred


def complete_sample(key: str, prepared: bytes, deferred: list[list]) -> list[bytes]:
    """A sample's tar bytes: its prepared bytes with the deferred media read (and checked) now
    and put in place; raises MediaReadError."""
    out, last = [], 0
    for pos, ext, m in deferred:
        data, _ = _media_payload(m, ext)
        out.append(prepared[last:pos])
        out += tar_member(f"{key}.{ext}", [data])
        last = pos
    out.append(prepared[last:])
    return out


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


class _Shard:
    """A tar being written to `<name>.tmp-<pid>`, hashed as it goes, renamed into place on close."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.f = _HashingFile(open(self.tmp, "wb", buffering=1 << 20))
        self.count = 0
        self.sources: Counter[str] = Counter()

    def _end(self) -> None:
        """Write what ends the archive."""
        raise NotImplementedError

    def close(self) -> dict:
        self._end()
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"shard": os.path.basename(self.path), "samples": self.count, "bytes": self.f.size,
                "sha256": self.f.sha.hexdigest(), "sources": dict(sorted(self.sources.items()))}

    def abort(self) -> None:
        try:
            self._end()
        except Exception:  # noqa: BLE001 - the temporary file is removed either way
            pass
        try:
            self.f.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


class ShardFile(_Shard):
    """One tar being written: to `<name>.tmp-<pid>`, renamed into place on close.

    The tar is byte-for-byte what `webdataset.TarWriter(encoder=False, mtime=0, ...)` writes
    (members sorted by extension, fixed owner, mode and mtime), but made with `tarfile`
    directly: importing webdataset pulls torch into every Spark Python worker (~0.5 GB).
    """

    def __init__(self, path: str):
        super().__init__(path)
        self.tar = tarfile.open(fileobj=self.f, mode="w|")

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

    def _end(self) -> None:
        self.tar.close()


class TarStream(_Shard):
    """A shard written from samples' tar bytes (`prepare_sample` + `complete_sample`): the same
    file `ShardFile` makes of the same samples (tarfile's end-of-archive blocks and record
    padding included), without tarfile."""

    def write(self, pieces: list[bytes], source: str) -> None:
        self.f.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        self.count += 1
        self.sources[source] += 1

    def _end(self) -> None:
        self.f.write(bytes(2 * TAR_HEADER))
        self.f.write(bytes(-self.f.size % _RECORD))


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
