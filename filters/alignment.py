"""Rule-based alignment scores (repetition; consistency between reasoning and answer) and the
filter steps that drop by them (`repetition`, `format_consistency`).

The scores are pure functions (no Spark, no model) so the filters below and RL reward
components compute exactly the same numbers. They live here, in the filters layer, because
every user sits at or above it: the filter steps, and training's rewards (training may import
filters; filters may not import mixers or training).
"""

from __future__ import annotations

import re
from typing import Any

from reelforge.curation.schema import drop
from reelforge.curation.step import RowStep, register_step

_WORD = re.compile(r"\w+", re.U)
_THINK = re.compile(r"<think>(.*?)</think>\s*(?:<answer>(.*?)</answer>|(.*))$", re.S)
_CHOICE = re.compile(r"^\(?([A-Ea-e])\)?[.:)]?$")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")
_CONCLUDE = re.compile(r"(?:answer|result|therefore|so|thus)\W+(?:is\W+)?\(?([A-E])\)?\b", re.I)


def ngram_repetition(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none, -> 1 = one n-gram over and over)."""
    words = _WORD.findall(text.lower())
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def line_repetition(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (looping lists, copied paragraphs)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 3:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def tail_loop(text: str, min_period: int = 4, max_period: int = 200, repeats: int = 3) -> float:
    """1.0 when the text ends in a chunk repeated `repeats`+ times back to back (a generation loop)."""
    t = text.rstrip()
    for p in range(min_period, min(max_period, len(t) // repeats) + 1):
        chunk = t[-p:]
        if t.endswith(chunk * repeats):
            return 1.0
    return 0.0


def repetition_score(text: str, n: int = 4) -> float:
    """The worst of n-gram repetition, line repetition and a looping tail, in [0, 1]."""
    if not text:
        return 0.0
    return max(ngram_repetition(text, n), line_repetition(text), tail_loop(text))


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant turn in either thinking form; (None, text) without one."""
    t = text
    m = re.match(r"^<analysis>.*?</analysis>", t, re.S)
    if m:
        t = t[m.end():]
    m = _THINK.match(t.strip())
    if not m:
        return None, t
    answer = m.group(2) if m.group(2) is not None else (m.group(3) or "")
    return m.group(1).strip(), answer.strip()


def format_consistency(text: str) -> tuple[float, list[str]]:
    """1.0 when a reasoning turn is well formed and its answer agrees with the reasoning's conclusion.

    Rules: one <think> block, both parts non-empty, no tags left in the answer; a choice the
    reasoning concludes with must be the answer's choice; a numeric answer must equal the
    reasoning's last number; a yes/no answer must match the last yes/no in the reasoning's final
    third. Text without reasoning is judged on its form only. A think-with-image sample is judged
    on its assistant turns joined (its reasoning spans the sandbox turns)."""
    problems: list[str] = []
    if text.count("<think>") > 1 or text.count("</think>") > 1:
        problems.append("more than one think block")
    reasoning, answer = split_reasoning(text)
    if reasoning is None:
        if "<think>" in text or "</think>" in text or "<answer>" in text:
            problems.append("think/answer tags are malformed")
        return (0.0 if problems else 1.0), problems
    if not reasoning:
        problems.append("empty reasoning")
    if not answer:
        problems.append("empty answer")
    if re.search(r"</?(think|answer|analysis)>", answer):
        problems.append("tags inside the answer")
    if reasoning and answer:
        tail = reasoning[-max(1, len(reasoning) // 3):].lower()
        a = answer.strip().rstrip(".").strip()
        choice = _CHOICE.match(a)
        concl = _CONCLUDE.findall(reasoning)
        if choice:
            if concl and concl[-1].upper() != choice.group(1).upper():
                problems.append(f"the reasoning concludes {concl[-1].upper()} but the answer is {choice.group(1)}")
        elif _NUMBER.fullmatch(a.replace(" ", "")):
            nums = _NUMBER.findall(reasoning)
            if nums and nums[-1].replace(",", "") != a.replace(" ", "").replace(",", ""):
                problems.append(f"the reasoning ends with {nums[-1]} but the answer is {a}")
        elif a.lower() in ("yes", "no"):
            said = re.findall(r"\b(yes|no)\b", tail)
            if said and said[-1] != a.lower():
                problems.append(f"the reasoning concludes {said[-1]!r} but the answer is {a!r}")
    return (0.0 if problems else 1.0), problems


def _final_assistant(row: dict) -> str:
    if row.get("mode") == "think_with_image":
        return "".join(m["content"] for m in row.get("messages") or [] if m["role"] == "assistant")
    for m in reversed(row.get("messages") or []):
        if m["role"] == "assistant":
            return m["content"]
    return row.get("chosen") or ""


@register_step("repetition")
class RepetitionFilter(RowStep):
    """Drops samples whose assistant text (or document) repeats itself beyond `max_score`."""

    def __init__(self, max_score: float = 0.5, ngram: int = 4, **kw: Any):
        super().__init__(**kw)
        if not 0 <= max_score <= 1:
            raise ValueError("`max_score` must lie in [0, 1]")
        self.max_score, self.ngram = float(max_score), int(ngram)

    def process_row(self, row: dict) -> dict:
        text = _final_assistant(row) or row.get("text") or ""
        s = repetition_score(text, self.ngram)
        if s > self.max_score:
            return drop(row, self.name, "repetitive", f"repetition score {s:.2f} > {self.max_score:g}")
        return row


@register_step("format_consistency")
class FormatConsistencyFilter(RowStep):
    """Drops reasoning samples whose answer is malformed or disagrees with its reasoning."""

    def process_row(self, row: dict) -> dict:
        score, problems = format_consistency(_final_assistant(row))
        if score < 1.0:
            return drop(row, self.name, "inconsistent_reasoning", "; ".join(problems))
        return row
