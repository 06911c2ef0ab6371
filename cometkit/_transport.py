"""The HTTP transport: one ``requests`` Session and HTTPAdapter per client.

Everything that does not change between calls (proxies and CA bundle from the environment,
default headers, the adapter) is resolved once when the client is built. A call then builds a
``PreparedRequest`` by hand: ``Session.request`` would re-merge environment settings and
re-prepare the URL on every call, which is a large share of its CPU cost. A complete answer
with no proxy involved is read straight from the adapter's urllib3 pool (same pool, TLS
settings and headers); streams and proxied calls go through ``HTTPAdapter.send``. The HTTP
library's own retries stay off: retrying is a plugin's job.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import socket
from typing import Any, Iterator, Mapping, Optional, Union
from urllib.parse import urlencode, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout

from ._exceptions import APIConnectionError, APITimeoutError, ConfigError, SecretFilter
from ._version import __version__

__all__ = ["Transport", "connection_error", "body_chunks", "read_body",
           "iter_body_chunks", "TRANSPORT_ERRORS",
           "answers_in_events", "is_event_stream", "DEFAULT_BASE_URL"]

logger = logging.getLogger("cometkit.transport")

DEFAULT_BASE_URL = "https://api.cometapi.com/v1"

#: Everything sending or reading may raise below cometkit: requests', urllib3's and the
#: socket's exceptions (map them with :func:`connection_error`).
TRANSPORT_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                    OSError, http.client.HTTPException)

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


def connection_error(exc: BaseException, secrets: Optional[SecretFilter] = None
                     ) -> APIConnectionError:
    """Map a ``requests``, ``urllib3`` or socket exception to ours, telling *connect* (never
    sent) from *read*, and a timeout from a broken connection wherever it happens (before the
    answer or inside a stream).

    The HTTP library quotes what the server sent in some messages (a malformed status or
    chunk-size line), so the text goes through ``secrets`` when given. ``exc`` is chained as
    the error's ``__cause__`` (what a traceback shows below it) unless some exception in its
    chain quotes the secret: then the chain is left out rather than shown.
    """
    error = _mapped_connection_error(exc)
    if secrets is not None:
        clean = secrets.text(error.message)
        if clean is not error.message:
            error = type(error)(clean, stage=error.stage)
    if secrets is None or _chain_is_clean(exc, secrets):
        error.__cause__ = exc
    return error


def body_chunks(response: requests.Response, secrets: Optional[SecretFilter] = None,
                request_id: Optional[str] = None) -> Iterator[bytes]:
    """:func:`iter_body_chunks` with the transport's errors mapped to cometkit's
    (:func:`connection_error`, carrying ``request_id``): what every stream reads its events
    from, so a connection that breaks mid-stream is the same ``APIConnectionError`` (stage
    ``read``) whoever reads it. The error is raised outside the handler, so it carries no
    context: the HTTP library's exception may quote what the server sent."""
    chunks = iter_body_chunks(response)
    while True:
        broken: Optional[APIConnectionError] = None
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except TRANSPORT_ERRORS as exc:
            broken = connection_error(exc, secrets)
            broken.request_id = request_id
        if broken is not None:
            raise broken
        yield chunk


#: How deep :func:`_chain_is_clean` looks into an exception's causes and contexts.
_MAX_CHAIN = 16


def _chain_is_clean(exc: BaseException, secrets: SecretFilter) -> bool:
    """Whether no exception in ``exc``'s chain (causes and contexts, as a traceback prints
    them) has text or arguments holding the secret."""
    seen: set[int] = set()
    pending: list[Optional[BaseException]] = [exc]
    while pending and len(seen) < _MAX_CHAIN:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts = [str(current), *(str(arg) for arg in current.args)]
        if any(secrets.text(text) is not text for text in texts):
            return False
        pending += [current.__cause__, current.__context__]
    return not pending or all(item is None or id(item) in seen for item in pending)


def _mapped_connection_error(exc: BaseException) -> APIConnectionError:
    if isinstance(exc, (ReadTimeoutError, TimeoutError, socket.timeout)):
        return APITimeoutError(f"Read timeout: {exc}", stage="read")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return APITimeoutError(f"Connect timeout: {exc}", stage="connect")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return APITimeoutError(f"Read timeout: {exc}", stage="read")
    if isinstance(exc, MaxRetryError):
        reason: Any = exc.reason
    else:  # requests wraps urllib3's MaxRetryError (or ReadTimeoutError) in its own exception
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)
    # before ConnectTimeoutError: urllib3 2's NewConnectionError (a refused connection)
    # subclasses it, and a refusal is no timeout
    if isinstance(reason, (NewConnectionError, SSLError)) or isinstance(
            exc, requests.exceptions.SSLError):
        return APIConnectionError(f"Could not connect: {exc}", stage="connect")
    if isinstance(reason, ConnectTimeoutError):
        return APITimeoutError(f"Connect timeout: {exc}", stage="connect")
    if isinstance(reason, (ReadTimeoutError, TimeoutError, socket.timeout)):
        return APITimeoutError(f"Read timeout: {exc}", stage="read")
    return APIConnectionError(f"Connection broken: {type(exc).__name__}: {exc}", stage="read")


def is_event_stream(headers: Any) -> bool:
    """Whether a success answer to ``stream=True`` is read as server-sent events: anything
    but a JSON or HTML answer is (a missing or odd Content-Type included), so a proxy that
    relabels the stream does not break it; JSON and HTML are whole answers (an error body,
    a completion, a gateway page), read at once like any other."""
    content_type = (headers.get("content-type") or "").lower()
    return "json" not in content_type and "html" not in content_type


def answers_in_events(response: Any, stream: bool) -> bool:
    """Whether ``response`` is read as it arrives (a stream) rather than whole."""
    return stream and response.status_code < 300 and is_event_stream(response.headers)


def read_body(response: requests.Response) -> bytes:
    """The whole body, or ``APIConnectionError(stage="read")`` when it arrived cut short.

    urllib3 2 refuses a body shorter than its Content-Length by itself; urllib3 1.26 does not
    by default, so the length is checked here for both.
    """
    content = response.content
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and "Content-Encoding" not in response.headers \
            and len(content) < int(declared):
        raise APIConnectionError(
            f"Connection broken: the body ended after {len(content)} of {declared} bytes",
            stage="read")
    return content


#: Most bytes one read of a streamed body asks for; a read returns what has arrived, up to this.
_STREAM_READ_BYTES = 65536


def iter_body_chunks(response: requests.Response) -> Iterator[bytes]:
    """The (decoded) body of a streamed answer, in pieces as they arrive off the socket.

    ``requests``' ``iter_content(chunk_size=None)`` yields per chunk only for chunked
    encoding: a body delimited by connection close (HTTP/1.0, or HTTP/1.1 without chunked
    encoding, as some proxies send server-sent events) or by Content-Length is read to its
    end before anything is yielded. ``read1`` returns whatever one socket read gives, so
    each event is seen when it arrives, whatever the framing. Raises ``urllib3`` exceptions
    (map them with :func:`connection_error`); a body cut short of its Content-Length raises
    ``ProtocolError``.
    """
    raw = response.raw
    read1 = getattr(raw, "read1", None)  # urllib3 >= 2.1; 1.26 has none
    while True:
        data = read1(_STREAM_READ_BYTES, decode_content=True) if read1 is not None \
            else _read1_urllib3_126(raw)
        if not data:
            break
        yield data
    remaining = getattr(raw._fp, "length", None) if getattr(raw, "_fp", None) else None
    if not getattr(raw, "chunked", False) and remaining:
        raise ProtocolError(f"Connection broken: the body ended {remaining} bytes short of its "
                            "Content-Length")


def _read1_urllib3_126(raw: Any) -> bytes:
    """One ``read1`` on urllib3 1.26's response, with the decoding and error mapping its own
    ``read`` applies (1.26 has no ``read1``; these are its helpers for ``read``)."""
    fp = raw._fp
    if fp is None:
        return b""
    with raw._error_catcher():
        data = fp.read1(_STREAM_READ_BYTES)
        raw._init_decoder()
        return raw._decode(data, True, not data)


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
