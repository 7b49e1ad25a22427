"""GRPO's toy task: a tiny random policy learns to answer with a keyword (`training/stages/grpo_toy.yaml`).

`build_toy_grpo(root)` writes, with nothing downloaded, a tiny random SigLIP + Qwen3 (the default tiny
BPE tokenizer, ~450 tokens) under `root/models` and one shard of conversation prompts under
`root/shards`: eight ways of asking for the keyword, each with the assistant answer `blue` as the
reference. The stage's rule reward is `correct` alone, the token F1 of the completion against the
reference (1 for exactly "blue", 2/(k+1) for "blue" among k words, 0 without it): a random policy
writes the word " blue" (one token of ~450) about once in a hundred 8-token completions, so the
reward starts near 0, and GRPO has to find the keyword and then learn to stop after it.

    .venv/bin/python -m reelforge.training.toy runs/grpo_toy       # models + shards
    .venv/bin/reelforge train training/stages/grpo_toy.yaml         # metrics.jsonl: reward per step
"""

from __future__ import annotations

import argparse
import os

KEYWORD = "blue"
PROMPTS = ("What is the keyword?", "Say the keyword.", "Answer with the keyword.", "Tell me the keyword.",
           "Give the keyword.", "The keyword, please.", "Name the keyword.", "Which word is the keyword?")


def write_toy_shards(out_dir: str, keyword: str = KEYWORD) -> str:
    """One shard of `conversation` samples (user: a prompt, assistant: the keyword) in the shard format."""
    from reelforge.curation.schema import empty_row
    from reelforge.curation.shards import ShardFile, encode_sample

    os.makedirs(out_dir, exist_ok=True)
    shard = ShardFile(os.path.join(out_dir, "toy-000000.tar"))
    for i, q in enumerate(PROMPTS):
        row = empty_row()
        row.update(id=f"toy-{i}", source="toy", kind="conversation",
                   messages=[{"role": "user", "content": q}, {"role": "assistant", "content": keyword}])
        shard.write(encode_sample(row), "toy")
    shard.close()
    return out_dir


def build_toy_grpo(root: str, seed: int = 0, hidden: int = 32, layers: int = 2) -> dict[str, str]:
    """Tiny random models (weights from `seed`) in `root/models`, the prompts in `root/shards`."""
    from reelforge.training.checkpoint import build_tiny_models

    paths = build_tiny_models(os.path.join(root, "models"), hidden=hidden, layers=layers, vision_hidden=hidden,
                              seed=seed)
    paths["shards"] = write_toy_shards(os.path.join(root, "shards"))
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="folder for models/ and shards/ (grpo_toy.yaml reads runs/grpo_toy)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = ap.parse_args(argv)
    for k, v in build_toy_grpo(a.root, a.seed).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
