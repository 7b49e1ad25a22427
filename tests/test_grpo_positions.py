"""GRPO under `data.positions: mrope`: rollouts and the loss use Keye's 3D positions.

The cached step-by-step rollout (training/train.py `Objective.generate`) gives the prompt its
`item_positions` and generated token k the position max + 1 + k on all three rows (transformers'
Qwen2.5-VL generation rule, `rope_deltas`); its logits equal one uncached forward over prompt +
completion at those positions; the positions equal transformers' own `get_rope_index` /
`compute_3d_position_ids`; the loss batch scores the tokens at the rollout's positions; 1d is the
rollout of before, bit for bit. A tiny ReelVLM built in-process (random weights, nothing loaded).
"""

from __future__ import annotations

import copy

import pytest
import torch

from reelforge.training.loader import Item, collate_packed, item_positions
from reelforge.training.model import MRoPE, Projector, ReelVLM, mrope_section
from reelforge.training.train import Objective, rollout_positions

G, NEW = 3, 6


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    from reelforge.curation.tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("grpo_pos") / "tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def tiny_vlm(tok, seed: int = 0) -> ReelVLM:
    """SigLIP (patch 14) + Qwen3 (head_dim 16: mrope_section [2, 3, 3]); weights at std 0.2 so that
    positions visibly move the logits."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    v = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=4096, initializer_range=0.2,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    ids = tok.convert_tokens_to_ids
    m = ReelVLM(v, Projector(16, 32), lm, ids("<|image_pad|>"), ids("<|video_pad|>")).eval()
    assert mrope_section(m.llm.config) == [2, 3, 3]
    return m


def objective(model: ReelVLM, tok_dir: str, tmp_path, positions: str) -> Objective:
    from reelforge.training.config import stage_from_dict

    # the stage's model folders only need to exist: the model itself is built in-process
    cfg = stage_from_dict({"objective": "grpo", "model": {"vision": tok_dir, "llm": tok_dir},
                           "data": {"positions": positions, "sources": [{"path": str(tmp_path / "unused")}]},
                           "loss": {"grpo": {"group_size": G, "max_new_tokens": NEW}},
                           "output": {"dir": str(tmp_path / "out")}})
    return Objective(cfg, model, copy.deepcopy(model).eval(), 0, tok_dir)


def prompt_item(tok, frames: int, fps: float, name: str) -> Item:
    """A chat prompt with a 56x84 image (2x3 tokens) and a video of `frames` 56x56 frames (2x2 tokens
    each) at `fps`, ending with the assistant's turn, as the loader writes a GRPO item."""
    t = tok.convert_tokens_to_ids
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = ([t("<|im_start|>")] + enc("user\n") + [t("<|vision_start|>")] + [t("<|image_pad|>")] * 6
           + [t("<|vision_end|>")] + [t("<|vision_start|>")] + [t("<|video_pad|>")] * (4 * frames)
           + [t("<|vision_end|>")] + enc("describe the colour of the circle") + [t("<|im_end|>")] + enc("\n")
           + [t("<|im_start|>")] + enc("assistant\n"))
    g = torch.Generator().manual_seed(frames)
    images = [torch.randint(0, 256, (3, 56, 84), generator=g, dtype=torch.uint8)]
    images += [torch.randint(0, 256, (3, 56, 56), generator=g, dtype=torch.uint8) for _ in range(frames)]
    return Item(ids, [], images, name, "t", "conversation", extra={"reference": "red", "video_fps": [fps]})


# A: the prompt's last token holds its largest position (text after the video outruns its frames);
# B: 12 frames at 1 fps (temporal step 2) outrun the text after the video, so max + 1 > last + 1.
CASES = {"A": (3, 2.0), "B": (12, 1.0)}


def oracle(tok):
    """transformers' released Qwen2.5-VL position functions on a config (temporal patch 1,
    tokens_per_second 2: Keye-VL's), no weights."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    t = tok.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(image_token_id=t("<|image_pad|>"), video_token_id=t("<|video_pad|>"),
                           vision_start_token_id=t("<|vision_start|>"), vision_end_token_id=t("<|vision_end|>"),
                           vision_config={"tokens_per_second": 2, "spatial_merge_size": 2, "temporal_patch_size": 1})

    class Tiny:
        get_rope_index = Qwen2_5_VLModel.get_rope_index
        get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids
        compute_3d_position_ids = Qwen2_5_VLModel.compute_3d_position_ids

        def __init__(self, config):
            self.config, self.rope_deltas = config, None

    return Tiny(cfg)


class _Cache:  # what compute_3d_position_ids asks of a KV cache
    def __init__(self, n: int):
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def hf_rope_index(o, tok, ids: list[int], frames: int, fps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([ids])
    tt = torch.zeros_like(x, dtype=torch.int32)
    tt[x == tok.convert_tokens_to_ids("<|image_pad|>")] = 1
    tt[x == tok.convert_tokens_to_ids("<|video_pad|>")] = 2
    pos, delta = o.get_rope_index(x, tt, torch.tensor([[1, 4, 6]]), torch.tensor([[frames, 4, 4]]),
                                  torch.tensor([1.0 / fps], dtype=torch.float32))
    return pos[:, 0], delta


def capture(model: ReelVLM) -> tuple[list[list[torch.Tensor]], object]:
    """Last-position logits of every `model.llm` call, grouped per rollout (a prompt call starts one)."""
    groups: list[list[torch.Tensor]] = []

    def hook(mod, args, kwargs, out):
        if kwargs.get("inputs_embeds") is not None:
            groups.append([])
        groups[-1].append(out.logits[:, -1].detach().float().clone())

    return groups, model.llm.register_forward_hook(hook, with_kwargs=True)


def uncached_logits(model: ReelVLM, ids: list[int], images, pos: torch.Tensor) -> torch.Tensor:
    L = len(ids)
    batch = {"input_ids": torch.tensor([ids]), "position_ids": pos.unsqueeze(-2) if pos.dim() == 2 else pos[None],
             "segment_ids": torch.zeros(1, L, dtype=torch.long), "images": images}
    with torch.no_grad():
        return model(batch)["logits"][0].float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_rollout_equals_uncached_forward_at_transformers_positions(case, tok, tok_dir, tmp_path):
    """(a) each rollout step's logits == one uncached forward over prompt + completion at [prompt
    positions, max + 1 + k]; (b) those positions == transformers: the prompt's == get_rope_index, token k's
    == compute_3d_position_ids with the prompt's rope_deltas and a cache of P + k (and, in case A, the
    whole row == get_rope_index over prompt + completion)."""
    frames, fps = CASES[case]
    model = tiny_vlm(tok)
    obj = objective(model, tok_dir, tmp_path, "mrope")
    it = prompt_item(tok, frames, fps, case)
    P = len(it.input_ids)
    ppos = item_positions(it, obj.mrope)
    groups, h = capture(model)
    torch.manual_seed(1)
    try:
        seqs = obj.generate(model, it.input_ids, it.images, G, ppos)
    finally:
        h.remove()
    assert model.llm.base_model.rotary_emb.pending is None  # nothing left for the next forward
    steps = groups[0]
    assert len(groups) == 1 and max(len(c) for c in seqs) >= 3
    o = oracle(tok)
    hf_prompt, delta = hf_rope_index(o, tok, it.input_ids, frames, fps)
    assert torch.equal(ppos, hf_prompt)
    last_is_max = int(ppos[:, -1].max()) == int(ppos.max())
    assert last_is_max == (case == "A")
    for i, c in enumerate(seqs):
        full = rollout_positions(ppos, len(c))
        # (b) transformers' generation rule, step by step: arange(cache, cache + 1) + rope_deltas
        o.rope_deltas = delta
        for k in range(len(c)):
            got = o.compute_3d_position_ids(input_ids=torch.tensor([[c[k]]]), image_grid_thw=None,
                                            video_grid_thw=None, inputs_embeds=torch.zeros(1, 1, 1),
                                            attention_mask=None, cache=_Cache(P + k))
            assert torch.equal(got[:, 0, 0], full[:, P + k])
        if case == "A":
            assert torch.equal(full, hf_rope_index(o, tok, it.input_ids + c, frames, fps)[0])
        # (a) cached rollout == uncached forward at those positions
        ref = uncached_logits(model, it.input_ids + c, it.images, full)
        for k in range(len(c)):
            torch.testing.assert_close(steps[k][i], ref[P - 1 + k], rtol=0, atol=1e-4)
        # and positions matter: plain 1D positions give other logits
        flat = uncached_logits(model, it.input_ids + c, it.images, torch.arange(P + len(c)))
        assert (flat[P - 1:P - 1 + len(c)] - ref[P - 1:P - 1 + len(c)]).abs().max() > 1e-2


def test_loss_batch_scores_tokens_at_rollout_positions(tok, tok_dir, tmp_path):
    """(c) The GRPO loss batch: (3, B, L) positions equal to each completion's rollout positions, and the
    policy's token log-probs in it equal the log-softmax of the rollout's own logits for the sampled tokens.
    In case B the teacher-forced positions of prompt + completion (collate_packed with mrope) differ from
    the rollout's, so the loss batch must carry the rollout's."""
    model = tiny_vlm(tok)
    obj = objective(model, tok_dir, tmp_path, "mrope")
    items = [prompt_item(tok, *CASES[c], c) for c in sorted(CASES)]
    groups, h = capture(model)
    torch.manual_seed(2)
    try:
        packed, rewards, poss = obj.rollouts({"items": items})
    finally:
        h.remove()
    assert model.training  # rollouts hand the module back in train mode
    model.eval()
    B, L = packed["input_ids"].shape
    assert B == len(items) * G and len(rewards) == len(items) and all(len(r) == G for r in rewards)
    assert packed["position_ids"].shape == (3, B, L)
    with torch.no_grad():
        lp = model(packed)["token_logps"]
    differs = 0
    for b in range(B):
        it, i = items[b // G], b % G
        P = len(it.input_ids)
        row = packed["input_ids"][b].tolist()
        n = sum(1 for s in packed["segment_ids"][b].tolist() if s >= 0)
        c = row[P:n]
        assert row[:P] == it.input_ids and len(c) >= 1
        want = rollout_positions(item_positions(it, obj.mrope), len(c))
        assert torch.equal(poss[b], want)
        assert torch.equal(packed["position_ids"][:, b, :n], want)
        assert torch.equal(packed["position_ids"][:, b, n:], torch.arange(L - n).expand(3, -1))  # padding
        steps = groups[b // G]
        for k, t in enumerate(c):
            got = lp[b, P - 1 + k]
            exp = torch.log_softmax(steps[k][i], -1)[t]
            torch.testing.assert_close(got, exp, rtol=0, atol=1e-4)
        tf = collate_packed([[Item(row[:n], [-100] * n, it.images, "x", "t", "c", extra=it.extra)]], 0, obj.mrope)
        assert torch.equal(tf["position_ids"][:, 0, :P], want[:, :P])
        differs += int(not torch.equal(tf["position_ids"][:, 0, P:n], want[:, P:]))
    assert differs == G  # case B's rows: teacher-forced != rollout; case A's agree


def _generate_before(obj: Objective, model: ReelVLM, prompt, images, n):
    """Objective.generate as it was before 3D positions (commit a53e4e2), the 1d reference."""
    g = obj.cfg.loss["grpo"]
    ids = torch.tensor([prompt])
    emb = model.embed(ids, images).expand(n, -1, -1)
    eos = obj.tok.convert_tokens_to_ids("<|im_end|>")
    banned = [i for i in obj.tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                         "<|vision_end|>"]) if i is not None and i >= 0]
    out = model.llm(inputs_embeds=emb, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    done = torch.zeros(n, dtype=torch.bool)
    seqs = [[] for _ in range(n)]
    for _ in range(g["max_new_tokens"]):
        logits = logits.float() / max(g["temperature"], 1e-5)
        logits[:, banned] = float("-inf")
        if g["top_k"]:
            kth = torch.topk(logits, g["top_k"]).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
        for i in range(n):
            if not done[i]:
                seqs[i].append(int(nxt[i]))
        done |= nxt == eos
        if bool(done.all()):
            break
        out = model.llm(input_ids=nxt.unsqueeze(1), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return seqs


def test_1d_rollouts_and_loss_batch_unchanged(tok, tok_dir, tmp_path):
    """(d) `data.positions: 1d`: the same completions and step logits, bit for bit, as the rollout before
    this change for a seed; the loss batch is collate_packed's 1D batch; the rotary embedding is never
    wrapped. And mrope rollouts of the same seed do see other logits (the switch is live)."""
    model = tiny_vlm(tok)
    obj = objective(model, tok_dir, tmp_path, "1d")
    assert obj.mrope is None
    it = prompt_item(tok, *CASES["B"], "B")
    runs = []
    for fn in (lambda: obj.generate(model, it.input_ids, it.images, G),
               lambda: torch.no_grad()(_generate_before)(obj, model, it.input_ids, it.images, G)):
        groups, h = capture(model)
        torch.manual_seed(3)
        try:
            runs.append((fn(), groups[0]))
        finally:
            h.remove()
    (new, new_l), (old, old_l) = runs
    assert new == old and len(new_l) == len(old_l)
    assert all(torch.equal(a, b) for a, b in zip(new_l, old_l))
    assert not isinstance(model.llm.base_model.rotary_emb, MRoPE)

    torch.manual_seed(4)
    packed, _, poss = obj.rollouts({"items": [it]})
    assert poss == [None] * G and packed["position_ids"].dim() == 2
    n = [len(it.input_ids) + sum(1 for x in packed["labels"][b].tolist() if x != -100) for b in range(G)]
    rows = [packed["input_ids"][b, :n[b]].tolist() for b in range(G)]
    items = [Item(r, packed["labels"][b, :n[b]].tolist(), it.images, it.id, it.source, it.kind)
             for b, r in enumerate(rows)]
    ref = collate_packed([[i] for i in items], 0)
    for k in ("input_ids", "labels", "position_ids", "segment_ids"):
        assert torch.equal(packed[k], ref[k]), k
    assert not isinstance(model.llm.base_model.rotary_emb, MRoPE)

    m3 = objective(model, tok_dir, tmp_path, "mrope")
    groups, h = capture(model)
    torch.manual_seed(3)
    try:
        m3.generate(model, it.input_ids, it.images, G, item_positions(it, m3.mrope))
    finally:
        h.remove()
    assert (groups[0][0] - new_l[0]).abs().max() > 1e-2
