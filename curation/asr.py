"""The `asr` step: speech recognition on each live video's audio with a local Whisper-family
model (transformers' WhisperForConditionalGeneration and its processor), segments with times.

Per video: ffprobe says whether it has an audio stream; ffmpeg decodes the first one to 16 kHz
mono float32 (under the step's deadline, in the prefetch thread, as `curation.video` runs
ffmpeg: the checked file through /proc/self/fd, whitelisted demuxers, the child's process group
killed at the deadline). The model then transcribes in batches of `batch_size` windows.

Output: `meta.asr` (meta is a JSON object string; its other keys stay) =
`{"model": name, "language": code, "duration": s, "segments": [{"start": s, "end": e, "text": ...}]}`.
A video without an audio stream gets `meta.asr = {"no_audio": true}` and stays. Audio that will
not decode (or a file ffprobe cannot read) drops the sample with its reason (`corrupt_video`,
`audio_decode_error`, `audio_timeout`, ...); `on_failure: keep` keeps it with
`meta.asr = {"failed": reason, "detail": ...}` instead. A model failure on one sample is `model_error`.

How the audio becomes segments (what a plain `pipeline("automatic-speech-recognition",
return_timestamps=True)` loop gives on audio up to 30 s; tests/test_asr.py checks it):

- `chunk_length_s` > 0 (default 30, at most Whisper's 30 s window): the audio is cut into windows of
  that length with no overlap; every window of every video in the chunk is one item of the
  batches. 0: each video whole, Whisper's own sequential long-form decoding past 30 s (as the
  pipeline does without chunking; one video at a time when longer than 30 s).
- Greedy decoding with timestamps; `language` forces a language (a code such as `en`), else
  Whisper detects it per window (`detect_language`, what `generate` does itself) and the video's
  language is its first window's.
- Each window's text is split at its timestamp tokens by the tokenizer's own ASR decoding (the
  pipeline's `_decode_asr`); segment text is stripped and empty segments are left out; times
  are offset by the window's start and clamped to the window (a segment that has no closing
  timestamp ends at the window's end), so segments are ordered and inside the audio.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from reelforge.curation.errors import ProbeError
from reelforge.curation.schema import drop, row_meta
from reelforge.curation.step import PrefetchRowStep, StepContext, register_step
from reelforge.curation.vlm import DTYPES, ModelLoadError, resolve_device

SAMPLE_RATE = 16000
WINDOW_S = 30.0  # Whisper's input window
_MODELS: dict[tuple, "Whisper"] = {}


# ----------------------------------------------------------------------------- audio

def extract_audio(path: str | int, timeout_s: float = 120.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """The first audio stream of a video as mono float32 at `sample_rate` (ffmpeg's resampler),
    or None when the file has no audio stream. `path` is a path or an fd on a regular file (as
    everywhere in `curation.video`). Failures are ProbeErrors: the probe's reasons
    (corrupt_video, empty_file, probe_timeout, ...), then `audio_timeout` / `audio_decode_error`."""
    from reelforge.curation import video

    deadline = video._Deadline(timeout_s)
    with video._Src(path) as src:
        info = video._probe_for(src, None, deadline, "audio_timeout")
        if not info.get("has_audio"):
            return None
        cmd = [*video._ffmpeg_cmd(), *video._in_args(), "-i", src.url, "-map", "0:a:0", "-vn", "-sn", "-dn",
               "-ac", "1", "-ar", str(int(sample_rate)), "-f", "f32le", "-acodec", "pcm_f32le", "-xerror", "pipe:1"]
        res = video._run(cmd, deadline.left(), "audio_timeout", "audio_decode_error", "ffmpeg (audio)", src)
    audio = np.frombuffer(res.stdout, dtype="<f4")
    if audio.size == 0:
        raise ProbeError("audio_decode_error", f"{src.name}: the audio stream decoded to no samples")
    return audio.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- the model

def check_whisper(path: str, where: str = "model") -> None:
    """Refuse on the driver, in one sentence, a folder the workers could not load as Whisper."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"`{where}` must be the path of a local Whisper model folder (saved with save_pretrained)")
    if not os.path.isdir(path):
        raise ValueError(f"`{where}` {path} is not a folder: pass a local Whisper model folder such as a copy of "
                         "openai/whisper-small saved with save_pretrained (nothing is downloaded at run time)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"`{where}` {path} has no config.json: pass a folder saved with save_pretrained")
    try:
        with open(os.path.join(path, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"`{where}` {path}: its config.json cannot be read ({type(e).__name__}: {e})") from e
    if model_type != "whisper":
        raise ValueError(f"`{where}` {path} is a {model_type!r} model, not a Whisper-family speech model: "
                         "use a Whisper checkpoint (openai/whisper-*, distil-whisper, ...)")
    if not os.path.exists(os.path.join(path, "preprocessor_config.json")) and \
            not os.path.exists(os.path.join(path, "processor_config.json")):
        raise ValueError(f"`{where}` {path} has no feature extractor (preprocessor_config.json): save the "
                         "processor beside the model with processor.save_pretrained")


class Whisper:
    """A Whisper model and its processor; batched greedy transcription with timestamps."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoProcessor, WhisperForConditionalGeneration

        self.torch = torch
        self.path = path
        self.device = resolve_device(device)
        on_gpu = self.device.startswith("cuda")
        self.dtype = {"auto": torch.float16 if on_gpu else torch.float32, "fp32": torch.float32,
                      "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        try:
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = WhisperForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
        except Exception as e:  # noqa: BLE001 - one clear sentence instead of a loader traceback
            raise ModelLoadError(f"the Whisper model in {path} could not be loaded ({type(e).__name__}: {e}); "
                                 "check that the folder holds a complete save_pretrained checkpoint") from e
        self.model.to(self.device).eval()
        self.fe = self.processor.feature_extractor
        self.tokenizer = self.processor.tokenizer
        self.time_precision = self.fe.chunk_length / self.model.config.max_source_positions
        gc = self.model.generation_config
        self.multilingual = bool(getattr(gc, "is_multilingual", False))
        self.id_to_lang = {v: k[2:-2] for k, v in (getattr(gc, "lang_to_id", None) or {}).items()}

    def features(self, audios: Sequence[np.ndarray], long: bool = False):
        kw: dict[str, Any] = {"truncation": False, "padding": "longest"} if long else {}
        out = self.fe(list(audios), sampling_rate=self.fe.sampling_rate, return_tensors="pt",
                      return_attention_mask=True, **kw)
        return out["input_features"].to(self.device, self.dtype), out["attention_mask"].to(self.device)

    def transcribe(self, audios: Sequence[np.ndarray], language: str | None = None,
                   max_new_tokens: int | None = None, long: bool = False) -> list[tuple[list[dict], str | None]]:
        """For each audio: (chunks [{"timestamp": (s, e|None), "text"}], language code or None),
        greedy, with timestamps."""
        torch = self.torch
        feats, mask = self.features(audios, long)
        kw: dict[str, Any] = {"return_timestamps": True, "do_sample": False, "num_beams": 1}
        if max_new_tokens:
            kw["max_new_tokens"] = int(max_new_tokens)
        langs: list[str | None] = [language] * len(audios)
        with torch.no_grad():
            if self.multilingual:
                kw["task"] = "transcribe"
                if language is None:  # what generate does itself, here so the codes are known
                    ids = self.model.detect_language(feats[..., :self.fe.nb_max_frames])
                    langs = [self.id_to_lang.get(int(i)) for i in ids.view(-1).tolist()]
                kw["language"] = langs if len(set(langs)) > 1 else langs[0]
            out = self.model.generate(feats, attention_mask=mask, **kw)
        seqs = out["sequences"] if isinstance(out, dict) else out
        res = []
        for seq, lang in zip(seqs, langs):
            _, optional = self.tokenizer._decode_asr([{"tokens": seq[None].cpu()}], return_timestamps=True,
                                                     return_language=False, time_precision=self.time_precision)
            res.append((optional.get("chunks", []), lang))
        return res


def load_whisper(path: str, device: str = "auto", dtype: str = "auto") -> Whisper:
    """Once per Python worker: Spark reuses workers, so later tasks find the model loaded."""
    key = (path, resolve_device(device), dtype)
    if key not in _MODELS:
        _MODELS[key] = Whisper(path, device, dtype)
    return _MODELS[key]


def segments_of(chunks: list[dict], start: float, end: float, offset: float | None = None) -> list[dict]:
    """Decoded chunks of one window [start, end] (s) as segments: times + `offset` (default:
    start), clamped to the window, a missing end = the window's end; text stripped; empty left out."""
    off = start if offset is None else offset
    out = []
    for c in chunks:
        text = (c.get("text") or "").strip()
        if not text:
            continue
        s, e = c.get("timestamp") or (None, None)
        s = min(max(start, off + float(s if s is not None else 0.0)), end)
        e = min(max(s, off + float(e) if e is not None else end), end)
        out.append({"start": round(s, 3), "end": round(e, 3), "text": text})
    return out


_meta = row_meta  # the row's meta as a dict (curation.schema)


def set_meta(row: dict, key: str, value: Any) -> None:
    """meta[key] = value, the row's other meta keys kept (a meta that is not a JSON object is
    kept under `_original`)."""
    raw = row.get("meta")
    m = _meta(row)
    if raw and not m:
        try:
            if json.loads(raw) != {}:
                m = {"_original": raw}
        except ValueError:
            m = {"_original": raw}
    m[key] = value
    row["meta"] = json.dumps(m, sort_keys=True, ensure_ascii=False)


# ----------------------------------------------------------------------------- the step

@register_step("asr")
class ASR(PrefetchRowStep):
    batch_rows = 32

    def __init__(self, model: str = "", model_name: str = "", batch_size: int = 8, chunk_length_s: float = 30.0,
                 language: str | None = None, device: str = "auto", dtype: str = "auto", timeout_s: float = 120.0,
                 max_new_tokens: int | None = None, on_failure: str = "drop", decode_workers: int = 2,
                 prefetch: int = 2, **kw: Any):
        super().__init__(**kw)
        check_whisper(model)
        self.model = model
        self.model_name = model_name or os.path.basename(os.path.normpath(model))
        try:
            self.batch_size = int(batch_size)
            self.chunk_length_s = float(chunk_length_s)
            self.timeout_s = float(timeout_s)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`batch_size`, `chunk_length_s` and `timeout_s` must be numbers ({e})") from e
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}")
        if not 0 <= self.chunk_length_s <= WINDOW_S:
            raise ValueError(f"`chunk_length_s` must be between 1 and {WINDOW_S:g} seconds (Whisper's window), "
                             f"or 0 for Whisper's own long-form decoding; got {chunk_length_s}")
        if 0 < self.chunk_length_s < 1:
            raise ValueError(f"`chunk_length_s` {chunk_length_s} is under a second: use 1 to {WINDOW_S:g}, or 0")
        if self.timeout_s <= 0:
            raise ValueError(f"`timeout_s` must be positive, got {timeout_s}")
        if language is not None and (not isinstance(language, str) or not language.isalpha() or len(language) > 8):
            raise ValueError(f"`language` must be a language code such as en or zh (or unset to detect), "
                             f"got {language!r}")
        self.language = language.lower() if language else None
        if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
            raise ValueError(f"`device` must be auto, cpu or cuda[:N], got {device!r}")
        self.device = device
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None
        if on_failure not in ("drop", "keep"):
            raise ValueError(f"`on_failure` must be drop or keep, got {on_failure!r}")
        self.on_failure = on_failure
        self.decode_workers = max(1, int(decode_workers))
        self.prefetch = int(prefetch)

    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        self._model = load_whisper(self.model, resolve_device(self.device, self.context.gpus), self.dtype)
        if self.language and self.language not in set(self._model.id_to_lang.values()) and self._model.multilingual:
            raise ValueError(f"`language` {self.language!r} is not one of the model's languages "
                             f"({', '.join(sorted(self._model.id_to_lang.values()))})")

    def _audio(self, row: dict) -> np.ndarray | None:
        import tempfile

        from reelforge.curation.media_io import media_path, open_media, stream_media_fd, video_source

        m = row["media"][0]
        fd = open_media(m)
        try:
            if m.get("offset") is None:  # a plain file: ffmpeg reads the checked fd
                return extract_audio(video_source(fd, media_path(m["uri"])), self.timeout_s)
            with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:  # inside a tar: a seekable copy
                stream_media_fd(fd, m, out=tmp)
                return extract_audio(tmp.name, self.timeout_s)
        finally:
            os.close(fd)

    def _wanted(self, row: dict) -> bool:
        media = row.get("media") or []
        return row.get("drop_step") is None and len(media) >= 1 and media[0].get("kind") == "video"

    def prepare(self, rows: list[dict]):
        idx = [i for i, r in enumerate(rows) if self._wanted(r)]
        done, failed = self.decode_rows(rows, idx, self._audio)
        return done, failed

    def _windows(self, audio: np.ndarray) -> list[tuple[float, float, np.ndarray]]:
        dur = audio.size / SAMPLE_RATE
        if self.chunk_length_s <= 0:
            return [(0.0, dur, audio)]
        n = int(round(self.chunk_length_s * SAMPLE_RATE))
        return [(s / SAMPLE_RATE, min(audio.size, s + n) / SAMPLE_RATE, audio[s:s + n])
                for s in range(0, audio.size, n)]

    def _fail(self, row: dict, reason: str, detail: str) -> None:
        if self.on_failure == "keep":
            set_meta(row, "asr", {"failed": reason, "detail": detail[:500]})
        else:
            drop(row, self.name, reason, detail)

    def compute(self, rows: list[dict], prepared) -> list[dict]:
        done, failed = prepared
        for i, (reason, detail) in failed:
            self._fail(rows[i], reason, detail)
        items: list[tuple[int, int, float, float, np.ndarray]] = []  # (row, window #, start, end, audio)
        longs: list[tuple[int, int, float, float, np.ndarray]] = []
        for i, audio in done:
            if audio is None:
                set_meta(rows[i], "asr", {"no_audio": True})
                continue
            for w, (s, e, a) in enumerate(self._windows(audio)):
                (longs if a.size > SAMPLE_RATE * WINDOW_S else items).append((i, w, s, e, a))
        results: dict[int, dict[int, Any]] = {}
        batches = [items[k:k + self.batch_size] for k in range(0, len(items), self.batch_size)]
        batches += [[x] for x in longs]
        for batch in batches:
            long = batch[0][4].size > SAMPLE_RATE * WINDOW_S
            try:
                outs = self._run(batch, long)
            except Exception:  # noqa: BLE001 - one at a time: only the window that fails costs its sample
                outs = []
                for x in batch:
                    try:
                        outs += self._run([x], long)
                    except Exception as err:  # noqa: BLE001 - a ledger line, not a failed job
                        outs.append(err)
            for (i, w, s, e, _), out in zip(batch, outs):
                results.setdefault(i, {})[w] = out if isinstance(out, Exception) else \
                    (segments_of(out[0], s, e), out[1])
        for i, audio in done:
            if audio is None:
                continue
            wins = results.get(i, {})
            err = next((v for v in wins.values() if isinstance(v, Exception)), None)
            if err is not None:
                self._fail(rows[i], "model_error", f"{type(err).__name__}: {err}")
                continue
            segs = [sg for w in sorted(wins) for sg in wins[w][0]]
            lang = wins[0][1] if wins else self.language
            set_meta(rows[i], "asr", {"model": self.model_name, "language": lang,
                                      "duration": round(audio.size / SAMPLE_RATE, 3), "segments": segs})
        return rows

    def _run(self, batch: list, long: bool) -> list:
        from reelforge.curation.vlm import halving_batches

        m = self._model

        def fn(a: int, b: int) -> list:
            return m.transcribe([x[4] for x in batch[a:b]], self.language, self.max_new_tokens, long)

        return halving_batches(fn, len(batch), len(batch), m.torch.cuda.empty_cache if m.device != "cpu" else None)


__all__ = ["ASR", "SAMPLE_RATE", "Whisper", "check_whisper", "extract_audio", "load_whisper", "segments_of",
           "set_meta"]
