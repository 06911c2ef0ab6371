"""Loading the configuration: find it, read it safely, fill in ``${VAR}`` references, validate.

One configuration has a few top-level keys declared in :data:`CORE_OPTIONS` and a ``plugins:``
section whose entries the plugin manager validates against each plugin's own schema. This
module checks the top level and the *shape* of ``plugins:``; it never imports a plugin.

Every problem is a :class:`~cometkit.ConfigError` whose message reads
``<file>: <key.path>: <problem>. <what is allowed / how to fix it>``, because the person who
sees it is usually not the person who wrote the file.

The steps live in their own modules: :mod:`cometkit._yaml` reads the file (a hardened safe
loader: a tag such as ``!!python/object/apply`` is refused before anything is constructed, so a
configuration file can never run code), :mod:`cometkit._interpolate` fills in ``${VAR}``, and
:mod:`cometkit._redact` makes a configuration fit to show. This module holds the top-level
schema and puts the steps together.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from . import _redact
from ._exceptions import ConfigError
from ._interpolate import file_of, interpolate
from ._redact import REDACTED
from ._yaml import dump_yaml, read_yaml_file
from .hints import parse_duration
from .options import Interpolated, InvalidValue, Option, validate_section
from .prices import PRICE_OPTIONS
from .priorities import DEFAULT_PRIORITIES, PRIORITIES_ACCEPTS, Priorities, parse_priorities

__all__ = [
    "CONFIG_ENV",
    "CORE_OPTIONS",
    "DEFAULT_TIMEOUT_S",
    "parse_deadline",
    "REDACTED",
    "LoadedConfig",
    "load_config",
    "interpolate",
    "redact",
    "dump_yaml",
]

#: Environment variable naming the configuration file used when none is given.
CONFIG_ENV = "COMETKIT_CONFIG"
#: ``(connect, read)`` seconds: connecting is quick or hopeless; a long completion can take
#: minutes to finish.
DEFAULT_TIMEOUT_S = (10.0, 600.0)
#: What a secret is replaced with when configuration is shown.
#: Secrets shorter than this are only redacted where they are the whole value: replacing a

_TIMEOUT_ACCEPTS = ("seconds > 0 for both connect and read (a number or a duration such as "
                    '"30s"), a mapping {connect: s, read: s} or a list [connect, read]')
_DEADLINE_ACCEPTS = 'seconds > 0 (a number or a duration such as "20s")'
_PLUGINS_ACCEPTS = "a mapping of plugin names to true, false or a mapping of options"
_VERIFY_ACCEPTS = "true, false (warns loudly) or the path of a CA bundle file"


# -- option parsers -------------------------------------------------------------------------


def _seconds(value: Any, *, part: Optional[str] = None,
             accepts: str = _TIMEOUT_ACCEPTS) -> float:
    seconds: Optional[float]
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value)
    else:
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        what = "seconds > 0 (a number or a duration such as \"30s\")" if part else accepts
        raise InvalidValue(f"must be {what}, got {value!r}", key=part)
    return seconds


def parse_timeout(value: Any) -> tuple[float, float]:
    """Normalise ``timeout`` to ``(connect_s, read_s)``.

    Accepts one number of seconds for both, a duration string (``"2m"``), a mapping with
    ``connect`` and/or ``read`` (the other keeps its default), or a two-item list as
    :func:`dump_yaml` writes it back.
    """
    if isinstance(value, dict):
        for name in value:
            if name not in ("connect", "read"):
                close = difflib.get_close_matches(str(name), ["connect", "read"], n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise InvalidValue(f"unknown key {name!r}.{hint} Allowed keys: connect, read.",
                                   key=str(name))
        connect = value.get("connect", DEFAULT_TIMEOUT_S[0])
        read = value.get("read", DEFAULT_TIMEOUT_S[1])
        return _seconds(connect, part="connect"), _seconds(read, part="read")
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise InvalidValue(f"must be {_TIMEOUT_ACCEPTS}, got a list of {len(value)} items")
        return _seconds(value[0], part="connect"), _seconds(value[1], part="read")
    seconds = _seconds(value)
    return seconds, seconds


def parse_deadline(value: Any) -> float:
    """``deadline`` in seconds: a number or a duration string (``"20s"``, ``"2m"``)."""
    return _seconds(value, accepts=_DEADLINE_ACCEPTS)


def parse_verify(value: Any) -> Union[bool, str]:
    """``true``, ``false`` or an existing CA bundle file (checked now, not at the first call)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        path = os.path.expanduser(value)
        if not os.path.exists(path):
            raise InvalidValue(f"CA bundle {value!r} does not exist. Give an existing file or "
                               "directory of certificates, or true to use the system's.")
        return path
    raise InvalidValue(f"must be {_VERIFY_ACCEPTS}, got {value!r}")


def parse_plugins(value: Any) -> dict[str, Any]:
    """Check the shape of ``plugins:``; each plugin's options are validated by the manager.

    Entry values written as ``${VAR}`` are read as YAML scalars here, so that
    ``csv_metrics: ${CSV_ON:-false}`` disables the plugin rather than passing it a string.
    """
    if not isinstance(value, dict):
        raise InvalidValue(f"must be {_PLUGINS_ACCEPTS}, got {value!r}")
    out: dict[str, Any] = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not name:
            raise InvalidValue(f"plugin names must be non-empty strings, got {name!r}")
        if isinstance(entry, Interpolated):
            try:
                entry = yaml.safe_load(str(entry))
            except yaml.YAMLError:
                pass
        if entry is not None and not isinstance(entry, (bool, dict)):
            raise InvalidValue("must be true (enable with defaults), false (disable) or a "
                               f"mapping of the plugin's options, got {entry!r}", key=name)
        out[name] = entry
    return out


#: The top-level keys. ``plugins`` holds each plugin's section, validated by the plugin manager.
CORE_OPTIONS: dict[str, Option] = {
    "base_url": Option(
        "str", default=None, nullable=True,
        help="API root; null means $COMETAPI_BASE_URL, then https://api.cometapi.com/v1. A "
             "plain http:// URL to a non-loopback host is refused unless allow_insecure_http.",
        example="https://api.cometapi.com/v1"),
    "api_key": Option(
        "str", default=None, nullable=True, secret=True,
        help="API key; null means $COMETAPI_KEY. Write it as an environment reference, never "
             "literally; it is redacted whenever configuration is shown.",
        example="${COMETAPI_KEY}"),
    "timeout": Option(
        "any", default=DEFAULT_TIMEOUT_S, parse=parse_timeout, accepts=_TIMEOUT_ACCEPTS,
        help="Connect and read timeouts of each attempt, in seconds; a read timeout is a "
             "stall between bytes, so a long stream is not cut off.",
        example={"connect": 5, "read": 120}),
    "deadline": Option(
        "any", default=None, nullable=True, parse=parse_deadline, accepts=_DEADLINE_ACCEPTS,
        help="Seconds one call may take in all: waiting for admission, every attempt, every "
             "retry wait; past it the call fails with APITimeoutError. null: no deadline.",
        example=20),
    "priorities": Option(
        "any", default=list(DEFAULT_PRIORITIES), parse=parse_priorities,
        accepts=PRIORITIES_ACCEPTS,
        help="Priority lanes, highest first: the limiter admits a waiting call of a higher "
             "lane first (see the limiter's starvation_share).",
        example=["interactive", "default", "batch"]),
    "priority": Option(
        "str", default=None, nullable=True,
        help="Lane of a call that names none (priority= per call wins); null: the lane named "
             "default, else the middle one. cometkit batch sends in batch unless told.",
        example="interactive"),
    "concurrency": Option(
        "int", default=5, minimum=1, maximum=1024,
        help="Worker threads of the client's pool, and size of its connection pool.",
        example=16),
    "verify": Option(
        "any", default=True, parse=parse_verify, accepts=_VERIFY_ACCEPTS,
        help="TLS certificate verification; a path selects a private CA bundle "
             "($REQUESTS_CA_BUNDLE is honoured too). false logs a warning for every client.",
        example="/etc/ssl/corp-ca.pem"),
    "allow_insecure_http": Option(
        "bool", default=False,
        help="Permit a plain http:// base_url to a non-loopback host, sending the key in "
             "clear text.",
        example=False),
    "prices": Option(
        "mapping", default={}, children=PRICE_OPTIONS,
        help="Model name to its price in US dollars per million input and output tokens: "
             "the per-model summary shows what a run cost, and cometkit batch --max-cost "
             "needs the price of every model it sends to. A dated snapshot name "
             "(gpt-4o-mini-2024-07-18) takes its model's price.",
        example={"gpt-4o-mini": {"input": 0.15, "output": 0.6}}),
    "plugins": Option(
        "mapping", default={}, parse=parse_plugins, accepts=_PLUGINS_ACCEPTS,
        help="Plugin name to true (enable), false (disable) or its options; see each "
             "plugin's reference.",
        example={"backoff": {"max_attempts": 6}, "csv_metrics": {"path": "calls.csv"}}),
}


# -- the result -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration and where it came from.

    :ivar data: every key of :data:`CORE_OPTIONS`, defaults filled in, ``timeout`` as a
        ``(connect_s, read_s)`` tuple; ``plugins`` is the raw section (entries true, false,
        null or a mapping, ``${VAR}`` already substituted) for the plugin manager to validate.
    :ivar path: the file it was read from, or ``None`` (a dict, or no file at all).
    :ivar where: how error messages name the source: the path, ``<dict>`` or ``<defaults>``.
    """

    data: dict[str, Any]
    path: Optional[str] = None
    where: str = "<defaults>"


# -- loading --------------------------------------------------------------------------------

#: How error messages name keyword arguments given to ``Client(...)``.
_OVERRIDES_WHERE = "<keyword arguments>"


def load_config(
    source: Union[str, os.PathLike, Mapping[str, Any], None] = None,
    *,
    overrides: Optional[Mapping[str, Any]] = None,
) -> LoadedConfig:
    """Find, read, interpolate and validate a configuration.

    :param source: a YAML file path, a mapping with the same shape, or ``None``: the file
        named by ``$COMETKIT_CONFIG`` if set, else an empty configuration (all defaults).
    :param overrides: top-level keys given as keyword arguments to ``Client``; validated the
        same way and winning over the source. ``None`` values count as not given. A
        ``plugins`` override replaces the source's entries plugin by plugin.
    :raises ConfigError: naming the file, the key path, the problem and the fix.
    """
    path: Optional[str] = None
    if source is None:
        env_path = os.environ.get(CONFIG_ENV, "").strip()
        if env_path:
            raw, path = read_yaml_file(env_path, named_by=CONFIG_ENV)
            where = path
        else:
            raw, where = {}, "<defaults>"
    elif isinstance(source, Mapping):
        raw, where = dict(source), "<dict>"
    elif isinstance(source, (str, os.PathLike)):
        raw, path = read_yaml_file(source)
        where = path
    else:
        raise ConfigError(f"config: must be a path to a YAML file or a mapping, got "
                          f"{type(source).__name__}.", key="config")
    if raw is None:  # an empty file, or one holding only comments
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level: must be a mapping of keys such as "
                          f"{', '.join(CORE_OPTIONS)}, got a {type(raw).__name__}.",
                          path=file_of(where), key="")
    checked = validate_section(CORE_OPTIONS, interpolate(raw, where=where), where=where)
    data = {name: checked[name] for name in CORE_OPTIONS}  # declaration order, for display
    lanes_where = where
    if overrides:
        given = {k: v for k, v in overrides.items() if v is not None}
        overridden = validate_section(CORE_OPTIONS, given, where=_OVERRIDES_WHERE,
                                      fill_defaults=False)
        if "plugins" in overridden:
            overridden["plugins"] = {**data["plugins"], **overridden["plugins"]}
        data.update(overridden)
        if "priority" in overridden and "priorities" not in overridden:
            lanes_where = _OVERRIDES_WHERE  # the keyword argument is the one to fix
    Priorities.from_config(data, lanes_where)  # priority must be one of priorities
    return LoadedConfig(data=data, path=path, where=where)


def redact(data: Mapping[str, Any], schema: Mapping[str, Option] = CORE_OPTIONS, *,
           plugin_schemas: Optional[Mapping[str, Mapping[str, Option]]] = None,
           secrets: Iterable[str] = ()) -> dict[str, Any]:
    """:func:`cometkit._redact.redact` with the core's schema by default."""
    return _redact.redact(data, schema, plugin_schemas=plugin_schemas, secrets=secrets)
