"""Readers: every dialect normalised into the one schema; bad input becomes dropped rows."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reelforge.curation.readers import READERS
from reelforge.curation.schema import ARROW_SCHEMA


def _jpeg(color=(200, 10, 10), size=(32, 24)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "JPEG")
    return b.getvalue()


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _rows(fmt, path, root, opts=None):
    rows = list(READERS[fmt](str(path), "src", str(root), opts or {}))
    pa.RecordBatch.from_pylist(rows, schema=ARROW_SCHEMA)  # every row fits the schema
    return rows


def test_webdataset_tar_groups_members_and_references_byte_ranges(tmp_path):
    img = _jpeg()
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w") as tf:
        _add(tf, "000.jpg", img)
        _add(tf, "000.txt", b"a red box")
        _add(tf, "000.json", json.dumps({"url": "http://x", "width": 32}).encode())
        _add(tf, "001.txt", b"caption only")
    rows = _rows("webdataset", p, tmp_path)
    assert [r["source_key"] for r in rows] == ["a.tar/000", "a.tar/001"]
    r0 = rows[0]
    assert r0["kind"] == "image_text" and r0["text"] == "a red box"
    m = r0["media"][0]
    with open(p, "rb") as f:
        f.seek(m["offset"])
        assert f.read(m["length"]) == img
    assert json.loads(r0["meta"])["url"] == "http://x"
    assert rows[1]["kind"] == "text" and rows[1]["drop_step"] is None


def test_truncated_tar_keeps_what_it_read_and_adds_a_ledger_row(tmp_path):
    p = tmp_path / "t.tar"
    with tarfile.open(p, "w") as tf:
        for i in range(3):
            _add(tf, f"{i:03d}.jpg", _jpeg((i, i, i), (64, 64)))
            _add(tf, f"{i:03d}.txt", b"x")
    data = p.read_bytes()
    p.write_bytes(data[:5800])  # inside the data of 002.jpg
    rows = _rows("webdataset", p, tmp_path)
    bad = [r for r in rows if r["drop_step"] == "ingest"]
    # the cut sample, then one row for the rest of the file that could not be read
    assert [r["drop_reason"] for r in bad] == ["truncated_source", "unreadable_source"]
    assert bad[1]["source_key"] == "t.tar#tar"
    assert rows[0]["drop_step"] is None and rows[0]["source_key"] == "t.tar/000"


def test_garbage_tar_is_one_ledger_row(tmp_path):
    p = tmp_path / "g.tar"
    p.write_bytes(b"this is not a tar file at all" * 40)
    (row,) = _rows("webdataset", p, tmp_path)
    assert row["drop_reason"] in ("unreadable_source", "empty_source") and row["source_key"] == "g.tar#tar"


def test_jsonl_sharegpt_openai_preference_interleaved_and_bad_lines(tmp_path):
    lines = [
        {"image": "img/a.jpg", "caption": "a cat"},
        {"id": "c1", "image": "img/a.jpg",
         "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}]},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"type": "image", "image": "img/b.jpg"},
                                                   {"type": "text", "text": "Describe."}]},
                      {"role": "assistant", "content": "Blue."}]},
        {"prompt": "Which is better?", "chosen": "A", "rejected": "B", "image": "img/a.jpg"},
        {"text": "start <image> middle <image> end", "images": ["img/a.jpg", "img/b.jpg"]},
        {"text": "just text"},
        {"video": "v/clip.mp4", "caption": "a clip"},
    ]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n[1, 2]\n{}\n")
    rows = _rows("jsonl", p, tmp_path)
    kinds = [r["kind"] for r in rows[:7]]
    assert kinds == ["image_text", "conversation", "conversation", "preference", "interleaved", "text",
                     "video_text"]
    assert rows[0]["media"][0]["uri"] == str(tmp_path / "img" / "a.jpg")
    conv = rows[1]
    assert conv["source_key"] == "m.jsonl:2#c1"
    assert conv["messages"][0] == {"role": "user", "content": "<image>\nWhat is it?"}
    assert conv["messages"][1]["role"] == "assistant"
    oai = rows[2]
    assert oai["messages"][1]["content"] == "<image>Describe." and oai["media"][0]["uri"].endswith("b.jpg")
    pref = rows[3]
    assert pref["chosen"] == "A" and pref["messages"][0]["content"].startswith("<image>")
    assert rows[6]["media"][0]["kind"] == "video"
    assert all(r["drop_step"] is None for r in rows[:7])
    assert [(r["source_key"], r["drop_reason"]) for r in rows[7:]] == [
        ("m.jsonl:8", "bad_json"), ("m.jsonl:9", "bad_record"), ("m.jsonl:10", "no_content")]
    assert len({r["id"] for r in rows}) == len(rows)


def test_placeholder_count_must_match_media(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"images": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "<image> one placeholder"}, {"from": "gpt", "value": "x"}]}) + "\n")
    (row,) = _rows("jsonl", p, tmp_path)
    assert row["drop_reason"] == "placeholder_mismatch"


def test_parquet_manifest(tmp_path):
    p = tmp_path / "pref.parquet"
    pq.write_table(pa.table({"prompt": ["q1", "q2"], "chosen": ["good", "fine"], "rejected": ["bad", "meh"],
                             "image": ["x.jpg", None]}), p)
    rows = _rows("parquet", p, tmp_path)
    assert [r["kind"] for r in rows] == ["preference", "preference"]
    assert rows[0]["media"][0]["uri"] == str(tmp_path / "x.jpg") and rows[1]["media"] is None
    assert [r["source_key"] for r in rows] == ["pref.parquet:1", "pref.parquet:2"]


def test_broken_parquet_is_a_ledger_row(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 not really")
    (row,) = _rows("parquet", p, tmp_path)
    assert row["drop_reason"] == "unreadable_source"


def test_text_reader_with_custom_field(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"content": "hello there"}) + "\n")
    (row,) = _rows("text", p, tmp_path, {"text_field": "content"})
    assert row["kind"] == "text" and row["text"] == "hello there"


@pytest.mark.parametrize("sidecar", ["txt", "json", "none"])
def test_video_folder_sidecars(tmp_path, sidecar):
    v = tmp_path / "clip.mp4"
    v.write_bytes(b"not decoded here")
    if sidecar == "txt":
        (tmp_path / "clip.txt").write_text("a dog runs\n")
    elif sidecar == "json":
        (tmp_path / "clip.json").write_text(json.dumps({"caption": "a dog runs", "tags": ["dog"]}))
    (row,) = _rows("video_folder", v, tmp_path)
    if sidecar == "none":
        assert row["drop_reason"] == "no_caption"
    else:
        assert row["kind"] == "video_text" and row["text"] == "a dog runs" and row["drop_step"] is None
        assert row["source_key"] == "clip.mp4"


def test_ids_survive_moving_the_corpus(tmp_path):
    """Ids hash media paths relative to the manifest, so a corpus copied elsewhere keeps them."""
    import shutil

    from reelforge.curation.readers import read_jsonl

    a = tmp_path / "a"
    (a / "img").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(a / "img" / "x.png")
    (a / "m.jsonl").write_text('{"image": "img/x.png", "caption": "x"}\n')
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    ids = [[r["id"] for r in read_jsonl(str(d / "m.jsonl"), "s", str(d), {})] for d in (a, b)]
    assert ids[0] == ids[1] and len(ids[0]) == 1
    (b / "img" / "x.png").rename(b / "img" / "y.png")  # another file is another sample
    (b / "m.jsonl").write_text('{"image": "img/y.png", "caption": "x"}\n')
    assert [r["id"] for r in read_jsonl(str(b / "m.jsonl"), "s", str(b), {})] != ids[0]
