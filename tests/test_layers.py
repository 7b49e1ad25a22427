"""The layer contract (.importlinter at the repository root) holds: imports go downward only,
mixers and training are independent, no module cycle inside a package, and only the engine
(reelforge.jobs) imports pyspark. `make test` fails on an upward import or a cycle."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint_imports() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    return exe if os.path.exists(exe) else shutil.which("lint-imports") or "lint-imports"


def test_import_contracts_hold():
    res = subprocess.run([_lint_imports(), "--no-cache", os.path.join(ROOT, ".importlinter")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "broken" not in res.stdout.split("Contracts:")[-1].replace("0 broken", "")


def test_recipe_error_is_one_class():
    from reelforge.curation.errors import RecipeError
    from reelforge.jobs.recipe import RecipeError as FromJobs

    assert FromJobs is RecipeError
