"""Deterministic, time-ordered profile ids: a replay of the same input reproduces the same ids."""

from __future__ import annotations

from collections.abc import Callable
from hashlib import blake2b

__all__ = ["derive_profile_id", "derive_profile_id_where", "derive_split_id"]

_MAX_TS = (1 << 48) - 1
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base32, the ULID alphabet
# every 10-bit value as two characters: a ULID (130 bits, top two zero) is 13 table lookups, about twice as
# fast as base64.b32encode (pure Python on 3.11), which showed up in the profile of new-profile events
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_PAIR_INDEX = {pair: i for i, pair in enumerate(_PAIRS)}


def _ulid(timestamp_ms: int, seed: bytes) -> str:
    ts = min(max(int(timestamp_ms), 0), _MAX_TS)
    r = int.from_bytes(blake2b(seed, digest_size=10).digest(), "big")
    p = _PAIRS
    # 48-bit time in the first 5 pairs (50 bits, top 2 zero), 80 random bits in the other 8
    return (
        p[ts >> 40]
        + p[(ts >> 30) & 1023]
        + p[(ts >> 20) & 1023]
        + p[(ts >> 10) & 1023]
        + p[ts & 1023]
        + p[r >> 70]
        + p[(r >> 60) & 1023]
        + p[(r >> 50) & 1023]
        + p[(r >> 40) & 1023]
        + p[(r >> 30) & 1023]
        + p[(r >> 20) & 1023]
        + p[(r >> 10) & 1023]
        + p[r & 1023]
    )


def derive_profile_id(event_id: str, occurred_at_ms: int) -> str:
    """ULID with the event's time and randomness from blake2b(event_id): oldest profile sorts first."""
    return _ulid(occurred_at_ms, event_id.encode())


def derive_profile_id_where(event_id: str, occurred_at_ms: int, accept: Callable[[str], bool]) -> str:
    """The first variant of `derive_profile_id` that `accept`s: its last 10 hashed bits stepped, then salted.

    For ids that must meet a condition (the stream's: born on its anchor's partition). One blake2b per event
    and a string concatenation per try, where salting the event id costs a blake2b and a ULID per try. The
    time prefix and 70 hashed bits stay: ids still sort by time, two events of one millisecond collide with
    odds of 2^-70, and `accept` can refuse an id already taken.
    """
    salt = 0
    while True:
        base = derive_profile_id(f"{event_id}#{salt}" if salt else event_id, occurred_at_ms)
        stem, last = base[:-2], _PAIR_INDEX[base[-2:]]
        for step in range(1024):
            pid = stem + _PAIRS[(last + step) & 1023]
            if accept(pid):
                return pid
        salt += 1


def derive_split_id(profile_id: str, identifier_keys: list[str], seq: int, at_ms: int) -> str:
    """Id for the profile a split creates, derived from what was split so a replay reproduces it."""
    seed = "\x1f".join(["split", profile_id, str(seq), *sorted(identifier_keys)]).encode()
    return _ulid(at_ms, seed)
