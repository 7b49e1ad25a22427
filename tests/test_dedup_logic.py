"""The decisions of exact dedup, near dedup and leakage as plain functions: no Spark here.

The engine (`jobs/shuffles.py`) runs these same functions inside Spark tasks and only groups
and joins around them; tests/test_near_dedup.py and tests/test_pipeline.py check the result at
corpus scale, on local[2] and local-cluster.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random

from reelforge.curation.minhash import lsh_params
from reelforge.filters.dedup import ExactDedup, exact_duplicates, exact_key, media_key, normalised_text
from reelforge.filters.leakage import EVAL_PREFIX, is_eval, leak_drop, leak_pair, leaks
from reelforge.filters.near_dedup import (
    NearDedup,
    bit_bands,
    candidate_pairs,
    components,
    hamming,
    kept_of,
    near_duplicates,
    ordered_match,
    phash_band_keys,
    rank_key,
    text_length,
)


def row(rid: str, kind: str = "text", text: str | None = None, media=None, messages=None, quality=None, **kw):
    r = {"id": rid, "kind": kind, "text": text, "messages": messages, "chosen": None, "rejected": None,
         "media": media, "drop_step": None, "scores": None if quality is None else {"quality": quality}}
    r.update(kw)
    return r


def img(sha: str | None, phash: int | None = None, kind: str = "image") -> dict:
    return {"kind": kind, "sha256": sha, "phash": None if phash is None else [phash]}


# --- exact dedup ---------------------------------------------------------------------------------

def test_normalised_text_is_case_and_space_blind():
    msgs = [{"role": "user", "content": "What  is\tRED?"}, {"role": "assistant", "content": "The Car."}]
    r = row("a", "conversation", text=None, messages=msgs, chosen="  Yes ")
    # text, messages, chosen, rejected joined by newlines; Java's \\s runs -> one space; trimmed; lower case
    assert normalised_text(r) == " user: what is red? assistant: the car. yes".strip()
    assert normalised_text(row("b", text="A\u00a0b")) == "a\u00a0b"  # NBSP is not Java's \\s: kept
    assert normalised_text(row("c", messages=[{"role": "user", "content": None}])) == ""  # no content: no line


def test_exact_key_media_only_kinds_match_on_bytes():
    a = row("a", "image_text", text="a cat", media=[img("s1")])
    b = row("b", "image_text", text="another caption", media=[img("s1")])
    assert exact_key(a) == exact_key(b) == "m:s1"
    q1 = row("q1", "conversation", media=[img("s1")], messages=[{"role": "user", "content": "Q1"}])
    q2 = row("q2", "conversation", media=[img("s1")], messages=[{"role": "user", "content": "Q2"}])
    assert exact_key(q1) != exact_key(q2)  # two questions about one image are not duplicates
    t = row("t", text="Hello  World")
    want = "t:|" + hashlib.sha256(b"hello world").hexdigest()
    assert exact_key(t) == want and exact_key(row("u", text=" hello world\n")) == want
    assert media_key(row("m", media=[img("x"), img(None), img("y")])) == "x,y"
    assert media_key(row("n", media=[])) is None
    # a caption pair whose media have no sha256 yet still keys on (empty) media, as before
    assert exact_key(row("e", "image_text", media=[img(None)])) == "m:"


def test_exact_duplicates_keep_the_smallest_id():
    rows = [row("c", text="same"), row("a", text="SAME "), row("b", text="other"),
            row("d", "image_text", media=[img("s")]), row("e", "image_text", text="x", media=[img("s")]),
            row("f", text="same", drop_step="quality")]
    got = exact_duplicates(rows)
    assert sorted(got) == [("c", "a", "duplicate_text"), ("e", "d", "duplicate_media")]
    step = ExactDedup(media_only_kinds=["image_text"])
    assert step.shuffle == "dedup_exact" and step.key(rows[3]) == "m:s"


# --- near dedup: candidates ----------------------------------------------------------------------

def test_bit_bands_are_fixed_and_band_keys_find_close_hashes():
    a, b = bit_bands(), bit_bands()
    assert (a == b).all() and a.shape == (24, 12)
    assert all(len(set(band)) == 12 for band in a)
    rng = random.Random(0)
    h = rng.getrandbits(64)
    keys = phash_band_keys(h, a)
    assert len(keys) == 24 and all(k >> 32 == i for i, k in enumerate(keys))
    close = h ^ (1 << 5) ^ (1 << 40)
    assert hamming(h, close) == 2
    untouched = [i for i, band in enumerate(a) if 5 not in band and 40 not in band]
    shared = [i for i, (x, y) in enumerate(zip(keys, phash_band_keys(close, a))) if x == y]
    assert shared == untouched and len(shared) >= 10  # a band matches iff no flipped bit is in it
    far = h ^ ((1 << 64) - 1)
    assert not set(keys) & set(phash_band_keys(far, a))
    assert phash_band_keys(-1, a) == phash_band_keys((1 << 64) - 1, a)  # signed longs from Arrow


def test_ordered_match_is_an_lcs_over_the_shorter():
    a = [0, 1 << 20, 1 << 40, (1 << 63) | 7]
    assert ordered_match(a, a, 0) == 1.0
    assert ordered_match(a, a[::-1], 0) == 0.25  # order matters
    assert ordered_match(a[:2], a, 0) == 1.0
    assert ordered_match([], a, 10) == 0.0


def _docs(n: int = 12, words: int = 120, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def test_text_keys_and_edges_match_exact_jaccard():
    step = NearDedup(threshold=0.8)
    docs = _docs()
    twin = docs[0].split()
    twin[-1] = "changed"  # one word of 120: Jaccard of 5-gram sets ~0.96
    rows = [row(f"d{i:02d}", text=t) for i, t in enumerate(docs)] + [row("twin", text=" ".join(twin)),
                                                                     row("empty", text="")]
    keys = step.key_rows(rows)
    bands, _ = lsh_params(step.threshold - step.candidate_margin, step.num_perm)
    per_id = {}
    for k in keys:
        assert k["space"] == "t" and k["payload"] is None
        per_id[k["id"]] = per_id.get(k["id"], 0) + 1
    assert "empty" not in per_id and set(per_id.values()) == {bands}  # no shingles: no keys
    assert step.edges(rows) == [("d00", "twin")]
    assert step.is_edge("t", None, None, rows[0], rows[-2])
    assert not step.is_edge("t", None, None, rows[0], rows[1])
    assert step.exact_jaccard(docs[0], docs[0]) == 1.0


def test_image_and_video_keys_and_edges():
    step = NearDedup(image_hamming=10, video_match=0.5)
    rng = random.Random(7)
    h = rng.getrandbits(64)
    near = h ^ 0b1011  # 3 bits
    frames = [rng.getrandbits(64) for _ in range(6)]
    rows = [row("i1", "image_text", media=[img("a", h)]), row("i2", "image_text", media=[img("b", near)]),
            row("i3", "image_text", media=[img("c", h ^ ((1 << 64) - 1))]),
            row("v1", "video_text", media=[{"kind": "video", "sha256": "v", "phash": frames}]),
            row("v2", "video_text", media=[{"kind": "video", "sha256": "w", "phash": frames[:4] + [0, 0]}])]
    keys = step.key_rows(rows)
    assert {k["space"] for k in keys} == {"i", "v"}
    assert all(k["payload"] == [h] for k in keys if k["id"] == "i1")
    assert step.edges(rows) == [("i1", "i2"), ("v1", "v2")]
    assert step.is_edge("i", [h], [near]) and not step.is_edge("i", [h], [h ^ ((1 << 11) - 1)])
    # leakage keys every image of every sample as "<id>|<index>"
    multi = row("m", "interleaved", text="", media=[img("a", h), {"kind": "video", "phash": frames}, img("b", near)])
    ids = {k["id"] for k in step.key_rows([multi], every_image=True)}
    assert ids == {"m|0", "m|2"}


def test_candidate_pairs_cap_big_buckets():
    keys = [{"id": f"n{i}", "space": "t", "key": "k"} for i in range(5)] + \
           [{"id": "a", "space": "i", "key": "z"}, {"id": "b", "space": "i", "key": "z"},
            {"id": "a", "space": "t", "key": "solo"}]
    assert len(candidate_pairs(keys, max_bucket=5)) == 10 + 1
    capped = candidate_pairs(keys, max_bucket=4)
    assert {p for p in capped if p[0] == "t"} == {("t", "n0", f"n{i}") for i in range(1, 5)}
    assert candidate_pairs(keys, 64, across=lambda x: x == "a") == {("i", "a", "b")}


# --- near dedup: clusters and the keep rule -------------------------------------------------------

def _union_find_brute(edges):
    nodes = sorted({x for e in edges for x in e if e[0] != e[1]})
    adj = {n: set() for n in nodes}
    for a, b in edges:
        if a != b:
            adj[a].add(b)
            adj[b].add(a)
    out = {}
    for n in nodes:
        seen, todo = {n}, [n]
        while todo:
            for m in adj[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        out[n] = min(seen)
    return out


def test_components_match_brute_force_with_long_chains():
    rng = random.Random(1)
    chain = [(f"c{i:04d}", f"c{i + 1:04d}") for i in range(300)]
    rng.shuffle(chain)
    rand = [(f"n{rng.randrange(200):04d}", f"n{rng.randrange(200):04d}") for _ in range(150)]
    edges = chain + rand + [("x1", "x1")]
    got = components(edges)
    assert got == _union_find_brute(edges)
    assert got["c0300"] == "c0000" and "x1" not in got


def test_keep_rule_quality_then_length_then_id():
    a = row("a", text="short", quality=0.2)
    b = row("b", text="much longer text", quality=0.2)
    c = row("c", text="x", quality=0.9)
    d = row("d", text="much longer text", quality=None)  # missing quality ranks last
    assert kept_of([a, b, c, d]) == "c"
    assert kept_of([a, b, d]) == "b"
    assert kept_of([row("z", text="same"), row("y", text="same")]) == "y"
    assert kept_of([d, row("e", text="", quality=-1e300)]) == "e"
    assert kept_of([row("n", text="", quality=math.nan), c]) == "n"  # NaN sorts first, as in Spark
    assert rank_key(row("p", quality=0.0)) [:32] == rank_key(row("q", quality=-0.0))[:32]
    msgs = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "de"}]
    assert text_length(row("m", text="xy", messages=msgs)) == 7
    assert text_length(row("m", text="xy", messages=msgs + [{"role": "user", "content": None}])) == 2


def test_rank_key_sorts_like_the_rule_for_many_values():
    rng = random.Random(5)
    rows = [row(f"r{i:03d}", text="t" * rng.randrange(5), quality=rng.choice([None, -1.5, 0.0, 0.25, 1e9, -math.inf]))
            for i in range(200)]

    def rule(r):
        q = (r["scores"] or {}).get("quality")
        return (-(q if q is not None else -math.inf), -text_length(r), r["id"])

    assert sorted(rows, key=rank_key) == sorted(rows, key=rule)


def test_near_duplicates_on_a_list():
    rows = [row("a", text="x"), row("b", text="longer", quality=0.1), row("c", text="y"), row("d", text="z")]
    got = near_duplicates(rows, [("a", "b"), ("b", "c"), ("d", "d")])
    assert got == [("a", "b"), ("c", "b")]


# --- leakage -------------------------------------------------------------------------------------

def test_leak_decisions():
    ev = f"{EVAL_PREFIX}mmbench:q.jsonl:3"
    assert is_eval(ev) and not is_eval("abc")
    assert leak_pair("abc|1", f"{ev}|0") == ("abc", ev)
    assert leak_pair(ev, "abc") == ("abc", ev)
    assert leak_drop(ev) == ("leak:mmbench", "near-duplicate of evaluation item mmbench:q.jsonl:3")
    other = f"{EVAL_PREFIX}alpha:x:1"
    edges = [("abc|0", ev), (other, "abc"), ("t1", "t2"), (ev, other), ("zz", ev)]
    assert leaks(edges) == {"abc": other, "zz": ev}


def test_leakage_edges_only_across():
    step = NearDedup(threshold=0.8)
    doc = _docs(1)[0]
    rows = [row("t1", text=doc), row("t2", text=doc), row(f"{EVAL_PREFIX}b:k:1", text=doc)]
    assert step.edges(rows, every_image=True, across=is_eval) == [("eval:b:k:1", "t1"), ("eval:b:k:1", "t2")]
    assert [p for p in itertools.combinations(sorted(r["id"] for r in rows), 2)] != []
