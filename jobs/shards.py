"""The shard writer on Spark: live rows -> WebDataset tars of at most `max_samples` samples and
`max_bytes` bytes, in a seeded order that does not depend on the partitioning (the same bytes
on local[2] and on a cluster). The tar format, a sample's JSON and media members, and the
per-shard stats are `curation/shards.py`; this is the part that needs the whole corpus.

Only key rows are shuffled, never whole rows (issue 14 part 5: moving every text through the
JVM's Arrow conversion and a shuffle, then turning it into a Python string to json-encode it, was
most of the phase). The tasks that read the rows (pyarrow, straight from the step's Parquet files
when `source` names them; else Arrow batches of the DataFrame) encode each live sample once into
its prepared tar bytes (`curation.shards.prepare_sample`), appended to one file per task under
`<out>/.stats/blobs/`, and emit a key row: id, source, order key, estimated bytes, the byte range
of the prepared bytes, the media to read at write time (by path or tar range) and a failure, if
any (~200 bytes a sample, written as zstd Parquet under `.stats/keys/`). The keys are laid out on
the driver up to SMALL_ROWS (a pyarrow sort; each writer task reads its shards' keys from a plan
file under `.stats/plan/`: no shuffle at all), else on the executors (sorted, and shuffled to their
shard's task); a writer task copies each sample's bytes from its range and reads its media in
between. The caller removes `.stats/` once the results are written (jobs/run.py does). The
prepared bytes are not compressed: they live only until their shard is written, and lz4 would
cost ~3 CPU seconds a GB of text, a quarter of the phase (the keys and plans are zstd Parquet).
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import os
import uuid
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reelforge.curation.errors import MediaReadError
from reelforge.curation.schema import ARROW_SCHEMA, SHARD_FIELDS
from reelforge.curation.shards import (
    RAW_FIELDS,
    RESULT_SCHEMA,
    TarStream,
    _save_stats,
    _tar_size,
    complete_sample,
    prepare_sample,
)

_SUMMARY_SCHEMA = pa.schema([("pid", pa.int64()), ("n", pa.int64()), ("bytes", pa.int64())])
_FIRST_SCHEMA = pa.schema([("_order", pa.string()), ("_bw", pa.int64()), ("_cw", pa.int64())])
KEY_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("_order", pa.string()),
                        ("_est", pa.int64()), ("_blob", pa.string()), ("_off", pa.int64()), ("_len", pa.int64()),
                        ("_media", pa.string()), ("_reason", pa.string()), ("_detail", pa.string())])
_KEY_DDL = ", ".join(f"{f.name} {'long' if f.type == pa.int64() else 'string'}" for f in KEY_SCHEMA)
WRITE_COLUMNS = ["_shard", "id", "source", "_blob", "_off", "_len", "_media", "_reason", "_detail"]
_RESULT_DDL = "id string, shard string, status string, reason string, detail string"
ENCODE_COLUMNS = [f.name for f in ARROW_SCHEMA if f.name in SHARD_FIELDS]  # what a sample's bytes come from
READ_BATCH = 2048  # rows per batch read from a step's Parquet file
SMALL_ROWS = 200_000  # up to this many rows, the keys are laid out on the driver


# --- rows -> prepared bytes + key rows -----------------------------------------------------------

def estimates(b: pa.RecordBatch) -> np.ndarray:
    """`curation.shards.estimate_bytes` of every row of b, computed on its columns."""
    n = b.num_rows
    text = np.zeros(n, dtype=np.int64)
    media = np.zeros(n, dtype=np.int64)
    for name in ("text", "chosen", "rejected", "meta"):
        c = b.column(name)
        if c.null_count < n:
            text += pc.fill_null(pc.utf8_length(c), 0).to_numpy(zero_copy_only=False)
    for name, fields, extra in (("messages", ("content",), 32), ("captions", ("text", "prompt", "model"), 64)):
        c = b.column(name)
        if c.null_count < n:
            flat = pc.list_flatten(c)
            per = sum(pc.fill_null(pc.utf8_length(flat.field(f)), 0).to_numpy(zero_copy_only=False) for f in fields)
            np.add.at(text, pc.list_parent_indices(c).to_numpy(), per + extra)
    c = b.column("media")
    if c.null_count < n:
        length = pc.fill_null(pc.list_flatten(c).field("length"), 0).to_numpy(zero_copy_only=False)
        np.add.at(media, pc.list_parent_indices(c).to_numpy(), _tar_size(length))
    return _tar_size(text + 600) + media


def _pylist(a: pa.Array) -> list:
    """`a.to_pylist(maps_as_pydicts="strict")`, structs and lists built field by field from their
    children's lists (pyarrow converts a struct value by value, each field a scalar: ~30 us for a
    probed medium)."""
    t = a.type
    if pa.types.is_struct(t):
        names = [f.name for f in t]
        rows = [dict(zip(names, vals)) for vals in zip(*(_pylist(c) for c in a.flatten()))]
        return rows if a.null_count == 0 else [r if ok else None for r, ok in zip(rows, a.is_valid().to_pylist())]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        values = _pylist(a.flatten())
        out, i = [], 0
        for n in pc.list_value_length(a).to_pylist():
            if n is None:
                out.append(None)
            else:
                out.append(values[i:i + n])
                i += n
        return out
    return a.to_pylist(maps_as_pydicts="strict")


def _py_rows(b: pa.RecordBatch) -> list[dict]:
    """The rows of b as dicts of their non-null columns, RAW_FIELDS left out (column by column:
    a column null in every row costs nothing)."""
    n = b.num_rows
    names = [c for c in ENCODE_COLUMNS if c not in RAW_FIELDS and b.column(c).null_count < n]
    cols = [_pylist(b.column(c)) for c in names]
    return [dict(zip(names, vals)) for vals in zip(*cols)] if names else [{} for _ in range(n)]


class _Encoder:
    """One task's samples -> their prepared bytes, appended to the task's own file, + key rows."""

    def __init__(self, blob_dir: str, seed: int, shuffle: bool):
        self.name = f"{uuid.uuid4().hex}.blob"
        self.path = os.path.join(blob_dir, self.name)
        self.f = None
        self.pos = 0
        self.prefix = f"{seed}:" if shuffle else None

    def _append(self, pieces: list[bytes]) -> tuple[int, int]:
        if self.f is None:
            self.f = open(self.path, "wb", buffering=1 << 20)
        start = self.pos
        for p in pieces:
            self.f.write(p)
            self.pos += len(p)
        return start, self.pos - start

    def encode(self, b: pa.RecordBatch) -> pa.RecordBatch:
        n = b.num_rows
        raws = {k: b.column(k).cast(pa.binary()).to_pylist() for k in RAW_FIELDS if b.column(k).null_count < n}
        recs = []
        for i, row in enumerate(_py_rows(b)):
            try:
                pieces, deferred = prepare_sample(row, {k: v[i] for k, v in raws.items()})
            except MediaReadError as e:
                recs.append((None, None, None, None, e.reason, e.detail))
            except Exception as e:  # noqa: BLE001 - one bad sample never fails a shard
                recs.append((None, None, None, None, "write_error", f"{type(e).__name__}: {e}"[:500]))
            else:
                recs.append((self.name, *self._append(pieces), json.dumps(deferred) if deferred else None, None, None))
        ids = b.column("id").to_pylist()
        order = ids if self.prefix is None else [hashlib.sha256((self.prefix + i).encode()).hexdigest() for i in ids]
        cols = [list(c) for c in zip(*recs)] if recs else [[] for _ in range(6)]
        return pa.RecordBatch.from_arrays([b.column("id"), b.column("source"), pa.array(order, pa.string()),
                                           pa.array(estimates(b), pa.int64()), *cols], schema=KEY_SCHEMA)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _parquet_units(source: str) -> list[tuple[str, int]]:
    """(file, row group) of every Parquet file of a step's output folder."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    files = sorted(ds.dataset(source, format="parquet").files)
    return [(f, rg) for f in files for rg in range(pq.ParquetFile(f).metadata.num_row_groups)]


def _live_batches(path: str, rg: int) -> Iterator[pa.RecordBatch]:
    """The live rows of one row group of a step's Parquet file, in batches of ENCODE_COLUMNS
    (a column the file lacks is null)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    have = set(pf.schema_arrow.names)
    cols = [c for c in ENCODE_COLUMNS if c in have] + (["drop_step"] if "drop_step" in have else [])
    for b in pf.iter_batches(batch_size=READ_BATCH, row_groups=[rg], columns=cols, use_threads=False):
        if "drop_step" in have and b.column("drop_step").null_count < b.num_rows:
            b = b.filter(pc.is_null(b.column("drop_step")))
        yield pa.RecordBatch.from_arrays(
            [b.column(c) if c in have else pa.nulls(b.num_rows, ARROW_SCHEMA.field(c).type) for c in ENCODE_COLUMNS],
            names=ENCODE_COLUMNS)


def _write_keys(batches: Iterable[pa.RecordBatch], keys_path: str) -> int:
    """The key rows of one task as a zstd Parquet file, renamed into place (a task run again
    replaces its file: its keys point to its own prepared bytes); returns their number."""
    import pyarrow.parquet as pq

    t = pa.Table.from_batches(list(batches), schema=KEY_SCHEMA)
    tmp = f"{keys_path}.part-{uuid.uuid4().hex}"
    pq.write_table(t, tmp, compression="zstd")
    os.replace(tmp, keys_path)
    return t.num_rows


def _encode_keys(df, source: str | None, blob_dir: str, keys_dir: str, seed: int, shuffle: bool) -> int:
    """Every live row encoded (prepared bytes under blob_dir, key rows under keys_dir), in one
    Spark job; returns the number of key rows."""
    from pyspark import TaskContext
    from pyspark.sql import functions as F

    def encoded(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        enc = _Encoder(blob_dir, seed, shuffle)
        try:
            for b in batches:
                yield enc.encode(b)
        finally:
            enc.close()

    count = pa.schema([("n", pa.int64())])
    if source is not None:
        units = _parquet_units(source)

        def encode_units(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                for u in b.column(0).to_pylist():
                    n = _write_keys(encoded(_live_batches(*units[u])), os.path.join(keys_dir, f"unit-{u:06d}.parquet"))
                    yield pa.RecordBatch.from_pylist([{"n": n}], schema=count)

        jobs = df.sparkSession.range(len(units), numPartitions=max(1, len(units))).mapInArrow(encode_units, "n long")
    else:
        def encode_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            pid = TaskContext.get().partitionId()
            n = _write_keys(encoded(batches), os.path.join(keys_dir, f"part-{pid:06d}.parquet"))
            yield pa.RecordBatch.from_pylist([{"n": n}], schema=count)

        jobs = df.filter(F.col("drop_step").isNull()).select(*ENCODE_COLUMNS).mapInArrow(encode_rows, "n long")
    return sum(r["n"] for r in jobs.collect())


# --- the layout: which shard each order key falls in --------------------------------------------------

def _opening(est: np.ndarray, i0: int, pos0: int, max_samples: int, max_bytes: int) -> tuple[np.ndarray, list]:
    """The rows (indices into est, in order) that open a new (byte window, count window) pair, the
    first row included, and the pairs they open; i0 and pos0 are the global index and byte offset
    of the first row."""
    n = len(est)
    if n == 0:
        return np.zeros(0, dtype=np.int64), []
    pos = pos0 + np.concatenate([[0], np.cumsum(est)[:-1]])
    bw, cw = pos // max_bytes, (i0 + np.arange(n)) // max_samples
    change = np.ones(n, dtype=bool)
    change[1:] = (bw[1:] != bw[:-1]) | (cw[1:] != cw[:-1])
    at = np.flatnonzero(change)
    return at, [(int(x), int(y)) for x, y in zip(bw[at], cw[at])]


def _names(pairs: list[tuple[int, int]], prefix: str) -> dict[tuple[int, int], str]:
    pairs = sorted(set(pairs))
    width = max(6, len(str(len(pairs))))
    return {p: f"{prefix}-{i:0{width}d}.tar" for i, p in enumerate(pairs)}


def _plan_on_driver(keys_dir: str, plan_dir: str, max_samples: int, max_bytes: int, prefix: str,
                    n_parts: int | None, parallelism: int) -> tuple[dict, int]:
    """The keys read and laid out here (pyarrow): each writer task's key rows, whole shards in
    order, as plan_dir/part-K.parquet; returns (names by pair, number of parts)."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    t = ds.dataset(keys_dir, format="parquet", schema=KEY_SCHEMA).to_table()
    t = t.take(pc.sort_indices(t, sort_keys=[("_order", "ascending"), ("_est", "ascending")]))
    at, pairs = _opening(t.column("_est").to_numpy(), 0, 0, max_samples, max_bytes)
    names = _names(pairs, prefix)
    shard_names = [names[p] for p in pairs]  # pairs increase: the j-th opening opens the j-th name
    shard_of_row = np.repeat(np.arange(len(at)), np.diff(np.append(at, t.num_rows)))
    t = t.append_column("_shard", pa.array(shard_names, pa.string()).take(pa.array(shard_of_row)))
    n_parts = n_parts or max(1, min(len(at), parallelism * 4))
    bounds = [int(at[len(at) * k // n_parts]) if len(at) * k // n_parts < len(at) else t.num_rows
              for k in range(n_parts)] + [t.num_rows]
    os.makedirs(plan_dir, exist_ok=True)
    for k in range(n_parts):
        pq.write_table(t.slice(bounds[k], bounds[k + 1] - bounds[k]).select(WRITE_COLUMNS),
                       os.path.join(plan_dir, f"part-{k:06d}.parquet"), compression="zstd")
    return names, n_parts


def _layout_on_executors(keys, max_samples: int, max_bytes: int, prefix: str):
    """(names by pair, [(first order key, name)], the sorted keys, persisted): sort, one pass of
    per-partition totals, one pass that finds each shard's first key."""
    from pyspark import StorageLevel, TaskContext

    sc = keys.sparkSession.sparkContext
    keyed = keys.select("_order", "_est").sort("_order").persist(StorageLevel.MEMORY_AND_DISK)

    def summary(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pid = TaskContext.get().partitionId()
        n = total = 0
        for b in batches:
            n += b.num_rows
            total += int(pc.sum(b.column("_est")).as_py() or 0)
        yield pa.RecordBatch.from_pylist([{"pid": pid, "n": n, "bytes": total}], schema=_SUMMARY_SCHEMA)

    parts = {r["pid"]: (r["n"], r["bytes"]) for r in
             keyed.mapInArrow(summary, "pid long, n long, bytes long").collect()}
    starts: dict[int, tuple[int, int]] = {}
    idx = off = 0
    for pid in sorted(parts):
        starts[pid] = (idx, off)
        idx += parts[pid][0]
        off += parts[pid][1]
    starts_b = sc.broadcast(starts)

    def first_keys(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """The rows that open a new (byte window, count window) pair, or the partition."""
        t = pa.Table.from_batches(list(batches), schema=pa.schema([("_order", pa.string()), ("_est", pa.int64())]))
        i0, pos0 = starts_b.value.get(TaskContext.get().partitionId(), (0, 0))
        at, pairs = _opening(t.column("_est").to_numpy(), i0, pos0, max_samples, max_bytes)
        orders = t.column("_order").take(pa.array(at, type=pa.int64())).to_pylist()
        yield pa.RecordBatch.from_pylist([{"_order": o, "_bw": p[0], "_cw": p[1]} for o, p in zip(orders, pairs)],
                                         schema=_FIRST_SCHEMA)

    opened = sorted((r["_order"], (r["_bw"], r["_cw"])) for r in
                    keyed.mapInArrow(first_keys, "_order string, _bw long, _cw long").collect())
    names = _names([p for _, p in opened], prefix)
    firsts, last = [], None
    for o, p in opened:  # a pair that continues across a partition boundary opens once
        if p != last:
            firsts.append((o, names[p]))
            last = p
    return names, firsts, keyed


# --- the writer tasks ---------------------------------------------------------------------------------

class _Blobs:
    """The prepared bytes of samples, read back by byte range (the files stay open, up to 256)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.fds: dict[str, int] = {}

    def read(self, name: str, offset: int, length: int) -> bytes:
        fd = self.fds.get(name)
        if fd is None:
            if len(self.fds) >= 256:
                self.close()
            fd = self.fds[name] = os.open(os.path.join(self.folder, name), os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"{name} is shorter than its key rows say ({offset}+{length})")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _write_part(batches: Iterable[pa.RecordBatch], state: dict, out_dir: str, stats_dir: str,
                blobs: _Blobs) -> Iterator[pa.RecordBatch]:
    """Key rows sorted by (shard, order) -> the shards' files and stats, and one result row each."""
    current: TarStream | None = None
    current_name = None
    for b in batches:
        k = b.to_pydict()
        res: dict[str, list] = {f.name: [] for f in RESULT_SCHEMA}
        for i, name in enumerate(k["_shard"]):
            if name != current_name:
                if current is not None:
                    _save_stats(stats_dir, current.close())
                    state["current"] = current = None
                current, current_name = TarStream(os.path.join(out_dir, name)), name
                state["current"] = current
            sid, reason, detail = k["id"][i], k["_reason"][i], k["_detail"][i]
            if reason is None:
                data, media = blobs.read(k["_blob"][i], k["_off"][i], k["_len"][i]), k["_media"][i]
                try:
                    pieces = [data] if media is None else complete_sample(sid, data, json.loads(media))
                except MediaReadError as e:
                    reason, detail = e.reason, e.detail
                except Exception as e:  # noqa: BLE001 - one bad sample never fails a shard
                    reason, detail = "write_error", f"{type(e).__name__}: {e}"[:500]
                else:
                    current.write(pieces, k["source"][i])
            for col, v in (("id", sid), ("shard", name if reason is None else None),
                           ("status", "kept" if reason is None else "dropped"), ("reason", reason), ("detail", detail)):
                res[col].append(v)
        yield pa.RecordBatch.from_pydict(res, schema=RESULT_SCHEMA)
    if current is not None:
        _save_stats(stats_dir, current.close())
        state["current"] = None


def write_shards(df, out_dir: str, max_samples: int = 1000, max_bytes: int = 1 << 30,
                 shuffle: bool = True, seed: int = 0, prefix: str = "shard",
                 write_partitions: int | None = None, rows_hint: int | None = None, source: str | None = None):
    """Write live rows of `df` into shards under out_dir.

    Returns (results DataFrame [id, shard, status, reason, detail], shard names by (byte window,
    count window), the folder of per-shard stats, a DataFrame to unpersist once written). The
    samples are encoded (one Spark job) and laid out here; the shards are written when the
    results are computed. The prepared bytes and key rows stay in the stats folder until the
    caller removes it.

    `source`: the Parquet folder `df` was read from unchanged (a step's output); its files are
    then read directly by the encoding tasks. With `rows_hint` (an upper bound on the rows of
    `df`) at most SMALL_ROWS, the keys are laid out on the driver and each writer task reads its
    shards' keys from a file (no shuffle); otherwise the sort, one pass of per-partition totals
    and one pass that finds each shard's first key run on the executors, and the keys are
    shuffled to their shard's task.
    """
    import shutil

    spark = df.sparkSession
    sc = spark.sparkContext
    stats_dir = os.path.join(out_dir, ".stats")
    blob_dir, keys_dir, plan_dir = (os.path.join(stats_dir, d) for d in ("blobs", "keys", "plan"))
    for d in (blob_dir, keys_dir, plan_dir):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(blob_dir)
    os.makedirs(keys_dir)
    _encode_keys(df, source, blob_dir, keys_dir, seed, shuffle)

    def write(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        state: dict = {"current": None}
        blobs = _Blobs(blob_dir)
        try:
            yield from _write_part(batches, state, out_dir, stats_dir, blobs)
        except BaseException:
            if state["current"] is not None:  # a failed write (disk full, ...) leaves no temporary file
                state["current"].abort()
            raise
        finally:
            blobs.close()

    if rows_hint is not None and rows_hint <= SMALL_ROWS:
        names, n_parts = _plan_on_driver(keys_dir, plan_dir, max_samples, max_bytes, prefix, write_partitions,
                                         sc.defaultParallelism)

        def write_planned(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            import pyarrow.parquet as pq

            for b in batches:
                for k in b.column(0).to_pylist():
                    pf = pq.ParquetFile(os.path.join(plan_dir, f"part-{k:06d}.parquet"))
                    yield from write(pf.iter_batches(batch_size=1024, use_threads=False))

        results = spark.range(n_parts, numPartitions=n_parts).mapInArrow(write_planned, _RESULT_DDL)
        return results, names, stats_dir, results
    keys = spark.read.schema(_KEY_DDL).parquet(keys_dir)
    names, firsts, keyed = _layout_on_executors(keys, max_samples, max_bytes, prefix)
    first_b = sc.broadcast(([o for o, _ in firsts], [n for _, n in firsts]))

    def shard_of(orders):  # pandas Series of order keys -> their shard names
        import pandas as pd

        first_keys, shard_names = first_b.value
        return pd.Series([shard_names[bisect.bisect_right(first_keys, o) - 1] for o in orders], dtype=object)

    from pyspark.sql import functions as F

    n_parts = write_partitions or max(1, min(len(firsts), sc.defaultParallelism * 4))
    to_write = (keys.withColumn("_shard", F.pandas_udf(shard_of, "string")(F.col("_order")))
                .repartition(n_parts, "_shard")
                .sortWithinPartitions("_shard", "_order")
                .select(*WRITE_COLUMNS))
    return to_write.mapInArrow(write, _RESULT_DDL), names, stats_dir, keyed
