"""The emitter: a plan -> each stage's shards, exactly to plan, globally shuffled, deterministic.

Plain Python, streaming, no Spark: the only thing in memory is the selection itself
(row number, repeat, entry: ~20 bytes a sample) and the few columns of the per-sample
table it needs; sample bytes are read one at a time from the run's shards and written
once. Why not Spark: a global shuffle of a few million small index rows costs a Spark
job and a sort, while a seeded permutation of integers costs milliseconds; the expensive
part, copying bytes, is a sequential loop per output shard and runs in `workers` processes
in parallel (each shard is written by exactly one of them, so the bytes never depend on
how many there are).

Each sample is copied as the byte span of its members in the run's shard (offset and
length from the per-sample table): those bytes are exactly what the tar writer
(`curation.shards.ShardFile`, itself byte-identical to `webdataset.TarWriter`) writes for
the same members, so copying them is writing them, without re-encoding. A repeat (an
entry drawn for more than one epoch) needs a distinct key in the stage: its copies r >= 1
get the key `ID_rR`, are re-written member by member through `ShardFile.write`, and the
media member names inside their `.json` follow the new key (the `id` stays the sample's).

Object storage: the plan's run (`stats`) and the output may be URLs (s3://...). A run shard on a
URL is read by byte range, one ranged GET per sample span, or fetched whole once (to a local
temporary folder) when the stage uses at least half of its bytes. A stage written to a URL is
built in a local staging folder (`storage.staging_dir(url, "mix")`), byte for byte as it would be
in a local folder, then published object by object with `storage.put_file` (temporary object,
copy, delete): the tars, then `.nv-meta/`, then `index.json` last; objects of an earlier
emission that the new one does not have, and `.tmp-` leftovers of a crashed one, are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections import OrderedDict
from typing import Callable

import numpy as np
import pyarrow as pa

from reelforge.curation import storage
from reelforge.curation.energon_meta import META_DIR, write_energon_meta
from reelforge.curation.errors import RecipeError
from reelforge.curation.shards import ShardFile
from reelforge.mixers.planner import PLAN_COLUMNS, PLAN_VERSION, load_stats, select, selection_digest
from reelforge.mixers.spec import Entry, Stage
from reelforge.mixers.tarspan import split_members

EMIT_COLUMNS = [*PLAN_COLUMNS, "shard", "offset", "length", "text_tokens", "visual_tokens"]


class SpanShard(ShardFile):
    """A ShardFile that can also take a sample's ready-made tar bytes (its members' headers and data)."""

    def write_span(self, span: bytes, source: str) -> None:
        stream = self.tar.fileobj  # tarfile's stream; flush what it buffered, then write straight through
        if stream.buf:
            self.f.write(stream.buf)
            stream.buf = b""
        self.f.write(span)
        stream.pos += len(span)
        self.tar.offset += len(span)
        self.count += 1
        self.sources[source] += 1


def repeat_key(sample_id: str, r: int) -> str:
    return sample_id if r == 0 else f"{sample_id}_r{r}"


def rekeyed(span: bytes, sample_id: str, r: int) -> dict:
    """The members of a span under the repeat's key (the `.json`'s media member names follow it)."""
    key = repeat_key(sample_id, r)
    obj: dict = {"__key__": key}
    old = f'"member":"{sample_id}.'.encode()
    new = f'"member":"{key}.'.encode()
    for name, data in split_members(span):
        ext = name[len(sample_id) + 1:]
        obj[ext] = data.replace(old, new) if ext == "json" else data
    return obj


def _stage_of(d: dict) -> Stage:
    entries = [Entry.from_selector(e["name"], e["selector"]) for e in d["entries"]]
    return Stage(name=d["name"], unit=d["unit"], target=d["target"], max_epochs=d["max_epochs"],
                 temperature=d["temperature"], entries=entries, shards=d["shards"], note=d.get("note", ""))


def load_plan(path: str) -> dict:
    """A plan JSON from a path or a URL."""
    if not storage.exists(path):
        raise RecipeError(f"plan file {storage.redact(path)} does not exist: make one with "
                          "`reelforge plan MIXTURE.yaml --stats RUN`.")
    try:
        plan = json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise RecipeError(f"plan file {path} is not JSON ({e}): make it again with `reelforge plan`.") from e
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION or "stages" not in plan:
        raise RecipeError(f"plan file {path} is not a version-{PLAN_VERSION} plan: "
                          "make it again with `reelforge plan`.")
    return plan


def stage_seed(seed: int, stage: str) -> list[int]:
    return [seed & 0xFFFFFFFF, zlib.crc32(stage.encode()), 0x5EED]


def _shard_bounds(lengths: np.ndarray, max_samples: int, max_bytes: int) -> np.ndarray:
    """Start positions of shards: a new one every max_samples samples and whenever the running
    bytes cross a multiple of max_bytes (the rule of curation.shards)."""
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    bw = before // max_bytes
    cw = np.arange(n) // max_samples
    change = np.ones(n, dtype=bool)
    change[1:] = (bw[1:] != bw[:-1]) | (cw[1:] != cw[:-1])
    return np.flatnonzero(change)


class _Readers:
    """Open run shards, least recently used closed first. On a URL, a shard in `local` (fetched
    whole beforehand) is read from its local copy, any other by one ranged GET per span."""

    def __init__(self, shard_dir: str, keep: int = 64, local: dict[str, str] | None = None):
        self.dir, self.keep = shard_dir, keep
        self.local = local or {}
        self.fds: OrderedDict[str, int] = OrderedDict()

    def read(self, shard: str, offset: int, length: int) -> bytes:
        if storage.is_url(self.dir) and shard not in self.local:
            data = storage.read_bytes(storage.join(self.dir, shard), offset, offset + length)
            if len(data) != length:
                raise RecipeError(f"run shard {shard} is shorter than its statistics say: run the curation job "
                                  "again.")
            return data
        fd = self.fds.get(shard)
        if fd is None:
            fd = os.open(self.local.get(shard) or os.path.join(self.dir, shard), os.O_RDONLY)
            self.fds[shard] = fd
            if len(self.fds) > self.keep:
                os.close(self.fds.popitem(last=False)[1])
        else:
            self.fds.move_to_end(shard)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise RecipeError(f"run shard {shard} is shorter than its statistics say: run the curation job again.")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


# state the worker processes inherit by fork (set just before the pool starts)
_JOB: dict = {}


def _write_shards(shard_ids: list[int]) -> list[dict]:
    j = _JOB
    readers = _Readers(j["run_shards"], local=j.get("local"))
    out = []
    try:
        for s in shard_ids:
            lo, hi = int(j["bounds"][s]), int(j["bounds"][s + 1])
            path = os.path.join(j["out"], j["names"][s])
            sf = SpanShard(path)
            try:
                src_i, rep, shard_i = j["src_i"], j["reps"], j["shard_i"]
                offs, lens, ids, srcs, snames = j["offset"], j["length"], j["ids"], j["sources"], j["shard_names"]
                rows = j["rows"]
                for p in range(lo, hi):
                    row = rows[p]
                    span = readers.read(snames[shard_i[row]], int(offs[row]), int(lens[row]))
                    r = int(rep[p])
                    if r == 0:
                        sf.write_span(span, srcs[src_i[row]])
                    else:
                        sf.write(rekeyed(span, ids[row], r), srcs[src_i[row]])
                out.append(sf.close())
            except BaseException:
                sf.abort()
                raise
    finally:
        readers.close()
    return out


class _RunShards:
    """The run's shards folder (a path or a URL) and, for a URL, the shards fetched whole into a
    local temporary folder (kept for the later stages of the same emission)."""

    WHOLE = 0.5  # fetch a shard whole when a stage reads at least this share of its bytes

    def __init__(self, shard_dir: str, sizes: dict[str, int]):
        self.dir, self.sizes = shard_dir, sizes
        self.local: dict[str, str] = {}
        self.tmp: str | None = None

    def prepare(self, names: list[str], used: np.ndarray) -> dict[str, str]:
        """Fetch the shards whose used bytes (a stage's spans, repeats counted) reach WHOLE of their size."""
        if not storage.is_url(self.dir):
            return {}
        for name, u in zip(names, used.tolist()):
            if name in self.local or u <= 0:
                continue
            url = storage.join(self.dir, name)
            size = self.sizes.get(name)
            if size is None:
                size = self.sizes[name] = storage.size(url)
            if u < self.WHOLE * size:
                continue
            if self.tmp is None:
                self.tmp = tempfile.mkdtemp(prefix="reelforge-mix-run-")
            local = os.path.join(self.tmp, name)
            fs, path = storage.url_fs(url)
            storage.guarded(url, "read", fs.get_file, path, local)
            self.local[name] = local
        return dict(self.local)

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def publish_stage(local_dir: str, url: str, log: Callable[[str], None] = print) -> int:
    """Publish a stage folder built locally at `url`: every file through `storage.put_file` (temporary
    object, copy, delete), the tars first, `.nv-meta/` next, `index.json` last; then the objects of an
    earlier emission the new one lacks, and `.tmp-` leftovers, are removed. Returns the files published."""
    storage.remove_temps(url)
    before = {rel for rel, _ in storage.walk_files(url)}
    files = sorted(rel for rel, _ in storage.walk_files(local_dir))
    order = ([f for f in files if f.endswith(".tar") and "/" not in f]
             + [f for f in files if f.startswith(META_DIR + "/")])
    order += [f for f in files if f not in set(order) and f != "index.json"]
    if "index.json" in files:
        order.append("index.json")
    from concurrent.futures import ThreadPoolExecutor

    tars = [f for f in order if f.endswith(".tar") and "/" not in f]
    with ThreadPoolExecutor(max(1, min(8, len(tars)))) as pool:  # the tars in parallel, then the rest in order
        list(pool.map(lambda rel: storage.put_file(os.path.join(local_dir, rel), storage.join(url, rel)), tars))
    for rel in order[len(tars):]:
        storage.put_file(os.path.join(local_dir, rel), storage.join(url, rel))
    for rel in sorted(before - set(files)):
        storage.remove(storage.join(url, rel))
    storage.remove_temps(url)
    return len(files)


def emit_stage(plan: dict, st: dict, table: pa.Table, out_dir: str, seed: int, workers: int = 1,
               log: Callable[[str], None] = print, run_shards: _RunShards | None = None) -> dict:
    stage = _stage_of(st)
    rows_l, reps_l, ent_l = [], [], []
    for j, (e, pe) in enumerate(zip(stage.entries, st["entries"])):
        rows, reps = select(table, stage, e, pe["full_epochs"], pe["remainder_units"], plan["seed"], plan["stats"],
                            allow_over=not pe["capped"])
        if len(rows) != pe["samples"] or selection_digest(table, rows, reps) != pe["selection_sha256"]:
            raise RecipeError(f"plan stage {stage.name!r}, entry {e.name!r}: the statistics of {plan['stats']} no "
                              "longer give the planned samples (the run changed): make the plan again.")
        rows_l.append(rows)
        reps_l.append(reps)
        ent_l.append(np.full(len(rows), j, dtype=np.int16))
    rows = np.concatenate(rows_l) if rows_l else np.zeros(0, np.int64)
    reps = np.concatenate(reps_l) if reps_l else np.zeros(0, np.int32)
    ents = np.concatenate(ent_l) if ent_l else np.zeros(0, np.int16)
    perm = np.random.default_rng(stage_seed(seed, stage.name)).permutation(len(rows))
    rows, reps, ents = rows[perm], reps[perm], ents[perm]

    # the columns the copy loop needs, as plain arrays
    shard_col = table["shard"].dictionary_encode().combine_chunks()
    src_col = table["source"].dictionary_encode().combine_chunks()
    length = table["length"].to_numpy(zero_copy_only=False)
    tokens = np.nan_to_num(table["tokens"].to_numpy(zero_copy_only=False).astype(float)).astype(np.int64)
    sh = stage.shards
    bounds = _shard_bounds(length[rows], sh["max_samples"], sh["max_bytes"])
    n_shards = len(bounds)
    width = max(6, len(str(n_shards)))
    names = [f"{sh['prefix']}-{i:0{width}d}.tar" for i in range(n_shards)]
    to_url = storage.is_url(out_dir)
    # a stage for a URL is built in a local staging folder, then published object by object
    sdir = os.path.join(storage.staging_dir(out_dir, "mix") if to_url else out_dir, stage.name)
    if os.path.isdir(sdir):
        shutil.rmtree(sdir)  # a stage is rebuilt whole: a re-run never mixes two emissions
    os.makedirs(sdir)
    need_ids = bool((reps > 0).any())
    run_shards = run_shards or _RunShards(storage.join(plan["stats"], "shards"), {})
    shard_i = shard_col.indices.to_numpy(zero_copy_only=False)
    used = np.bincount(shard_i[rows], weights=length[rows], minlength=len(shard_col.dictionary)) if len(rows) \
        else np.zeros(len(shard_col.dictionary))
    local = run_shards.prepare(shard_col.dictionary.to_pylist(), used)
    _JOB.clear()
    _JOB.update(run_shards=run_shards.dir, local=local, out=sdir, names=names,
                bounds=np.append(bounds, len(rows)), rows=rows, reps=reps,
                src_i=src_col.indices.to_numpy(zero_copy_only=False), sources=src_col.dictionary.to_pylist(),
                shard_i=shard_i,
                shard_names=shard_col.dictionary.to_pylist(), offset=table["offset"].to_numpy(zero_copy_only=False),
                length=length, ids=table["id"].to_pylist() if need_ids else None)
    jobs = list(range(n_shards))
    if workers > 1 and n_shards > 1:
        import multiprocessing as mp

        parts = [jobs[i::workers] for i in range(workers)]
        with mp.get_context("fork").Pool(min(workers, n_shards)) as pool:
            stats = [s for part in pool.map(_write_shards, parts) for s in part]
        stats.sort(key=lambda s: s["shard"])
    else:
        stats = _write_shards(jobs)
    _JOB.clear()

    # the index: per shard and per entry, tokens counted from the same table the plan used
    shard_of = np.repeat(np.arange(n_shards), np.diff(np.append(bounds, len(rows))))
    tok_rows = tokens[rows]
    for i, s in enumerate(stats):
        sel = shard_of == i
        s["entries"] = {stage.entries[k].name: int(c) for k, c in
                        enumerate(np.bincount(ents[sel], minlength=len(stage.entries))) if c}
        s["tokens"] = int(tok_rows[sel].sum())
    entries = {}
    for j, (e, pe) in enumerate(zip(stage.entries, st["entries"])):
        sel = ents == j
        tok = int(tok_rows[sel].sum())
        units = int(sel.sum()) if stage.unit == "samples" else tok
        entries[e.name] = {"samples": int(sel.sum()), "tokens": tok, "planned_tokens": pe["tokens"],
                           "planned_samples": pe["samples"],
                           "epochs": round(units / pe["available_units"], 6) if pe["available_units"] else 0.0,
                           "max_epochs": pe["max_epochs"],
                           "max_repeats": int(reps[sel].max()) + 1 if sel.any() else 0}
    by_source: dict[str, dict] = {}
    src_names = src_col.dictionary.to_pylist()
    src_rows = src_col.indices.to_numpy(zero_copy_only=False)[rows]
    for k, name in enumerate(src_names):
        sel = src_rows == k
        if sel.any():
            by_source[name] = {"samples": int(sel.sum()), "tokens": int(tok_rows[sel].sum())}
    index = {"stage": stage.name, "plan_mixture": plan["mixture"], "plan_seed": plan["seed"], "seed": seed,
             "stats": plan["stats"], "unit": stage.unit, "target": stage.target, "samples": int(len(rows)),
             "tokens": int(tok_rows.sum()), "bytes": sum(s["bytes"] for s in stats), "entries": entries,
             "sources": by_source, "shards": stats}
    write_energon_meta(sdir, names, workers=workers, log=log)  # .nv-meta/: Energon reads the stage folder
    with open(os.path.join(sdir, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    where = sdir
    if to_url:
        where = storage.redact(storage.join(out_dir, stage.name))
        publish_stage(sdir, storage.join(out_dir, stage.name), log)
        shutil.rmtree(sdir, ignore_errors=True)
    log(f"stage {stage.name}: {len(rows)} samples, {index['tokens']} tokens, {n_shards} shards in {where}")
    return index


def check_run_shards(shard_dir: str, verify: bool = False) -> int:
    """The run's shards against its index.json: a shard whose size differs from its record, or (with
    `verify`) whose sha256 does, is one RecipeError naming it. Returns how many were hashed."""
    import hashlib

    recs = _run_index(shard_dir).get("shards", [])
    hashed = 0
    url = storage.is_url(shard_dir)
    sizes = {} if not url else {rel: n for rel, n in storage.walk_files(shard_dir) if "/" not in rel}
    for rec in recs:
        path = storage.join(shard_dir, rec["shard"])
        if url:
            if rec["shard"] not in sizes:
                continue
            size = sizes[rec["shard"]]
        else:
            if not os.path.exists(path):
                continue  # a shard the plan never reads may be gone; one it reads fails in the copy
            size = os.path.getsize(path)
        if size == rec.get("bytes", size) and not (verify and rec.get("sha256")):
            continue
        h = hashlib.sha256()
        with storage.open_file(path, "rb") as f:  # streamed, from a URL too
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        hashed += 1
        if size != rec.get("bytes", size) or h.hexdigest() != rec.get("sha256", h.hexdigest()):
            raise RecipeError(f"run shard {storage.redact(path)} is not the shard the run wrote ({size} bytes, sha256 "
                              f"{h.hexdigest()[:16]}...; its index.json says {rec.get('bytes')} bytes, sha256 "
                              f"{str(rec.get('sha256'))[:16]}...): restore it from the run, or run the curation "
                              "job again.")
    return hashed


def _run_index(shard_dir: str) -> dict:
    """The run's shards/index.json ({} when it has none)."""
    p = storage.join(shard_dir, "index.json")
    try:
        data = storage.read_bytes(p)
    except FileNotFoundError:
        return {}
    try:
        return json.loads(data)
    except ValueError as e:
        raise RecipeError(f"{storage.redact(p)} is not JSON ({e}): run the curation job again.") from None


def emit_plan(plan: dict, out_dir: str, seed: int | None = None, stages: list[str] | None = None,
              workers: int = 1, log: Callable[[str], None] = print, verify: bool = False) -> dict[str, dict]:
    """Write the shards of each stage (or only `stages`) under out_dir/<stage>/; returns their indexes.
    The run's shards are checked against its index.json first (check_run_shards; sha256 with `verify`)."""
    names = [s["name"] for s in plan["stages"]]
    for s in stages or []:
        if s not in names:
            raise RecipeError(f"--stage {s!r} is not in the plan: use one of {', '.join(names)}.")
    run_shards = storage.join(plan["stats"], "shards")
    if not storage.isdir(run_shards):
        raise RecipeError(f"the plan's run {plan['stats']} has no shards folder: emit on a machine that sees the "
                          "run, or plan again with --stats pointing at it.")
    check_run_shards(run_shards, verify)
    table = load_stats(plan["stats"], EMIT_COLUMNS)
    if table.num_rows != plan["stats_samples"]:
        raise RecipeError(f"the run {plan['stats']} now has {table.num_rows} samples, the plan was made for "
                          f"{plan['stats_samples']}: make the plan again.")
    seed = plan["seed"] if seed is None else seed
    if storage.is_url(out_dir):
        out_dir = storage.normalize(out_dir)
    else:
        os.makedirs(out_dir, exist_ok=True)
    sizes = {r["shard"]: int(r["bytes"]) for r in _run_index(run_shards).get("shards", []) if r.get("bytes")}
    source = _RunShards(run_shards, sizes)
    try:
        return {st["name"]: emit_stage(plan, st, table, out_dir, seed, workers, log, source)
                for st in plan["stages"] if not stages or st["name"] in stages}
    finally:
        source.close()


