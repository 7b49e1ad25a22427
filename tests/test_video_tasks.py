"""The video_tasks step: temporal tasks whose answers are right by construction on planted videos,
deterministic for a seed, independent of batching, balanced in the ledger, and the same on a
local-cluster as on local[2].

Planted videos (ffmpeg lavfi, 64x48 at 25 fps):
- ramp: one shot, grey, luma 16 + 2N at frame N: a frame's brightness says when it was taken;
- shots: three coloured shots of 2.0, 1.6 and 2.4 s (cuts at 2.0 and 3.6 s), a slow luma ramp in each;
- duo: two coloured shots of 1.2 and 1.8 s (cut at 1.2 s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

FPS = 25
SHOTS = {"shots": [(2.0, (60, 200)), (1.6, (200, 60)), (2.4, (60, 60))],
         "duo": [(1.2, (200, 200)), (1.8, (90, 160))]}
CAPTIONS = {"shots": ["a purple screen", "a green screen", "a dark teal screen"],
            "duo": ["a pink screen", "a blue screen"]}


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


def _segment(d: float, lum: str, cb: int, cr: int) -> list[str]:
    return ["-f", "lavfi", "-i", f"color=c=black:s=64x48:r={FPS}:d={d},format=yuv420p,"
                                 f"geq=lum='{lum}':cb={cb}:cr={cr}"]


def _true_spans(name: str) -> list[tuple[float, float]]:
    t, out = 0.0, []
    for d, _ in SHOTS[name]:
        out.append((t, t + d))
        t += d
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("video_tasks")
    vids = root / "videos"
    vids.mkdir()
    _ff(*_segment(4, "16+2*N", 128, 128), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(vids / "ramp.mp4"))
    (vids / "ramp.txt").write_text("a grey screen that brightens")
    for name, segs in SHOTS.items():
        args: list[str] = []
        for i, (d, (cb, cr)) in enumerate(segs):
            args += _segment(d, f"{70 + 30 * i}+N", cb, cr)
        n = len(segs)
        _ff(*args, "-filter_complex", "".join(f"[{i}]" for i in range(n)) + f"concat=n={n}:v=1:a=0",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", str(vids / f"{name}.mp4"))
        shots = [{"start": a, "end": b, "caption": c} for (a, b), c in zip(_true_spans(name), CAPTIONS[name])]
        (vids / f"{name}.json").write_text(json.dumps({"caption": f"{name} video", "shots": shots}))
    return str(root)


def _rows(corpus: str, ids: dict | None = None) -> list[dict]:
    """The corpus's videos as probed rows (what the probe step leaves), in name order; `ids`: the
    run's ids by source key."""
    from reelforge.curation.schema import Media, empty_row, make_id
    from reelforge.curation.video import probe_video

    rows = []
    for name in ("duo", "ramp", "shots"):
        path = os.path.join(corpus, "videos", f"{name}.mp4")
        info = probe_video(path)
        side = os.path.join(corpus, "videos", f"{name}.json")
        meta = open(side).read() if os.path.exists(side) else None
        r = empty_row()
        r.update(id=(ids or {}).get(f"{name}.mp4") or make_id("v", f"{name}.mp4", name), kind="video_text",
                 source="v", source_key=f"{name}.mp4", source_location=path, text=name, meta=meta)
        m = dict.fromkeys(f.name for f in dataclasses.fields(Media))
        m.update(kind="video", uri=os.path.realpath(path))
        m.update({k: info[k] for k in ("format", "width", "height", "duration", "fps", "frames", "codec")})
        r["media"] = [m]
        rows.append(r)
    return rows


def _run(rows: list[dict], workdir: str, batch: int | None = None, pool_rows: list[dict] | None = None,
         **params) -> list[dict]:
    """The step in plain Python over copies of `rows`; its pool from `pool_rows` (default: the same rows),
    as the engine builds it."""
    import copy

    from reelforge.curation.step import StepContext
    from reelforge.mixers.video_tasks import VideoTasks, candidates_from_rows

    step = VideoTasks(**params)
    step.set_candidates(candidates_from_rows(pool_rows or rows, step.seed, step.pool))
    step.setup(StepContext(workdir=workdir))
    rows = copy.deepcopy(rows)
    batch = batch or len(rows)
    out: list[dict] = []
    for i in range(0, len(rows), batch):
        out += step.process(rows[i:i + batch])
    return out


def _children(out: list[dict], task: str | None = None) -> dict[str, dict]:
    return {r["id"]: r for r in out if r.get("parent_id") and
            (task is None or json.loads(r["meta"])["video_task"]["name"] == task)}


def _task(child: dict) -> dict:
    return json.loads(child["meta"])["video_task"]


def _luma(path: str) -> float:
    return float(np.asarray(Image.open(path).convert("L"), np.float64).mean())


def test_frame_order_answer_is_the_true_permutation(corpus, tmp_path):
    """On the ramp a frame's brightness is its time: the order read back from the JPEGs is the answer."""
    from reelforge.mixers.chat import validate_sample

    rows = [r for r in _rows(corpus) if r["source_key"] == "ramp.mp4"]
    answers = set()
    for seed in range(6):
        for k in (3, 4, 6):
            (child,) = _children(_run(rows, str(tmp_path), tasks=["frame_order"], seed=seed, k=k)).values()
            assert validate_sample(child) == [] and child["mode"] == "non_thinking"
            lumas = [_luma(m["uri"]) for m in child["media"]]
            assert len(lumas) == k and all(m["kind"] == "image" and m["format"] == "jpeg" for m in child["media"])
            # the frame number each shown image was decoded from, read from its pixels (luma 16 + 2N, full range)
            seen = [round((lum * 219 / 255) / 2) for lum in lumas]
            t = _task(child)
            assert [abs(s - t["frame_indices"][r]) <= 1 for s, r in zip(seen, t["shown"])] == [True] * k
            order = sorted(range(k), key=lambda j: lumas[j])  # shown positions, earliest first
            expected = ", ".join(str(j + 1) for j in order)
            assert child["messages"][-1]["content"] == expected == t["answer"]
            assert expected != ", ".join(str(j + 1) for j in range(k))  # never shown in order
            assert child["messages"][0]["content"].count("<image>") == k
            assert all("/video_tasks/" in m["uri"] and "ramp" not in os.path.basename(m["uri"])
                       for m in child["media"])
            answers.add(expected)
    assert len(answers) > 6  # the shuffles differ by seed


def test_grounding_and_dense_captions_match_planted_cuts(corpus, tmp_path):
    from reelforge.mixers.chat import to_chat, validate_chat
    from reelforge.mixers.video_tasks import span_text

    out = _run(_rows(corpus), str(tmp_path), tasks=["temporal_grounding", "dense_captions"], seed=1)
    frame = 1.0 / FPS
    for name in ("shots", "duo"):
        truth = _true_spans(name)
        parent = next(r for r in out if r["source_key"] == f"{name}.mp4")
        assert (parent["drop_step"], parent["drop_reason"]) == ("video_tasks", "split_into_video_tasks")
        kids = [c for c in out if c.get("parent_id") == parent["id"]]
        g = next(c for c in kids if _task(c)["name"] == "temporal_grounding")
        d = next(c for c in kids if _task(c)["name"] == "dense_captions")
        gt, dt = _task(g), _task(d)
        assert len(gt["shots"]) == len(truth)
        assert all(abs(a - x) <= frame and abs(b - y) <= frame for (a, b), (x, y) in zip(gt["shots"], truth))
        i = gt["shot"]
        assert abs(gt["span"][0] - truth[i][0]) <= frame and abs(gt["span"][1] - truth[i][1]) <= frame
        assert gt["description"] == CAPTIONS[name][i] and gt["described_by"] == "meta"
        assert CAPTIONS[name][i] in g["messages"][0]["content"]
        dur = parent["media"][0]["duration"]
        assert g["messages"][-1]["content"] == f"It happens at {span_text(*gt['span'], dur)}."
        lines = d["messages"][-1]["content"].split("\n")
        assert [s[2] for s in dt["shots"]] == CAPTIONS[name]
        assert lines == [f"{span_text(a, b, dur)} {c}" for a, b, c in dt["shots"]]
        assert all(abs(a - x) <= frame and abs(b - y) <= frame for (a, b, _), (x, y) in zip(dt["shots"], truth))
        for c in (g, d):
            assert c["mode"] == "video" and c["media"] == parent["media"] and c["kind"] == "conversation"
            assert validate_chat(to_chat(c["messages"]), "video", 0, 1, dur) == []
    # the ramp is one shot: no grounding, and no captions for dense_captions; it stays alive, untouched
    ramp = next(r for r in out if r["source_key"] == "ramp.mp4")
    assert ramp["drop_step"] is None and not [c for c in out if c.get("parent_id") == ramp["id"]]
    # keep_parent: the parent stays alive beside its children
    rows = [r for r in _rows(corpus) if r["source_key"] == "duo.mp4"]
    out = _run(rows, str(tmp_path), tasks=["dense_captions"], seed=1, keep_parent=True)
    assert len(out) == 2 and all(r["drop_step"] is None for r in out) and out[1]["parent_id"] == out[0]["id"]


def test_candidate_pool_is_the_same_in_spark_as_in_python(spark, corpus):
    """The engine's pool (ranked and cut in Spark) equals the plain-Python pool, on any partitioning."""
    from reelforge.curation.schema import drop
    from reelforge.jobs.spark import sample_frame
    from reelforge.jobs.video_tasks import gather_candidates
    from reelforge.mixers.video_tasks import VideoTasks, candidates_from_rows

    base = _rows(corpus)
    rows = [dict(base[i % 3], id=f"v{i:02d}") for i in range(24)]
    rows.append(drop(dict(base[0], id="dropped"), "quality", "low"))
    rows.append(dict(base[0], id="image", media=[dict(base[0]["media"][0], kind="image")]))
    rows.append(dict(base[0], id="conv", kind="conversation"))
    df = sample_frame(spark, rows)
    for pool, seed, parts in [(2, 0, 1), (5, 3, 3), (100, 3, 4)]:
        step = VideoTasks(pool=pool, seed=seed)
        got = gather_candidates(step, df.repartition(parts))
        want = candidates_from_rows(rows, seed, pool)
        assert got == want and len(got) == min(pool, 24)
    assert [c["id"] for c in candidates_from_rows(rows, 0, 5)] != [c["id"] for c in candidates_from_rows(rows, 1, 5)]


def test_clip_match_true_clip_comes_from_the_video(corpus, tmp_path):
    """The ramp is the only grey video: of its candidates exactly the answer's clip is grey and its first
    frame has the ramp's brightness at the clip's start; the others are cut from the coloured videos."""
    rows = _rows(corpus)
    ramp_id = next(r["id"] for r in rows if r["source_key"] == "ramp.mp4")
    from reelforge.curation.video import decode_frames

    letters = set()
    for seed in range(4):
        out = _run([rows[1]], str(tmp_path / str(seed)), pool_rows=rows, tasks=["clip_match"], seed=seed,
                   n_candidates=3)
        kids = _children(out)
        assert len(kids) == 1
        c = kids[f"{ramp_id}@clip_match-s{seed}"]
        t = _task(c)
        assert c["messages"][0]["content"].count("<video>") == 4 and len(c["media"]) == 4
        assert c["media"][0] == rows[1]["media"][0]
        grey = []
        for m in c["media"][1:]:
            f = decode_frames(m["uri"], [0]).astype(np.float64)[0]
            grey.append(float(np.abs(f - f.mean(axis=2, keepdims=True)).mean()) < 3)
            assert abs(m["duration"] - 2.0) < 0.1
        answer = c["messages"][-1]["content"]
        assert grey == [L == answer for L in "ABC"]
        true = next(x for x in t["clips"] if x["letter"] == answer)
        assert true["from"] == ramp_id and {x["from"] for x in t["clips"]} == {r["id"] for r in rows}
        first = decode_frames(c["media"]["ABC".index(answer) + 1]["uri"], [0])[0].mean() * 219 / 255
        assert abs(first / 2 - true["start"] * FPS) <= 1.5  # the frame at the clip's start
        letters.add(answer)
    assert len(letters) > 1


def test_same_seed_same_children_any_batching_other_seed_differs(corpus, tmp_path):
    rows = _rows(corpus)
    kw = {"n_candidates": 3}
    a = _children(_run(rows, str(tmp_path / "a"), seed=5, **kw))
    b = _children(_run(list(reversed(rows)), str(tmp_path / "a"), batch=1, seed=5, **kw))
    assert len(a) == 10 and sorted(a) == sorted(b)  # frame_order x 3, clip_match x 3, grounding x 2 + dense x 2
    for cid in a:
        assert a[cid] == b[cid]  # ids, answers, media files and their hashes
    c = _children(_run(rows, str(tmp_path / "c"), seed=6, tasks=["frame_order", "clip_match"], **kw))
    assert len(c) == 6 and set(c).isdisjoint(a)
    fo = [cid for cid in a if "@frame_order" in cid]
    assert any(_task(a[cid])["frame_indices"] != _task(c[cid.replace("-s5", "-s6")])["frame_indices"] for cid in fo)
    assert [_task(a[x])["clips"] for x in sorted(a) if "@clip_match" in x] != \
           [_task(c[x])["clips"] for x in sorted(c) if "@clip_match" in x]


def test_bad_videos_and_bad_params(corpus, tmp_path):
    from reelforge.mixers.video_tasks import VideoTasks

    rows = _rows(corpus)
    bad = dict(rows[1], id="broken", source_key="broken.mp4")
    trunc = tmp_path / "broken.mp4"
    data = open(rows[1]["media"][0]["uri"], "rb").read()
    trunc.write_bytes(b"\0" * 64 + data[len(data) // 3:])
    bad["media"] = [dict(rows[1]["media"][0], uri=str(trunc))]
    gone = dict(rows[1], id="gone", source_key="gone.mp4", media=[dict(rows[1]["media"][0], uri=str(tmp_path / "no"))])
    unprobed = dict(rows[1], id="unprobed", media=[{"kind": "video", "uri": rows[1]["media"][0]["uri"]}])
    out = _run([bad, gone, unprobed], str(tmp_path), tasks=["frame_order", "temporal_grounding"],
               seed=0)
    by = {r["id"]: r for r in out}
    assert len(out) == 3
    assert by["broken"]["drop_step"] == "video_tasks"
    assert by["broken"]["drop_reason"] in ("corrupt_video", "decode_error", "frame_out_of_range")
    assert (by["gone"]["drop_step"], by["gone"]["drop_reason"]) == ("video_tasks", "missing_file")
    assert by["unprobed"]["drop_step"] is None  # not probed: passes untouched
    for params, says in [({"tasks": ["shuffle"]}, "`tasks`"), ({"k": 1}, "`k`"), ({"n_candidates": 1}, "n_candidates"),
                         ({"seed": "x"}, "`seed`"), ({"model": str(tmp_path)}, "`model`"),
                         ({"timeout_s": 0}, "timeout_s")]:
        with pytest.raises(ValueError, match=says):
            VideoTasks(**params)
    with pytest.raises(RuntimeError, match="clip_match"):
        VideoTasks(tasks=["clip_match"]).setup(None)


def test_a_failing_task_costs_that_task_only(corpus, tmp_path, monkeypatch):
    from reelforge.mixers.video_tasks import VideoTasks

    def boom(self, row, src, shots):
        raise RuntimeError("planted")

    monkeypatch.setattr(VideoTasks, "_frame_order", boom)
    rows = [r for r in _rows(corpus) if r["source_key"] == "duo.mp4"]
    out = _run(rows, str(tmp_path), tasks=["frame_order", "dense_captions"])
    assert [_task(c)["name"] for c in out[1:]] == ["dense_captions"]
    assert out[0]["drop_reason"] == "split_into_video_tasks"
    assert "frame_order: error: RuntimeError: planted" in out[0]["drop_detail"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    from reelforge.curation.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(str(tmp_path_factory.mktemp("vlm") / "tiny-qwen2_5-vl"))


@pytest.mark.slow
def test_model_describes_shots(corpus, tiny_vlm, tmp_path):
    """With `model`, each shot's description is the VLM's greedy caption of that shot's frames."""
    from PIL import Image as PImage

    from reelforge.curation.video import decode_frames
    from reelforge.curation.vlm import load_vlm
    from reelforge.mixers.chat import validate_sample
    from reelforge.mixers.video_tasks import SHOT_PROMPT, VideoTasks

    rows = [r for r in _rows(corpus) if r["source_key"] == "shots.mp4"]
    for r in rows:
        r["meta"] = None  # no captions from meta: the model's only
    out = _run(rows, str(tmp_path), tasks=["dense_captions", "temporal_grounding"], model=tiny_vlm,
               max_new_tokens=6)
    kids = _children(out)
    d = next(c for c in kids.values() if _task(c)["name"] == "dense_captions")
    spans = [(a, b) for a, b, _ in _task(d)["shots"]]
    idx = VideoTasks(tasks=["dense_captions"]).shot_frame_indices(rows[0], spans)
    vlm = load_vlm(tiny_vlm)
    src = rows[0]["media"][0]["uri"]
    want = []
    for ii in idx:
        frames = [PImage.fromarray(f) for f in decode_frames(src, ii)]
        want += vlm.generate(vlm.encode([SHOT_PROMPT], [[("video", frames)]]), max_new_tokens=6)
    assert [c for _, _, c in _task(d)["shots"]] == want and all(want)
    assert _task(d)["described_by"] == "model" and _task(d)["model"] == tiny_vlm
    assert all(validate_sample(c) == [] for c in kids.values())
    (g,) = [c for c in kids.values() if _task(c)["name"] == "temporal_grounding"]
    assert len(set(want)) == 3 and _task(g)["description"] == want[_task(g)["shot"]]
    assert _task(g)["described_by"] == "model"


def _recipe(corpus: str, out: str) -> str:
    recipe = {"name": "video_tasks", "sources": [{"name": "v", "format": "video_folder", "path": "videos/"}],
              "steps": [{"probe": {}}, {"video_tasks": {"seed": 2, "n_candidates": 3, "k": 4}}],
              "output": {"path": out, "shards": {"max_samples": 4}}}
    path = os.path.join(corpus, f"recipe-{os.path.basename(out)}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def _check_run(out: str, report: dict) -> dict[str, dict]:
    """The ledger balances, every child is kept and reaches a shard with its answer; returns the
    children's shard JSON by id."""
    import webdataset as wds

    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    kids = {r["id"]: r for r in ledger if r["parent_id"]}
    assert report["inputs"] == 3 and report["derived"] == len(kids) == 10 and report["balanced"]
    assert report["kept"] + report["dropped"] == 13
    assert all(r["fate"] == "kept" for r in kids.values())
    parents = {r["id"]: r for r in ledger if not r["parent_id"]}
    assert all((p["step"], p["reason"]) == ("video_tasks", "split_into_video_tasks") for p in parents.values())
    row = next(s for s in report["steps"] if s["step"] == "video_tasks")
    assert (row["in"], row["dropped"], row["derived"], row["out"]) == (3, 3, 10, 10)
    shard = {}
    for s in wds.WebDataset(sorted(os.path.join(out, "shards", p) for p in os.listdir(os.path.join(out, "shards"))
                                   if p.endswith(".tar")), shardshuffle=False):
        j = json.loads(s["json"])
        if j.get("parent_id"):
            shard[j["id"]] = j
            assert j["meta"]["video_task"]["answer"] == j["messages"][-1]["content"]
            assert len(j["media"]) == {"frame_order": 4, "clip_match": 4}.get(j["meta"]["video_task"]["name"], 1)
    assert set(shard) == set(kids)
    return shard


def _same_as_plain(out: str, shard: dict[str, dict], corpus: str, tmp_path) -> None:
    """The run's children equal the plain-Python step's over the same probed rows (ids, answers, draws)."""
    ids = {r["source_key"]: r["id"] for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()
           if not r["parent_id"]}
    plain = _children(_run(_rows(corpus, ids), str(tmp_path / "plain"), seed=2, n_candidates=3, k=4))
    assert set(plain) == set(shard)
    for cid, c in plain.items():
        t = _task(c)
        assert shard[cid]["meta"]["video_task"] == t
        assert shard[cid]["messages"] == c["messages"]


def test_spark_run_balances_and_children_reach_the_shards(spark, corpus, tmp_path):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    out = str(tmp_path / "local")
    report = run_recipe(load_recipe(_recipe(corpus, out), out=out), spark=spark, log=lambda *a: None)
    shard = _check_run(out, report)
    _same_as_plain(out, shard, corpus, tmp_path)


def test_local_cluster_derives_the_same_children(local_cluster, corpus, tmp_path):
    out = str(tmp_path / "cluster")
    report = local_cluster.run(_recipe(corpus, out), out)
    assert report["master"] == "local-cluster[2,1,1024]"
    shard = _check_run(out, report)
    _same_as_plain(out, shard, corpus, tmp_path)
