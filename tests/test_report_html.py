"""report.html beside report.md, the `inspect` contact sheet and `ledger --reason`/`--key`, read
back from the demo run; both pages opened in headless Chromium (selenium) with every image loaded."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from reelforge.jobs.cli import main

slow = pytest.mark.slow  # the demo run (Spark), shared with other tests

SECTIONS = ("funnel", "drops-step", "drops-source", "sources", "scores", "tokens", "video", "reuse")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600"):
        opts.add_argument(a)
    opts.binary_location = "/usr/bin/chromium"
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    yield d
    d.quit()


def _open(browser, path: str) -> list[dict]:
    """Load the page offline; each <img> with whether it decoded and its natural size."""
    browser.get("file://" + os.path.abspath(path))
    return browser.execute_script(
        "return Array.from(document.images).map(i => ({src: i.src.slice(0, 22), ok: i.complete, "
        "w: i.naturalWidth, h: i.naturalHeight, id: i.id}))")


def _table(browser, heading_id: str) -> dict[str, dict[str, int]]:
    """The cross table after a heading, as {row: {column: count}}."""
    rows = browser.execute_script(
        "const t = document.getElementById(arguments[0]).nextElementSibling;"
        "return Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent));", heading_id)
    head = rows[0]
    return {r[0]: {head[i]: int(r[i].replace(",", "")) for i in range(1, len(r))} for r in rows[1:]}


def _shard_videos(out: str) -> tuple[int, float]:
    """Kept videos and their seconds, from the shards' JSON (not from the report's code)."""
    n, secs = 0, 0.0
    shards = os.path.join(out, "shards")
    for name in sorted(os.listdir(shards)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(shards, name)) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    for med in json.load(tar.extractfile(m)).get("media") or []:
                        if med["kind"] == "video":
                            n += 1
                            secs += med["duration"]
    return n, secs


@slow
def test_report_html_in_chromium(demo_run, browser):
    out, report = demo_run["out"], demo_run["report"]
    path = os.path.join(out, "report.html")
    assert os.path.isfile(path) and os.path.isfile(os.path.join(out, "report.md"))
    text = open(path, encoding="utf-8").read()
    assert "http://" not in text and "https://" not in text and "src='file" not in text  # self-contained
    imgs = _open(browser, path)
    assert imgs and all(i["ok"] and i["w"] > 0 and i["h"] > 0 for i in imgs), imgs
    assert all(i["src"].startswith("data:image/") for i in imgs)
    ids = {i["id"] for i in imgs}
    assert {"funnel-samples", "funnel-tokens"} <= ids
    present = browser.execute_script("return arguments[0].filter(s => document.getElementById(s) !== null)",
                                      list(SECTIONS))
    assert present == list(SECTIONS)
    # the step x reason and source x reason tables say what report.json says
    by_step = _table(browser, "drops-step")
    want = {s["step"]: s["reasons"] for s in report["steps"] if s["reasons"]}
    assert set(by_step) == set(want)
    for step, reasons in want.items():
        assert {k: v for k, v in by_step[step].items() if v and k != "all"} == reasons
        assert by_step[step]["all"] == sum(reasons.values())
    by_source = _table(browser, "drops-source")
    for name, d in report["sources"].items():
        if d["reasons"]:
            assert {k: v for k, v in by_source[name].items() if v and k != "all"} == d["reasons"]
    assert sum(r["all"] for r in by_source.values()) == report["dropped"]
    # a histogram per score (the demo scores quality) and per kept kind with tokens
    assert "score-quality" in ids
    assert {"tokens-image_text", "tokens-text", "tokens-video_text"} <= ids
    # video hours out = the videos the shards hold
    n, secs = _shard_videos(out)
    cells = browser.execute_script(
        "const t = document.getElementById('video').nextElementSibling;"
        "return Array.from(t.rows).slice(1).map(r => Array.from(r.cells).map(c => c.textContent));")
    assert int(cells[1][1].replace(",", "")) == n and n > 0
    assert float(cells[1][2]) == pytest.approx(secs / 3600, abs=1e-4)
    assert float(cells[0][2]) >= float(cells[1][2]) and int(cells[0][1]) >= n
    assert browser.find_element("id", "reuse").find_element("xpath", "following-sibling::p").text == "none"  # fresh run


@slow
def test_inspect_contact_sheet_in_chromium(demo_run, browser, tmp_path, capsys):
    out = demo_run["out"]
    reasons = {r for s in demo_run["report"]["steps"] for r in s["reasons"]}
    assert "duplicate_media" in reasons
    sheet = str(tmp_path / "dups.html")
    assert main(["inspect", out, "--reason", "duplicate_media", "--n", "48", "--out", sheet]) == 0
    n_dups = demo_run["report"]["steps"][[s["step"] for s in demo_run["report"]["steps"]].index("dedup_exact")][
        "reasons"]["duplicate_media"]
    assert f"({n_dups} of {n_dups} samples)" in capsys.readouterr().out
    imgs = _open(browser, sheet)
    assert len(imgs) >= n_dups and all(i["ok"] and i["w"] > 0 for i in imgs), imgs
    html = open(sheet, encoding="utf-8").read()
    assert html.count("data:image/jpeg") == n_dups  # every duplicate got a real picture (images and video frames)
    cards = browser.execute_script("return Array.from(document.querySelectorAll('.card')).map(c => c.textContent)")
    assert len(cards) == n_dups and all("dedup_exact: duplicate_media" in c for c in cards)
    # --n caps the sheet; --step and --kept pick other lines; bad media get a placeholder, not a failure
    assert main(["inspect", out, "--reason", "duplicate_media", "--n", "2", "--out", sheet]) == 0
    assert len(_open(browser, sheet)) == 2
    probe = str(tmp_path / "probe.html")
    assert main(["inspect", out, "--step", "probe", "--out", probe]) == 0
    imgs = _open(browser, probe)
    assert imgs and all(i["ok"] and i["w"] > 0 for i in imgs)
    assert "missing_file" in open(probe).read()
    kept = str(tmp_path / "kept.html")
    assert main(["inspect", out, "--kept", "--source", "videos", "--out", kept]) == 0
    imgs = _open(browser, kept)
    assert imgs and all(i["ok"] and i["w"] > 0 for i in imgs)
    assert open(kept).read().count("data:image/jpeg") == len(imgs)  # first frames of kept videos
    assert main(["inspect", out, "--reason", "no_such_reason", "--out", kept]) == 2


@slow
def test_thumbnail_stays_inside_the_recorded_roots(demo_run, tmp_path):
    from PIL import Image

    from reelforge.jobs.inspect import recorded_roots, thumbnail

    img = tmp_path / "elsewhere.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(img)
    roots = recorded_roots(demo_run["out"], [])
    uri, why = thumbnail({"kind": "image", "uri": str(img)}, roots)
    assert why == "outside_root" and uri.startswith("data:image/png")
    uri, why = thumbnail({"kind": "image", "uri": str(img)}, roots + (str(tmp_path.resolve()),))
    assert why is None
    import base64

    got = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert got.size == (40, 30) and max(abs(a - b) for a, b in zip(got.getpixel((20, 15)), (255, 0, 0))) < 8


@slow
def test_ledger_reason_and_key(demo_run, capsys):
    out = demo_run["out"]
    assert main(["ledger", out, "--reason", "duplicate_media", "--limit", "1000"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    dups = sum(s["reasons"].get("duplicate_media", 0) for s in demo_run["report"]["steps"])
    assert len(lines) == dups and {r["reason"] for r in lines} == {"duplicate_media"}
    assert main(["ledger", out, "--reason", "duplicate_media", "--step", "probe"]) == 1
    capsys.readouterr()
    # --key: the stored key, or with its source file's folders in front (README: data/llava.jsonl:17)
    one = lines[0]
    folder = os.path.basename(os.path.dirname(one["source_location"]))
    for key in (one["source_key"], f"{folder}/{one['source_key']}",
                os.path.join(os.path.dirname(one["source_location"]), one["source_key"])):
        assert main(["ledger", out, "--key", key]) == 0, key
        got = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [g["id"] for g in got] == [one["id"]], key
    assert main(["ledger", out, "--key", f"not-{folder}/{one['source_key']}"]) == 1


def test_distributions_stream_scores_tokens_and_video_hours(tmp_path):
    """run_distributions against numbers counted here: scores split kept / dropped (a row the shard
    writer refused is not kept), tokens per kind, video seconds of inputs (no parent) and of kept rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reelforge.jobs.report import BINS, run_distributions

    root = tmp_path / "run"
    for d in ("_work/01_x", "samples", "ledger"):
        (root / d).mkdir(parents=True)
    rows = [  # id, scores, media (kind, seconds), parent, drop_step
        ("a", {"clip": 0.1, "vlm": 0.9}, [("video", 10.0)], None, "clip_score"),
        ("b", {"clip": 0.5}, [("video", 4.0), ("image", None)], None, None),
        ("c", {"clip": 0.7}, [("video", 2.5)], "b", None),  # a clip: not an input, kept
        ("d", {}, [("image", None)], None, None),
        ("e", {"clip": 0.9}, [("video", 6.0)], None, None),  # refused by the shard writer
        ("f", None, None, None, "bad_json"),
    ]
    media_t = pa.list_(pa.struct([("kind", pa.string()), ("duration", pa.float64())]))
    t = pa.table({"id": [r[0] for r in rows],
                  "scores": pa.array([list(r[1].items()) if r[1] is not None else None for r in rows],
                                     pa.map_(pa.string(), pa.float64())),
                  "media": pa.array([[{"kind": k, "duration": s} for k, s in r[2]] if r[2] else None
                                     for r in rows], media_t),
                  "parent_id": [r[3] for r in rows], "drop_step": [r[4] for r in rows]})
    pq.write_table(t.slice(0, 3), root / "_work/01_x/part-0.parquet")
    pq.write_table(t.slice(3), root / "_work/01_x/part-1.parquet")
    pq.write_table(pa.table({"id": ["b", "c", "d"], "kind": ["video_text", "video_text", "image_text"],
                             "tokens": pa.array([100, 300, None], pa.int64())}), root / "samples/p.parquet")
    pq.write_table(pa.table({"id": ["a", "e", "f", "b", "c", "d"], "step": ["x", "write", "ingest", None, None, None]}),
                   root / "ledger/p.parquet")
    steps = [{"step": s, "dropped": int(s == "write")} for s in ("ingest", "x", "write")]
    d = run_distributions({"paths": {"ledger": str(root / "ledger"), "samples": str(root / "samples")},
                           "steps": steps})
    clip = d["scores"]["clip"]
    assert clip.n == 4 and {k: int(v.sum()) for k, v in clip.counts.items()} == {"kept": 2, "dropped": 2}
    assert clip.edges[0] == pytest.approx(0.1) and clip.edges[-1] == pytest.approx(0.9) and len(clip.edges) == BINS + 1
    assert int(clip.counts["dropped"][0]) == 1 and int(clip.counts["dropped"][-1]) == 1  # a (0.1) and e (0.9)
    assert {k: int(v.sum()) for k, v in d["scores"]["vlm"].counts.items()} == {"dropped": 1}
    assert {k: h.n for k, h in d["tokens"].items()} == {"video_text": 2}
    assert d["video"] == {"in_s": 20.0, "in_videos": 3, "out_s": 6.5, "out_videos": 2, "known": True}
    assert np.isclose(d["tokens"]["video_text"].edges[[0, -1]], [100, 300]).all()
