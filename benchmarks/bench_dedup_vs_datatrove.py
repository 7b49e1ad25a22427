"""Near-duplicate removal end to end: `reelforge run` (ingest + `dedup_near` + shards) against
DataTrove's MinHash pipeline (its 4 stages), on the same real-text corpus, 2 cores each.

    make setup    # builds the peer venv .venv/peers/datatrove ("datatrove[processing]" + spacy)
    .venv/bin/python benchmarks/bench_dedup_vs_datatrove.py [--docs 1000,50000,200000] [--repeat 1]
        [--work /tmp/bench-dedup] [--truth-sample 500] [--dt-bands same|default] [--json out.json]

The corpus, the same files for both systems (JSONL, {"id", "text"}):
  - a pool of real text found on the machine: every man page under /usr/share/man (zcat, roff
    requests and font escapes stripped), the text files under /usr/share/doc (gzip ones
    decompressed), the docstrings of the Python standard library (read with `ast`) and pydoc's
    help topics; cut into paragraphs, exact duplicate paragraphs removed (licence texts), long
    paragraphs cut into chunks of at most 60 words (cached in --work, built once, ~40 s);
  - a document is 150-1,000 words (uniform) of randomly drawn chunks (a collage: the pool holds
    ~19M words, 200k documents need ~115M);
  - 5% of the documents are planted near-copies of another document (each original copied at
    most once), with 1 to words/150 word edits (a replaced, deleted or inserted word, or two
    adjacent words swapped); the pairs and their exact Jaccard are recorded
    (`planted.json` beside the input).

Same parameters on both sides: word 5-grams, 128 MinHash permutations (seed 1) cut into 16 bands
of 8 rows (what reelforge derives for threshold 0.8 - candidate_margin 0.15 with datasketch's
optimiser), i.e. DataTrove's MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=8,
seed=1); `--dt-bands default` gives DataTrove its own default, 14 buckets of 8 (112 hashes).
reelforge keeps a candidate pair only when the exact Jaccard of its shingle sets is >= 0.8;
DataTrove has no verification step: every pair sharing a band is a duplicate (its implied
threshold is (1/b)^(1/r), ~0.71 for 16 x 8). DataTrove runs its own text normalisation and
English word tokenizer, reelforge its NFKC/punctuation normalisation and whitespace words.

What is timed: each system as a fresh process, wall clock, from its command's start to its end:
`reelforge run RECIPE --out DIR --master local[2]` (JVM and Spark start, ingest, dedup_near,
shards, ledger, report) and a DataTrove script in the DataTrove venv (interpreter start, the 4
LocalPipelineExecutor stages with 2 workers: signatures over one task per input file, buckets
over one task per band, clustering in one task, filtering to uncompressed JSONL with the
removed documents in an exclusion writer). The runs alternate (DataTrove first on even repeats,
reelforge first on odd ones); medians are reported.

Quality, per system, from its output (reelforge: the ledger's `dup_of`; DataTrove: the cluster
ids its stage 3 saves and stage 4 attaches):
  - planted recall: planted pairs with exact Jaccard >= 0.8 whose two documents share a cluster;
  - precision: predicted same-cluster pairs that are true, i.e. whose two documents are
    connected through pairs of exact Jaccard >= 0.8 (the planted ones, every predicted pair that
    reaches 0.8, the sample truth below);
  - sample truth: for --truth-sample random documents, EVERY document of the corpus with exact
    Jaccard >= 0.8 (prefix filtering on shingle hash sets, exact check on the shingle strings):
    recall and precision of the pairs touching the sample.

Prints a table and, last, one JSON line with every figure. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DT_PYTHON = os.path.join(REPO, ".venv", "peers", "datatrove", "bin", "python")
RF_BIN = os.path.join(os.path.dirname(sys.executable), "reelforge")
THRESHOLD = 0.8
NGRAM = 5
NUM_PERM = 128
BANDS, ROWS = 16, 8  # lsh_params(0.8 - 0.15, 128): asserted in main()
POOL_VERSION = 1
CHUNK_WORDS = 60

# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

_ROFF_ESC = re.compile(r"\\f[BIRPC]|\\f\(..|\\f\[[^]]*\]|\\\*\(..|\\\*\[[^]]*\]|\\\*.|\\\(..|\\\[[^]]*\]"
                       r"|\\[&|^ \-%:~0]|\\e|\\s[-+]?\d")
_ROFF_TEXT_MACRO = re.compile(r"^\.(?:SH|SS|B|I|BR|IR|RB|BI|IB|RI|SM|SB|TP|IP|Nm|Nd|Dl)\s+(.*)")


def _read(path: str, limit: int = 2_000_000) -> str | None:
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read(limit)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    return None if "\x00" in text else text


def _roff_to_text(src: str) -> str:
    """A man page's roff source as plain text: requests dropped (a few that carry text kept),
    font and character escapes removed, a paragraph break at .PP/.SH/.sp."""
    out = []
    for line in src.splitlines():
        if line.startswith((".", "'")):
            m = _ROFF_TEXT_MACRO.match(line)
            if m:
                out.append(m.group(1).replace('"', ""))
            elif line[1:3] in ("PP", "P", "LP", "sp", "SH", "SS", "TP", "IP", "Pp"):
                out.append("")
            continue
        out.append(_ROFF_ESC.sub("", line).replace("\\", ""))
    return "\n".join(out)


def machine_texts() -> list[str]:
    """Every readable text this machine ships in the places the module docstring names, in a
    fixed order."""
    texts = []
    for p in sorted(glob.glob("/usr/share/man/**/*.gz", recursive=True)):
        t = _read(p)
        if t:
            texts.append(_roff_to_text(t))
    for p in sorted(p for p in glob.glob("/usr/share/doc/**/*", recursive=True) if os.path.isfile(p)):
        t = _read(p)
        if t:
            texts.append(t)
    stdlib = sysconfig.get_paths()["stdlib"]
    for p in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" in p or "/test" in p:
            continue
        try:
            tree = ast.parse(_read(p) or "")
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d:
                    texts.append(d)
    from pydoc_data.topics import topics

    texts += [topics[k] for k in sorted(topics)]
    return texts


def text_pool(work: str, log=print) -> list[str]:
    """The chunks documents are drawn from: distinct paragraphs of >= 8 words, cut into chunks
    of at most CHUNK_WORDS words. Cached in `work` (one chunk per line)."""
    path = os.path.join(work, f"pool-v{POOL_VERSION}.txt.gz")
    if os.path.exists(path):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().split("\n")
    t = time.time()
    seen: set[bytes] = set()
    chunks: list[str] = []
    for text in machine_texts():
        for para in re.split(r"\n\s*\n", text):
            w = para.split()
            if len(w) < 8:
                continue
            key = hashlib.blake2b(" ".join(w).lower().encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if key in seen:
                continue
            seen.add(key)
            for i in range(0, len(w), CHUNK_WORDS):
                c = w[i:i + CHUNK_WORDS]
                if len(c) >= 8:
                    chunks.append(" ".join(c).encode("utf-8", "replace").decode("utf-8"))
    os.makedirs(work, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        f.write("\n".join(chunks))
    os.replace(tmp, path)
    log(f"text pool: {len(chunks)} chunks, {sum(c.count(' ') + 1 for c in chunks):,} words "
        f"({time.time() - t:.0f}s, cached in {path})")
    return chunks


def edit_words(words: list[str], k: int, rng: random.Random, vocab: list[str]) -> list[str]:
    """k random edits: replace, delete, insert a word, or swap two adjacent words."""
    w = list(words)
    for _ in range(k):
        op = rng.randrange(4)
        i = rng.randrange(len(w) - 1)
        if op == 0:
            w[i] = rng.choice(vocab)
        elif op == 1:
            del w[i]
        elif op == 2:
            w.insert(i, rng.choice(vocab))
        else:
            w[i], w[i + 1] = w[i + 1], w[i]
    return w


def build_corpus(n: int, pool: list[str], out_dir: str, seed: int = 0, dup_rate: float = 0.05) -> dict:
    """Write `n` documents into JSONL files under out_dir/input and planted.json; returns the
    corpus description (ids, texts, planted pairs)."""
    rng = random.Random(seed * 1_000_003 + n)
    copies = int(round(n * dup_rate))
    originals = n - copies
    vocab = rng.sample(pool, min(len(pool), 5000))
    vocab = [w for c in vocab for w in c.split()[:3]]
    texts: list[str] = []
    for _ in range(originals):
        target = rng.randint(150, 1000)
        words: list[str] = []
        while len(words) < target:
            words += pool[rng.randrange(len(pool))].split()
        texts.append(" ".join(words[:target]))
    planted_src = rng.sample(range(originals), copies)
    for src in planted_src:
        w = texts[src].split()
        texts.append(" ".join(edit_words(w, rng.randint(1, max(1, len(w) // 150)), rng, vocab)))
    order = list(range(n))
    rng.shuffle(order)  # position -> document index; the id is the position
    ids = [f"doc{p:07d}" for p in range(n)]
    id_of = {doc: ids[p] for p, doc in enumerate(order)}
    pairs = [(id_of[src], id_of[originals + j]) for j, src in enumerate(planted_src)]
    texts_by_id = {id_of[i]: t for i, t in enumerate(texts)}
    n_files = max(2, min(32, n // 6250))
    in_dir = os.path.join(out_dir, "input")
    shutil.rmtree(in_dir, ignore_errors=True)
    os.makedirs(in_dir)
    files = [open(os.path.join(in_dir, f"part-{f:03d}.jsonl"), "w", encoding="utf-8") for f in range(n_files)]
    per = -(-n // n_files)
    key_to_id = {}
    for p, i in enumerate(ids):
        files[p // per].write(json.dumps({"id": i, "text": texts_by_id[i]}, ensure_ascii=False) + "\n")
        key_to_id[f"part-{p // per:03d}.jsonl:{p % per + 1}"] = i
    for f in files:
        f.close()
    sims = [exact_jaccard(texts_by_id[a], texts_by_id[b]) for a, b in pairs]
    with open(os.path.join(out_dir, "planted.json"), "w") as f:
        json.dump([{"a": a, "b": b, "jaccard": round(s, 4)} for (a, b), s in zip(pairs, sims)], f)
    nbytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(in_dir, "*.jsonl")))
    return {"ids": ids, "texts": texts_by_id, "pairs": pairs, "keys": key_to_id, "sims": sims, "files": n_files,
            "bytes": nbytes}


def shingle_set(text: str) -> frozenset:
    from reelforge.curation.minhash import shingles

    return frozenset(shingles(text, NGRAM, "word"))


def exact_jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb) if sa and sb else 0.0


# --------------------------------------------------------------------------------------------
# Sample truth: every document of the corpus within Jaccard >= t of a sampled document
# --------------------------------------------------------------------------------------------

def hash_sets(texts: list[str]):
    """Per text, the sorted distinct 32-bit shingle hashes (reelforge's numpy reference kernel)."""
    import numpy as np

    from reelforge.curation import minhash as mh

    out = []
    for lo in range(0, len(texts), 2000):
        batch = texts[lo:lo + 2000]
        buf, offsets = mh._encode_batch(batch, mh.normalise)
        docs, hv = mh._shingle_hashes_np(buf, offsets, NGRAM, "word")
        key = np.sort((docs.astype(np.uint64) << np.uint64(32)) | hv.astype(np.uint64))
        key = key[np.r_[True, key[1:] != key[:-1]]]  # distinct (sort-based: numpy's hash unique is slow here)
        d = (key >> np.uint64(32)).astype(np.int64)
        h = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        cuts = np.searchsorted(d, np.arange(len(batch) + 1))
        out += [h[cuts[i]:cuts[i + 1]] for i in range(len(batch))]
    return out


def sample_truth(ids: list[str], texts: dict[str, str], sample: list[str], t: float = THRESHOLD) -> set:
    """Pairs (a, b), a < b, of exact shingle Jaccard >= t with a or b in `sample`: prefix filtering
    (every set's smallest |A| - ceil(t' |A|) + 1 hashes, t' a little under t so 32-bit hash
    collisions cannot hide a pair), then the exact check on the shingle strings."""
    import math

    import numpy as np

    slack = t - 0.02
    sets = hash_sets([texts[i] for i in ids])
    pre_h, pre_d = [], []
    for d, s in enumerate(sets):
        if len(s):
            k = len(s) - math.ceil(slack * len(s)) + 1
            pre_h.append(s[:k])
            pre_d.append(np.full(k, d, dtype=np.int64))
    pre_h, pre_d = np.concatenate(pre_h), np.concatenate(pre_d)
    order = np.argsort(pre_h, kind="stable")
    pre_h, pre_d = pre_h[order], pre_d[order]
    index = {i: d for d, i in enumerate(ids)}
    truth = set()
    for sid in sample:
        d = index[sid]
        s = sets[d]
        if not len(s):
            continue
        k = len(s) - math.ceil(slack * len(s)) + 1
        lo = np.searchsorted(pre_h, s[:k], "left")
        hi = np.searchsorted(pre_h, s[:k], "right")
        cands = {int(c) for a, b in zip(lo, hi) for c in pre_d[a:b]} - {d}
        for c in cands:
            o = sets[c]
            if not slack * len(s) <= len(o) <= len(s) / slack:
                continue
            inter = len(np.intersect1d(s, o, assume_unique=True))
            if inter / (len(s) + len(o) - inter) >= slack and exact_jaccard(texts[sid], texts[ids[c]]) >= t:
                truth.add(tuple(sorted((sid, ids[c]))))
    return truth


# --------------------------------------------------------------------------------------------
# The two systems
# --------------------------------------------------------------------------------------------

DATATROVE_SCRIPT = r'''
import json, os, sys, time
t0 = time.time()
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.hashing import HashConfig


if __name__ == "__main__":  # the executors' worker processes import this file
    inp, work = sys.argv[1], sys.argv[2]
    files, workers, buckets, rows = (int(x) for x in sys.argv[3:7])
    cfg = MinhashConfig(n_grams=5, num_buckets=buckets, hashes_per_bucket=rows, seed=1,
                        hash_config=HashConfig(precision=64))
    S, B, R, L = f"{work}/signatures", f"{work}/buckets", f"{work}/remove_ids", f"{work}/logs"
    stage1 = LocalPipelineExecutor(pipeline=[JsonlReader(inp), MinhashDedupSignature(output_folder=S, config=cfg)],
                                   tasks=files, workers=workers, logging_dir=f"{L}/1")
    stage2 = LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=S, output_folder=B, config=cfg)],
                                   tasks=cfg.num_buckets, workers=workers, logging_dir=f"{L}/2", depends=stage1)
    stage3 = LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=B, output_folder=R, config=cfg,
                                                                 save_cluster_id=True)],
                                   tasks=1, logging_dir=f"{L}/3", depends=stage2)
    removed = JsonlWriter(f"{work}/removed", compression=None)
    stage4 = LocalPipelineExecutor(pipeline=[JsonlReader(inp),
                                             MinhashDedupFilter(input_folder=R, load_cluster_ids=True,
                                                                exclusion_writer=removed),
                                             JsonlWriter(f"{work}/output", compression=None)],
                                   tasks=files, workers=workers, logging_dir=f"{L}/4", depends=stage3)
    stage4.run()
    from importlib.metadata import version
    print(json.dumps({"seconds_in_process": time.time() - t0, "version": version("datatrove")}))
'''


def ensure_datatrove(python: str) -> None:
    """The DataTrove venv with what its MinHash pipeline and JSONL reader/writer import: made
    here (`python3 -m venv`, `pip install "datatrove[processing]" orjson`) when missing, and
    orjson added to one `make setup` built without it."""
    if not os.path.exists(python):
        venv = os.path.dirname(os.path.dirname(python))
        print(f"creating the DataTrove venv {venv} ...", flush=True)
        subprocess.run([shutil.which("python3") or "python3", "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "datatrove[processing]", "spacy", "orjson"], check=True)
    if subprocess.run([python, "-c", "import datatrove, orjson"], capture_output=True).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", "orjson"], check=True)


def run_datatrove(corpus_dir: str, files: int, work: str, bands: int, rows: int, python: str) -> tuple[float, dict]:
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    script = os.path.join(work, "dt_minhash.py")
    with open(script, "w") as f:
        f.write(DATATROVE_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    t = time.perf_counter()
    res = subprocess.run([python, script, os.path.join(corpus_dir, "input"), work, str(files), "2", str(bands),
                          str(rows)], capture_output=True, text=True, env=env, timeout=7200)
    sec = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"DataTrove failed:\n{res.stderr[-4000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return sec, info


def datatrove_clusters(work: str) -> dict[str, str]:
    """id -> cluster label (the id itself for a document in no cluster)."""
    out = {}
    for sub in ("output", "removed"):
        for p in glob.glob(os.path.join(work, sub, "*.jsonl")):
            with open(p) as f:
                for line in f:
                    d = json.loads(line)
                    c = d.get("metadata", {}).get("minhash_cluster_id", -1)
                    out[d["id"]] = d["id"] if c == -1 else f"c{c}"
    return out


def run_reelforge(corpus_dir: str, out: str, master: str, extra_steps: list | None = None) -> tuple[float, dict]:
    import yaml

    recipe = {"name": "bench-dedup",
              "sources": [{"name": "docs", "format": "text", "path": "input/*.jsonl"}],
              "steps": [{"dedup_near": {"threshold": THRESHOLD, "num_perm": NUM_PERM, "ngram": NGRAM}}]
              + (extra_steps or []),
              "output": {"path": "out", "shards": {"max_samples": 10000}}}
    path = os.path.join(corpus_dir, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = subprocess.run([RF_BIN, "run", path, "--out", out, "--master", master], capture_output=True, text=True,
                         timeout=7200)
    sec = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"reelforge failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return sec, report


def reelforge_clusters(out: str, key_to_id: dict[str, str]) -> dict[str, str]:
    """id -> cluster label (the kept document's id) from the ledger; ledger ids mapped back to
    the corpus's through the source key (file:line)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(os.path.join(out, "ledger"), columns=["id", "source_key", "dup_of"]).to_pylist()
    key = {r["id"]: key_to_id[r["source_key"].split("#", 1)[0]] for r in rows}  # file:line#record id
    return {key[r["id"]]: key[r["dup_of"]] if r["dup_of"] else key[r["id"]] for r in rows}


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

def cluster_pairs(clusters: dict[str, str]) -> set:
    groups: dict[str, list[str]] = {}
    for k, c in clusters.items():
        groups.setdefault(c, []).append(k)
    return {(a, b) for g in groups.values() if len(g) > 1 for i, a in enumerate(sorted(g)) for b in sorted(g)[i + 1:]}


class Truth:
    """Known true edges (exact Jaccard >= t) and their components; pairs are judged on demand."""

    def __init__(self, texts: dict[str, str]):
        self.texts = texts
        self.parent: dict[str, str] = {}
        self.judged: dict[tuple, bool] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def add(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def judge(self, pairs) -> None:
        for p in pairs:
            if p not in self.judged:
                self.judged[p] = exact_jaccard(self.texts[p[0]], self.texts[p[1]]) >= THRESHOLD
                if self.judged[p]:
                    self.add(*p)

    def same(self, a: str, b: str) -> bool:
        return self.find(a) == self.find(b)


def score(pred: set, truth: Truth, planted_true: list, sample: set, sample_truth_pairs: set) -> dict:
    ok = [p for p in pred if truth.same(*p)]
    rec = sum(1 for p in planted_true if p in pred) / max(1, len(planted_true))
    s_pred = {p for p in pred if p[0] in sample or p[1] in sample}
    s_ok = sum(1 for p in s_pred if truth.same(*p))
    return {"predicted_pairs": len(pred), "precision": len(ok) / max(1, len(pred)), "planted_recall": rec,
            "sample_recall": sum(1 for p in sample_truth_pairs if p in pred) / max(1, len(sample_truth_pairs)),
            "sample_precision": s_ok / max(1, len(s_pred)), "sample_pred_pairs": len(s_pred)}


# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", default="1000,50000", help="comma-separated corpus sizes")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each system per size (alternating)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench-dedup-vs-datatrove"))
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--datatrove-python", default=DT_PYTHON)
    ap.add_argument("--dt-bands", choices=["same", "default"], default="same",
                    help="DataTrove's bands x rows: reelforge's 16 x 8 (same), or DataTrove's 14 x 8")
    ap.add_argument("--truth-sample", type=int, default=500, help="documents whose exact neighbours are searched")
    ap.add_argument("--only", choices=["both", "reelforge", "datatrove"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from reelforge.curation.minhash import lsh_params

    assert lsh_params(THRESHOLD - 0.15, NUM_PERM) == (BANDS, ROWS), lsh_params(THRESHOLD - 0.15, NUM_PERM)
    if args.only != "reelforge":
        ensure_datatrove(args.datatrove_python)
    dt_bands, dt_rows = (BANDS, ROWS) if args.dt_bands == "same" else (14, 8)
    os.makedirs(args.work, exist_ok=True)
    pool = text_pool(args.work)
    results = []
    for n in [int(x) for x in args.docs.split(",") if x]:
        cdir = os.path.join(args.work, f"corpus-{n}")
        t = time.time()
        corpus = build_corpus(n, pool, cdir, args.seed)
        planted_true = [tuple(sorted(p)) for p, s in zip(corpus["pairs"], corpus["sims"]) if s >= THRESHOLD]
        words = sum(v.count(" ") + 1 for v in corpus["texts"].values())
        print(f"\n== {n} documents, {words:,} words, {corpus['bytes'] / 1e6:.1f} MB in {corpus['files']} files; "
              f"{len(corpus['pairs'])} planted near-copies ({len(planted_true)} at Jaccard >= {THRESHOLD}, min "
              f"{min(corpus['sims'], default=0):.3f}); built in {time.time() - t:.0f}s", flush=True)
        times: dict[str, list[float]] = {"reelforge": [], "datatrove": []}
        phases: list[dict] = []
        dt_info = None
        for r in range(args.repeat):
            order = ["datatrove", "reelforge"] if r % 2 == 0 else ["reelforge", "datatrove"]
            for system in order:
                if args.only not in ("both", system):
                    continue
                if system == "datatrove":
                    sec, dt_info = run_datatrove(cdir, corpus["files"], os.path.join(cdir, "dt"), dt_bands, dt_rows,
                                                 args.datatrove_python)
                else:
                    sec, report = run_reelforge(cdir, os.path.join(cdir, "rf"), args.master)
                    phases.append({s["step"]: s["seconds"] for s in report["steps"]}
                                  | {"elapsed_s": report["elapsed_s"]})
                times[system].append(sec)
                print(f"   {system:10s} run {r + 1}: {sec:7.1f} s  {n / sec:9,.0f} docs/s"
                      + (f"   (report: {phases[-1]})" if system == "reelforge" else ""), flush=True)
        # quality, on the last run of each
        t = time.time()
        rng = random.Random(args.seed + 7)
        sample = set(rng.sample(corpus["ids"], min(args.truth_sample, n)))
        s_truth = sample_truth(corpus["ids"], corpus["texts"], sorted(sample))
        truth = Truth(corpus["texts"])
        for p in planted_true:
            truth.add(*p)
        for p in s_truth:
            truth.add(*p)
        preds = {}
        if times["reelforge"]:
            preds["reelforge"] = cluster_pairs(reelforge_clusters(os.path.join(cdir, "rf"), corpus["keys"]))
        if times["datatrove"]:
            preds["datatrove"] = cluster_pairs(datatrove_clusters(os.path.join(cdir, "dt")))
        for p in preds.values():
            truth.judge(p)
        quality = {k: score(v, truth, planted_true, sample, s_truth) for k, v in preds.items()}
        med = {k: statistics.median(v) for k, v in times.items() if v}
        row = {"docs": n, "words": words, "input_mb": round(corpus["bytes"] / 1e6, 1), "files": corpus["files"],
               "planted": len(corpus["pairs"]), "planted_true": len(planted_true),
               "sample": len(sample), "sample_true_pairs": len(s_truth),
               "seconds": times, "median_s": med, "docs_per_s": {k: n / v for k, v in med.items()},
               "ratio": (med["datatrove"] / med["reelforge"]) if len(med) == 2 else None,
               "quality": quality, "reelforge_phases_s": phases,
               "datatrove": {"bands": dt_bands, "rows": dt_rows, **(dt_info or {})}}
        results.append(row)
        print(f"   scored in {time.time() - t:.0f}s; sample of {len(sample)} docs has {len(s_truth)} true pairs")
        print(f"   {'system':10s} {'median s':>9s} {'docs/s':>9s} {'precision':>9s} {'planted R':>9s} "
              f"{'sample P':>9s} {'sample R':>9s} {'pairs':>7s}")
        for k in med:
            q = quality[k]
            print(f"   {k:10s} {med[k]:9.1f} {n / med[k]:9,.0f} {q['precision']:9.4f} {q['planted_recall']:9.4f} "
                  f"{q['sample_precision']:9.4f} {q['sample_recall']:9.4f} {q['predicted_pairs']:7d}")
        if row["ratio"]:
            print(f"   ratio (reelforge docs/s / DataTrove docs/s): {row['ratio']:.2f}")
    out = {"bench": "dedup_vs_datatrove", "threshold": THRESHOLD, "ngram": NGRAM, "num_perm": NUM_PERM,
           "bands": BANDS, "rows": ROWS, "master": args.master, "repeat": args.repeat, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
