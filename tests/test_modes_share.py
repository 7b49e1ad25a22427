"""The `modes` step with shares per source: `sources: {math_cot: {thinking: 0.7, non_thinking: 0.3}}`.

Each sample's mode is drawn from hash(seed, id): on 10,000 samples the realised shares are within
1% of the asked ones, the draw is the same for any batch size or order and changes with the seed;
`emit: both` (or a list of modes) emits one derived copy per mode (same `parent_id`, id `<id>@<mode>`),
each valid in its mode's grammar; a Spark run's ledger balances and the copies reach the shards.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter

import pytest

from reelforge.curation.schema import alive, empty_row
from reelforge.mixers.chat import to_chat, validate_chat, validate_sample
from reelforge.mixers.modes import RenderModes, draw_mode, render

SHARES = {"math_cot": {"thinking": 0.7, "non_thinking": 0.3},
          "mixed": {"thinking": 0.2, "non_thinking": 0.5, "auto_think": 0.3}}


def _row(i: int, source: str = "math_cot", reasoning: bool = True, answer: str | None = None) -> dict:
    r = empty_row()
    meta = {"reasoning": f"There are {i} apples and {i} pears, so {2 * i} fruits."} if reasoning else {"n": i}
    msgs = [{"role": "user", "content": f"How many fruits are there in case {i}?"}]
    if answer != "":
        msgs.append({"role": "assistant", "content": answer or str(2 * i)})
    r.update(id=f"{source}-{i:05d}", kind="conversation", source=source, source_key=f"{source}.jsonl:{i}",
             source_location="x", messages=msgs, meta=json.dumps(meta), text_tokens=7, tokens=7)
    return r


def _assignment(rows: list[dict]) -> dict[str, str]:
    return {r["id"]: json.loads(r["meta"])["modes"]["drawn"] for r in rows}


def _ledger_balances(inputs: int, out: list[dict]) -> bool:
    derived = sum(r.get("parent_id") is not None for r in out)
    kept = sum(alive(r) for r in out)
    return inputs + derived == kept + (len(out) - kept) and len({r["id"] for r in out}) == inputs + derived


def _question(row: dict) -> str:
    """The last user turn without its /think or /no_think switch."""
    user = next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")
    return re.sub(r"\s*/(no_)?think$", "", user)


def test_realised_shares_within_one_percent_on_10k_samples():
    rows = [_row(i, src) for src in SHARES for i in range(10_000)]
    for seed in (0, 1, 2):
        step = RenderModes(sources=SHARES, seed=seed)
        out = step.process([dict(r) for r in rows])
        assert len(out) == len(rows) and all(alive(r) for r in out)
        for src, asked in SHARES.items():
            got = [r for r in out if r["source"] == src]
            assert all(r["mode"] == json.loads(r["meta"])["modes"]["drawn"] for r in got)
            counts = Counter(r["mode"] for r in got)
            assert set(counts) == set(asked)
            for mode, share in asked.items():
                real = counts[mode] / len(got)
                assert abs(real - share) < 0.01, (seed, src, mode, real, share)
        # meta.modes records the draw, the shares and the seed; the rest of meta stays
        m = json.loads(out[0]["meta"])
        assert m["modes"] == {"drawn": out[0]["mode"], "shares": SHARES["math_cot"], "seed": seed}
        assert m["reasoning"].startswith("There are 0 apples")
    # each rendered sample is the renderer's output for its drawn mode, and valid in its grammar
    for r, src in zip(out[:50] + out[10_000:10_050], [rows[i] for i in [*range(50), *range(10_000, 10_050)]]):
        assert r["messages"] == render(src, r["mode"])["messages"]
        assert validate_sample(r) == [], to_chat(r["messages"])


def test_same_seed_same_assignment_other_seed_differs_any_batching():
    rows = [_row(i) for i in range(2000)]
    ref = _assignment(RenderModes(sources=SHARES, seed=7).process([dict(r) for r in rows]))
    again = _assignment(RenderModes(sources=SHARES, seed=7).process([dict(r) for r in rows]))
    assert again == ref
    other = _assignment(RenderModes(sources=SHARES, seed=8).process([dict(r) for r in rows]))
    differ = sum(ref[k] != other[k] for k in ref) / len(ref)
    assert 0.35 < differ < 0.49, differ  # independent draws at 0.7/0.3 disagree 2 * 0.7 * 0.3 = 42% of the time
    # batch size and order: the same id gets the same mode
    for size in (1, 7, 256):
        shuffled = [dict(r) for r in rows]
        random.Random(size).shuffle(shuffled)
        step = RenderModes(sources=SHARES, seed=7)
        got: dict[str, str] = {}
        for k in range(0, len(shuffled), size):
            got.update(_assignment(step.process(shuffled[k:k + size])))
        assert got == ref
    # the draw is hash(seed, id) alone: the same id in another source, with other text, draws alike
    stranger = dict(_row(3, "mixed"), id=rows[3]["id"], messages=[{"role": "user", "content": "Hi?"},
                                                                      {"role": "assistant", "content": "Yes."}])
    assert draw_mode(7, stranger["id"], SHARES["math_cot"]) == ref[rows[3]["id"]]
    # the order the recipe lists the shares in does not change the draw
    flipped = {"math_cot": {"non_thinking": 0.3, "thinking": 0.7}}
    assert _assignment(RenderModes(sources=flipped, seed=7).process([dict(r) for r in rows])) == ref


def test_no_fallback_a_sample_that_cannot_take_its_drawn_mode_leaves_with_the_reason():
    rows = [_row(i, reasoning=False) for i in range(400)]
    out = RenderModes(sources={"math_cot": {"thinking": 0.5, "non_thinking": 0.5}}, seed=3).process(rows)
    drawn = {r["id"]: draw_mode(3, r["id"], {"thinking": 0.5, "non_thinking": 0.5}) for r in rows}
    assert 150 < sum(m == "thinking" for m in drawn.values()) < 250
    for r in out:
        if drawn[r["id"]] == "thinking":  # no reasoning: no thinking, and no silent switch to non_thinking
            assert (r["drop_step"], r["drop_reason"]) == ("modes", "mode_no_reasoning")
            assert r["drop_detail"].startswith("drawn mode thinking: ")
        else:
            assert alive(r) and r["mode"] == "non_thinking" and validate_sample(r) == []
        assert json.loads(r["meta"])["modes"]["drawn"] == drawn[r["id"]]


def test_emit_both_gives_one_valid_copy_per_mode_with_the_same_parent():
    rows = [_row(i) for i in range(20)] + [_row(20, reasoning=False), _row(21, answer=""), _row(22, "plain")]
    step = RenderModes(sources={"math_cot": SHARES["math_cot"], "plain": "non_thinking"}, seed=5, emit="both")
    out = step.process([dict(r) for r in rows])
    by_id = {r["id"]: r for r in out}
    assert _ledger_balances(len(rows), out)
    for src in rows[:20]:
        p = by_id[src["id"]]
        assert (p["drop_step"], p["drop_reason"]) == ("modes", "split_into_modes")
        copies = [r for r in out if r.get("parent_id") == src["id"]]
        assert [c["id"] for c in copies] == [f"{src['id']}@thinking", f"{src['id']}@non_thinking"]
        sk = src["source_key"]
        assert [c["source_key"] for c in copies] == [f"{sk}@thinking", f"{sk}@non_thinking"]
        for c, mode in zip(copies, ("thinking", "non_thinking")):
            assert alive(c) and c["mode"] == mode and c["parent_id"] == src["id"]
            assert validate_chat(to_chat(c["messages"]), mode) == [], to_chat(c["messages"])
            assert validate_sample(c) == []
            assert (c["tokens"], c["text_tokens"]) == (None, None)  # the tokens step counts the copy after
            rec = json.loads(c["meta"])["modes"]
            assert rec == {"drawn": draw_mode(5, src["id"], SHARES["math_cot"]), "shares": SHARES["math_cot"],
                           "seed": 5, "copy": mode, "copies": ["thinking", "non_thinking"]}
        assert _question(copies[0]) == _question(copies[1]) == src["messages"][0]["content"]  # the same question
        assert copies[0]["messages"][-1]["content"] == f"<think>{json.loads(src['meta'])['reasoning']}</think>" \
                                                       f"<answer>{src['messages'][-1]['content']}</answer>"
        assert copies[1]["messages"][-1]["content"] == src["messages"][-1]["content"]
    # no reasoning: the thinking copy leaves with the renderer's reason, the other is kept
    assert by_id["math_cot-00020"]["drop_reason"] == "split_into_modes"
    assert by_id["math_cot-00020@thinking"]["drop_reason"] == "mode_no_reasoning"
    assert by_id["math_cot-00020@thinking"]["parent_id"] == "math_cot-00020"
    assert alive(by_id["math_cot-00020@non_thinking"])
    # no answer: no copy can be made, so none is; the sample leaves with the reason
    assert by_id["math_cot-00021"]["drop_reason"] == "mode_no_answer"
    assert not any(r.get("parent_id") == "math_cot-00021" for r in out)
    # a one-mode source is rendered as before: no copies, no meta.modes
    plain = by_id["plain-00022"]
    assert alive(plain) and plain["mode"] == "non_thinking" and "modes" not in json.loads(plain["meta"])
    assert len(out) == 20 * 3 + 3 + 1 + 1


def test_emit_a_list_of_modes_and_emit_all():
    r = _row(1, "mixed")
    out = RenderModes(sources=SHARES, emit=["auto_think", "thinking"]).process([dict(r)])
    assert [x["id"] for x in out] == ["mixed-00001", "mixed-00001@auto_think", "mixed-00001@thinking"]
    assert all(validate_sample(x) == [] for x in out[1:]) and [x["mode"] for x in out[1:]] == ["auto_think", "thinking"]
    out = RenderModes(sources={"mixed": {"thinking": 0.6, "auto_think": 0.4, "non_thinking": 0.0}},
                      emit="all").process([dict(r)])  # every mode with a share above 0
    assert [x["id"] for x in out[1:]] == ["mixed-00001@thinking", "mixed-00001@auto_think"]
    assert out[0]["drop_detail"].startswith("2 copies: thinking, auto_think")


def test_old_string_form_is_unchanged():
    rows = [_row(i) for i in range(5)]
    out = RenderModes(sources={"math_cot": "thinking"}).process([dict(r) for r in rows])
    assert [r["messages"] for r in out] == [render(r, "thinking")["messages"] for r in rows]
    assert all("modes" not in json.loads(r["meta"]) for r in out)


@pytest.mark.parametrize("sources, emit, match", [
    ({"a": {"thinking": 0.7, "non_thinking": 0.2}}, None, r"`modes.sources.a` shares sum to 0.9, not 1"),
    ({"a": {"thinking": 0.7, "non_thinking": 0.3000001}}, None, None),  # within 1e-6
    ({"a": {"thinking": 0.7, "non_thinking": 0.300002}}, None, r"`modes.sources.a` shares sum to 1.*not 1"),
    ({"a": {"thinking": 0.7, "pondering": 0.3}}, None, r"`modes.sources.a` names unknown modes \['pondering'\]"),
    ({"a": {"thinking": 1.2, "non_thinking": -0.2}}, None, r"`modes.sources.a` shares must be numbers from 0 to 1"),
    ({"a": {"thinking": "0.5", "non_thinking": 0.5}}, None, r"`modes.sources.a` shares must be numbers"),
    ({"a": {}}, None, r"`modes.sources.a` is an empty map of shares"),
    ({"a": "pondering"}, None, r"unknown modes"),
    ({"a": "thinking"}, "both", r"`modes.emit` makes copies of the sources given as shares"),
    ({"a": {"thinking": 1.0}}, "twice", r"`modes.emit` must be one, both"),
    ({"a": {"thinking": 1.0}}, ["thinking", "thinking"], r"`modes.emit` must be one, both"),
    ({"a": {"thinking": 1.0}}, ["thinking", "dreaming"], r"`modes.emit` must be one, both"),
])
def test_shares_and_emit_are_checked(sources, emit, match, tmp_path):
    from reelforge.jobs.recipe import RecipeError, parse_recipe

    if match is None:
        RenderModes(sources=sources, emit=emit)
        return
    with pytest.raises(ValueError, match=match):
        RenderModes(sources=sources, emit=emit)
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    raw = {"sources": [{"name": "t", "format": "text", "path": "t.jsonl"}], "output": "out",
           "steps": [{"modes": {"sources": sources, **({"emit": emit} if emit is not None else {})}}]}
    with pytest.raises(RecipeError, match=r"steps.0..modes"):
        parse_recipe(raw, str(tmp_path))


def test_seed_is_checked():
    with pytest.raises(ValueError, match="`modes.seed` must be an integer"):
        RenderModes(sources=SHARES, seed=1.5)


# -- in Spark: the ledger balances and the copies reach the shards ----------------------------------------------

@pytest.mark.spark
def test_emit_both_in_a_spark_run(spark, tmp_path):
    import pyarrow.parquet as pq
    import yaml
    from test_sample import read_shards

    from reelforge.curation.schema import rows_of
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    n = 30
    recs = [{"reasoning": f"{i} plus {i} is {2 * i}.", "conversations": [
        {"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": str(2 * i)}]}
        for i in range(n)]
    recs.append({"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]})
    plain = [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]}
             for i in range(4)]
    (tmp_path / "cot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    shares = {"thinking": 0.6, "non_thinking": 0.4}
    recipe = {"name": "modes_share", "sources": [{"name": s, "format": "jsonl", "path": f"{s}.jsonl"}
                                                 for s in ("cot", "plain")],
              "steps": [{"modes": {"sources": {"cot": shares, "plain": "non_thinking"}, "seed": 11, "emit": "both"}}],
              "output": {"path": str(tmp_path / "run"), "shards": {"max_samples": 16, "shuffle": False}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "run")
    report = run_recipe(load_recipe(str(tmp_path / "r.yaml")), spark=spark, log=lambda *a: None)

    inputs = n + 1 + 4
    derived = 2 * (n + 1)  # the colour question has no reasoning: its thinking copy is derived and dropped
    assert (report["inputs"], report["derived"], report["kept"], report["dropped"]) == \
        (inputs, derived, 2 * n + 1 + 4, n + 1 + 1)
    assert report["inputs"] + report["derived"] == report["kept"] + report["dropped"] and report["balanced"]
    step = next(s for s in report["steps"] if s["step"] == "modes")
    assert step["reasons"] == {"split_into_modes": n + 1, "mode_no_reasoning": 1}

    ledger = {r["id"]: r for r in rows_of(pq.read_table(os.path.join(out, "ledger")))}
    assert len(ledger) == inputs + derived
    parents = {r["source_key"]: r for r in ledger.values() if r["source"] == "cot" and not r["parent_id"]}
    shards = read_shards(out)
    assert len(shards) == 2 * n + 1 + 4
    for key, p in parents.items():
        assert p["reason"] == "split_into_modes"
        for mode in ("thinking", "non_thinking"):
            cid = f"{p['id']}@{mode}"
            assert ledger[cid]["parent_id"] == p["id"]
            if key == f"cot.jsonl:{n + 1}":  # the colour question
                continue
            s = shards[cid]  # the copy reached the shards, valid in its mode, with its parent
            assert s["parent_id"] == p["id"] and s["mode"] == mode
            assert validate_chat(to_chat(s["messages"]), mode) == [], to_chat(s["messages"])
            rec = json.loads(s["meta"])["modes"]
            # the draw made inside Spark's tasks is hash(seed, id): the same as here
            assert rec["drawn"] == draw_mode(11, p["id"], shares) and rec["seed"] == 11 and rec["copy"] == mode
    colour = parents[f"cot.jsonl:{n + 1}"]["id"]
    assert ledger[f"{colour}@thinking"]["reason"] == "mode_no_reasoning"
    assert shards[f"{colour}@non_thinking"]["messages"][-1]["content"] == "Red."
    assert sum(s["mode"] == "non_thinking" and not s.get("parent_id") for s in shards.values()) == 4


def test_shares_with_video_frames(tmp_path):
    """A video-mode draw or copy is split once per frame count as before; an emitted `@video` copy's
    frame copies are its children (`<id>@video@f16`), so every sample is still counted once."""
    import subprocess

    from test_modes_frames import _video_row

    path = os.path.realpath(str(tmp_path / "moving.mp4"))
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25",
                    "-t", "1", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", path],
                   check=True, timeout=60)
    row = _video_row("moving", path)
    out = RenderModes(sources={"vids": {"video": 1.0}}, video_frames=[16]).process([json.loads(json.dumps(row))])
    assert [(r["id"], r["drop_reason"]) for r in out] == [("v_moving", "split_into_frame_counts"),
                                                           ("v_moving@f16", None)]
    meta = json.loads(out[1]["meta"])
    assert meta["video_frames"] == 16 and meta["modes"]["drawn"] == "video" and validate_sample(out[1]) == []
    assert len(out[1]["media"][0]["frame_indices"]) == 16
    out = RenderModes(sources={"vids": {"video": 1.0}}, video_frames=[16], emit=["video", "non_thinking"]).process(
        [json.loads(json.dumps(row))])
    got = {r["id"]: (r["parent_id"], r["drop_reason"]) for r in out}
    assert got == {"v_moving": (None, "split_into_modes"), "v_moving@video": ("v_moving", "split_into_frame_counts"),
                   "v_moving@video@f16": ("v_moving@video", None),
                   "v_moving@non_thinking": ("v_moving", "mode_no_answer")}  # a caption row has no conversation
    assert _ledger_balances(1, out)
