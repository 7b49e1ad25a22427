"""The `modes` step's `video_frames: [16, 32]`: each video-mode sample once per frame count, a
derived sample whose video carries the plan of exactly that many frames.

Checked on real videos made with ffmpeg, through the step's Python API (and `run_batches`, the
Arrow path the engine runs): the copies' indices are linspace-round, their types and sizes are
`curation.frame_plan`'s for those decoded frames, their tokens their own; the released
processors are the oracle (keye-vl-utils 1.5.2: `fetch_video` ignores `nframes`, so k frames are
asked for as `max_frames: k` with `fps` above the video's; 1.0.0: `nframes: k`).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import textwrap

import pyarrow as pa
import pytest
import torch
from test_keye_parity import run_oracle

from reelforge.curation.frame_plan import fixed_plan_tokens, plan_from_frames
from reelforge.curation.probe import Probe
from reelforge.curation.schema import ARROW_SCHEMA, alive, empty_row, rows_of, to_shard_json
from reelforge.curation.step import StepContext, run_batches
from reelforge.curation.tokens import VisualTokenConfig, slow_fast_sizes, smart_resize
from reelforge.curation.video import decode_frames
from reelforge.mixers.chat import validate_sample
from reelforge.mixers.modes import RenderModes

V15 = VisualTokenConfig()
V10 = VisualTokenConfig(processor="keye-vl-1.0")
_E = ["-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast"]
VIDEOS = {  # name: ffmpeg inputs; every one has more than 32 frames but "short"
    "moving": ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25", "-t", "4"],
    "cuts": ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30:d=1.5", "-f", "lavfi",
             "-i", "smptebars=size=320x240:rate=30:d=1.5", "-f", "lavfi",
             "-i", "color=c=blue:size=320x240:rate=30:d=1.5",
             "-filter_complex", "[0][1][2]concat=n=3:v=1"],
    "static": ["-f", "lavfi", "-i", "color=c=orange:size=240x160:rate=30", "-t", "2"],
    "tall": ["-f", "lavfi", "-i", "cellauto=size=180x320:rate=24:rule=110:seed=7", "-t", "2"],  # many slow frames
    "short": ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-t", "1"],  # 25 frames: no 32-frame copy
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The frame typer works on tiny per-frame tensors: on the shared cores, torch's OpenMP threads
    spin against other processes (15x slower under load); one thread, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("modes_frames")
    out = {}
    for name, args in VIDEOS.items():
        p = os.path.realpath(str(root / f"{name}.mp4"))
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args, *_E, p], check=True, timeout=60)
        out[name] = p
    return out


def _video_row(name: str, path: str, probe: bool = True) -> dict:
    r = empty_row()
    qa = {"question": "When is the pattern on screen?", "answer": "The whole clip, {0}.", "spans": [[0.0, 0.9]]}
    media = {k: None for k in ("member", "offset", "length", "sha256", "format", "width", "height", "duration",
                               "fps", "frames", "codec", "phash")}
    media.update(kind="video", uri=path)
    r.update(id=f"v_{name}", kind="video_text", source="vids", source_key=f"{name}.mp4", source_location=path,
             text=f"The {name} test video.", media=[media], meta=json.dumps({"video_qa": qa}))
    if probe:  # the probe step fills the medium (sizes, frames, fps) as in a run; no plan here
        r = Probe(phash=False, frame_plan=False).process([r])[0]
        assert alive(r), r["drop_reason"]
    return r


def _torch_linspace(total: int, k: int) -> list[int]:
    return torch.linspace(0, total - 1, k).round().long().tolist()


def _ledger_balances(inputs: int, out: list[dict]) -> bool:
    derived = sum(r.get("parent_id") is not None for r in out)
    kept = sum(alive(r) for r in out)
    return inputs + derived == kept + (len(out) - kept) and len({r["id"] for r in out}) == inputs + derived


def test_copies_at_16_and_32_frames_carry_their_own_plans(videos, tmp_path):
    names = ["moving", "cuts", "static"]
    rows = [_video_row(n, videos[n]) for n in names]
    step = RenderModes(sources={"vids": "video"}, video_frames=[16, 32])
    batch = pa.RecordBatch.from_pylist(rows, schema=ARROW_SCHEMA)  # the engine's path: Arrow in and out
    out = [r for b in run_batches(step, [batch], StepContext(workdir=str(tmp_path))) for r in rows_of(b)]
    assert len(out) == 3 * len(rows) and _ledger_balances(len(rows), out)
    for parent in rows:
        p = next(r for r in out if r["id"] == parent["id"])
        assert (p["drop_step"], p["drop_reason"]) == ("modes", "split_into_frame_counts"), p["drop_detail"]
        copies = [r for r in out if r["parent_id"] == parent["id"]]
        assert [c["id"] for c in copies] == [f"{parent['id']}@f16", f"{parent['id']}@f32"]
        assert [c["source_key"] for c in copies] == [f"{parent['source_key']}@f16", f"{parent['source_key']}@f32"]
        m0 = parent["media"][0]
        path, total, fps = m0["uri"], m0["frames"], m0["fps"]
        for c, k in zip(copies, (16, 32)):
            assert alive(c) and c["mode"] == "video" and validate_sample(c) == []
            assert c["messages"] == p["messages"] and c["text"] == parent["text"]
            assert json.loads(c["meta"])["video_frames"] == k
            assert json.loads(c["meta"])["video_qa"] == json.loads(parent["meta"])["video_qa"]
            assert c["tokens"] is None and c["visual_tokens"] is None  # the tokens step counts them after
            m = c["media"][0]
            assert (m["sha256"], m["frames"], m["width"]) == (m0["sha256"], m0["frames"], m0["width"])
            assert m["frame_indices"] == _torch_linspace(total, k) and len(m["frame_indices"]) == k
            # the plan of those very frames, decoded here on their own
            ref = plan_from_frames(decode_frames(path, m["frame_indices"]), m["frame_indices"], fps, V15)
            assert m["frame_types"] == ref["frame_types"], (parent["id"], k)
            assert m["frame_times"] == pytest.approx(ref["timestamps"])
            assert m["slow_size"] == [ref["resized_height"], ref["resized_width"]]
            assert m["fast_size"] == [ref["fast_resized_height"], ref["fast_resized_width"]]
            fast = sum(m["frame_types"])
            own = ((k - fast) * m["slow_size"][0] * m["slow_size"][1] + fast * m["fast_size"][0] * m["fast_size"][1]) \
                // (28 * 28)
            assert m["plan_tokens"] == ref["tokens"] == own == fixed_plan_tokens(m, V15)
            assert m["plan_processor"] == "keye-vl-1.5"
            assert to_shard_json(c, [f"{c['id']}.mp4"])["media"][0]["plan"]["tokens"] == m["plan_tokens"]
        assert copies[0]["media"][0]["plan_tokens"] < copies[1]["media"][0]["plan_tokens"]
    # slow and fast frames both occur (the static video is all fast after its first frame)
    static = next(r for r in out if r["id"] == "v_static@f32")["media"][0]
    assert static["frame_types"] == [0] + [1] * 31
    cuts = next(r for r in out if r["id"] == "v_cuts@f16")["media"][0]["frame_types"]
    assert cuts.count(0) >= 3 and cuts.count(1) >= 3, cuts


def test_without_video_frames_nothing_changes(videos):
    row = _video_row("moving", videos["moving"])
    before = json.loads(json.dumps(row))
    out = RenderModes(sources={"vids": "video"}).process([row])
    assert len(out) == 1 and alive(out[0]) and out[0]["id"] == "v_moving" and out[0]["parent_id"] is None
    assert out[0]["media"] == before["media"] and out[0]["mode"] == "video"
    assert "video_frames" not in json.loads(out[0]["meta"])


def test_unreadable_and_short_videos_are_ledger_drops(videos, tmp_path):
    good = _video_row("moving", videos["moving"])
    bad = []
    head = open(videos["moving"], "rb").read()[:20000]  # a truncated MP4: no index
    for name, data in (("junk", b"this is not a video\n" * 200), ("cut", head)):
        path = os.path.realpath(str(tmp_path / f"{name}.mp4"))
        with open(path, "wb") as f:
            f.write(data)
        bad.append(dict(good, id=f"v_{name}", media=[dict(good["media"][0], uri=path)]))  # probed, then replaced
    missing = dict(good, id="v_gone", media=[dict(good["media"][0], uri=os.path.realpath(str(tmp_path / "gone.mp4")))])
    short = _video_row("short", videos["short"])
    text = dict(empty_row(), id="t", kind="text", source="docs", source_key="t", source_location="x", text="hi")
    rows = [*bad, missing, short, text]
    out = RenderModes(sources={"vids": "video"}, video_frames=[16, 32]).process(rows)
    by_id = {r["id"]: r for r in out}
    assert (by_id["v_junk"]["drop_step"], by_id["v_junk"]["drop_reason"]) == ("modes", "corrupt_video")
    assert by_id["v_cut"]["drop_reason"] == "corrupt_video" and by_id["v_cut"]["drop_detail"].startswith("media 0: ")
    assert by_id["v_gone"]["drop_reason"] == "missing_file"
    assert not any(r.get("parent_id") in ("v_junk", "v_cut", "v_gone") for r in out)  # no copies of what cannot be read
    assert by_id["v_short"]["drop_reason"] == "split_into_frame_counts"
    assert alive(by_id["v_short@f16"]) and by_id["v_short@f16"]["media"][0]["frame_indices"] == _torch_linspace(25, 16)
    assert (by_id["v_short@f32"]["drop_step"], by_id["v_short@f32"]["drop_reason"]) == ("modes", "too_few_frames")
    assert "has 25" in by_id["v_short@f32"]["drop_detail"]
    assert alive(by_id["t"]) and by_id["t"]["text"] == "hi"  # other sources pass
    assert len(out) == 7 and _ledger_balances(len(rows), out)


def test_a_video_inside_a_tar(videos, tmp_path):
    tar_path = os.path.realpath(str(tmp_path / "v.tar"))
    with tarfile.open(tar_path, "w") as tf:
        tf.add(videos["moving"], arcname="a/moving.mp4")
    with tarfile.open(tar_path) as tf:
        info = tf.getmember("a/moving.mp4")
    plain = _video_row("moving", videos["moving"])
    row = json.loads(json.dumps(plain))
    row["media"][0].update(uri=tar_path, member="a/moving.mp4", offset=info.offset_data, length=info.size)
    out = RenderModes(sources={"vids": "video"}, video_frames=[16]).process([row, plain])
    a, b = out[1]["media"][0], out[3]["media"][0]
    assert out[1]["id"] == "v_moving@f16" and alive(out[1])
    assert {k: a[k] for k in ("frame_indices", "frame_types", "slow_size", "fast_size", "plan_tokens")} == \
        {k: b[k] for k in ("frame_indices", "frame_types", "slow_size", "fast_size", "plan_tokens")}


def test_keye_vl_1_0_copies_every_frame_slow(videos):
    row = _video_row("moving", videos["moving"])
    out = RenderModes(sources={"vids": "video"}, video_frames=[16, 32], processor="keye-vl-1.0").process([row])
    h, w = row["media"][0]["height"], row["media"][0]["width"]
    for c, k in zip(out[1:], (16, 32)):
        m = c["media"][0]
        # 1.0's per-frame bound for k frames: max(min(768 tokens, 24,576 / k * 2 tokens), int(1.05 * 128 tokens))
        bound = max(min(768 * 784, 24576 * 784 / k * 2), int(128 * 784 * 1.05))
        rh, rw = smart_resize(h, w, 28, 128 * 784, bound)
        assert m["frame_types"] == [0] * k and m["slow_size"] == [rh, rw] and m["fast_size"] is None
        assert m["plan_tokens"] == k * (rh // 28) * (rw // 28) == fixed_plan_tokens(m, V10)
        assert m["plan_processor"] == "keye-vl-1.0" and m["frame_indices"] == _torch_linspace(m["frames"], k)
        assert fixed_plan_tokens(m, V15) is None  # another processor's plan is not this one's count


def test_fixed_plan_tokens_recount_with_other_numbers_and_keep_orientation():
    """What the tokens step needs for a copy: its own frame count and types, any preset numbers."""
    types = [0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1]
    m = {"kind": "video", "height": 240, "width": 320, "frame_types": types, "frame_indices": list(range(16)),
         "plan_processor": "keye-vl-1.5", "slow_size": [252, 336], "fast_size": [140, 196], "plan_tokens": 0}
    s = slow_fast_sizes(240, 320, 4, 12, V15)
    assert fixed_plan_tokens(m, V15) == s["tokens"] == m["plan_tokens"] > 0
    assert m["slow_size"] == [s["resized_height"], s["resized_width"]]
    small = VisualTokenConfig(video_total_tokens=300)  # a smaller budget: smaller frames, fewer tokens
    t = slow_fast_sizes(240, 320, 4, 12, small)
    assert fixed_plan_tokens(m, small) == t["tokens"] < s["tokens"]
    assert m["fast_size"] == [t["fast_resized_height"], t["fast_resized_width"]]
    upright = dict(m, slow_size=[t["resized_width"], t["resized_height"]])  # planned upright: a rotated video
    assert fixed_plan_tokens(upright, small) == t["tokens"]
    assert upright["slow_size"] == [t["resized_width"], t["resized_height"]]
    assert fixed_plan_tokens(dict(m, frame_types=None), V15) is None
    assert fixed_plan_tokens(dict(m, plan_processor="keye-vl-1.0"), V15) is None


@pytest.mark.parametrize("value", [[16, 16], [0, 16], [-4], ["16"], [True], [], 16, [16.0]])
def test_video_frames_is_checked(value, tmp_path):
    from reelforge.jobs.recipe import RecipeError, parse_recipe

    with pytest.raises(ValueError, match=r"`modes.video_frames` must be a list of distinct positive frame counts"):
        RenderModes(sources={"vids": "video"}, video_frames=value)
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    raw = {"sources": [{"name": "t", "format": "text", "path": "t.jsonl"}], "output": "out",
           "steps": [{"modes": {"sources": {"t": "video"}, "video_frames": value}}]}
    with pytest.raises(RecipeError, match=r"steps.0..modes.*video_frames"):
        parse_recipe(raw, str(tmp_path))


def test_video_frames_limits_per_processor():
    with pytest.raises(ValueError, match="sample .16, 16. frames under keye-vl-1.0"):
        RenderModes(sources={"vids": "video"}, video_frames=[15, 16], processor="keye-vl-1.0")
    with pytest.raises(ValueError, match="at most 1365"):
        RenderModes(sources={"vids": "video"}, video_frames=[16, 5000])
    with pytest.raises(ValueError, match="give one of them"):
        RenderModes(sources={"vids": "video"}, video_frames=[16], processor="keye-vl-1.0",
                    visual={"processor": "keye-vl-1.5"})
    assert RenderModes(sources={"vids": "video"}, video_frames=[16, 32]).video_frames == [16, 32]


# ----------------------------------------------------------------------------- the releases as oracles

ORACLE15 = textwrap.dedent(r'''
    import json, sys
    import decord
    import keye_vl_utils
    from keye_vl_utils import vision_process as vp

    out = {"version_file": keye_vl_utils.__file__, "videos": []}
    for path, counts in json.load(open(sys.argv[1])):
        vr = decord.VideoReader(path)
        res = {"total": len(vr), "fps": vr.get_avg_fps()}
        for k in counts:
            # `nframes` is documented and ignored: the release samples at 2 fps whatever it says
            _, kw = vp.fetch_video({"video": path, "nframes": k})
            res[f"nframes_{k}"] = len(kw["frame_types"])
            # k frames, as the release can be asked for them: at most k, at the video's own rate
            _, kw = vp.fetch_video({"video": path, "fps": 1000.0, "max_frames": k})
            res[str(k)] = {"frame_types": kw["frame_types"].tolist(), "timestamps": kw["timestamps"].tolist(),
                           "size": [kw["height"], kw["width"]], "fast_size": [kw["fast_height"], kw["fast_width"]]}
        out["videos"].append(res)
    print(json.dumps(out))
''')

ORACLE10 = textwrap.dedent(r'''
    import json, sys
    import keye_vl_utils
    from keye_vl_utils import vision_process as vp

    out = {"version_file": keye_vl_utils.__file__, "videos": []}
    for path, counts in json.load(open(sys.argv[1])):
        out["videos"].append({str(k): list(vp.fetch_video({"video": path, "nframes": k,
                                                            "total_pixels": 24576 * 28 * 28}).shape)
                              for k in counts})
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_plans_equal_the_released_processors(videos, tmp_path, monkeypatch):
    names = ["moving", "cuts", "static", "tall"]
    rows = [_video_row(n, videos[n]) for n in names]
    out15 = RenderModes(sources={"vids": "video"}, video_frames=[16, 32]).process([dict(r) for r in rows])
    out10 = RenderModes(sources={"vids": "video"}, video_frames=[16, 32], processor="keye-vl-1.0").process(
        json.loads(json.dumps(rows)))
    cases = [[videos[n], [16, 32]] for n in names]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the releases' subprocesses: same answers, no thread thrash
    rel15 = run_oracle("1.5.2", cases, tmp_path, code=ORACLE15)["videos"]
    rel10 = run_oracle("1.0.0", cases, tmp_path, code=ORACLE10)["videos"]
    fast_frames = slow_frames = 0
    for row, ans15, ans10 in zip(rows, rel15, rel10, strict=True):
        m0 = row["media"][0]
        assert ans15["total"] == m0["frames"]
        for k in (16, 32):
            assert ans15[f"nframes_{k}"] == int(m0["frames"] / ans15["fps"] * 2) != k  # nframes: ignored
            c = next(r for r in out15 if r["id"] == f"{row['id']}@f{k}")["media"][0]
            a = ans15[str(k)]
            assert c["frame_types"] == a["frame_types"], (row["id"], k)
            assert c["frame_times"] == a["timestamps"]
            assert c["slow_size"] == a["size"] and c["fast_size"] == a["fast_size"], (row["id"], k)
            f = sum(a["frame_types"])
            assert c["plan_tokens"] == slow_fast_sizes(m0["height"], m0["width"], k - f, f, V15)["tokens"] == \
                ((k - f) * a["size"][0] * a["size"][1] + f * a["fast_size"][0] * a["fast_size"][1]) // 784
            fast_frames, slow_frames = fast_frames + f, slow_frames + k - f
            c10 = next(r for r in out10 if r["id"] == f"{row['id']}@f{k}")["media"][0]
            n, _, h, w = ans10[str(k)]
            assert (len(c10["frame_indices"]), *c10["slow_size"]) == (n, h, w) == (k, h, w), (row["id"], k)
            assert c10["plan_tokens"] == n * (h // 28) * (w // 28)
    print(f"video_frames parity: {len(rows)} videos x (16, 32) frames, {slow_frames} slow, {fast_frames} fast")
    assert fast_frames >= 40 and slow_frames >= 30  # both kinds of frame, not one case


@pytest.mark.parametrize("processor", ["keye-vl-1.5", "keye-vl-1.0"])
def test_tokens_step_counts_each_copy_by_its_own_plan(videos, tmp_path, processor):
    """The planner reads visual_tokens: a 16- and a 32-frame copy of one video must count their
    own plans, not the parent's metadata count (which would make both copies the same)."""
    from reelforge.curation.tiny_models import build_tiny_tokenizer
    from reelforge.curation.token_count import CountTokens

    tok = build_tiny_tokenizer(str(tmp_path / "tok"), texts=["the moving test video"] * 20, vocab_size=300)
    row = _video_row("moving", videos["moving"])
    out = RenderModes(sources={"vids": "video"}, video_frames=[16, 32], processor=processor).process([row])
    copies = [r for r in out if r.get("parent_id")]
    step = CountTokens(tokenizer=tok, processor=processor)
    step.setup(StepContext(workdir=str(tmp_path)))
    counted = step.process(copies)
    assert [alive(r) for r in counted] == [True, True], [(r["drop_reason"], r["drop_detail"]) for r in counted]
    assert [r["visual_tokens"] for r in counted] == [c["media"][0]["plan_tokens"] for c in copies]
    assert counted[0]["visual_tokens"] < counted[1]["visual_tokens"]
    parent = step.process([row])[0]
    assert parent["visual_tokens"] not in (counted[0]["visual_tokens"], counted[1]["visual_tokens"])
