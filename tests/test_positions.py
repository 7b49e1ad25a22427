"""training/positions.py: Keye-VL's 3D rotary position ids equal transformers' own Qwen2.5-VL
`get_rope_index` (temporal patch 1, tokens_per_second 2, second_per_grid_ts = 1/fps) on random
mixed image/video/text rows; packed == unpacked; `video_frames` (a run of frames, each by its own
size and time). A planned Keye-VL-1.5 video has one pad run per frame: tests/test_loader_plan.py."""

from __future__ import annotations

import random

import pytest
import torch

from reelforge.training.positions import rope_index

IMG, VID, VSTART, VEND = 151655, 151656, 151652, 151653
N_GRIDS = 40


def oracle():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART,
                           vision_end_token_id=VEND,
                           vision_config={"tokens_per_second": 2, "spatial_merge_size": 2, "temporal_patch_size": 1})

    class Tiny:  # the released functions on a config, no weights
        get_rope_index = Qwen2_5_VLModel.get_rope_index
        get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

        def __init__(self, config):
            self.config = config

    assert cfg.vision_config.tokens_per_second == 2 and cfg.vision_config.spatial_merge_size == 2
    return Tiny(cfg)


def random_sample(rng: random.Random, kind: str | None = None):
    """One sample's ids with Keye-VL 1.0's layout: text, <vision_start> pads <vision_end>, ..."""
    ids: list[int] = []
    imgs, vids, spg = [], [], []
    n_media = 0 if kind == "text" else rng.randint(1, 5)
    text = lambda: [rng.randint(10, 1000) for _ in range(rng.randint(1, 12))]  # noqa: E731
    ids += text()
    for _ in range(n_media):
        h, w = 2 * rng.randint(1, 12), 2 * rng.randint(1, 12)
        if kind == "image" or (kind is None and rng.random() < 0.5):
            imgs.append([1, h, w])
            ids += [VSTART] + [IMG] * (h * w // 4) + [VEND]
        else:
            t = rng.randint(1, 24)
            fps = rng.choice([0.5, 1.0, 2.0, 3.0, 4.0, 1 / 3, 0.7, 25 / 12])
            vids.append([t, h, w])
            spg.append(1.0 / fps)
            ids += [VSTART] + [VID] * (t * h * w // 4) + [VEND]
        ids += text()
    return ids, imgs, vids, spg


def hf_positions(model, ids, imgs, vids, spg) -> torch.Tensor:
    x = torch.tensor([ids])
    tt = torch.zeros_like(x, dtype=torch.int32)
    tt[x == IMG] = 1
    tt[x == VID] = 2
    pos, _ = model.get_rope_index(x, tt, torch.tensor(imgs).view(-1, 3) if imgs else None,
                                  torch.tensor(vids).view(-1, 3) if vids else None,
                                  torch.tensor(spg, dtype=torch.float32) if spg else None)
    return pos[:, 0]


def ours(ids, imgs, vids, spg, **kw) -> torch.Tensor:
    return rope_index(ids, imgs or None, vids or None, torch.tensor(spg, dtype=torch.float32) if spg else None,
                      image_token_id=IMG, video_token_id=VID, **kw)


def cases(n: int, seed: int = 13):
    rng = random.Random(seed)
    kinds = ["text", "image", "video"] + [None] * 7
    return [random_sample(rng, kinds[i % len(kinds)]) for i in range(n)]


def test_equals_transformers_get_rope_index():
    model = oracle()
    bad = []
    cs = cases(N_GRIDS)
    assert sum(1 for c in cs if not c[1] and not c[2]) >= 3
    assert sum(1 for c in cs if len(c[1]) + len(c[2]) >= 3 and c[1] and c[2]) >= 5
    for i, (ids, imgs, vids, spg) in enumerate(cs):
        want = hf_positions(model, ids, imgs, vids, spg)
        got = ours(ids, imgs, vids, spg)
        if not torch.equal(want, got):
            bad.append(i)
    print(f"{len(cs)} grids, {len(bad)} mismatches")
    assert not bad, bad


def test_packed_equals_unpacked():
    cs = cases(12, seed=7)
    for start in range(0, 12, 4):
        group = cs[start:start + 4]
        ids, imgs, vids, spg, seg = [], [], [], [], []
        for k, (i_, im, v, s) in enumerate(group):
            ids += i_
            imgs += im
            vids += v
            spg += s
            seg += [k] * len(i_)
        ids += [0] * 5
        seg += [-1] * 5
        packed = ours(ids, imgs, vids, spg, segment_ids=seg)
        alone = torch.cat([ours(*c) for c in group] + [torch.arange(5).expand(3, -1)], 1)
        assert torch.equal(packed, alone)


def test_slow_fast_frame_by_frame():
    rng = random.Random(3)
    for _ in range(10):  # equal sizes at k/fps: exactly the 1.0 video rule
        t, h, w = rng.randint(1, 20), 2 * rng.randint(1, 8), 2 * rng.randint(1, 8)
        fps = rng.choice([1.0, 2.0, 0.7, 1 / 3])
        spg = torch.tensor([1 / fps], dtype=torch.float32)
        times = (torch.arange(t) * spg).tolist()
        ids = [5, 6, VSTART] + [VID] * (t * h * w // 4) + [VEND, 7]
        a = ours(ids, [], [[t, h, w]], [1 / fps])
        b = rope_index(ids, image_token_id=IMG, video_token_id=VID, video_frames=[[(h, w, x) for x in times]])
        assert torch.equal(a, b)
    # slow 4x6 (patches) at 10.0 s, fast 2x2 at 10.5 s, slow at 11.0 s: time is absolute
    frames = [(4, 6, 10.0), (2, 2, 10.5), (4, 6, 11.0)]
    ids = [9, VSTART] + [VID] * (6 + 1 + 6) + [VEND, 9]
    p = rope_index(ids, image_token_id=IMG, video_token_id=VID, video_frames=[frames])
    s = 2
    assert p[:, :2].tolist() == [[0, 1]] * 3
    assert p[0, 2:8].tolist() == [s] * 6 and p[1, 2:8].tolist() == [s, s, s, s + 1, s + 1, s + 1]
    assert p[2, 2:8].tolist() == [s, s + 1, s + 2] * 2
    assert p[:, 8].tolist() == [s + 1, s, s]
    assert p[0, 9:15].tolist() == [s + 2] * 6
    assert p[:, 15].tolist() == [s + 3] * 3  # </vision_end>: s + max(h, w)/2 = s + 3


def test_mismatch_refused():
    with pytest.raises(ValueError):
        rope_index([1, IMG, IMG, 2], [[1, 2, 2]], image_token_id=IMG, video_token_id=VID)


def test_loader_collate_mrope():
    """collate_packed with `data.positions: mrope`: (3, B, L) per-sample 3D positions from the items'
    frames (videos at 1/fps, slow-fast sizes frame by frame), equal to the oracle on 1.0 layouts."""
    from reelforge.training.loader import Item, collate_packed

    model = oracle()
    mrope = {"image_pad": IMG, "video_pad": VID, "patch": 14, "merge": 2}
    items, want = [], []
    for k, (ids, imgs, vids, spg) in enumerate(cases(8, seed=21)):
        images = []  # images and video frames in order of appearance in ids
        ii = vi = 0
        p = 0
        while p < len(ids):
            if ids[p] == IMG:
                _, h, w = imgs[ii]
                images.append(torch.zeros(3, 14 * h, 14 * w, dtype=torch.uint8))
                p += h * w // 4
                ii += 1
            elif ids[p] == VID:
                t, h, w = vids[vi]
                images += [torch.zeros(3, 14 * h, 14 * w, dtype=torch.uint8)] * t
                p += t * h * w // 4
                vi += 1
            else:
                p += 1
        items.append(Item(ids, [-100] * len(ids), images, f"s{k}", "t", "x",
                          extra={"video_fps": [1 / s for s in spg]} if spg else {}))
        want.append(hf_positions(model, ids, imgs, vids, spg))
    b = collate_packed([items[:5], items[5:]], 0, mrope)
    pos = b["position_ids"]
    assert pos.shape == (3, 2, b["input_ids"].shape[1])
    assert torch.equal(pos[:, 0, :sum(len(i.input_ids) for i in items[:5])], torch.cat(want[:5], 1))
    n1 = sum(len(i.input_ids) for i in items[5:])
    assert torch.equal(pos[:, 1, :n1], torch.cat(want[5:], 1))
    assert torch.equal(pos[:, 1, n1:], torch.arange(pos.shape[2] - n1).expand(3, -1))
    assert torch.equal(collate_packed([items[:1]], 0)["position_ids"], torch.arange(len(items[0].input_ids))[None])
    # one run of frames of two sizes (slow 4x6 patches, fast 2x2, slow 4x6) at 2 fps: video_frames' general
    # rule; the loader lays a planned 1.5 video out one run per frame instead (tests/test_loader_plan.py)
    ids = [9, VSTART] + [VID] * 13 + [VEND, 9]
    ims = [torch.zeros(3, 56, 84, dtype=torch.uint8), torch.zeros(3, 28, 28, dtype=torch.uint8),
           torch.zeros(3, 56, 84, dtype=torch.uint8)]
    got = collate_packed([[Item(ids, [-100] * len(ids), ims, "sf", "t", "x", extra={"video_fps": [2.0]})]], 0, mrope)
    exp = rope_index(ids, image_token_id=IMG, video_token_id=VID,
                     video_frames=[[(4, 6, 0.0), (2, 2, 0.5), (4, 6, 1.0)]])
    assert torch.equal(got["position_ids"][:, 0], exp)


# The model test's rows in a 1024-token vocabulary: text ids are 10..1000, the vision ids move just
# above them (a 151700-token head made every packed row's logits ~1 GB to compute and compare)
SMALL_VOCAB, SMALL_IDS = 1024, {IMG: 1001, VID: 1002, VSTART: 1003, VEND: 1004}


def _tiny_vlm():
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from reelforge.training.model import Projector, ReelVLM

    torch.manual_seed(0)
    v = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=SMALL_VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=4096))
    return ReelVLM(v, Projector(16, 32), lm, SMALL_IDS[IMG], SMALL_IDS[VID]).eval()


def _items(n, seed):
    from reelforge.training.loader import Item

    out = []
    for k, (ids, imgs, vids, spg) in enumerate(cases(n, seed=seed)):
        g = torch.Generator().manual_seed(k)
        images, ii, vi, p = [], 0, 0, 0
        while p < len(ids):
            if ids[p] in (IMG, VID):
                (t, h, w) = imgs[ii] if ids[p] == IMG else vids[vi]
                for _ in range(t):
                    images.append(torch.randint(0, 255, (3, 14 * h, 14 * w), generator=g, dtype=torch.uint8))
                p += t * h * w // 4
                ii, vi = (ii + 1, vi) if ids[p - 1] == IMG else (ii, vi + 1)
            else:
                p += 1
        ids = [SMALL_IDS.get(t, t) for t in ids]  # in the tiny model's vocabulary
        out.append(Item(ids, ids[1:] + [-100], images, f"s{k}", "t", "x",
                        extra={"video_fps": [1 / s for s in spg]} if spg else {}))
    return out


def test_model_mrope_packed_equals_unpacked():
    """ReelVLM with 3-row positions: a packed row's logits equal each sample's own; text-only
    samples give the same logits as 1D positions (equal rows turn like 1D RoPE)."""
    from reelforge.training.loader import collate_packed
    from reelforge.training.model import mrope_section

    model = _tiny_vlm()
    assert mrope_section(model.llm.config) == [2, 3, 3]
    mrope = {"image_pad": SMALL_IDS[IMG], "video_pad": SMALL_IDS[VID], "patch": 14, "merge": 2}
    items = [it for it in _items(10, seed=5) if len(it.input_ids) < 400][:4]
    assert any(it.images for it in items)
    with torch.no_grad():
        packed = model(collate_packed([items], 0, mrope))
        off = 0
        for it in items:
            one = model(collate_packed([[it]], 0, mrope))
            n = len(it.input_ids)
            torch.testing.assert_close(packed["logits"][0, off:off + n], one["logits"][0], rtol=1e-4, atol=1e-4)
            off += n
        text = [it for it in _items(6, seed=1) if not it.images]
        assert text
        a = model(collate_packed([text], 0, mrope))["logits"]
        b = model(collate_packed([text], 0))["logits"]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # 3D positions do change the logits of a sample with media
        it = next(i for i in items if i.images)
        assert not torch.allclose(model(collate_packed([[it]], 0, mrope))["logits"],
                                  model(collate_packed([[it]], 0))["logits"], atol=1e-4)


def test_shard_loader_mrope_end_to_end(tiny, shards, tmp_path):
    """`data.positions: mrope` through ShardLoader on the demo shards (images, videos, text): the
    batches carry (3, B, L) positions, the same ids as with 1d, and the tiny model's loss is finite."""
    from train_common import stage, write_stage

    from reelforge.training.loader import ShardLoader
    from reelforge.training.model import ReelVLM

    def cfg(name, positions):
        return stage(write_stage(str(tmp_path / f"{name}.yaml"), tiny, shards, str(tmp_path / name),
                                 data={"num_workers": 0, "max_len": 4096, "positions": positions}))

    model = ReelVLM.from_paths(tiny["vision"], tiny["llm"], tiny["tokenizer"]).eval()
    a, b = iter(ShardLoader(cfg("m", "mrope"))), iter(ShardLoader(cfg("d", "1d")))
    saw_vision = False
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x["input_ids"], y["input_ids"])
        B, L = x["input_ids"].shape
        assert x["position_ids"].shape == (3, B, L) and y["position_ids"].shape == (B, L)
        vis = (x["input_ids"] == model.image_pad_id) | (x["input_ids"] == model.video_pad_id)
        saw_vision |= bool(vis.any())
        txt_only = [r for r in range(B) if not vis[r].any()]
        for r in txt_only:
            assert torch.equal(x["position_ids"][:, r], y["position_ids"][r].expand(3, -1))
        with torch.no_grad():
            assert torch.isfinite(model(x)["loss"])
    assert saw_vision
