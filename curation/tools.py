"""Where the external programs are: ffmpeg/ffprobe for media and a Java runtime for Spark."""

from __future__ import annotations

import os
import re
import shutil
import subprocess


class SetupError(Exception):
    """Something the machine lacks; the message says how to get it."""


def ffprobe_path() -> str:
    path = os.environ.get("REELFORGE_FFPROBE") or shutil.which("ffprobe")
    if not path:
        raise SetupError("ffprobe was not found on PATH: install ffmpeg (`apt-get install ffmpeg`, "
                         "or `make setup`), or set REELFORGE_FFPROBE to its path.")
    return path


def ffmpeg_path() -> str:
    path = os.environ.get("REELFORGE_FFMPEG") or shutil.which("ffmpeg")
    if path:
        return path
    try:  # a static ffmpeg shipped inside a PyPI wheel
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # noqa: BLE001
        raise SetupError("ffmpeg was not found on PATH: install ffmpeg (`apt-get install ffmpeg`, "
                         "or `make setup`), or set REELFORGE_FFMPEG to its path.") from e


def java_major_version() -> int | None:
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java or not os.path.exists(java):
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


def check_java() -> None:
    v = java_major_version()
    if v is None:
        raise SetupError("no Java runtime was found: Spark 4 needs Java 17 or 21 "
                         "(`apt-get install openjdk-17-jre-headless`, or `make setup`), or set JAVA_HOME.")
    if v < 17:
        raise SetupError(f"Java {v} is too old for Spark 4, which needs Java 17 or 21: "
                         "install openjdk-17-jre-headless and set JAVA_HOME to it.")
