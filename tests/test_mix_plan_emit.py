"""Mixtures: the per-sample table, the planner and the emitter, checked from the shards themselves."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from collections import Counter

import pytest
import yaml

from reelforge.jobs.recipe import RecipeError
from reelforge.mixers.emit import emit_plan
from reelforge.mixers.planner import plan_mixture
from reelforge.mixers.spec import load_mixture, parse_mixture, recipes_dir
from reelforge.mixers.stats import read_sample_stats
from reelforge.mixers.tarspan import key_of

DEMO = os.path.join(recipes_dir(), "demo.yaml")


def demo_mixture(run_dir: str) -> dict:
    """demo.yaml with targets scaled to this run's size: stage2 asks for as many tokens as its
    sources hold, with interleaved weighted far above what its cap of 2 epochs allows."""
    with open(DEMO) as f:
        raw = yaml.safe_load(f)
    table = read_sample_stats(run_dir, ["source", "tokens"]).to_pylist()
    total = Counter()
    for r in table:
        total[r["source"]] += r["tokens"]
    s1, s2, mpo = raw["stages"]
    s1["target_tokens"] = int(1.5 * (total["captions_wds"] + total["captions_manifest"]))
    s2["target_tokens"] = sum(total[k] for k in ("captions_wds", "captions_manifest", "videos", "conversations",
                                                 "interleaved", "text"))
    w = {e["name"]: e for e in s2["sources"]}
    w["interleaved"]["weight"] = 0.3
    w["interleaved"]["max_epochs"] = 2
    return raw


@pytest.fixture(scope="module")
def plan(demo_run) -> dict:
    return plan_mixture(parse_mixture(demo_mixture(demo_run["out"])), demo_run["out"])


@pytest.fixture(scope="module")
def emitted(plan, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("mix"))
    emit_plan(plan, out, log=lambda *a: None)
    return out


def _read_stage(d: str) -> list[tuple[str, str, dict]]:
    """(shard, key, json) of every sample in a stage's shards, in order, straight from the tars."""
    out = []
    for path in sorted(glob.glob(os.path.join(d, "*.tar"))):
        with tarfile.open(path) as tf:
            members = [m for m in tf if m.isfile()]
            keys_seen = []
            for m in members:
                k = key_of(m.name)
                if not keys_seen or keys_seen[-1] != k:
                    keys_seen.append(k)
                if m.name.endswith(".json"):
                    out.append((os.path.basename(path), k, json.loads(tf.extractfile(m).read())))
            assert len(keys_seen) == len(set(keys_seen)), f"{path}: a key appears twice"
    return out


def _shas(d: str) -> dict[str, str]:
    return {os.path.relpath(p, d): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(d, "*", "*.tar")))}


def test_samples_table_points_at_each_samples_bytes(demo_run):
    out = demo_run["out"]
    table = read_sample_stats(out)
    with open(os.path.join(out, "shards", "index.json")) as f:
        assert table.num_rows == json.load(f)["samples"]
    assert table["tokens"].null_count == 0
    rows = table.to_pylist()
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    for shard, rs in by_shard.items():
        path = os.path.join(out, "shards", shard)
        with tarfile.open(path) as tf:
            names = {key_of(m.name) for m in tf}
        assert names == {r["id"] for r in rs}
        with open(path, "rb") as f:
            for r in rs[:10]:
                f.seek(r["offset"])
                span = f.read(r["length"])
                with tarfile.open(fileobj=io.BytesIO(span + b"\0" * 1024)) as tf:
                    assert {key_of(m.name) for m in tf} == {r["id"]}


def test_emitted_stages_match_their_plans(plan, emitted, demo_run):
    table = read_sample_stats(demo_run["out"], ["source", "kind", "tokens"])
    largest: dict[tuple[str, str], int] = {}  # (stage, entry) -> tokens of its largest sample
    for st in plan["stages"]:
        samples = _read_stage(os.path.join(emitted, st["name"]))
        entry_of_source = {}
        for e in st["entries"]:
            for s in e["selector"].get("source", []):
                entry_of_source[s] = e["name"]
        tokens, count, repeats = Counter(), Counter(), Counter()
        for _, key, js in samples:
            name = entry_of_source.get(js["provenance"]["source"]) or next(
                e["name"] for e in st["entries"] if js["kind"] in e["selector"].get("kind", []))
            tokens[name] += js["tokens"]["tokens"]
            largest[(st["name"], name)] = max(largest.get((st["name"], name), 0), js["tokens"]["tokens"])
            count[name] += 1
            repeats[js["id"]] += 1
            assert key == js["id"] or key.startswith(js["id"] + "_r")
            for m in js.get("media", []):
                assert m["member"].startswith(key + ".")
        assert sum(count.values()) == st["planned_samples"]
        for e in st["entries"]:
            planned = e["tokens"]
            assert abs(tokens[e["name"]] - planned) <= 0.005 * planned, (st["name"], e["name"])
            assert count[e["name"]] == e["samples"]
            avail = e["available_units"]
            got = tokens[e["name"]] if st["unit"] == "tokens" else count[e["name"]]
            assert got <= e["max_epochs"] * avail * (1 + 1e-9), f"{e['name']} beyond its epoch cap"
        cap = max(e["max_epochs"] for e in st["entries"])
        assert max(repeats.values()) <= math.ceil(cap)
        with open(os.path.join(emitted, st["name"], "index.json")) as f:
            idx = json.load(f)
        assert {k: v["tokens"] for k, v in idx["entries"].items()} == dict(tokens)
    # the plan itself: entries that are neither capped nor coarse land within 0.5% of their share;
    # one the planner warned is too coarse (a sample is more than 0.5% of its share) lands within
    # one sample of it
    stage2 = next(s for s in plan["stages"] if s["name"] == "stage2")
    caps = {e["name"]: e["capped"] for e in stage2["entries"]}
    assert caps["interleaved"] and not caps["captions"]
    coarse = {w.split("/", 1)[1].split(":", 1)[0] for w in stage2["warnings"] if "too coarse" in w}
    for e in stage2["entries"]:
        if e["name"] in ("captions", "text", "vqa"):
            off = abs(e["units"] - e["desired_units"])
            if e["name"] in coarse:
                assert 0.005 * e["desired_units"] < off <= largest[("stage2", e["name"])], e
            else:
                assert off <= 0.005 * e["desired_units"], e
    assert any("interleaved" in w and "cap of 2" in w and "planned 2 epochs" in w for w in stage2["warnings"])
    assert sum(1 for _ in table.to_pylist()) == plan["stats_samples"]


def test_same_seed_same_bytes_other_seed_other_order(plan, emitted, tmp_path):
    again = str(tmp_path / "again")
    emit_plan(plan, again, log=lambda *a: None)
    assert _shas(again) == _shas(emitted)
    par = str(tmp_path / "parallel")
    emit_plan(plan, par, workers=2, log=lambda *a: None)
    assert _shas(par) == _shas(emitted)
    other = str(tmp_path / "other")
    emit_plan(plan, other, seed=plan["seed"] + 1, log=lambda *a: None)
    for st in plan["stages"]:
        a = [k for _, k, _ in _read_stage(os.path.join(emitted, st["name"]))]
        b = [k for _, k, _ in _read_stage(os.path.join(other, st["name"]))]
        assert Counter(a) == Counter(b)
        if len(a) > 2:
            assert a != b


def test_emitted_shards_are_what_webdataset_tarwriter_writes(emitted):
    import webdataset as wds

    for path in sorted(glob.glob(os.path.join(emitted, "stage2", "*.tar")))[:3]:
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0, user="reelforge", group="reelforge", mode=0o444) as tw:
            for s in wds.WebDataset(path, shardshuffle=False):
                tw.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
        with open(path, "rb") as f:
            assert f.read() == buf.getvalue()


def test_planning_reads_the_table_not_the_shards(demo_run, tmp_path):
    only = tmp_path / "stats-only"
    shutil.copytree(os.path.join(demo_run["out"], "samples"), only / "samples")
    plan = plan_mixture(load_mixture(DEMO), str(only))
    assert plan["stages"][0]["planned_samples"] > 0
    with pytest.raises(RecipeError, match="no shards folder"):
        emit_plan(plan, str(tmp_path / "out"), log=lambda *a: None)
    with pytest.raises(RecipeError, match="no per-sample statistics"):
        plan_mixture(load_mixture(DEMO), str(tmp_path))


def test_temperature_and_no_weights(demo_run):
    raw = {"name": "t", "stages": [{"name": "s", "target_tokens": 5000, "max_epochs": 10, "temperature": 100,
                                    "sources": [{"name": "text"}, {"name": "captions_wds"}]}]}
    st = plan_mixture(parse_mixture(raw), demo_run["out"])["stages"][0]
    shares = [e["share"] for e in st["entries"]]
    assert abs(shares[0] - shares[1]) < 0.01  # a high temperature flattens size-proportional shares
    raw["stages"][0].pop("temperature")
    st = plan_mixture(parse_mixture(raw), demo_run["out"])["stages"][0]
    sizes = [e["available_units"] for e in st["entries"]]
    assert abs(st["entries"][0]["share"] - sizes[0] / sum(sizes)) < 1e-6


@pytest.mark.parametrize("raw, field", [
    ({"stages": [{"name": "s", "sources": {"a": 1}}]}, "target_tokens"),
    ({"stages": [{"name": "s", "target_tokens": "lots", "sources": {"a": 1}}]}, "stages[0].target_tokens"),
    ({"stages": [{"name": "s", "target_tokens": 10, "sources": [{"name": "a", "weight": -1}]}]},
     "stages[0].sources[0].weight"),
    ({"stages": [{"name": "s", "target_tokens": 10, "sources": [{"name": "a", "weight": 1}, {"name": "b"}]}]},
     "weights to some entries"),
    ({"stages": [{"name": "s", "target_tokens": 10, "max_epochs": 0, "sources": {"a": 1}}]}, "max_epochs"),
    ({"stages": [{"name": "s", "target_tokens": 10, "sources": [{"name": "a", "mode": "dreaming"}]}]}, "mode"),
    ({"stages": [{"name": "s", "target_tokens": 10, "sources": {"a": 1}, "shuffle": 1}]}, "stages[0].shuffle"),
    ({"seed": "x", "stages": []}, "seed"),
])
def test_bad_mixtures_cost_one_sentence(raw, field):
    with pytest.raises(RecipeError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_mixture(raw)


def test_overlapping_entries_are_refused(demo_run):
    raw = {"stages": [{"name": "s", "target_tokens": 1000, "sources": [
        {"name": "a", "source": "text", "weight": 1}, {"name": "b", "kind": "text", "weight": 1}]}]}
    with pytest.raises(RecipeError, match="disjoint"):
        plan_mixture(parse_mixture(raw), demo_run["out"])


def test_shipped_recipes_parse():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(recipes_dir(), "*.yaml"))}
    assert {"stage0_vit.yaml", "stage1_projector.yaml", "stage2_multitask.yaml", "stage3_anneal.yaml", "sft.yaml",
            "mpo.yaml", "cold_start.yaml", "rl_prompts.yaml"} <= names
    for n in names:
        mix = load_mixture(os.path.join(recipes_dir(), n))
        assert mix.stages
    assert len(load_mixture(os.path.join(recipes_dir(), "stage3_anneal.yaml")).stages) >= 3
    cs = load_mixture(os.path.join(recipes_dir(), "cold_start.yaml")).stages[0]
    assert {e.name: e.weight for e in cs.entries}["non_thinking"] == 330000


def test_cli_plan_and_mix(demo_run, tmp_path, capsys):
    from reelforge.jobs.cli import main

    plan_path = str(tmp_path / "p" / "plan.json")
    assert main(["plan", DEMO, "--stats", demo_run["out"], "--out", plan_path]) == 0
    printed = capsys.readouterr().out
    assert "stage stage2" in printed and "warning:" in printed and "epochs" in printed
    assert os.path.getsize(plan_path.replace(".json", ".png")) > 1000
    assert main(["mix", plan_path, "--out", str(tmp_path / "o"), "--stage", "mpo"]) == 0
    assert os.path.exists(tmp_path / "o" / "mpo" / "index.json")
    assert main(["plan", str(tmp_path / "missing.yaml"), "--stats", demo_run["out"]]) == 2
    assert main(["mix", plan_path, "--out", str(tmp_path / "o"), "--stage", "nope"]) == 2


def test_caps_move_the_shortfall_to_uncapped_entries(tmp_path):
    """Water-filling on a synthetic table: B's weight asks for 5 epochs, the cap allows 2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reelforge.mixers.stats import STATS_SCHEMA

    rows = [{"id": f"a{i:04d}", "source": "A", "kind": "text", "tokens": 10 + i % 7} for i in range(1000)]
    rows += [{"id": f"b{i:04d}", "source": "B", "kind": "text", "tokens": 10} for i in range(100)]
    os.makedirs(tmp_path / "samples")
    pq.write_table(pa.Table.from_pylist(rows, schema=STATS_SCHEMA), tmp_path / "samples" / "p.parquet")
    raw = {"stages": [{"name": "s", "target_tokens": 10000, "max_epochs": 2,
                       "sources": [{"name": "A", "weight": 0.5}, {"name": "B", "weight": 0.5}]}]}
    st = plan_mixture(parse_mixture(raw), str(tmp_path))["stages"][0]
    a, b = st["entries"]
    assert b["capped"] and b["tokens"] == 2000 and b["max_repeats"] == 2 and b["epochs"] == 2.0
    assert not a["capped"] and abs(a["tokens"] - 8000) <= 0.005 * 8000
    assert any("B" in w and "cap of 2" in w and "gave the other" in w for w in st["warnings"])
    raw["stages"][0]["target_tokens"] = 100000  # more than both caps hold
    st = plan_mixture(parse_mixture(raw), str(tmp_path))["stages"][0]
    assert all(e["capped"] for e in st["entries"]) and any("cannot be met" in w for w in st["warnings"])


def test_min_scores_select_any_score_by_name_and_the_old_fields_are_aliases():
    import pyarrow as pa

    from reelforge.mixers.planner import entry_indices
    from reelforge.mixers.spec import Entry
    from reelforge.mixers.stats import STATS_SCHEMA

    scores = [{"clip": 0.4, "quality": 0.9}, {"clip": 0.1}, None, {"quality": 0.2, "text_quality": 0.8},
              {"clip": 0.35, "quality": 0.5, "vlm": 0.7}]
    table = pa.table({f.name: ([f"s{i}" for i in range(5)] if f.name == "id" else
                               scores if f.name == "scores" else [None] * 5) for f in STATS_SCHEMA},
                     schema=STATS_SCHEMA)

    def picked(**entry) -> list[int]:
        stage = parse_mixture({"stages": [{"name": "s", "target_samples": 10,
                                           "sources": [{"name": "e", "kind": "image_text", **entry}]}]})
        e = stage.stages[0].entries[0]
        return entry_indices(table, Entry.from_selector(e.name, {**e.selector(), "kind": []})).tolist()

    assert picked(min_scores={"clip": 0.3}) == [0, 4]
    assert picked(min_clip_score=0.3) == [0, 4]                       # the old spelling, same samples
    assert picked(min_scores={"clip": 0.3, "quality": 0.6}) == [0]
    assert picked(min_quality_score=0.5, min_scores={"clip": 0.3}) == [0, 4]
    assert picked(min_scores={"text_quality": 0.5}) == [3]            # a score no field names: a map key
    assert picked(min_scores={"vlm": 0.5}) == [4]
    with pytest.raises(RecipeError, match="min_scores"):
        parse_mixture({"stages": [{"name": "s", "target_samples": 1, "sources": [
            {"name": "e", "kind": "text", "min_quality_score": 0.5, "min_scores": {"quality": 0.4}}]}]})
    # a plan written before min_scores existed still rebuilds its entries
    assert Entry.from_selector("x", {"kind": ["text"], "min_quality_score": 0.5}).min_scores == {"quality": 0.5}
