"""The Redis store's Lua scripts and how their answers are read.

Every change of state in Redis is one script (``EVALSHA``), atomic and timed by Redis' own
``TIME`` in milliseconds. The scripts are files in ``lua/``, each run with ``common.lua`` (the
shared prelude) in front; the comment at the top of each file says its KEYS, ARGV and answer.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

__all__ = ["ACQUIRE_LUA", "LANE_GATE_LUA", "LANE_LEAVE_LUA", "RELEASE_LUA", "RENEW_LUA",
           "text"]


def _lua(name: str) -> str:
    """The text of one script, with the shared prelude in front."""
    folder = resources.files("cometkit_plugins.limiting") / "lua"
    return (folder / "common.lua").read_text(encoding="utf-8") + (
        folder / f"{name}.lua").read_text(encoding="utf-8")


ACQUIRE_LUA = _lua("acquire")
RELEASE_LUA = _lua("release")
RENEW_LUA = _lua("renew")
LANE_GATE_LUA = _lua("lane_gate")
LANE_LEAVE_LUA = _lua("lane_leave")


def text(value: Any) -> str:
    """One value of a script's answer (or of a Redis reply) as text: redis-py hands bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)
