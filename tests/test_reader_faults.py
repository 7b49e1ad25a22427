"""Every record is its own failure domain: each input record yields exactly one row, kept or
dropped at ingest with a reason, whatever is wrong with it; and the records a file holds
are counted apart from the rows, so a lost tail cannot pass as balanced. No Spark here."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reelforge.curation.ingest import count_problems, rows_to_batches
from reelforge.curation.readers import FILE_REASONS, READERS, count_records

DEEP = "[" * 100_000 + "]" * 100_000


def _png(seed: int = 0) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (16, 12), (seed * 40 % 255, 80, 20)).save(b, "PNG")
    return b.getvalue()


def _add(tf, name, data=None, **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    if data is None:
        tf.addfile(ti)
    else:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))


def _read(fmt, path, opts=None):
    """The reader's rows; asserts they fit the schema and that each counted record has one row."""
    path = str(path)
    rows = list(READERS[fmt](path, "src", os.path.dirname(path), opts or {}))
    assert sum(b.num_rows for b in rows_to_batches(rows)) == len(rows)
    records = [r for r in rows if not (r["drop_step"] == "ingest" and r["drop_reason"] in FILE_REASONS)]
    assert count_records(fmt, path, opts or {}) == len(records), [(r["source_key"], r["drop_reason"]) for r in rows]
    assert len({r["id"] for r in rows}) == len(rows)
    return rows


def _fate(rows):
    return {r["source_key"]: r["drop_reason"] for r in rows}


def test_jsonl_bad_records_each_cost_one_row(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    lines = [
        {"image": "a.png", "caption": "good"},
        DEEP,
        {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]},
                      {"role": "assistant", "content": "x"}]},
        {"prompt": "which?", "chosen": 5, "rejected": "no"},
        {"prompt": 7, "chosen": "a", "rejected": "b"},
        {"conversations": [{"from": "human", "value": {"a": 1}}]},
        {"image": 5, "caption": "a number for a path"},
        {"caption": "ok", "extra": "\ud800"},  # a lone surrogate: valid JSON, not storable UTF-8
        {"id": "\udfff", "caption": "a surrogate in the key"},
        {"caption": "still read after all that"},
    ]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    rows = _read("jsonl", p)
    assert len(rows) == len(lines)
    fate = [(r["drop_reason"], r["drop_detail"]) for r in rows]
    assert fate[0] == (None, None) and fate[-1] == (None, None)
    assert fate[1][0] == "bad_json" and "nested too deeply" in fate[1][1]
    assert fate[2] == ("bad_record", "messages[0].content must be text or a list of parts, got int '42'")
    assert fate[3][0] == "bad_record" and "messages[0].content[0].text must be text, got int" in fate[3][1]
    assert fate[4][0] == "bad_record" and fate[4][1].startswith("chosen ")
    assert fate[5][0] == "bad_record" and fate[5][1].startswith("prompt must be text, got int")
    assert fate[6][0] == "bad_record" and "conversations[0].value" in fate[6][1]
    assert fate[7][0] == "bad_record" and fate[7][1].startswith("image must be a path")
    assert fate[9][0] == "bad_record" and "surrogates not allowed" in fate[9][1]
    # a row that reads but will not store is replaced when ingest makes its Arrow batch
    assert fate[8] == (None, None)
    batch = next(rows_to_batches(rows))
    assert batch.column("drop_reason").to_pylist()[8] == "bad_record"
    assert "cannot be stored" in batch.column("drop_detail").to_pylist()[8]


def test_parquet_row_that_will_not_convert_costs_only_that_row(tmp_path):
    ts = pa.array([0, 1, 2, 10**13, 4, 5, 6, 7, 8, 9], pa.timestamp("s"))  # row 4: year ~318000
    p = tmp_path / "r.parquet"
    pq.write_table(pa.table({"caption": [f"row {i}" for i in range(10)], "taken": ts}), p)
    rows = _read("parquet", p)
    assert [r["source_key"] for r in rows] == [f"r.parquet:{i}" for i in range(1, 11)]
    assert [r["drop_reason"] for r in rows] == [None] * 3 + ["bad_record"] + [None] * 6
    assert "'taken'" in rows[3]["drop_detail"]
    assert rows[4]["text"] == "row 4"


def test_parquet_record_of_the_wrong_type_costs_only_that_row(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())]))
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.png"] * 10, "caption": [f"c{i}" for i in range(10)],
                             "messages": pa.array([None] * 3 + [[{"role": "user", "content": 42}]] + [None] * 6,
                                                  msgs)}), p)
    rows = _read("parquet", p)
    assert [r["drop_reason"] for r in rows] == [None] * 3 + ["bad_record"] + [None] * 6


def test_parquet_corrupt_page_loses_only_its_row_group(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": [f"row {i}" for i in range(10)], "n": list(range(10))}), p,
                   row_group_size=4, compression="none", use_dictionary=False)
    off = pq.ParquetFile(p).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(p.read_bytes())
    data[off:off + 8] = b"\xff" * 8  # the page header of row group 1 (rows 5-8)
    p.write_bytes(bytes(data))
    rows = _read("parquet", p)
    assert [r["drop_reason"] for r in rows] == [None] * 4 + ["unreadable_row_group"] * 4 + [None] * 2
    assert "row group 1 rows 5..8" in rows[4]["drop_detail"] and "'caption'" in rows[4]["drop_detail"]
    assert [r["text"] for r in rows[8:]] == ["row 8", "row 9"]


def _tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m in members:
            _add(tf, *m[:2], **(m[2] if len(m) > 2 else {}))


def _set_size(data: bytearray, header: int, size: int) -> None:
    data[header + 124:header + 136] = b"%011o\0" % size
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])


def test_tar_understated_member_size_resynchronises(tmp_path):
    p = tmp_path / "u.tar"
    big = _png(1) + b"\x01" * 3000  # several blocks of data
    _tar(p, [("000.png", _png(0)), ("000.txt", b"zero"), ("001.png", big), ("001.txt", b"one"),
             ("002.png", _png(2)), ("002.txt", b"two"), ("003.png", _png(3)), ("003.txt", b"three")])
    data = bytearray(p.read_bytes())
    with tarfile.open(p) as tf:
        header = next(m for m in tf if m.name == "001.png").offset
    _set_size(data, header, 100)  # the header now claims 100 of its ~3.1k bytes
    p.write_bytes(bytes(data))
    rows = _read("webdataset", p)
    fate = _fate(rows)
    assert fate["u.tar/000"] is None and fate["u.tar/002"] is None and fate["u.tar/003"] is None
    assert fate["u.tar/001"] == "corrupt_tar"
    assert {r["text"] for r in rows if r["drop_step"] is None} == {"zero", "two", "three"}


def test_tar_damaged_header_in_the_middle(tmp_path):
    p = tmp_path / "d.tar"
    _tar(p, [(f"{i:03d}.{e}", _png(i) if e == "png" else b"cap %d" % i) for i in range(4) for e in ("png", "txt")])
    data = bytearray(p.read_bytes())
    with tarfile.open(p) as tf:
        header = next(m for m in tf if m.name == "002.png").offset
    data[header:header + 100] = b"\xee" * 100  # name and mode garbled: checksum fails
    p.write_bytes(bytes(data))
    fate = _fate(_read("webdataset", p))
    # 002 lost its image header: dropped, never kept as text only; 001 sits next to the damage
    assert fate["d.tar/002"] == "corrupt_tar" and fate["d.tar/001"] == "corrupt_tar"
    assert fate["d.tar/000"] is None and fate["d.tar/003"] is None


def test_tar_special_members_drop_their_sample(tmp_path):
    p = tmp_path / "s.tar"
    _tar(p, [("ok.png", _png()), ("ok.txt", b"fine"),
             ("sym.png", None, {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}), ("sym.txt", b"s"),
             ("hard.png", None, {"type": tarfile.LNKTYPE, "linkname": "ok.png"}), ("hard.txt", b"h"),
             ("dev.png", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 5}), ("dev.txt", b"d"),
             ("fifo.txt", None, {"type": tarfile.FIFOTYPE}), ("fifo.json", b"{}"),
             ("dir", None, {"type": tarfile.DIRTYPE})])
    rows = _read("webdataset", p)
    fate = _fate(rows)
    assert fate == {"s.tar/ok": None, "s.tar/sym": "not_a_regular_file", "s.tar/hard": "not_a_regular_file",
                    "s.tar/dev": "not_a_regular_file", "s.tar/fifo": "not_a_regular_file"}
    sym = next(r for r in rows if r["source_key"] == "s.tar/sym")
    assert "symlink" in sym["drop_detail"] and "/etc/passwd" in sym["drop_detail"]


def test_tar_duplicate_member_is_a_ledger_row(tmp_path):
    p = tmp_path / "k.tar"
    _tar(p, [("a.png", _png(1)), ("a.txt", b"first"), ("b.png", _png(2)), ("b.txt", b"bee"),
             ("a.txt", b"second"), ("a.png", _png(3))])
    rows = _read("webdataset", p)
    fate = _fate(rows)
    assert fate == {"k.tar/a": None, "k.tar/a#duplicate": "duplicate_key", "k.tar/b": None}
    a = next(r for r in rows if r["source_key"] == "k.tar/a")
    assert a["text"] == "first" and len(a["media"]) == 1 and a["kind"] == "image_text"


def test_tar_json_nested_too_deep(tmp_path):
    p = tmp_path / "j.tar"
    _tar(p, [("a.png", _png()), ("a.json", DEEP.encode()), ("b.txt", b"fine")])
    fate = _fate(_read("webdataset", p))
    assert fate == {"j.tar/a": "bad_json", "j.tar/b": None}


def test_lost_records_are_an_accounting_problem():
    expected = {("s", "/a.jsonl"): 10, ("s", "/b.tar"): 3, ("s", "/c.parquet"): None}
    assert count_problems(expected, {("s", "/a.jsonl"): 10, ("s", "/b.tar"): 3}) == []
    (problem,) = count_problems(expected, {("s", "/a.jsonl"): 7, ("s", "/b.tar"): 3})
    assert problem == "/a.jsonl (s) holds 10 records but ingest wrote 7 rows"


def test_reader_that_fails_halfway_yields_a_file_row(tmp_path, monkeypatch):
    """An error escaping a reader is one `unreadable_source` row; the count then shows the loss."""
    import reelforge.curation.readers as readers

    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5)))
    real = readers._parse_json
    calls = iter(range(100))

    def flaky(raw):
        if next(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(raw)

    monkeypatch.setattr(readers, "_parse_json", flaky)
    rows = list(READERS["jsonl"](str(p), "s", str(tmp_path), {}))
    assert [r["drop_reason"] for r in rows] == [None, None, "unreadable_source"]
    got = {("s", str(p)): sum(r["drop_reason"] not in FILE_REASONS for r in rows)}
    assert count_problems({("s", str(p)): count_records("jsonl", str(p), {})}, got)


# --- containment at ingest ----------------------------------------------------------------

def test_media_outside_the_roots_drop_at_ingest_and_paths_are_canonical(tmp_path):
    corpus, other = tmp_path / "corpus", tmp_path / "other"
    (corpus / "img").mkdir(parents=True)
    other.mkdir()
    (corpus / "img" / "a.png").write_bytes(_png())
    (other / "b.png").write_bytes(_png(2))
    os.symlink(corpus, tmp_path / "link")  # the manifest is read through a symlinked folder
    (corpus / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"image": "img/a.png", "caption": "in"},
        {"image": "../other/b.png", "caption": "out"},
        {"image": "img/missing.png", "caption": "missing: probe drops it"}]))
    manifest = tmp_path / "link" / "m.jsonl"
    rows = _read("jsonl", manifest)
    assert [r["drop_reason"] for r in rows] == [None, "outside_root", None]
    assert rows[0]["media"][0]["uri"] == str((corpus / "img" / "a.png").resolve())
    assert rows[2]["media"][0]["uri"] == str(tmp_path / "link" / "img" / "missing.png")
    direct = _read("jsonl", corpus / "m.jsonl")
    assert direct[0]["id"] == rows[0]["id"]  # ids do not depend on the path the corpus was read by
    allowed = _read("jsonl", manifest, {"roots": [str(other)]})
    assert allowed[1]["drop_reason"] is None and allowed[1]["media"][0]["uri"] == str((other / "b.png").resolve())


def test_video_sidecar_fifo_does_not_block(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"not decoded here")
    os.mkfifo(tmp_path / "v.txt")
    (row,) = _read("video_folder", tmp_path / "v.mp4")
    assert row["drop_reason"] == "not_a_regular_file"


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_extended_headers_are_not_damage(tmp_path, fmt):
    """pax global/extended headers and GNU long names sit between members: not corrupt_tar."""
    p = tmp_path / "x.tar"
    long = "d" * 120 + "/000"
    pax = {"comment": "c" * 700} if fmt == tarfile.PAX_FORMAT else None
    with tarfile.open(p, "w", format=fmt, pax_headers=pax) as tf:
        _add(tf, f"{long}.png", _png())
        _add(tf, f"{long}.txt", "caption é".encode())
    (row,) = _read("webdataset", p)
    assert row["drop_reason"] is None and row["text"] == "caption é"
