"""The training report: loss curve (PNG), tokens/s, and samples seen per source against the plan;
for GRPO also the mean reward per step (report.json `reward` and `reward.png`).

The plan is the mixture planner's JSON (`report.plan`) or a `report.targets` mapping; any JSON
whose `sources` (or top level) maps names to numbers, or to objects with `samples`, is read.
"""

from __future__ import annotations

import json
import os
from typing import Any


def _plan_targets(cfg) -> dict[str, float] | None:
    rep = cfg.report
    if rep.get("targets"):
        return {k: float(v) for k, v in rep["targets"].items()}
    if not rep.get("plan"):
        return None
    with open(rep["plan"]) as f:
        plan = json.load(f)
    if isinstance(plan, dict) and isinstance(plan.get("stages"), list):  # the mixture planner's plan JSON
        stages = plan["stages"]
        want = rep.get("plan_stage") or cfg.name
        st = next((x for x in stages if x.get("name") == want), stages[0] if len(stages) == 1 else None)
        if st is None:
            from reelforge.curation.errors import RecipeError

            raise RecipeError(f"stage field `report.plan_stage` must name one of the plan's stages "
                              f"{[x.get('name') for x in stages]}, got {want!r}.")
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


def write_report(out_dir: str, cfg, seen: dict[str, int], seen_sets: dict[str, int] | None = None) -> dict:
    """Writes report.json and loss.png under out_dir; returns the report.

    `seen` counts samples by their provenance source, `seen_sets` by the stage's shard-set names;
    the plan is compared with whichever shares more names with it (plan entries usually name sets).
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
    rewarded = [r for r in rows if isinstance(r.get("reward"), (int, float))]
    if rewarded:
        report["reward"] = reward_summary(rewarded)
    targets = _plan_targets(cfg)
    if targets:
        if seen_sets and len(set(seen_sets) & set(targets)) > len(set(seen) & set(targets)):
            seen = seen_sets
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
