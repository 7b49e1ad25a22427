"""Progress with an ETA from Spark's status tracker, Spark's UI and its URL, a no-op re-run that
writes nothing, and which steps a re-run reused in the report (issue 17, item 5).

- the renderer on a fake status tracker (no Spark): the `\\r` redraw on a TTY, the ETA
  arithmetic, a stage a finished job skipped, plain lines at most every N seconds elsewhere,
  and a poller that stops at once;
- a real run's progress lines (the `log` callable) carry a percentage, the tasks and "ETA";
- with the UI on (a fresh Spark in a subprocess: the session fixture keeps it off), the run's
  first lines print `Spark UI: http://...` and that address answers;
- an unchanged re-run changes no file under --out (mtime_ns and bytes), returns the previous
  report with every step + "shards" reused, and says "nothing to do";
- changing a late step's parameter reuses exactly the earlier steps (report.json, .md, .html).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import yaml

from reelforge.jobs.progress import StepProgress, bar, eta_s, fmt_duration, render

# --- the renderer, on a fake status tracker ---------------------------------------------------


class FakeTracker:
    """Spark's StatusTracker surface: jobs of a group, their stages, the active stages."""

    def __init__(self):
        self.jobs: dict[int, SimpleNamespace] = {}
        self.stages: dict[int, SimpleNamespace] = {}
        self.active: list[int] = []
        self.calls = 0

    def job(self, jid, stage_ids, status="RUNNING"):
        self.jobs[jid] = SimpleNamespace(jobId=jid, stageIds=list(stage_ids), status=status)

    def stage(self, sid, n, done=0, active=0, failed=0):
        self.stages[sid] = SimpleNamespace(stageId=sid, numTasks=n, numCompletedTasks=done,
                                           numActiveTasks=active, numFailedTasks=failed)

    def getJobIdsForGroup(self, group):
        self.calls += 1
        return list(self.jobs) if group == "g" else []

    def getJobInfo(self, jid):
        return self.jobs.get(jid)

    def getActiveStageIds(self):
        return list(self.active)

    def getStageInfo(self, sid):
        return self.stages.get(sid)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_tty_redraws_one_line_in_place_with_the_eta():
    tr, clock, err = FakeTracker(), Clock(), io.StringIO()
    p = StepProgress(tr, "[3/9] clip_score", group="g", stream=err, tty=True, clock=clock)
    tr.job(1, [0, 1])
    tr.stage(0, 200, done=0, active=2)
    tr.stage(1, 66)  # planned, not started
    p.tick()
    first = p.lines[-1]
    assert "0% 0/266 tasks" in first and "elapsed 0:00" in first and first.endswith("ETA ?")
    clock.t += 42
    tr.stage(0, 200, done=120, active=2)
    p.tick()
    # 120 of 266 in 42 s: 146 left at 120/42 tasks a second = 51.1 s
    assert p.lines[-1] == ("[3/9] clip_score  " + bar(120 / 266) + "  45% 120/266 tasks  elapsed 0:42  ETA 0:51")
    assert abs(eta_s(120, 266, 42) - 146 * 42 / 120) < 1e-9
    # a stage of another thread of the step (active, not in the group) counts too
    tr.stage(5, 34, done=4, active=1)
    tr.active = [5]
    clock.t += 8
    p.tick()
    assert " 41% 124/300 tasks  elapsed 0:50" in p.lines[-1]
    tr.active = []
    tr.job(1, [0, 1], status="SUCCEEDED")
    tr.stage(0, 200, done=200)
    tr.stage(1, 66, done=0)  # skipped by the finished job: its output was there
    tr.stage(5, 34, done=34)
    clock.t += 10
    p.stop()
    last = p.lines[-1]
    assert "100% 234/234 tasks  elapsed 1:00  ETA 0:00" in last
    out = err.getvalue()
    # every draw starts with \r (redrawn in place), shorter lines are padded over, one final newline
    assert out.count("\r") == len(p.lines) == 4 and out.endswith("\n") and out.count("\n") == 1
    frames = out.rstrip("\n").split("\r")[1:]
    assert all(len(f) >= len(prev.rstrip()) for prev, f in zip(frames, frames[1:]))
    assert frames[-1].rstrip() == last
    assert bar(0.45) == "▕█████████           ▏" and bar(1.0) == "▕" + "█" * 20 + "▏"
    assert bar(0.0) == "▕" + " " * 20 + "▏" and bar(0.025).startswith("▕▌ ")  # 0.025 * 20 cells = 4 eighths
    assert [fmt_duration(s) for s in (0, 51.4, 59.6, 754, 3723)] == ["0:00", "0:51", "1:00", "12:34", "1:02:03"]


def test_plain_lines_at_most_every_n_seconds_and_one_at_the_end():
    tr, clock, logs = FakeTracker(), Clock(), []
    err = io.StringIO()
    p = StepProgress(tr, "[2/4] probe", logs.append, group="g", stream=err, tty=False, every=10, clock=clock)
    tr.job(7, [3])
    for t, done in [(0, 0), (3, 1), (9, 2), (10, 4), (15, 6), (19.9, 7), (21, 8)]:
        clock.t = 100 + t
        tr.stage(3, 10, done=done)
        p.tick()
    clock.t = 125
    tr.stage(3, 10, done=10)
    p.stop()
    assert err.getvalue() == ""  # not a TTY: nothing drawn, lines go to the log
    assert logs == [render("[2/4] probe", 4, 10, 10), render("[2/4] probe", 8, 10, 21),
                    render("[2/4] probe", 10, 10, 25)]
    assert logs[0].endswith("40% 4/10 tasks  elapsed 0:10  ETA 0:15")
    assert logs[-1].endswith("100% 10/10 tasks  elapsed 0:25  ETA 0:00")
    assert "(2 failed)" in render("x", 1, 4, 2.0, failed=2)


def test_the_poller_stops_at_once():
    tr = FakeTracker()
    tr.job(1, [0])
    tr.stage(0, 4, done=4)
    p = StepProgress(tr, "[1/3] ingest", lambda s: None, group="g", tty=False, poll=0.5).start()
    time.sleep(1.2)
    polled = tr.calls
    t = time.perf_counter()
    p.stop()
    took = time.perf_counter() - t
    print(f"poller: {polled} polls in 1.2 s, stopped in {took * 1000:.1f} ms")
    assert polled >= 2 and took < 0.1


# --- runs through Spark -----------------------------------------------------------------------

def _corpus(root, threshold=0.8) -> str:
    if not (root / "docs.jsonl").exists():
        with open(root / "docs.jsonl", "w") as f:
            for i in range(40):
                words = " ".join(f"w{(i * 7 + j) % 97}x{i}" for j in range(30))
                f.write(json.dumps({"id": f"d{i:03d}", "text": words}) + "\n")
            f.write(json.dumps({"id": "copy", "text": " ".join(f"w{j % 97}x0" for j in range(30))}) + "\n")
    recipe = {"name": "progress-reuse", "sources": [{"name": "docs", "format": "text", "path": "docs.jsonl"}],
              "steps": [{"probe": {}}, {"dedup_near": {"threshold": threshold}}],
              "output": {"path": "out", "shards": {"max_samples": 16}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(root / "recipe.yaml")


def _files(out: str) -> dict[str, tuple[int, bytes]]:
    """Every file under `out` but `_work/` and the lock: relative path -> (mtime_ns, bytes)."""
    got = {}
    for root, dirs, files in os.walk(out):
        rel = os.path.relpath(root, out)
        if rel == ".":
            dirs[:] = [d for d in dirs if d != "_work"]
        for name in files:
            if rel == "." and name.startswith("_reelforge.lock"):
                continue
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                got[os.path.normpath(os.path.join(rel, name))] = (os.stat(p).st_mtime_ns, f.read())
    return got


@pytest.mark.spark
@pytest.mark.slow
def test_run_progress_noop_rerun_and_reused_steps(spark, tmp_path, monkeypatch):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    monkeypatch.setenv("REELFORGE_PROGRESS_EVERY", "0")  # a line at every poll, then the step's last
    recipe = _corpus(tmp_path)
    out = str(tmp_path / "out")
    logs: list[str] = []
    t = time.perf_counter()
    first = run_recipe(load_recipe(recipe, out=out), spark=spark, log=logs.append)
    t_first = time.perf_counter() - t
    assert first["balanced"] and first["kept"] == 40 and first["reused"] == []
    bars = [line for line in logs if "tasks  elapsed" in line]
    for label in ("[1/4] ingest", "[2/4] probe", "[3/4] dedup_near", "[4/4] write shards", "[4/4] ledger + report"):
        mine = [line for line in bars if line.startswith(label + "  ▕")]
        assert mine, (label, logs)
        assert all("%" in line and " ETA " in line for line in mine)
        done, total = mine[-1].split(" tasks")[0].rsplit(" ", 1)[1].split("/")
        assert int(total) > 0 and done == total and " 100% " in mine[-1], mine[-1]  # the step's last line
    with open(os.path.join(out, "report.md")) as f:
        assert "Reused steps: none (every step ran)." in f.read()

    # --- an unchanged re-run: nothing under --out changes ------------------------------------
    before = _files(out)
    assert {"report.json", "report.md", "report.html", "funnel.png", "shards/index.json"} <= set(before)
    assert sum(p.startswith("shards/") and p.endswith(".tar") for p in before) == 3
    logs2: list[str] = []
    t = time.perf_counter()
    again = run_recipe(load_recipe(recipe, out=out), spark=spark, log=logs2.append)
    t_noop = time.perf_counter() - t
    after = _files(out)
    print(f"first run {t_first:.1f} s, no-op re-run {t_noop * 1000:.0f} ms, {len(after)} files unchanged")
    assert after == before  # the same files, the same bytes, the same mtime_ns
    assert again["reused"] == ["ingest", "probe", "dedup_near", "shards"]
    same = json.loads(json.dumps(first))
    assert {k: v for k, v in again.items() if k != "reused"} == {k: v for k, v in same.items() if k != "reused"}
    assert any(line.startswith("nothing to do: ") and line.endswith("(reused all 3 steps and the shards)")
               for line in logs2), logs2
    assert not any("tasks  elapsed" in line or "write shards" in line for line in logs2)

    # --- a shard that lost bytes: the shard phase runs again (the steps are reused) ------------
    index = json.load(open(os.path.join(out, "shards", "index.json")))
    victim = os.path.join(out, "shards", index["shards"][0]["shard"])
    with open(victim, "r+b") as f:
        f.truncate(100)
    logs3: list[str] = []
    third = run_recipe(load_recipe(recipe, out=out), spark=spark, log=logs3.append)
    assert third["reused"] == ["ingest", "probe", "dedup_near"]
    assert not any(line.startswith("nothing to do") for line in logs3)
    assert os.path.getsize(victim) == index["shards"][0]["bytes"]
    assert {p: b for p, (_, b) in _files(out).items() if p.startswith("shards/") and p.endswith(".tar")} == \
        {p: b for p, (_, b) in before.items() if p.startswith("shards/") and p.endswith(".tar")}

    # --- a late step's parameter changed: exactly the earlier steps are reused ----------------
    _corpus(tmp_path, threshold=0.9)
    fourth = run_recipe(load_recipe(recipe, out=out), spark=spark, log=lambda *a: None)
    assert fourth["reused"] == ["ingest", "probe"]
    assert json.load(open(os.path.join(out, "report.json")))["reused"] == ["ingest", "probe"]
    with open(os.path.join(out, "report.md")) as f:
        assert "Reused steps: `ingest`, `probe`." in f.read()
    with open(os.path.join(out, "report.html")) as f:
        html = f.read()
    assert "<h2 id='reuse'>Reused steps</h2>\n<p>ingest, probe</p>" in html


@pytest.mark.spark
@pytest.mark.slow
def test_rerun_without_work_folder_recomputes(spark, tmp_path):
    """`output.keep_work: false`: the last step's output is gone, so the media the shards were read
    from cannot be checked against the index's stamp; an unchanged re-run recomputes, to the same shards."""
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    recipe = _corpus(tmp_path)
    out = str(tmp_path / "out")
    r = load_recipe(recipe, out=out)
    r.keep_work = False
    run_recipe(r, spark=spark, log=lambda *a: None)
    before = _files(out)
    logs: list[str] = []
    r = load_recipe(recipe, out=out)
    r.keep_work = False
    rep = run_recipe(r, spark=spark, log=logs.append)
    assert not os.path.exists(os.path.join(out, "_work")) and rep["reused"] == []
    assert not any(line.startswith("nothing to do") or "already done" in line for line in logs), logs
    tars = {p: b for p, (_, b) in before.items() if p.endswith(".tar")}
    assert tars and {p: b for p, (_, b) in _files(out).items() if p.endswith(".tar")} == tars


@pytest.mark.spark
@pytest.mark.slow
def test_a_changed_media_file_is_not_a_noop(spark, tmp_path):
    """The manifest is unchanged but an image it names was edited in place (same size, same mtime)
    or swapped for a symlink: the re-run must write again, with the new bytes or a drop."""
    import pyarrow.parquet as pq
    from PIL import Image

    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 24), (60 * i, 20, 20)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"images/{i}.png", "caption": f"image {i}"}) + "\n" for i in range(3)))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "media-stamp", "sources": [{"name": "m", "format": "jsonl", "path": "captions.jsonl"}],
        "steps": [{"probe": {}}], "output": {"path": "out", "shards": {"max_samples": 8}}}))
    recipe, out = str(tmp_path / "recipe.yaml"), str(tmp_path / "out")
    run_recipe(load_recipe(recipe, out=out), spark=spark, log=lambda *a: None)
    logs: list[str] = []
    run_recipe(load_recipe(recipe, out=out), spark=spark, log=logs.append)
    assert any(line.startswith("nothing to do") for line in logs)  # unchanged: the stamp matches
    tar = lambda: b"".join(v for p, (_, v) in _files(out).items() if p.endswith(".tar"))  # noqa: E731
    before = tar()

    # 1. the same size and mtime, other pixels (a PNG of the same shape and compression)
    img = tmp_path / "images" / "1.png"
    st = os.stat(img)
    data = img.read_bytes()
    Image.new("RGB", (32, 24), (20, 200, 20)).save(img)
    if len(img.read_bytes()) != len(data):  # keep the size: pad or cut the PNG's trailing bytes
        new = img.read_bytes()
        img.write_bytes(new[:len(data)] if len(new) > len(data) else new + b"\0" * (len(data) - len(new)))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(img).st_size == st.st_size and os.stat(img).st_mtime_ns == st.st_mtime_ns
    logs = []
    run_recipe(load_recipe(recipe, out=out), spark=spark, log=logs.append)
    assert not any(line.startswith("nothing to do") for line in logs), logs
    assert tar() != before

    # 2. swapped for a symlink to a file outside the corpus: the re-run reads it again and refuses it
    os.remove(img)
    os.symlink("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd", img)
    logs = []
    run_recipe(load_recipe(recipe, out=out), spark=spark, log=logs.append)
    assert not any(line.startswith("nothing to do") for line in logs), logs
    line = next(r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist() if r["source_key"].endswith(":2"))
    assert line["fate"] == "dropped" and line["reason"] in ("outside_root", "not_a_regular_file"), line


_UI_SCRIPT = textwrap.dedent("""
    import json, sys, time, urllib.request
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe
    from reelforge.jobs.spark import get_spark
    t = time.perf_counter()
    spark = get_spark("local[1]")
    started = time.perf_counter() - t
    lines = []
    run_recipe(load_recipe(sys.argv[1], out=sys.argv[2]), spark=spark, log=lines.append)
    url = spark.sparkContext.uiWebUrl
    with urllib.request.urlopen(url + "/jobs/", timeout=30) as r:
        status, body = r.status, r.read().decode("utf-8", "replace")
    print(json.dumps({"lines": lines, "url": url, "status": status, "jobs_page": "Spark Jobs" in body,
                      "console_progress": spark.conf.get("spark.ui.showConsoleProgress"), "start_s": started}))
""")


@pytest.mark.spark
@pytest.mark.slow
def test_spark_ui_is_on_and_its_url_printed(tmp_path):
    recipe = _corpus(tmp_path)
    env = {**os.environ, "REELFORGE_SPARK_UI": "1", "REELFORGE_SPARK_UI_PORT": "4040"}
    res = subprocess.run([sys.executable, "-c", _UI_SCRIPT, recipe, str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"UI at {got['url']}, session started in {got['start_s']:.1f} s")
    assert got["url"].startswith("http://") and got["status"] == 200 and got["jobs_page"]
    assert f"Spark UI: {got['url']}" in got["lines"][:3]
    assert got["console_progress"] == "false"  # ours is on: Spark's console bar is off
