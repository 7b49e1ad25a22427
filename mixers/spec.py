"""Mixture specs: per training stage a token (or sample) target, per-entry weights, an epoch cap.

A mixture is plain YAML, checked up front so a mistake costs one sentence naming the field::

    name: keye-stage2
    seed: 0
    stages:
      - name: stage2
        target_tokens: 300B          # or target_samples: 784000 (weights are then shares of samples)
        max_epochs: 4                # no entry is drawn more often than this (per-entry override below)
        temperature: 2.0             # optional: shares become weight^(1/T), normalised
        policy: keep_ratios          # or fill (the default): what an entry at its epoch cap does to the others
        tolerance: 0.005             # achieved share may differ from the asked share by this much (0.5 points)
        shards: {max_samples: 1000, max_bytes: 1GiB, prefix: stage2}
        sources:
          - {name: captions, source: [laion_like, coyo_like], weight: 0.30}
          - {name: ocr, source: ocr_synth, weight: 0.10, max_epochs: 3}
          - {name: video, kind: video_text, weight: 0.20}
          - {name: thinking, mode: thinking, weight: 230000}

An entry selects samples of the run by `source`, `kind` and `mode` (each a name or a list;
an entry with none of them selects the source named like the entry), optionally with every
score named in `min_scores` at or above its value (`min_scores: {clip: 0.3, quality: 0.5}`:
any score a step set, by name; a sample without that score is not selected);
`min_quality_score` / `min_clip_score` are kept as aliases of `min_scores.quality` /
`min_scores.clip`. Weights are shares of the stage's target (they are
normalised); with no weights at all the shares follow the entries' sizes (to the power 1/T).

When an entry's share asks for more than `max_epochs` of its samples, the stage's `policy`
decides: `keep_ratios` shrinks the stage's total so every entry keeps its asked share (the
stage comes short of its target, and the plan says by how much); `fill` keeps the target and
gives the capped entries' shortfall to the uncapped ones in proportion to their shares (their
shares then grow). `fill` is the default, the planner's behaviour before the field existed.
Either way the plan records each entry's asked and achieved share, and `reelforge plan` fails
when one differs by more than the stage's `tolerance` (a fraction: 0.005 = 0.5 points) unless
it is given `--allow-drift`. `policy` and `tolerance` may also be set under `defaults`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from reelforge.curation import storage
from reelforge.curation.config import parse_size, read_yaml
from reelforge.curation.errors import RecipeError

SELECTORS = ("source", "kind", "mode")
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbt]?)\s*$", re.I)
_MULT = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
MODES = ("thinking", "non_thinking", "auto_think", "think_with_image", "video")
SCORE_ALIASES = {"min_quality_score": "quality", "min_clip_score": "clip"}  # older recipes' spelling
POLICIES = ("fill", "keep_ratios")  # what a capped entry does to the others (see the module's doc)
DEFAULT_POLICY = "fill"  # the planner's behaviour before `policy` existed, which the shipped recipes assume
DEFAULT_TOLERANCE = 0.005  # achieved vs asked share, as a fraction of the stage (0.5 points)


@dataclass
class Entry:
    """One line of a stage: which samples it draws from and its share."""

    name: str
    source: list[str] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    mode: list[str] = field(default_factory=list)
    weight: float | None = None
    max_epochs: float | None = None
    min_scores: dict[str, float] = field(default_factory=dict)  # score name -> lowest value selected

    def selector(self) -> dict:
        d = {k: getattr(self, k) for k in (*SELECTORS, "min_scores")}
        return {k: v for k, v in d.items() if v not in (None, [], {})}

    @classmethod
    def from_selector(cls, name: str, selector: dict) -> "Entry":
        """An entry back from a plan's `selector` (plans written before `min_scores` included)."""
        sel = dict(selector)
        scores = dict(sel.pop("min_scores", None) or {})
        for old, score in SCORE_ALIASES.items():
            if sel.get(old) is not None:
                scores[score] = sel.pop(old)
            sel.pop(old, None)
        return cls(name=name, **sel, min_scores=scores)


@dataclass
class Stage:
    name: str
    unit: str  # "tokens" | "samples"
    target: int
    max_epochs: float
    temperature: float | None
    entries: list[Entry]
    shards: dict
    note: str = ""
    policy: str = DEFAULT_POLICY
    tolerance: float = DEFAULT_TOLERANCE


@dataclass
class Mixture:
    name: str
    seed: int
    stages: list[Stage]
    path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def parse_count(value: Any, where: str) -> int:
    """300B, 1.5T, 784k or a plain integer."""
    if isinstance(value, bool):
        raise RecipeError(f"mixture field `{where}` must be a count such as 300B or 784000, got {value!r}.")
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    m = _COUNT.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise RecipeError(f"mixture field `{where}` must be a count such as 300B or 784000, got {value!r}.")
    return int(float(m.group(1)) * _MULT[m.group(2).lower()])


def _number(d: dict, key: str, where: str, minimum: float = 0.0, strict: bool = False) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise RecipeError(f"mixture field `{where}.{key}` must be a number {op} {minimum:g}, got {v!r}.")
    return float(v)


def _names(v: Any, where: str) -> list[str]:
    if v is None:
        return []
    vals = v if isinstance(v, list) else [v]
    if not vals or not all(isinstance(x, str) and x for x in vals):
        raise RecipeError(f"mixture field `{where}` must be a name or a list of names, got {v!r}.")
    return list(vals)


def _keys(d: dict, allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise RecipeError(f"mixture field `{where}.{k}` is not known: use one of {', '.join(sorted(allowed))}.")


def _entry(raw: Any, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise RecipeError(f"mixture field `{where}` must be a mapping such as {{name: ocr, weight: 0.1}}.")
    _keys(raw, {"name", "weight", "max_epochs", "min_scores", *SCORE_ALIASES, *SELECTORS}, where)
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise RecipeError(f"mixture field `{where}.name` must be a word of letters, digits, '_', '.' or '-', "
                          f"got {name!r}.")
    e = Entry(name=name, **{k: _names(raw.get(k), f"{where}.{k}") for k in SELECTORS})
    for m in e.mode:
        if m not in MODES:
            raise RecipeError(f"mixture field `{where}.mode` names {m!r}: use one of {', '.join(MODES)}.")
    if not (e.source or e.kind or e.mode):
        e.source = [name]
    e.weight = _number(raw, "weight", where, 0.0, strict=True)
    e.max_epochs = _number(raw, "max_epochs", where, 0.0, strict=True)
    scores = raw.get("min_scores")
    if scores is None:
        scores = {}
    if not isinstance(scores, dict) or not all(isinstance(k, str) and k for k in scores):
        raise RecipeError(f"mixture field `{where}.min_scores` must map score names to numbers, "
                          f"such as {{clip: 0.3, quality: 0.5}}, got {scores!r}.")
    for k in scores:
        e.min_scores[k] = _number(scores, k, f"{where}.min_scores", float("-inf"))
    for old, score in SCORE_ALIASES.items():
        v = _number(raw, old, where, float("-inf"))
        if v is None:
            continue
        if score in e.min_scores and e.min_scores[score] != v:
            raise RecipeError(f"mixture field `{where}.{old}` ({v:g}) disagrees with `{where}.min_scores.{score}` "
                              f"({e.min_scores[score]:g}): give it once, as `min_scores: {{{score}: ...}}`.")
        e.min_scores[score] = v
    return e


def _stage(raw: Any, i: int, defaults: dict) -> Stage:
    where = f"stages[{i}]"
    if not isinstance(raw, dict):
        raise RecipeError(f"mixture field `{where}` must be a mapping with name, target_tokens and sources.")
    _keys(raw, {"name", "target_tokens", "target_samples", "max_epochs", "temperature", "sources", "shards",
                "note", "policy", "tolerance"}, where)
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise RecipeError(f"mixture field `{where}.name` must be letters, digits, '_' or '-', got {name!r}.")
    if ("target_tokens" in raw) == ("target_samples" in raw):
        raise RecipeError(f"mixture field `{where}` needs exactly one of `target_tokens` (e.g. 300B) "
                          "or `target_samples` (e.g. 784000).")
    unit = "tokens" if "target_tokens" in raw else "samples"
    target = parse_count(raw[f"target_{unit}"], f"{where}.target_{unit}")
    merged = {**defaults, **{k: raw[k] for k in ("max_epochs", "temperature", "policy", "tolerance") if k in raw}}
    max_epochs = _number(merged, "max_epochs", where, 0.0, strict=True)
    temperature = _number(merged, "temperature", where, 0.0, strict=True)
    policy = merged.get("policy", DEFAULT_POLICY)
    if policy not in POLICIES:
        raise RecipeError(f"mixture field `{where}.policy` must be keep_ratios (shrink the stage so every entry "
                          f"keeps its share) or fill (give capped entries' shortfall to the others), got {policy!r}.")
    tolerance = _number(merged, "tolerance", where, 0.0)
    if tolerance is not None and tolerance >= 1:
        raise RecipeError(f"mixture field `{where}.tolerance` is a fraction of the stage (0.005 = 0.5 points) "
                          f"and must be below 1, got {tolerance:g}.")
    srcs = raw.get("sources")
    if isinstance(srcs, dict):  # shorthand: {source_name: weight}
        srcs = [{"name": k, "weight": v} for k, v in srcs.items()]
    if not isinstance(srcs, list) or not srcs:
        raise RecipeError(f"mixture field `{where}.sources` must be a non-empty list of entries "
                          "such as {name: ocr, weight: 0.1}.")
    entries = [_entry(s, f"{where}.sources[{j}]") for j, s in enumerate(srcs)]
    names = [e.name for e in entries]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RecipeError(f"mixture field `{where}.sources` repeats the entry name {dup!r}: make each name unique.")
    weighted = [e.weight is not None for e in entries]
    if any(weighted) and not all(weighted):
        missing = entries[weighted.index(False)].name
        raise RecipeError(f"mixture field `{where}.sources` gives weights to some entries but not to {missing!r}: "
                          "give every entry a weight, or none (shares then follow the entries' sizes).")
    shards = dict(defaults.get("shards") or {})
    shards.update(raw.get("shards") or {})
    _keys(shards, {"max_samples", "max_bytes", "prefix"}, f"{where}.shards")
    ms = shards.get("max_samples", 1000)
    if not isinstance(ms, int) or isinstance(ms, bool) or ms < 1:
        raise RecipeError(f"mixture field `{where}.shards.max_samples` must be an integer >= 1, got {ms!r}.")
    prefix = shards.get("prefix", name)
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise RecipeError(f"mixture field `{where}.shards.prefix` must be letters, digits, '_' or '-', "
                          f"got {prefix!r}.")
    try:
        max_bytes = parse_size(shards.get("max_bytes", "1GiB"), f"{where}.shards.max_bytes")
    except RecipeError as e:
        raise RecipeError(str(e).replace("recipe field", "mixture field")) from None
    return Stage(name=name, unit=unit, target=target, max_epochs=max_epochs or 1.0, temperature=temperature,
                 entries=entries, shards={"max_samples": ms, "max_bytes": max_bytes, "prefix": prefix},
                 note=str(raw.get("note", "")), policy=policy,
                 tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)


def parse_mixture(raw: Any, path: str = "") -> Mixture:
    if not isinstance(raw, dict):
        raise RecipeError("a mixture must be a YAML mapping with `name`, `seed` and `stages`.")
    _keys(raw, {"name", "seed", "stages", "defaults", "note"}, "mixture")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"mixture field `seed` must be an integer, got {seed!r}.")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError("mixture field `defaults` must be a mapping (max_epochs, temperature, shards, policy, "
                          "tolerance).")
    _keys(defaults, {"max_epochs", "temperature", "shards", "policy", "tolerance"}, "defaults")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError("mixture field `stages` must be a non-empty list of stages.")
    parsed = [_stage(s, i, defaults) for i, s in enumerate(stages)]
    names = [s.name for s in parsed]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RecipeError(f"mixture field `stages` repeats the stage name {dup!r}: make each name unique.")
    return Mixture(name=str(raw.get("name", "mixture")), seed=seed, stages=parsed, path=path)


def load_mixture(path: str) -> Mixture:
    """A mixture YAML from a path or a URL (s3://bucket/mix.yaml)."""
    if storage.is_url(path):
        return _load_mixture_url(path)
    if not os.path.exists(path):
        raise RecipeError(f"mixture file {path} does not exist: pass the path of a mixture YAML "
                          f"(examples in {recipes_dir()}).")
    raw = read_yaml(path, "mixture")
    return parse_mixture(raw, os.path.abspath(path))


def _load_mixture_url(url: str) -> Mixture:
    import yaml

    shown = storage.redact(url)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise RecipeError(f"mixture file {shown} does not exist: pass the URL of a mixture YAML "
                          f"(examples in {recipes_dir()}).") from None
    except storage.StorageError as e:
        raise RecipeError(str(e)) from None
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"mixture {shown} is not valid YAML{line}: {getattr(e, 'problem', e)}.") from e
    return parse_mixture(raw, storage.normalize(shown))


def recipes_dir() -> str:
    """The shipped stage recipes (package data)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
