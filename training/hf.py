"""reelforge shards as a Hugging Face `datasets.Dataset`, with every member of every sample.

One line::

    from reelforge.training import hf
    ds = hf.load("OUT/shards")            # a run's shards (or OUT, or a `mix` stage folder, a tar, a glob)
    ds[0]["json"], ds[0]["media"]         # the sample JSON text; [{"name": "KEY.0.jpg", "bytes": b"..."}, ...]

Why not `datasets.load_dataset("webdataset", data_files=...)`: HF's webdataset builder decides
its columns from the member extensions of the first 5 samples of the first tar
(`NUM_EXAMPLES_FOR_FEATURES_INFERENCE`). reelforge samples differ in their members: a text
sample has only `json`, an image `jpg`/`png`/`webp`, a video `mp4`, a multi-image or
interleaved sample `0.jpg`, `1.png`, ... (`curation.shards.media_members`). So either those
first samples differ and the builder refuses the shards ("don't share the same prefix or the
same types"), or they agree (or the user hands it the columns it showed, `features=`) and every
member whose extension is not one of those columns is dropped without a word while the load
reports success: the `features.encode_example` step keeps only the known columns. Its `json`
column is also decoded to a struct inferred from those samples, so JSON fields they lack are
lost as well. tests/test_hf_datasets.py measures both on a real run's shards.

Here the schema does not depend on which members a sample has, so nothing is inferred and
nothing is dropped:

* `__key__` (string): the sample key (the member names up to the first dot of the basename,
  webdataset's rule, as the shard writer and `mixers.tarspan` use);
* `__url__` (string): the tar the sample came from;
* `json` (string, or None for a sample without one): the `.json` member's text exactly as
  stored (`json.loads` it, or `curation.shards.parse_sample_json` for the checked schema);
* `media` (list of {name: string, bytes: large_binary}): every other member in tar order,
  `name` being the member's name in the tar (`KEY.jpg`, `KEY.mp4`, `KEY.0.jpg`, `KEY.1.png`,
  ...), which is what the sample JSON's `media[i].member` names (also in a `mix` stage, where
  a repeat's key and member names change together).

The tars are read with `tarfile` in stream mode, in the order `index.json` lists them (sorted
names without an index). A shard holding fewer or more samples than its index says, or one
that is not a readable tar, raises `ValueError`, and a shard in a newer JSON layout
`ShardVersionError`: a silent short dataset is what this module exists to prevent.
`load(..., streaming=True)` returns an `IterableDataset` (nothing cached); otherwise the rows
are written once to the datasets cache (`cache_dir`), keyed by the shards' paths, sizes and
modification times, so re-written shards are read again.

Every path may also be a URL (`s3://bucket/mixes/stage1`, a tar's URL, or a glob on it): the
tars and index.json are then read through fsspec (`curation.storage`), streamed, and the cache
is keyed by each object's size and ETag (or modification time) instead.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Iterator

from reelforge.curation import storage
from reelforge.curation.shards import READS_MAJOR, json_major, parse_sample_json

JSON_MEMBER = "json"


def features():
    """The fixed schema of every reelforge shard loaded through this module."""
    import datasets

    return datasets.Features({
        "__key__": datasets.Value("string"),
        "__url__": datasets.Value("string"),
        JSON_MEMBER: datasets.Value("string"),
        "media": datasets.List({"name": datasets.Value("string"), "bytes": datasets.Value("large_binary")}),
    })


def _key_and_suffix(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the member name up to the first dot of its basename."""
    d, _, base = name.rpartition("/")
    k, _, suffix = base.partition(".")
    return (f"{d}/{k}" if d else k), suffix


def _index_of(folder: str) -> dict | None:
    p = storage.join(folder, "index.json")
    if not (storage.exists(p) if storage.is_url(p) else os.path.isfile(p)):
        return None
    try:
        idx = json.loads(storage.read_bytes(p))
    except (OSError, ValueError) as e:
        raise ValueError(f"{p} is not readable JSON ({e}); re-write the shards or remove the index.") from e
    return idx if isinstance(idx, dict) else None


def _folder_shards(folder: str) -> list[tuple[str, int | None]]:
    """(tar path, samples the index expects or None) for a shard folder, in index order."""
    idx = _index_of(folder)
    listed = [s for s in (idx or {}).get("shards") or [] if isinstance(s, dict) and s.get("shard")]
    if listed:
        out = []
        have = set(storage.listdir(folder)) if storage.is_url(folder) else None
        for s in listed:
            p = storage.join(folder, s["shard"])
            if not (s["shard"] in have if have is not None else os.path.isfile(p)):
                raise ValueError(f"{folder}/index.json names {s['shard']}, which is missing; re-run the job "
                                 "that wrote this folder.")
            n = s.get("samples")
            out.append((p, int(n) if isinstance(n, int) else None))
        return out
    if storage.is_url(folder):
        return [(storage.join(folder, n), None) for n in storage.listdir(folder) if n.endswith(".tar")]
    return [(p, None) for p in sorted(glob.glob(os.path.join(folder, "*.tar")))]


def resolve(path: str | os.PathLike | list) -> list[tuple[str, int | None]]:
    """The tars `load` reads: a shard folder (a run's OUT/shards or a `mix` stage folder), a run's
    OUT folder (its shards/), a tar, a glob, or a list of these; with the sample count each
    tar's index.json gives (None where there is none)."""
    if isinstance(path, (list, tuple)):
        out = [t for p in path for t in resolve(p)]
        if not out:
            raise ValueError("load: the list of paths is empty; pass a shard folder, a tar or a glob.")
        return out
    p = os.fspath(path)
    if storage.is_url(p):
        return _resolve_url(storage.normalize(p))
    if os.path.isdir(p):
        found = _folder_shards(p)
        if not found and os.path.isdir(os.path.join(p, "shards")):
            found = _folder_shards(os.path.join(p, "shards"))
        if not found:
            stages = sorted(d for d in os.listdir(p) if os.path.isfile(os.path.join(p, d, "index.json")))
            hint = (f"it holds the stages {', '.join(stages)}: pass one stage folder" if stages
                    else "pass a run's OUT/shards folder, a `mix` stage folder, a tar or a glob")
            raise ValueError(f"load: no .tar shards in {p}; {hint}.")
        return found
    if any(c in p for c in "*?["):
        found = sorted(glob.glob(p))
        if not found:
            raise ValueError(f"load: the glob {p} matches no files; pass a shard folder, a tar or a glob.")
        return [(f, None) for f in found]
    if os.path.isfile(p):
        idx = _index_of(os.path.dirname(os.path.abspath(p))) or {}
        n = next((s.get("samples") for s in idx.get("shards") or []
                  if isinstance(s, dict) and s.get("shard") == os.path.basename(p)), None)
        return [(p, n if isinstance(n, int) else None)]
    raise ValueError(f"load: {p} does not exist; pass a run's OUT/shards folder, a `mix` stage folder, a tar "
                     "or a glob.")


def _resolve_url(p: str) -> list[tuple[str, int | None]]:
    """`resolve` for a URL: a stage or shards folder (or a run's OUT with shards/), a glob, or a tar."""
    if any(c in p for c in "*?["):
        fs, path = storage.url_fs(p)
        scheme = p.split("://", 1)[0]
        found = sorted(f"{scheme}://{f}" for f in storage.guarded(p, "read", fs.glob, path) if f.endswith(".tar"))
        if not found:
            raise ValueError(f"load: the glob {storage.redact(p)} matches no objects; pass a shard folder, a tar "
                             "or a glob.")
        return [(f, None) for f in found]
    if p.endswith(".tar") and storage.exists(p):
        folder, name = p.rsplit("/", 1)
        idx = _index_of(folder) or {}
        n = next((s.get("samples") for s in idx.get("shards") or []
                  if isinstance(s, dict) and s.get("shard") == name), None)
        return [(p, n if isinstance(n, int) else None)]
    found = _folder_shards(p) or _folder_shards(storage.join(p, "shards"))
    if not found:
        raise ValueError(f"load: no .tar shards at {storage.redact(p)}; pass a run's OUT/shards folder, a `mix` "
                         "stage folder, a tar or a glob.")
    return found


def iter_tar(url: str) -> Iterator[dict]:
    """Every sample of one tar as a row of `features()`: members grouped by key, none dropped."""
    cur: dict | None = None
    try:
        with storage.open_file(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for ti in tf:
                if not ti.isfile():
                    continue
                key, suffix = _key_and_suffix(ti.name)
                data = tf.extractfile(ti).read()
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        yield cur
                    cur = {"__key__": key, "__url__": url, JSON_MEMBER: None, "media": []}
                if suffix == JSON_MEMBER and cur[JSON_MEMBER] is None:
                    try:
                        cur[JSON_MEMBER] = data.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"load: {url}: the member {ti.name} is not UTF-8 text ({e}); the shard "
                                         "was not written by reelforge: re-write it.") from e
                else:  # a second json member would be a media-like member: kept, never dropped
                    cur["media"].append({"name": ti.name, "bytes": data})
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"load: {url} is not a readable shard tar ({type(e).__name__}: {e}); "
                         "re-write it or leave it out of the paths.") from e
    if cur is not None:
        yield cur


def _check_version(row: dict, url: str) -> None:
    """A shard written by a newer reelforge is refused as the training loader refuses it
    (`ShardVersionError`, one sentence); odd JSON is carried as it is, not judged here."""
    try:
        obj = json.loads(row[JSON_MEMBER]) if row[JSON_MEMBER] is not None else None
    except ValueError:
        return
    if isinstance(obj, dict) and json_major(obj.get("version", 1)) not in READS_MAJOR:
        parse_sample_json(obj, url)  # raises ShardVersionError


def _generate(shards: list) -> Iterator[dict]:
    for url, _size, _mtime, expected in shards:
        n = 0
        for row in iter_tar(url):
            if n == 0:
                _check_version(row, url)
            n += 1
            yield row
        if expected is not None and n != expected:
            raise ValueError(f"load: {url} holds {n} samples but its index.json says {expected}; the shard "
                             "is damaged or was replaced: re-write it.")


TABLE_ROWS = 64  # rows per Arrow table in streaming (fewer once a table holds TABLE_BYTES of media)
TABLE_BYTES = 64 << 20


def _generate_tables(shards: list) -> Iterator[tuple[str, object]]:
    """The streaming path: Arrow tables in the fixed schema. Rows handed to
    `IterableDataset.from_generator` would be typed batch by batch from their values (an empty
    `media` list or a missing `json` is typed null there and breaks `to_list`, `with_format("arrow")`
    and batched `map`), so the tables are built here with the schema itself."""
    import pyarrow as pa

    schema = features().arrow_schema
    rows: list[dict] = []
    size = 0
    for row in _generate(shards):
        rows.append(row)
        size += sum(len(m["bytes"]) for m in row["media"])
        if len(rows) >= TABLE_ROWS or size >= TABLE_BYTES:
            yield f"{rows[0]['__url__']}:{rows[0]['__key__']}", pa.Table.from_pylist(rows, schema=schema)
            rows, size = [], 0
    if rows:
        yield f"{rows[0]['__url__']}:{rows[0]['__key__']}", pa.Table.from_pylist(rows, schema=schema)


def _signature(path) -> list[tuple[str, int, int, int | None]]:
    out = []
    for url, expected in resolve(path):
        if storage.is_url(url):  # size and ETag (or modification time) key the cache, as size and mtime do
            fs, p = storage.url_fs(url)
            info = storage.guarded(url, "read", fs.info, p)
            tag = str(info.get("ETag") or info.get("LastModified") or info.get("mtime") or "")
            out.append((url, int(info.get("size") or 0), tag, expected))
            continue
        st = os.stat(url)
        out.append((os.path.abspath(url), st.st_size, st.st_mtime_ns, expected))
    return out


def load(path, split: str = "train", streaming: bool = False, cache_dir: str | None = None,
         keep_in_memory: bool = False, num_proc: int | None = None):
    """A `datasets.Dataset` (an `IterableDataset` with `streaming=True`) of every sample in the
    shards at `path`, one row per sample, schema `features()` (see the module docstring)."""
    try:
        import datasets
    except ImportError as e:  # the `hf` extra
        raise ImportError("reelforge.training.hf needs the `datasets` package: install reelforge[hf].") from e

    shards = _signature(path)
    if streaming:  # what `IterableDataset.from_generator` builds, over Arrow tables instead of rows
        from datasets.iterable_dataset import ArrowExamplesIterable

        return datasets.IterableDataset(ArrowExamplesIterable(_generate_tables, {"shards": shards}),
                                        info=datasets.DatasetInfo(features=features()),
                                        split=datasets.NamedSplit(split))
    return datasets.Dataset.from_generator(_generate, features=features(), cache_dir=cache_dir,
                                           keep_in_memory=keep_in_memory, gen_kwargs={"shards": shards},
                                           num_proc=num_proc if num_proc and len(shards) > 1 else None,
                                           split=split)
