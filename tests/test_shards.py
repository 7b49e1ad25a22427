"""The tar writer alone: deterministic bytes, atomic rename, loader-friendly member names."""

import hashlib
import json
import os
import tarfile

import webdataset as wds
from PIL import Image

from reelforge.curation.schema import empty_row
from reelforge.curation.shards import ShardFile, encode_sample, media_members


def _row(tmp_path, i, fmt="JPEG", n_media=1):
    media = []
    for j in range(n_media):
        p = tmp_path / f"img{i}_{j}.{fmt.lower()}"
        Image.new("RGB", (16 + i, 12), (i * 20 % 255, j * 60, 0)).save(p, fmt)
        media.append({"kind": "image", "uri": str(p), "member": None, "offset": None,
                      "length": p.stat().st_size, "format": {"JPEG": "jpeg"}.get(fmt, fmt.lower()),
                      "width": 16 + i, "height": 12})
    r = empty_row()
    r.update(id=f"id{i:03d}", kind="image_text" if n_media == 1 else "interleaved", source="s",
             source_key=f"k{i}", source_location="/x", text=f"caption {i}", media=media,
             meta=json.dumps({"u": i}))
    return r


def _write(path, rows):
    sf = ShardFile(str(path))
    for r in rows:
        sf.write(encode_sample(r), r["source"])
    return sf.close()


def test_same_samples_same_bytes_and_no_temp_left(tmp_path):
    rows = [_row(tmp_path, i) for i in range(5)]
    a = _write(tmp_path / "a.tar", rows)
    b = _write(tmp_path / "b.tar", rows)
    assert a["sha256"] == b["sha256"] == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert a["samples"] == 5 and a["sources"] == {"s": 5}
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_interrupted_write_leaves_no_final_name(tmp_path):
    sf = ShardFile(str(tmp_path / "c.tar"))
    sf.write(encode_sample(_row(tmp_path, 1)), "s")
    assert not (tmp_path / "c.tar").exists()  # only the temporary name exists while writing
    sf.abort()
    assert not [f for f in os.listdir(tmp_path) if f.startswith("c.tar")]


def test_members_load_with_plain_webdataset(tmp_path):
    rows = [_row(tmp_path, 1), _row(tmp_path, 2, "PNG"), _row(tmp_path, 3, n_media=2), _row(tmp_path, 4, "BMP")]
    _write(tmp_path / "s.tar", rows)
    with tarfile.open(tmp_path / "s.tar") as tf:
        names = tf.getnames()
    assert "id001.jpg" in names and "id002.png" in names and "id003.0.jpg" in names and "id003.1.jpg" in names
    assert "id004.png" in names  # BMP re-encoded to a format every loader decodes
    assert not [n for n in names if n.endswith((".pyd", ".pickle", ".pth"))]
    seen = {}
    for s in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode("pil"):
        meta = s["json"]
        seen[s["__key__"]] = meta
        for m in meta.get("media", []):
            ext = m["member"].split(".", 1)[1]
            assert isinstance(s[ext], Image.Image)
    assert seen["id003"]["media"][1]["member"] == "id003.1.jpg"
    assert seen["id001"]["provenance"] == {"source": "s", "key": "k1", "location": "/x"}
    assert seen["id001"]["meta"] == {"u": 1} and seen["id001"]["text"] == "caption 1"


def test_member_naming():
    assert media_members({"media": [{"kind": "image", "format": "jpeg"}]}) == ["jpg"]
    assert media_members({"media": [{"kind": "image", "format": "webp"}, {"kind": "video", "format": "mp4"}]}) \
        == ["0.webp", "1.mp4"]
    assert media_members({"media": None}) == []


def test_reencoded_media_json_describes_the_written_bytes(tmp_path):
    from reelforge.curation.media_io import MediaReadError

    p = tmp_path / "x.gif"
    Image.new("P", (20, 10), 7).save(p)
    original = p.read_bytes()
    r = _row(tmp_path, 1)
    r["media"] = [{**r["media"][0], "uri": str(p), "format": "gif", "length": len(original),
                   "sha256": hashlib.sha256(original).hexdigest(), "width": 20, "height": 10}]
    obj = encode_sample(r)
    (m,) = json.loads(obj["json"])["media"]
    assert m["member"] == "id001.png" and m["format"] == "png"
    assert m["sha256"] == hashlib.sha256(obj["png"]).hexdigest() and m["length"] == len(obj["png"])
    # bytes that changed since probe never go out under the probe's description
    r2 = _row(tmp_path, 2)
    r2["media"][0]["sha256"] = "0" * 64
    try:
        encode_sample(r2)
    except MediaReadError as e:
        assert e.reason == "media_changed"
    else:
        raise AssertionError("a changed file was written")
