"""Training papercuts (issue 17 part 6): SIGTERM/Ctrl-C checkpoints and exits 0, `--set` reads YAML 1.2
numbers, the report compares the plan entry by entry, shard sha256 checks in `mix` and the loader, and
the demo stage trains the LLM so its loss falls."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import yaml
from train_common import ROOT, TINY_VISUAL, run_cli, seen_ids

from reelforge.curation.errors import RecipeError
from reelforge.training.config import load_stage, parse_override

pytestmark = [pytest.mark.train, pytest.mark.slow]


# ----------------------------------------------------------------------------- --set: YAML 1.2 core schema

# The YAML 1.2.2 spec, 10.3.2 "Tag Resolution" (core schema) and its example 10.9, plus the YAML 1.1
# forms the core schema reads differently (PyYAML's safe_load gives the second column's opposite).
YAML12 = [
    ("3e-3", 0.003), ("1e5", 100000.0), (".5", 0.5), ("-.5e+2", -50.0), ("+12.5", 12.5), ("1.", 1.0),
    ("1.0e-2", 0.01), ("0.", 0.0), ("-0.0", -0.0), (".inf", math.inf), ("-.Inf", -math.inf), ("+.INF", math.inf),
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False), ("FALSE", False),
    ("null", None), ("Null", None), ("NULL", None), ("~", None), ("", None),
    ("0", 0), ("12", 12), ("-12", -12), ("+12", 12), ("010", 10), ("0o14", 12), ("0x1F", 31), ("0xC", 12),
    # strings under 1.2 (YAML 1.1 and PyYAML read these as bools, sexagesimals, underscored numbers)
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("1_000", "1_000"),
    ("1:20", "1:20"), ("0b101", "0b101"), ("2001-12-14", "2001-12-14"), ("abc", "abc"), ("e5", "e5"),
    ("'3e-3'", "3e-3"), ('"true"', "true"),
    # collections: their scalars by the same rules
    ("[image_text, 1e-3, true, yes]", ["image_text", 0.001, True, "yes"]), ("{lr: .5, x: ~}", {"lr": 0.5, "x": None}),
]


@pytest.mark.parametrize("text,want", YAML12)
def test_set_values_are_read_as_yaml_1_2(text, want):
    got = parse_override(f"optim.lr={text}")["optim"]["lr"]
    assert got == want and type(got) is type(want), (text, got, want)
    if text == "3e-3":  # the papercut: PyYAML's YAML 1.1 resolver leaves this a string
        assert yaml.safe_load(text) == "3e-3"


def test_set_nan_and_nested_and_errors():
    assert math.isnan(parse_override("optim.lr=.nan")["optim"]["lr"])
    assert parse_override("loss.mpo.beta=1e-1") == {"loss": {"mpo": {"beta": 0.1}}}
    with pytest.raises(RecipeError, match="FIELD=VALUE"):
        parse_override("optim.lr")
    with pytest.raises(RecipeError, match="--set optim.lr: the value .* is not valid YAML"):
        parse_override("optim.lr=[1, 2")


def test_set_lr_3e_3_is_accepted_by_the_stage(tiny, shards, tmp_path):
    path = _stage(tmp_path, tiny, shards, str(tmp_path / "out"))
    over = {}
    from reelforge.training.config import deep_update

    for s in ("optim.lr=3e-3", "steps=1e2", "data.pack=false", "optim.warmup_steps=0x2"):
        over = deep_update(over, parse_override(s))
    cfg = load_stage(path, over)
    assert cfg.optim["lr"] == 0.003 and cfg.steps == 100 and type(cfg.steps) is int
    assert cfg.data["pack"] is False and cfg.optim["warmup_steps"] == 2


# ----------------------------------------------------------------------------- helpers

DEMO = os.path.join(ROOT, "training", "stages", "demo_tiny.yaml")


def _stage(tmp_path, tiny, shards, out, **over) -> str:
    """training/stages/demo_tiny.yaml as shipped, pointed at the test's tiny models, shards and folder."""
    with open(DEMO) as f:
        d = yaml.safe_load(f)
    d["model"] = {**d["model"], "vision": tiny["vision"], "llm": tiny["llm"]}
    d["data"]["sources"] = [{**d["data"]["sources"][0], "path": shards}]
    d["data"]["visual"] = TINY_VISUAL
    d["output"]["dir"] = out
    from reelforge.training.config import deep_update

    d = deep_update(d, over)
    path = str(tmp_path / "demo_tiny.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return path


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _kinds(shards: str) -> dict[str, str]:
    """Sample id -> kind, read from the shards themselves."""
    out = {}
    for t in sorted(glob.glob(os.path.join(shards, "*.tar"))):
        with tarfile.open(t) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    j = json.loads(tf.extractfile(m).read())
                    out[j["id"]] = j["kind"]
    return out


def _plan(path: str, kinds: dict[str, str]) -> str:
    """A planner plan (the shape `reelforge plan` writes) whose entries select by kind, named unlike any
    source: 'captions' (image_text), 'chat' (conversation), 'prose' (text)."""
    entries = [{"name": "captions", "selector": {"kind": ["image_text"]}},
               {"name": "chat", "selector": {"kind": ["conversation"]}},
               {"name": "prose", "selector": {"kind": ["text"]}}]
    for e in entries:
        e["samples"] = sum(1 for k in kinds.values() if k in e["selector"]["kind"])
    with open(path, "w") as f:
        json.dump({"version": 1, "stages": [{"name": "demo_tiny", "entries": entries}]}, f)
    return path


# ----------------------------------------------------------------------------- SIGTERM, report by entry, demo loss


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    from reelforge.training.train import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as sig:
        assert sig.got is None and sig.name == ""
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the process lives on, the flag is set
        time.sleep(0.01)
        assert sig.got == signal.SIGTERM and sig.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_checkpoints_exits_0_and_resumes_and_demo_loss_falls(tiny, shards, tmp_path):
    """The shipped demo stage (LLM + projector) as a subprocess: SIGTERM after a few steps -> exit 0 and a
    checkpoint at the step reached; running it again resumes there and finishes; its loss falls; the
    report compares the plan entry by entry (entry names no source carries)."""
    out = str(tmp_path / "out")
    kinds = _kinds(shards)
    plan = _plan(str(tmp_path / "plan.json"), kinds)
    path = _stage(tmp_path, tiny, shards, out, report={"plan": plan, "targets": None})
    cfg = load_stage(path)
    assert set(cfg.trainable) >= {"llm", "projector"}, cfg.trainable

    def interrupted_run(name: str, after: int, sig: signal.Signals) -> tuple[int, str]:
        """`reelforge train` until `after` steps are logged, then `sig`: SIGTERM to the process (a job
        scheduler), SIGINT to its whole process group (Ctrl-C: the loader's worker gets it too)."""
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        with open(tmp_path / name, "w") as log:
            p = subprocess.Popen([sys.executable, "-m", "reelforge.jobs.cli", "train", path], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            deadline = time.time() + 540  # a first DeepSpeed import may build its shm op (minutes on a busy box)
            while time.time() < deadline and p.poll() is None:
                if os.path.exists(os.path.join(out, "metrics.jsonl")) and len(_metrics(out)) >= after:
                    break
                time.sleep(0.05)
            assert p.poll() is None, open(tmp_path / name).read()[-4000:]
            if sig == signal.SIGINT:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
            rc = p.wait(timeout=540)
        said = open(tmp_path / name).read()
        assert rc == 0, said[-4000:]
        rows = _metrics(out)
        n = rows[-1]["step"]
        assert after <= n < cfg.steps and [r["step"] for r in rows] == list(range(1, n + 1)), (n, said[-2000:])
        assert f"{sig.name}: stopped at step {n}/{cfg.steps}" in said
        with open(os.path.join(out, "ckpt", "latest")) as f:
            assert f.read().strip() == f"step-{n}"
        assert not os.path.exists(os.path.join(out, "final"))  # not finished: no export
        return n, said

    n, _ = interrupted_run("run1.log", 2, signal.SIGTERM)
    first_ids = seen_ids(out)
    m, said = interrupted_run("run2.log", n + 2, signal.SIGINT)
    assert f"resumed demo_tiny from step-{n} at step {n}" in said
    assert seen_ids(out)[:len(first_ids)] == first_ids

    r2 = run_cli("train", path)
    assert f"resumed demo_tiny from step-{m} at step {m}" in r2.stdout, r2.stdout[-2000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))
    assert os.path.exists(os.path.join(out, "final"))
    ids = seen_ids(out)
    assert ids[:len(first_ids)] == first_ids and len(ids) > len(first_ids)

    # the demo stage trains the LLM: its loss falls (mean of the first 3 steps vs the last 3)
    loss = [r["loss"] for r in rows]
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    print(f"demo_tiny loss: first 3 steps {first:.3f}, last 3 {last:.3f}")
    assert last < first - 0.5, loss

    # the report: by plan entry, counts equal to the seen log's entries and to the shards' kinds
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["plan_comparison_by"] == "entry"
    cmp = rep["plan_comparison"]
    assert set(cmp) == {"captions", "chat", "prose"}, cmp
    by_kind = {"image_text": "captions", "conversation": "chat", "text": "prose"}
    want: dict[str, int] = {}
    logged: dict[str, int] = {}
    for f in sorted(glob.glob(os.path.join(out, "seen", "rank*.jsonl"))):
        for ln in open(f):
            rec = json.loads(ln)
            for i, e in zip(rec["ids"], rec["entries"]):
                logged[e] = logged.get(e, 0) + 1
                want_e = by_kind.get(kinds[i], "(outside the plan)")
                assert e == want_e, (i, kinds[i], e)
                want[want_e] = want.get(want_e, 0) + 1
    assert logged == want == rep["samples_per_entry"]
    for name, c in cmp.items():
        assert c["seen"] == want.get(name, 0) and c["planned"] == sum(1 for k in kinds.values()
                                                                       if by_kind.get(k) == name)
    assert sum(c["seen"] for c in cmp.values()) > 0
    assert rep.get("samples_outside_plan", 0) == want.get("(outside the plan)", 0)


# ----------------------------------------------------------------------------- sha256 checks


def _indexed_copy(src: str, dst: str) -> list[str]:
    """The shards copied to `dst` with an index.json as a run writes it (shard, samples, bytes, sha256)."""
    os.makedirs(dst)
    recs = []
    for t in sorted(glob.glob(os.path.join(src, "*.tar"))):
        shutil.copy(t, dst)
        data = open(t, "rb").read()
        with tarfile.open(t) as tf:
            n = sum(1 for m in tf if m.name.endswith(".json"))
        recs.append({"shard": os.path.basename(t), "samples": n, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()})
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump({"shards": recs}, f)
    assert len(recs) >= 2
    return [os.path.join(dst, r["shard"]) for r in recs]


def _flip_byte(path: str) -> None:
    """One byte in the middle of the shard changed (the same size)."""
    with open(path, "r+b") as f:
        mid = os.path.getsize(path) // 2
        f.seek(mid)
        b = f.read(1)
        f.seek(mid)
        f.write(bytes([b[0] ^ 0xFF]))


def test_loader_refuses_a_corrupted_shard(tiny, shards, tmp_path):
    from reelforge.training.loader import ShardLoader, iter_ids, resolve_shard_set

    d = str(tmp_path / "shards")
    tars = _indexed_copy(shards, d)
    path = _stage(tmp_path, tiny, d, str(tmp_path / "out"), data={"verify": True})
    assert len(iter_ids(ShardLoader(load_stage(path)), limit=2)) > 0  # intact shards pass the check

    _flip_byte(tars[0])  # same size: only `verify: true` finds it
    assert resolve_shard_set("demo", [d]).urls == tars
    with pytest.raises(RecipeError) as e:
        ShardLoader(load_stage(path))
    msg = str(e.value)
    assert f"shard {tars[0]} is refused" in msg and "sha256" in msg and "\n" not in msg, msg

    shutil.copy(os.path.join(shards, os.path.basename(tars[0])), tars[0])  # restored
    with open(tars[-1], "ab") as f:  # a size that differs from index.json: refused even without verify
        f.write(b"\0" * 512)
    with pytest.raises(RecipeError, match=f"shard {tars[-1]} is refused"):
        resolve_shard_set("demo", [d])
    with pytest.raises(RecipeError, match="data.verify` must be true or false"):
        load_stage(path, {"data": {"verify": "yes"}})


def test_mix_checks_run_shards(shards, tmp_path, capsys):
    from reelforge.jobs.cli import main
    from reelforge.mixers.emit import check_run_shards
    from reelforge.mixers.planner import PLAN_VERSION

    run = tmp_path / "run"
    tars = _indexed_copy(shards, str(run / "shards"))
    assert check_run_shards(str(run / "shards")) == 0  # sizes match: nothing hashed
    assert check_run_shards(str(run / "shards"), verify=True) == len(tars)  # every shard hashed, all match

    _flip_byte(tars[0])
    assert check_run_shards(str(run / "shards")) == 0  # the same size passes the always-on check ...
    with pytest.raises(RecipeError, match=f"run shard {tars[0]} is not the shard the run wrote"):
        check_run_shards(str(run / "shards"), verify=True)  # ... and not --verify

    plan = tmp_path / "p.plan.json"
    plan.write_text(json.dumps({"version": PLAN_VERSION, "stats": str(run), "stages": [], "mixture": "m",
                                "seed": 0}))
    capsys.readouterr()
    assert main(["mix", str(plan), "--out", str(tmp_path / "mixed"), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"reelforge: run shard {tars[0]} is not the shard the run wrote") and "\n" not in err, err
    assert not os.path.exists(tmp_path / "mixed")  # refused before anything was written

    with open(tars[1], "ab") as f:
        f.write(b"\0" * 512)
    shutil.copy(os.path.join(shards, os.path.basename(tars[0])), tars[0])
    assert main(["mix", str(plan), "--out", str(tmp_path / "mixed")]) == 2  # size differs: no --verify needed
    assert f"run shard {tars[1]} is not the shard the run wrote" in capsys.readouterr().err


# ----------------------------------------------------------------------------- report by plan entry


def test_entry_of_matches_the_planners_selection():
    """entry_of (the loader's attribution) against the planner's own selection (entry_indices) on a
    table of samples with every selector the plan has: source, kind, mode, min_scores."""
    import random

    import numpy as np
    import pyarrow as pa

    from reelforge.mixers.planner import entry_indices
    from reelforge.mixers.spec import Entry
    from reelforge.training.report import entry_of

    rnd = random.Random(0)
    rows = []
    for i in range(400):
        scores = {k: round(rnd.random(), 2) for k in ("clip", "quality") if rnd.random() < 0.7}
        rows.append({"id": f"s{i:04d}", "source": rnd.choice(["laion", "coco", "chat", "web"]),
                     "kind": rnd.choice(["image_text", "conversation", "text"]),
                     "mode": rnd.choice([None, "think", "no_think"]), "scores": scores})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("kind", pa.string()), ("mode", pa.string()),
        ("scores", pa.map_(pa.string(), pa.float64()))]))
    plan_entries = [
        {"name": "captions", "selector": {"source": ["laion", "coco"], "kind": ["image_text"],
                                          "min_scores": {"clip": 0.3}}},
        {"name": "think", "selector": {"kind": ["conversation"], "mode": ["think"]}},
        {"name": "prose", "selector": {"source": ["web"], "kind": ["text"], "min_scores": {"quality": 0.5}}},
    ]
    got = np.array([entry_of(r, plan_entries) or "" for r in rows])
    for e in plan_entries:
        want = entry_indices(table, Entry.from_selector(e["name"], e["selector"]))
        assert len(want) > 10 and np.array_equal(np.flatnonzero(got == e["name"]), want), e["name"]
    assert (got == "").sum() > 100  # the rest belong to no entry
    assert entry_of(rows[0], [{"name": "all", "selector": {}}]) == "all"  # no conditions: everything


def test_report_compares_plan_entries_not_sources(tmp_path):
    """The papercut: a planner plan's entries ('captions') never match source names ('laion'), so the
    report said 'captions planned 37, seen 0'; it now compares the loader's per-entry counts."""
    from types import SimpleNamespace

    from reelforge.training.report import OUTSIDE, write_report

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens": 10, "seconds": 1}) + "\n")
    plan = {"version": 1, "stages": [{"name": "s1", "entries": [{"name": "captions", "samples": 37},
                                                                 {"name": "chat", "samples": 13}]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = SimpleNamespace(name="s1", objective="lm",
                          report={"plan": str(tmp_path / "plan.json"), "plan_stage": None, "targets": None})
    rep = write_report(str(out), cfg, {"laion": 30, "coco": 7, "sharegpt": 12}, {"mixed": 49},
                       {"captions": 37, "chat": 11, OUTSIDE: 1})
    assert rep["plan_comparison_by"] == "entry" and rep["samples_outside_plan"] == 1
    assert rep["plan_comparison"]["captions"] == {"seen": 37, "planned": 37.0, "seen_share": 37 / 48,
                                                  "planned_share": 37 / 50}
    assert rep["plan_comparison"]["chat"]["seen"] == 11 and set(rep["plan_comparison"]) == {"captions", "chat"}
    assert rep["samples_per_source"] == {"coco": 7, "laion": 30, "sharegpt": 12}
