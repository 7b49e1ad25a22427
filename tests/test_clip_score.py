"""CLIP scores written by the Spark job equal plain open_clip's on the same model and inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from reelforge.curation.schema import get_score
from reelforge.curation.tiny_clip import build_tiny_clip


def test_spark_scores_equal_plain_open_clip(spark, tmp_path):
    import open_clip
    import torch

    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    cfg_dir, ckpt = build_tiny_clip(str(tmp_path / "model"))
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        im = Image.effect_noise((48 + i, 40), 40 + i).convert("RGB")
        im.save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"a noisy picture number {i}"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "clip", "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"}],
              "steps": [{"probe": {}},
                        {"clip": {"model": "reelforge-tiny-clip", "pretrained": "model/reelforge-tiny-clip.pt",
                                  "model_config": "model/reelforge-tiny-clip.json", "batch_size": 5,
                                  "device": "cpu"}}],
              "output": {"path": "out", "shards": {"max_samples": 100}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(str(tmp_path / "recipe.yaml"), out=out), spark=spark, log=lambda *a: None)
    assert rep["kept"] == 12
    scored = pq.read_table(os.path.join(out, "_work", "02_clip")).to_pylist()
    got = {r["source_key"]: get_score(r, "clip") for r in scored}

    model, _, pre = open_clip.create_model_and_transforms("reelforge-tiny-clip", pretrained=ckpt)
    model.eval()
    tok = open_clip.get_tokenizer("reelforge-tiny-clip")
    with torch.no_grad():
        ims = torch.stack([pre(Image.open(tmp_path / r["image"]).convert("RGB")) for r in rows])
        fi = torch.nn.functional.normalize(model.encode_image(ims), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(tok([r["caption"] for r in rows])), dim=-1)
    want = (fi * ft).sum(-1).numpy()
    for i in range(12):
        assert abs(got[f"m.jsonl:{i + 1}"] - want[i]) < 1e-5
    assert np.std(want) > 0  # the scores differ: the comparison means something

    # percentile per source: the lowest quarter leaves, as low_clip_percentile
    recipe["steps"][1]["clip"]["percentile"] = 25
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rep = run_recipe(load_recipe(str(tmp_path / "recipe.yaml"), out=str(tmp_path / "p")), spark=spark,
                     log=lambda *a: None)
    ledger = pq.read_table(str(tmp_path / "p" / "ledger")).to_pylist()
    low = sorted(r["source_key"] for r in ledger if r["reason"] == "low_clip_percentile")
    order = sorted(range(12), key=lambda i: want[i])
    assert low == sorted(f"m.jsonl:{i + 1}" for i in order[:len(low)]) and 2 <= len(low) <= 4
    assert rep["balanced"]


@pytest.mark.cluster
@pytest.mark.spark
def test_local_cluster_scores_and_captions_equal_local(spark, local_cluster, tmp_path):
    """Separate executor processes load the models themselves and write the same CLIP scores,
    VLM judge scores and recaptions as local[2]."""
    from reelforge.curation.tiny_vlm import build_tiny_vlm
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    build_tiny_clip(str(tmp_path / "model"))
    build_tiny_vlm(str(tmp_path / "vlm"))
    (tmp_path / "img").mkdir()
    with open(tmp_path / "m.jsonl", "w") as f:
        for i in range(6):
            Image.effect_noise((40, 40 + i), 30 + i).convert("RGB").save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"img/{i}.png", "caption": f"noise {i}"}) + "\n")
    recipe = {"name": "clip", "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"}],
              "steps": [{"probe": {}},
                        {"clip": {"model": "reelforge-tiny-clip", "pretrained": "model/reelforge-tiny-clip.pt",
                                  "model_config": "model/reelforge-tiny-clip.json", "device": "cpu"}},
                        {"vlm_judge": {"model": "vlm", "device": "cpu", "batch_size": 4}},
                        {"recaption": {"model": "vlm", "device": "cpu", "batch_size": 4, "max_new_tokens": 8}}],
              "output": {"path": "out", "shards": {"max_samples": 100}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(str(path), out=str(tmp_path / "local")), spark=spark, log=lambda *a: None)
    local_cluster.run(path, tmp_path / "local-cluster")
    scores, vlm = {}, {}
    for out in (str(tmp_path / "local"), str(tmp_path / "local-cluster")):
        scores[out] = {r["source_key"]: get_score(r, "clip")
                       for r in pq.read_table(os.path.join(out, "_work", "02_clip")).to_pylist()}
        vlm[out] = {r["source_key"]: (get_score(r, "vlm"), r["captions"])
                    for r in pq.read_table(os.path.join(out, "_work", "04_recaption")).to_pylist()}
    a, b = scores.values()
    assert a.keys() == b.keys() and len(a) == 6
    assert all(abs(a[k] - b[k]) < 1e-6 for k in a)
    a, b = vlm.values()
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        assert abs(a[k][0] - b[k][0]) < 1e-6
        assert a[k][1] == b[k][1] and a[k][1][0]["text"]  # identical captions, and there are captions
