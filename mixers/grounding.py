"""Grounding data: Keye's box text (coordinates normalised to [0, 1000)) and the `grounding` builder
step, which derives grounding Q&A, grounded captions and counting questions from the boxes the `coco`
/ `refcoco` readers (`curation.readers`) keep in `meta.grounding`.

The box text
------------
Keye-VL's LLM is Qwen3 with the Qwen2-VL vision vocabulary; its tokenizer carries Qwen2-VL's grounding
tokens ``<|object_ref_start|>`` ``<|object_ref_end|>`` ``<|box_start|>`` ``<|box_end|>`` (ids
151646-151649 in Qwen2-VL's ``tokenizer_config.json``), and ``<|point_start|>``/``<|point_end|>``
(the release's added tokens, listed in the project's DESIGN card). Sources, and what could not be checked:

- Qwen2-VL's documented form (Qwen-VL README; ms-swift's Qwen2-VL best practice, quoted in
  modelscope/ms-swift issue #2535; QwenLM/Qwen3-VL issues #663 and #189): a phrase as
  ``<|object_ref_start|>the man<|object_ref_end|>`` followed by
  ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, integers normalised to [0, 1000) of the image's width
  and height, one box tag per box.
- Keye-VL's report, as the project's DESIGN card records it: ``<|box_start|>[[x1,y1,x2,y2]]<|box_end|>``,
  integers in [0, 1000), a list of boxes inside one tag.
- The keye-vl-utils packages (1.0.0, 1.5.2, read under .venv/peers/) hold only the vision processor:
  no grounding format. Keye's own tokenizer_config / chat template were not found in the stored
  public material, so which body form its SFT data used is not verified here: `style="keye"` (the
  default, the card's form) and `style="qwen2vl"` write the two forms; `parse_grounded` and
  `grounding_errors` read both.

Normalisation: ``n = min(999, floor(v * 1000 / size))`` (``v`` in pixels, ``size`` the width for x,
the height for y), back as the bin's centre ``(n + 0.5) * size / 1000``: the round trip is off by at
most ``size / 2000`` pixels, so within one pixel for images up to 2000 px on that side (a 4000-px side
cannot do better with 1000 integer steps: half a step is 2 px).

The step
--------
``grounding`` (a row step) turns each live sample whose ``meta.grounding`` has boxes into
conversation children, each asking about the sample's one image (``<image>`` first in the user turn)
in the non-thinking form (the user turn ends with ``/no_think``; the answer alone), checked with
`mixers.chat.validate_chat`:

- ``referring`` (at most ``max_referring`` per image): "Locate <ref>phrase</ref> in the image." ->
  ``<ref>phrase</ref><box>[[...]]</box>``; phrases are a ref's sentences (one drawn by the seed) or,
  for COCO, a category that has exactly one non-crowd box in the image (otherwise the phrase would
  not name one object);
- ``caption`` (one per image): a grounded description listing the objects, each phrase followed by
  its boxes (at most ``max_caption_objects`` boxes, largest first);
- ``counting`` (at most ``max_counting`` per image): "How many <plural>s are there in the image?" ->
  the number of boxes of that category; categories with a crowd box are never asked (a crowd box is
  many objects) and neither are counts above ``max_count``.

Templates, phrases and categories are drawn with ``random.Random`` seeded from sha256(``seed``, the
sample id, the task): the same seed gives the same children whatever the batch or partition.
Children: kind ``conversation``, ``mode`` non_thinking, ``parent_id`` the sample's id, id and
``source_key`` ``<parent>@ground_ref_<k>`` / ``@ground_caption`` / ``@ground_count_<k>``, token
counts reset, and ``meta.grounding_task`` = {task, parent, seed, params, what was drawn}. The parent
leaves as ``split_into_grounding`` (``keep_parent: true`` keeps it); a sample with boxes but no
task it can derive leaves as ``no_grounding_tasks``; samples without ``meta.grounding`` pass untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
from typing import Any

from reelforge.curation.schema import IMAGE_PLACEHOLDER, alive, drop, row_meta
from reelforge.curation.step import RowStep, register_step
from reelforge.mixers.chat import to_chat, validate_chat

NORM = 1000  # coordinates are integers in [0, NORM)
REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
POINT_START, POINT_END = "<|point_start|>", "<|point_end|>"
STYLES = ("keye", "qwen2vl")
TASKS = ("referring", "caption", "counting")


# --- coordinates -------------------------------------------------------------------------------

def to_norm(v: float, size: float) -> int:
    """A pixel coordinate -> an integer in [0, 1000) (its bin of size / 1000 pixels)."""
    if not size > 0:
        raise ValueError(f"the image side must be positive, got {size!r}")
    return min(NORM - 1, max(0, int(math.floor(float(v) * NORM / float(size)))))


def from_norm(n: int, size: float) -> float:
    """An integer in [0, 1000) -> the pixel coordinate at its bin's centre."""
    return (int(n) + 0.5) * float(size) / NORM


def norm_box(box: list[float], width: float, height: float) -> list[int]:
    """[x1, y1, x2, y2] pixels -> [x1, y1, x2, y2] integers in [0, 1000)."""
    x1, y1, x2, y2 = box
    return [to_norm(x1, width), to_norm(y1, height), to_norm(x2, width), to_norm(y2, height)]


def pixel_box(nbox: list[int], width: float, height: float) -> list[float]:
    """[x1, y1, x2, y2] in [0, 1000) -> pixels (bin centres)."""
    x1, y1, x2, y2 = nbox
    return [from_norm(x1, width), from_norm(y1, height), from_norm(x2, width), from_norm(y2, height)]


# --- the tagged text ---------------------------------------------------------------------------

def format_boxes(nboxes: list[list[int]], style: str = "keye") -> str:
    """Boxes (normalised) as box tags: keye `<|box_start|>[[x1,y1,x2,y2],[...]]<|box_end|>` (one tag),
    qwen2vl `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` per box."""
    for b in nboxes:
        if len(b) != 4 or not all(isinstance(v, int) and 0 <= v < NORM for v in b) or b[0] > b[2] or b[1] > b[3]:
            raise ValueError(f"a box is four integers x1 <= x2, y1 <= y2 in [0, {NORM}), got {b!r}")
    if not nboxes:
        raise ValueError("no boxes to format")
    if style == "keye":
        return BOX_START + "[" + ",".join("[" + ",".join(str(v) for v in b) + "]" for b in nboxes) + "]" + BOX_END
    if style == "qwen2vl":
        return "".join(f"{BOX_START}({b[0]},{b[1]}),({b[2]},{b[3]}){BOX_END}" for b in nboxes)
    raise ValueError(f"style is one of {', '.join(STYLES)}, got {style!r}")


def format_ref(phrase: str) -> str:
    """A phrase as an object reference."""
    if not isinstance(phrase, str) or not phrase.strip() or "<|" in phrase or "|>" in phrase:
        raise ValueError(f"a phrase is non-empty text without special tokens, got {phrase!r}")
    return f"{REF_START}{phrase}{REF_END}"


def format_grounded(phrase: str | None, nboxes: list[list[int]], style: str = "keye") -> str:
    """`<ref>phrase</ref><box>...</box>` (the ref left out when phrase is None)."""
    return (format_ref(phrase) if phrase is not None else "") + format_boxes(nboxes, style)


def format_point(npoint: list[int], style: str = "keye") -> str:
    """A normalised [x, y] as `<|point_start|>[[x,y]]<|point_end|>` (keye) or `(x,y)` (qwen2vl)."""
    if len(npoint) != 2 or not all(isinstance(v, int) and 0 <= v < NORM for v in npoint):
        raise ValueError(f"a point is two integers in [0, {NORM}), got {npoint!r}")
    body = f"[[{npoint[0]},{npoint[1]}]]" if style == "keye" else f"({npoint[0]},{npoint[1]})"
    return POINT_START + body + POINT_END


_INT = r"(\d+)"
_KEYE_BOX = re.compile(r"\[" + _INT + r"," + _INT + r"," + _INT + r"," + _INT + r"\]")
_KEYE_BODY = re.compile(r"^\[(?:\[\d+,\d+,\d+,\d+\])(?:,\[\d+,\d+,\d+,\d+\])*\]$")
_QWEN_BODY = re.compile(r"^\(" + _INT + r"," + _INT + r"\),\(" + _INT + r"," + _INT + r"\)$")
_POINT_BODY = re.compile(r"^(?:\[\[" + _INT + r"," + _INT + r"\]\]|\(" + _INT + r"," + _INT + r"\))$")
_TAG = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end|point_start|point_end)\|>")


def _box_body(body: str) -> list[list[int]] | str:
    """The boxes of one box tag's body, or why it is malformed."""
    b = body.replace(" ", "")
    if _KEYE_BODY.match(b):
        boxes = [[int(v) for v in m.groups()] for m in _KEYE_BOX.finditer(b)]
    else:
        m = _QWEN_BODY.match(b)
        if not m:
            return f"box body {body[:60]!r} is neither [[x1,y1,x2,y2],...] nor (x1,y1),(x2,y2)"
        boxes = [[int(v) for v in m.groups()]]
    for bx in boxes:
        if any(v >= NORM for v in bx):
            return f"box {bx} has a coordinate outside [0, {NORM})"
        if bx[0] > bx[2] or bx[1] > bx[3]:
            return f"box {bx} has x1 > x2 or y1 > y2"
    return boxes


def _scan(text: str, ref_needs_box: bool = True) -> tuple[list[dict], list[str]]:
    """The grounded items of a text in order ({"phrase", "boxes"} or {"phrase", "point"}) and the errors;
    `ref_needs_box=False` lets a reference stand alone (a question names an object without its box)."""
    items: list[dict] = []
    errs: list[str] = []
    pending: str | None = None  # a phrase waiting for its boxes
    open_tag: tuple[str, int] | None = None
    for m in _TAG.finditer(text):
        name = m.group(1)
        kind, edge = name.rsplit("_", 1)
        if edge == "start":
            if open_tag is not None:
                errs.append(f"{m.group(0)} opens inside <|{open_tag[0]}_start|>")
                return items, errs
            open_tag = (kind, m.end())
            continue
        if open_tag is None or open_tag[0] != kind:
            errs.append(f"{m.group(0)} closes nothing")
            return items, errs
        body = text[open_tag[1]:m.start()]
        open_tag = None
        if kind == "object_ref":
            if not body.strip():
                errs.append("an empty object reference")
            if pending is not None and ref_needs_box:
                errs.append(f"the reference {pending!r} has no box")
            pending = body
        elif kind == "box":
            got = _box_body(body)
            if isinstance(got, str):
                errs.append(got)
            else:
                items.append({"phrase": pending, "boxes": got})
            pending = None
        else:
            pm = _POINT_BODY.match(body.replace(" ", ""))
            if not pm:
                errs.append(f"point body {body[:40]!r} is neither [[x,y]] nor (x,y)")
            else:
                x, y = [int(v) for v in pm.groups() if v is not None]
                if x >= NORM or y >= NORM:
                    errs.append(f"point ({x},{y}) has a coordinate outside [0, {NORM})")
                else:
                    items.append({"phrase": pending, "point": [x, y]})
            pending = None
    if open_tag is not None:
        errs.append(f"<|{open_tag[0]}_start|> is never closed")
    if pending is not None and ref_needs_box:
        errs.append(f"the reference {pending!r} has no box")
    return items, errs


def parse_grounded(text: str) -> list[dict]:
    """The grounded items of a text: [{"phrase": str | None, "boxes": [[x1, y1, x2, y2], ...]}] (points
    as {"phrase", "point": [x, y]}), in order; ValueError naming the first problem when malformed."""
    items, errs = _scan(text)
    if errs:
        raise ValueError(errs[0])
    return items


def grounding_errors(text: str, need_box: bool = False, ref_needs_box: bool = True) -> list[str]:
    """Everything wrong with the grounding tags of a text (an empty list: valid): unbalanced or nested
    tags, a reference without its box (unless `ref_needs_box` is False, as in a question), a body that is
    neither form, a coordinate outside [0, 1000), x1 > x2 or y1 > y2; with `need_box`, a text without
    any box."""
    items, errs = _scan(text, ref_needs_box)
    if need_box and not errs and not any("boxes" in it for it in items):
        errs.append("the text holds no box")
    return errs


# --- the builder step --------------------------------------------------------------------------

REF_TEMPLATES = ("Locate {ref} in the image.", "Where is {ref} in the image? Give its bounding box.",
                 "Find {ref} and output its bounding box.", "Give the bounding box of {ref}.")
CAPTION_TEMPLATES = ("Describe the image and give the bounding box of each object you mention.",
                     "Write a grounded description of the image: every object with its box.",
                     "List the objects in the image with their locations.")
COUNT_TEMPLATES = ("How many {plural} are there in the image?", "Count the {plural} in the image.",
                   "How many {plural} can you see?")
_IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
              "sheep": "sheep", "fish": "fish", "deer": "deer", "foot": "feet", "tooth": "teeth",
              "knife": "knives", "leaf": "leaves", "scissors": "scissors", "skis": "skis", "glasses": "glasses"}


def plural(noun: str) -> str:
    """An English plural of a category name (the last word is inflected)."""
    head, _, last = noun.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR:
        p = _IRREGULAR[low]
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        p = last + "es"
    elif low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def _rng(seed: int, row_id: str, task: str) -> random.Random:
    h = hashlib.sha256(f"grounding\0{int(seed)}\0{row_id}\0{task}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


_meta = row_meta  # the row's meta as a dict (curation.schema)


def _label(b: dict) -> str | None:
    return b.get("category") or b.get("phrase")


@register_step("grounding")
class GroundingStep(RowStep):
    """Derives grounding Q&A, grounded captions and counting questions (see the module's docstring)."""

    def __init__(self, tasks: list | str | None = None, seed: int = 0, max_referring: int = 2,
                 max_counting: int = 2, max_caption_objects: int = 10, max_count: int = 20, style: str = "keye",
                 keep_parent: bool = False, **kw: Any):
        super().__init__(**kw)
        names = list(TASKS) if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
        if not names or any(t not in TASKS for t in names) or len(set(names)) != len(names):
            raise ValueError(f"`grounding.tasks` are distinct names among {', '.join(TASKS)}, got {tasks!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`grounding.seed` must be an integer, got {seed!r}")
        for name, v in (("max_referring", max_referring), ("max_counting", max_counting),
                        ("max_caption_objects", max_caption_objects), ("max_count", max_count)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`grounding.{name}` must be a positive integer, got {v!r}")
        if style not in STYLES:
            raise ValueError(f"`grounding.style` is keye ([[x1,y1,x2,y2]]) or qwen2vl ((x1,y1),(x2,y2)), got {style!r}")
        if not isinstance(keep_parent, bool):
            raise ValueError(f"`grounding.keep_parent` must be true or false, got {keep_parent!r}")
        self.tasks, self.seed, self.style, self.keep_parent = names, seed, style, keep_parent
        self.max_referring, self.max_counting = max_referring, max_counting
        self.max_caption_objects, self.max_count = max_caption_objects, max_count

    def task_params(self, task: str) -> dict:
        """The step's parameters a task used (recorded in each child's meta)."""
        p: dict[str, Any] = {"style": self.style}
        p.update({"referring": {"max_referring": self.max_referring},
                  "caption": {"max_caption_objects": self.max_caption_objects},
                  "counting": {"max_counting": self.max_counting, "max_count": self.max_count}}[task])
        return p

    def process(self, batch: list[dict]) -> list[dict]:
        out: list[dict] = []
        for row in batch:
            g = _meta(row).get("grounding") if alive(row) else None
            if not isinstance(g, dict):
                out.append(row)
                continue
            try:
                children, why = self.derive(row, g)
            except Exception as e:  # noqa: BLE001 - a bad sample never fails the job
                out.append(drop(row, self.name, "error", f"{type(e).__name__}: {e}"))
                continue
            if not children:
                drop(row, self.name, "no_grounding_tasks", why or "no task could be derived")
            elif not self.keep_parent:
                tasks = {}
                for c in children:
                    t = json.loads(c["meta"])["grounding_task"]["task"]
                    tasks[t] = tasks.get(t, 0) + 1
                drop(row, self.name, "split_into_grounding",
                     f"{len(children)} derived: " + ", ".join(f"{k} {v}" for k, v in tasks.items()))
            out.append(row)
            out.extend(children)
        return out

    # -- deriving -----------------------------------------------------------------------------------------
    def _size(self, row: dict, g: dict) -> tuple[float, float] | None:
        w, h = g.get("width"), g.get("height")
        media = row.get("media") or []
        if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0) and media:
            w, h = media[0].get("width"), media[0].get("height")
        return (float(w), float(h)) if w and h and w > 0 and h > 0 else None

    def derive(self, row: dict, g: dict) -> tuple[list[dict], str]:
        """(the children of `row`, why there are none when there are none)."""
        media = row.get("media") or []
        if len(media) != 1 or media[0].get("kind") != "image":
            return [], f"grounding needs exactly one image, the sample has {len(media)} media"
        size = self._size(row, g)
        if size is None:
            return [], "no image width and height (meta.grounding or probe)"
        boxes = []
        for b in g.get("boxes") or []:
            if not isinstance(b, dict) or not isinstance(b.get("box"), list) or len(b["box"]) != 4:
                continue
            try:
                nb = norm_box(b["box"], *size)
            except (TypeError, ValueError):
                continue
            if nb[0] <= nb[2] and nb[1] <= nb[3]:
                boxes.append({**b, "nbox": nb})
        if not boxes:
            return [], "no usable box in meta.grounding"
        children: list[dict] = []
        why = []
        for task in self.tasks:
            got = getattr(self, f"_{task}")(row, boxes)
            if isinstance(got, str):
                why.append(f"{task}: {got}")
            else:
                children += got
        return children, "; ".join(why)

    def _child(self, row: dict, suffix: str, task: str, question: str, answer: str, record: dict) -> dict | None:
        msgs = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question} /no_think"},
                {"role": "assistant", "content": answer}]
        if validate_chat(to_chat(msgs), "non_thinking", n_images=1, n_videos=0) or \
                grounding_errors(question, ref_needs_box=False) or grounding_errors(answer):
            return None
        child = copy.deepcopy(row)
        child.update(id=f"{row['id']}@{suffix}", source_key=f"{row['source_key']}@{suffix}", parent_id=row["id"],
                     kind="conversation", text=None, messages=msgs, mode="non_thinking", chosen=None, rejected=None,
                     responses=None, captions=None, text_tokens=None, visual_tokens=None, tokens=None)
        meta = _meta(row)
        meta["grounding_task"] = {"task": task, "parent": row["id"], "seed": self.seed,
                                  "params": self.task_params(task), **record}
        child["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
        return child

    def _referring(self, row: dict, boxes: list[dict]) -> list[dict] | str:
        rng = _rng(self.seed, row["id"], "referring")
        counts: dict[str, int] = {}
        crowd: set = set()
        for b in boxes:
            counts[_label(b)] = counts.get(_label(b), 0) + 1
            if b.get("crowd"):
                crowd.add(_label(b))
        cands = []
        for j, b in enumerate(boxes):
            phrases = [p for p in (b.get("phrases") or ([b["phrase"]] if b.get("phrase") else [])) if p]
            if phrases:
                cands.append((j, phrases))
            elif b.get("category") and counts[b["category"]] == 1 and b["category"] not in crowd:
                cands.append((j, [b["category"]]))  # a category names one object only when it is alone
        if not cands:
            return "no box has a phrase or a category that names only it"
        picked = sorted(rng.sample(range(len(cands)), min(self.max_referring, len(cands))))
        out = []
        for k, c in enumerate(picked):
            j, phrases = cands[c]
            pi = rng.randrange(len(phrases))
            ti = rng.randrange(len(REF_TEMPLATES))
            phrase = phrases[pi]
            try:
                q = REF_TEMPLATES[ti].format(ref=format_ref(phrase))
                a = format_grounded(phrase, [boxes[j]["nbox"]], self.style)
            except ValueError:
                continue
            child = self._child(row, f"ground_ref_{k}", "referring", q, a,
                                {"box": j, "phrase": phrase, "phrase_index": pi, "template": ti})
            if child is not None:
                out.append(child)
        return out or "no referring question passed the chat check"

    def _caption(self, row: dict, boxes: list[dict]) -> list[dict] | str:
        rng = _rng(self.seed, row["id"], "caption")
        area = [(b["box"][2] - b["box"][0]) * (b["box"][3] - b["box"][1]) for b in boxes]
        keep = sorted(sorted(range(len(boxes)), key=lambda j: (-area[j], j))[:self.max_caption_objects])
        groups: dict[str, list[int]] = {}
        for j in keep:
            lab = _label(boxes[j])
            if lab:
                groups.setdefault(lab, []).append(j)
        if not groups:
            return "no box has a phrase or category"
        parts = []
        try:  # one object: <ref>dog</ref><box>; several of a category: "2 <ref>dogs</ref><box>[[..],[..]]"
            for lab, js in groups.items():
                text = format_grounded(lab if len(js) == 1 else plural(lab), [boxes[j]["nbox"] for j in js],
                                       self.style)
                parts.append(text if len(js) == 1 else f"{len(js)} {text}")
        except ValueError as e:
            return f"a phrase cannot be tagged: {e}"
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        ti = rng.randrange(len(CAPTION_TEMPLATES))
        answer = f"The image shows {body}."
        child = self._child(row, "ground_caption", "caption", CAPTION_TEMPLATES[ti], answer,
                            {"boxes": keep, "template": ti, "of": len(boxes)})
        return [child] if child is not None else "the grounded caption did not pass the chat check"

    def _counting(self, row: dict, boxes: list[dict]) -> list[dict] | str:
        rng = _rng(self.seed, row["id"], "counting")
        counts: dict[str, int] = {}
        crowd: set = set()
        for b in boxes:
            cat = b.get("category")
            if not cat or b.get("phrase"):  # counting asks about categories (COCO), not referring phrases
                continue
            counts[cat] = counts.get(cat, 0) + 1
            if b.get("crowd"):
                crowd.add(cat)
        cats = [c for c in counts if c not in crowd and counts[c] <= self.max_count and "<|" not in c]
        if not cats:
            return "no category with a countable number of boxes (crowd boxes and counts above max_count are not asked)"
        picked = sorted(rng.sample(range(len(cats)), min(self.max_counting, len(cats))))
        out = []
        for k, c in enumerate(picked):
            cat = cats[c]
            ti = rng.randrange(len(COUNT_TEMPLATES))
            q = COUNT_TEMPLATES[ti].format(plural=plural(cat))
            child = self._child(row, f"ground_count_{k}", "counting", q, str(counts[cat]),
                                {"category": cat, "count": counts[cat], "template": ti})
            if child is not None:
                out.append(child)
        return out or "no counting question passed the chat check"
