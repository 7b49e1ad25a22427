"""Recaptioning with a vision-language model, as Keye-VL rebuilds weak captions.

Each sample gets a prompt by task: `caption` (a detailed description of an image), `ocr`
(transcribe the text in the image) or `video` (describe the video from its evenly sampled
frames). The task is the recipe's per-source choice (`tasks: {source: ocr}`), else `video`
for videos and `caption` for images. Generation runs in batches; its length and sampling come
from the recipe. The new caption is appended to the sample's `captions` with the model and the
exact prompt; the original `text` is never overwritten, so a mixture can pick either.
A sample whose media will not decode, on which the model fails, or whose caption comes back
shorter than `min_chars` leaves with a ledger line (`on_failure: keep` keeps it uncaptioned).
"""

from __future__ import annotations

import os
from typing import Any

from reelforge.curation.schema import drop
from reelforge.curation.step import register_step
from reelforge.curation.vlm import VLMStep

DEFAULT_PROMPTS = {
    "caption": "Describe this image in detail: the objects, their attributes and positions, the setting, "
               "and any text that appears.",
    "ocr": "Transcribe all the text in this image exactly, line by line, in reading order.",
    "video": "Describe this video in detail: the scene, the people and objects, the actions, and how they "
             "change over time.",
}


@register_step("recaption")
class Recaption(VLMStep):
    def __init__(self, model: str = "", model_name: str = "", prompts: dict | None = None,
                 tasks: dict | None = None, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, min_chars: int = 1,
                 on_failure: str = "drop", **kw: Any):
        super().__init__(model=model, **kw)
        self.prompts = {**DEFAULT_PROMPTS, **(prompts or {})}
        self.tasks = dict(tasks or {})
        for src, task in self.tasks.items():
            if task not in self.prompts:
                raise ValueError(f"`tasks.{src}` is {task!r}: use one of {', '.join(sorted(self.prompts))} "
                                 "or add it under `prompts`")
        if on_failure not in ("drop", "keep"):
            raise ValueError("`on_failure` must be drop or keep")
        self.model_name = model_name or os.path.basename(os.path.normpath(model))
        self.max_new_tokens = int(max_new_tokens)
        self.do_sample = bool(do_sample)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.seed = int(seed)
        self.min_chars = int(min_chars)
        self.on_failure = on_failure

    def prompt_for(self, row: dict) -> tuple[str, str] | None:
        kinds = {m["kind"] for m in row.get("media") or []}
        if not kinds:
            return None
        task = self.tasks.get(row["source"]) or ("video" if "video" in kinds else "caption")
        return task, self.prompts[task]

    def run_model(self, inputs, tasks: list[str]) -> list:
        # the seed is per batch: sampling repeats for the same batches, and greedy needs none
        return self._model.generate(inputs, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                    temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def take(self, row: dict, task: str, prompt: str, result: str) -> None:
        if len(result) < self.min_chars:
            drop(row, self.name, "empty_caption", f"{len(result)} characters < min_chars {self.min_chars}")
            return
        caps = list(row.get("captions") or [])
        caps.append({"text": result, "model": self.model_name, "prompt": prompt, "task": task})
        row["captions"] = caps

    def compute(self, rows: list[dict], prepared) -> list[dict]:
        alive_before = [row.get("drop_step") is None for row in rows]
        rows = super().compute(rows, prepared)
        if self.on_failure == "keep":  # failures keep the sample, uncaptioned
            for row, was_alive in zip(rows, alive_before):
                if was_alive and row.get("drop_step") == self.name:
                    row["drop_step"] = row["drop_reason"] = row["drop_detail"] = None
        return rows
