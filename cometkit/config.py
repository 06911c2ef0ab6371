"""Loading the configuration: find it, read it safely, fill in ``${VAR}`` references, validate.

One configuration has a few top-level keys declared in :data:`CORE_OPTIONS` and a ``plugins:``
section whose entries the plugin manager validates against each plugin's own schema. This
module checks the top level and the *shape* of ``plugins:``; it never imports a plugin.

Every problem is a :class:`~cometkit.ConfigError` whose message reads
``<file>: <key.path>: <problem>. <what is allowed / how to fix it>``, because the person who
sees it is usually not the person who wrote the file.

The YAML is read with a safe loader only: a tag such as ``!!python/object/apply`` is refused
before anything is constructed, so a configuration file can never run code.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from ._exceptions import ConfigError
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
REDACTED = "***"
#: Secrets shorter than this are only redacted where they are the whole value: replacing a
#: short string inside every other value would mangle the output without protecting anything.
_MIN_SUBSTRING_SECRET = 6

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


# -- reading YAML ---------------------------------------------------------------------------


class _UnsafeTag(yaml.MarkedYAMLError):
    pass


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


def _short_tag(tag: str) -> str:
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix):] if tag.startswith(prefix) else tag


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that names refused tags and rejects duplicate keys.

    PyYAML silently keeps the last of two equal keys; in a configuration that hides a mistake
    (two ``concurrency:`` lines, one forgotten), so it is an error here.
    """

    def construct_undefined(self, node: yaml.Node) -> Any:
        raise _UnsafeTag(None, None, f"tag {_short_tag(node.tag)} is not allowed",
                         node.start_mark)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                first = seen[ident].start_mark.line + 1
                raise _DuplicateKey(None, None, f"duplicate key {key_node.value!r} (first "
                                    f"given on line {first})", key_node.start_mark)
            seen[ident] = key_node
        return super().construct_mapping(node, deep=deep)

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Optional[yaml.Node], index: Any) -> Any:
        """Refuse what PyYAML would follow into a Python ``RecursionError``: an alias to an
        anchor whose node is not finished (a structure containing itself), and nesting deeper
        than :data:`MAX_CONFIG_DEPTH` (the composer recurses once per level)."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise _BadStructure(None, None, f"alias *{event.anchor} is inside its own anchor "
                                    f"&{event.anchor}, so the value would contain itself "
                                    "forever (a recursive alias)", event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_CONFIG_DEPTH:
            raise _BadStructure(None, None, f"values nested more than {MAX_CONFIG_DEPTH} levels "
                                "deep", event.start_mark)
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)

    def construct_document(self, node: yaml.Node) -> Any:
        size, depth = _expanded_shape(node)
        if size > MAX_CONFIG_VALUES:
            raise _BadStructure(None, None, f"the document expands to more than "
                                f"{MAX_CONFIG_VALUES} values (YAML aliases repeating aliases?)",
                                node.start_mark)
        if depth > MAX_CONFIG_DEPTH:
            raise _BadStructure(None, None, "once its aliases are expanded, the document nests "
                                f"values more than {MAX_CONFIG_DEPTH} levels deep (aliases of "
                                "aliases of nested values?)",
                                node.start_mark)
        return super().construct_document(node)


_ConfigLoader.add_constructor(None, _ConfigLoader.construct_undefined)

#: A configuration is small; a document that expands past this many values is refused before
#: it is built, so an alias bomb ("billion laughs") costs nothing.
MAX_CONFIG_VALUES = 100_000
#: Deepest nesting of mappings and lists accepted (a real configuration needs about five).
#: Everything that walks a configuration (YAML composing, ``${VAR}`` interpolation,
#: validation, redaction) recurses once per level, so a deeper document is refused up front
#: instead of ending in a ``RecursionError``.
MAX_CONFIG_DEPTH = 64


class _BadStructure(yaml.MarkedYAMLError):
    """Too large, too deep or recursive: refused before anything is built."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_shape(root: yaml.Node) -> tuple[int, int]:
    """``(values, depth)`` of ``root`` once aliases are expanded.

    Counted on the node graph, where an alias is a shared node, so the count is cheap even for
    an alias bomb; walked with an explicit stack, so a long chain of aliases cannot exhaust
    Python's recursion limit either. A node reached again while it is being walked (a cycle
    the composer let through) is refused.
    """
    shape: dict[int, tuple[int, int]] = {}
    walking: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            walking.discard(key)
            kids = [shape[id(child)] for child in _children(node)]
            size = 1 + sum(size for size, _ in kids)
            depth = 1 + max((depth for _, depth in kids), default=0)
            shape[key] = (size, depth)
            if size > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
                return size, depth  # refused anyway: no need to finish the walk
            continue
        if key in shape:
            continue
        if key in walking:
            raise _BadStructure(None, None, "a value contains itself (a recursive alias)",
                                node.start_mark)
        walking.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in shape)
    return shape[id(root)]


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: no code runs
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        if isinstance(exc, _UnsafeTag):
            raise ConfigError(
                f"{where}: {at}: {exc.problem}. Configuration is read with YAML safe loading "
                "only: use plain mappings, lists, strings, numbers, booleans and null.",
                path=where) from None
        if isinstance(exc, _BadStructure):
            raise ConfigError(f"{where}: {at}: {exc.problem}.", path=where) from None
        if isinstance(exc, _DuplicateKey):
            raise ConfigError(f"{where}: {at}: {exc.problem}. Keep one of them.",
                              path=where) from None
        context = exc.context or ""
        if context and exc.context_mark is not None and exc.context_mark is not mark:
            context += (f" (which began at line {exc.context_mark.line + 1}, column "
                        f"{exc.context_mark.column + 1})")
        problem = "; ".join(p for p in (context, exc.problem) if p)
        raise ConfigError(f"{where}: {at}: invalid YAML: {problem}. Check the indentation and "
                          "quoting around that line.", path=where) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML parse error is marked
        raise ConfigError(f"{where}: invalid YAML: {exc}", path=where) from None


def _read_file(path: Union[str, os.PathLike], *, from_env: bool) -> tuple[Any, str]:
    name = os.fsdecode(os.fspath(path))
    origin = f" (named by ${CONFIG_ENV})" if from_env else ""
    try:
        with open(os.path.expanduser(name), encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        fix = f"Fix or unset ${CONFIG_ENV}." if from_env else "Check the path."
        raise ConfigError(f"{name}: configuration file not found{origin}. {fix}",
                          path=name) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: configuration file is not UTF-8 text{origin} (byte "
                          f"{exc.start}). Save it as UTF-8.", path=name) from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read the configuration file{origin}: "
                          f"{exc.strerror or exc}.", path=name) from None
    return _parse_yaml(text, name), name


# -- ${VAR} interpolation -------------------------------------------------------------------

_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def _substitute(text: str, environ: Mapping[str, str], where: str, key: str) -> str:
    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        body = match.group(1)
        parts = _BODY.fullmatch(body) if body is not None else None
        if parts is None:
            shown = token if body is not None else token + "..."
            raise ConfigError(
                f"{where}: {key}: malformed environment reference {shown!r}. Write ${{NAME}} "
                "or ${NAME:-default}, or $${ for a literal '${'.", path=_file(where), key=key)
        name, default = parts.group(1), parts.group(2)
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise ConfigError(
                f"{where}: {key}: environment variable {name} is not set. Export it, or write "
                f"${{{name}:-default}} to give a default.", path=_file(where), key=key)
        return value

    result = _REFERENCE.sub(replace, text)
    whole = _REFERENCE.fullmatch(text)
    if whole is not None and whole.group(0) != "$${":
        return Interpolated(result, reference=text)
    return result


def _file(where: str) -> Optional[str]:
    return where if where and not where.startswith("<") else None


def interpolate(
    value: Any,
    *,
    where: str = "",
    key_path: str = "",
    environ: Optional[Mapping[str, str]] = None,
) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string inside ``value``.

    ``${VAR:-default}`` uses the default when the variable is unset or empty, as the shell
    does; ``$${`` is a literal ``${``. A value that is exactly one reference comes back as an
    :class:`~cometkit.options.Interpolated` string, which the validator reads as a number or a
    boolean where the option wants one. Keys are left alone.

    :raises ConfigError: for an unset variable without a default, naming the key path.
    """
    env = os.environ if environ is None else environ
    if isinstance(value, str):
        if "${" not in value:
            return value
        return _substitute(value, env, where, key_path or "top level")
    if isinstance(value, dict):
        return {k: interpolate(v, where=where, environ=env,
                               key_path=f"{key_path}.{k}" if key_path else str(k))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [interpolate(v, where=where, environ=env, key_path=f"{key_path}[{i}]")
                for i, v in enumerate(value)]
    return value


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
            raw, path = _read_file(env_path, from_env=True)
            where = path
        else:
            raw, where = {}, "<defaults>"
    elif isinstance(source, Mapping):
        raw, where = dict(source), "<dict>"
    elif isinstance(source, (str, os.PathLike)):
        raw, path = _read_file(source, from_env=False)
        where = path
    else:
        raise ConfigError(f"config: must be a path to a YAML file or a mapping, got "
                          f"{type(source).__name__}.", key="config")
    if raw is None:  # an empty file, or one holding only comments
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level: must be a mapping of keys such as "
                          f"{', '.join(CORE_OPTIONS)}, got a {type(raw).__name__}.",
                          path=_file(where), key="")
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


# -- showing it -----------------------------------------------------------------------------


def _secret_values(data: Any, schema: Mapping[str, Option]) -> Iterable[str]:
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        option = schema.get(name) if isinstance(name, str) else None
        if option is None:
            continue
        if option.secret and isinstance(value, str) and value:
            yield value
        elif option.kind == "section":
            yield from _secret_values(value, option.children)
        elif option.kind == "mapping" and option.children and isinstance(value, dict):
            for sub in value.values():
                yield from _secret_values(sub, option.children)


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        text = str(value)
        for secret in secrets:
            if text == secret:
                return REDACTED
            if len(secret) >= _MIN_SUBSTRING_SECRET and secret in text:
                text = text.replace(secret, REDACTED)
        return text
    if isinstance(value, dict):
        return {_scrub(k, secrets): _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, tuple):
        return tuple(_scrub(v, secrets) for v in value)
    return value


def _redact_declared(data: Any, schema: Mapping[str, Option],
                     plugin_schemas: Mapping[str, Mapping[str, Option]], top: bool) -> Any:
    if not isinstance(data, dict):
        return data
    out = {}
    for name, value in data.items():
        option = schema.get(name) if isinstance(name, str) else None
        if top and name == "plugins" and isinstance(value, dict):
            value = {plugin: _redact_declared(section, plugin_schemas.get(plugin, {}), {}, False)
                     for plugin, section in value.items()}
        elif option is not None and option.secret and value is not None:
            value = REDACTED
        elif option is not None and option.kind == "section":
            value = _redact_declared(value, option.children, {}, False)
        elif option is not None and option.kind == "mapping" and isinstance(value, dict):
            value = {k: _redact_declared(v, option.children, {}, False) for k, v in value.items()}
        out[name] = value
    return out


def redact(
    data: Mapping[str, Any],
    schema: Mapping[str, Option] = CORE_OPTIONS,
    *,
    plugin_schemas: Optional[Mapping[str, Mapping[str, Option]]] = None,
    secrets: Iterable[str] = (),
) -> dict[str, Any]:
    """A copy of ``data`` fit to show: no secret survives, not even in part.

    Values of options declared ``secret=True`` become ``"***"`` (``null`` stays ``null``: that
    the key is unset is worth seeing). Then the API key in effect (``api_key``, else
    ``$COMETAPI_KEY``), every declared secret value and any extra ``secrets`` are replaced
    wherever else they occur — a key pasted into a URL or a header template as well.

    :param plugin_schemas: each plugin's option schema by plugin name, to redact secrets in
        ``plugins.<name>`` sections.
    :param secrets: further strings to hide.
    """
    plugin_schemas = plugin_schemas or {}
    found = [*secrets, *_secret_values(dict(data), schema)]
    plugins = data.get("plugins")
    if isinstance(plugins, dict):
        for name, section in plugins.items():
            found.extend(_secret_values(section, plugin_schemas.get(name, {})))
    env_key = os.environ.get("COMETAPI_KEY")
    if env_key:
        found.append(env_key)
    # Longest first, so a secret containing another is replaced whole.
    unique = sorted({s for s in found if s}, key=len, reverse=True)
    declared = _redact_declared(dict(data), schema, plugin_schemas, True)
    return _scrub(declared, unique)


class _ShowDumper(yaml.SafeDumper):
    pass


def _represent_tuple(dumper: yaml.SafeDumper, data: tuple) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=True)


_ShowDumper.add_representer(tuple, _represent_tuple)
_ShowDumper.add_representer(Interpolated, yaml.SafeDumper.represent_str)


def dump_yaml(data: Any) -> str:
    """``data`` as YAML in its own key order; tuples such as ``timeout`` as ``[a, b]``.

    It does not redact: pass the result of :func:`redact`.
    """
    return yaml.dump(data, Dumper=_ShowDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True)
