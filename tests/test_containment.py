"""Media reads stay inside the corpus: no escapes by path, URI, symlink or playlist; no device,
FIFO or oversized read can hang or exhaust a worker (pure Python + ffmpeg, no Spark)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
from PIL import Image

from reelforge.curation import video
from reelforge.curation.clips import VideoClips
from reelforge.curation.containment import ContainmentError, allowed_roots, open_regular, resolve_media_ref
from reelforge.curation.media_io import MediaReadError, decode_visual, read_media_bytes
from reelforge.curation.probe import Probe, ProbeError
from reelforge.curation.schema import empty_row


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=60)


def _jpeg(path, colour=(10, 200, 30)) -> str:
    b = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(b, "JPEG")
    with open(path, "wb") as f:
        f.write(b.getvalue())
    return str(path)


@pytest.fixture()
def tree(tmp_path):
    """corpus/ (the manifest's folder, with one image) beside outside/ (an image, a video)."""
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "images").mkdir(parents=True)
    outside.mkdir()
    _jpeg(corpus / "images" / "in.jpg")
    _jpeg(outside / "secret.jpg", (200, 0, 0))
    (corpus / "m.jsonl").write_text("{}\n")
    roots = allowed_roots(str(corpus / "m.jsonl"), None, None)
    return {"corpus": str(corpus), "outside": str(outside), "roots": roots, "tmp": tmp_path}


@pytest.fixture(scope="module")
def outside_video(tmp_path_factory):
    d = tmp_path_factory.mktemp("outside_video")
    p = d / "real.mp4"
    _ff("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(p))
    ts = d / "real.ts"
    _ff("-i", str(p), "-c", "copy", "-f", "mpegts", str(ts))
    return {"mp4": str(p), "ts": str(ts)}


def _reason(call) -> str:
    with pytest.raises(MediaReadError) as e:
        call()
    return e.value.reason


# ------------------------------------------------------------------ resolve_media_ref

def test_allowed_roots_are_canonical_and_ordered(tree, tmp_path):
    (tmp_path / "extra").mkdir()
    os.symlink(tmp_path / "extra", tmp_path / "link")
    roots = allowed_roots(os.path.join(tree["corpus"], "m.jsonl"), str(tmp_path / "link"),
                          [str(tmp_path / "extra"), tree["corpus"]])
    assert roots == (os.path.realpath(tree["corpus"]), os.path.realpath(tmp_path / "extra"))


def test_inside_refs_resolve_to_canonical_paths(tree):
    c, roots = tree["corpus"], tree["roots"]
    want = os.path.realpath(os.path.join(c, "images", "in.jpg"))
    assert resolve_media_ref("images/in.jpg", c, roots) == want
    assert resolve_media_ref("images/../images/./in.jpg", c, roots) == want
    assert resolve_media_ref(want, c, roots) == want
    assert resolve_media_ref("file://" + want, c, roots) == want
    assert resolve_media_ref("file://localhost" + want, c, roots) == want


@pytest.mark.parametrize("ref", ["../outside/secret.jpg", "images/../../outside/secret.jpg",
                                 "{outside}/secret.jpg", "file://{outside}/secret.jpg", "/etc/passwd",
                                 "file:///etc/passwd", "../outside/missing.jpg"])
def test_refs_leaving_the_roots_are_outside_root(tree, ref):
    ref = ref.format(outside=tree["outside"])
    assert _reason(lambda: resolve_media_ref(ref, tree["corpus"], tree["roots"])) == "outside_root"


@pytest.mark.parametrize("ref", ["http://example.com/a.jpg", "https://x/y.mp4", "s3://bucket/k.jpg",
                                 "data:image/png;base64,AAAA", "concat:a.mp4|b.mp4", "file://otherhost/a.jpg",
                                 "file:images/in.jpg"])
def test_other_uris_are_unsupported(tree, ref):
    with pytest.raises(ContainmentError) as e:
        resolve_media_ref(ref, tree["corpus"], tree["roots"])
    assert e.value.reason == "unsupported_uri"
    assert e.value.detail.count(". ") == 0 and e.value.detail.endswith(".")  # one sentence


def test_symlinks_inside_the_root(tree):
    c, roots = tree["corpus"], tree["roots"]
    os.symlink(os.path.join(tree["outside"], "secret.jpg"), os.path.join(c, "images", "out.jpg"))
    os.symlink("in.jpg", os.path.join(c, "images", "alias.jpg"))
    os.symlink(tree["outside"], os.path.join(c, "linked_dir"))
    os.symlink("/etc/passwd", os.path.join(c, "images", "passwd.jpg"))
    assert _reason(lambda: resolve_media_ref("images/out.jpg", c, roots)) == "outside_root"
    assert _reason(lambda: resolve_media_ref("linked_dir/secret.jpg", c, roots)) == "outside_root"
    assert _reason(lambda: resolve_media_ref("images/passwd.jpg", c, roots)) == "outside_root"
    assert resolve_media_ref("images/alias.jpg", c, roots) == os.path.realpath(os.path.join(c, "images", "in.jpg"))


def test_missing_dirs_devices_and_fifos(tree):
    c, roots = tree["corpus"], tree["roots"]
    os.mkfifo(os.path.join(c, "fifo.mp4"))
    os.symlink("nowhere.jpg", os.path.join(c, "dangling.jpg"))
    os.symlink("loop.jpg", os.path.join(c, "loop.jpg"))
    t = time.monotonic()
    assert _reason(lambda: resolve_media_ref("fifo.mp4", c, roots)) == "not_a_regular_file"
    assert _reason(lambda: resolve_media_ref("images", c, roots)) == "not_a_regular_file"
    assert _reason(lambda: resolve_media_ref("nope.jpg", c, roots)) == "missing_file"
    assert _reason(lambda: resolve_media_ref("dangling.jpg", c, roots)) == "missing_file"
    assert _reason(lambda: resolve_media_ref("loop.jpg", c, roots)) in ("not_a_regular_file", "missing_file")
    assert _reason(lambda: resolve_media_ref("images/in.jpg/x", c, roots)) == "missing_file"
    assert _reason(lambda: resolve_media_ref("", c, roots)) == "missing_file"
    dev_roots = allowed_roots("/dev/null", None, None)  # /dev allowed on purpose: still not regular files
    for dev in ("/dev/zero", "/dev/urandom", "/dev/null"):
        assert _reason(lambda dev=dev: resolve_media_ref(dev, "/", dev_roots)) == "not_a_regular_file"
    assert time.monotonic() - t < 1.0


# ------------------------------------------------------------------ open_regular / read_media_bytes

def test_open_regular_refuses_non_canonical_paths_and_swaps(tree):
    c = tree["corpus"]
    path = resolve_media_ref("images/in.jpg", c, tree["roots"])
    fd = open_regular(path)
    os.close(fd)
    assert read_media_bytes({"uri": path})[:2] == b"\xff\xd8"
    assert _reason(lambda: open_regular("images/in.jpg")) == "outside_root"  # relative: not canonical
    # between ingest and the shard writer the file is swapped for a symlink to /etc/passwd
    os.replace(path, path + ".bak")
    os.symlink("/etc/passwd", path)
    assert _reason(lambda: open_regular(path)) == "outside_root"
    assert _reason(lambda: read_media_bytes({"uri": path})) == "outside_root"
    assert _reason(lambda: read_media_bytes({"uri": "file://" + path})) == "outside_root"
    # ... or a folder on the way is swapped for a symlink to another tree with the same layout
    os.unlink(path)
    os.replace(path + ".bak", path)
    os.rename(os.path.join(c, "images"), os.path.join(c, "images_real"))
    os.makedirs(os.path.join(tree["outside"], "images"))
    _jpeg(os.path.join(tree["outside"], "images", "in.jpg"), (255, 0, 0))
    os.symlink(os.path.join(tree["outside"], "images"), os.path.join(c, "images"))
    assert _reason(lambda: open_regular(path)) == "outside_root"
    assert _reason(lambda: read_media_bytes({"uri": path})) == "outside_root"


def test_devices_fifos_and_dirs_are_refused_fast(tree):
    fifo = os.path.join(os.path.realpath(tree["corpus"]), "fifo.mp4")
    os.mkfifo(fifo)
    t = time.monotonic()
    for p in ("/dev/zero", "/dev/urandom", fifo, os.path.realpath(tree["corpus"])):
        assert _reason(lambda p=p: open_regular(p)) == "not_a_regular_file", p
        assert _reason(lambda p=p: read_media_bytes({"uri": p})) == "not_a_regular_file", p
        assert _reason(lambda p=p: read_media_bytes({"uri": p, "offset": 0, "length": 10})) == "not_a_regular_file"
    assert _reason(lambda: read_media_bytes({"uri": "http://example.com/x.jpg"})) == "unsupported_uri"
    assert _reason(lambda: read_media_bytes({"uri": "/no/such/file.jpg"})) == "missing_file"
    assert time.monotonic() - t < 1.0


def test_dev_zero_never_allocates(tmp_path):
    """Under a 512 MiB address-space limit, reading /dev/zero (whole, or as a 4 GiB byte range)
    fails with a reason at once; it would need 4 GiB if it were read."""
    code = textwrap.dedent("""
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
        from reelforge.curation.media_io import MediaReadError, read_media_bytes
        t = time.monotonic()
        out = []
        for m in ({"uri": "/dev/zero"}, {"uri": "/dev/urandom"},
                  {"uri": "/dev/zero", "offset": 0, "length": 4 << 30}):
            try:
                read_media_bytes(m, max_bytes=8 << 30)
                out.append("read")
            except MediaReadError as e:
                out.append(e.reason)
        print(",".join(out), time.monotonic() - t < 1.0)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert res.stdout.split() == ["not_a_regular_file,not_a_regular_file,not_a_regular_file", "True"], res.stderr


def test_tar_byte_ranges_are_bounded(tmp_path):
    tar = str(tmp_path / "src.tar")
    payload = b"x" * 5000
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("a.jpg")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with tarfile.open(tar) as tf:
        off = tf.getmember("a.jpg").offset_data
    size = os.path.getsize(tar)
    assert read_media_bytes({"uri": tar, "offset": off, "length": 5000}) == payload
    t = time.monotonic()
    # a range that overstates its length: refused from the tar's size, nothing read or allocated
    assert _reason(lambda: read_media_bytes({"uri": tar, "offset": off, "length": 1 << 40},
                                            max_bytes=1 << 41)) == "truncated_source"
    assert _reason(lambda: read_media_bytes({"uri": tar, "offset": off, "length": size})) == "truncated_source"
    assert _reason(lambda: read_media_bytes({"uri": tar, "offset": off, "length": 5000}, max_bytes=100)) == "too_large"
    assert _reason(lambda: read_media_bytes({"uri": tar, "offset": -1, "length": 10})) == "truncated_source"
    assert _reason(lambda: read_media_bytes({"uri": tar, "offset": 0, "length": 1 << 33})) == "too_large"
    assert _reason(lambda: read_media_bytes({"uri": tar}, max_bytes=100)) == "too_large"
    assert time.monotonic() - t < 1.0


def test_max_bytes_default_is_a_module_setting(tmp_path, monkeypatch):
    from reelforge.curation import media_io

    p = _jpeg(tmp_path / "a.jpg")
    monkeypatch.setattr(media_io, "MAX_MEDIA_BYTES", 10)
    assert _reason(lambda: read_media_bytes({"uri": p})) == "too_large"
    assert len(read_media_bytes({"uri": p}, max_bytes=1 << 20)) == os.path.getsize(p)


# ------------------------------------------------------------------ ffprobe / ffmpeg

@pytest.fixture()
def playlists(tmp_path, outside_video):
    """An HLS playlist and an ffconcat list, each named .mp4, naming a real video outside."""
    d = tmp_path / "corpus"
    d.mkdir()
    hls = d / "hls.mp4"
    hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{outside_video['ts']}\n#EXT-X-ENDLIST\n")
    rel_hls = d / "hls_rel.mp4"
    rel_hls.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n"
                       f"{os.path.relpath(outside_video['ts'], d)}\n#EXT-X-ENDLIST\n")
    cc = d / "cc.mp4"
    cc.write_text(f"ffconcat version 1.0\nfile '{outside_video['mp4']}'\n")
    return [str(hls), str(rel_hls), str(cc)]


def test_playlists_are_refused_by_every_ffmpeg_call(playlists, tmp_path, outside_video):
    assert video.probe_video(outside_video["mp4"])["frames"] == 50  # the video itself is fine
    out = tmp_path / "out"
    out.mkdir()
    calls = {"probe": lambda p: video.probe_video(p),
             "decode": lambda p: video.decode_frames(p, [0, 1]),
             "phash": lambda p: video.frame_phashes(p, [0]),
             "shots": lambda p: video.detect_shots(p),
             "shots_ffmpeg": lambda p: video.detect_shots(p, method="ffmpeg"),
             "scores": lambda p: video.scene_scores(p),
             "transcode": lambda p: video.transcode(p, str(out / "t.mp4")),
             "cut": lambda p: video.cut_clip(p, 0.0, 1.0, str(out / "c.mp4"))}
    for p in playlists:
        for name, call in calls.items():
            with pytest.raises(ProbeError) as e:
                call(p)
            assert e.value.reason == "unsupported_container", (p, name, e.value)
            assert "/proc/self/fd" not in e.value.detail
        # the same through an already-checked fd
        fd = open_regular(os.path.realpath(p))
        try:
            with pytest.raises(ProbeError) as e:
                video.decode_frames(fd, [0])
            assert e.value.reason == "unsupported_container"
        finally:
            os.close(fd)
    assert not os.listdir(out)


def _video_row(uri: str, **kw) -> dict:
    r = empty_row()
    m = {"kind": "video", "uri": uri, "member": None, "offset": None, "length": None, "sha256": None,
         "format": None, "width": None, "height": None, "duration": 2.0, "fps": 25.0, "frames": 50,
         "codec": None, "phash": None}
    m.update(kw)
    r.update(id="ab" * 12, source="s", source_key=os.path.basename(uri), kind="video_text", text="x", media=[m])
    return r


def test_playlists_are_refused_by_probe_clips_and_decode(playlists, tmp_path):
    rows = Probe().process_rows([_video_row(p) for p in playlists])
    assert [r["drop_reason"] for r in rows] == ["unsupported_container"] * len(playlists)
    step = VideoClips(max_clip_s=1.0, transcode={"max_side": 64})
    step.workdir = str(tmp_path / "work")
    rows = step.process_rows([_video_row(p) for p in playlists])
    assert [r["drop_reason"] for r in rows] == ["unsupported_container"] * len(playlists)
    assert not os.path.exists(tmp_path / "work" / "media") or not any(
        f for _, _, fs in os.walk(tmp_path / "work" / "media") for f in fs)
    for p in playlists:
        with pytest.raises(ProbeError) as e:
            decode_visual(_video_row(p)["media"][0])
        assert e.value.reason == "unsupported_container"


def test_playlist_inside_a_tar_is_refused(tmp_path, outside_video):
    text = f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{outside_video['ts']}\n#EXT-X-ENDLIST\n".encode()
    tar = str(tmp_path / "src.tar")
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("k.mp4")
        info.size = len(text)
        tf.addfile(info, io.BytesIO(text))
    with tarfile.open(tar) as tf:
        off = tf.getmember("k.mp4").offset_data
    row = _video_row(tar, member="k.mp4", offset=off, length=len(text))
    assert Probe().process_rows([row])[0]["drop_reason"] == "unsupported_container"


def test_fifo_and_devices_never_reach_ffprobe(tmp_path):
    fifo = str(tmp_path / "fifo.mp4")
    os.mkfifo(fifo)
    os.symlink("/dev/zero", tmp_path / "zero.mp4")
    t = time.monotonic()
    for p in (fifo, "/dev/zero", "/dev/urandom", str(tmp_path / "zero.mp4")):
        for call in (lambda p=p: video.probe_video(p), lambda p=p: video.decode_frames(p, [0])):
            with pytest.raises(ProbeError) as e:
                call()
            assert e.value.reason == "missing_file"
    rows = Probe().process_rows([_video_row(fifo), _video_row("/dev/zero")])
    assert [r["drop_reason"] for r in rows] == ["not_a_regular_file"] * 2
    assert time.monotonic() - t < 1.0


def test_odd_names_probe_fine(tmp_path, outside_video):
    d = tmp_path / "odd"
    d.mkdir()
    data = open(outside_video["mp4"], "rb").read()
    for name in ("-i.mp4", "a:b.mp4", "concat:x.mp4", "sp ace|pipe.mp4"):
        p = d / name
        p.write_bytes(data)
        assert video.probe_video(str(p))["frames"] == 50, name
        row = Probe().process_rows([_video_row(str(p))])[0]
        assert row["drop_reason"] is None and row["media"][0]["frames"] == 50, (name, row["drop_detail"])
        assert decode_visual(row["media"][0], 2)[0].size == (96, 64)
    cwd = os.getcwd()
    try:  # a relative name starting with '-' too
        os.chdir(d)
        assert video.probe_video("-i.mp4")["width"] == 96
    finally:
        os.chdir(cwd)


def test_a_timeout_kills_the_whole_child(tmp_path, monkeypatch):
    """A stand-in ffprobe that forks a grandchild and hangs: the deadline kills both."""
    pidfile = tmp_path / "grandchild.pid"
    fake = tmp_path / "ffprobe"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffprobe_path", lambda: str(fake))
    p = _jpeg(tmp_path / "x.mp4")
    t = time.monotonic()
    with pytest.raises(ProbeError) as e:
        video.probe_video(p, timeout_s=0.5)
    assert e.value.reason == "probe_timeout" and time.monotonic() - t < 5
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:
            with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild outlived the timeout")


def test_clips_write_only_under_the_work_folder(tmp_path, outside_video):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    v = corpus / "v.mp4"
    v.write_bytes(open(outside_video["mp4"], "rb").read())
    os.symlink(tmp_path / "real_work", tmp_path / "work")  # the run's folder through a link
    (tmp_path / "real_work").mkdir()
    row = _video_row(str(v))
    row["id"] = "../../../escape"  # never a path component
    step = VideoClips(split=False, transcode={"max_side": 64})
    step.workdir = str(tmp_path / "work")
    out = step.process_rows([row])
    assert out[0]["drop_reason"] is None, out[0]["drop_detail"]
    m = out[0]["media"][0]
    assert m["uri"].startswith(os.path.realpath(tmp_path / "real_work" / "media") + os.sep)
    assert os.path.realpath(m["uri"]) == m["uri"] and (m["width"], m["frames"]) == (64, 50)
    assert len(read_media_bytes(m)) == m["length"] == os.path.getsize(m["uri"])
    assert not os.path.exists(tmp_path / "escape.mp4") and sorted(os.listdir(tmp_path)) == [
        "corpus", "real_work", "work"]


def test_videos_are_hashed_in_pieces(tmp_path, outside_video, monkeypatch):
    """Probe never holds a video whole: the bytes of a plain-file video are never read in one piece."""
    import hashlib

    from reelforge.curation import media_io

    p = tmp_path / "v.mp4"
    data = open(outside_video["mp4"], "rb").read()
    p.write_bytes(data)
    monkeypatch.setattr(media_io, "_PIECE", 1000)
    monkeypatch.setattr(media_io, "_read_exactly", lambda *a: pytest.fail("read whole"))
    row = Probe(phash=False).process_rows([_video_row(str(p))])[0]
    assert row["drop_reason"] is None
    assert row["media"][0]["sha256"] == hashlib.sha256(data).hexdigest() and row["media"][0]["length"] == len(data)
