"""A compact set of string ids: 8 bytes per id instead of a Python string.

``cometkit batch`` must remember every ``custom_id`` of its input (to report duplicates) and of
its output (to resume). A Python ``set`` of ten million short strings costs over a gigabyte; this
set keeps only a 64-bit BLAKE2b digest of each id in an open-addressing hash table held in one
``array('Q')``, about 8 bytes per slot.

The price is a tiny chance that two different ids share a digest and are taken for one: for
``n`` ids it is about ``n**2 / 2**65`` (one in 300,000 for ten million ids). A batch can live
with that: the worst case is an id reported as a duplicate, or skipped as already answered.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b
from typing import Iterable

__all__ = ["DigestSet", "id_digest"]

#: Slots are doubled when more than this share of them is used: linear probing stays short.
MAX_LOAD = 0.7
_INITIAL_SLOTS = 1024


def id_digest(text: str) -> int:
    """The 64-bit digest that stands for ``text`` in a :class:`DigestSet`."""
    return int.from_bytes(blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


class DigestSet:
    """A set of strings stored as 64-bit digests (see the module docstring for the trade-off).

    Slot value 0 means "empty"; an id whose digest happens to be 0 is remembered by a separate
    flag rather than in the table. Not thread-safe: the batch runner fills it from one thread.
    """

    __slots__ = ("_slots", "_mask", "_used", "_has_zero", "_grow_at")

    def __init__(self, items: Iterable[str] = (), *, capacity: int = 0) -> None:
        size = _INITIAL_SLOTS
        while size * MAX_LOAD < capacity:
            size *= 2
        self._allocate(size)
        self._used = 0
        self._has_zero = False
        for item in items:
            self.add(item)

    def _allocate(self, size: int) -> None:
        self._slots = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._grow_at = int(size * MAX_LOAD)

    # -- digests --------------------------------------------------------------------------

    def add_digest(self, digest: int) -> bool:
        """Add a digest; ``True`` if it was not there yet."""
        if digest == 0:
            if self._has_zero:
                return False
            self._has_zero = True
            return True
        slots, mask = self._slots, self._mask
        index = digest & mask
        while True:
            value = slots[index]
            if value == 0:
                break
            if value == digest:
                return False
            index = (index + 1) & mask
        slots[index] = digest
        self._used += 1
        if self._used > self._grow_at:
            self._grow()
        return True

    def has_digest(self, digest: int) -> bool:
        if digest == 0:
            return self._has_zero
        slots, mask = self._slots, self._mask
        index = digest & mask
        while True:
            value = slots[index]
            if value == digest:
                return True
            if value == 0:
                return False
            index = (index + 1) & mask

    def _grow(self) -> None:
        old = self._slots
        self._allocate(2 * len(old))
        slots, mask = self._slots, self._mask
        for digest in old:
            if digest:
                index = digest & mask
                while slots[index]:
                    index = (index + 1) & mask
                slots[index] = digest

    # -- strings --------------------------------------------------------------------------

    def add(self, item: str) -> bool:
        """Add ``item``; ``True`` if it was not there yet (``False``: a duplicate)."""
        return self.add_digest(id_digest(item))

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and self.has_digest(id_digest(item))

    def __len__(self) -> int:
        return self._used + self._has_zero

    @property
    def nbytes(self) -> int:
        """Bytes held by the table."""
        return self._slots.itemsize * len(self._slots)

    def __repr__(self) -> str:
        return f"DigestSet(len={len(self)}, slots={len(self._slots)})"
