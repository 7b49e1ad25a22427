"""The `reward` step (issue 15 part 2): rule rewards against a hand-labelled table, the reference
convention and its explicit `no_reference` fate, pass rate and difficulty buckets, the weighted
total, the optional VLM judge on the tiny local model, and a Spark run whose rewards reach the shards.

The PLANTED table below was written by hand from the rules in mixers/reward.py's docstring (and
filters.alignment's format_consistency / repetition_score, mixers.chat's grammars), not computed by
the code: a failing row is a disagreement to resolve, not a number to copy."""

from __future__ import annotations

import copy
import glob
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from reelforge.curation.schema import empty_row, rows_of
from reelforge.mixers.reward import (
    RewardStep,
    difficulty_of,
    extract_answer,
    reference_of,
    rule_rewards,
)

Q = [{"role": "user", "content": "What is the answer?"}]
IMG_Q = [{"role": "user", "content": "<image>\nWhat is written on the sign?"}]
VID_Q = [{"role": "user", "content": "<video>\nWhen does the ball fall? /no_think"}]
CODE = "<code>\n```python\nimg = image.crop((0, 0, 10, 10))\n```\n</code><sandbox_output><image></sandbox_output>"
BAD_CODE = "<code>\n```python\nimg = image.crop((0, 0\n```\n</code><sandbox_output><image></sandbox_output>"
T = "<|clip_time_start|>"
E = "<|clip_time_end|>"

# (case, reference, mode, prompt, response, correct, format, consistency, repetition)
PLANTED = [
    # choices
    ("choice right, thinking", "B", "thinking", Q,
     "<think>Option B matches the picture, so the answer is B.</think><answer>B</answer>", 1, 1, 1, 1),
    ("choice wrong, thinking", "B", "thinking", Q,
     "<think>Option C matches the picture, so the answer is C.</think><answer>C</answer>", 0, 1, 1, 1),
    ("choice wrong, reasoning says B", "B", "thinking", Q,
     "<think>The answer is B.</think><answer>C</answer>", 0, 1, 0, 1),
    ("choice reasoning (A), answer B", "B", "thinking", Q,
     "<think>Therefore (A).</think><answer>B</answer>", 1, 1, 0, 1),
    ("bare letter", "B", "non_thinking", Q, "B", 1, 1, 1, 1),
    ("lower-case bracketed letter", "B", "non_thinking", Q, "(b)", 1, 1, 1, 1),
    ("the answer is (B).", "B", "non_thinking", Q, "The answer is (B).", 1, 1, 1, 1),
    ("letter then text", "B", "non_thinking", Q, "B. Paris", 1, 1, 1, 1),
    ("bracketed reference", "(B)", "non_thinking", Q, "B", 1, 1, 1, 1),
    ("no letter", "B", "non_thinking", Q, "I am not sure.", 0, 1, 1, 1),
    ("two letters, no choice", "B", "non_thinking", Q, "A or B", 0, 1, 1, 1),
    ("template thinking form", "D", "thinking", Q,
     "<think>\nCounting the options, D fits.\n</think>\n\nD", 1, 1, 1, 1),
    ("lower-case reference is a string", "c", "non_thinking", Q, "C", 1, 1, 1, 1),
    # numbers
    ("number right", "4", "thinking", Q, "<think>2 + 2 = 4</think><answer>4</answer>", 1, 1, 1, 1),
    ("number wrong, reasoning 4", "4", "thinking", Q, "<think>2 + 2 = 4</think><answer>5</answer>", 0, 1, 0, 1),
    ("within relative tolerance", "3.14159", "non_thinking", Q, "3.14", 1, 1, 1, 1),
    ("outside relative tolerance", "3.14159", "non_thinking", Q, "3.1", 0, 1, 1, 1),
    ("thousands comma", "1000", "non_thinking", Q, "1,000", 1, 1, 1, 1),
    ("fraction", "0.5", "non_thinking", Q, "1/2", 1, 1, 1, 1),
    ("negative", "-3", "non_thinking", Q, "x = -3", 1, 1, 1, 1),
    ("number in a sentence", "12", "non_thinking", Q, "There are 12 apples.", 1, 1, 1, 1),
    ("last number counts", "12", "non_thinking", Q, "12 apples, or maybe 13", 0, 1, 1, 1),
    ("100.05 for 100", "100", "non_thinking", Q, "100.05", 1, 1, 1, 1),
    ("100.2 for 100", "100", "non_thinking", Q, "100.2", 0, 1, 1, 1),
    ("percent reference", "50%", "non_thinking", Q, "50", 1, 1, 1, 1),
    ("boxed", "7", "non_thinking", Q, "\\boxed{7}", 1, 1, 1, 1),
    ("thinking without newlines around the template", "7", "thinking", Q,
     "<think>3 + 4 = 7, so the result is 7</think>\n\nThe sum is 7.", 1, 0, 1, 1),
    ("comma answer, reasoning 1000", "1000", "thinking", Q,
     "<think>10 x 100 = 1000</think><answer>1,000</answer>", 1, 1, 1, 1),
    # yes / no
    ("yes first", "yes", "non_thinking", Q, "Yes, the light is on.", 1, 1, 1, 1),
    ("no for yes", "yes", "non_thinking", Q, "No.", 0, 1, 1, 1),
    ("no inside a sentence", "no", "non_thinking", Q, "I think the answer is no", 1, 1, 1, 1),
    ("yes and no: the first word", "no", "non_thinking", Q, "yes and no", 0, 1, 1, 1),
    ("yes/no consistent", "no", "thinking", Q,
     "<think>The door is open, so the answer is no.</think><answer>No</answer>", 1, 1, 1, 1),
    ("yes/no inconsistent", "no", "thinking", Q,
     "<think>The door is open, so the answer is yes.</think><answer>No</answer>", 1, 1, 0, 1),
    # strings
    ("normalised case and dot", "Paris", "non_thinking", Q, "paris.", 1, 1, 1, 1),
    ("normalised article", "the Eiffel Tower", "non_thinking", Q, "Eiffel tower", 1, 1, 1, 1),
    ("a sentence is not the string", "Paris", "non_thinking", Q, "The capital is Paris.", 0, 1, 1, 1),
    ("hyphen as space", "New York", "non_thinking", Q, "new-york", 1, 1, 1, 1),
    # malformed formats
    ("think never closed", "4", "thinking", Q, "<think>2 + 2 = 4<answer>4</answer>", 1, 0, 0, 1),
    ("thinking mode, bare answer", "4", "thinking", Q, "4", 1, 0, 1, 1),
    ("non-thinking mode, thinking form", "4", "non_thinking", Q,
     "<think>2 + 2 = 4</think><answer>4</answer>", 1, 0, 1, 1),
    ("template non-thinking form", "4", "non_thinking", Q, "<think>\n\n</think>\n\n4", 1, 1, 1, 1),
    ("empty reasoning", "4", "thinking", Q, "<think></think><answer>4</answer>", 1, 0, 0, 1),
    ("tag inside the answer", "4", "thinking", Q,
     "<think>2 + 2 = 4</think><answer><think>4</answer>", 1, 0, 0, 1),
    ("auto-think, direct", "4", "auto_think", Q,
     "<analysis>The sum needs one step. Therefore, /no_think mode is more appropriate.</analysis>4", 1, 1, 1, 1),
    ("auto-think without analysis", "4", "auto_think", Q, "4", 1, 0, 1, 1),
    ("auto-think says /think, answers directly", "4", "auto_think", Q,
     "<analysis>Adding needs care. Therefore, /think mode is more appropriate.</analysis>4", 1, 0, 1, 1),
    ("think-with-image", "STOP", "think_with_image", IMG_Q,
     f"<think>The sign is small; crop it.{CODE}The crop shows the word STOP.</think><answer>STOP</answer>",
     1, 1, 1, 1),
    ("think-with-image, code does not parse", "STOP", "think_with_image", IMG_Q,
     f"<think>Crop it.{BAD_CODE}It says STOP.</think><answer>STOP</answer>", 1, 0, 1, 1),
    ("think-with-image without a code turn", "STOP", "think_with_image", IMG_Q,
     "<think>The sign says STOP.</think><answer>STOP</answer>", 1, 0, 1, 1),
    ("video cites a time", "A", "video", VID_Q, f"A. The ball falls at {T}3-4{E}.", 1, 1, 1, 1),
    ("video cites no time", "A", "video", VID_Q, "A. The ball falls near the start.", 1, 0, 1, 1),
    ("video time past its end", "A", "video", VID_Q, f"A. It falls at {T}12-14{E}.", 1, 0, 1, 1),
    # looping answers
    ("a looping number", "4", "non_thinking", Q, "4 4 4 4 4 4 4 4 4 4 4 4", 1, 1, 1, 0),
    ("reasoning loops and never ends", "4", "thinking", Q,
     "<think>Let me check. Let me check. Let me check. Let me check.", 0, 0, 0, 0),
    ("repeated lines", "B", "non_thinking", Q, "Step one.\nStep one.\nStep one.\nB", 1, 1, 1, 0.5),
    ("repeated 4-grams (5 of 7 distinct)", "5", "non_thinking", Q,
     "one two three four five one two three four five", 0, 1, 1, 5 / 7),
]


@pytest.mark.parametrize("case", PLANTED, ids=[c[0] for c in PLANTED])
def test_rule_rewards_equal_the_hand_labelled_table(case):
    _, ref, mode, prompt, text, correct, fmt, consistency, repetition = case
    _, got = rule_rewards(text, [ref], mode, prompt, duration=10.0)
    want = {"correct": correct, "format": fmt, "consistency": consistency, "repetition": repetition}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), (k, got, want)


def test_the_planted_table_is_large_and_mixed():
    assert len(PLANTED) >= 40
    assert {c[2] for c in PLANTED} == {"thinking", "non_thinking", "auto_think", "think_with_image", "video"}
    for col in (5, 6, 7):
        assert {c[col] for c in PLANTED} == {0, 1}


def test_extracted_answers_are_typed():
    assert [rule_rewards(t, [r])[0] for t, r in (
        ("<think>x</think><answer>The answer is (C).</answer>", "B"), ("There are 1,000 of them.", "1000"),
        ("No, it is not.", "yes"), ("I am not sure.", "B"), ("Paris.", "Paris"))] == ["C", "1000", "no",
                                                                                       "I am not sure.", "Paris."]
    assert extract_answer("<think>never closed") == "" and extract_answer("a\n\nfinal line \n") == "final line"
    assert extract_answer("<analysis>x. Therefore, /think mode is more appropriate.</analysis><think>r</think>"
                          "<answer>A</answer>") == "A"
    # exact string matching, on request
    assert rule_rewards("paris", ["Paris"], "non_thinking", string_match="exact")[1]["correct"] == 0
    assert rule_rewards("Paris", ["Paris"], "non_thinking", string_match="exact")[1]["correct"] == 1
    # any of several accepted answers; a forced type reads "1" as a choice? no: as the number it is
    assert rule_rewards("NYC", ["New York", "NYC"])[1]["correct"] == 1
    assert rule_rewards("The answer is 2", ["2.0"], kind="number")[1]["correct"] == 1


def _row(i: int, meta: dict | None = None, messages: list | None = None, responses: list | None = None,
         mode: str | None = "non_thinking", media: list | None = None) -> dict:
    r = empty_row()
    r.update(id=f"p{i}", kind="conversation", source="s", source_key=f"k{i}", source_location="x",
             messages=messages if messages is not None else [{"role": "user", "content": "What is 2 + 2?"}],
             meta=json.dumps(meta) if meta is not None else None, mode=mode, media=media,
             responses=[{"text": t, "model": "m", "seed": j} for j, t in enumerate(responses or [])])
    return r


def test_where_the_reference_comes_from():
    user = {"role": "user", "content": "What is 2 + 2?"}
    assert reference_of(_row(0, {"answer": "4"})) == ["4"]
    assert reference_of(_row(0, {"answer": 4})) == ["4"] and reference_of(_row(0, {"answer": 0.5})) == ["0.5"]
    assert reference_of(_row(0, {"answer": True})) == ["yes"]
    assert reference_of(_row(0, {"answer": ["NYC", "New York", ""]})) == ["NYC", "New York"]
    final = [user, {"role": "assistant", "content": "<think>2 + 2 = 4</think><answer>4</answer>"}]
    assert reference_of(_row(0, None, final)) == ["4"]  # the final assistant turn's answer part
    assert reference_of(_row(0, {"answer": "5"}, final)) == ["5"]  # meta.answer first
    assert reference_of(_row(0, {"answer": "5"}, final), ("last_assistant", "meta.answer")) == ["4"]
    assert reference_of(_row(0, {"gold": "B"}), ("meta.gold",)) == ["B"]
    assert reference_of(_row(0, {"answer": ""}, [user])) is None
    assert reference_of(_row(0, None, [user, {"role": "assistant", "content": "<think>never done"}])) is None


def test_no_reference_and_no_responses_are_explicit():
    rows = [_row(0, None, responses=["4"]), _row(1, {"answer": "4"}, responses=[]), _row(2, {"answer": "4"},
                                                                                       responses=["4"])]
    out = RewardStep().process(copy.deepcopy(rows))
    assert (out[0]["drop_step"], out[0]["drop_reason"]) == ("reward", "no_reference")
    assert (out[1]["drop_step"], out[1]["drop_reason"]) == ("reward", "no_responses")
    assert out[2]["drop_step"] is None and out[2]["difficulty"] == "solved"

    kept = RewardStep(no_reference="keep", no_responses="keep").process(copy.deepcopy(rows))
    assert [r["drop_step"] for r in kept] == [None, None, None]
    r0 = kept[0]
    assert r0["difficulty"] == "no_reference" and r0["pass_rate"] is None
    (resp,) = r0["responses"]
    assert "correct" not in resp["rewards"] and resp["passed"] is None and resp["answer"] == "4"
    assert resp["reward"] == pytest.approx(0.25 * 3)  # format, consistency, repetition at their default weights
    assert kept[1]["pass_rate"] is None and kept[1]["difficulty"] is None  # untouched
    # a judge-free pass rule on the total still passes or fails a prompt without a reference
    r = RewardStep(no_reference="keep", pass_on="total", pass_threshold=0.5).process([copy.deepcopy(rows[0])])[0]
    assert r["responses"][0]["passed"] is True and r["pass_rate"] == 1.0 and r["difficulty"] == "no_reference"


def test_pass_rate_difficulty_buckets_and_weights():
    answers = ["4", "5", "4", "<think>loop", "4 4 4 4 4 4 4 4 4 4 4 4", "four"]  # right, wrong, right, -, loop, -
    row = _row(0, {"answer": "4"}, responses=answers)
    (r,) = RewardStep().process([row])
    assert [x["passed"] for x in r["responses"]] == [True, False, True, False, True, False]
    assert r["pass_rate"] == 0.5 and r["difficulty"] == "medium"
    w = {"correct": 1.0, "format": 0.25, "consistency": 0.25, "repetition": 0.25}
    for x in r["responses"]:
        assert x["reward"] == pytest.approx(sum(w[k] * x["rewards"][k] for k in w))
    # "4": every rule holds; the looping "4 4 ...": correct, but repetition 0
    assert r["responses"][0]["reward"] == 1.75 and r["responses"][4]["reward"] == 1.5
    # "<think>loop" in non-thinking mode: no answer, bad form, malformed tags; no repetition
    assert r["responses"][3]["rewards"] == {"correct": 0.0, "format": 0.0, "consistency": 0.0, "repetition": 1.0}

    # the recipe's weights and pass rule
    (r,) = RewardStep(weights={"correct": 2.0, "repetition": 1.0}, pass_on="total", pass_threshold=2.5).process(
        [_row(0, {"answer": "4"}, responses=answers)])
    assert [x["reward"] for x in r["responses"]] == [3.0, 1.0, 3.0, 1.0, 2.0, 1.0]
    assert [x["passed"] for x in r["responses"]] == [True, False, True, False, False, False]
    assert r["pass_rate"] == pytest.approx(1 / 3) and r["difficulty"] == "medium"

    # bucket edges: each bucket holds its lower edge; 0 and 1 are their own
    assert [difficulty_of(p) for p in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)] == [
        "unsolved", "hard", "medium", "medium", "easy", "easy", "solved"]
    step = RewardStep(difficulty_edges=[0.5], difficulty_names=["hard", "easy"])
    assert [difficulty_of(p, step.edges, step.names) for p in (0.25, 0.5)] == ["hard", "easy"]
    for n, want in ((0, "unsolved"), (1, "hard"), (3, "easy"), (4, "solved")):
        (r,) = step.process([_row(0, {"answer": "4"}, responses=["4"] * n + ["5"] * (4 - n))])
        assert r["difficulty"] == want and r["pass_rate"] == n / 4


def test_answer_type_and_mode_from_the_sample():
    # meta.answer_type forces a type; the response's own mode wins over the sample's
    row = _row(0, {"answer": "1", "answer_type": "string"}, responses=["1.0"])
    assert RewardStep().process([row])[0]["responses"][0]["rewards"]["correct"] == 0.0
    row = _row(0, {"answer": "1"}, responses=["1.0"])
    assert RewardStep().process([row])[0]["responses"][0]["rewards"]["correct"] == 1.0
    row = _row(0, {"answer": "4"}, responses=["4"], mode="thinking")
    assert RewardStep().process([row])[0]["responses"][0]["rewards"]["format"] == 0.0
    row["responses"][0].update(mode="non_thinking", rewards=None)
    assert RewardStep().process([row])[0]["responses"][0]["rewards"]["format"] == 1.0
    # neither says: the mode the response's form claims
    row = _row(0, {"answer": "4"}, responses=["<think>2 + 2 = 4</think><answer>4</answer>", "4"], mode=None)
    assert [x["rewards"]["format"] for x in RewardStep().process([row])[0]["responses"]] == [1.0, 1.0]


@pytest.mark.parametrize("params, says", [
    ({"no_reference": "skip"}, "no_reference"), ({"reference": ["answer"]}, "meta.<key>"),
    ({"difficulty_edges": [0.7, 0.3]}, "increasing"), ({"difficulty_names": ["a", "b"]}, "3 distinct"),
    ({"difficulty_names": ["hard", "solved", "easy"]}, "none of"), ({"weights": {"correct": "1"}}, "numbers"),
    ({"pass_on": "judge"}, "needs the judge"), ({"string_match": "fuzzy"}, "string_match")])
def test_bad_parameters_are_one_sentence(params, says):
    with pytest.raises(ValueError, match=says):
        RewardStep(**params)


# -- the optional judge, on the tiny local VLM ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    from reelforge.curation.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(str(tmp_path_factory.mktemp("vlm") / "tiny-qwen2_5-vl"))


def _image(path: str, seed: int) -> dict:
    Image.effect_noise((64, 48), 30 + 7 * seed).convert("RGB").save(path)
    return {"kind": "image", "uri": path, "member": None, "offset": None, "length": os.path.getsize(path)}


def test_the_judge_is_p_yes_from_next_token_logits(tiny_vlm, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    question = "Q: {question} | ref: {reference} | said: {answer} | {response}. Is it right? Answer yes or no."
    rows = [_row(i, {"answer": "4"}, [{"role": "user", "content": "<image>\nHow many dots? /no_think"}],
                 ["4", "5", "there are 4"][: i + 1], media=[_image(str(tmp_path / f"{i}.png"), i)]) for i in range(3)]
    rows.append(_row(3, {"answer": "yes"}, responses=["yes", "no"]))  # text only
    step = RewardStep(model=tiny_vlm, question=question, batch_size=2, device="cpu")
    step.setup()
    out = step.process(copy.deepcopy(rows))
    step.teardown()
    assert all(r["drop_step"] is None for r in out)

    proc = AutoProcessor.from_pretrained(tiny_vlm)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    tok = proc.tokenizer
    yes = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "yes")})
    no = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("No", "no")})
    judged = []
    for r in out:
        for resp in r["responses"]:
            q = "How many dots?" if r["media"] else "What is 2 + 2?"
            prompt = question.format(question=q, reference=json.loads(r["meta"])["answer"], answer=resp["answer"],
                                     response=resp["text"])
            content = ([{"type": "image"}] if r["media"] else []) + [{"type": "text", "text": prompt}]
            text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=False)
            kw = {"images": [Image.open(r["media"][0]["uri"]).convert("RGB")]} if r["media"] else {}
            inp = proc(text=[text], return_tensors="pt", **kw)
            with torch.no_grad():
                p = torch.softmax(model(**inp).logits[0, -1].double(), -1)
            want = float(p[yes].sum() / (p[yes].sum() + p[no].sum()))
            assert resp["rewards"]["judge"] == pytest.approx(want, abs=1e-5)
            assert resp["reward"] == pytest.approx(sum(w * resp["rewards"][k] for k, w in
                                                       {"correct": 1.0, "format": 0.25, "consistency": 0.25,
                                                        "repetition": 0.25, "judge": 0.25}.items()))
            judged.append(want)
    assert len(judged) == 8 and len({round(j, 6) for j in judged}) > 1

    # pass on the judge's P(yes); a medium the judge cannot read is a ledger line under `reward`
    step = RewardStep(model=tiny_vlm, pass_on="judge", pass_threshold=0.0, device="cpu")
    broken = _row(9, {"answer": "4"}, responses=["4"], media=[{**_image(str(tmp_path / "b.png"), 0),
                                                               "uri": str(tmp_path / "missing.png")}])
    step.setup()
    ok, bad = step.process([copy.deepcopy(rows[0]), broken])
    assert ok["pass_rate"] == 1.0 and ok["responses"][0]["passed"] is True
    assert bad["drop_step"] == "reward" and bad["drop_reason"] not in (None, "error")


# -- in Spark: a tiny recipe, its rewards in the shards ----------------------------------------------------

def _plant_step():
    """A test-only step standing in for the `sample` step: each prompt's responses come from
    `meta.planted` (defined here so Spark ships it to the workers by value)."""
    from reelforge.curation.step import RowStep, register_step

    @register_step("plant_responses")
    class Plant(RowStep):
        def process_row(self, row: dict) -> dict:
            meta = json.loads(row.get("meta") or "{}")
            row["responses"] = [{"text": t, "model": "planted", "seed": j, "mode": "non_thinking",
                                 "temperature": 1.0, "top_p": 1.0, "params": '{"n": 4}'}
                                for j, t in enumerate(meta.get("planted") or [])]
            return row

    return Plant


@pytest.mark.spark
def test_reward_step_in_a_recipe_reaches_the_shards(spark, tmp_path):
    import webdataset as wds

    import reelforge.mixers.reward  # noqa: F401 - registers `reward` (see README: the recipe loader's step list)
    from reelforge.jobs.cli import main
    from reelforge.mixers.stats import read_sample_stats
    from reelforge.training.loader import Encoder

    _plant_step()
    recs = [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4",
         "planted": ["4", "5", "4", "4 4 4 4 4 4 4 4 4 4 4 4"]},
        {"messages": [{"role": "user", "content": "Pick one: (A) red (B) blue"},
                      {"role": "assistant", "content": "B"}], "planted": ["B", "A"]},
        {"messages": [{"role": "user", "content": "Is it raining?"}], "answer": "no", "planted": ["Yes."]},
        {"messages": [{"role": "user", "content": "Tell me a story."}], "planted": ["Once upon a time."]},
        {"messages": [{"role": "user", "content": "What is 3 + 3?"}], "answer": 6, "planted": []},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = {"name": "rewards", "seed": 0, "sources": [{"name": "p", "format": "jsonl", "path": "p.jsonl"}],
              "steps": [{"plant_responses": {}},
                        {"reward": {"difficulty_edges": [0.5], "difficulty_names": ["hard", "easy"]}}],
              "output": {"path": "out", "shards": {"max_samples": 100, "shuffle": False}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    assert main(["run", str(tmp_path / "r.yaml"), "--out", out]) == 0

    shards = {}
    for raw in wds.WebDataset(sorted(glob.glob(os.path.join(out, "shards", "*.tar"))), shardshuffle=False,
                              nodesplitter=None, workersplitter=None):
        s = Encoder.parse(raw)
        shards[s["source_key"]] = (s, json.loads(raw["json"]))
    assert set(shards) == {"p.jsonl:1", "p.jsonl:2", "p.jsonl:3"}
    s, obj = shards["p.jsonl:1"]
    assert [r["passed"] for r in s["responses"]] == [True, False, True, True] and s["pass_rate"] == 0.75
    assert s["difficulty"] == "easy" and [r["answer"] for r in s["responses"]] == ["4", "5", "4", "4"]
    assert s["responses"][3]["rewards"] == {"correct": 1.0, "format": 1.0, "consistency": 1.0, "repetition": 0.0}
    assert [r["reward"] for r in s["responses"]] == [1.75, 0.75, 1.75, 1.5]
    assert obj["responses"][0]["params"] == {"n": 4} and obj["responses"][0]["rewards"]["correct"] == 1.0
    s, _ = shards["p.jsonl:2"]  # the reference is the conversation's final assistant turn
    assert (s["pass_rate"], s["difficulty"]) == (0.5, "easy")
    s, _ = shards["p.jsonl:3"]
    assert (s["pass_rate"], s["difficulty"], s["responses"][0]["answer"]) == (0.0, "unsolved", "yes")

    table = {r["id"]: r for r in rows_of(read_sample_stats(out))}
    for s, _ in shards.values():
        assert (table[s["id"]]["pass_rate"], table[s["id"]]["difficulty"]) == (s["pass_rate"], s["difficulty"])
    ledger = {r["source_key"]: r for r in rows_of(pq.read_table(os.path.join(out, "ledger")))}
    assert (ledger["p.jsonl:4"]["step"], ledger["p.jsonl:4"]["reason"]) == ("reward", "no_reference")
    assert (ledger["p.jsonl:5"]["step"], ledger["p.jsonl:5"]["reason"]) == ("reward", "no_responses")
