"""The `reelforge train` and `reelforge merge` subcommands (registered by jobs/cli.py)."""

from __future__ import annotations

import argparse
import json

from reelforge.jobs.recipe import RecipeError


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
