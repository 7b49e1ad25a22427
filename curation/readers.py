"""Readers for the formats data teams already have, each yielding rows of the sample schema.

Every input record is its own failure domain: a reader never raises on bad input, and
every record it finds yields exactly one row, kept or already dropped at `ingest` with its
reason, so it is counted in the ledger like every other sample. A record that makes the
reader raise anything (a RecursionError from JSON nested 100k deep, a TypeError from a field
of an unexpected type, ...) becomes a `bad_record` row with the exception's one-line message;
`count_records` counts, independently of the rows, how many records a file holds, so a
reader that loses a tail fails the job's accounting instead of passing silently.

Formats (the `format` of a source in the recipe):
- ``webdataset``: img2dataset-style tars, members grouped by key (``key.jpg`` +
  ``key.txt`` + ``key.json``); media stay in the tar and are referenced by byte range.
  The tar is read past damage: a header that does not match the bytes after it (a member
  whose size understates its data, a garbled header) is skipped block by block to the next
  valid header, and the samples on both sides of the damaged bytes are dropped
  (`corrupt_tar`), so nothing damaged is kept and nothing after the damage is lost. A key
  with a symlink, hard link, device, FIFO or sparse member is dropped whole
  (`not_a_regular_file`), never kept as text only. A member name seen twice keeps its first
  occurrence; the repeats cost one `duplicate_key` row per key (`<tar>/<key>#duplicate`).
- ``jsonl`` / ``parquet``: manifests whose rows name images or videos by path
  (``image``/``images``/``video``/``videos``) and carry a caption (``caption``/``text``),
  a LLaVA/ShareGPT ``conversations`` list, OpenAI-style ``messages``, or a preference
  pair (``prompt``/``chosen``/``rejected``). Media paths resolve against the manifest's
  folder (or the source's ``media_root``) and must stay inside the allowed roots
  (`curation.containment`): a reference that leaves them, names a device or FIFO, or is a
  URL drops its row at ingest with that reason; the row stores the canonical path. A path
  to a file that does not exist is kept and dropped by probe (`missing_file`).
  Parquet is read row group by row group and converted row by row where a batch will not
  convert, so only the rows that cannot be read are lost, each with a ledger row.
- ``text``: plain-text JSONL (the ``text_field``, default ``text``).
- ``video_folder``: videos with sidecar ``.txt`` / ``.json`` captions beside them.
- ``coco`` / ``refcoco``: grounding annotations (a COCO ``instances_*.json``; RefCOCO-style refs as
  JSON, ``refs*.json``): one image_text sample per image, its boxes (``[x1, y1, x2, y2]`` pixels,
  with the category or the referring phrases), polygons and keypoints in ``meta.grounding``
  (see `read_coco`, `read_refcoco`). A box outside the image or without area is left out and
  counted in ``meta.grounding.skipped``; an image with no usable box is dropped (`no_grounding`);
  annotations naming an image the file does not list cost one `unknown_image` row per image id.
  The file is read whole (one task per file).

Types: text fields (``content``, a text part's ``text``, ``value``, ``prompt``, ``chosen``,
``rejected``) must be strings (``null`` reads as empty). A number or an object there means
the record was exported wrongly, and guessing its text would change the training data
silently, so such a record is dropped as `bad_record` with the field's path and type.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Any, Iterator, Optional

from reelforge.curation.media_io import VIDEO_EXTS, media_kind_of
from reelforge.curation.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, drop, empty_row, make_id

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "system": "system", "model": "assistant", "bot": "assistant"}
CAPTION_FIELDS = ("caption", "text", "txt", "description")
# rows about a whole file rather than one record (not counted against `count_records`)
FILE_REASONS = ("unreadable_source", "empty_source")
MAX_SIDECAR_BYTES = 16 << 20  # a caption or metadata member / sidecar larger than this is not read


class BadRecord(Exception):
    """A record whose fields cannot be read as the dialect says (dropped as `bad_record`)."""


def one_line(e: BaseException) -> str:
    """An exception as one short line: `Type: first line of its message`."""
    msg = str(e).strip()
    msg = msg.splitlines()[0] if msg else ""
    return (f"{type(e).__name__}: {msg}" if msg else type(e).__name__)[:400]


def _safe(s: str) -> str:
    """A string that encodes as UTF-8 (lone surrogates from JSON escapes are spelled out)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad_row(source: str, key: str, location: str, reason: str, detail: str) -> dict:
    row = empty_row()
    key, location = _safe(key), _safe(location)
    row.update(id=make_id(source, key, {"bad": reason}), kind="unknown", source=source,
               source_key=key, source_location=location)
    return drop(row, "ingest", reason, _safe(detail))


def _stable_ref(uri: str, location: str) -> str:
    """A media path as the id sees it: relative to the file that referenced it when it lies
    in that file's folder tree, so a corpus moved or copied whole keeps every id."""
    if "://" in uri or not location:
        return uri
    base = os.path.dirname(os.path.abspath(location))
    path = os.path.abspath(uri)
    for b in (base, os.path.realpath(base)):  # stored paths are canonical; the manifest's may not be
        if path == b or path.startswith(b.rstrip(os.sep) + os.sep):
            return os.path.relpath(path, b)
    return uri


def _finish(row: dict) -> dict:
    content = {k: row[k] for k in ("kind", "text", "messages", "chosen", "rejected")}
    content["media"] = [(_stable_ref(m["uri"], row["source_location"]), m.get("member"))
                        for m in row["media"] or []]
    row["id"] = make_id(row["source"], row["source_key"], content)
    return row


def _media(kind: str, uri: str, **kw: Any) -> dict:
    m = {"kind": kind, "uri": uri, "member": None, "offset": None, "length": None,
         "sha256": None, "format": None, "width": None, "height": None, "duration": None,
         "fps": None, "frames": None, "codec": None, "phash": None}
    m.update(kw)
    return m


def _rel_key(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return os.path.basename(path)


def _guarded(reader):
    """A reader that never raises: whatever escapes it (a read error halfway through a file)
    becomes one `unreadable_source` row for the rest of the file; the job's record count
    then shows what was lost."""

    def read(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
        try:
            yield from reader(path, source, root, opts)
        except Exception as e:  # noqa: BLE001 - a broken file is a ledger line
            yield _bad_row(source, f"{_rel_key(path, root)}#file", path, "unreadable_source",
                           f"reading stopped: {one_line(e)}")

    read.__name__ = reader.__name__
    read.__doc__ = reader.__doc__
    return read


# --- media references: resolved inside the allowed roots -------------------------------

class _Refs:
    """Resolves the media paths one file names, against its base folder, inside its roots."""

    def __init__(self, path: str, opts: dict, base: Optional[str] = None):
        from reelforge.curation.containment import allowed_roots

        self.base = base or opts.get("media_root") or os.path.dirname(os.path.abspath(path))
        self.roots = allowed_roots(path, opts.get("media_root"), opts.get("roots"))

    def resolve(self, ref: Any, where: str) -> tuple[str, Optional[tuple[str, str]]]:
        """(stored uri, None) or (uri as written, (reason, detail)) for a reference that must
        not be read; a file that does not exist keeps its path (probe drops it)."""
        from reelforge.curation.containment import ContainmentError, file_uri_path, resolve_media_ref

        if isinstance(ref, dict):  # {"path": ...} / {"url": ...} as some exporters write
            ref = ref.get("path") or ref.get("url")
        if not isinstance(ref, str):
            raise BadRecord(f"{where} must be a path (text), got {type(ref).__name__}")
        try:
            return resolve_media_ref(ref, self.base, self.roots), None
        except ContainmentError as e:
            if e.reason != "missing_file":
                return ref, (e.reason, f"{where}: {e.detail}")
            if not ref or "\x00" in ref:
                return ref, (e.reason, f"{where}: {e.detail}")
            if ref[:5].lower() == "file:":
                try:
                    return file_uri_path(ref), None
                except ContainmentError as e2:
                    return ref, (e2.reason, f"{where}: {e2.detail}")
            return os.path.normpath(os.path.join(self.base, ref)), None


# --- webdataset tars -------------------------------------------------------------------

def _member_type(info: tarfile.TarInfo) -> Optional[str]:
    """None for a regular member; what it is otherwise."""
    if info.issym():
        return f"a symlink to {info.linkname!r}"
    if info.islnk():
        return f"a hard link to {info.linkname!r}"
    if info.ischr():
        return "a character device"
    if info.isblk():
        return "a block device"
    if info.isfifo():
        return "a FIFO"
    if info.issparse():
        return "a sparse file"
    if info.isreg():
        return None
    return f"a member of type {info.type!r}"


def _nonzero_block(f, offset: int) -> bool:
    f.seek(offset)
    block = f.read(512)
    return bool(block) and block.count(0) != len(block)


# headers tarfile reads as part of the next member (pax global/extended, GNU long names)
_META_TYPES = {tarfile.XGLTYPE, tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK}


def _damaged(f, start: int, end: int, stop_at_zeros: bool = False) -> bool:
    """Whether tar bytes [start, end) hold something other than zero blocks and the metadata
    headers tarfile folds into the next member (i.e. bytes tarfile skipped as not a header)."""
    pos = start
    while pos < end:
        f.seek(pos)
        block = f.read(512)
        if not block:
            return False
        if block.count(0) == len(block):
            if stop_at_zeros:
                return False
            pos += 512
            continue
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            return True
        if info.type not in _META_TYPES:
            return True
        pos += 512 + ((info.size + 511) // 512) * 512
    return False


class _TarScan:
    """A tar's members grouped by key, read past damage (see the module docstring)."""

    def __init__(self, path: str, payloads: bool):
        self.groups: dict[str, dict] = {}
        self.order: list[str] = []
        self.error: Optional[str] = None
        self.damage: list[tuple[int, str]] = []  # damaged regions no sample could be blamed for
        self.canonical = os.path.realpath(path)  # media are read at the tar's canonical path
        prev: Optional[str] = None  # key of the member read last
        next_at = 0  # where the next header should start
        try:
            with tarfile.open(path, "r:", ignore_zeros=True, errors="backslashreplace") as tf, \
                    open(path, "rb") as raw:
                for info in tf:
                    key = self._key(info)
                    if info.offset > next_at and _damaged(raw, next_at, info.offset):
                        what = (f"tar bytes {next_at}..{info.offset} are not a member header (a member's "
                                f"size understated, or a damaged header)")
                        blamed = [k for k in (prev, key) if k is not None]
                        for k in blamed:
                            self._group(k).setdefault("bad", ("corrupt_tar", what))
                        if not blamed:
                            self.damage.append((next_at, what))
                    next_at = tf.offset
                    if key is None:
                        continue
                    prev = key
                    self._add(tf, info, key, path, payloads)
                # bytes after the last member that are not the end-of-archive zeros
                size = os.fstat(raw.fileno()).st_size
                if 0 < size - next_at < 512 and _nonzero_block(raw, next_at):
                    self.error = f"the tar ends {size - next_at} bytes into a member header"
                elif next_at < size and _damaged(raw, next_at, size, stop_at_zeros=True):
                    what = f"tar bytes {next_at}..{size} after the last member are not a member header"
                    if prev is not None:
                        self._group(prev).setdefault("bad", ("corrupt_tar", what))
                    else:
                        self.damage.append((next_at, what))
        except (tarfile.TarError, OSError, EOFError) as e:
            self.error = one_line(e)

    @staticmethod
    def _key(info: tarfile.TarInfo) -> Optional[str]:
        if info.isdir():
            return None
        base = os.path.basename(info.name)
        if "." not in base:
            return None
        return os.path.join(os.path.dirname(info.name), base.split(".", 1)[0])

    def _group(self, key: str) -> dict:
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = {"media": [], "txt": None, "json": None, "names": set(), "dups": []}
            self.order.append(key)
        return g

    def _add(self, tf: tarfile.TarFile, info: tarfile.TarInfo, key: str, path: str, payloads: bool) -> None:
        g = self._group(key)
        base = os.path.basename(info.name)
        if info.name in g["names"]:
            g["dups"].append(f"{info.name} at byte {info.offset}")
            return
        g["names"].add(info.name)
        odd = _member_type(info)
        if odd is not None:
            g.setdefault("bad", ("not_a_regular_file", f"member {info.name} is {odd}"))
            return
        ext_l = base.split(".", 1)[1].lower()
        kind = media_kind_of(base)
        if kind:
            g["media"].append(_media(kind, self.canonical, member=info.name, offset=info.offset_data,
                                     length=info.size))
            return
        if ext_l not in ("txt", "caption", "text", "json") or not payloads:
            return
        if info.size > MAX_SIDECAR_BYTES:
            g.setdefault("bad", ("too_large", f"member {info.name} is {info.size} bytes (> {MAX_SIDECAR_BYTES})"))
            return
        try:
            data = tf.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            g.setdefault("bad", ("truncated_source", f"member {info.name}: {one_line(e)}"))
            return
        if ext_l == "json":
            g["json"] = data
        else:
            g["txt"] = data.decode("utf-8", errors="replace")

    def records(self) -> int:
        """Rows reading this tar yields besides the file row: one per key, one per key with
        repeated members, one per damaged region no sample was blamed for."""
        if not self.order:
            return 0
        return len(self.order) + sum(1 for k in self.order if self.groups[k]["dups"]) + len(self.damage)


@_guarded
def read_webdataset(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    rel = _rel_key(path, root)
    scan = _TarScan(path, payloads=True)
    size = os.path.getsize(path)
    for key in scan.order:
        g = scan.groups[key]
        skey = f"{rel}/{key}"
        try:
            row = _tar_sample(g, source, skey, path)
            cut = [m["member"] for m in g["media"] if m["offset"] + m["length"] > size]
            fault = g.get("bad") or (("truncated_source", f"{path} ends inside member {cut[0]}") if cut else None)
            if fault:  # what is wrong with the tar comes before what is wrong with the sample
                row.update(drop_step="ingest", drop_reason=fault[0], drop_detail=_safe(fault[1])[:500], dup_of=None)
        except Exception as e:  # noqa: BLE001 - one sample never fails the file
            row = _bad_row(source, skey, path, "bad_record", one_line(e))
        yield row
        if g["dups"]:
            yield _bad_row(source, f"{skey}#duplicate", path, "duplicate_key",
                           f"members of key {key} appear again ({'; '.join(g['dups'][:3])}): "
                           "the first of each was read, the repeats were not")
    if not scan.order:
        bad = scan.error or (scan.damage[0][1] if scan.damage else None)
        yield _bad_row(source, f"{rel}#tar", path, "unreadable_source" if bad else "empty_source",
                       bad or "tar holds no samples")
        return
    for at, what in scan.damage:
        yield _bad_row(source, f"{rel}#damage@{at}", path, "corrupt_tar", what)
    if scan.error is not None:
        yield _bad_row(source, f"{rel}#tar", path, "unreadable_source", scan.error)


def _tar_sample(g: dict, source: str, key: str, path: str) -> dict:
    row = empty_row()
    row.update(source=source, source_key=_safe(key), source_location=path)
    meta = None
    if g["json"] is not None:
        try:
            meta = json.loads(g["json"])
            row["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
        except (ValueError, RecursionError) as e:
            row.update(id=make_id(source, row["source_key"], {"bad": "json"}), kind="unknown", media=g["media"])
            why = "nested too deeply to parse" if isinstance(e, RecursionError) else str(e)
            return drop(row, "ingest", "bad_json", f"{key}.json: {why}")
    text = g["txt"]
    if text is None and isinstance(meta, dict):
        text = next((meta[f] for f in CAPTION_FIELDS if isinstance(meta.get(f), str)), None)
    row["text"] = text
    row["media"] = g["media"]
    kinds = {m["kind"] for m in g["media"]}
    if not g["media"]:
        row["kind"] = "text"
        row["media"] = None
    elif len(g["media"]) > 1:
        row["kind"] = "interleaved"
    else:
        row["kind"] = "video_text" if "video" in kinds else "image_text"
    _finish(row)
    if text is None and not g["media"]:
        return drop(row, "ingest", "no_content", "sample has neither text nor media")
    return row


# --- manifests (JSONL / Parquet) ---------------------------------------------------------

def _as_list(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _text(v: Any, where: str) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    raise BadRecord(f"{where} must be text, got {type(v).__name__} {str(v)[:40]!r}")


class _Media(list):
    """The media a record names, with the first containment violation among them."""

    def __init__(self, refs: Optional[_Refs]):
        super().__init__()
        self.refs = refs
        self.violation: Optional[tuple[str, str]] = None

    def add(self, kind: str, ref: Any, where: str) -> None:
        if self.refs is None:  # media of a preference answer: placeholders only
            return
        uri, bad = self.refs.resolve(ref, where)
        if bad is not None and self.violation is None:
            self.violation = bad
        self.append(_media(kind, uri))


def _openai_content(content: Any, media: _Media, where: str) -> str:
    """OpenAI content (a string or a list of typed parts) -> text with placeholders."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, (list, tuple)):
        raise BadRecord(f"{where} must be text or a list of parts, got {type(content).__name__} "
                        f"{str(content)[:40]!r}")
    pieces = []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, dict):
            raise BadRecord(f"{pw} must be text or an object, got {type(part).__name__}")
        t = part.get("type")
        if t == "text":
            pieces.append(_text(part.get("text"), f"{pw}.text"))
        elif t in ("image", "image_url", "input_image"):
            ref = part.get("image") or part.get("image_url") or part.get("url")
            media.add("image", ref, f"{pw}.{t}")
            pieces.append(IMAGE_PLACEHOLDER)
        elif t in ("video", "video_url"):
            ref = part.get("video") or part.get("video_url") or part.get("url")
            media.add("video", ref, f"{pw}.{t}")
            pieces.append(VIDEO_PLACEHOLDER)
    return "".join(pieces)


def manifest_record_to_row(rec: Any, source: str, key: str, location: str, refs: _Refs) -> dict:
    """Normalise one manifest record (any supported dialect) into a sample row; never raises."""
    if not isinstance(rec, dict):
        return _bad_row(source, key, location, "bad_record", f"expected a JSON object, got {type(rec).__name__}")
    skey = key if rec.get("id") is None else f"{key}#{rec['id']}"
    try:
        return _record_row(rec, source, skey, location, refs)
    except BadRecord as e:
        return _bad_row(source, skey, location, "bad_record", str(e))
    except Exception as e:  # noqa: BLE001 - each record is its own failure domain
        return _bad_row(source, skey, location, "bad_record", one_line(e))


def _record_row(rec: dict, source: str, skey: str, location: str, refs: _Refs) -> dict:
    row = empty_row()
    # the file position keeps keys unique; the record's own id (if any) stays findable
    row.update(source=source, source_location=location, source_key=skey)
    media = _Media(refs)
    for f, kind in (("image", "image"), ("images", "image"), ("video", "video"), ("videos", "video")):
        for j, p in enumerate(_as_list(rec.get(f))):
            media.add(kind, p, f"{f}[{j}]" if isinstance(rec.get(f), (list, tuple)) else f)
    n_top_media = len(media)
    messages = None
    if rec.get("conversations") is not None or rec.get("messages") is not None:
        field_name = "conversations" if rec.get("conversations") is not None else "messages"
        raw = rec[field_name]
        if not isinstance(raw, list):
            raise BadRecord(f"{field_name} must be a list of turns, got {type(raw).__name__}")
        messages = []
        for j, turn in enumerate(raw):
            where = f"{field_name}[{j}]"
            if not isinstance(turn, dict):
                raise BadRecord(f"{where} must be an object, got {type(turn).__name__}")
            role = ROLE_MAP.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None:
                raise BadRecord(f"{where} has the unknown role {turn.get('from', turn.get('role'))!r}")
            if "value" in turn:
                content = _text(turn["value"], f"{where}.value")
            else:
                content = _openai_content(turn.get("content"), media, f"{where}.content")
            messages.append({"role": role, "content": content})
        if n_top_media and not any(IMAGE_PLACEHOLDER in m["content"] or VIDEO_PLACEHOLDER in m["content"]
                                   for m in messages):
            # LLaVA convention: media named at top level belong before the first user turn
            tags = "".join(IMAGE_PLACEHOLDER if m["kind"] == "image" else VIDEO_PLACEHOLDER
                           for m in media[:n_top_media])
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is not None:
                first_user["content"] = tags + "\n" + first_user["content"]
    text = next((rec[f] for f in CAPTION_FIELDS if isinstance(rec.get(f), str)), None)
    if rec.get("chosen") is not None and rec.get("rejected") is not None:
        row["kind"] = "preference"
        if messages is None:
            pf = "prompt" if rec.get("prompt") not in (None, "") else "question"
            prompt = _text(rec.get(pf), pf)
            if media and IMAGE_PLACEHOLDER not in prompt and VIDEO_PLACEHOLDER not in prompt:
                prompt = "".join(IMAGE_PLACEHOLDER if m["kind"] == "image" else VIDEO_PLACEHOLDER
                                 for m in media) + "\n" + prompt
            messages = [{"role": "user", "content": prompt}]
        row["chosen"] = _openai_content(rec["chosen"], _Media(None), "chosen")
        row["rejected"] = _openai_content(rec["rejected"], _Media(None), "rejected")
    elif messages is not None:
        row["kind"] = "conversation"
    elif media and text is not None and (IMAGE_PLACEHOLDER in text or VIDEO_PLACEHOLDER in text or len(media) > 1):
        row["kind"] = "interleaved"
    elif media:
        row["kind"] = "video_text" if media[0]["kind"] == "video" else "image_text"
    else:
        row["kind"] = "text"
    row["text"] = text
    row["messages"] = messages
    row["media"] = list(media) or None
    extra = {k: v for k, v in rec.items() if k not in
             ("image", "images", "video", "videos", "conversations", "messages", "chosen", "rejected",
              "prompt", "id") + CAPTION_FIELDS}
    if extra:
        row["meta"] = json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str)
    _finish(row)
    if media.violation is not None:
        return drop(row, "ingest", *media.violation)
    if text is None and messages is None and row["kind"] != "preference":
        return drop(row, "ingest", "no_content", "record has no caption, text or conversation")
    placeholders = sum(_count_placeholders(s) for s in
                       [row["text"] or ""] + [m["content"] for m in messages or []])
    if row["kind"] in ("conversation", "preference", "interleaved") and media and placeholders != len(media):
        return drop(row, "ingest", "placeholder_mismatch",
                    f"{placeholders} <image>/<video> placeholders for {len(media)} media")
    return row


def _count_placeholders(s: str) -> int:
    return s.count(IMAGE_PLACEHOLDER) + s.count(VIDEO_PLACEHOLDER)


def _parse_json(raw: bytes) -> Any:
    """json.loads, with a nesting too deep for Python's parser as a ValueError."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse") from None


@_guarded
def read_jsonl(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    rel = _rel_key(path, root)
    text_field = opts.get("text_field")
    try:
        f = open(path, "rb")
    except OSError as e:
        yield _bad_row(source, f"{rel}#file", path, "unreadable_source", str(e))
        return
    refs = _Refs(path, opts)
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            key = f"{rel}:{lineno}"
            try:
                rec = _parse_json(raw)
            except ValueError as e:
                yield _bad_row(source, key, path, "bad_json", f"line {lineno}: {e}")
                continue
            if text_field and isinstance(rec, dict) and text_field in rec and text_field != "text":
                rec = {**rec, "text": rec.pop(text_field)}
            yield manifest_record_to_row(rec, source, key, path, refs)


def _batch_records(batch) -> list:
    """A record batch as dicts; where a value will not convert to Python, that row is the
    exception instead (naming its column) and the other rows still convert."""
    try:
        return batch.to_pylist()
    except Exception:  # noqa: BLE001 - find the rows that fail, keep the rest
        pass
    out: list = []
    for j in range(batch.num_rows):
        try:
            out.append(batch.slice(j, 1).to_pylist()[0])
        except Exception as e:  # noqa: BLE001
            col = next((name for name, c in zip(batch.schema.names, batch.columns)
                        if not _converts(c.slice(j, 1))), "?")
            out.append(BadRecord(f"column {col!r} will not convert: {one_line(e)}"))
    return out


def _converts(arr) -> bool:
    try:
        arr.to_pylist()
        return True
    except Exception:  # noqa: BLE001
        return False


def _unreadable_columns(pf, rg: int) -> str:
    bad = []
    for name in pf.schema_arrow.names:
        try:
            pf.read_row_group(rg, columns=[name])
        except Exception as e:  # noqa: BLE001
            bad.append(f"{name!r} ({one_line(e)})")
    return ", ".join(bad[:3]) or "?"


@_guarded
def read_parquet(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    import pyarrow.parquet as pq

    rel = _rel_key(path, root)
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
    except Exception as e:  # noqa: BLE001 - a broken file is a ledger line
        yield _bad_row(source, f"{rel}#file", path, "unreadable_source", one_line(e))
        return
    refs = _Refs(path, opts)
    i = 0
    for rg in range(meta.num_row_groups):
        n, done = meta.row_group(rg).num_rows, 0
        batches = pf.iter_batches(batch_size=1024, row_groups=[rg])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - the rest of this row group is lost, row by row
                detail = (f"row group {rg} rows {i + 1}..{i + n - done} cannot be read: {one_line(e)}; "
                          f"columns: {_unreadable_columns(pf, rg)}")
                for _ in range(n - done):
                    i += 1
                    yield _bad_row(source, f"{rel}:{i}", path, "unreadable_row_group", detail)
                done = n
                break
            for rec in _batch_records(batch):
                i += 1
                done += 1
                if isinstance(rec, Exception):
                    yield _bad_row(source, f"{rel}:{i}", path, "bad_record", str(rec))
                    continue
                rec = {k: v for k, v in rec.items() if v is not None}
                yield manifest_record_to_row(rec, source, f"{rel}:{i}", path, refs)


def read_text(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    return read_jsonl(path, source, root, {**opts, "text_field": opts.get("text_field", "text")})


# --- folders of videos with sidecars ---------------------------------------------------

def _read_sidecar(canonical: str) -> bytes:
    from reelforge.curation.containment import open_regular

    fd = open_regular(canonical)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_SIDECAR_BYTES + 1)
    if len(data) > MAX_SIDECAR_BYTES:
        raise BadRecord(f"{canonical} is larger than {MAX_SIDECAR_BYTES} bytes")
    return data


def read_video_file(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    """One row per video file; whatever goes wrong with it is that row's ledger reason."""
    rel = _rel_key(path, root)
    try:
        row = _video_row(path, source, rel, opts)
    except Exception as e:  # noqa: BLE001 - the video is the record: it fails alone
        row = _bad_row(source, rel, path, "bad_record", one_line(e))
    yield row


def _video_row(path: str, source: str, rel: str, opts: dict) -> dict:
    from reelforge.curation.containment import ContainmentError, resolve_media_ref

    stem = os.path.splitext(path)[0]
    refs = _Refs(path, opts, base=os.path.dirname(os.path.abspath(path)))
    row = empty_row()
    row.update(kind="video_text", source=source, source_key=_safe(rel), source_location=path)
    violation = None
    try:
        uri = resolve_media_ref(path, refs.base, refs.roots)
    except ContainmentError as e:
        uri, violation = path, (e.reason, e.detail)
    row["media"] = [_media("video", uri)]
    text = None
    sidecars: dict[str, bytes] = {}
    for ext in (".txt", ".json"):
        if violation is None and os.path.lexists(stem + ext):
            try:
                sidecars[ext] = _read_sidecar(resolve_media_ref(stem + ext, refs.base, refs.roots))
            except ContainmentError as e:
                violation = (e.reason, f"sidecar {stem + ext}: {e.detail}")
            except (BadRecord, OSError) as e:
                violation = ("bad_record", f"sidecar {stem + ext}: {e}")
    if ".txt" in sidecars:
        text = sidecars[".txt"].decode("utf-8", errors="replace").strip()
    if ".json" in sidecars:
        try:
            meta = _parse_json(sidecars[".json"])
            row["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
            if text is None and isinstance(meta, dict):
                text = next((meta[k] for k in CAPTION_FIELDS if isinstance(meta.get(k), str)), None)
        except ValueError as e:
            row["text"] = text
            _finish(row)
            return drop(row, "ingest", "bad_json", f"{stem}.json: {e}")
    row["text"] = text
    _finish(row)
    if violation is not None:
        return drop(row, "ingest", *violation)
    if text is None and not opts.get("allow_uncaptioned", False):
        return drop(row, "ingest", "no_caption", "video has no sidecar .txt/.json caption")
    return row


# --- grounding annotations: COCO instances and RefCOCO-style refs ------------------------

MAX_GROUNDING_JSON_BYTES = 4 << 30  # a COCO instances file is read whole (train2017: ~450 MB)
BOX_TOLERANCE_PX = 1.0  # a box may overhang the image by this much (COCO's float boxes do); it is clipped


class _GroundingSkips(dict):
    """Annotations left out of a sample, counted by reason (kept in `meta.grounding.skipped`)."""

    def add(self, reason: str) -> None:
        self[reason] = self.get(reason, 0) + 1


def _load_grounding_json(path: str) -> Any:
    size = os.path.getsize(path)
    if size > MAX_GROUNDING_JSON_BYTES:
        raise BadRecord(f"{path} is {size} bytes (> {MAX_GROUNDING_JSON_BYTES}): split it")
    with open(path, "rb") as f:
        return _parse_json(f.read())


def _num_ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _id_ok(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v != "")


def _pixel_box(bbox: Any, w: int, h: int, skips: _GroundingSkips) -> Optional[list[float]]:
    """A COCO [x, y, width, height] pixel box as [x1, y1, x2, y2], clipped to the image, or None
    (counted in `skips`): not four numbers (`bad_box`), no area (`negative_size`), or outside the
    image by more than BOX_TOLERANCE_PX (`box_outside_image`)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_num_ok(v) for v in bbox):
        skips.add("bad_box")
        return None
    x, y, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0:
        skips.add("negative_size")
        return None
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + bw > w + t or y + bh > h + t:
        skips.add("box_outside_image")
        return None
    x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
    if x2 <= x1 or y2 <= y1:
        skips.add("negative_size")
        return None
    return [x1, y1, x2, y2]


def _polygons(seg: Any, w: int, h: int, skips: _GroundingSkips) -> list[list[list[float]]]:
    """COCO polygon segmentation ([[x1, y1, x2, y2, ...], ...]) as lists of [x, y] points; RLE
    masks (crowds) are not polygons and are counted as `rle_segmentation`."""
    if seg is None:
        return []
    if isinstance(seg, dict):
        skips.add("rle_segmentation")
        return []
    out = []
    for poly in seg if isinstance(seg, list) else [None]:
        if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(_num_ok(v) for v in poly)):
            skips.add("bad_polygon")
            continue
        pts = [[float(poly[i]), float(poly[i + 1])] for i in range(0, len(poly), 2)]
        t = BOX_TOLERANCE_PX
        if any(not (-t <= px <= w + t and -t <= py <= h + t) for px, py in pts):
            skips.add("polygon_outside_image")
            continue
        out.append([[min(max(px, 0.0), float(w)), min(max(py, 0.0), float(h))] for px, py in pts])
    return out


def _keypoints(kps: Any, names: list, w: int, h: int, skips: _GroundingSkips) -> list[tuple[str, list[float]]]:
    """COCO keypoints [x, y, v] * K: the labelled ones (v > 0) inside the image, with their names."""
    if kps is None:
        return []
    if not isinstance(kps, list) or len(kps) % 3 or not all(_num_ok(v) for v in kps):
        skips.add("bad_keypoints")
        return []
    out = []
    for k in range(len(kps) // 3):
        x, y, v = kps[3 * k:3 * k + 3]
        if v <= 0:
            continue
        if not (0 <= x <= w and 0 <= y <= h):
            skips.add("point_outside_image")
            continue
        name = names[k] if k < len(names) and isinstance(names[k], str) else f"keypoint{k}"
        out.append((name, [float(x), float(y)]))
    return out


def _image_size(entry: dict, uri: str) -> tuple[Optional[int], Optional[int], Optional[str]]:
    """(width, height, None) from the image entry, else from the image file's header (read through
    `containment.open_regular`); (None, None, why) when neither gives it."""
    w, h = entry.get("width"), entry.get("height")
    if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and not isinstance(h, bool) \
            and w > 0 and h > 0:
        return w, h, None
    from PIL import Image

    from reelforge.curation.containment import open_regular

    try:
        fd = open_regular(uri)
        with os.fdopen(fd, "rb") as f:
            with Image.open(f) as im:
                return int(im.width), int(im.height), None
    except Exception as e:  # noqa: BLE001 - a sample without a size is a ledger line
        return None, None, f"no width/height in the image entry and the image will not open: {one_line(e)}"


def _plural(word: str, n: int) -> str:
    return word if n == 1 or word.endswith("s") else word + "s"


def _grounding_row(source: str, skey: str, location: str, refs: _Refs, entry: dict, boxes_of, what: str) -> dict:
    """One image's sample: its media resolved inside the roots, its size, and `boxes_of(w, h, skips)`
    -> (boxes, points, polygons) in `meta.grounding`."""
    row = empty_row()
    row.update(kind="image_text", source=source, source_key=_safe(skey), source_location=location)
    ref = entry.get("file_name") if entry.get("file_name") is not None else entry.get("image")
    if ref is None:
        ref = entry.get("coco_url") or entry.get("flickr_url")
    media = _Media(refs)
    media.add("image", ref, f"{what}.file_name")
    row["media"] = list(media)
    skips = _GroundingSkips()
    w, h, why = (None, None, None) if media.violation else _image_size(entry, media[0]["uri"])
    boxes, points, polygons = boxes_of(w, h, skips) if w else ([], [], [])
    cats: dict[str, int] = {}
    for b in boxes:
        label = b.get("category") or b.get("phrase")
        cats[label] = cats.get(label, 0) + 1
    phrases = [b["phrase"] for b in boxes if b.get("phrase")]
    row["text"] = "; ".join(phrases) if phrases else ", ".join(f"{n} {_plural(c, n)}" for c, n in cats.items())
    g = {"width": w, "height": h, "boxes": boxes, "points": points, "polygons": polygons, "skipped": dict(skips)}
    extra = {k: entry[k] for k in ("id", "license", "date_captured") if k in entry}
    row["meta"] = json.dumps({"grounding": g, "image": extra}, sort_keys=True, ensure_ascii=False)
    content = {"kind": row["kind"], "text": row["text"], "grounding": g,
               "media": [(_stable_ref(m["uri"], location), None) for m in row["media"]]}
    row["id"] = make_id(source, row["source_key"], content)
    if media.violation is not None:
        return drop(row, "ingest", *media.violation)
    if w is None:
        return drop(row, "ingest", "no_image_size", why or "no image size")
    if not boxes:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skips.items())) or "none annotated"
        return drop(row, "ingest", "no_grounding", f"no usable box ({detail})")
    return row


def _categories(data: dict) -> dict:
    cats = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and _id_ok(c.get("id")):
            cats[c["id"]] = c
    return cats


def _by_image(items: list, known: set) -> tuple[dict, list, list]:
    """Annotations/refs grouped by image id; the unknown image ids in first-seen order; the items
    whose image id is not an id at all."""
    groups: dict = {}
    unknown: list = []
    bad: list = []
    for j, a in enumerate(items):
        iid = a.get("image_id") if isinstance(a, dict) else None
        if not _id_ok(iid):
            bad.append(j)
            continue
        if iid not in known and iid not in groups:
            unknown.append(iid)
        groups.setdefault(iid, []).append(a)
    return groups, unknown, bad


def _coco_boxes(anns: list, cats: dict):
    def boxes_of(w: int, h: int, skips: _GroundingSkips):
        boxes, points, polygons = [], [], []
        for a in anns:
            cat = cats.get(a.get("category_id"))
            if cat is None or not isinstance(cat.get("name"), str):
                skips.add("unknown_category")
                continue
            box = _pixel_box(a.get("bbox"), w, h, skips)
            if box is None:
                continue
            aid = a.get("id")
            b = {"id": aid, "category": cat["name"], "box": box}
            if a.get("iscrowd"):
                b["crowd"] = True
            boxes.append(b)
            polygons += [{"id": aid, "category": cat["name"], "polygon": p}
                         for p in _polygons(a.get("segmentation"), w, h, skips)]
            names = cat.get("keypoints") if isinstance(cat.get("keypoints"), list) else []
            points += [{"id": aid, "category": cat["name"], "name": n, "point": p}
                       for n, p in _keypoints(a.get("keypoints"), names, w, h, skips)]
        return boxes, points, polygons
    return boxes_of


def _sentences(ref: dict) -> list[str]:
    raw = ref.get("sentences")
    if raw is None:
        raw = ref.get("phrases") or ref.get("expressions") or ref.get("sentence") or ref.get("phrase")
    out = []
    for s in raw if isinstance(raw, list) else [raw]:
        if isinstance(s, dict):
            s = s.get("sent") or s.get("raw")
        if isinstance(s, str) and s.strip() and "<|" not in s:
            out.append(" ".join(s.split()))
    return out


def _ref_boxes(refs: list, cats: dict, anns: dict):
    def boxes_of(w: int, h: int, skips: _GroundingSkips):
        boxes = []
        for r in refs:
            phrases = _sentences(r)
            if not phrases:
                skips.add("no_phrase")
                continue
            ann = anns.get(r.get("ann_id")) if r.get("ann_id") is not None else None
            bbox = r.get("bbox") if r.get("bbox") is not None else (ann or {}).get("bbox")
            box = _pixel_box(bbox, w, h, skips)
            if box is None:
                continue
            cat = cats.get(r.get("category_id", (ann or {}).get("category_id")))
            b = {"id": r.get("ann_id", r.get("ref_id")), "ref_id": r.get("ref_id"), "phrase": phrases[0],
                 "phrases": phrases, "box": box}
            if cat is not None and isinstance(cat.get("name"), str):
                b["category"] = cat["name"]
            if isinstance(r.get("split"), str):
                b["split"] = r["split"]
            boxes.append(b)
        return boxes, [], []
    return boxes_of


def _grounding_layout(fmt: str, data: Any) -> tuple[list, dict, list, list, dict, dict]:
    """(image entries in file order, annotations/refs by image id, unknown image ids, indices of items
    with no image id, categories, annotations by id) of a COCO instances file or a RefCOCO refs file."""
    if fmt == "coco":
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise BadRecord("a COCO instances file is an object with an `images` list")
        items = data.get("annotations") or []
    else:
        if isinstance(data, list):
            data = {"refs": data}
        if not isinstance(data, dict) or not isinstance(data.get("refs"), list):
            raise BadRecord("a RefCOCO-style file is a list of refs or an object with a `refs` list")
        items = data["refs"]
    if not isinstance(items, list):
        raise BadRecord("`annotations` must be a list")
    images = list(data.get("images")) if isinstance(data.get("images"), list) else []
    if fmt == "refcoco":
        # the records are the images refs point at (a full COCO image list beside them is a lookup
        # table); a ref may carry its own image file (`file_name`/`image`, `width`, `height`)
        wanted = {r["image_id"] for r in items if isinstance(r, dict) and _id_ok(r.get("image_id"))}
        images = [im for im in images if isinstance(im, dict) and _id_ok(im.get("id")) and im["id"] in wanted]
        listed = {im["id"] for im in images}
        for r in items:
            if isinstance(r, dict) and _id_ok(r.get("image_id")) and r["image_id"] not in listed \
                    and (r.get("file_name") or r.get("image")):
                listed.add(r["image_id"])
                images.append({"id": r["image_id"], "file_name": r.get("image") or r.get("file_name"),
                               "width": r.get("width"), "height": r.get("height")})
    known = {im["id"] for im in images if isinstance(im, dict) and _id_ok(im.get("id"))}
    groups, unknown, bad = _by_image(items, known)
    anns = {}
    for a in (data.get("annotations") or []) if fmt == "refcoco" else []:
        if isinstance(a, dict) and _id_ok(a.get("id")):
            anns[a["id"]] = a
    return images, groups, unknown, bad, _categories(data), anns


def _read_grounding(fmt: str, path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    rel = _rel_key(path, root)
    try:
        images, groups, unknown, bad, cats, anns = _grounding_layout(fmt, _load_grounding_json(path))
    except (BadRecord, ValueError, OSError) as e:
        yield _bad_row(source, f"{rel}#file", path, "unreadable_source", one_line(e))
        return
    refs = _Refs(path, opts)
    seen: set = set()
    what = "annotations" if fmt == "coco" else "refs"
    for j, entry in enumerate(images):
        if not isinstance(entry, dict) or not _id_ok(entry.get("id")):
            yield _bad_row(source, f"{rel}#images[{j}]", path, "bad_record", f"images[{j}] has no id")
            continue
        iid = entry["id"]
        skey = f"{rel}#image{iid}"
        if iid in seen:
            yield _bad_row(source, f"{skey}#duplicate", path, "duplicate_key",
                           f"image id {iid!r} appears again at images[{j}]: the first entry was read")
            continue
        seen.add(iid)
        items = groups.get(iid, [])
        try:
            boxes_of = _coco_boxes(items, cats) if fmt == "coco" else _ref_boxes(items, cats, anns)
            yield _grounding_row(source, skey, path, refs, entry, boxes_of, f"images[{j}]")
        except BadRecord as e:
            yield _bad_row(source, skey, path, "bad_record", str(e))
        except Exception as e:  # noqa: BLE001 - one image never fails the file
            yield _bad_row(source, skey, path, "bad_record", one_line(e))
    for iid in unknown:
        n = len(groups[iid])
        yield _bad_row(source, f"{rel}#image{iid}", path, "unknown_image",
                       f"{n} {what} name image id {iid!r}, which the file's images do not list")
    for j in bad:
        yield _bad_row(source, f"{rel}#{what}[{j}]", path, "bad_record", f"{what}[{j}] has no image_id")


@_guarded
def read_coco(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    """A COCO `instances_*.json`: one image_text sample per image, its annotations in `meta.grounding`
    (boxes as [x1, y1, x2, y2] pixels with their category, polygons, labelled keypoints, the image's
    width and height, and `skipped`: annotations left out, counted by reason). Image paths
    (`file_name`) resolve against `media_root` (else the JSON's folder) inside the allowed roots.
    An image with no usable box is dropped (`no_grounding`); annotations naming an image the file
    does not list cost one `unknown_image` row per image id."""
    yield from _read_grounding("coco", path, source, root, opts)


@_guarded
def read_refcoco(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    """RefCOCO-style refs as JSON: a list of refs, or an object with `refs` (and optionally the COCO
    `images`, `annotations` and `categories` they point into). A ref has `image_id`, `sentences`
    ([{"sent": ...}] or strings; also `phrases`/`sentence`), and `bbox` [x, y, w, h] pixels or an
    `ann_id` into `annotations`; its image comes from `images` or its own `file_name`/`image` (+
    `width`/`height`). One image_text sample per image, each ref a box with its `phrase` (the first
    sentence) and all its `phrases` in `meta.grounding`."""
    yield from _read_grounding("refcoco", path, source, root, opts)


def _count_grounding(fmt: str, path: str) -> int:
    images, groups, unknown, bad, _, _ = _grounding_layout(fmt, _load_grounding_json(path))
    return len(images) + len(unknown) + len(bad)


# --- counting records before reading them ----------------------------------------------

def count_records(fmt: str, path: str, opts: dict) -> Optional[int]:
    """How many record rows reading `path` must yield (rows about the whole file, with a
    reason in FILE_REASONS, aside), or None when the file cannot be counted (then its
    `unreadable_source` row accounts for it). Counted without the reader's per-record code:
    non-blank lines, Parquet metadata, tar member keys."""
    try:
        if fmt in ("jsonl", "text"):
            n = 0
            with open(path, "rb") as f:
                for raw in f:
                    if raw.strip():
                        n += 1
            return n
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if fmt == "webdataset":
            return _TarScan(path, payloads=False).records()
        if fmt == "video_folder":
            return 1
        if fmt in ("coco", "refcoco"):
            return _count_grounding(fmt, path)
    except Exception:  # noqa: BLE001 - an uncountable file is accounted by its reader's file row
        return None
    return None


READERS = {
    "webdataset": read_webdataset,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "text": read_text,
    "video_folder": read_video_file,
    "coco": read_coco,
    "refcoco": read_refcoco,
}

DEFAULT_PATTERNS = {
    "webdataset": ("*.tar",),
    "jsonl": ("*.jsonl", "*.json"),
    "parquet": ("*.parquet",),
    "text": ("*.jsonl",),
    "video_folder": tuple(f"*.{e}" for e in sorted(VIDEO_EXTS)),
    "coco": ("instances_*.json",),
    "refcoco": ("refs*.json",),
}
