"""A local S3 server for the object-storage tests: moto's server mode, in this process.

The endpoint and test credentials are set in the environment when conftest is imported,
before any JVM or worker starts, so Spark executors (separate processes under
local-cluster) and torchrun ranks inherit them exactly as a user's AWS_* variables reach
theirs. The server itself starts on first use (`s3` fixture) on the port chosen here.
"""

from __future__ import annotations

import os
import socket
import threading


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
ENV = {"AWS_ENDPOINT_URL_S3": ENDPOINT, "AWS_ACCESS_KEY_ID": "reelforge-test", "AWS_SECRET_ACCESS_KEY":
       "reelforge-test-secret", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def set_environment() -> None:
    os.environ.update(ENV)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(k, None)


class S3Server:
    """moto's ThreadedMotoServer on PORT; `bucket(name)` creates a fresh bucket, returns s3://name."""

    def __init__(self) -> None:
        self._server = None
        self._lock = threading.Lock()
        self.endpoint = ENDPOINT

    def start(self) -> "S3Server":
        with self._lock:
            if self._server is None:
                import logging

                from moto.server import ThreadedMotoServer

                logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
                self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
                self._server.start()
        return self

    def bucket(self, name: str) -> str:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.stop()
                self._server = None
