"""Validation + normalisation throughput on one core, on a realistic event mix (target ≥ 50k events/s/core).

Run: `.venv/bin/python bench/bench_validate.py [--events 50000]`. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import TypeAdapter

from schemas.envelope import RawEvent
from streams.exceptions import InvalidEvent
from streams.normalize import NormalizationSettings
from streams.validate import Validator

# (event type, source, channel, weight): web/app browsing dominates, purchases and messaging follow.
_MIX = [
    ("page_view", "web", "site", 30),
    ("product_view", "app", "catalog", 15),
    ("cart_updated", "web", "checkout", 10),
    ("order_placed", "app", "checkout", 5),
    ("store_purchase", "pos", "store", 8),
    ("login", "app", "auth", 5),
    ("signup", "web", "auth", 1),
    ("call", "call_center", "hotline", 2),
    ("message_sent", "sms", "campaign", 8),
    ("message_received", "messenger", "support", 2),
    ("email_opened", "esp", "newsletter", 6),
    ("email_clicked", "esp", "newsletter", 3),
    ("push_opened", "push", "campaign", 3),
    ("identify", "crm", "import", 2),
]
_ITEMS = [{"product_id": f"pizza-{i}", "qty": 1 + i % 3, "price": f"{390 + 100 * i}.00"} for i in range(8)]


def _phone(rng: random.Random, person: int) -> str:
    digits = f"{9_160_000_000 + person:010d}"
    style = rng.randrange(4)
    if style == 0:
        return f"+7 ({digits[:3]}) {digits[3:6]}-{digits[6:8]}-{digits[8:]}"
    if style == 1:
        return f"8{digits}"
    return f"+7{digits}" if style == 2 else f"8 {digits[:3]} {digits[3:]}"


def _identifiers(rng: random.Random, person: int, source: str) -> list[dict[str, Any]]:
    ids: list[dict[str, Any]] = []
    if source in {"web", "app"}:
        ids.append({"type": "cookie_id" if source == "web" else "device_id", "value": f"dev-{person:08x}"})
        if rng.random() < 0.3:
            ids.append({"type": "customer_id", "value": f"CRM-{person}", "verified": True})
    if source in {"pos", "call_center", "sms", "messenger", "crm"} or rng.random() < 0.1:
        ids.append({"type": "phone", "value": _phone(rng, person)})
    if source in {"esp", "crm"} or rng.random() < 0.1:
        ids.append({"type": "email", "value": f"User.{person}@Mail.RU"})
    if source == "pos":
        ids.append({"type": "loyalty_card", "value": f"2000 {person:04d} {person % 9973:04d}"})
    if source == "push":
        ids.append({"type": "device_id", "value": f"DEV-{person:08X}"})
    if rng.random() < 0.03:
        ids.append({"type": "email", "value": "test@test.com"})  # a placeholder to drop
    return ids


def _attributes(event_type: str, rng: random.Random) -> dict[str, Any]:
    items = rng.sample(_ITEMS, rng.randint(1, 3))
    total = f"{sum(float(i['price']) * i['qty'] for i in items):.2f}"
    return {
        "page_view": {"url": "https://pizza.example/menu", "referrer": "https://yandex.ru"},
        "product_view": {"product_id": items[0]["product_id"], "price": items[0]["price"]},
        "cart_updated": {"items": items, "total": total, "currency": "RUB"},
        "order_placed": {
            "order_id": f"W-{rng.randrange(10**6)}",
            "total": total,
            "currency": "RUB",
            "items": items,
        },
        "store_purchase": {
            "store_id": "msk-17",
            "order_id": f"R-{rng.randrange(10**6)}",
            "total": total,
            "currency": "RUB",
            "items": items,
        },
        "login": {"method": "password"},
        "signup": {"method": "phone_otp"},
        "call": {"direction": "inbound", "duration_s": rng.randrange(600)},
        "message_sent": {"channel": "sms", "campaign": "black-friday", "sender": "PIZZA"},
        "message_received": {"channel": "telegram", "sender": "client"},
        "email_opened": {"campaign": "weekly", "message_id": f"m-{rng.randrange(10**6)}"},
        "email_clicked": {"campaign": "weekly", "url": "https://pizza.example/promo"},
        "push_opened": {"campaign": "lunch", "message_id": f"p-{rng.randrange(10**6)}"},
        "identify": {"reason": "crm_import"},
    }[event_type]


def make_events(count: int, people: int, seed: int = 7) -> list[bytes]:
    """Serialised envelopes; ~1% are broken in a way a real producer breaks them."""
    rng = random.Random(seed)
    kinds = [(t, s, c) for t, s, c, w in _MIX for _ in range(w)]
    events = []
    for n in range(count):
        event_type, source, channel = rng.choice(kinds)
        person = rng.randrange(people)
        doc = {
            "schema_version": 1,
            "event_id": f"{source}-{n}",
            "source": source,
            "channel": channel,
            "type": event_type,
            "occurred_at": f"2026-11-{1 + n % 28:02d}T{n % 24:02d}:{n % 60:02d}:00+03:00",
            "identifiers": _identifiers(rng, person, source),
            "attributes": _attributes(event_type, rng),
            "consent": {"sms": bool(n % 2), "email": True},
        }
        raw = orjson.dumps(doc)
        if rng.random() < 0.01:
            raw = raw[: len(raw) // 2]
        events.append(raw)
    return events


def _rate(label: str, events: list[bytes], fn: Callable[[bytes], object], rounds: int) -> float:
    """Best of `rounds` passes (the machine is shared: the best pass is the least disturbed)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for raw in events:
            with contextlib.suppress(InvalidEvent, ValueError):  # ValueError: raw-parser baselines
                fn(raw)
        best = min(best, time.perf_counter() - start)
    rate = len(events) / best
    print(f"{label:<48} {rate:>10,.0f} events/s  ({best / len(events) * 1e6:5.1f} µs/event)")
    return rate


def main() -> None:
    """Print single-core figures for each layer, so the bottleneck is visible."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--people", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    events = make_events(args.events, args.people)
    size = sum(map(len, events)) / len(events)
    print(f"{len(events):,} events, {args.people:,} people, mean {size:.0f} bytes, one core\n")
    adapter: TypeAdapter[Any] = TypeAdapter(RawEvent)
    _rate("orjson.loads only (floor)", events, orjson.loads, args.rounds)
    _rate("pydantic validate_json only", events, adapter.validate_json, args.rounds)
    cold = Validator(NormalizationSettings(cache_size=0))
    _rate("validate_event, normalisation cache off", events, cold.validate, 1)
    warm = Validator()
    _rate("validate_event, cache on (the figure)", events, warm.validate, args.rounds)
    hashed = Validator(NormalizationSettings(hmac_key=b"bench-key-0123456789abcdef"))
    _rate("validate_event, cache on, HMAC hashing on", events, hashed.validate, args.rounds)


if __name__ == "__main__":
    main()
