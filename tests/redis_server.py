"""A throwaway ``redis-server`` on 127.0.0.1 for tests: no persistence, its own directory.

Started from the binary on PATH (``.ci/run`` installs Debian's ``redis-server`` when it is
missing); tests that need it skip when it is not there.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any, Optional

__all__ = ["RedisServer", "free_port", "REDIS_SERVER"]

#: The binary, or ``None`` when it is not installed.
REDIS_SERVER = shutil.which("redis-server")

#: How long the server may take to answer PING after it was started.
STARTUP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``with RedisServer() as server: server.url`` -- a fresh server on a free port (or on
    ``port``), stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, port: Optional[int] = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self.port = port or free_port()
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self._process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._dir = tempfile.TemporaryDirectory(prefix="cometkit-redis-")
        self._process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--daemonize", "no",
             "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _pings(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                detail = self._process.stderr.read().decode(errors="replace") \
                    if self._process.poll() is not None else "no answer to PING"
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start: {detail}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            if process.stderr is not None:
                process.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
