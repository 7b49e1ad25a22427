"""The schema is the single source from reader to trainer: every field of `Sample` that a row
sets comes out equal after the reader, the Spark job, the shard JSON, the samples table and the
training loader's parser; the fate fields (drop_*) come out in the ledger instead.

The test iterates `dataclasses.fields`, so a new field is covered the day it is added: the fill
step below gives every unset field a value of its type, and the field must then arrive
everywhere its declaration (`curation.schema.col`) says it goes. One Spark run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import tarfile
import typing

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from reelforge.curation import schema as S
from reelforge.curation.shards import SHARD_JSON_VERSION, ShardFile, ShardVersionError, encode_json, parse_sample_json


def _rows(path: str) -> list[dict]:
    return S.rows_of(pq.read_table(path))


def _work(out: str, step: str) -> str:
    (path,) = glob.glob(os.path.join(out, "_work", f"*_{step}"))
    return path


def _corpus(tmp_path) -> str:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "img" / "a.png")
    recs = [
        {"image": "img/a.png", "caption": "a red rectangle", "url": "https://example.com/a.png", "licence": "cc0"},
        {"prompt": "Which answer is better?", "chosen": "The first.", "rejected": "The second."},
        {"text": "a document the fill step drops, for the ledger"},
    ]
    with open(tmp_path / "m.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    recipe = {"name": "roundtrip", "seed": 0,
              "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"}],
              "steps": [{"probe": {"timeout_s": 30}}, {"roundtrip_fill": {}}],
              "output": {"path": "out", "shards": {"max_samples": 100, "shuffle": False}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "recipe.yaml")


def _fill_step():
    """A test-only step, defined here so Spark ships it to the workers by value. Every live row
    gets a value for each field nobody set (by its type); the image sample also derives a child
    (parent_id) and the text document leaves with every fate field set."""
    from reelforge.curation.schema import Media, Sample, drop, set_score
    from reelforge.curation.step import Step, register_step

    def value_for(tp, name: str):
        if typing.get_origin(tp) is typing.Union:
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        origin = typing.get_origin(tp)
        if origin is list:
            (inner,) = typing.get_args(tp)
            if dataclasses.is_dataclass(inner):
                return [fill_dc(inner, {}, name)]
            return [value_for(inner, name), value_for(inner, name + "x")]
        if origin is dict:
            return {f"{name}-a": 0.1 + 0.2, f"{name}-b": -2.5e-7}
        if tp is str:
            return f"{name}: é 中 \"quoted\"\n"
        if tp is int:
            return 1000 + len(name)
        if tp is float:
            return len(name) / 3.0
        if tp is bool:
            return True
        raise TypeError(f"the round-trip test has no value for {name}: {tp}")

    def fill_dc(cls, d: dict, prefix: str) -> dict:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if d.get(f.name) is None and not f.metadata.get("rebased") and f.name not in S.LEDGER_ONLY:
                d[f.name] = value_for(hints[f.name], f"{prefix}.{f.name}")
        return d

    @register_step("roundtrip_fill")
    class Fill(Step):
        def process(self, batch: list[dict]) -> list[dict]:
            out = []
            for row in batch:
                if row.get("drop_step") is None and row["kind"] == "text":
                    drop(row, self.name, "planted", "a planted drop, for the ledger", dup_of="f" * 24)
                elif row.get("drop_step") is None:
                    set_score(row, "clip", 0.1 + 0.2)
                    set_score(row, "quality", -1.5)
                    set_score(row, "a_score_no_code_knows", 2.0 ** -40)  # a new filter's name: nothing to declare
                    row["captions"] = [
                        {"text": "an older recaption", "model": "m-old", "prompt": "Describe.", "task": "caption"},
                        {"text": "a red rectangle on nothing", "model": "m-new", "prompt": "Describe it.",
                         "task": "caption"}]
                    # two sampled responses as the sample and reward steps leave them (issue 15)
                    row["responses"] = [
                        {"text": "<think>2 + 2 = 4</think><answer>4</answer>", "model": "m-policy", "seed": 0,
                         "mode": "thinking", "temperature": 1.0, "top_p": 0.95, "params": '{"max_new_tokens": 64}',
                         "answer": "4", "rewards": {"correct": 1.0, "format": 1.0, "repetition": 1.0 - 2.0 ** -30,
                                                    "judge": 0.1 + 0.2},
                         "reward": 2.75, "passed": True},
                        {"text": "5 5 5 5 5 5 5 5", "model": "m-policy", "seed": 1, "mode": "non_thinking",
                         "temperature": 0.7, "top_p": 1.0, "params": "not JSON: kept as written",
                         "answer": "5", "rewards": {"correct": 0.0, "format": 1.0}, "reward": 0.0, "passed": False}]
                    row["pass_rate"], row["difficulty"] = 0.5, "medium"
                    for m in row.get("media") or []:
                        fill_dc(Media, m, "media")
                    if row["kind"] == "image_text":
                        child = json.loads(json.dumps(row))
                        child.update(id=row["id"][:16] + "c0000001", source_key=row["source_key"] + "#child",
                                     parent_id=row["id"])
                        out.append(fill_dc(Sample, child, "sample"))
                out.append(row)
            return out

    return Fill


def test_every_field_round_trips_from_reader_to_loader(spark, tmp_path, monkeypatch):
    import webdataset as wds

    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe
    from reelforge.mixers.stats import read_sample_stats
    from reelforge.training.loader import Encoder, caption_text

    _fill_step()
    recipe = _corpus(tmp_path)
    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(recipe, out=out), spark=spark, log=lambda *a: None)
    assert (rep["inputs"], rep["derived"], rep["kept"], rep["dropped"]) == (3, 1, 3, 1) and rep["balanced"]

    # the reader: what the manifest says, in the schema's fields
    ingest = {r["source_key"]: r for r in _rows(_work(out, "ingest"))}
    img, pref = ingest["m.jsonl:1"], ingest["m.jsonl:2"]
    assert img["kind"] == "image_text" and img["text"] == "a red rectangle"
    assert img["media"][0]["uri"] == os.path.realpath(tmp_path / "img" / "a.png")
    assert json.loads(img["meta"]) == {"url": "https://example.com/a.png", "licence": "cc0"}
    assert pref["kind"] == "preference" and (pref["chosen"], pref["rejected"]) == ("The first.", "The second.")
    assert pref["messages"] == [{"role": "user", "content": "Which answer is better?"}]

    # the Spark job's last stage is what every later format must reproduce
    final = {r["id"]: r for r in _rows(_work(out, "roundtrip_fill"))}
    kept = {i: r for i, r in final.items() if r["drop_step"] is None}
    (dropped,) = [r for r in final.values() if r["drop_step"] is not None]
    (child,) = [r for r in kept.values() if r["parent_id"] is not None]

    # the shards: the raw JSON, the shard module's parser and the loader's
    shard_json, parsed, loaded, urls = {}, {}, {}, {}
    tars = sorted(glob.glob(os.path.join(out, "shards", "*.tar")))
    for raw in wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, workersplitter=None):
        obj = json.loads(raw["json"])
        shard_json[obj["id"]] = obj
        parsed[obj["id"]] = parse_sample_json(raw["json"], raw["__url__"])
        loaded[obj["id"]] = Encoder.parse(raw)
        urls[obj["id"]] = raw["__url__"]
    assert set(shard_json) == set(kept)
    assert all(o["version"] == SHARD_JSON_VERSION for o in shard_json.values())
    table = {r["id"]: r for r in S.rows_of(read_sample_stats(out))}
    assert set(table) == set(kept)
    ledger = {r["id"]: r for r in _rows(os.path.join(out, "ledger"))}

    for f in dataclasses.fields(S.Sample):
        name = f.name
        if name in S.LEDGER_ONLY:
            assert dropped[name] is not None, f"{name}: the planted drop should set it"
            assert ledger[dropped["id"]][S.LEDGER_FIELDS[name]] == dropped[name], f"{name} is not in the ledger"
            assert all(name not in json.dumps(o) for o in shard_json.values()), f"{name} leaked into the shard"
            continue
        assert name in S.SHARD_FIELDS, f"{name} has no destination: declare it with curation.schema.col"
        assert child[name] is not None, f"{name}: the fill step left it unset"
        for sid, want in kept.items():
            for got, what in ((parsed[sid], "shard JSON"), (loaded[sid], "loader")):
                if name == "media" and want[name] is not None:
                    _same_media(want[name], got[name], sid, urls[sid])
                else:
                    assert got[name] == want[name], f"{name} of {sid}: {what} has {got[name]!r}, want {want[name]!r}"
            if name in S.TABLE_FIELDS:
                assert table[sid][name] == want[name], f"{name} of {sid}: samples table has {table[sid][name]!r}"
            if name in S.LEDGER_FIELDS:
                assert ledger[sid][S.LEDGER_FIELDS[name]] == want[name], f"{name} of {sid} differs in the ledger"

    # nested records: every field of Media, Message, Caption, Response reached the child and came back
    for cls, field in ((S.Media, "media"), (S.Message, "messages"), (S.Caption, "captions"),
                       (S.Response, "responses")):
        for sub in dataclasses.fields(cls):
            if sub.metadata.get("rebased"):
                continue  # checked by _same_media: they point at the shard now
            assert all(e[sub.name] is not None for e in child[field]), f"{field}.{sub.name}: fill step left it unset"

    # the responses and their rewards by name, in the loader's view and the schema's dataclasses
    c = loaded[child["id"]]
    r0, r1 = c["responses"]
    assert r0["rewards"]["judge"] == 0.1 + 0.2 and r0["passed"] is True and r1["passed"] is False
    assert r0["params"] == '{"max_new_tokens": 64}' and r1["params"] == "not JSON: kept as written"
    assert shard_json[child["id"]]["responses"][0]["params"] == {"max_new_tokens": 64}  # an object in the shard
    assert S.row_to_sample(c).responses[1] == S.Response(**child["responses"][1])
    assert (table[child["id"]]["pass_rate"], table[child["id"]]["difficulty"]) == (0.5, "medium")

    # the scores by name, and the loader's caption policies over the recaptions
    assert S.get_score(c, "clip") == 0.1 + 0.2 and S.get_score(c, "quality") == -1.5
    for sid in kept:
        assert S.get_score(loaded[sid], "a_score_no_code_knows") == 2.0 ** -40
        assert table[sid]["scores"]["a_score_no_code_knows"] == 2.0 ** -40
    assert caption_text(c, "original", 0) == child["text"]
    assert caption_text(c, "latest", 0) == child["captions"][-1]["text"]
    assert caption_text(c, "model:m-old", 0) == "an older recaption"
    assert caption_text(c, "model:nobody", 0) == child["text"]
    picks = {caption_text({**c, "id": f"x{i}"}, "random", 7) for i in range(40)}
    assert picks == {child["text"]} | {k["text"] for k in child["captions"]}
    assert caption_text(c, "random", 7) == caption_text(c, "random", 7)


def _same_media(want: list[dict], got: list[dict], sid: str, url: str) -> None:
    assert len(got) == len(want)
    for i, (w, g) in enumerate(zip(want, got)):
        for f in dataclasses.fields(S.Media):
            if f.name == "uri":
                assert g["uri"] == url, "a medium read from the shard is referenced by the shard"
            elif f.name == "member":
                assert g["member"].startswith(sid + ".") and g["member"].split(".")[-1] in ("png", "jpg")
            elif f.metadata.get("rebased"):
                assert g[f.name] is None
            else:
                assert g[f.name] == w[f.name], f"media[{i}].{f.name} of {sid}: {g[f.name]!r} != {w[f.name]!r}"


def _tar(path, objs: list[dict]) -> str:
    sf = ShardFile(str(path))
    for o in objs:
        sf.write({"__key__": o["id"], "json": encode_json(o)}, "s")
    sf.close()
    return str(path)


def test_version_1_shards_load_and_newer_majors_are_refused(tmp_path):
    from reelforge.training.loader import Encoder, resolve_shard_set

    v1 = {"version": 1, "id": "a1", "kind": "text", "text": "old",
          "provenance": {"source": "s", "key": "k", "location": "/x"},
          "tokens": {"text_tokens": 3, "visual_tokens": 0, "tokens": 3},
          "scores": {"clip_score": 0.25, "quality_score": 0.5}}
    _tar(tmp_path / "old.tar", [v1])
    ss = resolve_shard_set("old", [str(tmp_path / "old.tar")])
    with tarfile.open(ss.urls[0]) as tf:
        raw = {"json": tf.extractfile("a1.json").read(), "__url__": ss.urls[0]}
    s = Encoder.parse(raw)
    assert s["scores"] == {"clip": 0.25, "quality": 0.5} and s["tokens"] == 3 and s["source"] == "s"
    assert s["captions"] is None and s["parent_id"] is None

    for v in (3, "3.0"):
        p = _tar(tmp_path / f"new-{v}.tar", [{**v1, "version": v}])
        with pytest.raises(ShardVersionError) as e:
            resolve_shard_set("new", [p])
        msg = str(e.value)
        assert p in msg and repr(v) in msg and "versions 1 to 2" in msg and msg.count(". ") == 0
    assert parse_sample_json({**v1, "version": "2.7", "scores": {"clip": 1.0}})["scores"] == {"clip": 1.0}


def test_demo_samples_table_agrees_with_the_shards_on_tokens_and_scores(demo_run):
    """Acceptance (issue 12): what the planner reads equals what the trainer reads, per id."""
    import webdataset as wds

    from reelforge.mixers.stats import read_sample_stats

    out = demo_run["out"]
    table = {r["id"]: r for r in S.rows_of(read_sample_stats(out))}
    tars = sorted(glob.glob(os.path.join(out, "shards", "*.tar")))
    seen = 0
    for raw in wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, workersplitter=None):
        s = parse_sample_json(raw["json"], raw["__url__"])
        t = table[s["id"]]
        for k in ("text_tokens", "visual_tokens", "tokens", "scores"):
            assert t[k] == s[k], f"{k} of {s['id']}: table {t[k]!r}, shard {s[k]!r}"
        assert t["shard"] == os.path.basename(raw["__url__"])
        seen += 1
    assert seen == len(table) > 0
    assert sum(t["tokens"] or 0 for t in table.values()) > 0
