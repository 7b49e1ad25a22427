"""A progress bar with an ETA for one step of a run, read from Spark's status tracker.

`step_progress(spark, "[3/9] clip_score", log)` wraps the code that runs a step's Spark jobs:

    [3/9] clip_score  ▕████████▉           ▏  45% 120/266 tasks  elapsed 0:42  ETA 0:51

- The jobs the wrapped code starts carry a job group of their own (a local property of the
  calling thread, put back afterwards); a daemon thread polls `sc.statusTracker()` every
  `POLL_S` seconds: the group's jobs and their stages, plus every stage active while the step
  runs (jobs started by other threads of the step), each stage's numTasks / numCompletedTasks /
  numActiveTasks / numFailedTasks. A stage a finished job skipped counts only what it ran.
- ETA = tasks left / (tasks completed / seconds elapsed), over the tasks of the stages seen so
  far for the step: "ETA ?" until a task has finished. Stages that Spark has not planned yet
  are not known, so the percentage can step back when a new stage appears.
- On a terminal (stderr is a TTY) one line is redrawn in place (`\\r`) on stderr and ended with
  a newline when the step ends. Elsewhere (logs, CI) the `log` callable gets one plain line at
  most every `REELFORGE_PROGRESS_EVERY` seconds (default 10) and one when the step ends.
- `REELFORGE_PROGRESS=0` turns it off (Spark's own console bar is then left as Spark sets it;
  while ours is on, `jobs.spark.get_spark` turns Spark's off so the two do not fight).

The poll thread does all the work; the step's thread only sets the group and, at the end, stops
the poller (an Event, so it stops at once) and prints the last line: a small run is not slowed.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

POLL_S = 0.5
SETTLE_S = 1.0
DEFAULT_EVERY_S = 10.0
BAR_WIDTH = 20
_EIGHTHS = " ▏▎▍▌▋▊▉"
_GROUP = "spark.jobGroup.id"
_ids = itertools.count(1)


def enabled() -> bool:
    return os.environ.get("REELFORGE_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def every_s() -> float:
    """Seconds between two plain progress lines (not on a TTY): REELFORGE_PROGRESS_EVERY, default 10."""
    try:
        v = float(os.environ.get("REELFORGE_PROGRESS_EVERY", DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S
    return v if v >= 0 else DEFAULT_EVERY_S


def fmt_duration(seconds: float) -> str:
    """0:42, 12:03, 1:02:03."""
    s = int(max(0.0, seconds) + 0.5)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """`▕████▌    ▏`: `width` cells, each in eighths."""
    eighths = int(round(min(1.0, max(0.0, fraction)) * width * 8))
    full, part = divmod(eighths, 8)
    cells = "█" * full + (_EIGHTHS[part] if part and full < width else "")
    return "▕" + cells.ljust(width) + "▏"


def eta_s(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the rate of the tasks completed so far; None before the first one."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0, total - done) * elapsed / done


def render(label: str, done: int, total: int, elapsed: float, active: int = 0, failed: int = 0) -> str:
    pct = int(100 * done / total) if total else 0
    eta = eta_s(done, total, elapsed)
    line = (f"{label}  {bar(done / total if total else 0.0)} {pct:3d}% {done}/{total} tasks  "
            f"elapsed {fmt_duration(elapsed)}  ETA {'?' if eta is None else fmt_duration(eta)}")
    if failed:
        line += f"  ({failed} failed)"
    return line


class StepProgress:
    """Polls `tracker` (Spark's StatusTracker, or anything with its methods) for the jobs of
    `group` and the stages active meanwhile; shows the bar on `stream` (TTY) or through `log`."""

    def __init__(self, tracker, label: str, log: Callable[[str], None] = print, *, group: str | None = None,
                 stream=None, tty: bool | None = None, every: float | None = None, poll: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.tracker, self.label, self.log, self.group = tracker, label, log, group
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.every = every_s() if every is None else every
        self.poll = poll
        self.clock = clock
        self.stages: dict[int, tuple[int, int, int, int]] = {}  # stage id -> (tasks, completed, active, failed)
        self.finished: set[int] = set()  # stages complete: not asked again
        self.skipped: set[int] = set()  # stages of a finished job that did not run (or not all of it)
        self.lines: list[str] = []  # every line shown (the tests read them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0
        self.t0 = clock()
        self._last = self.t0

    # --- what Spark says ---------------------------------------------------------------------

    def update(self) -> None:
        t = self.tracker
        ids: set[int] = set(t.getActiveStageIds() or []) | set(self.stages)  # and the ones seen before
        done_jobs: list = []
        if self.group is not None:
            for jid in t.getJobIdsForGroup(self.group) or []:
                info = t.getJobInfo(jid)
                if info is None:
                    continue
                ids.update(info.stageIds)
                if str(info.status) in ("SUCCEEDED", "FAILED"):
                    done_jobs.append(info)
        for sid in ids - self.finished - self.skipped:
            info = t.getStageInfo(sid)
            if info is None:
                continue
            n, ok = int(info.numTasks), int(info.numCompletedTasks)
            self.stages[sid] = (n, min(ok, n), int(info.numActiveTasks), int(info.numFailedTasks))
            if n and ok >= n:
                self.finished.add(sid)
        for info in done_jobs:  # what a finished job did not run was skipped (its output was there)
            for sid in info.stageIds:
                if sid in self.stages and sid not in self.finished:
                    self.skipped.add(sid)

    def counts(self) -> tuple[int, int, int, int]:
        """(completed, total, active, failed) tasks over the stages seen so far."""
        done = total = active = failed = 0
        for sid, (n, ok, act, bad) in self.stages.items():
            total += ok if sid in self.skipped else n
            done += ok
            active += 0 if sid in self.skipped else act
            failed += bad
        return done, total, active, failed

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        done, total, active, failed = self.counts()
        return render(self.label, done, total, now - self.t0, active, failed)

    # --- showing it --------------------------------------------------------------------------

    def _show(self, text: str, final: bool = False) -> None:
        self.lines.append(text)
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self.stream.flush()
        else:
            self.log(text)

    def tick(self, now: float | None = None) -> None:
        """One poll: ask Spark, then redraw (TTY) or log a line when `every` seconds have passed."""
        now = self.clock() if now is None else now
        self.update()
        if self.tty:
            self._show(self.line(now))
        elif now - self._last >= self.every:
            self._last = now
            self._show(self.line(now))

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - Spark stopping under us: the step itself says what went wrong
                return

    def start(self) -> StepProgress:
        self.t0 = self._last = self.clock()
        self._thread = threading.Thread(target=self._loop, name=f"reelforge-progress-{self.label}", daemon=True)
        self._thread.start()
        return self

    def stop(self, ok: bool = True) -> None:
        """Stop polling (at once) and show the step's last line (on success: every task is in)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not ok:
            if self.tty and self._width:
                self.stream.write("\n")
                self.stream.flush()
            return
        # Spark's listener bus updates the tracker a moment after the jobs return: wait for it a
        # little (at most SETTLE_S) so that the last line counts every task the step ran
        deadline = time.monotonic() + SETTLE_S
        while True:
            try:
                self.update()
            except Exception:  # noqa: BLE001
                break
            done, total, _, _ = self.counts()
            if done >= total or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self._show(self.line(), final=True)


@contextmanager
def step_progress(spark, label: str, log: Callable[[str], None] = print, **kw):
    """Show a progress bar for the Spark jobs run inside the block (see the module's docstring)."""
    if spark is None or not enabled():
        yield None
        return
    sc = spark.sparkContext
    group = f"reelforge-{os.getpid()}-{next(_ids)}"
    before = sc.getLocalProperty(_GROUP)
    sc.setLocalProperty(_GROUP, group)
    p = StepProgress(sc.statusTracker(), label, log, group=group, **kw).start()
    ok = False
    try:
        yield p
        ok = True
    finally:
        sc.setLocalProperty(_GROUP, before)
        p.stop(ok)
