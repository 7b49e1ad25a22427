"""The think-with-image sandbox refuses the network, files outside its folder, and runs past its limits."""

from __future__ import annotations

import io
import os
import socket
import time

import pytest
from PIL import Image

from mixers.sandbox import run_code


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_image_operations_come_back(png):
    r = run_code("save(image.crop((0, 0, 32, 24)))\nresult = ImageOps.autocontrast(image.rotate(90, expand=True))",
                 [png])
    assert r.ok, r.error
    sizes = [Image.open(io.BytesIO(b)).size for b in r.images]
    assert sizes == [(32, 24), (48, 64)]


def test_network_is_refused(png):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nresult = image"
        r = run_code(code, [png])
        assert not r.ok and r.reason == "refused" and "network" in r.error
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
        r = run_code("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)", [png])
        assert not r.ok and r.reason == "refused"
    finally:
        server.close()


def test_files_outside_the_work_folder_are_refused(png, tmp_path):
    target = tmp_path / "escape.txt"
    r = run_code(f"open({str(target)!r}, 'w').write('x')\nresult = image", [png])
    assert not r.ok and r.reason == "refused" and "writing" in r.error
    assert not target.exists()
    r = run_code(f"import os\nos.makedirs({str(tmp_path / 'd')!r})\nresult = image", [png])
    assert not r.ok and not (tmp_path / "d").exists()
    r = run_code(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\nresult = image", [png])
    assert not r.ok and tmp_path.exists()
    r = run_code("print(open('/etc/hostname').read())\nresult = image", [png])
    assert not r.ok and r.reason == "refused" and "reading" in r.error
    r = run_code("import os\nos.system('touch /tmp/reelforge-sandbox-escape')\nresult = image", [png])
    assert not r.ok and r.reason == "refused" and not os.path.exists("/tmp/reelforge-sandbox-escape")
    r = run_code("import ctypes\nctypes.CDLL(None).system(b'true')\nresult = image", [png])
    assert not r.ok and r.reason == "refused"
    # its own folder is writable
    r = run_code("open('scratch.txt', 'w').write('ok')\nresult = image.resize((8, 8))", [png])
    assert r.ok, r.error


def test_time_limit(png):
    t = time.monotonic()
    r = run_code("while True:\n    pass", [png], timeout_s=1.5)
    assert not r.ok and r.reason == "timeout"
    assert time.monotonic() - t < 10


def test_memory_limit(png):
    r = run_code("x = bytearray(3 << 30)\nresult = image", [png], memory_mb=512)
    assert not r.ok and r.reason == "memory"
    r = run_code("import numpy as np\na = np.ones((40000, 40000))\nresult = image", [png], memory_mb=512)
    assert not r.ok and r.reason == "memory"


def test_code_errors_are_reported(png):
    r = run_code("result = image.crop(", [png])
    assert not r.ok and r.reason == "error" and "SyntaxError" in r.error
    r = run_code("x = 1", [png])
    assert not r.ok and "no image" in r.error
