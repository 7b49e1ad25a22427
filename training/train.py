"""`reelforge train STAGE.yaml`: one stage on DeepSpeed, one process or many (deepspeed / torchrun).

Each optimiser step logs loss, learning rate, tokens, tokens/s and the objective's own numbers (GRPO:
mean reward, its parts, KL; the mean over the step's micro-batches and ranks) to `OUT/metrics.jsonl`
and the ids it trained on to `OUT/seen/rank{r}.jsonl`. Checkpoints (`OUT/ckpt/step-N`, DeepSpeed's
format) hold model, optimiser, scheduler, every rank's loader position and RNG state; running
the same stage again resumes from the newest one. The end writes `OUT/final` (an export folder
a later stage names as `model.init`, or `reelforge merge` averages) and the report.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from reelforge.curation.errors import RecipeError
from reelforge.training.config import StageConfig
from reelforge.training.loader import IGNORE, ShardLoader, collate_packed
from reelforge.training.losses import (
    RunningMean,
    group_advantages,
    grpo_loss,
    mpo_loss,
    rewards_of,
    tempered_token_logps,
)
from reelforge.training.model import ContrastiveViT, ReelVLM, segment_sums

# ----------------------------------------------------------------------------- setup

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local rank); a plain `python` run becomes a world of one (gloo on the CPU)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def deepspeed_config(cfg: StageConfig, world: int, gpu: bool) -> dict:
    """The DeepSpeed JSON from the stage: ZeRO stage, precision (bf16 on GPU, fp32 on CPU), clipping."""
    d = cfg.deepspeed
    bf16 = d["precision"] == "bf16" or (d["precision"] == "auto" and gpu)
    z: dict[str, Any] = {"stage": d["zero_stage"], "contiguous_gradients": True, "overlap_comm": gpu,
                         "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if d["zero_stage"] == 3:
        z.update({"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5,
                  "stage3_gather_16bit_weights_on_model_save": True})
    if d["offload_optimizer"]:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": cfg.grad_accum,
          "train_batch_size": world * cfg.grad_accum, "gradient_clipping": cfg.optim["grad_clip"],
          "zero_optimization": z, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
          "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    from reelforge.training.config import deep_update

    return deep_update(ds, d.get("extra") or {})


def lr_lambda(cfg: StageConfig) -> Callable[[int], float]:
    """Warm-up, then cosine to min_lr_ratio, constant, or linear to zero (Stage 3's annealing)."""
    o, total = cfg.optim, cfg.steps
    warm, floor, kind = o["warmup_steps"], o["min_lr_ratio"], o["schedule"]

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        if kind == "constant":
            return 1.0
        if kind == "linear_to_zero":
            return max(0.0, 1.0 - (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def build_model(cfg: StageConfig) -> torch.nn.Module:
    m, init = cfg.model, cfg.model["init"]

    def part(name: str, sub: str) -> str | None:
        if m[name]:
            return m[name]
        if init and os.path.isdir(os.path.join(init, sub)):
            return os.path.join(init, sub)
        return None

    if cfg.objective == "vit_contrastive":
        vision, text = part("vision", "vision"), part("text_tower", "text_tower")
        if not vision or not text:
            raise RecipeError("stage field `model.vision` and `model.text_tower` (or `model.init` holding "
                              "vision/ and text_tower/) are needed for the vit_contrastive objective.")
        s = cfg.loss["siglip"]
        return ContrastiveViT.from_paths(vision, text, init_scale=s["init_scale"], init_bias=s["init_bias"],
                                         vision_rope=m["vision_rope"])
    vision, llm = part("vision", "vision"), part("llm", "llm")
    if not vision or not llm:
        raise RecipeError("stage field `model.vision` and `model.llm` (or `model.init` holding vision/ and llm/) "
                          "must name folders written by save_pretrained.")
    tokdir = m["tokenizer"] or (os.path.join(init, "tokenizer") if init and os.path.isdir(
        os.path.join(init, "tokenizer")) else llm)
    return ReelVLM.from_paths(vision, llm, tokdir, projector=init, projector_hidden=m["projector_hidden"],
                              attn_implementation=m["attn_implementation"], vision_rope=m["vision_rope"])


def set_trainable(model: torch.nn.Module, cfg: StageConfig) -> None:
    """Freeze what the stage does not train (Stage 1: projector only)."""
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        if top in ("text", "logit_scale", "logit_bias"):
            p.requires_grad_(True)  # the contrastive head trains with the tower in Stage 0
        else:
            p.requires_grad_(top in cfg.trainable)
        if top == "vision" and ".head." in f".{name.split('.', 1)[1]}" and cfg.objective != "vit_contrastive":
            p.requires_grad_(False)  # SigLIP's pooling head is unused by the VLM


def tokenizer_dir(cfg: StageConfig) -> str:
    m = cfg.model
    if m["tokenizer"]:
        return m["tokenizer"]
    if m["init"] and os.path.isdir(os.path.join(m["init"], "tokenizer")):
        return os.path.join(m["init"], "tokenizer")
    return m["llm"] or m["text_tower"]


# ----------------------------------------------------------------------------- objectives

def dummy_batch(objective: str, pad: int) -> dict:
    """What an exhausted rank feeds while others finish the epoch (loss x 0)."""
    if objective == "vit_contrastive":
        from reelforge.training.loader import Item

        blank = torch.zeros(3, 28, 28, dtype=torch.uint8)
        return {"items": [Item([pad], [], [blank], "", "", "", "dummy")] * 2, "samples": [], "tokens": 0,
                "dummy": True}
    b = {"input_ids": torch.tensor([[pad]]), "labels": torch.tensor([[IGNORE]]), "position_ids": torch.tensor([[0]]),
         "segment_ids": torch.tensor([[-1]]), "images": [], "samples": [], "tokens": 0, "dummy": True}
    return b


class Objective:
    """Turns a batch into a loss (and a few numbers to log) for the stage's objective."""

    def __init__(self, cfg: StageConfig, engine, ref: torch.nn.Module | None, pad: int, tok_path: str):
        self.cfg, self.engine, self.ref, self.pad = cfg, engine, ref, pad
        self.bco = RunningMean()
        self.tok = None
        inner = getattr(engine, "module", engine)
        self.image_pad = getattr(inner, "image_pad_id", -1)
        self.video_pad = getattr(inner, "video_pad_id", -1)
        self.mrope: dict | None = None  # GRPO under `data.positions: mrope`: item_positions' spec
        self.reward_parts: dict[str, float] = {}  # GRPO: the last rollouts' mean reward per part
        if cfg.objective == "grpo":
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(tok_path)
            self.mrope = grpo_mrope_spec(cfg, self.tok)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict]:
        obj = self.cfg.objective
        if batch.get("dummy"):
            if obj == "vit_contrastive":
                return self.engine(batch)["loss"] * 0.0, {}
            return self.engine(batch)["loss"] * 0.0, {}
        if obj == "vit_contrastive":
            batch["pad_id"] = self.pad
            return self.engine(batch)["loss"], {}
        if obj == "lm":
            return self.engine(batch)["loss"], {}
        if obj == "mpo":
            return self.mpo(batch)
        return self.grpo(batch)

    def _seq_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = model(batch)
        n = len(batch["samples"])
        lp = segment_sums(out["token_logps"], batch["segment_ids"], n)
        cnt = segment_sums((batch["labels"] != IGNORE).to(lp.dtype), batch["segment_ids"], n)
        return lp, cnt, out

    def mpo(self, batch: dict) -> tuple[torch.Tensor, dict]:
        c = self.cfg.loss["mpo"]
        lp, cnt, out = self._seq_logps(self.engine, batch)
        with torch.no_grad():
            ref_lp, _, _ = self._seq_logps(self.ref, batch)
        roles = [s["role"] for s in batch["samples"]]
        ci = torch.tensor([i for i, r in enumerate(roles) if r == "chosen"])
        ri = torch.tensor([i for i, r in enumerate(roles) if r == "rejected"])
        chosen_mask = torch.zeros_like(batch["segment_ids"], dtype=torch.bool)
        for i in ci.tolist():
            chosen_mask |= batch["segment_ids"] == i
        chosen_mask &= batch["labels"] != IGNORE
        nll = -out["token_logps"][chosen_mask.to(out["token_logps"].device)]
        delta = self.bco.mean if c["bco_delta"] == "running" else float(c["bco_delta"])
        loss, st = mpo_loss(lp[ci], lp[ri], ref_lp[ci], ref_lp[ri], nll, c["beta"], c["weights"], delta)
        if c["bco_delta"] == "running":
            self.bco.update(st["reward_mean"])
        st["delta"] = delta
        return loss, st

    @torch.no_grad()
    def generate(self, model: ReelVLM, prompt: list[int], images: list[torch.Tensor], n: int,
                 positions: torch.Tensor | None = None) -> list[list[int]]:
        """n sampled completions of one prompt (KV cache; stops at the end-of-turn token).

        `positions`: the prompt's 3D positions (3, P) under `data.positions: mrope`; the LLM's
        rotary embedding then turns by them (the MRoPE wrapper's `pending`, (3, n, P) for the
        prompt call, (3, n, 1) for each decode step) and generated token k by `rollout_positions`
        (max + 1 + k). None: the LLM's own 1D positions, as before."""
        g = self.cfg.loss["grpo"]
        device = model.projector.fc1.weight.device
        ids = torch.tensor([prompt], device=device)
        emb = model.embed(ids, images).expand(n, -1, -1)
        eos = self.tok.convert_tokens_to_ids("<|im_end|>")
        banned = [i for i in self.tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                              "<|vision_end|>"]) if i is not None and i >= 0]
        rot, ext = None, None
        if positions is not None:
            rot = mrope_rotary(model)
            ext = rollout_positions(positions, g["max_new_tokens"]).to(device)
            rot.pending = ext[:, None, :len(prompt)].expand(3, n, len(prompt))
        try:
            out = model.llm(inputs_embeds=emb, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            done = torch.zeros(n, dtype=torch.bool, device=device)
            seqs: list[list[int]] = [[] for _ in range(n)]
            for k in range(g["max_new_tokens"]):
                logits = logits.float() / max(g["temperature"], 1e-5)
                logits[:, banned] = float("-inf")  # a completion never invents vision pads
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
                if rot is not None:  # token k goes in at column len(prompt) + k
                    col = len(prompt) + k
                    rot.pending = ext[:, None, col:col + 1].expand(3, n, 1)
                out = model.llm(input_ids=nxt.unsqueeze(1), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
        finally:
            if rot is not None:
                rot.pending = None
        return seqs

    def rollouts(self, batch: dict) -> tuple[dict, list[list[float]], list[torch.Tensor | None]]:
        """G completions of every prompt in `batch["items"]`, scored: (the packed batch the loss runs on,
        rewards per prompt, each completion's positions (3, prompt + completion) or None under 1d).

        Under `data.positions: mrope` the loss batch is collated with 3D positions and then given the
        rollout's own: `item_positions` over prompt + completion continues the text counter from the
        prompt's last token (the teacher-forced rule of `get_rope_index`), while the rollout continues
        from the prompt's largest position (`rollout_positions`, transformers' generation rule). The two
        differ when a video's temporal positions outrun the text after it; the loss must score the
        tokens under the positions they were sampled with."""
        from reelforge.training.loader import Item, item_positions

        g = self.cfg.loss["grpo"]
        G = g["group_size"]
        module = self.engine.module if hasattr(self.engine, "module") else self.engine
        items, rewards, positions = [], [], []
        parts: dict[str, float] = {}
        module.eval()
        try:
            for it in batch["items"]:
                ppos = item_positions(it, self.mrope) if self.mrope else None
                comps = self.generate(module, it.input_ids, it.images, G, ppos)
                rs = []
                for c in comps:
                    text = self.tok.decode(c, skip_special_tokens=False).replace("<|im_end|>", "")
                    rs.append(rewards_of(text, it.extra["reference"], g["rewards"]))
                    ids = it.input_ids + c
                    train = [False] * len(it.input_ids) + [True] * len(c)
                    labels = [ids[t + 1] if train[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
                    items.append(Item(ids, labels, it.images, it.id, it.source, it.kind, extra=dict(it.extra)))
                    positions.append(rollout_positions(ppos, len(c)) if ppos is not None else None)
                rewards.append([r["total"] for r in rs])
                for r in rs:
                    for k, v in r.items():
                        parts[k] = parts.get(k, 0.0) + v
        finally:
            module.train()
        # each reward part's mean over the batch's completions (`total` is the reward itself)
        self.reward_parts = {k: v / max(1, len(items)) for k, v in parts.items() if k != "total"}
        packed = collate_packed([[i] for i in items], self.pad, self.mrope)
        if self.mrope:
            for b, p in enumerate(positions):
                packed["position_ids"][:, b, :p.shape[1]] = p
        return packed, rewards, positions

    def grpo(self, batch: dict) -> tuple[torch.Tensor, dict]:
        g = self.cfg.loss["grpo"]
        packed, rewards, _ = self.rollouts(batch)
        out = self.engine(packed)
        with torch.no_grad():
            ref_out = self.ref(packed)
        lp, ref = out["token_logps"], ref_out["token_logps"]
        if g["temperature"] != 1.0:  # score the tokens under the distribution they were sampled from
            labels = packed["labels"].to(lp.device)
            lp = tempered_token_logps(out["logits"], labels, g["temperature"], IGNORE)
            ref = tempered_token_logps(ref_out["logits"], labels.to(ref.device), g["temperature"], IGNORE)
        mask = packed["labels"] != IGNORE
        r = torch.tensor(rewards, dtype=torch.float32)
        adv = group_advantages(r).to(lp.device)
        loss, st = grpo_loss(lp, lp.detach(), ref, adv, mask.to(lp.device), g["clip_eps"], g["kl_beta"])
        st["reward"] = float(r.mean())
        st.update({f"reward_{k}": v for k, v in self.reward_parts.items()})
        st["_weight"] = r.numel()  # completions: the step's mean reward weighs micro-batches and ranks by them
        return loss, st


def grpo_mrope_spec(cfg: StageConfig, tok) -> dict | None:
    """`item_positions`' spec for a GRPO stage with `data.positions: mrope` (the pads' ids, and the patch
    and merge sizes of `data.visual`, as the loader builds it for lm/mpo), else None."""
    if cfg.data.get("positions", "1d") != "mrope":
        return None
    from reelforge.curation.tokens import VisualTokenConfig

    v = VisualTokenConfig.from_dict(cfg.data["visual"])
    ids = tok.convert_tokens_to_ids
    return {"image_pad": ids("<|image_pad|>"), "video_pad": ids("<|video_pad|>"), "patch": v.patch_size,
            "merge": v.merge_size}


def rollout_positions(prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """The prompt's 3D positions (3, P) followed by those of `n_new` generated tokens: token k at
    (max prompt position + 1 + k) on all three rows -> (3, P + n_new).

    This is Qwen2.5-VL generation with a KV cache in transformers (5.x,
    models/qwen2_5_vl/modeling_qwen2_5_vl.py): `get_rope_index` returns
    `mrope_position_deltas = llm_positions.max() + 1 - len(input_ids)` for the prompt, the model keeps
    it as `self.rope_deltas`, and `compute_3d_position_ids` gives each later token
    `arange(cache_length, cache_length + seq_length) + rope_deltas` on all three rows, i.e.
    P + k + (max + 1 - P) = max + 1 + k."""
    k = torch.arange(n_new, dtype=prompt.dtype, device=prompt.device) + prompt.max() + 1
    return torch.cat([prompt, k.expand(3, n_new)], 1)


def mrope_rotary(model: ReelVLM):
    """The LLM's rotary embedding wrapped in `MRoPE` (installed once, as `ReelVLM.forward` does)."""
    from reelforge.training.model import MRoPE, mrope_section

    base = model.llm.base_model
    if not isinstance(base.rotary_emb, MRoPE):
        base.rotary_emb = MRoPE(base.rotary_emb, mrope_section(model.llm.config))
    return base.rotary_emb


# ----------------------------------------------------------------------------- the loop

def _gather(obj: Any, world: int) -> list[Any]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def latest_checkpoint(ckpt_dir: str) -> str | None:
    p = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return f.read().strip() or None


def _truncate_jsonl(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM set a flag instead of killing the run; the loop checks it at each step
    boundary (all ranks agree through the step's all-reduce), saves a checkpoint there and returns, so
    `reelforge train` exits 0 and the next run resumes from that step. Installed from the main thread
    only (Python's rule); the previous handlers come back on exit. DataLoader workers forked while it
    is installed inherit the flag-setting handler, so a Ctrl-C to the process group does not kill
    them under the step that is finishing. A second Ctrl-C raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.got: int | None = None
        self._old: dict[int, Any] = {}

    def _on(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if self.got is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step's checkpoint
        self.got = signum

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._on)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.got).name if self.got else ""


def train(cfg: StageConfig, stop_after: int | None = None, fresh: bool = False,
          log: Callable[[str], None] = print) -> dict:
    """Run (or resume) a stage; returns a summary. `stop_after` stops at that step, as if interrupted.
    SIGINT / SIGTERM stop it at the next step boundary with a checkpoint there (summary `interrupted`)."""
    with StopSignals() as signals:
        return _train(cfg, stop_after, fresh, log, signals)


def _train(cfg: StageConfig, stop_after: int | None, fresh: bool, log: Callable[[str], None],
           signals: StopSignals) -> dict:
    import deepspeed

    rank, world, local = init_distributed()
    gpu = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    out_dir = cfg.output["dir"]
    ckpt_dir = os.path.join(out_dir, "ckpt")
    if rank == 0:
        os.makedirs(os.path.join(out_dir, "seen"), exist_ok=True)
        with open(os.path.join(out_dir, "stage.json"), "w") as f:
            json.dump(cfg.raw, f, indent=1, default=str)
    dist.barrier()

    model = build_model(cfg)
    set_trainable(model, cfg)
    model.sync_calls = cfg.deepspeed["zero_stage"] == 3 and world > 1
    ref = None
    if cfg.objective in ("mpo", "grpo"):
        ref = copy.deepcopy(model).eval().to(device)
        for p in ref.parameters():
            p.requires_grad_(False)
        if deepspeed_config(cfg, world, gpu)["bf16"]["enabled"]:
            ref.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    o = cfg.optim
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o["lr"], betas=tuple(o["betas"]),
                            eps=o["eps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    tag = None if fresh else latest_checkpoint(ckpt_dir)
    load_tag, saved_world = tag, None
    ds_cfg = deepspeed_config(cfg, world, gpu)
    if tag is not None and cfg.deepspeed["zero_stage"] > 0:
        from reelforge.training.checkpoint import to_universal, zero_world

        saved_world = zero_world(ckpt_dir, tag)
        if saved_world not in (None, world):  # another size: ZeRO's partitions load through a universal checkpoint
            if rank == 0:
                to_universal(ckpt_dir, tag)
            dist.barrier()
            load_tag = f"{tag}-universal"
            ds_cfg = {**ds_cfg, "checkpoint": {**ds_cfg.get("checkpoint", {}), "load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    tok = tokenizer_dir(cfg)
    loader = ShardLoader(cfg, rank, world)
    if cfg.output["save_initial"] and (fresh or latest_checkpoint(ckpt_dir) is None):
        export(engine, model, cfg, os.path.join(out_dir, "initial"), rank, tok)
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(tok).pad_token_id or 0
    objective = Objective(cfg, engine, ref, pad, tok)

    step = 0
    if tag is not None:
        _, client = engine.load_checkpoint(ckpt_dir, tag=load_tag)
        step = int(client["step"])
        # the same ranks x workers resume in place; another size gets every sample no finished step
        # trained on, once, dealt over the new slots (training/elastic.py)
        elastic = loader.resume(client["loader"])
        torch.set_rng_state(client["rng"][rank % len(client["rng"])])
        if gpu and client.get("cuda_rng"):
            torch.cuda.set_rng_state(client["cuda_rng"][rank % len(client["cuda_rng"])])
        objective.bco = RunningMean(**client.get("bco", {}))
        old = client["loader"][0]
        said = (f" (saved by {old['world']} ranks x {old['workers']} workers, now {world} x {loader.workers}: "
                f"the samples left are dealt over the new ones)") if elastic else ""
        log(f"[rank {rank}] resumed {cfg.name} from {tag} at step {step}{said}")
        if elastic or load_tag != tag:
            fp = resume_fingerprint(engine, cfg.deepspeed["zero_stage"], device)
            if rank == 0:
                log(f"[{cfg.name}] carried over: " + " ".join(f"{k} {v:.9e}" for k, v in fp.items()))
        if rank == 0:
            _truncate_jsonl(os.path.join(out_dir, "metrics.jsonl"), step)
    if rank == 0:  # every rank's file, those of ranks a run of another size had too
        import glob

        for f in glob.glob(os.path.join(out_dir, "seen", "rank*.jsonl")):
            _truncate_jsonl(f, step if tag else -1)
    dist.barrier()

    it = iter(loader)
    seen_f = open(os.path.join(out_dir, "seen", f"rank{rank}.jsonl"), "a")
    metrics_f = open(os.path.join(out_dir, "metrics.jsonl"), "a" if tag else "w") if rank == 0 else None
    exhausted = stop = interrupted = False
    end = min(cfg.steps, stop_after) if stop_after else cfg.steps
    t_start = time.perf_counter()
    tokens_total = 0
    engine.train()
    if ref is not None:
        ref.eval()
    while step < end:
        t0 = time.perf_counter()
        lr_now = sched.get_last_lr()[0]  # the rate this step's update uses
        losses, n_tok, ids, entries, parts = [], 0, [], [], {}
        n_vis = attn_sq = vis_sq = 0  # visual tokens, sum of sample lengths^2, of patches^2 per image
        stop = False
        data_s = 0.0  # waiting for the loader: the step's input-bound share
        for _ in range(cfg.grad_accum):
            t_data = time.perf_counter()
            batch = None if exhausted else next(it, None)
            data_s += time.perf_counter() - t_data
            if batch is None:
                exhausted = True
            live = torch.tensor([0.0 if exhausted else 1.0], device=device)  # NCCL reduces GPU tensors only
            dist.all_reduce(live)
            if live.item() == 0:
                stop = True
                break
            if batch is None:
                batch = dummy_batch(cfg.objective, pad)
            loss, st = objective(batch)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()) if not batch.get("dummy") else float("nan"))
            n_tok += batch["tokens"]
            if "input_ids" in batch and not batch.get("dummy"):
                ids_t = batch["input_ids"]
                n_vis += int(((ids_t == objective.image_pad) | (ids_t == objective.video_pad)).sum())
                attn_sq += sum(s["tokens"] ** 2 for s in batch["samples"])
                vis_sq += sum((im.shape[1] * im.shape[2] // 196) ** 2 for im in batch.get("images") or [])
            ids += [s["id"] for s in batch["samples"] if s["role"] != "rejected"]
            entries += [s.get("entry") for s in batch["samples"] if s["role"] != "rejected"]
            if not batch.get("dummy"):
                add_stats(parts, st)
        if stop:
            break
        step += 1
        mine = [x for x in losses if not math.isnan(x)]
        stats = torch.tensor([sum(mine), float(len(mine)), float(n_tok), float(n_vis), float(attn_sq), float(vis_sq),
                              float(signals.got is not None)], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        stats = stats.cpu()
        loss_mean = float(stats[0] / max(stats[1], 1))
        # the objective's numbers (MPO, GRPO: lm and vit_contrastive have none, and skip the collective)
        extra = mean_stats(_gather(parts, world) if world > 1 and cfg.objective in ("mpo", "grpo") else [parts])
        tokens_total += int(stats[2])
        dt = time.perf_counter() - t0
        said_entries = {"entries": entries} if any(e is not None for e in entries) else {}  # the plan's entry per id
        seen_f.write(json.dumps({"step": step, "ids": ids, **said_entries}) + "\n")
        seen_f.flush()
        if metrics_f is not None:
            rec = {"step": step, "loss": loss_mean, "lr": lr_now, "tokens": int(stats[2]),
                   "visual_tokens": int(stats[3]), "attn_sq": int(stats[4]), "vision_attn_sq": int(stats[5]),
                   "seconds": dt, "data_s": data_s, "tokens_per_s": float(stats[2]) / dt if dt > 0 else None, **extra}
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            if step % cfg.output["log_every"] == 0:
                said = f" reward {extra['reward']:.4f}" if "reward" in extra else ""
                log(f"[{cfg.name}] step {step}/{cfg.steps} loss {loss_mean:.4f}{said} lr {rec['lr']:.2e} "
                    f"{rec['tokens_per_s'] or 0:.0f} tok/s")
        every = cfg.output["save_every"]
        interrupted = bool(stats[6] > 0) and step < end  # any rank signalled: every rank stops here
        if (every and step % every == 0) or step == end or interrupted:
            save_checkpoint(engine, loader, objective, ckpt_dir, step, rank, world)
        if interrupted:
            if rank == 0:
                log(f"[{cfg.name}] {signals.name or 'a signal on another rank'}: stopped at step {step}/{cfg.steps} "
                    f"with a checkpoint ({os.path.join(ckpt_dir, f'step-{step}')}); run it again to resume")
            break
    seen_f.close()
    if metrics_f is not None:
        metrics_f.close()
    wall = time.perf_counter() - t_start
    if stop and step > 0:  # the epochs ran out before `steps`: keep where it ended
        save_checkpoint(engine, loader, objective, ckpt_dir, step, rank, world)
    if step >= cfg.steps or stop:
        export(engine, model, cfg, os.path.join(out_dir, "final"), rank, tok)
    st = loader.state_dict()
    per_set: dict[str, int] = {}
    for w in st["states"].values():
        for k, v in w["samples"].items():
            per_set[k] = per_set.get(k, 0) + v
    seen = _gather(st["seen"], world)
    sets = _gather(per_set, world)
    by_entry = _gather(st.get("seen_entries", {}), world)
    summary = {"stage": cfg.name, "step": step, "steps": cfg.steps, "wall_s": wall, "interrupted": interrupted,
               "tokens_per_s": tokens_total / wall if wall > 0 else None, "world": world}
    if rank == 0:
        totals, set_totals = _sum_dicts(seen), _sum_dicts(sets)
        summary["samples_per_source"] = totals
        from reelforge.training.report import write_report

        summary["report"] = write_report(out_dir, cfg, totals, set_totals, _sum_dicts(by_entry))
    dist.barrier()
    return summary


def add_stats(acc: dict[str, list[float]], st: dict) -> None:
    """Adds one micro-batch's numbers to `acc` (name -> [weighted sum, weight]); `st["_weight"]` weighs
    them (GRPO: its completions; else 1). Keys starting with `_` are not logged."""
    w = float(st.get("_weight", 1.0))
    for k, v in st.items():
        if k.startswith("_") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        a = acc.setdefault(k, [0.0, 0.0])
        a[0] += w * float(v)
        a[1] += w


def mean_stats(accs: list[dict[str, list[float]]]) -> dict[str, float]:
    """The step's numbers from every rank's `add_stats` sums: each the weighted mean over all the step's
    micro-batches on all ranks (before, the log kept rank 0's last micro-batch: under grad_accum > 1 or
    several ranks its `reward` was not the step's mean reward)."""
    tot: dict[str, list[float]] = {}
    for acc in accs:
        for k, (s, w) in acc.items():
            t = tot.setdefault(k, [0.0, 0.0])
            t[0] += s
            t[1] += w
    return {k: s / w for k, (s, w) in tot.items() if w > 0}


def _sum_dicts(ds: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def resume_fingerprint(engine, zero_stage: int, device: torch.device) -> dict[str, float]:
    """What a resume on another size carried over, as sums a test compares with the checkpoint's own files:
    `weights_sq` (the module's weights, squared and summed; not under ZeRO-3, whose weights are
    partitioned) and `adam_m`, `adam_v` (Adam's moments over every rank's optimiser partition, summed)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    sums = torch.zeros(2, dtype=torch.float64)
    for st in opt.state.values():
        if "exp_avg" in st:
            sums[0] += st["exp_avg"].double().sum().cpu()
            sums[1] += st["exp_avg_sq"].double().sum().cpu()
    sums = sums.to(device)
    dist.all_reduce(sums)
    out = {"adam_m": float(sums[0]), "adam_v": float(sums[1])}
    if zero_stage < 3:
        out = {"weights_sq": float(sum(p.detach().double().pow(2).sum() for p in engine.module.parameters())),
               **out}
    return out


def save_checkpoint(engine, loader: ShardLoader, objective: Objective, ckpt_dir: str, step: int, rank: int,
                    world: int) -> None:
    """Model, optimiser, scheduler (DeepSpeed) + every rank's loader position and RNG state."""
    loaders = _gather(loader.state_dict(), world)
    rngs = _gather(torch.get_rng_state(), world)
    client = {"step": step, "loader": loaders, "rng": rngs, "bco": objective.bco.state_dict()}
    if torch.cuda.is_available():  # GRPO samples on the GPU
        client["cuda_rng"] = _gather(torch.cuda.get_rng_state(), world)
    engine.save_checkpoint(ckpt_dir, tag=f"step-{step}", client_state=client)


def export(engine, model: torch.nn.Module, cfg: StageConfig, out: str, rank: int, tok: str) -> None:
    from reelforge.training.checkpoint import export_model

    if cfg.deepspeed["zero_stage"] == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if rank == 0:
        export_model({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, model, out, tok)
    dist.barrier()


@torch.no_grad()
def eval_loss(cfg: StageConfig, export_dir: str, n_batches: int = 4) -> float:
    """Mean LM loss of an export folder over the first `n_batches` of the stage's loader (rank 0 of 1)."""
    c = copy.deepcopy(cfg)
    c.raw["model"] = {**c.raw["model"], "init": export_dir, "vision": None, "llm": None}
    c.raw["data"] = {**c.raw["data"], "num_workers": 0}
    model = build_model(c).eval()
    losses = []
    for i, b in enumerate(ShardLoader(c)):
        losses.append(float(model(b)["loss"]))
        if i + 1 >= n_batches:
            break
    return sum(losses) / len(losses)
