"""The `asr` step, the `asr_interleave` builder and recaption's ASR and frame-rate options.

Speech is synthesised with espeak-ng and muxed by ffmpeg into H.264 + AAC videos; a tiny random
Whisper (curation/tiny_whisper.py) is saved to disk and loaded through the path a real
openai/whisper-* folder takes. A random model writes garbage words: the tests check structure
(segments ordered, inside the audio) and parity with a plain transformers pipeline loop, not words."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from reelforge.curation.tiny_whisper import build_tiny_whisper

NEW_TOKENS = 24
SPEECH = {"talk0": "hello world, this is a test of speech", "talk1": "one two three, red blue green, good morning"}


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True, timeout=120)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> str:
    return build_tiny_whisper(str(tmp_path_factory.mktemp("asr") / "tiny-whisper"))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> str:
    """videos/: two speech videos (H.264 + AAC, 3 s of picture, ~2.5 s of espeak-ng speech), one
    without an audio stream; bad/: the first one truncated to half its bytes; colours.mp4: 4 s,
    one solid colour a second (red, lime, blue, yellow)."""
    root = tmp_path_factory.mktemp("asr-media")
    vids = root / "videos"
    vids.mkdir()
    for i, (name, words) in enumerate(SPEECH.items()):
        wav = root / f"{name}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), words], check=True, timeout=60)
        _ff("-f", "lavfi", "-i", f"testsrc=size=96x64:rate=10:duration={3 + i}", "-i", str(wav), "-c:v", "libx264",
            "-pix_fmt", "yuv420p", "-c:a", "aac", str(vids / f"{name}.mp4"))
        (vids / f"{name}.txt").write_text(f"someone talking {i}")
    _ff("-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        str(vids / "silent.mp4"))
    (vids / "silent.txt").write_text("no sound")
    (root / "bad").mkdir()
    data = (vids / "talk0.mp4").read_bytes()
    (root / "bad" / "truncated.mp4").write_bytes(data[:len(data) // 2])
    colours = "".join(f"color=c={c}:s=64x48:d=1:r=10[v{k}];" for k, c in enumerate(["red", "lime", "blue", "yellow"]))
    _ff("-filter_complex", colours + "[v0][v1][v2][v3]concat=n=4:v=1:a=0", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        str(root / "colours.mp4"))
    return str(root)


def _rows(paths: list[str]) -> list[dict]:
    from reelforge.curation.probe import Probe
    from reelforge.curation.schema import empty_row

    rows = []
    for p in paths:
        r = empty_row()
        key = os.path.basename(p)
        r.update(id=key.replace(".", "_"), kind="video_text", source="v", source_key=key, source_location=p,
                 text="t", meta=json.dumps({"keep": 1}),
                 media=[{"kind": "video", "uri": p, "member": None, "offset": None, "length": None}])
        rows.append(r)
    return Probe(phash=False).process_rows(rows)


def _audio(path: str) -> np.ndarray:
    """16 kHz mono float32 by a plain ffmpeg command (independent of the step's extraction)."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", path, "-vn", "-ac", "1", "-ar", "16000",
                          "-f", "f32le", "pipe:1"], check=True, capture_output=True, timeout=60).stdout
    return np.frombuffer(out, dtype=np.float32)


def _plain_segments(pipe, audio: np.ndarray) -> list[dict]:
    """A plain pipeline call, greedy, its chunks put through the rules the step documents (text
    stripped, empty left out, times clamped to the audio, an open end = the audio's end)."""
    out = pipe({"raw": audio.copy(), "sampling_rate": 16000}, return_timestamps=True,
               generate_kwargs={"max_new_tokens": NEW_TOKENS, "num_beams": 1})
    dur = audio.size / 16000
    segs = []
    for c in out["chunks"]:
        text = c["text"].strip()
        if not text:
            continue
        s, e = c["timestamp"]
        s = min(max(0.0, s), dur)
        e = dur if e is None else min(max(s, e), dur)
        segs.append({"start": round(s, 3), "end": round(e, 3), "text": text})
    return segs


def _check_structure(asr: dict, duration: float) -> None:
    segs = asr["segments"]
    assert segs, asr
    assert all(0 <= s["start"] <= s["end"] <= duration + 1e-6 for s in segs)
    assert [(s["start"], s["end"]) for s in segs] == sorted((s["start"], s["end"]) for s in segs)
    assert all(s["text"] and s["text"] == s["text"].strip() for s in segs)


def test_asr_step_equals_a_plain_pipeline_loop_and_failures_are_ledger_lines(whisper, media):
    from transformers import pipeline

    from reelforge.curation.asr import ASR, extract_audio

    v = os.path.join(media, "videos")
    rows = _rows([os.path.join(v, "talk0.mp4"), os.path.join(v, "silent.mp4"), os.path.join(v, "talk1.mp4")])
    bad = _rows([os.path.join(media, "bad", "truncated.mp4")])[0]
    bad.update(drop_step=None, drop_reason=None, drop_detail=None)  # probe dropped it; show it to asr anyway
    bad["media"][0].update(frames=30, fps=10.0, duration=3.0)
    step = ASR(model=whisper, batch_size=3, device="cpu", max_new_tokens=NEW_TOKENS)
    step.setup()
    out = step.compute([dict(r) for r in rows] + [dict(bad)], step.prepare([dict(r) for r in rows] + [dict(bad)]))

    pipe = pipeline("automatic-speech-recognition", model=whisper, device="cpu")
    for k in (0, 2):
        path = rows[k]["media"][0]["uri"]
        audio = _audio(path)
        np.testing.assert_array_equal(extract_audio(path), audio)  # the step's audio is ffmpeg's
        meta = json.loads(out[k]["meta"])
        assert meta["keep"] == 1 and out[k]["drop_step"] is None  # other meta keys stay
        asr = meta["asr"]
        assert asr["model"] == "tiny-whisper" and asr["language"] in ("en", "zh", "de", "es", "fr", "ja")
        assert asr["duration"] == round(audio.size / 16000, 3) and 2.0 < asr["duration"] < 4.5
        _check_structure(asr, asr["duration"])
        assert asr["segments"] == _plain_segments(pipe, audio)  # batched step == one-by-one pipeline
    assert out[0]["meta"] != out[2]["meta"]
    silent = json.loads(out[1]["meta"])
    assert silent == {"keep": 1, "asr": {"no_audio": True}} and out[1]["drop_step"] is None
    assert out[3]["drop_step"] == "asr" and out[3]["drop_reason"] == "corrupt_video"

    keep = ASR(model=whisper, device="cpu", max_new_tokens=4, on_failure="keep")
    keep.setup()
    (k,) = keep.process([dict(bad)])
    assert k["drop_step"] is None and json.loads(k["meta"])["asr"]["failed"] == "corrupt_video"

    # windows of 1 s: every window's segments inside its window, in order, offset by its start
    win = ASR(model=whisper, batch_size=2, device="cpu", max_new_tokens=8, chunk_length_s=1)
    win.setup()
    (w,) = win.process([dict(rows[0])])
    asr = json.loads(w["meta"])["asr"]
    _check_structure(asr, asr["duration"])
    assert len({int(s["start"]) for s in asr["segments"]}) >= 2  # text from more than one window


def test_bad_params_are_one_sentence(whisper, tmp_path):
    from reelforge.curation.asr import ASR
    from reelforge.mixers.asr_interleave import ASRInterleave

    with pytest.raises(ValueError, match="not a folder"):
        ASR(model=str(tmp_path / "nope"))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="not a Whisper-family"):
        ASR(model=str(tmp_path / "clip"))
    for kw, msg in (({"chunk_length_s": 45}, "chunk_length_s"), ({"batch_size": 0}, "batch_size"),
                    ({"on_failure": "skip"}, "on_failure"), ({"language": "english!"}, "language")):
        with pytest.raises(ValueError, match=msg):
            ASR(model=whisper, **kw)
    with pytest.raises(ValueError, match="max_segments"):
        ASRInterleave(min_segments=5, max_segments=2)
    with pytest.raises(ValueError, match="frame_at"):
        ASRInterleave(frame_at="end")


def test_interleave_orders_frames_and_text_by_time(media, tmp_path):
    from reelforge.mixers.asr_interleave import ASRInterleave

    (row,) = _rows([os.path.join(media, "colours.mp4")])
    planted = [{"start": 2.0, "end": 3.0, "text": "third"}, {"start": 0.0, "end": 1.0, "text": " first "},
               {"start": 3.0, "end": 4.0, "text": "fourth"}, {"start": 1.0, "end": 2.0, "text": "second"},
               {"start": 1.5, "end": 1.0, "text": "backwards: left out"}]
    row["meta"] = json.dumps({"keep": 1, "asr": {"model": "m", "language": "en", "segments": planted}})
    silent = dict(row, id="silent", meta=json.dumps({"asr": {"no_audio": True}}))
    step = ASRInterleave(max_side=None)
    step.workdir = str(tmp_path)
    out = step.process([row, silent])
    assert [r["id"] for r in out] == [row["id"], f"{row['id']}@asr_interleave", "silent"]
    parent, child, untouched = out
    assert parent["drop_step"] is None and untouched == silent
    assert child["kind"] == "interleaved" and child["parent_id"] == row["id"]
    assert child["source_key"] == "colours.mp4@asr_interleave" and child["tokens"] is None
    assert child["text"] == ("<image>[0.0-1.0] first\n<image>[1.0-2.0] second\n"
                             "<image>[2.0-3.0] third\n<image>[3.0-4.0] fourth")
    meta = json.loads(child["meta"])
    assert meta["keep"] == 1 and meta["task"]["task"] == "asr_interleave" and meta["task"]["parent"] == row["id"]
    assert meta["task"]["times"] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]
    assert meta["task"]["params"]["frame_at"] == "middle"
    want = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    assert len(child["media"]) == 4
    for m, rgb in zip(child["media"], want):
        assert m["kind"] == "image" and m["format"] == "jpeg"
        assert m["uri"].startswith(os.path.join(os.path.realpath(tmp_path), "media", "asr_interleave"))
        px = np.asarray(Image.open(m["uri"]).convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
        assert np.abs(px - rgb).max() < 40, (m["uri"], px, rgb)

    # more segments than max_segments: consecutive ones merged, order kept; parent: drop balances the ledger
    step = ASRInterleave(max_segments=2, parent="drop", max_side=32)
    step.workdir = str(tmp_path)
    parent, child = step.process([dict(row)])
    assert (parent["drop_step"], parent["drop_reason"]) == ("asr_interleave", "split_into_asr_interleave")
    assert child["text"] == "<image>[0.0-2.0] first second\n<image>[2.0-4.0] third fourth"
    assert all(max(m["width"], m["height"]) <= 32 for m in child["media"])


def test_recaption_hears_the_asr_and_samples_frames_at_a_rate(media, tmp_path):
    from reelforge.curation.recaption import DEFAULT_PROMPTS, Recaption, rate_indices
    from reelforge.curation.tiny_vlm import build_tiny_vlm

    vlm = build_tiny_vlm(str(tmp_path / "vlm"))
    (row,) = _rows([os.path.join(media, "colours.mp4")])  # 40 frames at 10 fps
    row["meta"] = json.dumps({"asr": {"segments": [{"start": 1.0, "end": 2.0, "text": "world"},
                                                   {"start": 0.0, "end": 1.0, "text": "hello"}]}})
    assert rate_indices(40, 10.0, 2, 32) == list(range(0, 40, 5))
    assert rate_indices(40, 10.0, 0.5, 32) == [0, 20]
    assert rate_indices(40, 10.0, 2, 3) == [0, 5, 10]

    with pytest.raises(ValueError, match="fps"):
        Recaption(model=vlm, fps=0)
    base = Recaption(model=vlm, device="cpu", max_new_tokens=2)
    assert base.prompt_for(row) == ("video", DEFAULT_PROMPTS["video"])  # defaults unchanged
    step = Recaption(model=vlm, device="cpu", max_new_tokens=2, use_asr=True, fps=1, max_frames=3)
    step.setup()
    task, prompt = step.prompt_for(row)
    assert prompt == DEFAULT_PROMPTS["video"] + "\nThe audio says: hello world"
    assert step.prompt_for(dict(row, meta=json.dumps({"asr": {"no_audio": True}})))[1] == DEFAULT_PROMPTS["video"]
    ((kind, frames),) = step._visuals(row)
    # 1 fps, at most 3: frames 0, 10, 20 (red, lime, blue), the last repeated to an even count
    means = [np.asarray(f, dtype=float).reshape(-1, 3).mean(0) for f in frames]
    assert kind == "video" and len(frames) == 4
    for m, rgb in zip(means, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 255)]):
        assert np.abs(m - rgb).max() < 40
    (out,) = step.process([dict(row)])
    assert out["captions"][0]["prompt"] == prompt and out["captions"][0]["task"] == "video"


@pytest.mark.spark
def test_asr_and_interleave_through_spark_reach_the_shards(spark, whisper, media, tmp_path):
    """probe -> asr -> asr_interleave -> shards in Spark local[2]: meta.asr in the shards equals a
    plain transformers pipeline loop on the same audio; the silent video keeps {no_audio: true};
    each speech video derives one interleaved sample; the ledger balances."""
    import webdataset as wds
    from transformers import pipeline

    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    src = {"name": "v", "format": "video_folder", "path": os.path.join(media, "videos")}
    recipe = {"name": "asr", "sources": [src],
              "steps": [{"probe": {"phash": False}},
                        {"asr": {"model": whisper, "batch_size": 2, "device": "cpu", "max_new_tokens": NEW_TOKENS}},
                        {"asr_interleave": {"max_side": 64}}],
              "output": {"path": "out", "shards": {"max_samples": 10}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(str(path), out=out), spark=spark, log=lambda *a: None)
    assert rep["balanced"] and rep["inputs"] == 3 and rep["derived"] == 2 and rep["kept"] == 5
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    assert all(r["fate"] == "kept" for r in ledger)

    pipe = pipeline("automatic-speech-recognition", model=whisper, device="cpu")
    seen = {}
    for s in wds.WebDataset(sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar")), shardshuffle=False):
        j = json.loads(s["json"])
        seen[j["provenance"]["key"]] = j
    assert set(seen) == {"talk0.mp4", "talk1.mp4", "silent.mp4", "talk0.mp4@asr_interleave",
                         "talk1.mp4@asr_interleave"}
    assert seen["silent.mp4"]["meta"]["asr"] == {"no_audio": True}
    for name in SPEECH:
        asr = seen[f"{name}.mp4"]["meta"]["asr"]
        assert asr["segments"] == _plain_segments(pipe, _audio(os.path.join(media, "videos", f"{name}.mp4")))
        child = seen[f"{name}.mp4@asr_interleave"]
        assert child["kind"] == "interleaved" and child["text"].count("<image>") == len(child["media"]) >= 1
        assert child["meta"]["task"]["times"] == [[round(x["start"], 3), round(x["end"], 3)]
                                                   for x in sorted(asr["segments"],
                                                                   key=lambda x: (x["start"], x["end"]))][:16]
