"""JSON as the sandbox writes it: compact bytes, and the content type they go out with."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JSON", "dumps"]

#: The content type of a JSON answer.
JSON = "application/json"


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON bytes (no spaces after separators)."""
    return json.dumps(value, separators=(",", ":")).encode()
