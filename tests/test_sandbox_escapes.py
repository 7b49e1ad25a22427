"""Every escape a hostile `tool_steps` row tried (or could try) against the think-with-image sandbox fails.

Each test plants a secret on the host, runs attacker code that switches off whatever in-process
defence it can find and then tries to read, write, connect or outlive the run, and asserts that the
secret never comes back (stdout, error text, returned PNG bytes or their decoded pixels), that nothing
appeared on the host, and that nothing the code started is still running.
"""

from __future__ import annotations

import io
import os
import socket
import time
import uuid

import pytest
from PIL import Image

from reelforge.mixers import sandbox
from reelforge.mixers.sandbox import run_code, sandbox_available

WHY = sandbox_available()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"sandbox unavailable here: {WHY}")

# defined first in every attack: hands `data` back every way the code can (stdout and an image's pixels)
EXFIL = """
def exfil(data):
    global result
    if isinstance(data, str):
        data = data.encode()
    print(data)
    result = Image.frombytes('L', (max(1, len(data)), 1), data or b'\\0')
"""


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def secret(tmp_path):
    """A host file the code must never see: (path, content)."""
    token = f"RF-SECRET-{uuid.uuid4().hex}".encode()
    path = tmp_path / "vault" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(token)
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)  # readable by anyone on the host: only the jail keeps it out
    return str(path), token


def leaked(r, token: bytes) -> bool:
    blobs = [r.stdout.encode(errors="ignore"), r.error.encode(errors="ignore")]
    for b in r.images:
        blobs.append(b)
        with Image.open(io.BytesIO(b)) as im:
            blobs.append(im.tobytes())
    return any(token in x for x in blobs)


def survivors(marker: str) -> list[int]:
    """Host processes whose command line carries `marker`."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(d))
            except OSError:
                pass
    return found


def attack(code: str, png: bytes, **kw):
    return run_code(EXFIL + code, [png], **kw)


def test_the_leak_detector_sees_an_exfiltrated_value(png):
    r = attack("exfil(b'CONTROL-' + open('input_0', 'rb').read()[1:4])", png)
    assert r.ok, r.error
    assert leaked(r, b"CONTROL-PNG")


def test_reading_host_files_fails(png, secret):
    path, token = secret
    for target in (path, f"/proc/1/root{path}", f"/proc/self/root{path}", "/etc/shadow", "/etc/passwd",
                   "/root/.bashrc", os.path.abspath("README.md"), os.path.abspath(__file__)):
        r = attack(f"exfil(open({target!r}, 'rb').read())", png)
        assert not r.ok and r.reason == "error", (target, r)
        assert not leaked(r, token) and not leaked(r, b"root:")
    r = attack(f"import os\nexfil(repr(os.listdir({os.path.dirname(path)!r})))", png)
    assert not r.ok and not leaked(r, b"secret.txt")


def test_replacing_the_audit_hook_code_does_not_help(png, secret):
    path, token = secret
    code = f"""
for name in ('_hook', 'audit', 'hook'):
    h = save.__globals__.get(name)
    if callable(h):
        h.__code__ = (lambda event, args: None).__code__
exfil(open({path!r}, 'rb').read())
"""
    r = attack(code, png)
    assert not r.ok and not leaked(r, token)


def test_finding_hooks_through_gc_does_not_help(png, secret):
    path, token = secret
    code = f"""
import gc, sys
for o in gc.get_objects():
    if callable(o) and getattr(o, '__name__', '') in ('_hook', 'apply', 'check'):
        try:
            o.__code__ = (lambda *a, **k: None).__code__
        except Exception:
            pass
exfil(open({path!r}, 'rb').read())
"""
    r = attack(code, png)
    assert not r.ok and not leaked(r, token)


def test_blanking_the_child_globals_does_not_help(png, secret):
    path, token = secret
    code = f"""
g = save.__globals__
for k in ('WORK', 'READ_OK', 'REFUSED', 'CFG', 'RESULT_FD'):
    g[k] = '/' if k == 'WORK' else g.get(k)
g['outputs'] = [open({path!r}, 'rb').read()]
"""
    r = attack(code, png)
    assert not r.ok and not leaked(r, token)


def test_a_forged_result_naming_a_host_file_is_not_read(png, secret):
    path, token = secret
    code = f"""
import json, os
json.dump({{'status': 'ok', 'outputs': [{path!r}]}}, open('_result.json', 'w'))
open('output_0.png', 'w').write({path!r})
os._exit(0)
"""
    r = attack(code, png)
    assert not r.ok and r.images == [] and not leaked(r, token)
    # the result pipe carries bytes, never names: a frame claiming success with a path in it is refused
    code = f"""
import json, os, struct
fd = save.__globals__['RESULT_FD']
body = {path!r}.encode()
head = json.dumps({{'status': 'ok', 'error': '', 'sizes': [len(body)]}}).encode()
os.write(fd, b'RFSB1' + struct.pack('<I', len(head)) + head + body)
os._exit(0)
"""
    r = attack(code, png)
    assert not r.ok and r.reason == "error" and "not a valid PNG" in r.error and not leaked(r, token)


def test_posixsubprocess_and_every_other_way_to_run_a_program_fails(png, secret, tmp_path):
    path, token = secret
    marker = tmp_path / "ran.txt"
    attempts = {
        "fork_exec": f"""
import _posixsubprocess, os, subprocess
r, w = os.pipe()
subprocess.Popen._execute_child  # the route subprocess takes: _posixsubprocess.fork_exec, no audit event
p = subprocess.Popen(['/bin/cat', {path!r}], stdout=w)
exfil(os.read(r, 100))
""",
        "subprocess.run": f"import subprocess\nexfil(subprocess.run(['cat', {path!r}], capture_output=True).stdout)",
        "os.system": f"import os\nos.system('cat {path} > {marker}')\nexfil(open({str(marker)!r}, 'rb').read())",
        "posix_spawn": f"import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'cat {path} > {marker}'], {{}})\n"
                       f"exfil(open({str(marker)!r}, 'rb').read())",
        "ctypes.system": f"import ctypes\nctypes.CDLL(None).system(b'cp {path} {marker}')\n"
                         f"exfil(open({str(marker)!r}, 'rb').read())",
        "python child": f"import subprocess, sys\n"
                        f"exfil(subprocess.run([sys.executable, '-c', \"print(open({path!r}).read())\"],"
                        f" capture_output=True).stdout)",
        "raw fork_exec": f"""
import _posixsubprocess, os, sys
r, w = os.pipe()
e_r, e_w = os.pipe()
exe = sys.executable.encode()
args = [exe, b'-c', b"print(open({path!r}).read())"]
common = (args, [exe], True, (w,), None, None, -1, -1, -1, w, -1, -1, e_r, e_w, True, False)
try:
    _posixsubprocess.fork_exec(*common, -1, -1, None, -1, -1, None, True)  # 3.11: + process_group ... vfork
except TypeError:
    _posixsubprocess.fork_exec(*common, None, -1, -1, -1, None)  # 3.10
os.close(w)
os.close(e_w)
exfil(os.read(r, 100) + os.read(e_r, 100))
""",
    }
    for name, code in attempts.items():
        r = attack(code, png)
        assert not leaked(r, token), name
        assert not marker.exists(), name
        # the one route that runs at all is the jail's own python, which cannot see the secret either
        assert not r.ok or name in ("python child", "raw fork_exec"), (name, r)


def test_files_outside_the_work_folder_stay_untouched(png, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    tag = uuid.uuid4().hex
    host_tmp = [f"/tmp/reelforge-escape-{tag}.db", f"/tmp/reelforge-escape-{tag}.fifo",
                f"/tmp/reelforge-escape-{tag}.txt", f"/dev/shm/reelforge-escape-{tag}"]
    outside = [str(tmp_path / "x.db"), str(tmp_path / "fifo"), str(tmp_path / "escape.txt"), str(tmp_path / "d")]
    code = f"""
import os, shutil, sqlite3
done = []
for attempt in (lambda: sqlite3.connect({host_tmp[0]!r}).execute('create table t(x)'),
                lambda: sqlite3.connect({outside[0]!r}).execute('create table t(x)'),
                lambda: os.mkfifo({host_tmp[1]!r}), lambda: os.mkfifo({outside[1]!r}),
                lambda: open({host_tmp[2]!r}, 'w').write('x'), lambda: open({outside[2]!r}, 'w').write('x'),
                lambda: open({host_tmp[3]!r}, 'w').write('x'), lambda: os.makedirs({outside[3]!r}),
                lambda: open({str(victim)!r}, 'w').write('overwritten'), lambda: os.remove({str(victim)!r}),
                lambda: shutil.rmtree({str(tmp_path)!r}), lambda: os.symlink('/', 'host-root'),
                lambda: open('/usr/lib/evil', 'w'), lambda: open('/etc/ld.so.preload', 'w')):
    try:
        attempt()
        done.append(True)
    except Exception as e:
        done.append(type(e).__name__)
print(done)
result = image
"""
    r = run_code(code, [png])
    assert r.ok, r.error
    for p in host_tmp + outside:
        assert not os.path.exists(p), p
    assert victim.read_text() == "intact"
    assert not os.path.exists("/usr/lib/evil") and not os.path.exists("/etc/ld.so.preload")


def test_sockets_reach_nothing_on_the_host(png, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    unix_path = str(tmp_path / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen(1)
    unix.settimeout(0.3)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0reelforge-escape-{uuid.uuid4().hex}")
    abstract.listen(1)
    abstract.settimeout(0.3)
    try:
        for target in (f"socket.create_connection(('127.0.0.1', {port}), timeout=2)",
                       f"socket.create_connection(('localhost', {port}), timeout=2)",
                       "urllib.request.urlopen('http://example.com', timeout=2)",
                       f"socket.socket(socket.AF_UNIX).connect({unix_path!r})",
                       f"socket.socket(socket.AF_UNIX).connect({abstract.getsockname()!r})"):
            r = run_code(f"import socket, urllib.request\n{target}\nresult = image", [png])
            assert not r.ok and r.reason == "error", (target, r)
        for s in (server, unix, abstract):
            with pytest.raises(socket.timeout):
                s.accept()  # nothing ever connected
    finally:
        server.close()
        unix.close()
        abstract.close()


def test_a_fork_bomb_is_bounded_and_ends_at_the_deadline(png):
    marker = f"rf-forkbomb-{uuid.uuid4().hex}"
    bomb = ("import os\\nn = 0\\nwhile True:\\n    try:\\n        os.fork()\\n        n += 1\\n"
            "    except OSError:\\n        pass")
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', '{bomb}  # {marker}'])"
    t = time.monotonic()
    r = run_code(code, [png], timeout_s=3)
    took = time.monotonic() - t
    assert not r.ok and r.reason == "timeout"
    assert took < 4.5, took
    assert survivors(marker) == []


def test_fork_count_is_capped(png):
    code = """
import os, time
n = 0
for _ in range(500):
    try:
        if os.fork() == 0:
            time.sleep(2)
            os._exit(0)
        n += 1
    except OSError:
        break
print('forked', n)
result = image
"""
    r = run_code(code, [png], timeout_s=10)
    assert r.ok, r.error
    assert 0 < int(r.stdout.split("forked")[1]) < sandbox.MAX_PROCS


@pytest.mark.parametrize("then", ["result = image", "import time\ntime.sleep(60)"])
def test_a_detached_double_fork_does_not_outlive_the_run(png, then):
    marker = f"rf-detached-{uuid.uuid4().hex}"
    code = f"""
import os, sys
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.closerange(0, 64)
        os.execv(sys.executable, [sys.executable, '-c', 'import time\\ntime.sleep(120)  # {marker}'])
    os._exit(0)
os.waitpid(pid, 0)
import time
for _ in range(100):
    if any(b'{marker}' in open(f'/proc/{{p}}/cmdline', 'rb').read() for p in os.listdir('/proc') if p.isdigit()):
        print('sleeper started')
        break
    time.sleep(0.02)
{then}
"""
    t = time.monotonic()
    r = run_code(code, [png], timeout_s=3)
    took = time.monotonic() - t
    if then == "result = image":
        assert r.ok, r.error
        assert "sleeper started" in r.stdout
        assert took < 3
    else:
        assert r.reason == "timeout" and took < 4.0
    assert survivors(marker) == []


def test_closing_stdout_and_looping_still_ends_on_time(png):
    t = time.monotonic()
    r = run_code("import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass", [png], timeout_s=2)
    assert r.reason == "timeout" and time.monotonic() - t < 3.0


def test_huge_outputs_are_capped(png, monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_RESULT_BYTES", 1 << 20)
    r = run_code("result = Image.fromarray(np.random.randint(0, 255, (1024, 1024, 3), dtype=np.uint8))", [png])
    assert not r.ok and r.reason == "error" and "ran past" in r.error
    monkeypatch.setattr(sandbox, "MAX_PIXELS", 1_000_000)
    r = run_code("result = Image.new('L', (2000, 2000))", [png])
    assert not r.ok and "pixel limit" in r.error
    r = run_code("print('x' * (50 << 20))\nresult = image", [png])
    assert r.ok and len(r.stdout) <= 2000 and set(r.stdout.strip()) == {"x"}
    t = time.monotonic()
    r = run_code("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)", [png], timeout_s=2)
    assert r.reason == "timeout" and len(r.stdout) <= 2000 and time.monotonic() - t < 3.0
    r = run_code("open('big', 'wb').write(b'0' * (80 << 20))\nresult = image", [png], fsize_mb=16)
    assert not r.ok  # RLIMIT_FSIZE and the tmpfs cap


def test_memory_exhaustion_stays_inside(png):
    r = run_code("x = []\nwhile True:\n    x.append(bytearray(64 << 20))", [png], memory_mb=256, timeout_s=10)
    assert not r.ok and r.reason in ("memory", "error")
    r = run_code("open('/tmp/fill', 'wb').write(b'0' * (200 << 20))\nresult = image", [png], fsize_mb=32)
    assert not r.ok  # /tmp is a tmpfs capped at fsize_mb, not host memory


def test_concurrent_jails_do_not_starve_each_other(png):
    """A jail that spends its whole process budget leaves the others (run at the same time) untouched."""
    from concurrent.futures import ThreadPoolExecutor

    hog = ("import os, time\nfor _ in range(100):\n    try:\n        if os.fork() == 0:\n            time.sleep(5)\n"
           "            os._exit(0)\n    except OSError:\n        break\ntime.sleep(1.5)\nresult = image")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run_code, hog, [png], timeout_s=10)]
        time.sleep(0.5)
        futures += [pool.submit(run_code, "result = image.rotate(45)", [png]) for _ in range(3)]
        results = [f.result() for f in futures]
    assert all(r.ok for r in results), [r.error for r in results]
