"""The `synth_ocr` step (issue 16, part 4): synthetic OCR samples rendered from the corpus's own text.

From every live sample with text (a document, a caption, an interleaved document without its
placeholders, code in the text or in `meta.code`, a table in `meta.table`) the step renders images
with PIL and asks a question whose answer is exact, because the step drew the text itself:

- `text`: the text, cleaned (control and unassigned characters, the chat format's markers and the characters
  the font cannot draw removed), capped at `max_chars`, wrapped to the image width, one paragraph after another;
- `table`: `meta.table` when present (`{"columns": [...], "rows": [[...]]}`, a list of objects or a list
  of lists whose first row is the header), else a table built from the text: its most frequent words
  with their length and count (`word`, `length`, `count`; the first `table_rows`, by count then word);
- `code`: `meta.code` (its language in `meta.code_language`, else guessed), or the text when it looks like
  code (most lines are code-shaped), syntax-highlighted with pygments' tokens and style, drawn in a
  monospace font.

Questions come from `TEMPLATES` (several phrasings per task, one chosen per image):

- `read_all`: the answer is the rendered lines, joined by newlines;
- `read_region`: 1 to 3 consecutive lines, their box in Keye's box text (mixers/grounding.py:
  `<|box_start|>[[x1,y1,x2,y2]]<|box_end|>`, integers in [0, 1000); `box_style: qwen2vl` writes
  `(x1,y1),(x2,y2)`); the answer is every line whose box's centre lies inside that box, which by
  construction is exactly the chosen lines;
- `extract` (tables): the table as JSON (a list of objects keyed by the header; integer cells as numbers)
  or as a Markdown table (`table_formats`).

Fonts are the machine's, found with fc-match (DejaVu Sans / Noto Sans CJK SC and their monospace faces);
a text with CJK characters (Han, kana, Hangul) is drawn with the CJK face. A missing font is a ValueError
at setup naming the package to install. `languages` (`latin`, `cjk`) says which scripts are rendered.

Each image is a PNG under `<workdir>/media/synth_ocr/`, named from the child's id only. Each child is a
kind `conversation` sample in the non-thinking form (mode `non_thinking`, the user turn `<image>`, the
question and `/no_think`; the assistant turn the answer alone, valid for `mixers.chat.validate_chat`):
`parent_id` the source sample, id `<parent>@synth_ocr_<source>`, and in `meta.task` the step, task, template,
its parameters, the font (family, file, face index, size), the seed, the image size and the layout (each
line's text and pixel box). Everything is drawn from a hash of (seed, parent id, source), never from
global state, so the same seed gives byte-identical PNGs and the same ids on any partitioning.
The parent stays alive (`keep_parent: false` drops it as `split_into_synth_ocr` when it derived any).
A sample that cannot be rendered passes untouched; a failure while rendering drops it with `error`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections import Counter
from dataclasses import fields
from typing import Any

from reelforge.curation.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Media, alive, drop, empty_row, row_meta
from reelforge.curation.step import RowStep, register_step
from reelforge.mixers.chat import NO_THINK
from reelforge.mixers.grounding import STYLES, format_boxes, norm_box

SOURCES = ("text", "table", "code")
TASKS = ("read_all", "read_region", "extract")
LANGUAGES = ("latin", "cjk")
TABLE_FORMATS = ("json", "markdown")

TEMPLATES: dict[str, list[str]] = {
    "read_all": [
        "Read all the text in the image.",
        "What does the text in this image say? Transcribe it exactly.",
        "Transcribe every line of text shown in the image, keeping the line breaks.",
        "Please write out all the text visible in this image.",
        "OCR this image: output its text exactly as it appears, line by line.",
    ],
    "read_all_code": [
        "Transcribe the code in this image exactly, keeping its indentation.",
        "What code is shown in the image? Write it out line by line.",
        "Read the source code in this screenshot and output it verbatim.",
        "Copy the program shown in the image as plain text.",
    ],
    "read_region": [
        "What text is inside the box {box}? Coordinates are normalised to 0-1000.",
        "Read the text in the region {box}; coordinates run from 0 to 1000.",
        "Transcribe the lines of text that lie within {box} (normalised 0-1000 coordinates).",
        "Output the text found in the area {box} (x1, y1, x2, y2 on a 0-1000 scale).",
    ],
    "extract_json": [
        "Extract the table in the image as a JSON list of objects, one per row, keyed by the column headers.",
        "Convert this table to JSON: a list with one object per row, using the header cells as keys.",
        "Read the table and return its rows as JSON objects keyed by column name.",
    ],
    "extract_markdown": [
        "Convert the table in this image to a Markdown table.",
        "Rewrite the table shown in the image in Markdown, header row first.",
        "Transcribe this table as a Markdown table with the same columns and rows.",
    ],
}

# fc-match patterns, first that covers the probe text wins; the package that provides them
FONTS = {
    "latin": (["DejaVu Sans", "Liberation Sans", "sans-serif"], "Ag", "fonts-dejavu-core"),
    "latin_mono": (["DejaVu Sans Mono", "Liberation Mono", "monospace"], "Ag", "fonts-dejavu-core"),
    "cjk": (["Noto Sans CJK SC", "sans-serif:lang=zh-cn"], "中文かな", "fonts-noto-cjk"),
    "cjk_mono": (["Noto Sans Mono CJK SC", "Noto Sans CJK SC", "monospace:lang=zh-cn"], "中文かな", "fonts-noto-cjk"),
}
_FALLBACK_FILES = {  # when fc-match is not installed
    "latin": [("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 0)],
    "latin_mono": [("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf", 0)],
    "cjk": [("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2)],
    "cjk_mono": [("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 7)],
}

_CJK = re.compile(r"[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff"
                  r"\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_WORD = re.compile(r"[^\W\d_](?:[^\W_]|['-](?=\w))*")
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import|#include|return\b|for\b|while\b|if\b|else\b|"
                        r"elif\b|function\b|const |let |var |public |private |static |package |fn |}|\{|#!|//)"
                        r"|[;{}:]\s*$|^\s*\w+(\.\w+)*\s*(=|\+=|-=)\s*\S|\w\(.*\)\s*$")
# what the chat format reads as structure: never drawn (the answer would carry it into the conversation)
_RESERVED = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?(?:think|answer|analysis|code|sandbox_output)>|<image>|<video>")
_MEDIA_KEYS = tuple(f.name for f in fields(Media))
_FONT_CACHE: dict[tuple[str, int, int], Any] = {}
_FOUND: dict[str, tuple[str, int, str]] = {}
_COVER: dict[tuple[str, int], dict[str, bool]] = {}


# -- fonts ------------------------------------------------------------------------------------------------------

def _fc_match(pattern: str) -> tuple[str, int, str] | None:
    exe = shutil.which("fc-match")
    if exe is None:
        return None
    try:
        got = subprocess.run([exe, "-f", "%{file}\t%{index}\t%{family[0]}", pattern], capture_output=True,
                             text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    parts = got.split("\t")
    if len(parts) != 3 or not os.path.isfile(parts[0]):
        return None
    try:
        return parts[0], int(parts[1] or 0), parts[2]
    except ValueError:
        return None


def _load(file: str, index: int, size: int) -> Any:
    from PIL import ImageFont

    key = (file, index, size)
    if key not in _FONT_CACHE:
        _FONT_CACHE[key] = ImageFont.truetype(file, size, index=index, layout_engine=ImageFont.Layout.BASIC)
    return _FONT_CACHE[key]


def covers(file: str, index: int, ch: str) -> bool:
    """Whether the font face draws `ch` with a glyph of its own (not the missing-glyph box)."""
    table = _COVER.setdefault((file, index), {})
    if ch not in table:
        font = _load(file, index, 24)
        if "notdef" not in table:
            m = font.getmask("\U0010fffd")
            table["notdef"] = (m.size, bytes(m))  # type: ignore[assignment]
        m = font.getmask(ch)
        table[ch] = (m.size, bytes(m)) != table["notdef"] and m.getbbox() is not None  # type: ignore[comparison-overlap]
    return table[ch]


def find_font(role: str) -> tuple[str, int, str]:
    """(file, face index, family) of the machine's font for `role` (latin, latin_mono, cjk, cjk_mono);
    a ValueError naming the package to install when there is none."""
    if role in _FOUND:
        return _FOUND[role]
    patterns, probe, package = FONTS[role]
    tried = [m for m in (_fc_match(p) for p in patterns) if m]
    tried += [(f, i, os.path.basename(f)) for f, i in _FALLBACK_FILES[role] if os.path.isfile(f)]
    for file, index, family in tried:
        try:
            if all(covers(file, index, c) for c in probe):
                _FOUND[role] = (file, index, family)
                return _FOUND[role]
        except OSError:
            continue
    script = "CJK" if role.startswith("cjk") else "Latin"
    raise ValueError(f"synth_ocr found no {script} font that draws {probe!r} (fc-match {patterns[0]!r}): install "
                     f"{package} (apt-get install {package}), or leave {script.lower()} out of `languages`")


# -- text ------------------------------------------------------------------------------------------------------

def has_cjk(s: str) -> bool:
    return _CJK.search(s) is not None


def clean_text(s: str, keep_newlines: bool = True) -> str:
    """Control, format, private and unassigned characters removed; tabs as spaces; line ends as \\n; the
    chat format's markers (`<image>`, `<video>`, `<|...|>` tokens, mode tags) removed."""
    while _RESERVED.search(s):
        s = _RESERVED.sub(" ", s)
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    out = []
    for ch in s:
        if ch == "\n":
            out.append("\n" if keep_newlines else " ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"):
            continue
        elif unicodedata.category(ch) == "Zs":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def looks_like_code(s: str) -> bool:
    lines = [ln for ln in s.splitlines() if ln.strip()]
    return len(lines) >= 3 and sum(bool(_CODE_LINE.search(ln)) for ln in lines) >= 0.6 * len(lines)


def _cap(s: str, n: int) -> tuple[str, bool]:
    """`s` cut to at most `n` characters, at a space when one is near the end; (text, was it cut)."""
    if len(s) <= n:
        return s, False
    cut = s[:n]
    sp = max(cut.rfind(" "), cut.rfind("\n"))
    if sp >= 0.8 * n:
        cut = cut[:sp]
    return cut.rstrip(), True


def wrap(text: str, font: Any, width: int) -> list[str]:
    """Lines of at most `width` pixels: at spaces, or between any two characters of a CJK run or an
    overlong word."""
    lines: list[str] = []
    for para in text.split("\n"):
        para = " ".join(para.split())
        if not para:
            continue
        tokens = re.findall(r"\S+|\s+", para)
        line = ""
        for tok in tokens:
            if tok.isspace():
                tok = " "
                if line and font.getlength(line + tok) <= width:
                    line += tok
                elif line:
                    lines.append(line.rstrip())
                    line = ""
                continue
            if font.getlength(line + tok) <= width:
                line += tok
                continue
            if line.strip() and font.getlength(tok) <= width and not has_cjk(tok):
                lines.append(line.rstrip())
                line = tok
                continue
            for ch in tok:  # break inside the token
                if line and font.getlength(line + ch) > width:
                    lines.append(line.rstrip())
                    line = ""
                line += ch
        if line.strip():
            lines.append(line.rstrip())
    return [ln for ln in lines if ln]


# -- the step --------------------------------------------------------------------------------------------------

def _rng(seed: int, *parts: str) -> random.Random:
    h = hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


_meta = row_meta  # the row's meta as a dict (curation.schema)


def _as_int(s: str) -> Any:
    return int(s) if re.fullmatch(r"-?(0|[1-9]\d{0,15})", s) else s


def table_json(columns: list[str], rows: list[list[str]]) -> str:
    return json.dumps([{c: _as_int(v) for c, v in zip(columns, r)} for r in rows], ensure_ascii=False)


def table_markdown(columns: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(esc(c) for c in columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    out += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


@register_step("synth_ocr")
class SynthOCR(RowStep):
    """Renders text, tables and highlighted code onto images and derives OCR question samples (see the
    module's docstring)."""

    batch_rows = 16

    def __init__(self, kinds: list | str | None = None, seed: int = 0, font_size: list | int | None = None,
                 max_chars: int = 800, width: int = 896, languages: list | str | None = None,
                 tasks: list | str | None = None, table_formats: list | str | None = None, table_rows: int = 6,
                 max_lines: int = 40, keep_parent: bool = True, box_style: str = "keye",
                 sample_kinds: list | None = None, sources: list | None = None, **kw: Any):
        super().__init__(**kw)

        def names(v: Any, allowed: tuple[str, ...], field: str) -> list[str]:
            got = list(allowed) if v is None else ([v] if isinstance(v, str) else list(v))
            bad = [x for x in got if x not in allowed]
            if not got or bad or len(set(got)) != len(got):
                raise ValueError(f"`{field}` is a list of distinct names among {', '.join(allowed)}, got {v!r}")
            return got

        self.kinds = names(kinds, SOURCES, "kinds")
        self.languages = names(languages, LANGUAGES, "languages")
        self.tasks = names(tasks, TASKS, "tasks")
        self.table_formats = names(table_formats, TABLE_FORMATS, "table_formats")
        if "table" in self.kinds and "extract" not in self.tasks:
            raise ValueError("`kinds` has table but `tasks` lacks extract (the only table task): add extract to "
                             "`tasks` or remove table from `kinds`")
        if ("text" in self.kinds or "code" in self.kinds) and not {"read_all", "read_region"} & set(self.tasks):
            raise ValueError("`kinds` has text or code but `tasks` has neither read_all nor read_region: add one")
        fs = [16, 28] if font_size is None else ([font_size, font_size] if isinstance(font_size, (int, float))
                                                 else list(font_size))
        if len(fs) != 2 or not all(isinstance(x, (int, float)) for x in fs) or not 8 <= fs[0] <= fs[1] <= 200:
            raise ValueError(f"`font_size` is a size or a [min, max] range in pixels, 8 <= min <= max <= 200, "
                             f"got {font_size!r}")
        self.font_size = [int(fs[0]), int(fs[1])]
        self.seed = int(seed)
        self.max_chars = int(max_chars)
        if not 1 <= self.max_chars <= 20000:
            raise ValueError(f"`max_chars` caps the rendered text: 1 to 20000, got {max_chars!r}")
        self.width = int(width)
        if not 4 * self.font_size[1] <= self.width <= 4096:
            raise ValueError(f"`width` (pixels) is between 4 x the largest font size ({4 * self.font_size[1]}) "
                             f"and 4096, got {width!r}")
        self.table_rows = int(table_rows)
        if not 1 <= self.table_rows <= 50:
            raise ValueError(f"`table_rows` is 1 to 50, got {table_rows!r}")
        self.max_lines = int(max_lines)
        if not 1 <= self.max_lines <= 500:
            raise ValueError(f"`max_lines` is 1 to 500, got {max_lines!r}")
        self.keep_parent = bool(keep_parent)
        if box_style not in STYLES:
            raise ValueError(f"`box_style` is one of {', '.join(STYLES)} (mixers/grounding.py), got {box_style!r}")
        self.box_style = box_style
        self.sample_kinds = list(sample_kinds) if sample_kinds else ["text", "image_text", "video_text",
                                                                      "interleaved"]
        self.sources = list(sources) if sources else None
        self.workdir: str | None = None

    def settings(self) -> dict:
        return {"kinds": self.kinds, "languages": self.languages, "tasks": self.tasks,
                "table_formats": self.table_formats, "font_size": self.font_size, "max_chars": self.max_chars,
                "width": self.width, "table_rows": self.table_rows, "max_lines": self.max_lines,
                "box_style": self.box_style}

    def setup(self, context: Any = None) -> None:
        super().setup(context)
        roles = []
        if "latin" in self.languages:
            roles += ["latin"] + (["latin_mono"] if "code" in self.kinds else [])
        if "cjk" in self.languages:
            roles += ["cjk"] + (["cjk_mono"] if "code" in self.kinds else [])
        if "latin" not in self.languages and "table" in self.kinds:
            roles.append("cjk")
        self.fonts = {r: find_font(r) for r in roles}

    # -- rows --------------------------------------------------------------------------------------------------
    def process(self, batch: list[dict]) -> list[dict]:
        out: list[dict] = []
        for row in batch:
            if not alive(row) or row.get("kind") not in self.sample_kinds or \
                    (self.sources is not None and row.get("source") not in self.sources):
                out.append(row)
                continue
            try:
                children = self.derive(row)
            except Exception as e:  # noqa: BLE001 - one bad sample never fails the job
                out.append(drop(row, self.name, "error", f"{type(e).__name__}: {e}"))
                continue
            if children and not self.keep_parent:
                drop(row, self.name, "split_into_synth_ocr",
                     f"{len(children)} derived: {', '.join(json.loads(c['meta'])['task']['source'] for c in children)}")
            out.append(row)
            out.extend(children)
        return out

    def _script(self, s: str) -> str | None:
        """latin or cjk: the script the text is drawn in, None when that script is not among `languages`."""
        lang = "cjk" if has_cjk(s) else "latin"
        return lang if lang in self.languages else None

    def _usable(self, s: str, role: str) -> str:
        file, index, _ = self.fonts[role]
        return "".join(ch for ch in s if ch in " \n" or covers(file, index, ch))

    def derive(self, row: dict) -> list[dict]:
        meta = _meta(row)
        raw = row.get("text") if isinstance(row.get("text"), str) else ""
        raw = raw[: self.max_chars * 8]  # a bound on the work before cleaning
        raw = raw.replace(IMAGE_PLACEHOLDER, " ").replace(VIDEO_PLACEHOLDER, " ")
        code = meta.get("code") if isinstance(meta.get("code"), str) else None
        code_lang = meta.get("code_language") or meta.get("language")
        if code is None and raw and looks_like_code(raw):
            code, raw = raw, ""
        children = []
        for src in self.kinds:
            rng = _rng(self.seed, str(row["id"]), src)
            if src == "text":
                got = self._text(raw, rng)
            elif src == "table":
                got = self._table(meta.get("table"), raw, rng)
            else:
                got = self._code(code[: self.max_chars * 8] if code else "", code_lang, rng)
            if got is not None:
                children.append(self._child(row, meta, src, rng, *got))
        return children

    # -- the three sources: each returns (image, record, lines, table) or None ---------------------------------
    def _size(self, rng: random.Random) -> int:
        return rng.randint(*self.font_size)

    def _text(self, raw: str, rng: random.Random) -> tuple | None:
        text = clean_text(raw)
        lang = self._script(text)
        if lang is None:
            return None
        text, cut = _cap(self._usable(text, lang), self.max_chars)
        if not text.strip():
            return None
        size = self._size(rng)
        file, index, family = self.fonts[lang]
        font = _load(file, index, size)
        margin = size
        lines = wrap(text, font, self.width - 2 * margin)
        if len(lines) > self.max_lines:
            lines, cut = lines[: self.max_lines], True
        if not lines:
            return None
        img, boxes = _draw_lines([(ln, [(ln, (0, 0, 0))]) for ln in lines], font, self.width, margin, (255, 255, 255))
        rec = {"font": {"family": family, "file": file, "index": index, "size": size}, "language": lang,
               "truncated": cut}
        return img, rec, list(zip(lines, boxes)), None

    def _table(self, given: Any, raw: str, rng: random.Random) -> tuple | None:
        table = _given_table(given) if given is not None else None
        built = table is None
        if built:
            table = self._word_table(clean_text(raw, keep_newlines=False))
        if table is None:
            return None
        columns, rows = table
        lang = self._script(" ".join(columns + [c for r in rows for c in r]))
        if lang is None:
            return None
        columns = [self._usable(c, lang).strip() for c in columns]
        rows = [[self._usable(c, lang).strip() for c in r] for r in rows]
        if not any(columns) or not rows:
            return None
        size = self._size(rng)
        file, index, family = self.fonts[lang]
        font = _load(file, index, size)
        img, boxes, cells = _draw_table(columns, rows, font, size, self.width)
        rec = {"font": {"family": family, "file": file, "index": index, "size": size}, "language": lang,
               "table": {"columns": columns, "rows": rows, "built_from_text": built, "cells": cells}}
        lines = [(" | ".join(r), b) for r, b in zip([columns] + rows, boxes)]
        return img, rec, lines, (columns, rows)

    def _word_table(self, text: str) -> tuple[list[str], list[list[str]]] | None:
        words: list[str] = []
        for w in _WORD.findall(text):
            words += list(w) if has_cjk(w) else [w.lower()]
        counts = Counter(w for w in words if w.strip())
        if len(counts) < 2:
            return None
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.table_rows]
        return ["word", "length", "count"], [[w[:40], str(len(w)), str(n)] for w, n in top]

    def _code(self, code: str, lang_name: Any, rng: random.Random) -> tuple | None:
        from pygments.lexers import TextLexer, get_lexer_by_name, guess_lexer
        from pygments.styles import get_style_by_name
        from pygments.util import ClassNotFound

        code = clean_text(code)
        lines_src = [ln.rstrip() for ln in code.split("\n")]
        while lines_src and not lines_src[0].strip():
            lines_src.pop(0)
        code = "\n".join(lines_src).rstrip()
        lang = self._script(code)
        if lang is None or not code.strip():
            return None
        role = lang + "_mono"
        code, cut = _cap(self._usable(code, role), self.max_chars)
        if not code.strip():
            return None
        try:
            lexer = get_lexer_by_name(str(lang_name)) if lang_name else guess_lexer(code)
        except ClassNotFound:
            lexer = TextLexer()
        lexer.stripnl, lexer.ensurenl = False, False
        style = get_style_by_name("default")
        size = self._size(rng)
        file, index, family = self.fonts[role]
        font = _load(file, index, size)
        margin = size
        avail = self.width - 2 * margin
        # tokens -> coloured runs per source line, then hard-wrapped to the width
        lines: list[tuple[str, list[tuple[str, tuple]]]] = [("", [])]
        for ttype, value in lexer.get_tokens(code):
            colour = _colour(style, ttype)
            for k, piece in enumerate(value.split("\n")):
                if k:
                    lines.append(("", []))
                for ch in piece:
                    text, runs = lines[-1]
                    if text and font.getlength(text + ch) > avail:
                        lines.append(("", []))
                        text, runs = lines[-1]
                    if runs and runs[-1][1] == colour:
                        runs[-1] = (runs[-1][0] + ch, colour)
                    else:
                        runs.append((ch, colour))
                    lines[-1] = (text + ch, runs)
        lines = [(t.rstrip(), r) for t, r in lines]
        while lines and not lines[-1][0]:
            lines.pop()
        if len(lines) > self.max_lines:
            lines, cut = lines[: self.max_lines], True
            while lines and not lines[-1][0]:
                lines.pop()
        if not any(t.strip() for t, _ in lines):
            return None
        bg = _hex(style.background_color) or (255, 255, 255)
        img, boxes = _draw_lines(lines, font, self.width, margin, bg)
        rec = {"font": {"family": family, "file": file, "index": index, "size": size}, "language": lang,
               "truncated": cut, "lexer": lexer.name, "style": "default"}
        return img, rec, [(t, b) for (t, _), b in zip(lines, boxes)], None

    # -- the derived sample ------------------------------------------------------------------------------------
    def _child(self, row: dict, meta: dict, src: str, rng: random.Random, img: Any, rec: dict,
               lines: list[tuple[str, list | None]], table: tuple | None) -> dict:
        W, H = img.size
        if src == "table":
            fmt = rng.choice(self.table_formats)
            tkey, task = f"extract_{fmt}", "extract"
            answer = table_json(*table) if fmt == "json" else table_markdown(*table)  # type: ignore[misc]
            params: dict[str, Any] = {"format": fmt}
        else:
            options = [t for t in ("read_all", "read_region") if t in self.tasks]
            drawn = [(t, b) for t, b in lines if b is not None and t.strip()]
            if not drawn:
                options = [t for t in options if t != "read_all"] or options
            task = rng.choice(options)
            if task == "read_region" and drawn:
                k = rng.randint(1, min(3, len(drawn)))
                i = rng.randint(0, len(drawn) - k)
                box = _region([b for _, b in drawn[i:i + k]], [b for _, b in drawn], W, H)
                if box is None:  # the lines cannot be boxed apart from their neighbours: read all
                    task = "read_all"
            if task == "read_region" and drawn:
                inside = [t for t, b in drawn if _centre_in(b, box, W, H)]
                answer = "\n".join(inside)
                params = {"box": list(box), "lines": [i, i + k - 1], "box_style": self.box_style}
                tkey = "read_region"
            else:
                task = "read_all"
                answer = "\n".join(t for t, _ in lines)
                params = {}
                tkey = "read_all_code" if src == "code" else "read_all"
        template = rng.randrange(len(TEMPLATES[tkey]))
        question = TEMPLATES[tkey][template]
        if task == "read_region":
            question = question.format(box=format_boxes([params["box"]], self.box_style))
        cid = f"{row['id']}@synth_ocr_{src}"
        path, length, digest = self._save(cid, img)
        media = {k: None for k in _MEDIA_KEYS}
        media.update(kind="image", uri=path, length=length, sha256=digest, format="png", width=W, height=H)
        record = {"step": self.name, "task": task, "source": src, "parent": row["id"], "seed": self.seed,
                  "template": tkey, "template_index": template, "question": question, **params, **rec,
                  "image": {"width": W, "height": H},
                  "layout": [{"text": t, "box": list(b) if b is not None else None} for t, b in lines],
                  "step_params": self.settings()}
        child = empty_row()
        child.update(id=cid, kind="conversation", source=row["source"],
                     source_key=f"{row['source_key']}@synth_ocr_{src}", source_location=row["source_location"],
                     parent_id=row["id"], media=[media],
                     mode="non_thinking",
                     messages=[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question} {NO_THINK}"},
                               {"role": "assistant", "content": answer}])
        keep = {k: v for k, v in meta.items() if k not in ("code", "table", "task")}
        child["meta"] = json.dumps({**copy.deepcopy(keep), "task": record}, sort_keys=True, ensure_ascii=False)
        return child

    def _save(self, cid: str, img: Any) -> tuple[str, int, str]:
        root = os.path.join(os.path.realpath(self.workdir or tempfile.gettempdir()), "media", "synth_ocr")
        h = hashlib.sha1(cid.encode()).hexdigest()[:24]
        dest = os.path.join(root, h[:2])
        os.makedirs(dest, exist_ok=True)
        if os.path.realpath(dest) != dest:
            raise OSError(f"{dest} is not a plain folder of the run's work folder")
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False, compress_level=6)
        data = buf.getvalue()
        path = os.path.join(dest, f"{h}.png")
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{h}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path, len(data), hashlib.sha256(data).hexdigest()


# -- drawing ---------------------------------------------------------------------------------------------------

def _hex(s: str | None) -> tuple[int, int, int] | None:
    if not s or not re.fullmatch(r"#?[0-9a-fA-F]{6}", s):
        return None
    s = s.lstrip("#")
    return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)


def _colour(style: Any, ttype: Any) -> tuple[int, int, int]:
    c = _hex(style.style_for_token(ttype).get("color"))
    if c is None:
        return (0, 0, 0)
    # keep the ink dark enough to read on a light page (light greys become darker)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return c if lum <= 140 else tuple(int(v * 140 / lum) for v in c)  # type: ignore[return-value]


def _line_height(font: Any) -> tuple[int, int]:
    ascent, descent = font.getmetrics()
    return ascent + descent, max(4, int(0.45 * (ascent + descent)))


def _draw_lines(lines: list[tuple[str, list[tuple[str, tuple]]]], font: Any, width: int, margin: int,
                bg: tuple) -> tuple[Any, list[tuple[int, int, int, int] | None]]:
    """Each line's coloured runs drawn left to right, one line under the other; (image, each line's ink
    box, None for an empty line)."""
    from PIL import Image, ImageDraw

    lh, gap = _line_height(font)
    height = 2 * margin + len(lines) * lh + max(0, len(lines) - 1) * gap
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, int, int, int] | None] = []
    y = margin
    for text, runs in lines:
        x = float(margin)
        for piece, colour in runs:
            draw.text((x, y), piece, font=font, fill=colour)
            x += font.getlength(piece)
        stripped = text.strip()
        if stripped:
            lead = font.getlength(text[: len(text) - len(text.lstrip())])
            x0, y0, x1, y1 = draw.textbbox((margin + lead, y), stripped, font=font)
            boxes.append((int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1))))
        else:
            boxes.append(None)
        y += lh + gap
    return img, boxes


def _draw_table(columns: list[str], rows: list[list[str]], font: Any, size: int,
                width: int) -> tuple[Any, list[tuple[int, int, int, int]], list[dict]]:
    """A grid with a shaded header row; (image, each row's box, each cell's text and box)."""
    from PIL import Image, ImageDraw

    pad = max(4, size // 2)
    ncol = len(columns)
    grid = [columns] + [(r + [""] * ncol)[:ncol] for r in rows]
    colw = [int(max(font.getlength(r[j]) for r in grid)) + 2 * pad for j in range(ncol)]
    lh, _ = _line_height(font)
    rowh = lh + 2 * pad
    margin = size
    tw = sum(colw)
    W = tw + 2 * margin  # a table image is as wide as its table
    H = 2 * margin + rowh * len(grid)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([margin, margin, margin + tw, margin + rowh], fill=(225, 225, 225))
    boxes, cells = [], []
    for i, r in enumerate(grid):
        y = margin + i * rowh
        x = margin
        for j, cell in enumerate(r):
            draw.text((x + pad, y + pad), cell, font=font, fill=(0, 0, 0))
            cells.append({"row": i, "col": j, "text": cell, "box": [x, y, x + colw[j], y + rowh]})
            x += colw[j]
        boxes.append((margin, y, margin + tw, y + rowh))
    for i in range(len(grid) + 1):
        draw.line([margin, margin + i * rowh, margin + tw, margin + i * rowh], fill=(90, 90, 90), width=1)
    x = margin
    for j in range(ncol + 1):
        draw.line([x, margin, x, margin + rowh * len(grid)], fill=(90, 90, 90), width=1)
        x += colw[j] if j < ncol else 0
    return img, boxes, cells


def _given_table(t: Any) -> tuple[list[str], list[list[str]]] | None:
    """`meta.table` as (columns, rows of strings): {"columns", "rows"}, a list of objects, or a list of
    lists with the header first; at most 12 rows, 6 columns and 40 characters a cell. None when unusable."""
    if isinstance(t, str):
        try:
            t = json.loads(t)
        except ValueError:
            return None
    cols: list | None = None
    rows: list | None = None
    if isinstance(t, dict) and isinstance(t.get("columns"), list) and isinstance(t.get("rows"), list):
        cols, rows = t["columns"], t["rows"]
    elif isinstance(t, list) and t and all(isinstance(r, dict) for r in t):
        cols = list(t[0])
        rows = [[r.get(c, "") for c in cols] for r in t]
    elif isinstance(t, list) and len(t) >= 2 and all(isinstance(r, list) for r in t):
        cols, rows = t[0], t[1:]
    if not cols or not rows or not all(isinstance(r, list) for r in rows):
        return None

    def cell(v: Any) -> str:
        s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        return " ".join(clean_text(s, keep_newlines=False).split())[:40]

    cols = [cell(c) for c in cols[:6]]
    rows = [[cell(v) for v in (list(r) + [""] * len(cols))[: len(cols)]] for r in rows[:12]]
    return cols, rows


def _region(chosen: list, others: list, W: int, H: int) -> list[int] | None:
    """The chosen lines' box, padded by two pixels, normalised to [0, 1000) as grounding.norm_box does;
    None when a line outside the choice would have its centre inside it."""
    pad = 2
    box = norm_box([min(b[0] for b in chosen) - pad, min(b[1] for b in chosen) - pad,
                    max(b[2] for b in chosen) + pad, max(b[3] for b in chosen) + pad], W, H)
    inside = [b for b in others if _centre_in(b, box, W, H)]
    return box if inside == chosen else None


def _centre_in(b: tuple, box: tuple, W: int, H: int) -> bool:
    cx, cy = (b[0] + b[2]) / 2 * 1000 / W, (b[1] + b[3]) / 2 * 1000 / H
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
