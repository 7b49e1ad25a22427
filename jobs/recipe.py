"""Recipes: plain YAML data, checked up front so a mistake costs one sentence, not a stack trace."""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from curation.readers import DEFAULT_PATTERNS, READERS


class RecipeError(Exception):
    """A mistake in the recipe: the message names the field and the fix."""


def _steps() -> dict[str, type]:
    from curation.clips import VideoClips
    from curation.dedup import ExactDedup
    from curation.near_dedup import LeakageFilter, NearDedup
    from curation.probe import Probe
    from curation.recaption import Recaption
    from curation.token_count import CountTokens
    from filters.clip_score import ClipScore
    from filters.quality import Quality
    from filters.vlm_judge import VlmJudge
    from mixers.alignment import FormatConsistencyFilter, RepetitionFilter
    from mixers.modes import RenderModes

    return {"probe": Probe, "dedup_exact": ExactDedup, "quality": Quality, "tokens": CountTokens,
            "clips": VideoClips, "dedup_near": NearDedup,
            "leakage": LeakageFilter, "clip": ClipScore, "modes": RenderModes, "repetition": RepetitionFilter,
            "format_consistency": FormatConsistencyFilter, "vlm_judge": VlmJudge, "recaption": Recaption}


PATH_PARAMS = ("tokenizer", "checkpoint", "model_config")
MAYBE_PATH_PARAMS = ("pretrained", "model")  # a tag or name, or a path relative to the recipe


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise RecipeError(f"recipe field `{where}` must be a size such as 512MB or 1GiB, got {value!r}.")
    if isinstance(value, int) and value > 0:
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise RecipeError(f"recipe field `{where}` must be a size such as 512MB or 1GiB, got {value!r}.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class Source:
    name: str
    format: str
    paths: list[str]
    options: dict = field(default_factory=dict)
    root: str = ""


@dataclass
class StepSpec:
    name: str
    params: dict

    def build(self):
        return _steps()[self.name](**self.params)


@dataclass
class Recipe:
    name: str
    seed: int
    sources: list[Source]
    steps: list[StepSpec]
    output: str
    shards: dict
    spark: dict
    raw: dict
    base_dir: str

    def fingerprint(self, upto: int) -> str:
        """Hash of what determines the output of steps[:upto] (sources and their files too)."""
        files = [(s.name, s.format, s.options, [(p, os.path.getsize(p), int(os.path.getmtime(p)))
                                                for p in s.paths]) for s in self.sources]
        body = {"sources": files, "steps": [(s.name, s.params) for s in self.steps[:upto]]}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _expand(path: str, fmt: str, base: str, where: str) -> tuple[list[str], str]:
    p = path if os.path.isabs(path) else os.path.join(base, path)
    if os.path.isdir(p):
        root = p
        found = sorted({f for pat in DEFAULT_PATTERNS[fmt]
                        for f in glob.glob(os.path.join(p, "**", pat), recursive=True)})
    else:
        root = p.split("*")[0].split("?")[0].split("[")[0]
        root = root if os.path.isdir(root) else os.path.dirname(root)
        found = sorted(glob.glob(p, recursive=True))
    found = [f for f in found if os.path.isfile(f)]
    if not found:
        raise RecipeError(f"recipe field `{where}` matches no files ({p}): check the path, "
                          f"relative paths are read from the recipe's folder {base}.")
    return found, root


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise RecipeError(f"recipe field `{where}.{k}` is not known: use one of "
                              f"{', '.join(sorted(allowed))}.")


def read_yaml(path: str, what: str = "recipe") -> Any:
    """A YAML file's data; a syntax error costs one sentence with its line."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{what} {path} is not valid YAML{line}: {getattr(e, 'problem', e)}.") from e


def _step_params(cls: type) -> dict[str, inspect.Parameter]:
    """Parameters a step accepts: its own and those its base classes take through **kw."""
    params: dict[str, inspect.Parameter] = {}
    for c in reversed(cls.__mro__):
        if "__init__" in vars(c) and c is not object:
            params.update(inspect.signature(c.__init__).parameters)
    return params


def load_recipe(path: str, out: str | None = None) -> Recipe:
    if not os.path.exists(path):
        raise RecipeError(f"recipe file {path} does not exist: pass the path of a recipe YAML.")
    return parse_recipe(read_yaml(path), os.path.dirname(os.path.abspath(path)), out)


def parse_recipe(raw: Any, base_dir: str, out: str | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping with `sources`, `steps` and `output`.")
    _check_keys(raw, {"name", "seed", "sources", "steps", "output", "spark"}, "recipe")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"recipe field `seed` must be an integer, got {seed!r}.")
    srcs = raw.get("sources")
    if not isinstance(srcs, list) or not srcs:
        raise RecipeError("recipe field `sources` must be a non-empty list of sources "
                          "(each with name, format and path).")
    sources: list[Source] = []
    names: set[str] = set()
    for i, s in enumerate(srcs):
        where = f"sources[{i}]"
        if not isinstance(s, dict):
            raise RecipeError(f"recipe field `{where}` must be a mapping with name, format and path.")
        _check_keys(s, {"name", "format", "path", "options"}, where)
        name = s.get("name")
        if not isinstance(name, str) or not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise RecipeError(f"recipe field `{where}.name` must be a word of letters, digits, '_', '.' "
                              f"or '-', got {name!r}.")
        if name in names:
            raise RecipeError(f"recipe field `{where}.name` repeats the source name {name!r}: make it unique.")
        names.add(name)
        fmt = s.get("format")
        if fmt not in READERS:
            raise RecipeError(f"recipe field `{where}.format` is {fmt!r}: use one of "
                              f"{', '.join(sorted(READERS))}.")
        path = s.get("path")
        plist = path if isinstance(path, list) else [path]
        if not plist or not all(isinstance(p, str) and p for p in plist):
            raise RecipeError(f"recipe field `{where}.path` must be a path, a glob or a list of them.")
        files: list[str] = []
        root = ""
        for p in plist:
            found, root = _expand(p, fmt, base_dir, f"{where}.path")
            files += found
        opts = s.get("options") or {}
        if not isinstance(opts, dict):
            raise RecipeError(f"recipe field `{where}.options` must be a mapping.")
        if "media_root" in opts and not os.path.isabs(opts["media_root"]):
            opts["media_root"] = os.path.join(base_dir, opts["media_root"])
        sources.append(Source(name, fmt, sorted(set(files)), opts, root))

    known = _steps()
    steps: list[StepSpec] = []
    raw_steps = raw.get("steps") or []
    if not isinstance(raw_steps, list):
        raise RecipeError("recipe field `steps` must be a list such as `- probe: {}`.")
    for i, st in enumerate(raw_steps):
        where = f"steps[{i}]"
        if isinstance(st, str):
            st = {st: {}}
        if not isinstance(st, dict) or len(st) != 1:
            raise RecipeError(f"recipe field `{where}` must name one step, e.g. `- quality: {{min_side: 32}}`.")
        (sname, params), = st.items()
        if sname not in known:
            raise RecipeError(f"recipe field `{where}` names the unknown step {sname!r}: use one of "
                              f"{', '.join(sorted(known))}.")
        params = params or {}
        if not isinstance(params, dict):
            raise RecipeError(f"recipe field `{where}.{sname}` must be a mapping of parameters.")
        if isinstance(params.get("eval_sets"), list):
            params["eval_sets"] = [{**e, "path": os.path.join(base_dir, e["path"])}
                                   if isinstance(e, dict) and isinstance(e.get("path"), str)
                                   and not os.path.isabs(e["path"]) else e for e in params["eval_sets"]]
        params = {k: (os.path.join(base_dir, v) if (k in PATH_PARAMS or k.endswith("_path")
                                                      or (k in MAYBE_PATH_PARAMS and isinstance(v, str)
                                                          and os.path.exists(os.path.join(base_dir, v))))
                      and isinstance(v, str) and v and not os.path.isabs(v) and "://" not in v else v)
                  for k, v in params.items()}
        sig = _step_params(known[sname])
        allowed = {p for p in sig if p not in ("self", "kw", "name")}
        _check_keys(params, allowed, f"{where}.{sname}")
        for k, v in params.items():
            default = sig[k].default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise RecipeError(f"recipe field `{where}.{sname}.{k}` must be a number >= 0, got {v!r}.")
        try:
            known[sname](**params)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"recipe field `{where}.{sname}` is invalid: {e}.") from e
        steps.append(StepSpec(sname, params))

    output = raw.get("output") or {}
    if isinstance(output, str):
        output = {"path": output}
    if not isinstance(output, dict):
        raise RecipeError("recipe field `output` must be a mapping with `path` and `shards`.")
    _check_keys(output, {"path", "shards"}, "output")
    out_path = out or output.get("path")
    if not out_path:
        raise RecipeError("recipe field `output.path` is missing: name an output folder, or pass --out.")
    if not os.path.isabs(out_path) and out is None:
        out_path = os.path.join(base_dir, out_path)
    shards = dict(output.get("shards") or {})
    _check_keys(shards, {"max_samples", "max_bytes", "shuffle", "prefix"}, "output.shards")
    ms = shards.get("max_samples", 1000)
    if not isinstance(ms, int) or isinstance(ms, bool) or ms < 1:
        raise RecipeError(f"recipe field `output.shards.max_samples` must be an integer >= 1, got {ms!r}.")
    shards["max_samples"] = ms
    shards["max_bytes"] = parse_size(shards.get("max_bytes", "1GiB"), "output.shards.max_bytes")
    shards["shuffle"] = bool(shards.get("shuffle", True))
    prefix = shards.get("prefix", "shard")
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise RecipeError(f"recipe field `output.shards.prefix` must be letters, digits, '_' or '-', got {prefix!r}.")
    shards["prefix"] = prefix
    spark = raw.get("spark") or {}
    if not isinstance(spark, dict):
        raise RecipeError("recipe field `spark` must be a mapping with `master` and/or `conf`.")
    _check_keys(spark, {"master", "conf"}, "spark")
    return Recipe(name=str(raw.get("name", "recipe")), seed=seed, sources=sources, steps=steps,
                  output=os.path.abspath(out_path), shards=shards, spark=spark, raw=raw, base_dir=base_dir)
