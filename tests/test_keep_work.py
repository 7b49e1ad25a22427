"""`output.keep_work: false`: the run's intermediates (`_work/`) are gone once it is complete, the
outputs are whole, and a re-run recomputes from the start to the same shards."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from reelforge.jobs.recipe import RecipeError, load_recipe, parse_recipe
from reelforge.jobs.run import run_recipe


def _corpus(root, keep_work) -> str:
    with open(root / "docs.jsonl", "w") as f:
        for i in range(40):
            words = " ".join(f"w{(i * 7 + j) % 97}x{i}" for j in range(30))
            f.write(json.dumps({"id": f"d{i:03d}", "text": words}) + "\n")
        f.write(json.dumps({"id": "copy", "text": " ".join(f"w{(0 * 7 + j) % 97}x0" for j in range(30))}) + "\n")
    output = {"path": "out", "shards": {"max_samples": 16}}
    if keep_work is not None:
        output["keep_work"] = keep_work
    recipe = {"name": "keep-work", "sources": [{"name": "docs", "format": "text", "path": "docs.jsonl"}],
              "steps": [{"dedup_near": {"threshold": 0.8}}], "output": output}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(root / "recipe.yaml")


def _outputs(out: str) -> tuple[dict, list]:
    with open(os.path.join(out, "shards", "index.json")) as f:
        index = json.load(f)
    ledger = sorted((r["id"], r["fate"], r["dup_of"] or "")
                    for r in pq.read_table(os.path.join(out, "ledger")).to_pylist())
    return index, ledger


def test_keep_work_false_removes_work_and_a_rerun_recomputes(spark, tmp_path):
    recipe = _corpus(tmp_path, keep_work=False)
    out = str(tmp_path / "out")
    rep = run_recipe(load_recipe(recipe, out=out), spark=spark, log=lambda *a: None)
    assert rep["balanced"] and rep["kept"] == 40 and rep["dropped"] == 1
    assert not os.path.exists(os.path.join(out, "_work"))
    assert sorted(os.listdir(out)) == sorted(["_reelforge_run.json", "funnel.png", "ledger", "report.json",
                                              "report.html", "report.md", "samples", "shards"])
    first = _outputs(out)
    assert sum(s["samples"] for s in first[0]["shards"]) == 40

    # without _work/ the media the shards were read from cannot be checked against the index's
    # stamp, so even an unchanged re-run recomputes every step, to the same shards
    logs: list[str] = []
    rep2 = run_recipe(load_recipe(recipe, out=out), spark=spark, log=logs.append)
    assert not any("already done" in line or line.startswith("nothing to do") for line in logs), logs
    assert rep2["balanced"] and not os.path.exists(os.path.join(out, "_work"))
    assert _outputs(out) == first  # same shards (names, bytes, sha256) and the same ledger


def test_keep_work_default_keeps_work_and_resumes(spark, tmp_path):
    recipe = _corpus(tmp_path, keep_work=None)
    out = str(tmp_path / "out")
    run_recipe(load_recipe(recipe, out=out), spark=spark, log=lambda *a: None)
    steps = sorted(os.listdir(os.path.join(out, "_work")))
    assert "00_ingest" in steps and "01_dedup_near" in steps
    first = _outputs(out)
    # the intermediates are zstd Parquet
    part = next(f for f in os.listdir(os.path.join(out, "_work", "01_dedup_near")) if f.endswith(".parquet"))
    meta = pq.ParquetFile(os.path.join(out, "_work", "01_dedup_near", part)).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"

    # switched off on the command line's behalf (recipe.keep_work): this run resumes, then removes _work
    logs: list[str] = []
    r = load_recipe(recipe, out=out)
    r.keep_work = False
    run_recipe(r, spark=spark, log=logs.append)
    assert sum("already done" in line for line in logs) == 2, logs
    assert not os.path.exists(os.path.join(out, "_work"))
    assert _outputs(out) == first


def test_keep_work_must_be_a_boolean(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    raw = {"sources": [{"name": "a", "format": "text", "path": "a.jsonl"}], "steps": [],
           "output": {"path": "out", "keep_work": "no"}}
    with pytest.raises(RecipeError, match="keep_work"):
        parse_recipe(raw, str(tmp_path))
    raw["output"]["keep_work"] = False
    assert parse_recipe(raw, str(tmp_path)).keep_work is False
