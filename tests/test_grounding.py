"""Grounding (issue 16 part 3): the `coco` / `refcoco` readers on planted JSON and images, Keye's
[0, 1000) box text (round trip within a pixel, the tag parser and validator), the `grounding` builder
(counting answers equal the planted counts, every child valid chat, deterministic for a seed), the
`crop_clip` filter against a plain open_clip loop on the same crops, and a Spark run (local[2] and
local-cluster) whose derived samples reach the shards."""

from __future__ import annotations

import copy
import json
import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from reelforge.curation.readers import READERS, count_records
from reelforge.curation.schema import get_score
from reelforge.mixers.chat import validate_sample
from reelforge.mixers.grounding import (
    GroundingStep,
    format_boxes,
    format_grounded,
    from_norm,
    grounding_errors,
    norm_box,
    parse_grounded,
    pixel_box,
    plural,
    to_norm,
)

SIZES = {"a": (64, 48), "b": (80, 60), "c": (40, 40), "d": (30, 20)}

CATS = [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye"]}, {"id": 2, "name": "dog"},
        {"id": 3, "name": "cat"}]
COCO = {
    "categories": CATS,
    "images": [{"id": 1, "file_name": "img/a.png", "width": 64, "height": 48},
               {"id": 2, "file_name": "img/b.png", "width": 80, "height": 60},
               {"id": 3, "file_name": "img/c.png", "width": 40, "height": 40},
               {"id": 4, "file_name": "../outside.png", "width": 10, "height": 10},
               {"id": 1, "file_name": "img/a.png", "width": 64, "height": 48},  # the same id again
               {"id": 5, "file_name": "img/d.png"}],  # no size: read from the file's header
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 3, 20, 10]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 10, 15, 20]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 20, 10, 25],
         "segmentation": [[5, 20, 15, 20, 15, 45, 5, 45]], "keypoints": [8, 22, 2, 0, 0, 0]},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [60, 40, 10, 10]},  # past the right edge
        {"id": 5, "image_id": 1, "category_id": 2, "bbox": [1, 1, -3, 4]},  # negative width
        {"id": 15, "image_id": 1, "category_id": 77, "bbox": [1, 1, 3, 4]},  # no such category
        {"id": 6, "image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 10]},
        {"id": 7, "image_id": 2, "category_id": 3, "bbox": [20, 20, 10, 10]},
        {"id": 8, "image_id": 2, "category_id": 3, "bbox": [40, 30, 30, 30]},
        {"id": 9, "image_id": 2, "category_id": 1, "bbox": [10, 10, 30, 30], "iscrowd": 1,
         "segmentation": {"counts": [0, 5], "size": [60, 80]}},
        {"id": 10, "image_id": 3, "category_id": 2, "bbox": [0, 0, 50, 50]},  # larger than the image
        {"id": 11, "image_id": 99, "category_id": 2, "bbox": [0, 0, 5, 5]},  # an image the file lacks
        {"id": 12, "image_id": 99, "category_id": 2, "bbox": [1, 1, 5, 5]},
        {"id": 13, "image_id": None, "category_id": 2, "bbox": [1, 1, 5, 5]},
        {"id": 14, "image_id": 5, "category_id": 3, "bbox": [1, 1, 10, 10]},
    ],
}
REFS = {
    "images": [{"id": 1, "file_name": "img/a.png", "width": 64, "height": 48},
               {"id": 2, "file_name": "img/b.png", "width": 80, "height": 60},
               {"id": 7, "file_name": "img/c.png", "width": 40, "height": 40}],  # no ref names it
    "annotations": [{"id": 500, "image_id": 2, "bbox": [20, 20, 10, 10], "category_id": 3}],
    "categories": CATS,
    "refs": [
        {"ref_id": 0, "image_id": 1, "bbox": [2, 3, 20, 10], "category_id": 2,
         "sentences": [{"sent": "the left dog"}, {"sent": "small  brown dog"}]},
        {"ref_id": 1, "image_id": 1, "bbox": [30, 10, 15, 20], "sentences": ["dog on the right"]},
        {"ref_id": 2, "image_id": 2, "ann_id": 500, "sentences": [{"sent": "the middle cat"}]},
        {"ref_id": 3, "image_id": 2, "bbox": [0, 0, 10, 10], "sentences": []},  # no phrase
        {"ref_id": 4, "image_id": 42, "bbox": [0, 0, 3, 3], "sentences": ["a ghost"]},  # unknown image
        {"ref_id": 5, "image_id": 8, "file_name": "img/c.png", "width": 40, "height": 40, "bbox": [1, 1, 5, 5],
         "sentences": ["the corner"]},
    ],
}


def _plant(root) -> None:
    (root / "img").mkdir(exist_ok=True)
    for i, (name, size) in enumerate(SIZES.items()):
        Image.effect_noise(size, 30 + 10 * i).convert("RGB").save(root / "img" / f"{name}.png")
    (root / "instances_t.json").write_text(json.dumps(COCO))
    (root / "refs_t.json").write_text(json.dumps(REFS))


def _read(fmt: str, path) -> list[dict]:
    rows = list(READERS[fmt](str(path), "src", os.path.dirname(str(path)), {}))
    assert count_records(fmt, str(path), {}) == len(rows)  # the job's accounting sees every row
    return rows


def _g(row: dict) -> dict:
    return json.loads(row["meta"])["grounding"]


def test_coco_reader(tmp_path):
    _plant(tmp_path)
    rows = _read("coco", tmp_path / "instances_t.json")
    by_key = {r["source_key"]: r for r in rows}
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    a = by_key["instances_t.json#image1"]
    assert a["drop_step"] is None and a["kind"] == "image_text"
    assert a["media"][0]["uri"] == str((tmp_path / "img" / "a.png").resolve())
    g = _g(a)
    assert (g["width"], g["height"]) == (64, 48)
    assert [(b["category"], b["box"]) for b in g["boxes"]] == [
        ("dog", [2, 3, 22, 13]), ("dog", [30, 10, 45, 30]), ("person", [5, 20, 15, 45])]
    assert g["skipped"] == {"box_outside_image": 1, "negative_size": 1, "unknown_category": 1}
    assert g["polygons"] == [{"id": 3, "category": "person", "polygon": [[5, 20], [15, 20], [15, 45], [5, 45]]}]
    assert g["points"] == [{"id": 3, "category": "person", "name": "nose", "point": [8, 22]}]
    b = _g(by_key["instances_t.json#image2"])
    assert [bx["category"] for bx in b["boxes"]] == ["cat", "cat", "cat", "person"]
    assert b["boxes"][3]["crowd"] is True and b["skipped"] == {"rle_segmentation": 1}
    assert _g(by_key["instances_t.json#image5"])["width"] == 30  # from the PNG header
    fates = {k: r["drop_reason"] for k, r in by_key.items() if r["drop_step"]}
    assert fates == {"instances_t.json#image3": "no_grounding", "instances_t.json#image4": "outside_root",
                     "instances_t.json#image1#duplicate": "duplicate_key", "instances_t.json#image99": "unknown_image",
                     "instances_t.json#annotations[13]": "bad_record"}
    assert "box_outside_image: 1" in by_key["instances_t.json#image3"]["drop_detail"]
    # the same file read again gives the same ids
    assert [r["id"] for r in _read("coco", tmp_path / "instances_t.json")] == [r["id"] for r in rows]


def test_refcoco_reader(tmp_path):
    _plant(tmp_path)
    rows = _read("refcoco", tmp_path / "refs_t.json")
    by_key = {r["source_key"]: r for r in rows}
    assert sorted(by_key) == ["refs_t.json#image1", "refs_t.json#image2", "refs_t.json#image42",
                              "refs_t.json#image8"]
    g = _g(by_key["refs_t.json#image1"])
    assert g["boxes"][0] == {"id": 0, "ref_id": 0, "phrase": "the left dog", "phrases": ["the left dog",
                             "small brown dog"], "box": [2, 3, 22, 13], "category": "dog"}
    assert g["boxes"][1]["phrase"] == "dog on the right" and "category" not in g["boxes"][1]
    g2 = _g(by_key["refs_t.json#image2"])
    assert [(b["phrase"], b["box"], b["category"]) for b in g2["boxes"]] == [("the middle cat", [20, 20, 30, 30],
                                                                              "cat")]
    assert g2["skipped"] == {"no_phrase": 1}
    assert by_key["refs_t.json#image1"]["text"] == "the left dog; dog on the right"
    assert _g(by_key["refs_t.json#image8"])["boxes"][0]["box"] == [1, 1, 6, 6]
    assert by_key["refs_t.json#image42"]["drop_reason"] == "unknown_image"
    # a file that is not refs is one unreadable_source row, never an exception
    (tmp_path / "refs_bad.json").write_text(json.dumps({"images": []}))
    bad = list(READERS["refcoco"](str(tmp_path / "refs_bad.json"), "s", str(tmp_path), {}))
    assert [r["drop_reason"] for r in bad] == ["unreadable_source"]


def test_round_trip_within_a_pixel():
    rng = random.Random(0)
    worst = 0.0
    for _ in range(20000):
        w, h = rng.randint(1, 2000), rng.randint(1, 2000)
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        nb = norm_box([x1, y1, x2, y2], w, h)
        assert all(isinstance(v, int) and 0 <= v < 1000 for v in nb)
        back = pixel_box(nb, w, h)
        err = max(abs(p - q) for p, q in zip(back, [x1, y1, x2, y2]))
        assert err <= max(w, h) / 2000 + 1e-9
        worst = max(worst, err)
    assert 0.9 < worst <= 1.0  # within one pixel, and the bound is nearly reached (not vacuous)
    # the edges: 0 and the full side
    assert (to_norm(0, 640), to_norm(640, 640), to_norm(639.99, 640)) == (0, 999, 999)
    assert from_norm(999, 640) == pytest.approx(639.68) and to_norm(320, 640) == 500
    # larger sides: half a bin, size / 2000
    for w in (3000, 4000, 8000):
        assert abs(pixel_box(norm_box([w, 0, w, 0], w, 10), w, 10)[0] - w) <= w / 2000


def test_tag_format_parse_and_validate():
    boxes = [[10, 20, 300, 400], [0, 0, 999, 999]]
    keye = format_grounded("two dogs", boxes, "keye")
    assert keye == ("<|object_ref_start|>two dogs<|object_ref_end|>"
                    "<|box_start|>[[10,20,300,400],[0,0,999,999]]<|box_end|>")
    qwen = format_grounded("two dogs", boxes, "qwen2vl")
    assert qwen.startswith("<|object_ref_start|>two dogs<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>")
    assert parse_grounded(keye) == [{"phrase": "two dogs", "boxes": boxes}]
    assert parse_grounded(qwen) == [{"phrase": "two dogs", "boxes": boxes[:1]}, {"phrase": None, "boxes": boxes[1:]}]
    assert grounding_errors("The image shows " + keye + " and " + format_boxes([[1, 2, 3, 4]]) + ".") == []
    bad = {
        "<|box_start|>[[10,20,1000,400]]<|box_end|>": "outside [0, 1000)",
        "<|box_start|>[[300,20,10,400]]<|box_end|>": "x1 > x2",
        "<|box_start|>[[10,20,30]]<|box_end|>": "neither",
        "<|box_start|>(1,2),(3,4)": "never closed",
        "<|box_end|>": "closes nothing",
        "<|object_ref_start|>dog<|object_ref_end|> sits": "has no box",
        "<|object_ref_start|>dog<|box_start|>[[1,2,3,4]]<|box_end|><|object_ref_end|>": "opens inside",
        "<|box_start|>[[-1,2,3,4]]<|box_end|>": "neither",
    }
    for text, why in bad.items():
        errs = grounding_errors(text)
        assert errs and why in errs[0], (text, errs)
        with pytest.raises(ValueError):
            parse_grounded(text)
    assert grounding_errors("no boxes here", need_box=True) == ["the text holds no box"]
    assert grounding_errors("Locate <|object_ref_start|>dog<|object_ref_end|>.", ref_needs_box=False) == []
    with pytest.raises(ValueError):
        format_boxes([[0, 0, 1000, 5]])
    assert [plural(w) for w in ("dog", "person", "bus", "skis", "teddy bear", "toothbrush", "sheep", "knife")] == \
        ["dogs", "people", "buses", "skis", "teddy bears", "toothbrushes", "sheep", "knives"]


def _ground(rows: list[dict], **params) -> list[dict]:
    step = GroundingStep(**params)
    step.setup()
    return step.process(copy.deepcopy(rows))


def test_grounding_builder(tmp_path):
    _plant(tmp_path)
    rows = _read("coco", tmp_path / "instances_t.json")
    live = [r for r in rows if r["drop_step"] is None]
    ids = {r["source_key"].rsplit("#", 1)[1]: r["id"] for r in live}
    out = _ground(rows, seed=3)
    children = [r for r in out if r.get("parent_id")]
    assert len(out) == len(rows) + len(children)  # every input returned, plus its children
    # counting answers are the planted counts; a crowd category is never asked
    counts = {}
    for c in children:
        t = json.loads(c["meta"])["grounding_task"]
        if t["task"] == "counting":
            counts[(c["parent_id"], t["category"])] = c["messages"][-1]["content"]
            assert c["id"] == f"{c['parent_id']}@ground_count_{c['id'][-1]}"
    assert counts == {(ids["image1"], "dog"): "2", (ids["image1"], "person"): "1", (ids["image2"], "cat"): "3",
                      (ids["image5"], "cat"): "1"}
    by_id = {r["id"]: r for r in out}
    # referring: only a category alone in its image names one object (image 1's person; image 2 has none)
    ref = by_id[f"{ids['image1']}@ground_ref_0"]
    assert ref["messages"][-1]["content"] == "<|object_ref_start|>person<|object_ref_end|>" \
        "<|box_start|>[[78,416,234,937]]<|box_end|>"  # [5, 20, 15, 45] of 64 x 48
    assert f"{ids['image2']}@ground_ref_0" not in by_id
    cap = by_id[f"{ids['image2']}@ground_caption"]["messages"][-1]["content"]
    assert cap.startswith("The image shows 3 <|object_ref_start|>cats<|object_ref_end|><|box_start|>[[")
    assert parse_grounded(cap)[0]["boxes"] == [norm_box(b, 80, 60) for b in
                                               ([0, 0, 10, 10], [20, 20, 30, 30], [40, 30, 70, 60])]
    for c in children:
        assert validate_sample(c) == [], c["messages"]
        assert c["kind"] == "conversation" and c["mode"] == "non_thinking" and c["tokens"] is None
        assert c["messages"][0]["content"].startswith("<image>\n") and c["media"] == by_id[c["parent_id"]]["media"]
        assert c["source_key"].startswith(by_id[c["parent_id"]]["source_key"] + "@ground_")
        t = json.loads(c["meta"])["grounding_task"]
        assert t["seed"] == 3 and t["parent"] == c["parent_id"] and t["params"]["style"] == "keye"
    for pid in ids.values():
        assert (by_id[pid]["drop_step"], by_id[pid]["drop_reason"]) == ("grounding", "split_into_grounding")
    # determinism: the same seed gives the same children whatever the batching and order
    again = []
    for r in reversed(rows):
        again += _ground([r], seed=3)
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == sorted(json.dumps(r, sort_keys=True) for r in out)
    other = _ground(rows, seed=4)
    assert [r["messages"] for r in other if r.get("parent_id")] != [r["messages"] for r in children]
    # qwen2vl style, one task, the parent kept; a sample without grounding passes untouched
    plain = copy.deepcopy(live[0])
    plain.update(id="plain", meta=None)
    out = _ground([live[0], plain], tasks=["referring"], style="qwen2vl", keep_parent=True)
    assert [r["id"] for r in out] == [ids["image1"], f"{ids['image1']}@ground_ref_0", "plain"]
    assert out[0]["drop_step"] is None and out[2] == plain
    assert out[1]["messages"][-1]["content"].endswith("<|box_start|>(78,416),(234,937)<|box_end|>")
    with pytest.raises(ValueError, match="style"):
        GroundingStep(style="xyxy")


def test_refcoco_referring_uses_the_sentences(tmp_path):
    _plant(tmp_path)
    rows = [r for r in _read("refcoco", tmp_path / "refs_t.json") if r["drop_step"] is None]
    out = _ground(rows, tasks=["referring", "counting"], max_referring=5)
    kids = {r["id"]: r for r in out if r.get("parent_id")}
    a = next(r for r in rows if r["source_key"].endswith("#image1"))
    phrases = {json.loads(k["meta"])["grounding_task"]["phrase"] for k in kids.values() if k["parent_id"] == a["id"]}
    assert len(phrases) == 2 and "dog on the right" in phrases and phrases & {"the left dog", "small brown dog"}
    assert not any(json.loads(k["meta"])["grounding_task"]["task"] == "counting" for k in kids.values())
    for k in kids.values():
        assert validate_sample(k) == []


def _plain_clip(tmp_path, ckpt, crops_and_texts):
    import open_clip
    import torch

    model, _, pre = open_clip.create_model_and_transforms("reelforge-tiny-clip", pretrained=ckpt)
    model.eval()
    tok = open_clip.get_tokenizer("reelforge-tiny-clip")
    with torch.no_grad():
        ims = torch.stack([pre(c) for c, _ in crops_and_texts])
        fi = torch.nn.functional.normalize(model.encode_image(ims), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(tok([t for _, t in crops_and_texts])), dim=-1)
    return (fi * ft).sum(-1).numpy()


@pytest.mark.slow
def test_crop_clip_equals_plain_open_clip(tmp_path):
    from reelforge.curation.tiny_clip import build_tiny_clip
    from reelforge.filters.crop_clip import CropClip

    _plant(tmp_path)
    cfg_dir, ckpt = build_tiny_clip(str(tmp_path / "model"))
    cfg = os.path.join(cfg_dir, "reelforge-tiny-clip.json")
    rows = [r for r in _read("coco", tmp_path / "instances_t.json") if r["drop_step"] is None]
    rows += [r for r in _read("refcoco", tmp_path / "refs_t.json") if r["drop_step"] is None]
    step = CropClip(model="reelforge-tiny-clip", pretrained=ckpt, model_config=cfg, device="cpu", batch_size=3)
    step.setup()
    out = step.compute(copy.deepcopy(rows), step.prepare(copy.deepcopy(rows)))
    # the plain loop: PIL crop of the integer boxes, open_clip's own preprocess, encode, cosine
    pairs = []
    for r in rows:
        im = Image.open(r["media"][0]["uri"]).convert("RGB")
        pairs += [(im.crop(tuple(int(v) for v in b["box"])), b.get("phrase") or b["category"]) for b in _g(r)["boxes"]]
    want = _plain_clip(tmp_path, ckpt, pairs)
    got = [b["crop_clip"] for r in out for b in _g(r)["boxes"]]
    assert len(got) == len(want) == 12
    assert np.max(np.abs(np.array(got) - want)) < 1e-4 and np.std(want) > 1e-3
    for r in out:
        assert r["drop_step"] is None
        assert get_score(r, "crop_clip") == pytest.approx(np.mean([b["crop_clip"] for b in _g(r)["boxes"]]))
    # a threshold between the scores: the boxes below move to removed_boxes, their polygons and points too
    cut = float(np.median(want))
    step = CropClip(model="reelforge-tiny-clip", pretrained=ckpt, model_config=cfg, device="cpu", threshold=cut)
    step.setup()
    out = step.compute(copy.deepcopy(rows), step.prepare(copy.deepcopy(rows)))
    kept = [b["crop_clip"] for r in out for b in _g(r)["boxes"]]
    removed = [b["crop_clip"] for r in out for b in _g(r).get("removed_boxes", [])]
    assert sorted(kept + removed) == pytest.approx(sorted(want), abs=1e-4)
    assert all(s >= cut for s in kept) and all(s < cut for s in removed) and removed
    for r in out:
        g = _g(r)
        alive_ids = {b.get("id") for b in g["boxes"]}
        assert all(p["id"] in alive_ids for p in g["polygons"] + g["points"])
        if not g["boxes"]:
            assert r["drop_reason"] == "no_matching_boxes"
    # above every score: every sample leaves
    step = CropClip(model="reelforge-tiny-clip", pretrained=ckpt, model_config=cfg, device="cpu", threshold=2.0)
    step.setup()
    out = step.compute(copy.deepcopy(rows), step.prepare(copy.deepcopy(rows)))
    assert {r["drop_reason"] for r in out} == {"no_matching_boxes"}
    # percentile: the engine's per-source cut ranks samples by their mean box score
    step = CropClip(model="reelforge-tiny-clip", pretrained=ckpt, model_config=cfg, percentile=25)
    assert (step.cut().percentile, step.cut().reason) == (25.0, "low_crop_clip_percentile")
    assert step.cut_value(out[0]) == get_score(out[0], "crop_clip") and CropClip(
        model="reelforge-tiny-clip", pretrained=ckpt, model_config=cfg).cut() is None
    with pytest.raises(ValueError, match="percentile"):
        CropClip(model="reelforge-tiny-clip", pretrained=ckpt, model_config=cfg, percentile=100)


def _recipe(tmp_path) -> str:
    from reelforge.curation.tiny_clip import build_tiny_clip

    _plant(tmp_path)
    build_tiny_clip(str(tmp_path / "model"))
    recipe = {"name": "grounding", "sources": [
        {"name": "coco", "format": "coco", "path": "instances_t.json"},
        {"name": "refs", "format": "refcoco", "path": "refs_t.json"}],
        "steps": [{"crop_clip": {"model": "reelforge-tiny-clip", "pretrained": "model/reelforge-tiny-clip.pt",
                                 "model_config": "model/reelforge-tiny-clip.json", "device": "cpu"}},
                  {"grounding": {"seed": 7}}],
        "output": {"path": "out", "shards": {"max_samples": 100, "shuffle": False}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "r.yaml")


@pytest.fixture(scope="module")
def local_run(spark, tmp_path_factory) -> tuple[str, str, dict]:
    """The recipe run once on local[2]: (recipe path, output folder, report)."""
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    root = tmp_path_factory.mktemp("grounding-run")
    path = _recipe(root)
    out = str(root / "out")
    return path, out, run_recipe(load_recipe(path, out=out), spark=spark, log=lambda *a: None)


def _children(out: str) -> dict[str, tuple]:
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    return {r["id"]: (r["parent_id"], r["fate"]) for r in ledger if r["parent_id"]}


def test_spark_run_reaches_the_shards(local_run):
    from test_sample import read_shards

    _, out, rep = local_run
    assert rep["balanced"] and rep["inputs"] == 12  # 8 COCO rows + 4 RefCOCO rows
    step = next(s for s in rep["steps"] if s["step"] == "grounding")
    assert step["reasons"] == {"split_into_grounding": 6} and step["derived"] == step["out"] > 6
    kids = _children(out)
    shards = read_shards(out)
    assert set(shards) == set(kids) and all(f == "kept" for _, f in kids.values())
    for sid, s in shards.items():
        assert s["parent_id"] == kids[sid][0] and s["mode"] == "non_thinking"
        assert json.loads(s["meta"])["grounding_task"]["seed"] == 7
        assert grounding_errors(s["messages"][-1]["content"]) == []
    counting = {s["messages"][-1]["content"] for s in shards.values() if "@ground_count_" in s["id"]}
    assert counting == {"1", "2", "3"}


def _derived(out: str) -> dict[str, tuple]:
    return {r["id"]: (r["parent_id"], r["messages"], r["meta"]) for r in
            pq.read_table(os.path.join(out, "_work", "02_grounding")).to_pylist() if r["parent_id"]}


@pytest.mark.cluster
def test_local_cluster_derives_the_same_children(local_run, local_cluster, tmp_path):
    """Separate executor processes (the CLIP model loaded in each) derive the same children, with the
    same crop scores in their meta, as local[2]."""
    path, out, _ = local_run
    rep = local_cluster.run(path, tmp_path / "cluster")
    assert rep["balanced"]
    assert _children(out) == _children(str(tmp_path / "cluster")) and len(_children(out)) > 6
    a, b = _derived(out), _derived(str(tmp_path / "cluster"))
    assert a.keys() == b.keys() and len(a) == len(_children(out))
    for k in a:
        assert a[k][:2] == b[k][:2]
        sa = [x["crop_clip"] for x in json.loads(a[k][2])["grounding"]["boxes"]]
        sb = [x["crop_clip"] for x in json.loads(b[k][2])["grounding"]["boxes"]]
        assert np.allclose(sa, sb, atol=1e-6)
