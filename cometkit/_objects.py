"""Attribute access over decoded JSON, so code written for the ``openai`` SDK reads the same.

``completion.choices[0].message.content`` works on the plain dict the server sent; nothing is
copied or validated up front (parsing stays off the hot path), and ``to_dict()`` gives the
original back.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

__all__ = ["ApiObject"]


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return ApiObject(value)
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    return value


class ApiObject:
    """A read-only view of a JSON object: ``obj.key``, ``obj["key"]``, ``obj.get("key")``.

    A key the server did not send reads as ``None`` through attribute access (as optional
    fields do in the ``openai`` SDK), and raises ``KeyError`` through indexing.
    """

    __slots__ = ("_data", "_request_id")

    def __init__(self, data: dict, request_id: Optional[str] = None) -> None:
        object.__setattr__(self, "_data", data)
        #: The provider's request id (``x-request-id``) of the answer, as ``openai`` offers it.
        object.__setattr__(self, "_request_id", request_id)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _wrap(self._data.get(name))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("API objects are read-only; use to_dict() for a mutable copy")

    def __getitem__(self, key: str) -> Any:
        return _wrap(self._data[key])

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ApiObject):
            return self._data == other._data
        return self._data == other

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: str, default: Any = None) -> Any:
        return _wrap(self._data.get(key, default))

    def keys(self) -> Any:
        return self._data.keys()

    def to_dict(self) -> dict:
        """The decoded JSON as the server sent it (a deep copy)."""
        import copy

        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        kind = self._data.get("object", "object")
        ident = self._data.get("id")
        return f"<ApiObject {kind}{' ' + str(ident) if ident else ''}>"

    def __dir__(self) -> list:
        return sorted(set(super().__dir__()) | set(self._data))
