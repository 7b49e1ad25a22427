"""What makes a small run fast must not change what it decides.

- `dedup_near` on a corpus of at most `REELFORGE_ONE_TASK_ROWS` rows runs in one Spark task
  (the step's list functions) instead of the distributed keys/buckets/components jobs: both
  paths must drop the same samples with the same `dup_of`, on text and on images;
- ingest counts each file's records in the task that reads it and returns them in an
  accumulator: the check must still see a lost record, an unread file, and must not count a
  file twice when its task runs twice.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import yaml

pytestmark = pytest.mark.spark


def _corpus(root) -> str:
    from test_near_dedup import edit, real_documents, smooth_field

    rng = random.Random(3)
    base = real_documents()[:150]
    docs = [{"id": f"d{i:03d}", "text": d} for i, d in enumerate(base)]
    docs += [{"id": f"e{j:03d}", "text": edit(base[rng.randrange(len(base))], rng.choice([0.0, 0.01, 0.03]), rng)}
             for j in range(60)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "img").mkdir()
    rows = []
    for i in range(30):
        im = smooth_field(rng, 160, 120)
        im.save(root / "img" / f"b{i:02d}.png")
        rows.append({"image": f"img/b{i:02d}.png", "caption": f"picture {i}"})
        if i < 12:  # a resized or re-encoded copy
            (im.resize((120, 90)) if i % 2 else im).save(root / "img" / f"c{i:02d}.jpg", quality=60)
            rows.append({"image": f"img/c{i:02d}.jpg", "caption": f"copy {i}"})
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "small", "sources": [{"name": "docs", "format": "text", "path": "docs.jsonl"},
                                           {"name": "images", "format": "jsonl", "path": "images.jsonl"}],
              "steps": [{"probe": {}}, {"dedup_near": {}}], "output": {"path": "out"}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(root / "recipe.yaml")


def _drops(out: str) -> dict[str, tuple]:
    import pyarrow.parquet as pq

    return {r["id"]: (r["source"], r["step"], r["reason"], r["detail"], r["dup_of"])
            for r in pq.read_table(os.path.join(out, "ledger")).to_pylist() if r["fate"] == "dropped"}


def test_one_task_dedup_decides_as_the_distributed_path(spark, tmp_path, monkeypatch):
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    recipe = _corpus(tmp_path)
    got = {}
    for rows in ("0", "100000"):  # 0: every corpus takes the distributed path
        monkeypatch.setenv("REELFORGE_ONE_TASK_ROWS", rows)
        out = str(tmp_path / f"out{rows}")
        rep = run_recipe(load_recipe(recipe, out=out), spark=spark, log=lambda *a: None)
        assert rep["balanced"]
        got[rows] = _drops(out)
    distributed, one_task = got["0"], got["100000"]
    assert one_task == distributed
    near = [v for v in distributed.values() if v[2] == "near_duplicate"]
    assert all(v[3] == f"near duplicate of {v[4]}" for v in near)
    by_source = {s: sum(v[0] == s for v in near) for s in ("docs", "images")}
    assert by_source["docs"] >= 40 and by_source["images"] >= 10, by_source  # text and image copies found


def test_one_task_path_needs_a_small_parquet_input(spark, tmp_path):
    from reelforge.curation.schema import empty_row
    from reelforge.jobs.shuffles import one_task_rows, rows_hint
    from reelforge.jobs.spark import sample_frame

    df = sample_frame(spark, [dict(empty_row(), id=f"s{i}", kind="text", text="x") for i in range(5)])
    assert rows_hint(df) is None  # built on the driver: no files to read a count from
    path = str(tmp_path / "p")
    df.repartition(3).write.parquet(path)
    read = spark.read.parquet(path)
    assert rows_hint(read) == 5
    assert rows_hint(read, max_files=1) is None  # many files: a big corpus, no footer reading
    assert one_task_rows() == 5000


def test_ingest_counts_come_back_with_the_write(spark, tmp_path):
    from reelforge.jobs.ingest import check_counts, ingest
    from reelforge.jobs.recipe import load_recipe

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(7))
                                      + "{not json\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {"name": "ing", "sources": [{"name": "docs", "format": "text", "path": "*.jsonl"}], "steps": [],
         "output": {"path": "out"}}))
    recipe = load_recipe(str(tmp_path / "recipe.yaml"))
    df, counts = ingest(spark, recipe.sources)
    df.count()  # the plan runs twice (a count, then the write): each file must still count once
    df.write.parquet(str(tmp_path / "ingested"))
    assert check_counts(counts, recipe.sources) == []
    a = str(tmp_path / "a.jsonl")
    assert counts.value[("docs", a)] == (8, 8)  # the bad line is a record too: a bad_record row

    counts.add({("docs", a): (8, 6)})  # a reader that lost its last two records
    (problem,) = check_counts(counts, recipe.sources)
    assert "holds 8 records but ingest wrote 6 rows" in problem and a in problem

    fresh = spark.sparkContext.accumulator({}, type(counts.accum_param)())
    fresh.add({("docs", a): (8, 8)})  # b.jsonl never reported: a file no task read
    (problem,) = check_counts(fresh, recipe.sources)
    assert "b.jsonl" in problem and "was not read" in problem
