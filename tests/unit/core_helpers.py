"""Event builders shared by the core tests."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from streams.events import Identifier, NormalizedEvent

_clock = [1_700_000_000_000]


def ident(key: str, verified: bool = False) -> Identifier:
    """`Identifier` from "type:value"."""
    t, _, v = key.partition(":")
    return Identifier(t, v, verified)


def ev(
    event_id: str,
    *keys: str,
    at: int | None = None,
    type: str = "page_view",
    source: str = "web",
    channel: str = "web",
    verified: tuple[str, ...] = (),
    attributes: dict[str, Any] | None = None,
) -> NormalizedEvent:
    """A NormalizedEvent with identifiers given as "type:value" (those in `verified` verified)."""
    if at is None:
        _clock[0] += 1000
        at = _clock[0]
    return NormalizedEvent(
        event_id=event_id,
        source=source,
        channel=channel,
        type=type,
        occurred_at_ms=at,
        identifiers=tuple(ident(k, k in verified) for k in keys),
        attributes=attributes or {},
    )


def order(
    event_id: str, *keys: str, total: str = "10.00", currency: str = "RUB", **kw: Any
) -> NormalizedEvent:
    """An order_placed event."""
    return ev(
        event_id,
        *keys,
        type=kw.pop("type", "order_placed"),
        attributes={"total": Decimal(total), "currency": currency, "order_id": event_id},
        **kw,
    )
