"""The sandbox in a child process, for benchmarks.

In-process, the server's request handling competes with the client for the GIL and the
measurements would charge the server's CPU to the client. ``SandboxProcess`` runs
``python -m cometkit.sandbox`` instead and reads its counters over HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from .cli import to_argv

__all__ = ["SandboxProcess"]

_ANNOUNCEMENT = "listening on "
_KEY_VARIABLE = "COMETKIT_SANDBOX_API_KEY"


class SandboxProcess:
    """``with SandboxProcess(rpm=600) as sb:`` -- a :class:`~cometkit.sandbox.Sandbox` in a
    child process, with the same keyword arguments (but ``clock``).

    :param startup_timeout_s: how long to wait for the child to say it is listening.
    :raises TypeError: for a keyword the command line cannot express.
    """

    def __init__(self, port: int = 0, *, startup_timeout_s: float = 30.0, **kwargs: Any) -> None:
        api_key = kwargs.pop("api_key", None)
        self._argv = [sys.executable, "-m", "cometkit.sandbox", "--announce",
                      *to_argv(port=port, **kwargs)]
        self._env = dict(os.environ)
        # The child must import this very cometkit, installed or not.
        package_root = str(Path(__file__).resolve().parents[2])
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, self._env.get("PYTHONPATH")) if p)
        if api_key is not None:
            self._env[_KEY_VARIABLE] = api_key
            self._argv += ["--api-key-env", _KEY_VARIABLE]
        self._startup_timeout_s = startup_timeout_s
        self._process: Optional[subprocess.Popen] = None
        self._base_url: Optional[str] = None

    def start(self) -> SandboxProcess:
        """Launch the child and wait (bounded) until it listens."""
        if self._process is not None:
            raise RuntimeError("the sandbox process is already running")
        stderr = tempfile.TemporaryFile()
        process = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=stderr, env=self._env)
        self._process = process
        lines: list = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(self._startup_timeout_s)
        line = lines[0].decode(errors="replace").strip() if lines else ""
        if not line.startswith(_ANNOUNCEMENT):
            self.stop()
            stderr.seek(0)
            detail = stderr.read().decode(errors="replace").strip()
            stderr.close()
            raise RuntimeError(f"the sandbox process did not start: {detail or 'no output'}")
        stderr.close()
        self._base_url = line[len(_ANNOUNCEMENT):]
        return self

    def stop(self, timeout_s: float = 10.0) -> Optional[int]:
        """Ask the child to stop (SIGTERM), kill it after ``timeout_s``; its exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def base_url(self) -> str:
        if self._base_url is None or self._process is None:
            raise RuntimeError("the sandbox process is not running; use start() or a with block")
        return self._base_url

    def stats(self) -> dict:
        """The child's :meth:`Sandbox.stats() <cometkit.sandbox.Sandbox.stats>`."""
        stats = json.loads(self._control("GET", "/_sandbox/stats"))
        # JSON turned the status codes into strings.
        stats["attempts_by_status"] = {
            int(key) if key.isdigit() else key: value
            for key, value in stats["attempts_by_status"].items()
        }
        return stats

    def reset_stats(self) -> None:
        self._control("POST", "/_sandbox/reset")

    def _control(self, method: str, path: str) -> bytes:
        url = urlsplit(self.base_url)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            connection.request(method, path, body=b"" if method == "POST" else None)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"sandbox control {method} {path}: HTTP {response.status}")
        return body
