"""Declared options: one schema drives validation, defaults and the configuration reference.

The core declares its top-level keys with :class:`Option`, and every plugin declares its own
section the same way (through the ``cometkit_plugin_spec`` hook). The validator and the docs
generator read the same objects, so the reference cannot drift from what is accepted.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

from ._exceptions import ConfigError

__all__ = [
    "Option",
    "PluginSpec",
    "validate_section",
    "describe_kind",
    "Interpolated",
    "InvalidValue",
    "SecretText",
]

_KINDS = ("int", "float", "bool", "str", "list", "section", "mapping", "any")


@dataclass(frozen=True)
class Option:
    """One configuration key.

    :param kind: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``list`` (items checked
        against ``item``), ``section`` (fixed keys in ``children``), ``mapping`` (free keys,
        each value a ``section`` of ``children``) or ``any``.
    :param default: value used when the key is absent (``None``: absent means unset).
    :param help: one sentence for the configuration reference.
    :param choices: allowed values, for ``str`` and ``list`` items.
    :param minimum: smallest allowed number.
    :param maximum: largest allowed number.
    :param nullable: ``null`` is accepted.
    :param secret: redact the value whenever configuration is shown.
    :param parse: custom converter for values that take several shapes; it returns the
        normalised value or raises ``ValueError`` with what is allowed (raise
        :class:`InvalidValue` with ``key=`` to point at a part of the value).
    :param example: a typical value, for the configuration reference.
    :param accepts: what the value may be, in words, when ``parse`` accepts more shapes than
        ``kind`` says (``"seconds, or a mapping {connect, read}"``); used in errors and docs.
    :param required: the key must be given (in a ``section`` or in each entry of a
        ``mapping``): a missing one is an error naming it, never a silent default.
    """

    kind: str
    default: Any = None
    help: str = ""
    choices: Optional[Sequence[Any]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    nullable: bool = False
    secret: bool = False
    item: Optional[Option] = None
    children: Mapping[str, Option] = field(default_factory=dict)
    parse: Optional[Callable[[Any], Any]] = None
    example: Any = None
    accepts: str = ""
    required: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Option kind must be one of {_KINDS}, not {self.kind!r}")


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin tells cometkit about itself.

    :param options: the keys its ``plugins.<name>`` section accepts.
    :param enabled_by_default: active even when the config does not mention it (``backoff`` and
        ``limiter`` are); ``<name>: false`` still turns it off.
    :param summary: one line for ``cometkit plugins`` and the docs.
    """

    options: Mapping[str, Option] = field(default_factory=dict)
    enabled_by_default: bool = False
    summary: str = ""


class Interpolated(str):
    """A string that was a whole ``${VAR}`` reference in the configuration.

    Environment variables are strings, yet ``concurrency: ${WORKERS}`` should give an integer.
    The loader marks such values with this type and the validator reads them as YAML scalars
    wherever the option wants something other than a string; ``str`` options keep the text as
    it is, so an API key that happens to look like a number stays a string.

    :ivar reference: the reference as written (``${WORKERS}``), for error messages.
    """

    reference: str

    def __new__(cls, value: str, reference: str = "") -> Interpolated:
        obj = super().__new__(cls, value)
        obj.reference = reference
        return obj

    def __reduce__(self) -> Any:
        return (Interpolated, (str(self), self.reference))


class SecretText(str):
    """The validated value of a ``secret=True`` option inside a section (a plugin's
    options): the string itself everywhere it is used, ``'***'`` wherever it is shown by
    ``repr`` -- a plugin's options, the client's context, a log line with ``%r``. A Redis
    URL with its password, say, stays usable and never shows."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"

    def __reduce__(self) -> Any:
        return (SecretText, (str(self),))


class InvalidValue(ValueError):
    """Raised by an :attr:`Option.parse` function; ``key`` names the bad part (``read``)."""

    def __init__(self, message: str, *, key: Optional[str] = None) -> None:
        super().__init__(message)
        self.key = key


def describe_kind(option: Option) -> str:
    """Human words for what an option accepts, used in errors and in the reference."""
    if option.accepts:
        return option.accepts
    if option.choices is not None and option.kind == "str":
        text = "one of " + ", ".join(repr(c) for c in option.choices)
    elif option.kind == "list" and option.item is not None:
        text = f"a list of {describe_kind(option.item)}"
    else:
        text = {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
            "list": "a list",
            "section": "a mapping with keys " + ", ".join(option.children),
            "mapping": "a mapping of names to sections",
            "any": "any value",
        }[option.kind]
    if option.choices is not None and option.kind != "str":
        text += " (each one of " + ", ".join(repr(c) for c in option.choices) + ")"
    if option.minimum is not None and option.maximum is not None:
        text += f" between {option.minimum:g} and {option.maximum:g}"
    elif option.minimum is not None:
        text += f" >= {option.minimum:g}"
    elif option.maximum is not None:
        text += f" <= {option.maximum:g}"
    if option.nullable:
        text += " or null"
    return text


def _fail(where: str, key: str, message: str) -> ConfigError:
    prefix = f"{where}: " if where else ""
    # "<dict>" and similar labels name a source, not a file.
    path = where if where and not where.startswith("<") else None
    return ConfigError(f"{prefix}{key}: {message}", path=path, key=key)


def _shown(option: Option, value: Any) -> str:
    """``value`` as an error message may show it: never the value of a secret."""
    if option.secret:
        return f"a {type(value).__name__} (value hidden)"
    text = repr(str(value)) if isinstance(value, Interpolated) else repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, Interpolated) and value.reference:
        text += f" (from {value.reference})"
    return text


def _from_environment(option: Option, value: Interpolated) -> Any:
    """Read an interpolated string as the YAML scalar it spells, unless a string is wanted.

    An empty value means "unset" for an option that accepts null, whatever its kind.
    """
    if option.nullable and not value.strip():
        return None
    if option.kind == "str":
        return str(value)
    try:
        parsed = yaml.safe_load(str(value))
    except yaml.YAMLError:
        return str(value)
    if parsed is None or isinstance(parsed, (bool, int, float, str)):
        return parsed
    return str(value)


def unknown_key_error(where: str, key_path: str, name: str, known: Sequence[str]) -> ConfigError:
    """An unknown key, with the closest known one suggested."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    allowed = ", ".join(sorted(known)) or "none"
    return _fail(where, key_path, f"unknown key {name!r}.{hint} Allowed keys: {allowed}.")


_ANY = Option("any", nullable=True)


def _check_value(option: Option, value: Any, where: str, key: str) -> Any:
    shown = value
    if isinstance(value, Interpolated):
        value = _from_environment(option, value)
    if value is None:
        if option.nullable:
            return None
        return _fail(where, key, f"must be {describe_kind(option)}, got null")
    if option.parse is not None:
        try:
            return option.parse(value)
        except (TypeError, ValueError) as exc:
            sub = getattr(exc, "key", None)
            return _fail(where, f"{key}.{sub}" if sub else key, f"{exc}")
    got = _shown(option, shown)
    kind = option.kind
    if kind == "bool":
        if not isinstance(value, bool):
            return _fail(where, key, f"must be true or false, got {got}")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _fail(where, key, f"must be {describe_kind(option)}, got {got}")
        if kind == "int" and not isinstance(value, int):
            if not float(value).is_integer():
                return _fail(where, key, f"must be {describe_kind(option)}, got {got}")
            value = int(value)
        if isinstance(value, float) and not math.isfinite(value):
            return _fail(where, key, f"must be a finite number, got {got}")
        if (option.minimum is not None and value < option.minimum) or (
            option.maximum is not None and value > option.maximum
        ):
            return _fail(where, key, f"must be {describe_kind(option)}, got {got}")
        return float(value) if kind == "float" else value
    if kind == "str":
        if not isinstance(value, str):
            return _fail(where, key, f"must be {describe_kind(option)}, got {got}")
        if option.choices is not None and value not in option.choices:
            return _fail(where, key, f"must be {describe_kind(option)}, got {got}")
        return value
    if kind == "list":
        if not isinstance(value, list):
            return _fail(where, key, f"must be {describe_kind(option)}, got {got}")
        out = []
        for index, raw in enumerate(value):
            item_option = option.item or _ANY
            item = _check_value(item_option, raw, where, f"{key}[{index}]")
            if isinstance(item, ConfigError):
                return item
            if option.choices is not None and item not in option.choices:
                return _fail(where, f"{key}[{index}]", "must be one of "
                             + ", ".join(repr(c) for c in option.choices)
                             + f", got {_shown(item_option, raw)}")
            out.append(item)
        return out
    if kind == "section":
        if not isinstance(value, dict):
            return _fail(where, key, f"must be {describe_kind(option)}, got {got}")
        return validate_section(option.children, value, where=where, key_path=key)
    if kind == "mapping":
        if not isinstance(value, dict):
            return _fail(where, key, f"must be {describe_kind(option)}, got {got}")
        return {
            str(name): validate_section(option.children, sub or {}, where=where,
                                        key_path=f"{key}.{name}", fill_defaults=False)
            for name, sub in value.items()
        }
    return value


def validate_section(
    schema: Mapping[str, Option],
    data: Any,
    *,
    where: str = "",
    key_path: str = "",
    fill_defaults: bool = True,
) -> dict[str, Any]:
    """Check ``data`` against ``schema`` and return it with defaults filled in.

    :param where: the file (or ``<dict>``) the data came from, for error messages.
    :param key_path: dotted path of this section, for error messages.
    :param fill_defaults: add absent keys with their defaults (off for per-model overrides,
        where an absent key means "inherit").
    :raises ConfigError: naming ``where``, the full key path, what was wrong and what is allowed.
    """
    label = key_path or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(where, label, f"must be a mapping, got {data!r}")
    out: dict[str, Any] = {}
    for name, value in data.items():
        option = schema.get(name) if isinstance(name, str) else None
        full = f"{key_path}.{name}" if key_path else str(name)
        if option is None:
            raise unknown_key_error(where, full, str(name), list(schema))
        checked = _check_value(option, value, where, full)
        if isinstance(checked, ConfigError):
            raise checked
        if option.secret and key_path and isinstance(checked, str):
            # inside a section (a plugin's options, which the context shows); the top-level
            # api_key goes to the transport alone and stays a plain str
            checked = SecretText(checked)
        out[name] = checked
    for name, option in schema.items():
        if option.required and name not in out:
            full = f"{key_path}.{name}" if key_path else name
            raise _fail(where, full, f"required key missing; add it: {describe_kind(option)}. "
                        f"{option.help}")
    if fill_defaults:
        for name, option in schema.items():
            if name not in out:
                default = option.default
                out[name] = dict(default) if isinstance(default, dict) else (
                    list(default) if isinstance(default, list) else default)
    return out
