"""Which fault, if any, the sandbox injects into an answer.

Real providers fail now and then in a handful of ways a client must survive; the sandbox
draws from a seeded random generator so a failing run can be repeated exactly.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Union

__all__ = ["FAULT_KINDS", "DEFAULT_FAULT_KINDS", "FaultPlan", "parse_faults", "format_faults"]

#: Every injectable fault. HTTP statuses answer with an OpenAI-style JSON error.
FAULT_KINDS = (
    "500", "502", "503", "504",  # JSON error with that status
    "html502",       # a proxy's HTML "502 Bad Gateway" page
    "reset",         # the connection is reset (RST) without an answer
    "invalid_json",  # 200 whose body is not JSON
    "truncated",     # Content-Length promises more than is sent, then the connection closes
    "slow",          # the answer comes ``slow_s`` late (then normally)
    "quota",         # 429 insufficient_quota: retrying cannot help
)
#: What ``fault_rate`` is spread over when no kinds are named.
DEFAULT_FAULT_KINDS = ("500", "502", "503", "reset")

FaultSpec = Union[None, Iterable[Union[str, int]], Mapping[Union[str, int], float]]


def _kind(kind: Union[str, int]) -> str:
    name = str(kind)
    if name not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    return name


class FaultPlan:
    """Probabilities per fault kind; :meth:`pick` maps a uniform draw to a kind or ``None``.

    :param fault_rate: total probability, spread evenly over ``faults`` (or the defaults).
    :param faults: kinds to spread ``fault_rate`` over, or a mapping kind -> probability
        (then ``fault_rate`` must be left at 0).
    """

    def __init__(self, fault_rate: float = 0.0, faults: FaultSpec = None) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, not {fault_rate!r}")
        if isinstance(faults, Mapping):
            if fault_rate:
                raise ValueError("give fault_rate with a list of kinds, or faults as a mapping "
                                 "of probabilities, not both")
            probabilities = {_kind(kind): float(p) for kind, p in faults.items()}
        else:
            kinds = [_kind(kind) for kind in (DEFAULT_FAULT_KINDS if faults is None else faults)]
            if fault_rate and not kinds:
                raise ValueError("fault_rate needs at least one fault kind")
            probabilities = {kind: fault_rate / len(kinds) for kind in kinds} if kinds else {}
        for kind, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"probability of fault {kind} must be between 0 and 1")
        if sum(probabilities.values()) > 1.0 + 1e-9:
            raise ValueError("fault probabilities add up to more than 1")
        self.probabilities = {kind: p for kind, p in probabilities.items() if p > 0}
        self._table = []
        total = 0.0
        for kind, p in self.probabilities.items():
            total += p
            self._table.append((total, kind))

    def __bool__(self) -> bool:
        return bool(self._table)

    def pick(self, draw: float) -> Optional[str]:
        """The fault for a uniform ``draw`` in [0, 1), or ``None`` for a normal answer."""
        for threshold, kind in self._table:
            if draw < threshold:
                return kind
        return None


def parse_faults(text: str) -> Union[list, dict]:
    """``"500,reset"`` -> kinds; ``"500=0.01,reset=0.005"`` -> probabilities (for the CLI)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not any("=" in item for item in items):
        return [_kind(item) for item in items]
    probabilities = {}
    for item in items:
        kind, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"mix of kinds and kind=probability in {text!r}")
        name = _kind(kind.strip())
        try:
            probabilities[name] = float(value)
        except ValueError as exc:
            raise ValueError(f"bad fault probability in {item!r}: {exc}") from None
    return probabilities


def format_faults(faults: FaultSpec) -> str:
    """The inverse of :func:`parse_faults`."""
    if faults is None:
        return ""
    if isinstance(faults, Mapping):
        return ",".join(f"{_kind(kind)}={float(p)!r}" for kind, p in faults.items())
    return ",".join(_kind(kind) for kind in faults)
