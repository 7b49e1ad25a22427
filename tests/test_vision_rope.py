"""Keye's 2D rotary positions in the SigLIP tower (training/vision_rope.py), checked against transformers'
own Qwen2-VL / Qwen2.5-VL vision code (tiny random towers built from configs; nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import SiglipTextModel, SiglipVisionModel
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)
from transformers.models.siglip.modeling_siglip import SiglipAttention, eager_attention_forward
from transformers.vision_utils import get_vision_position_ids

from reelforge.curation.errors import RecipeError
from reelforge.training.config import stage_from_dict
from reelforge.training.model import ContrastiveViT, Projector, ReelVLM, vision_by_size
from reelforge.training.vision_rope import (
    THETA,
    RotarySiglipAttention,
    apply_rope,
    apply_vision_rope,
    rope_table,
)

GRIDS = [(4, 6), (10, 2), (2, 2), (6, 4)]


def _qwen_tables(model: nn.Module, grids: list[tuple[int, int]], hook_on: str) -> list[tuple[torch.Tensor, ...]]:
    """cos, sin that transformers' vision tower computes for `grids` in one forward, back in row-major order.

    `hook_on="attn"` takes what the first attention layer receives (Qwen2-VL: no window shuffle);
    `"rotary"` the rotary module's output (Qwen2.5-VL shuffles it into windows after that)."""
    c = model.config
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    got: dict[str, tuple] = {}
    if hook_on == "attn":
        handle = model.blocks[0].attn.register_forward_pre_hook(
            lambda m, a, kw: got.update(t=kw["position_embeddings"]), with_kwargs=True)
    else:
        handle = model.rotary_pos_emb.register_forward_hook(lambda m, a, out: got.update(t=out))
    n = int(grid_thw.prod(-1).sum())
    with torch.no_grad():
        model(torch.randn(n, c.in_channels * c.temporal_patch_size * c.patch_size ** 2), grid_thw=grid_thw)
    handle.remove()
    cos, sin = got["t"]
    # transformers' own patch order (2x2 merge windows), as (row, col) per patch
    pos = get_vision_position_ids(grid_thw, c.spatial_merge_size)
    out, start = [], 0
    for h, w in grids:
        rows = pos[start:start + h * w]
        idx = rows[:, 0] * w + rows[:, 1]
        assert sorted(idx.tolist()) == list(range(h * w))
        rc, rs = torch.empty_like(cos[start:start + h * w]), torch.empty_like(sin[start:start + h * w])
        rc[idx], rs[idx] = cos[start:start + h * w], sin[start:start + h * w]
        out.append((rc, rs))
        start += h * w
    return out


@pytest.mark.parametrize("embed,heads", [(32, 2), (144, 2)])  # head sizes 16 and 72 (SigLIP-so400m's)
def test_table_equals_qwen2_vl_vision_rotary(embed, heads):
    torch.manual_seed(0)
    cfg = Qwen2VLVisionConfig(depth=1, embed_dim=embed, hidden_size=embed, num_heads=heads, mlp_ratio=2)
    assert cfg.rope_parameters["rope_theta"] == THETA
    model = Qwen2VisionTransformerPretrainedModel._from_config(cfg).eval()
    for (h, w), (cos, sin) in zip(GRIDS, _qwen_tables(model, GRIDS, "attn")):
        mc, ms = rope_table(h, w, embed // heads)
        assert mc.shape == (h * w, embed // heads)
        torch.testing.assert_close(mc, cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(ms, sin, rtol=0, atol=1e-6)


def test_table_equals_qwen2_5_vl_vision_rotary():
    torch.manual_seed(0)
    cfg = Qwen2_5_VLVisionConfig(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32,
                                 fullatt_block_indexes=[0])
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg).eval()
    for (h, w), (cos, sin) in zip(GRIDS, _qwen_tables(model, GRIDS, "rotary")):
        mc, ms = rope_table(h, w, 16)
        torch.testing.assert_close(mc, cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(ms, sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_equals_apply_rotary_pos_emb_vision(dtype):
    torch.manual_seed(1)
    cos, sin = rope_table(4, 6, 16)
    q, k = torch.randn(3, 2, 24, 16).to(dtype), torch.randn(3, 2, 24, 16).to(dtype)  # (B, heads, N, dim)
    mq, mk = apply_rope(q, k, cos, sin)
    for b in range(3):  # transformers' layout: (N, heads, dim)
        tq, tk = apply_rotary_pos_emb_vision(q[b].transpose(0, 1), k[b].transpose(0, 1), cos, sin)
        assert torch.equal(mq[b], tq.transpose(0, 1)) and torch.equal(mk[b], tk.transpose(0, 1))
    assert mq.dtype == dtype and not torch.equal(mq, q)


# ----------------------------------------------------------------------------- the SigLIP tower


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    from reelforge.training.checkpoint import build_tiny_models

    return build_tiny_models(str(tmp_path_factory.mktemp("vrope")))


def _img(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _tower(path: str, mode: str, attn: str = "sdpa") -> SiglipVisionModel:
    return apply_vision_rope(SiglipVisionModel.from_pretrained(path, attn_implementation=attn), mode).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_siglip_attention_rotates_q_and_k_like_transformers(tiny_paths, attn):
    """One layer of the rotated tower == SigLIP's projections, transformers' rotation with transformers' own
    (un-permuted) Qwen2-VL table for the 4x6 grid, SigLIP's eager attention, out_proj."""
    v = _tower(tiny_paths["vision"], "2d", attn)
    attn_mod = v.encoder.layers[0].self_attn
    assert type(attn_mod) is RotarySiglipAttention
    got: dict = {}
    attn_mod.register_forward_hook(lambda m, a, kw, out: got.update(x=kw["hidden_states"], out=out[0]),
                                   with_kwargs=True)
    with torch.no_grad():
        v(pixel_values=torch.randn(2, 3, 4 * 14, 6 * 14), interpolate_pos_encoding=True)
        qcfg = Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
        (cos, sin), = _qwen_tables(Qwen2VisionTransformerPretrainedModel._from_config(qcfg), [(4, 6)], "attn")
        x = got["x"]
        b, n, _ = x.shape
        q = attn_mod.q_proj(x).view(b, n, 2, 16)
        k = attn_mod.k_proj(x).view(b, n, 2, 16)
        val = attn_mod.v_proj(x).view(b, n, 2, 16).transpose(1, 2)
        rq, rk = zip(*[apply_rotary_pos_emb_vision(q[i], k[i], cos, sin) for i in range(b)])
        q, k = torch.stack(rq).transpose(1, 2), torch.stack(rk).transpose(1, 2)
        ref, _ = eager_attention_forward(attn_mod, q, k, val, None, scaling=attn_mod.scale)
        ref = attn_mod.out_proj(ref.reshape(b, n, -1))
    torch.testing.assert_close(got["out"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rotary_attention_without_rotation_is_siglip_attention(tiny_paths, attn):
    """cos = 1, sin = 0 through the rotated layer's own body gives SigLIP's layer bit for bit (the copied
    forward has not drifted from transformers')."""
    torch.manual_seed(2)
    plain = SiglipVisionModel.from_pretrained(tiny_paths["vision"], attn_implementation=attn).encoder.layers[0]
    layer = copy.deepcopy(plain)
    layer.self_attn.__class__ = RotarySiglipAttention
    x = torch.randn(2, 24, 32)
    ident = (torch.ones(24, 16), torch.zeros(24, 16))
    with torch.no_grad():
        assert torch.equal(layer(x, None, vision_rope=ident), plain(x, None))
        assert not torch.equal(layer(x, None, vision_rope=rope_table(4, 6, 16)), plain(x, None))


def test_2d_differs_from_none_and_mixed_sizes_equal_each_alone(tiny_paths):
    rope, none = _tower(tiny_paths["vision"], "2d"), _tower(tiny_paths["vision"], "none")
    assert all(type(m) is not RotarySiglipAttention for m in none.modules())
    assert sum(type(m) is RotarySiglipAttention for m in rope.modules()) == 2
    # no new parameters or buffers: ZeRO-2/3 shard exactly what they did before
    assert rope.state_dict().keys() == none.state_dict().keys()
    assert [n for n, _ in rope.named_buffers()] == [n for n, _ in none.named_buffers()]
    images = [_img(56, 84, 0), _img(28, 56, 1), _img(56, 84, 2), _img(84, 28, 3)]
    with torch.no_grad():
        mixed = dict(vision_by_size(rope, images, torch.float32, torch.device("cpu")))
        alone = [vision_by_size(rope, [im], torch.float32, torch.device("cpu"))[0][1] for im in images]
        flat = [vision_by_size(none, [im], torch.float32, torch.device("cpu"))[0][1] for im in images]
        # the table the hook built is the row-major one for this call's grid
        seen: dict = {}
        h = rope.encoder.layers[1].self_attn.register_forward_pre_hook(
            lambda m, a, kw: seen.update(t=kw["vision_rope"]), with_kwargs=True)
        rope(pixel_values=torch.zeros(1, 3, 84, 28), interpolate_pos_encoding=True)
        h.remove()
    for i in range(len(images)):
        torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-6)
        assert (mixed[i] - flat[i]).abs().max() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(seen["t"], rope_table(6, 2, 16)))
    # ReelVLM.encode_images: one tower call per size, tokens in order, each image as if alone
    vlm = ReelVLM(rope, Projector(32, 16), nn.Identity(), 0, 1).eval()
    with torch.no_grad():
        together = vlm.encode_images(images)
        apart = torch.cat([vlm.encode_images([im]) for im in images])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)


def test_rope_survives_deepcopy_and_checkpointing(tiny_paths):
    """MPO/GRPO's reference model is a deepcopy; activation checkpointing recomputes each layer with the
    table of its own call (two sizes in one step, then one backward)."""
    rope = _tower(tiny_paths["vision"], "2d")
    images = [_img(56, 84, 0), _img(28, 56, 1)]

    def grads(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        outs = vision_by_size(model, images, torch.float32, torch.device("cpu"))
        loss = sum((o ** 2).mean() for _, o in outs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref = copy.deepcopy(rope)
    assert type(ref.encoder.layers[0].self_attn) is RotarySiglipAttention
    with torch.no_grad():
        a = vision_by_size(rope, images[:1], torch.float32, torch.device("cpu"))[0][1]
        b = vision_by_size(ref, images[:1], torch.float32, torch.device("cpu"))[0][1]
    assert torch.equal(a, b)
    rope.train()
    l0, g0 = grads(rope)
    rope.activation_checkpointing_enable({"use_reentrant": False})
    assert rope.encoder.layers[0].gradient_checkpointing
    l1, g1 = grads(rope)
    assert torch.equal(l0, l1) and len(g0) == len(g1) > 10
    for x, y in zip(g0, g1):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_none_is_plain_siglip_bit_for_bit(tiny_paths):
    p = tiny_paths
    plain = SiglipVisionModel.from_pretrained(p["vision"]).eval()
    images = [_img(56, 84, 5), _img(28, 28, 6)]
    vlm = ReelVLM.from_paths(p["vision"], p["llm"], p["tokenizer"], vision_rope="none").eval()
    vit = ContrastiveViT.from_paths(p["vision"], p["text_tower"], vision_rope="none").eval()
    keye = ReelVLM.from_paths(p["vision"], p["llm"], p["tokenizer"]).eval()  # default: 2d
    assert isinstance(vit.text, SiglipTextModel)
    with torch.no_grad():
        for im in images:
            px = (im.float() / 127.5 - 1.0).unsqueeze(0)
            want = plain(pixel_values=px, interpolate_pos_encoding=True)
            for tower in (vlm.vision, vit.vision):
                got = tower(pixel_values=px, interpolate_pos_encoding=True)
                assert torch.equal(got.last_hidden_state, want.last_hidden_state)
                assert torch.equal(got.pooler_output, want.pooler_output)
            assert not torch.allclose(keye.vision(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state,
                                      want.last_hidden_state)
    assert type(keye.vision.encoder.layers[0].self_attn) is RotarySiglipAttention
    vit2d = ContrastiveViT.from_paths(p["vision"], p["text_tower"])  # the text tower keeps plain attention
    assert type(vit2d.vision.encoder.layers[0].self_attn) is RotarySiglipAttention
    assert type(vit2d.text.encoder.layers[0].self_attn) is SiglipAttention


def test_stage_field_vision_rope(tmp_path):
    d = {"model": {"vision": str(tmp_path), "llm": str(tmp_path)}, "data": {"sources": [str(tmp_path)]},
         "output": {"dir": str(tmp_path / "out")}}
    assert stage_from_dict(d).model["vision_rope"] == "2d"
    assert stage_from_dict({**d, "model": {**d["model"], "vision_rope": "none"}}).model["vision_rope"] == "none"
    for bad in ("3d", None, True):
        with pytest.raises(RecipeError, match=r"`model\.vision_rope` must be 2d .* or none"):
            stage_from_dict({**d, "model": {**d["model"], "vision_rope": bad}})
    with pytest.raises(RecipeError, match=r"`model\.vision_rope` must be 2d or none"):
        apply_vision_rope(nn.Linear(1, 1), "2D")
