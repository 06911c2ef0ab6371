"""A configuration fit to show: ``cometkit config check`` and every log line that quotes one.

Values of options declared ``secret=True`` become ``"***"``, and then every secret value found
(and the API key in effect) is replaced wherever else it occurs, so a key pasted into a URL
does not survive either.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional

from ._secrets import BLANKED, MIN_SUBSTRING_SECRET
from .options import Option

__all__ = ["REDACTED", "redact"]

#: What a secret is shown as: what the answers' secret filter blanks it to. Secrets at least
#: :data:`~cometkit._secrets.MIN_SUBSTRING_SECRET` long are also replaced inside longer
#: strings, by the same rule as in answers.
REDACTED = BLANKED



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
            if len(secret) >= MIN_SUBSTRING_SECRET and secret in text:
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
    schema: Mapping[str, Option],
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
