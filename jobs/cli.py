"""The `reelforge` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from reelforge.curation.storage import StorageError
from reelforge.curation.tools import SetupError
from reelforge.jobs.recipe import RecipeError


def _cmd_run(args: argparse.Namespace) -> int:
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.remote import run

    recipe = load_recipe(args.recipe, out=args.out)
    if args.keep_work is not None:
        recipe.keep_work = args.keep_work
    report = run(recipe, master=args.master, work=args.work)  # a local recipe: jobs.run.run_recipe, as before
    print(f"shards: {report['paths']['shards']}\nledger: {report['paths']['ledger']}\n"
          f"report: {report['paths']['report']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from reelforge.curation.demo_corpus import make_demo_corpus
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.run import run_recipe

    out = os.path.abspath(args.out)
    corpus = os.path.join(out, "corpus")
    print(f"reelforge demo: making a small {'full ' if args.full else ''}corpus in {corpus}")
    if args.full:  # every step, with tiny local models in OUT/models
        from reelforge.curation.demo_full import make_full_corpus, where_to_look

        recipe_path = make_full_corpus(corpus, os.path.join(out, "models"))
        recipe = load_full_demo_recipe(recipe_path, os.path.join(out, "run"))
    else:
        recipe_path = make_demo_corpus(corpus, n_images=args.images, n_videos=args.videos)
        recipe = load_recipe(recipe_path, out=os.path.join(out, "run"))
    report = run_recipe(recipe, master=args.master)
    print(f"\nrecipe: {recipe_path}\nshards: {report['paths']['shards']}\n"
          f"ledger: {report['paths']['ledger']}\nreport: {report['paths']['report']}")
    if args.full:
        print("\n" + where_to_look(os.path.join(out, "run")))
    return 0


def load_full_demo_recipe(recipe_path: str, out: str, log=print):
    """The full demo's recipe; a build without the `text_quality` step runs it without that step."""
    from reelforge.curation.demo_full import without_steps
    from reelforge.jobs.recipe import load_recipe

    try:
        return load_recipe(recipe_path, out=out)
    except RecipeError as e:
        if "text_quality" not in str(e) or "unknown" not in str(e):
            raise
    log("  (this build has no text_quality step yet: the demo runs without it)")
    without_steps(recipe_path, ["text_quality"])
    return load_recipe(recipe_path, out=out)


def _cmd_ledger(args: argparse.Namespace) -> int:
    from reelforge.jobs.inspect import InspectError, ledger_lines

    try:
        rows = ledger_lines(args.run_dir, id=args.id, key=args.key, reason=args.reason, step=args.step,
                            limit=args.limit)
    except InspectError as e:
        raise RecipeError(str(e)) from None
    for r in rows:
        print(json.dumps(r, ensure_ascii=False, sort_keys=True))
    if not rows:
        print("no ledger line matches", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from reelforge.jobs.inspect import InspectError, inspect_run

    try:
        res = inspect_run(args.run_dir, args.out, reason=args.reason, step=args.step, source=args.source,
                          kept=args.kept, n=args.n)
    except InspectError as e:
        raise RecipeError(str(e)) from None
    print(f"contact sheet: {os.path.abspath(res['path'])} ({res['shown']} of {res['matched']} samples)")
    return 0


def _parse_hw(s: str, flag: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise RecipeError(f"{flag} takes HEIGHTxWIDTH, e.g. {flag} 1080x1920; got {s!r}.") from None
    return h, w


def _cmd_tokens(args: argparse.Namespace) -> int:
    from reelforge.curation.tokens import TokenError, VisualTokenConfig, image_tokens, video_tokens

    try:
        settings = json.loads(args.config) if args.config else {}
        if not isinstance(settings, dict):
            raise TypeError(f"got {type(settings).__name__}")
        if args.processor:
            if settings.get("processor", args.processor) != args.processor:
                raise ValueError(f"--processor {args.processor} but --config names {settings['processor']}")
            settings["processor"] = args.processor
        cfg = VisualTokenConfig.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"--config must be a JSON object of visual token settings: {e}.") from e
    out: list[dict] = []
    try:
        if args.image:
            h, w = _parse_hw(args.image, "--image")
            out.append({"input": f"image {h}x{w}", **image_tokens(h, w, cfg)})
        if args.video:
            h, w = _parse_hw(args.video, "--video")
            if args.duration is None:
                raise RecipeError("--video needs --duration SECONDS.")
            out.append({"input": f"video {h}x{w} {args.duration}s",
                        **video_tokens(h, w, args.duration, args.fps or 30.0, cfg, sample_fps=args.sample_fps)})
    except TokenError as e:
        raise RecipeError(f"{e.reason}: {e}.") from e
    for path in args.files:
        out.append(_file_tokens(path, cfg, args.sample_fps))
    if not out:
        raise RecipeError("give --image HxW, --video HxW --duration S, or files.")
    for o in out:
        print(json.dumps(o, sort_keys=True))
    return 0 if all("error" not in o for o in out) else 1


def _file_tokens(path: str, cfg, sample_fps: float | None) -> dict:
    from reelforge.curation.media_io import media_kind_of
    from reelforge.curation.probe import ProbeError, probe_image, probe_video_file
    from reelforge.curation.tokens import TokenError, image_tokens, video_tokens

    kind = media_kind_of(path)
    try:
        if not os.path.exists(path):
            return {"input": path, "error": "missing_file"}
        if kind == "image":
            with open(path, "rb") as f:
                meta = probe_image(f.read(), 1 << 62)
            return {"input": path, "kind": "image", "probe": meta, **image_tokens(meta["height"], meta["width"], cfg)}
        meta = probe_video_file(path, 30.0)
        if cfg.slow_fast:  # 1.5 from the decoded frames: frame types, slow and fast sizes
            import dataclasses

            from reelforge.curation.frame_plan import frame_plan

            plan = frame_plan(path, dataclasses.replace(cfg, video_fps=sample_fps) if sample_fps else cfg)
            return {"input": path, "kind": "video", "probe": meta,
                    **{k: v for k, v in plan.items() if k not in ("indices", "timestamps", "processor")}}
        return {"input": path, "kind": "video", "probe": meta,
                **video_tokens(meta["height"], meta["width"], meta["duration"], meta["fps"], cfg,
                               total_frames=meta.get("frames"), sample_fps=sample_fps)}
    except (ProbeError, TokenError) as e:
        return {"input": path, "error": e.reason, "detail": str(e)}


def _storage_errors(fn):
    """A command whose StorageError (no bucket, no credentials) is its one sentence, exit 2."""
    import functools

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from reelforge.curation.storage import StorageError

        try:
            return fn(args)
        except StorageError as e:
            raise RecipeError(str(e)) from None
    return run


@_storage_errors
def _cmd_plan(args: argparse.Namespace) -> int:
    from reelforge.mixers.planner import check_drift, format_plan, plan_mixture, write_plan
    from reelforge.mixers.spec import load_mixture

    mix = load_mixture(args.mixture)
    plan = plan_mixture(mix, args.stats)
    if not args.allow_drift and any(st["drift"] for st in plan["stages"]):
        print(format_plan(plan))  # the table, then one sentence per drifting entry (exit 2, no plan written)
    check_drift(plan, args.allow_drift)
    out = args.out or f"{mix.name}.plan.json"
    png = write_plan(plan, out)
    print(format_plan(plan))
    print(f"\nplan: {out}\nplot: {png}")
    return 0


@_storage_errors
def _cmd_mix(args: argparse.Namespace) -> int:
    from reelforge.curation.storage import join
    from reelforge.mixers.emit import emit_plan, load_plan

    indexes = emit_plan(load_plan(args.plan), args.out, seed=args.seed, stages=args.stage, workers=args.workers,
                        verify=args.verify)
    for name, idx in indexes.items():
        print(f"{name}: {join(args.out, name, 'index.json')}")
        for e, v in idx["entries"].items():
            print(f"  {e:<20} {v['samples']:>10} samples {v['tokens']:>14} tokens "
                  f"(plan {v['planned_tokens']}) {v['epochs']:.3f} epochs")
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from reelforge.jobs.align import align

    align(args.recipe, args.stage, args.model, args.rounds, args.out, master=args.master, sets=args.set,
          launcher=args.launcher)
    print(f"rounds: {os.path.join(os.path.abspath(args.out), 'rounds.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reelforge", description="Curate multimodal training data on Spark.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a recipe: sources -> steps -> shards, ledger and report")
    r.add_argument("recipe")
    r.add_argument("--master", help="Spark master (default: the recipe's, else local[*])")
    r.add_argument("--out", help="output folder or URL such as s3://bucket/prefix (default: the recipe's output.path)")
    r.add_argument("--work", help="with a URL output: the local staging folder the run works in before it "
                                  "publishes (default: the recipe's output.work, else under ~/.cache/reelforge)")
    r.add_argument("--keep-work", dest="keep_work", action=argparse.BooleanOptionalAction, default=None,
                   help="keep OUT/_work (step outputs a re-run resumes from) once the run is complete; "
                        "default: the recipe's output.keep_work, else true")
    r.set_defaults(fn=_cmd_run)
    d = sub.add_parser("demo", help="make a small real corpus and run the demo recipe on it")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--master")
    d.add_argument("--images", type=int, default=300)
    d.add_argument("--videos", type=int, default=24)
    d.add_argument("--full", action="store_true",
                   help="a smaller corpus that exercises every step (tiny local CLIP and VLM; a few minutes)")
    d.set_defaults(fn=_cmd_demo)
    t = sub.add_parser(
        "tokens", help="visual tokens of sizes or files, as Keye-VL's processor counts them",
        description="Visual tokens as the released Keye-VL processors (keye-vl-utils) count them: one JSON "
                    "object per input with tokens, resized_height and resized_width (videos add frames). "
                    "With metadata only (--video HxW) keye-vl-1.5 cannot tell slow frames from fast ones, "
                    "so every frame counts as slow: the upper bound. A 1.5 video file is decoded and adds "
                    "frame_types (0 slow, 1 fast), fast_resized_height and fast_resized_width.")
    t.add_argument("files", nargs="*", help="images or videos to probe and count")
    t.add_argument("--image", metavar="HxW")
    t.add_argument("--video", metavar="HxW")
    t.add_argument("--duration", type=float, metavar="SECONDS")
    t.add_argument("--fps", type=float, help="the video's own frame rate (default 30)")
    t.add_argument("--sample-fps", type=float, dest="sample_fps", help="sampling rate (default 2)")
    t.add_argument("--processor", choices=["keye-vl-1.5", "keye-vl-1.0"],
                   help="the released processor's rules (default keye-vl-1.5; keye-vl-1.0 at the report's "
                        "24,576-token video budget); with --video HxW every 1.5 frame counts as slow (the upper bound)")
    t.add_argument("--config", help='JSON of visual token settings, e.g. \'{"max_pixels": 1003520}\'')
    t.set_defaults(fn=_cmd_tokens)
    lg = sub.add_parser("ledger", help="find a sample's fate by id or source key")
    lg.add_argument("run_dir")
    lg.add_argument("--id")
    lg.add_argument("--key", help="a source key (part-0.tar/000017, llava.jsonl:17), or with its file's "
                                  "folders in front (data/llava.jsonl:17)")
    lg.add_argument("--reason", help="only drops for this reason (e.g. low_clip_score)")
    lg.add_argument("--step", help="only drops at this step")
    lg.add_argument("--limit", type=int, default=20)
    lg.set_defaults(fn=_cmd_ledger)
    ins = sub.add_parser("inspect", help="an HTML contact sheet of a run's dropped (or kept) samples")
    ins.add_argument("run_dir")
    ins.add_argument("--reason")
    ins.add_argument("--step")
    ins.add_argument("--source")
    ins.add_argument("--kept", action="store_true", help="kept samples instead of dropped ones")
    ins.add_argument("--n", type=int, default=48, help="samples on the sheet (the first by id)")
    ins.add_argument("--out", help="HTML file to write (default: ./inspect-FATE-FILTER.html)")
    ins.set_defaults(fn=_cmd_inspect)
    pl = sub.add_parser("plan", help="plan a mixture: token targets -> per-source sample counts, from a run's stats")
    pl.add_argument("mixture", help="mixture YAML (examples: mixers/recipes/)")
    pl.add_argument("--stats", required=True, metavar="RUN_DIR",
                    help="output folder of a finished run, or its URL (s3://bucket/run)")
    pl.add_argument("--out", help="plan JSON to write, a path or a URL (default: NAME.plan.json; the plot goes "
                                  "beside it)")
    pl.add_argument("--allow-drift", dest="allow_drift", action="store_true",
                    help="write the plan even where an entry's achieved share misses its weight by more than "
                         "the stage's tolerance")
    pl.set_defaults(fn=_cmd_plan)
    mx = sub.add_parser("mix", help="emit each stage's shards exactly to a plan, globally shuffled")
    mx.add_argument("plan", help="plan JSON from `reelforge plan` (a path or a URL)")
    mx.add_argument("--out", required=True, help="output folder or URL (s3://bucket/mixes): one sub-folder of "
                                                 "shards per stage")
    mx.add_argument("--seed", type=int, help="shuffle seed (default: the plan's); the samples stay the plan's")
    mx.add_argument("--stage", action="append", help="emit only this stage (repeatable)")
    mx.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    mx.add_argument("--verify", action="store_true",
                    help="check every run shard's sha256 against the run's index.json before copying "
                         "(a shard whose size differs is always checked)")
    mx.set_defaults(fn=_cmd_mix)
    al = sub.add_parser("align", help="rounds of iterative alignment: sample from the round's model, reward, "
                                      "select pairs, train MPO; the next round samples from its export")
    al.add_argument("recipe", help="a round's curation recipe, its model written {{model}} "
                                   "(example: mixers/recipes/align/round.yaml)")
    al.add_argument("stage", help="the MPO stage YAML (example: training/stages/mpo_round.yaml)")
    al.add_argument("--model", required=True, help="round 1's model: a `reelforge train` export (OUT/final)")
    al.add_argument("--rounds", type=int, default=2)
    al.add_argument("--out", required=True, help="OUT/round-N/data (the run), OUT/round-N/train (the stage)")
    al.add_argument("--master", help="Spark master for the curation runs")
    al.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a stage field, as for train")
    al.add_argument("--launcher", default="", help='how training starts, e.g. "torchrun --nproc_per_node 8" '
                                                  "(default: this Python, one process)")
    al.set_defaults(fn=_cmd_align)
    from reelforge.training.cli import add_training_commands

    add_training_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from reelforge.jobs.run import AccountingError, OutputWriteError, io_error_message

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (RecipeError, SetupError, StorageError) as e:
        print(f"reelforge: {e}", file=sys.stderr)
        return 2
    except (OutputWriteError, AccountingError) as e:  # the run's own sentence; exit 1: not the recipe's fault
        print(f"reelforge: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a model a worker could not load: its sentence, not a JVM trace
        said = worker_user_error(e)
        if said is not None:
            print(f"reelforge: {said}", file=sys.stderr)
            return 2
        io = io_error_message(e)
        if io is not None:  # disk full, read-only, I/O error in a command other than `run`
            where = getattr(e, "filename", None)
            print(f"reelforge: cannot write{f' to {where}' if where else ''}: {io}.", file=sys.stderr)
            return 1
        raise


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 2000 else text[:2000] + " ..."


def worker_user_error(e: BaseException) -> str | None:
    """The one-sentence message of a ModelLoadError raised inside a Spark worker, if that is
    what failed the job (Spark wraps it in a PythonException / Py4JJavaError)."""
    import re

    m = re.search(r"ModelLoadError: (.+)", str(e))
    return m.group(1).strip() if m else None


if __name__ == "__main__":
    sys.exit(main())
