"""Model folders: tiny random models for tests, the export a stage writes, and weight averaging.

An export is a folder with `vision/` and `llm/` (save_pretrained), `projector.safetensors` +
`projector.json`, and `tokenizer/`; a later stage names it as `model.init` and loads every part
through the same from_pretrained path a released checkpoint takes. Stage 0 writes `vision/`
and `text_tower/`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from reelforge.curation.errors import RecipeError
from reelforge.training.model import PROJECTOR_CONFIG, PROJECTOR_FILE


def build_tiny_models(out_dir: str, tokenizer_dir: str | None = None, hidden: int = 32, layers: int = 2,
                      vision_hidden: int = 32, seed: int = 0) -> dict[str, str]:
    """Tiny random SigLIP vision/text towers and a Qwen3 LLM, saved with save_pretrained (nothing downloaded)."""
    from transformers import (
        AutoTokenizer,
        Qwen3Config,
        Qwen3ForCausalLM,
        SiglipTextConfig,
        SiglipTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from reelforge.curation.tiny_models import build_tiny_tokenizer

    torch.manual_seed(seed)
    tok_dir = tokenizer_dir or build_tiny_tokenizer(os.path.join(out_dir, "tokenizer"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = len(tok)
    vis = SiglipVisionModel(SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                               num_hidden_layers=layers, num_attention_heads=2, image_size=56,
                                               patch_size=14, vision_use_head=True))
    txt = SiglipTextModel(SiglipTextConfig(vocab_size=vocab, hidden_size=vision_hidden,
                                           intermediate_size=2 * vision_hidden, num_hidden_layers=layers,
                                           num_attention_heads=2, max_position_embeddings=64,
                                           projection_size=vision_hidden, pad_token_id=tok.pad_token_id,
                                           bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=hidden // 4, max_position_embeddings=4096, tie_word_embeddings=False,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    paths = {k: os.path.join(out_dir, k) for k in ("vision", "text_tower", "llm")}
    vis.save_pretrained(paths["vision"])
    txt.save_pretrained(paths["text_tower"])
    llm.save_pretrained(paths["llm"])
    tok.save_pretrained(paths["llm"])  # the LLM folder carries its tokenizer, as released checkpoints do
    paths["tokenizer"] = paths["llm"]
    return paths


def export_model(state: dict[str, torch.Tensor], model, out_dir: str, tokenizer: str | None) -> str:
    """Write the model's parts from a full state dict (gathered under ZeRO-3) as an export folder."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    for part in ("vision", "llm", "text"):
        mod = getattr(model, part, None)
        if mod is None:
            continue
        sd = {k[len(part) + 1:]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(part + ".")}
        name = "text_tower" if part == "text" else part
        mod.save_pretrained(os.path.join(out_dir, name), state_dict=sd)
    if getattr(model, "projector", None) is not None:
        sd = {k[len("projector."):]: v.detach().cpu().contiguous() for k, v in state.items()
              if k.startswith("projector.")}
        save_file(sd, os.path.join(out_dir, PROJECTOR_FILE))
        with open(os.path.join(out_dir, PROJECTOR_CONFIG), "w") as f:
            json.dump(model.projector.config(), f)
    extra = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("logit_")}
    if extra:
        save_file(extra, os.path.join(out_dir, "contrastive.safetensors"))
    if tokenizer and os.path.isdir(tokenizer):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(os.path.join(out_dir, "tokenizer"))
    return out_dir


def merge_checkpoints(paths: list[str], out_dir: str, weights: list[float] | None = None) -> str:
    """Weighted average of export folders, tensor by tensor (Keye merges several Stage-3 runs this way).

    Every `*.safetensors` file must exist in every folder with the same tensor names and shapes;
    other files (configs, tokenizer) are copied from the first folder. Sums run in float64.
    """
    from safetensors.torch import load_file, save_file

    if len(paths) < 2:
        raise RecipeError("merge needs at least two checkpoint folders.")
    for p in paths:
        if not os.path.isdir(p):
            raise RecipeError(f"merge: {p} is not a folder; pass export folders (a stage's OUT/final).")
    w = [1.0] * len(paths) if weights is None else [float(x) for x in weights]
    if len(w) != len(paths) or any(x < 0 for x in w) or sum(w) <= 0:
        raise RecipeError("merge: --weights needs one non-negative number per checkpoint, not all zero.")
    w = [x / sum(w) for x in w]
    first = paths[0]
    files = sorted(os.path.relpath(f, first) for f in glob.glob(os.path.join(first, "**", "*.safetensors"),
                                                                  recursive=True))
    if not files:
        raise RecipeError(f"merge: {first} holds no .safetensors weights.")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    shutil.copytree(first, out_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    for rel in files:
        acc: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}
        for p, wi in zip(paths, w):
            f = os.path.join(p, rel)
            if not os.path.exists(f):
                raise RecipeError(f"merge: {p} lacks {rel}; merge exports of the same model.")
            sd = load_file(f)
            if acc and set(sd) != set(acc):
                raise RecipeError(f"merge: {f} holds other tensors than {os.path.join(first, rel)}.")
            for k, v in sd.items():
                dtypes[k] = v.dtype
                if k in acc and acc[k].shape != v.shape:
                    raise RecipeError(f"merge: tensor {k} in {f} has shape {tuple(v.shape)}, "
                                      f"not {tuple(acc[k].shape)}.")
                acc[k] = acc.get(k, 0) + wi * v.to(torch.float64)
        save_file({k: v.to(dtypes[k]).contiguous() for k, v in acc.items()}, os.path.join(out_dir, rel))
    with open(os.path.join(out_dir, "merge.json"), "w") as f:
        json.dump({"sources": [os.path.abspath(p) for p in paths], "weights": w}, f, indent=1)
    return out_dir


def zero_world(ckpt_dir: str, tag: str) -> int | None:
    """The data-parallel size a DeepSpeed ZeRO checkpoint was saved by (its optimiser partitions), or None
    when it holds none (ZeRO off: the optimiser state is whole and loads on any size)."""
    files = glob.glob(os.path.join(ckpt_dir, tag, "*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    return len(files) or None


def to_universal(ckpt_dir: str, tag: str) -> str:
    """DeepSpeed's universal checkpoint of `ckpt_dir/tag` (`ds_to_universal`: each parameter's fp32 weight
    and Adam moments whole, in `TAG-universal/zero/NAME/`), which a ZeRO run of any data-parallel size
    loads with `checkpoint.load_universal`; made once, beside the original, and reused. Returns its tag."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out_tag = f"{tag}-universal"
    out = os.path.join(ckpt_dir, out_tag)
    if os.path.isdir(os.path.join(out, "zero")):
        return out_tag
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=tmp, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress bars and prints say nothing we need
            ds_to_universal(args)
    except Exception as e:  # noqa: BLE001 - any failure of the converter is one sentence for the user
        shutil.rmtree(tmp, ignore_errors=True)
        raise RecipeError(f"checkpoint {os.path.join(ckpt_dir, tag)} could not be converted for a run of another "
                          f"size ({type(e).__name__}: {e}); resume it with the number of ranks that saved it.") from e
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out_tag


if __name__ == "__main__":  # python -m reelforge.training.checkpoint OUT [TOKENIZER_DIR]: tiny random models
    import sys

    print(json.dumps(build_tiny_models(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None), indent=1))
