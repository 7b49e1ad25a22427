"""The `reward` step: scores each generated response of a prompt sample (`Sample.responses`,
written by the `sample` step) and gives the prompt a pass rate and a difficulty bucket.

For each response the step records, in the sample schema (`curation.schema.Response`):

- `answer`: the answer extracted from the text: the last `<answer>...</answer>`; else, after
  the last `</think>` (an `<analysis>` prefix is skipped), the last `\\boxed{...}`, else the
  final non-empty line (a `<think>` never closed has no answer);
- `rewards`, by name, each in [0, 1]:
  - `correct`: the answer against the reference (1 or 0), by the reference's type: a choice
    letter (A-J), a number (within `rel_tol` / `abs_tol`), yes/no, or a string (`normalised`:
    NFKC, lower case, no punctuation, no a/an/the; or `exact`);
  - `format`: 1 when the prompt and this response, rendered for the response's mode, pass
    `mixers.chat.validate_chat` (the cold-start grammars), else 0;
  - `consistency`: `filters.alignment.format_consistency` (the reasoning's conclusion agrees
    with the answer; a well-formed text without reasoning scores 1, and so does the released
    template's non-thinking form, its empty `<think>` block skipped);
  - `repetition`: 1 - `filters.alignment.repetition_score` (1: no repetition, 0: a loop);
  - `judge` (optional, with `model`): P(yes) of a VLM asked `question` about the response,
    from its next-token logits, as the `vlm_judge` step computes it;
- `reward`: the weighted sum of the rewards named in `weights`;
- `passed`: `rewards[pass_on]` (or the total, `pass_on: total`) >= `pass_threshold`.

The prompt gets `pass_rate` (the share of its responses that passed) and `difficulty`:
`unsolved` at pass rate 0, `solved` at 1, and in between the bucket of `difficulty_names` the
pass rate falls in, cut at `difficulty_edges` (each bucket holds its lower edge).

The reference answer, tried in the order of `reference`: `meta.<key>` (the source's metadata,
default `meta.answer`: a string, a number, a boolean (yes/no) or a list of accepted answers;
`meta.answer_type` may force `choice`, `number`, `yes_no` or `string`), then `last_assistant`
(the conversation's final assistant turn, its answer part taken as a response's is). The
prompt the responses answer is the conversation up to its last user turn. A sample with no
reference leaves with reason `no_reference` (`no_reference: keep` keeps it: no `correct`
reward, `difficulty` is `no_reference`); one with no responses leaves with `no_responses`
(`no_responses: keep` passes it on untouched).

Everything here is plain Python over rows (the engine runs it in Spark like any row step);
the rule functions are public, so tests and other users compute exactly the same numbers.
"""

from __future__ import annotations

import bisect
import math
import re
import unicodedata
from typing import Any

from reelforge.curation.schema import alive, drop
from reelforge.curation.step import RowStep, StepContext, register_step
from reelforge.filters.alignment import format_consistency, repetition_score
from reelforge.filters.vlm_judge import VlmJudge
from reelforge.mixers.chat import MODES, NO_THINK, THINK, to_chat, validate_chat
from reelforge.mixers.modes import _meta

ANSWER_TYPES = ("choice", "number", "yes_no", "string")
RULES = ("correct", "format", "consistency", "repetition")
DEFAULT_WEIGHTS = {"correct": 1.0, "format": 0.25, "consistency": 0.25, "repetition": 0.25, "judge": 0.25}
DEFAULT_QUESTION = ("Question: {question}\nReference answer: {reference}\nResponse: {response}\n"
                    "Is the response correct and well reasoned? Answer yes or no.")
RESERVED_BUCKETS = ("unsolved", "solved", "no_reference")

# -- extracting the answer ----------------------------------------------------------------------

_ANALYSIS = re.compile(r"^\s*<analysis>.*?</analysis>", re.S)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def extract_answer(text: str) -> str:
    """The answer part of a response (see the module's docstring); "" when it has none."""
    t = _ANALYSIS.sub("", text or "", count=1)
    tags = _ANSWER_TAG.findall(t)
    if tags:
        return tags[-1].strip()
    if "</think>" in t:
        t = t.rsplit("</think>", 1)[1]
    elif "<think>" in t:
        return ""  # the reasoning never ended: no answer
    boxed = _BOXED.findall(t)
    if boxed:
        return boxed[-1].strip()
    lines = [ln.strip() for ln in t.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# -- typed answers ---------------------------------------------------------------------------------

_CHOICE_ONLY = re.compile(r"[(\[]?\s*([A-Ja-j])\s*[)\]]?[.:]?")
_CHOICE_LEAD = re.compile(r"[(\[]?([A-J])[)\].:](?=\s|$)")
_CHOICE_SAID = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*[:\s]\s*[(\[]?([A-J])\b")
_CHOICE_BRACKET = re.compile(r"[(\[]([A-J])[)\]]")
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+"
_NUMBER = re.compile(rf"(?<![\w.])([-+]?)({_NUM})(?:\s*/\s*({_NUM}))?")


def choice_of(answer: str) -> str | None:
    """The choice letter an answer gives: the whole answer is a letter (`B`, `(b)`, `B.`), or it
    opens with one (`B. Paris`), or says one (`the answer is (C)`, `option D`: the last such), or
    brackets exactly one (`... (A) ...`); None otherwise."""
    a = answer.replace("*", "").strip()
    m = _CHOICE_ONLY.fullmatch(a) or _CHOICE_LEAD.match(a)
    if m:
        return m.group(1).upper()
    said = _CHOICE_SAID.findall(a)
    if said:
        return said[-1]
    bracketed = set(_CHOICE_BRACKET.findall(a))
    return bracketed.pop() if len(bracketed) == 1 else None


def _number(m: re.Match) -> float:
    x = float(m.group(2).replace(",", ""))
    if m.group(3) is not None:
        d = float(m.group(3).replace(",", ""))
        x = x / d if d else math.nan
    return -x if m.group(1) == "-" else x


def parse_number(s: str) -> float | None:
    """The number a whole string is (`12`, `-3.5`, `1,000`, `1/2`, `2e3`, `$5`, `50%` -> 50); None
    when it is something else."""
    t = s.strip().rstrip(".").strip()
    t = t[1:] if t.startswith("$") else t
    t = t[:-1] if t.endswith("%") else t
    m = _NUMBER.fullmatch(t.strip())
    return _number(m) if m else None


def number_of(answer: str) -> float | None:
    """The last number in an answer (`there are 7` -> 7, `2 + 2 = 4` -> 4), or None."""
    found = list(_NUMBER.finditer(answer))
    return _number(found[-1]) if found else None


def yes_no_of(answer: str) -> str | None:
    """`yes` or `no`: the answer's first word when it is one, else the only one of them it holds."""
    words = re.findall(r"[a-z]+", answer.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


def normalise(s: str) -> str:
    """NFKC, lower case, punctuation as spaces, without the articles a/an/the, one space apart."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(" " if unicodedata.category(c).startswith("P") else c for c in s)
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


def answer_type(reference: str) -> str:
    """The type of a reference answer: `choice` (one capital letter A-J, maybe bracketed), `yes_no`,
    `number` (the whole reference is one), else `string`."""
    r = reference.strip()
    m = _CHOICE_ONLY.fullmatch(r)
    if m and m.group(1).isupper():
        return "choice"
    if r.lower().rstrip(".!") in ("yes", "no"):
        return "yes_no"
    if parse_number(r) is not None:
        return "number"
    return "string"


def _fmt(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) and abs(x) < 1e15 else repr(x)


def typed_answer(answer: str, kind: str) -> str | None:
    """The answer's value as `kind` reads it: a letter, a number (as `_fmt` writes it), yes/no, or
    the answer itself for strings; None when the answer holds no such value."""
    if kind == "choice":
        return choice_of(answer)
    if kind == "number":
        x = number_of(answer)
        return None if x is None else _fmt(x)
    if kind == "yes_no":
        return yes_no_of(answer)
    return answer


def is_correct(answer: str, reference: str, kind: str | None = None, rel_tol: float = 1e-3,
               abs_tol: float = 1e-6, string_match: str = "normalised") -> bool:
    """Whether an extracted answer matches one reference answer of type `kind` (default: by
    `answer_type(reference)`)."""
    kind = kind or answer_type(reference)
    if kind == "choice":
        got, want = choice_of(answer), choice_of(reference)
        return got is not None and got == want
    if kind == "number":
        got, want = number_of(answer), parse_number(reference)
        if want is None:
            want = number_of(reference)
        if got is None or want is None or not (math.isfinite(got) and math.isfinite(want)):
            return False
        return abs(got - want) <= max(abs_tol, rel_tol * abs(want))
    if kind == "yes_no":
        got, want = yes_no_of(answer), yes_no_of(reference)
        return got is not None and got == want
    if string_match == "exact":
        return answer.strip() == reference.strip()
    return normalise(answer) == normalise(reference) and normalise(reference) != ""


# -- format by mode ---------------------------------------------------------------------------------

_EMPTY_THINK = "<think>\n\n</think>\n\n"
_SWITCH = re.compile(r"\s*/(?:no_)?think\s*$")
_SANDBOX = re.compile(r"(<sandbox_output>.*?</sandbox_output>)", re.S)


def infer_mode(text: str) -> str:
    """The mode a response's form claims, for a response and sample without a `mode`."""
    t = (text or "").lstrip()
    if t.startswith("<analysis>"):
        return "auto_think"
    if t.startswith(_EMPTY_THINK):
        return "non_thinking"
    if t.startswith("<think>"):
        return "think_with_image" if "<sandbox_output>" in t else "thinking"
    return "non_thinking"


def prompt_turns(row: dict) -> list[dict]:
    """The conversation the responses answer: the messages up to the last user turn (a trailing
    assistant turn is the reference, not the prompt); a sample without messages asks its text."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in row.get("messages") or []]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    return msgs or [{"role": "user", "content": row.get("text") or ""}]


def _opens_thinking(text: str) -> bool:
    t = _ANALYSIS.sub("", text, count=1).lstrip()
    return t.startswith("<think>") and not t.startswith(_EMPTY_THINK)


def format_errors(prompt: list[dict], text: str, mode: str, duration: float | None = None) -> list[str]:
    """What `mixers.chat.validate_chat` finds wrong with `prompt` + this response in `mode` (an
    empty list: valid). The last user turn gets the mode's switch (/think, /no_think, none for
    auto-think; a video prompt keeps its own, else the one the response's form needs); a
    think-with-image response's `<sandbox_output>...</sandbox_output>` parts become the tool turns."""
    if mode not in MODES:
        return [f"unknown mode {mode!r}"]
    msgs = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if users:
        last = msgs[users[-1]]
        own = last["content"].rstrip()
        switch = {"thinking": THINK, "think_with_image": THINK, "non_thinking": NO_THINK, "auto_think": None}.get(
            mode, THINK if own.endswith(THINK) else NO_THINK if own.endswith(NO_THINK)
            else THINK if _opens_thinking(text) else NO_THINK)
        body = _SWITCH.sub("", last["content"])
        last["content"] = f"{body} {switch}" if switch else body
    if mode == "think_with_image":
        parts = _SANDBOX.split(text)
        turns = [{"role": "assistant" if i % 2 == 0 else "user", "content": p} for i, p in enumerate(parts)]
    else:
        turns = [{"role": "assistant", "content": text}]
    return validate_chat(to_chat(msgs + turns), mode, duration=duration)


# -- the reference -------------------------------------------------------------------------------------

def _as_answer(v: Any) -> str | None:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return _fmt(float(v))
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


def reference_of(row: dict, sources: tuple[str, ...] = ("meta.answer", "last_assistant")) -> list[str] | None:
    """The sample's accepted reference answers from the first source in `sources` that has one
    (`meta.<key>`, `last_assistant`); None when none does."""
    meta = _meta(row)
    for src in sources:
        if src == "last_assistant":
            msgs = row.get("messages") or []
            if msgs and msgs[-1]["role"] == "assistant":
                a = extract_answer(msgs[-1]["content"])
                if a:
                    return [a]
            continue
        v = meta.get(src[len("meta."):])
        vals = [x for x in (_as_answer(y) for y in (v if isinstance(v, list) else [v])) if x is not None]
        if vals:
            return vals
    return None


# -- the rule rewards of one response -----------------------------------------------------------------

def rule_rewards(text: str, references: list[str] | None, mode: str | None = None,
                 prompt: list[dict] | None = None, kind: str | None = None, rel_tol: float = 1e-3,
                 abs_tol: float = 1e-6, string_match: str = "normalised", ngram: int = 4,
                 duration: float | None = None) -> tuple[str, dict[str, float]]:
    """(answer, rewards) of one response: `correct` (absent without references), `format`,
    `consistency`, `repetition`. `prompt` defaults to one plain user turn; `mode` to the one the
    response's form claims; `kind` (the answer type) to each reference's own."""
    span = extract_answer(text)
    rewards: dict[str, float] = {}
    answer = span
    if references:
        hits = [r for r in references if is_correct(span, r, kind, rel_tol, abs_tol, string_match)]
        rewards["correct"] = 1.0 if hits else 0.0
        typed = typed_answer(span, kind or answer_type(hits[0] if hits else references[0]))
        answer = typed if typed is not None else span
    mode = mode or infer_mode(text)
    prompt = prompt if prompt is not None else [{"role": "user", "content": "Answer the question."}]
    rewards["format"] = 0.0 if format_errors(prompt, text, mode, duration) else 1.0
    # the released template's non-thinking form opens with an empty think block: its answer alone is judged
    plain = text[len(_EMPTY_THINK):] if text.startswith(_EMPTY_THINK) else text
    rewards["consistency"] = format_consistency(plain)[0]
    rewards["repetition"] = 1.0 - repetition_score(text, ngram)
    return answer, rewards


def difficulty_of(pass_rate: float, edges: tuple[float, ...] = (0.3, 0.7),
                  names: tuple[str, ...] = ("hard", "medium", "easy")) -> str:
    """`unsolved` at 0, `solved` at 1, else names[i] for edges[i-1] <= pass_rate < edges[i]."""
    if pass_rate <= 0:
        return "unsolved"
    if pass_rate >= 1:
        return "solved"
    return names[bisect.bisect_right(list(edges), pass_rate)]


# -- the step ----------------------------------------------------------------------------------------------

class _RewardJudge(VlmJudge):
    """The optional judge: one yes/no question per response, P(yes) into `rewards["judge"]`, with the
    `vlm_judge` step's P(yes) and the VLM steps' machinery (one model per worker, batches, OOM
    halving, media failures as ledger lines under the reward step's name)."""

    def __init__(self, question: str = DEFAULT_QUESTION, sources: tuple = ("meta.answer", "last_assistant"),
                 **kw: Any):
        super().__init__(question="{text}", **kw)
        self.question, self.sources = question, tuple(sources)

    def prompt(self, row: dict, response: dict) -> str:
        users = [m["content"] for m in prompt_turns(row) if m["role"] == "user"]
        q = _SWITCH.sub("", users[-1] if users else "").replace("<image>", "").replace("<video>", "").strip()
        refs = reference_of(row, self.sources)
        return self.question.format(question=q, response=response["text"], answer=response.get("answer") or "",
                                    reference=" | ".join(refs) if refs else "(none)")

    def prepare(self, rows: list[dict]):
        idx = [i for i, r in enumerate(rows) if alive(r) and r.get("responses")]
        done, failed = self.decode_rows(rows, idx, self._visuals)
        items = [(i, j, self.prompt(rows[i], resp), vis) for i, vis in done
                 for j, resp in enumerate(rows[i]["responses"])]
        return self.encode_batches(items), failed

    def take(self, row: dict, task: int, prompt: str, result: float) -> None:
        resp = row["responses"][task]
        resp["rewards"] = {**(resp.get("rewards") or {}), "judge": float(result)}


@register_step("reward")
class RewardStep(RowStep):
    """Rule rewards (and an optional VLM judge) for every response; pass rate and difficulty per prompt."""

    def __init__(self, reference: list | tuple = ("meta.answer", "last_assistant"), no_reference: str = "drop",
                 no_responses: str = "drop", kinds: list | None = None, weights: dict | None = None,
                 pass_on: str = "correct", pass_threshold: float = 1.0, difficulty_edges: list | tuple = (0.3, 0.7),
                 difficulty_names: list | tuple = ("hard", "medium", "easy"),
                 rel_tol: float = 1e-3, abs_tol: float = 1e-6, string_match: str = "normalised", ngram: int = 4,
                 model: str = "", question: str = DEFAULT_QUESTION, batch_size: int = 8, video_frames: int = 8,
                 device: str = "auto", dtype: str = "auto", yes_words: list | None = None,
                 no_words: list | None = None, **kw: Any):
        super().__init__(**kw)
        if isinstance(reference, str):
            reference = [reference]
        self.sources = tuple(reference)
        for s in self.sources:
            if s != "last_assistant" and not (isinstance(s, str) and s.startswith("meta.") and len(s) > 5):
                raise ValueError(f"`reference` entries are `meta.<key>` or `last_assistant`, got {s!r}")
        for k, v in (("no_reference", no_reference), ("no_responses", no_responses)):
            if v not in ("drop", "keep"):
                raise ValueError(f"`{k}` is `drop` or `keep`, got {v!r}")
        self.no_reference, self.no_responses = no_reference, no_responses
        self.kinds = list(kinds) if kinds else None
        w = DEFAULT_WEIGHTS if weights is None else weights
        if not isinstance(w, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                              and not isinstance(v, bool) for k, v in w.items()):
            raise ValueError("`weights` maps reward names (correct, format, consistency, repetition, judge) "
                             "to numbers")
        self.weights = {k: float(v) for k, v in w.items()}
        if not isinstance(pass_on, str) or not pass_on:
            raise ValueError("`pass_on` names a reward (correct, judge, ...) or `total`")
        self.pass_on, self.pass_threshold = pass_on, float(pass_threshold)
        edges, names = [float(e) for e in difficulty_edges], [str(n) for n in difficulty_names]
        if any(not 0 < e < 1 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError("`difficulty_edges` are increasing pass rates strictly between 0 and 1")
        if len(names) != len(edges) + 1 or len(set(names)) != len(names) or set(names) & set(RESERVED_BUCKETS):
            raise ValueError(f"`difficulty_names` are {len(edges) + 1} distinct names (one more than the edges), "
                             f"none of {', '.join(RESERVED_BUCKETS)}")
        self.edges, self.names = tuple(edges), tuple(names)
        if string_match not in ("normalised", "exact"):
            raise ValueError("`string_match` is `normalised` or `exact`")
        self.rel_tol, self.abs_tol, self.string_match = float(rel_tol), float(abs_tol), string_match
        self.ngram = max(1, int(ngram))
        self._judge: _RewardJudge | None = None
        if model:
            try:
                question.format(question="", response="", answer="", reference="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError("`question` may use only {question}, {response}, {answer} and {reference} "
                                 f"({type(e).__name__}: {e})") from e
            self._judge = _RewardJudge(question=question, sources=self.sources, yes_words=yes_words,
                                       no_words=no_words, model=model, batch_size=batch_size,
                                       video_frames=video_frames, device=device, dtype=dtype, name=self.name)
            self.batch_rows = 64
        elif self.pass_on == "judge":
            raise ValueError("`pass_on: judge` needs the judge: name its `model`")

    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        if self._judge is not None:
            self._judge.setup(context)

    def teardown(self) -> None:
        if self._judge is not None:
            self._judge.teardown()

    def _rules(self, row: dict) -> bool:
        """Rule rewards on every response; False when the row left (or is passed on untouched)."""
        responses = row.get("responses")
        if not responses:
            if self.no_responses == "drop":
                drop(row, self.name, "no_responses", "the sample has no generated responses to score")
            return False
        refs = reference_of(row, self.sources)
        if refs is None and self.no_reference == "drop":
            drop(row, self.name, "no_reference", f"no reference answer in {', '.join(self.sources)}")
            return False
        kind = _meta(row).get("answer_type")
        kind = kind if kind in ANSWER_TYPES else None
        prompt = prompt_turns(row)
        duration = next((m.get("duration") for m in row.get("media") or [] if m["kind"] == "video"), None)
        for resp in responses:
            answer, rewards = rule_rewards(resp.get("text") or "", refs, resp.get("mode") or row.get("mode"), prompt,
                                           kind, self.rel_tol, self.abs_tol, self.string_match, self.ngram,
                                           duration)
            resp["answer"] = answer
            resp["rewards"] = {**(resp.get("rewards") or {}), **rewards}
        row["difficulty"] = None if refs else "no_reference"
        return True

    def _totals(self, row: dict) -> None:
        passed = []
        for resp in row["responses"]:
            rewards = resp["rewards"]
            resp["reward"] = float(sum(w * rewards[k] for k, w in self.weights.items()
                                       if rewards.get(k) is not None))
            v = resp["reward"] if self.pass_on == "total" else rewards.get(self.pass_on)
            resp["passed"] = None if v is None else bool(v >= self.pass_threshold)
            if resp["passed"] is not None:
                passed.append(resp["passed"])
        row["pass_rate"] = sum(passed) / len(passed) if passed else None
        if row.get("difficulty") != "no_reference":
            row["difficulty"] = None if row["pass_rate"] is None else difficulty_of(row["pass_rate"], self.edges,
                                                                                     self.names)

    def process(self, batch: list[dict]) -> list[dict]:
        scored = []
        for row in batch:
            if not alive(row) or (self.kinds is not None and row.get("kind") not in self.kinds):
                continue
            try:
                if self._rules(row):
                    scored.append(row)
            except Exception as e:  # noqa: BLE001 - a bad sample never fails the job
                drop(row, self.name, "error", f"{type(e).__name__}: {e}")
        if self._judge is not None and scored:
            self._judge.compute(scored, self._judge.prepare(scored))
        for row in scored:
            if alive(row):
                try:
                    self._totals(row)
                except Exception as e:  # noqa: BLE001
                    drop(row, self.name, "error", f"{type(e).__name__}: {e}")
        return batch
