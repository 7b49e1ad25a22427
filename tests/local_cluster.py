"""One `local-cluster` Spark for the whole test run.

The parity tests (marked `cluster`) each compare a recipe's local[2] decisions with the same
recipe run on `local-cluster[2,1,1024]`: separate executor JVMs and Python workers, nothing
shared with the driver. Starting that cluster (a driver JVM, a master, a worker, two executor
JVMs) costs more than most of the small recipes the tests run, so one long-lived process holds
a single local-cluster session and runs every recipe it is sent, one after another, with
`run_recipe` exactly as `reelforge run --master ...` does. conftest.py starts it when the
session begins (when any selected test uses it) and runs the parity tests last, back to back:
the JVMs start beside the other tests, and the executors' Python workers, which Spark ends after
a minute idle, stay warm from one parity recipe to the next.

Run as a script it is that process: one JSON request a line on stdin ({"recipe", "out"}), one
answer a line on stdout ({"ok": true, "report": ...} or {"ok": false, "error": traceback}).
Everything else it or Spark writes goes to stderr, which the client keeps in a log file for
failure messages.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import traceback

MASTER = "local-cluster[2,1,1024]"


class LocalCluster:
    """The client: starts the server, sends it recipes, reads back their reports."""

    def __init__(self, log_path: str, master: str = MASTER):
        self.log_path, self.master = log_path, master
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        """Start the server (it starts Spark at once) unless it runs."""
        if self.proc is None or self.proc.poll() is not None:
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.master],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                         text=True, bufsize=1)
        return self.proc

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-n:]

    def run(self, recipe, out, timeout: float = 900, work: str | None = None, env: dict | None = None) -> dict:
        """Run `recipe` into `out` (a folder or a URL) on the cluster; its report, or an AssertionError
        saying why not. `work`: a URL output's staging folder; `env`: variables set in the server first."""
        proc = self.start()
        proc.stdin.write(json.dumps({"recipe": str(recipe), "out": str(out), "work": work, "env": env or {}}) + "\n")
        proc.stdin.flush()
        if not select.select([proc.stdout], [], [], timeout)[0]:
            self.close()
            raise AssertionError(f"local-cluster run of {recipe} took over {timeout} s\n{self.log_tail()}")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the local-cluster process ended (rc {proc.wait()})\n{self.log_tail()}")
        answer = json.loads(line)
        assert answer["ok"], answer["error"][-3000:] + "\n" + self.log_tail()
        return answer["report"]

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.stdin.close()  # the server stops Spark and leaves at the end of its input
                try:
                    self.proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self._log.close()
            self.proc = None


def serve(master: str) -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the JVM's and any print's output goes to the log, never into the answers
    from reelforge.jobs.recipe import load_recipe
    from reelforge.jobs.remote import run as run_recipe  # a local recipe: jobs.run.run_recipe; a URL: mirror, publish
    from reelforge.jobs.spark import get_spark

    spark = get_spark(master)  # the JVMs start now, while the client's session runs other tests
    try:
        for line in sys.stdin:
            req = json.loads(line)
            try:
                os.environ.update(req.get("env") or {})
                report = run_recipe(load_recipe(req["recipe"], out=req["out"]), spark=spark,
                                    log=lambda s: print(s, file=sys.stderr), work=req.get("work"))
                answer = {"ok": True, "report": report}
            except BaseException:  # noqa: BLE001 - the client shows it
                answer = {"ok": False, "error": traceback.format_exc()}
            answers.write(json.dumps(answer, default=str) + "\n")
    finally:
        spark.stop()


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else MASTER)
