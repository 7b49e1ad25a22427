"""Energon's metadata for a folder of reelforge shards: `<folder>/.nv-meta/`, written where the
shards are written, so `megatron.energon.get_train_dataset(folder, ...)` reads the folder with no
`energon prepare` step.

The index is Energon's own: `WebdatasetPreparator.prepare_dataset` (what `energon prepare` runs)
writes the per-tar sample offsets (`<shard>.tar.idx`), `.nv-meta/index.sqlite` and `index.uuid`,
`.info.json` (samples per shard) and `split.yaml` (every shard in the `train` split, in name
order: no shuffle of tars). What `energon prepare` would ask interactively is fixed here:
`dataset.yaml` names Energon's crude dataset (`CrudeWebdataset`: the sample as a dict of its
members) with the subflavor `reelforge` = the shard JSON version, which selects the cooker of
`reelforge.training.energon` (the sample type with its JSON fields, media and metadata).

Energon is an optional dependency (`pip install reelforge[energon]`): without it nothing is
written and `write_energon_meta` says so in one line (the shards stay plain WebDataset; run
`energon prepare` later, or install the extra and run again).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from typing import Callable

from reelforge.curation.errors import RecipeError
from reelforge.curation.shards import SHARD_JSON_VERSION

META_DIR = ".nv-meta"  # megatron.energon.flavors.webdataset.config.MAIN_FOLDER_NAME
SUBFLAVOR = "reelforge"  # dataset.yaml's subflavor key: the shard JSON version, what the cooker matches


def dataset_yaml() -> dict:
    """The `.nv-meta/dataset.yaml` of a reelforge shard folder."""
    return {"__module__": "megatron.energon", "__class__": "CrudeWebdataset",
            "subflavors": {SUBFLAVOR: SHARD_JSON_VERSION}}


def energon_available() -> bool:
    try:
        import megatron.energon  # noqa: F401
    except ImportError:
        return False
    return True


def _remove_stale(folder: str, meta: str, keep: set[str]) -> None:
    try:
        with open(os.path.join(meta, ".info.json")) as f:
            previous = list(json.load(f).get("shard_counts") or {})
    except (OSError, ValueError, AttributeError):
        previous = []
    for name in previous:
        if isinstance(name, str) and name not in keep and os.path.basename(name) == name:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name + ".idx"))
    shutil.rmtree(meta)


def write_energon_meta(folder: str, shards: list[str] | None = None, workers: int | None = None,
                       log: Callable[[str], None] | None = None) -> dict | None:
    """Write `<folder>/.nv-meta/` for the tars `shards` (names relative to folder; default: every
    *.tar in it), replacing any earlier one, reading the tars in `workers` processes (default: one
    a core, at most 8; Energon's indexer costs about a millisecond a sample). Returns {"shards",
    "samples"} as Energon counted them, or None when there is nothing to index or Energon is not
    installed."""
    folder = os.path.abspath(folder)
    meta = os.path.join(folder, META_DIR)
    if shards is None:
        shards = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    shards = sorted(shards)
    if os.path.isdir(meta):  # a stale index would describe other bytes: it goes, with the tar
        _remove_stale(folder, meta, set(shards))  # indexes of shards the folder no longer has
    if not shards:
        return None  # Energon refuses an empty dataset; an empty folder has nothing to read
    if not energon_available():
        if log is not None:
            log(f"no Energon metadata in {folder}: megatron-energon is not installed "
                "(pip install 'reelforge[energon]', or run `energon prepare` on the folder later)")
        return None

    import yaml
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.indexing import DuplicateSampleKeyError
    from megatron.energon.flavors.webdataset.metadata import get_dataset_info
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    # Energon prints progress lines and calls sys.exit(1) on duplicate keys: both kept in here
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            WebdatasetPreparator.prepare_dataset(
                EPath(folder), list(shards), split_parts_patterns=[("train", ".*")], shuffle_seed=None,
                workers=max(1, min(workers or min(8, os.cpu_count() or 1), len(shards))),
                progress_fn=lambda it, n: it)
    except (SystemExit, DuplicateSampleKeyError) as e:
        shutil.rmtree(meta, ignore_errors=True)
        said = out.getvalue().strip().splitlines()
        raise RecipeError(f"Energon cannot index {folder}: {said[1] if len(said) > 1 else e}; "
                          "every sample key must be unique across the folder's shards.") from None
    with open(os.path.join(meta, "dataset.yaml"), "w") as f:
        yaml.safe_dump(dataset_yaml(), f, sort_keys=False)
    counts = get_dataset_info(EPath(folder))["shard_counts"]
    return {"shards": len(counts), "samples": int(sum(counts.values()))}
