"""The five cold-start modes: renderers from schema samples to training conversations.

A renderer returns the same sample with its `messages` rewritten in the mode's form and
`mode` set (plus, for think-with-image, the intermediate images appended to `media`); the
chat text itself comes from `mixers.chat.to_chat`. What a renderer reads from a sample:

- the question: the conversation's turns up to the last assistant turn (earlier assistant
  turns stay plain answers); the answer: the last assistant turn;
- reasoning: `meta.reasoning`, or a `<think>R</think>` prefix of the last assistant turn;
- auto-think's decision: `meta.think` (true/false) when the source has it, else the
  complexity rule `needs_thinking`: think when the source has reasoning and either the
  reasoning is long (>= 40 words) or the question asks for counting, arithmetic, comparison,
  explanation or several steps; answer directly otherwise;
- think-with-image: `meta.tool_steps` = [{"thought": ..., "code": ...}, ...] and optional
  `meta.final_thought`; each code runs in the sandbox on the sample's first image, and its
  image comes back as the next turn (stored as a PNG beside the run and added to `media`);
- video: `meta.video_qa` = {"question", "answer" with `{0}`, `{1}` ... where times go,
  "spans": [[start, end], ...], optional "reasoning"}; a video sample without it gets a
  grounded caption question whose answer cites the whole clip.

Video at fixed frame counts (`video_frames: [16, 32]`, the Keye-VL report's cold-start videos):
each rendered video sample leaves as `split_into_frame_counts` and enters again once per count,
a derived sample (`parent_id` its id, id `<id>@f16`, `meta.video_frames` 16) whose video
medium carries the plan of exactly that many frames (`curation.frame_plan.fixed_frame_plans`:
the indices, timestamps, 1.5 slow/fast types and sizes from those decoded frames, tokens), so
the ledger balances (inputs + derived = kept + dropped) and each copy counts its own tokens.
Run it after the dedup steps: the copies share their video and text.

Modes by share (`sources: {math_cot: {thinking: 0.7, non_thinking: 0.3}}`, beside the one-mode
form `{llava_sft: non_thinking}`): each sample of such a source is rendered in one mode drawn by
share, decided by `draw_mode(seed, id, shares)` (sha256 of the step's `seed` and the sample id, so
the same for any partitioning, batch size or order); `meta.modes` records
`{"drawn", "shares", "seed"}`. A sample that cannot be rendered in its drawn mode (thinking
without reasoning, ...) leaves with the renderer's reason: there is no fallback to another mode,
which would silently move the realised shares away from the asked ones.
With `emit: both` (every mode the source's shares name with a share above 0; `all` is the same)
or `emit: [thinking, non_thinking]` (those modes) each such sample leaves as `split_into_modes`
and enters again once per mode, a derived sample (`parent_id` its id, id `<id>@<mode>`,
`source_key` likewise, token counts reset) rendered in that mode, its `meta.modes` also naming
`copy` (its mode) and `copies`: the same question in thinking and non-thinking form. A copy that
cannot be rendered leaves with the renderer's reason; when no copy can be, the sample itself
leaves with the first copy's reason and no copies are made.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Any

from reelforge.curation.errors import MediaReadError, ProbeError
from reelforge.curation.schema import alive, drop, row_meta
from reelforge.curation.step import RowStep, register_step
from reelforge.curation.tokens import TokenError, VisualTokenConfig
from reelforge.mixers.chat import MODES, NO_THINK, THINK, TIME_END, TIME_START

STYLES = ("report", "template")
_CUES = re.compile(r"\b(how many|why|calculate|compute|prove|solve|compare|explain|step|total|difference|"
                   r"how much|which is (?:larger|smaller|more|less)|count)\b", re.I)
_THINK_PREFIX = re.compile(r"^\s*<think>(.*?)</think>\s*(?:<answer>(.*?)</answer>\s*)?(.*)$", re.S)


class ModeError(Exception):
    """A sample that cannot be rendered in the mode; `reason` is the ledger code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


_meta = row_meta  # the row's meta as a dict (curation.schema)


def _split(row: dict) -> tuple[list[dict], str, str | None]:
    """(turns before the final answer, final answer, reasoning or None)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in row.get("messages") or []]
    if not msgs or msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise ModeError("mode_no_answer", "the sample has no conversation ending in an assistant answer")
    answer = msgs[-1]["content"]
    meta = _meta(row)
    reasoning = meta.get("reasoning") if isinstance(meta.get("reasoning"), str) else None
    m = _THINK_PREFIX.match(answer)
    if m:
        reasoning = reasoning or m.group(1).strip()
        answer = (m.group(2) if m.group(2) is not None else m.group(3)).strip()
    history = []
    for x in msgs[:-1]:
        if x["role"] == "assistant":
            pm = _THINK_PREFIX.match(x["content"])
            x = {"role": "assistant", "content": (pm.group(2) or pm.group(3)).strip() if pm else x["content"]}
        history.append(x)
    if not answer.strip():
        raise ModeError("mode_no_answer", "the final answer is empty")
    return history, answer.strip(), (reasoning.strip() if reasoning and reasoning.strip() else None)


def _switch(history: list[dict], switch: str | None) -> list[dict]:
    out = [dict(m) for m in history]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    content = re.sub(r"\s*/(no_)?think\s*$", "", out[last]["content"])
    out[last]["content"] = f"{content} {switch}" if switch else content
    return out


def thinking_text(reasoning: str, answer: str, style: str = "report") -> str:
    if style == "template":
        return f"<think>\n{reasoning}\n</think>\n\n{answer}"
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def non_thinking_text(answer: str, style: str = "report") -> str:
    return f"<think>\n\n</think>\n\n{answer}" if style == "template" else answer


def needs_thinking(question: str, reasoning: str | None, min_words: int = 40) -> tuple[bool, str]:
    """The documented complexity rule of auto-think: (decision, why)."""
    if not reasoning:
        return False, "The question can be answered directly from what is shown"
    if len(reasoning.split()) >= min_words:
        return True, "Answering needs several steps of reasoning"
    cue = _CUES.search(question)
    if cue:
        return True, f"The question asks to {cue.group(1).lower()}, which needs reasoning"
    return False, "The question is simple and can be answered directly"


def _finish(row: dict, messages: list[dict], mode: str) -> dict:
    out = dict(row)
    out["messages"] = messages
    out["mode"] = mode
    return out


def render_thinking(row: dict, style: str = "report") -> dict:
    history, answer, reasoning = _split(row)
    if not reasoning:
        raise ModeError("mode_no_reasoning", "thinking mode needs reasoning (meta.reasoning or <think> in the answer)")
    return _finish(row, _switch(history, THINK) + [{"role": "assistant",
                                                    "content": thinking_text(reasoning, answer, style)}], "thinking")


def render_non_thinking(row: dict, style: str = "report") -> dict:
    history, answer, _ = _split(row)
    return _finish(row, _switch(history, NO_THINK) + [{"role": "assistant",
                                                       "content": non_thinking_text(answer, style)}], "non_thinking")


def render_auto_think(row: dict, style: str = "report") -> dict:
    history, answer, reasoning = _split(row)
    meta = _meta(row)
    question = next(m["content"] for m in reversed(history) if m["role"] == "user")
    if isinstance(meta.get("think"), bool):
        think = meta["think"] and reasoning is not None
        why = "The source marks this question as needing reasoning" if think else \
            "The source marks this question as answerable directly"
    else:
        think, why = needs_thinking(question, reasoning)
    decision = THINK if think else NO_THINK
    body = thinking_text(reasoning, answer, style) if think else non_thinking_text(answer, style)
    content = f"<analysis>{why}. Therefore, {decision} mode is more appropriate.</analysis>{body}"
    return _finish(row, _switch(history, None) + [{"role": "assistant", "content": content}], "auto_think")


def _fmt_time(s: float, e: float) -> str:
    return f"{TIME_START}{s:.1f}-{e:.1f}{TIME_END}"


def render_video(row: dict, style: str = "report", think: bool | None = None) -> dict:
    media = row.get("media") or []
    video = next((m for m in media if m["kind"] == "video"), None)
    if video is None:
        raise ModeError("mode_no_video", "video mode needs a sample with a video")
    dur = float(video.get("duration") or 0.0)
    qa = _meta(row).get("video_qa")
    if isinstance(qa, dict) and qa.get("question") and qa.get("answer"):
        spans = qa.get("spans") or []
        try:
            answer = qa["answer"].format(*[_fmt_time(float(s), float(e)) for s, e in spans])
        except (IndexError, KeyError, ValueError, TypeError) as e:
            raise ModeError("mode_bad_video_qa", f"video_qa answer and spans disagree: {e}") from e
        question, reasoning = qa["question"], qa.get("reasoning")
    else:
        caption = (row.get("text") or "").strip()
        if not caption or dur <= 0:
            raise ModeError("mode_no_video_qa", "a video without video_qa needs a caption and a duration")
        question = "What happens in this video, and when?"
        answer = f"{caption.rstrip('.')} ({_fmt_time(0.0, dur)})."
        reasoning = None
    if TIME_START not in answer:
        raise ModeError("mode_no_times", "the video answer cites no time")
    think = bool(reasoning) if think is None else think
    if think and not reasoning:
        raise ModeError("mode_no_reasoning", "a thinking video sample needs video_qa.reasoning")
    n_videos = sum(m["kind"] == "video" for m in media)
    n_images = sum(m["kind"] == "image" for m in media)
    tags = "".join(["<image>"] * n_images + ["<video>"] * n_videos)
    user = {"role": "user", "content": f"{tags}\n{question} {THINK if think else NO_THINK}"}
    body = thinking_text(reasoning, answer, style) if think else non_thinking_text(answer, style)
    return _finish(row, [user, {"role": "assistant", "content": body}], "video")


def render_think_with_image(row: dict, workdir: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> dict:
    """Runs each tool step's code in the sandbox; its image becomes the next turn and a new medium."""
    from PIL import Image

    from reelforge.curation.media_io import MediaReadError, read_media_bytes
    from reelforge.mixers.sandbox import run_code

    media = list(row.get("media") or [])
    first = next((m for m in media if m["kind"] == "image"), None)
    if first is None:
        raise ModeError("mode_no_image", "think-with-image needs an image")
    meta = _meta(row)
    steps = meta.get("tool_steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) and s.get("code") for s in steps):
        raise ModeError("mode_no_tool_steps", "think-with-image needs meta.tool_steps [{thought, code}, ...]")
    history, answer, reasoning = _split(row)
    try:
        src = read_media_bytes(first)
    except MediaReadError as e:
        raise ModeError(e.reason, e.detail) from e
    os.makedirs(workdir, exist_ok=True)
    turns: list[dict] = []
    for k, st in enumerate(steps):
        res = run_code(st["code"], [src], timeout_s=timeout_s, memory_mb=memory_mb)
        if not res.ok:
            raise ModeError(f"sandbox_{res.reason}", f"tool step {k}: {res.error[:300]}")
        data = res.images[0]
        sha = hashlib.sha256(data).hexdigest()
        path = os.path.join(workdir, f"{row['id']}_{k}.png")
        with open(path, "wb") as f:
            f.write(data)
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        media.append({**{key: None for key in first}, "kind": "image", "uri": path, "length": len(data),
                      "sha256": sha, "format": "png", "width": w, "height": h})
        thought = (st.get("thought") or "Let me look closer at the image.").strip()
        lead = ("<think>" + (f"{reasoning}\n" if reasoning else "")) if k == 0 else ""
        code = st["code"].strip("\n")
        turns.append({"role": "assistant", "content": f"{lead}{thought}\n<code>\n```python\n{code}\n```\n</code>"})
        turns.append({"role": "user", "content": "<sandbox_output><image></sandbox_output>"})
    final = (meta.get("final_thought") or "The processed image shows the answer.").strip()
    turns.append({"role": "assistant", "content": f"{final}</think><answer>{answer}</answer>"})
    out = _finish(row, _switch(history, THINK) + turns, "think_with_image")
    out["media"] = media
    return out


def render(row: dict, mode: str, style: str = "report", workdir: str | None = None, **opts: Any) -> dict:
    """Render one schema row (a dict) in `mode`; raises ModeError when the sample cannot be."""
    if mode == "thinking":
        return render_thinking(row, style)
    if mode == "non_thinking":
        return render_non_thinking(row, style)
    if mode == "auto_think":
        return render_auto_think(row, style)
    if mode == "video":
        return render_video(row, style, opts.get("think"))
    if mode == "think_with_image":
        if workdir is None:
            raise ModeError("mode_no_workdir", "think-with-image needs a folder for its images")
        return render_think_with_image(row, workdir, opts.get("timeout_s", 10.0), opts.get("memory_mb", 1024))
    raise ModeError("mode_unknown", f"unknown mode {mode!r}: use one of {', '.join(MODES)}")


def draw_mode(seed: int, sample_id: str, shares: dict[str, float]) -> str:
    """The mode of `sample_id` drawn by `shares` under `seed`: u = the first 8 bytes of
    sha256(seed, id) as a fraction of 2**64, against the shares' running sum in `MODES` order (so
    the order the recipe lists them in does not matter)."""
    h = hashlib.sha256(f"modes\0{int(seed)}\0{sample_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0 ** 64
    acc, last = 0.0, None
    for m in MODES:
        p = shares.get(m, 0.0)
        if p <= 0:
            continue
        acc, last = acc + p, m
        if u < acc:
            return m
    assert last is not None  # shares are checked to sum to 1
    return last  # u beyond the float sum of the shares (rounding): the last mode with a share


def _mode_sources(sources: Any) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """`modes.sources` checked: ({source: mode}, {source: {mode: share}})."""
    if not isinstance(sources, dict) or not sources:
        raise ValueError("`sources` must map source names to modes, e.g. {llava_sft: non_thinking}, or to "
                         "shares of modes, e.g. {math_cot: {thinking: 0.7, non_thinking: 0.3}}")
    one: dict[str, str] = {}
    shared: dict[str, dict[str, float]] = {}
    bad: dict[str, Any] = {}
    for src, v in sources.items():
        if isinstance(v, dict):
            where = f"`modes.sources.{src}`"
            if not v:
                raise ValueError(f"{where} is an empty map of shares: give modes and shares, e.g. "
                                 f"{{thinking: 0.7, non_thinking: 0.3}}")
            unknown = [m for m in v if m not in MODES]
            if unknown:
                raise ValueError(f"{where} names unknown modes {unknown}: shares are given to "
                                 f"{', '.join(MODES)}")
            if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in v.values()):
                raise ValueError(f"{where} shares must be numbers from 0 to 1, got {v!r}")
            total = sum(float(p) for p in v.values())
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"{where} shares sum to {total:.6g}, not 1 (within 1e-6): fix the shares")
            shared[src] = {m: float(v[m]) for m in MODES if m in v}
        elif v in MODES:
            one[src] = v
        else:
            bad[src] = v
    if bad:
        raise ValueError(f"unknown modes {bad}: use {', '.join(MODES)}, or shares such as "
                         f"{{thinking: 0.7, non_thinking: 0.3}}")
    return one, shared


def _emit(value: Any, shared: dict[str, dict[str, float]]) -> list[str] | str | None:
    """`modes.emit` checked: None (one sample in its drawn mode), "all" (one copy per mode with a
    share), or a list of modes (one copy per listed mode)."""
    if value in (None, "one"):
        return None
    if value in ("both", "all"):
        out: list[str] | str = "all"
    elif (isinstance(value, (list, tuple)) and value and all(isinstance(m, str) and m in MODES for m in value)
          and len(set(value)) == len(value)):
        out = list(value)
    else:
        raise ValueError(f"`modes.emit` must be one, both (every mode of a source's shares) or a list of distinct "
                         f"modes among {', '.join(MODES)}, got {value!r}")
    if not shared:
        raise ValueError("`modes.emit` makes copies of the sources given as shares, and `modes.sources` gives none: "
                         "give a source as shares, e.g. {math_cot: {thinking: 0.5, non_thinking: 0.5}}")
    return out


def _video_frames(value: Any, cfg: VisualTokenConfig) -> list[int] | None:
    """The `video_frames` option checked: distinct positive frame counts, or None (off)."""
    if value is None:
        return None
    ok = (isinstance(value, (list, tuple)) and value
          and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in value))
    if not ok or len(set(value)) != len(value):
        raise ValueError(f"`modes.video_frames` must be a list of distinct positive frame counts such as "
                         f"[16, 32], got {value!r}: fix the recipe's modes step")
    counts = [int(k) for k in value]
    cap = int(cfg.video_total_tokens * 28 * 28 / cfg.video_min_pixels)
    if cfg.slow_fast and max(counts) > cap:
        raise ValueError(f"`modes.video_frames` asks for {max(counts)} frames but {cfg.processor} samples at most "
                         f"{cap} (its video budget): use smaller counts")
    if not cfg.slow_fast:  # the 1.0 release rounds nframes to its frame factor: say so rather than collide
        ff = cfg.frame_factor
        sampled = [round(k / ff) * ff for k in counts]
        if min(sampled) < ff or len(set(sampled)) != len(sampled):
            raise ValueError(f"`modes.video_frames` {counts} sample {sampled} frames under {cfg.processor} (counts "
                             f"rounded to multiples of {ff}): use distinct multiples of {ff}")
    return counts


@register_step("modes")
class RenderModes(RowStep):
    """The `modes` recipe step: renders each listed source in its mode; other sources pass unchanged.

    ``- modes: {sources: {llava_sft: non_thinking, math_cot: thinking, thyme_like: think_with_image},
    style: report, timeout_s: 10, memory_mb: 1024}``. A sample that cannot be rendered leaves with
    the reason (`mode_no_reasoning`, `sandbox_timeout`, ...).

    A source may be given shares instead of one mode, ``math_cot: {thinking: 0.7, non_thinking: 0.3}``
    (they sum to 1): each of its samples gets the mode `draw_mode(seed, id, shares)`; `seed` (default 0)
    picks the draw. `emit: both` (or a list of modes) emits one derived copy per mode instead and the
    sample leaves as `split_into_modes` (see the module doc).

    A sample that already has a `mode` (a data-task builder's: `video_tasks`, `grounding`,
    `synth_ocr`, ...) passes unchanged: it was rendered when it was built; so does an `interleaved`
    document (`asr_interleave`'s), which is pre-training text, not a dialogue.

    `video_frames: [16, 32]`: each video-mode sample is emitted once per count as a derived sample
    whose video carries its own frame plan for that count (see the module doc); `processor`
    (keye-vl-1.5, the default, or keye-vl-1.0) and `visual` (numbers overriding the preset, as the
    tokens step's) say how the plan is made: use the same ones as the tokens step. A video that
    cannot be read leaves with its reason (`missing_file`, `decode_error`, ...); a copy for more
    frames than the video has leaves as `too_few_frames`."""

    def __init__(self, sources: dict | None = None, style: str = "report", timeout_s: float = 10.0,
                 memory_mb: int = 1024, video_think: bool | None = None, video_frames: list[int] | None = None,
                 processor: str | None = None, visual: dict | None = None, video_timeout_s: float = 120.0,
                 seed: int = 0, emit: str | list[str] | None = None, **kw: Any):
        super().__init__(**kw)
        one, shared = _mode_sources(sources)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`modes.seed` must be an integer, got {seed!r}")
        self.seed, self.shares, self.emit = int(seed), shared, _emit(emit, shared)
        if style not in STYLES:
            raise ValueError(f"`style` must be one of {', '.join(STYLES)}")
        used = set(one.values()) | {m for sh in shared.values() for m, p in sh.items() if p > 0}
        if isinstance(self.emit, list):
            used |= set(self.emit)
        if "think_with_image" in used:
            from reelforge.mixers.sandbox import sandbox_available

            why = sandbox_available()  # refuse up front: there is no weaker fallback
            if why is not None:
                raise ValueError(why)
        vis = dict(visual or {})
        if processor is not None and vis.setdefault("processor", processor) != processor:
            raise ValueError(f"`modes.processor` is {processor} but `modes.visual.processor` is "
                             f"{vis['processor']}: give one of them")
        self.plan_cfg = VisualTokenConfig.from_dict(vis)
        self.video_frames = _video_frames(video_frames, self.plan_cfg)
        self.video_timeout_s = float(video_timeout_s)
        self.sources, self.style = one, style
        self.timeout_s, self.memory_mb, self.video_think = float(timeout_s), int(memory_mb), video_think
        self.workdir: str | None = None

    def process(self, batch: list[dict]) -> list[dict]:
        out: list[dict] = []
        for row in batch:
            if not alive(row) or (row["source"] not in self.sources and row["source"] not in self.shares) \
                    or row.get("mode") or row.get("kind") == "interleaved":  # already rendered (a builder's
                # sample: video_tasks, grounding, ...), or a document rather than a dialogue (asr_interleave)
                out.append(row)
                continue
            try:
                rendered = self._render_source(row)
            except Exception as e:  # noqa: BLE001 - a bad sample never fails the job
                rendered = [drop(row, self.name, "error", f"{type(e).__name__}: {e}"[:500])]
            for r in rendered:  # each row rendered here in video mode: once per frame count
                if self.video_frames and alive(r) and r.get("mode") == "video" and "video_frames" not in _meta(r):
                    out.extend(self._frame_copies(r))
                else:
                    out.append(r)
        return out

    def process_row(self, row: dict) -> dict:
        """One row of a one-mode or drawn-mode source rendered (a share source with `emit` makes
        copies: use `process`)."""
        return self._render_source(row)[0]

    def _render_one(self, row: dict, mode: str) -> dict:
        """`row` in `mode`; raises ModeError."""
        folder = os.path.join(self.workdir or ".", "modes_media")
        return render(row, mode, self.style, folder, think=self.video_think, timeout_s=self.timeout_s,
                      memory_mb=self.memory_mb)

    def _render_source(self, row: dict) -> list[dict]:
        """The rows that leave for `row`: itself rendered (or dropped), or, with `emit`, itself
        dropped as `split_into_modes` and its copies."""
        src = row["source"]
        mode = self.sources.get(src)
        if mode is not None:
            try:
                return [self._render_one(row, mode)]
            except ModeError as e:
                return [drop(row, self.name, e.reason, e.detail)]
        shares = self.shares.get(src)
        if shares is None:
            return [row]
        meta = _meta(row)
        drawn = draw_mode(self.seed, row["id"], shares)
        record = {"drawn": drawn, "shares": shares, "seed": self.seed}
        if self.emit is None:
            out = dict(row, meta=json.dumps({**meta, "modes": record}, sort_keys=True, ensure_ascii=False))
            try:
                return [self._render_one(out, drawn)]
            except ModeError as e:
                return [drop(out, self.name, e.reason, f"drawn mode {drawn}: {e.detail}")]
        modes = [m for m in MODES if shares.get(m, 0) > 0] if self.emit == "all" else list(self.emit)
        copies, failed = [], []
        for m in modes:
            child = copy.deepcopy(row)
            child.update(id=f"{row['id']}@{m}", source_key=f"{row['source_key']}@{m}", parent_id=row["id"],
                         text_tokens=None, visual_tokens=None, tokens=None)
            child["meta"] = json.dumps({**meta, "modes": {**record, "copy": m, "copies": modes}},
                                       sort_keys=True, ensure_ascii=False)
            try:
                copies.append(self._render_one(child, m))
            except ModeError as e:
                failed.append((m, e))
                copies.append(drop(child, self.name, e.reason, f"copy in {m}: {e.detail}"))
        if len(failed) == len(modes):  # nothing to split: the sample leaves with its (first) reason
            m, e = failed[0]
            why = "; ".join(f"{k}: {x.reason} ({x.detail})" for k, x in failed)
            return [drop(row, self.name, e.reason, f"no copy in {', '.join(modes)} can be rendered: {why}"[:1000])]
        drop(row, self.name, "split_into_modes", f"{len(modes)} copies: {', '.join(modes)} (drawn {drawn})")
        return [row] + copies

    def _frame_copies(self, row: dict) -> list[dict]:
        """The rendered video sample dropped as `split_into_frame_counts`, then one derived copy per
        count (a count the video is too short for: a copy dropped as `too_few_frames`)."""
        from reelforge.curation.frame_plan import plan_media_fields

        plans: list[tuple[int, dict[int, dict | TokenError]]] = []
        i = 0
        try:
            for i, m in enumerate(row.get("media") or []):
                if m.get("kind") == "video":
                    plans.append((i, self._plan_video(m)))
        except (MediaReadError, ProbeError) as e:
            return [drop(row, self.name, e.reason, f"media {i}: {e.detail}")]
        except TokenError as e:  # a size or length the processor refuses (aspect_ratio, zero_duration)
            return [drop(row, self.name, e.reason, f"media {i}: {e}")]
        except Exception as e:  # noqa: BLE001 - one bad video never fails the job
            return [drop(row, self.name, "decode_error", f"media {i}: {type(e).__name__}: {e}"[:500])]
        meta = _meta(row)
        copies = []
        for k in self.video_frames:
            child = copy.deepcopy(row)
            child.update(id=f"{row['id']}@f{k}", source_key=f"{row['source_key']}@f{k}", parent_id=row["id"],
                         text_tokens=None, visual_tokens=None, tokens=None)
            child["meta"] = json.dumps({**meta, "video_frames": k}, sort_keys=True, ensure_ascii=False)
            for i, by_count in plans:
                plan = by_count[k]
                if isinstance(plan, TokenError):
                    drop(child, self.name, plan.reason, f"media {i}: {plan}")
                    continue
                child["media"][i].update(plan_media_fields(plan))
            copies.append(child)
        drop(row, self.name, "split_into_frame_counts",
             f"{len(copies)} copies at {', '.join(map(str, self.video_frames))} frames")
        return [row] + copies

    def _plan_video(self, m: dict) -> dict[int, dict | TokenError]:
        """{count: the medium's plan at that count, or the TokenError that refuses it}: the file opened
        once through `containment.open_regular` (a tar member copied to a temp file, as probe does)."""
        from reelforge.curation.media_io import media_path, open_media, stream_media_fd, video_source

        fd = open_media(m)
        try:
            if m.get("offset") is None:
                return self._plans_of(video_source(fd, media_path(m["uri"])))
            suffix = os.path.splitext(m.get("member") or "")[1].lower()
            suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ".mp4"
            with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
                stream_media_fd(fd, m, out=tmp)
                return self._plans_of(tmp.name)
        finally:
            os.close(fd)

    def _plans_of(self, src: str | int) -> dict[int, dict | TokenError]:
        from reelforge.curation.frame_plan import fixed_frame_plans, fixed_nframes
        from reelforge.curation.video import probe_video

        info = probe_video(src, self.video_timeout_s)
        if not info.get("frames") or not info.get("fps"):
            raise TokenError("zero_duration", f"the video has {info.get('frames')} frames at {info.get('fps')} fps")
        out: dict[int, dict | TokenError] = {}
        for k in self.video_frames:
            try:
                fixed_nframes(k, info["frames"], self.plan_cfg)
            except TokenError as e:
                out[k] = e
        fit = [k for k in self.video_frames if k not in out]
        if fit:
            out.update(fixed_frame_plans(src, fit, self.plan_cfg, info=info, timeout_s=self.video_timeout_s))
        return out
