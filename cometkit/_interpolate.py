"""``${VAR}`` references in a configuration, filled in from the environment.

Secrets belong in the environment, not in a file that gets committed: ``api_key:
${COMETAPI_KEY}``. A reference to an unset variable without a default is an error naming the
key path, never an empty string that fails later and elsewhere.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

from ._exceptions import ConfigError
from .options import Interpolated

__all__ = ["interpolate", "file_of"]


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
                "or ${NAME:-default}, or $${ for a literal '${'.", path=file_of(where), key=key)
        name, default = parts.group(1), parts.group(2)
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise ConfigError(
                f"{where}: {key}: environment variable {name} is not set. Export it, or write "
                f"${{{name}:-default}} to give a default.", path=file_of(where), key=key)
        return value

    result = _REFERENCE.sub(replace, text)
    whole = _REFERENCE.fullmatch(text)
    if whole is not None and whole.group(0) != "$${":
        return Interpolated(result, reference=text)
    return result


def file_of(where: str) -> Optional[str]:
    """The file an error names, from how a source is named (``<dict>``: none)."""
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
