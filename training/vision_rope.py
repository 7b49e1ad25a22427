"""Keye-VL's 2D rotary positions inside the SigLIP vision tower (issue 13).

Keye-VL (1.0 and 1.5) keeps SigLIP's interpolated absolute position embeddings and also rotates q and
k of patch (row i, col j) in every attention layer with Qwen2-VL's vision RoPE: the first half of the
rotary frequencies turn by the row, the second half by the column (theta 10000, over the whole head).
transformers' Qwen2-VL tower orders patches in 2x2 merge windows; SigLIP emits them row-major, so the
table here is row-major (tests compare it with transformers' own after un-permuting).

`apply_vision_rope(vision, "2d")` changes a loaded `SiglipVisionModel` in place, adding no parameter
and no buffer (ZeRO-2/3 shard exactly what they did before): its attention layers become
`RotarySiglipAttention`, and a forward pre-hook on the tower builds the (h, w) table from each call's
pixel size and hands it down as a keyword argument. Every call therefore gets the grid of its own
images (`encode_images` runs one call per image size), and activation checkpointing recomputes a
layer with the table it was first called with. `"none"` leaves the tower untouched (bit-identical).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.siglip.modeling_siglip import (
    ALL_ATTENTION_FUNCTIONS,
    SiglipAttention,
    eager_attention_forward,
)

from reelforge.curation.errors import RecipeError

MODES = ("2d", "none")
THETA = 10000.0
KWARG = "vision_rope"  # the keyword the tables travel under, tower -> encoder -> layer -> attention


def head_dim(config: Any) -> int:
    """SiglipAttention's head size: hidden_size / num_attention_heads."""
    return config.hidden_size // config.num_attention_heads


def rope_table(h: int, w: int, dim: int, theta: float = THETA,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (h*w, dim), float32, patches row-major (p = i*w + j).

    Angle k of patch (i, j): i * f_k for k < dim/4, j * f_(k - dim/4) for dim/4 <= k < dim/2, with
    f = theta^(-2m/(dim/2)), m < dim/4; the second half of the head repeats the first (rotate_half pairs).
    """
    if dim % 4:
        raise ValueError(f"2D RoPE needs a head size divisible by 4, got {dim}")
    inv = 1.0 / (theta ** (torch.arange(0, dim // 2, 2, dtype=torch.float32, device=device) / (dim // 2)))
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    ang = torch.cat([rows[:, None] * inv, cols[:, None] * inv], dim=-1)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q, k of shape (..., N, dim) by cos/sin of shape (N, dim); computed in float32 and cast
    back, as transformers' `apply_rotary_pos_emb_vision` does (so bf16 training rotates exactly)."""
    cos, sin = cos.float(), sin.float()
    qf, kf = q.float(), k.float()
    return (qf * cos + _rotate_half(qf) * sin).to(q.dtype), (kf * cos + _rotate_half(kf) * sin).to(k.dtype)


class RotarySiglipAttention(SiglipAttention):
    """SiglipAttention whose q and k are rotated by the `vision_rope` (cos, sin) keyword, when given.

    The body is SiglipAttention.forward's (transformers 5.x) with the rotation between the projections
    and the attention function, so sdpa, eager and flash attention all apply; without the keyword it
    is SiglipAttention itself.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        table = kwargs.pop(KWARG, None)
        if table is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        queries, keys = apply_rope(queries, keys, *table)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, queries, keys, values, attention_mask, is_causal=self.is_causal, scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


def _table_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the tower: the row-major table for this call's (H/patch, W/patch) grid."""
    if kwargs.get(KWARG) is None:
        px = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        p = module.config.patch_size
        kwargs[KWARG] = rope_table(px.shape[-2] // p, px.shape[-1] // p, head_dim(module.config), device=px.device)
    return args, kwargs


def apply_vision_rope(vision: nn.Module, mode: str) -> nn.Module:
    """Gives a loaded SiglipVisionModel Keye's 2D RoPE (`"2d"`) or leaves it as it is (`"none"`); in place."""
    if mode not in MODES:
        raise RecipeError(f"stage field `model.vision_rope` must be 2d or none, got {mode!r}.")
    if mode == "none" or getattr(vision, "_reelforge_vision_rope", False):
        return vision
    if head_dim(vision.config) % 4:
        raise RecipeError(f"stage field `model.vision_rope` is 2d but the vision tower's head size "
                          f"{head_dim(vision.config)} is not a multiple of 4; set `model.vision_rope: none`.")
    swapped = 0
    for m in vision.modules():
        if type(m) is SiglipAttention:
            m.__class__ = RotarySiglipAttention
            swapped += 1
    if not swapped:
        raise RecipeError("stage field `model.vision_rope` is 2d but the vision tower has no SiglipAttention "
                          "layers to rotate; use a SiglipVisionModel folder or `model.vision_rope: none`.")
    vision.register_forward_pre_hook(_table_hook, with_kwargs=True)
    vision._reelforge_vision_rope = True
    return vision
