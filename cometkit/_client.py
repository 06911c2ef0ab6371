"""The client: its construction (configuration, plugins, transport, engine, worker pool),
its views (``with_options``), its fronts (``httpx_client``, ``openai``) and its end.

The core decides *when*: admit an attempt through the limiter, send it, hand the outcome back
to the limiter, ask the retry policy whether to go again, sleep outside the limiter, record
every attempt and every call. Plugins decide *what*. With no plugins, a call goes out once.
What ``Client`` does with one call lives in :mod:`cometkit._calls` (:class:`CallPath`), what
it runs on its worker pool in :mod:`cometkit._pool_methods`; it inherits both. The checks of
its arguments are in :mod:`cometkit._client_args`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import random
import threading
from typing import Any, Mapping, Optional, Sequence, Union
from urllib.parse import urlsplit

from ._call_options import (
    checked_headers,
    checked_query,
    identity_headers,
    max_attempts_for,
    timeout_parts,
)
from ._calls import CallPath
from ._client_args import (
    call_deadline,
    call_timeout,
    check_construction_args,
    clean_api_key,
    client_deadline,
)
from ._engine import CallEngine
from ._exceptions import ConfigError
from ._plugin_build import PluginSet, build_plugins
from ._pool_methods import PoolMethods
from ._resources import Chat, Embeddings, Models
from ._routes import Audio, Batches, Files, Images, Moderations, Responses, TextCompletions
from ._secrets import SecretFilter
from ._transport import DEFAULT_BASE_URL, Transport, check_base_url
from ._workers import WorkerPool
from .clock import Clock, SystemClock
from .config import load_config
from .prices import PriceTable
from .priorities import Priorities

__all__ = ["Client"]

logger = logging.getLogger("cometkit")


class Client(CallPath, PoolMethods):
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
        check_construction_args(base_url, clock, rng, extra_plugins)
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
        api_key = clean_api_key(
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
        self.deadline_s: Optional[float] = client_deadline(data, self._plugins, where)
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
        view.timeout_s = call_timeout(timeout, self.timeout_s)
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
