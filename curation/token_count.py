"""The `tokens` step: text, visual and total tokens for every sample."""

from __future__ import annotations

import os
from typing import Any

from reelforge.curation.schema import drop
from reelforge.curation.step import RowStep, StepContext, register_step
from reelforge.curation.tokens import TokenError, VisualTokenConfig, media_tokens


@register_step("tokens")
class CountTokens(RowStep):
    """Adds text_tokens (model tokenizer + chat template), visual_tokens (the released Keye-VL
    processor's rules: `processor` keye-vl-1.5 (default) or keye-vl-1.0, numbers under `visual`)
    and tokens; a size the processor refuses (beyond 200:1, too few frames) is a drop."""

    def __init__(self, tokenizer: str = "", visual: dict | None = None, processor: str | None = None, **kw: Any):
        super().__init__(**kw)
        if not tokenizer:
            raise ValueError("`tokenizer` must name the model's tokenizer folder")
        if not os.path.isdir(tokenizer):
            raise ValueError(f"tokenizer folder {tokenizer} does not exist")
        self.tokenizer = tokenizer
        visual = dict(visual or {})
        if processor is not None:  # `tokens: {processor: keye-vl-1.0}`, or under `visual:`
            if visual.setdefault("processor", processor) != processor:
                raise ValueError(f"processor {processor} but visual.processor {visual['processor']}")
        self.visual = VisualTokenConfig.from_dict(visual)

    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        from reelforge.curation.text_tokens import load_tokenizer

        self._tok = load_tokenizer(self.tokenizer)

    def process_row(self, row: dict) -> dict:
        visual = 0
        for i, m in enumerate(row.get("media") or []):
            try:
                visual += media_tokens(m, self.visual)
            except TokenError as e:
                return drop(row, self.name, e.reason, f"media {i}: {e}")
        text = self._tok.sample_tokens(row)
        row["text_tokens"] = text
        row["visual_tokens"] = visual
        row["tokens"] = text + visual
        return row
