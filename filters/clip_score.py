"""CLIP score filter (open_clip): image-text cosine similarity, in large batches, with the
model loaded once per Spark Python worker.

Any open_clip model works: a name with a pretrained tag (`ViT-B-32` + `laion2b_s34b_b79k`,
from the local open_clip cache; nothing is fetched at run time), or a name with a local
checkpoint path, plus `model_config` (a JSON file) for architectures open_clip does not
know. fp32 on the CPU; bf16 autocast on a GPU. For a video the score aggregates its frames
(sampled at 2 fps, at most `video_frames`) with `video_aggregate` (mean, max, min).

With `keep_embeddings: true` the step also keeps the normalised image and text embeddings it
scored with, float16, beside the run in `RUN/embeddings/<step name>/` (Parquet, one row per
medium; `filters.embeddings` describes the table and reads it back), never in the shards:
`dedup_semantic` (and anything else) reuses them instead of running the model again.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from reelforge.curation.media_io import decode_visual
from reelforge.curation.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, drop, get_score, set_score
from reelforge.curation.step import PercentileCut, PrefetchRowStep, StepContext, register_step
from reelforge.curation.vlm import halving_batches, resolve_device
from reelforge.filters.embeddings import ROW_KEY, medium_embeddings, model_tag, row_entries

SCORE = "clip"  # the name of this step's score in the sample's `scores`

_SCORERS: dict[tuple, "ClipScorer"] = {}


class ClipScorer:
    """One open_clip model with its preprocessing and tokenizer."""

    def __init__(self, model: str, pretrained: str | None = None, model_config: str | None = None,
                 device: str = "auto"):
        import open_clip
        import torch

        if model_config:
            open_clip.add_model_config(model_config)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.torch = torch

    def _autocast(self):
        if self.device.startswith("cuda"):
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def embed_images(self, images: list) -> np.ndarray:
        return self.embed_pixels(self.torch.stack([self.preprocess(im) for im in images]))

    def embed_pixels(self, x) -> np.ndarray:
        """Embed already preprocessed images (a float tensor N x 3 x H x W)."""
        torch = self.torch
        with torch.no_grad(), self._autocast():
            f = self.model.encode_image(x.to(self.device, non_blocking=True)).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.embed_tokens(self.tokenizer(texts))

    def embed_tokens(self, tokens) -> np.ndarray:
        torch = self.torch
        with torch.no_grad(), self._autocast():
            f = self.model.encode_text(tokens.to(self.device)).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()


def check_clip_model(model: str, pretrained: str | None, model_config: str | None) -> None:
    """Refuse, on the driver and in one sentence, a model the workers could not load."""
    import open_clip

    if model_config:
        open_clip.add_model_config(model_config)
    if model not in open_clip.list_models():
        raise ValueError(f"`model` {model!r} is not an open_clip architecture: use one of open_clip.list_models() "
                         "(e.g. ViT-B-32, ViT-L-14) or give `model_config` for your own")
    if pretrained and not os.path.exists(pretrained):
        if "/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
            raise ValueError(f"`pretrained` checkpoint {pretrained} does not exist: pass the path of a local "
                             "checkpoint or an open_clip pretrained tag")
        if pretrained not in open_clip.list_pretrained_tags_by_model(model):
            raise ValueError(f"`pretrained` tag {pretrained!r} is not known for {model}: use one of "
                             f"{', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'} "
                             "or a local checkpoint path")


def load_scorer(model: str, pretrained: str | None, model_config: str | None, device: str) -> ClipScorer:
    key = (model, pretrained, model_config, device)
    if key not in _SCORERS:
        _SCORERS[key] = ClipScorer(model, pretrained, model_config, device)
    return _SCORERS[key]


def caption_of(row: dict, which: str) -> str:
    """The text a sample's media are scored against."""
    text = row.get("text")
    msgs = row.get("messages") or []
    if not text and msgs:
        picked = [m["content"] for m in msgs if which == "all" or m["role"] == which]
        text = " ".join(picked)
    text = (text or row.get("chosen") or "").replace(IMAGE_PLACEHOLDER, " ").replace(VIDEO_PLACEHOLDER, " ")
    return " ".join(text.split())


class ClipModelStep(PrefetchRowStep):
    """A step that runs an open_clip model (`clip`, `crop_clip`): the scorer loaded once per process
    on the task's device, and with `percentile`, the per-source cut on the step's score after
    scoring (DataComp-style: keep the top (100 - p)% rather than a fixed threshold)."""

    score_name = SCORE
    cut_reason = "low_clip_percentile"
    percentile: float | None = None

    def cut(self) -> PercentileCut | None:
        return None if self.percentile is None else PercentileCut(self.percentile, self.cut_reason)

    def cut_value(self, row: dict) -> float | None:
        return get_score(row, self.score_name)

    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        self._scorer = load_scorer(self.model, self.pretrained or None, self.model_config or None,
                                   resolve_device(self.device, self.context.gpus))


@register_step("clip")
class ClipScore(ClipModelStep):
    """Decode and preprocessing of the next chunk run in background threads (`decode_workers`)
    while the model embeds the current one."""

    batch_rows = 256

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "", model_config: str = "",
                 batch_size: int = 64, threshold: float | None = None, video_aggregate: str = "mean",
                 video_frames: int = 8, conversation_text: str = "assistant", device: str = "auto",
                 percentile: float | None = None, decode_workers: int = 2, prefetch: int = 2,
                 keep_embeddings: bool = False, **kw: Any):
        super().__init__(**kw)
        if video_aggregate not in ("mean", "max", "min"):
            raise ValueError("video_aggregate must be mean, max or min")
        if conversation_text not in ("assistant", "user", "all"):
            raise ValueError("conversation_text must be assistant, user or all")
        if model_config and not os.path.exists(model_config):
            raise ValueError(f"model_config {model_config} does not exist")
        self.model, self.pretrained, self.model_config = model, pretrained, model_config
        self.batch_size = int(batch_size)
        self.threshold = None if threshold is None else float(threshold)
        self.video_aggregate = video_aggregate
        self.video_frames = int(video_frames)
        self.conversation_text = conversation_text
        self.device = device
        if percentile is not None and not 0 <= float(percentile) < 100:
            raise ValueError("percentile must be in [0, 100): samples below it, per source, are dropped")
        self.percentile = None if percentile is None else float(percentile)
        self.decode_workers = max(1, int(decode_workers))
        self.prefetch = int(prefetch)
        if not isinstance(keep_embeddings, bool):
            raise ValueError(f"keep_embeddings must be true or false, got {keep_embeddings!r}")
        self.keep_embeddings = keep_embeddings
        check_clip_model(model, pretrained, model_config)

    def model_tag(self) -> str:
        """The `model` column of the kept embeddings (`filters.embeddings.model_tag`)."""
        return model_tag(self.model, self.pretrained, self.model_config)

    def _pixels_of(self, row: dict):
        """All media of a row decoded and preprocessed into one tensor, and the number of
        frames of each medium (1 for an image)."""
        per_medium = [decode_visual(m, self.video_frames) for m in row["media"]]
        imgs = [im for frames in per_medium for im in frames]
        return self._scorer.torch.stack([self._scorer.preprocess(im) for im in imgs]), [len(f) for f in per_medium]

    def prepare(self, rows: list[dict]):
        """Runs in the prefetch thread: decode + resize (+ tokenise) one chunk."""
        live = [i for i, row in enumerate(rows) if row.get("drop_step") is None and row.get("media")]
        done, failed = self.decode_rows(rows, live, self._pixels_of)
        items = [(i, len(d), counts) for i, (d, counts) in done]
        pixels = [d for _, (d, _) in done]
        if not items:
            return items, failed, None, None
        texts = self._scorer.tokenizer([caption_of(rows[i], self.conversation_text) for i, _, _ in items])
        return items, failed, self._scorer.torch.cat(pixels), texts

    def compute(self, rows: list[dict], prepared) -> list[dict]:
        items, failed, pixels, texts = prepared
        for i, (reason, detail) in failed:
            drop(rows[i], self.name, reason, detail)
        if not items:
            return rows
        img_emb = self._batched(self._scorer.embed_pixels, pixels)
        txt_emb = self._batched(self._scorer.embed_tokens, texts)
        agg = {"mean": np.mean, "max": np.max, "min": np.min}[self.video_aggregate]
        pos = 0
        for k, (i, n, counts) in enumerate(items):
            sims = img_emb[pos:pos + n] @ txt_emb[k]
            if self.keep_embeddings:  # the engine writes them beside the run (jobs.semantic)
                rows[i][ROW_KEY] = row_entries(medium_embeddings(img_emb[pos:pos + n], counts), txt_emb[k])
            pos += n
            score = float(agg(sims))
            set_score(rows[i], SCORE, score)
            if self.threshold is not None and score < self.threshold:
                drop(rows[i], self.name, "low_clip_score", f"clip score {score:.4f} < {self.threshold}")
        return rows

    def _batched(self, fn, items) -> np.ndarray:
        """Run in batches; on GPU out-of-memory the batch halves and retries."""
        out = halving_batches(lambda a, b: [fn(items[a:b])], len(items), self.batch_size,
                              self._scorer.torch.cuda.empty_cache)
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)
