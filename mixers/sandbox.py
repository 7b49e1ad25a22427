"""The sandbox that runs think-with-image code: a bubblewrap jail the code cannot switch off from inside.

Nothing here relies on hooks inside the Python that runs the code: whatever that code does to its
own interpreter (rewrite functions, walk `gc`, call `_posixsubprocess`, `ctypes`, `os._exit`), it
stays inside these kernel-enforced layers, all set up before its interpreter starts:

- a bubblewrap (`bwrap`) jail with new user, pid, network, ipc, uts and cgroup namespaces. Its
  file system holds only what the interpreter needs, read-only: the base Python installation, the
  site-packages folders that hold numpy and PIL, the shared libraries (`/usr/lib`, `/lib*`) and
  `/etc/ld.so.cache`; plus a fresh `/proc`, a minimal read-only `/dev`, and two small tmpfs
  folders, `/tmp` and the work folder `/sandbox` (the cwd), each capped at `fsize_mb`. No shell
  or other program is there, no home folder, no repository, no host `/tmp`; the root is read-only.
  The network namespace has only its own loopback. Nested user namespaces are disabled.
- the code runs as uid/gid 65534 with no capabilities and `no_new_privs`. When the caller is
  root, bubblewrap itself is started as host uid 65534 too (so that RLIMIT_NPROC, which the kernel
  never applies to root, bounds fork bombs); a Python installation under a folder that user cannot
  enter (e.g. `/root/.pyenv`) is made reachable in a private mount namespace of that one launch.
  Otherwise bubblewrap runs as the caller, whose uid the jail's 65534 maps to.
- a seccomp filter (built here as classic BPF for x86-64 and aarch64; on other machines the jail
  runs without it) refuses ptrace, mount, keyctl, bpf, perf_event_open, unshare/setns and namespace
  flags on clone, io_uring, module and kexec calls, and every socket family but AF_UNIX; a syscall
  made through a foreign ABI (32-bit calls on x86-64, x32) kills the process.
- rlimits set before bubblewrap starts, inherited by everything inside: RLIMIT_AS (`memory_mb`
  per process), RLIMIT_CPU, RLIMIT_FSIZE (`fsize_mb`), RLIMIT_NOFILE, RLIMIT_CORE 0; and
  RLIMIT_NPROC (`MAX_PROCS`), which the jail's first statement sets, before the code exists: set
  before bwrap it would also cap every process of the host uid at the parent namespace's level,
  so concurrent jails would starve each other. The code cannot raise a hard limit (that needs
  CAP_SYS_RESOURCE in the host's namespace). Total memory is therefore bounded by about
  `MAX_PROCS * memory_mb` plus the two tmpfs caps, not by one cgroup (no cgroups are created).
- a wall-clock deadline: at `timeout_s` bubblewrap's process group is SIGKILLed and so is the jail's
  pid 1 (bubblewrap's monitor, held by a pidfd from bwrap's `--info-fd`); the kernel then kills
  every process of the pid namespace, however detached (setsid, double fork, closed stdout), and
  `run_code` waits for pid 1 to be gone. The same kill ends every run, so nothing the code started
  outlives `run_code`, even when its main process finished early.
- results come back as data over a pipe: a JSON status and length-prefixed PNG bytes. The parent
  never opens a path the code could name; it caps what it reads (`MAX_RESULT_BYTES`), decodes
  every image itself (PNG only, at most `MAX_PIXELS`), re-encodes it, and rejects anything else.

Where `bwrap` is missing or cannot create its namespaces, `sandbox_available()` names the reason in
one sentence and `run_code` raises `SandboxUnavailable`; there is no fallback to a weaker sandbox.

The code sees `image` (the first input, a PIL image), `images` (all inputs, also the files
`input_0`, `input_1`, ... in its cwd), PIL's `Image`, `ImageOps`, `ImageEnhance`, `ImageFilter`
and `np`; it hands back a picture by assigning `result` or calling `save(img)` (several allowed).
`SandboxResult.reason` is one of ok | timeout | memory | error.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import io
import json
import os
import platform
import select
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

BWRAP: str | None = None  # the bwrap to use; None: `bwrap` on PATH, else /usr/bin/bwrap
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
SANDBOX_UID = SANDBOX_GID = 65534  # "nobody": the uid inside the jail, and on the host when we are root
WORK_IN = "/sandbox"  # the code's cwd inside the jail
CHILD_IN = "/.reelforge_sandbox_child.py"
MAX_PROCS = 8  # RLIMIT_NPROC: processes and threads of the jail's user (bwrap's pid 1 and the code count)
MAX_OPEN_FILES = 64
MAX_RESULT_BYTES = 64 << 20  # what the parent reads back from the result pipe, at most
MAX_PIXELS = 40_000_000  # per returned image
STDOUT_TAIL = 64 << 10  # bytes of the code's stdout/stderr kept (the rest is read and dropped)
RESULT_MAGIC = b"RFSB1"
REASONS = ("ok", "timeout", "memory", "error")


class SandboxUnavailable(RuntimeError):
    """This host cannot run the sandbox (no bubblewrap, or no namespaces); the message says why."""


@dataclass
class SandboxResult:
    ok: bool
    reason: str  # ok | timeout | memory | error
    images: list[bytes] = field(default_factory=list)  # PNG bytes, in the order the code produced them
    stdout: str = ""
    error: str = ""


# ---------------------------------------------------------------- seccomp (classic BPF, no library)

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# syscalls refused with EPERM: (x86-64 number, aarch64 number); None where the arch has none
_DENY = {
    "ptrace": (101, 117), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "sethostname": (170, 161),
    "setdomainname": (171, 162), "init_module": (175, 105), "delete_module": (176, 106),
    "finit_module": (313, 273), "kexec_load": (246, 104), "kexec_file_load": (320, 294), "keyctl": (250, 219),
    "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280), "perf_event_open": (298, 241),
    "unshare": (272, 97), "setns": (308, 268), "userfaultfd": (323, 282), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "kcmp": (312, 272), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "acct": (163, 89), "quotactl": (179, 60), "quotactl_fd": (443, 443),
    "iopl": (172, None), "ioperm": (173, None), "uselib": (134, None), "syslog": (103, 116),
    "lookup_dcookie": (212, 18), "vhangup": (153, 58), "fanotify_init": (300, 262),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "pidfd_getfd": (438, 438), "mount_setattr": (442, 442),
}
_CLONE, _CLONE3, _SOCKET = (56, 220), (435, 435), (41, 198)
_CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
_AF_UNIX = 1
_RET_ALLOW, _RET_KILL, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The jail's seccomp program (struct sock_filter[]) for this machine; None where we have no table."""
    machine = machine or platform.machine()
    if machine not in _AUDIT_ARCH:
        return None
    a = 0 if machine == "x86_64" else 1
    prog: list[tuple] = [(_LD_ABS, 0, 0, 4), (_JEQ, 0, "kill", _AUDIT_ARCH[machine]), (_LD_ABS, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI shares the arch value: refuse its numbers outright
        prog.append((_JGE, "deny", 0, 0x40000000))
    for nrs in _DENY.values():
        if nrs[a] is not None:
            prog.append((_JEQ, "deny", 0, nrs[a]))
    prog += [(_JEQ, "enosys", 0, _CLONE3[a]),  # glibc falls back to clone(), whose flags we can see
             (_JEQ, "socket", 0, _SOCKET[a]), (_JEQ, "clone", 0, _CLONE[a]), (_RET, 0, 0, _RET_ALLOW)]
    labels = {"socket": len(prog)}
    prog += [(_LD_ABS, 0, 0, 16), (_JEQ, "allow", "deny", _AF_UNIX)]
    labels["clone"] = len(prog)
    prog += [(_LD_ABS, 0, 0, 16), (_JSET, "deny", "allow", _CLONE_NS_FLAGS)]
    for name, ret in (("allow", _RET_ALLOW), ("deny", _RET_ERRNO | 1), ("enosys", _RET_ERRNO | 38),
                      ("kill", _RET_KILL)):
        labels[name] = len(prog)
        prog.append((_RET, 0, 0, ret))
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        assert 0 <= jt < 256 and 0 <= jf < 256
        out += struct.pack("=HBBI", code, jt, jf, k)
    return bytes(out)


# ---------------------------------------------------------------- what the jail holds

def _interpreter() -> tuple[str, str, list[str]]:
    """(python executable, its installation prefix, site-packages folders holding numpy and PIL)."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    sites = []
    for mod in ("numpy", "PIL"):
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.origin:
            raise SandboxUnavailable(f"the sandbox needs {mod}, which this Python cannot import")
        site = os.path.dirname(os.path.dirname(os.path.realpath(spec.origin)))
        if site not in sites:
            sites.append(site)
    return exe, prefix, sites


def _can(st: os.stat_result, bits: int) -> bool:
    """Whether the sandbox user has `bits` (as 'other' bits: 1 = x, 4 = r) on this inode."""
    if st.st_uid == SANDBOX_UID:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid == SANDBOX_GID:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def _hidden_root(path: str) -> str | None:
    """The topmost folder above `path` the sandbox user cannot enter, or None when it can reach it."""
    parts = path.strip("/").split("/")
    for i in range(len(parts) - 1):
        d = "/" + "/".join(parts[: i + 1])
        if not _can(os.stat(d), 1):
            return d
    return None


class _Plan:
    """Everything about this host's jail that does not change between runs (computed once)."""

    def __init__(self) -> None:
        self.bwrap = BWRAP or shutil.which("bwrap") or "/usr/bin/bwrap"
        if not os.access(self.bwrap, os.X_OK):
            raise SandboxUnavailable("think-with-image needs bubblewrap (`bwrap`), which is not installed on this "
                                     "host: install the `bubblewrap` package (e.g. `apt-get install bubblewrap`)")
        self.exe, self.prefix, self.sites = _interpreter()
        self.drop = os.geteuid() == 0  # root: start bwrap as SANDBOX_UID so that RLIMIT_NPROC holds
        ro = [self.prefix, *self.sites]
        if not any(self.exe.startswith(p + os.sep) for p in ro):
            ro.append(self.exe)
        self.ro = [p for p in ro if not any(p.startswith(q + os.sep) for q in ro if q != p)]
        self.hidden: dict[str, list[str]] = {}
        if self.drop:
            for p in self.ro:
                st = os.stat(p)
                if not _can(st, 5 if stat.S_ISDIR(st.st_mode) else 4):
                    raise SandboxUnavailable(f"the sandbox user (uid {SANDBOX_UID}) cannot read {p}, which the "
                                             "sandbox's Python needs: make it world-readable")
                h = _hidden_root(p)
                if h is not None:
                    self.hidden.setdefault(h, []).append(p)
        with open(CHILD, "rb") as f:
            self.child_src = f.read()
        self.seccomp = seccomp_filter()
        libc = ctypes.CDLL(None, use_errno=True)
        self._prctl, self._unshare, self._mount = libc.prctl, libc.unshare, libc.mount

    def args(self, work: str | None, fsize_mb: int, script_fd: int, seccomp_fd: int | None,
             result_fd: int, info_fd: int) -> list[str]:
        size = str(max(1, fsize_mb) << 20)
        a = [self.bwrap, "--info-fd", str(info_fd), "--unshare-all", "--unshare-user", "--disable-userns",
             "--die-with-parent", "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
             "--cap-drop", "ALL", "--hostname", "sandbox", "--proc", "/proc", "--dev", "/dev",
             "--size", size, "--tmpfs", "/tmp"]
        a += ["--bind", work, WORK_IN] if work else ["--size", size, "--tmpfs", WORK_IN]
        usr_libs = [d for d in ("/usr/lib", "/usr/lib64", "/usr/lib32") if os.path.isdir(d)]
        for d in usr_libs:
            a += ["--ro-bind", d, d]
        for d in ("/lib", "/lib64", "/lib32"):
            if os.path.islink(d):
                a += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                a += ["--ro-bind", d, d]
        if os.path.exists("/etc/ld.so.cache"):
            a += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        for p in self.ro:
            if not any(p == d or p.startswith(d + os.sep) for d in usr_libs):
                a += ["--ro-bind", p, p]
        a += ["--ro-bind-data", str(script_fd), CHILD_IN, "--remount-ro", "/dev", "--remount-ro", "/",
              "--chdir", WORK_IN, "--clearenv"]
        for k, v in (("PATH", "/nonexistent"), ("HOME", WORK_IN), ("TMPDIR", "/tmp"), ("LANG", "C.UTF-8"),
                     ("OMP_NUM_THREADS", "1"), ("OPENBLAS_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1")):
            a += ["--setenv", k, v]
        if seccomp_fd is not None:
            a += ["--seccomp", str(seccomp_fd)]
        cfg = json.dumps({"site": self.sites, "result_fd": result_fd, "nproc": MAX_PROCS})
        return a + ["--", self.exe, "-I", "-S", "-B", CHILD_IN, cfg]

    def preexec(self, memory_mb: int, cpu_s: int, fsize_mb: int, workdir: str | None = None):
        """Runs in the forked child just before bwrap is exec'd: no imports, no allocation-heavy work."""
        import resource

        hidden_map = {h: list(ps) for h, ps in self.hidden.items()}
        h = _hidden_root(workdir) if workdir and self.drop else None
        if h is not None:
            hidden_map.setdefault(h, []).append(workdir)
        hidden = [(h.encode(), [(p, p.encode()) for p in ps]) for h, ps in hidden_map.items()]
        drop, prctl, unshare, mount = self.drop, self._prctl, self._unshare, self._mount
        limits = []
        for res, v in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu_s),
                       (resource.RLIMIT_FSIZE, max(1, fsize_mb) << 20), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NOFILE, MAX_OPEN_FILES)):
            hard = v + 1 if res == resource.RLIMIT_CPU else v
            cur = resource.getrlimit(res)[1]  # never above what we already have: that would fail after the drop
            if cur != resource.RLIM_INFINITY:
                v, hard = min(v, cur), min(hard, cur)
            limits.append((res, v, hard))
        ms_bind, ms_rec, ms_slave, ms_nosuid, ms_nodev = 4096, 16384, 1 << 19, 2, 4

        def check(rc: int, what: str) -> None:
            if rc != 0:
                raise OSError(ctypes.get_errno(), what)

        def apply() -> None:
            if hidden:  # a private mount namespace where e.g. /root is a tmpfs holding only the binds we need
                check(unshare(0x00020000), "unshare(CLONE_NEWNS)")
                check(mount(b"none", b"/", None, ms_rec | ms_slave, None), "mount --make-rslave /")
                for h, paths in hidden:
                    fds = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p, _ in paths]
                    check(mount(b"tmpfs", h, b"tmpfs", ms_nosuid | ms_nodev, b"mode=0755,size=1m"), "tmpfs")
                    for (p, pb), fd in zip(paths, fds):
                        d = os.path.dirname(p)
                        os.makedirs(d, exist_ok=True)
                        while len(d) > len(h):
                            os.chmod(d, 0o755)
                            d = os.path.dirname(d)
                        if stat.S_ISDIR(os.fstat(fd).st_mode):
                            os.mkdir(p, 0o755)
                        else:
                            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
                        check(mount(f"/proc/self/fd/{fd}".encode(), pb, None, ms_bind | ms_rec, None), "bind")
                        os.close(fd)
            if drop:
                os.setgroups([])
                os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
                os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            for res, soft, hard in limits:
                resource.setrlimit(res, (soft, hard))
            prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: bwrap dies with the thread that started it

        return apply


_PLAN: _Plan | None = None
_PLAN_ERR: str | None = None
_PROBED: str | None | bool = False  # False: not probed yet
_LOCK = threading.Lock()


def _plan() -> _Plan:
    global _PLAN, _PLAN_ERR
    with _LOCK:
        if _PLAN is None and _PLAN_ERR is None:
            try:
                _PLAN = _Plan()
            except SandboxUnavailable as e:
                _PLAN_ERR = str(e)
        if _PLAN is None:
            raise SandboxUnavailable(_PLAN_ERR)
        return _PLAN


def _reset() -> None:
    """Forget the cached plan and probe (tests, or after installing bubblewrap)."""
    global _PLAN, _PLAN_ERR, _PROBED
    with _LOCK:
        _PLAN, _PLAN_ERR, _PROBED = None, None, False


def sandbox_available() -> str | None:
    """None when this host can run the sandbox, else one sentence saying why not (probed once per process)."""
    global _PROBED
    if _PROBED is not False:
        return _PROBED
    try:
        plan = _plan()
        buf = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (2, 2)).save(buf, "PNG")
        r = _run(plan, "result = image", [buf.getvalue()], 30.0, 512, 8, None)
        if r.ok:
            reason = None
        else:
            detail = (r.error.strip().splitlines() or ["no output"])[-1][:300]
            reason = ("bubblewrap could not start the sandbox on this host (" + detail + "): it needs bubblewrap "
                      "0.8 or newer and user namespaces (see `sysctl user.max_user_namespaces` and "
                      "`kernel.unprivileged_userns_clone`, or run in a container that allows them)")
    except SandboxUnavailable as e:
        reason = str(e)
    except (OSError, subprocess.SubprocessError) as e:
        reason = f"the sandbox could not be started on this host ({e})"
    _PROBED = reason
    return reason


# ---------------------------------------------------------------- running one piece of code

def _high(fd: int) -> int:
    """The same open file at a number >= 10 (stdio numbers stay free even in a parent that closed them)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0) if hasattr(os, "memfd_create") else os.open("/tmp", os.O_TMPFILE | os.O_RDWR)
    fd = _high(fd)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _stdin_blob(code: str, inputs: list[bytes]) -> bytes:
    parts = [b"RFIN", struct.pack("<I", len(inputs))]
    for data in inputs:
        parts += [struct.pack("<Q", len(data)), bytes(data)]
    c = code.encode("utf-8", "surrogatepass")
    return b"".join(parts + [struct.pack("<Q", len(c)), c])


def _reencode(data: bytes) -> bytes:
    """The PNG the parent hands on: decoded here (PNG only, pixel cap) and encoded again."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        w, h = im.size
        if w <= 0 or h <= 0 or w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} pixels is over the {MAX_PIXELS} pixel limit")
        im.load()
        out = io.BytesIO()
        im.save(out, "PNG")
    return out.getvalue()


def _parse(blob: bytes) -> tuple[dict, list[bytes]]:
    """Header and image bytes from the result pipe; ValueError on anything malformed."""
    if not blob.startswith(RESULT_MAGIC) or len(blob) < len(RESULT_MAGIC) + 4:
        raise ValueError("no result")
    pos = len(RESULT_MAGIC)
    (hlen,) = struct.unpack_from("<I", blob, pos)
    pos += 4
    if hlen > 1 << 16 or pos + hlen > len(blob):
        raise ValueError("bad header")
    head = json.loads(blob[pos:pos + hlen].decode())
    pos += hlen
    if not isinstance(head, dict) or head.get("status") not in ("ok", "error", "memory"):
        raise ValueError("bad status")
    sizes = head.get("sizes") or []
    if not isinstance(sizes, list) or not all(isinstance(n, int) and n >= 0 for n in sizes):
        raise ValueError("bad sizes")
    images = []
    for n in sizes:
        if pos + n > len(blob):
            raise ValueError("truncated")
        images.append(blob[pos:pos + n])
        pos += n
    if pos != len(blob):
        raise ValueError("trailing bytes")
    if not isinstance(head.get("error", ""), str):
        raise ValueError("bad error")
    return head, images


def _tail(b: bytearray) -> str:
    return bytes(b).decode(errors="replace")[-2000:]


class _Jail:
    """The jail's pid 1 (bubblewrap's monitor, named on its info fd), held by a pidfd once known."""

    def __init__(self) -> None:
        self.info = bytearray()
        self.pidfd: int | None = None
        self.pid: int | None = None

    def feed(self, chunk: bytes) -> None:
        if len(self.info) < 1 << 16:
            self.info += chunk[: 1 << 16]
        if self.pid is None:
            try:
                self.pid = int(json.loads(bytes(self.info).decode())["child-pid"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                return
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # gone already, or no pidfds: end() polls /proc
                self.pidfd = None

    def end(self, wait_s: float = 2.0) -> None:
        """SIGKILL pid 1 and wait until it has exited: the kernel has then killed and reaped every process of
        its pid namespace (detached, setsid'd or not)."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass
            select.select([self.pidfd], [], [], wait_s)
            os.close(self.pidfd)
            self.pidfd = None
            return
        if self.pid is None:
            return
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            try:
                with open(f"/proc/{self.pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                        return
            except (OSError, IndexError):
                return
            time.sleep(0.01)


def _run(plan: _Plan, code: str, inputs: list[bytes], timeout_s: float, memory_mb: int, fsize_mb: int,
         workdir: str | None) -> SandboxResult:
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        if plan.drop:
            os.chown(workdir, SANDBOX_UID, SANDBOX_GID)
        workdir = os.path.realpath(workdir)
    stdin_fd = _memfd("reelforge-sandbox-in", _stdin_blob(code, inputs))
    script_fd = _memfd("reelforge-sandbox-child", plan.child_src)
    seccomp_fd = _memfd("reelforge-sandbox-seccomp", plan.seccomp) if plan.seccomp else None
    res_r, res_w = (_high(f) for f in os.pipe())
    info_r, info_w = (_high(f) for f in os.pipe())
    fds = [stdin_fd, script_fd, res_w, info_w] + ([seccomp_fd] if seccomp_fd is not None else [])
    try:
        args = plan.args(workdir, fsize_mb, script_fd, seccomp_fd, res_w, info_w)
        deadline = time.monotonic() + timeout_s
        proc = subprocess.Popen(args, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=[f for f in fds if f != stdin_fd], env={"PATH": "/usr/bin:/bin"},
                                start_new_session=True,
                                preexec_fn=plan.preexec(memory_mb, int(timeout_s) + 1, fsize_mb, workdir))
    except BaseException:
        os.close(res_r)
        os.close(info_r)
        raise
    finally:
        for f in fds:
            os.close(f)
    result, out, err, jail = bytearray(), bytearray(), bytearray(), _Jail()
    why = None  # "timeout" | "overflow"
    sel = selectors.DefaultSelector()
    streams = {res_r: result, info_r: jail.info, proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    for f in streams:
        os.set_blocking(f, False)
        sel.register(f, selectors.EVENT_READ)
    try:
        while streams and why is None:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(min(left, 0.5)):
                f = key.fd
                try:
                    chunk = os.read(f, 1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(f)
                    del streams[f]
                    continue
                if f == info_r:
                    jail.feed(chunk)
                    continue
                buf = streams[f]
                buf += chunk
                if f == res_r:
                    if len(buf) > MAX_RESULT_BYTES + (1 << 20):
                        why = "overflow"
                        break
                elif len(buf) > 2 * STDOUT_TAIL:
                    del buf[:-STDOUT_TAIL]
        if why is None:  # every pipe is closed: the jail's pid 1 is gone or going
            try:
                proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                why = "timeout"
    finally:
        if proc.poll() is None:  # still running (and not reaped, so its group id is still its own)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap and the jail's pid 1: the pid namespace dies with it
            except ProcessLookupError:
                pass
        jail.end()  # also after a normal end: whatever the code left running dies now, not a moment later
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kernel that will not reap it
            pass
        sel.close()
        os.close(res_r)
        os.close(info_r)
        proc.stdout.close()
        proc.stderr.close()
    stdout = _tail(out)
    if why == "timeout":
        return SandboxResult(False, "timeout", stdout=stdout,
                             error=f"the code ran past its limit of {timeout_s:g}s and was killed")
    if why == "overflow":
        return SandboxResult(False, "error", stdout=stdout,
                             error=f"the code's output ran past {MAX_RESULT_BYTES >> 20} MiB and was killed")
    stderr = _tail(err)
    try:
        head, blobs = _parse(bytes(result))
    except (ValueError, UnicodeDecodeError):
        rc = proc.returncode
        if rc in (128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGXCPU, -signal.SIGKILL):
            return SandboxResult(False, "timeout", stdout=stdout, error="the code ran past its CPU time limit")
        if "MemoryError" in stderr:
            return SandboxResult(False, "memory", stdout=stdout, error="the code ran past its memory limit")
        return SandboxResult(False, "error", stdout=stdout,
                             error=f"the sandbox ended without a valid result (exit status {rc}): {stderr}"[-2000:])
    if head["status"] != "ok":
        return SandboxResult(False, head["status"], stdout=stdout, error=head.get("error", "")[-2000:])
    if not blobs:
        return SandboxResult(False, "error", stdout=stdout, error="the code produced no image")
    images = []
    for k, b in enumerate(blobs):
        try:
            images.append(_reencode(b))
        except Exception as e:  # noqa: BLE001 - anything that is not a sane PNG is refused
            return SandboxResult(False, "error", stdout=stdout,
                                 error=f"image {k} the code returned is not a valid PNG: {e}"[:500])
    return SandboxResult(True, "ok", images, stdout)


def run_code(code: str, inputs: list[bytes], timeout_s: float = 10.0, memory_mb: int = 1024,
             fsize_mb: int = 64, workdir: str | None = None) -> SandboxResult:
    """Run `code` on `inputs` (image file bytes) in a fresh bubblewrap jail; see the module docstring.

    `workdir`, when given, is a host folder bound read-write as the code's cwd (made the sandbox
    user's when we are root; the parent never reads it); by default the cwd is a fresh tmpfs.
    Raises SandboxUnavailable when this host cannot run the jail."""
    reason = sandbox_available()
    if reason is not None:
        raise SandboxUnavailable(reason)
    return _run(_plan(), code, inputs, float(timeout_s), int(memory_mb), int(fsize_mb), workdir)
