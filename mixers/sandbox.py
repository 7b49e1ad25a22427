"""The sandbox that runs think-with-image code: a subprocess with time, memory and file limits.

Layers, each enough to stop the obvious escape on its own where the host allows it:

- a fresh Python (`-I`: no user site, no PYTHON* variables) in a new session, killed with its
  whole process group at `timeout_s` (wall clock; RLIMIT_CPU backs it up);
- RLIMIT_AS caps its memory (`memory_mb`), RLIMIT_FSIZE the size of any file it writes;
- a new network namespace with no interfaces when the host permits (root, or user namespaces);
- inside the child, before the user's code runs, an audit hook (PEP 578, cannot be removed
  from Python) refuses every socket operation, every process spawn, ctypes, writes outside
  the work folder and reads outside the work folder and the Python installation.

The code sees `image` (the input, a PIL image), `images` (all inputs), PIL's `Image`,
`ImageOps`, `ImageEnhance`, `ImageFilter` and `np`; it hands back a picture by assigning
`result` or calling `save(img)` (several allowed). Only the work folder holds its inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
CLONE_NEWNET = 0x40000000


@dataclass
class SandboxResult:
    ok: bool
    reason: str  # ok | timeout | memory | refused | error
    images: list[bytes] = field(default_factory=list)  # PNG bytes, in the order the code produced them
    stdout: str = ""
    error: str = ""


def _limits(memory_mb: int, cpu_s: int, fsize_mb: int):
    def apply() -> None:
        import resource

        os.setsid()
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_mb << 20, fsize_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:  # no network interfaces at all, where the kernel lets us
            import ctypes

            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
        except Exception:  # noqa: BLE001 - the audit hook still refuses sockets
            pass

    return apply


def run_code(code: str, inputs: list[bytes], timeout_s: float = 10.0, memory_mb: int = 1024,
             fsize_mb: int = 64, workdir: str | None = None) -> SandboxResult:
    """Run `code` on `inputs` (image file bytes) in a fresh sandboxed process."""
    own = workdir is None
    work = workdir or tempfile.mkdtemp(prefix="reelforge-sandbox-")
    os.makedirs(work, exist_ok=True)
    try:
        names = []
        for i, data in enumerate(inputs):
            name = f"input_{i}"
            with open(os.path.join(work, name), "wb") as f:
                f.write(data)
            names.append(name)
        with open(os.path.join(work, "_code.py"), "w") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "HOME": work, "TMPDIR": work}
        proc = subprocess.Popen([sys.executable, "-I", CHILD, work, json.dumps(names)], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                preexec_fn=_limits(memory_mb, int(timeout_s) + 1, fsize_mb))
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return SandboxResult(False, "timeout", stdout=out.decode(errors="replace")[-2000:],
                                 error=f"the code ran past its limit of {timeout_s:g}s and was killed")
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        res_path = os.path.join(work, "_result.json")
        res = {}
        if os.path.exists(res_path):
            with open(res_path) as f:
                res = json.load(f)
        if proc.returncode == 0 and res.get("status") == "ok":
            images = []
            for name in res["outputs"]:
                with open(os.path.join(work, name), "rb") as f:
                    images.append(f.read())
            return SandboxResult(True, "ok", images, stdout[-2000:])
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not res:
            return SandboxResult(False, "timeout", stdout=stdout[-2000:], error="CPU time limit")
        reason = res.get("status") or ("memory" if "MemoryError" in stderr else "error")
        return SandboxResult(False, reason, stdout=stdout[-2000:], error=(res.get("error") or stderr)[-2000:])
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
