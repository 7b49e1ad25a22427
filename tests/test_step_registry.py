"""Steps without Spark: the registry, discovery of filter modules, and run_batches over Arrow."""

from __future__ import annotations

import pkgutil

import pyarrow as pa
import pytest

from reelforge.curation.schema import ARROW_SCHEMA, empty_row
from reelforge.curation.step import STEPS, RowStep, Step, StepContext, register_step, run_batches


def test_every_filters_module_is_discovered_and_every_step_registered():
    import reelforge.filters
    from reelforge.jobs.recipe import _steps, step_modules

    mods = step_modules()
    for m in pkgutil.walk_packages(reelforge.filters.__path__, "reelforge.filters."):
        assert m.name in mods  # a new file in filters/ is imported with no edit elsewhere
    steps = _steps()
    for name in ("probe", "clips", "tokens", "recaption", "modes", "quality", "clip", "vlm_judge", "dedup_exact",
                 "dedup_near", "leakage", "repetition", "format_consistency"):
        assert steps[name].name == name
    for name in ("dedup_exact", "dedup_near", "leakage", "repetition", "format_consistency", "quality", "clip",
                 "vlm_judge"):
        assert steps[name].__module__.startswith("reelforge.filters."), name
    assert {steps[n].shuffle for n in ("dedup_exact", "dedup_near", "leakage")} == {"dedup_exact", "dedup_near",
                                                                                      "leakage"}


def test_a_name_is_taken_once():
    @register_step("test_registry_dummy")
    class Dummy(RowStep):
        def process_row(self, row):
            return row

    assert STEPS["test_registry_dummy"] is Dummy and Dummy.name == "test_registry_dummy"
    with pytest.raises(ValueError, match="taken"):
        @register_step("test_registry_dummy")
        class Other(RowStep):
            pass
    with pytest.raises(ValueError):
        register_step("not a word")
    del STEPS["test_registry_dummy"]


def _rows(n):
    out = []
    for i in range(n):
        r = empty_row()
        r.update(id=f"r{i:03d}", source="s", source_key=str(i), kind="text", text=f"text {i}")
        out.append(r)
    return out


def test_run_batches_sets_up_processes_and_tears_down():
    calls = []

    class Upper(RowStep):
        name = "upper"
        batch_rows = 3

        def setup(self, context=None):
            super().setup(context)
            calls.append(("setup", self.context.workdir, self.context.gpus))

        def process_row(self, row):
            if row["id"] == "r004":
                raise RuntimeError("boom")
            row["text"] = row["text"].upper()
            return row

        def teardown(self):
            calls.append(("teardown",))

    rows = _rows(7)
    rows[1]["drop_step"] = "earlier"
    batches = [pa.RecordBatch.from_pylist(rows[:5], schema=ARROW_SCHEMA),
               pa.RecordBatch.from_pylist(rows[5:], schema=ARROW_SCHEMA)]
    out = [r for b in run_batches(Upper(), batches, StepContext(workdir="/w", gpus=("0",))) for r in b.to_pylist()]
    assert calls == [("setup", "/w", ("0",)), ("teardown",)]
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert out[0]["text"] == "TEXT 0" and out[1]["text"] == "text 1"  # a dropped row passes untouched
    assert (out[4]["drop_step"], out[4]["drop_reason"]) == ("upper", "error")


def test_per_row_process_written_against_the_old_api_still_works():
    class Old(RowStep):
        name = "old"

        def process(self, row: dict) -> dict:
            row["text"] = "seen"
            return row

    out = Old().process(_rows(2))
    assert [r["text"] for r in out] == ["seen", "seen"]
    assert Old().process_rows(_rows(1))[0]["text"] == "seen"


def test_a_step_knows_no_spark():
    step = Step()
    assert step.shuffle is None and step.cut() is None
    step.setup()
    assert step.context == StepContext()
