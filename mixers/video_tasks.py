"""The `video_tasks` step: temporal training tasks built from probed videos (Keye-VL's video data:
re-ordering shuffled frames, matching clips across videos, grounding events in time, dense captions).

Each live sample with exactly one video medium that the probe step has measured (duration, fps,
frames) derives up to one `conversation` sample per task in `tasks`:

- `frame_order`: `k` frames at distinct times (one per equal stretch of the video, drawn by the
  seeded RNG from the stretch's central half), written as JPEGs, shown shuffled ("Frame 1: <image> ..."); the
  answer lists the shown frame numbers earliest first ("2, 4, 1, 3"), the true permutation. Frames
  closer than `min_frame_diff` grey levels (mean absolute difference) to another sampled frame make
  the order undecidable: no sample. Mode `non_thinking`.
- `clip_match`: the whole video, then `n_candidates` clips lettered A, B, ...: one cut from this
  video, the others from other videos of the run; the answer is the true clip's letter. The other
  videos come from one global list the engine gathers before the row pass (`jobs.video_tasks`: the
  `pool` live videos with the smallest sha256(seed, id), sorted by id), so the choice depends on the
  seed and the ids only, never on partitioning or batch order; each sample takes the candidates
  with the smallest sha256(seed, its id, candidate id), skipping videos that share its file, are
  shorter than the clips or whose cut fails. Every clip of a sample is equally long: min(`clip_s`,
  half the video), so length never gives the answer away. Mode `non_thinking`.
- `temporal_grounding`: the shots (`curation.video.detect_shots`) each get a description: the
  `model`'s caption of the shot's frames (a local VLM folder, loaded once per worker as the
  recaption step does), else the caption of the shot in `meta.shots` ([{"start", "end",
  "caption"}], the entry covering most of the shot); one shot with a description no other shot has
  is drawn and the question "When does <description> happen?" is answered with its span as
  `<|clip_time_start|>S-E<|clip_time_end|>` (mixers.modes `_fmt_time`). Needs 2 shots or more.
  Mode `video`.
- `dense_captions`: one sample whose answer lists every shot in time order, one line each:
  `<|clip_time_start|>S-E<|clip_time_end|> caption`. Needs every shot described. Mode `video`.

Children: id `<parent id>@<task>-s<seed>` (no dot: a shard member's key ends at its first dot),
`source_key` likewise, `parent_id` the parent, token counts reset, and `meta.video_task` = {name,
seed, parent, the task's parameters, what was drawn and the exact answer (frame indices and times,
clip spans and sources, shot spans)}; the rest of the parent's `meta` is kept. Media written by
the step live under `<workdir>/media/video_tasks/`, named from the parent id and seed only. The
randomness of every task comes from sha256(seed, parent id, task): the same seed gives the same
children, ids included, on any partitioning.

Fates: a parent that derives anything leaves as `split_into_video_tasks` (detail: the tasks that
derived and why the others did not), as the clips, modes and select steps do, so the run report
counts its children as born at this step (`keep_parent: true` keeps it alive instead). A parent
that derives nothing passes untouched. A parent whose own video cannot be opened or decoded leaves
with the reason of the `ProbeError` / `MediaReadError` (corrupt_video, decode_error, missing_file,
outside_root, ...), as in the clips step; anything else that goes wrong in one task (a failed
distractor cut, a model error) costs that task only, named in the detail.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import tempfile
from typing import Any, Iterator

from reelforge.curation.errors import MediaReadError, ProbeError
from reelforge.curation.schema import Media, alive, drop
from reelforge.curation.step import Step, StepContext, register_step
from reelforge.mixers.chat import NO_THINK, validate_sample
from reelforge.mixers.modes import _fmt_time, _meta

TASKS = ("frame_order", "clip_match", "temporal_grounding", "dense_captions")
MODE = {"frame_order": "non_thinking", "clip_match": "non_thinking", "temporal_grounding": "video",
        "dense_captions": "video"}
SHOT_PROMPT = "Describe what happens in this video clip in one sentence."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MEDIA_FIELDS = tuple(f.name for f in dataclasses.fields(Media))
_SAFE_EXT = re.compile(r"\.[a-z0-9]{1,8}")


class _Skip(Exception):
    """A task derives nothing from this video; the message says why (the parent's drop detail)."""


def task_seed(seed: int, *parts: str) -> int:
    """A 64-bit integer from sha256(seed, parts...): the one source of a task's randomness."""
    h = hashlib.sha256(str(int(seed)).encode())
    for p in parts:
        h.update(b"\0" + str(p).encode())
    return int.from_bytes(h.digest()[:8], "big")


def pool_key(seed: int, row_id: str) -> str:
    """The order of the global candidate pool: sha256 hex of "<seed>\\0<id>" (Spark's sha2 computes the same)."""
    return hashlib.sha256(f"{int(seed)}\0{row_id}".encode()).hexdigest()


def is_video_row(row: dict) -> bool:
    """A live sample with exactly one video medium the probe step measured."""
    media = row.get("media") or []
    if not alive(row) or len(media) != 1 or media[0].get("kind") != "video":
        return False
    m = media[0]
    return bool((m.get("duration") or 0) > 0 and (m.get("fps") or 0) > 0 and (m.get("frames") or 0) > 0)


def candidate_of(row: dict) -> dict:
    """What the candidate pool keeps of a video sample: its id and its video medium."""
    return {"id": row["id"], "media": dict(row["media"][0])}


def candidates_from_rows(rows: list[dict], seed: int = 0, pool: int = 1000,
                         kinds: tuple | list = ("video_text",)) -> list[dict]:
    """The candidate pool from rows held in memory, exactly as `jobs.video_tasks.gather_candidates`
    builds it over a DataFrame: the `pool` video rows with the smallest `pool_key`, sorted by id."""
    vids = [r for r in rows if is_video_row(r) and r.get("kind") in kinds]
    vids.sort(key=lambda r: (pool_key(seed, r["id"]), r["id"]))
    return sorted((candidate_of(r) for r in vids[:pool]), key=lambda c: c["id"])


@contextlib.contextmanager
def _opened(m: dict) -> Iterator[str | int]:
    """The video a medium names, as curation.video takes it: the checked fd of a plain file, or a
    temporary copy of a tar member (ffmpeg needs a seekable file)."""
    from reelforge.curation.media_io import media_path, open_media, stream_media_fd, video_source

    fd = open_media(m)  # containment.open_regular: inside the corpus roots, a regular file
    try:
        if m.get("offset") is None:
            yield video_source(fd, media_path(m["uri"]))
            return
        with tempfile.TemporaryDirectory() as tmp:
            ext = os.path.splitext(m.get("member") or "")[1].lower()
            path = os.path.join(tmp, "in" + (ext if _SAFE_EXT.fullmatch(ext) else ".mp4"))
            with open(path, "xb") as f:
                stream_media_fd(fd, m, out=f)
            yield path
    finally:
        os.close(fd)


def _file_medium(path: str, kind: str, **fields: Any) -> dict:
    """A media reference to a file this step wrote (read back through the same checks)."""
    from reelforge.curation.media_io import open_media, stream_media_fd

    fd = open_media({"uri": path})
    try:
        length, digest = stream_media_fd(fd, {"uri": path})
    finally:
        os.close(fd)
    m = dict.fromkeys(_MEDIA_FIELDS)
    m.update(kind=kind, uri=path, length=length, sha256=digest, **fields)
    return m


def _clip_medium(path: str, info: dict) -> dict:
    return _file_medium(path, "video", format=info.get("format"), width=info["width"], height=info["height"],
                        duration=info["duration"], fps=info.get("fps"), frames=info.get("frames"),
                        codec=info.get("codec"))


def span_text(start: float, end: float, duration: float) -> str:
    """`_fmt_time(start, end)` (one decimal), the end rounded down where rounding would pass the video's end."""
    e = end
    if round(e, 1) > duration + 1e-9:
        e = math.floor(duration * 10 + 1e-6) / 10
    return _fmt_time(min(start, e), e)


def shot_spans(duration: float, cuts: list[float]) -> list[tuple[float, float]]:
    """The shots between the cuts, covering [0, duration]."""
    from reelforge.curation.video import split_shots

    return split_shots(duration, cuts, None)


def meta_caption(meta: dict, start: float, end: float) -> str | None:
    """The caption in `meta.shots` ([{"start", "end", "caption"}]) that covers most of [start, end],
    when it covers more than half of it; None otherwise (or when `meta.shots` is not that shape)."""
    shots = meta.get("shots")
    if not isinstance(shots, list):
        return None
    best, best_cover = None, 0.0
    for s in shots:
        if not isinstance(s, dict) or not isinstance(s.get("caption"), str) or not s["caption"].strip():
            continue
        try:
            a, b = float(s["start"]), float(s["end"])
        except (KeyError, TypeError, ValueError):
            continue
        cover = max(0.0, min(b, end) - max(a, start))
        if cover > best_cover:
            best, best_cover = s["caption"].strip(), cover
    return best if best is not None and best_cover > 0.5 * (end - start) else None


@register_step("video_tasks")
class VideoTasks(Step):
    """Temporal tasks derived from each probed video (see the module's docstring)."""

    batch_rows = 4

    def __init__(self, tasks: list | str | None = None, seed: int = 0, k: int = 4, n_candidates: int = 4,
                 model: str = "", max_new_tokens: int = 32, timeout_s: float = 300.0, clip_s: float = 2.0,
                 pool: int = 1000, min_frame_diff: float = 2.0, scene_threshold: float = 0.3,
                 min_shot_s: float = 0.5, shot_frames: int = 4, prompt: str = SHOT_PROMPT, keep_parent: bool = False,
                 kinds: list | None = None, jpeg_quality: int = 95, device: str = "auto", dtype: str = "auto",
                 **kw: Any):
        super().__init__(**kw)
        names = [tasks] if isinstance(tasks, str) else list(TASKS if tasks is None else tasks)
        bad = [t for t in names if t not in TASKS]
        if not names or bad or len(set(names)) != len(names):
            raise ValueError(f"`tasks` must be distinct names among {', '.join(TASKS)}, got {names}")
        self.tasks = names
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.k = int(k)
        if not 2 <= self.k <= 16:
            raise ValueError(f"`k` (frames to order) must be between 2 and 16, got {k}")
        self.n_candidates = int(n_candidates)
        if not 2 <= self.n_candidates <= len(LETTERS):
            raise ValueError(f"`n_candidates` must be between 2 and {len(LETTERS)}, got {n_candidates}")
        self.model = model or ""
        if self.model:
            from reelforge.curation.vlm import DTYPES, check_vlm

            check_vlm(self.model)
            if dtype not in DTYPES:
                raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}")
        self.device, self.dtype = device, dtype
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError("`max_new_tokens` must be at least 1")
        self.timeout_s = float(timeout_s)
        if not self.timeout_s > 0:
            raise ValueError("`timeout_s` must be a positive number of seconds")
        self.clip_s = float(clip_s)
        if not self.clip_s > 0:
            raise ValueError("`clip_s` (the length of each clip_match clip) must be positive seconds")
        self.pool = int(pool)
        if self.pool < 2:
            raise ValueError("`pool` (videos kept as clip_match candidates) must be at least 2")
        self.min_frame_diff = float(min_frame_diff)
        self.scene_threshold, self.min_shot_s = float(scene_threshold), float(min_shot_s)
        self.shot_frames = max(2, int(shot_frames) // 2 * 2)  # Qwen-style models pair frames in time
        self.prompt = str(prompt)
        self.keep_parent = bool(keep_parent)
        self.kinds = list(kinds) if kinds else ["video_text"]
        self.jpeg_quality = int(jpeg_quality)
        self.candidates: list[dict] | None = None
        self.workdir: str | None = None

    # -- the candidate pool (clip_match) ------------------------------------------------------------------
    @property
    def needs_candidates(self) -> bool:
        """The engine gathers the candidate pool (jobs.video_tasks) before the row pass when this is true."""
        return "clip_match" in self.tasks

    def set_candidates(self, candidates: list[dict]) -> None:
        """The global pool of candidate videos ({"id", "media"}); the engine sets it before the row pass."""
        self.candidates = sorted(candidates, key=lambda c: c["id"])

    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        if "clip_match" in self.tasks and self.candidates is None:
            raise RuntimeError("clip_match needs the run's candidate videos: run the step through the engine "
                               "(reelforge.jobs.engine.run_step), or call set_candidates(candidates_from_rows(rows))")
        self._model = None
        if self.model and ("temporal_grounding" in self.tasks or "dense_captions" in self.tasks):
            from reelforge.curation.vlm import load_vlm, resolve_device

            self._model = load_vlm(self.model, resolve_device(self.device, self.context.gpus), self.dtype)

    # -- rows -----------------------------------------------------------------------------------------------
    def process(self, batch: list[dict]) -> list[dict]:
        out: list[dict] = []
        for row in batch:
            if not is_video_row(row) or row.get("kind") not in self.kinds:
                out.append(row)
                continue
            try:
                children, why = self.derive(row)
            except (ProbeError, MediaReadError) as e:
                out.append(drop(row, self.name, e.reason, e.detail))
                continue
            except Exception as e:  # noqa: BLE001 - one bad video never fails the job
                out.append(drop(row, self.name, "error", f"{type(e).__name__}: {e}"[:500]))
                continue
            if children and not self.keep_parent:
                names = ", ".join(json.loads(c["meta"])["video_task"]["name"] for c in children)
                skipped = "; ".join(f"{k}: {v}" for k, v in why.items())
                drop(row, self.name, "split_into_video_tasks",
                     f"{len(children)} derived: {names}" + (f"; not derived: {skipped}" if skipped else ""))
            out.append(row)
            out.extend(children)
        return out

    def derive(self, row: dict) -> tuple[list[dict], dict[str, str]]:
        """(the samples derived from `row`, why each task that derived nothing did not). A ProbeError or
        MediaReadError on the row's own video propagates (the parent leaves with its reason)."""
        m = row["media"][0]
        children: list[dict] = []
        why: dict[str, str] = {}
        with _opened(m) as src:
            shots = None
            for task in self.tasks:
                try:
                    if task in ("temporal_grounding", "dense_captions") and shots is None:
                        shots = self._described_shots(row, src)
                    child = getattr(self, f"_{task}")(row, src, shots)
                except _Skip as e:
                    why[task] = str(e)
                    continue
                except (ProbeError, MediaReadError):
                    raise  # the row's own video: the parent leaves with the reason
                except Exception as e:  # noqa: BLE001 - a failing task costs that task only
                    why[task] = f"error: {type(e).__name__}: {e}"[:300]
                    continue
                errs = validate_sample(child)
                if errs:  # never expected: a derived sample that breaks its mode's grammar is not emitted
                    why[task] = "invalid chat: " + "; ".join(errs)
                    continue
                children.append(child)
        return children, why

    # -- helpers ---------------------------------------------------------------------------------------------
    def _rng(self, row: dict, task: str) -> random.Random:
        return random.Random(task_seed(self.seed, row["id"], task))

    def _dir(self, row: dict) -> str:
        """This parent's folder (for this seed) under the run's media folder, canonical."""
        root = os.path.join(os.path.realpath(self.workdir or tempfile.gettempdir()), "media", "video_tasks")
        stem = hashlib.sha1(f"{row['id']}\0{self.seed}".encode()).hexdigest()[:24]
        dest = os.path.join(root, stem[:2], stem)
        os.makedirs(dest, exist_ok=True)
        if os.path.realpath(dest) != dest:
            raise MediaReadError("outside_root", f"{dest} is not a plain folder of the run's work folder")
        return dest

    def _child(self, row: dict, task: str, messages: list[dict], media: list[dict], record: dict) -> dict:
        child = copy.deepcopy(row)
        suffix = f"@{task}-s{self.seed}"
        child.update(id=f"{row['id']}{suffix}", source_key=f"{row['source_key']}{suffix}", parent_id=row["id"],
                     kind="conversation", messages=messages, media=media, mode=MODE[task], text=None,
                     captions=None, responses=None, chosen=None, rejected=None, pass_rate=None, difficulty=None,
                     text_tokens=None, visual_tokens=None, tokens=None)
        child["meta"] = json.dumps({**_meta(row), "video_task": {"name": task, "seed": self.seed,
                                                                  "parent": row["id"], **record}},
                                   sort_keys=True, ensure_ascii=False)
        return child

    # -- frame_order ---------------------------------------------------------------------------------------
    def frame_indices(self, row: dict) -> list[int]:
        """k strictly increasing frame indices, one drawn in the central half of each of k equal stretches
        of the video (so two frames are at least about half a stretch apart)."""
        total = int(row["media"][0]["frames"])
        if total < 2 * self.k:
            raise _Skip(f"{total} frames < 2k ({2 * self.k})")
        rng = self._rng(row, "frame_order")
        bounds = [round(i * total / self.k) for i in range(self.k + 1)]
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            q = (b - a) // 4
            out.append(rng.randrange(a + q, max(a + q + 1, b - q)))
        return out

    def _frame_order(self, row: dict, src: str | int, shots: Any) -> dict:
        import numpy as np
        from PIL import Image

        from reelforge.curation.video import decode_frames

        m = row["media"][0]
        idx = self.frame_indices(row)
        frames = decode_frames(src, idx, timeout_s=self.timeout_s, past_end="clamp")
        small = frames[:, ::4, ::4].astype(np.int16)
        for a in range(len(small)):
            for b in range(a + 1, len(small)):
                d = float(np.abs(small[a] - small[b]).mean())
                if d < self.min_frame_diff:
                    raise _Skip(f"frames {idx[a]} and {idx[b]} differ by {d:.2f} < min_frame_diff "
                                f"{self.min_frame_diff}: their order cannot be seen")
        rng = self._rng(row, "frame_order:shuffle")
        shown = list(range(self.k))  # shown[j] = the time rank of the j-th frame shown
        while shown == sorted(shown):  # never the identity: "1, 2, 3, 4" would be a free answer
            rng.shuffle(shown)
        dest = self._dir(row)
        media = []
        for j, t in enumerate(shown):
            path = os.path.join(dest, f"frame_order_{j}.jpg")
            buf = io.BytesIO()
            Image.fromarray(frames[t]).save(buf, format="JPEG", quality=self.jpeg_quality)
            if os.path.lexists(path + ".part"):  # never write through whatever a crashed run left
                os.unlink(path + ".part")
            with open(path + ".part", "xb") as f:
                f.write(buf.getvalue())
            os.replace(path + ".part", path)
            media.append(_file_medium(path, "image", format="jpeg", width=int(frames.shape[2]),
                                      height=int(frames.shape[1])))
        answer = ", ".join(str(shown.index(t) + 1) for t in range(self.k))
        fps = float(m["fps"])
        shown_lines = "\n".join(f"Frame {j + 1}: <image>" for j in range(self.k))
        user = (f"{shown_lines}\nThese {self.k} frames were taken from one video and shuffled. Put them in the "
                "order in which they happen in the video: answer with the frame numbers, earliest first, "
                f"separated by commas. {NO_THINK}")
        record = {"k": self.k, "frame_indices": idx, "times": [round(i / fps, 3) for i in idx],
                  "shown": shown, "answer": answer}
        return self._child(row, "frame_order", [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": answer}], media, record)

    # -- clip_match ---------------------------------------------------------------------------------------
    def distractor_order(self, row: dict) -> list[dict]:
        """The pool's other videos in this sample's order: sha256(seed, its id, candidate id)."""
        m = row["media"][0]
        own = (m.get("uri"), m.get("member"), m.get("offset"))
        others = [c for c in self.candidates or [] if c["id"] != row["id"]
                  and (c["media"].get("uri"), c["media"].get("member"), c["media"].get("offset")) != own
                  and not (m.get("sha256") and c["media"].get("sha256") == m.get("sha256"))]
        return sorted(others, key=lambda c: (task_seed(self.seed, row["id"], "clip_match", c["id"]), c["id"]))

    @staticmethod
    def _span(rng: random.Random, duration: float, length: float) -> tuple[float, float]:
        start = round(rng.uniform(0.0, max(0.0, duration - length)), 3)
        return start, round(start + length, 3)

    def _clip_match(self, row: dict, src: str | int, shots: Any) -> dict:
        from reelforge.curation.video import cut_clip

        m = row["media"][0]
        rng = self._rng(row, "clip_match")
        dest = self._dir(row)
        true_at = rng.randrange(self.n_candidates)
        length = round(min(self.clip_s, 0.5 * float(m["duration"])), 3)  # every clip of the sample this long
        start, end = self._span(rng, float(m["duration"]), length)
        picks: list[tuple[dict, float, float]] = []
        failed: list[str] = []
        for c in self.distractor_order(row):
            if len(picks) == self.n_candidates - 1:
                break
            cm = c["media"]
            if not (cm.get("duration") or 0) >= length:
                continue
            s, e = self._span(random.Random(task_seed(self.seed, row["id"], "clip_match", c["id"], "span")),
                              float(cm["duration"]), length)
            path = os.path.join(dest, f"clip_match_d{len(picks)}.mp4")
            try:
                with _opened(cm) as csrc:
                    info = cut_clip(csrc, s, e, path, timeout_s=self.timeout_s, audio=False)
                picks.append((_clip_medium(path, info), s, e))
                picks[-1][0]["_from"] = c["id"]
            except (ProbeError, MediaReadError, ValueError, OSError) as ex:  # another video's fault: try the next
                failed.append(f"{c['id']}: {getattr(ex, 'reason', type(ex).__name__)}")
        if len(picks) < self.n_candidates - 1:
            raise _Skip(f"{len(picks)} distractor clips from other videos < n_candidates - 1 "
                        f"({self.n_candidates - 1})" + (f" ({len(failed)} failed)" if failed else ""))
        path = os.path.join(dest, "clip_match_true.mp4")
        info = cut_clip(src, start, end, path, timeout_s=self.timeout_s, audio=False)
        true_medium = _clip_medium(path, info)
        true_medium["_from"] = row["id"]
        clips = [(p[0], p[1], p[2]) for p in picks]
        clips.insert(true_at, (true_medium, start, end))
        # final names by letter, so the files say which candidate they are
        media, record_clips = [dict(m)], []
        for j, (cm, s, e) in enumerate(clips):
            final = os.path.join(dest, f"clip_match_{LETTERS[j]}.mp4")
            os.replace(cm["uri"], final)
            origin = cm.pop("_from")
            cm["uri"] = final
            media.append(cm)
            record_clips.append({"letter": LETTERS[j], "from": origin, "start": s, "end": e})
        answer = LETTERS[true_at]
        options = "\n".join(f"{LETTERS[j]}. <video>" for j in range(self.n_candidates))
        user = (f"<video>\nWhich of these clips comes from the video above?\n{options}\n"
                f"Answer with the letter of the clip. {NO_THINK}")
        record = {"n_candidates": self.n_candidates, "clip_s": self.clip_s, "clips": record_clips,
                  "answer": answer}
        return self._child(row, "clip_match", [{"role": "user", "content": user},
                                                {"role": "assistant", "content": answer}], media, record)

    # -- shots (temporal_grounding, dense_captions) ----------------------------------------------------------
    def _described_shots(self, row: dict, src: str | int) -> list[dict]:
        """[{start, end, caption or None, from}] for each detected shot."""
        from reelforge.curation.video import detect_shots

        m = row["media"][0]
        cuts = detect_shots(src, threshold=self.scene_threshold, min_shot_s=self.min_shot_s,
                            timeout_s=self.timeout_s)
        spans = shot_spans(float(m["duration"]), cuts)
        shots = [{"start": round(a, 3), "end": round(b, 3), "caption": None, "from": None} for a, b in spans]
        if self._model is not None:
            for s, cap in zip(shots, self.caption_shots(row, src, spans)):
                cap = " ".join((cap or "").split())  # one line per shot in dense_captions
                s["caption"], s["from"] = (cap or None), "model"
        else:
            meta = _meta(row)
            for s in shots:
                s["caption"] = meta_caption(meta, s["start"], s["end"])
                s["from"] = "meta" if s["caption"] else None
        return shots

    def shot_frame_indices(self, row: dict, spans: list[tuple[float, float]]) -> list[list[int]]:
        """`shot_frames` frame indices spread evenly over each shot."""
        from reelforge.curation.video import sample_indices

        m = row["media"][0]
        fps, total = float(m["fps"]), int(m["frames"])
        out = []
        for a, b in spans:
            lo = min(total - 1, int(round(a * fps)))
            hi = max(lo + 1, min(total, int(round(b * fps))))
            out.append([lo + i for i in sample_indices(hi - lo, self.shot_frames)])
        return out

    def caption_shots(self, row: dict, src: str | int, spans: list[tuple[float, float]]) -> list[str | None]:
        """The model's caption of each shot (greedy), from `shot_frames` frames of it; None where it fails."""
        from PIL import Image

        from reelforge.curation.video import decode_frames

        idx = self.shot_frame_indices(row, spans)
        flat = decode_frames(src, [i for ii in idx for i in ii], timeout_s=self.timeout_s, past_end="clamp")
        visuals, at = [], 0
        for ii in idx:
            visuals.append([("video", [Image.fromarray(f) for f in flat[at:at + len(ii)]])])
            at += len(ii)
        try:
            enc = self._model.encode([self.prompt] * len(visuals), visuals)
            return list(self._model.generate(enc, max_new_tokens=self.max_new_tokens))
        except Exception:  # noqa: BLE001 - the model failing on one video costs its shot tasks, not the job
            return [None] * len(spans)

    def _temporal_grounding(self, row: dict, src: str | int, shots: list[dict]) -> dict:
        if len(shots) < 2:
            raise _Skip(f"{len(shots)} shot: grounding needs 2 or more")
        caps = [s["caption"] for s in shots]
        unique = [i for i, c in enumerate(caps) if c and caps.count(c) == 1]
        if not unique:
            raise _Skip("no shot has a description of its own (set `model`, or give meta.shots captions)")
        i = unique[self._rng(row, "temporal_grounding").randrange(len(unique))]
        s = shots[i]
        dur = float(row["media"][0]["duration"])
        answer = f"It happens at {span_text(s['start'], s['end'], dur)}."
        desc = s["caption"].strip().rstrip(".")
        user = f"<video>\nWhen does the following happen in the video: {desc}? {NO_THINK}"
        record = {"shot": i, "span": [s["start"], s["end"]], "shots": [[x["start"], x["end"]] for x in shots],
                  "description": s["caption"], "described_by": s["from"], "answer": answer,
                  **({"model": self.model, "max_new_tokens": self.max_new_tokens} if s["from"] == "model" else {})}
        return self._child(row, "temporal_grounding", [{"role": "user", "content": user},
                                                        {"role": "assistant", "content": answer}],
                           [dict(row["media"][0])], record)

    def _dense_captions(self, row: dict, src: str | int, shots: list[dict]) -> dict:
        if not shots:
            raise _Skip("no shots")
        missing = [i for i, s in enumerate(shots) if not s["caption"]]
        if missing:
            raise _Skip(f"shots {missing} have no caption (set `model`, or give meta.shots captions)")
        dur = float(row["media"][0]["duration"])
        answer = "\n".join(f"{span_text(s['start'], s['end'], dur)} {s['caption'].strip()}" for s in shots)
        user = f"<video>\nDescribe each part of this video in order, with its start and end times. {NO_THINK}"
        record = {"shots": [[s["start"], s["end"], s["caption"]] for s in shots],
                  "described_by": shots[0]["from"], "answer": answer,
                  **({"model": self.model, "max_new_tokens": self.max_new_tokens}
                     if shots[0]["from"] == "model" else {})}
        return self._child(row, "dense_captions", [{"role": "user", "content": user},
                                                    {"role": "assistant", "content": answer}],
                           [dict(row["media"][0])], record)
