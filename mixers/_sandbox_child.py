"""Runs inside the sandbox process (see mixers/sandbox.py): argv = work folder, JSON list of inputs."""

import json
import os
import sys
import traceback

WORK = os.path.realpath(sys.argv[1])
INPUTS = json.loads(sys.argv[2])


def _result(**kw) -> None:
    with open(os.path.join(WORK, "_result.json"), "w") as f:
        json.dump(kw, f)


# everything the code may use is imported before the hook goes in
import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter, ImageOps  # noqa: E402

for _fmt in ("PNG", "JPEG", "WEBP"):  # load PIL's codec plugins now
    Image.init()

READ_OK = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                       os.path.dirname(np.__file__),
                                                       os.path.dirname(os.path.dirname(Image.__file__))})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


REFUSED: list[str] = []  # every refusal, even one the code catches, fails the run


class SandboxRefused(PermissionError):
    def __init__(self, msg: str):
        super().__init__(msg)
        REFUSED.append(msg)


def _inside(path, roots) -> bool:
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return p == WORK or p.startswith(WORK + os.sep) or p.startswith(roots)


def _hook(event: str, args: tuple) -> None:
    if event.startswith("socket."):
        raise SandboxRefused(f"network access is refused in the sandbox ({event})")
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "pty.spawn", "os.kill", "os.killpg") or event.startswith("ctypes."):
        raise SandboxRefused(f"{event} is refused in the sandbox")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writing and not _inside(path, ()):
            raise SandboxRefused(f"writing {path} is refused: only the work folder is writable")
        if not writing and not _inside(path, READ_OK):
            raise SandboxRefused(f"reading {path} is refused: only the inputs and the work folder are readable")
    elif event in ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.symlink",
                   "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
                   "os.chdir"):
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a, ()):
                raise SandboxRefused(f"{event} on {a} is refused: only the work folder is open")
    elif event in ("os.listdir", "os.scandir"):  # imports list the installation's folders
        a = args[0] if args else "."
        if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a, READ_OK):
            raise SandboxRefused(f"listing {a} is refused: only the inputs and the work folder are readable")


images = [Image.open(os.path.join(WORK, n)) for n in INPUTS]
for im in images:
    im.load()
outputs: list[str] = []


def save(img) -> None:
    """Hand an image back to the conversation."""
    if not isinstance(img, Image.Image):
        raise TypeError("save() takes a PIL image")
    name = f"output_{len(outputs)}.png"
    img.save(os.path.join(WORK, name), format="PNG")
    outputs.append(name)


with open(os.path.join(WORK, "_code.py")) as f:
    code = f.read()
sys.addaudithook(_hook)
env = {"image": images[0] if images else None, "images": images, "Image": Image, "ImageOps": ImageOps,
       "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter, "np": np, "save": save,
       "__name__": "__sandbox__"}
try:
    exec(compile(code, "<sandbox>", "exec"), env)
    if isinstance(env.get("result"), Image.Image):
        save(env["result"])
    if not outputs:
        raise ValueError("the code produced no image: assign `result` or call save(img)")
except MemoryError:
    _result(status="memory", error="the code ran past its memory limit")
    sys.exit(4)
except BaseException as e:  # noqa: BLE001 - the error goes back to the caller as text
    if REFUSED:
        _result(status="refused", error=REFUSED[0])
        sys.exit(3)
    _result(status="error", error="".join(traceback.format_exception_only(type(e), e)).strip()[-1500:])
    sys.exit(5)
if REFUSED:
    _result(status="refused", error=REFUSED[0])
    sys.exit(3)
_result(status="ok", outputs=outputs)
