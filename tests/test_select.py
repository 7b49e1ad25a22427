"""The `select` step (issue 15 part 3): each rule on a hand-made scored set (which response it takes,
what the derived sample holds, its `meta.select` and `parent_id`, why a prompt derives nothing), and a
Spark recipe whose ledger accounts for every derived sample (inputs + derived = kept + dropped)."""

from __future__ import annotations

import copy
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from reelforge.curation.schema import empty_row, rows_of
from reelforge.mixers.chat import validate_sample
from reelforge.mixers.selection import SelectStep

Q = [{"role": "user", "content": "What is 2 + 2?"}]


def _resp(text: str, passed: bool | None, reward: float | None, mode: str = "thinking", **rewards: float) -> dict:
    return {"text": text, "model": "m", "seed": 100 + len(text), "mode": mode, "temperature": 1.0, "top_p": 1.0,
            "params": None, "answer": None, "rewards": rewards or None, "reward": reward, "passed": passed}


def _row(i: int, responses: list | None, pass_rate: float | None = None, difficulty: str | None = None,
         messages: list | None = None, meta: dict | None = None, mode: str | None = None) -> dict:
    r = empty_row()
    r.update(id=f"p{i}", kind="conversation", source="s", source_key=f"k{i}", source_location="x",
             messages=copy.deepcopy(messages if messages is not None else Q), responses=responses,
             pass_rate=pass_rate, difficulty=difficulty, meta=json.dumps(meta) if meta else None, mode=mode,
             text_tokens=10, visual_tokens=0, tokens=10)
    return r


GOOD = "<think>2 plus 2 makes 4</think><answer>4</answer>"
GOOD2 = "<think>two and two is four</think><answer>4</answer>"
BAD = "<think>2 plus 2 makes 5</think><answer>5</answer>"
WORSE = "5 5 5 5 5 5 5 5"


def _select(rows: list[dict], **params) -> list[dict]:
    step = SelectStep(**params)
    step.setup()
    return step.process(copy.deepcopy(rows))


def _by_id(out: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in out}


def test_best_of_n_takes_the_best_passing_response():
    rows = [_row(0, [_resp(GOOD, True, 1.5), _resp(BAD, False, 0.5), _resp(GOOD2, True, 1.75),
                     _resp(WORSE, False, 0.25)], 0.5, "medium", meta={"answer": "4"}),
            _row(1, [_resp(GOOD, True, 1.5), _resp(GOOD2, True, 1.5)], 1.0, "solved"),  # equals: the first
            _row(2, [_resp(BAD, False, 0.5)], 0.0, "unsolved")]
    out = _by_id(_select(rows, rules="best_of_n"))
    assert len(out) == 5
    child = out["p0@best_of_n"]
    assert child["messages"] == [{"role": "user", "content": "What is 2 + 2? /think"},
                                 {"role": "assistant", "content": GOOD2}]
    assert (child["kind"], child["mode"], child["parent_id"], child["source_key"]) == \
        ("conversation", "thinking", "p0", "k0@best_of_n")
    assert child["responses"] is None and child["tokens"] is None and child["text_tokens"] is None
    assert (child["pass_rate"], child["difficulty"]) == (0.5, "medium")  # the prompt's, kept
    assert validate_sample(child) == []  # the thinking mode's chat format
    meta = json.loads(child["meta"])
    assert meta["answer"] == "4"  # the prompt's own metadata stays
    assert meta["select"] == {"rule": "best_of_n", "parent": "p0", "response": 2, "seed": 100 + len(GOOD2),
                              "model": "m", "reward": 1.75, "of": 4}
    assert out["p1@best_of_n"]["messages"][-1]["content"] == GOOD
    for pid in ("p0", "p1"):
        assert (out[pid]["drop_step"], out[pid]["drop_reason"]) == ("select", "split_into_selections")
    assert (out["p2"]["drop_reason"], out["p2"]["drop_detail"]) == ("no_passing_response",
                                                                   "none of 1 responses passed")
    # min_reward; keep_responses
    out = _by_id(_select(rows[:1], rules=["best_of_n"], best_of_n={"min_reward": 2.0}))
    assert out["p0"]["drop_reason"] == "no_passing_response" and "min_reward 2.0" in out["p0"]["drop_detail"]
    out = _by_id(_select(rows[:1], rules=["best_of_n"], keep_responses=True))
    assert out["p0@best_of_n"]["responses"] == rows[0]["responses"]


def test_pairs_best_passing_against_worst_failing():
    rows = [_row(0, [_resp(GOOD, True, 1.5), _resp(BAD, False, 0.5), _resp(GOOD2, True, 1.75),
                     _resp(WORSE, False, 0.25)], 0.5),
            _row(1, [_resp(GOOD, True, 1.5), _resp(GOOD2, True, 1.5)], 1.0),  # nothing failed
            _row(2, [_resp(BAD, False, 0.5), _resp(WORSE, False, 0.25)], 0.0),  # nothing passed
            _row(3, [_resp(GOOD, True, 1.5), _resp(GOOD, False, 0.5)], 0.5)]  # the same text both ways
    out = _by_id(_select(rows, rules="pairs"))
    pair = out["p0@pairs"]
    assert (pair["kind"], pair["chosen"], pair["rejected"], pair["mode"], pair["parent_id"]) == \
        ("preference", GOOD2, WORSE, "thinking", "p0")
    assert pair["messages"] == [{"role": "user", "content": "What is 2 + 2? /think"}]
    sel = json.loads(pair["meta"])["select"]
    assert sel["rule"] == "pairs" and sel["rejected"] == "worst" and sel["below"] == 0.5
    assert sel["chosen_response"]["response"] == 2 and sel["rejected_response"]["response"] == 3
    assert sel["rejected_response"]["reward"] == 0.25
    assert out["p1"]["drop_detail"] == "no failing response" and out["p1"]["drop_reason"] == "no_pair"
    assert out["p2"]["drop_detail"] == "no passing response"
    assert out["p3"]["drop_detail"] == "the chosen and rejected responses are the same text"
    # a reward margin
    out = _by_id(_select(rows[:1], rules="pairs", pairs={"min_margin": 2.0}))
    assert out["p0"]["drop_reason"] == "no_pair" and "margin 1.5 < min_margin 2.0" in out["p0"]["drop_detail"]


def test_pairs_for_a_named_failure():
    """`rejected: repetition`: the rejected response fails on repetition (it may even be correct); the
    chosen one is the best passing response that does not."""
    loop = "4 4 4 4 4 4 4 4 4 4 4 4"
    rows = [_row(0, [_resp(loop, True, 1.6, "non_thinking", correct=1.0, repetition=0.0),
                     _resp("4", True, 1.5, "non_thinking", correct=1.0, repetition=1.0),
                     _resp("5", False, 0.5, "non_thinking", correct=0.0, repetition=1.0),
                     _resp("4, 4, 4 and 4", True, 1.5, "non_thinking", correct=1.0, repetition=0.3)], 0.75),
            _row(1, [_resp("4", True, 1.5, "non_thinking", correct=1.0, repetition=1.0),
                     _resp("5", False, 0.5, "non_thinking", correct=0.0, repetition=1.0)], 0.5),
            _row(2, [_resp(loop, True, 1.6, "non_thinking", correct=1.0, repetition=0.0)], 1.0)]
    out = _by_id(_select(rows, rules="pairs", pairs={"rejected": "repetition"}))
    pair = out["p0@pairs"]
    assert (pair["chosen"], pair["rejected"], pair["mode"]) == ("4", loop, "non_thinking")
    assert pair["messages"] == [{"role": "user", "content": "What is 2 + 2? /no_think"}]
    assert json.loads(pair["meta"])["select"]["rejected"] == "repetition"
    assert out["p1"]["drop_detail"] == "no response with repetition < 0.5"
    assert out["p2"]["drop_detail"] == "no passing response with repetition >= 0.5"
    # `format`, with its own threshold
    rows = [_row(0, [_resp(GOOD, True, 1.5, format=1.0), _resp("<think>4", True, 1.0, format=0.0)], 1.0)]
    out = _by_id(_select(rows, rules="pairs", pairs={"rejected": "format", "below": 1.0}))
    assert (out["p0@pairs"]["chosen"], out["p0@pairs"]["rejected"]) == (GOOD, "<think>4")


def test_rl_prompts_and_difficulty_keep_prompts_with_their_reference():
    conv = Q + [{"role": "assistant", "content": "The answer is 4."}]
    rows = [_row(0, [_resp("a", False, 0.0)] * 4, 0.0, "unsolved", meta={"answer": 4}),
            _row(1, [_resp("a", True, 1.0)] + [_resp("b", False, 0.0)] * 3, 0.25, "hard",
                 meta={"answer": ["4", "four"]}),
            _row(2, [_resp("a", True, 1.0)] * 2 + [_resp("b", False, 0.0)] * 2, 0.5, "medium", messages=conv),
            _row(3, [_resp("a", True, 1.0)] * 4, 1.0, "solved", meta={"answer": True}),
            _row(4, None, None, None)]  # not scored: passes untouched
    out = _by_id(_select(rows, rules="rl_prompts"))
    assert set(out) == {"p0", "p1", "p2", "p3", "p4", "p1@rl_prompts", "p2@rl_prompts"}
    assert out["p4"]["drop_step"] is None and out["p4"]["responses"] is None
    assert out["p0"]["drop_reason"] == "pass_rate_out_of_range" and out["p3"]["drop_reason"] == "pass_rate_out_of_range"
    a, b = out["p1@rl_prompts"], out["p2@rl_prompts"]
    assert a["messages"] == [{"role": "user", "content": "What is 2 + 2? /think"},
                             {"role": "assistant", "content": "4"}]
    assert b["messages"][-1] == {"role": "assistant", "content": "The answer is 4."}  # the conversation's own
    assert (a["kind"], a["pass_rate"], a["difficulty"], a["responses"]) == ("conversation", 0.25, "hard", None)
    assert json.loads(a["meta"])["select"] == {"rule": "rl_prompts", "parent": "p1", "min_pass": 0.0, "max_pass": 1.0,
                                               "pass_rate": 0.25, "reference": True}
    out = _by_id(_select(rows, rules="rl_prompts", rl_prompts={"min_pass": 0.3, "max_pass": 0.9}))
    assert {k for k in out if "@" in k} == {"p2@rl_prompts"}

    out = _by_id(_select(rows, rules="difficulty", difficulty={"keep": ["hard", "medium"]}))
    assert {k for k in out if "@" in k} == {"p1@difficulty", "p2@difficulty"}
    assert json.loads(out["p1@difficulty"]["meta"])["select"]["bucket"] == "hard"
    assert (out["p0"]["drop_reason"], out["p0"]["drop_detail"]) == ("difficulty_not_kept",
                                                                     "bucket unsolved is not kept")
    out = _by_id(_select(rows, rules="difficulty", difficulty={"drop": "solved"}))
    assert {k for k in out if "@" in k} == {"p0@difficulty", "p1@difficulty", "p2@difficulty"}
    assert out["p0@difficulty"]["messages"][-1] == {"role": "assistant", "content": "4"}
    assert out["p3"]["drop_reason"] == "difficulty_not_kept"


def test_several_rules_derive_several_samples():
    rows = [_row(0, [_resp(GOOD, True, 1.5), _resp(BAD, False, 0.5)], 0.5, "medium"),
            _row(1, [_resp(BAD, False, 0.5)], 0.0, "unsolved")]
    out = _by_id(_select(rows, rules=["best_of_n", "pairs", "rl_prompts"]))
    assert {k for k in out if "@" in k} == {"p0@best_of_n", "p0@pairs", "p0@rl_prompts"}
    assert out["p0"]["drop_detail"] == "3 derived: best_of_n, pairs, rl_prompts"
    assert out["p1"]["drop_reason"] == "not_selected"
    assert out["p1"]["drop_detail"] == ("best_of_n: no_passing_response (none of 1 responses passed); pairs: no_pair "
                                        "(no passing response); rl_prompts: pass_rate_out_of_range (pass rate 0 not in "
                                        "(0.0, 1.0))")


@pytest.mark.parametrize("params, says", [
    ({}, "`rules` names what to derive"), ({"rules": ["best"]}, "distinct names among"),
    ({"rules": ["pairs", "pairs"]}, "distinct names"), ({"rules": "pairs", "pairs": {"chosen": "x"}}, "takes rejected"),
    ({"rules": "pairs", "best_of_n": {"min_reward": 1}}, "is not among `rules`"),
    ({"rules": "rl_prompts", "rl_prompts": {"min_pass": 0.8, "max_pass": 0.2}}, "min_pass < max_pass"),
    ({"rules": "difficulty"}, "either `keep` or `drop`"),
])
def test_bad_parameters_are_one_sentence(params, says):
    with pytest.raises(ValueError, match=says):
        SelectStep(**params)


# -- in Spark: the ledger accounts for every derived sample -------------------------------------------------------

@pytest.mark.spark
def test_select_in_a_recipe_balances_the_ledger(spark, tmp_path):
    from test_reward import _plant_step  # plants meta.planted as non-thinking responses
    from test_sample import read_shards

    import reelforge.mixers.reward  # noqa: F401 - registers the steps (the recipe loader's step list)
    import reelforge.mixers.selection  # noqa: F401
    from reelforge.jobs.cli import main
    from reelforge.mixers.stats import read_sample_stats

    _plant_step()
    recs = [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4",
         "planted": ["4", "5", "four", "4 4 4 4 4 4 4 4 4 4 4 4"]},  # pass rate 0.5: best_of_n, pairs, rl_prompts
        {"messages": [{"role": "user", "content": "Pick: (A) red (B) blue"}], "answer": "B", "planted": ["B", "B"]},
        {"messages": [{"role": "user", "content": "Is it raining?"}], "answer": "no", "planted": ["Yes.", "Yes"]},
        {"text": "a plain caption document, not a prompt"},  # not scored: passes both steps untouched
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = {"name": "select", "seed": 0, "sources": [{"name": "p", "format": "jsonl", "path": "p.jsonl"}],
              "steps": [{"plant_responses": {}}, {"reward": {"kinds": ["conversation"]}},
                        {"select": {"rules": ["best_of_n", "pairs", "rl_prompts"]}}],
              "output": {"path": "out", "shards": {"max_samples": 100, "shuffle": False}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    assert main(["run", str(tmp_path / "r.yaml"), "--out", out]) == 0

    report = json.load(open(os.path.join(out, "report.json")))
    # prompt 1: 3 derived; prompt 2 (all pass): best_of_n only; prompt 3 (none pass): nothing
    assert (report["inputs"], report["derived"], report["kept"], report["dropped"]) == (4, 4, 5, 3)
    assert report["balanced"]
    step = next(s for s in report["steps"] if s["step"] == "select")
    assert (step["in"], step["dropped"], step["derived"], step["out"]) == (4, 3, 4, 5)
    assert step["reasons"] == {"split_into_selections": 2, "not_selected": 1}

    ledger = rows_of(pq.read_table(os.path.join(out, "ledger")))
    derived = {r["id"]: r for r in ledger if r["parent_id"]}
    parents = {r["source_key"]: r for r in ledger if not r["parent_id"]}
    p1, p2 = parents["p.jsonl:1"]["id"], parents["p.jsonl:2"]["id"]
    assert set(derived) == {f"{p1}@best_of_n", f"{p1}@pairs", f"{p1}@rl_prompts", f"{p2}@best_of_n"}
    assert all(r["fate"] == "kept" for r in derived.values()) and len({r["id"] for r in ledger}) == 8
    assert parents["p.jsonl:3"]["reason"] == "not_selected" and parents["p.jsonl:4"]["fate"] == "kept"

    shards = read_shards(out)
    pair = shards[f"{p1}@pairs"]
    assert (pair["chosen"], pair["rejected"], pair["parent_id"]) == ("4", "5", p1)  # worst failing: the first 0
    assert json.loads(pair["meta"])["select"]["rejected_response"]["response"] == 1
    assert shards[f"{p1}@rl_prompts"]["messages"][-1] == {"role": "assistant", "content": "4"}
    assert shards[f"{p2}@best_of_n"]["messages"] == [{"role": "user", "content": "Pick: (A) red (B) blue /no_think"},
                                                     {"role": "assistant", "content": "B"}]
    table = {r["id"]: r for r in rows_of(read_sample_stats(out))}
    assert table[f"{p1}@pairs"]["parent_id"] == p1 and table[f"{p1}@rl_prompts"]["pass_rate"] == 0.5
