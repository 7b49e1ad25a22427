"""Issue 13 part 3: the training loader honours a video's stored Keye-VL-1.5 frame plan.

Real short videos (a still field, a scene cut, motion) are probed and counted by the recipe's own
row steps (probe computes the plan, tokens counts it), written to shards without Spark, and
encoded by `training.loader.Encoder`. Checked: the planned frames are fed at their slow / fast
sizes in the plan's order, the token layout is the released 1.5 processor's (`<|frame|>` +
timestamp, fast frames between `<|fast_start|>` and `<|fast_end|>`, built here the way vLLM's
`keye_vl1_5.py` builds it), a packed sample's video pads equal the shard's planned tokens, the 3D
positions equal transformers' `get_rope_index` given per-frame [1, h, w] grids, and the model
takes the batch. Without a usable plan the loader keeps its metadata path.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import random
import subprocess

import pytest
import torch
import yaml

from reelforge.training.loader import Encoder, FrameLayout, collate_packed

FRAME, FAST_START, FAST_END = "<|frame|>", "<|fast_start|>", "<|fast_end|>"


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Three encoded videos and an image, as video_text samples and conversations (one with an
    image and a video), probed with the 1.5 frame plan and written to shards by the shard writer."""
    from local_shards import write_shards_locally

    from reelforge.curation.tiny_models import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("loader-plan")
    vids = root / "videos"
    vids.mkdir()
    enc = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    # 448x320: big enough that a fast frame is smaller than a slow one
    _ff("-f", "lavfi", "-i", "color=c=0x3366aa:size=448x320:rate=10", "-t", "3", *enc, str(vids / "static.mp4"))
    parts = []
    for i, src in enumerate(["smptebars", "mandelbrot"]):
        p = root / f"part{i}.mp4"
        _ff("-f", "lavfi", "-i", f"{src}=size=448x320:rate=10", "-t", "2", *enc, str(p))
        parts.append(p)
    (root / "list.txt").write_text("".join(f"file '{p}'\n" for p in parts))
    _ff("-f", "concat", "-safe", "0", "-i", str(root / "list.txt"), "-c", "copy", str(vids / "cut.mp4"))
    _ff("-f", "lavfi", "-i", "testsrc2=size=320x448:rate=12", "-t", "2", *enc, str(vids / "moving.mp4"))
    for name in ("static", "cut", "moving"):
        (vids / f"{name}.txt").write_text(f"a {name} video")
    _ff("-f", "lavfi", "-i", "testsrc=size=200x150", "-frames:v", "1", str(root / "still.png"))
    conv = [
        {"id": "vconv-cut", "video": "videos/cut.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat happens in this clip?"},
            {"from": "gpt", "value": "The picture changes once."}]},
        {"messages": [
            {"role": "user", "content": [{"type": "image", "image": "still.png"},
                                         {"type": "video", "video": "videos/static.mp4"},
                                         {"type": "text", "text": "Is the clip the picture?"}]},
            {"role": "assistant", "content": "No, it is one colour."}]},
    ]
    (root / "conversations.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conv))
    build_tiny_tokenizer(str(root / "tokenizer"), vocab_size=300,
                         texts=["a static video", "a cut video", "a moving video", "the picture changes once",
                                "what happens in this clip", "is the clip the picture no it is one colour"] * 20)
    recipe = {"name": "plan", "sources": [{"name": "v", "format": "video_folder", "path": "videos/"},
                                          {"name": "c", "format": "jsonl", "path": "conversations.jsonl"}],
              "steps": [{"probe": {}}, {"tokens": {"tokenizer": "tokenizer"}}],
              "output": {"path": "out"}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shards = write_shards_locally(str(root / "recipe.yaml"), str(root / "shards"), prefix="plan")
    return {"root": str(root), "shards": shards, "tokenizer": str(root / "tokenizer"), "videos": str(vids)}


def _raws(shards: str) -> list[dict]:
    import webdataset as wds

    out = list(wds.WebDataset(sorted(glob.glob(os.path.join(shards, "*.tar"))), shardshuffle=False))
    assert len(out) == 5
    return out


def _name(meta: dict) -> str:
    return meta.get("id") if meta["kind"] == "conversation" else os.path.basename(meta["provenance"]["key"])


def _expected_block(tok, m: dict, pad: int) -> list[int]:
    """One planned video as the released processor tokenises it (vLLM keye_vl1_5.py's replacement,
    written out independently): per frame, encode(`<|frame|>` + ts [+ `<|fast_start|>`]), its pads,
    then `<|fast_end|>` for a fast frame; all inside `<|vision_start|>` ... `<|vision_end|>`."""
    p = m["plan"]
    ids = tok.convert_tokens_to_ids
    out = [ids("<|vision_start|>")]
    for t, typ in zip(p["frame_times"], p["frame_types"]):
        h, w = p["fast_size"] if typ else p["slow_size"]
        s = FRAME + format(t, ".1f") + (FAST_START if typ else "")
        out += tok(s, add_special_tokens=False)["input_ids"] + [pad] * (h * w // 28 // 28)
        if typ:
            out.append(ids(FAST_END))
    return out + [ids("<|vision_end|>")]


def _blocks(ids: list[int], start: int, end: int) -> list[list[int]]:
    out, cur = [], None
    for t in ids:
        if t == start:
            cur = [t]
        elif cur is not None:
            cur.append(t)
            if t == end:
                out.append(cur)
                cur = None
    return out


def test_planned_frames_layout_and_tokens(corpus):
    """(a) video pads == the shard's plan tokens; (b) frames at slow/fast size in the plan's order,
    pixels = native decode + bilinear antialiased resize; (c) timestamps = format(t, '.1f')."""
    from torch.nn.functional import interpolate

    from reelforge.curation.video import decode_frames

    enc = Encoder(corpus["tokenizer"], None, 1 << 14)
    tok = enc.tok
    for k in (FRAME, FAST_START, FAST_END):
        assert len(tok(k, add_special_tokens=False)["input_ids"]) == 1  # single tokens in the tiny tokenizer
    mixed = fast_smaller = 0
    for raw in _raws(corpus["shards"]):
        meta = json.loads(raw["json"])
        (item,) = enc.encode(raw)
        videos = [m for m in meta["media"] if m["kind"] == "video"]
        assert videos and all(m.get("plan", {}).get("frame_types") for m in videos)
        # (a) the acceptance criterion: the sample's video pads are the shard's planned tokens
        n_vpad = sum(1 for t in item.input_ids if t == enc.video_pad)
        assert n_vpad == sum(m["plan"]["tokens"] for m in videos)
        n_ipad = sum(1 for t in item.input_ids if t == enc.image_pad)
        assert n_vpad + n_ipad == meta["tokens"]["visual_tokens"]
        # (b) frame sizes in the plan's order (images first where the image comes first)
        want_sizes = []
        for m in meta["media"]:
            if m["kind"] == "image":
                want_sizes.append(None)
            else:
                p = m["plan"]
                want_sizes += [tuple(p["fast_size"] if t else p["slow_size"]) for t in p["frame_types"]]
                mixed += len(set(p["frame_types"])) == 2
                fast_smaller += p["fast_size"] != p["slow_size"] and 1 in p["frame_types"]
        assert len(item.images) == len(want_sizes)
        for im, want in zip(item.images, want_sizes):
            assert im.dtype == torch.uint8 and im.shape[0] == 3
            if want is not None:
                assert tuple(im.shape[1:]) == want
        # (c) the layout, timestamps included, equals the released processor's
        blocks = _blocks(item.input_ids, enc.vstart, enc.vend)
        vblocks = [b for b in blocks if enc.video_pad in b]
        assert len(vblocks) == len(videos)
        for b, m in zip(vblocks, videos):
            assert b == _expected_block(tok, m, enc.video_pad)
            stamps = tok.decode([t for t in b if t != enc.video_pad], skip_special_tokens=False)
            want = "".join(FRAME + format(t, ".1f") + (FAST_START + FAST_END if y else "")
                           for t, y in zip(m["plan"]["frame_times"], m["plan"]["frame_types"]))
            assert stamps == "<|vision_start|>" + want + "<|vision_end|>"
        # the pixels: the plan's frames decoded at native size, each resized as the release does
        if _name(meta) == "cut.mp4":
            (m,) = videos
            p = m["plan"]
            nat = torch.from_numpy(decode_frames(os.path.join(corpus["videos"], "cut.mp4"), p["frame_indices"]))
            for fr, im, t in zip(nat.permute(0, 3, 1, 2), item.images, p["frame_types"]):
                size = p["fast_size"] if t else p["slow_size"]
                ref = interpolate(fr[None], list(size), mode="bilinear", antialias=True)[0]
                assert torch.equal(im, ref)
    assert mixed >= 2 and fast_smaller >= 2  # slow and fast frames of two sizes were exercised


def _rope_oracle():
    from test_positions import oracle

    return oracle()


def _oracle_positions(model, it, ipad: int, vpad: int, spg_of_run: list[float]) -> torch.Tensor:
    """transformers' get_rope_index for one item: images (1, h, w); every video pad run one grid of
    its frames, (t, h, w) at spg_of_run (a 1.5 frame: t = 1), frames of a run of one size."""
    ids = it.input_ids
    x = torch.tensor([ids])
    tt = torch.zeros_like(x, dtype=torch.int32)
    tt[x == ipad] = 1
    tt[x == vpad] = 2
    igrids, vgrids, spg = [], [], []
    fi, p, run = 0, 0, 0
    while p < len(ids):
        if ids[p] not in (ipad, vpad):
            p += 1
            continue
        q = p
        while q < len(ids) and ids[q] == ids[p]:
            q += 1
        h, w = (s // 14 for s in it.images[fi].shape[1:])
        if ids[p] == ipad:
            igrids.append([1, h, w])
            fi += 1
        else:
            t = (q - p) // (h * w // 4)
            vgrids.append([t, h, w])
            spg.append(spg_of_run[run])
            run += 1
            fi += t
        p = q
    pos, _ = model.get_rope_index(x, tt, torch.tensor(igrids).view(-1, 3) if igrids else None,
                                  torch.tensor(vgrids).view(-1, 3) if vgrids else None,
                                  torch.tensor(spg, dtype=torch.float32) if spg else None)
    return pos[:, 0]


def _mrope(enc: Encoder) -> dict:
    return {"image_pad": enc.image_pad, "video_pad": enc.video_pad, "patch": 14, "merge": 2}


def test_packed_batch_positions_and_model(corpus, tmp_path):
    """The encoded samples packed into two rows: each row's video pads are its samples' planned
    tokens, the 3D positions equal transformers' get_rope_index with per-frame [1, h, w] grids, and
    ReelVLM takes the batch (pads match its visual tokens) under mrope and 1D positions."""
    from reelforge.training.checkpoint import build_tiny_models
    from reelforge.training.model import ReelVLM

    enc = Encoder(corpus["tokenizer"], None, 1 << 14)
    raws = _raws(corpus["shards"])
    items = [enc.encode(r)[0] for r in raws]
    planned = [sum(m["plan"]["tokens"] for m in json.loads(r["json"])["media"] if m["kind"] == "video")
               for r in raws]
    packs = [items[:2], items[2:]]
    b = collate_packed(packs, enc.pad, _mrope(enc))
    for row, n in ((0, sum(planned[:2])), (1, sum(planned[2:]))):
        assert int((b["input_ids"][row] == enc.video_pad).sum()) == n
    model = _rope_oracle()
    for row, pack in enumerate(packs):
        off = 0
        for it in pack:
            n = len(it.input_ids)
            runs = it.extra["video_fps"]
            want = _oracle_positions(model, it, enc.image_pad, enc.video_pad, [1 / r for r in runs])
            assert torch.equal(b["position_ids"][:, row, off:off + n], want)
            off += n
    paths = build_tiny_models(str(tmp_path / "models"), tokenizer_dir=corpus["tokenizer"])
    vlm = ReelVLM.from_paths(paths["vision"], paths["llm"], paths["tokenizer"]).eval()
    with torch.no_grad():
        for batch in (b, collate_packed(packs, enc.pad)):
            out = vlm(batch)
            assert torch.isfinite(out["loss"]) and out["n_labels"] > 0
        bad = dict(b, images=b["images"][:-1])  # one frame short: the pads-vs-features check is live
        with pytest.raises(ValueError, match="vision pads"):
            vlm(bad)


def test_shard_loader_end_to_end(corpus, tmp_path):
    """ShardLoader (the stage's `data.visual` the 1.5 preset, `positions: mrope`) yields every sample
    with its planned tokens."""
    from train_common import stage, write_stage

    from reelforge.training.loader import ShardLoader

    models = {"vision": str(tmp_path), "llm": corpus["tokenizer"]}  # the loader reads no weights
    path = write_stage(str(tmp_path / "s.yaml"), models, corpus["shards"], str(tmp_path / "out"),
                       data={"max_len": 1 << 14, "num_workers": 0, "positions": "mrope", "epochs": 1})
    d = yaml.safe_load(open(path))
    d["data"]["visual"] = {}
    d["model"]["tokenizer"] = corpus["tokenizer"]
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    vpad = Encoder(corpus["tokenizer"], None, 64).video_pad
    want = {}
    for r in _raws(corpus["shards"]):
        meta = json.loads(r["json"])
        want[meta["id"]] = sum(m["plan"]["tokens"] for m in meta["media"] if m["kind"] == "video")
    got: dict[str, int] = {}
    for batch in ShardLoader(stage(path)):
        assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
        for s in batch["samples"]:
            mine = batch["input_ids"][batch["segment_ids"] == s["segment"]]
            got[s["id"]] = int((mine == vpad).sum())
    assert got == want


def _random_layout_sample(rng: random.Random, enc: Encoder, k: int):
    """A conversation with a random mix of images, planned 1.5 videos (slow and fast frames of two
    sizes) and 1.0 videos (one run of t frames at 1/fps), its images and per-run rates."""
    kinds = [rng.choice(["image", "v15", "v15", "v10"]) for _ in range(rng.randint(0, 3))]
    media, images, rates = [], [], []
    for kind in kinds:
        if kind == "image":
            h, w = 2 * rng.randint(1, 8), 2 * rng.randint(1, 8)
            images.append(torch.zeros(3, 14 * h, 14 * w, dtype=torch.uint8))
            media.append(("image", h * w // 4, None))
        elif kind == "v10":
            t, h, w = rng.randint(1, 6), 2 * rng.randint(1, 6), 2 * rng.randint(1, 6)
            images += [torch.zeros(3, 14 * h, 14 * w, dtype=torch.uint8)] * t
            media.append(("video", t * h * w // 4, None))
            rates.append(rng.choice([0.5, 1.0, 2.0, 0.7, 25 / 12]))
        else:
            n = rng.randint(1, 8)
            types = [0] + [rng.randint(0, 1) for _ in range(n - 1)]
            sh, sw = 2 * rng.randint(2, 8), 2 * rng.randint(2, 8)
            fh, fw = max(2, sh // 2 // 2 * 2), max(2, sw // 2 // 2 * 2)
            fps = rng.choice([10.0, 24.0, 29.97])
            start = rng.choice([0.0, 30.0])
            times = [start + i / fps for i in sorted(rng.sample(range(200), n))]
            pads = []
            for y in types:
                h, w = (fh, fw) if y else (sh, sw)
                images.append(torch.zeros(3, 14 * h, 14 * w, dtype=torch.uint8))
                pads.append(h * w // 4)
            media.append(("video", sum(pads), FrameLayout.of(times, types, pads)))
            rates += [rng.choice([0.5, 2.0, 3.0])] * n  # one entry per pad run; a frame's rate is unused
    tags = "".join("<image>" if m[0] == "image" else "<video>" for m in media)
    msgs = [{"role": "user", "content": tags + rng.choice(["what is it?", "describe", ""])},
            {"role": "assistant", "content": rng.choice(["a red circle", "two frames", "yes"])}]
    ids, train = enc._tokens(enc.chat_segments(msgs), media)
    from reelforge.training.loader import Item

    return Item(ids, enc.shift(ids, train), images, f"r{k}", "t", "conversation",
                extra={"video_fps": rates} if rates else {}), kinds


def test_positions_equal_transformers_on_random_packed_rows(corpus):
    """12 packed rows of random 1.5-layout videos (mixed slow/fast frames), 1.0 videos, images and
    text: collate_packed's 3D positions equal transformers' get_rope_index per sample, each 1.5
    frame a [1, h, w] grid (its second_per_grid_ts drawn at random: a one-frame grid ignores it)."""
    enc = Encoder(corpus["tokenizer"], None, 1 << 14)
    rng = random.Random(5)
    model = _rope_oracle()
    seen = {"image": 0, "v15": 0, "v10": 0, "text": 0}
    fast = slow = 0
    for r in range(12):
        pack = []
        for k in range(rng.randint(2, 4)):
            it, kinds = _random_layout_sample(rng, enc, 10 * r + k)
            pack.append(it)
            for kd in kinds:
                seen[kd] += 1
            seen["text"] += not kinds
            fast += sum(1 for t in it.input_ids if t == enc.tok.convert_tokens_to_ids(FAST_START))
            slow += sum(1 for t in it.input_ids if t == enc.tok.convert_tokens_to_ids(FRAME))
        b = collate_packed([pack], enc.pad, _mrope(enc))
        off = 0
        for it in pack:
            n = len(it.input_ids)
            spg = [1 / x for x in it.extra.get("video_fps", [])]
            want = _oracle_positions(model, it, enc.image_pad, enc.video_pad, spg)
            assert torch.equal(b["position_ids"][:, 0, off:off + n], want), (r, it.id)
            off += n
        assert torch.equal(b["position_ids"][:, 0, off:], torch.arange(b["input_ids"].shape[1] - off).expand(3, -1))
    assert min(seen.values()) >= 3 and fast >= 10 and slow - fast >= 10, (seen, fast, slow)


def test_tokenizer_without_frame_markers(corpus, tmp_path, monkeypatch):
    """A tokenizer without `<|frame|>`, `<|fast_start|>`, `<|fast_end|>` gets them as plain text:
    the pads still equal the plan's tokens and the block decodes to the same text."""
    from reelforge.curation import tiny_models

    base = tiny_models.SPECIAL_TOKENS[:tiny_models.SPECIAL_TOKENS.index(FRAME)]
    monkeypatch.setattr(tiny_models, "SPECIAL_TOKENS", base)
    monkeypatch.setattr(tiny_models, "_TRAINED_SPECIALS", len(base))
    tok_dir = tiny_models.build_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=300,
                                               texts=["a static video", "a cut video"] * 20)
    enc = Encoder(tok_dir, None, 1 << 14)
    assert len(enc.ids(FRAME)) > 1
    raw = next(r for r in _raws(corpus["shards"]) if _name(json.loads(r["json"])) == "cut.mp4")
    meta = json.loads(raw["json"])
    (item,) = enc.encode(raw)
    (m,) = meta["media"]
    assert sum(1 for t in item.input_ids if t == enc.video_pad) == m["plan"]["tokens"]
    (block,) = _blocks(item.input_ids, enc.vstart, enc.vend)
    text = enc.tok.decode([t for t in block if t != enc.video_pad], skip_special_tokens=False)
    want = "".join(FRAME + format(t, ".1f") + (FAST_START + FAST_END if y else "")
                   for t, y in zip(m["plan"]["frame_times"], m["plan"]["frame_types"]))
    assert text == "<|vision_start|>" + want + "<|vision_end|>"


def _with_meta(raw: dict, fn) -> dict:
    meta = json.loads(raw["json"])
    fn(meta)
    return dict(raw, json=json.dumps(meta).encode())


def test_without_a_usable_plan_the_metadata_path(corpus):
    """keye-vl-1.0, a shard without the plan, or stage numbers that sample another frame count: one
    run of metadata-sampled frames at one size, no frame markers (the loader's earlier behaviour).
    Stage numbers that sample the same frames keep the plan's types at the stage's sizes."""
    from reelforge.curation.tokens import VisualTokenConfig, slow_fast_sizes, video_tokens

    raw = next(r for r in _raws(corpus["shards"]) if _name(json.loads(r["json"])) == "cut.mp4")
    meta = json.loads(raw["json"])
    (m,) = meta["media"]
    p = m["plan"]
    marks = None

    def plain(enc: Encoder, r: dict, cfg: VisualTokenConfig) -> None:
        (item,) = enc.encode(r)
        v = video_tokens(m["height"], m["width"], m["duration"], m["fps"], cfg, total_frames=m["frames"])
        assert len(item.images) == v["frames"]
        assert {tuple(i.shape[1:]) for i in item.images} == {(v["resized_height"], v["resized_width"])}
        (block,) = _blocks(item.input_ids, enc.vstart, enc.vend)
        assert block == [enc.vstart] + [enc.video_pad] * v["tokens"] + [enc.vend]
        assert not set(marks) & set(item.input_ids)
        assert len(item.extra["video_fps"]) == 1

    for visual, r in ((None, _with_meta(raw, lambda d: d["media"][0].pop("plan"))),
                      ({"processor": "keye-vl-1.0"}, raw),
                      ({"video_max_frames": len(p["frame_types"]) - 2}, raw)):
        enc = Encoder(corpus["tokenizer"], visual, 1 << 14)
        marks = enc.tok.convert_tokens_to_ids([FRAME, FAST_START, FAST_END])
        plain(enc, r, enc.vcfg)
    # a smaller token budget, same frame count: the plan's frames and types at the stage's sizes
    small = {"video_total_tokens": 400}
    enc = Encoder(corpus["tokenizer"], small, 1 << 14)
    (item,) = enc.encode(raw)
    fast = sum(p["frame_types"])
    s = slow_fast_sizes(m["height"], m["width"], len(p["frame_types"]) - fast, fast, enc.vcfg)
    assert s["tokens"] < p["tokens"]
    assert sum(1 for t in item.input_ids if t == enc.video_pad) == s["tokens"]
    assert [tuple(i.shape[1:]) for i in item.images] == [
        (s["fast_resized_height"], s["fast_resized_width"]) if t else (s["resized_height"], s["resized_width"])
        for t in p["frame_types"]]
    # a plan whose lists disagree is refused (the sample is skipped and counted by the reader)
    bad = _with_meta(raw, lambda d: d["media"][0]["plan"].update(frame_times=p["frame_times"][:-1]))
    with pytest.raises(ValueError, match="frame plan"):
        enc.encode(bad)
    assert copy.deepcopy(p) == json.loads(raw["json"])["media"][0]["plan"]


def test_text_tokens_leave_out_the_frame_text(corpus):
    """The tokens step's count (text_tokens + visual_tokens) of a conversation is the loader's length
    less the 1.5 frame text (`<|frame|>`, timestamp digits, fast start/end), which it does not count."""
    enc = Encoder(corpus["tokenizer"], None, 1 << 14)
    checked = 0
    for raw in _raws(corpus["shards"]):
        meta = json.loads(raw["json"])
        if meta["kind"] != "conversation":
            continue
        (item,) = enc.encode(raw)
        frame_text = 0
        for b in _blocks(item.input_ids, enc.vstart, enc.vend):
            if enc.video_pad in b:
                frame_text += sum(1 for t in b[1:-1] if t != enc.video_pad)
        assert frame_text > 0
        counted = meta["tokens"]["text_tokens"] + meta["tokens"]["visual_tokens"]
        assert len(item.input_ids) == counted + frame_text
        checked += 1
    assert checked == 2


def test_planned_and_unplanned_videos_in_one_sample(corpus):
    """A sample with an image, a planned video and the same video without its plan (at a native
    1.5 fps, so it is sampled at 1.5 fps, not the default 2): the planned one is laid out frame by
    frame, the other as one run, and the 3D positions equal transformers' with per-frame [1, h, w]
    grids for the first and one (t, h, w) grid at 1/1.5 s per frame for the second."""
    raw = next(r for r in _raws(corpus["shards"]) if len(json.loads(r["json"])["media"]) == 2)

    def second_video(d: dict) -> None:
        v = copy.deepcopy(d["media"][1])
        v.pop("plan")
        v["fps"] = 1.5
        d["media"].append(v)
        d["messages"][0]["content"] = d["messages"][0]["content"].replace("<video>", "<video><video>")

    enc = Encoder(corpus["tokenizer"], None, 1 << 14)
    (item,) = enc.encode(_with_meta(raw, second_video))
    meta = json.loads(raw["json"])
    plan = meta["media"][1]["plan"]
    _, planned, plain = _blocks(item.input_ids, enc.vstart, enc.vend)
    assert planned == _expected_block(enc.tok, meta["media"][1], enc.video_pad)
    n = len(item.images) - 1 - len(plan["frame_types"])  # the unplanned video's frames
    h, w = item.images[-1].shape[1:]
    assert n > 4 and plain == [enc.vstart] + [enc.video_pad] * (n * h * w // 784) + [enc.vend]
    rate = n / meta["media"][1]["frames"] * 1.5
    assert rate == pytest.approx(1.5)
    spg = [0.25] * len(plan["frame_types"]) + [1 / rate]
    want = _oracle_positions(_rope_oracle(), item, enc.image_pad, enc.video_pad, spg)
    got = collate_packed([[item]], enc.pad, _mrope(enc))["position_ids"][:, 0]
    assert torch.equal(got, want)


def test_damaged_media_is_skipped_and_counted(corpus, tmp_path):
    """A shard whose video bytes are truncated or garbage, or whose image is not an image: the loader
    skips those samples, counts them under `errors`, and yields the others (it never ends the run)."""
    import webdataset as wds

    from reelforge.training.loader import ShardSet, SlotReader

    raws = _raws(corpus["shards"])
    bad = str(tmp_path / "bad-000000.tar")
    damaged = 0
    with wds.TarWriter(bad) as w:
        for i, r in enumerate(raws):
            out = {k: v for k, v in r.items() if not k.startswith("__")}
            out["__key__"] = r["__key__"]
            for k in list(out):
                if k.endswith("mp4"):
                    out[k] = out[k][: len(out[k]) // 3] if i % 2 else b"\0" * 64  # truncated / garbage
                    damaged += 1 if k == next(x for x in out if x.endswith("mp4")) else 0
                elif k.endswith(("png", "jpg")):
                    out[k] = b"not an image"
            w.write(out)
    enc = Encoder(corpus["tokenizer"], {}, 1 << 14)
    ss = ShardSet(name="bad", weight=1.0, urls=[bad], counts=[len(raws)])
    reader = SlotReader([ss], enc, seed=0, slot=0, n_slots=1, split="samples", blend="samples", max_epochs=1)
    got = []
    while (items := reader.next()) is not None:
        got += [i.id for i in items]
    st = reader.snapshot()
    with_media = sum(any(k.endswith(("mp4", "png", "jpg")) for k in r) for r in raws)
    assert st["errors"]["bad"] + len(got) == len(raws)
    assert st["errors"]["bad"] >= damaged >= 1 and with_media >= st["errors"]["bad"]
