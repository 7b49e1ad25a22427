"""The run report: per step, samples and bytes in and out and why the rest left; a funnel plot."""

from __future__ import annotations

import json
import os

import numpy as np
from pyspark.sql import functions as F


def ledger_summary(ledger) -> dict:
    """What the run's accounting and its report need from the ledger, in two small jobs: the
    rows by (source, fate, step, reason) with their derived ones, and the distinct ids."""
    groups = [r.asDict() for r in ledger.groupBy("source", "fate", "step", "reason")
              .agg(F.count(F.lit(1)).alias("n"), F.count("parent_id").alias("derived")).collect()]
    ids = ledger.select(F.countDistinct("id").alias("ids")).collect()[0]["ids"]
    return {"groups": groups, "ids": ids, "derived": sum(g["derived"] for g in groups),
            "kept": sum(g["n"] for g in groups if g["fate"] == "kept"),
            "dropped": sum(g["n"] for g in groups if g["fate"] == "dropped")}


def _token_sums():
    """Media bytes and text, visual and total tokens, summed: the aggregates of the report's passes."""
    media_bytes = F.aggregate(F.coalesce(F.col("media"), F.array()), F.lit(0).cast("long"),
                              lambda acc, m: acc + F.coalesce(m["length"], F.lit(0).cast("long")))
    return (F.sum(media_bytes).alias("b"), F.sum("text_tokens").alias("tt"), F.sum("visual_tokens").alias("vt"),
            F.sum("tokens").alias("t"))


def build_report(spark, recipe, final, ledger, summary: dict, stats: list[dict], inputs: int,
                 timings: dict) -> dict:
    """The run report from the ledger summary (`ledger_summary`) and one pass over the final rows
    (bytes and tokens by the step that dropped them and by source)."""
    derived = summary["derived"]
    steps = ["ingest"] + [s.name for s in recipe.steps] + ["write"]
    drops: dict[str, dict[str, int]] = {s: {} for s in steps}
    per_source: dict[str, dict] = {}
    for g in summary["groups"]:
        d = per_source.setdefault(g["source"], {"inputs": 0, "kept": 0, "dropped": 0, "reasons": {}})
        d[g["fate"]] += g["n"]
        d["inputs"] += g["n"]
        if g["fate"] == "dropped":
            step_drops = drops.setdefault(g["step"], {})
            step_drops[g["reason"]] = step_drops.get(g["reason"], 0) + g["n"]
            d["reasons"][g["reason"]] = d["reasons"].get(g["reason"], 0) + g["n"]
    by_step: dict[str, dict] = {}
    live_by_source: dict[str, dict] = {}
    for r in final.groupBy(F.coalesce("drop_step", F.lit("")).alias("s"), "source").agg(*_token_sums()).collect():
        acc = by_step.setdefault(r["s"], {"b": 0, "t": 0})
        acc["b"] += r["b"] or 0
        acc["t"] += r["t"] or 0
        if r["s"] == "":
            live_by_source[r["source"]] = {"text_tokens": r["tt"] or 0, "visual_tokens": r["vt"] or 0,
                                           "tokens": r["t"] or 0}
    if drops.get("write"):  # rows the shard writer could not write: live above, not kept
        lost = ledger.filter((F.col("fate") == "dropped") & (F.col("step") == "write")).select("id")
        for r in final.join(lost, "id").groupBy("source").agg(*_token_sums()).collect():
            for k, v in (("text_tokens", r["tt"]), ("visual_tokens", r["vt"]), ("tokens", r["t"])):
                live_by_source[r["source"]][k] -= v or 0
    bytes_by_step = {k: v["b"] for k, v in by_step.items()}
    tokens_by_step = {k: v["t"] for k, v in by_step.items()}
    survived_bytes = bytes_by_step.get("", 0)
    born: dict[str, int] = {}
    if derived:
        # derived samples (video clips) enter at the step that made them: the step that dropped their parent
        parents = final.filter(F.col("parent_id").isNotNull()).groupBy("parent_id").count()
        for r in (final.select(F.col("id").alias("parent_id"), "drop_step").join(parents, "parent_id")
                  .groupBy("drop_step").agg(F.sum("count").alias("n")).collect()):
            born[r["drop_step"]] = r["n"]
    rows = []
    n_in = inputs
    b_in = sum(bytes_by_step.values())
    t_in = sum(tokens_by_step.values())
    for s in steps:
        dropped = sum(drops.get(s, {}).values())
        b_drop = bytes_by_step.get(s, 0) if s != "write" else 0
        row = {"step": s, "in": n_in, "out": n_in - dropped + born.get(s, 0), "dropped": dropped,
               "derived": born.get(s, 0),
               "reasons": dict(sorted(drops.get(s, {}).items(), key=lambda kv: -kv[1])),
               "media_bytes_in": b_in, "media_bytes_out": b_in - b_drop,
               "tokens_in": t_in, "tokens_out": t_in - (tokens_by_step.get(s, 0) if s != "write" else 0),
               "seconds": round(timings.get(s, 0.0), 2)}
        rows.append(row)
        n_in = row["out"]
        b_in -= b_drop
        t_in = row["tokens_out"]
    rows[-1]["media_bytes_out"] = survived_bytes
    rows[-1]["shard_bytes"] = sum(s["bytes"] for s in stats)
    for name, d in per_source.items():
        d.update(live_by_source.get(name, {"text_tokens": 0, "visual_tokens": 0, "tokens": 0}))
        d["reasons"] = dict(sorted(d["reasons"].items(), key=lambda kv: (-kv[1], kv[0])))
    semantic = semantic_sections(recipe)
    leakage = semantic_sections(recipe, "leakage")
    return {**({"semantic": semantic} if semantic else {}), **({"leakage": leakage} if leakage else {}),
        "recipe": recipe.name, "master": spark.sparkContext.master,
        "inputs": inputs, "derived": derived, "kept": summary["kept"], "dropped": summary["dropped"],
        "balanced": inputs + derived == summary["kept"] + summary["dropped"],
        "shards": len(stats), "steps": rows,
        "tokens": {k: sum(d.get(k, 0) for d in per_source.values())
                   for k in ("text_tokens", "visual_tokens", "tokens")},
        "sources": dict(sorted(per_source.items())),
    }


def semantic_sections(recipe, name: str = "dedup_semantic") -> list[dict]:
    """The sections the recipe's `name` steps wrote under _work (`dedup_semantic`: its eps tables,
    `jobs.semantic`; `leakage`: reused or computed embeddings, counters, drops per set,
    `jobs.leakage`), in step order."""
    out = []
    for spec in recipe.steps:
        if spec.name != name:
            continue
        step = spec.build()
        try:
            with open(step.report_path(os.path.join(recipe.output, "_work"))) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue
    return out


def _semantic_markdown(sections: list[dict]) -> list[str]:
    lines = []
    for s in sections:
        src = f"kept by `{s['from_step']}`" if s.get("from_step") else "embedded by this step"
        lines += ["", f"## Semantic dedup (`{s['step']}`, {s['embedding']} embeddings)", "",
                  f"{s['embedded']:,} samples embedded ({src}; {s['not_embedded']:,} live samples had no "
                  f"{s['embedding']} to embed), k-means k={s['k']} ({s['clusters']} clusters, the largest "
                  f"{s['largest_cluster']:,}; {s['kmeans_s']} s), pairs with cosine > 1 - eps inside a cluster. "
                  f"The run used eps {s['eps']:g}; the other rows say what another eps would have done, "
                  "from the same pairs.", "",
                  "| eps | cosine > | pairs | drops | share of embedded |", "| ---: | ---: | ---: | ---: | ---: |"]
        for r in s["table"]:
            mark = "**" if r["eps"] == s["eps"] else ""
            share = r["drops"] / s["embedded"] if s["embedded"] else 0.0
            lines.append(f"| {mark}{r['eps']:g}{mark} | {r['min_cosine']:g} | {r['pairs']:,} | "
                         f"{mark}{r['drops']:,}{mark} | {share:.2%} |")
    return lines


def _leakage_markdown(sections: list[dict]) -> list[str]:
    lines = []
    for s in sections:
        drops = ", ".join(f"{k} {v:,}" for k, v in sorted(s.get("drops", {}).items())) or "none"
        lines += ["", f"## Leakage (`{s['step']}`, rule {s['rule']})", "",
                  f"{s.get('eval_items', 0):,} evaluation items indexed once; drops: {drops}; {s.get('seconds', 0)} s."]
        if s.get("embeddings") in ("reused", "computed"):
            lines.append(f"CLIP embeddings of the corpus **{s['embeddings']}** ({s.get('why', '')}): "
                         f"images {s.get('images_reused', 0):,} reused / {s.get('images_embedded', 0):,} embedded, "
                         f"texts {s.get('texts_reused', 0):,} reused / {s.get('texts_embedded', 0):,} embedded, "
                         f"{s.get('encoder_calls', 0):,} encoder calls.")
    return lines


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def plot_funnel(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    names = [s["step"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(steps) + 1.2))
    outs = [s["out"] for s in steps]
    drops = [s["dropped"] for s in steps]
    y = list(range(len(steps)))[::-1]
    ax.barh(y, outs, color="#3b7dd8", label="continues")
    ax.barh(y, drops, left=outs, color="#e8833a", label="dropped here")
    for yi, s in zip(y, steps):
        ax.text(s["in"], yi, f" {s['out']} / {s['in']}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    ax.set_xlabel("samples")
    ax.set_title(f"reelforge funnel: {report['recipe']}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, max(1, report["inputs"]) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _reused_markdown(report: dict) -> list[str]:
    """One line: which steps this run reused from `_work/` (their fingerprint matched)."""
    reused = report.get("reused")
    if reused is None:
        return []
    said = ", ".join(f"`{r}`" for r in reused) if reused else "none (every step ran)"
    return [f"Reused steps: {said}.", ""]


def render_markdown(report: dict) -> str:
    derived = f" + {report['derived']} derived" if report.get("derived") else ""
    lines = [f"# reelforge run report: {report['recipe']}", "",
             f"Master `{report['master']}`, {report.get('elapsed_s', 0):.1f} s. "
             f"**{report['inputs']} inputs{derived}"
             f" = {report['kept']} kept + {report['dropped']} dropped** "
             f"({'balanced' if report['balanced'] else 'NOT BALANCED'}), {report['shards']} shards.", "",
             *_reused_markdown(report),
             "![funnel](funnel.png)", "", "## Steps", "",
             "| step | in | out | dropped | media in | media out | tokens in | tokens out | seconds | reasons |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in report["steps"]:
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "-"
        lines.append(f"| {s['step']} | {s['in']} | {s['out']} | {s['dropped']} | "
                     f"{_fmt_bytes(s['media_bytes_in'])} | {_fmt_bytes(s['media_bytes_out'])} | "
                     f"{s['tokens_in']:,} | {s['tokens_out']:,} | {s['seconds']} | {reasons} |")
    lines += ["", "Tokens are known from the `tokens` step on; samples dropped before it count 0.",
              "", "## Sources (kept tokens)", "",
              "| source | inputs | kept | dropped | text tokens | visual tokens | tokens | dropped for |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, d in report["sources"].items():
        why = d.get("reasons", {})
        reasons = ", ".join(f"{k} {v}" for k, v in list(why.items())[:4]) + (", ..." if len(why) > 4 else "")
        lines.append(f"| {name} | {d['inputs']} | {d['kept']} | {d['dropped']} | {d.get('text_tokens', 0):,} | "
                     f"{d.get('visual_tokens', 0):,} | {d.get('tokens', 0):,} | {reasons or '-'} |")
    t = report.get("tokens", {})
    lines.append(f"| **all** | {report['inputs']} | {report['kept']} | {report['dropped']} | "
                 f"{t.get('text_tokens', 0):,} | {t.get('visual_tokens', 0):,} | {t.get('tokens', 0):,} | |")
    lines += _semantic_markdown(report.get("semantic") or [])
    lines += _leakage_markdown(report.get("leakage") or [])
    paths = report.get("paths", {})
    if paths:
        lines += ["", "## Where things are", ""] + [f"- {k}: `{v}`" for k, v in paths.items()]
    lines += ["", "Find one sample's fate: `reelforge ledger OUT --id ID` "
              "(or `--key SOURCE_KEY`).", ""]
    return "\n".join(lines)


def write_report(report: dict, out: str) -> None:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    plot_funnel(report, os.path.join(out, "funnel.png"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_markdown(report))
    write_report_html(report, out)


# --- report.html: the same figures, plus drops by step x reason and source x reason, score and
# token histograms and video hours, in one self-contained file (inline CSS, PNG data: URIs) --------


def _png_data_uri(fig) -> str:
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _parquet_batches(path: str, columns: list[str]):
    """Record batches of a Spark-written Parquet folder (only these columns; nothing if absent)."""
    import pyarrow.dataset as ds

    if not path or not os.path.isdir(path):
        return
    d = ds.dataset(path, format="parquet")
    cols = [c for c in columns if c in d.schema.names]
    yield from d.to_batches(columns=cols, batch_size=65536)


BINS = 30  # bars per histogram


def _score_parts(batch, write_drops):
    """One batch of the last step's rows: {(score, kept|dropped): values}, and the video seconds and
    counts of the input samples (no parent) and of the kept ones; vectorised (Arrow compute)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    kept = pc.is_null(batch.column("drop_step")) if "drop_step" in names else pa.array([True] * batch.num_rows)
    if write_drops:  # live rows the shard writer refused: not kept
        kept = pc.and_(kept, pc.invert(pc.is_in(batch.column("id"), value_set=write_drops)))
    kept_np = np.asarray(kept.to_numpy(zero_copy_only=False), dtype=bool)
    parts: dict[tuple[str, str], np.ndarray] = {}
    if "scores" in names:
        col = batch.column("scores")
        if pa.types.is_map(col.type):  # as list<struct<key, value>>: what list_flatten takes
            col = col.cast(pa.list_(pa.struct([("key", col.type.key_type), ("value", col.type.item_type)])))
        flat = pc.list_flatten(col)
        if len(flat):
            parent = pc.list_parent_indices(col).to_numpy()
            keys = flat.field("key")
            vals = np.asarray(flat.field("value").to_numpy(zero_copy_only=False), dtype=float)
            fate = kept_np[parent]
            for name in pc.unique(keys).to_pylist():
                sel = np.asarray(pc.equal(keys, name).to_numpy(zero_copy_only=False), dtype=bool) & ~np.isnan(vals)
                for f, mask in (("kept", fate), ("dropped", ~fate)):
                    parts[(name, f)] = vals[sel & mask]
    video = np.zeros(4)  # in seconds, in videos, out seconds, out videos
    if "media" in names:
        col = batch.column("media")
        flat = pc.list_flatten(col)
        if len(flat):
            parent = pc.list_parent_indices(col).to_numpy()
            is_video = np.asarray(pc.equal(flat.field("kind"), "video").to_numpy(zero_copy_only=False), dtype=bool)
            secs = np.nan_to_num(np.asarray(flat.field("duration").to_numpy(zero_copy_only=False), dtype=float))
            root = (np.asarray(pc.is_null(batch.column("parent_id")).to_numpy(zero_copy_only=False), dtype=bool)
                    if "parent_id" in names else np.ones(batch.num_rows, dtype=bool))
            for k, mask in ((0, is_video & root[parent]), (2, is_video & kept_np[parent])):
                video[k] += secs[mask].sum()
                video[k + 1] += mask.sum()
    return parts, video


class _Hist:
    """A histogram over series that share bins, in two passes: `span` (min, max), then `add`."""

    def __init__(self):
        self.lo, self.hi, self.counts, self.n = np.inf, -np.inf, {}, 0

    def span(self, values) -> None:
        if len(values):
            self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))

    @property
    def edges(self):
        return np.linspace(self.lo, self.hi if self.hi > self.lo else self.lo + 1, BINS + 1)

    def add(self, series: str, values) -> None:
        if not len(values):
            return
        c = np.histogram(values, bins=self.edges)[0]
        self.counts[series] = self.counts.get(series, 0) + c
        self.n += len(values)


def run_distributions(report: dict) -> dict:
    """What report.html plots beyond report.json, streamed from the run's Parquet in two passes
    (min and max, then counts in 30 bins; memory per histogram, not per sample): every score of
    the last step's rows (kept or dropped), tokens per kind of the kept samples (the samples
    table) and the video seconds of the input and of the kept samples."""
    import pyarrow as pa

    paths = report.get("paths") or {}
    samples = paths.get("samples")
    run_dir = os.path.dirname(paths["ledger"]) if paths.get("ledger") else None
    steps = report.get("steps") or []
    last = (os.path.join(run_dir, "_work", f"{len(steps) - 2:02d}_{steps[-2]['step']}")
            if run_dir and len(steps) >= 2 else None)
    from_work = bool(last and os.path.isdir(last))
    write_drops = None
    if from_work and any(s["step"] == "write" and s["dropped"] for s in steps):
        import pyarrow.dataset as ds

        write_drops = ds.dataset(paths["ledger"], format="parquet").to_table(
            columns=["id"], filter=ds.field("step") == "write").column("id").combine_chunks()
    scores: dict[str, _Hist] = {}
    tokens: dict[str, _Hist] = {}
    video = np.zeros(4)

    def score_passes():
        if from_work:
            yield from (_score_parts(b, write_drops)
                        for b in _parquet_batches(last, ["id", "scores", "media", "parent_id", "drop_step"]))
        else:  # _work removed: the kept samples' scores only
            for b in _parquet_batches(samples, ["scores"]):
                yield _score_parts(pa.RecordBatch.from_arrays([b.column("scores")], ["scores"]), None)

    def token_passes():
        for b in _parquet_batches(samples, ["kind", "tokens"]):
            kinds = b.column("kind").to_numpy(zero_copy_only=False)
            toks = b.column("tokens").to_numpy(zero_copy_only=False)
            for k in set(kinds.tolist()):
                v = np.asarray([t for t in toks[kinds == k] if t is not None], dtype=float)
                yield k, v[~np.isnan(v)]

    for second in (False, True):
        for parts, vid in score_passes():
            if not second:
                video += vid
            for (name, fate), v in parts.items():
                h = scores.setdefault(name, _Hist())
                h.add(fate, v) if second else h.span(v)
        for kind, v in token_passes():
            h = tokens.setdefault(kind, _Hist())
            h.add(kind, v) if second else h.span(v)
    scores = {k: h for k, h in scores.items() if h.n}
    tokens = {k: h for k, h in tokens.items() if h.n}
    return {"scores": dict(sorted(scores.items())), "tokens": dict(sorted(tokens.items())),
            "video": {"in_s": float(video[0]), "in_videos": int(video[1]), "out_s": float(video[2]),
                      "out_videos": int(video[3]), "known": from_work},
            "scores_from": "the last step's rows (kept and dropped)" if from_work
            else "the samples table (kept only: _work/ was removed)"}


def _funnel_figures(report: dict) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    y = list(range(len(steps)))[::-1]
    uris = []
    for key_in, key_out, label in (("in", "out", "samples"), ("tokens_in", "tokens_out", "tokens")):
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(steps) + 1.2))
        outs = [s[key_out] for s in steps]
        lost = [max(0, s[key_in] - s[key_out]) for s in steps]
        ax.barh(y, outs, color="#3b7dd8", label="continues")
        ax.barh(y, lost, left=outs, color="#e8833a", label="dropped here")
        ax.set_yticks(y)
        ax.set_yticklabels([s["step"] for s in steps])
        ax.set_xlabel(label)
        ax.set_title(f"funnel in {label}")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        uris.append(_png_data_uri(fig))
    return uris[0], uris[1]


def _histogram(title: str, hist: _Hist, xlabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    edges, bottom = hist.edges, np.zeros(BINS)
    for name, c in hist.counts.items():
        if c.sum():
            ax.bar(edges[:-1], c, width=np.diff(edges), bottom=bottom, align="edge", label=name,
                   color={"kept": "#3b7dd8", "dropped": "#e8833a"}.get(name, "#3b7dd8"))
            bottom = bottom + c
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("samples", fontsize=8)
    fig.tight_layout()
    return _png_data_uri(fig)


_HTML_CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px} td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#eef} td.n{text-align:right;font-variant-numeric:tabular-nums} td.z{color:#bbb;text-align:right}
.figs{display:flex;flex-wrap:wrap;gap:12px} .ok{color:#2a7} .bad{color:#c33;font-weight:700}
h2{border-bottom:1px solid #ddd;padding-bottom:2px;margin-top:28px}
"""


def _cross_table(rows: dict[str, dict[str, int]], row_label: str) -> list[str]:
    """A step (or source) x reason table of drop counts."""
    import html

    reasons = sorted({r for d in rows.values() for r in d}, key=lambda r: (-sum(d.get(r, 0) for d in rows.values()), r))
    if not reasons:
        return ["<p>no drops.</p>"]
    out = ["<table><tr><th>" + html.escape(row_label) + "</th>"
           + "".join(f"<th>{html.escape(r)}</th>" for r in reasons) + "<th>all</th></tr>"]
    for name, d in rows.items():
        if not any(d.values()):
            continue
        cells = "".join(f"<td class='n'>{d[r]:,}</td>" if d.get(r) else "<td class='z'>0</td>" for r in reasons)
        out.append(f"<tr><td>{html.escape(name)}</td>{cells}<td class='n'>{sum(d.values()):,}</td></tr>")
    out.append("</table>")
    return out


def render_html(report: dict, dist: dict | None = None) -> str:
    import html

    dist = dist if dist is not None else run_distributions(report)
    esc = html.escape
    derived = f" + {report['derived']:,} derived" if report.get("derived") else ""
    ok = report.get("balanced")
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>reelforge run report: {esc(report['recipe'])}</title><style>{_HTML_CSS}</style></head><body>",
             f"<h1>reelforge run report: {esc(report['recipe'])}</h1>",
             f"<p>Master <code>{esc(str(report['master']))}</code>, {report.get('elapsed_s', 0):.1f} s. "
             f"<b>{report['inputs']:,} inputs{derived} = {report['kept']:,} kept + {report['dropped']:,} dropped</b> "
             f"(<span class='{'ok' if ok else 'bad'}'>{'balanced' if ok else 'NOT BALANCED'}</span>), "
             f"{report['shards']} shards.</p>"]
    samples_png, tokens_png = _funnel_figures(report)
    parts += ["<h2 id='funnel'>Funnel</h2>", "<div class='figs'>",
              f"<img id='funnel-samples' alt='funnel in samples' src='{samples_png}'>",
              f"<img id='funnel-tokens' alt='funnel in tokens' src='{tokens_png}'></div>",
              "<table><tr><th>step</th><th>in</th><th>out</th><th>dropped</th><th>derived</th><th>media in</th>"
              "<th>media out</th><th>tokens in</th><th>tokens out</th><th>seconds</th></tr>"]
    for s in report["steps"]:
        parts.append(f"<tr><td>{esc(s['step'])}</td>" + "".join(
            f"<td class='n'>{v}</td>" for v in (
                f"{s['in']:,}", f"{s['out']:,}", f"{s['dropped']:,}", f"{s.get('derived', 0):,}",
                _fmt_bytes(s["media_bytes_in"]), _fmt_bytes(s["media_bytes_out"]), f"{s['tokens_in']:,}",
                f"{s['tokens_out']:,}", s["seconds"])) + "</tr>")
    parts += ["</table>", "<p>Tokens are known from the <code>tokens</code> step on; samples dropped before it "
              "count 0.</p>", "<h2 id='drops-step'>Drops by step and reason</h2>"]
    parts += _cross_table({s["step"]: s["reasons"] for s in report["steps"]}, "step")
    parts.append("<h2 id='drops-source'>Drops by source and reason</h2>")
    parts += _cross_table({n: d.get("reasons", {}) for n, d in report["sources"].items()}, "source")
    parts += ["<h2 id='sources'>Sources (kept tokens)</h2>",
              "<table><tr><th>source</th><th>inputs</th><th>kept</th><th>dropped</th><th>text tokens</th>"
              "<th>visual tokens</th><th>tokens</th></tr>"]
    for name, d in report["sources"].items():
        parts.append(f"<tr><td>{esc(name)}</td>" + "".join(f"<td class='n'>{d.get(k, 0):,}</td>" for k in (
            "inputs", "kept", "dropped", "text_tokens", "visual_tokens", "tokens")) + "</tr>")
    parts.append("</table>")
    parts += ["<h2 id='scores'>Scores</h2>", f"<p>From {esc(dist['scores_from'])}.</p>"]
    def figures(hists: dict, ident: str, title, xlabel, empty: str) -> None:
        if not hists:
            parts.append(f"<p>{empty}</p>")
            return
        parts.append("<div class='figs'>")
        for name, h in hists.items():
            parts.append(f"<img class='hist' id='{ident}-{esc(name)}' alt='{ident} "
                         f"{esc(name)}' src='{_histogram(title(name, h), h, xlabel(name))}'>")
        parts.append("</div>")

    figures(dist["scores"], "score", lambda n, h: f"score {n} ({h.n:,} samples)", lambda n: n,
            "no sample has a score.")
    parts.append("<h2 id='tokens'>Tokens per kind (kept samples)</h2>")
    figures(dist["tokens"], "tokens", lambda n, h: f"{n}: {h.n:,} samples", lambda n: "tokens",
            "no kept sample has a token count.")
    v = dist["video"]
    parts.append("<h2 id='video'>Video hours</h2>")
    if v["known"]:
        parts.append(f"<table><tr><th></th><th>videos</th><th>hours</th></tr>"
                     f"<tr><td>in (input samples, probed duration)</td><td class='n'>{v['in_videos']:,}</td>"
                     f"<td class='n'>{v['in_s'] / 3600:.4f}</td></tr>"
                     f"<tr><td>out (kept samples, clips included)</td><td class='n'>{v['out_videos']:,}</td>"
                     f"<td class='n'>{v['out_s'] / 3600:.4f}</td></tr></table>"
                     "<p>A video dropped before <code>probe</code> has no known duration and counts 0.</p>")
    else:
        parts.append("<p>not known: <code>_work/</code> was removed (output.keep_work: false).</p>")
    reused = report.get("reused")
    parts.append("<h2 id='reuse'>Reused steps</h2>")
    parts.append(f"<p>{esc(', '.join(reused)) if reused else 'none'}</p>" if reused is not None
                 else "<p>not recorded: this run's report does not say which steps were reused from "
                      "<code>_work/</code>.</p>")
    paths = report.get("paths", {})
    if paths:
        parts += ["<h2 id='paths'>Where things are</h2><ul>"] + [
            f"<li>{esc(k)}: <code>{esc(str(p))}</code></li>" for k, p in paths.items()] + ["</ul>"]
    parts.append("<p>One sample's fate: <code>reelforge ledger OUT --id ID</code> (or <code>--key SOURCE_KEY</code>, "
                 "<code>--reason R</code>); a contact sheet: <code>reelforge inspect OUT --reason R</code>.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report_html(report: dict, out: str) -> None:
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(render_html(report))
