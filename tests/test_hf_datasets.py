"""`reelforge.training.hf.load`: a run's shards as a `datasets.Dataset` with every member of every
sample, checked against the tars read directly (tarfile, and webdataset as the training loader reads
them); and HF's own webdataset builder on the same shards, which cannot give them all."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from collections import Counter

import datasets
import pytest
import webdataset as wds

from reelforge.curation.shards import ShardVersionError
from reelforge.training import hf


def _base_plus_ext(name: str) -> tuple[str, str]:
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)  # webdataset's split (key, every extension)
    assert m, name
    return m.group(1), m.group(2)


def direct(paths: list[str]) -> list[tuple[str, str, dict[str, bytes]]]:
    """(tar, key, {member suffix: bytes}) of every sample, straight from the tars (random access)."""
    out = []
    for p in paths:
        with tarfile.open(p) as tf:
            for ti in tf.getmembers():
                if not ti.isfile():
                    continue
                key, suffix = _base_plus_ext(ti.name)
                if not out or out[-1][0] != p or out[-1][1] != key:
                    out.append((p, key, {}))
                assert suffix not in out[-1][2]
                out[-1][2][suffix] = tf.extractfile(ti).read()
    return out


def rows_as_samples(ds) -> list[tuple[str, str, dict[str, bytes]]]:
    out = []
    for r in ds:
        members = {}
        for m in r["media"]:
            key, suffix = _base_plus_ext(m["name"])  # the member's own name in the tar
            assert key == r["__key__"], m["name"]
            members[suffix] = m["bytes"]
        assert len(members) == len(r["media"]), "a member name twice in one row"
        if r["json"] is not None:
            members["json"] = r["json"].encode("utf-8")
        out.append((r["__url__"], r["__key__"], members))
    return out


def kinds(samples) -> Counter:
    return Counter(s for _, _, m in samples for s in m)


def shard_paths(folder: str) -> list[str]:
    with open(os.path.join(folder, "index.json")) as f:
        return [os.path.join(folder, s["shard"]) for s in json.load(f)["shards"]]


@pytest.fixture(scope="module")
def run_shards(demo_run) -> str:
    return os.path.join(demo_run["out"], "shards")


@pytest.fixture(scope="module")
def loaded(run_shards, tmp_path_factory):
    return hf.load(run_shards, cache_dir=str(tmp_path_factory.mktemp("hf-cache")))


@pytest.mark.slow  # the demo run (Spark), shared with other tests
def test_every_member_arrives_with_its_bytes(run_shards, loaded):
    want = direct(shard_paths(run_shards))
    got = rows_as_samples(loaded)
    assert loaded.features == hf.features()
    assert len(loaded) == len(want) == json.load(open(os.path.join(run_shards, "index.json")))["samples"]
    assert [(os.path.abspath(u), k) for u, k, _ in want] == [(u, k) for u, k, _ in got]
    for (_, key, w), (_, _, g) in zip(want, got):
        assert w == g, key  # same member names, same bytes
    members = kinds(want)
    media = sum(n for s, n in members.items() if s != "json")
    print(f"\nmembers in the tars: {sum(members.values())} ({media} media), by suffix {dict(sorted(members.items()))}; "
          f"via hf.load: {sum(kinds(got).values())}")
    # the shards really hold the member names a column-per-extension schema cannot hold
    assert {"jpg", "mp4"} <= set(members) and any("." in s for s in members), members
    # each sample's JSON names exactly the media members the row carries, by their names
    n_named = 0
    for r in loaded:
        named = [m.get("member") for m in json.loads(r["json"]).get("media") or []]
        assert named == [m["name"] for m in r["media"]], (r["__key__"], named)
        n_named += len(named)
    assert n_named == media


@pytest.mark.slow  # the demo run (Spark), shared with other tests
def test_the_training_loaders_reader_sees_the_same_samples(run_shards, loaded):
    """webdataset (what training/loader.py reads shards with) groups the same members per sample."""
    got = {k: m for _, k, m in rows_as_samples(loaded)}
    n = 0
    for url in shard_paths(run_shards):
        for raw in wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                  empty_check=False):
            members = {s: v for s, v in raw.items() if not s.startswith("__")}
            assert members == got[raw["__key__"]], raw["__key__"]
            n += 1
    assert n == len(got)


@pytest.mark.slow  # the demo run (Spark), shared with other tests
def test_streaming_gives_the_same_rows(run_shards, loaded):
    it = hf.load(run_shards, streaming=True, split="validation")
    assert isinstance(it, datasets.IterableDataset) and str(it.split) == "validation"
    assert rows_as_samples(it) == rows_as_samples(loaded)
    # a run's OUT folder and a glob name the same shards
    out = os.path.dirname(run_shards)
    assert [r["__key__"] for r in hf.load(out, streaming=True)] == loaded["__key__"]
    assert len(hf.load(os.path.join(run_shards, "*.tar"), streaming=True).take(1000).to_list()) == len(loaded)


@pytest.mark.slow  # the demo run (Spark), shared with other tests
def test_hf_webdataset_builder_cannot_give_every_member(run_shards, tmp_path):
    """The problem is real: HF's builder infers columns from the first 5 samples' extensions.
    Plain, on these shards, it refuses them (their first samples differ) or, where they agree,
    drops the rest; handed the columns it shows (jpg, json), it reports success without the
    mp4/png/webp/`0.jpg` members."""
    paths = shard_paths(run_shards)
    want = kinds(direct(paths))
    total_media = sum(n for s, n in want.items() if s != "json")
    try:
        plain = datasets.load_dataset("webdataset", data_files={"train": paths}, split="train",
                                      cache_dir=str(tmp_path / "plain"))
    except ValueError as e:
        assert "don't share the same prefix or the same types" in str(e)
        plain_media = None
    else:
        cols = [c for c in plain.column_names if c not in ("__key__", "__url__", "json")]
        plain_media = sum(len(plain) - plain.data.column(c).null_count for c in cols)
        assert plain_media < total_media
    feats = datasets.Features({"__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
                               "jpg": datasets.Image(decode=False), "json": datasets.Json()})
    given = datasets.load_dataset("webdataset", data_files={"train": paths}, split="train", features=feats,
                                  cache_dir=str(tmp_path / "given"))
    assert len(given) == sum(1 for _ in direct(paths))  # "success": every sample has a row ...
    hf_media = sum(r["jpg"] is not None for r in given)
    assert hf_media == want["jpg"] < total_media  # ... but only the single-`jpg` media survive
    print(f"\nmedia members: tars {total_media}; hf.load {total_media}; HF webdataset builder plain: "
          f"{'ValueError (first samples differ)' if plain_media is None else plain_media}; "
          f"with features jpg+json: {hf_media} (lost {total_media - hf_media})")


@pytest.mark.slow  # the demo run (Spark), shared with other tests
def test_hf_webdataset_builder_succeeds_without_members_when_the_first_samples_agree(run_shards, tmp_path):
    """The issue's symptom: the same samples in another order (as another seed or a `mix` stage
    can lay them out: single-`jpg` samples first) load "successfully" with only jpg/json columns;
    every other media member is gone, and so are the JSON fields the first samples lacked."""
    samples = direct(shard_paths(run_shards))
    want = kinds(samples)
    total_media = sum(n for s, n in want.items() if s != "json")
    paths = []
    for url in shard_paths(run_shards):
        mine = sorted((s for s in samples if s[0] == url), key=lambda s: sorted(s[2]) != ["jpg", "json"])
        paths.append(str(tmp_path / os.path.basename(url)))
        _tar(paths[-1], [(f"{k}.{suffix}", data) for _, k, m in mine for suffix, data in m.items()])
    ds = datasets.load_dataset("webdataset", data_files={"train": paths}, split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert len(ds) == len(samples) and set(ds.column_names) == {"__key__", "__url__", "json", "jpg"}
    hf_media = len(ds) - ds.data.column("jpg").null_count
    assert hf_media == want["jpg"] < total_media
    ours = hf.load(paths, streaming=True)
    assert sum(len(r["media"]) for r in ours) == total_media  # the reordered tars lose nothing through hf.load
    kept = set(ds.features["json"])
    lost = Counter(k for _, _, m in samples for k in json.loads(m["json"]) if k not in kept)
    assert lost  # e.g. a preference sample's `chosen` / `rejected`
    print(f"\nHF webdataset builder, same samples single-jpg first: {len(ds)} rows, columns {sorted(ds.column_names)}; "
          f"media {hf_media} of {total_media}; JSON fields dropped: {dict(lost)}")


@pytest.mark.slow  # the demo run (Spark), shared with other tests
def test_a_mix_stage_folder_loads_whole(demo_run, tmp_path):
    from test_mix_plan_emit import demo_mixture

    from reelforge.mixers.emit import emit_plan
    from reelforge.mixers.planner import plan_mixture
    from reelforge.mixers.spec import parse_mixture

    plan = plan_mixture(parse_mixture(demo_mixture(demo_run["out"])), demo_run["out"])
    out = str(tmp_path / "mix")
    emit_plan(plan, out, stages=[plan["stages"][1]["name"]], log=lambda *a: None)
    stage = os.path.join(out, plan["stages"][1]["name"])
    ds = hf.load(stage, cache_dir=str(tmp_path / "cache"))
    want = direct(shard_paths(stage))
    assert len(ds) == len(want) == json.load(open(os.path.join(stage, "index.json")))["samples"]
    assert [(os.path.abspath(u), k, m) for u, k, m in want] == rows_as_samples(ds)
    for r in ds:  # repeats (key ID_rR) renamed their members and their JSON together
        assert [m.get("member") for m in json.loads(r["json"]).get("media") or []] == [m["name"] for m in r["media"]]
    repeats = sum(bool(re.search(r"_r\d+$", k)) for k in ds["__key__"])
    print(f"\nmix stage: {len(ds)} samples ({repeats} repeats), {sum(len(m) for m in ds['media'])} media members, "
          f"as in the tars: {sum(n for s, n in kinds(want).items() if s != 'json')}")
    with pytest.raises(ValueError, match="holds the stages .*pass one stage folder"):
        hf.load(out)


# --- without a run: hand-made tars ---------------------------------------------------------------

def _tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _json(i: int) -> bytes:
    return json.dumps({"version": 2, "id": f"s{i}"}).encode()


def test_rewritten_shards_are_read_again_and_damaged_ones_refused(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _tar(str(d / "a.tar"), [("k0.json", _json(0)), ("k0.0.jpg", b"x"), ("k0.1.mp4", b"yy"), ("k1.json", _json(1)),
                            ("k2.json", _json(2)), ("k2.webp", b"w"), ("k3.txt", b"no json")])
    (d / "index.json").write_text(json.dumps({"shards": [{"shard": "a.tar", "samples": 4}]}))
    cache = str(tmp_path / "cache")
    ds = hf.load(str(d), cache_dir=cache)
    assert ds["__key__"] == ["k0", "k1", "k2", "k3"]
    assert ds[0]["media"] == [{"name": "k0.0.jpg", "bytes": b"x"}, {"name": "k0.1.mp4", "bytes": b"yy"}]
    assert ds[1]["media"] == [] and json.loads(ds[1]["json"])["id"] == "s1"
    assert ds[3]["json"] is None and ds[3]["media"] == [{"name": "k3.txt", "bytes": b"no json"}]
    # streaming: the same rows, also through the Arrow paths (an empty `media` list and a missing
    # `json` beside full ones in one batch used to be typed apart there)
    it = hf.load(str(d), streaming=True)
    assert list(it) == ds.to_list() == it.take(10).to_list()
    assert [t.num_rows for t in it.with_format("arrow").iter(batch_size=2)] == [2, 2]
    # the same path re-written: the cache is keyed by size and mtime, so the new bytes are read
    _tar(str(d / "a.tar"), [("k0.json", _json(0)), ("k0.png", b"zzz")])
    os.utime(d / "a.tar", ns=(1, 1))
    (d / "index.json").write_text(json.dumps({"shards": [{"shard": "a.tar", "samples": 1}]}))
    again = hf.load(str(d), cache_dir=cache)
    assert again["__key__"] == ["k0"] and again[0]["media"] == [{"name": "k0.png", "bytes": b"zzz"}]
    # a shard with fewer samples than its index says: refused, never a short dataset
    (d / "index.json").write_text(json.dumps({"shards": [{"shard": "a.tar", "samples": 2}]}))
    with pytest.raises(ValueError, match="holds 1 samples but its index.json says 2"):
        list(hf.load(str(d), streaming=True))
    # a tar cut short: refused in one sentence
    shutil.copy(d / "a.tar", tmp_path / "cut.tar")
    with open(tmp_path / "cut.tar", "r+b") as f:
        f.truncate(700)
    with pytest.raises(ValueError, match="not a readable shard tar"):
        list(hf.load(str(tmp_path / "cut.tar"), streaming=True))
    _tar(str(tmp_path / "latin.tar"), [("k.json", "{\"id\": \"é\"}".encode("latin-1"))])
    with pytest.raises(ValueError, match="k.json is not UTF-8 text"):
        list(hf.load(str(tmp_path / "latin.tar"), streaming=True))
    # a newer shard layout: refused like the training loader refuses it
    _tar(str(tmp_path / "new.tar"), [("k.json", json.dumps({"version": 99, "id": "k"}).encode())])
    with pytest.raises(ShardVersionError, match="version 99"):
        list(hf.load(str(tmp_path / "new.tar"), streaming=True))
    for bad in (str(tmp_path / "nowhere"), str(tmp_path / "*.nothing"), []):
        with pytest.raises(ValueError, match="load: "):
            hf.load(bad)
