"""Recipes: plain YAML data, checked up front so a mistake costs one sentence, not a stack trace."""

from __future__ import annotations

import glob
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any

from reelforge.curation import storage
from reelforge.curation.config import parse_size, read_yaml
from reelforge.curation.errors import RecipeError  # the same class, importable here as before
from reelforge.curation.readers import DEFAULT_PATTERNS, READERS
from reelforge.curation.step import STEPS

# Step modules outside `reelforge.filters` (every module of `reelforge.filters` is imported
# anyway: a new filter is one new file there, registered with @register_step).
STEP_MODULES = ("reelforge.curation.probe", "reelforge.curation.clips", "reelforge.curation.token_count",
                "reelforge.curation.recaption", "reelforge.mixers.modes", "reelforge.mixers.reward",
                "reelforge.mixers.sample", "reelforge.mixers.selection", "reelforge.curation.asr",
                "reelforge.mixers.video_tasks", "reelforge.mixers.asr_interleave", "reelforge.mixers.grounding",
                "reelforge.mixers.synth_ocr")


def step_modules() -> list[str]:
    """Every module that may register a step: the list above and all of `reelforge.filters`."""
    import reelforge.filters

    found = [m.name for m in pkgutil.walk_packages(reelforge.filters.__path__, "reelforge.filters.")]
    return [*STEP_MODULES, *sorted(found)]


def _steps() -> dict[str, type]:
    """The registry (`curation.step.STEPS`) after importing every step module: name -> class."""
    for name in step_modules():
        importlib.import_module(name)
    return dict(STEPS)


PATH_PARAMS = ("tokenizer", "checkpoint", "model_config")
MAYBE_PATH_PARAMS = ("pretrained", "model")  # a tag or name, or a path relative to the recipe


@dataclass
class Source:
    name: str
    format: str
    paths: list[str]
    options: dict = field(default_factory=dict)
    root: str = ""
    remote: dict = field(default_factory=dict)  # an s3:// (fsspec) source: {"root": URL, "max_mirror_bytes": N}


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
    digests: dict | None = field(default=None, repr=False)  # source file -> sha256 of its content
    keep_work: bool = True  # output.keep_work: false removes <output>/_work once the run is complete
    work: str = ""  # output.work: the local staging folder of a run whose output is a URL (jobs.remote)

    def source_digests(self, cache_path: str | None = None, hash_many=None) -> dict[str, str]:
        """sha256 of every source file's content, computed once per Recipe (see content_digests)."""
        if self.digests is None:
            self.digests = content_digests(sorted({p for s in self.sources for p in s.paths}), cache_path, hash_many)
        return self.digests

    def fingerprint(self, upto: int) -> str:
        """Hash of what determines the output of steps[:upto]: the steps, the sources and the
        content of their files (an edit that keeps a file's size and mtime still shows)."""
        digests = self.source_digests()
        files = [(s.name, s.format, s.options, [(p, digests[p]) for p in s.paths]) for s in self.sources]
        body = {"sources": files, "steps": [(s.name, s.params) for s in self.steps[:upto]]}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: str) -> list[int]:
    # ctime too: os.utime can put size and mtime back after an edit, but nothing resets ctime
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def content_digests(paths: list[str], cache_path: str | None = None, hash_many=None) -> dict[str, str]:
    """{path: sha256 of its content}. Digests are cached in `cache_path` (JSON) under the file's
    (size, mtime_ns, ctime_ns, inode, device): an unchanged file is not read again. Files to hash
    go to `hash_many(paths) -> {path: digest}` when given (the job hashes in executors), else
    are hashed here. A missing or corrupt cache is rebuilt; it is written atomically."""
    cache: dict = {}
    if cache_path and os.path.exists(cache_path):
        try:
            with open(cache_path) as f:
                loaded = json.load(f)
            cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            cache = {}
    keys = {p: _stat_key(p) for p in paths}
    out: dict[str, str] = {}
    todo = []
    for p in paths:
        hit = cache.get(p)
        if isinstance(hit, dict) and hit.get("key") == keys[p] and isinstance(hit.get("sha256"), str):
            out[p] = hit["sha256"]
        else:
            todo.append(p)
    if todo:
        new = hash_many(todo) if hash_many is not None else {p: sha256_file(p) for p in todo}
        out.update({p: new[p] for p in todo})
        if cache_path:
            fresh = {p: {"key": keys[p], "sha256": out[p]} for p in paths}
            tmp = f"{cache_path}.tmp-{os.getpid()}"
            try:
                with open(tmp, "w") as f:
                    json.dump(fresh, f)
                os.replace(tmp, cache_path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    return out


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _folders(value, base: str, where: str) -> list[str]:
    """A recipe list of existing folders, made absolute against the recipe's folder."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"recipe field `{where}` must be a list of folders media may be read from, got {value!r}.")
    out = []
    for j, v in enumerate(value):
        p = os.path.join(base, v) if isinstance(v, str) and v else None
        if p is None or not os.path.isdir(p):
            raise RecipeError(f"recipe field `{where}[{j}]` must be an existing folder, got {v!r}.")
        out.append(os.path.abspath(p))
    return out


def _expand(path: str, fmt: str, base: str, where: str) -> tuple[list[str], str]:
    if storage.is_url(path):  # listed here (names only), mirrored before ingest by jobs.remote
        from reelforge.jobs.remote_paths import expand_url

        return expand_url(path, fmt, where)
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


def _step_params(cls: type) -> dict[str, inspect.Parameter]:
    """Parameters a step accepts: its own and those its base classes take through **kw."""
    params: dict[str, inspect.Parameter] = {}
    for c in reversed(cls.__mro__):
        if "__init__" in vars(c) and c is not object:
            params.update(inspect.signature(c.__init__).parameters)
    return params


def _check_output_apart(out: str, sources: list[Source], scanned: list[tuple[str, str]]) -> None:
    """The output folder must not hold a source's files, nor lie where a source searches:
    a run would delete or re-read its own input."""
    if storage.is_url(out):
        from reelforge.jobs.remote_paths import check_url_output_apart

        return check_url_output_apart(out, sources)
    canon = os.path.realpath(out)
    for i, s in enumerate(sources):
        for p in s.paths:
            if storage.is_url(p):
                continue
            if _inside(os.path.realpath(p), canon):
                raise RecipeError(f"output folder {out} holds {p}, an input of source `sources[{i}]` "
                                  f"({s.name}): pass --out with a folder outside the corpus.")
    for root, where in scanned:
        if storage.is_url(root):
            continue
        if _inside(canon, os.path.realpath(root)):
            raise RecipeError(f"output folder {out} is inside {root}, which recipe field `{where}` searches "
                              "for input: pass --out with a folder outside it.")


def load_recipe(path: str, out: str | None = None) -> Recipe:
    if not os.path.exists(path):
        raise RecipeError(f"recipe file {path} does not exist: pass the path of a recipe YAML.")
    return parse_recipe(read_yaml(path), os.path.dirname(os.path.abspath(path)), out)


def parse_recipe(raw: Any, base_dir: str, out: str | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping with `sources`, `steps` and `output`.")
    _check_keys(raw, {"name", "seed", "sources", "steps", "output", "spark", "roots"}, "recipe")
    top_roots = _folders(raw["roots"], base_dir, "roots") if raw.get("roots") is not None else []
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"recipe field `seed` must be an integer, got {seed!r}.")
    srcs = raw.get("sources")
    if not isinstance(srcs, list) or not srcs:
        raise RecipeError("recipe field `sources` must be a non-empty list of sources "
                          "(each with name, format and path).")
    sources: list[Source] = []
    names: set[str] = set()
    scanned: list[tuple[str, str]] = []  # (folder a source searches recursively, its field)
    for i, s in enumerate(srcs):
        where = f"sources[{i}]"
        if not isinstance(s, dict):
            raise RecipeError(f"recipe field `{where}` must be a mapping with name, format and path.")
        _check_keys(s, {"name", "format", "path", "options", "max_mirror_bytes"}, where)
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
        if len({storage.is_url(p) for p in plist}) > 1:
            raise RecipeError(f"recipe field `{where}.path` mixes URLs and local paths: make it two sources.")
        for p in plist:
            found, root = _expand(p, fmt, base_dir, f"{where}.path")
            files += found
            if storage.is_url(p):
                scanned.append((root, f"{where}.path"))
                continue
            full = p if os.path.isabs(p) else os.path.join(base_dir, p)
            if os.path.isdir(full) or "**" in p:
                scanned.append((root, f"{where}.path"))
        if not isinstance(s.get("options") or {}, dict):
            raise RecipeError(f"recipe field `{where}.options` must be a mapping.")
        opts = dict(s.get("options") or {})
        if "media_root" in opts:
            mr = opts["media_root"]
            if not isinstance(mr, str) or not mr:
                raise RecipeError(f"recipe field `{where}.options.media_root` must be a folder path, got {mr!r}.")
            if not os.path.isabs(mr):
                opts["media_root"] = os.path.join(base_dir, mr)
        own_roots = _folders(opts["roots"], base_dir, f"{where}.options.roots") if opts.get("roots") is not None else []
        if top_roots or own_roots:
            opts["roots"] = list(dict.fromkeys(top_roots + own_roots))
        else:
            opts.pop("roots", None)
        remote = {}
        if storage.is_url(plist[0]):
            from reelforge.jobs.remote_paths import common_root

            if "media_root" in opts:
                raise RecipeError(f"recipe field `{where}.options.media_root` is not read for a source on object "
                                  "storage: media are read relative to the source's root prefix, which is mirrored.")
            cap = s.get("max_mirror_bytes")
            remote = {"root": common_root([r for r, w in scanned if w == f"{where}.path"]),
                      "max_mirror_bytes": None if cap is None else parse_size(cap, f"{where}.max_mirror_bytes")}
            root = remote["root"]
        elif s.get("max_mirror_bytes") is not None:
            raise RecipeError(f"recipe field `{where}.max_mirror_bytes` applies to a source on object storage "
                              "(an s3:// path): remove it.")
        sources.append(Source(name, fmt, sorted(set(files)), opts, root, remote))

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
    _check_keys(output, {"path", "shards", "keep_work", "work"}, "output")
    keep_work = output.get("keep_work", True)
    if not isinstance(keep_work, bool):
        raise RecipeError(f"recipe field `output.keep_work` must be true or false, got {keep_work!r}.")
    out_path = out or output.get("path")
    if not out_path:
        raise RecipeError("recipe field `output.path` is missing: name an output folder, or pass --out.")
    if not isinstance(out_path, str):
        raise RecipeError(f"recipe field `output.path` must be a folder or a URL, got {out_path!r}.")
    if storage.is_url(out_path):  # a bucket prefix: the run stages locally, then publishes (jobs.remote)
        out_path = storage.normalize(out_path)
    elif not os.path.isabs(out_path) and out is None:
        out_path = os.path.join(base_dir, out_path)
    if not storage.is_url(out_path):
        out_path = os.path.abspath(out_path)
    work = output.get("work") or ""
    if not isinstance(work, str) or storage.is_url(work):
        raise RecipeError(f"recipe field `output.work` must be a local folder, got {work!r}.")
    if work:
        work = os.path.abspath(os.path.join(base_dir, work))
    _check_output_apart(out_path, sources, scanned)
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
                  output=out_path, shards=shards, spark=spark, raw=raw, base_dir=base_dir,
                  keep_work=keep_work, work=work)
