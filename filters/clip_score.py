"""CLIP score filter (open_clip): image-text cosine similarity, in large batches, with the
model loaded once per Spark Python worker.

Any open_clip model works: a name with a pretrained tag (`ViT-B-32` + `laion2b_s34b_b79k`,
from the local open_clip cache; nothing is fetched at run time), or a name with a local
checkpoint path, plus `model_config` (a JSON file) for architectures open_clip does not
know. fp32 on the CPU; bf16 autocast on a GPU. For a video the score aggregates its frames
(sampled at 2 fps, at most `video_frames`) with `video_aggregate` (mean, max, min).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from curation.media_io import read_media_bytes
from curation.probe import ProbeError
from curation.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, drop
from curation.step import RowStep

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
        torch = self.torch
        with torch.no_grad(), self._autocast():
            x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            f = self.model.encode_image(x).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad(), self._autocast():
            f = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()


def _task_device(device: str) -> str:
    """`auto` on a GPU executor means the GPU Spark assigned to this task, if it assigned one."""
    if device != "auto":
        return device
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        gpus = ctx.resources().get("gpu") if ctx is not None else None
        if gpus is not None and gpus.addresses:
            return f"cuda:{gpus.addresses[0]}"
    except Exception:  # noqa: BLE001 - outside a Spark task, or no resources API
        pass
    return "auto"


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


class ClipScore(RowStep):
    name = "clip"
    batch_rows = 256

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "", model_config: str = "",
                 batch_size: int = 64, threshold: float | None = None, video_aggregate: str = "mean",
                 video_frames: int = 8, conversation_text: str = "assistant", device: str = "auto",
                 percentile: float | None = None, **kw: Any):
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

    def apply(self, df):
        """Scores every sample; with `percentile`, drops each source's lowest-scoring share
        (DataComp-style: keep the top (100 - p)% rather than a fixed threshold)."""
        scored = super().apply(df)
        if self.percentile is None:
            return scored
        from pyspark.sql import functions as F

        live = scored.filter(F.col("drop_step").isNull() & F.col("clip_score").isNotNull())
        cut = live.groupBy("source").agg(
            F.percentile_approx("clip_score", self.percentile / 100.0, 10000).alias("_cut"))
        out = scored.join(F.broadcast(cut), "source", "left")
        low = F.col("drop_step").isNull() & F.col("clip_score").isNotNull() & (F.col("clip_score") < F.col("_cut"))
        out = (out.withColumn("drop_reason", F.when(low, F.lit("low_clip_percentile")).otherwise(F.col("drop_reason")))
               .withColumn("drop_detail", F.when(low, F.concat(F.lit(f"below the source's p{self.percentile:g} "),
                                                                 F.col("_cut").cast("string")))
                           .otherwise(F.col("drop_detail")))
               .withColumn("drop_step", F.when(low, F.lit(self.name)).otherwise(F.col("drop_step"))))
        return out.select(*df.columns)

    def setup(self) -> None:
        self._scorer = load_scorer(self.model, self.pretrained or None, self.model_config or None,
                                   _task_device(self.device))

    def _images_of(self, m: dict) -> list:
        from PIL import Image

        if m["kind"] == "image":
            return [Image.open(io.BytesIO(read_media_bytes(m))).convert("RGB")]
        import tempfile

        from curation.video import decode_frames, sample_indices

        total = int(m.get("frames") or 0)
        n = max(1, min(self.video_frames, total))
        with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
            path = m["uri"]
            if m.get("offset") is not None:
                tmp.write(read_media_bytes(m))
                tmp.flush()
                path = tmp.name
            frames = decode_frames(path, sample_indices(total, n), past_end="clamp")
        return [Image.fromarray(f) for f in frames]

    def process_rows(self, rows: list[dict]) -> list[dict]:
        items: list[tuple[int, list]] = []  # (row index, images of that row)
        for i, row in enumerate(rows):
            if row.get("drop_step") is not None or not row.get("media"):
                continue
            try:
                imgs = [im for m in row["media"] for im in self._images_of(m)]
            except ProbeError as e:
                drop(row, self.name, e.reason, e.detail)
                continue
            except Exception as e:  # noqa: BLE001 - undecodable media is a ledger line
                drop(row, self.name, "decode_error", f"{type(e).__name__}: {e}"[:500])
                continue
            items.append((i, imgs))
        if not items:
            return rows
        flat = [im for _, imgs in items for im in imgs]
        img_emb = self._batched(self._scorer.embed_images, flat)
        txt_emb = self._batched(self._scorer.embed_texts,
                                [caption_of(rows[i], self.conversation_text) for i, _ in items])
        agg = {"mean": np.mean, "max": np.max, "min": np.min}[self.video_aggregate]
        pos = 0
        for k, (i, imgs) in enumerate(items):
            sims = img_emb[pos:pos + len(imgs)] @ txt_emb[k]
            pos += len(imgs)
            score = float(agg(sims))
            rows[i]["clip_score"] = score
            if self.threshold is not None and score < self.threshold:
                drop(rows[i], self.name, "low_clip_score", f"clip score {score:.4f} < {self.threshold}")
        return rows

    def _batched(self, fn, items: list) -> np.ndarray:
        """Run in batches; on GPU out-of-memory the batch halves and retries."""
        out, bs, i = [], self.batch_size, 0
        while i < len(items):
            try:
                out.append(fn(items[i:i + bs]))
                i += bs
            except RuntimeError as e:
                if "out of memory" not in str(e).lower() or bs == 1:
                    raise
                self._scorer.torch.cuda.empty_cache()
                bs = max(1, bs // 2)
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)
