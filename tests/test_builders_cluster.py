"""The data-task builders without a parity test of their own (`asr`, `asr_interleave`, `synth_ocr`,
`modes` by share with `emit: both`) derive the same samples under `local-cluster[2,1,1024]`, where
executors are separate processes, as on `local[2]`: same ids, parents, messages, meta and media bytes.
(`video_tasks` and `grounding` have theirs in their own test files.)"""

from __future__ import annotations

import json
import os

import pytest
import yaml

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    from reelforge.curation.demo_full import OCR_TEXTS, _math_rows, _speech_video
    from reelforge.curation.tiny_whisper import build_tiny_whisper

    root = tmp_path_factory.mktemp("builders")
    (root / "videos").mkdir()
    _speech_video(str(root / "videos" / "talk.mp4"), "One two three. The builders run on every executor alike.")
    (root / "videos" / "talk.txt").write_text("A Mandelbrot zoom with a voice.\n")
    (root / "ocr.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in OCR_TEXTS))
    (root / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _math_rows()))
    build_tiny_whisper(str(root / "whisper"))
    steps = [{"probe": {"timeout_s": 30}},
             {"asr": {"model": "whisper", "batch_size": 2, "device": "cpu"}},
             {"asr_interleave": {"max_segments": 4}},
             {"synth_ocr": {"seed": 3, "sources": ["ocr"], "width": 448, "font_size": 20}},
             {"modes": {"sources": {"math": {"thinking": 0.5, "non_thinking": 0.5}}, "emit": "both", "seed": 1}}]
    r = {"name": "builders", "seed": 0,
         "sources": [{"name": "videos", "format": "video_folder", "path": "videos/"},
                     {"name": "ocr", "format": "text", "path": "ocr.jsonl"},
                     {"name": "math", "format": "jsonl", "path": "math.jsonl"}],
         "steps": steps, "output": {"path": "out", "shards": {"max_samples": 100, "shuffle": False}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    return str(root / "recipe.yaml")


def _derived(out: str) -> dict[str, dict]:
    """The derived samples in the shards, without what names the run's folder."""
    from reelforge.curation.demo_full import shard_samples

    got = {}
    for _, js in shard_samples(os.path.join(out, "shards")):
        meta = js.get("meta") or {}
        if js.get("parent_id") is None and "asr" not in meta:
            continue
        got[js["id"]] = {"kind": js["kind"], "mode": js.get("mode"), "parent": js.get("parent_id"),
                         "messages": js.get("messages"), "text": js.get("text"), "meta": meta,
                         "media": [m.get("sha256") for m in js.get("media") or []]}
    return got


def test_builders_derive_the_same_samples_on_local_cluster(spark, local_cluster, recipe, tmp_path):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    out_local, out_cluster = str(tmp_path / "local"), str(tmp_path / "cluster")
    local = run_recipe(load_recipe(recipe, out=out_local), spark=spark, log=lambda *a: None)
    cluster = local_cluster.run(recipe, out_cluster)
    assert cluster["master"] == "local-cluster[2,1,1024]" and local["balanced"] and cluster["balanced"]
    a, b = _derived(out_local), _derived(out_cluster)
    tails = sorted(i.rsplit("@", 1)[1] for i in a if "@" in i)
    # the speech video (with meta.asr), its interleaved sample, 3 OCR sources x their tasks, 4 x 2 mode copies
    assert tails.count("thinking") == tails.count("non_thinking") == 4, tails
    assert "asr_interleave" in tails and sum(t.startswith("synth_ocr_") for t in tails) >= 4, tails
    talk = [v for v in a.values() if "asr" in v["meta"] and v["parent"] is None]
    assert len(talk) == 1 and talk[0]["meta"]["asr"]["segments"], talk
    assert a == b
