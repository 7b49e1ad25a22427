"""The `crop_clip` filter: CLIP score of each grounding box's crop against its phrase.

For each live sample with boxes in `meta.grounding` (the `coco` / `refcoco` readers) and one image,
every box is cropped out of the image and scored against its text (its `phrase`, else its
`category`, through `text_template`) with the same open_clip scorer the `clip` step uses
(`filters.clip_score.load_scorer`: `model`, `pretrained`, `model_config`, `device` mean the same;
the model is loaded once per worker). The crop of a box [x1, y1, x2, y2] (pixels of the image as
`meta.grounding.width`/`height` describe it, scaled to the decoded image when the two differ) is
`image.crop((floor(x1), floor(y1), ceil(x2), ceil(y2)))`, clamped to the image and at least one
pixel wide and high; the score is the cosine of the normalised image and text embeddings.

What it records and drops:

- each box gets its score as `crop_clip` in `meta.grounding.boxes`;
- with `threshold`, a box scoring below it moves to `meta.grounding.removed_boxes` (with its score),
  and the polygons and keypoints of the same annotation (`id`) go with it;
- a sample left with no box is dropped (`no_matching_boxes`);
- the mean score of the boxes kept is the sample's `crop_clip` score (`scores`);
- with `percentile` p, after the row pass the engine drops, per source, the samples whose
  `crop_clip` score (that mean) lies below the source's p-th percentile (`low_crop_clip_percentile`),
  the `clip` step's DataComp-style cut (`curation.step.PercentileCut`). So `percentile` is a cut on
  whole samples, ranked by their boxes' mean score; boxes are cut inside a sample by `threshold` only.

Samples without `meta.grounding` boxes pass untouched; an image that will not decode is dropped with
the reason its read gave (`missing_file`, `decode_error`, ...).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from reelforge.curation.media_io import decode_visual
from reelforge.curation.schema import drop, set_score
from reelforge.curation.step import register_step
from reelforge.curation.vlm import halving_batches
from reelforge.filters.clip_score import ClipModelStep, check_clip_model

SCORE = "crop_clip"


def _grounding(row: dict) -> dict | None:
    try:
        meta = json.loads(row.get("meta") or "{}")
    except ValueError:
        return None
    g = meta.get("grounding") if isinstance(meta, dict) else None
    return g if isinstance(g, dict) and isinstance(g.get("boxes"), list) and g["boxes"] else None


def crop_box(image, box: list[float], width: float | None = None, height: float | None = None):
    """The crop of pixel box [x1, y1, x2, y2] (in a `width` x `height` frame; default the image's own)."""
    sx = image.width / float(width) if width else 1.0
    sy = image.height / float(height) if height else 1.0
    x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    left = min(max(0, math.floor(x1)), image.width - 1)
    top = min(max(0, math.floor(y1)), image.height - 1)
    right = max(left + 1, min(image.width, math.ceil(x2)))
    bottom = max(top + 1, min(image.height, math.ceil(y2)))
    return image.crop((left, top, right, bottom))


def box_text(box: dict, template: str = "{}") -> str:
    """The text a box is scored against: its phrase, else its category, through `template`."""
    return template.format(box.get("phrase") or box.get("category") or "")


@register_step("crop_clip")
class CropClip(ClipModelStep):
    """Scores every grounding box's crop against its phrase (see the module's docstring)."""

    batch_rows = 64
    score_name = SCORE
    cut_reason = "low_crop_clip_percentile"

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "", model_config: str = "",
                 batch_size: int = 64, threshold: float | None = None, percentile: float | None = None,
                 text_template: str = "{}", device: str = "auto", decode_workers: int = 2, prefetch: int = 2,
                 **kw: Any):
        super().__init__(**kw)
        if model_config and not os.path.exists(model_config):
            raise ValueError(f"`crop_clip.model_config` {model_config} does not exist: give the path of an "
                             "open_clip model config JSON")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ValueError(f"`crop_clip.threshold` must be a number (a cosine, e.g. 0.2), got {threshold!r}")
        if percentile is not None and not (isinstance(percentile, (int, float)) and 0 <= float(percentile) < 100):
            raise ValueError(f"`crop_clip.percentile` must be in [0, 100): samples whose mean box score is below "
                             f"it, per source, are dropped; got {percentile!r}")
        if not isinstance(text_template, str) or text_template.count("{}") != 1:
            raise ValueError(f"`crop_clip.text_template` must hold one {{}} for the phrase, got {text_template!r}")
        self.model, self.pretrained, self.model_config = model, pretrained, model_config
        self.batch_size = int(batch_size)
        self.threshold = None if threshold is None else float(threshold)
        self.percentile = None if percentile is None else float(percentile)
        self.text_template = text_template
        self.device = device
        self.decode_workers = max(1, int(decode_workers))
        self.prefetch = int(prefetch)
        check_clip_model(model, pretrained, model_config)

    def _crops(self, row: dict):
        """The row's box crops, preprocessed into one tensor (one crop per box, in order)."""
        g = _grounding(row)
        image = decode_visual(row["media"][0], 1)[0]
        crops = [crop_box(image, b["box"], g.get("width"), g.get("height")) for b in g["boxes"]]
        return self._scorer.torch.stack([self._scorer.preprocess(c) for c in crops])

    def prepare(self, rows: list[dict]):
        live = [i for i, r in enumerate(rows) if r.get("drop_step") is None and _grounding(r) is not None
                and len(r.get("media") or []) == 1 and r["media"][0]["kind"] == "image"]
        done, failed = self.decode_rows(rows, live, self._crops)
        if not done:
            return [], failed, None, None
        texts = [box_text(b, self.text_template) for i, _ in done for b in _grounding(rows[i])["boxes"]]
        pixels = self._scorer.torch.cat([p for _, p in done])
        return [(i, len(p)) for i, p in done], failed, pixels, self._scorer.tokenizer(texts)

    def compute(self, rows: list[dict], prepared) -> list[dict]:
        items, failed, pixels, tokens = prepared
        for i, (reason, detail) in failed:
            drop(rows[i], self.name, reason, detail)
        if not items:
            return rows
        img = self._batched(self._scorer.embed_pixels, pixels)
        txt = self._batched(self._scorer.embed_tokens, tokens)
        sims = np.sum(img * txt, axis=1)
        pos = 0
        for i, n in items:
            self._record(rows[i], [float(s) for s in sims[pos:pos + n]])
            pos += n
        return rows

    def _record(self, row: dict, scores: list[float]) -> None:
        meta = json.loads(row["meta"])
        g = meta["grounding"]
        kept, removed = [], list(g.get("removed_boxes") or [])
        for b, s in zip(g["boxes"], scores):
            b = {**b, SCORE: s}
            (removed if self.threshold is not None and s < self.threshold else kept).append(b)
        gone = {b.get("id") for b in removed[len(g.get("removed_boxes") or []):] if b.get("id") is not None}
        gone -= {b.get("id") for b in kept}
        g["boxes"], g["removed_boxes"] = kept, removed
        if gone:
            for key in ("polygons", "points"):
                g[key] = [p for p in g.get(key) or [] if p.get("id") not in gone]
        if not removed:
            g.pop("removed_boxes")
        row["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
        if not kept:
            set_score(row, SCORE, max(scores))
            drop(row, self.name, "no_matching_boxes",
                 f"all {len(scores)} boxes score below {self.threshold} (best {max(scores):.4f})")
            return
        set_score(row, SCORE, float(np.mean([b[SCORE] for b in kept])))

    def _batched(self, fn, items) -> np.ndarray:
        out = halving_batches(lambda a, b: [fn(items[a:b])], len(items), self.batch_size,
                              self._scorer.torch.cuda.empty_cache)
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)
