"""The `tokens` step: text, visual and total tokens for every sample."""

from __future__ import annotations

import json
import os
from typing import Any

from reelforge.curation.frame_plan import fixed_plan_tokens
from reelforge.curation.schema import drop
from reelforge.curation.step import RowStep, StepContext, register_step
from reelforge.curation.tokens import TokenError, VisualTokenConfig, media_tokens


@register_step("tokens")
class CountTokens(RowStep):
    """Adds text_tokens (model tokenizer + chat template), visual_tokens (the released Keye-VL
    processor's rules: `processor` keye-vl-1.5 (default) or keye-vl-1.0, numbers under `visual`)
    and tokens; a size the processor refuses (beyond 200:1, too few frames) is a drop.

    `frame_plan` (default: true for keye-vl-1.5): a video whose probe stored its frame plan
    (`frame_types`, see the probe step, which has the video open and decodes its frames) counts
    its true slow/fast tokens from the stored types (sizes and `plan_tokens` are re-derived with
    this step's numbers, nothing is decoded); a video without a plan, or whose plan sampled a
    different frame count than this step's numbers give, counts from metadata (every frame slow,
    the upper bound)."""

    def __init__(self, tokenizer: str = "", visual: dict | None = None, processor: str | None = None,
                 frame_plan: bool | None = None, **kw: Any):
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
        if frame_plan and not self.visual.slow_fast:
            raise ValueError(f"frame_plan needs the keye-vl-1.5 processor, not {self.visual.processor}")
        self.frame_plan = self.visual.slow_fast if frame_plan is None else bool(frame_plan)

    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        from reelforge.curation.text_tokens import load_tokenizer

        self._tok = load_tokenizer(self.tokenizer)

    def process_row(self, row: dict) -> dict:
        visual = 0
        fixed = _video_frames(row)
        for i, m in enumerate(row.get("media") or []):
            try:
                # a `modes` copy (meta.video_frames) counts its own frames; probe's plans as before
                planned = fixed_plan_tokens(m, self.visual) if fixed else None
                if planned is None and self.frame_plan:
                    planned = self._plan_tokens(m)
                visual += media_tokens(m, self.visual) if planned is None else planned
            except TokenError as e:
                return drop(row, self.name, e.reason, f"media {i}: {e}")
        text = self._tok.sample_tokens(row)
        row["text_tokens"] = text
        row["visual_tokens"] = visual
        row["tokens"] = text + visual
        return row

    def _plan_tokens(self, m: dict) -> int | None:
        """True 1.5 tokens of a video from its stored frame plan (the medium updated with this
        step's sizes), or None when it has no usable plan."""
        from reelforge.curation.tokens import slow_fast_sizes, video_nframes

        types = m.get("frame_types")
        if m.get("kind") != "video" or not types or m.get("plan_processor") != self.visual.processor:
            return None
        n = video_nframes(m.get("duration") or 0.0, m.get("fps"), self.visual, total_frames=m.get("frames"))
        if n != len(types):
            return None
        fast = sum(1 for t in types if t)
        h, w = m["height"], m["width"]
        s = slow_fast_sizes(h, w, len(types) - fast, fast, self.visual)
        if m.get("slow_size") and _transposed(m["slow_size"], s["resized_height"], s["resized_width"]):
            h, w = w, h  # the plan was made upright (a rotated video): keep its orientation
            s = slow_fast_sizes(h, w, len(types) - fast, fast, self.visual)
        m["slow_size"] = [s["resized_height"], s["resized_width"]]
        m["fast_size"] = [s["fast_resized_height"], s["fast_resized_width"]]
        m["plan_tokens"] = s["tokens"]
        return s["tokens"]


def _video_frames(row: dict) -> int | None:
    """meta.video_frames of a `modes` copy (a video planned at a fixed frame count), else None."""
    try:
        meta = json.loads(row.get("meta") or "{}")
    except ValueError:
        return None
    v = meta.get("video_frames") if isinstance(meta, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _transposed(size: list, h: int, w: int) -> bool:
    return len(size) == 2 and h != w and [size[0], size[1]] == [w, h]
