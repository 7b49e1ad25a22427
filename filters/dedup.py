"""Exact dedup: equal media bytes (and, where it matters, equal normalised text).

A duplicate keeps its own ledger line with `dup_of` naming the sample that was kept, so
every decision can be inspected. The kept sample of a group is the smallest id: the
same rule on one machine and on a cluster, whatever the partitioning.

The decisions are plain functions over rows (`exact_key`, `exact_duplicates`); the engine
(`jobs.shuffles.dedup_exact`) computes each live row's key in the workers, groups by key
on Spark and joins the drops back.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable

from reelforge.curation.step import Step, register_step

MEDIA_ONLY_KINDS = ("image_text", "video_text")
_WS = re.compile(r"[ \t\n\x0b\f\r]+")  # Java's \s: what the Spark expression this replaces matched


def normalised_text(row: dict) -> str:
    """All text of a sample (text, `role: content` of each message, chosen, rejected), joined by
    newlines, whitespace runs as one space, trimmed, lower case: two copies that differ only in
    case or spacing get one key."""
    msgs = "\n".join(f"{m['role']}: {m['content']}" for m in row.get("messages") or []
                     if m is not None and m.get("role") is not None and m.get("content") is not None)
    text = "\n".join((row.get("text") or "", msgs, row.get("chosen") or "", row.get("rejected") or ""))
    return _WS.sub(" ", text).strip(" ").lower()


def media_key(row: dict) -> str | None:
    """The sha256 of every medium, in order, joined by commas; None for a sample without media."""
    media = row.get("media") or []
    if not media:
        return None
    return ",".join(m["sha256"] for m in media if m is not None and m.get("sha256") is not None)


def exact_key(row: dict, media_only_kinds: Iterable[str] = MEDIA_ONLY_KINDS) -> str:
    """Rows with equal keys are exact duplicates. Caption pairs (`media_only_kinds`) match on
    media bytes alone ("m:..."); every other kind on media and normalised text ("t:...")."""
    mk = media_key(row)
    if row.get("kind") in tuple(media_only_kinds) and mk is not None:
        return "m:" + mk
    return "t:" + (mk or "") + "|" + hashlib.sha256(normalised_text(row).encode("utf-8")).hexdigest()


def duplicate_reason(key: str) -> str:
    return "duplicate_media" if key.startswith("m:") else "duplicate_text"


def exact_duplicates(rows: list[dict], media_only_kinds: Iterable[str] = MEDIA_ONLY_KINDS
                     ) -> list[tuple[str, str, str]]:
    """(id, kept id, reason) for every live row that repeats another: in each group of equal keys
    the smallest id stays. What the engine computes over the corpus, on a list."""
    keyed = [(r["id"], exact_key(r, media_only_kinds)) for r in rows if r.get("drop_step") is None]
    first: dict[str, str] = {}
    for rid, k in keyed:
        if k not in first or rid < first[k]:
            first[k] = rid
    return [(rid, first[k], duplicate_reason(k)) for rid, k in keyed if rid != first[k]]


@register_step("dedup_exact")
class ExactDedup(Step):
    """Caption pairs are duplicates when their media bytes match; every other kind when
    both media and normalised text match (two questions about one image are not dups)."""

    shuffle = "dedup_exact"

    def __init__(self, media_only_kinds: list[str] | tuple[str, ...] = MEDIA_ONLY_KINDS, **kw: Any):
        super().__init__(**kw)
        self.media_only_kinds = list(media_only_kinds)

    def key(self, row: dict) -> str:
        return exact_key(row, self.media_only_kinds)
