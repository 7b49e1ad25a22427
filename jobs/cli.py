"""The `reelforge` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from curation.tools import SetupError
from jobs.recipe import RecipeError


def _cmd_run(args: argparse.Namespace) -> int:
    from jobs.recipe import load_recipe
    from jobs.run import run_recipe

    recipe = load_recipe(args.recipe, out=args.out)
    report = run_recipe(recipe, master=args.master)
    print(f"shards: {report['paths']['shards']}\nledger: {report['paths']['ledger']}\n"
          f"report: {report['paths']['report']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from curation.demo_corpus import make_demo_corpus

    from jobs.recipe import load_recipe
    from jobs.run import run_recipe

    out = os.path.abspath(args.out)
    corpus = os.path.join(out, "corpus")
    print(f"reelforge demo: making a small corpus in {corpus}")
    recipe_path = make_demo_corpus(corpus, n_images=args.images, n_videos=args.videos)
    recipe = load_recipe(recipe_path, out=os.path.join(out, "run"))
    report = run_recipe(recipe, master=args.master)
    print(f"\nrecipe: {recipe_path}\nshards: {report['paths']['shards']}\n"
          f"ledger: {report['paths']['ledger']}\nreport: {report['paths']['report']}")
    return 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    path = os.path.join(args.run_dir, "ledger") if os.path.isdir(os.path.join(args.run_dir, "ledger")) else args.run_dir
    if not os.path.isdir(path):
        raise RecipeError(f"no ledger under {args.run_dir}: pass the output folder of a run.")
    table = ds.dataset(path, format="parquet")
    if args.id:
        flt = pc.field("id") == args.id
    elif args.key:
        flt = pc.field("source_key") == args.key
    else:
        flt = None
    rows = table.to_table(filter=flt).to_pylist() if flt is not None else table.head(args.limit).to_pylist()
    for r in rows[: args.limit]:
        print(json.dumps(r, ensure_ascii=False, sort_keys=True))
    if not rows:
        print("no ledger line matches", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reelforge", description="Curate multimodal training data on Spark.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a recipe: sources -> steps -> shards, ledger and report")
    r.add_argument("recipe")
    r.add_argument("--master", help="Spark master (default: the recipe's, else local[*])")
    r.add_argument("--out", help="output folder (default: the recipe's output.path)")
    r.set_defaults(fn=_cmd_run)
    d = sub.add_parser("demo", help="make a small real corpus and run the demo recipe on it")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--master")
    d.add_argument("--images", type=int, default=300)
    d.add_argument("--videos", type=int, default=24)
    d.set_defaults(fn=_cmd_demo)
    lg = sub.add_parser("ledger", help="find a sample's fate by id or source key")
    lg.add_argument("run_dir")
    lg.add_argument("--id")
    lg.add_argument("--key")
    lg.add_argument("--limit", type=int, default=20)
    lg.set_defaults(fn=_cmd_ledger)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (RecipeError, SetupError) as e:
        print(f"reelforge: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
