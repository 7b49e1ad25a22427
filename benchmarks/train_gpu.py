"""Train a ~0.7B VLM (SigLIP-B/14-sized tower + 2x2-merge projector + Qwen3-0.6B-shaped LLM, random
weights) for a few hundred bf16 steps from image-text shards, and report tokens/s and MFU.

MFU = model FLOPs per second / the GPU's *measured* dense bf16 matmul rate (an 8192^3 matmul loop
here, usually ~70-80% of the datasheet's 989 TFLOP/s on an H100). Model FLOPs count, per step:
  LLM      6 x non-embedding params x tokens + 6 x lm_head params x tokens
           + 6 x layers x attention width x sum(sample_len^2) (causal attention inside each packed sample)
  vision   6 x tower params x patches (4 patches per visual token) + 12 x L x d x sum(patches per image^2)
  projector 6 x params x visual tokens
(forward + backward = 3 x forward, 2 FLOPs per multiply-add). Frozen parts would count 2x, not 6x;
this benchmark trains everything (Stage 2).

    .venv/bin/python benchmarks/train_gpu.py [--steps 300] [--max-len 4096] [--samples 20000] [--zero 2]
    .venv/bin/python benchmarks/train_gpu.py --tiny      # CPU smoke run of the same path (a few steps)

Everything is built locally (random weights saved with save_pretrained, then loaded through the
stage's from_pretrained path); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch  # noqa: E402

H100_PEAK = 989e12


def measured_bf16_rate(n: int = 8192, iters: int = 20) -> float | None:
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def build_models(root: str, tiny: bool, tok_dir: str) -> dict[str, str]:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    tok = AutoTokenizer.from_pretrained(tok_dir)
    if tiny:
        vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14)
        lc = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    else:  # SigLIP-B/14-like tower (~86M) and Qwen3-0.6B's shape (vocab kept at 151,936)
        vc = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=14)
        lc = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         max_position_embeddings=32768)
    lc.pad_token_id, lc.eos_token_id = tok.pad_token_id, tok.eos_token_id
    paths = {"vision": os.path.join(root, "vision"), "llm": os.path.join(root, "llm")}
    SiglipVisionModel(vc).save_pretrained(paths["vision"])
    Qwen3ForCausalLM(lc).save_pretrained(paths["llm"])
    tok.save_pretrained(paths["llm"])
    return paths


def flops_per_step(rec: dict, vc, lc, proj_params: int, vit_params: int) -> float:
    """Model FLOPs (fwd + bwd) of one logged step, from its token, visual-token and attention counts."""
    d, L = lc.hidden_size, lc.num_hidden_layers
    emb = lc.vocab_size * d
    llm_params = sum_params_llm(lc) - emb  # the lm_head matmul counts, the embedding lookup does not
    tokens, vis = rec["tokens"], rec["visual_tokens"]
    attn_dim = lc.num_attention_heads * lc.head_dim
    llm = 6 * llm_params * tokens + 6 * L * attn_dim * rec["attn_sq"]  # causal: half of 12 x L x d x s^2
    patches = 4 * vis
    vit = 6 * vit_params * patches + 12 * vc.num_hidden_layers * vc.hidden_size * rec["vision_attn_sq"]
    return llm + vit + 6 * proj_params * vis


def sum_params_llm(lc) -> int:
    d, L, f = lc.hidden_size, lc.num_hidden_layers, lc.intermediate_size
    q = lc.num_attention_heads * lc.head_dim
    kv = lc.num_key_value_heads * lc.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    return L * per_layer + 2 * lc.vocab_size * d


def profile(stage: dict, steps: int, out: str) -> None:
    """A further short run under torch.profiler (set-up included): the top operators by device
    time and by host time, and how busy the device was."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from reelforge.training.config import stage_from_dict
    from reelforge.training.train import train

    cfg = stage_from_dict({**stage, "steps": steps, "output": {**stage["output"], "dir": out}})
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t = time.perf_counter()
    with torch_profile(activities=acts) as prof:
        summary = train(cfg, fresh=True)
    wall = time.perf_counter() - t
    ka = prof.key_averages()
    dev = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(ka.table(sort_by=dev, row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    busy = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e6
    print(json.dumps({"profiled_steps": steps, "profiled_wall_s": wall, "train_wall_s": summary["wall_s"],
                      "device_busy_s": busy}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU, a few steps: checks the script runs")
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--profile", type=int, default=0,
                    help="then run this many more steps under torch.profiler and print where the time goes")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.max_len, args.samples, args.workers = min(args.steps, 3), 512, 64, 1

    from transformers import AutoConfig

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` as a package
    from benchmarks.bench_loader import make_shards
    from reelforge.curation.tiny_models import build_tiny_tokenizer
    from reelforge.training.config import stage_from_dict
    from reelforge.training.train import train

    work = args.workdir or tempfile.mkdtemp(prefix="train_gpu-")
    try:
        peak = measured_bf16_rate()
        if peak:
            print(f"measured bf16 matmul: {peak / 1e12:.0f} TFLOP/s (datasheet H100 SXM: {H100_PEAK / 1e12:.0f})")
        else:
            print("no GPU: running on the CPU (fp32); MFU is not computed")
        tok_dir = build_tiny_tokenizer(os.path.join(work, "tokenizer"))
        models = build_models(os.path.join(work, "models"), args.tiny, tok_dir)
        shard_dir = os.path.join(work, "shards")
        make_shards(shard_dir, args.samples, 500, 0)
        out = os.path.join(work, "run")
        stage = {
            "name": "train_gpu", "objective": "lm", "steps": args.steps,
            "model": {"vision": models["vision"], "llm": models["llm"],
                      "attn_implementation": "sdpa"},
            "trainable": ["vision", "projector", "llm"],
            "data": {"sources": [{"name": "bench", "path": shard_dir}], "max_len": args.max_len,
                     "num_workers": args.workers, "visual": {"max_pixels": 256 * 28 * 28}},
            "optim": {"lr": args.lr, "warmup_steps": min(20, args.steps // 10), "schedule": "cosine"},
            "deepspeed": {"zero_stage": args.zero},
            "output": {"dir": out, "log_every": 10}}
        summary = train(stage_from_dict(stage), fresh=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        steady = rows[min(10, len(rows) - 1):] or rows
        vc = AutoConfig.from_pretrained(models["vision"])
        lc = AutoConfig.from_pretrained(models["llm"])
        vit_params = sum(p.numel() for p in __import__("transformers").SiglipVisionModel.from_pretrained(
            models["vision"]).parameters())
        proj_params = (4 * vc.hidden_size) ** 2 + 4 * vc.hidden_size * lc.hidden_size
        secs = sum(r["seconds"] for r in steady)
        toks = sum(r["tokens"] for r in steady)
        flops = sum(flops_per_step(r, vc, lc, proj_params, vit_params) for r in steady)
        result = {"steps": len(rows), "steady_steps": len(steady), "tokens_per_s": toks / secs,
                  "data_wait_share": sum(r.get("data_s", 0.0) for r in steady) / secs,
                  "step_s_median": statistics.median(r["seconds"] for r in steady),
                  "visual_token_share": sum(r["visual_tokens"] for r in steady) / max(1, toks),
                  "model_tflops_per_s": flops / secs / 1e12,
                  "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                  "llm_params": sum_params_llm(lc), "vit_params": vit_params, "wall_s": summary["wall_s"]}
        if peak:
            result["measured_bf16_tflops"] = peak / 1e12
            result["mfu_vs_measured"] = flops / secs / peak
            result["mfu_vs_datasheet"] = flops / secs / H100_PEAK
            result["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        print(json.dumps(result, indent=1, sort_keys=True))
        if args.profile:
            profile(stage, args.profile, os.path.join(work, "profiled"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
