"""A tiny randomly initialised Whisper (WhisperForConditionalGeneration) with a locally built
tokenizer and feature extractor, saved with `save_pretrained`, so the `asr` step loads it through
`pipeline("automatic-speech-recognition", model=<folder>)` exactly as it loads an
openai/whisper-* folder. Nothing is downloaded.

The vocabulary is laid out as Whisper's: byte-level BPE text tokens ending in `<|endoftext|>`,
then `<|startoftranscript|>`, the language tokens, `<|translate|>`, `<|transcribe|>`,
`<|startoflm|>`, `<|startofprev|>`, `<|nocaptions|>`, `<|notimestamps|>` (the last special token),
then the 1501 timestamp tokens `<|0.00|>` .. `<|30.00|>` (added, not special), so the generation
config (`lang_to_id`, `task_to_id`, `no_timestamps_token_id`, ...), Whisper's timestamp logits
processor and the pipeline's timestamp decoding all run as on a real checkpoint. A random model
writes garbage words; its timestamps are well formed (the logits processor enforces that)."""

from __future__ import annotations

import os

LANGUAGES = ("en", "zh", "de", "es", "fr", "ja")  # a few of Whisper's language tokens, real codes

_TEXT = (
    "the a an of to and in is on for with as at by from this that it be are was were hello world "
    "speech audio video say says said one two three four five red blue green yellow today morning "
    "people talk time second minute music sound voice quiet loud good very well yes no"
).split()


def build_tiny_whisper(out_dir: str, seed: int = 0, init_range: float = 0.2, vocab_size: int = 400,
                       max_target_positions: int = 448) -> str:
    """Write a random Whisper checkpoint folder (~1 MB: 2 encoder and 2 decoder layers of width
    64, 80 mel bins, 30 s windows as Whisper's) with its tokenizer and feature extractor;
    returns its path. `init_range` is larger than a real model's so the greedy output depends
    on the audio."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    # 1. text tokens: a byte-level BPE whose last token is <|endoftext|> (as in GPT-2 / Whisper)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([" ".join(_TEXT)] * 4, trainer)
    vocab = dict(bpe.get_vocab())
    vocab["<|endoftext|>"] = len(vocab)
    merges = _merges(bpe)
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{c}|>" for c in LANGUAGES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                   "<|notimestamps|>"])
    tok = WhisperTokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           additional_special_tokens=specials[1:])
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken("<|%.2f|>" % (i * 0.02), lstrip=False, rstrip=False, normalized=False,
                               special=False) for i in range(1501)])
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    assert ids["<|endoftext|>"] == len(vocab) - 1 and tok.all_special_ids[-1] == ids["<|notimestamps|>"]
    assert tok.convert_tokens_to_ids("<|0.00|>") == ids["<|notimestamps|>"] + 1

    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    processor = WhisperProcessor(feature_extractor=fe, tokenizer=tok)

    cfg = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=max_target_positions, init_std=init_range,
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"], begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    with torch.no_grad():  # a real model's scale is too flat to depend on the audio; see the docstring
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_range)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], max_length=max_target_positions,
        is_multilingual=True, lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50, begin_suppress_tokens=[ids["<|endoftext|>"]], suppress_tokens=[],
        forced_decoder_ids=[[1, None], [2, ids["<|transcribe|>"]]], return_timestamps=False)  # as openai/whisper-*
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _merges(bpe) -> list[tuple[str, str]]:
    """The trained BPE's merges, in order."""
    import json

    state = json.loads(bpe.to_str())
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
