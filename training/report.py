"""The training report: loss curve (PNG), tokens/s, and samples seen per source against the plan;
for GRPO also the mean reward per step (report.json `reward` and `reward.png`).

The plan is the mixture planner's JSON (`report.plan`) or a `report.targets` mapping; any JSON
whose `sources` (or top level) maps names to numbers, or to objects with `samples`, is read.
"""

from __future__ import annotations

import json
import os
from typing import Any


def _plan_stage(cfg) -> dict | None:
    """The mixture planner's stage this training stage runs (`report.plan` + `report.plan_stage`, else
    the stage of the same name, else the plan's only stage); None when the plan is another JSON."""
    rep = cfg.report
    if rep.get("targets") or not rep.get("plan"):
        return None
    with open(rep["plan"]) as f:
        plan = json.load(f)
    if not (isinstance(plan, dict) and isinstance(plan.get("stages"), list)):
        return None
    stages = plan["stages"]
    want = rep.get("plan_stage") or cfg.name
    st = next((x for x in stages if x.get("name") == want), stages[0] if len(stages) == 1 else None)
    if st is None:
        from reelforge.curation.errors import RecipeError

        raise RecipeError(f"stage field `report.plan_stage` must name one of the plan's stages "
                          f"{[x.get('name') for x in stages]}, got {want!r}.")
    return st


OUTSIDE = "(outside the plan)"  # seen_entries' key for samples no plan entry selects


def plan_entries(cfg) -> list[dict] | None:
    """The plan stage's entries as [{name, selector}] (what the loader attributes samples by), or None."""
    st = _plan_stage(cfg)
    if st is None:
        return None
    return [{"name": e["name"], "selector": dict(e.get("selector") or {})} for e in st.get("entries", [])]


def entry_of(sample: dict, entries: list[dict] | None) -> str | None:
    """The plan entry a sample (its row view: source, kind, mode, scores) was drawn for: the first whose
    selector it meets, by the planner's rule (mixers/planner.py `entry_indices`: each listed source,
    kind, mode must contain the sample's; each `min_scores` score must be present and >= the bound;
    an entry without conditions takes everything). The planner refuses entries that overlap, so at
    most one matches a sample of the plan's run."""
    for e in entries or []:
        sel = e["selector"]
        if any(sel.get(col) and sample.get(col) not in sel[col] for col in ("source", "kind", "mode")):
            continue
        scores = sample.get("scores") or {}
        mins = dict(sel.get("min_scores") or {})
        if any(not isinstance(scores.get(k), (int, float)) or scores[k] < v for k, v in mins.items()):
            continue
        return e["name"]
    return None


def _plan_targets(cfg) -> dict[str, float] | None:
    rep = cfg.report
    if rep.get("targets"):
        return {k: float(v) for k, v in rep["targets"].items()}
    if not rep.get("plan"):
        return None
    with open(rep["plan"]) as f:
        plan = json.load(f)
    if isinstance(plan, dict) and isinstance(plan.get("stages"), list):  # the mixture planner's plan JSON
        st = _plan_stage(cfg)
        return {e["name"]: float(e["samples"]) for e in st.get("entries", [])}
    node: Any = plan.get("sources", plan) if isinstance(plan, dict) else plan
    if isinstance(node, list):
        node = {s.get("name") or s.get("source"): s for s in node}
    out: dict[str, float] = {}
    for k, v in node.items():
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, dict):
            for key in ("samples", "target_samples", "count"):
                if isinstance(v.get(key), (int, float)):
                    out[k] = float(v[key])
                    break
    return out or None


def _curve(out_dir: str, cfg, rows: list[dict], key: str, label: str) -> str:
    """`rows`' `key` against the step, saved as OUT/<key>.png; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=cfg.name)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"{cfg.name} ({cfg.objective})")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, f"{key}.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def reward_summary(rows: list[dict], k: int | None = None) -> dict:
    """GRPO's mean reward per step (`per_step`, in step order), the mean of the first and of the last
    `k` steps (default: a fifth of the run, at least 1) and their difference `rise`."""
    per = [float(r["reward"]) for r in rows]
    k = k or max(1, len(per) // 5)
    first, last = sum(per[:k]) / len(per[:k]), sum(per[-k:]) / len(per[-k:])
    return {"per_step": per, "window": k, "first": first, "last": last, "rise": last - first}


def write_report(out_dir: str, cfg, seen: dict[str, int], seen_sets: dict[str, int] | None = None,
                 seen_entries: dict[str, int] | None = None) -> dict:
    """Writes report.json and loss.png under out_dir; returns the report.

    `seen` counts samples by their provenance source, `seen_sets` by the stage's shard-set names,
    `seen_entries` by the plan entry the loader attributed them to (`entry_of`, under a planner plan).
    The plan is compared with whichever of the three shares the most names with it, entries first on
    a tie (`plan_comparison_by`): under a planner plan that is its entries, whatever the sets are named.
    """
    rows = []
    p = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(p):
        with open(p) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    total_tokens = sum(r.get("tokens", 0) for r in rows)
    total_s = sum(r.get("seconds", 0) for r in rows)
    report: dict[str, Any] = {
        "stage": cfg.name, "objective": cfg.objective, "steps": len(rows),
        "loss_first": rows[0]["loss"] if rows else None, "loss_last": rows[-1]["loss"] if rows else None,
        "tokens": total_tokens, "tokens_per_s": total_tokens / total_s if total_s else None,
        "tokens_per_s_median": sorted(tps)[len(tps) // 2] if tps else None,
        "samples_per_source": dict(sorted(seen.items())),
    }
    if seen_sets:
        report["samples_per_set"] = dict(sorted(seen_sets.items()))
    if seen_entries:
        report["samples_per_entry"] = dict(sorted(seen_entries.items()))
    rewarded = [r for r in rows if isinstance(r.get("reward"), (int, float))]
    if rewarded:
        report["reward"] = reward_summary(rewarded)
    targets = _plan_targets(cfg)
    if targets:
        # the counts that share the most names with the plan; on a tie entries, then sets, then sources
        by_entry = {k: v for k, v in (seen_entries or {}).items() if k != OUTSIDE}
        cands = [("entry", by_entry), ("set", seen_sets or {}), ("source", seen)]
        by, seen = max(cands, key=lambda c: (len(set(c[1]) & set(targets)), -cands.index(c)))
        if by == "entry" and (seen_entries or {}).get(OUTSIDE):
            report["samples_outside_plan"] = seen_entries[OUTSIDE]
        report["plan_comparison_by"] = by
        total_seen, total_plan = sum(seen.values()) or 1, sum(targets.values()) or 1
        report["plan_comparison"] = {
            k: {"seen": seen.get(k, 0), "planned": targets.get(k, 0.0),
                "seen_share": seen.get(k, 0) / total_seen, "planned_share": targets.get(k, 0.0) / total_plan}
            for k in sorted(set(seen) | set(targets))}
    if rows:
        report["loss_png"] = _curve(out_dir, cfg, rows, "loss", "loss")
        if rewarded:
            report["reward_png"] = _curve(out_dir, cfg, rewarded, "reward", "mean reward")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    return report
