"""The shard phase's write path (issue 14 part 5) makes the bytes the tarfile writer makes.

Its pieces, each against what it replaces: tar headers without tarfile, JSON strings from UTF-8
bytes, the JSON with raw values put in place, the estimates from Arrow columns, and a sample's
prepared bytes completed with its media at write time (`TarStream`) against `encode_sample` +
`ShardFile`. Then `write_shards`, reading the step's Parquet files or a DataFrame, laid out on the
driver or on the executors, against a plain reference (the live samples sorted by order key, cut
by count and estimated bytes, written with `encode_sample` + `ShardFile`): the same shard names,
bytes, stats and results, a sample whose media cannot be read dropped with its reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile

import pyarrow as pa
import pytest
from PIL import Image

from reelforge.curation.errors import MediaReadError
from reelforge.curation.schema import ARROW_SCHEMA, empty_row, make_id, set_score
from reelforge.curation.shards import (
    RAW_FIELDS,
    ShardFile,
    TarStream,
    _encode_json_runs,
    complete_sample,
    encode_json,
    encode_sample,
    estimate_bytes,
    json_pieces,
    json_string,
    prepare_sample,
    read_stats,
    tar_header,
)


def _image(path, fmt: str, seed: int) -> dict:
    rng = random.Random(seed)
    w, h = rng.randint(8, 40), rng.randint(8, 40)
    Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)).save(path, fmt)
    data = open(path, "rb").read()
    return {"kind": "image", "uri": str(path), "member": None, "offset": None, "length": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "format": {"JPEG": "jpeg"}.get(fmt, fmt.lower()),
            "width": w, "height": h, "phash": [rng.getrandbits(64) - (1 << 63)]}


def _in_tar(tmp_path, seed: int) -> dict:
    """A JPEG inside a tar, referenced by byte range (as the webdataset reader leaves it)."""
    m = _image(tmp_path / f"t{seed}.jpg", "JPEG", seed)
    tar = tmp_path / f"src{seed}.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(m["uri"], arcname=f"k{seed}.jpg")
    with tarfile.open(tar) as tf:
        info = tf.getmember(f"k{seed}.jpg")
    return {**m, "uri": str(tar), "member": info.name, "offset": info.offset_data}


TEXTS = ['plain words', 'quotes " and \\ backslashes', 'lines\nand\ttabs\r\x01\x1f', 'ünïcödé — 😀 \u2028',
         "", '{"json": "inside"}']


def _rows(tmp_path) -> list[dict]:
    rng = random.Random(3)
    rows = []
    for i in range(40):
        r = empty_row()
        kind = ["text", "image_text", "interleaved", "conversation", "preference"][i % 5]
        r.update(kind=kind, source=f"src{i % 3}", source_key=f"k{i}", source_location="/x/m.jsonl")
        if kind == "text":
            r["text"] = " ".join(rng.choice(TEXTS) for _ in range(rng.randint(1, 400)))
        elif kind == "image_text":
            fmt = ["JPEG", "PNG", "GIF", "JPEG"][i // 5 % 4]
            m = _in_tar(tmp_path, i) if i % 7 == 1 else _image(tmp_path / f"i{i}.{fmt.lower()}", fmt, i)
            r.update(text=rng.choice(TEXTS), media=[m], meta=json.dumps({"url": f"u{i}", "q": '"'}))
        elif kind == "interleaved":
            r.update(text="<image> between <image>", media=[_image(tmp_path / f"a{i}.png", "PNG", i),
                                                          _image(tmp_path / f"b{i}.jpg", "JPEG", i + 100)])
        elif kind == "conversation":
            r["messages"] = [{"role": "user", "content": rng.choice(TEXTS)}, {"role": "assistant", "content": "ok"}]
            r["captions"] = [{"text": "a cap", "model": "m", "prompt": "p \"", "task": "caption"}]
        else:
            r.update(messages=[{"role": "user", "content": "which?"}], chosen=rng.choice(TEXTS), rejected="no")
        r["id"] = make_id(r["source"], r["source_key"], {"i": i})
        if i % 4 == 0:
            r.update(text_tokens=i, visual_tokens=2 * i, tokens=3 * i, mode="think", stage="sft")
            set_score(r, "quality", i / 7)
        rows.append(r)
    rows[6]["media"][0]["uri"] = str(tmp_path / "gone.png")  # missing at write time
    rows[16]["media"][0]["sha256"] = "0" * 64  # changed since probe
    rows[12]["media"][1]["uri"] = str(tmp_path / "gone.jpg")  # the second of two media
    rows[11]["media"][0]["uri"] = str(tmp_path / "gone.gif")  # a GIF (read when prepared) that is gone
    rows[20]["drop_step"], rows[20]["drop_reason"] = "dedup", "duplicate"
    rows[25]["id"] = "ü" * 60 + rows[25]["id"]  # member names past 100 characters: pax headers
    return rows


def test_tar_headers_are_tarfiles():
    for name in ["a.json", "x" * 100, "x" * 101, "é.json", "dir/k.jpg"]:
        for size in [0, 1, 511, 512, 513, 10 ** 9, 8 ** 11 - 1, 8 ** 11]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, 0, 0o444, "reelforge", "reelforge"
            assert tar_header(name, size) == ti.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "strict"), (name, size)


def test_json_strings_from_utf8_bytes_are_json_dumps():
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x30)] + ["\\", '"', "é", "€", "😀", "\u2028", "\x7f", "a", " "]
    for _ in range(5000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert json_string(s.encode()) == json.dumps(s, ensure_ascii=False).encode()


def test_raw_strings_land_where_json_dumps_puts_them():
    from reelforge.curation import shards

    obj = {"id": "x", "kind": "text", "tokens": {"tokens": None}, "version": 2, "provenance": {"key": "k"}}
    collide = {**obj, "meta": {"q": shards._MARK + "text"}}  # the marker elsewhere: key by key
    for o in (obj, collide):
        for raw in ({}, {"text": 'a "q"\n'}, {"text": "t", "chosen": "c\\", "rejected": "r"}, {"rejected": ""}):
            want = encode_json({**o, **raw})
            assert b"".join(json_pieces(o, {k: v.encode() for k, v in raw.items()})) == want
            assert _encode_json_runs(o, {k: json_string(v.encode()) for k, v in raw.items()}) == want


def test_estimates_from_columns_are_estimate_bytes(tmp_path):
    from reelforge.jobs.shards import estimates

    rows = _rows(tmp_path)
    batch = pa.RecordBatch.from_pylist(rows, schema=ARROW_SCHEMA)
    assert estimates(batch).tolist() == [estimate_bytes(r) for r in rows]


def test_rows_from_columns_are_to_pylist(tmp_path):
    from reelforge.jobs.shards import ENCODE_COLUMNS, _pylist

    batch = pa.RecordBatch.from_pylist(_rows(tmp_path), schema=ARROW_SCHEMA)
    for b in (batch, batch.slice(3, 20), batch.slice(31)):
        for name in ENCODE_COLUMNS:
            assert _pylist(b.column(name)) == b.column(name).to_pylist(maps_as_pydicts="strict"), name


def _shard_bytes(tmp_path, rows, writer: str) -> tuple[dict, dict]:
    """One shard of `rows` written by ShardFile (encode_sample) or TarStream (prepare + complete):
    (its stats, each row's failure reason)."""
    path = str(tmp_path / f"{writer}.tar")
    sf = ShardFile(path) if writer == "old" else TarStream(path)
    failed = {}
    for r in rows:
        try:
            if writer == "old":
                sf.write(encode_sample(r), r["source"])
                continue
            pieces, deferred = prepare_sample({**r, **dict.fromkeys(RAW_FIELDS)},
                                              {k: None if r[k] is None else r[k].encode() for k in RAW_FIELDS})
            pieces = complete_sample(r["id"], b"".join(pieces), json.loads(json.dumps(deferred)))
            sf.write(pieces, r["source"])
        except MediaReadError as e:
            failed[r["id"]] = e.reason
    stats = sf.close()
    return {**stats, "shard": None}, failed


def test_prepared_samples_write_the_bytes_shardfile_writes(tmp_path):
    rows = [r for r in _rows(tmp_path) if r["drop_step"] is None]
    old, new = _shard_bytes(tmp_path, rows, "old"), _shard_bytes(tmp_path, rows, "new")
    assert old == new
    assert set(old[1].values()) == {"missing_file", "media_changed"} and len(old[1]) == 4


# --- write_shards against the reference ---------------------------------------------------------

def _reference(rows, out, max_samples, max_bytes, seed, shuffle):
    live = [r for r in rows if r["drop_step"] is None]

    def order(r):
        return hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest() if shuffle else r["id"]

    live.sort(key=lambda r: (order(r), estimate_bytes(r)))
    pairs, pos = [], 0
    for i, r in enumerate(live):
        pairs.append((pos // max_bytes, i // max_samples))
        pos += estimate_bytes(r)
    names = {p: f"shard-{j:06d}.tar" for j, p in enumerate(sorted(set(pairs)))}
    os.makedirs(out)
    results, stats, sf = {}, [], None
    for i, (r, p) in enumerate(zip(live, pairs)):
        if i == 0 or p != pairs[i - 1]:
            if sf is not None:
                stats.append(sf.close())
            sf = ShardFile(os.path.join(out, names[p]))
        try:
            obj = encode_sample(r)
        except MediaReadError as e:
            results[r["id"]] = (None, "dropped", e.reason)
            continue
        sf.write(obj, r["source"])
        results[r["id"]] = (names[p], "kept", None)
    stats.append(sf.close())
    return results, stats


def _tars(out) -> dict:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


@pytest.mark.parametrize("kw", [dict(max_samples=4, max_bytes=20_000, shuffle=True, seed=1),
                                dict(max_samples=7, max_bytes=1 << 30, shuffle=False, seed=0)])
def test_write_shards_writes_what_the_reference_writes(spark, tmp_path, kw):
    from reelforge.jobs.shards import write_shards
    from reelforge.jobs.spark import sample_frame, spark_schema

    rows = _rows(tmp_path)
    step = str(tmp_path / "step")
    sample_frame(spark, rows).repartition(3).write.option("compression", "zstd").parquet(step)
    df = spark.read.schema(spark_schema()).parquet(step)
    ref_results, ref_stats = _reference(rows, str(tmp_path / "ref"), **kw)
    assert len(ref_stats) > 3 and sorted(r[2] for r in ref_results.values() if r[2]) == \
        ["media_changed", "missing_file", "missing_file", "missing_file"]
    for case, source, hint in (("parquet-driver", step, len(rows)), ("frame-driver", None, len(rows)),
                               ("parquet-executors", step, None)):
        out = str(tmp_path / case)
        results, names, stats_dir, keyed = write_shards(df, out, rows_hint=hint, source=source, **kw)
        got = {r["id"]: (r["shard"], r["status"], r["reason"]) for r in results.collect()}
        keyed.unpersist()
        assert got == ref_results, case
        assert read_stats(stats_dir, names) == ref_stats, case
        assert _tars(out) == _tars(str(tmp_path / "ref")), case
        (detail,) = [r["detail"] for r in results.collect() if r["reason"] == "media_changed"]
        assert "changed since probe" in detail
