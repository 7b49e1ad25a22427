"""Stage configuration: one YAML per stage, checked up front so a mistake costs one sentence.

A stage is data (which shards, blended how), a model (where the vision tower, LLM and
tokenizer live, or a reelforge checkpoint to start from), what trains (`trainable`), the
objective (`lm`, `vit_contrastive`, `mpo`, `grpo`), the optimiser and schedule, and the
DeepSpeed settings. Stages 0-3, SFT, MPO and GRPO are all this one format (see
`training/stages/*.yaml`); nothing forks the code per stage.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from reelforge.curation.errors import RecipeError

OBJECTIVES = ("lm", "vit_contrastive", "mpo", "grpo")
PARTS = ("vision", "projector", "llm")
SCHEDULES = ("cosine", "constant", "linear_to_zero")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "objective": "lm",
    "seed": 0,
    "steps": 100,
    "grad_accum": 1,
    "trainable": list(PARTS),
    "model": {"vision": None, "llm": None, "tokenizer": None, "init": None, "text_tower": None,
              "projector_hidden": None, "attn_implementation": "sdpa", "vision_rope": "2d"},
    "data": {"sources": [], "max_len": 2048, "batch_size": 1, "num_workers": 1, "blend": "tokens",
             "pack": True, "kinds": None, "epochs": None, "split": "auto", "visual": {}, "max_text_len": 64,
             "prefetch": 4, "positions": "1d", "verify": False},
    "optim": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "warmup_steps": 0,
              "schedule": "cosine", "min_lr_ratio": 0.1, "grad_clip": 1.0},
    "loss": {
        "mpo": {"beta": 0.1, "weights": {"dpo": 0.8, "bco": 0.2, "sft": 1.0}, "bco_delta": "running"},
        "grpo": {"group_size": 4, "max_new_tokens": 32, "temperature": 1.0, "top_k": 0, "kl_beta": 0.04,
                 "clip_eps": 0.2, "rewards": {"correct": 1.0, "consistency": 0.5}},
        "siglip": {"init_scale": 10.0, "init_bias": -10.0},
    },
    "deepspeed": {"zero_stage": 2, "precision": "auto", "offload_optimizer": False, "extra": {}},
    "output": {"dir": None, "save_every": 0, "log_every": 1, "save_initial": False},
    "report": {"plan": None, "plan_stage": None, "targets": None},
}


@dataclass
class StageConfig:
    """A checked stage; `raw` is the merged dict, paths already resolved against the YAML's folder."""

    raw: dict[str, Any]
    path: str | None = None
    base_dir: str = "."
    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, item: str) -> Any:
        raw = self.__dict__.get("raw")
        if raw is not None and item in raw:
            return raw[item]
        raise AttributeError(item)


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base:
            known = ", ".join(sorted(base))
            raise RecipeError(f"stage field `{where}{k}` is unknown; use one of: {known}.")
        if isinstance(base[k], dict) and k not in ("visual", "extra", "targets", "weights", "rewards"):
            if not isinstance(v, dict):
                raise RecipeError(f"stage field `{where}{k}` must be a mapping, got {v!r}.")
            out[k] = _merge(base[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def _num(raw: dict, dotted: str, lo: float | None = None, integer: bool = False, allow_none: bool = False) -> None:
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[k]
    v = node[keys[-1]]
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or float(v).is_integer())
    if not ok or (lo is not None and v < lo):
        kind = "an integer" if integer else "a number"
        bound = f" >= {lo:g}" if lo is not None else ""
        raise RecipeError(f"stage field `{dotted}` must be {kind}{bound}, got {v!r}.")
    if integer:
        node[keys[-1]] = int(v)


def _path(base: str, p: str | None) -> str | None:
    if p is None:
        return None
    p = os.path.expanduser(str(p))
    return p if os.path.isabs(p) or "://" in p else os.path.normpath(os.path.join(base, p))


def stage_from_dict(d: dict[str, Any], base_dir: str = ".", path: str | None = None) -> StageConfig:
    """Merge `d` over the defaults, check every field, resolve paths against `base_dir`."""
    if not isinstance(d, dict):
        raise RecipeError("a stage file must be a YAML mapping (name:, objective:, model:, data:, ...).")
    raw = _merge(DEFAULTS, d, "")
    if raw["objective"] not in OBJECTIVES:
        raise RecipeError(f"stage field `objective` must be one of {', '.join(OBJECTIVES)}, got {raw['objective']!r}.")
    tr = raw["trainable"]
    if isinstance(tr, str):
        tr = [tr]
    if not isinstance(tr, list) or not tr or any(t not in PARTS for t in tr):
        raise RecipeError(f"stage field `trainable` must be a list drawn from {list(PARTS)}, got {raw['trainable']!r}.")
    raw["trainable"] = tr
    for k in ("steps", "grad_accum", "seed"):
        _num(raw, k, 0 if k == "seed" else 1, integer=True)
    for k in ("max_len", "batch_size", "max_text_len"):
        _num(raw, f"data.{k}", 1, integer=True)
    _num(raw, "data.num_workers", 0, integer=True)
    _num(raw, "data.prefetch", 1, integer=True)
    _num(raw, "data.epochs", 1, integer=True, allow_none=True)
    for k in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "eps"):
        _num(raw, f"optim.{k}", 0, integer=(k == "warmup_steps"))
    if raw["optim"]["schedule"] not in SCHEDULES:
        raise RecipeError(f"stage field `optim.schedule` must be one of {', '.join(SCHEDULES)}, "
                          f"got {raw['optim']['schedule']!r}.")
    if raw["data"]["blend"] not in ("tokens", "samples"):
        raise RecipeError(f"stage field `data.blend` must be tokens or samples, got {raw['data']['blend']!r}.")
    if raw["data"]["positions"] not in ("1d", "mrope"):
        raise RecipeError(f"stage field `data.positions` must be 1d or mrope, got {raw['data']['positions']!r}.")
    if not isinstance(raw["data"]["verify"], bool):
        raise RecipeError(f"stage field `data.verify` must be true or false (check every shard's sha256 against "
                          f"its index.json before training), got {raw['data']['verify']!r}.")
    if raw["data"]["split"] not in ("auto", "shards", "samples"):
        raise RecipeError(f"stage field `data.split` must be auto, shards or samples, got {raw['data']['split']!r}.")
    if raw["deepspeed"]["zero_stage"] not in (0, 1, 2, 3):
        raise RecipeError(f"stage field `deepspeed.zero_stage` must be 0, 1, 2 or 3, "
                          f"got {raw['deepspeed']['zero_stage']!r}.")
    if raw["deepspeed"]["precision"] not in ("auto", "bf16", "fp32"):
        raise RecipeError(f"stage field `deepspeed.precision` must be auto, bf16 or fp32, "
                          f"got {raw['deepspeed']['precision']!r}.")
    _num(raw, "output.save_every", 0, integer=True)
    _num(raw, "output.log_every", 1, integer=True)
    for k in ("beta",):
        _num(raw, f"loss.mpo.{k}", 0)
    delta = raw["loss"]["mpo"]["bco_delta"]
    if delta != "running" and not (isinstance(delta, (int, float)) and not isinstance(delta, bool)):
        raise RecipeError(f"stage field `loss.mpo.bco_delta` must be `running` or a number, got {delta!r}.")
    for k in ("group_size", "max_new_tokens"):
        _num(raw, f"loss.grpo.{k}", 1, integer=True)
    if raw["objective"] == "grpo" and raw["loss"]["grpo"]["group_size"] < 2:
        raise RecipeError("stage field `loss.grpo.group_size` must be >= 2: advantages are normalised in a group.")

    # sources
    sources = raw["data"]["sources"]
    if not isinstance(sources, list) or not sources:
        raise RecipeError("stage field `data.sources` must list at least one shard set: "
                          "- {name: demo, path: out/shards, weight: 1}.")
    seen = set()
    for i, s in enumerate(sources):
        if isinstance(s, str):
            s = {"path": s}
        if not isinstance(s, dict) or "path" not in s:
            raise RecipeError(f"stage field `data.sources[{i}]` needs a `path` to a folder (or glob) of shards.")
        unknown = set(s) - {"name", "path", "weight", "caption"}
        if unknown:
            raise RecipeError(f"stage field `data.sources[{i}].{sorted(unknown)[0]}` is unknown; "
                              "use name, path, weight, caption.")
        cap = s.get("caption", "original")
        if not isinstance(cap, str) or not (cap in ("original", "latest", "random")
                                            or (cap.startswith("model:") and len(cap) > len("model:"))):
            raise RecipeError(f"stage field `data.sources[{i}].caption` must be original, latest, random or "
                              f"model:NAME (a recaptioning model's name), got {cap!r}.")
        s = {"name": s.get("name") or f"set{i}", "path": s["path"], "weight": s.get("weight", 1.0), "caption": cap}
        w = s["weight"]
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
            raise RecipeError(f"stage field `data.sources[{i}].weight` must be a number > 0, got {w!r}.")
        if s["name"] in seen:
            raise RecipeError(f"stage field `data.sources[{i}].name` repeats {s['name']!r}; give each set its own.")
        seen.add(s["name"])
        paths = s["path"] if isinstance(s["path"], list) else [s["path"]]
        s["path"] = [_path(base_dir, p) for p in paths]
        sources[i] = s

    m = raw["model"]
    if m["vision_rope"] not in ("2d", "none"):
        raise RecipeError(f"stage field `model.vision_rope` must be 2d (Keye's 2D rotary positions in the vision "
                          f"tower) or none, got {m['vision_rope']!r}.")
    for k in ("vision", "llm", "tokenizer", "init", "text_tower"):
        m[k] = _path(base_dir, m[k])
    if m["init"] is None and (m["vision"] is None or (m["llm"] is None and raw["objective"] != "vit_contrastive")):
        raise RecipeError("stage field `model` needs `vision:` and `llm:` folders (from_pretrained), "
                          "or `init:` a reelforge checkpoint folder.")
    if raw["objective"] == "vit_contrastive" and m["text_tower"] is None:
        raise RecipeError("stage field `model.text_tower` must name a SiglipTextModel folder for the "
                          "vit_contrastive objective (Stage 0).")
    for k in ("vision", "llm", "tokenizer", "init", "text_tower"):
        if m[k] is not None and not os.path.isdir(m[k]):
            raise RecipeError(f"stage field `model.{k}` points at {m[k]}, which is not a folder; "
                              "give a folder written by save_pretrained (or a reelforge checkpoint).")
    out = raw["output"]
    if out["dir"] is None:
        raise RecipeError("stage field `output.dir` is required: where checkpoints, metrics and the report go.")
    out["dir"] = _path(base_dir, out["dir"])
    rep = raw["report"]
    rep["plan"] = _path(base_dir, rep["plan"])
    if rep["targets"] is not None and not isinstance(rep["targets"], dict):
        raise RecipeError("stage field `report.targets` must map source names to planned sample counts.")
    if raw["name"] is None:
        raw["name"] = os.path.splitext(os.path.basename(path))[0] if path else "stage"
    return StageConfig(raw=raw, path=path, base_dir=base_dir)


def load_stage(path: str, overrides: dict[str, Any] | None = None) -> StageConfig:
    """Read a stage YAML (paths relative to its folder); `overrides` is merged over the file."""
    if not os.path.exists(path):
        raise RecipeError(f"stage file {path} does not exist; pass the path of a stage YAML "
                          "(examples ship in training/stages/).")
    with open(path) as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"stage file {path} is not valid YAML: {e}.") from None
    if overrides:
        d = deep_update(d, overrides)
    return stage_from_dict(d, base_dir=os.path.dirname(os.path.abspath(path)), path=path)


def deep_update(d: dict, over: dict) -> dict:
    out = copy.deepcopy(d)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's plain-scalar rules instead of YAML 1.1's:
    `3e-3`, `1e5` and `.5` are floats (1.1 wants a dot and a signed exponent), only true/false (in
    three casings) are booleans (yes/no/on/off stay strings), `010` is ten (no 1.1 octal; `0o10` is
    eight), `0x1F` hexadecimal, null/~/empty null; no 1:20 sexagesimals, no underscores in numbers."""

    def construct_yaml_int(self, node):  # type: ignore[override]
        v = self.construct_scalar(node)
        sign = -1 if v[0] == "-" else 1
        body = v.lstrip("+-")
        if body.startswith("0o"):
            return int(body[2:], 8)
        if body.startswith("0x"):
            return int(body[2:], 16)
        return sign * int(body)

    def construct_yaml_float(self, node):  # type: ignore[override]
        v = self.construct_scalar(node).lower()
        if v.lstrip("+-") == ".inf":
            return float("-inf") if v[0] == "-" else float("inf")
        if v == ".nan":
            return float("nan")
        return float(v)


Yaml12Loader.yaml_implicit_resolvers = {}
for _tag, _regexp, _first in (
        ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
        ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", list("-+.0123456789"))):
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_regexp), _first)
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", Yaml12Loader.construct_yaml_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", Yaml12Loader.construct_yaml_float)


def yaml12(text: str) -> Any:
    """`text` read as YAML under the 1.2 core schema (see Yaml12Loader)."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(s: str) -> dict[str, Any]:
    """`data.max_len=512` -> {"data": {"max_len": 512}}; the value is read as YAML 1.2 (core schema):
    `optim.lr=3e-3` is a float, `data.pack=false` a boolean, `data.kinds=[image_text]` a list."""
    if "=" not in s:
        raise RecipeError(f"--set takes FIELD=VALUE such as steps=10, got {s!r}.")
    key, value = s.split("=", 1)
    node: dict[str, Any] = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    try:
        cur[parts[-1]] = yaml12(value)
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or e
        raise RecipeError(f"--set {key.strip()}: the value {value!r} is not valid YAML ({why}); "
                          "quote a string, e.g. --set name='my stage'.") from None
    return node
