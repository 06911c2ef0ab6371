"""cometkit: a thread-pool client for CometAPI (OpenAI-compatible) built on ``requests``.

Retry strategy, admission control and metrics are supplied by pluggy plugins; see
``docs/plugins.md``. Everything a plugin may use is exported here.
"""

from ._binary import BinaryAnswer
from ._checkout import map_plugins_package
from ._client import Client
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CometError,
    ConfigError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    OpenAIError,
    PermissionDeniedError,
    PluginError,
    RateLimitError,
    UnprocessableEntityError,
)
from ._objects import ApiObject, ListObject
from ._raw_response import RawResponse
from ._streaming import Stream
from ._version import __version__
from .clock import Clock, SystemClock
from .context import ClientContext
from .hookspecs import hookimpl
from .options import Option, PluginSpec
from .plugin_api import (
    ATTEMPT_FIELDS,
    CALL_FIELDS,
    AttemptRecord,
    AttemptResult,
    CallRecord,
    CallTiming,
    Limiter,
    MetricsSink,
    RequestInfo,
    RetryDecision,
    RetryPolicy,
    Throttle,
)

__all__ = [
    "__version__",
    "Client",
    "ApiObject",
    "ListObject",
    "RawResponse",
    "Stream",
    "BinaryAnswer",
    "hookimpl",
    "ClientContext",
    "Option",
    "PluginSpec",
    "ATTEMPT_FIELDS",
    "CALL_FIELDS",
    "AttemptRecord",
    "AttemptResult",
    "CallRecord",
    "CallTiming",
    "Clock",
    "Limiter",
    "MetricsSink",
    "RequestInfo",
    "RetryDecision",
    "RetryPolicy",
    "SystemClock",
    "Throttle",
    "CometError",
    "OpenAIError",
    "ConfigError",
    "PluginError",
    "APIError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "APIConnectionError",
    "APITimeoutError",
]

# From a checkout that was never installed, ``cometkit_plugins`` is the checkout's plugins/.
map_plugins_package()
