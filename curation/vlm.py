"""A transformers vision-language model (any image-text-to-text checkpoint: Qwen2.5-VL,
Keye-VL, LLaVA-OneVision, ...) loaded once per Spark Python worker and fed in batches.

Two uses share this: the VLM judge (`filters/vlm_judge.py`: P(yes) read from the logits of
the next token, no generation) and the recaptioner (`curation/recaption.py`: batched
generation). The checkpoint is a local folder saved with `save_pretrained` (model, config,
processor with its chat template); nothing is fetched at run time. Prompts are built with the
model's own chat template, so a real checkpoint and the tiny test model take the same path.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from reelforge.curation.schema import drop
from reelforge.curation.step import PrefetchRowStep, StepContext

_MODELS: dict[tuple, "VLM"] = {}

DTYPES = ("auto", "fp32", "bf16", "fp16")


class ModelLoadError(Exception):
    """The model folder exists but cannot be loaded; the message says which and why."""


def check_vlm(path: str, where: str = "model") -> None:
    """Refuse on the driver, in one sentence, a folder the workers could not load."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"`{where}` must be the path of a local transformers model folder")
    if not os.path.isdir(path):
        raise ValueError(f"`{where}` {path} is not a folder: pass a local transformers model folder saved with "
                         "save_pretrained (nothing is downloaded at run time)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"`{where}` {path} has no config.json: pass a folder saved with save_pretrained")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's folder
        raise ValueError(f"`{where}` {path}: transformers cannot read its config ({type(e).__name__}: {e})") from e
    if cfg.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"`{where}` {path} is a {cfg.model_type!r} model, not an image-text-to-text model: "
                         "use a vision-language checkpoint such as Qwen2.5-VL")
    if not any(os.path.exists(os.path.join(path, f))
               for f in ("processor_config.json", "preprocessor_config.json")):
        raise ValueError(f"`{where}` {path} has no processor (processor_config.json or preprocessor_config.json): "
                         "save the processor beside the model with processor.save_pretrained")


def resolve_device(device: str, gpus: Sequence[str] = ()) -> str:
    """`auto` is the first GPU the engine assigned to this task (`StepContext.gpus`), else any
    GPU, else the CPU."""
    import torch

    if device != "auto":
        return device
    if gpus:
        return f"cuda:{gpus[0]}"
    return "cuda" if torch.cuda.is_available() else "cpu"


class VLM:
    """One image-text-to-text model with its processor; prompts through its chat template."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.path = path
        self.device = resolve_device(device)
        on_gpu = self.device.startswith("cuda")
        self.dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "fp32": torch.float32,
                      "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        try:
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype)
        except Exception as e:  # noqa: BLE001 - one clear sentence instead of a loader traceback
            raise ModelLoadError(f"the model in {path} could not be loaded ({type(e).__name__}: {e}); "
                                 "check that the folder holds a complete save_pretrained checkpoint") from e
        self.model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # the last position is every row's next token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def encode(self, prompts: Sequence[str], visuals: Sequence[Sequence[tuple[str, Any]]]):
        """Model inputs for a batch: each prompt follows its images ('image', PIL) and videos
        ('video', list of PIL frames) in one user turn, rendered by the model's chat template."""
        texts = []
        for prompt, vis in zip(prompts, visuals):
            content: list[dict] = [{"type": kind} for kind, _ in vis]
            content.append({"type": "text", "text": prompt})
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            add_generation_prompt=True, tokenize=False))
        return self.encode_texts(texts, visuals)

    def encode_texts(self, texts: Sequence[str], visuals: Sequence[Sequence[tuple[str, Any]]]):
        """Model inputs for chat texts already rendered, each with its images and videos in the order
        its vision blocks appear."""
        images: list = []
        videos: list = []
        for vis in visuals:
            for kind, x in vis:
                if kind == "image":
                    images.append(x)
                else:
                    videos.append(np.stack([np.asarray(f) for f in x]))
        kw: dict[str, Any] = {}
        if images:
            kw["images"] = images
        if videos:
            kw["videos"] = videos
            kw["do_sample_frames"] = False  # frames were sampled already, evenly, by the step
        return self.processor(text=list(texts), padding=True, return_tensors="pt", **kw)

    def _to_device(self, inputs):
        out = inputs.to(self.device)
        for k, v in out.items():
            if hasattr(v, "is_floating_point") and v.is_floating_point():
                out[k] = v.to(self.dtype)
        return out

    def generate(self, inputs, max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0) -> list[str]:
        torch = self.torch
        inputs = self._to_device(inputs)
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            kw.update(temperature=temperature, top_p=top_p)
            torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**inputs, **kw)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def next_token_logits(self, inputs):
        torch = self.torch
        inputs = self._to_device(inputs)
        with torch.no_grad():
            return self.model(**inputs).logits[:, -1].float()

    def answer_ids(self, words: Sequence[str]) -> list[int]:
        """The first token of each answer word, as the model would write it after the prompt."""
        ids = {self.tokenizer.encode(w, add_special_tokens=False)[0] for w in words}
        return sorted(ids)

    def yes_prob(self, inputs, yes_ids: Sequence[int], no_ids: Sequence[int]) -> np.ndarray:
        """P(yes) from the next-token logits, normalised over the yes and no answers."""
        torch = self.torch
        logits = self.next_token_logits(inputs)
        ly = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)
        ln = torch.logsumexp(logits[:, list(no_ids)], dim=-1)
        return torch.sigmoid(ly - ln).cpu().numpy()


def load_vlm(path: str, device: str = "auto", dtype: str = "auto") -> VLM:
    """Once per Python worker: Spark reuses workers, so later tasks find the model loaded."""
    key = (path, resolve_device(device), dtype)
    if key not in _MODELS:
        _MODELS[key] = VLM(path, device, dtype)
    return _MODELS[key]


def halving_batches(fn: Callable[[int, int], list], n: int, batch_size: int,
                    empty_cache: Callable[[], None] | None = None) -> list:
    """fn(start, stop) over [0, n) in batches; on GPU out-of-memory the batch halves and
    the same slice is retried, down to one item (then the error is real and is raised)."""
    out: list = []
    bs, i = max(1, batch_size), 0
    while i < n:
        try:
            out.extend(fn(i, min(n, i + bs)))
            i += bs
        except RuntimeError as e:
            if "out of memory" not in str(e).lower() or bs == 1:
                raise
            if empty_cache is not None:
                empty_cache()
            bs = max(1, bs // 2)
    return out


class VLMStep(PrefetchRowStep):
    """A row step that shows each live sample's media and a prompt to a VLM.

    Decoding (images, evenly sampled video frames) and the processor (resize, patchify) run
    in the prefetch thread; the model runs on the task's thread. A sample whose media cannot
    be decoded, or on which the model fails alone, becomes a ledger line; a GPU
    out-of-memory halves the batch and retries."""

    name = "vlm"
    batch_rows = 64

    def __init__(self, model: str = "", batch_size: int = 8, video_frames: int = 8, device: str = "auto",
                 dtype: str = "auto", kinds: list | None = None, decode_workers: int = 2, prefetch: int = 2,
                 **kw: Any):
        super().__init__(**kw)
        check_vlm(model)
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}")
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.video_frames = max(2, int(video_frames) // 2 * 2)  # Qwen-style models pair frames in time
        self.device, self.dtype = device, dtype
        self.kinds = list(kinds) if kinds else ["image_text", "video_text"]
        self.decode_workers = max(1, int(decode_workers))
        self.prefetch = int(prefetch)

    # -- what subclasses say ---------------------------------------------------------------
    def prompt_for(self, row: dict) -> tuple[str, str] | None:  # pragma: no cover - interface
        """(task, prompt) for a row, or None to leave it untouched."""
        raise NotImplementedError

    def run_model(self, inputs, tasks: list[str]) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def take(self, row: dict, task: str, prompt: str, result: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # -- machinery -------------------------------------------------------------------------
    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        self._model = load_vlm(self.model, resolve_device(self.device, self.context.gpus), self.dtype)

    def _visuals(self, row: dict) -> list[tuple[str, Any]]:
        from reelforge.curation.media_io import decode_visual

        out = []
        for m in row.get("media") or []:
            frames = decode_visual(m, self.video_frames)
            if m["kind"] == "video":
                if len(frames) % 2:
                    frames.append(frames[-1])
                out.append(("video", frames))
            else:
                out.append(("image", frames[0]))
        return out

    def prepare(self, rows: list[dict]):
        todo = []
        for i, row in enumerate(rows):
            if row.get("drop_step") is not None or row.get("kind") not in self.kinds:
                continue
            tp = self.prompt_for(row)
            if tp is not None:
                todo.append((i, *tp))
        done, failed = self.decode_rows(rows, [t[0] for t in todo], self._visuals)
        visuals = dict(done)
        items = [(i, task, prompt, visuals[i]) for i, task, prompt in todo if i in visuals]
        return self.encode_batches(items), failed

    def encode_batches(self, items: list[tuple]) -> list[tuple]:
        """(row index, task, prompt, visuals) items cut into batches of `batch_size`, each encoded
        ahead (prefetch); a batch that will not encode is None, and compute retries it one by one."""
        batches = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            try:
                enc = self._model.encode([c[2] for c in chunk], [c[3] for c in chunk])
            except Exception:  # noqa: BLE001 - compute retries the items one by one
                enc = None
            batches.append((chunk, enc))
        return batches

    def _run(self, chunk: list, enc=None) -> list:
        if enc is None:
            enc = self._model.encode([c[2] for c in chunk], [c[3] for c in chunk])
        return self.run_model(enc, [c[1] for c in chunk])

    def _attempt(self, chunk: list, enc) -> list | None:
        """The batch's results, halving it on out-of-memory; None when it fails otherwise."""
        torch = self._model.torch
        try:
            return self._run(chunk, enc) if enc is not None else None
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                return None
        except Exception:  # noqa: BLE001 - isolate the sample that breaks the batch
            return None
        torch.cuda.empty_cache()
        try:
            return halving_batches(lambda a, b: self._run(chunk[a:b]), len(chunk), max(1, len(chunk) // 2),
                                   torch.cuda.empty_cache)
        except Exception:  # noqa: BLE001 - still failing at one sample: per-sample below
            return None

    def compute(self, rows: list[dict], prepared) -> list[dict]:
        batches, failed = prepared
        for i, (reason, detail) in failed:
            drop(rows[i], self.name, reason, detail)
        for chunk, enc in batches:
            results = self._attempt(chunk, enc)
            if results is None:  # one at a time: only the sample that fails leaves
                results = []
                for c in chunk:
                    try:
                        results.extend(self._run([c]))
                    except Exception as e:  # noqa: BLE001 - a ledger line, not a failed job
                        results.append(e)
            for (i, task, prompt, _), res in zip(chunk, results):
                if isinstance(res, Exception):
                    drop(rows[i], self.name, "model_error", f"{type(res).__name__}: {res}"[:500])
                else:
                    self.take(rows[i], task, prompt, res)
        return rows
