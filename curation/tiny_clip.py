"""A tiny randomly initialised open_clip model, written to disk the way a real checkpoint is
(a model config JSON + a state dict), so tests load it through the same path a user's
checkpoint takes. Nothing is downloaded: open_clip ships its BPE vocabulary."""

from __future__ import annotations

import json
import os

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_clip(out_dir: str, name: str = "reelforge-tiny-clip", seed: int = 0) -> tuple[str, str]:
    """Write `<name>.json` (an open_clip model config) and `<name>.pt`; returns (config dir, checkpoint)."""
    import open_clip
    import torch

    os.makedirs(out_dir, exist_ok=True)
    cfg_path = os.path.join(out_dir, f"{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(TINY_CLIP_CONFIG, f)
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    ckpt = os.path.join(out_dir, f"{name}.pt")
    torch.save(model.state_dict(), ckpt)
    return out_dir, ckpt
