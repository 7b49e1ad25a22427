"""Basic quality: image size and aspect, video duration, text length; thresholds from the recipe."""

from __future__ import annotations

from typing import Any, Optional

from reelforge.curation.schema import all_text, drop
from reelforge.curation.step import RowStep, register_step


@register_step("quality")
class Quality(RowStep):
    """Drops samples outside the recipe's bounds; each bound has its own reason code."""

    def __init__(self, min_side: int = 1, max_aspect: float = 200.0,
                 video_min_duration: float = 0.0, video_max_duration: Optional[float] = None,
                 text_min_chars: int = 0, text_max_chars: Optional[int] = None, **kw: Any):
        super().__init__(**kw)
        self.min_side = int(min_side)
        self.max_aspect = float(max_aspect)
        self.video_min_duration = float(video_min_duration)
        self.video_max_duration = None if video_max_duration is None else float(video_max_duration)
        self.text_min_chars = int(text_min_chars)
        self.text_max_chars = None if text_max_chars is None else int(text_max_chars)

    def process_row(self, row: dict) -> dict:
        for i, m in enumerate(row.get("media") or []):
            w, h = m.get("width"), m.get("height")
            if w is not None and h is not None:
                if min(w, h) < self.min_side:
                    return drop(row, self.name, "too_small", f"media {i}: {w}x{h}, min_side {self.min_side}")
                if max(w, h) / min(w, h) > self.max_aspect:
                    return drop(row, self.name, "aspect_ratio",
                                f"media {i}: {w}x{h} is beyond {self.max_aspect:g}:1")
            d = m.get("duration")
            if m.get("kind") == "video" and d is not None:
                if d < self.video_min_duration:
                    return drop(row, self.name, "video_too_short",
                                f"media {i}: {d:.2f}s < {self.video_min_duration:g}s")
                if self.video_max_duration is not None and d > self.video_max_duration:
                    return drop(row, self.name, "video_too_long",
                                f"media {i}: {d:.2f}s > {self.video_max_duration:g}s")
        n = len(all_text(row).strip())
        if n < self.text_min_chars:
            return drop(row, self.name, "text_too_short", f"{n} chars < {self.text_min_chars}")
        if self.text_max_chars is not None and n > self.text_max_chars:
            return drop(row, self.name, "text_too_long", f"{n} chars > {self.text_max_chars}")
        return row
