"""The shard loader: masking, vision pads, packing == no packing, blending, rank/worker split, resume."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

import pytest
import torch
from train_common import TINY_VISUAL, stage, write_stage
from train_common import all_ids as _all_ids

from reelforge.training.loader import IGNORE, Encoder, ShardLoader, iter_ids


def _cfg(tmp_path, tiny, shards, name="s", **over):
    return stage(write_stage(str(tmp_path / f"{name}.yaml"), tiny, shards, str(tmp_path / name), **over))


def _raw_of(shards: str, kind: str, with_media: bool) -> dict:
    import webdataset as wds

    for t in sorted(glob.glob(os.path.join(shards, "*.tar"))):
        for raw in wds.WebDataset([t], shardshuffle=False, nodesplitter=None, workersplitter=None):
            meta = json.loads(raw["json"])
            if meta["kind"] == kind and bool(meta.get("media")) == with_media:
                return raw
    raise AssertionError(f"no {kind} sample")


def test_assistant_only_labels_and_vision_pads(tiny, shards):
    from reelforge.curation.tokens import VisualTokenConfig, image_tokens

    enc = Encoder(tiny["tokenizer"], TINY_VISUAL, 4096)
    raw = _raw_of(shards, "conversation", with_media=True)
    meta = json.loads(raw["json"])
    (item,) = enc.encode(raw)
    ids, labels = item.input_ids, item.labels
    # labels are the next token where that token belongs to an assistant answer, else ignored
    targets = [t for t in labels if t != IGNORE]
    answers = "".join(m["content"] + "<|im_end|>\n" for m in meta["messages"] if m["role"] == "assistant")
    assert enc.tok.decode(targets) == answers
    assert labels[-1] == IGNORE
    # vision pads: one run per image, as many as the token rules say, never a target
    pads = sum(1 for t in ids if t == enc.image_pad)
    cfg = VisualTokenConfig.from_dict(TINY_VISUAL)
    want = sum(image_tokens(m["height"], m["width"], cfg)["tokens"] for m in meta["media"])
    assert pads == want > 0
    assert all(img.shape[1] % 28 == 0 and img.shape[2] % 28 == 0 for img in item.images)
    assert sum((im.shape[1] // 28) * (im.shape[2] // 28) for im in item.images) == pads
    assert enc.image_pad not in targets


def test_video_frames_and_text_documents(tiny, shards):
    from reelforge.curation.tokens import VisualTokenConfig, video_tokens

    enc = Encoder(tiny["tokenizer"], TINY_VISUAL, 4096)
    raw = _raw_of(shards, "video_text", with_media=True)
    meta = json.loads(raw["json"])
    (item,) = enc.encode(raw)
    m = meta["media"][0]
    v = video_tokens(m["height"], m["width"], m["duration"], m["fps"], VisualTokenConfig.from_dict(TINY_VISUAL),
                     total_frames=m.get("frames"))
    assert len(item.images) == v["frames"]
    assert sum(1 for t in item.input_ids if t == enc.video_pad) == v["tokens"]
    raw = _raw_of(shards, "text", with_media=False)
    (doc,) = enc.encode(raw)
    assert doc.input_ids[-1] == enc.eos and sum(t != IGNORE for t in doc.labels) == len(doc.input_ids) - 1


def test_packed_equals_unpacked(tiny, shards, tmp_path):
    """The same samples give the same logits and loss packed into one row or one per row."""
    from reelforge.training.loader import collate_packed
    from reelforge.training.model import ReelVLM

    torch.manual_seed(0)
    model = ReelVLM.from_paths(tiny["vision"], tiny["llm"], tiny["tokenizer"]).eval()
    enc = Encoder(tiny["tokenizer"], TINY_VISUAL, 4096)
    items = [enc.encode(_raw_of(shards, k, w))[0] for k, w in
             (("conversation", True), ("text", False), ("image_text", True), ("interleaved", True))]
    packed = collate_packed([items], enc.pad)
    assert packed["input_ids"].shape[0] == 1 and len(packed["samples"]) == 4
    with torch.no_grad():
        out_p = model(packed)
        singles = [model(collate_packed([[it]], enc.pad)) for it in items]
    off = 0
    for it, o in zip(items, singles):
        n = len(it.input_ids)
        torch.testing.assert_close(out_p["logits"][0, off:off + n], o["logits"][0], rtol=1e-4, atol=1e-4)
        off += n
    # the token-mean loss of the pack equals the token-weighted mean of the single losses
    total = sum(float(o["loss"]) * int(o["n_labels"]) for o in singles) / sum(int(o["n_labels"]) for o in singles)
    assert abs(float(out_p["loss"]) - total) < 1e-5
    # and a batch of two padded rows gives the same logits as well
    two = collate_packed([items[:2], items[2:]], enc.pad)
    with torch.no_grad():
        out_two = model(two)
    n0 = len(items[2].input_ids)
    torch.testing.assert_close(out_two["logits"][1, :n0], singles[2]["logits"][0], rtol=1e-4, atol=1e-4)


def test_ranks_and_workers_split_an_epoch_exactly(tiny, shards, tmp_path):
    everything = _all_ids(shards)
    for split in ("samples", "shards"):
        cfg = _cfg(tmp_path, tiny, shards, f"split-{split}",
                   data={"epochs": 1, "num_workers": 2, "split": split, "max_len": 4096})
        got = []
        for rank in range(2):
            got += iter_ids(ShardLoader(cfg, rank=rank, world=2))
        assert Counter(got) == Counter(everything), split


@pytest.mark.slow
def test_blend_by_tokens(tiny, shards, tmp_path):
    tars = sorted(glob.glob(os.path.join(shards, "*.tar")))
    cfg = _cfg(tmp_path, tiny, shards, "blend", data={
        "sources": [{"name": "a", "path": tars[:2], "weight": 3.0}, {"name": "b", "path": tars[2:], "weight": 1.0}],
        "num_workers": 0, "max_len": 4096})
    loader = ShardLoader(cfg)
    iter_ids(loader, limit=40)
    drawn = loader.state_dict()["states"][0]["drawn"]  # tokens drawn per set
    assert 2.7 < drawn["a"] / drawn["b"] < 3.3, drawn
    assert abs(drawn["a"] / 3.0 - drawn["b"]) < 700  # off by at most about one sample's tokens


def test_resume_gives_the_same_order(tiny, shards, tmp_path):
    cfg = _cfg(tmp_path, tiny, shards, "resume", data={"num_workers": 2, "max_len": 1024})
    straight = iter_ids(ShardLoader(cfg), limit=50)  # runs past one epoch: 202 samples
    first = ShardLoader(cfg)
    a = iter_ids(first, limit=19)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold plain JSON-able data
    second = ShardLoader(cfg)
    second.load_state_dict(state)
    b = iter_ids(second, limit=31)
    assert a + b == straight
    assert len(set(straight)) < len(straight)  # the second epoch began inside the run


def test_report_compares_with_a_planner_plan(tmp_path):
    from types import SimpleNamespace

    from reelforge.training.report import write_report

    out = tmp_path / "run"
    out.mkdir()
    with open(out / "metrics.jsonl", "w") as f:
        for s, loss in enumerate((3.0, 2.5, 2.0), 1):
            f.write(json.dumps({"step": s, "loss": loss, "tokens": 100, "seconds": 0.5, "tokens_per_s": 200}) + "\n")
    plan = {"version": 1, "stages": [{"name": "stage2", "entries": [{"name": "caps", "samples": 30},
                                                                     {"name": "ocr", "samples": 10}]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = SimpleNamespace(name="stage2", objective="lm",
                          report={"plan": str(tmp_path / "plan.json"), "plan_stage": None, "targets": None})
    rep = write_report(str(out), cfg, {"laion": 9}, {"caps": 6, "ocr": 3})
    assert rep["tokens_per_s"] == 200 and rep["loss_first"] == 3.0 and rep["loss_last"] == 2.0
    assert rep["plan_comparison"]["caps"] == {"seen": 6, "planned": 30.0, "seen_share": 6 / 9, "planned_share": 0.75}
    assert os.path.getsize(rep["loss_png"]) > 0


def test_stage_mistakes_cost_one_sentence(tiny, tmp_path):
    from reelforge.jobs.cli import main
    from reelforge.jobs.recipe import RecipeError
    from reelforge.training.config import stage_from_dict
    from reelforge.training.loader import shard_sets_of

    base = {"model": {"vision": tiny["vision"], "llm": tiny["llm"]}, "output": {"dir": str(tmp_path / "o")},
            "data": {"sources": [{"name": "x", "path": str(tmp_path / "nowhere")}]}}
    with pytest.raises(RecipeError, match=r"data.sources\[0\].path"):
        shard_sets_of(stage_from_dict(base))
    for bad, field in (({"optim": {"lr": "fast"}}, "optim.lr"), ({"trainable": ["eyes"]}, "trainable"),
                       ({"objective": "rlhf"}, "objective"), ({"data": {"bogus": 1}}, "data.bogus"),
                       ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage")):
        from reelforge.training.config import deep_update

        with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
            stage_from_dict(deep_update(base, bad))
    (tmp_path / "bad.yaml").write_text("steps: -3\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
