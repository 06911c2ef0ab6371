"""Priority lanes: the names a call may give as ``priority=`` and their order.

The core turns a call's priority name into its rank once, when the call begins, and hands
both to the limiter on :class:`cometkit.RequestInfo` (``priority``, ``priority_rank``): a
limiter orders its waiters by rank and needs neither the names nor the configuration. The
lanes are the top-level ``priorities`` key (highest first), the client-wide default its
``priority`` key; ``cometkit batch`` sends in :attr:`Priorities.batch` unless told.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ._exceptions import ConfigError
from .options import InvalidValue

__all__ = [
    "DEFAULT_PRIORITIES",
    "PRIORITY_HEADER",
    "Priorities",
    "parse_priorities",
]

#: The lanes when the configuration names none, highest first.
DEFAULT_PRIORITIES = ("interactive", "default", "batch")
#: The lane ``cometkit batch`` sends in when it exists (else the lowest one).
BATCH_PRIORITY = "batch"
#: A request header the openai-SDK transport reads as the call's priority and never sends.
PRIORITY_HEADER = "x-cometkit-priority"

PRIORITIES_ACCEPTS = "a non-empty list of distinct lane names, highest priority first"


def parse_priorities(value: Any) -> list[str]:
    """The ``priorities`` key: distinct, non-empty names, highest first."""
    if not isinstance(value, list) or not value:
        raise InvalidValue(f"must be {PRIORITIES_ACCEPTS}, got {value!r}")
    seen: set[str] = set()
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise InvalidValue(f"lane names must be non-empty strings, got {name!r} (item "
                               f"{index + 1})")
        if name in seen:
            raise InvalidValue(f"{name!r} is listed twice: each lane once, highest first")
        seen.add(name)
    return [str(name) for name in value]


@dataclass(frozen=True)
class Priorities:
    """A client's lanes (highest first) and the one a call without ``priority=`` is in.

    :ivar names: the lane names, highest priority first; a name's index is its rank.
    :ivar default: the client-wide lane of calls that name none.
    """

    names: tuple[str, ...] = DEFAULT_PRIORITIES
    default: str = "default"

    @classmethod
    def from_config(cls, data: Mapping[str, Any], where: str) -> Priorities:
        """The lanes of a loaded configuration (``priorities`` and ``priority``); a
        ``priority`` that is not one of them is a :class:`ConfigError` naming the file."""
        names = tuple(data.get("priorities") or DEFAULT_PRIORITIES)
        default = data.get("priority")
        if default is None:
            default = "default" if "default" in names else names[(len(names) - 1) // 2]
        elif default not in names:
            path = where if not where.startswith("<") else None
            raise ConfigError(f"{where}: priority: {default!r} is not one of the lanes in "
                              f"priorities ({', '.join(names)}): name one of them, or add it "
                              "to priorities", path=path, key="priority")
        return cls(names, default)

    @property
    def batch(self) -> str:
        """The lane of ``cometkit batch``: ``batch`` when configured, else the lowest."""
        return BATCH_PRIORITY if BATCH_PRIORITY in self.names else self.names[-1]

    def resolve(self, priority: Optional[str], *, what: str = "priority") -> tuple[str, int]:
        """``(name, rank)`` of a call's ``priority=`` (``None``: the client's default).

        :raises ConfigError: (a ``ValueError``) the name is not a configured lane.
        """
        name = self.default if priority is None else priority
        if not isinstance(name, str):
            raise TypeError(f"{what} must be a lane name such as {self.names[0]!r}, got "
                            f"{type(name).__name__}")
        try:
            return name, self.names.index(name)
        except ValueError:
            raise ConfigError(f"{what} {name!r} is not a priority lane of this client: use "
                              f"one of {', '.join(self.names)} (the priorities key of the "
                              "configuration lists them)", key="priority") from None

    def from_header(self, value: Optional[str], default: str) -> tuple[str, int]:
        """``(name, rank)`` of a request's :data:`PRIORITY_HEADER` (``None``: ``default``),
        for the HTTP-library fronts (the openai-SDK transport, the ``requests`` adapter),
        whose callers expect no cometkit exception.

        :raises ValueError: the header names no configured lane (nothing is sent).
        """
        try:
            return self.resolve(default if value is None else value.strip(),
                                what=f"the {PRIORITY_HEADER} header")
        except ConfigError as exc:  # a mistake in the caller's code
            raise ValueError(str(exc)) from None
