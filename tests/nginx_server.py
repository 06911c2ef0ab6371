"""A throwaway nginx ``limit_req`` in front of a server on 127.0.0.1, for tests and benchmarks.

nginx's ``limit_req`` is a leaky bucket that real deployments put in front of OpenAI-compatible
gateways: it admits ``rate`` requests per second plus ``burst`` saved up, and refuses the rest
with ``limit_req_status`` and **no** ``Retry-After``. Running Debian's own binary (``.ci/run``
installs the ``nginx`` package when it is missing) tests cometkit against that algorithm rather
than our idea of it. Tests that need it skip when the binary is not there.

The instance is ours alone: a config, pid file, logs and temp paths in a temporary directory,
one process in the foreground (``daemon off``, ``master_process off``) on a free loopback port,
never the system service. ``benchmarks/limits.py`` imports this module too.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from redis_server import free_port

__all__ = ["NGINX", "NginxLimiter", "render_config"]


def _find_nginx() -> Optional[str]:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"  # Debian's, when /usr/sbin is not on PATH
    return found


#: The binary, or ``None`` when it is not installed.
NGINX = _find_nginx()

#: How long nginx may take to accept a connection after it was started.
STARTUP_TIMEOUT_S = 10.0
#: How long it may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 5.0
#: ``limit_req_zone`` keys: every request in one bucket, or one bucket per API key.
KEYS = {"constant": '"all"', "authorization": "$http_authorization"}
#: ``limit_conn_zone`` keys: a variable, never empty (an empty key is not counted); every
#: client here is 127.0.0.1, so the address is one key for everyone.
CONN_KEYS = {"constant": "$binary_remote_addr", "authorization": "$http_authorization"}
_POLL_S = 0.02


def render_config(*, directory: str, port: int, upstream_host: str, upstream_port: int,
                  rate: Optional[str], burst: int, nodelay: bool, status: int, key: str,
                  connections: Optional[int] = None) -> str:
    """The whole ``nginx.conf``: every path nginx writes is inside ``directory``."""
    def inside(name: str) -> str:
        return str(Path(directory) / name)

    delay = " nodelay" if nodelay else ""
    zones: list = []
    location: list = []
    if rate is not None:
        zones += [f"limit_req_zone {KEYS[key]} zone=cometkit:1m rate={rate};",
                  f"limit_req_status {status};", "limit_req_log_level warn;"]
        location.append(f"limit_req zone=cometkit burst={burst}{delay};")
    if connections is not None:
        # limit_conn counts requests being processed per key: a cap on calls in flight,
        # refused with the same bare status and no Retry-After.
        zones += [f"limit_conn_zone {CONN_KEYS[key]} zone=conns:1m;",
                  f"limit_conn_status {status};", "limit_conn_log_level warn;"]
        location.append(f"limit_conn conns {connections};")
    zone_lines = "".join(f"    {line}\n" for line in zones)
    location_lines = "".join(f"            {line}\n" for line in location)
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {inside("nginx.pid")};
error_log {inside("error.log")} warn;

events {{
    worker_connections 512;
}}

http {{
    log_format status_only '$status';
    access_log {inside("access.log")} status_only;
    client_body_temp_path {inside("body")};
    proxy_temp_path {inside("proxy")};
    fastcgi_temp_path {inside("fastcgi")};
    uwsgi_temp_path {inside("uwsgi")};
    scgi_temp_path {inside("scgi")};
    client_max_body_size 64m;

{zone_lines}
    upstream sandbox {{
        server {upstream_host}:{upstream_port};
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port};
        location /v1/ {{
{location_lines}            proxy_pass http://sandbox;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class NginxLimiter:
    """``with NginxLimiter(sandbox.base_url) as nginx: nginx.base_url`` -- nginx ``limit_req``
    proxying ``/v1/`` to ``upstream_url``, stopped (SIGTERM, then SIGKILL) at the end.

    :param upstream_url: the server behind nginx (``http://127.0.0.1:PORT/v1``).
    :param rate: ``limit_req_zone``'s rate, as nginx writes it (``20r/s``, ``600r/m``).
    :param burst: requests saved up beyond the rate before nginx refuses.
    :param nodelay: serve the burst at once (``True``) or spread it at the rate (``False``).
    :param status: the status of a refusal (``limit_req_status``); nginx adds no Retry-After.
    :param key: ``constant`` (one bucket for everyone) or ``authorization`` (one per API key).
    :param connections: also (or, with ``rate=None``, only) ``limit_conn``: at most this many
        requests in flight per key, the rest refused with ``status``.
    :param port: where nginx listens; a free port by default.
    """

    def __init__(self, upstream_url: str, *, rate: Optional[str] = "20r/s", burst: int = 5,
                 nodelay: bool = True, status: int = 429, key: str = "constant",
                 connections: Optional[int] = None, port: Optional[int] = None) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        upstream = urlsplit(upstream_url)
        if upstream.scheme != "http" or upstream.hostname is None or upstream.port is None:
            raise ValueError(f"upstream_url must be http://HOST:PORT/..., not {upstream_url!r}")
        if key not in KEYS:
            raise ValueError(f"key must be one of {', '.join(KEYS)}, not {key!r}")
        if burst < 0:
            raise ValueError(f"burst must be >= 0, not {burst!r}")
        if connections is not None and connections < 1:
            raise ValueError(f"connections must be >= 1, not {connections!r}")
        if rate is None and connections is None:
            raise ValueError("nothing to limit: give a rate, connections or both")
        self.connections = connections
        self.upstream_host = upstream.hostname
        self.upstream_port = upstream.port
        self.rate = rate
        self.burst = burst
        self.nodelay = nodelay
        self.status = status
        self.key = key
        self.port = port or free_port()
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self._process: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        if self._process is None:
            raise RuntimeError("nginx is not running; use start() or a with block")
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> NginxLimiter:
        """Write the config, start nginx in the foreground and wait (bounded) until it
        accepts connections."""
        if self._process is not None:
            raise RuntimeError("nginx is already running")
        self._dir = tempfile.TemporaryDirectory(prefix="cometkit-nginx-")
        directory = self._dir.name
        (Path(directory) / "nginx.conf").write_text(render_config(
            directory=directory, port=self.port, upstream_host=self.upstream_host,
            upstream_port=self.upstream_port, rate=self.rate, burst=self.burst,
            nodelay=self.nodelay, status=self.status, key=self.key,
            connections=self.connections), encoding="utf-8")
        self._process = subprocess.Popen(
            [NGINX, "-p", directory, "-c", "nginx.conf", "-e", "error.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=directory)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _accepts(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                detail = self.error_log()[-2000:] or "no answer on its port"
                self.stop()
                raise RuntimeError(f"nginx on port {self.port} did not start: {detail}")
            time.sleep(_POLL_S)
        return self

    def error_log(self) -> str:
        """nginx's error log so far (refusals are logged there at ``warn``)."""
        if self._dir is None:
            return ""
        try:
            return (Path(self._dir.name) / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    def statuses(self, at_least: int = 0, timeout_s: float = 5.0) -> collections.Counter:
        """Status code -> count of the requests nginx answered, from its access log.

        nginx writes a line when it finishes a request, a moment after the client has the
        answer: with ``at_least``, wait (bounded by ``timeout_s``) until that many are there.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            counts = collections.Counter(int(line) for line in self._access_lines())
            if sum(counts.values()) >= at_least or time.monotonic() > deadline:
                return counts
            time.sleep(_POLL_S)

    def _access_lines(self) -> list:
        if self._dir is None:
            return []
        try:
            text = (Path(self._dir.name) / "access.log").read_text()
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip().isdigit()]

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown), SIGKILL after :data:`STOP_TIMEOUT_S`; then the
        temporary directory goes."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> NginxLimiter:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
