"""Text quality: Gopher and C4 heuristics plus language id, one recipe step (`text_quality`).

What it follows (read, not copied): DataTrove's `GopherQualityFilter`,
`GopherRepetitionFilter` and `C4QualityFilter` (huggingface/datatrove,
`src/datatrove/pipeline/filters/{gopher_quality_filter,gopher_repetition_filter,c4_filters}.py`),
which implement the rules of Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", appendix A (Table A1), and of Raffel et al. 2020, "Exploring
the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (C4), section 2.2;
and DataTrove's `LanguageFilter` (keep if a wanted language scores above 0.65). Every
threshold below is a recipe field whose default is DataTrove's; a falsy threshold (0, false,
an empty mapping) switches its rule off, as it does in DataTrove.

Rules, in the order they are checked (the first that fails names the ledger reason); each line
is `reason: fails when ... [field (DataTrove's default)]`:

- lang_mismatch: no wanted language reaches the score and the best one is not wanted
  [languages ([en]), min_lang_score (0.65)]
- lang_low_score: the same, but the best language is a wanted one (or `languages` is null)
- gopher_dup_para: duplicated paragraphs / paragraphs > [dup_para_frac (0.3)]
- gopher_dup_para_chars: chars in duplicated paragraphs / chars > [dup_para_char_frac (0.2)]
- gopher_dup_line: duplicated lines / lines > [dup_line_frac (0.3)]
- gopher_dup_line_chars: chars in duplicated lines / chars > [dup_line_char_frac (0.2)]
- gopher_top_ngram: chars of the most frequent n-gram (seen twice or more) / chars > its n's
  limit [top_n_grams ({2: 0.2, 3: 0.18, 4: 0.16})]
- gopher_dup_ngram: chars in repeated n-grams / chars > its n's limit
  [dup_n_grams ({5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})]
- gopher_short / gopher_long: words (symbol-only tokens not counted) < / >
  [min_doc_words (50), max_doc_words (100000)]
- gopher_word_len: mean word length outside [min_avg_word_length (3), max_avg_word_length (10)]
- gopher_symbol_ratio: '#' per token, or '...'/'…' per token, > [max_symbol_word_ratio (0.1)]
- gopher_bullets: lines starting with '•' or '-' / lines > [max_bullet_lines_ratio (0.9)]
- gopher_ellipsis_lines: lines ending with '...' or '…' / lines > [max_ellipsis_lines_ratio (0.3)]
- gopher_alpha: tokens with an alphabetic char / tokens < [min_alpha_words_ratio (0.8)]
- gopher_stop_words: distinct stop words present < [min_stop_words (2), stop_words (the be to
  of and that have with)]
- c4_lorem_ipsum: a kept line says "lorem ipsum" [filter_lorem_ipsum (true)]
- c4_curly_bracket: a kept line holds '{' [filter_curly_bracket (true)]
- c4_sentences: sentences in kept lines < [min_num_sentences (5)]

C4's line rules decide which lines count (a line is kept when it ends in . ? ! " ' but not in
'...', has at least `min_words_per_line` (3) words, no word longer than `max_word_length`
(1000), and does not mention javascript or a cookie/terms-of-use policy; `[1]`-style citations
are removed first); as in DataTrove, lorem ipsum and curly brackets are looked for in kept lines
only. Unlike DataTrove's C4 filter, the step never rewrites the text: it only counts.

Where this differs from DataTrove, on purpose: words come from one regular expression that
splits like spaCy's English tokenizer (punctuation is a token of its own, URLs and e-mail
addresses stay whole) instead of spaCy itself (about 10x faster; the agreement is measured by
`benchmarks/bench_text_quality.py`); stop words match case-insensitively; a top n-gram that
occurs once is not a repetition (DataTrove counts it, which fails any text of a dozen words);
repeated n-grams are compared as word tuples rather than as words glued without spaces;
sentences are counted on those words with the sentencizer's rule, not by spaCy itself.

Language: py3langid (langid.py's model, bundled in the wheel, with probabilities calibrated by
text length) on the first `lang_max_chars` characters. `meta["lang"]` and `meta["lang_score"]`
get the best language and its probability.

Profiles. The thresholds above are the `text` profile, for documents (`text`, `interleaved`).
Captions (`image_text`, `video_text`: the sample's `text`, else its latest recaption) use the
`caption` profile; conversations are judged answer by answer (each assistant turn, and a
preference pair's `chosen` answer; the sample fails if one answer fails and scores as its
weakest answer) with the `chat` profile: both are the text profile with the overrides in
`CAPTION_DEFAULTS` / `CHAT_DEFAULTS` (short texts: a caption needs 3 words, an answer 1; no
sentence count; stop words not required; no top-n-gram rule; punctuation tokens weigh more in
a short text, so the alphabetic share is 0.5; under `stats_min_words` (5) words the language,
mean word length and alphabetic share are not judged, so "2" is a fine answer; code in
answers keeps its curly brackets). The recipe changes
them with `caption: {...}` and `chat: {...}`, and which kinds are scored, and by which profile,
with `profiles: {kind: profile or null}`. A sample with no text to score is left untouched.

Score. Each rule that runs gives a margin in [0, 1]: 0 at its threshold (or beyond it) and 1
comfortably inside (an upper bound t: 1 - v/t; a lower bound t on a share or probability:
(v - t)/(1 - t); a lower bound t on a count: (v - t)/t, capped at 1; the word-length range:
the smaller of its two sides). Then

    quality = 0.5 + 0.5 * mean(margins)       when every rule passes   (in [0.5, 1])
    quality = 0.5 * passed / rules            when any rule fails      (in [0, 0.5))

so `quality >= 0.5` exactly when the text passes every rule (a mixture's `min_scores:
{quality: 0.5}` selects what this step would keep), and among passing texts the score ranks by headroom.
It is written with `set_score(row, "quality", ...)`. `mode: filter` (the default) drops
failing samples with the first failing rule as the reason and a detail naming the measured
value, the field and its threshold; `mode: score_only` scores and keeps everything.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple, Optional

from reelforge.curation.schema import drop, set_score
from reelforge.curation.step import RowStep, register_step

MODES = ("filter", "score_only")
PROFILES = ("text", "caption", "chat")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")  # Gopher's list, as DataTrove's
DEFAULT_PROFILES = {"text": "text", "interleaved": "text", "image_text": "caption", "video_text": "caption",
                    "conversation": "chat", "preference": "chat"}

# Words as spaCy's English tokenizer splits them (what DataTrove counts words with), without
# spaCy: a whitespace chunk loses its leading and trailing punctuation one token at a time
# (brackets, quotes, commas, a full stop after a lower-case letter or digit, 's and n't), then
# splits at infixes (hyphens between letters, '/' ':' '=' before a letter, ellipses); URLs,
# e-mail addresses, initials (U.S., e.g.) and a few abbreviations stay whole.
_PUNCT_LIST = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_QUOTES = "'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉"
_PREFIX_CHARS = frozenset(_PUNCT_LIST + _QUOTES + "§%=≈$£€¥")
_SUFFIX_CHARS = frozenset(_PUNCT_LIST + _QUOTES + "—–")
_FAST_SUFFIX = frozenset(".,;:!?)\"'")
_URL = re.compile(r"(?:(?:https?|ftp)://|www\.)\S+|[\w.+-]+@\w[\w-]*(?:\.[\w-]+)+")
_INITIALS = re.compile(r"(?:[^\W\d_]\.)+")
_EXCEPTIONS = frozenset({"e.g.", "i.e.", "etc.", "vs.", "viz.", "cf.", "approx.", "Inc.", "Ltd.", "Co.", "Corp.",
                         "Mr.", "Mrs.", "Ms.", "Dr.", "Prof.", "St.", "Jr.", "Sr.", "Mt.", "No.", "and/or", "a.m.",
                         "p.m.", "Jan.", "Feb.", "Mar.", "Apr.", "Jun.", "Jul.", "Aug.", "Sep.", "Sept.", "Oct.",
                         "Nov.", "Dec.", "..", "...."})
_CONTRACTION = re.compile(r"(?i)(?<=.)(?:n['’]t|['’](?:s|re|ve|ll|d|m))$")
_INFIX = re.compile(r"\.\.\.+|…|(?<=[^\W\d_])(?:---|--|-|–|—|~)(?=[^\W\d_])|(?<=[0-9])[+\-*^](?=[0-9-])"
                    r"|(?<=[a-z])\.(?=[A-Z])|(?<=[^\W\d_]),(?=[^\W\d_])|(?<=[^\W_])[:<>=/](?=[^\W\d_])")
_PARAGRAPH = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
# spaCy's sentencizer: a sentence starts at the first word after one of these tokens
_SENTENCE_PUNCT = frozenset({".", "!", "?", "。", "！", "？", "؟", "۔", "։", "।", "॥", "‼", "⁇", "⁈", "⁉", "﹒", "﹗",
                             "．"})
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# markup that is not prose: media placeholders, chat special tokens and reasoning tags
_MARKUP = re.compile(r"<image>|<video>|<\|[a-z_]+\|>|</?(?:think|answer|analysis|sandbox_output|tool_call|"
                     r"tool_response|code)>")


@dataclass
class Profile:
    """The thresholds of one profile; defaults are DataTrove's (a falsy value turns a rule off)."""

    # GopherQualityFilter
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: tuple = STOP_WORDS
    # GopherRepetitionFilter
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: dict = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_n_grams: dict = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    # C4QualityFilter
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_no_terminal_punct: bool = True
    remove_citations: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    # LanguageFilter
    min_lang_score: float = 0.65
    # ours: a text with fewer words skips the rules that need a sample of words to mean anything
    # (language, mean word length, alphabetic share): "2" or "B" is a fine answer
    stats_min_words: int = 0


FIELDS = tuple(f.name for f in dataclasses.fields(Profile))
# Short texts (ours, not DataTrove's): captions need 3 words, answers 1; a handful of words has no
# stop words or sentence count to speak of; punctuation tokens weigh more; a phrase may recur
# in a 15-word caption or across the turns of one conversation without being spam (repeated
# n-grams, lines and paragraphs still count; the `repetition` step catches looping answers);
# under 5 words, language id and word statistics say little ("2", "B", "a red cat" are fine);
# answers may hold code.
_SHORT = {"min_avg_word_length": 2, "min_stop_words": 0, "min_alpha_words_ratio": 0.5, "min_num_sentences": 0,
          "top_n_grams": {}, "min_lang_score": 0.5, "stats_min_words": 5}
CAPTION_DEFAULTS = {**_SHORT, "min_doc_words": 3, "max_doc_words": 1000}
CHAT_DEFAULTS = {**_SHORT, "min_doc_words": 1, "filter_curly_bracket": False}


def make_profile(overrides: Optional[dict] = None, base: Optional[dict] = None, where: str = "") -> Profile:
    """A Profile from DataTrove's defaults, then `base`, then `overrides`; checks every value."""
    values: dict[str, Any] = {}
    for src in (base or {}, overrides or {}):
        if not isinstance(src, dict):
            raise ValueError(f"`{where}` must be a mapping of thresholds, got {src!r}")
        for k, v in src.items():
            if k not in FIELDS:
                raise ValueError(f"`{where + '.' if where else ''}{k}` is not a text_quality threshold: use one of "
                                 f"{', '.join(FIELDS)}")
            values[k] = v
    p = Profile(**values)
    for f in dataclasses.fields(Profile):
        v = getattr(p, f.name)
        label = f"`{where + '.' if where else ''}{f.name}`"
        if f.name == "stop_words":
            if isinstance(v, str) or not all(isinstance(w, str) for w in (v or ())):
                raise ValueError(f"{label} must be a list of words, got {v!r}")
            p.stop_words = tuple(w.lower() for w in (v or ()))
        elif f.name in ("top_n_grams", "dup_n_grams"):
            if v in (None, False):
                v = {}
            if not isinstance(v, dict) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 and _is_number(t) and t >= 0
                    for n, t in v.items()):
                raise ValueError(f"{label} must map n-gram sizes to fractions, e.g. {{2: 0.2}}, got {v!r}")
            setattr(p, f.name, {int(n): float(t) for n, t in sorted(v.items())})
        elif f.type in ("bool", bool):
            if not isinstance(v, bool):
                raise ValueError(f"{label} must be true or false, got {v!r}")
        else:
            if v is None:
                v = 0
            if not _is_number(v) or v < 0:
                raise ValueError(f"{label} must be a number >= 0 (0 turns the rule off), got {v!r}")
            setattr(p, f.name, v)
    for k in ("min_alpha_words_ratio", "min_lang_score"):
        if getattr(p, k) > 1:
            raise ValueError(f"`{where + '.' if where else ''}{k}` is a share: it must lie in [0, 1]")
    return p


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- measuring ------------------------------------------------------------------------------

_SYMBOL_CHARS: dict[str, bool] = {}


def _symbol_char(c: str) -> bool:
    s = _SYMBOL_CHARS.get(c)
    if s is None:
        s = _SYMBOL_CHARS[c] = unicodedata.category(c)[0] in "PSCZ"
    return s


def _is_symbol_word(w: str) -> bool:
    """A token of punctuation and symbols only (DataTrove: every char in its PUNCTUATION set)."""
    for c in w:
        if not _symbol_char(c):
            return False
    return True


def words_of(text: str) -> list[str]:
    """The tokens the word rules count: spaCy-like English words and punctuation (see `_INFIX`)."""
    out: list[str] = []
    for chunk in text.split():
        if chunk.isalpha():
            out.append(chunk)
        elif len(chunk) > 1 and chunk[-1] in _FAST_SUFFIX and chunk[:-1].isalpha() and chunk[-2].islower():
            out.append(chunk[:-1])
            out.append(chunk[-1])
        else:
            _split_chunk(chunk, out)
    return out


def _split_chunk(chunk: str, out: list[str]) -> None:
    i, j = 0, len(chunk)
    while j - i > 1:  # prefixes
        if chunk.startswith("...", i) and j - i > 3:
            out.append("...")
            i += 3
            continue
        c = chunk[i]
        if c in _PREFIX_CHARS or (c == "+" and not chunk[i + 1].isdigit()):
            out.append(c)
            i += 1
            continue
        break
    suffixes: list[str] = []
    while j - i > 1:
        core = chunk[i:j]
        c = chunk[j - 1]
        if core in _EXCEPTIONS or _INITIALS.fullmatch(core) or (
                c not in _SUFFIX_CHARS and c != "." and _URL.fullmatch(core)):
            break
        if core.endswith("...") and j - i > 3:
            suffixes.append("...")
            j -= 3
        elif c in _SUFFIX_CHARS:
            suffixes.append(c)
            j -= 1
        elif c == "." and chunk[j - 2] != "." and (not chunk[j - 2].isupper()
                                                    or (j - i > 2 and chunk[j - 3].isupper())):
            suffixes.append(c)
            j -= 1
        elif c == "+" and chunk[j - 2].isdigit():
            suffixes.append(c)
            j -= 1
        else:
            m = _CONTRACTION.search(core)
            if m is None:
                break
            suffixes.append(m.group())
            j -= len(m.group())
    core = chunk[i:j]
    if core:
        if core in _EXCEPTIONS or _INITIALS.fullmatch(core) or _URL.fullmatch(core):
            out.append(core)
        else:
            pos = 0
            for m in _INFIX.finditer(core):
                if m.start() > pos:
                    out.append(core[pos:m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(core):
                out.append(core[pos:])
    out.extend(reversed(suffixes))


class Check(NamedTuple):
    reason: str
    passed: bool
    margin: float
    detail: str


def _upper(reason: str, what: str, value: float, fld: str, limit: float) -> Check:
    ok = value <= limit
    return Check(reason, ok, max(0.0, 1.0 - value / limit) if limit else 1.0,
                 f"{what} {_fmt(value)} {'<=' if ok else '>'} {fld} {_fmt(limit)}")


def _lower_share(reason: str, what: str, value: float, fld: str, limit: float) -> Check:
    ok = value >= limit
    return Check(reason, ok, max(0.0, (value - limit) / (1.0 - limit)) if limit < 1 else float(ok),
                 f"{what} {_fmt(value)} {'>=' if ok else '<'} {fld} {_fmt(limit)}")


def _lower_count(reason: str, what: str, value: float, fld: str, limit: float) -> Check:
    ok = value >= limit
    return Check(reason, ok, min(1.0, max(0.0, (value - limit) / limit)),
                 f"{what} {_fmt(value)} {'>=' if ok else '<'} {fld} {_fmt(limit)}")


def _fmt(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def _duplicates(parts: list[str]) -> tuple[int, int]:
    seen: set[str] = set()
    n = chars = 0
    for p in parts:
        if p in seen:
            n += 1
            chars += len(p)
        else:
            seen.add(p)
    return n, chars


def _top_ngram_chars(words: list[str], lens: list[int], n: int) -> int:
    """Chars covered by the most frequent word n-gram (joined with spaces) times its count; 0 if
    no n-gram occurs twice."""
    if len(words) < n:
        return 0
    (gram, count), = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)
    if count < 2:
        return 0
    return (sum(len(w) for w in gram) + n - 1) * count


def _repeated_ngram_chars(words: list[str], lens: list[int], n: int) -> int:
    """Chars (words glued, as DataTrove counts them) of n-grams that repeat an earlier one; a
    repeat skips past itself so overlapping repeats are not counted twice."""
    grams = list(zip(*(words[k:] for k in range(n))))
    if len(set(grams)) == len(grams):
        return 0
    seen: set[tuple] = set()
    chars = i = 0
    last = len(grams)
    while i < last:
        g = grams[i]
        if g in seen:
            chars += sum(lens[i:i + n])
            i += n
        else:
            seen.add(g)
            i += 1
    return chars


def repetition_checks(text: str, words: list[str], lens: list[int], p: Profile) -> list[Check]:
    """GopherRepetitionFilter's rules (Gopher Table A1)."""
    out: list[Check] = []
    n_chars = max(1, len(text))
    if p.dup_para_frac or p.dup_para_char_frac:
        paras = _PARAGRAPH.split(text.strip())
        dup, chars = _duplicates(paras)
        if p.dup_para_frac:
            out.append(_upper("gopher_dup_para", "duplicated paragraph share", dup / len(paras),
                              "dup_para_frac", p.dup_para_frac))
        if p.dup_para_char_frac:
            out.append(_upper("gopher_dup_para_chars", "duplicated paragraph char share", chars / n_chars,
                              "dup_para_char_frac", p.dup_para_char_frac))
    if p.dup_line_frac or p.dup_line_char_frac:
        lines = _LINES.split(text)
        dup, chars = _duplicates(lines)
        if p.dup_line_frac:
            out.append(_upper("gopher_dup_line", "duplicated line share", dup / len(lines),
                              "dup_line_frac", p.dup_line_frac))
        if p.dup_line_char_frac:
            out.append(_upper("gopher_dup_line_chars", "duplicated line char share", chars / n_chars,
                              "dup_line_char_frac", p.dup_line_char_frac))
    for kind, table, fn in (("top", p.top_n_grams, _top_ngram_chars), ("dup", p.dup_n_grams, _repeated_ngram_chars)):
        worst: Optional[Check] = None
        margins = []
        none_repeat = False  # no repeated n-gram means none for any larger n either
        for n, limit in table.items():
            if not limit:
                continue
            frac = 0.0 if none_repeat else fn(words, lens, n) / n_chars
            none_repeat = none_repeat or (kind == "dup" and frac == 0.0)
            c = _upper(f"gopher_{kind}_ngram", f"{'top' if kind == 'top' else 'repeated'} {n}-gram char share",
                       frac, f"{kind}_n_grams[{n}]", limit)
            margins.append(c.margin)
            if worst is None or (not c.passed and worst.passed):
                worst = c
        if worst is not None:  # one rule per table: its margin is the tightest of its n's
            out.append(worst._replace(margin=min(margins)))
    return out


def gopher_checks(text: str, words: list[str], lens: list[int], p: Profile) -> list[Check]:
    """GopherQualityFilter's rules."""
    out: list[Check] = []
    n_words = len(words)
    content = [n for w, n in zip(words, lens) if not _is_symbol_word(w)]
    n_content = len(content)
    stats = n_content >= p.stats_min_words
    if p.min_doc_words:
        out.append(_lower_count("gopher_short", "words", n_content, "min_doc_words", p.min_doc_words))
    if p.max_doc_words:
        out.append(_upper("gopher_long", "words", n_content, "max_doc_words", p.max_doc_words))
    if (p.min_avg_word_length or p.max_avg_word_length) and n_content and stats:
        mean = sum(content) / n_content
        checks = []
        if p.min_avg_word_length:
            checks.append(_lower_count("gopher_word_len", "mean word length", mean, "min_avg_word_length",
                                       p.min_avg_word_length))
        if p.max_avg_word_length:
            checks.append(_upper("gopher_word_len", "mean word length", mean, "max_avg_word_length",
                                 p.max_avg_word_length))
        worst = min(checks, key=lambda c: (c.passed, c.margin))
        out.append(worst)
    if p.max_symbol_word_ratio and n_words:
        hashes = text.count("#") / n_words
        dots = (text.count("...") + text.count("…")) / n_words
        what, v = ("'#' per token", hashes) if hashes >= dots else ("ellipses per token", dots)
        out.append(_upper("gopher_symbol_ratio", what, v, "max_symbol_word_ratio", p.max_symbol_word_ratio))
    if p.max_bullet_lines_ratio or p.max_ellipsis_lines_ratio:
        lines = text.splitlines() or [""]
        if p.max_bullet_lines_ratio:
            bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-"))) / len(lines)
            out.append(_upper("gopher_bullets", "bullet line share", bullets, "max_bullet_lines_ratio",
                              p.max_bullet_lines_ratio))
        if p.max_ellipsis_lines_ratio:
            ell = sum(1 for s in lines if s.rstrip().endswith(("...", "…"))) / len(lines)
            out.append(_upper("gopher_ellipsis_lines", "ellipsis-ending line share", ell, "max_ellipsis_lines_ratio",
                              p.max_ellipsis_lines_ratio))
    if p.min_alpha_words_ratio and n_words and stats:
        alpha = sum(1 for w in words if any(c.isalpha() for c in w)) / n_words
        out.append(_lower_share("gopher_alpha", "share of tokens with a letter", alpha, "min_alpha_words_ratio",
                                p.min_alpha_words_ratio))
    if p.min_stop_words:
        present = {w.lower() for w in set(words)} & set(p.stop_words)
        out.append(_lower_count("gopher_stop_words", "distinct stop words", len(present), "min_stop_words",
                                p.min_stop_words))
    return out


def _count_sentences(words: list[str]) -> int:
    """Sentences as spaCy's sentencizer splits a line: one, plus one for each word that follows
    a sentence-ending token (with only punctuation between)."""
    n, seen = 1, False
    for w in words:
        if w in _SENTENCE_PUNCT:
            seen = True
        elif seen and not _is_symbol_word(w):
            n += 1
            seen = False
    return n


def c4_checks(text: str, p: Profile) -> list[Check]:
    """C4QualityFilter's rules, counting instead of rewriting: the line filters decide which
    lines count; lorem ipsum and '{' in a counted line fail the document."""
    if not (p.min_num_sentences or p.filter_lorem_ipsum or p.filter_curly_bracket):
        return []
    sentences = 0
    lorem = curly = None
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if p.max_word_length and any(len(w) > p.max_word_length for w in words):
            continue
        if p.remove_citations:
            line = _CITATION.sub("", line)
        if p.filter_no_terminal_punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < p.min_words_per_line:
            continue
        low = line.lower()
        if p.filter_lorem_ipsum and lorem is None and "lorem ipsum" in low:
            lorem = line
        if p.filter_javascript and "javascript" in low:
            continue
        if p.filter_curly_bracket and curly is None and "{" in line:
            curly = line
        if p.filter_policy and any(s in low for s in _POLICY):
            continue
        sentences += _count_sentences(words_of(line))
    out = []
    if p.filter_lorem_ipsum:
        out.append(Check("c4_lorem_ipsum", lorem is None, 1.0 if lorem is None else 0.0,
                         "no 'lorem ipsum'" if lorem is None else f"'lorem ipsum' in line {lorem[:80]!r} "
                         "(filter_lorem_ipsum true)"))
    if p.filter_curly_bracket:
        out.append(Check("c4_curly_bracket", curly is None, 1.0 if curly is None else 0.0,
                         "no '{'" if curly is None else f"'{{' in line {curly[:80]!r} (filter_curly_bracket true)"))
    if p.min_num_sentences:
        out.append(_lower_count("c4_sentences", "sentences in kept lines", sentences, "min_num_sentences",
                                p.min_num_sentences))
    return out


# --- language id ----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def language_identifier():
    """py3langid's bundled model with calibrated probabilities, loaded once per process (~1 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 2000) -> list[tuple[str, float]]:
    """All languages with their probabilities, best first (py3langid), on the first chars."""
    return language_identifier().rank(text[:max_chars] if max_chars else text)


def language_check(ranked: list[tuple[str, float]], languages: Optional[tuple], p: Profile) -> Optional[Check]:
    """DataTrove's LanguageFilter: pass when a wanted language (any language, without
    `languages`) scores at least `min_lang_score`. The reason is `lang_mismatch` when the best
    language is not a wanted one, else `lang_low_score`."""
    if not p.min_lang_score:
        return None
    best, best_p = ranked[0]
    if languages:
        scores = dict(ranked)
        lang, prob = max(((lg, scores.get(lg, 0.0)) for lg in languages), key=lambda t: t[1])
    else:
        lang, prob = best, best_p
    c = _lower_share("lang_low_score", f"language {lang} score", prob, "min_lang_score", p.min_lang_score)
    if not c.passed and languages and best not in languages:
        return c._replace(reason="lang_mismatch",
                          detail=f"language {best} ({best_p:.3f}) not in languages {list(languages)}; {c.detail}")
    return c


# --- the verdict ----------------------------------------------------------------------------

class Verdict(NamedTuple):
    score: float
    passed: bool
    reason: Optional[str]  # the first failing rule
    detail: str
    lang: Optional[str]
    lang_score: Optional[float]
    checks: list


def judge(text: str, profile: Profile, languages: Optional[tuple] = ("en",), lang_id: bool = True,
          lang_max_chars: int = 2000) -> Verdict:
    """Every rule of the profile on one text; the score as in the module docstring."""
    checks: list[Check] = []
    lang = lang_score = None
    words = words_of(text)
    lens = [len(w) for w in words]
    if lang_id:
        ranked = identify(text, lang_max_chars)
        lang, lang_score = ranked[0]
        c = language_check(ranked, languages, profile)
        if c is not None and (not profile.stats_min_words
                              or sum(1 for w in words if not _is_symbol_word(w)) >= profile.stats_min_words):
            checks.append(c)
    checks += repetition_checks(text, words, lens, profile)
    checks += gopher_checks(text, words, lens, profile)
    checks += c4_checks(text, profile)
    failed = [c for c in checks if not c.passed]
    if not checks:
        return Verdict(1.0, True, None, "", lang, lang_score, checks)
    if failed:
        score = 0.5 * (len(checks) - len(failed)) / len(checks)
        more = f" (+{len(failed) - 1} more: {', '.join(c.reason for c in failed[1:])})" if len(failed) > 1 else ""
        return Verdict(score, False, failed[0].reason, failed[0].detail + more, lang, lang_score, checks)
    score = 0.5 + 0.5 * sum(c.margin for c in checks) / len(checks)
    return Verdict(score, True, None, "", lang, lang_score, checks)


def scored_parts(row: dict, profiles: dict) -> tuple[list[str], Optional[str]]:
    """(the texts a sample is judged on, its profile); profile None when its kind is not scored.
    A document or caption is one text; a conversation is judged answer by answer (each
    assistant turn, and a preference pair's `chosen`), so answers about one picture may repeat
    each other's words without counting as repetition."""
    kind = row.get("kind")
    profile = profiles.get(kind)
    if profile is None:
        return [], None
    if kind in ("conversation", "preference"):
        parts = [m.get("content") or "" for m in row.get("messages") or [] if m.get("role") == "assistant"]
        if kind == "preference" and row.get("chosen"):
            parts.append(row["chosen"])
    else:
        text = row.get("text") or ""
        if not text.strip() and kind in ("image_text", "video_text") and row.get("captions"):
            text = row["captions"][-1].get("text") or ""
        parts = [text]
    parts = [_MARKUP.sub("", p).strip() for p in parts]
    return [p for p in parts if p], profile


@register_step("text_quality")
class TextQuality(RowStep):
    """Scores text with the Gopher/C4 rules and language id; drops failures unless score_only."""

    def __init__(self, mode: str = "filter", languages: Optional[list] = ("en",), lang_id: bool = True,
                 lang_max_chars: int = 2000, min_lang_score: float = 0.65,
                 min_doc_words: int = 50, max_doc_words: int = 100_000, min_avg_word_length: float = 3,
                 max_avg_word_length: float = 10, max_symbol_word_ratio: float = 0.1,
                 max_bullet_lines_ratio: float = 0.9, max_ellipsis_lines_ratio: float = 0.3,
                 min_alpha_words_ratio: float = 0.8, min_stop_words: int = 2, stop_words: Optional[list] = None,
                 dup_line_frac: float = 0.3, dup_para_frac: float = 0.3, dup_line_char_frac: float = 0.2,
                 dup_para_char_frac: float = 0.2, top_n_grams: Optional[dict] = None,
                 dup_n_grams: Optional[dict] = None, min_num_sentences: int = 5, min_words_per_line: int = 3,
                 max_word_length: int = 1000, filter_no_terminal_punct: bool = True, remove_citations: bool = True,
                 filter_lorem_ipsum: bool = True, filter_javascript: bool = True, filter_curly_bracket: bool = True,
                 filter_policy: bool = True, caption: Optional[dict] = None, chat: Optional[dict] = None,
                 profiles: Optional[dict] = None, **kw: Any):
        super().__init__(**kw)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        if isinstance(languages, str):
            languages = [languages]
        if languages is not None and (not isinstance(languages, (list, tuple)) or not all(
                isinstance(lg, str) and re.fullmatch(r"[a-z]{2,3}", lg) for lg in languages)):
            raise ValueError(f"`languages` must be a list of ISO 639-1 codes such as [en, de], got {languages!r}")
        self.languages = tuple(languages) if languages else None
        if not isinstance(lang_id, bool):
            raise ValueError(f"`lang_id` must be true or false, got {lang_id!r}")
        self.lang_id = lang_id
        self.lang_max_chars = int(lang_max_chars)
        own = {k: v for k, v in locals().items() if k in FIELDS}
        if stop_words is None:
            own.pop("stop_words")
        for k in ("top_n_grams", "dup_n_grams"):
            if own[k] is None:
                own.pop(k)
        self.profile_text = make_profile(own)
        # caption and chat start from the text profile as the recipe set it, then their own defaults
        text_values = {k: v for k, v in own.items()}
        self.profile_caption = make_profile(caption, {**text_values, **CAPTION_DEFAULTS}, "caption")
        self.profile_chat = make_profile(chat, {**text_values, **CHAT_DEFAULTS}, "chat")
        if profiles is not None and not isinstance(profiles, dict):
            raise ValueError(f"`profiles` must map sample kinds to text, caption, chat or null, got {profiles!r}")
        merged = {**DEFAULT_PROFILES, **(profiles or {})}
        for k, v in merged.items():
            if k not in DEFAULT_PROFILES:
                raise ValueError(f"`profiles.{k}` is not a sample kind: use one of {', '.join(DEFAULT_PROFILES)}")
            if v is not None and v not in PROFILES:
                raise ValueError(f"`profiles.{k}` must be one of {', '.join(PROFILES)} or null, got {v!r}")
        self.profiles = merged

    def setup(self, context=None) -> None:
        super().setup(context)
        if self.lang_id:
            labels = set(language_identifier().labels)
            unknown = [lg for lg in self.languages or () if lg not in labels]
            if unknown:
                from reelforge.curation.errors import RecipeError

                raise RecipeError(f"text_quality field `languages` names {unknown}, which py3langid does not know: "
                                  f"use codes among {', '.join(sorted(labels))}.")

    def profile(self, name: str) -> Profile:
        return {"text": self.profile_text, "caption": self.profile_caption, "chat": self.profile_chat}[name]

    def judge(self, text: str, profile: str = "text") -> Verdict:
        return judge(text, self.profile(profile), self.languages, self.lang_id, self.lang_max_chars)

    def process_row(self, row: dict) -> dict:
        parts, profile = scored_parts(row, self.profiles)
        if profile is None or not parts:
            return row
        verdicts = [self.judge(p, profile) for p in parts]
        worst = min(verdicts, key=lambda v: v.score)
        set_score(row, "quality", round(worst.score, 6))
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        if verdicts[longest].lang is not None:
            _set_lang(row, verdicts[longest].lang, verdicts[longest].lang_score)
        if self.mode == "filter":
            for i, v in enumerate(verdicts):
                if not v.passed:
                    where = f"{profile} profile" + (f", answer {i + 1} of {len(parts)}" if len(parts) > 1 else "")
                    return drop(row, self.name, v.reason, f"{where}: {v.detail}")
        return row


def _set_lang(row: dict, lang: str, score: float) -> None:
    """meta["lang"], meta["lang_score"] in the sample's meta JSON object (left alone if it is
    not a JSON object)."""
    raw = row.get("meta")
    try:
        meta = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return
    if not isinstance(meta, dict):
        return
    meta["lang"] = lang
    meta["lang_score"] = round(float(score), 4)
    row["meta"] = json.dumps(meta, ensure_ascii=False)


__all__ = ["CAPTION_DEFAULTS", "CHAT_DEFAULTS", "Check", "Profile", "STOP_WORDS", "TextQuality", "Verdict",
           "identify", "judge", "make_profile", "scored_parts", "words_of"]
