"""Keye-VL's release chat format, and a validator of each cold-start mode's grammar.

Samples keep the one schema (`messages` with `<image>`/`<video>` placeholders, `mode`);
`to_chat` renders them as the model sees them:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question} /think<|im_end|>\\n
    <|im_start|>assistant\\n<think>{reasoning}</think><answer>{answer}</answer><|im_end|>\\n

(one `<|image_pad|>` per image here: the loader repeats it to the visual token count).

Grammars of the last assistant turn (earlier turns are plain answers, as Qwen3 keeps history):

- thinking: user ends with `/think`; `<think>R</think><answer>A</answer>` (report, default) or
  `<think>\\nR\\n</think>\\n\\nA` (the released template);
- non_thinking: user ends with `/no_think`; `A` alone (report) or `<think>\\n\\n</think>\\n\\nA` (template);
- auto_think: no switch; `<analysis>W. Therefore, /think mode is more appropriate.</analysis>` then
  the thinking form, or `... /no_think mode ...</analysis>` then the non-thinking form;
- think_with_image: user ends with `/think`; assistant turns alternate with user turns that are
  exactly `<sandbox_output>{image}</sandbox_output>`: the first assistant turn opens `<think>`,
  every non-final one ends with `<code>\\n```python\\n{code}\\n```\\n</code>` (code that parses),
  the final one closes with `</think><answer>A</answer>`;
- video: a user turn holds a video; the answer is the thinking or non-thinking form (matching
  the switch) and cites at least one time as `<|clip_time_start|>S-E<|clip_time_end|>` (seconds).
"""

from __future__ import annotations

import ast
import re

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
THINK, NO_THINK = "/think", "/no_think"
MODES = ("thinking", "non_thinking", "auto_think", "think_with_image", "video")
TIME_START, TIME_END = "<|clip_time_start|>", "<|clip_time_end|>"

_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n", re.S)
_ANALYSIS = re.compile(r"^<analysis>(.+?)\. Therefore, (/think|/no_think) mode is more appropriate\.</analysis>",
                       re.S)
_CODE = re.compile(r"<code>\n```python\n(.*?)\n```\n</code>$", re.S)
_TIME = re.compile(re.escape(TIME_START) + r"(.*?)" + re.escape(TIME_END), re.S)
_TIME_BODY = re.compile(r"^(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?$")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<analysis>", "</analysis>", "<code>", "</code>",
         "<sandbox_output>", "</sandbox_output>")


def to_chat(messages: list[dict], system: str = DEFAULT_SYSTEM) -> str:
    """Schema messages -> the release's chat text (a system turn first)."""
    msgs = list(messages)
    if not msgs or msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return "".join(f"<|im_start|>{m['role']}\n{_vision(m['content'])}<|im_end|>\n" for m in msgs)


def _vision(s: str) -> str:
    return s.replace("<image>", IMAGE).replace("<video>", VIDEO)


def _plain(s: str, where: str) -> list[str]:
    """Errors if s is empty or carries any mode tag."""
    errs = []
    if not s.strip():
        errs.append(f"{where} is empty")
    errs += [f"{where} holds a stray {t}" for t in _TAGS if t in s]
    return errs


def thinking_errors(s: str) -> list[str]:
    m = re.fullmatch(r"<think>(.*?)</think><answer>(.*?)</answer>", s, re.S)
    if m:
        return _plain(m.group(1), "reasoning") + _plain(m.group(2), "answer")
    m = re.fullmatch(r"<think>\n(.*?)\n</think>\n\n(.*)", s, re.S)
    if m:
        return _plain(m.group(1), "reasoning") + _plain(m.group(2), "answer")
    return ["the answer is not <think>R</think><answer>A</answer> (or the template's <think>\\nR\\n</think>\\n\\nA)"]


def non_thinking_errors(s: str) -> list[str]:
    if s.startswith("<think>\n\n</think>\n\n"):
        s = s[len("<think>\n\n</think>\n\n"):]
    return _plain(s, "answer")


def _switch(user: str) -> str | None:
    u = user.rstrip()
    return THINK if u.endswith(THINK) else NO_THINK if u.endswith(NO_THINK) else None


def _times(s: str, duration: float | None) -> list[str]:
    found = _TIME.findall(s)
    if not found:
        return [f"the answer cites no time ({TIME_START}S-E{TIME_END})"]
    errs = []
    for body in found:
        m = _TIME_BODY.match(body.strip())
        if not m:
            errs.append(f"time {body!r} is not seconds S or S-E")
            continue
        a, b = float(m.group(1)), float(m.group(2) or m.group(1))
        if b < a or (duration is not None and b > duration + 1e-6):
            errs.append(f"time {body!r} is outside the video (0-{duration})")
    return errs


def validate_chat(text: str, mode: str, n_images: int | None = None, n_videos: int | None = None,
                  duration: float | None = None) -> list[str]:
    """Everything wrong with a rendered conversation for `mode` (an empty list: valid)."""
    if mode not in MODES:
        return [f"unknown mode {mode!r}"]
    turns = _TURN.findall(text)
    if "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) != text:
        return ["the text is not a sequence of <|im_start|>role\\n...<|im_end|>\\n turns"]
    errs: list[str] = []
    if not turns or turns[0][0] != "system":
        errs.append("the first turn is not the system turn")
    body = turns[1:]
    roles = [r for r, _ in body]
    if len(body) < 2 or roles[-1] != "assistant" or any(r == "system" for r in roles):
        return errs + ["after the system turn the conversation must alternate user/assistant and end with "
                       "the assistant"]
    if any(roles[i] == roles[i + 1] for i in range(len(roles) - 1)) or roles[0] != "user":
        return errs + ["user and assistant turns must alternate, starting with the user"]
    for r, c in body:
        if "<image>" in c or "<video>" in c:
            errs.append("a raw <image>/<video> placeholder was not rendered")
        if r == "user" and "<|vision_start|>" in c.replace(IMAGE, "").replace(VIDEO, ""):
            errs.append("a vision block is malformed")
    imgs = text.count(IMAGE)
    vids = text.count(VIDEO)
    if n_images is not None and imgs != n_images:
        errs.append(f"{imgs} image blocks for {n_images} images")
    if n_videos is not None and vids != n_videos:
        errs.append(f"{vids} video blocks for {n_videos} videos")
    last = body[-1][1]
    if mode == "think_with_image":
        return errs + _agentic_errors(body)
    users = [c for r, c in body if r == "user"]
    for c in users:
        if "<sandbox_output>" in c:
            errs.append("a sandbox output outside think-with-image")
    final_user = users[-1]
    sw = _switch(final_user)
    for c in [c for r, c in body if r == "assistant"][:-1]:
        errs += [f"an earlier answer holds {t}" for t in ("<think>", "<analysis>", "<answer>") if t in c]
    if mode == "thinking":
        errs += [] if sw == THINK else ["the last user turn does not end with /think"]
        errs += thinking_errors(last)
    elif mode == "non_thinking":
        errs += [] if sw == NO_THINK else ["the last user turn does not end with /no_think"]
        errs += non_thinking_errors(last)
    elif mode == "auto_think":
        if sw is not None:
            errs.append("auto-think user turns carry no /think or /no_think switch")
        m = _ANALYSIS.match(last)
        if not m:
            return errs + ["the answer does not open with <analysis>... Therefore, /think (or /no_think) mode "
                           "is more appropriate.</analysis>"]
        errs += _plain(m.group(1), "the analysis")
        rest = last[m.end():]
        errs += thinking_errors(rest) if m.group(2) == THINK else non_thinking_errors(rest)
    elif mode == "video":
        if vids == 0:
            errs.append("a video sample without a video")
        if sw is None:
            errs.append("the last user turn ends with neither /think nor /no_think")
        errs += thinking_errors(last) if sw == THINK else non_thinking_errors(last)
        errs += _times(last, duration)
    return errs


def _agentic_errors(body: list[tuple[str, str]]) -> list[str]:
    errs: list[str] = []
    user0 = body[0][1]
    if IMAGE not in user0:
        errs.append("think-with-image starts from a user turn with an image")
    if _switch(user0) != THINK:
        errs.append("the question does not end with /think")
    assistants = [c for r, c in body if r == "assistant"]
    tools = [c for r, c in body[1:] if r == "user"]
    if len(assistants) < 2:
        errs.append("think-with-image needs at least one code turn and its sandbox output")
    for c in tools:
        if c != f"<sandbox_output>{IMAGE}</sandbox_output>":
            errs.append(f"a tool turn is not <sandbox_output>{{image}}</sandbox_output>: {c[:60]!r}")
    for i, c in enumerate(assistants):
        first, final = i == 0, i == len(assistants) - 1
        s = c
        if first:
            if not s.startswith("<think>"):
                errs.append("the first assistant turn does not open <think>")
                continue
            s = s[len("<think>"):]
        if final:
            m = re.fullmatch(r"(.*?)</think><answer>(.*?)</answer>", s, re.S)
            if not m:
                errs.append("the final assistant turn does not end with </think><answer>A</answer>")
                continue
            errs += _plain(m.group(1), "the last reasoning") + _plain(m.group(2), "answer")
            continue
        m = _CODE.search(s)
        if not m:
            errs.append(f"assistant turn {i} does not end with <code>\\n```python ...```\\n</code>")
            continue
        errs += _plain(s[:m.start()], f"reasoning of turn {i}")
        try:
            ast.parse(m.group(1))
        except SyntaxError as e:
            errs.append(f"the code of turn {i} does not parse: {e.msg}")
    return errs


def validate_sample(row: dict) -> list[str]:
    """A schema row with `mode` set, rendered and checked against its mode's grammar."""
    if not row.get("messages"):
        return ["no messages"]
    media = row.get("media") or []
    dur = next((m.get("duration") for m in media if m["kind"] == "video"), None)
    return validate_chat(to_chat([{"role": m["role"], "content": m["content"]} for m in row["messages"]]),
                         row.get("mode") or "", sum(m["kind"] == "image" for m in media),
                         sum(m["kind"] == "video" for m in media), dur)
