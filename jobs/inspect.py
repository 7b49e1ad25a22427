"""`reelforge inspect OUT`: an HTML contact sheet of a run's dropped (or kept) samples.

The sheet is one self-contained file: each sample is a card with a thumbnail (an image, or a
video's first frame decoded by ffmpeg, as a `data:` URI), its ledger line (step, reason,
detail), its text or caption and its scores and tokens. It reads the run only: the ledger, the
last step's output under `_work/` (the rows with their media references, dropped ones
included) and, once `_work/` is gone, the shards (kept samples). Media are read through the
containment checks (`curation/containment.py`) and only inside the run folder and the corpus
roots the run recorded: the folders of its sources (the ledger's `source_location`, the
digests of `_work/digests.json`). A medium elsewhere, missing or undecodable gets a grey
placeholder naming why, never an exception.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import tarfile
import tempfile

THUMB = 192  # px, the longer side of a thumbnail


class InspectError(ValueError):
    """A request the run cannot answer (no ledger, nothing matches); one sentence."""


def ledger_path(run_dir: str) -> str:
    from reelforge.curation import storage

    if storage.is_url(run_dir):  # the contact sheet needs the work folders, which stay in the staging folder
        raise InspectError(f"inspect reads a run's work folders, which a run published to {storage.redact(run_dir)} "
                           f"keeps in its local staging folder: pass that folder (--work, by default "
                           f"{storage.staging_dir(run_dir)}).")
    path = os.path.join(run_dir, "ledger")
    if not os.path.isdir(path):
        raise InspectError(f"no ledger under {run_dir}: pass the output folder of a finished run.")
    return path


def select_ledger(run_dir: str, *, reason: str | None = None, step: str | None = None, source: str | None = None,
                  kept: bool = False, n: int = 48) -> tuple[list[dict], int]:
    """The first `n` ledger lines (by id) with that fate and filters, and how many match in all."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    flt = pc.field("fate") == ("kept" if kept else "dropped")
    for col, val in (("reason", reason), ("step", step), ("source", source)):
        if val is not None:
            flt = flt & (pc.field(col) == val)
    table = ds.dataset(ledger_path(run_dir), format="parquet").to_table(filter=flt)
    total = table.num_rows
    if total:
        table = table.take(pc.sort_indices(table, [("id", "ascending")])[:n])
    return table.to_pylist(), total


def last_step_dir(run_dir: str) -> str | None:
    """`_work/NN_step` of the run's last step (from report.json's steps), else the highest NN."""
    work = os.path.join(run_dir, "_work")
    if not os.path.isdir(work):
        return None
    try:
        with open(os.path.join(run_dir, "report.json")) as f:
            steps = [s["step"] for s in json.load(f)["steps"]]
        path = os.path.join(work, f"{len(steps) - 2:02d}_{steps[-2]}")
        if os.path.isdir(path):
            return path
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    dirs = sorted(d for d in os.listdir(work) if re.fullmatch(r"\d\d_\w+", d) and os.path.isdir(os.path.join(work, d)))
    return os.path.join(work, dirs[-1]) if dirs else None


def _rows_by_id(run_dir: str, ids: list[str]) -> dict[str, dict]:
    """The full rows of these ids from the last step's output (empty without `_work/`)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    path = last_step_dir(run_dir)
    if path is None or not ids:
        return {}
    from reelforge.curation.schema import rows_of

    table = ds.dataset(path, format="parquet").to_table(filter=pc.field("id").isin(ids))
    return {r["id"]: r for r in rows_of(table)}


def recorded_roots(run_dir: str, ledger_rows: list[dict]) -> tuple[str, ...]:
    """The run folder and the corpus folders the run recorded: each source file's folder."""
    from reelforge.curation.containment import allowed_roots

    folders = {os.path.dirname(r["source_location"]) for r in ledger_rows if r.get("source_location")}
    try:
        with open(os.path.join(run_dir, "_work", "digests.json")) as f:
            folders |= {os.path.dirname(p) for p in json.load(f)}
    except (OSError, ValueError, TypeError):
        pass
    return allowed_roots(os.path.join(run_dir, "ledger"), None, sorted(f for f in folders if f))


def _png_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def placeholder(text: str, size: tuple[int, int] = (THUMB, THUMB * 3 // 4)) -> str:
    """A grey thumbnail that says why there is no picture."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (200, 200, 200))
    d = ImageDraw.Draw(img)
    for i, line in enumerate(re.findall(r".{1,26}", text)[:5]):
        d.text((8, 8 + 14 * i), line, fill=(60, 60, 60))
    return _png_uri(img)


def _thumb_uri(img) -> str:
    img = img.convert("RGB")
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(media: dict, roots: tuple[str, ...]) -> tuple[str, str | None]:
    """(data URI, None) for the medium's picture, or (placeholder URI, why not)."""
    from PIL import Image

    from reelforge.curation.containment import resolve_media_ref
    from reelforge.curation.media_io import (
        MediaReadError,
        media_path,
        open_media,
        read_media_bytes,
        stream_media_fd,
        video_source,
    )

    try:
        path = resolve_media_ref(media_path(media["uri"]), "/", roots)  # inside the recorded roots, or refused
        m = {**media, "uri": path}
        if media.get("kind") == "video":
            from reelforge.curation import video

            fd = open_media(m)
            try:
                if m.get("offset") is None:
                    frames = video.decode_frames(video_source(fd, path), [0], timeout_s=30, past_end="clamp")
                else:  # inside a tar: ffmpeg reads a copy
                    with tempfile.TemporaryDirectory() as tmp:
                        src = os.path.join(tmp, "in.mp4")
                        with open(src, "xb") as f:
                            stream_media_fd(fd, m, out=f)
                        frames = video.decode_frames(src, [0], timeout_s=30, past_end="clamp")
            finally:
                os.close(fd)
            return _thumb_uri(Image.fromarray(frames[0])), None
        with Image.open(io.BytesIO(read_media_bytes(m, max_bytes=256 << 20))) as img:
            img.draft("RGB", (THUMB * 2, THUMB * 2))
            return _thumb_uri(img), None
    except MediaReadError as e:
        why = f"{getattr(e, 'reason', None) or 'unreadable'}"
    except Exception as e:  # noqa: BLE001 - a corrupt file is a placeholder, never a failed sheet
        why = f"undecodable: {getattr(e, 'reason', None) or type(e).__name__}"
    return placeholder(why), why


def _shard_rows(run_dir: str, ledger_rows: list[dict]) -> dict[str, dict]:
    """Kept samples read back from their shards (JSON and media) when `_work/` is gone."""
    from PIL import Image

    shards = os.path.join(run_dir, "shards")
    want: dict[str, set[str]] = {}
    for r in ledger_rows:
        if r.get("shard"):
            want.setdefault(os.path.basename(r["shard"]), set()).add(r["id"])
    out: dict[str, dict] = {}
    for name, ids in want.items():
        try:
            with tarfile.open(os.path.join(shards, name)) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if key not in ids or not member.isfile():
                        continue
                    data = tar.extractfile(member).read()
                    row = out.setdefault(key, {"media_thumbs": []})
                    if ext == "json":
                        row.update(json.loads(data))
                    elif ext.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp"):
                        try:
                            with Image.open(io.BytesIO(data)) as img:
                                row["media_thumbs"].append(_thumb_uri(img))
                        except Exception:  # noqa: BLE001
                            row["media_thumbs"].append(placeholder("undecodable image"))
        except (OSError, tarfile.TarError):
            continue
    return out


def _text_of(row: dict) -> str:
    caps = row.get("captions") or []
    if caps:
        return f"[caption] {caps[-1].get('text', '')}"
    if row.get("text"):
        return row["text"]
    msgs = row.get("messages") or []
    return " / ".join(f"{m.get('role')}: {m.get('content')}" for m in msgs[:2])


CSS = """
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px} .grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:210px;border:1px solid #ccc;border-radius:6px;padding:6px;background:#fafafa}
.card img{display:block;max-width:192px;max-height:192px;margin:0 auto 4px}
.id{font-family:monospace;font-size:11px;word-break:break-all}
.why{color:#b5412b;font-weight:600}
.text{font-size:12px;max-height:6em;overflow:hidden;color:#444;overflow-wrap:anywhere}
.sc{font-family:monospace;font-size:11px;color:#155}
"""


def render_sheet(title: str, cards: list[dict]) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>", "<div class='grid'>"]
    for c in cards:
        imgs = "".join(f"<img src='{u}' alt='{html.escape(c['id'])}'>" for u in c["thumbs"])
        why = (f"<div class='why'>{html.escape(c['step'] or '')}: {html.escape(c['reason'] or '')}</div>"
               if c["reason"] else f"<div class='why' style='color:#2a7'>kept in {html.escape(c['shard'] or '')}</div>")
        detail = f"<div class='text'>{html.escape(c['detail'])}</div>" if c.get("detail") else ""
        parts.append(
            f"<div class='card' data-id='{html.escape(c['id'])}'>{imgs}<div class='id'>{html.escape(c['id'])}</div>"
            f"<div>{html.escape(c['source'])} · {html.escape(c['kind'])} · "
            f"<span class='id'>{html.escape(c['source_key'] or '')}</span></div>{why}{detail}"
            f"<div class='text'>{html.escape(c['text'][:400])}</div>"
            f"<div class='sc'>{html.escape(c['scores'])}</div></div>")
    parts.append("</div></body></html>")
    return "\n".join(parts)


def inspect_run(run_dir: str, out: str | None = None, *, reason: str | None = None, step: str | None = None,
                source: str | None = None, kept: bool = False, n: int = 48) -> dict:
    """Write the contact sheet; returns {"path", "shown", "matched"}."""
    if n < 1:
        raise InspectError(f"--n must be at least 1, got {n}.")
    ledger_path(run_dir)  # a URL: one sentence naming the staging folder to pass instead
    run_dir = os.path.abspath(run_dir)
    lines, total = select_ledger(run_dir, reason=reason, step=step, source=source, kept=kept, n=n)
    if not lines:
        what = ", ".join(f"{k} {v}" for k, v in (("reason", reason), ("step", step), ("source", source)) if v)
        raise InspectError(f"no {'kept' if kept else 'dropped'} sample in the ledger of {run_dir}"
                           f"{' with ' + what if what else ''}: `reelforge ledger` lists what is there.")
    rows = _rows_by_id(run_dir, [r["id"] for r in lines])
    from_shards = _shard_rows(run_dir, [r for r in lines if r["id"] not in rows]) if kept else {}
    roots = recorded_roots(run_dir, lines)
    cards = []
    for line in lines:
        row = rows.get(line["id"]) or from_shards.get(line["id"]) or {}
        if "media_thumbs" in row:
            thumbs = row["media_thumbs"] or [placeholder("no media", (96, 24))]
        elif row.get("media"):
            thumbs = [thumbnail(m, roots)[0] for m in row["media"][:4]]
        else:
            thumbs = [placeholder("no media", (96, 24)) if row else placeholder("_work removed: no row")]
        scores = dict(row.get("scores") or {})
        toks = row.get("tokens")
        if isinstance(toks, dict):  # the shard JSON's tokens block
            toks = toks.get("tokens")
        cards.append({"id": line["id"], "source": line.get("source") or "", "kind": line.get("kind") or "",
                      "source_key": line.get("source_key"), "step": line.get("step"), "reason": line.get("reason"),
                      "detail": line.get("detail") or "", "shard": line.get("shard"), "thumbs": thumbs,
                      "text": _text_of(row),
                      "scores": " ".join(f"{k}={v:.3g}" for k, v in sorted(scores.items()) if v is not None)
                      + (f" tokens={toks}" if toks is not None else "")})
    what = " ".join(f"{k}={v}" for k, v in (("reason", reason), ("step", step), ("source", source)) if v)
    title = (f"reelforge inspect: {len(cards)} of {total} {'kept' if kept else 'dropped'} samples"
             f"{' (' + what + ')' if what else ''} — {run_dir}")
    if out is None:
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(v for v in (reason, step, source) if v) or "all")
        out = f"inspect-{'kept' if kept else 'dropped'}-{tag}.html"  # here, not inside the run's own folder
    with open(out, "w", encoding="utf-8") as f:
        f.write(render_sheet(title, cards))
    return {"path": out, "shown": len(cards), "matched": total}


def key_candidates(key: str) -> list[str]:
    """The source keys a `--key` may name: itself, and each tail after a `/` (README's
    `data/llava.jsonl:17` names the key `llava.jsonl:17` of the source file `.../data/llava.jsonl`)."""
    out = [key]
    i = key.find("/")
    while i != -1:
        if key[i + 1:]:
            out.append(key[i + 1:])
        i = key.find("/", i + 1)
    return out


def _key_matches(line: dict, key: str) -> bool:
    """Exactly the source key, or the key with the folders of its source file in front."""
    sk = line.get("source_key") or ""
    if sk == key:
        return True
    where = os.path.dirname(line.get("source_location") or "")
    full = f"{where}/{sk}" if where else sk
    return full == key or full.endswith("/" + key.lstrip("/"))


def ledger_lines(run_dir: str, *, id: str | None = None, key: str | None = None, reason: str | None = None,
                 step: str | None = None, source: str | None = None, limit: int = 20) -> list[dict]:
    """Ledger lines matching every filter given (id, key as `ledger --key` takes it, reason, step,
    source), by id, at most `limit`."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from reelforge.curation import storage

    fs = None
    if storage.is_url(run_dir):  # a run published to a bucket: its ledger is read in place
        fs, path = storage.url_fs(storage.join(run_dir, "ledger"))
        if not storage.isdir(storage.join(run_dir, "ledger")):
            raise InspectError(f"no ledger under {storage.redact(run_dir)}: pass the output URL of a finished run.")
    else:
        path = os.path.join(run_dir, "ledger") if os.path.isdir(os.path.join(run_dir, "ledger")) else run_dir
        if not os.path.isdir(path):
            raise InspectError(f"no ledger under {run_dir}: pass the output folder of a run.")
    flt = None
    for col, val in (("id", id), ("reason", reason), ("step", step), ("source", source)):
        if val is not None:
            flt = (pc.field(col) == val) if flt is None else flt & (pc.field(col) == val)
    if key is not None:
        k = pc.field("source_key").isin(key_candidates(key))
        flt = k if flt is None else flt & k
    d = ds.dataset(path, format="parquet", filesystem=fs)
    if flt is None:
        return d.head(limit).to_pylist()
    rows = d.to_table(filter=flt).to_pylist()
    if key is not None:
        rows = [r for r in rows if _key_matches(r, key)]
    return sorted(rows, key=lambda r: r["id"])[:limit]
