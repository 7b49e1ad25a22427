"""Tiny, locally built stand-ins for a model's files (nothing is downloaded): a BPE tokenizer
saved as a transformers tokenizer folder, loaded later through the same path a real
checkpoint takes."""

from __future__ import annotations

import os
from typing import Iterable

from reelforge.curation.text_tokens import KEYE_CHAT_TEMPLATE

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
    "</tool_response>", "<|box_start|>", "<|box_end|>", "<|point_start|>", "<|point_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|ocr_text_start|>", "<|ocr_text_end|>",
    "<|clip_time_start|>", "<|clip_time_end|>",
    # Keye-VL-1.5's video frame markers (`training.loader`: `<|frame|>` + timestamp before each frame's
    # pads, a fast frame's pads between the other two); single tokens, as in the released tokenizer
    "<|frame|>", "<|fast_start|>", "<|fast_end|>",
]
# the tokens before these trained the BPE; the 1.5 markers are added after it, at the end of the
# vocabulary, so adding them changed no earlier token id, merge or text token count
_TRAINED_SPECIALS = SPECIAL_TOKENS.index("<|frame|>")

_DEFAULT_TEXT = (
    "the a an of to and in is on for with as at by from this that it be are was were red blue green "
    "yellow circle square triangle line background picture image video clip frame second describe "
    "what which colour shape assistant user system helpful answer question think reason because "
).split()


def build_tiny_tokenizer(out_dir: str, texts: Iterable[str] | None = None, vocab_size: int = 1000) -> str:
    """Train a byte-level BPE on `texts` and save it as a transformers tokenizer folder
    (`vocab_size` trained tokens, then Keye-VL-1.5's three frame markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(texts) if texts is not None else [" ".join(_DEFAULT_TEXT)] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS[:_TRAINED_SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS[_TRAINED_SPECIALS:])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = KEYE_CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir
