"""`plan`, `mix` and the training loader on object storage (issue 17, item 3).

The session's demo run is uploaded to a bucket of the local S3 server (moto, tests/s3_server.py)
with `storage.put_file`, `_work/` left out. Then, against the same run in its local folder:
the plan from `--stats s3://...` is the local plan; `mix --out s3://...` publishes byte-identical
stage shards and index.json (recorded paths aside), leaves no `.tmp-` object, and a re-run
replaces a stage and clears leftovers; the loader streams the s3 stage into exactly the sample ids
(and member bytes) of the local stage; a short real training run reads its data from the bucket.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import yaml
from train_common import run_cli, seen_ids, stage, write_stage

from reelforge.curation import storage
from reelforge.jobs.cli import main
from reelforge.jobs.recipe import RecipeError
from reelforge.mixers.emit import _RunShards, check_run_shards, emit_plan, load_plan
from reelforge.mixers.spec import recipes_dir
from reelforge.mixers.stats import read_sample_stats
from reelforge.training.loader import ShardLoader, iter_ids, open_shard

pytestmark = [pytest.mark.spark, pytest.mark.slow]

BUCKET = "rf-s3-mix-train"


def _mixture(run_dir: str) -> dict:
    """demo.yaml scaled to this run (stage2's interleaved entry capped at 2 epochs and weighted past it,
    so some samples repeat and are re-keyed `ID_r1`)."""
    from collections import Counter

    with open(os.path.join(recipes_dir(), "demo.yaml")) as f:
        raw = yaml.safe_load(f)
    total: Counter = Counter()
    for r in read_sample_stats(run_dir, ["source", "tokens"]).to_pylist():
        total[r["source"]] += r["tokens"]
    s1, s2, _ = raw["stages"]
    s1["target_tokens"] = int(1.5 * (total["captions_wds"] + total["captions_manifest"]))
    s2["target_tokens"] = sum(total.values())
    w = {e["name"]: e for e in s2["sources"]}
    w["interleaved"].update(weight=0.3, max_epochs=2)
    return raw


def _objects(url: str) -> dict[str, bytes]:
    return {rel: storage.read_bytes(storage.join(url, rel)) for rel, _ in storage.walk_files(url)}


def _local(d: str) -> dict[str, bytes]:
    out = {}
    for rel, _ in storage.walk_files(d):
        with open(os.path.join(d, rel), "rb") as f:
            out[rel] = f.read()
    return out


def _index_without_paths(data: bytes) -> dict:
    idx = json.loads(data)
    idx.pop("stats")  # the run's location: a folder on one side, s3://... on the other
    return idx


@pytest.fixture(scope="module")
def world(demo_run, s3, tmp_path_factory) -> dict:
    """The demo run in a local folder and in s3://BUCKET/run; one mixture YAML in both places; the
    plans (CLI) and mixes (CLI, the s3 one with two writer processes) of both."""
    bucket = s3.bucket(BUCKET)
    local_run = demo_run["out"]
    run_url = f"{bucket}/run"
    uploaded = 0
    for rel, _ in storage.walk_files(local_run):
        if rel.split(os.sep, 1)[0] == "_work":
            continue
        storage.put_file(os.path.join(local_run, rel), storage.join(run_url, rel.replace(os.sep, "/")))
        uploaded += 1
    tmp = tmp_path_factory.mktemp("s3-mix")
    mix_yaml = str(tmp / "demo-scaled.yaml")
    with open(mix_yaml, "w") as f:
        yaml.safe_dump(_mixture(local_run), f)
    storage.put_file(mix_yaml, f"{bucket}/mixtures/demo-scaled.yaml")

    local_plan, url_plan = str(tmp / "plan.json"), f"{bucket}/plans/demo.plan.json"
    assert main(["plan", mix_yaml, "--stats", local_run, "--out", local_plan, "--allow-drift"]) == 0
    assert main(["plan", f"{bucket}/mixtures/demo-scaled.yaml", "--stats", run_url, "--out", url_plan,
                 "--allow-drift"]) == 0
    local_mix, url_mix = str(tmp / "mix"), f"{bucket}/mixes"
    assert main(["mix", local_plan, "--out", local_mix]) == 0
    assert main(["mix", url_plan, "--out", url_mix, "--workers", "2", "--verify"]) == 0
    return {"bucket": bucket, "run": local_run, "run_url": run_url, "uploaded": uploaded, "tmp": tmp,
            "local_plan": local_plan, "url_plan": url_plan, "local_mix": local_mix, "url_mix": url_mix}


def test_plan_from_a_bucket_is_the_local_plan(world):
    local = load_plan(world["local_plan"])
    remote = json.loads(storage.read_bytes(world["url_plan"]))
    assert remote["stats"] == world["run_url"] and local["stats"] == world["run"]
    assert remote["stats_samples"] == local["stats_samples"] > 0
    for k in ("stats", "mixture_path"):
        local.pop(k), remote.pop(k)
    assert remote == local  # every stage, entry count, token count and selection digest
    assert sum(e["samples"] for st in remote["stages"] for e in st["entries"]) > 0
    png = storage.read_bytes(world["url_plan"].replace(".json", ".png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not [r for r, _ in storage.walk_files(f"{world['bucket']}/plans") if storage.TMP_MARK in r]


def test_mix_to_a_bucket_is_byte_identical_to_a_local_mix(world):
    plan = load_plan(world["local_plan"])
    assert any(e["max_repeats"] > 1 for st in plan["stages"] for e in st["entries"])  # re-keyed repeats too
    compared = 0
    for st in plan["stages"]:
        local = _local(os.path.join(world["local_mix"], st["name"]))
        remote = _objects(storage.join(world["url_mix"], st["name"]))
        tars = sorted(r for r in local if r.endswith(".tar"))
        assert tars and sorted(r for r in remote if r.endswith(".tar")) == tars
        for t in tars:
            assert hashlib.sha256(remote[t]).digest() == hashlib.sha256(local[t]).digest(), (st["name"], t)
            compared += 1
        assert _index_without_paths(remote["index.json"]) == _index_without_paths(local["index.json"])
        assert json.loads(remote["index.json"])["stats"] == world["run_url"]
        assert "index.json" in remote and ".nv-meta/dataset.yaml" in remote
        assert remote[".nv-meta/dataset.yaml"] == local[".nv-meta/dataset.yaml"]
        assert set(remote) == set(local)  # nothing more, nothing less (.nv-meta included)
    assert compared >= 3
    assert not [r for r, _ in storage.walk_files(world["url_mix"]) if storage.TMP_MARK in r]


def test_ranged_reads_and_whole_shard_reads_give_the_same_bytes(world, monkeypatch):
    """Every span by its own ranged GET, then every used shard fetched whole: the same stage bytes."""
    plan = load_plan(world["url_plan"])
    want = _local(os.path.join(world["local_mix"], "stage2"))
    samples = json.loads(want["index.json"])["samples"]
    run_prefix = f"{world['run_url']}/shards/"
    ranged, whole_gets = [], []
    read_bytes, get_file = storage.read_bytes, _RunShards.prepare

    def counting_read(path, start=None, end=None):
        if path.startswith(run_prefix) and start is not None:
            ranged.append(path)
        return read_bytes(path, start, end)

    def counting_prepare(self, names, used):
        before = set(self.local)
        out = get_file(self, names, used)
        whole_gets.extend(set(self.local) - before)
        return out

    monkeypatch.setattr(storage, "read_bytes", counting_read)
    monkeypatch.setattr(_RunShards, "prepare", counting_prepare)
    for whole, where in ((float("inf"), "ranged"), (0.0, "whole")):
        monkeypatch.setattr(_RunShards, "WHOLE", whole)
        ranged.clear()
        whole_gets.clear()
        got = f"{world['bucket']}/mix-{where}"
        emit_plan(plan, got, stages=["stage2"], log=lambda *a: None)
        objs = _objects(f"{got}/stage2")
        assert {r: objs[r] for r in objs if r.endswith(".tar")} == {r: want[r] for r in want if r.endswith(".tar")}
        used = {s["shard"] for s in json.loads(storage.read_bytes(f"{world['run_url']}/shards/index.json"))["shards"]}
        if where == "ranged":  # one ranged GET per sample copied, no shard fetched whole
            assert len(ranged) == samples and whole_gets == []
        else:  # every shard the stage reads fetched once, no ranged GET
            assert ranged == [] and 0 < len(whole_gets) <= len(used)
        print(f"{where}: {len(ranged)} ranged GETs, {len(whole_gets)} whole shards, {samples} samples")


def test_a_rerun_replaces_the_stage_and_clears_leftovers(world):
    stage_url = f"{world['url_mix']}/stage1"
    before = _objects(stage_url)
    storage.write_bytes(f"{stage_url}/demo-000099.tar", b"an earlier emission's shard")
    fs, p = storage.url_fs(f"{stage_url}/demo-000000.tar.tmp-deadbeef0000")
    fs.pipe_file(p, b"a crashed publish")  # a leftover temporary object, as a crash leaves it
    assert main(["mix", world["url_plan"], "--out", world["url_mix"], "--stage", "stage1"]) == 0
    after = _objects(stage_url)
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in after if not k.startswith(".nv-meta/"))


def test_run_shards_on_a_bucket_are_checked_by_size_and_sha256(world):
    bad = f"{world['bucket']}/tampered/shards"
    index = json.loads(storage.read_bytes(f"{world['run_url']}/shards/index.json"))
    first = index["shards"][0]["shard"]
    storage.put_file(os.path.join(world["run"], "shards", "index.json"), f"{bad}/index.json")
    good = storage.read_bytes(f"{world['run_url']}/shards/{first}")
    storage.write_bytes(f"{bad}/{first}", good)
    assert check_run_shards(bad) == 0  # sizes match: nothing hashed
    assert check_run_shards(bad, verify=True) == 1  # streamed and hashed: it matches
    flipped = bytearray(good)
    flipped[700] ^= 0xFF  # same size, other bytes: only --verify sees it
    storage.write_bytes(f"{bad}/{first}", bytes(flipped))
    assert check_run_shards(bad) == 0
    with pytest.raises(RecipeError, match="is not the shard the run wrote"):
        check_run_shards(bad, verify=True)
    storage.write_bytes(f"{bad}/{first}", good[:-512])  # another size: always hashed, refused
    with pytest.raises(RecipeError, match="is not the shard the run wrote"):
        check_run_shards(bad)


def _loader_cfg(tmp, tiny, path: str, name: str, **over):
    data = {"epochs": 1, "max_len": 4096, "num_workers": 2, "split": "shards", "kinds": ["image_text"]}
    return stage(write_stage(str(tmp / f"{name}.yaml"), tiny, path, str(tmp / name), data=data, **over))


def test_the_loader_streams_a_stage_from_the_bucket(world, tiny):
    local_stage = os.path.join(world["local_mix"], "stage1")
    url_stage = f"{world['url_mix']}/stage1"
    a = iter_ids(ShardLoader(_loader_cfg(world["tmp"], tiny, local_stage, "load-local")))
    b = iter_ids(ShardLoader(_loader_cfg(world["tmp"], tiny, url_stage, "load-s3")))
    idx = json.loads(storage.read_bytes(f"{url_stage}/index.json"))
    assert len(a) == idx["samples"] > 0
    assert b == a  # the same ids in the same order
    # the raw samples of a stage2 shard (images, videos, re-keyed repeats): the same members, same bytes
    name = json.loads(storage.read_bytes(f"{world['url_mix']}/stage2/index.json"))["shards"][0]["shard"]
    def members(url: str) -> list[dict]:  # the key and the members (webdataset adds __url__, __local_path__)
        return [{k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")} for r in open_shard(url)]

    local = members(os.path.join(world["local_mix"], "stage2", name))
    remote = members(f"{world['url_mix']}/stage2/{name}")
    assert remote == local and len(local) > 1
    media = [(r["__key__"], ext) for r in local for ext in r if ext in ("jpg", "png", "mp4", "webp")]
    assert media  # at least one media member compared byte for byte


def test_a_stage_on_a_bucket_that_does_not_exist_is_one_sentence(world, tiny):
    with pytest.raises(RecipeError, match="no .tar shards at s3://rf-s3-missing/mix/stage1"):
        ShardLoader(_loader_cfg(world["tmp"], tiny, "s3://rf-s3-missing/mix/stage1", "load-missing"))


def test_a_missing_bucket_is_one_sentence(s3, capsys):
    demo = os.path.join(recipes_dir(), "demo.yaml")
    assert main(["plan", demo, "--stats", "s3://rf-s3-no-such-bucket/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reelforge: ") and "s3://rf-s3-no-such-bucket/run" in err and "\n" not in err
    assert main(["mix", "s3://rf-s3-no-such-bucket/p.json", "--out", "s3://rf-s3-no-such-bucket/m"]) == 2
    assert "s3://rf-s3-no-such-bucket/p.json" in capsys.readouterr().err


def test_hf_datasets_loads_a_stage_from_the_bucket(world):
    from reelforge.training import hf

    local = hf.load(os.path.join(world["local_mix"], "stage2"), cache_dir=str(world["tmp"] / "hf-local"))
    remote = hf.load(f"{world['url_mix']}/stage2", cache_dir=str(world["tmp"] / "hf-s3"))
    assert remote.num_rows == local.num_rows == json.loads(
        storage.read_bytes(f"{world['url_mix']}/stage2/index.json"))["samples"]
    rows = [{k: v for k, v in r.items() if k != "__url__"} for r in remote]
    assert rows == [{k: v for k, v in r.items() if k != "__url__"} for r in local]
    assert sum(len(r["media"]) for r in rows) > 0  # every media member, the same bytes
    assert remote[0]["__url__"].startswith(world["url_mix"] + "/stage2/")


def test_end_to_end_recipe_run_plan_mix_train_through_a_bucket(s3, spark, tiny, tmp_path, monkeypatch):
    """recipe -> `run --out s3://` -> `plan --stats s3://` -> `mix --out s3://` -> `train` from s3://,
    every command through the CLI; nothing of the run, plan or mix is on the local disk but staging."""
    from reelforge.curation.demo_corpus import make_demo_corpus
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.remote import run

    monkeypatch.setenv("REELFORGE_STAGING", str(tmp_path / "staging"))
    bucket = s3.bucket("rf-s3-e2e")
    recipe = make_demo_corpus(str(tmp_path / "corpus"), n_images=16, n_videos=2, seed=1, log=lambda *a: None)
    run_url = f"{bucket}/runs/demo"
    report = run(load_recipe(recipe, out=run_url), spark=spark, log=lambda *a: None,
                 work=str(tmp_path / "work"))
    assert report["kept"] > 10 and report["balanced"]
    assert storage.isdir(f"{run_url}/samples") and storage.exists(f"{run_url}/shards/index.json")
    mix = {"name": "e2e", "seed": 3, "defaults": {"shards": {"max_samples": 8, "max_bytes": "8MB"}},
           "stages": [{"name": "captions", "target_samples": 12, "max_epochs": 2,
                       "sources": [{"name": "captions", "source": ["captions_wds", "captions_manifest"]}]}]}
    storage.write_bytes(f"{bucket}/mix.yaml", yaml.safe_dump(mix).encode())
    plan_url = f"{bucket}/plans/e2e.plan.json"
    assert main(["plan", f"{bucket}/mix.yaml", "--stats", run_url, "--out", plan_url]) == 0
    plan = json.loads(storage.read_bytes(plan_url))
    assert plan["stats"] == run_url and plan["stages"][0]["planned_samples"] == 12
    assert main(["mix", plan_url, "--out", f"{bucket}/mixes", "--verify"]) == 0
    stage_url = f"{bucket}/mixes/captions"
    idx = json.loads(storage.read_bytes(f"{stage_url}/index.json"))
    assert idx["samples"] == 12 and len(idx["shards"]) == 2
    assert not [r for r, _ in storage.walk_files(bucket) if storage.TMP_MARK in r]
    ids = [json.loads(r["json"])["id"] for s in idx["shards"] for r in open_shard(f"{stage_url}/{s['shard']}")]
    assert len(ids) == 12
    out = str(tmp_path / "train")
    path = write_stage(str(tmp_path / "e2e.yaml"), tiny, stage_url, out, steps=2, trainable=["projector"],
                       data={"kinds": ["image_text"], "num_workers": 1})
    run_cli("train", path)  # a real DeepSpeed run whose data comes from the bucket
    assert os.path.isdir(os.path.join(out, "final"))
    seen = seen_ids(out)
    assert seen and set(seen) <= set(ids)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len([m for m in (json.loads(ln) for ln in f if ln.strip()) if "loss" in m]) >= 2
