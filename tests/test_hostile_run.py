"""A corpus built by an attacker and an unlucky data team goes through `reelforge run` (local[2]):
the job exits 0, every hostile item is a ledger line with its reason, inputs = kept + dropped,
no byte of any file outside the corpus roots reaches a shard, no process outlives the run, and
no Python worker grows past 1.5 GiB."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import uuid

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

pytestmark = [pytest.mark.spark, pytest.mark.slow]

WORKER_RSS_LIMIT = int(1.5 * 2**30)


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


def _noise_png(path: str, seed: int, size=(64, 48)) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes | None = None, **kw) -> None:
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    import numpy as np

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def build(tmp: str) -> tuple[str, dict, str]:
    """Corpus + recipe; returns (recipe path, {(source, key-fragment): allowed reasons}, outside folder)."""
    corpus, outside = os.path.join(tmp, "corpus"), os.path.join(tmp, "outside")
    for d in (corpus, outside, f"{corpus}/images", f"{corpus}/videos", f"{corpus}/tars"):
        os.makedirs(d, exist_ok=True)
    # what lives outside the roots and must never reach a shard
    _noise_png(f"{outside}/secret.png", 99)
    with open(f"{outside}/secret.txt", "w") as f:
        f.write("TOP-SECRET-" + uuid.uuid4().hex + "\n")
    # content no corpus file shares (the corpus videos are testsrc2), so any match below is a leak
    _ff("-f", "lavfi", "-i", "cellauto=s=96x64:rate=10:seed=7", "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        "-f", "mpegts", f"{outside}/secret.ts")
    _ff("-f", "lavfi", "-i", "mandelbrot=s=96x64:rate=10", "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        f"{outside}/secret.mp4")

    expect: dict[tuple[str, str], set[str]] = {}
    # --- a JSONL manifest of image rows, good and hostile ------------------------------------
    for i in range(3):
        _noise_png(f"{corpus}/images/good{i}.png", i)
    os.symlink(f"{outside}/secret.png", f"{corpus}/images/link_out.png")
    os.symlink(f"{corpus}/images/good0.png", f"{corpus}/images/link_in.png")
    os.symlink("/dev/zero", f"{corpus}/images/zero.png")
    os.mkfifo(f"{corpus}/images/fifo.png")
    Image.new("1", (20000, 12000)).save(f"{corpus}/images/bomb.png")  # 240 MP behind a tiny file
    rows: list[tuple[str, set[str] | None]] = [
        (json.dumps({"image": "images/good0.png", "caption": "good zero"}), None),
        (json.dumps({"image": "images/good1.png", "caption": "good one"}), None),
        (json.dumps({"image": "images/link_in.png", "caption": "a link that stays inside"}), None),
        (json.dumps({"image": "../outside/secret.png", "caption": "dot-dot"}), {"outside_root"}),
        (json.dumps({"image": f"{outside}/secret.png", "caption": "absolute"}), {"outside_root"}),
        (json.dumps({"image": f"file://{outside}/secret.png", "caption": "file url"}), {"outside_root"}),
        (json.dumps({"image": "http://127.0.0.1:9/x.png", "caption": "http"}), {"unsupported_uri"}),
        (json.dumps({"image": "images/link_out.png", "caption": "symlink out"}), {"outside_root"}),
        (json.dumps({"image": "/dev/zero", "caption": "device"}), {"outside_root", "not_a_regular_file"}),
        (json.dumps({"image": "/dev/urandom", "caption": "device"}), {"outside_root", "not_a_regular_file"}),
        (json.dumps({"image": "images/zero.png", "caption": "link to a device"}),
         {"outside_root", "not_a_regular_file"}),
        (json.dumps({"image": "images/fifo.png", "caption": "fifo"}), {"not_a_regular_file"}),
        (json.dumps({"image": "images/bomb.png", "caption": "pixel bomb"}), {"too_many_pixels"}),
        ("[" * 100_000 + "]" * 100_000, {"bad_json", "bad_record"}),
        ('{"nope": ', {"bad_json"}),
        (json.dumps({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}),
         {"bad_record", "*"}),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]},
                                  {"role": "assistant", "content": "x"}]}), {"bad_record", "*"}),
        (json.dumps({"prompt": 7, "chosen": 5, "rejected": "no"}), {"bad_record", "*"}),
    ]
    with open(f"{corpus}/images.jsonl", "w") as f:
        for lineno, (line, reasons) in enumerate(rows, 1):
            f.write(line + "\n")
            if reasons:
                expect[("images", f"images.jsonl:{lineno}")] = reasons
    # --- videos: a good one, and playlists that name outside media ---------------------------
    _ff("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=10", "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        f"{corpus}/videos/good.mp4")
    with open(f"{corpus}/videos/hls.mp4", "w") as f:
        f.write(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{outside}/secret.ts\n#EXT-X-ENDLIST\n")
    with open(f"{corpus}/videos/concat.mp4", "w") as f:
        f.write(f"ffconcat version 1.0\nfile '{outside}/secret.mp4'\n")
    for name in ("good", "hls", "concat"):
        with open(f"{corpus}/videos/{name}.txt", "w") as f:
            f.write(f"a caption for {name}")
    for name in ("hls.mp4", "concat.mp4"):
        expect[("videos", name)] = {"corrupt_video", "unsupported_container", "not_a_video"}
    # --- a tar with hostile members -------------------------------------------------------------
    with tarfile.open(f"{corpus}/tars/a.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        _tar_add(tf, "ok1.png", _png_bytes(1))
        _tar_add(tf, "ok1.txt", b"fine")
        _tar_add(tf, "../../escape.png", _png_bytes(2))
        _tar_add(tf, "../../escape.txt", b"dot-dot member")
        _tar_add(tf, "sym.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _tar_add(tf, "sym.txt", b"symlink member")
        _tar_add(tf, "hard.png", type=tarfile.LNKTYPE, linkname="ok1.png")
        _tar_add(tf, "hard.txt", b"hardlink member")
        _tar_add(tf, "fifo.png", type=tarfile.FIFOTYPE)
        _tar_add(tf, "fifo.txt", b"fifo member")
        _tar_add(tf, "dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        _tar_add(tf, "dev.txt", b"device member")
        _tar_add(tf, "dup.png", _png_bytes(3))
        _tar_add(tf, "dup.txt", b"first")
        _tar_add(tf, "dup.txt", b"second")
        _tar_add(tf, "ok2.png", _png_bytes(4))
        _tar_add(tf, "ok2.txt", b"also fine")
    for key in ("sym", "hard", "fifo", "dev"):
        expect[("tars", f"a.tar/{key}")] = {"not_a_regular_file"}
    # --- a Parquet manifest whose row 4 of 10 has a bad type -------------------------------------
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())]))
    table = pa.table({"image": [f"images/good{i % 3}.png" for i in range(10)],
                      "caption": [f"parquet row {i}" for i in range(10)],
                      "messages": pa.array([None] * 3 + [[{"role": "user", "content": 42}]] + [None] * 6, msgs)})
    pq.write_table(table, f"{corpus}/rows.parquet")
    # --- think-with-image rows whose tool code tries to escape -----------------------------------
    secret_txt = f"{outside}/secret.txt"
    escapes = {
        "read_file": f"open({secret_txt!r}).read()\nresult = image",
        "passwd_png": "import numpy as np\nd = open('/etc/passwd','rb').read()\n"
                      "result = Image.frombytes('L', (len(d), 1), d)",
        "subprocess": f"import subprocess\nsubprocess.run(['cat', {secret_txt!r}])\nresult = image",
        "forged_result": (f"import json, os\nopen('_result.json','w').write(json.dumps("
                          f"{{'status': 'ok', 'outputs': [{outside + '/secret.png'!r}]}}))\nos._exit(0)"),
        "hook_code": "save.__globals__['_hook'].__code__ = (lambda e, a: None).__code__\n"
                     f"import subprocess\nsubprocess.run(['cp', {secret_txt!r}, 'x'])\nresult = image",
        "fork_exec": "import _posixsubprocess, os, inspect\n"
                     "args = [['/bin/sh', '-c', 'sleep 600'], [b'/bin/sh'], True, (), None, None]"
                     " + [-1] * 8 + [False, False, -1, None, None, None, -1, None]\n"
                     "try:\n    _posixsubprocess.fork_exec(*args)\nexcept TypeError:\n"
                     "    _posixsubprocess.fork_exec(*args, False)\nresult = image",
        "detached": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                    "        time.sleep(600)\n    os._exit(0)\nresult = image",
        "fork_bomb": "import os\nwhile True:\n    os.fork()",
        "spin": "while True: pass",
        "socket": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\nresult = image",
    }
    with open(f"{corpus}/agent.jsonl", "w") as f:
        f.write(json.dumps({"image": "images/good2.png", "tool_steps": [
            {"thought": "Zoom in.", "code": "result = image.crop((0, 0, 32, 24)).resize((64, 48))"}],
            "conversations": [{"from": "human", "value": "<image>\nWhat is there?"},
                              {"from": "gpt", "value": "Noise."}]}) + "\n")
        for lineno, (name, code) in enumerate(escapes.items(), 2):
            f.write(json.dumps({"image": "images/good2.png", "tool_steps": [{"thought": name, "code": code}],
                                "conversations": [{"from": "human", "value": f"<image>\n{name}?"},
                                                  {"from": "gpt", "value": "x"}]}) + "\n")
            # refused, failed or contained: dropped as sandbox_*, or kept with only its own pixels
            contained = name in ("subprocess", "fork_exec", "detached")
            expect[("agent", f"agent.jsonl:{lineno}")] = {"sandbox_*", "*"} if contained else {"sandbox_*"}
    recipe = {"name": "hostile", "sources": [
        {"name": "images", "format": "jsonl", "path": "images.jsonl"},
        {"name": "videos", "format": "video_folder", "path": "videos/"},
        {"name": "tars", "format": "webdataset", "path": "tars/"},
        {"name": "rows", "format": "parquet", "path": "rows.parquet"},
        {"name": "agent", "format": "jsonl", "path": "agent.jsonl"}],
        "steps": [{"probe": {"timeout_s": 20}},
                  {"clips": {"max_clip_s": 60, "transcode": {"max_side": 64, "fps": 10}}},
                  {"modes": {"sources": {"agent": "think_with_image"}, "timeout_s": 3}}],
        "output": {"path": "out", "shards": {"max_samples": 4}}}
    path = f"{corpus}/recipe.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path, expect, outside


class _Watch:
    """Samples the RSS of every process that carries the run's marker in its environment."""

    def __init__(self, mark: str):
        self.mark, self.peak, self.pids, self.stop = mark, {}, {}, threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)

    def _marked(self, p: psutil.Process) -> bool:
        try:
            return p.environ().get("REELFORGE_TEST_MARK") == self.mark
        except (psutil.Error, OSError):
            return False

    def _loop(self) -> None:
        while not self.stop.is_set():
            for p in psutil.process_iter(["pid", "create_time", "cmdline"]):
                if p.pid == os.getpid() or not self._marked(p):
                    continue
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                key = (p.pid, p.info["create_time"])
                self.pids[key] = " ".join(p.info["cmdline"] or [])[:120]
                self.peak[key] = max(self.peak.get(key, 0), rss)
            time.sleep(0.2)


def _survivors(mark: str, tmp: str) -> list[str]:
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            env_mark = p.environ().get("REELFORGE_TEST_MARK") == mark
        except (psutil.Error, OSError):
            env_mark = False
        cwd = p.info.get("cwd") or ""
        if p.pid != os.getpid() and (env_mark or cwd.startswith(tmp)):
            left.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:100]} (cwd {cwd})")
    return left


def _run(recipe: str, out: str, mark: str, tmp: str) -> tuple[subprocess.CompletedProcess, _Watch]:
    env = {**os.environ, "REELFORGE_TEST_MARK": mark, "TMPDIR": os.path.join(tmp, "tmpdir")}
    os.makedirs(env["TMPDIR"], exist_ok=True)
    w = _Watch(mark)
    w.t.start()
    try:
        cli = os.path.join(os.path.dirname(sys.executable), "reelforge")
        res = subprocess.run([cli, "run", recipe, "--out", out, "--master", "local[2]"],
                             env=env, capture_output=True, text=True, timeout=900)
    finally:
        w.stop.set()
        w.t.join()
    return res, w


def _shard_bytes(out: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    blob, members = b"", []
    for path in sorted(glob.glob(f"{out}/shards/*.tar")):
        data = open(path, "rb").read()
        blob += data
        with tarfile.open(path) as tf:
            members += [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    return blob, members


def _matches(reason: str, allowed: set[str]) -> bool:
    return "*" in allowed or reason in allowed or any(a.endswith("*") and reason.startswith(a[:-1]) for a in allowed)


def test_hostile_corpus_run(tmp_path):
    tmp = str(tmp_path)
    recipe, expect, outside = build(tmp)
    out = os.path.join(tmp, "run")
    mark = uuid.uuid4().hex
    res, watch = _run(recipe, out, mark, tmp)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.load(open(f"{out}/report.json"))
    assert report["balanced"] and report["inputs"] + report.get("derived", 0) == report["kept"] + report["dropped"]
    ledger = pq.read_table(f"{out}/ledger").to_pylist()
    by_key = {(r["source"], r["source_key"]): r for r in ledger}
    for (source, key), allowed in expect.items():
        line = by_key.get((source, key))
        assert line is not None, (source, key, sorted(k for k in by_key if k[0] == source))
        if "*" in allowed and line["fate"] == "kept":
            continue  # a type the reader coerces sensibly (a number as text) may be kept
        assert line["fate"] == "dropped" and _matches(line["reason"], allowed), (source, key, line)
        assert line["detail"], line
    # the good samples are there
    kept = {(r["source"], r["source_key"]) for r in ledger if r["fate"] == "kept"}
    assert {("images", "images.jsonl:1"), ("images", "images.jsonl:2"), ("images", "images.jsonl:3"),
            ("agent", "agent.jsonl:1"), ("tars", "a.tar/ok1"), ("tars", "a.tar/ok2")} <= kept
    assert sum(1 for s, k in kept if s == "rows") == 9  # only the bad Parquet row is lost
    # the parquet row 4 has its own ledger line
    assert any(s == "rows" and k.endswith(":4") and by_key[(s, k)]["fate"] == "dropped" for s, k in by_key)
    # no byte of anything outside the roots reached a shard
    blob, members = _shard_bytes(out)
    digests = {hashlib.sha256(d).hexdigest() for _, d in members}
    for path in glob.glob(f"{outside}/*") + ["/etc/passwd"]:
        data = open(path, "rb").read()
        assert hashlib.sha256(data).hexdigest() not in digests, f"{path} is a shard member"
        # windows from the file's own middle: headers and container boilerplate (PNG IHDR, x264's
        # banner, MP4 boxes) are shared by every file of a type, the middle is this file's alone
        lo, hi = len(data) // 4, max(len(data) // 4 + 1, 3 * len(data) // 4 - 48)
        for off in range(lo, hi, max(1, (hi - lo) // 8)):
            assert data[off:off + 48] not in blob, f"bytes of {path} at {off} are in a shard"
    secret_pixels = hashlib.sha256(Image.open(f"{outside}/secret.png").convert("RGB").tobytes()).hexdigest()
    for name, data in members:
        if name.rsplit(".", 1)[-1] in ("png", "jpg", "webp"):
            img = Image.open(io.BytesIO(data)).convert("RGB")
            assert hashlib.sha256(img.tobytes()).hexdigest() != secret_pixels, name
    # no process outlives the run; no worker grew past 1.5 GiB
    time.sleep(1.0)
    assert _survivors(mark, tmp) == []
    assert watch.peak, "the watcher saw no worker process"
    workers = {k: v for k, v in watch.peak.items() if "java" not in watch.pids[k].split(" ")[0]}
    worst = max(workers.items(), key=lambda kv: kv[1])
    assert worst[1] < WORKER_RSS_LIMIT, (worst[1] / 2**20, watch.pids[worst[0]])
    jvm = max((v for k, v in watch.peak.items() if k not in workers), default=0)
    print(f"\npeak RSS: Python worker {worst[1] / 2**20:.0f} MiB ({watch.pids[worst[0]][:70]}), "
          f"JVM {jvm / 2**20:.0f} MiB, {len(workers)} Python processes seen")

    # a re-run after a referenced image was swapped for a symlink to a file outside the corpus:
    # the reused ingest still names the old path, and the read refuses the link
    os.remove(f"{os.path.dirname(recipe)}/images/good1.png")
    os.symlink("/etc/passwd", f"{os.path.dirname(recipe)}/images/good1.png")
    res2, _ = _run(recipe, out, mark, tmp)
    assert res2.returncode == 0, res2.stderr[-4000:]
    ledger2 = {(r["source"], r["source_key"]): r for r in pq.read_table(f"{out}/ledger").to_pylist()}
    line = ledger2[("images", "images.jsonl:2")]
    assert line["fate"] == "dropped" and line["reason"] in ("outside_root", "not_a_regular_file"), line
    blob2, _ = _shard_bytes(out)
    assert open("/etc/passwd", "rb").read()[:32] not in blob2
    assert _survivors(mark, tmp) == []
