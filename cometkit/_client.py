"""The client: configuration, plugins, transport, worker pool, and the life of one call.

The core decides *when*: admit an attempt through the limiter, send it, hand the outcome back
to the limiter, ask the retry policy whether to go again, sleep outside the limiter, record
every attempt and every call. Plugins decide *what*. With no plugins, a call goes out once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union
from urllib.parse import urlsplit

import requests

from ._exceptions import APIError, make_status_error
from ._objects import ApiObject
from ._plugins import PluginSet, build_plugins
from ._resources import Chat, Embeddings, Models
from ._streaming import Stream
from ._transport import DEFAULT_BASE_URL, Transport, check_base_url, connection_error
from .config import load_config
from .records import (
    AttemptRecord,
    AttemptResult,
    CallRecord,
    Clock,
    RequestInfo,
    SystemClock,
)

__all__ = ["Client"]

logger = logging.getLogger("cometkit")
T = TypeVar("T")
R = TypeVar("R")

_OPERATIONS = {"/chat/completions": "chat", "/embeddings": "embeddings", "/models": "models",
               "/completions": "text_completion"}
_call_counter = itertools.count(1)
_ID_PREFIX = f"ck-{os.getpid():x}-{random.getrandbits(24):06x}-"


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_call_counter):x}"


def _usage_tokens(usage: Any) -> tuple[Optional[int], Optional[int]]:
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return prompt, completion


class Client:
    """A thread-safe CometAPI client with a worker pool.

    :param api_key: defaults to ``api_key`` in the config, then ``$COMETAPI_KEY``.
    :param base_url: defaults to ``base_url`` in the config, then ``$COMETAPI_BASE_URL``, then
        ``https://api.cometapi.com/v1``.
    :param config: a YAML file path or a dict (default: the file named by
        ``$COMETKIT_CONFIG``, if any).
    :param clock: the clock for sleeping and timing (tests inject a fake one).
    :param rng: random source for jitter (tests inject a seeded one).
    :param extra_plugins: plugin objects to register directly, besides the installed ones.
    :param overrides: any top-level config key (``concurrency=8``, ``timeout=30``...), winning
        over the file.
    """

    def __init__(
        self,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        *,
        config: Union[str, os.PathLike, Mapping[str, Any], None] = None,
        clock: Optional[Clock] = None,
        rng: Optional[random.Random] = None,
        extra_plugins: Sequence[Any] = (),
        **overrides: Any,
    ) -> None:
        self._closed = True  # until fully built, so __del__/close() are safe on failure
        loaded = load_config(config, overrides=overrides)
        data = loaded.data
        where = loaded.path or "<config>"
        self.config_path = loaded.path
        api_key = api_key or data.get("api_key") or os.environ.get("COMETAPI_KEY") or None
        base_url = (base_url or data.get("base_url") or os.environ.get("COMETAPI_BASE_URL")
                    or DEFAULT_BASE_URL)
        self.base_url = check_base_url(base_url, allow_insecure_http=bool(
            data.get("allow_insecure_http")), where=where)
        self.server_address = urlsplit(self.base_url).hostname or ""
        self.concurrency: int = data["concurrency"]
        self.timeout_s: tuple[float, float] = data["timeout"]
        self._clock: Clock = clock or SystemClock()
        self._transport = Transport(self.base_url, api_key, timeout_s=self.timeout_s,
                                    pool_size=self.concurrency, verify=data.get("verify", True))
        fingerprint = hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else ""
        self._plugins: PluginSet = build_plugins(
            data.get("plugins"),
            where=where,
            context_args=dict(
                concurrency=self.concurrency,
                base_url=self.base_url,
                server_address=self.server_address,
                timeout_s=self.timeout_s,
                api_key_fingerprint=fingerprint,
                clock=self._clock,
                random=rng or random.Random(),
                config_path=loaded.path,
            ),
            extra_plugins=extra_plugins,
        )
        self._policy = self._plugins.retry_policy
        self._limiter = self._plugins.limiter
        self._sinks = list(self._plugins.sinks)
        self._sink_failed: set[int] = set()
        self._stats_lock = threading.Lock()
        self._stats = {"calls": 0, "attempts": 0, "retries": 0, "failures": 0, "sink_errors": 0}
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency,
                                            thread_name_prefix="cometkit")
        self._close_lock = threading.Lock()
        self.chat = Chat(self)
        self.embeddings = Embeddings(self)
        self.models = Models(self)
        self._closed = False

    # -- construction helpers ---------------------------------------------------------------

    @classmethod
    def from_config(cls, path: Union[str, os.PathLike], **overrides: Any) -> Client:
        """A client configured from the YAML file at ``path``."""
        return cls(config=path, **overrides)

    # -- public API ---------------------------------------------------------------------------

    @property
    def plugins(self) -> list[str]:
        """Names of the plugins active on this client."""
        return self._plugins.names

    @property
    def context(self) -> Any:
        """The :class:`cometkit.ClientContext` the plugins were built with."""
        return self._plugins.context

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the client was built: calls, attempts, retries, failures,
        sink_errors."""
        with self._stats_lock:
            return dict(self._stats)

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        stream: bool = False,
        timeout: Union[float, tuple[float, float], None] = None,
        operation: Optional[str] = None,
    ) -> Any:
        """Call any route below ``base_url`` through the limiter, retries and metrics.

        :returns: an :class:`ApiObject` for a JSON object answer, a list for a JSON array, a
            :class:`Stream` when ``stream`` is true, or ``None`` for an empty body.
        """
        if not path.startswith("/"):
            path = "/" + path
        method = method.upper()
        model = json.get("model") if isinstance(json, dict) else None
        return self._call(method, path, json, params=params, headers=headers, stream=stream,
                          timeout=timeout, operation=operation or _OPERATIONS.get(path, "request"),
                          model=model)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the client's worker pool."""
        return self._executor.submit(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        *,
        return_exceptions: bool = False,
        max_in_flight: Optional[int] = None,
    ) -> Iterator[Union[R, BaseException]]:
        """Run ``fn(item)`` on the worker pool; yield results in input order.

        At most ``max_in_flight`` items (default twice the concurrency) are submitted ahead of
        the consumer, so a huge iterator never fills memory. With ``return_exceptions`` an
        item's exception is yielded in its place instead of raised.
        """
        window = max_in_flight or 2 * self.concurrency
        items = iter(iterable)
        pending: deque[Future[R]] = deque()

        def refill() -> None:
            while len(pending) < window:
                try:
                    item = next(items)
                except StopIteration:
                    return
                pending.append(self._executor.submit(fn, item))

        refill()

        def results() -> Iterator[Union[R, BaseException]]:
            try:
                while pending:
                    future = pending.popleft()
                    try:
                        value: Union[R, BaseException] = future.result()
                    except Exception as exc:
                        if not return_exceptions:
                            raise
                        value = exc
                    refill()
                    yield value
            finally:
                for future in pending:
                    future.cancel()

        return results()

    def close(self) -> None:
        """Finish queued work, then close the pool, the limiter, the sinks and the session."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._executor.shutdown(wait=True)
        if self._limiter is not None:
            self._guard("limiter.close", self._limiter.close)
        for sink in self._sinks:
            self._sink_call(sink, "flush")
            self._sink_call(sink, "close")
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<cometkit.Client base_url={self.base_url!r} concurrency={self.concurrency} "
                f"plugins={self.plugins}>")

    # -- the life of one call ---------------------------------------------------------------

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:
            logger.exception("%s failed", what)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for key, delta in deltas.items():
                self._stats[key] += delta

    def _sink_call(self, sink: Any, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception:
            self._count(sink_errors=1)
            if id(sink) not in self._sink_failed:
                self._sink_failed.add(id(sink))
                logger.warning("metrics sink %r failed in %s(); the call goes on, further "
                               "failures of this sink are only counted", sink, method,
                               exc_info=True)

    def _emit_attempt(self, request: RequestInfo, result: AttemptResult, outcome: str,
                      response_model: Optional[str], provider_id: Optional[str],
                      retry_delay_s: Optional[float], ttfc_s: Optional[float] = None) -> None:
        if not self._sinks:
            return
        record = AttemptRecord(
            self._clock.time(), request.request_id, result.attempt, request.operation,
            request.method, request.route, self.server_address, request.model, response_model,
            result.status_code,
            type(result.error).__name__ if result.error is not None else None,
            outcome, result.duration_s, ttfc_s, retry_delay_s, result.input_tokens,
            result.output_tokens, provider_id,
        )
        for sink in self._sinks:
            self._sink_call(sink, "record_attempt", record)

    def _emit_call(self, request: RequestInfo, result: AttemptResult, outcome: str) -> None:
        if not self._sinks:
            return
        record = CallRecord(
            self._clock.time(), request.request_id, request.operation, request.method,
            request.route, self.server_address, request.model, result.attempt, result.status_code,
            type(result.error).__name__ if result.error is not None else None, outcome,
            self._clock.monotonic() - request.started_at, result.input_tokens,
            result.output_tokens,
        )
        for sink in self._sinks:
            self._sink_call(sink, "record_call", record)

    def _call(
        self,
        method: str,
        route: str,
        body: Any,
        *,
        operation: str,
        model: Optional[str],
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        stream: bool = False,
        timeout: Union[float, tuple[float, float], None] = None,
    ) -> Any:
        if self._closed:
            raise RuntimeError("this cometkit.Client is closed")
        clock = self._clock
        request = RequestInfo(_new_request_id(), operation, method, route, model, stream,
                              body, clock.monotonic())
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        timeout_s = (timeout, timeout) if isinstance(timeout, (int, float)) else timeout
        policy, limiter = self._policy, self._limiter
        if policy is not None:
            policy.on_call_start(request)
        self._count(calls=1)
        attempt = 0
        while True:
            attempt += 1
            permit = limiter.acquire(request, None) if limiter is not None else None
            result = AttemptResult(request, attempt, started_at=clock.monotonic())
            response: Optional[requests.Response] = None
            value: Any = None
            try:
                response = self._transport.send(method, route, payload, params=params,
                                                headers=headers, stream=stream,
                                                timeout_s=timeout_s)
                result.status_code = response.status_code
                result.headers = response.headers
                if response.status_code >= 300 or not stream:
                    content = response.content  # reads (and may fail on) the body
                    if response.status_code >= 300:
                        error = make_status_error(
                            response.status_code, content, response.headers, response=response,
                            method=method, route=route)
                        result.error, result.error_code = error, error.code
                    else:
                        value = self._decode(content, response)
                        if isinstance(value, dict):
                            result.input_tokens, result.output_tokens = _usage_tokens(
                                value.get("usage"))
            except requests.exceptions.RequestException as exc:
                mapped = connection_error(exc)
                result.error, result.error_stage = mapped, mapped.stage
                if response is not None:
                    response.close()
            except APIError as exc:  # undecodable success body
                result.error = exc
            except BaseException as exc:  # never leak a permit, even on KeyboardInterrupt
                result.error = exc
                result.duration_s = clock.monotonic() - result.started_at
                if limiter is not None:
                    limiter.release(permit, result)
                raise
            result.duration_s = clock.monotonic() - result.started_at
            provider_id = response.headers.get("x-request-id") if response is not None else None

            if result.error is None and stream:
                assert response is not None
                return self._open_stream(request, result, response, permit, provider_id)
            if limiter is not None:
                limiter.release(permit, result)
            self._count(attempts=1)

            if result.error is None:
                response_model = value.get("model") if isinstance(value, dict) else None
                self._emit_attempt(request, result, "ok", response_model, provider_id, None)
                self._emit_call(request, result, "ok")
                return self._wrap(value)

            decision = policy.decide(result) if policy is not None else None
            if decision is not None and decision.retry:
                self._count(retries=1)
                self._emit_attempt(request, result, "retry", None, provider_id,
                                   decision.delay_s)
                if decision.delay_s > 0:
                    clock.sleep(decision.delay_s)
                continue
            self._count(failures=1)
            self._emit_attempt(request, result, "error", None, provider_id, None)
            self._emit_call(request, result, "error")
            final = decision.error if decision is not None and decision.error is not None \
                else result.error
            if final is not result.error and final.__cause__ is None:
                final.__cause__ = result.error
            raise final

    @staticmethod
    def _decode(content: bytes, response: requests.Response) -> Any:
        if not content:
            return None
        try:
            return json.loads(content)
        except ValueError as exc:
            raise APIError(
                f"the server answered {response.status_code} with a body that is not JSON "
                f"({content[:80]!r}...): check base_url",
                request_id=response.headers.get("x-request-id"),
                body=content.decode("utf-8", "replace")[:1000],
            ) from exc

    @staticmethod
    def _wrap(value: Any) -> Any:
        if isinstance(value, dict):
            return ApiObject(value)
        if isinstance(value, list):
            return [ApiObject(v) if isinstance(v, dict) else v for v in value]
        return value

    def _open_stream(self, request: RequestInfo, result: AttemptResult,
                     response: requests.Response, permit: Any,
                     provider_id: Optional[str]) -> Stream:
        limiter = self._limiter
        clock = self._clock

        def finish(error: Optional[BaseException], usage: Optional[dict],
                   response_model: Optional[str], ttfc_s: Optional[float]) -> None:
            result.duration_s = clock.monotonic() - result.started_at
            result.input_tokens, result.output_tokens = _usage_tokens(usage)
            if error is not None:
                result.error = error
            if limiter is not None:
                limiter.release(permit, result)
            self._count(attempts=1, failures=1 if error is not None else 0)
            outcome = "ok" if error is None else "error"
            self._emit_attempt(request, result, outcome, response_model, provider_id, None,
                               ttfc_s)
            self._emit_call(request, result, outcome)

        return Stream(response, finish, monotonic=clock.monotonic,
                      started_at=result.started_at, request_id=provider_id)
