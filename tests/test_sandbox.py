"""The think-with-image sandbox: images come back right, limits hold, the jail's layers are in place,
and a host without bubblewrap refuses the mode instead of running code unjailed.

The escape attempts themselves are in tests/test_sandbox_escapes.py."""

from __future__ import annotations

import io
import os
import time

import pytest
from PIL import Image

from reelforge.mixers import sandbox
from reelforge.mixers.sandbox import SandboxUnavailable, run_code, sandbox_available

WHY = sandbox_available()
needs_jail = pytest.mark.skipif(WHY is not None, reason=f"sandbox unavailable here: {WHY}")


@pytest.fixture(scope="module")
def png() -> bytes:
    im = Image.new("RGB", (64, 48), (200, 10, 10))
    im.paste((10, 200, 10), (0, 0, 32, 24))  # a green top-left quarter
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@needs_jail
def test_image_operations_come_back(png):
    r = run_code("save(image.crop((0, 0, 32, 24)))\n"
                 "result = ImageOps.autocontrast(image.rotate(90, expand=True))\n"
                 "save(ImageEnhance.Contrast(image).enhance(2.0))\n"
                 "print('sizes', image.size, len(images))", [png])
    assert r.ok, r.error
    ims = [Image.open(io.BytesIO(b)) for b in r.images]
    assert all(im.format == "PNG" for im in ims)
    assert [im.size for im in ims] == [(32, 24), (64, 48), (48, 64)]
    crop = ims[0].convert("RGB")
    assert crop.getpixel((0, 0)) == (10, 200, 10) and crop.getpixel((31, 23)) == (10, 200, 10)
    contrast = ims[1].convert("RGB")
    assert contrast.getpixel((0, 0))[1] > 200 and contrast.getpixel((63, 47))[0] > 200
    rotated = ims[2].convert("RGB")  # rotate(90) is counter-clockwise: the green corner goes bottom-left
    assert rotated.getpixel((0, 63))[1] == 255 and rotated.getpixel((47, 0))[0] == 255
    assert "sizes (64, 48) 1" in r.stdout


@needs_jail
def test_numpy_and_several_inputs(png):
    code = ("a = np.asarray(images[1].convert('L'), dtype=np.uint8)\n"
            "result = Image.fromarray(255 - a)\n"
            "print(open('input_0', 'rb').read()[:4])")
    small = io.BytesIO()
    Image.new("L", (5, 3), 7).save(small, "PNG")
    r = run_code(code, [png, small.getvalue()])
    assert r.ok, r.error
    out = Image.open(io.BytesIO(r.images[0]))
    assert out.size == (5, 3) and out.getpixel((0, 0)) == 248
    assert "PNG" in r.stdout  # its inputs are files in its cwd too


@needs_jail
def test_its_own_folder_is_writable_and_can_be_a_host_folder(png, tmp_path):
    r = run_code("open('scratch.txt', 'w').write('ok')\nopen('/tmp/t', 'w').write('ok')\nresult = image.resize((8, 8))",
                 [png])
    assert r.ok, r.error
    work = tmp_path / "work"
    r = run_code("open('scratch.txt', 'w').write('kept')\nresult = image", [png], workdir=str(work))
    assert r.ok, r.error
    assert (work / "scratch.txt").read_text() == "kept" and (work / "input_0").exists()


@needs_jail
def test_time_limit_is_wall_clock_and_tight(png):
    t = time.monotonic()
    r = run_code("while True:\n    pass", [png], timeout_s=3)
    took = time.monotonic() - t
    assert not r.ok and r.reason == "timeout"
    assert 2.9 < took < 4.0, took
    t = time.monotonic()
    r = run_code("import time\ntime.sleep(30)", [png], timeout_s=1.5)  # no CPU used: only the wall clock ends it
    assert r.reason == "timeout" and time.monotonic() - t < 2.5


@needs_jail
def test_memory_limit(png):
    r = run_code("x = bytearray(3 << 30)\nresult = image", [png], memory_mb=512)
    assert not r.ok and r.reason == "memory", r.error
    r = run_code("a = np.ones((40000, 40000))\nresult = image", [png], memory_mb=512)
    assert not r.ok and r.reason == "memory", r.error
    r = run_code("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", [png], memory_mb=512)
    assert not r.ok and r.reason == "memory", r.error


@needs_jail
def test_code_errors_are_reported(png):
    r = run_code("result = image.crop(", [png])
    assert not r.ok and r.reason == "error" and "SyntaxError" in r.error
    r = run_code("x = 1", [png])
    assert not r.ok and r.reason == "error" and "no image" in r.error
    r = run_code("save('not an image')", [png])
    assert not r.ok and "PIL image" in r.error


@needs_jail
def test_the_jail_layers_are_in_place(png):
    """What the code sees from inside: nobody, no capabilities, no_new_privs, seccomp, its own pid namespace,
    no network but loopback, no programs, no host files."""
    code = """
import os, socket, ctypes
st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
print('uid', os.getuid(), os.getgid())
print('caps', st['CapEff'].strip(), st['CapBnd'].strip(), 'nnp', st['NoNewPrivs'].strip(),
      'seccomp', st['Seccomp'].strip())
print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
print('root', sorted(os.listdir('/')))
print('nets', sorted(os.listdir('/sys/class/net')) if os.path.exists('/sys/class/net') else 'no-sys')
for fam in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET):
    try:
        socket.socket(fam, socket.SOCK_DGRAM if fam != socket.AF_PACKET else socket.SOCK_RAW)
        print('socket', fam, 'OPEN')
    except OSError as e:
        print('socket', fam, 'refused', e.errno)
libc = ctypes.CDLL(None, use_errno=True)
print('unshare', libc.unshare(0x10000000), libc.unshare(0x40000000), 'ptrace', libc.ptrace(16, 1, 0, 0))
for p in ('/bin/sh', '/usr/bin/cat', '/etc/passwd', '/home', os.path.expanduser('~') + '/.bashrc'):
    print('exists', p, os.path.exists(p))
for p in ('/', '/dev', '/dev/shm', '/usr/lib', '/etc', '/proc'):
    try:
        open(os.path.join(p, 'w'), 'w')
        print('writable', p)
    except OSError as e:
        print('readonly', p, e.errno)
result = image
"""
    r = run_code(code, [png])
    assert r.ok, r.error
    out = r.stdout
    assert f"uid {sandbox.SANDBOX_UID} {sandbox.SANDBOX_GID}" in out
    assert "caps 0000000000000000 0000000000000000 nnp 1" in out
    if sandbox.seccomp_filter() is not None:
        assert "seccomp 2" in out
        assert "socket" in out and "OPEN" not in out
        assert "unshare -1 -1 ptrace -1" in out
    assert "pids [1, 2]" in out  # bwrap's pid 1 and the code: nothing of the host's
    root = eval(out.split("root ", 1)[1].splitlines()[0])
    assert {"dev", "proc", "sandbox", "tmp", "usr"} <= set(root)
    assert not {"home", "bin", "sbin", "var", "opt", "srv", "mnt", "boot", "media"} & set(root), root
    assert "exists /bin/sh False" in out and "exists /usr/bin/cat False" in out and "exists /etc/passwd False" in out
    assert "writable" not in out


def test_seccomp_program_is_well_formed():
    for machine in ("x86_64", "aarch64"):
        prog = sandbox.seccomp_filter(machine)
        assert prog and len(prog) % 8 == 0 and len(prog) // 8 < 4096
    assert sandbox.seccomp_filter("riscv64") is None


def test_a_host_without_bubblewrap_refuses_the_mode(png, monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    sandbox._reset()
    try:
        why = sandbox_available()
        assert why and "bubblewrap" in why
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            run_code("result = image", [png])
        monkeypatch.setattr(sandbox, "BWRAP", "/bin/false")  # there, but it cannot start a jail
        sandbox._reset()
        why = sandbox_available()
        assert why and "could not start" in why
        with pytest.raises(SandboxUnavailable):
            run_code("result = image", [png])
    finally:
        monkeypatch.undo()
        sandbox._reset()
    assert sandbox_available() == WHY


@needs_jail
def test_runs_start_fast(png):
    t = time.monotonic()
    for _ in range(3):
        assert run_code("result = image", [png]).ok
    assert (time.monotonic() - t) / 3 < 1.0
    assert not os.path.exists("/sandbox")  # the jail's folders are not the host's
