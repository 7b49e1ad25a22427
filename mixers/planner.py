"""The planner: token targets and weights -> per-entry sample counts, from the run's statistics.

Only the per-sample table (`RUN/samples/`, a few columns of it) is read, never the shards.
For each stage:

1. every entry's share is its weight (normalised), or its size when no weights are given,
   raised to 1/temperature when a temperature is set;
2. desired units (tokens, or samples) = target x share; an entry whose desired units exceed
   `max_epochs` x its size is capped there, and the stage's `policy` says what happens to the
   others: `fill` (the default) gives the shortfall to the uncapped entries in proportion to
   their shares (water-filling; if every entry is capped the stage comes short, and the plan
   says so); `keep_ratios` shrinks the whole stage by the factor that brings the most
   constrained entry to its cap, so every entry keeps its asked share;
3. the desired units become whole epochs (every sample of the entry k times) plus a
   remainder drawn from a seeded permutation of the entry's samples (sorted by id first, so
   the choice never depends on file order): the longest prefix that fits, topped up greedily
   with later samples that still fit, or one sample more when that lands closer. The emitter
   repeats exactly this choice from the plan's seed;
4. every entry's achieved share (its units over the stage's) is set against its asked share:
   one further than the stage's `tolerance` is a sentence in the stage's `drift`, and
   `check_drift` (what `reelforge plan` calls) refuses the plan unless drift is allowed.

Before any of this, every name a selector gives (source, kind, mode, and the score names of
`min_scores`) must be one the run's samples table holds: a typo is an error that offers the
closest names ("did you mean ..."), never an entry that silently gets nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import zlib
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reelforge.curation import storage
from reelforge.curation.errors import RecipeError
from reelforge.mixers.spec import SELECTORS, Entry, Mixture, Stage
from reelforge.mixers.stats import SAMPLES_DIR, read_sample_stats

PLAN_VERSION = 1
TOLERANCE = 0.005  # the plan warns when an entry lands further than this from its desired units
PLAN_COLUMNS = ["id", "source", "kind", "mode", "tokens", "scores"]  # the selectors' columns


def load_stats(run_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The run's per-sample table sorted by id (the order every selection starts from)."""
    try:
        table = read_sample_stats(run_dir, columns)
    except storage.StorageError as e:
        raise RecipeError(str(e)) from None
    except FileNotFoundError:
        raise RecipeError(f"no per-sample statistics under {storage.redact(storage.join(run_dir, SAMPLES_DIR))}: "
                          "pass --stats "
                          "the output folder of a finished `reelforge run` (runs made before the table existed "
                          "must be run again).") from None
    return table.take(pc.sort_indices(table, [("id", "ascending")]))


def entry_indices(table: pa.Table, e: Entry) -> np.ndarray:
    """Row numbers (in id order) of the samples an entry selects."""
    mask = None
    conds = []
    for col in ("source", "kind", "mode"):
        vals = getattr(e, col)
        if vals:
            conds.append(pc.is_in(table[col], value_set=pa.array(vals, pa.string())))
    for name, lowest in sorted(e.min_scores.items()):  # any score by name; a sample without it is out
        conds.append(pc.greater_equal(pc.map_lookup(table["scores"], pa.scalar(name), "first"), lowest))
    if not conds:
        return np.arange(table.num_rows, dtype=np.int64)
    for c in conds:
        mask = c if mask is None else pc.and_(mask, c)
    return np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False))


def entry_sizes(table: pa.Table, idx: np.ndarray, unit: str, where: str, run_dir: str) -> np.ndarray:
    if unit == "samples":
        return np.ones(len(idx), dtype=np.int64)
    tok = table["tokens"].take(pa.array(idx))
    nulls = tok.null_count
    if nulls:
        raise RecipeError(f"{where}: {nulls} of its samples in {run_dir} have no token counts: add the `tokens` step "
                          "to the run's recipe, or plan this stage with `target_samples`.")
    return tok.to_numpy(zero_copy_only=False).astype(np.int64)


def entry_rng(seed: int, stage: str, entry: str) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(stage.encode()), zlib.crc32(entry.encode())])


def choose_remainder(sizes: np.ndarray, want: float, allow_over: bool = True) -> np.ndarray:
    """Positions (into `sizes`, a permuted entry) whose sizes sum close to `want`, deterministic."""
    n = len(sizes)
    if want <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    cum = np.cumsum(sizes)
    k = int(np.searchsorted(cum, want, side="right"))  # the first k fit (sum <= want)
    chosen = list(range(k))
    gap = want - (cum[k - 1] if k else 0)
    taken = np.zeros(n, dtype=bool)
    taken[:k] = True
    for _ in range(256):  # top up with later samples that still fit
        if gap <= 0 or gap < want * TOLERANCE / 10:
            break
        fits = np.flatnonzero(~taken & (sizes <= gap))
        if len(fits) == 0:
            break
        j = int(fits[0])
        taken[j] = True
        chosen.append(j)
        gap -= sizes[j]
    if allow_over and gap > 0:
        over = np.flatnonzero(~taken)
        if len(over):
            j = int(over[np.argmin(sizes[over])])  # the smallest sample left, if it lands closer
            if sizes[j] - gap < gap:
                chosen.append(j)
    return np.array(sorted(chosen), dtype=np.int64)


def select(table: pa.Table, stage: Stage, e: Entry, full_epochs: int, extra: float, seed: int,
           run_dir: str, allow_over: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, repeat numbers) an entry contributes: `full_epochs` copies of all + the remainder."""
    idx = entry_indices(table, e)
    sizes = entry_sizes(table, idx, stage.unit, f"stages.{stage.name}.{e.name}", run_dir)
    perm = entry_rng(seed, stage.name, e.name).permutation(len(idx))
    rem = perm[choose_remainder(sizes[perm], extra, allow_over)]
    rows = np.concatenate([np.tile(idx, full_epochs), idx[np.sort(rem)]])
    reps = np.concatenate([np.repeat(np.arange(full_epochs, dtype=np.int32), len(idx)),
                           np.full(len(rem), full_epochs, dtype=np.int32)])
    return rows, reps


def _fmt(n: float) -> str:
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}"
    return f"{n:.0f}"


def _distinct(table: pa.Table, col: str) -> list[str]:
    if col == "scores":
        t = table["scores"].type  # a map is a list of (key, value) structs; MapArray.keys ignores slicing
        as_list = table["scores"].cast(pa.list_(pa.struct([t.key_field, t.item_field])))
        keys = pc.struct_field(pc.list_flatten(as_list), [0])
        return sorted(v for v in pc.unique(keys).to_pylist() if v is not None)
    return sorted(v for v in pc.unique(table[col]).to_pylist() if v is not None)


def check_selectors(stages: list[Stage], table: pa.Table, run_dir: str) -> None:
    """Every name an entry selects by must be one the run has: else one sentence per unknown
    name, with the closest names the run does have."""
    known = {col: _distinct(table, col) for col in (*SELECTORS, "scores")}
    problems = []
    for stage in stages:
        for e in stage.entries:
            asked = [(col, getattr(e, col)) for col in SELECTORS] + [("scores", sorted(e.min_scores))]
            for col, names in asked:
                have = set(known[col])
                for name in names:
                    if name in have:
                        continue
                    what = "a score named" if col == "scores" else f"{col}"
                    # modes are a closed set the spec already checked: a valid mode the run lacks is no typo
                    close = [] if col == "mode" else difflib.get_close_matches(name, known[col], n=3, cutoff=0.6)
                    if close:
                        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
                    elif known[col]:
                        shown = known[col][:12]
                        hint = ("the run has " + ", ".join(repr(c) for c in shown)
                                + (f" and {len(known[col]) - len(shown)} more" if len(known[col]) > len(shown)
                                   else "") + ".")
                    else:
                        hint = f"the run's samples have no {'scores' if col == 'scores' else col} at all."
                    field = "min_scores" if col == "scores" else col
                    problems.append(f"mixture entry `stages.{stage.name}.{e.name}` selects {what} {name!r} "
                                    f"(its `{field}`), which no sample of the run at {run_dir} has: {hint}")
    if problems:
        raise RecipeError("\n".join(problems))


def _desired_fill(stage: Stage, share: np.ndarray, caps: np.ndarray, live: list[int]) -> tuple[np.ndarray, set, list]:
    """Water-filling: capped entries' shortfall goes to the uncapped ones (policy `fill`)."""
    desired = np.zeros(len(share))
    free = list(live)
    fixed: set[int] = set()
    while free:
        remaining = stage.target - sum(desired[j] for j in fixed)
        wsum = share[free].sum()  # empty entries' shares go to the others through this sum
        for j in free:
            desired[j] = remaining * share[j] / wsum
        over = [j for j in free if desired[j] > caps[j]]
        if not over:
            break
        for j in over:
            desired[j] = caps[j]
            fixed.add(j)
            free.remove(j)
    return desired, fixed, free


def _desired_keep_ratios(stage: Stage, share: np.ndarray, caps: np.ndarray,
                         live: list[int]) -> tuple[np.ndarray, set, list]:
    """The stage shrinks by the factor that brings its most constrained entry to its cap, so every
    entry keeps its share (policy `keep_ratios`); the binding entries are planned at their caps exactly."""
    desired = np.zeros(len(share))
    if not live:
        return desired, set(), []
    wsum = share[live].sum()
    want = {j: stage.target * share[j] / wsum for j in live}
    factor = min(1.0, min(caps[j] / want[j] for j in live))
    fixed = {j for j in live if factor < 1.0 and caps[j] <= want[j] * factor * (1 + 1e-9)}
    for j in live:
        desired[j] = caps[j] if j in fixed else want[j] * factor
    return desired, fixed, [j for j in live if j not in fixed]


def plan_stage(stage: Stage, table: pa.Table, seed: int, run_dir: str) -> dict:
    unit = stage.unit
    avail: list[tuple[int, int]] = []
    for e in stage.entries:
        idx = entry_indices(table, e)
        sizes = entry_sizes(table, idx, unit, f"mixture entry `stages.{stage.name}.{e.name}`", run_dir)
        avail.append((len(idx), int(sizes.sum())))
    owner = np.full(table.num_rows, -1, dtype=np.int64)
    for j, e in enumerate(stage.entries):
        idx = entry_indices(table, e)
        clash = owner[idx]
        if (clash >= 0).any():
            other = stage.entries[int(clash[clash >= 0][0])].name
            raise RecipeError(f"mixture entries `stages.{stage.name}.{other}` and `stages.{stage.name}.{e.name}` "
                              f"select {int((clash >= 0).sum())} of the same samples: make their source/kind/mode "
                              "selectors disjoint.")
        owner[idx] = j
    warnings: list[str] = []
    if all(e.weight is not None for e in stage.entries):
        base = np.array([e.weight for e in stage.entries], dtype=float)
    else:
        base = np.array([a[1] for a in avail], dtype=float)
    if stage.temperature:
        base = np.where(base > 0, base ** (1.0 / stage.temperature), 0.0)
    if base.sum() <= 0:
        raise RecipeError(f"mixture stage `{stage.name}` selects no samples of the run at {run_dir}: check the "
                          "entries' source, kind and mode names against the run's report.")
    share = base / base.sum()
    caps = np.array([(e.max_epochs or stage.max_epochs) * a[1] for e, a in zip(stage.entries, avail)], dtype=float)
    live = [j for j in range(len(share)) if share[j] > 0 and avail[j][0] > 0]
    how = _desired_keep_ratios if stage.policy == "keep_ratios" else _desired_fill
    desired, fixed, free = how(stage, share, caps, live)
    for j, e in enumerate(stage.entries):
        if avail[j][0] == 0:
            warnings.append(f"{stage.name}/{e.name}: the run has no samples for this entry "
                            f"(selector {e.selector()}); it gets nothing and its share went to the others.")
        elif j in fixed and stage.policy == "keep_ratios":
            asked = stage.target * share[j]
            cap = e.max_epochs or stage.max_epochs
            warnings.append(f"{stage.name}/{e.name}: weight {share[j]:.3f} asks for {_fmt(asked)} {unit} = "
                            f"{asked / avail[j][1]:.2f} epochs, above its cap of {cap:g}; planned {cap:g} epochs "
                            f"({_fmt(caps[j])} {unit}) and, by policy keep_ratios, shrank the whole stage to "
                            f"{100 * desired.sum() / stage.target:.1f}% of its target so every entry keeps its share.")
        elif j in fixed:
            asked = stage.target * share[j]
            cap = e.max_epochs or stage.max_epochs
            warnings.append(f"{stage.name}/{e.name}: weight {share[j]:.3f} asks for {_fmt(asked)} {unit} = "
                            f"{asked / avail[j][1]:.2f} epochs, above its cap of {cap:g}; planned {cap:g} epochs "
                            f"({_fmt(caps[j])} {unit}) and " + (
                                f"gave the other {_fmt(asked - caps[j])} to the uncapped entries in proportion "
                                "to their weights (policy fill)." if free else
                                f"no uncapped entry was left to take the other {_fmt(asked - caps[j])}."))
    if stage.policy == "keep_ratios" and fixed:
        warnings.append(f"{stage.name}: policy keep_ratios planned {_fmt(desired.sum())} of the target "
                        f"{_fmt(stage.target)} {unit} ({100 * desired.sum() / stage.target:.1f}%): raise max_epochs "
                        "or add data to reach it, or set `policy: fill` to give the shortfall to the uncapped entries.")
    elif not free and desired.sum() < stage.target * (1 - TOLERANCE):  # every entry capped or empty
        warnings.append(f"{stage.name}: the target of {_fmt(stage.target)} {unit} cannot be met: every entry is at "
                        f"its epoch cap, so the stage has {_fmt(desired.sum())} {unit} "
                        f"({100 * desired.sum() / stage.target:.1f}% of target). Raise max_epochs or add data.")
    entries_out = []
    for j, e in enumerate(stage.entries):
        n, size = avail[j]
        full = int(desired[j] // size) if size else 0
        extra = desired[j] - full * size
        rows, reps = select(table, stage, e, full, extra, seed, run_dir, allow_over=j not in fixed)
        tok = table["tokens"].take(pa.array(rows)).to_numpy(zero_copy_only=False)
        tokens = int(np.nansum(tok.astype(float))) if len(rows) else 0
        units = len(rows) if unit == "samples" else tokens
        dev = (units - desired[j]) / desired[j] if desired[j] else 0.0
        if desired[j] and abs(dev) > TOLERANCE:
            warnings.append(f"{stage.name}/{e.name}: its samples are too coarse to land within "
                            f"{100 * TOLERANCE:g}% of {_fmt(desired[j])} {unit}; planned {_fmt(units)} "
                            f"({100 * dev:+.2f}%).")
        entries_out.append({
            "name": e.name, "selector": e.selector(), "weight": None if e.weight is None else e.weight,
            "share": round(float(share[j]), 6), "max_epochs": e.max_epochs or stage.max_epochs,
            "available_samples": n, "available_units": size,
            "desired_units": float(desired[j]), "remainder_units": float(extra), "capped": j in fixed,
            "full_epochs": full, "extra_samples": int(len(rows) - full * n), "samples": int(len(rows)),
            "tokens": tokens, "units": int(units), "epochs": round(units / size, 6) if size else 0.0,
            "max_repeats": int(reps.max()) + 1 if len(reps) else 0,
            "selection_sha256": selection_digest(table, rows, reps),
        })
    planned = sum(x["units"] for x in entries_out)
    drift = []
    for j, x in enumerate(entries_out):
        achieved = x["units"] / planned if planned else 0.0
        x["asked_share"] = x["share"]
        x["achieved_share"] = round(achieved, 6)
        off = achieved - float(share[j])
        if abs(off) > stage.tolerance:
            drift.append(f"{stage.name}/{x['name']}: asked {100 * share[j]:.2f}% of the stage, achieved "
                         f"{100 * achieved:.2f}% ({100 * off:+.2f} points, tolerance {100 * stage.tolerance:g}) "
                         f"under policy {stage.policy}, because {_drift_cause(stage, j, x, fixed)}.")
    return {"name": stage.name, "unit": unit, "target": stage.target, "planned": planned,
            "planned_tokens": sum(x["tokens"] for x in entries_out),
            "planned_samples": sum(x["samples"] for x in entries_out),
            "max_epochs": stage.max_epochs, "temperature": stage.temperature, "shards": stage.shards,
            "policy": stage.policy, "tolerance": stage.tolerance, "note": stage.note, "entries": entries_out,
            "warnings": warnings, "drift": drift}


def _drift_cause(stage: Stage, j: int, x: dict, fixed: set) -> str:
    if x["available_samples"] == 0:
        return "the run has no samples for its selector"
    if j in fixed:
        return (f"it is capped at {x['max_epochs']:g} epochs of its {_fmt(x['available_units'])} {stage.unit}"
                + ("; `policy: keep_ratios` would shrink the stage instead" if stage.policy == "fill" else ""))
    if fixed and stage.policy == "fill":
        return "it took part of the capped entries' shortfall; `policy: keep_ratios` would shrink the stage instead"
    return "its samples are too coarse to land closer (or another entry's are)"


def plan_drift(plan: dict) -> list[str]:
    """Every sentence of every stage's drift: entries whose achieved share is off their asked share."""
    return [d for st in plan["stages"] for d in st.get("drift", [])]


def check_drift(plan: dict, allow_drift: bool = False) -> list[str]:
    """Records `allow_drift` in the plan; refuses a drifting plan unless drift is allowed."""
    drift = plan_drift(plan)
    plan["allow_drift"] = bool(allow_drift)
    if drift and not allow_drift:
        raise RecipeError(f"the plan misses the mixture's weights by more than the tolerance in {len(drift)} "
                          "entr" + ("y" if len(drift) == 1 else "ies") + " (set `policy: keep_ratios` or "
                          "`tolerance` on the stage, or pass --allow-drift to accept it):\n" + "\n".join(drift))
    return drift


def selection_digest(table: pa.Table, rows: np.ndarray, reps: np.ndarray) -> str:
    """sha256 of the chosen (id, repeat) pairs: the emitter refuses a run whose table changed."""
    h = hashlib.sha256()
    ids = table["id"].take(pa.array(rows)).to_pylist() if len(rows) else []
    for i, r in zip(ids, reps.tolist()):
        h.update(f"{i}:{r}\n".encode())
    return h.hexdigest()


def plan_mixture(mix: Mixture, run_dir: str) -> dict:
    """The plan of a mixture over a run's statistics; `run_dir` is a folder or a URL (s3://bucket/run),
    recorded as the plan's `stats` (a URL without any `user:password@`)."""
    run_dir = storage.redact(storage.normalize(run_dir)) if storage.is_url(run_dir) else os.path.abspath(run_dir)
    table = load_stats(run_dir, PLAN_COLUMNS)
    check_selectors(mix.stages, table, run_dir)
    stages = [plan_stage(s, table, mix.seed, run_dir) for s in mix.stages]
    return {"version": PLAN_VERSION, "mixture": mix.name, "mixture_path": mix.path, "seed": mix.seed,
            "stats": run_dir, "stats_samples": table.num_rows, "stages": stages}


def format_plan(plan: dict) -> str:
    lines = [f"plan of mixture {plan['mixture']!r} over {plan['stats']} ({plan['stats_samples']} samples), "
             f"seed {plan['seed']}"]
    for st in plan["stages"]:
        unit = st["unit"]
        pct = 100 * st["planned"] / st["target"] if st["target"] else 0.0
        lines.append("")
        lines.append(f"stage {st['name']}: target {_fmt(st['target'])} {unit}, planned {_fmt(st['planned'])} "
                     f"({pct:.2f}%), {st['planned_samples']} samples, {_fmt(st['planned_tokens'])} tokens, "
                     f"cap {st['max_epochs']:g} epochs" + (f", temperature {st['temperature']:g}"
                                                           if st["temperature"] else "")
                     + f", policy {st.get('policy', 'fill')}, "
                       f"tolerance {100 * st.get('tolerance', TOLERANCE):g} points")
        lines.append(f"  {'entry':<20} {'asked':>7} {'achieved':>8} {'samples':>10} {'tokens':>10} "
                     f"{'epochs':>7} {'cap':>5}  available")
        for e in st["entries"]:
            of = e.get("achieved_share", e["units"] / st["planned"] if st["planned"] else 0.0)
            flag = " capped" if e["capped"] else ""
            lines.append(f"  {e['name']:<20} {100 * e['share']:>6.2f}% {100 * of:>7.2f}% {e['samples']:>10} "
                         f"{_fmt(e['tokens']):>10} {e['epochs']:>7.3f} {e['max_epochs']:>5g}  "
                         f"{e['available_samples']} samples / {_fmt(e['available_units'])} {unit}{flag}")
        for w in st["warnings"]:
            lines.append(f"  warning: {w}")
        for d in st.get("drift", []):
            lines.append(f"  drift: {d}")
    return "\n".join(lines)


def write_plan(plan: dict, path: str) -> str:
    """Writes PLAN.json and PLAN.png beside it; returns the plot's path. `path` may be a URL: each
    file is then published as one object (temporary name, then final)."""
    if storage.is_url(path):
        import tempfile

        data = json.dumps(plan, indent=1, sort_keys=True).encode()
        png = os.path.splitext(path)[0] + ".png"
        storage.write_bytes(path, data)
        with tempfile.TemporaryDirectory(prefix="reelforge-plan-") as tmp:
            local = os.path.join(tmp, "plan.png")
            plot_plan(plan, local)
            storage.put_file(local, png)
        return png
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(plan, f, indent=1, sort_keys=True)
    png = os.path.splitext(path)[0] + ".png"
    plot_plan(plan, png)
    return png


def plot_plan(plan: dict, png: str) -> None:
    """One panel per stage: planned units per entry, the desired units before caps, epochs on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = plan["stages"]
    heights = [max(1.6, 0.45 * len(s["entries"]) + 0.9) for s in stages]
    fig, axes = plt.subplots(len(stages), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, st in zip(axes[:, 0], stages):
        names = [e["name"] for e in st["entries"]]
        planned = [e["units"] for e in st["entries"]]
        asked = [st["target"] * e["share"] for e in st["entries"]]
        y = np.arange(len(names))
        ax.barh(y, planned, color=["tab:orange" if e["capped"] else "tab:blue" for e in st["entries"]])
        ax.scatter(asked, y, marker="|", s=200, color="black", label="weight x target", zorder=3)
        for yi, e in zip(y, st["entries"]):
            ax.text(e["units"], yi, f"  {e['epochs']:.2f} ep", va="center", fontsize=8)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel(st["unit"])
        ax.set_title(f"{st['name']}: {_fmt(st['planned'])} of {_fmt(st['target'])} {st['unit']} "
                     "(orange: capped by max_epochs)", fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


Log = Callable[[str], None]
