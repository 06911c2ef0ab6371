"""DigestSet: the compact id set behind batch resume and duplicate checks."""

from __future__ import annotations

import random

from cometkit._idset import MAX_LOAD, DigestSet, id_digest


def test_add_reports_new_and_duplicate():
    ids = DigestSet()
    assert ids.add("a") is True
    assert ids.add("b") is True
    assert ids.add("a") is False
    assert len(ids) == 2
    assert "a" in ids and "b" in ids
    assert "c" not in ids
    assert 3 not in ids  # not a string: never a member


def test_empty_string_and_unicode_ids():
    ids = DigestSet(["", "é", "\U0001f600", "a\udcff"])  # a lone surrogate too
    assert len(ids) == 4
    assert "" in ids and "é" in ids and "\U0001f600" in ids and "a\udcff" in ids
    assert "e" not in ids


def test_digest_zero_is_a_member_like_any_other():
    """0 marks an empty slot, so a zero digest is kept apart; it must still count."""
    ids = DigestSet()
    assert not ids.has_digest(0)
    assert ids.add_digest(0) is True
    assert ids.add_digest(0) is False
    assert ids.has_digest(0)
    assert len(ids) == 1
    assert ids.add_digest(1) is True
    assert ids.has_digest(1) and ids.has_digest(0)
    assert len(ids) == 2


def test_colliding_slots_probe_linearly():
    """Digests that land in the same slot (same low bits) are all kept."""
    ids = DigestSet()
    slots = len(ids._slots)
    same_slot = [5 + k * slots for k in range(1, 20)]
    for digest in same_slot:
        assert ids.add_digest(digest)
    assert all(ids.has_digest(d) for d in same_slot)
    assert not ids.has_digest(5)
    assert len(ids) == len(same_slot)


def test_wraps_around_the_end_of_the_table():
    ids = DigestSet()
    last = len(ids._slots) - 1
    digests = [last + k * len(ids._slots) for k in range(1, 4)]
    for digest in digests:
        ids.add_digest(digest)
    assert ids._slots[0] != 0  # the third one wrapped to slot 0
    assert all(ids.has_digest(d) for d in digests)


def test_grows_by_doubling_and_keeps_every_member():
    ids = DigestSet()
    first = len(ids._slots)
    n = int(first * MAX_LOAD) + 1
    for i in range(n):
        ids.add(f"id-{i}")
    assert len(ids._slots) == 2 * first
    assert all(f"id-{i}" in ids for i in range(n))
    assert len(ids) == n


def test_capacity_presizes():
    ids = DigestSet(capacity=10_000)
    assert len(ids._slots) * MAX_LOAD >= 10_000
    assert len(ids) == 0


def test_hundred_thousand_ids():
    rng = random.Random(7)
    members = [f"custom-{rng.getrandbits(64):x}-{i}" for i in range(100_000)]
    ids = DigestSet(members)
    assert len(ids) == 100_000
    assert all(m in ids for m in members)
    absent = [f"absent-{i}" for i in range(10_000)]
    assert not any(a in ids for a in absent)
    assert all(ids.add(m) is False for m in members[:1000])
    # 8 bytes a slot, load at most MAX_LOAD after growth: no Python object per id
    assert ids.nbytes <= 8 * 2 * 100_000 / MAX_LOAD
    used = sum(1 for slot in ids._slots if slot)
    assert used / len(ids._slots) <= MAX_LOAD


def test_digest_is_64_bits_of_blake2b():
    import hashlib

    expected = int.from_bytes(hashlib.blake2b(b"req-0001", digest_size=8).digest(), "little")
    assert id_digest("req-0001") == expected
    assert id_digest("req-0001") != id_digest("req-0002")
