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


@dataclass
class Media:
    """A reference to one image or video; bytes are read where a step needs them."""

    kind: str  # "image" | "video"
    uri: str  # path of the file itself, or of the tar that holds it
    member: Optional[str] = None  # member name inside the tar (None for a plain file)
    offset: Optional[int] = None  # byte offset of the member's data inside the tar
    length: Optional[int] = None  # byte length of the media (probe fills it for files)
    sha256: Optional[str] = None
    format: Optional[str] = None  # jpeg, png, webp, mp4, ...
    width: Optional[int] = None
    height: Optional[int] = None
    duration: Optional[float] = None  # seconds (video)
    fps: Optional[float] = None
    frames: Optional[int] = None
    codec: Optional[str] = None
    phash: Optional[list[int]] = None  # 64-bit perceptual hash per image / sampled frame


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Caption:
    """A caption a model wrote for the sample, kept beside the original text, never over it."""

    text: str
    model: str  # the model folder or name that wrote it
    prompt: str  # the exact instruction it was given
    task: str  # caption | ocr | video (the recipe's prompt key)


@dataclass
class Sample:
    id: str
    kind: str
    source: str  # source name from the recipe
    source_key: str  # original key: "file.tar/key", "manifest.jsonl:17", ...
    source_location: str  # where it was read from (file path)
    text: Optional[str] = None
    messages: Optional[list[Message]] = None
    chosen: Optional[str] = None  # preference pairs: prompt in messages
    rejected: Optional[str] = None
    media: Optional[list[Media]] = None
    meta: Optional[str] = None  # the source's own metadata, as a JSON object string
    # columns later steps fill
    clip_score: Optional[float] = None
    quality_score: Optional[float] = None
    vlm_score: Optional[float] = None  # a VLM judge's P(yes) for the recipe's quality question
    captions: Optional[list[Caption]] = None  # recaptions, each with its model and prompt
    text_tokens: Optional[int] = None
    visual_tokens: Optional[int] = None
    tokens: Optional[int] = None
    mode: Optional[str] = None
    stage: Optional[str] = None
    # fate: a sample with drop_step set leaves at that step and ends in the ledger
    drop_step: Optional[str] = None
    drop_reason: Optional[str] = None  # short code, counted in the report
    drop_detail: Optional[str] = None  # free text for a human
    dup_of: Optional[str] = None  # id of the sample this one duplicated
    parent_id: Optional[str] = None  # set on samples a step derived from another (video clips)


def _arrow_type(tp: Any) -> pa.DataType:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _arrow_type(inner)
    if origin is list:
        return pa.list_(_arrow_type(typing.get_args(tp)[0]))
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


def spark_schema():
    """The Spark StructType of a sample (imported lazily so workers stay light)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(ARROW_SCHEMA)


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
    return Sample(**{**row, "media": media, "messages": messages, "captions": captions})


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
    "ARROW_SCHEMA", "COLUMNS", "Caption", "IMAGE_PLACEHOLDER", "KINDS", "Media", "Message", "Sample",
    "VIDEO_PLACEHOLDER", "all_text", "alive", "drop", "empty_row", "get_score", "make_id",
    "row_to_sample", "sample_to_row", "set_score", "spark_schema",
]
