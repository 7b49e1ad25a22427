"""The five cold-start modes: every rendered sample validates; hand-written bad ones are rejected."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from PIL import Image

from reelforge.curation.schema import empty_row
from reelforge.filters.alignment import FormatConsistencyFilter, RepetitionFilter, format_consistency, repetition_score
from reelforge.mixers.chat import IMAGE, VIDEO, to_chat, validate_chat, validate_sample
from reelforge.mixers.modes import ModeError, RenderModes, needs_thinking, render


def _img(path: str, size=(96, 64)) -> dict:
    Image.new("RGB", size, (30, 120, 200)).save(path)
    return {"kind": "image", "uri": path, "member": None, "offset": None, "length": os.path.getsize(path),
            "sha256": None, "format": "png", "width": size[0], "height": size[1], "duration": None, "fps": None,
            "frames": None, "codec": None, "phash": None}


def _conv(i: int, question: str, answer: str, meta: dict | None = None, media=None, turns=None) -> dict:
    r = empty_row()
    msgs = turns or []
    msgs = msgs + [{"role": "user", "content": ("<image>\n" if media else "") + question},
                   {"role": "assistant", "content": answer}]
    r.update(id=f"s{i}", kind="conversation", source="src", source_key=f"k:{i}", source_location="x",
             messages=msgs, media=media, meta=json.dumps(meta) if meta else None)
    return r


@pytest.fixture()
def rows(tmp_path) -> list[dict]:
    img = _img(str(tmp_path / "a.png"))
    return [
        _conv(0, "What color is the sky?", "Blue.", media=[dict(img)]),
        _conv(1, "How many apples are left if I eat 2 of 5?", "<think>5 - 2 = 3 apples remain.</think>3",
              media=[dict(img)]),
        _conv(2, "Why is the sign red?", "It warns drivers.", {"reasoning": "Red signs signal danger; so a warning."},
              turns=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>x</think>Hello."}]),
        _conv(3, "Is this a cat?", "Yes.", {"reasoning": "It has whiskers.", "think": False}, media=[dict(img)]),
        _conv(4, "Is this a cat?", "Yes.", {"reasoning": "It has whiskers and ears.", "think": True}),
    ]


def test_every_rendered_sample_validates(rows, tmp_path):
    for style in ("report", "template"):
        for mode in ("non_thinking", "auto_think"):
            for r in rows:
                out = render(r, mode, style)
                assert out["mode"] == mode
                assert validate_sample(out) == [], (mode, style, to_chat(out["messages"]))
        for r in rows[1:]:
            out = render(r, "thinking", style)
            assert validate_sample(out) == [], (style, to_chat(out["messages"]))
    with pytest.raises(ModeError) as e:
        render(rows[0], "thinking")
    assert e.value.reason == "mode_no_reasoning"
    text = to_chat(render(rows[1], "thinking")["messages"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + IMAGE)
    assert "/think<|im_end|>\n<|im_start|>assistant\n<think>5 - 2 = 3 apples remain.</think><answer>3</answer>" in text
    assert "<think>\n\n</think>\n\nBlue." in to_chat(render(rows[0], "non_thinking", "template")["messages"])
    # auto-think: the source field wins, else the rule
    assert "/no_think mode" in render(rows[3], "auto_think")["messages"][-1]["content"]
    assert "/think mode" in render(rows[4], "auto_think")["messages"][-1]["content"]
    assert "/think mode" in render(rows[1], "auto_think")["messages"][-1]["content"]  # "how many" + reasoning
    assert needs_thinking("What is it?", None)[0] is False
    assert needs_thinking("What is it?", "word " * 50)[0] is True


def test_video_mode(tmp_path):
    r = empty_row()
    video = {"kind": "video", "uri": "v.mp4", "member": None, "offset": None, "length": 1, "sha256": None,
             "format": "mp4", "width": 64, "height": 48, "duration": 12.0, "fps": 30.0, "frames": 360,
             "codec": "h264", "phash": None}
    r.update(id="v", kind="video_text", source="vids", source_key="v", source_location="v", text="A dog runs.",
             media=[video])
    for think in (None, False):
        out = render(r, "video", think=think)
        assert validate_sample(out) == [], to_chat(out["messages"])
    qa = {"question": "When does the dog jump?", "answer": "It jumps at {0} and lands at {1}.",
          "spans": [[3.0, 4.5], [5, 5.5]], "reasoning": "The dog leaves the ground around 3 s."}
    r["meta"] = json.dumps({"video_qa": qa})
    out = render(r, "video")
    chat = to_chat(out["messages"])
    assert VIDEO in chat and "<|clip_time_start|>3.0-4.5<|clip_time_end|>" in chat and "/think" in chat
    assert validate_sample(out) == []
    bad = dict(out, media=[dict(video, duration=4.0)])  # a time beyond the video's end
    assert any("outside the video" in e for e in validate_sample(bad))


def test_think_with_image_runs_code_in_the_sandbox(tmp_path):
    img = _img(str(tmp_path / "b.png"), (120, 80))
    steps = [{"thought": "Crop the top-left corner.", "code": "result = image.crop((0, 0, 60, 40))"},
             {"thought": "Rotate and raise contrast.",
              "code": "result = ImageEnhance.Contrast(image.rotate(90, expand=True)).enhance(1.5)"}]
    r = _conv(9, "What is written in the corner?", "Nothing.", {"tool_steps": steps, "reasoning": "Look closer."},
              media=[img])
    out = render(r, "think_with_image", workdir=str(tmp_path / "work"))
    assert out["mode"] == "think_with_image"
    assert validate_sample(out) == [], to_chat(out["messages"])
    assert len(out["media"]) == 3
    assert (out["media"][1]["width"], out["media"][1]["height"]) == (60, 40)
    assert (out["media"][2]["width"], out["media"][2]["height"]) == (80, 120)
    assert all(os.path.exists(m["uri"]) for m in out["media"])
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    bad = _conv(10, "q", "a", {"tool_steps": [{"code": "while True: pass"}]}, media=[img])
    with pytest.raises(ModeError) as e:
        render(bad, "think_with_image", workdir=str(tmp_path / "work"), timeout_s=1.0)
    assert e.value.reason == "sandbox_timeout"


SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _t(user: str, *assistant_and_more: str) -> str:
    s = SYS + f"<|im_start|>user\n{user}<|im_end|>\n"
    for i, c in enumerate(assistant_and_more):
        role = "assistant" if i % 2 == 0 else "user"
        s += f"<|im_start|>{role}\n{c}<|im_end|>\n"
    return s


GOOD_CODE = "<code>\n```python\nresult = image.crop((0, 0, 4, 4))\n```\n</code>"
BAD = [
    ("thinking", _t("Q /think", "<think>r</think>A")),  # no <answer>
    ("thinking", _t("Q /no_think", "<think>r</think><answer>A</answer>")),  # wrong switch
    ("thinking", _t("Q /think", "<think></think><answer>A</answer>")),  # empty reasoning
    ("thinking", _t("Q /think", "<think>r</think><answer>A <think>x</think></answer>")),  # nested tags
    ("thinking", SYS + "<|im_start|>user\nQ /think<|im_end|>\n"),  # no assistant
    ("thinking", "<|im_start|>user\nQ /think<|im_end|>\n<|im_start|>assistant\n<think>r</think><answer>A</answer>"
                 "<|im_end|>\n"),  # no system turn
    ("thinking", _t("Q /think", "<think>r</think><answer>A</answer>")[:-1]),  # cut short
    ("non_thinking", _t("Q /no_think", "<think>r</think>A")),
    ("non_thinking", _t("Q", "A")),  # no switch
    ("non_thinking", _t("Q /no_think", "")),
    ("auto_think", _t("Q /think", "<analysis>Easy. Therefore, /no_think mode is more appropriate.</analysis>A")),
    ("auto_think", _t("Q", "<analysis>Hard. Therefore, /think mode is more appropriate.</analysis>A")),
    ("auto_think", _t("Q", "A")),
    ("auto_think", _t("Q", "<analysis>Easy</analysis>A")),
    ("think_with_image", _t(IMAGE + "Q /think", "<think>r</think><answer>A</answer>")),  # no tool turn
    ("think_with_image", _t(IMAGE + "Q /think", "<think>look " + GOOD_CODE, "<sandbox_output>x</sandbox_output>",
                            "ok</think><answer>A</answer>")),  # output without the image
    ("think_with_image", _t(IMAGE + "Q /think", "<think>look <code>\n```python\nresult = (\n```\n</code>",
                            f"<sandbox_output>{IMAGE}</sandbox_output>", "ok</think><answer>A</answer>")),
    ("think_with_image", _t("Q /think", "<think>look " + GOOD_CODE, f"<sandbox_output>{IMAGE}</sandbox_output>",
                            "ok</think><answer>A</answer>")),  # no input image
    ("think_with_image", _t(IMAGE + "Q /think", "look " + GOOD_CODE, f"<sandbox_output>{IMAGE}</sandbox_output>",
                            "ok</think><answer>A</answer>")),  # <think> never opened
    ("video", _t(VIDEO + "Q /no_think", "It happens.")),  # no time
    ("video", _t(IMAGE + "Q /no_think", "At <|clip_time_start|>1.0-2.0<|clip_time_end|>.")),  # no video
    ("video", _t(VIDEO + "Q /no_think", "At <|clip_time_start|>soon<|clip_time_end|>.")),
    ("video", _t(VIDEO + "Q", "At <|clip_time_start|>1.0<|clip_time_end|>.")),  # no switch
    ("video", _t("<image>Q /no_think", "At <|clip_time_start|>1.0<|clip_time_end|>.")),  # raw placeholder
    ("dreaming", _t("Q", "A")),
]


@pytest.mark.parametrize("mode, text", BAD)
def test_validator_rejects_bad_examples(mode, text):
    assert validate_chat(text, mode) != []


def test_validator_accepts_hand_written_good_examples():
    assert validate_chat(_t("Q /think", "<think>r</think><answer>A</answer>"), "thinking") == []
    assert validate_chat(_t("Q /think", "<think>\nr\n</think>\n\nA"), "thinking") == []
    assert validate_chat(_t(IMAGE + "Q /think", "<think>look " + GOOD_CODE, f"<sandbox_output>{IMAGE}</sandbox_output>",
                            "ok</think><answer>A</answer>"), "think_with_image", n_images=2) == []
    assert validate_chat(_t(VIDEO + "Q /no_think", "At <|clip_time_start|>1.0-2.0<|clip_time_end|>."), "video",
                         n_videos=1, duration=3.0) == []


def test_alignment_scores_and_filters():
    clean = "The cat sits on the mat. It looks at the window and waits for the rain to stop."
    assert repetition_score(clean) < 0.1
    assert repetition_score("I think so. " * 30) > 0.8
    assert repetition_score("step one\nstep two\nstep one\nstep two\nstep one\nstep two") >= 0.5
    assert repetition_score(clean + " and again and again and again") == 1.0  # looping tail
    assert format_consistency("<think>2 + 3 = 5</think><answer>5</answer>")[0] == 1.0
    assert format_consistency("<think>2 + 3 = 5</think><answer>6</answer>")[0] == 0.0
    assert format_consistency("<think>So the answer is B.</think><answer>C</answer>")[0] == 0.0
    assert format_consistency("<think>So the answer is B.</think><answer>B</answer>")[0] == 1.0
    assert format_consistency("<think>r</think><think>s</think><answer>A</answer>")[0] == 0.0
    assert format_consistency("<think>It has whiskers, so yes.</think><answer>No</answer>")[0] == 0.0
    assert format_consistency("<think>It has whiskers, so yes.</think><answer>Yes</answer>")[0] == 1.0
    assert format_consistency("Just an answer.")[0] == 1.0
    rows = [_conv(0, "q", "I think so. " * 30), _conv(1, "q", "<think>1+1=2</think><answer>3</answer>"),
            _conv(2, "q", "<think>1+1=2</think><answer>2</answer>")]
    out = RepetitionFilter(max_score=0.5).process_rows([dict(r) for r in rows])
    assert [r["drop_reason"] for r in out] == ["repetitive", None, None]
    out = FormatConsistencyFilter().process_rows([dict(r) for r in rows[1:]])
    assert [r["drop_reason"] for r in out] == ["inconsistent_reasoning", None]


def test_modes_step_in_a_recipe(rows, tmp_path):
    from reelforge.jobs.recipe import RecipeError, parse_recipe

    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    raw = {"sources": [{"name": "t", "format": "text", "path": "t.jsonl"}], "output": "out",
           "steps": [{"modes": {"sources": {"t": "thinking"}}}, {"repetition": {"max_score": 0.4}},
                     "format_consistency"]}
    assert [s.name for s in parse_recipe(raw, str(tmp_path)).steps] == ["modes", "repetition", "format_consistency"]
    raw["steps"] = [{"modes": {"sources": {"t": "pondering"}}}]
    with pytest.raises(RecipeError, match="steps.0..modes"):
        parse_recipe(raw, str(tmp_path))
    step = RenderModes(sources={"src": "thinking"})
    step.workdir = str(tmp_path)
    out = step.process_rows([dict(r) for r in rows])
    assert out[0]["drop_reason"] == "mode_no_reasoning"
    assert all(r["mode"] == "thinking" and validate_sample(r) == [] for r in out[1:])


def test_modes_end_to_end_in_a_run(spark, demo_corpus, tmp_path):
    """The `modes` step inside a real run: every shard sample validates, the sandbox's images
    are members of the shards, and a cold-start mixture plans and emits by mode."""
    import glob
    import tarfile

    import yaml

    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe
    from reelforge.mixers.emit import emit_plan
    from reelforge.mixers.planner import plan_mixture
    from reelforge.mixers.spec import parse_mixture

    root = tmp_path / "corpus"
    root.mkdir()
    lines = {"cot": [], "agent": [], "plain": []}
    for i in range(6):
        Image.new("RGB", (80 + i, 60), (10 * i, 100, 200)).save(root / f"i{i}.png")
        lines["cot"].append({"image": f"i{i}.png", "reasoning": f"There are {i} dots and {i} more, so {2 * i}.",
                             "conversations": [{"from": "human", "value": f"<image>\nHow many dots, case {i}?"},
                                               {"from": "gpt", "value": str(2 * i)}]})
        lines["plain"].append({"image": f"i{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat color is picture {i}?"}, {"from": "gpt", "value": "Blue."}]})
        lines["agent"].append({"image": f"i{i}.png", "tool_steps": [
            {"thought": "Zoom into the left half.", "code": "result = image.crop((0, 0, 40, 30)).resize((80, 60))"}],
            "conversations": [{"from": "human", "value": f"<image>\nWhat is on the left of {i}?"},
                              {"from": "gpt", "value": "A blue area."}]})
    for name, rows in lines.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = os.path.join(os.path.dirname(demo_corpus), "tokenizer")
    recipe = {"name": "modes", "sources": [{"name": n, "format": "jsonl", "path": f"{n}.jsonl"} for n in lines],
              "steps": [{"probe": {}},
                        {"modes": {"sources": {"cot": "thinking", "agent": "think_with_image",
                                               "plain": "non_thinking"}}},
                        {"tokens": {"tokenizer": tok}}, {"format_consistency": {}}],
              "output": {"path": str(tmp_path / "run"), "shards": {"max_samples": 8}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    report = run_recipe(load_recipe(str(root / "recipe.yaml")), spark=spark, log=lambda *a: None)
    out = report["paths"]["shards"]
    seen = Counter()
    for path in sorted(glob.glob(os.path.join(out, "*.tar"))):
        with tarfile.open(path) as tf:
            names = [m.name for m in tf]
            for m in tf:
                if m.name.endswith(".json"):
                    js = json.loads(tf.extractfile(m).read())
                    row = {"messages": js["messages"], "mode": js["mode"], "media": js.get("media", [])}
                    assert validate_sample(row) == [], to_chat(js["messages"])
                    seen[js["mode"]] += 1
                    assert all(md["member"] in names for md in row["media"])
                    if js["mode"] == "think_with_image":
                        assert len(row["media"]) == 2
    assert seen == {"thinking": 6, "think_with_image": 6, "non_thinking": 6}
    mix = {"stages": [{"name": "cold_start", "target_samples": 12, "sources": [
        {"name": m, "mode": m, "weight": w} for m, w in (("non_thinking", 330), ("thinking", 230),
                                                          ("think_with_image", 100))]}]}
    plan = plan_mixture(parse_mixture(mix), str(tmp_path / "run"))
    idx = emit_plan(plan, str(tmp_path / "mix"), log=lambda *a: None)["cold_start"]
    assert idx["samples"] == 12 and sum(v["samples"] for v in idx["entries"].values()) == 12
