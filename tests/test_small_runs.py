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


def test_report_from_one_ledger_pass_counts_what_reached_the_shards(spark, tmp_path):
    """The report's figures from `ledger_summary` + one pass over the final rows: a sample the
    shard writer could not write is live in the final rows but neither kept nor counted in the
    source's kept tokens; drops are counted per step and per source and reason."""
    from types import SimpleNamespace

    from reelforge.curation.schema import empty_row
    from reelforge.jobs.report import build_report, ledger_summary
    from reelforge.jobs.run import LEDGER_COLUMNS
    from reelforge.jobs.spark import sample_frame

    def row(i, source, tokens, drop=None):
        return dict(empty_row(), id=i, source=source, kind="text", text="t", text_tokens=tokens, visual_tokens=0,
                    tokens=tokens, drop_step=drop and drop[0], drop_reason=drop and drop[1])

    final = sample_frame(spark, [row("a", "s1", 10), row("b", "s1", 20),
                                 row("c", "s1", 40, ("dedup_near", "near_duplicate")),
                                 row("d", "s2", 5), row("e", "s2", 7, ("quality", "too_short"))])
    fates = {"a": ("kept", None, None), "b": ("dropped", "write", "media_unreadable"),
             "c": ("dropped", "dedup_near", "near_duplicate"), "d": ("kept", None, None),
             "e": ("dropped", "quality", "too_short")}
    src = {"a": "s1", "b": "s1", "c": "s1", "d": "s2", "e": "s2"}
    ledger = spark.createDataFrame(
        [tuple({"id": i, "source": src[i], "fate": f, "step": s, "reason": r}.get(c) for c in LEDGER_COLUMNS)
         for i, (f, s, r) in fates.items()], ", ".join(f"{c} string" for c in LEDGER_COLUMNS))
    summary = ledger_summary(ledger)
    assert (summary["kept"], summary["dropped"], summary["ids"], summary["derived"]) == (2, 3, 5, 0)
    recipe = SimpleNamespace(name="r", steps=[SimpleNamespace(name="quality"), SimpleNamespace(name="dedup_near")],
                             output=str(tmp_path))
    rep = build_report(spark, recipe, final, ledger, summary, [], 5, {})
    s1, s2 = rep["sources"]["s1"], rep["sources"]["s2"]
    assert (s1["inputs"], s1["kept"], s1["dropped"], s1["tokens"]) == (3, 1, 2, 10)  # b: live but not written
    assert s1["reasons"] == {"media_unreadable": 1, "near_duplicate": 1}
    assert (s2["kept"], s2["tokens"], s2["reasons"]) == (1, 5, {"too_short": 1})
    assert rep["tokens"]["tokens"] == 15 and rep["balanced"]
    steps = {s["step"]: s for s in rep["steps"]}
    assert [s["out"] for s in rep["steps"]] == [5, 4, 3, 2]
    assert steps["dedup_near"]["tokens_in"] == 75 and steps["dedup_near"]["tokens_out"] == 35
    assert steps["write"]["reasons"] == {"media_unreadable": 1}
