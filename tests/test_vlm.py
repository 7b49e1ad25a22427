"""VLM judge and recaptioner: a tiny random Qwen2.5-VL saved to disk and loaded through
AutoModelForImageTextToText / AutoProcessor, as a user's checkpoint is; scores and captions
equal plain transformers on the same inputs; failures are ledger lines; clear model errors."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from reelforge.curation.schema import get_score
from reelforge.curation.tiny_vlm import build_tiny_vlm


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    return build_tiny_vlm(str(tmp_path_factory.mktemp("vlm") / "tiny-qwen2_5-vl"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Eight noise images, one short H.264 video, one corrupt JPEG and one missing file."""
    from reelforge.curation.tools import ffmpeg_path

    root = tmp_path_factory.mktemp("vlm-corpus")
    (root / "img").mkdir()
    recs = []
    for i in range(8):
        Image.effect_noise((60 + 4 * i, 48), 30 + 5 * i).convert("RGB").save(root / "img" / f"{i}.jpg")
        recs.append({"image": f"img/{i}.jpg", "caption": f"grey noise number {i}"})
    subprocess.run([ffmpeg_path(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=96x64:rate=10:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(root / "clip.mp4")], check=True)
    recs.append({"video": "clip.mp4", "caption": "a test pattern"})
    (root / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    recs.append({"image": "img/bad.jpg", "caption": "corrupt"})
    recs.append({"image": "img/missing.jpg", "caption": "missing"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "docs.jsonl").write_text(json.dumps({"image": "img/0.jpg", "caption": "a scanned page"}) + "\n")
    return str(root)


def _recipe(corpus: str, model: str, steps: list, name: str = "r.yaml") -> str:
    rec = {"name": "vlm", "sources": [{"name": "m", "format": "jsonl", "path": "m.jsonl"},
                                      {"name": "docs", "format": "jsonl", "path": "docs.jsonl"}],
           "steps": [{"probe": {"phash": False}}] + steps, "output": {"path": "out", "shards": {"max_samples": 100}}}
    path = os.path.join(corpus, name)
    with open(path, "w") as f:
        yaml.safe_dump(json.loads(json.dumps(rec).replace("MODEL", model)), f)
    return path


def _plain(model_dir: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    return proc, model


def _prompt(proc, kind: str, text: str) -> str:
    conv = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
    return proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


def test_judge_and_recaption_in_spark_equal_plain_transformers(spark, tiny_vlm, corpus):
    """One unpadded sample at a time through plain transformers gives the scores and captions
    the batched, prefetching Spark steps wrote."""
    import torch

    from reelforge.curation.recaption import DEFAULT_PROMPTS
    from reelforge.filters.vlm_judge import DEFAULT_QUESTION
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    steps = [{"vlm_judge": {"model": "MODEL", "batch_size": 3, "device": "cpu", "threshold": 0.02}},
             {"recaption": {"model": "MODEL", "batch_size": 4, "max_new_tokens": 6, "device": "cpu",
                            "tasks": {"docs": "ocr"}, "video_frames": 4}}]
    out = os.path.join(corpus, "out-local")
    rep = run_recipe(load_recipe(_recipe(corpus, tiny_vlm, steps), out=out), spark=spark, log=lambda *a: None)
    assert rep["balanced"]
    rows = {r["source_key"]: r for r in pq.read_table(os.path.join(out, "_work", "03_recaption")).to_pylist()}

    # broken media leave with their reasons (probe sees them first here; the steps' own decode
    # failures are checked in the next test)
    ledger = {r["source_key"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}
    assert ledger["m.jsonl:10"]["fate"] == ledger["m.jsonl:11"]["fate"] == "dropped"
    assert ledger["m.jsonl:11"]["reason"] == "missing_file"

    proc, model = _plain(tiny_vlm)
    tok = proc.tokenizer
    yes = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "yes")})
    no = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("No", "no")})
    scores, low = [], []
    for i in range(8):
        r = rows[f"m.jsonl:{i + 1}"]
        im = Image.open(os.path.join(corpus, "img", f"{i}.jpg")).convert("RGB")
        q = DEFAULT_QUESTION.format(text=f"grey noise number {i}", media="image")
        inp = proc(text=[_prompt(proc, "image", q)], images=[im], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inp).logits[0, -1].double()
        p = torch.softmax(logits, -1)
        want = float(p[yes].sum() / (p[yes].sum() + p[no].sum()))
        assert abs(get_score(r, "vlm") - want) < 1e-5
        scores.append(want)
        if want < 0.02:
            low.append(i)
            assert r["drop_reason"] == "low_vlm_score" and not r["captions"]
            continue
        inp = proc(text=[_prompt(proc, "image", DEFAULT_PROMPTS["caption"])], images=[im], return_tensors="pt")
        gen = model.generate(**inp, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        caption = tok.decode(gen[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        (cap,) = r["captions"]
        assert cap == {"text": caption, "model": "tiny-qwen2_5-vl", "prompt": DEFAULT_PROMPTS["caption"],
                       "task": "caption"}
        assert r["text"] == f"grey noise number {i}"  # the original stays
    assert np.std(scores) > 0 and len(low) < 8
    assert len({rows[f"m.jsonl:{i + 1}"]["captions"][0]["text"] for i in range(8) if i not in low}) > 1

    # per-source task and the video task from evenly sampled frames
    if rows["docs.jsonl:1"]["drop_step"] is None:
        assert rows["docs.jsonl:1"]["captions"][0]["task"] == "ocr"
        assert rows["docs.jsonl:1"]["captions"][0]["prompt"] == DEFAULT_PROMPTS["ocr"]
    v = rows["m.jsonl:9"]
    assert get_score(v, "vlm") is not None
    if v["drop_step"] is None:
        assert v["captions"][0]["task"] == "video"


def test_failures_are_ledger_lines_and_oom_halves_the_batch(tiny_vlm, corpus):
    from reelforge.curation.probe import Probe
    from reelforge.curation.recaption import Recaption
    from reelforge.curation.schema import empty_row

    rows = []
    for i in range(6):
        r = empty_row()
        p = os.path.join(corpus, "img", f"{i}.jpg")
        r.update(id=str(i), kind="image_text", source="m", source_key=str(i), source_location=p, text=f"n {i}",
                 media=[{"kind": "image", "uri": p, "member": None, "offset": None, "length": None}])
        rows.append(r)
    rows = Probe(phash=False).process_rows(rows)
    step = Recaption(model=tiny_vlm, batch_size=4, max_new_tokens=3, device="cpu")
    step.setup()
    corrupt = dict(rows[0], id="c", media=[dict(rows[0]["media"][0], uri=os.path.join(corpus, "img", "bad.jpg"))])
    out = step.process_rows([corrupt] + [dict(r) for r in rows[1:3]])
    assert out[0]["drop_step"] == "recaption" and out[0]["drop_reason"] == "decode_error"
    assert all(o["captions"] for o in out[1:])

    step = Recaption(model=tiny_vlm, batch_size=6, max_new_tokens=3, device="cpu")
    step.setup()
    sizes: list[int] = []
    real = step.run_model

    def flaky(inputs, tasks):
        sizes.append(len(tasks))
        if len(tasks) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(inputs, tasks)

    step.run_model = flaky
    out = step.process_rows([dict(r) for r in rows])
    assert sizes[:2] == [6, 3] and max(sizes[2:]) <= 2 and sum(sizes[2:]) == 6
    assert all(o["captions"] and not o["drop_step"] for o in out)

    # a sample the model fails on alone leaves as model_error; the rest of its batch is captioned
    def broken(inputs, tasks):
        if inputs["input_ids"].shape[0] > 1:
            raise ValueError("batch breaks")
        if len(broken.calls) == 2:
            broken.calls.append(1)
            raise ValueError("this sample breaks the model")
        broken.calls.append(1)
        return real(inputs, tasks)

    broken.calls = []
    step.run_model = broken
    out = step.process_rows([dict(r) for r in rows])
    bad = [o for o in out if o["drop_step"]]
    assert len(bad) == 1 and bad[0]["drop_reason"] == "model_error" and "breaks" in bad[0]["drop_detail"]
    assert sum(1 for o in out if o["captions"]) == 5

    # on_failure: keep leaves the sample in, uncaptioned
    keep = Recaption(model=tiny_vlm, batch_size=6, max_new_tokens=3, device="cpu", on_failure="keep")
    keep.setup()
    broken.calls = []
    keep.run_model = broken
    out = keep.process_rows([dict(r) for r in rows])
    assert not any(o["drop_step"] for o in out) and sum(1 for o in out if o["captions"]) == 5


def test_clip_halves_its_batch_on_oom(tmp_path):
    from reelforge.curation.tiny_clip import build_tiny_clip
    from reelforge.filters.clip_score import ClipScore

    cfg_dir, ckpt = build_tiny_clip(str(tmp_path))
    step = ClipScore(model="reelforge-tiny-clip", pretrained=ckpt, model_config=os.path.join(cfg_dir,
                     "reelforge-tiny-clip.json"), batch_size=8, device="cpu")
    step.setup()
    sizes: list[int] = []

    def fn(x):
        sizes.append(len(x))
        if len(x) > 2:
            raise RuntimeError("CUDA out of memory")
        return np.ones((len(x), 4), dtype=np.float32)

    got = step._batched(fn, list(range(11)))
    assert got.shape == (11, 4) and sizes[:3] == [8, 4, 2] and max(sizes[2:]) == 2


def test_prefetch_prepares_the_next_chunk_while_the_model_runs():
    """compute(k) waits until prepare(k+1) has started: without prefetch this would time out."""
    from reelforge.curation.step import prefetched

    started = [threading.Event() for _ in range(5)]
    order = []

    def prepare(chunk):
        started[chunk[0]].set()
        return chunk[0] * 10

    def compute(chunk, prepared):
        k = chunk[0]
        if k + 1 < len(started):
            assert started[k + 1].wait(5), "the next chunk was not being prepared during compute"
        order.append((k, prepared))
        return chunk

    out = list(prefetched(([k] for k in range(5)), prepare, compute, depth=1))
    assert out == [[k] for k in range(5)] and order == [(k, 10 * k) for k in range(5)]


def test_models_that_cannot_load_are_one_sentence(spark, tiny_vlm, corpus, tmp_path):
    import shutil

    from reelforge.jobs.cli import main, worker_user_error
    from reelforge.jobs.recipe import RecipeError, load_recipe

    for model, says in ((str(tmp_path / "nope"), "is not a folder"), (corpus, "has no config.json")):
        with pytest.raises(RecipeError, match=says):
            load_recipe(_recipe(corpus, model, [{"recaption": {"model": "MODEL"}}], "bad.yaml"))
    text_only = tmp_path / "gpt2"
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(text_only)
    with pytest.raises(RecipeError, match="not an image-text-to-text model"):
        load_recipe(_recipe(corpus, str(text_only), [{"vlm_judge": {"model": "MODEL"}}], "bad.yaml"))
    with pytest.raises(RecipeError, match="not an open_clip architecture"):
        load_recipe(_recipe(corpus, "ViT-Nope", [{"clip": {"model": "MODEL"}}], "bad.yaml"))
    assert main(["run", _recipe(corpus, "ViT-B-32", [{"clip": {"model": "MODEL", "pretrained": "x/y.pt"}}],
                                "bad.yaml")]) == 2

    # weights that pass the driver's checks but are corrupt: the worker's sentence, not a JVM trace
    broken = tmp_path / "broken-vlm"
    shutil.copytree(tiny_vlm, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    recipe = load_recipe(_recipe(corpus, str(broken), [{"recaption": {"model": "MODEL", "device": "cpu"}}],
                                 "broken.yaml"), out=str(tmp_path / "o"))
    from reelforge.jobs.run import run_recipe

    with pytest.raises(Exception) as err:
        run_recipe(recipe, spark=spark, log=lambda *a: None)
    said = worker_user_error(err.value)
    assert said and said.startswith(f"the model in {broken} could not be loaded")
