"""Readers for the formats data teams already have, each yielding rows of the sample schema.

A reader never raises on bad input: a line that is not JSON, a tar cut short, a row with
no usable content, each becomes a row already dropped at `ingest` with its reason, so
it is counted in the ledger like every other sample.

Formats (the `format` of a source in the recipe):
- ``webdataset``: img2dataset-style tars, members grouped by key (``key.jpg`` +
  ``key.txt`` + ``key.json``); media stay in the tar and are referenced by byte range.
- ``jsonl`` / ``parquet``: manifests whose rows name images or videos by path
  (``image``/``images``/``video``/``videos``) and carry a caption (``caption``/``text``),
  a LLaVA/ShareGPT ``conversations`` list, OpenAI-style ``messages``, or a preference
  pair (``prompt``/``chosen``/``rejected``). Relative paths resolve against the
  manifest's folder (or the source's ``media_root``).
- ``text``: plain-text JSONL (the ``text_field``, default ``text``).
- ``video_folder``: videos with sidecar ``.txt`` / ``.json`` captions beside them.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Any, Iterator, Optional

from curation.media_io import VIDEO_EXTS, media_kind_of
from curation.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, drop, empty_row, make_id

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "system": "system", "model": "assistant", "bot": "assistant"}
CAPTION_FIELDS = ("caption", "text", "txt", "description")


def _bad_row(source: str, key: str, location: str, reason: str, detail: str) -> dict:
    row = empty_row()
    row.update(id=make_id(source, key, {"bad": reason}), kind="unknown", source=source,
               source_key=key, source_location=location)
    return drop(row, "ingest", reason, detail)


def _stable_ref(uri: str, location: str) -> str:
    """A media path as the id sees it: relative to the file that referenced it when it lies
    in that file's folder tree, so a corpus moved or copied whole keeps every id."""
    if "://" in uri or not location:
        return uri
    base = os.path.dirname(os.path.abspath(location))
    path = os.path.abspath(uri)
    return os.path.relpath(path, base) if path == base or path.startswith(base + os.sep) else uri


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


# --- webdataset tars -------------------------------------------------------------------

def read_webdataset(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    rel = _rel_key(path, root)
    groups: dict[str, dict] = {}
    order: list[str] = []
    error: Optional[str] = None
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                if "." not in base:
                    continue
                key_part, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(info.name), key_part)
                if key not in groups:
                    groups[key] = {"media": [], "txt": None, "json": None}
                    order.append(key)
                g = groups[key]
                ext_l = ext.lower()
                kind = media_kind_of(base)
                if kind:
                    g["media"].append(_media(kind, path, member=info.name, offset=info.offset_data,
                                             length=info.size))
                elif ext_l in ("txt", "caption", "text"):
                    g["txt"] = tf.extractfile(info).read().decode("utf-8", errors="replace")
                elif ext_l == "json":
                    g["json"] = tf.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
    size = os.path.getsize(path)
    for key in order:
        row = _tar_sample(groups[key], source, f"{rel}/{key}", path)
        cut = [m["member"] for m in groups[key]["media"] if m["offset"] + m["length"] > size]
        if cut:
            drop(row, "ingest", "truncated_source", f"{path} ends inside member {cut[0]}")
        yield row
    if error is not None or not order:
        yield _bad_row(source, f"{rel}#tar", path, "unreadable_source" if error else "empty_source",
                       error or "tar holds no samples")


def _tar_sample(g: dict, source: str, key: str, path: str) -> dict:
    row = empty_row()
    row.update(source=source, source_key=key, source_location=path)
    meta = None
    if g["json"] is not None:
        try:
            meta = json.loads(g["json"])
        except ValueError as e:
            row.update(id=make_id(source, key, {"bad": "json"}), kind="unknown", media=g["media"])
            return drop(row, "ingest", "bad_json", f"{key}.json: {e}")
        row["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
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


def _resolve(p: str, base: str) -> str:
    if "://" in p or os.path.isabs(p):
        return p
    return os.path.normpath(os.path.join(base, p))


def _openai_content(content: Any, media: list[dict], base: str) -> str:
    """OpenAI content (a string or a list of typed parts) -> text with placeholders."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if not isinstance(part, dict):
            pieces.append(str(part))
            continue
        t = part.get("type")
        if t == "text":
            pieces.append(part.get("text") or "")
        elif t in ("image", "image_url", "input_image"):
            ref = part.get("image") or part.get("image_url") or part.get("url")
            if isinstance(ref, dict):
                ref = ref.get("url")
            media.append(_media("image", _resolve(str(ref), base)))
            pieces.append(IMAGE_PLACEHOLDER)
        elif t in ("video", "video_url"):
            ref = part.get("video") or part.get("video_url") or part.get("url")
            if isinstance(ref, dict):
                ref = ref.get("url")
            media.append(_media("video", _resolve(str(ref), base)))
            pieces.append(VIDEO_PLACEHOLDER)
    return "".join(pieces)


def manifest_record_to_row(rec: Any, source: str, key: str, location: str, base: str) -> dict:
    """Normalise one manifest record (any supported dialect) into a sample row."""
    if not isinstance(rec, dict):
        return _bad_row(source, key, location, "bad_record", f"expected a JSON object, got {type(rec).__name__}")
    row = empty_row()
    # the file position keeps keys unique; the record's own id (if any) stays findable
    row.update(source=source, source_location=location,
               source_key=key if rec.get("id") is None else f"{key}#{rec['id']}")
    media: list[dict] = []
    for p in _as_list(rec.get("image")) + _as_list(rec.get("images")):
        media.append(_media("image", _resolve(str(p), base)))
    for p in _as_list(rec.get("video")) + _as_list(rec.get("videos")):
        media.append(_media("video", _resolve(str(p), base)))
    n_top_media = len(media)
    messages = None
    if rec.get("conversations") is not None or rec.get("messages") is not None:
        raw = rec.get("conversations") if rec.get("conversations") is not None else rec.get("messages")
        if not isinstance(raw, list):
            return _bad_row(source, row["source_key"], location, "bad_record", "conversation is not a list")
        messages = []
        for turn in raw:
            if not isinstance(turn, dict):
                return _bad_row(source, row["source_key"], location, "bad_record", "a turn is not an object")
            role = ROLE_MAP.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None:
                return _bad_row(source, row["source_key"], location, "bad_record",
                                f"unknown role {turn.get('from', turn.get('role'))!r}")
            content = turn["value"] if "value" in turn else _openai_content(turn.get("content"), media, base)
            messages.append({"role": role, "content": str(content)})
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
            prompt = rec.get("prompt") or rec.get("question") or ""
            if media and IMAGE_PLACEHOLDER not in prompt and VIDEO_PLACEHOLDER not in prompt:
                prompt = "".join(IMAGE_PLACEHOLDER if m["kind"] == "image" else VIDEO_PLACEHOLDER
                                 for m in media) + "\n" + prompt
            messages = [{"role": "user", "content": str(prompt)}]
        row["chosen"] = _openai_content(rec["chosen"], [], base)
        row["rejected"] = _openai_content(rec["rejected"], [], base)
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
    row["media"] = media or None
    extra = {k: v for k, v in rec.items() if k not in
             ("image", "images", "video", "videos", "conversations", "messages", "chosen", "rejected",
              "prompt", "id") + CAPTION_FIELDS}
    if extra:
        row["meta"] = json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str)
    _finish(row)
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


def read_jsonl(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    rel = _rel_key(path, root)
    base = opts.get("media_root") or os.path.dirname(path)
    text_field = opts.get("text_field")
    try:
        f = open(path, "rb")
    except OSError as e:
        yield _bad_row(source, f"{rel}#file", path, "unreadable_source", str(e))
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            key = f"{rel}:{lineno}"
            try:
                rec = json.loads(raw)
            except ValueError as e:
                yield _bad_row(source, key, path, "bad_json", f"line {lineno}: {e}")
                continue
            if text_field and isinstance(rec, dict) and text_field in rec and text_field != "text":
                rec = {**rec, "text": rec.pop(text_field)}
            yield manifest_record_to_row(rec, source, key, path, base)


def read_parquet(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    import pyarrow.parquet as pq

    rel = _rel_key(path, root)
    base = opts.get("media_root") or os.path.dirname(path)
    try:
        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                i += 1
                rec = {k: v for k, v in rec.items() if v is not None}
                yield manifest_record_to_row(rec, source, f"{rel}:{i}", path, base)
    except Exception as e:  # noqa: BLE001 - a broken file is a ledger line
        yield _bad_row(source, f"{rel}#file", path, "unreadable_source", f"{type(e).__name__}: {e}")


def read_text(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    return read_jsonl(path, source, root, {**opts, "text_field": opts.get("text_field", "text")})


# --- folders of videos with sidecars ---------------------------------------------------

def read_video_file(path: str, source: str, root: str, opts: dict) -> Iterator[dict]:
    rel = _rel_key(path, root)
    stem = os.path.splitext(path)[0]
    row = empty_row()
    row.update(kind="video_text", source=source, source_key=rel, source_location=path,
               media=[_media("video", path)])
    text = None
    if os.path.exists(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    if os.path.exists(stem + ".json"):
        try:
            with open(stem + ".json", "rb") as f:
                meta = json.load(f)
            row["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
            if text is None and isinstance(meta, dict):
                text = next((meta[k] for k in CAPTION_FIELDS if isinstance(meta.get(k), str)), None)
        except ValueError as e:
            row["text"] = text
            _finish(row)
            yield drop(row, "ingest", "bad_json", f"{stem}.json: {e}")
            return
    row["text"] = text
    _finish(row)
    if text is None and not opts.get("allow_uncaptioned", False):
        yield drop(row, "ingest", "no_caption", "video has no sidecar .txt/.json caption")
        return
    yield row


READERS = {
    "webdataset": read_webdataset,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "text": read_text,
    "video_folder": read_video_file,
}

DEFAULT_PATTERNS = {
    "webdataset": ("*.tar",),
    "jsonl": ("*.jsonl", "*.json"),
    "parquet": ("*.parquet",),
    "text": ("*.jsonl",),
    "video_folder": tuple(f"*.{e}" for e in sorted(VIDEO_EXTS)),
}
