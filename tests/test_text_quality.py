"""The text_quality step: each Gopher / C4 / language rule on planted texts, thresholds from the
recipe, the score's contract, the profiles, DataTrove agreement (when a DataTrove venv is at
hand), and one Spark run through the recipe (ledger reasons, scores in the shard JSON)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from reelforge.curation.errors import RecipeError
from reelforge.curation.schema import get_score
from reelforge.filters.text_quality import (
    CAPTION_DEFAULTS,
    TextQuality,
    scored_parts,
    words_of,
)

GOOD = ("The history of the river valley is long and complicated. Farmers settled along the banks in the early "
        "years, and they built small villages that grew into market towns over the following centuries. The water "
        "was used for irrigation, for transport and for power, and the mills that stood along its course were "
        "famous throughout the region.\n\n"
        "In the nineteenth century the arrival of the railway changed everything. Goods that had travelled by "
        "barge now moved by train, and the old river ports declined. Some of the warehouses were turned into "
        "homes, while others were left to decay. Today the valley is known for its walking trails and its quiet "
        "villages, which attract visitors from across the country.")
KEYWORD_SPAM = " ".join(
    "cheap shoes discount sneakers buy online free shipping best price running trainers leather boots sandals "
    "heels loafers slippers outlet store sale clearance deals coupon voucher promo fashion footwear brand designer "
    "luxury comfortable durable waterproof lightweight breathable stylish trendy classic modern casual formal "
    "sport athletic hiking walking jogging training gym basketball tennis soccer".split())
REPEATED_SPAM = "buy cheap shoes now " * 30
HASHTAGS = GOOD + "\n\n" + " ".join(
    f"#{w}" for w in "travel river valley nature hiking trails villages history railway mills photo instagood "
    "sunset weekend explore adventure wanderlust landscape countryside europe holiday".split())
BULLETS = "\n".join(f"- {s}." for s in [
    "Preheat the oven to a moderate temperature before you start", "Mix the flour with the sugar and the butter",
    "Add two eggs and stir the batter until it is smooth", "Pour the batter into a greased tin of medium size",
    "Bake the cake for forty minutes and check it with a knife", "Let the cake cool on a rack before serving it",
    "Dust the top with a little sugar and cut it into slices", "Keep what is left in a tin with a tight lid"])
REPEATED_LINES = "\n".join(["Click here to read the full article about the river valley."] * 5 + GOOD.split(". "))
SHORT = "The river is quiet today."
GERMAN = ("Die Geschichte des Flusstals ist lang und kompliziert. Bauern siedelten sich in den frühen Jahren an den "
          "Ufern an und bauten kleine Dörfer, die im Laufe der folgenden Jahrhunderte zu Marktstädten wuchsen. Das "
          "Wasser wurde für die Bewässerung, für den Transport und für die Energie genutzt, und die Mühlen an seinem "
          "Lauf waren in der ganzen Region berühmt. Im neunzehnten Jahrhundert veränderte die Ankunft der Eisenbahn "
          "alles. Waren, die mit dem Kahn gereist waren, fuhren nun mit dem Zug, und die alten Flusshäfen verfielen.")
ELLIPSES = GOOD + "\n" + "\n".join(["See the photographs of the old mills...", "Our guide to the trails goes on...",
                                    "The story of the railway station continues…", "More about the quiet villages..."])
NUMBERS = GOOD + "\n\n" + "\n".join(" | ".join(str(i * j) for j in range(1, 9)) for i in range(1, 12))
LOREM = GOOD + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor."
CODE = GOOD + '\n\nThe configuration is written as follows: {"river": 1, "valley": 2}.'
NO_PUNCTUATION = GOOD.replace(".", "")

PLANTED = [
    (KEYWORD_SPAM, "gopher_stop_words"),
    (REPEATED_SPAM, "gopher_top_ngram"),
    (HASHTAGS, "gopher_symbol_ratio"),
    (BULLETS, "gopher_bullets"),
    (REPEATED_LINES, "gopher_dup_line"),
    (SHORT, "gopher_short"),
    (GERMAN, "lang_mismatch"),
    (ELLIPSES, "gopher_ellipsis_lines"),
    (NUMBERS, "gopher_alpha"),
    (LOREM, "c4_lorem_ipsum"),
    (CODE, "c4_curly_bracket"),
    (NO_PUNCTUATION, "c4_sentences"),
]


@pytest.fixture(scope="module")
def step() -> TextQuality:
    s = TextQuality()
    s.setup()
    return s


def _row(kind: str = "text", text: str | None = None, messages=None, meta=None, chosen=None) -> dict:
    return {"id": "x", "kind": kind, "source": "s", "source_key": "k", "text": text, "messages": messages,
            "chosen": chosen, "meta": meta, "drop_step": None, "drop_reason": None, "drop_detail": None}


def test_good_english_prose_passes_with_a_high_score(step):
    v = step.judge(GOOD)
    assert v.passed and v.reason is None and 0.5 <= v.score <= 1.0
    assert v.score > 0.9 and (v.lang, round(v.lang_score, 2)) == ("en", 1.0)
    assert {c.reason for c in v.checks} >= {"gopher_short", "gopher_dup_line", "gopher_top_ngram", "c4_sentences",
                                            "gopher_stop_words", "lang_low_score"}


@pytest.mark.parametrize("text,reason", PLANTED, ids=[r for _, r in PLANTED])
def test_each_planted_text_fails_with_its_own_reason(step, text, reason):
    v = step.judge(text)
    assert not v.passed and v.reason == reason, v.detail
    assert 0.0 <= v.score < 0.5
    row = step.process_row(_row(text=text))
    assert (row["drop_step"], row["drop_reason"]) == ("text_quality", reason)
    assert row["drop_detail"].startswith("text profile: ")
    assert get_score(row, "quality") == pytest.approx(v.score, abs=1e-6)


def test_details_name_the_measured_value_the_field_and_the_threshold(step):
    assert step.judge(SHORT).detail.startswith("words 5 < min_doc_words 50")
    assert "> max_symbol_word_ratio 0.1" in step.judge(HASHTAGS).detail
    assert "language de (1.000) not in languages ['en']" in step.judge(GERMAN).detail


@pytest.mark.parametrize("field,value,text,flips_to", [
    ("min_doc_words", 200, GOOD, "gopher_short"),  # GOOD has 118 words
    ("max_symbol_word_ratio", 0.2, HASHTAGS, None),
    ("max_bullet_lines_ratio", 1.0, BULLETS, None),
    ("min_stop_words", 0, KEYWORD_SPAM, "c4_sentences"),  # its next failing rule
    ("languages", ["en", "de"], GERMAN, "gopher_stop_words"),  # German passes the language, not the English list
    ("min_num_sentences", 12, GOOD, "c4_sentences"),  # GOOD has 7
])
def test_a_recipe_threshold_flips_the_decision(field, value, text, flips_to):
    before = TextQuality().judge(text)
    after = TextQuality(**{field: value}).judge(text)
    assert after.reason == flips_to and before.reason != flips_to


def test_zero_turns_a_rule_off_as_in_datatrove():
    assert TextQuality(max_symbol_word_ratio=0).judge(HASHTAGS).passed
    assert "gopher_symbol_ratio" not in {c.reason for c in TextQuality(max_symbol_word_ratio=0).judge(GOOD).checks}
    assert TextQuality(top_n_grams={}, dup_n_grams={}, min_stop_words=0, min_num_sentences=0).judge(
        REPEATED_SPAM).passed  # one line of repeats: only the n-gram rules (and stop words, C4) see it
    no_lang = TextQuality(lang_id=False).judge(GERMAN)
    assert no_lang.lang is None and no_lang.reason == "gopher_stop_words"


def test_score_contract_pass_is_at_least_half_fail_below_and_headroom_ranks():
    s = TextQuality()
    assert s.judge(GOOD).score > s.judge(GOOD.split("\n\n")[0] + " " + GOOD.split("\n\n")[1][:250] + ".").score
    fails = [s.judge(t).score for t, _ in PLANTED]
    assert max(fails) < 0.5 <= s.judge(GOOD).score
    # more rules failed, lower score
    assert s.judge(REPEATED_SPAM).score < s.judge(HASHTAGS).score


def test_score_only_keeps_everything_and_still_scores(step):
    s = TextQuality(mode="score_only")
    row = s.process_row(_row(text=KEYWORD_SPAM))
    assert row["drop_step"] is None and get_score(row, "quality") < 0.5
    row = s.process_row(_row(text=GOOD))
    assert row["drop_step"] is None and get_score(row, "quality") > 0.9


def test_language_lands_in_meta_json_and_other_meta_keys_survive(step):
    row = step.process_row(_row(text=GOOD, meta=json.dumps({"url": "https://example.com/a"})))
    meta = json.loads(row["meta"])
    assert meta["url"] == "https://example.com/a" and meta["lang"] == "en" and 0.99 <= meta["lang_score"] <= 1
    row = step.process_row(_row(text=GOOD))
    assert json.loads(row["meta"])["lang"] == "en"
    row = step.process_row(_row(text=GOOD, meta="[1, 2]"))  # not an object: left as it is
    assert row["meta"] == "[1, 2]"


def test_captions_use_the_caption_profile(step):
    assert CAPTION_DEFAULTS["min_doc_words"] == 3
    ok = step.process_row(_row("image_text", "a red circle and a blue square on a green background"))
    assert ok["drop_step"] is None and get_score(ok, "quality") > 0.5
    short = step.process_row(_row("image_text", "red circle"))
    assert short["drop_reason"] == "gopher_short"
    assert "caption profile: words 2 < min_doc_words 3" in short["drop_detail"]
    spam = step.process_row(_row("video_text", "sunset over the quiet beach with friends #sunset #beach"))
    assert spam["drop_reason"] == "gopher_symbol_ratio"
    # the text profile would have dropped the good caption (50 words)
    assert TextQuality(profiles={"image_text": "text"}).process_row(
        _row("image_text", "a red circle and a blue square on a green background"))["drop_reason"] == "gopher_short"
    # and the recipe tunes the caption profile on its own
    assert TextQuality(caption={"min_doc_words": 1}).process_row(_row("image_text", "red circle"))["drop_step"] is None


def test_conversations_are_judged_answer_by_answer(step):
    msgs = [{"role": "user", "content": "<image>\nWhat colour is the background?"},
            {"role": "assistant", "content": "The background is red."},
            {"role": "user", "content": "Is there a circle?"}, {"role": "assistant", "content": "Yes."}]
    parts, profile = scored_parts(_row("conversation", messages=msgs), step.profiles)
    assert parts == ["The background is red.", "Yes."] and profile == "chat"
    row = step.process_row(_row("conversation", messages=msgs))
    assert row["drop_step"] is None and get_score(row, "quality") >= 0.5
    bad = msgs + [{"role": "user", "content": "More?"},
                  {"role": "assistant", "content": "I think that the answer is right. " * 6}]
    row = step.process_row(_row("conversation", messages=bad))
    assert row["drop_reason"] == "gopher_dup_ngram" and row["drop_detail"].startswith("chat profile, answer 3 of 3")
    for answer in ("2", "B", "No"):  # too short for word statistics or language id: judged on the rest
        row = step.process_row(_row("conversation", messages=msgs[:1] + [{"role": "assistant", "content": answer}]))
        assert row["drop_step"] is None, (answer, row["drop_detail"])
    pref = step.process_row(_row("preference", messages=[{"role": "user", "content": "Which?"}], chosen="The first."))
    assert pref["drop_step"] is None and get_score(pref, "quality") is not None


def test_samples_without_text_or_with_an_unscored_kind_are_left_alone(step):
    row = step.process_row(_row("video_text", None))
    assert row["drop_step"] is None and get_score(row, "quality") is None
    s = TextQuality(profiles={"text": None})
    assert get_score(s.process_row(_row("text", SHORT)), "quality") is None


def test_recipe_mistakes_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="caption.bogus"):
        TextQuality(caption={"bogus": 1})
    with pytest.raises(ValueError, match="mode"):
        TextQuality(mode="drop")
    with pytest.raises(ValueError, match="profiles.movie"):
        TextQuality(profiles={"movie": "text"})
    with pytest.raises(ValueError, match="min_alpha_words_ratio"):
        TextQuality(min_alpha_words_ratio=1.5)
    with pytest.raises(ValueError, match="top_n_grams"):
        TextQuality(top_n_grams={"two": 0.2})
    from reelforge.jobs.recipe import load_recipe

    (tmp_path / "t.jsonl").write_text(json.dumps({"text": GOOD}) + "\n")
    for params, match in (({"min_doc_wrds": 3}, "min_doc_wrds"), ({"chat": {"min_doc_word": 1}}, "chat.min_doc_word")):
        recipe = {"name": "t", "sources": [{"name": "t", "format": "text", "path": "t.jsonl"}],
                  "steps": [{"text_quality": params}], "output": {"path": "out"}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        with pytest.raises(RecipeError, match=match):
            load_recipe(str(tmp_path / "r.yaml"))


def test_words_split_like_spacy_english():
    assert words_of("Hello, world. It's e.g. U.S. --help and/or (see http://x.org/a). don't e-mail 3.14") == [
        "Hello", ",", "world", ".", "It", "'s", "e.g.", "U.S.", "--help", "and/or", "(", "see", "http://x.org/a",
        ")", ".", "do", "n't", "e", "-", "mail", "3.14"]


PEER = os.path.join(os.path.dirname(__file__), "..", ".venv", "peers", "datatrove", "bin", "python")


def _datatrove_python() -> str:
    """DataTrove lives in its own venv (`make setup` builds .venv/peers/datatrove): its pins must
    not move the project's. A missing peer is a failed setup, not a reason to skip."""
    p = os.environ.get("DATATROVE_PYTHON", PEER)
    res = subprocess.run([p, "-c", "import datatrove, spacy"], capture_output=True, text=True) \
        if os.path.exists(p) else None
    assert res is not None and res.returncode == 0, f"no DataTrove peer at {p}: run `make setup`"
    return p


@pytest.mark.slow
def test_decisions_agree_with_datatrove_on_real_texts():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_text_quality as bench

    items = bench.machine_texts(limit=200, max_chars=20_000)
    texts = [t for _, t in items]
    assert len(texts) >= 150
    dt = bench.run_datatrove(_datatrove_python(), texts, repeats=1)
    agree = bench.agreement(dt["decisions"], bench.ours(texts, lang_id=False))
    print("agreement with datatrove on", len(texts), "texts:", agree)
    assert agree["all"] >= 0.95 and min(agree.values()) >= 0.93


@pytest.mark.spark
def test_spark_run_drops_to_the_ledger_and_scores_reach_the_shards(spark, tmp_path):
    import webdataset as wds

    from reelforge.curation.shards import parse_sample_json
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    docs = [GOOD, GOOD.replace("river", "canal"), KEYWORD_SPAM, HASHTAGS, GERMAN, SHORT]
    with open(tmp_path / "t.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    recipe = {"name": "tq", "seed": 0, "sources": [{"name": "t", "format": "text", "path": "t.jsonl"}],
              "steps": [{"text_quality": {"languages": ["en"]}}],
              "output": {"path": "out", "shards": {"max_samples": 100, "shuffle": False}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(str(tmp_path / "recipe.yaml"), out=out), spark=spark, log=lambda *a: None)
    assert rep["balanced"] and (rep["inputs"], rep["kept"], rep["dropped"]) == (6, 2, 4)

    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    dropped = {r["source_key"]: r for r in ledger if r["fate"] != "kept"}
    assert {k: (r["step"], r["reason"]) for k, r in dropped.items()} == {
        "t.jsonl:3": ("text_quality", "gopher_stop_words"), "t.jsonl:4": ("text_quality", "gopher_symbol_ratio"),
        "t.jsonl:5": ("text_quality", "lang_mismatch"), "t.jsonl:6": ("text_quality", "gopher_short")}
    assert "words 5 < min_doc_words 50" in dropped["t.jsonl:6"]["detail"]

    tars = sorted(glob.glob(os.path.join(out, "shards", "*.tar")))
    kept = [parse_sample_json(raw["json"], raw["__url__"])
            for raw in wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, workersplitter=None)]
    assert len(kept) == 2
    for s in kept:
        assert 0.9 < s["scores"]["quality"] <= 1.0
        meta = s["meta"] if isinstance(s["meta"], dict) else json.loads(s["meta"])
        assert meta["lang"] == "en"
