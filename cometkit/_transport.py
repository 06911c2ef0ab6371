"""The HTTP transport: one ``requests`` Session and HTTPAdapter per client.

Everything that does not change between calls (proxies and CA bundle from the environment,
default headers, the adapter) is resolved once when the client is built. A call then builds a
``PreparedRequest`` by hand: ``Session.request`` would re-merge environment settings and
re-prepare the URL on every call, which is a large share of its CPU cost. A complete answer
with no proxy involved is read straight from the adapter's urllib3 pool (same pool, TLS
settings and headers); streams and proxied calls go through ``HTTPAdapter.send``. The HTTP
library's own retries stay off: retrying is a plugin's job. Reading bodies is
:mod:`cometkit._bodies`; mapping the HTTP library's errors is :mod:`cometkit._connection_errors`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any, Mapping, Optional, Union
from urllib.parse import urlencode, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout

from ._bodies import answers_in_events, read_body
from ._connection_errors import TRANSPORT_ERRORS, connection_error
from ._exceptions import APIConnectionError, ConfigError
from ._secrets import SecretFilter
from ._version import __version__

__all__ = ["Transport", "CompleteAnswer", "check_base_url", "DEFAULT_BASE_URL"]

logger = logging.getLogger("cometkit.transport")

DEFAULT_BASE_URL = "https://api.cometapi.com/v1"

_NO_RETRIES = Retry(total=0, connect=0, read=False, redirect=False, status=0, raise_on_status=False)


def _is_loopback(host: str) -> bool:
    if host in ("localhost",) or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str, *, allow_insecure_http: bool, where: str = "") -> str:
    """Validate ``base_url``; refuse clear-text HTTP to a non-loopback host.

    The API key travels in a header: over plain ``http://`` to another machine anyone on the
    path can read it, so that needs an explicit ``allow_insecure_http: true``.
    """
    parts = urlsplit(base_url)
    prefix = f"{where}: " if where else ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{prefix}base_url: must be an http(s) URL such as {DEFAULT_BASE_URL}, "
            f"got {base_url!r}",
            path=where or None,
            key="base_url",
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname) and not allow_insecure_http:
        raise ConfigError(
            f"{prefix}base_url: {parts.scheme}://{parts.hostname} is plain HTTP to a non-loopback "
            "host, so the API key would travel in clear text. Use https://, or set "
            "allow_insecure_http: true if you really mean it.",
            path=where or None,
            key="base_url",
        )
    return base_url.rstrip("/")


class CompleteAnswer:
    """A complete (non-streamed) answer read straight from urllib3's pool.

    The hot path needs only status, headers and body; building a full ``requests.Response``
    (cookie jar, URL, history) is left to :meth:`as_response`, which error paths call.
    """

    __slots__ = ("status_code", "headers", "content", "_raw", "_adapter", "_prepared")

    def __init__(self, raw: Any, adapter: HTTPAdapter, prepared: requests.PreparedRequest
                 ) -> None:
        self.status_code: int = raw.status
        self.headers = raw.headers  # case-insensitive, like requests' headers
        self.content: bytes = raw.data
        self._raw = raw
        self._adapter = adapter
        self._prepared = prepared

    def as_response(self) -> requests.Response:
        response = self._adapter.build_response(self._prepared, self._raw)
        response._content = self.content  # already read
        return response

    def close(self) -> None:
        self._raw.release_conn()


class Transport:
    """Sends requests for one client; safe to use from any number of threads."""

    def __init__(
        self,
        base_url: str,
        api_key: Optional[str],
        *,
        timeout_s: tuple[float, float],
        pool_size: int,
        verify: Union[bool, str] = True,
    ) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        #: Kept only to blank it out of error bodies that echo it back (never shown).
        self.api_key = api_key
        #: Every answer passes through it before anyone reads it (see :class:`SecretFilter`).
        self.secrets = SecretFilter(api_key)
        self.session = requests.Session()
        self.adapter = HTTPAdapter(
            pool_connections=2, pool_maxsize=max(pool_size, 1), max_retries=_NO_RETRIES
        )
        self.session.mount("https://", self.adapter)
        self.session.mount("http://", self.adapter)
        headers = {
            "User-Agent": f"cometkit/{__version__} python-requests/{requests.__version__}",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "Connection": "keep-alive",
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers
        self._json_headers = {**headers, "Content-Type": "application/json"}
        # Enterprise proxies and CA bundles, resolved once (Session.request does it per call).
        # ... except for this machine: a loopback server is reached directly, so a plain-HTTP
        # sandbox never sends the key through a proxy in clear text.
        host = urlsplit(base_url).hostname or ""
        self.proxies: dict[str, str] = (
            {} if _is_loopback(host) else requests.utils.get_environ_proxies(base_url) or {})
        if verify is False:
            logger.warning(
                "TLS certificate verification is OFF (verify: false): anyone on the network "
                "path can read the API key and answers. Use a CA bundle path instead."
            )
        if verify is True:
            env = os.environ
            verify = env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or True
        self.verify: Union[bool, str] = verify

    def send(
        self,
        method: str,
        route: str,
        body: Optional[bytes],
        *,
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        stream: bool = False,
        timeout_s: Optional[tuple[float, float]] = None,
    ) -> Union[requests.Response, CompleteAnswer]:
        """Send one attempt; raises only cometkit's ``APIConnectionError`` (``APITimeoutError``)
        for a connection that failed, broke or timed out, or a body cut short.
        A streamed answer, or any answer through a proxy, is a ``requests.Response``; a
        complete answer otherwise a :class:`CompleteAnswer`. Unless the answer is an event stream
        (see :func:`answers_in_events`), its body is read here, whole; either way the API key
        is blanked out of it before it is returned."""
        prepared = requests.PreparedRequest()
        prepared.method = method
        url = self.base_url + route
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params, doseq=True)
        prepared.url = url
        merged = self._json_headers if body is not None else self._headers
        prepared.headers = CaseInsensitiveDict(merged)
        if headers:
            prepared.headers.update(headers)
        if body is not None:
            prepared.headers["Content-Length"] = str(len(body))
        prepared.body = body
        if stream and not (headers and any(k.lower() == "accept-encoding" for k in headers)):
            # compressing events gains nothing and makes proxies hold them back
            prepared.headers["Accept-Encoding"] = "identity"
        response: Union[requests.Response, CompleteAnswer]
        broken: Optional[APIConnectionError] = None
        try:  # the transport's errors are cometkit's from here (one mapping, here)
            if not stream and not self.proxies:
                response = self._send_direct(prepared, timeout_s or self.timeout_s)
            else:
                response = self.adapter.send(
                    prepared,
                    stream=stream,
                    timeout=timeout_s or self.timeout_s,
                    verify=self.verify,
                    proxies=self.proxies,
                )
            if not answers_in_events(response, stream):
                try:
                    read_body(response)  # checked against Content-Length before any blanking
                except BaseException:
                    response.close()
                    raise
        except TRANSPORT_ERRORS as exc:
            broken = connection_error(exc, self.secrets)
        if broken is not None:
            raise broken  # outside the handler: no context quoting what the server sent
        self._blank_secret(response)
        return response

    def _blank_secret(self, response: Union[requests.Response, CompleteAnswer]) -> None:
        """The one place an answer's headers and complete body lose any echo of the key
        (a streamed body is filtered line by line as it is read)."""
        secrets = self.secrets
        secrets.headers(response.headers)
        if isinstance(response, CompleteAnswer):
            response.content = secrets.bytes(response.content)
            if response._raw.headers is not response.headers:
                secrets.headers(response._raw.headers)
        elif response._content_consumed and isinstance(response._content, bytes):
            response._content = secrets.bytes(response._content)
            secrets.headers(response.raw.headers)
        elif response.raw is not None:
            secrets.headers(response.raw.headers)

    def _pool(self, prepared: requests.PreparedRequest) -> Any:
        """The connection pool for ``base_url``, with TLS settings applied (cached by the
        pool manager, so this is a dictionary lookup after the first call)."""
        get = getattr(self.adapter, "get_connection_with_tls_context", None)
        if get is not None:
            pool = get(prepared, self.verify, proxies=None)
        else:  # requests < 2.32.2
            pool = self.adapter.get_connection(prepared.url, None)
        self.adapter.cert_verify(pool, prepared.url, self.verify, None)
        return pool

    def _send_direct(self, prepared: requests.PreparedRequest,
                     timeout_s: tuple[float, float]) -> CompleteAnswer:
        """Send through the adapter's urllib3 pool without requests' per-call extras.

        Used when no proxy applies and the body is read at once: the same pool, TLS settings
        and headers as ``adapter.send``, minus the cookie jar and Response building.
        """
        parts = urlsplit(prepared.url)
        path = parts.path + ("?" + parts.query if parts.query else "")
        raw = self._pool(prepared).urlopen(
            method=prepared.method, url=path, body=prepared.body, headers=prepared.headers,
            redirect=False, assert_same_host=False, preload_content=True, decode_content=True,
            retries=_NO_RETRIES, timeout=Timeout(connect=timeout_s[0], read=timeout_s[1]),
        )
        return CompleteAnswer(raw, self.adapter, prepared)

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"Transport(base_url={self.base_url!r})"

    def __getstate__(self) -> None:
        raise TypeError("a cometkit transport holds the API key and is not picklable")
