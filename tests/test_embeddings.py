"""The CLIP step's kept embeddings (`keep_embeddings: true`): written beside the run, equal to
plain open_clip's embeddings of the same samples within float16 precision, one row per medium
of every scored sample; read back by filters.embeddings; reused by dedup_semantic."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from reelforge.curation.schema import get_score
from reelforge.curation.tiny_clip import build_tiny_clip
from reelforge.filters.embeddings import (
    TABLE_SCHEMA,
    complete,
    embeddings_folder,
    from_bytes,
    matrix,
    medium_embeddings,
    model_fields,
    read_embedding_table,
    read_embeddings,
    to_bytes,
)

FP16 = 2.0 ** -11  # float16 relative precision: a unit vector's entries round within this


def test_bytes_round_trip():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((5, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    b = [to_bytes(x) for x in v]
    assert all(len(x) == 64 for x in b) and b[0] == v[0].astype("<f2").tobytes()
    m = matrix(b + [None], 32)
    assert np.abs(m[:5] - v).max() <= FP16 and np.isnan(m[5]).all()
    assert np.array_equal(from_bytes(b[2]), m[2])
    # a video: the normalised mean of its frames; an image: itself
    e = medium_embeddings(v, [1, 3, 1])
    assert np.allclose(e[0], v[0]) and np.allclose(e[2], v[4])
    want = v[1:4].mean(0)
    assert np.allclose(e[1], want / np.linalg.norm(want), atol=1e-6)


def test_check_embeddings_refuses_and_prunes(tmp_path):
    from types import SimpleNamespace

    from reelforge.curation.errors import RecipeError
    from reelforge.jobs.recipe import StepSpec
    from reelforge.jobs.semantic import check_embeddings

    def recipe(*steps):
        return SimpleNamespace(steps=[StepSpec(n, p) for n, p in steps])

    out = str(tmp_path)
    for name in ("clip", "old_step"):
        os.makedirs(embeddings_folder(out, name))
    keep = ("clip", {"keep_embeddings": True})
    sem = ("dedup_semantic", {"from_step": "clip"})
    check_embeddings(recipe(keep, sem), out)  # fine; the folder no step keeps goes
    assert os.path.isdir(embeddings_folder(out, "clip")) and not os.path.exists(embeddings_folder(out, "old_step"))
    with pytest.raises(RecipeError, match="no earlier step 'clip' keeps"):
        check_embeddings(recipe(sem, keep), out)
    with pytest.raises(RecipeError, match="no earlier step 'clip' keeps"):
        check_embeddings(recipe(("clip", {}), sem), out)
    with pytest.raises(RecipeError, match="already keeps embeddings"):
        check_embeddings(recipe(keep, keep), out)
    leak = ("leakage", {"from_step": "clip", "rule": "keye_posttrain"})  # leakage's from_step: the same check
    check_embeddings(recipe(keep, leak), out)
    with pytest.raises(RecipeError, match=r"leakage.from_step` names 'clip', but no earlier .* drop `from_step`\."):
        check_embeddings(recipe(("clip", {}), leak), out)
    check_embeddings(recipe(("clip", {})), out)  # nothing keeps clip's any more
    assert not os.path.exists(embeddings_folder(out, "clip"))


def _video(path):
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8", "-t", "1",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)


@pytest.mark.slow
def test_kept_embeddings_equal_open_clip_and_feed_dedup_semantic(spark, tmp_path):
    import open_clip
    import torch

    from reelforge.curation.media_io import decode_visual
    from reelforge.filters.clip_score import caption_of
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe
    from reelforge.jobs.semantic import keep_embeddings

    _, ckpt = build_tiny_clip(str(tmp_path / "model"))
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(10):
        Image.effect_noise((40 + i, 36), 30 + 7 * i).convert("RGB").rotate(25 * i).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"a noisy picture number {i}"})
    rows.append({"images": ["img/0.png", "img/5.png"], "caption": "<image> and <image>: two noisy pictures"})
    _video(tmp_path / "v.mp4")
    rows.append({"video": "v.mp4", "caption": "a test pattern that moves"})
    # text-only rows: two twins (embedded by dedup_semantic itself, with the kept model) and one
    # with the caption of image 2 (its text embedding equals the kept one)
    rows += [{"text": "the very same document"}, {"text": "the very same document"},
             {"text": "a noisy picture number 2"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    clip = {"model": "reelforge-tiny-clip", "pretrained": "model/reelforge-tiny-clip.pt",
            "model_config": "model/reelforge-tiny-clip.json", "batch_size": 5, "device": "cpu",
            "keep_embeddings": True, "percentile": 25}
    recipe = {"name": "emb", "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"}],
              "steps": [{"probe": {}}, {"clip": clip},
                        {"dedup_semantic": {"from_step": "clip", "embedding": "text", "eps": 0.0005}}],
              "output": {"path": "out", "shards": {"max_samples": 100}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(str(tmp_path / "recipe.yaml"), out=out), spark=spark, log=lambda *a: None)
    assert rep["balanced"]

    folder = embeddings_folder(out, "clip")
    assert complete(folder) and not os.path.exists(os.path.join(out, "shards", "embeddings"))
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet")]
    assert files and all(pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "ZSTD"
                         for f in files if pq.ParquetFile(f).metadata.num_rows)
    table = read_embedding_table(folder)
    assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in TABLE_SCHEMA], table.schema
    scored = {r["id"]: r for r in pq.read_table(os.path.join(out, "_work", "02_clip")).to_pylist()
              if get_score(r, "clip") is not None}
    assert len(scored) == 12
    ledger = {r["id"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}
    assert any(ledger[i]["reason"] == "low_clip_percentile" for i in scored)  # dropped after scoring: still kept
    emb = table.to_pylist()
    assert {(r["id"], r["index"]) for r in emb} == {(i, j) for i, r in scored.items() for j in range(len(r["media"]))}
    assert len(emb) == 13 and {r["dim"] for r in emb} == {32}
    assert model_fields(emb[0]["model"]) == {"model": "reelforge-tiny-clip", "pretrained": ckpt,
                                             "model_config": str(tmp_path / "model" / "reelforge-tiny-clip.json")}

    # plain open_clip on the same pixels and captions
    model, _, pre = open_clip.create_model_and_transforms("reelforge-tiny-clip", pretrained=ckpt)
    model.eval()
    tok = open_clip.get_tokenizer("reelforge-tiny-clip")
    probed = {r["id"]: r for r in pq.read_table(os.path.join(out, "_work", "01_probe")).to_pylist()}
    worst = 0.0
    with torch.no_grad():
        for r in emb:
            s = scored[r["id"]]
            frames = decode_visual(probed[r["id"]]["media"][r["index"]], 8)
            medium = probed[r["id"]]["media"][r["index"]]
            assert len(frames) == (1 if medium["kind"] == "image" else 8)
            fi = torch.nn.functional.normalize(model.encode_image(torch.stack([pre(f) for f in frames])), dim=-1)
            want_i = torch.nn.functional.normalize(fi.mean(0), dim=-1).numpy()
            want_t = torch.nn.functional.normalize(model.encode_text(tok([caption_of(s, "assistant")])), dim=-1)
            want_t = want_t[0].numpy()
            for got, want in ((from_bytes(r["image"]), want_i), (from_bytes(r["text"]), want_t)):
                err = float(np.abs(got - want).max())
                worst = max(worst, err)
                assert err <= FP16 * np.abs(want).max() + 1e-6, (r["id"], err)
            # the score the step wrote is this image-text cosine (for the one-image rows)
            if len(s["media"]) == 1 and medium["kind"] == "image":
                assert abs(get_score(s, "clip") - float(want_i @ want_t)) < 1e-5
    print(f"kept embeddings: {len(emb)} rows, largest difference to open_clip {worst:.2e}")
    ids, im, tx = read_embeddings(folder)
    assert ids == sorted(scored) and im.dtype == np.float32 and im.shape == tx.shape == (12, 32)
    by_id = {r["id"]: r for r in emb if r["index"] == 0}
    assert all(np.array_equal(im[k], from_bytes(by_id[i]["image"])) for k, i in enumerate(ids))
    assert np.allclose(np.linalg.norm(im, axis=1), 1, atol=1e-3)

    # dedup_semantic on text embeddings: the kept ones plus the text-only rows embedded with the kept model
    key = {i: r["source_key"] for i, r in ledger.items()}
    sem = {key[i]: key[r["dup_of"]] for i, r in ledger.items() if r["reason"] == "semantic_duplicate"}
    twins = {("m.jsonl:13", "m.jsonl:14"), ("m.jsonl:14", "m.jsonl:13")}
    assert len(twins & set(sem.items())) == 1  # the twins: one stays (the smaller id: equal texts)
    img2 = next(i for i, k in key.items() if k == "m.jsonl:3")
    if ledger[img2]["step"] != "clip":  # image 2 outlived the percentile cut: its caption is the text row's
        assert {sem.get("m.jsonl:15"), sem.get("m.jsonl:3")} & {"m.jsonl:3", "m.jsonl:15"}
    (section,) = rep["semantic"]
    assert section["from_step"] == "clip" and section["embedding"] == "text"
    assert section["embedded"] == rep["steps"][2]["out"]  # every live sample has a text
    assert {r["eps"]: r["drops"] for r in section["table"]}[0.0005] == len(sem)
    assert "| **0.0005** |" in open(os.path.join(out, "report.md")).read()

    # a second write of the step's embeddings (a re-run of it) overwrites: the same rows, no more
    from reelforge.jobs.recipe import StepSpec
    from reelforge.jobs.spark import spark_schema

    step = StepSpec("clip", load_recipe(str(tmp_path / "recipe.yaml")).steps[1].params).build()
    df = spark.read.schema(spark_schema()).parquet(os.path.join(out, "_work", "01_probe"))
    keep_embeddings(step, df, os.path.join(out, "_work"), lambda c: c).count()
    again = read_embedding_table(folder)
    assert sorted(again.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
    assert pa.Table.from_pylist(sorted(again.to_pylist(), key=lambda r: (r["id"], r["index"]))).equals(
        pa.Table.from_pylist(sorted(emb, key=lambda r: (r["id"], r["index"]))))
    step.keep_embeddings = False  # run without the option: what it kept before goes
    keep_embeddings(step, df, os.path.join(out, "_work"), lambda c: c)
    assert not os.path.exists(folder)
