"""Elastic resume: a loader position saved by N ranks x W workers, taken up by M ranks x V workers.

A checkpoint holds every slot's position (`SlotReader` state: per shard set, the epoch and how many of
the slot's samples of that epoch it has taken, counted up to the last sample of the last batch a
finished step trained on; samples a worker had prefetched are not in it). Every slot's samples of an
epoch are a pure function of (seed, epoch, slot, slots, split) (`SlotStream.assignment`), so the
positions say exactly which samples of each epoch were consumed, as global indices (a sample's place
in the epoch's seeded shard order). `merge` turns all the old slots' positions into one global
consumed set per shard set and epoch (the *base*, kept as index ranges); the new slots then deal the
samples *not* in the base out among themselves (`remaining[slot::slots]`) before later epochs start
as usual on the new slot count. So the set of samples is exact: every sample not yet trained on is
trained on once, none twice. The order within a step is not the straight run's: which sample lands
in which step depends on the slot count.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from reelforge.curation.errors import RecipeError


def encode_ranges(mask: np.ndarray) -> list[list[int]]:
    """A boolean mask -> its runs of True as [start, end) pairs (compact: consumption is near-prefix)."""
    m = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2])]


def decode_ranges(ranges: list[list[int]], n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for a, b in ranges:
        mask[int(a):int(b)] = True
    return mask


def fill_counts(ss, stream: Any) -> None:
    """Every shard's sample count (index.json gives them; shards without a record are counted by reading
    them as the loader's stream does, `SlotStream.shard_count`, so the count is the one the stream sees)."""
    if not ss.counts:
        ss.counts = [None] * len(ss.urls)
    for i, c in enumerate(ss.counts):
        if c is None:
            ss.counts[i] = stream.shard_count(ss.urls[i])


def _slot_states(saved: list[dict]) -> tuple[int, int, dict[int, dict]]:
    world, workers = int(saved[0]["world"]), int(saved[0]["workers"])
    if len(saved) != world or sorted(int(s["rank"]) for s in saved) != list(range(world)):
        raise RecipeError(f"the checkpoint's loader state holds {len(saved)} of its {world} ranks; it cannot be "
                          "resumed on another number of ranks (save it again from a run of the same size).")
    out: dict[int, dict] = {}
    for st in saved:
        for v, s in st["states"].items():
            out[int(st["rank"]) * workers + int(v)] = s
    return world, workers, out


def merge(saved: list[dict], sets: list, seed: int, split: str, stream: Any) -> dict:
    """Every old rank's loader state -> the global base: per shard set {"start": first epoch with samples
    left, "n": samples per epoch, "epochs": {epoch: consumed index ranges}} (epochs from `start` on that
    saw any consumption; a later epoch is untouched). `stream` is the loader's SlotStream class (its
    `assignment(epoch)` says which samples a slot reads)."""
    world, workers, slots = _slot_states(saved)
    n_old = world * workers
    old_base = saved[0].get("elastic") or {}
    base: dict[str, dict] = {}
    for ss in sets:
        fill_counts(ss, stream)
        total = int(sum(ss.counts))
        ob = old_base.get(ss.name)
        if ob is not None and int(ob["n"]) != total:
            raise RecipeError(f"shard set {ss.name!r} now holds {total} samples per epoch, not the checkpoint's "
                              f"{ob['n']}; resume on another size needs the same shards.")
        start = int(ob["start"]) if ob else 0
        masks = {int(e): decode_ranges(r, total) for e, r in (ob["epochs"].items() if ob else ())}
        for slot in range(n_old):
            src = slots.get(slot)
            pos = src["sources"].get(ss.name) if src else None
            e_s, p_s = (int(pos["epoch"]), int(pos["pos"])) if pos else (start, 0)
            st = stream(ss, seed, slot, n_old, split, base=ob)
            for e in range(start, e_s + 1):
                a = st.assignment(e)
                if e == e_s:
                    a = a[:p_s]
                if len(a):
                    masks.setdefault(e, np.zeros(total, dtype=bool))[a] = True
        while start in masks and masks[start].all() and total > 0:
            start += 1
        base[ss.name] = {"start": start, "n": total,
                         "epochs": {str(e): encode_ranges(m) for e, m in sorted(masks.items()) if e >= start}}
    return base


def resume_states(saved: list[dict], sets: list, seed: int, split: str, rank: int, world: int, workers: int,
                  loader: Any) -> dict:
    """This new rank's loader state (ShardLoader.state_dict form) for a run of `world` x `workers` slots
    from a checkpoint of another size: each new slot starts at its set's first epoch with samples left;
    the blend counters (`drawn`) are the old slots' mean so no set is favoured; the report counters
    (samples, skipped, errors, seen) all go to rank 0's first slot, so their sums stay right. `loader` is
    training.loader (passed in: it imports this module, never the reverse)."""
    base = merge(saved, sets, seed, split, loader.SlotStream)
    _, _, slots = _slot_states(saved)
    names = [s.name for s in sets]
    n_new = world * workers
    drawn = {n: sum(float(s["drawn"].get(n, 0)) for s in slots.values()) / n_new for n in names}
    states: dict[int, dict] = {}
    for v in range(workers):
        st = loader._fresh_state(names)
        st["sources"] = {n: {"epoch": base[n]["start"], "pos": 0} for n in names}
        st["drawn"] = dict(drawn)
        if rank == 0 and v == 0:
            for key in ("samples", "skipped"):
                st[key] = {n: sum(int(s[key].get(n, 0)) for s in slots.values()) for n in names}
            errors: dict[str, int] = {}
            for s in slots.values():
                for k, c in (s.get("errors") or {}).items():
                    errors[k] = errors.get(k, 0) + int(c)
            if errors:
                st["errors"] = errors
        states[v] = st
    merged: dict[str, dict] = {"seen": {}, "seen_tokens": {}, "seen_entries": {}}
    if rank == 0:
        for st in saved:
            for key in merged:
                for k, c in (st.get(key) or {}).items():
                    merged[key][k] = merged[key].get(k, 0) + c
    return {"version": loader.STATE_VERSION, "rank": rank, "world": world, "workers": workers, "consumed": 0,
            "states": copy.deepcopy(states), "elastic": base, **merged}
