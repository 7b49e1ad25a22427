"""Shared by the writer benchmarks: run the project and its peer in alternating order, so
neither always pays for a cold page cache or a warm one."""

from __future__ import annotations

import glob
import os
import shutil
from typing import Callable


def tar_bytes(d: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(d, "**", "*.tar"), recursive=True))


def alternate(work: str, repeats: int, n: int,
              runners: dict[str, Callable[[str], float]]) -> tuple[dict[str, list[float]], dict[str, int]]:
    """runners: name -> fn(out_dir) returning seconds. Prints one row per run; returns the
    seconds of each run and the bytes each writer wrote."""
    times: dict[str, list[float]] = {w: [] for w in runners}
    out_bytes: dict[str, int] = {}
    names = list(runners)
    print(f"\n{'rep':>3} {'writer':<8} {'seconds':>8} {'samples/s':>10} {'MB/s':>8}")
    for rep in range(repeats):
        for w in (names if rep % 2 == 0 else names[::-1]):
            d = os.path.join(work, f"out-{w}")
            if os.path.exists(d):
                shutil.rmtree(d)
            sec = runners[w](d)
            out_bytes[w] = tar_bytes(d)
            times[w].append(sec)
            print(f"{rep:>3} {w:<8} {sec:>8.3f} {n / sec:>10.0f} {out_bytes[w] / sec / 1e6:>8.1f}")
            shutil.rmtree(d)
    return times, out_bytes
