"""Text tokens: the light counter agrees with transformers on the same locally built tokenizer."""

from __future__ import annotations

import pytest

from reelforge.curation.schema import empty_row
from reelforge.curation.text_tokens import VISION_TEXT, TextTokenizer
from reelforge.curation.tiny_models import build_tiny_tokenizer
from reelforge.curation.token_count import CountTokens
from reelforge.curation.tokens import image_tokens, video_tokens

CONVS = [
    [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarise <video> please"},
     {"role": "assistant", "content": "A test pattern moves."}, {"role": "user", "content": "Anything else?"},
     {"role": "assistant", "content": "<think>\nno\n</think>\n\nNo."}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")),
                                texts=["what colour is the red circle summarise a test pattern moves"] * 20)


def test_counts_equal_transformers_apply_chat_template(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    tt = TextTokenizer(tok_dir)
    assert tt.has_own_template
    for conv in CONVS:
        as_model = [{"role": m["role"], "content": m["content"].replace("<image>", VISION_TEXT)
                     .replace("<video>", VISION_TEXT)} for m in conv]
        ids = hf.apply_chat_template(as_model, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert tt.count_chat(conv) == len(ids)
        assert tt.render_chat(conv) == hf.apply_chat_template(as_model, tokenize=False)
    text = "plain words that the tokenizer never saw: zebra quokka"
    assert tt.count(text) == len(hf(text, add_special_tokens=False)["input_ids"])
    # special tokens stay single tokens
    assert tt.count("<|im_start|><think></think>") == 3


def test_count_tokens_step(tok_dir, tmp_path):
    step = CountTokens(tokenizer=tok_dir)
    step.setup()
    conv = empty_row()
    conv.update(kind="conversation", messages=CONVS[0],
                media=[{"kind": "image", "width": 640, "height": 480}])
    video = empty_row()
    video.update(kind="video_text", text="a clip", media=[{"kind": "video", "width": 320, "height": 240,
                                                            "duration": 3.0, "fps": 25.0, "frames": 75}])
    wide = empty_row()
    wide.update(kind="image_text", text="a strip", media=[{"kind": "image", "width": 5000, "height": 10}])
    pref = empty_row()
    pref.update(kind="preference", messages=[{"role": "user", "content": "Which?"}], chosen="A", rejected="B")
    a, b, c, d = step.process_rows([conv, video, wide, pref])
    tt = TextTokenizer(tok_dir)
    assert a["visual_tokens"] == image_tokens(480, 640)["tokens"]
    assert a["text_tokens"] == tt.count_chat(CONVS[0]) and a["tokens"] == a["text_tokens"] + a["visual_tokens"]
    assert b["visual_tokens"] == video_tokens(240, 320, 3.0, 25.0, total_frames=75)["tokens"]
    assert b["text_tokens"] == tt.count("<video>a clip")
    assert (c["drop_step"], c["drop_reason"]) == ("tokens", "aspect_ratio")
    q = {"role": "user", "content": "Which?"}
    assert d["text_tokens"] == (tt.count_chat([q, {"role": "assistant", "content": "A"}])
                                + tt.count_chat([q, {"role": "assistant", "content": "B"}]))


def test_count_tokens_step_uses_the_stored_frame_plan(tok_dir):
    from reelforge.curation.tokens import VisualTokenConfig, slow_fast_sizes, video_nframes

    n = video_nframes(12.0, 25.0, total_frames=300)
    types = [0] + [1] * (n - 1)

    def row(types, processor="keye-vl-1.5"):
        r = empty_row()
        r.update(kind="video_text", text="a clip", media=[{"kind": "video", "width": 640, "height": 480,
                                                            "duration": 12.0, "fps": 25.0, "frames": 300,
                                                            "frame_types": types, "plan_processor": processor}])
        return r

    upper = video_tokens(480, 640, 12.0, 25.0, total_frames=300)["tokens"]
    true = slow_fast_sizes(480, 640, 1, n - 1, VisualTokenConfig())
    step = CountTokens(tokenizer=tok_dir)
    step.setup()
    a, b, c = step.process_rows([row(types), row(types[:-1]), row(types, "other")])
    assert a["visual_tokens"] == true["tokens"] < upper  # the plan's true tokens, sizes written back
    assert a["media"][0]["plan_tokens"] == true["tokens"]
    assert a["media"][0]["fast_size"] == [true["fast_resized_height"], true["fast_resized_width"]]
    assert b["visual_tokens"] == upper and c["visual_tokens"] == upper  # another frame count / processor
    off = CountTokens(tokenizer=tok_dir, frame_plan=False)
    off.setup()
    assert off.process_rows([row(types)])[0]["visual_tokens"] == upper
    with pytest.raises(ValueError, match="frame_plan"):
        CountTokens(tokenizer=tok_dir, processor="keye-vl-1.0", frame_plan=True)


def test_missing_tokenizer_is_a_recipe_error(tmp_path):
    from reelforge.jobs.recipe import RecipeError, parse_recipe

    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    raw = {"sources": [{"name": "t", "format": "text", "path": "t.jsonl"}],
           "steps": [{"tokens": {"tokenizer": "no/such/dir"}}], "output": "out"}
    with pytest.raises(RecipeError, match=r"`steps\[0\].tokens` is invalid: tokenizer folder"):
        parse_recipe(raw, str(tmp_path))
