"""Event builders and hypothesis strategies shared by the core and protocol tests."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

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


# A small identifier pool, so random events collide often: merges, limits and generic values all happen.
POOL = (
    [f"customer_id:c{i}" for i in range(3)]
    + [f"loyalty_card:l{i}" for i in range(3)]
    + [f"phone:+7{i}" for i in range(4)]
    + [f"email:e{i}@x.com" for i in range(5)]
    + [f"device_id:d{i}" for i in range(4)]
    + [f"cookie_id:k{i}" for i in range(6)]
)


def event_specs(types: list[str]) -> st.SearchStrategy[list[tuple[list[tuple[str, bool]], str, int]]]:
    """Lists of ([(key, verified)], event type, jitter ms) for property tests; `types` sets type weights."""
    identifier = st.tuples(st.sampled_from(POOL), st.booleans())
    event = st.tuples(
        st.lists(identifier, min_size=1, max_size=4, unique_by=lambda x: x[0]),
        st.sampled_from(types),
        st.integers(min_value=-5_000, max_value=5_000),  # out-of-order jitter
    )
    return st.lists(event, min_size=1, max_size=40)


def events_from_specs(
    spec: list[tuple[list[tuple[str, bool]], str, int]], erase_every: int = 0
) -> list[NormalizedEvent]:
    """NormalizedEvents from `event_specs` draws (every `erase_every`-th one an erase, when set)."""
    out = []
    for n, (ids, etype, jitter) in enumerate(spec):
        if erase_every and n and n % erase_every == 0:
            etype = "erase"
        idents = tuple(Identifier(k.split(":", 1)[0], k.split(":", 1)[1], v) for k, v in ids)
        out.append(
            NormalizedEvent(
                event_id=f"ev{n}",
                source="web",
                channel="web",
                type=etype,
                occurred_at_ms=1_700_000_000_000 + n * 1_000 + jitter,
                identifiers=idents,
                attributes={"total": Decimal("1.5"), "currency": "EUR"} if etype == "order_placed" else {},
            )
        )
    return out
