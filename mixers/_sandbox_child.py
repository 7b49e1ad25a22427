"""Runs inside the bubblewrap jail (see mixers/sandbox.py) as `python -I -S child.py CONFIG_JSON`.

stdin carries the inputs and the code (b"RFIN", u32 count, count x (u64 length, bytes), u64 length,
UTF-8 code); the result goes to the inherited pipe `result_fd` as b"RFSB1", u32 length, a JSON header
{"status": "ok" | "error" | "memory", "error": str, "sizes": [...]} and the PNG bytes back to back.
Nothing here is a security boundary: the code can rewrite all of it, and the parent trusts none of
what comes back beyond "these bytes may be PNG images".
"""

import json
import os
import resource
import struct
import sys

CFG = json.loads(sys.argv[1])
# first: at most this many processes/threads for the jail's user (the kernel counts them per user namespace)
resource.setrlimit(resource.RLIMIT_NPROC, (int(CFG["nproc"]), int(CFG["nproc"])))
RESULT_FD = int(CFG["result_fd"])
for _p in reversed(CFG["site"]):
    sys.path.insert(0, _p)
for _fd in os.listdir("/proc/self/fd"):  # keep only stdio and the result pipe
    if int(_fd) not in (0, 1, 2, RESULT_FD):
        try:
            os.close(int(_fd))
        except OSError:
            pass


def _read_stdin() -> bytes:
    chunks = []
    while True:
        b = os.read(0, 1 << 20)
        if not b:
            break
        chunks.append(b)
    os.close(0)
    return b"".join(chunks)


def _frame(status: str, error: str = "", sizes=()) -> bytes:
    head = json.dumps({"status": status, "error": error[-1500:], "sizes": list(sizes)}).encode()
    return b"RFSB1" + struct.pack("<I", len(head)) + head


def _flush() -> None:
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - the code may have closed or replaced it
        pass


def _send(*parts: bytes) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(RESULT_FD, view):]


MEMORY = _frame("memory", "the code ran past its memory limit")  # built now: no memory to spare later

_blob = _read_stdin()
assert _blob[:4] == b"RFIN", "bad input stream"
_pos = 4
(_n,) = struct.unpack_from("<I", _blob, _pos)
_pos += 4
_inputs = []
for _ in range(_n):
    (_len,) = struct.unpack_from("<Q", _blob, _pos)
    _pos += 8
    _inputs.append(_blob[_pos:_pos + _len])
    _pos += _len
(_len,) = struct.unpack_from("<Q", _blob, _pos)
_pos += 8
CODE = _blob[_pos:_pos + _len].decode("utf-8", "surrogatepass")
del _blob

import io  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter, ImageOps  # noqa: E402

Image.init()
images = []
for _i, _data in enumerate(_inputs):
    with open(f"input_{_i}", "wb") as _f:
        _f.write(_data)
    _im = Image.open(io.BytesIO(_data))
    _im.load()
    images.append(_im)
del _inputs
outputs: list[bytes] = []


def save(img) -> None:
    """Hand an image back to the conversation."""
    if not isinstance(img, Image.Image):
        raise TypeError("save() takes a PIL image")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    outputs.append(buf.getvalue())


env = {"image": images[0] if images else None, "images": images, "Image": Image, "ImageOps": ImageOps,
       "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter, "np": np, "save": save,
       "__name__": "__sandbox__"}
try:
    exec(compile(CODE, "<sandbox>", "exec"), env)
    if isinstance(env.get("result"), Image.Image):
        save(env["result"])
    if not outputs:
        raise ValueError("the code produced no image: assign `result` or call save(img)")
except MemoryError:
    outputs.clear()
    _flush()
    _send(MEMORY)
    os._exit(4)
except BaseException as e:  # noqa: BLE001 - the error goes back to the caller as text
    try:
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    except BaseException:  # noqa: BLE001
        msg = type(e).__name__
    _flush()
    _send(_frame("error", msg))
    os._exit(5)
_flush()
_send(_frame("ok", "", [len(b) for b in outputs]), *outputs)
os._exit(0)
