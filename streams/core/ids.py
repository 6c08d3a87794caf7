"""Deterministic, time-ordered profile ids: a replay of the same input reproduces the same ids."""

from __future__ import annotations

from base64 import b32encode
from hashlib import blake2b

__all__ = ["derive_profile_id", "derive_split_id"]

_MAX_TS = (1 << 48) - 1
# RFC 4648 base32 alphabet → Crockford's (the ULID alphabet); same bit layout, so one translate suffices
_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def _ulid(timestamp_ms: int, seed: bytes) -> str:
    ts = min(max(int(timestamp_ms), 0), _MAX_TS)
    raw = ts.to_bytes(6, "big") + blake2b(seed, digest_size=10).digest()
    # 4 zero bytes in front make 160 bits = 32 base32 chars; the last 26 are the ULID's 130 bits
    return b32encode(b"\0\0\0\0" + raw)[6:].translate(_CROCKFORD).decode()


def derive_profile_id(event_id: str, occurred_at_ms: int) -> str:
    """ULID with the event's time and randomness from blake2b(event_id): oldest profile sorts first."""
    return _ulid(occurred_at_ms, event_id.encode())


def derive_split_id(profile_id: str, identifier_keys: list[str], seq: int, at_ms: int) -> str:
    """Id for the profile a split creates, derived from what was split so a replay reproduces it."""
    seed = "\x1f".join(["split", profile_id, str(seq), *sorted(identifier_keys)]).encode()
    return _ulid(at_ms, seed)
