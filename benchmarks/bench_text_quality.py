"""The `text_quality` step's scoring against DataTrove's Gopher and C4 filters: decisions and speed.

The texts are real and found on the machine, chosen deterministically (sorted paths, fixed
strides), each cut to its first --max-chars characters:

  doc       files under /usr/share/doc (README, NEWS, changelogs, copyright, *.txt/*.md/*.rst,
            gzip-compressed ones decompressed)
  man       English man pages (man1, man5, man8) rendered by `man -l | col -bx`
  man-xx    man pages in other languages (de, fr, es, it, pl, pt, ru, nl, sv)
  pydoc     module docstrings of the Python standard library (read with `ast`)

DataTrove runs in its own interpreter (--datatrove-python, a venv with `datatrove[processing]`
and `spacy`, never the project's .venv), as a subprocess: GopherRepetitionFilter,
GopherQualityFilter and C4QualityFilter with their defaults on each text (each filter on the
original text, as separate decisions). The project side is `filters.text_quality.judge` with
the `text` profile and the same defaults, language id off (DataTrove's LanguageFilter needs a
fastText model from the hub). Agreement is counted per filter (keep/drop) and for the three
together; the disagreements are listed with both sides' reasons.

Speed: docs/s of each side's scoring alone (texts already in memory, models warmed up, one
process each on one core), DataTrove's three filters against `judge` without and with
language id. DataTrove stops at a document's first failing rule; `judge` always evaluates every
rule (the score needs them all), so the comparison is conservative for the project.

    make setup    # builds the peer venv .venv/peers/datatrove ("datatrove[processing]" + spacy)
    .venv/bin/python benchmarks/bench_text_quality.py
        [--limit 240] [--max-chars 20000] [--repeats 3] [--json out.json]

The two sides are timed in alternation (DataTrove, project, project, DataTrove, ...) and the
best pass of each is kept, so a machine shared with other work penalises neither side alone.

Prints a table and, last, one JSON line with every figure. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

DOC_PATTERNS = ("README*", "NEWS*", "changelog*", "copyright", "*.txt", "*.md", "*.rst")
MAN_LANGS = ("de", "fr", "es", "it", "pl", "pt", "ru", "nl", "sv")


def _read(path: str) -> str | None:
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read(400_000)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def _stride(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _man(path: str) -> str | None:
    env = {**os.environ, "MANWIDTH": "80", "LANG": "C.UTF-8", "MAN_KEEP_FORMATTING": "0"}
    try:
        out = subprocess.run(f"man -l -E UTF-8 {path!r} 2>/dev/null | col -bx", shell=True, env=env,
                             capture_output=True, timeout=30).stdout
        return out.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_texts(limit: int = 240, max_chars: int = 20_000) -> list[tuple[str, str]]:
    """[(origin, text)]: about 40% /usr/share/doc, 25% English man pages, 10% man pages in other
    languages, 25% stdlib docstrings; texts under 100 characters are skipped."""
    out: list[tuple[str, str]] = []
    want = {"doc": int(limit * 0.4), "man": int(limit * 0.25), "man-xx": int(limit * 0.1)}
    want["pydoc"] = limit - sum(want.values())

    docs = sorted({p for pat in DOC_PATTERNS for ext in ("", ".gz")
                   for p in glob.glob(f"/usr/share/doc/**/{pat}{ext}", recursive=True) if os.path.isfile(p)})
    got = 0
    for p in _stride(docs, want["doc"] * 2):
        t = _read(p)
        if t and len(t.strip()) >= 100 and got < want["doc"]:
            out.append((f"doc:{p}", t[:max_chars]))
            got += 1

    man = sorted(p for sec in ("man1", "man5", "man8") for p in glob.glob(f"/usr/share/man/{sec}/*.gz"))
    got = 0
    for p in _stride(man, want["man"] * 2):
        t = _man(p) if got < want["man"] else None
        if t and len(t.strip()) >= 100:
            out.append((f"man:{p}", t[:max_chars]))
            got += 1

    per = max(1, want["man-xx"] // len(MAN_LANGS) + 1)
    got = 0
    for lang in MAN_LANGS:
        for p in _stride(sorted(glob.glob(f"/usr/share/man/{lang}/man*/*.gz")), per * 2)[::2][:per]:
            t = _man(p) if got < want["man-xx"] else None
            if t and len(t.strip()) >= 100:
                out.append((f"man-{lang}:{p}", t[:max_chars]))
                got += 1

    stdlib = sysconfig.get_paths()["stdlib"]
    mods = sorted(glob.glob(os.path.join(stdlib, "*.py")) + glob.glob(os.path.join(stdlib, "*", "__init__.py")))
    got = 0
    for p in _stride(mods, want["pydoc"] * 3):
        if got >= want["pydoc"]:
            break
        try:
            doc = ast.get_docstring(ast.parse(_read(p) or ""))
        except (SyntaxError, ValueError):
            doc = None
        if doc and len(doc) >= 300:
            out.append((f"pydoc:{os.path.relpath(p, stdlib)}", doc[:max_chars]))
            got += 1
    return out


# Runs inside the DataTrove interpreter: reads texts (JSON list) from argv[1], prints JSON.
DATATROVE_SIDE = r'''
import json, sys, time
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter
texts = json.load(open(sys.argv[1]))
repeats = int(sys.argv[2])
filters = {"gopher_rep": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(), "c4": C4QualityFilter()}
def run(t):
    res = {}
    for name, f in filters.items():
        r = f.filter(Document(text=t, id="x"))
        res[name] = "keep" if r is True else (r[1] if isinstance(r, tuple) else "drop")
    return res
run("warm up the spaCy tokenizer. " * 20)
decisions = [run(t) for t in texts]
best = None
for _ in range(repeats):
    t0 = time.perf_counter()
    for t in texts:
        for f in filters.values():
            f.filter(Document(text=t, id="x"))
    sec = time.perf_counter() - t0
    best = sec if best is None else min(best, sec)
from importlib.metadata import version
print(json.dumps({"decisions": decisions, "seconds": best, "version": version("datatrove")}))
'''



def _our_group(reason: str) -> str:
    if reason.startswith(("gopher_dup_", "gopher_top_")):
        return "gopher_rep"
    if reason.startswith("gopher_"):
        return "gopher_quality"
    if reason.startswith("c4_"):
        return "c4"
    return "lang"


def ours(texts: list[str], lang_id: bool) -> list[dict]:
    """Per text: the first failing rule of each DataTrove filter's group, or keep."""
    from reelforge.filters.text_quality import judge, make_profile

    p = make_profile()
    out = []
    for t in texts:
        v = judge(t, p, languages=None, lang_id=lang_id)
        res = {"gopher_rep": "keep", "gopher_quality": "keep", "c4": "keep"}
        for c in v.checks:
            g = _our_group(c.reason)
            if not c.passed and g in res and res[g] == "keep":
                res[g] = c.reason
        out.append(res)
    return out


def time_ours(texts: list[str], lang_id: bool, repeats: int) -> float:
    from reelforge.filters.text_quality import identify, judge, make_profile

    p = make_profile()
    if lang_id:
        identify("warm up the model")
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in texts:
            judge(t, p, languages=None, lang_id=lang_id)
        sec = time.perf_counter() - t0
        best = sec if best is None else min(best, sec)
    return best


def run_datatrove(python: str, texts: list[str], repeats: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
        path = f.name
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.update({"OMP_NUM_THREADS": "1", "LOGURU_LEVEL": "ERROR"})
        res = subprocess.run([python, "-c", DATATROVE_SIDE, path, str(repeats)], capture_output=True, text=True,
                             env=env, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(f"datatrove side failed: {res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(path)


def agreement(dt: list[dict], me: list[dict]) -> dict:
    """Share of texts where both sides keep, or both drop: per filter and for all three."""
    out = {}
    for g in ("gopher_rep", "gopher_quality", "c4"):
        out[g] = sum((a[g] == "keep") == (b[g] == "keep") for a, b in zip(dt, me)) / len(dt)
    out["all"] = sum(all(a[g] == "keep" for g in a) == all(b[g] == "keep" for g in b) for a, b in zip(dt, me)) / len(dt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datatrove-python",
                    default=os.environ.get("DATATROVE_PYTHON", ".venv/peers/datatrove/bin/python"))
    ap.add_argument("--limit", type=int, default=240)
    ap.add_argument("--max-chars", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=0, help="pin both sides to this core (-1: no pinning)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})  # inherited by the DataTrove subprocess

    items = machine_texts(args.limit, args.max_chars)
    texts = [t for _, t in items]
    origins = [o.split(":")[0] for o, _ in items]
    n_chars = sum(len(t) for t in texts)
    print(f"{len(texts)} texts, {n_chars / 1e6:.2f} M chars: "
          + ", ".join(f"{k} {origins.count(k)}" for k in sorted(set(origins))))

    if not os.path.exists(args.datatrove_python):
        sys.exit(f"no DataTrove interpreter at {args.datatrove_python}: run `make setup`, which builds the peer venv "
                 ".venv/peers/datatrove (never DataTrove in the project's .venv itself), "
                 "or pass --datatrove-python.")
    dt = run_datatrove(args.datatrove_python, texts, 1)
    dt_secs, plain_secs, lang_secs = [dt["seconds"]], [], []
    for rep in range(args.repeats):  # alternate the sides
        plain_secs.append(time_ours(texts, False, 1))
        lang_secs.append(time_ours(texts, True, 1))
        if rep < args.repeats - 1:
            dt_secs.append(run_datatrove(args.datatrove_python, texts, 1)["seconds"])
    dt["seconds"] = min(dt_secs)
    me = ours(texts, lang_id=False)
    agree = agreement(dt["decisions"], me)
    kept_dt = sum(all(v == "keep" for v in d.values()) for d in dt["decisions"])
    kept_me = sum(all(v == "keep" for v in d.values()) for d in me)
    print(f"\ndecisions (datatrove {dt['version']}): kept by datatrove {kept_dt}, by text_quality {kept_me}")
    print(f"{'filter':<16}{'agreement':>10}")
    for g, a in agree.items():
        print(f"{g:<16}{a:>10.3f}")
    dis = [(o, a, b) for (o, _), a, b in zip(items, dt["decisions"], me)
           if any((a[g] == "keep") != (b[g] == "keep") for g in a)]
    if dis:
        print("\ndisagreements (origin: datatrove | text_quality, per filter):")
        for o, a, b in dis:
            diffs = [f"{g}: {a[g]} | {b[g]}" for g in a if (a[g] == "keep") != (b[g] == "keep")]
            print(f"  {o[:70]:<70} {'; '.join(diffs)}")

    t_plain, t_lang = min(plain_secs), min(lang_secs)
    rates = {"datatrove": len(texts) / dt["seconds"], "text_quality": len(texts) / t_plain,
             "text_quality+lang": len(texts) / t_lang}
    print(f"\n{'scorer':<20}{'seconds':>9}{'docs/s':>9}{'MB/s':>7}")
    for name, sec in (("datatrove", dt["seconds"]), ("text_quality", t_plain), ("text_quality+lang", t_lang)):
        print(f"{name:<20}{sec:>9.3f}{len(texts) / sec:>9.1f}{n_chars / sec / 1e6:>7.2f}")
    ratio = rates["text_quality"] / rates["datatrove"]
    ratio_lang = rates["text_quality+lang"] / rates["datatrove"]
    print(f"\ntext_quality / datatrove docs/s: {ratio:.2f}x (with language id: {ratio_lang:.2f}x)")
    figures = {"texts": len(texts), "chars": n_chars, "agreement": agree, "kept_datatrove": kept_dt,
               "kept_text_quality": kept_me, "docs_per_s": rates, "ratio": ratio, "ratio_with_lang": ratio_lang,
               "disagreements": len(dis), "datatrove_version": dt["version"]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
