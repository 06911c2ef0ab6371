"""The checks of what a :class:`~cometkit.Client` and its calls are given.

Construction arguments that are not configuration keys, the API key, a per-call ``timeout=``
and ``deadline=``, counts and callables: each is refused here with a message that names the
argument and the fix, before anything is opened or sent. The client and its call path share
these, so one argument reads the same wherever it is given.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from typing import Any, Mapping, Optional

from ._call_options import timeout_parts
from ._exceptions import ConfigError
from ._plugin_build import PluginSet
from .config import parse_deadline, parse_timeout
from .options import InvalidValue

__all__ = ["clean_api_key", "check_count", "check_callable", "check_mapping", "call_timeout",
           "call_deadline", "client_deadline", "check_construction_args"]

logger = logging.getLogger("cometkit")


def clean_api_key(api_key: Optional[str], where: str) -> Optional[str]:
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


def check_callable(fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__} {fn!r}")


def check_mapping(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (a dict) or None, got {type(value).__name__}")


def call_timeout(timeout: Any, default_s: tuple[float, float]) -> tuple[float, float]:
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


def client_deadline(data: Mapping[str, Any], plugins: PluginSet,
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


def check_construction_args(base_url: Any, clock: Any, rng: Any, extra_plugins: Any) -> None:
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
