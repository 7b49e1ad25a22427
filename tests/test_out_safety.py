"""`--out` never deletes what the run did not write, one run at a time, and what a run leaves
is either complete or absent: refusals, the lock, a run killed while writing shards, resume
that sees a same-size edit, a corrupt step marker, and shard JSON that describes its bytes."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile

import pytest
import yaml
from PIL import Image

from reelforge.jobs.recipe import RecipeError, load_recipe
from reelforge.jobs.run import LOCK, RUN_MARKER, OutputWriteError, io_error_message, run_recipe


def _quiet(*_a) -> None:
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("safety") / "corpus"
    (root / "images").mkdir(parents=True)
    (root / "tars").mkdir()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(root / "images" / "a.png")
    Image.new("RGB", (36, 28), (20, 200, 20)).save(root / "images" / "b.jpg")
    Image.new("P", (32, 32), 3).save(root / "images" / "c.gif")  # re-encoded to PNG in the shard
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"image": "images/a.png", "caption": "red"}, {"image": "images/b.jpg", "caption": "green"},
        {"image": "images/c.gif", "caption": "a gif"}]))
    with tarfile.open(root / "tars" / "t.tar", "w") as tf:
        for i in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (24 + i, 24), (0, 0, 90 * i)).save(buf, "PNG")
            for name, data in ((f"{i:03d}.png", buf.getvalue()), (f"{i:03d}.txt", b"tar sample %d" % i)):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    recipe = {"name": "safety", "sources": [{"name": "m", "format": "jsonl", "path": "captions.jsonl"},
                                            {"name": "t", "format": "webdataset", "path": "tars/"}],
              "steps": [{"probe": {}}], "output": {"path": "out", "shards": {"max_samples": 2}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(root / "recipe.yaml")


def _tree(path: str) -> dict[str, bytes]:
    return {os.path.relpath(p, path): open(p, "rb").read()
            for p in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(p)}


def _complete_or_absent(out: str) -> str:
    """'complete' when the index and report exist and every shard they name is there; 'absent'
    when neither exists; anything else fails."""
    index, report = os.path.join(out, "shards", "index.json"), os.path.join(out, "report.json")
    if not os.path.exists(index) and not os.path.exists(report):
        assert not os.path.exists(os.path.join(out, "ledger"))
        return "absent"
    shards = json.load(open(index))["shards"]
    assert json.load(open(report))["shards"] == len(shards)
    for s in shards:
        path = os.path.join(out, "shards", s["shard"])
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == s["sha256"]
    return "complete"


def test_refusals_leave_every_file_intact(corpus, tmp_path, spark):
    corpus_dir = os.path.dirname(corpus)
    # a folder with someone else's files
    foreign = tmp_path / "foreign"
    (foreign / "shards").mkdir(parents=True)
    (foreign / "shards" / "my-own-shard.tar").write_bytes(b"mine")
    (foreign / "ledger").mkdir()
    (foreign / "ledger" / "accounts.csv").write_text("a,b\n")
    before = _tree(str(foreign))
    with pytest.raises(RecipeError, match="did not write") as e:
        run_recipe(load_recipe(corpus, out=str(foreign)), spark=spark, log=_quiet)
    assert "\n" not in str(e.value) and _tree(str(foreign)) == before
    # another recipe's output
    other = tmp_path / "other"
    other.mkdir()
    (other / RUN_MARKER).write_text(json.dumps({"recipe": "someone-else"}))
    with pytest.raises(RecipeError, match="someone-else"):
        run_recipe(load_recipe(corpus, out=str(other)), spark=spark, log=_quiet)
    # the corpus folder itself, or inside a folder a source searches
    for out in (corpus_dir, os.path.join(corpus_dir, "tars"), os.path.join(corpus_dir, "tars", "out")):
        with pytest.raises(RecipeError, match="--out"):
            load_recipe(corpus, out=out)
    # through the command line: one sentence, exit 2, the input still there
    corpus_before = _tree(corpus_dir)
    res = subprocess.run([sys.executable, "-m", "reelforge.jobs.cli", "run", corpus, "--out", corpus_dir],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert _tree(corpus_dir) == corpus_before


def test_second_run_on_a_held_output_is_refused(corpus, tmp_path, spark):
    out = tmp_path / "busy"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(RecipeError, match=f"in use by another reelforge run \\(pid {os.getpid()}"):
        run_recipe(load_recipe(corpus, out=str(out)), spark=spark, log=_quiet)
    assert sorted(os.listdir(out)) == [LOCK]


def test_out_lifecycle(corpus, tmp_path, spark, monkeypatch):
    out = str(tmp_path / "run")
    # 1. a fresh run; the shard JSON describes the bytes in the shard (the GIF is PNG there)
    first = run_recipe(load_recipe(corpus, out=out), spark=spark, log=_quiet)
    assert first["kept"] == 5 and json.load(open(os.path.join(out, RUN_MARKER)))["recipe"] == "safety"
    assert not os.path.exists(os.path.join(out, LOCK))
    formats = []
    for path in sorted(glob.glob(os.path.join(out, "shards", "*.tar"))):
        with tarfile.open(path) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".json"):
                for m in json.loads(data).get("media", []):
                    body = members[m["member"]]
                    assert m["sha256"] == hashlib.sha256(body).hexdigest() and m["length"] == len(body)
                    assert m["format"] == ("png" if m["member"].endswith(".png") else "jpeg")
                    formats.append(m["format"])
    assert sorted(formats) == ["jpeg", "png", "png", "png", "png"]
    first_shards = {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(out, "shards", "*.tar"))}
    assert _complete_or_absent(out) == "complete"

    # 2. a re-run that fails while writing shards (the disk fills): one sentence, no temporary
    #    file, and no report or index naming shards that are gone. A shard is missing, so the
    #    re-run is not a no-op (an unchanged, complete output is reused untouched)
    os.remove(sorted(glob.glob(os.path.join(out, "shards", "*.tar")))[0])
    import reelforge.jobs.shards as shards

    def full_disk(df, out_dir, **kw):
        open(os.path.join(out_dir, "shard-000000.tar.tmp-99999"), "wb").write(b"partial")
        raise OSError(28, "No space left on device", os.path.join(out_dir, "shard-000000.tar.tmp-99999"))

    monkeypatch.setattr(shards, "write_shards", full_disk)
    with pytest.raises(OutputWriteError) as e:
        run_recipe(load_recipe(corpus, out=out), spark=spark, log=_quiet)
    assert str(e.value) == f"cannot write to {out}: No space left on device."
    monkeypatch.undo()
    assert _complete_or_absent(out) == "absent"
    assert not glob.glob(os.path.join(out, "**", "*.tmp-*"), recursive=True)
    assert not os.path.exists(os.path.join(out, LOCK))

    # 3. the next run recovers; an empty step marker counts as "not done", never a crash
    open(os.path.join(out, "_work", "01_probe", "_REELFORGE"), "w").close()
    logs: list[str] = []
    run_recipe(load_recipe(corpus, out=out), spark=spark, log=logs.append)
    assert [line.split("]")[1].split(":")[0].strip() for line in logs if "already done" in line] == ["ingest"]
    assert _complete_or_absent(out) == "complete"
    assert {os.path.basename(p): open(p, "rb").read()
            for p in glob.glob(os.path.join(out, "shards", "*.tar"))} == first_shards

    # 4. a same-size, same-mtime edit of a source is seen; a stale lock (dead pid) is taken
    #    over; a file someone put in shards/ stays
    manifest = os.path.join(os.path.dirname(corpus), "captions.jsonl")
    st = os.stat(manifest)
    text = open(manifest).read()
    open(manifest, "w").write(text.replace('"green"', '"GREEN"'))
    os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(manifest).st_size == st.st_size and os.stat(manifest).st_mtime_ns == st.st_mtime_ns
    dead = subprocess.Popen(["true"])
    dead.wait()
    open(os.path.join(out, LOCK), "w").write(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    open(os.path.join(out, "shards", "notes.txt"), "w").write("mine")
    logs = []
    again = run_recipe(load_recipe(corpus, out=out), spark=spark, log=logs.append)
    assert not any("already done" in line for line in logs), logs  # ingest and probe recomputed
    assert again["kept"] == 5 and _complete_or_absent(out) == "complete"
    assert open(os.path.join(out, "shards", "notes.txt")).read() == "mine"
    texts = set()
    for path in glob.glob(os.path.join(out, "shards", "*.tar")):
        with tarfile.open(path) as tf:
            texts |= {json.loads(tf.extractfile(m).read()).get("text") for m in tf if m.name.endswith(".json")}
    assert "GREEN" in texts and "green" not in texts
    assert set(first_shards) == {os.path.basename(p) for p in glob.glob(os.path.join(out, "shards", "*.tar"))}
    assert not os.path.exists(os.path.join(out, LOCK))


def test_write_errors_are_one_sentence(corpus, tmp_path, monkeypatch, capsys):
    from reelforge.jobs import cli, run

    wrapped = Exception("An error occurred while calling o123.parquet.\n: org.apache.spark.SparkException: "
                        "Job aborted ... pyspark.errors.exceptions.base.PySparkRuntimeError ... OSError: "
                        "[Errno 28] No space left on device: '/x/shards/shard-000001.tar.tmp-77'\n\tat java...")
    assert io_error_message(wrapped) == "No space left on device"
    assert io_error_message(Exception("java.io.IOException: Read-only file system")) == "Read-only file system"
    assert io_error_message(ValueError("bad")) is None

    def fail(recipe, master=None, log=print, spark=None):
        raise OutputWriteError(f"cannot write to {recipe.output}: No space left on device.")

    monkeypatch.setattr(run, "run_recipe", fail)
    assert cli.main(["run", corpus, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == f"reelforge: cannot write to {tmp_path / 'o'}: No space left on device.\n"
