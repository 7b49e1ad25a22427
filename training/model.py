"""The model: SigLIP vision tower at native resolution, a 2-layer MLP projector merging 2x2 patches,
and a causal LLM (Qwen3 by default); every part loaded from a local folder with from_pretrained.

Images of any size (multiples of 28, from `curation.tokens.smart_resize`) go through the tower
with interpolated position embeddings and (`vision_rope="2d"`, Keye's tower) 2D rotary positions in
every attention layer (`training/vision_rope.py`), grouped by size; each image's (h/14 x w/14) patches are
merged 2x2 into (h/28)*(w/28) tokens, which replace the `<|image_pad|>`/`<|video_pad|>` ids in
order. Packed rows rely on position ids restarting per sample: transformers then builds a
block-diagonal causal mask (and flash-attention uses them as cu_seqlens).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reelforge.training.loader import IGNORE

PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"


class Projector(nn.Module):
    """LayerNorm per patch, then Linear(4D, hidden) - GELU - Linear(hidden, llm) over each 2x2 group."""

    def __init__(self, vision_dim: int, llm_dim: int, hidden: int | None = None, merge: int = 2):
        super().__init__()
        self.vision_dim, self.llm_dim, self.merge = vision_dim, llm_dim, merge
        self.hidden = hidden or vision_dim * merge * merge
        self.ln = nn.LayerNorm(vision_dim, eps=1e-6)
        self.fc1 = nn.Linear(vision_dim * merge * merge, self.hidden)
        self.fc2 = nn.Linear(self.hidden, llm_dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x: (B, h*w, D) patches of B images of h x w patches -> (B * h/2 * w/2, llm_dim)."""
        b, _, d = x.shape
        m = self.merge
        x = self.ln(x).view(b, h // m, m, w // m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m * d)
        return self.fc2(F.gelu(self.fc1(x)))

    def config(self) -> dict:
        return {"vision_dim": self.vision_dim, "llm_dim": self.llm_dim, "hidden": self.hidden, "merge": self.merge}


def pixels(img: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """uint8 (3, H, W) -> SigLIP's normalisation (mean = std = 0.5)."""
    return (img.to(device=device, dtype=torch.float32) / 127.5 - 1.0).to(dtype)


def vision_by_size(vision: nn.Module, images: list[torch.Tensor], dtype: torch.dtype, device: torch.device,
                   pooled: bool = False) -> list[tuple[int, torch.Tensor]]:
    """Runs same-size images together; returns (index, output) so callers can restore the order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[1:]), []).append(i)
    out: list[tuple[int, torch.Tensor]] = []
    for idx in groups.values():
        px = torch.stack([pixels(images[i], dtype, device) for i in idx])
        o = vision(pixel_values=px, interpolate_pos_encoding=True)
        res = o.pooler_output if pooled else o.last_hidden_state
        for j, i in enumerate(idx):
            out.append((i, res[j]))
    return out


def mrope_section(config) -> list[int]:
    """The LLM config's `mrope_section` (in rope_parameters or rope_scaling), else Qwen2.5-VL's
    split of the head's frequencies scaled to its size ([16, 24, 24] for head_dim 128)."""
    for key in ("rope_parameters", "rope_scaling"):
        sec = (getattr(config, key, None) or {}).get("mrope_section")
        if sec:
            return list(sec)
    half = (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads) // 2
    hw = half * 3 // 8
    return [half - 2 * hw, hw, hw]


class MRoPE(nn.Module):
    """Wraps the LLM's rotary embedding: with 3-row positions set in `pending` ((3, B, L)), frequency
    i turns by the temporal, height or width position as `mrope_section` assigns it (Qwen2.5-VL's
    multimodal RoPE, chunks in order t, h, w, the same for both halves); else the wrapped one."""

    def __init__(self, rotary: nn.Module, section: list[int]):
        super().__init__()
        self.rotary, self.section = rotary, list(section)
        self.pending: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        pos = self.pending
        if pos is None:
            return self.rotary(x, position_ids)
        inv = self.rotary.inv_freq.to(device=x.device, dtype=torch.float)
        if sum(self.section) != inv.shape[0]:
            raise ValueError(f"mrope_section {self.section} does not sum to the head's {inv.shape[0]} frequencies")
        freqs = pos.to(x.device)[..., None].float() * inv  # (3, B, L, d/2)
        parts, o = [], 0
        for i, n in enumerate(self.section):
            parts.append(freqs[i % 3, ..., o:o + n])
            o += n
        f = torch.cat(parts, -1)
        emb = torch.cat((f, f), -1)
        scale = getattr(self.rotary, "attention_scaling", 1.0)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def restart_positions(segments: torch.Tensor) -> torch.Tensor:
    """1D positions restarting at every segment change (B, L): what the mask and cu_seqlens need."""
    b, n = segments.shape
    idx = torch.arange(n, device=segments.device).expand(b, n)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values
    return idx - first


class ReelVLM(nn.Module):
    """ViT + projector + LLM; forward(batch) gives logits and the LM loss over shifted labels."""

    def __init__(self, vision: nn.Module, projector: Projector, llm: nn.Module, image_pad_id: int, video_pad_id: int):
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm
        self.image_pad_id, self.video_pad_id = image_pad_id, video_pad_id
        self.patch = vision.config.patch_size

    @classmethod
    def from_paths(cls, vision: str, llm: str, tokenizer: str, projector: str | None = None,
                   projector_hidden: int | None = None, attn_implementation: str = "sdpa",
                   dtype: torch.dtype = torch.float32, vision_rope: str = "2d") -> "ReelVLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

        from reelforge.training.vision_rope import apply_vision_rope

        v = apply_vision_rope(SiglipVisionModel.from_pretrained(vision, dtype=dtype,
                                                                attn_implementation=attn_implementation), vision_rope)
        lm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, attn_implementation=attn_implementation)
        tok = AutoTokenizer.from_pretrained(tokenizer)
        if projector and os.path.exists(os.path.join(projector, PROJECTOR_CONFIG)):
            with open(os.path.join(projector, PROJECTOR_CONFIG)) as f:
                pc = json.load(f)
            proj = Projector(pc["vision_dim"], pc["llm_dim"], pc["hidden"], pc["merge"])
            from safetensors.torch import load_file

            proj.load_state_dict(load_file(os.path.join(projector, PROJECTOR_FILE)))
        else:
            proj = Projector(v.config.hidden_size, lm.config.hidden_size, projector_hidden)
        proj.to(dtype)
        return cls(v, proj, lm, tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>"))

    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Visual tokens of all images, concatenated in order: (sum of tokens, llm_dim).

        Same-size images go through the tower and projector together, one call per size. Under
        ZeRO-3 with several ranks (`sync_calls`), every rank makes as many calls as the rank with
        the most sizes (extra calls on a blank image, times zero): ZeRO-3 gathers parameters per
        module call, and ranks that call a different number of times wait for each other forever.
        """
        dtype = self.projector.fc1.weight.dtype
        device = self.projector.fc1.weight.device
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[1:]), []).append(i)
        extra = 0
        if getattr(self, "sync_calls", False):
            import torch.distributed as dist

            n = torch.tensor([len(groups)], device=device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            extra = int(n.item()) - len(groups)
        feats: list[torch.Tensor | None] = [None] * len(images)
        for (h, w), idx in groups.items():
            px = torch.stack([pixels(images[i], dtype, device) for i in idx])
            o = self.vision(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
            proj = self.projector(o, h // self.patch, w // self.patch)
            per = proj.shape[0] // len(idx)
            for j, i in enumerate(idx):
                feats[i] = proj[j * per:(j + 1) * per]
        out = torch.cat(feats, 0)  # type: ignore[arg-type]
        for _ in range(extra):
            blank = pixels(torch.zeros(3, 2 * self.patch, 2 * self.patch, dtype=torch.uint8), dtype, device)
            o = self.vision(pixel_values=blank.unsqueeze(0), interpolate_pos_encoding=True).last_hidden_state
            out = out + 0.0 * self.projector(o, 2, 2).sum()
        return out

    def embed(self, input_ids: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_pad_id) | (input_ids == self.video_pad_id)
        if images:
            feats = self.encode_images(images).to(emb.dtype)
            if feats.shape[0] != int(mask.sum()):
                raise ValueError(f"{int(mask.sum())} vision pads but {feats.shape[0]} visual tokens")
            emb = emb.masked_scatter(mask.unsqueeze(-1), feats)
        else:
            # a batch without images still runs the tower (on a 28x28 blank): every rank then takes
            # part in the same collectives under ZeRO-3, and the tower's gradients exist (zero)
            blank = torch.zeros(3, 2 * self.patch, 2 * self.patch, dtype=torch.uint8)
            emb = emb + 0.0 * self.encode_images([blank]).sum().to(emb.dtype)
        return emb

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = self.projector.fc1.weight.device
        ids = batch["input_ids"].to(device)
        pos = batch["position_ids"].to(device)
        emb = self.embed(ids, batch.get("images") or [])
        rotary = None
        if pos.dim() == 3:  # Keye's 3D positions (3, B, L): multimodal RoPE, the mask from the segments
            base = self.llm.base_model
            rotary = base.rotary_emb if isinstance(base.rotary_emb, MRoPE) else \
                MRoPE(base.rotary_emb, mrope_section(self.llm.config))
            base.rotary_emb = rotary
            rotary.pending = pos
            pos = restart_positions(batch["segment_ids"].to(device))
        try:
            hidden = self.llm.base_model(inputs_embeds=emb, position_ids=pos, attention_mask=None,
                                         use_cache=False).last_hidden_state
        finally:
            if rotary is not None:
                rotary.pending = None
        logits = self.llm.get_output_embeddings()(hidden)
        out: dict[str, torch.Tensor] = {"logits": logits}
        if "labels" in batch:
            labels = batch["labels"].to(device)
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                  reduction="none").view(labels.shape)
            n = (labels != IGNORE).sum()
            out["token_logps"] = -nll
            out["n_labels"] = n
            out["loss"] = nll.sum() / n.clamp(min=1) + 0.0 * logits.sum() * (n == 0)
        return out

    @torch.no_grad()
    def generate(self, input_ids: list[int], images: list[torch.Tensor], generators: list, max_new_tokens: int,
                 eos_ids: list[int], temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, banned: list[int] | tuple = ()) -> list[list[int]]:
        """len(generators) completions of one prompt (token ids, without the end token), with a KV cache and the
        LLM's own 1D positions. Row r draws every token with `generators[r]` alone (None, or temperature 0:
        greedy), after transformers' repetition penalty, temperature, top-k and top-p, so a completion depends
        on its generator's seed and not on the other rows (the `sample` step's rule). A row stops at any of
        `eos_ids`; `banned` ids (the vision pads) are never drawn."""
        from transformers.generation.logits_process import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        n = len(generators)
        device = self.projector.fc1.weight.device
        ids = torch.tensor([input_ids], device=device)
        greedy = temperature <= 0
        procs: list = [RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty != 1.0 else []
        if not greedy:
            procs += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
            procs += [TopKLogitsWarper(top_k)] if top_k else []
            procs += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        seen = ids.expand(n, -1)  # the ids so far, as the repetition penalty reads them
        out = self.llm(inputs_embeds=self.embed(ids, images).expand(n, -1, -1), use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        stop, done = set(eos_ids), [False] * n
        seqs: list[list[int]] = [[] for _ in range(n)]
        for _ in range(max_new_tokens):
            scores = logits.float()
            if banned:
                scores[:, list(banned)] = float("-inf")
            for p in procs:
                scores = p(seen, scores)
            nxt = [int(scores[r].argmax()) if greedy or generators[r] is None else
                   int(torch.multinomial(torch.softmax(scores[r:r + 1], -1), 1, generator=generators[r])[0, 0])
                   for r in range(n)]
            for r, t in enumerate(nxt):
                if not done[r]:
                    done[r] = t in stop
                    if not done[r]:
                        seqs[r].append(t)
            if all(done):
                break
            step = torch.tensor(nxt, device=device).unsqueeze(1)
            seen = torch.cat([seen, step], 1)
            out = self.llm(input_ids=step, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return seqs


class ContrastiveViT(nn.Module):
    """Stage 0: the vision tower and a SigLIP text tower, sigmoid loss over image-text pairs."""

    def __init__(self, vision: nn.Module, text: nn.Module, init_scale: float = 10.0, init_bias: float = -10.0):
        super().__init__()
        self.vision, self.text = vision, text
        self.logit_scale = nn.Parameter(torch.tensor([float(init_scale)]).log())  # 1-d: DeepSpeed broadcasts bytes
        self.logit_bias = nn.Parameter(torch.tensor([float(init_bias)]))

    @classmethod
    def from_paths(cls, vision: str, text: str, vision_rope: str = "2d", **kw: Any) -> "ContrastiveViT":
        from transformers import SiglipTextModel, SiglipVisionModel

        from reelforge.training.vision_rope import apply_vision_rope

        v = apply_vision_rope(SiglipVisionModel.from_pretrained(vision), vision_rope)
        return cls(v, SiglipTextModel.from_pretrained(text), **kw)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from reelforge.training.losses import siglip_loss

        device = self.logit_bias.device
        images = [it.images[0] for it in batch["items"]]
        outs = dict(vision_by_size(self.vision, images, torch.float32, device, pooled=True))
        img = torch.stack([outs[i] for i in range(len(images))])
        L = max(1, max(len(it.input_ids) for it in batch["items"]))
        pad = batch.get("pad_id", 0)
        ids = torch.tensor([it.input_ids + [pad] * (L - len(it.input_ids)) for it in batch["items"]], device=device)
        txt = self.text(input_ids=ids).pooler_output
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = img @ txt.t() * self.logit_scale.exp() + self.logit_bias
        return {"loss": siglip_loss(logits), "logits": logits}


def segment_sums(values: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of per-token values per segment id (pads are -1): (n,)."""
    seg = segments.to(values.device).flatten()
    keep = seg >= 0
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, seg[keep], values.flatten()[keep])
