"""ProfileState's storage encoding: positional bytes, and the earlier dict form still readable."""

from __future__ import annotations

from decimal import Decimal

import orjson

from streams.core import IdentityGraph, MemoryStore
from streams.core.state import ERASED, MERGED, ProfileState
from streams.events import Identifier, NormalizedEvent


def _event(eid: str, *keys: str, total: str | None = None) -> NormalizedEvent:
    idents = tuple(Identifier(*k.split(":", 1), verified=k.startswith("customer")) for k in keys)
    attrs: dict[str, object] = {} if total is None else {"total": Decimal(total), "currency": "RUB"}
    return NormalizedEvent(eid, "pos", "store", "store_purchase", 1_000 + int(eid), idents, attrs)


def _profile() -> ProfileState:
    g = IdentityGraph()
    g.link(_event("1", "customer_id:C1", "phone:+7900", total="990.50"))
    g.link(_event("2", "phone:+7900", "email:a@x.ru"))
    g.link(_event("3", "email:b@x.ru", "cookie_id:k1"))
    r = g.link(_event("4", "customer_id:C1", "email:b@x.ru", total="10"))
    assert r.profile_id is not None
    p = g.profile(r.profile_id)
    assert p is not None and len(p.ids) >= 3
    p.apart = ("01AAAAAAAAAAAAAAAAAAAAAAAA",)
    p.merged_from = ("01CCCCCCCCCCCCCCCCCCCCCCCC",)
    p.extra["segment"] = "vip"
    return p


def test_encode_round_trips_every_field() -> None:
    p = _profile()
    q = ProfileState.decode(p.encode())
    assert q.to_dict() == p.to_dict()
    assert q.types == p.types and q.revenue == {"RUB": Decimal("1000.50")}


def test_encoding_is_smaller_than_the_dict_form() -> None:
    p = _profile()
    assert len(p.encode()) < len(orjson.dumps(p.to_dict()))


def test_dict_form_written_by_earlier_versions_still_decodes() -> None:
    p = _profile()
    assert ProfileState.decode(orjson.dumps(p.to_dict())).to_dict() == p.to_dict()


def test_tombstones_round_trip() -> None:
    for status, into in ((MERGED, "01AAAAAAAAAAAAAAAAAAAAAAAA"), (ERASED, None)):
        p = ProfileState("01BBBBBBBBBBBBBBBBBBBBBBBB", 5)
        p.status, p.merged_into, p.seq = status, into, 7
        q = ProfileState.decode(p.encode())
        assert q.to_dict() == p.to_dict() and not q.ids and q.apart == ()


def test_a_graph_reopened_on_dict_form_rows_reads_them() -> None:
    store = MemoryStore()
    g = IdentityGraph(store)
    pid = g.link(_event("1", "customer_id:C1", "phone:+7900")).profile_id
    g.flush()
    assert pid is not None
    p = g.profile(pid)
    assert p is not None
    store.put(b"p:" + pid.encode(), orjson.dumps(p.to_dict()))  # as stored before the positional form
    again = IdentityGraph(store)
    assert again.link(_event("2", "phone:+7900")).profile_id == pid
    q = again.profile(pid)
    assert q is not None and q.events == 2
