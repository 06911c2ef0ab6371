"""``CometAdapter``: the limiter, retries and metrics for code that already speaks ``requests``.

A legacy codebase mounts it on its own Session and keeps every ``session.post(...)`` as it is::

    session = requests.Session()
    session.mount("https://api.cometapi.com/", CometAdapter.from_config("cometkit.yaml"))

Each request sent through the session then goes through the same engine as
``cometkit.Client``: admitted by the limiter, retried by the retry policy, recorded by the
sinks. What the caller gets back stays what ``requests`` gives: a ``Response`` (also for an
error status, once retries are over) or a ``requests`` exception for a broken connection, so
existing ``resp.status_code`` checks and ``except requests.ConnectionError`` clauses still work.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Union
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from ._answers import note_body, note_head, request_fields
from ._call_names import operation_for
from ._client import Client
from ._connection_errors import connection_error
from ._engine import Sent, cut_timeout
from ._exceptions import APITimeoutError
from .plugin_api import AttemptResult
from .priorities import PRIORITY_HEADER

__all__ = ["CometAdapter"]


def _timeout_within(timeout: Any, time_left_s: Optional[float]) -> Any:
    """The caller's ``requests`` timeout (``None``, seconds or ``(connect, read)``) cut to what
    is left of the call's deadline; a ``urllib3.Timeout`` object is left as it is."""
    if time_left_s is None:
        return timeout
    if timeout is None or isinstance(timeout, (int, float)):
        connect = read = timeout
    elif isinstance(timeout, tuple) and len(timeout) == 2:
        connect, read = timeout
    else:
        return timeout
    return cut_timeout((math.inf if connect is None else connect,
                        math.inf if read is None else read), time_left_s)


class CometAdapter(HTTPAdapter):
    """A ``requests`` transport adapter that runs every request through a cometkit client's
    limiter, retry policy and metrics sinks. Safe for threads sharing one Session.

    The client's ``deadline`` bounds each request as it bounds a ``Client`` call: the
    ``timeout`` given to ``requests`` is cut to what is left, and past the deadline the request
    raises ``cometkit.APITimeoutError`` (no response is returned then).

    The requests' priority lane is the client's ``priority``, or ``priority`` given here; a
    request's own ``x-cometkit-priority`` header wins, and is read here and never sent (an
    unknown lane in it raises ``ValueError`` before anything is sent).

    :param client: the client whose plugins to use (default: a new one from ``config``).
    :param config: a YAML path or dict, as for :class:`cometkit.Client`.
    :param priority: the lane of its requests (``None``: the client's ``priority``).
    :param overrides: config keys (``concurrency=8``); the pool is sized to ``concurrency``.
    """

    def __init__(self, client: Optional[Client] = None, *,
                 config: Union[str, os.PathLike, Mapping[str, Any], None] = None,
                 priority: Optional[str] = None, **overrides: Any) -> None:
        self._owns_client = client is None
        self.client = client if client is not None else Client(config=config, **overrides)
        try:
            self.priority, _ = self.client.priorities.resolve(priority)
        except BaseException:
            if self._owns_client:
                self.client.close()
            raise
        size = self.client.concurrency
        super().__init__(pool_connections=2, pool_maxsize=size, max_retries=0)

    @classmethod
    def from_config(cls, config: Union[str, os.PathLike, Mapping[str, Any], None] = None,
                    **overrides: Any) -> CometAdapter:
        """An adapter configured from a YAML file (or dict), like ``Client.from_config``."""
        return cls(config=config, **overrides)

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Optional[Mapping[str, str]] = None) -> requests.Response:
        client = self.client
        engine = client.engine
        path = urlsplit(request.url or "").path
        base_path = urlsplit(client.base_url).path
        route = path[len(base_path):] if base_path and path.startswith(base_path) else path
        body = request_fields(request.body, request.headers.get("Content-Type"))
        lane, _rank = client.priorities.from_header(
            request.headers.pop(PRIORITY_HEADER, None), self.priority)
        info = client.new_request((request.method or "GET").upper(), route or "/", body,
                                  stream=stream, operation=operation_for(path), priority=lane)
        send = super().send
        authorization = request.headers.get("Authorization") or ""
        # the session's own key, else the client's: blanked out of what the server echoes
        secret = authorization.split(" ", 1)[-1] or None
        broken: list[BaseException] = []

        def attempt(result: AttemptResult) -> Sent:
            sent = Sent()
            try:
                response = sent.response = send(
                    request, stream=stream, timeout=_timeout_within(timeout, result.time_left_s),
                    verify=verify, cert=cert, proxies=proxies)
                note_head(result, sent, response)
                if stream and response.status_code < 300:
                    return sent  # the caller reads the body; the attempt ends at the headers
                note_body(result, sent, response, response.content, method=info.method,
                          route=route, secret=secret)
            except requests.exceptions.RequestException as exc:
                mapped = connection_error(exc)
                result.error, result.error_stage = mapped, mapped.stage
                broken[:] = [exc]
                sent.response = None
            return sent

        sent, _result, error, _permit = engine.execute(info, attempt)
        if isinstance(error, APITimeoutError) and error.deadline_s is not None:
            if sent.response is not None:
                sent.response.close()
            raise error
        if sent.response is not None:
            return sent.response  # success, or the last error answer: the caller checks status
        if broken:
            raise broken[0]
        assert error is not None
        raise error

    def __enter__(self) -> CometAdapter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        super().close()
        if self._owns_client:
            self.client.close()
