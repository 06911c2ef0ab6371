"""The client: configuration, plugins, transport, worker pool, and the life of one call.

The core decides *when*: admit an attempt through the limiter, send it, hand the outcome back
to the limiter, ask the retry policy whether to go again, sleep outside the limiter, record
every attempt and every call. Plugins decide *what*. With no plugins, a call goes out once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import threading
import unicodedata
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union
from urllib.parse import urlsplit

import requests

from ._answers import send_attempt
from ._binary import BinaryAnswer
from ._call_options import (
    checked_headers,
    checked_query,
    identity_headers,
    max_attempts_for,
    timeout_parts,
)
from ._engine import CallEngine, Sent, cut_timeout, new_request_id, operation_for
from ._exceptions import APIConnectionError, APIError, APIStatusError, ConfigError, SecretFilter
from ._multipart import encode_upload
from ._objects import ApiObject, json_default, wrap_answer
from ._plugins import PluginSet, build_plugins
from ._raw_response import RawResponse
from ._resources import Chat, Embeddings, Models
from ._routes import Audio, Batches, Files, Images, Moderations, Responses, TextCompletions
from ._streaming import Stream, completion_as_chunk, event_error, read_first_event
from ._transport import (
    DEFAULT_BASE_URL,
    Transport,
    check_base_url,
)
from ._workers import Window, WorkerPool
from .clock import Clock, SystemClock
from .config import load_config, parse_deadline, parse_timeout
from .options import InvalidValue
from .plugin_api import AttemptResult, RequestInfo
from .prices import PriceTable
from .priorities import Priorities

__all__ = ["Client"]

logger = logging.getLogger("cometkit")
T = TypeVar("T")
R = TypeVar("R")


def _clean_api_key(api_key: Optional[str], where: str) -> Optional[str]:
    """The key without surrounding whitespace (a key read from a file ends in a newline);
    refuse one with any character an HTTP header cannot carry as it is -- a control
    character, a byte-order mark from a key file, a zero-width or non-breaking space from a
    copy, anything outside visible ASCII -- naming the character, never the key."""
    if api_key is None:
        return None
    if not isinstance(api_key, str):
        raise ConfigError(f"{where}: api_key: must be a string, got {type(api_key).__name__}",
                          key="api_key")
    api_key = api_key.strip()
    for position, char in enumerate(api_key, 1):
        if not "\x21" <= char <= "\x7e":
            name = unicodedata.name(char, "a control character")
            hint = " (the key file was saved with a byte-order mark)" if char == "\ufeff" else ""
            raise ConfigError(
                f"{where}: api_key: character {position} is U+{ord(char):04X} ({name}){hint}, "
                "which cannot be sent in an HTTP header: an API key is visible ASCII only. "
                "Check how the key was copied or saved (the value is not shown).",
                key="api_key")
    return api_key or None


def check_count(name: str, value: Any) -> int:
    """``value`` as a whole number >= 1, or a ``TypeError``/``ValueError`` naming ``name``: a
    window of 0 or less would silently do nothing."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number >= 1, got {type(value).__name__} "
                        f"{value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _check_callable(fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__} {fn!r}")


def _check_mapping(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (a dict) or None, got {type(value).__name__}")


def _call_timeout(timeout: Any, default_s: tuple[float, float]) -> tuple[float, float]:
    """A per-call ``timeout=`` as ``(connect_s, read_s)``, in the forms the configuration's
    ``timeout`` takes (seconds, ``"30s"``, ``(connect, read)``, ``{connect:, read:}``) or as
    an object with ``.connect`` and ``.read`` (an ``httpx.Timeout``: a part that is ``None``
    keeps ``default_s``'s); ``None``: ``default_s``."""
    if timeout is None:
        return default_s
    parts = timeout_parts(timeout)
    if parts is not None:
        timeout = {"connect": default_s[0], "read": default_s[1], **parts}
    if not isinstance(timeout, (int, float, str, tuple, list, Mapping)) or isinstance(
            timeout, bool):
        raise TypeError(f"timeout must be seconds, a duration such as \"30s\", a (connect, "
                        f"read) pair or an object with .connect and .read (an httpx.Timeout), "
                        f"got {type(timeout).__name__}")
    try:
        return parse_timeout(dict(timeout) if isinstance(timeout, Mapping) else timeout)
    except InvalidValue as exc:
        part = f".{exc.key}" if exc.key else ""
        raise ValueError(f"timeout{part}: {exc}") from None


def call_deadline(deadline: Any, default: Optional[float]) -> Optional[float]:
    """A per-call ``deadline=`` in seconds (a number or a duration such as ``"20s"``), or the
    client's ``default`` when it is ``None``."""
    if deadline is None:
        return default
    if not isinstance(deadline, (int, float, str)) or isinstance(deadline, bool):
        raise TypeError(f"deadline must be seconds or a duration such as \"20s\", got "
                        f"{type(deadline).__name__}")
    try:
        return parse_deadline(deadline)
    except InvalidValue as exc:
        raise ValueError(f"deadline: {exc}") from None


#: The deprecated ``plugins.backoff.deadline`` was warned about (once per process).
_legacy_deadline_warned = threading.Event()


def _client_deadline(data: Mapping[str, Any], plugins: PluginSet,
                     where: str) -> Optional[float]:
    """The top-level ``deadline``, or the deprecated ``plugins.backoff.deadline`` it replaces
    (one knob: the old key becomes the call deadline, with a warning once per process)."""
    deadline = data.get("deadline")
    legacy = plugins.context.options("backoff").get("deadline")
    if legacy is not None and not _legacy_deadline_warned.is_set():
        _legacy_deadline_warned.set()
        logger.warning("%s: plugins.backoff.deadline is deprecated: write deadline: %g at the "
                       "top level of the configuration%s", where, legacy,
                       "" if deadline is None else f" (the top-level deadline: {deadline:g} "
                                                   "wins here)")
    return legacy if deadline is None else deadline


def _check_construction_args(base_url: Any, clock: Any, rng: Any, extra_plugins: Any) -> None:
    """The keyword arguments that are not configuration keys (those are validated with the
    configuration)."""
    if base_url is not None and not isinstance(base_url, str):
        raise ConfigError(f"base_url: must be a URL string, got {type(base_url).__name__}",
                          key="base_url")
    for name, value, methods, kind in (
            ("clock", clock, ("monotonic", "time", "sleep"), "a cometkit.Clock"),
            ("rng", rng, ("random", "uniform"), "a random.Random (seeded in tests)")):
        missing = [m for m in methods if not callable(getattr(value, m, None))]
        if value is not None and missing:
            raise TypeError(f"{name} must be {kind}; {type(value).__name__} has no "
                            f"{'(), '.join(missing)}()")
    if isinstance(extra_plugins, (str, bytes)) or not isinstance(extra_plugins,
                                                                 (list, tuple)):
        raise TypeError("extra_plugins must be a list or tuple of plugin objects, got "
                        f"{type(extra_plugins).__name__}")


def _raw_content(content: bytes, _response: Any) -> bytes:
    """The decoder of a raw answer: its bytes as they are."""
    return content


def _nothing_to_finish(*_: Any) -> None:
    """The end_of_stream of a stream whose attempt the engine already recorded."""


#: Results ``Client.map`` may hold for its consumer at least (finished items behind one that
#: is not), whatever its window: enough that the items behind a call asleep for a few seconds
#: before a retry keep going out at the pool's pace, in a few megabytes at most.
MIN_RESULTS_BUFFERED = 1024


class _Unset:
    """The type of :data:`UNSET`: "not given", where ``None`` means something."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()

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
    :param organization: sent as the ``OpenAI-Organization`` header, as the openai SDK does.
    :param project: sent as the ``OpenAI-Project`` header.
    :param default_headers: headers sent with every call (a call's ``extra_headers`` win).
    :param default_query: query parameters sent with every call (``extra_query`` wins).
    :param max_retries: the openai SDK's knob: each call makes at most ``max_retries + 1``
        attempts, in place of the retry policy's ``backoff.max_attempts`` (the policy still
        decides what is retried, and how long to wait).
    :param overrides: any top-level config key (``concurrency=8``, ``timeout=30``,
        ``deadline=20``...), winning over the file. ``timeout`` may also be an object with
        ``.connect`` and ``.read`` (an ``httpx.Timeout``).
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
        organization: Optional[str] = None,
        project: Optional[str] = None,
        default_headers: Optional[Mapping[str, str]] = None,
        default_query: Optional[Mapping[str, Any]] = None,
        max_retries: Optional[int] = None,
        **overrides: Any,
    ) -> None:
        self._closed = True  # until fully built, so __del__/close() are safe on failure
        #: The client that owns the pool, limiter and sinks: itself, or for a view made by
        #: :meth:`with_options`, the client it came from.
        self._root: Client = self
        _check_construction_args(base_url, clock, rng, extra_plugins)
        #: Sent with every call, below the call's own ``extra_headers`` / ``extra_query``.
        self._default_headers = {**identity_headers(organization, project),
                                 **checked_headers("default_headers", default_headers)}
        self._default_query = checked_query("default_query", default_query)
        #: Attempts per call in place of the retry policy's own limit (``max_retries + 1``).
        self._max_attempts = None if max_retries is None else max_attempts_for(max_retries)
        parts = timeout_parts(overrides.get("timeout"))
        if parts is not None:
            overrides["timeout"] = parts
        loaded = load_config(config, overrides=overrides)
        data = loaded.data
        where = loaded.where
        self.config_path = loaded.path
        api_key = _clean_api_key(
            api_key or data.get("api_key") or os.environ.get("COMETAPI_KEY") or None, where)
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
        try:
            self._build(data, loaded, api_key, rng, extra_plugins)
        except BaseException:
            # a half-built client is unreachable: close what it opened (a metrics port, the
            # session), so that building it again in this process works
            plugins: Optional[PluginSet] = getattr(self, "_plugins", None)
            if plugins is not None:
                plugins.close()
            self._transport.close()
            raise
        self._closed = False

    def _build(self, data: dict, loaded: Any, api_key: Optional[str],
               rng: Optional[random.Random], extra_plugins: Sequence[Any]) -> None:
        """The plugins, the engine and the pool; :meth:`__init__` closes what was built if
        this raises."""
        where = loaded.where
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
                prices=PriceTable(data.get("prices")),
            ),
            extra_plugins=extra_plugins,
        )
        self._check_retry_policy()
        #: Seconds one call may take in all, unless the call gives its own ``deadline=``.
        self.deadline_s: Optional[float] = _client_deadline(data, self._plugins, where)
        #: The priority lanes (highest first) and the lane of calls that name none.
        self.priorities: Priorities = Priorities.from_config(data, where)
        self._engine = CallEngine(clock=self._clock, policy=self._plugins.retry_policy,
                                  limiter=self._plugins.limiter, sinks=list(self._plugins.sinks),
                                  server_address=self.server_address)
        self._executor = WorkerPool(self.concurrency, thread_name_prefix="cometkit")
        self._close_lock = threading.Lock()
        self._mount_resources()

    def _mount_resources(self) -> None:
        self.chat = Chat(self)
        self.embeddings = Embeddings(self)
        self.models = Models(self)
        self.responses = Responses(self)
        self.completions = TextCompletions(self)
        self.moderations = Moderations(self)
        self.images = Images(self)
        self.files = Files(self)
        self.batches = Batches(self)
        self.audio = Audio(self)

    def _check_retry_policy(self) -> None:
        """``max_retries`` above 0 asks for retries: refuse it when no plugin retries."""
        if self._max_attempts is not None and self._max_attempts > 1 \
                and self._plugins.retry_policy is None:
            raise ConfigError(
                f"max_retries={self._max_attempts - 1}: no retry policy is enabled, so no call "
                "would be retried. Enable the backoff plugin (plugins.backoff: true), or pass "
                "max_retries=0.", key="max_retries")

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
        return dict(self._engine.stats)

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
        deadline: Union[float, str, None] = None,
        priority: Optional[str] = None,
        files: Optional[Mapping[str, Any]] = None,
        data: Optional[Mapping[str, Any]] = None,
        raw: bool = False,
    ) -> Any:
        """Call any route below ``base_url`` through the limiter, retries and metrics.

        :param deadline: seconds the whole call may take (admission, attempts, retry waits);
            ``None``: the client's ``deadline``. Past it: ``APITimeoutError``.
        :param priority: the call's lane, one of the client's ``priorities`` (``None``: the
            client's ``priority``); the limiter admits a waiting call of a higher lane first.
            An unknown name raises :class:`ConfigError` (a ``ValueError``).
        :param files: an upload (``multipart/form-data``) instead of a JSON body: field
            name -> bytes, a binary file, a path or ``(filename, content[, content_type])``;
            encoded once, so a retry sends the same bytes.
        :param data: the form fields sent with ``files``.
        :param raw: return the answer's bytes as a :class:`BinaryAnswer` (speech, a file's
            content) instead of decoding JSON.
        :param operation: the operation name in the metrics (default: the route's, see
            ``docs/metrics.md``).

        :returns: an :class:`ApiObject` for a JSON object answer (a :class:`ListObject`
            for a list answer, paged with ``after`` when it says ``has_more``), a list for a
            JSON array, a :class:`Stream` when ``stream`` is true, a :class:`BinaryAnswer`
            when ``raw`` is true, or ``None`` for an empty body.
        """
        if not isinstance(method, str):
            raise TypeError(f"method must be a string such as \"POST\", got "
                            f"{type(method).__name__}")
        if not method.strip() or not method.isalpha():
            raise ValueError(f"method must be an HTTP method such as \"POST\", got {method!r}")
        if not isinstance(path, str):
            raise TypeError(f"path must be a string such as \"/chat/completions\", got "
                            f"{type(path).__name__}")
        _check_mapping("params", params)
        headers = checked_headers("headers", headers) or None
        if not path.startswith("/"):
            path = "/" + path
        if files is not None and json is not None:
            raise TypeError("give json= (a JSON body) or files= (an upload), not both")
        method = method.upper()
        fields = data if files is not None else json
        model = fields.get("model") if isinstance(fields, Mapping) else None
        return self._call(method, path, json, params=params, headers=headers, stream=stream,
                          timeout=timeout, operation=operation or operation_for(path),
                          model=model, deadline=deadline, priority=priority, files=files, data=data,
                          raw=raw)

    @property
    def engine(self) -> CallEngine:
        """The engine every call of this client goes through, for a front that sends its own
        way (:class:`cometkit.adapters.CometAdapter`, :class:`cometkit.httpx.Transport`) and
        drives the same admission, retries and records: ``engine.execute(request, attempt)``
        with a :meth:`new_request`."""
        return self._engine

    @property
    def transport(self) -> Transport:
        """The client's HTTP transport (one connection pool, its proxies and TLS settings),
        for a front that sends through it (:class:`cometkit.httpx.Transport`)."""
        return self._transport

    @property
    def secrets(self) -> SecretFilter:
        """Blanks this client's API key out of text a front passes on (never shows it)."""
        return self._transport.secrets

    def new_request(self, method: str, route: str, body: Any = None, *, stream: bool = False,
                    operation: Optional[str] = None, model: Optional[str] = None,
                    deadline_s: Union[float, None, _Unset] = UNSET,
                    priority: Optional[str] = None) -> RequestInfo:
        """The :class:`RequestInfo` of one call of this client, whichever front sends it: a new
        id, the operation named after ``route`` (unless given), the model from ``body`` (unless
        given), the start time, the client's ``deadline`` (unless ``deadline_s`` is given) and
        ``max_retries``, and its priority lane (``priority``, else the client's).

        :raises ConfigError: ``priority`` is no configured lane.
        """
        if model is None and isinstance(body, Mapping):
            model = body.get("model") if isinstance(body.get("model"), str) else None
        lane, rank = self.priorities.resolve(priority)
        return RequestInfo(new_request_id(), operation or operation_for(route), method, route,
                           model, stream, body, self._clock.monotonic(),
                           self.deadline_s if deadline_s is UNSET else deadline_s,
                           max_attempts=self._max_attempts, priority=lane,
                           priority_rank=rank)

    @property
    def workers(self) -> WorkerPool:
        """The worker pool that :meth:`map`, :meth:`submit` and ``cometkit batch`` run on: at
        most ``concurrency`` calls run at once, and one asleep before a retry gives its place
        to the next (see :mod:`cometkit._workers`)."""
        return self._executor

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the client's worker pool."""
        _check_callable(fn)
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

        At most ``max_in_flight`` items (default twice the concurrency) run or wait in the pool
        at a time, not counting calls asleep before a retry, and at most eight times that many
        results (finished, or behind a slow one; at least :data:`MIN_RESULTS_BUFFERED`) wait
        for the consumer, so a huge iterator never fills memory while one item's back-off of
        a few seconds does not hold back the items behind it. A call sleeping before a retry
        gives its worker's place to the next item, so the pool keeps sending while it waits
        (see :mod:`cometkit._workers`). With
        ``return_exceptions`` an item's exception is yielded in its place instead of raised.
        """
        _check_callable(fn)
        window = 2 * self.concurrency if max_in_flight is None else check_count(
            "max_in_flight", max_in_flight)
        buffered_max = max(8 * window, MIN_RESULTS_BUFFERED)
        try:
            items = iter(iterable)
        except TypeError:
            raise TypeError(f"iterable must be iterable (a list, a generator...), got "
                            f"{type(iterable).__name__}") from None
        pending: deque[Future[R]] = deque()
        exhausted = False
        in_flight = Window(self._executor, window)

        def refill() -> None:
            nonlocal exhausted
            while not exhausted and in_flight.has_room() and len(pending) < buffered_max:
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    return
                future = self._executor.submit(fn, item)
                in_flight.add(future)
                pending.append(future)

        refill()

        def results() -> Iterator[Union[R, BaseException]]:
            try:
                while pending:
                    head = pending[0]
                    while not head.done():
                        refill()
                        # until the head is done, or room opens for more (an item ended, a
                        # call fell asleep before a retry)
                        in_flight.wait(lambda head=head: head.done() or (
                            not exhausted and in_flight.has_room()
                            and len(pending) < buffered_max))
                    pending.popleft()
                    try:
                        value: Union[R, BaseException] = head.result()
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

    def httpx_client(self, *, httpx: Any = None, priority: Optional[str] = None,
                     **kwargs: Any) -> Any:
        """An ``httpx2.Client`` (or classic ``httpx.Client``) whose every request is a call of
        this client: through its limiter, retries and sinks (see :mod:`cometkit.httpx`).

        :param httpx: ``"httpx2"``, ``"httpx"`` or the module (default: the one the installed
            openai SDK sends through).
        :param priority: the lane of its requests (``None``: the client's ``priority``); an
            ``x-cometkit-priority`` header on a request wins.
        :param kwargs: passed on to the ``Client``; ``base_url``, ``timeout`` (the
            configuration's) and ``follow_redirects=True`` are preset.
        """
        from .httpx import Transport

        transport = Transport(self, httpx=httpx, priority=priority)
        module = transport.httpx
        connect_s, read_s = self.timeout_s
        kwargs.setdefault("base_url", self.base_url)
        kwargs.setdefault("timeout", module.Timeout(read_s, connect=connect_s))
        kwargs.setdefault("follow_redirects", True)
        return module.Client(transport=transport, **kwargs)

    def openai(self, *, priority: Optional[str] = None, **kwargs: Any) -> Any:
        """A ready ``openai.OpenAI`` that sends through this client (:meth:`httpx_client`):
        ``base_url``, the API key, ``max_retries=0`` (cometkit retries; two layers would
        multiply), ``http_client`` and this client's ``default_headers`` (with
        ``organization``/``project``) and ``default_query`` are preset; ``kwargs`` win. Its
        calls make this client's ``max_retries + 1`` attempts when it has one. Closing it
        leaves this client open. ``priority`` is the lane of its requests (see
        :meth:`httpx_client`)."""
        try:
            import openai
        except ImportError:
            raise ConfigError("client.openai() needs the openai SDK: pip install "
                              "'cometkit[openai]'", key="openai") from None
        kwargs.setdefault("api_key", self._transport.api_key or "no-key")
        kwargs.setdefault("base_url", self.base_url)
        kwargs.setdefault("max_retries", 0)
        if self._default_headers:
            kwargs.setdefault("default_headers", dict(self._default_headers))
        if self._default_query:
            kwargs.setdefault("default_query", dict(self._default_query))
        if "http_client" not in kwargs:
            # the library this SDK sends through
            kwargs["http_client"] = self.httpx_client(priority=priority)
        elif priority is not None:
            raise ValueError("priority= sets the lane of the http_client client.openai() "
                             "builds: with your own http_client, give it to its "
                             "cometkit.httpx.Transport(priority=...) instead")
        return openai.OpenAI(**kwargs)

    def with_options(
        self,
        *,
        timeout: Any = None,
        deadline: Union[float, str, None] = None,
        max_retries: Optional[int] = None,
        default_headers: Optional[Mapping[str, str]] = None,
        default_query: Optional[Mapping[str, Any]] = None,
        organization: Optional[str] = None,
        project: Optional[str] = None,
    ) -> Client:
        """A view of this client with other per-call defaults, as the openai SDK's
        ``with_options``: it shares the connection pool, the worker pool, the limiter, the
        retry policy's budget and the sinks (nothing is opened and no plugin is loaded
        again); only what is given changes. ``default_headers``/``default_query`` are merged
        over this client's. Closing the view ends only the view: the client it came from
        stays open, and closing that one ends every view of it.
        """
        self._check_open()
        view = copy.copy(self)
        view._closed = False
        view.timeout_s = _call_timeout(timeout, self.timeout_s)
        view.deadline_s = call_deadline(deadline, self.deadline_s)
        if max_retries is not None:
            view._max_attempts = max_attempts_for(max_retries)
            view._check_retry_policy()
        view._default_headers = {**self._default_headers,
                                 **identity_headers(organization, project),
                                 **checked_headers("default_headers", default_headers)}
        view._default_query = {**self._default_query,
                               **checked_query("default_query", default_query)}
        view._mount_resources()
        return view

    def _check_open(self) -> None:
        if self._closed or self._root._closed:
            raise RuntimeError("this cometkit.Client is closed")

    def close(self) -> None:
        """Finish queued work, then close the pool, the limiter, the sinks and the session.
        On a view made by :meth:`with_options`, end only the view."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._root is not self:
            return
        self._executor.shutdown(wait=True)
        self._engine.close()
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<cometkit.Client base_url={self.base_url!r} concurrency={self.concurrency} "
                f"plugins={self.plugins}>")

    # -- the life of one call ---------------------------------------------------------------

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
        timeout: Any = None,
        deadline: Union[float, str, None] = None,
        raw_response: bool = False,
        priority: Optional[str] = None,
        files: Optional[Mapping[str, Any]] = None,
        data: Optional[Mapping[str, Any]] = None,
        raw: bool = False,
        answer_type: Callable[[dict, Optional[str]], Any] = ApiObject,
    ) -> Any:
        """One call to its end. ``raw_response``: answer with a :class:`RawResponse`;
        ``files``/``data``: an upload instead of the JSON ``body``; ``raw``: the answer as a
        :class:`BinaryAnswer`; ``answer_type``: what wraps a JSON object answer (a route's own
        :class:`ApiObject` subclass)."""
        self._check_open()
        # checked here, for request() and every resource
        timeout_s = _call_timeout(timeout, self.timeout_s)
        deadline_s = call_deadline(deadline, self.deadline_s)
        if raw and stream:
            raise ValueError("raw=True reads the whole answer; stream=True is for event "
                             "streams: give one of them")
        if self._default_headers:
            headers = {**self._default_headers, **(headers or {})}
        if self._default_query:
            params = {**self._default_query, **(params or {})}
        if files is not None:
            payload, content_type = encode_upload(files, data)
            headers = {**(headers or {}), "Content-Type": content_type}
            body = dict(data or {})  # what the limiter and the sinks may read of the request
        elif data is not None:
            raise TypeError("data= holds the form fields of an upload: give files= with it, "
                            "or send a JSON body with json=")
        else:
            payload = None if body is None else json.dumps(body, separators=(",", ":"),
                                                           default=json_default).encode()
        request = self.new_request(method, route, body, stream=stream, operation=operation,
                                   model=model, deadline_s=deadline_s, priority=priority)
        send = self._transport.send
        secrets = self._transport.secrets  # answers come through it already blanked

        def attempt(result: AttemptResult) -> Sent:
            sent = send_attempt(
                result, lambda: send(method, route, payload, params=params, headers=headers,
                                     stream=stream,
                                     timeout_s=cut_timeout(timeout_s, result.time_left_s)),
                stream=stream, method=method, route=route, secrets=secrets,
                follows_redirects=False,  # the transport follows none
                decode=_raw_content if raw else self._decode)
            if stream and result.error is None and not sent.streaming:
                # a whole JSON answer to a stream request: an error, or the lot
                sent.response.close()
                value = sent.value
                failure = event_error(value, sent.provider_request_id)
                if failure is None and not isinstance(value, dict):
                    what = "an empty body" if value is None else \
                        f"a JSON {type(value).__name__}"
                    failure = APIError(
                        f"the server answered a stream request with {what} instead of "
                        "events or an object: check base_url",
                        request_id=sent.provider_request_id, body=value)
                if failure is not None:
                    result.error, result.error_code = failure, failure.code
            elif sent.streaming:  # an event stream: its first event is part of the attempt
                sent.events, failure = read_first_event(sent.response, secrets,
                                                        sent.provider_request_id)
                if failure is not None:
                    sent.response.close()
                    sent.streaming = False
                    result.error, result.error_code = failure, failure.code
                    if isinstance(failure, APIConnectionError):
                        result.error_stage = failure.stage
                    elif isinstance(failure, APIStatusError):
                        result.status_code = failure.status_code
            return sent

        sent, result, error, permit = self._engine.execute(request, attempt)
        if error is not None:
            raise error
        answer = self._answer(sent, result, permit, stream=stream, secrets=secrets,
                              method=method, route=route, body=body, operation=operation,
                              model=model, params=params, headers=headers, timeout=timeout,
                              deadline=deadline, raw=raw, answer_type=answer_type)
        if not raw_response:
            return answer
        return RawResponse(status_code=sent.response.status_code,
                           headers=sent.response.headers,
                           content=None if sent.streaming else sent.response.content,
                           parsed=answer, request_id=sent.provider_request_id,
                           retries_taken=result.attempt - 1)

    def _answer(self, sent: Sent, result: AttemptResult, permit: Any, *, stream: bool,
                secrets: Any, method: str, route: str, body: Any, operation: str,
                model: Optional[str], params: Optional[Mapping[str, Any]],
                headers: Optional[Mapping[str, str]], timeout: Any,
                deadline: Union[float, str, None], raw: bool = False,
                answer_type: Callable[[dict, Optional[str]], Any] = ApiObject) -> Any:
        """What a successful call returns: a :class:`Stream`, a :class:`BinaryAnswer`
        (``raw``), or the decoded answer (a list answer that says ``has_more`` fetches its
        next page with the same options)."""
        if sent.streaming:
            return Stream(sent.response, self._engine.end_of_stream(sent, result, permit),
                          monotonic=self._clock.monotonic, started_at=result.started_at,
                          request_id=sent.provider_request_id, secrets=secrets,
                          defer=self._engine.defer, preloaded=sent.events)
        if stream:  # answered whole (already recorded): the completion as one chunk
            return Stream(sent.response, _nothing_to_finish, monotonic=self._clock.monotonic,
                          started_at=result.started_at, request_id=sent.provider_request_id,
                          preloaded=[completion_as_chunk(sent.value)], defer=self._engine.defer)
        if raw:
            return BinaryAnswer(sent.value, status_code=sent.response.status_code,
                                headers=sent.response.headers,
                                request_id=sent.provider_request_id)
        next_page = None
        if method == "GET" and isinstance(sent.value, dict) and sent.value.get("has_more"):
            def next_page(after: str) -> Any:
                return self._call(method, route, body, operation=operation, model=model,
                                  params={**(params or {}), "after": after}, headers=headers,
                                  timeout=timeout, deadline=deadline)
        return wrap_answer(sent.value, sent.provider_request_id, next_page, answer_type)

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

