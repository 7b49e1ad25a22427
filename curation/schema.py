"""The one sample schema that travels from ingest to the training loader.

The Python view (dataclasses) is the single source of truth: the Spark schema and the
Arrow schema are derived from it, so a step can never drift into a second format.
A step adds values to the nullable columns declared here; it never invents new ones.

Conversation text uses one message format everywhere: ``messages`` is a list of
``{"role": "system"|"user"|"assistant", "content": str}`` and media appear inside
``content`` as the placeholders ``<image>`` and ``<video>``, matched in order of
appearance with the sample's ``media`` list. Captions and documents live in ``text``
(interleaved documents carry the same placeholders there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

KINDS = ("image_text", "video_text", "interleaved", "text", "conversation", "preference")


# --- where each field goes -------------------------------------------------------------
#
# Every field of the dataclasses below declares, in its metadata, where it travels after the
# Spark job; the shard JSON (`to_shard_json`), its parser (`from_shard_json`, which the
# training loader uses), the samples table's columns (`TABLE_FIELDS`) and the ledger are
# generated from these declarations, so a field a step fills reaches training without a
# second hand-written format:
#
#   shard   the field's path in the shard JSON ("tokens.text_tokens"); default: its name.
#           None: not in the shard JSON (ledger-only fields, or media references the shard's
#           own member replaces).
#   table   also a column of the samples table (`RUN/samples/`, what the planner reads).
#   ledger  the ledger column that carries it (fate fields live only there).
#   codec   how the value is written: "json" (a JSON object string written as the object),
#           "hex64" (64-bit ints as 16 hex digits).
#   always  written even when null (the `tokens` block is always complete).
#   rebased a media reference (where the bytes were read from); in the shard the medium is
#           the shard's own member, so these come back pointing at the shard.


def col(default: Any = None, *, shard: Optional[str] | bool = True, table: bool = False,
        ledger: Optional[str] = None, codec: Optional[str] = None, always: bool = False,
        rebased: bool = False, required: bool = False) -> Any:
    """A schema field and its declaration (see above); `shard=True` means "under its own name"."""
    meta = {"shard": shard, "table": table, "ledger": ledger, "codec": codec, "always": always,
            "rebased": rebased}
    if required:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class Media:
    """A reference to one image or video; bytes are read where a step needs them."""

    kind: str = col(required=True)  # "image" | "video"
    # path of the file itself, or of the tar that holds it (from the shard: the shard's path)
    uri: str = col(required=True, shard=None, rebased=True)
    member: Optional[str] = col(rebased=True)  # member name inside the tar (None for a plain file)
    offset: Optional[int] = col(shard=None, rebased=True)  # byte offset of the member's data inside the tar
    length: Optional[int] = col()  # byte length of the media (probe fills it for files)
    sha256: Optional[str] = col()
    format: Optional[str] = col()  # jpeg, png, webp, mp4, ...
    width: Optional[int] = col()
    height: Optional[int] = col()
    duration: Optional[float] = col()  # seconds (video)
    fps: Optional[float] = col()
    frames: Optional[int] = col()
    codec: Optional[str] = col()
    phash: Optional[list[int]] = col(codec="hex64")  # 64-bit perceptual hash per image / sampled frame
    # the frame plan of a video (the probe step, from the decoded frames; see curation/frame_plan.py),
    # under "plan" in the shard JSON: the sampled frame indices, their timestamps (s), their types
    # (0 slow, 1 fast), the slow and fast frame sizes [h, w], the video's tokens and the processor
    frame_indices: Optional[list[int]] = col(shard="plan.frame_indices")
    frame_times: Optional[list[float]] = col(shard="plan.frame_times")
    frame_types: Optional[list[int]] = col(shard="plan.frame_types")
    slow_size: Optional[list[int]] = col(shard="plan.slow_size")
    fast_size: Optional[list[int]] = col(shard="plan.fast_size")
    plan_tokens: Optional[int] = col(shard="plan.tokens")
    plan_processor: Optional[str] = col(shard="plan.processor")


@dataclass
class Message:
    role: str = col(required=True)
    content: str = col(required=True)


@dataclass
class Caption:
    """A caption a model wrote for the sample, kept beside the original text, never over it."""

    text: str = col(required=True)
    model: str = col(required=True)  # the model folder or name that wrote it
    prompt: str = col(required=True)  # the exact instruction it was given
    task: str = col(required=True)  # caption | ocr | video (the recipe's prompt key)


@dataclass
class Response:
    """One response a model generated for the sample's prompt (the `sample` step), and what the
    `reward` step (`mixers/reward.py`) made of it. Kept in `responses`, in the order generated."""

    text: str = col(required=True)
    model: str = col(required=True)  # the model folder or name that generated it
    seed: Optional[int] = col()  # the sampling seed (None: greedy decoding)
    mode: Optional[str] = col()  # the cold-start mode it was asked in (thinking, non_thinking, ...)
    temperature: Optional[float] = col()
    top_p: Optional[float] = col()
    params: Optional[str] = col(codec="json")  # any other generation setting, as a JSON object string
    # filled by the reward step
    answer: Optional[str] = col()  # the answer extracted from `text` (a choice letter, a number, yes/no, a span)
    rewards: Optional[dict[str, float]] = col()  # each reward by name: correct, format, consistency, repetition, judge
    reward: Optional[float] = col()  # their weighted total (the recipe's `weights`)
    passed: Optional[bool] = col()  # the pass rule (`pass_on` >= `pass_threshold`); None: nothing to pass on


@dataclass
class Sample:
    id: str = col(required=True, table=True, ledger="id")
    kind: str = col(required=True, table=True, ledger="kind")
    source: str = col(required=True, shard="provenance.source", table=True, ledger="source")  # recipe source name
    # original key: "file.tar/key", "manifest.jsonl:17", ...
    source_key: str = col(required=True, shard="provenance.key", ledger="source_key")
    source_location: str = col(required=True, shard="provenance.location",
                               ledger="source_location")  # where it was read from (file path)
    text: Optional[str] = col()
    messages: Optional[list[Message]] = col()
    chosen: Optional[str] = col()  # preference pairs: prompt in messages
    rejected: Optional[str] = col()
    media: Optional[list[Media]] = col()
    meta: Optional[str] = col(codec="json")  # the source's own metadata, as a JSON object string
    # columns later steps fill
    # every step's score by name (clip, vlm, quality, ...): set_score / get_score
    scores: Optional[dict[str, float]] = col(table=True)
    captions: Optional[list[Caption]] = col()  # recaptions, each with its model and prompt
    responses: Optional[list[Response]] = col()  # generated responses to the prompt, with their rewards
    pass_rate: Optional[float] = col(table=True)  # share of the responses that passed (the reward step)
    difficulty: Optional[str] = col(table=True)  # the pass rate's bucket: unsolved, hard, ..., solved, no_reference
    text_tokens: Optional[int] = col(shard="tokens.text_tokens", table=True, always=True)
    visual_tokens: Optional[int] = col(shard="tokens.visual_tokens", table=True, always=True)
    tokens: Optional[int] = col(shard="tokens.tokens", table=True, always=True)
    mode: Optional[str] = col(table=True)
    stage: Optional[str] = col(table=True)
    # fate: a sample with drop_step set leaves at that step and ends in the ledger (only there)
    drop_step: Optional[str] = col(shard=None, ledger="step")
    drop_reason: Optional[str] = col(shard=None, ledger="reason")  # short code, counted in the report
    drop_detail: Optional[str] = col(shard=None, ledger="detail")  # free text for a human
    dup_of: Optional[str] = col(shard=None, ledger="dup_of")  # id of the sample this one duplicated
    # set on samples a step derived from another (video clips)
    parent_id: Optional[str] = col(table=True, ledger="parent_id")


def _arrow_type(tp: Any) -> pa.DataType:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _arrow_type(inner)
    if origin is list:
        return pa.list_(_arrow_type(typing.get_args(tp)[0]))
    if origin is dict:
        k, v = typing.get_args(tp)
        return pa.map_(_arrow_type(k), _arrow_type(v))
    if dataclasses.is_dataclass(tp):
        return pa.struct(_arrow_fields(tp))
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bytes: pa.binary(),
            bool: pa.bool_()}[tp]


def _arrow_fields(cls: type) -> list[pa.Field]:
    hints = typing.get_type_hints(cls)
    return [pa.field(f.name, _arrow_type(hints[f.name]), nullable=True)
            for f in dataclasses.fields(cls)]


ARROW_SCHEMA: pa.Schema = pa.schema(_arrow_fields(Sample))
COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Sample))


def row_meta(row: dict) -> dict:
    """A row's `meta` as a dict: the JSON string parsed (an already parsed dict as it is); {} when
    it is empty, not JSON or not an object, since corpus rows bring whatever they bring."""
    raw = row.get("meta")
    if isinstance(raw, dict):
        return raw
    try:
        m = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def rows_of(batch: "pa.RecordBatch | pa.Table") -> list[dict]:
    """Arrow rows as the Python row view: structs and lists as dicts and lists, and the
    `scores` map as a dict (Arrow's default turns a map into a list of pairs)."""
    return batch.to_pylist(maps_as_pydicts="strict")


# --- generated from the declarations: shard JSON, samples table, ledger ---------------------

_HINTS = {cls: typing.get_type_hints(cls) for cls in (Sample, Media, Message, Caption, Response)}
_MASK64 = (1 << 64) - 1


def _shard_path(f: dataclasses.Field) -> Optional[tuple[str, ...]]:
    sh = f.metadata.get("shard", True)
    if sh is None or sh is False:
        return None
    return tuple((f.name if sh is True else sh).split("."))


def _base(tp: Any) -> Any:
    """X for Optional[X]."""
    if typing.get_origin(tp) is typing.Union:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def _list_of(tp: Any) -> Optional[type]:
    """X for Optional[list[X]] where X is a dataclass, else None."""
    tp = _base(tp)
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return inner if dataclasses.is_dataclass(inner) else None
    return None


def _has_rebased(cls: type) -> bool:
    return any(f.metadata.get("rebased") for f in dataclasses.fields(cls))


SHARD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Sample) if _shard_path(f))
TABLE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Sample) if f.metadata.get("table"))
LEDGER_FIELDS: dict[str, str] = {f.name: f.metadata["ledger"] for f in dataclasses.fields(Sample)
                                 if f.metadata.get("ledger")}
LEDGER_ONLY: tuple[str, ...] = tuple(n for n in LEDGER_FIELDS if n not in SHARD_FIELDS)


class _Plan(typing.NamedTuple):
    """One field's declaration, resolved once: the encoder and parser loop over these."""

    name: str
    path: Optional[tuple[str, ...]]
    codec: Optional[str]
    always: bool
    rebased: bool
    inner: Optional[type]  # X for list[X] of a dataclass
    inner_rebased: bool  # X has rebased fields: its elements take the shard's member names
    is_map: bool
    is_float: bool


def _plan(cls: type) -> tuple[_Plan, ...]:
    out = []
    for f in dataclasses.fields(cls):
        tp = _HINTS[cls][f.name]
        inner = _list_of(tp)
        out.append(_Plan(f.name, _shard_path(f), f.metadata.get("codec"), bool(f.metadata.get("always")),
                         bool(f.metadata.get("rebased")), inner, inner is not None and _has_rebased(inner),
                         typing.get_origin(_base(tp)) is dict, _base(tp) is float))
    return tuple(out)


_PLANS = {cls: _plan(cls) for cls in (Sample, Media, Message, Caption, Response)}


def _encode(cls: type, d: dict, members: Optional[list[str]] = None, member: Optional[str] = None) -> dict:
    out: dict[str, Any] = {}
    for name, path, codec, always, rebased, inner, inner_rebased, is_map, _ in _PLANS[cls]:
        if path is None:
            continue
        if rebased:
            v = member  # the medium is now the shard's member
        else:
            v = d.get(name)
            if v is not None:
                if codec is not None:
                    if codec == "json":
                        try:
                            v = json.loads(v)
                        except ValueError:
                            pass  # not JSON: carried as the string it is
                    else:  # hex64
                        v = [f"{h & _MASK64:016x}" for h in v]
                elif inner is not None:
                    if inner_rebased:
                        names = members or []
                        v = [_encode(inner, x, None, names[i] if i < len(names) else None) for i, x in enumerate(v)]
                    else:
                        v = [_encode(inner, x) for x in v]
                elif is_map and not isinstance(v, dict):
                    v = dict(v)  # an Arrow map read as pairs
        if v is None and not always:
            continue
        if len(path) == 1:
            out[path[0]] = v
        else:
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = v
    return out


def to_shard_json(row: dict, members: list[str]) -> dict:
    """Every field the declarations put in the shard, at its path; `members` are the shard member
    names of the sample's media, in order (they replace the media references)."""
    return _encode(Sample, row, list(members))


def _decode(cls: type, obj: dict, shard: Optional[str]) -> dict:
    row: dict[str, Any] = {}
    for name, path, codec, _, rebased, inner, _, is_map, is_float in _PLANS[cls]:
        if path is None:
            row[name] = shard if (rebased and name == "uri") else None  # media: read from the shard now
            continue
        if len(path) == 1:
            v = obj.get(path[0])
        else:
            v = obj
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            if codec is not None:
                if codec == "json":
                    if not isinstance(v, str):
                        v = json.dumps(v, sort_keys=True, ensure_ascii=False)
                else:  # hex64
                    v = [(h - (1 << 64)) if h >= (1 << 63) else h for h in (int(x, 16) for x in v)]
            elif inner is not None:
                v = [_decode(inner, x, shard) for x in v]
            elif is_map:
                v = {str(k): (None if x is None else float(x)) for k, x in v.items()}
            elif is_float and isinstance(v, int):
                v = float(v)
        row[name] = v
    return row


def from_shard_json(obj: dict, shard: Optional[str] = None) -> dict:
    """The shard JSON back as the row view (every Sample field; ledger-only ones None, media
    references pointing at `shard`, the tar that holds them). The inverse of to_shard_json."""
    return _decode(Sample, obj, shard)


def empty_row() -> dict:
    return {name: None for name in COLUMNS}


def make_id(source: str, source_key: str, content: Any) -> str:
    """Stable id: the same source, key and content give the same id on every run.

    Content is part of it so a re-ingested, edited record gets a new id; source and key
    are part of it so two exact duplicates keep distinct ids (dedup links them).
    """
    h = hashlib.sha1()
    h.update(source.encode())
    h.update(b"\0")
    h.update(source_key.encode())
    h.update(b"\0")
    h.update(json.dumps(content, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:24]


def sample_to_row(sample: Sample) -> dict:
    return dataclasses.asdict(sample)


def row_to_sample(row: dict) -> Sample:
    media = [Media(**m) for m in row["media"]] if row.get("media") is not None else None
    messages = ([Message(**m) for m in row["messages"]]
                if row.get("messages") is not None else None)
    captions = [Caption(**c) for c in row["captions"]] if row.get("captions") is not None else None
    responses = ([Response(**{**r, "rewards": _as_dict(r.get("rewards"))}) for r in row["responses"]]
                 if row.get("responses") is not None else None)
    return Sample(**{**row, "media": media, "messages": messages, "captions": captions, "responses": responses,
                     "scores": _as_dict(row.get("scores"))})


def _as_dict(m: Any) -> Optional[dict]:
    """A map column as a dict (Arrow's default reads it as [(key, value)])."""
    return m if m is None or isinstance(m, dict) else dict(m)


def alive(row: dict) -> bool:
    return row.get("drop_step") is None


def drop(row: dict, step: str, reason: str, detail: str = "", dup_of: Optional[str] = None) -> dict:
    """Mark a row as leaving the pipeline at `step`; the first drop wins."""
    if row.get("drop_step") is None:
        row["drop_step"] = step
        row["drop_reason"] = reason
        row["drop_detail"] = detail[:500] if detail else None
        row["dup_of"] = dup_of
    return row


def _scores_dict(row: dict) -> dict:
    """The row's `scores` as a dict, converting in place an Arrow map read as [(name, value)]."""
    scores = row.get("scores")
    if scores is None:
        scores = row["scores"] = {}
    elif not isinstance(scores, dict):
        scores = row["scores"] = {k: v for k, v in scores}
    return scores


def set_score(row: dict, name: str, value: float) -> None:
    """Record a step's score for the sample under `name` (clip, vlm, quality, ...).

    Scores live in one map column, so a new scoring filter adds a name, not a column:
    the shard JSON, the samples table and the mixture selectors (`min_scores`) carry it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a score name must be a non-empty string, got {name!r}")
    _scores_dict(row)[name] = None if value is None else float(value)


def get_score(row: dict, name: str) -> float | None:
    """The sample's score `name`, or None when no step set it."""
    scores = row.get("scores")
    if not scores:
        return None
    return _scores_dict(row).get(name)


def all_text(row: dict) -> str:
    """Every piece of text of a sample, joined; used for length filters and text dedup."""
    parts: list[str] = []
    if row.get("text"):
        parts.append(row["text"])
    for m in row.get("messages") or []:
        parts.append(f"{m['role']}: {m['content']}")
    for k in ("chosen", "rejected"):
        if row.get(k):
            parts.append(row[k])
    return "\n".join(parts)


__all__ = [
    "ARROW_SCHEMA", "COLUMNS", "Caption", "IMAGE_PLACEHOLDER", "KINDS", "LEDGER_FIELDS", "LEDGER_ONLY",
    "Media", "Message", "Response", "SHARD_FIELDS", "Sample", "TABLE_FIELDS", "VIDEO_PLACEHOLDER", "all_text", "alive",
    "col", "drop", "empty_row", "from_shard_json", "get_score", "make_id", "row_to_sample", "rows_of",
    "sample_to_row", "set_score", "to_shard_json",
]
