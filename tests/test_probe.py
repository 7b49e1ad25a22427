"""Probing real encoded media: sizes, stream facts, and a reason for everything that is broken."""

import io
import subprocess

import pytest
from PIL import Image

from reelforge.curation.probe import Probe, ProbeError, probe_image, probe_video_file
from reelforge.curation.schema import empty_row


def _encode(img, fmt="JPEG") -> bytes:
    b = io.BytesIO()
    img.save(b, fmt)
    return b.getvalue()


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    p = tmp_path_factory.mktemp("v") / "clip.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25",
                    "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(p)], check=True, timeout=60)
    return p


def test_image_size_and_format():
    img = Image.new("RGB", (120, 45), (1, 2, 3))
    assert probe_image(_encode(img), 10**8) == {"format": "jpeg", "width": 120, "height": 45}
    assert probe_image(_encode(img, "PNG"), 10**8)["format"] == "png"


def test_truncated_jpeg_is_corrupt():
    data = _encode(Image.effect_noise((256, 256), 64).convert("RGB"))
    with pytest.raises(ProbeError) as e:
        probe_image(data[: len(data) * 2 // 5], 10**8)
    assert e.value.reason == "corrupt_image"


def test_decompression_bomb_refused_from_header():
    data = _encode(Image.new("L", (4000, 3000)), "PNG")
    with pytest.raises(ProbeError) as e:
        probe_image(data, max_pixels=1_000_000)
    assert e.value.reason == "too_many_pixels"


def test_video_facts(mp4):
    v = probe_video_file(str(mp4), 30)
    assert (v["width"], v["height"], v["codec"], v["format"]) == (96, 64, "h264", "mp4")
    assert v["fps"] == pytest.approx(25)
    assert v["duration"] == pytest.approx(2.0, abs=0.1)
    assert v["frames"] == 50


def test_not_a_video(tmp_path):
    p = tmp_path / "fake.mp4"
    p.write_text("hello, I am text")
    with pytest.raises(ProbeError) as e:
        probe_video_file(str(p), 30)
    assert e.value.reason == "corrupt_video"


def test_probe_step_reasons(tmp_path, mp4):
    (tmp_path / "zero.mp4").write_bytes(b"")
    good = tmp_path / "g.png"
    good.write_bytes(_encode(Image.new("RGB", (10, 20)), "PNG"))

    def row(kind, uri):
        r = empty_row()
        r.update(id=uri, media=[{"kind": kind, "uri": str(uri), "member": None, "offset": None, "length": None}])
        return r

    rows = Probe().process_rows([row("video", tmp_path / "zero.mp4"), row("image", tmp_path / "nope.jpg"),
                                 row("image", good), row("video", mp4)])
    assert [r["drop_reason"] for r in rows] == ["empty_file", "missing_file", None, None]
    assert rows[2]["media"][0]["width"] == 10 and len(rows[2]["media"][0]["sha256"]) == 64
    assert rows[3]["media"][0]["duration"] == pytest.approx(2.0, abs=0.1)
    assert len(rows[3]["media"][0]["phash"]) == 4  # 2 s at 2 fps: the frames the model sees
    assert len(rows[2]["media"][0]["phash"]) == 1


def test_image_phash_survives_resize_and_reencode_but_separates_different_images():
    import random

    from reelforge.curation.demo_corpus import _draw
    from reelforge.curation.phash import hamming

    rng = random.Random(3)
    a, _ = _draw(rng, 400, 300)
    b, _ = _draw(rng, 400, 300)
    ha = probe_image(_encode(a), 10**8, with_phash=True)["phash"][0]
    copy = probe_image(_encode(a.resize((200, 150)), "PNG"), 10**8, with_phash=True)["phash"][0]
    low_q = io.BytesIO()
    a.save(low_q, "JPEG", quality=40)
    lq = probe_image(low_q.getvalue(), 10**8, with_phash=True)["phash"][0]
    hb = probe_image(_encode(b), 10**8, with_phash=True)["phash"][0]
    assert hamming(ha, copy) <= 6 and hamming(ha, lq) <= 6
    assert hamming(ha, hb) > 12
    assert -(1 << 63) <= ha < (1 << 63)
