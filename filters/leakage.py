"""Benchmark leakage: drop every training sample that is a near-duplicate of an evaluation item.

The candidates and checks are near dedup's (`filters.near_dedup`): MinHash LSH on text, pHash
bands on every image of every sample; only pairs of one training sample and one evaluation
item count. The decisions are plain functions here (`leak_pair`, `leak_drop`); the engine
(`jobs.shuffles.leakage`) finds the pairs on Spark and joins the drops back.
"""

from __future__ import annotations

import json
import os
from typing import Any

from reelforge.curation.step import register_step
from reelforge.filters.near_dedup import NearDedup

EVAL_PREFIX = "eval:"


def is_eval(node_id: str) -> bool:
    return node_id.startswith(EVAL_PREFIX)


def leak_pair(a: str, b: str) -> tuple[str, str]:
    """(training sample id, evaluation item id) of an edge between one of each; an image
    contributes "<id>|<index>", which maps back to its sample (one image drops the sample)."""
    train, ev = (b, a) if is_eval(a) else (a, b)
    return train.split("|")[0], ev.split("|")[0]


def leak_drop(eval_id: str) -> tuple[str, str]:
    """(reason, detail) for a training sample matching `eval_id` ("eval:<set>:<key>"): the
    reason names the set, `leak:<set>`, so the report counts per evaluation set."""
    set_name = eval_id.split(":", 2)[1]
    return f"leak:{set_name}", "near-duplicate of evaluation item " + eval_id[len(EVAL_PREFIX):][:1000]


def leaks(edges: list[tuple[str, str]]) -> dict[str, str]:
    """Training sample id -> the evaluation item it leaks (the smallest id when several match),
    for the edges between training samples and evaluation items."""
    hits: dict[str, str] = {}
    for a, b in edges:
        if is_eval(a) == is_eval(b):
            continue
        t, e = leak_pair(a, b)
        hits[t] = min(hits.get(t, e), e)
    return hits


@register_step("leakage")
class LeakageFilter(NearDedup):
    """Drops every training sample whose text or any image is a near-duplicate of an item of
    an evaluation set (`leak:<set name>` in the ledger, so the report counts per set).

    Evaluation sets are JSONL or Parquet files in any manifest dialect the readers know
    (question/answer text, `image` paths); their images are probed and pHashed like the
    corpus. Text: exact shingle Jaccard >= `threshold` (default 0.8) found through MinHash
    LSH; images: pHash Hamming distance <= `image_hamming`. One matching image drops the
    whole multi-image sample.
    """

    shuffle = "leakage"

    def __init__(self, eval_sets: list[dict] | None = None, **kw: Any):
        super().__init__(**kw)
        sets = eval_sets or []
        if not sets:
            raise ValueError("`eval_sets` must list the evaluation sets: [{name: ..., path: ...}]")
        for i, e in enumerate(sets):
            if not isinstance(e, dict) or "name" not in e or "path" not in e:
                raise ValueError(f"eval_sets[{i}] needs a name and a path")
            if not os.path.exists(e["path"]):
                raise ValueError(f"eval_sets[{i}].path {e['path']} does not exist")
        self.eval_sets = sets

    def eval_rows(self) -> list[dict]:
        """The evaluation items as sample rows (ids "eval:<set>:<key>"), probed and pHashed here,
        once: evaluation sets are small. Items that cannot be read or probed are left out."""
        from reelforge.curation.probe import Probe
        from reelforge.curation.readers import read_jsonl, read_parquet

        rows = []
        for e in self.eval_sets:
            reader = read_parquet if e["path"].endswith(".parquet") else read_jsonl
            for r in reader(e["path"], e["name"], os.path.dirname(e["path"]), {}):
                if r.get("kind") == "unknown":
                    continue
                meta = json.loads(r["meta"]) if r.get("meta") else {}
                qa = " ".join(str(meta[k]) for k in ("question", "answer") if meta.get(k) is not None)
                if qa:  # benchmark items: their question and answer are the text to match
                    r["text"] = f"{r['text']} {qa}" if r.get("text") else qa
                r["id"] = f"{EVAL_PREFIX}{e['name']}:{r['source_key']}"
                r["drop_step"] = r["drop_reason"] = r["drop_detail"] = None
                rows.append(r)
        return [r for r in Probe().process(rows) if r["drop_step"] is None]
