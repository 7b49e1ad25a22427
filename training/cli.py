"""The `reelforge train` and `reelforge merge` subcommands (registered by jobs/cli.py)."""

from __future__ import annotations

import argparse
import json

from reelforge.curation.errors import RecipeError


def _cmd_train(args: argparse.Namespace) -> int:
    from reelforge.training.config import load_stage, parse_override
    from reelforge.training.train import train

    over: dict = {}
    from reelforge.training.config import deep_update

    for s in args.set or []:
        over = deep_update(over, parse_override(s))
    cfg = load_stage(args.stage, over)
    summary = train(cfg, stop_after=args.stop_after, fresh=args.fresh)
    if summary.get("report") is not None:
        r = summary["report"]
        print(json.dumps({k: r.get(k) for k in ("stage", "steps", "loss_first", "loss_last", "tokens_per_s",
                                                 "samples_per_source", "loss_png")}, sort_keys=True))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from reelforge.training.checkpoint import merge_checkpoints

    weights = None
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise RecipeError(f"--weights takes numbers separated by commas, e.g. 0.5,0.3,0.2; got {args.weights!r}.") \
                from None
    out = merge_checkpoints(args.checkpoints, args.out, weights)
    print(f"merged {len(args.checkpoints)} checkpoints into {out}")
    return 0


def add_training_commands(sub) -> None:
    t = sub.add_parser("train", help="train one stage (YAML) from shards on DeepSpeed; resumes from its checkpoint")
    t.add_argument("stage", help="stage YAML (examples: training/stages/)")
    t.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a field, e.g. --set steps=10")
    t.add_argument("--stop-after", type=int, dest="stop_after", metavar="STEP",
                   help="save a checkpoint and stop at this step (the next run resumes there)")
    t.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(fn=_cmd_train)
    m = sub.add_parser("merge", help="average export folders weight by weight (several Stage-3 runs -> one)")
    m.add_argument("checkpoints", nargs="+", help="export folders (a stage's OUT/final)")
    m.add_argument("--out", required=True)
    m.add_argument("--weights", help="comma-separated weights, one per checkpoint (default: equal)")
    m.set_defaults(fn=_cmd_merge)


def main(argv: list[str] | None = None) -> int:
    """`python -m reelforge.training STAGE.yaml` (what torchrun and deepspeed launch): `reelforge train`
    without the curation commands, so training never imports the Spark side. A mistake in the
    stage costs one sentence and exit code 2, as under `reelforge`."""
    import sys

    from reelforge.curation.tools import SetupError

    p = argparse.ArgumentParser(prog="reelforge", description="Train from reelforge shards.")
    add_training_commands(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (RecipeError, SetupError) as e:
        print(f"reelforge: {e}", file=sys.stderr)
        return 2
