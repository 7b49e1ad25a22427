"""A tiny randomly initialised Qwen2.5-VL (the architecture family of Keye-VL's vision side),
saved with `save_pretrained` together with its processor and chat template, so tests load it
through `AutoModelForImageTextToText` / `AutoProcessor` exactly as a real checkpoint is loaded.
Nothing is downloaded: the tokenizer is trained locally (curation/tiny_models.py)."""

from __future__ import annotations

import os

# Qwen2-VL's chat template, reduced to what the steps use: images and videos in user turns.
TINY_VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# `size`: "tiny" (~1 MB, tests) or "bench" (~0.9B, Qwen2.5-VL-3B's vision tower width and a
# 12-layer 1536-wide LLM: a GPU benchmark's realistic shapes with random weights)
SIZES = {
    "tiny": ({"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64},
             {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}, [2, 3, 3], {"min_pixels": 56 * 56, "max_pixels": 112 * 112}),
    "bench": ({"depth": 16, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
               "out_hidden_size": 1536},
              {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 12, "num_attention_heads": 12,
               "num_key_value_heads": 2}, [16, 24, 24], {"min_pixels": 56 * 56, "max_pixels": 448 * 448}),
}


def build_tiny_vlm(out_dir: str, seed: int = 0, init_range: float = 0.2, size: str = "tiny") -> str:
    """Write a random Qwen2.5-VL checkpoint folder (~1 MB at size "tiny"); returns its path.

    `init_range` is larger than a real model's so that greedy captions depend on the pixels
    (a near-zero random model writes the same token whatever it sees)."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from reelforge.curation.tiny_models import build_tiny_tokenizer

    tok_dir = build_tiny_tokenizer(os.path.join(out_dir, "_tokenizer"))
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    vision, text, mrope, pixels = SIZES[size]
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**pixels),
                                    chat_template=TINY_VLM_CHAT_TEMPLATE)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(**vision, fullatt_block_indexes=[vision["depth"] - 1], window_size=112 if size != "tiny"
                           else 56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           initializer_range=init_range),
        text_config=dict(vocab_size=len(tok), **text, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=init_range),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    if size != "tiny":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
