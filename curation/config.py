"""Reading what users write (recipes, stages, mixtures): YAML files and sizes, with mistakes
as one-sentence `RecipeError`s. Layer 1: every package may use it, it imports only errors."""

from __future__ import annotations

import re
from typing import Any

import yaml

from reelforge.curation.errors import RecipeError

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


def read_yaml(path: str, what: str = "recipe") -> Any:
    """A YAML file's data; a syntax error costs one sentence with its line."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{what} {path} is not valid YAML{line}: {getattr(e, 'problem', e)}.") from e


__all__ = ["parse_size", "read_yaml"]
