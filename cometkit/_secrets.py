"""Blanking the API key out of whatever the server sends back.

A server or gateway may echo the ``Authorization`` value into a body, a header, an event or
the text of the HTTP library's exceptions; every one of those channels goes through one
:class:`SecretFilter` before any other code (an exception, a log, a sink, a batch output
file) sees it.
"""

from __future__ import annotations

import functools
import re
from typing import MutableMapping, Optional

__all__ = ["SecretFilter", "BLANKED", "MIN_SUBSTRING_SECRET"]

#: What a blanked secret reads as.
BLANKED = "***"
#: A secret shorter than this is blanked only where it is a whole value (a header), never
#: inside longer text: blanking a short string everywhere would mangle unrelated answers.
MIN_SUBSTRING_SECRET = 6


def _hex_pattern(code: str) -> str:
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in code)


def _spellings(char: str) -> str:
    """A regex matching ``char`` as a server may spell it: as itself, as a JSON ``\\uXXXX``
    escape, percent-encoded (a redirect URL), and ``\\/`` / ``\\"`` / ``\\\\`` in JSON."""
    code = ord(char)
    options = [re.escape(char), r"\\u" + _hex_pattern(f"{code:04x}"),
               "%" + _hex_pattern(f"{code:02x}")]
    if char in '/"\\':
        options.append(re.escape("\\" + char))
    return "(?:" + "|".join(options) + ")"


class SecretFilter:
    """Blanks one secret (the API key) out of whatever the server sends back.

    The transport passes every channel through one instance before any other code sees it:
    headers (they land in errors and in the metrics' ``provider_request_id``), whole bodies
    (error or success, JSON or not), each server-sent-event line, and the text of the HTTP
    library's exceptions (a malformed status or chunk line is quoted in them). A server may
    echo the key escaped (``"sk-\\u0061bc"``, ``\\/``, ``%2D`` in a redirect), so every spelling
    of every character is matched, not only the literal key.
    """

    __slots__ = ("_secret", "_literal", "_text", "_bytes")

    def __init__(self, secret: Optional[str]) -> None:
        self._secret = secret or ""
        self._literal = self._secret.encode("utf-8", "replace")
        self._text: Optional[re.Pattern[str]] = None
        self._bytes: Optional[re.Pattern[bytes]] = None
        if len(self._secret) >= MIN_SUBSTRING_SECRET:
            pattern = "".join(_spellings(c) for c in self._secret)
            self._text = re.compile(pattern)
            self._bytes = re.compile(pattern.encode("utf-8", "replace"))

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def for_secret(secret: Optional[str]) -> SecretFilter:
        """A shared filter per secret (compiling the pattern costs more than using it)."""
        return SecretFilter(secret)

    def text(self, value: str) -> str:
        """``value`` with the secret blanked (the same object when there was nothing to do)."""
        secret = self._secret
        if not secret:
            return value
        if self._text is None:
            return BLANKED if value == secret else value
        if secret not in value and "\\" not in value and "%" not in value:
            return value
        return self._text.sub(BLANKED, value)

    def bytes(self, value: bytes) -> bytes:
        """``value`` with the secret blanked (the same object when there was nothing to do)."""
        if not self._secret:
            return value
        if self._bytes is None:
            return BLANKED.encode() if value == self._literal else value
        if self._literal not in value and b"\\" not in value and b"%" not in value:
            return value
        return self._bytes.sub(BLANKED.encode(), value)

    def headers(self, headers: MutableMapping[str, str]) -> None:
        """Blank the secret out of header values, in place."""
        if not self._secret:
            return
        for name, value in list(headers.items()):
            clean = self.text(value) if isinstance(value, str) else value
            if clean is not value:
                headers[name] = clean

    def __repr__(self) -> str:
        return "SecretFilter(***)"
