"""The errors every layer may raise, at the bottom of the layers (nothing here imports reelforge).

- `RecipeError`: a mistake in what the user wrote (a recipe, a stage, a mixture, a plan); the
  message names the field and the fix, and the command line prints it as one sentence.
  `reelforge.jobs.recipe.RecipeError` is this same class.
- `MediaReadError`: a media reference that cannot be read; `reason` is the ledger code.
- `ProbeError`: media that can be read but not understood (corrupt, too big, refused codec);
  `reason` is the ledger code.
"""

from __future__ import annotations


class RecipeError(Exception):
    """A mistake in the recipe: the message names the field and the fix."""


class MediaReadError(Exception):
    """A reference that cannot be read; `reason` is the ledger code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ProbeError(Exception):
    """Media that cannot be probed or decoded; `reason` is the ledger code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


__all__ = ["MediaReadError", "ProbeError", "RecipeError"]
