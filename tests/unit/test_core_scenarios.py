"""Scenario tests: what a marketer would notice about stitching and merge protection."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from streams.core import ChangeKind, IdentityGraph, MemoryStore, Rules, TypeLimit
from streams.core.state import neighbour_code
from streams.exceptions import UnknownProfileOrIdentifier
from tests.unit.core_helpers import ev, order


def kinds(result_changes: tuple[object, ...]) -> list[str]:
    return [c.kind.value for c in result_changes]  # type: ignore[attr-defined]


def test_kolya_site_app_and_pizzeria_become_one_profile() -> None:
    g = IdentityGraph()
    cart = g.link(ev("cart", "cookie_id:c-77", "email:kolya@example.com", type="cart_updated"))
    app = g.link(
        ev(
            "app",
            "device_id:dev-1",
            "phone:+79161234567",
            "email:kolya@example.com",
            source="app",
            channel="app",
        )
    )
    pizza = g.link(
        order(
            "pizza",
            "loyalty_card:4000123",
            "phone:+79161234567",
            type="store_purchase",
            source="pos",
            channel="store",
            total="890.50",
        )
    )
    assert cart.profile_id == app.profile_id == pizza.profile_id
    assert kinds(cart.changes) == ["profile_created"]
    assert kinds(app.changes) == ["identifiers_attached", "identifiers_attached"]
    p = g.profile(pizza.profile_id)  # type: ignore[arg-type]
    assert p is not None
    assert sorted(p.ids) == [
        "cookie_id:c-77",
        "device_id:dev-1",
        "email:kolya@example.com",
        "loyalty_card:4000123",
        "phone:+79161234567",
    ]
    snap = p.snapshot()
    assert snap["orders"] == 1 and snap["revenue"] == {"RUB": "890.50"}
    assert set(snap["channels"]) == {"web", "app", "store"}
    # the event belongs to the profile of its highest-priority identifier, reported as anchor
    assert pizza.anchor == "loyalty_card:4000123"


def test_family_ipad_with_two_logged_in_people_stays_two_profiles() -> None:
    g = IdentityGraph()
    a = g.link(ev("a", "customer_id:anna", "device_id:ipad"))
    b = g.link(ev("b", "customer_id:boris", "device_id:ipad"))
    assert a.profile_id != b.profile_id
    assert g.lookup("customer_id:anna") != g.lookup("customer_id:boris")
    # same with e-mails only: a shared device never bridges two known people
    h = IdentityGraph()
    x = h.link(ev("x", "email:anna@example.com", "device_id:ipad"))
    y = h.link(ev("y", "email:boris@example.com", "device_id:ipad"))
    assert x.profile_id != y.profile_id
    refusals = [c for c in y.changes if c.kind is ChangeKind.REFUSED]
    # the device is refused as a bridge, and having now seen two people it is marked shared
    assert [c.payload["rule"] for c in refusals] == ["weak_bridge", "shared_device"]
    assert h.lookup("device_id:ipad") == x.profile_id  # refused identifiers stay where they were


def test_family_ipad_turns_shared_and_its_anonymous_events_belong_to_no_one() -> None:
    g = IdentityGraph()
    browse = g.link(ev("browse", "device_id:ipad"))  # before anyone logs in
    anna = g.link(ev("anna", "customer_id:anna", "device_id:ipad", type="login"))
    mid = g.link(ev("mid", "device_id:ipad"))  # only Anna has logged in so far: attributed to her
    assert mid.profile_id == anna.profile_id and not g.is_shared("device_id:ipad")
    # Boris logs in with his verified e-mail: one customer_id and one e-mail is not a generic value (each
    # type is within its count), but it is two people on one tablet
    boris = g.link(
        ev(
            "boris",
            "email:boris@example.com",
            "device_id:ipad",
            type="login",
            verified=("email:boris@example.com",),
        )
    )
    assert boris.profile_id != anna.profile_id
    assert "shared_device" in [c.payload["rule"] for c in boris.changes if c.kind is ChangeKind.REFUSED]
    assert g.is_shared("device_id:ipad") and g.stats["shared"] == 1 and g.stats["generic"] == 0
    # later anonymous iPad events belong to neither of them
    later = g.link(ev("later", "device_id:ipad"))
    assert later.profile_id is None and later.changes == ()
    # its earlier link stays: the device is still in Anna's profile, her login stays hers
    assert g.lookup("device_id:ipad") == anna.profile_id
    assert g.final_profile(anna.profile_id, anna.anchor) == anna.profile_id
    # but past events it anchored can no longer be told apart: null, never the wrong person
    assert g.final_profile(mid.profile_id, mid.anchor) is None
    assert g.final_profile(browse.profile_id, browse.anchor) is None
    # a logged-in event on the tablet still resolves by its strong identifier
    assert g.link(ev("again", "email:boris@example.com", "device_id:ipad")).profile_id == boris.profile_id


def test_shared_devices_off_keeps_attributing_to_the_first_person() -> None:
    g = IdentityGraph(rules=Rules(shared_devices=False))
    anna = g.link(ev("anna", "customer_id:anna", "device_id:ipad"))
    g.link(ev("boris", "email:boris@example.com", "device_id:ipad"))
    assert not g.is_shared("device_id:ipad")
    assert g.link(ev("later", "device_id:ipad")).profile_id == anna.profile_id


def test_one_person_on_several_devices_does_not_make_them_shared() -> None:
    g = IdentityGraph()
    for n, dev in enumerate(("device_id:phone", "device_id:tablet", "cookie_id:laptop")):
        g.link(ev(f"login{n}", "customer_id:anna", "phone:+79160000001", dev, verified=("customer_id:anna",)))
    assert g.stats["shared"] == 0
    assert g.link(ev("anon", "device_id:tablet")).profile_id == g.lookup("customer_id:anna")


def test_shared_mark_survives_a_restart() -> None:
    store = MemoryStore()
    g = IdentityGraph(store)
    g.link(ev("a", "customer_id:anna", "device_id:ipad"))
    g.link(ev("b", "email:boris@example.com", "device_id:ipad"))
    g.close()
    again = IdentityGraph(store)
    assert again.is_shared("device_id:ipad") and again.is_generic("device_id:ipad")
    assert again.link(ev("c", "device_id:ipad")).profile_id is None


def test_anonymous_visitor_logging_in_joins_the_known_profile() -> None:
    g = IdentityGraph()
    known = g.link(ev("k", "customer_id:42", "email:k@example.com"))
    anon = g.link(ev("anon", "cookie_id:zzz"))
    login = g.link(ev("login", "customer_id:42", "cookie_id:zzz", type="login"))
    assert anon.profile_id != known.profile_id
    assert login.profile_id == known.profile_id  # the older profile survives
    assert kinds(login.changes) == ["profiles_merged"]
    assert g.resolve(anon.profile_id) == known.profile_id  # type: ignore[arg-type]
    assert g.lookup("cookie_id:zzz") == known.profile_id


def test_cashier_placeholder_phone_does_not_merge_store_customers() -> None:
    g = IdentityGraph()
    customers = 20
    for i in range(customers):
        g.link(ev(f"web{i}", f"loyalty_card:card{i}", f"email:c{i}@example.com", f"cookie_id:k{i}"))
    results = [
        g.link(
            order(
                f"till{i}",
                f"loyalty_card:card{i}",
                "phone:+70000000000",
                type="store_purchase",
                source="pos",
                channel="store",
            )
        )
        for i in range(customers)
    ]
    assert len({r.profile_id for r in results}) == customers
    assert g.is_generic("phone:+70000000000")
    assert any(
        c.payload.get("rule") == "generic_value"
        for r in results
        for c in r.changes
        if c.kind is ChangeKind.REFUSED
    )
    # placeholder phone with new e-mails typed for walk-in customers: stops linking once generic
    walk_ins = [
        g.link(ev(f"walk{i}", "phone:+70000000000", f"email:walkin{i}@example.com")) for i in range(10)
    ]
    assert len({r.profile_id for r in walk_ins}) == 10
    profiles = list(g.iter_profiles())
    assert all(p.types.get("loyalty_card", 0) <= 1 for p in profiles)


def test_verified_customers_are_not_merged_by_an_unverified_typed_value() -> None:
    g = IdentityGraph()
    for i in range(5):
        g.link(
            ev(
                f"signup{i}",
                f"email:c{i}@example.com",
                f"cookie_id:k{i}",
                verified=(f"email:c{i}@example.com",),
            )
        )
    outs = [
        g.link(ev(f"till{i}", "phone:+70000000001", f"email:c{i}@example.com", source="pos"))
        for i in range(5)
    ]
    owners = {g.lookup(f"email:c{i}@example.com") for i in range(5)}
    assert len(owners) == 5
    rules = {c.payload["rule"] for o in outs for c in o.changes if c.kind is ChangeKind.REFUSED}
    assert "unverified_bridge" in rules


def test_unverified_email_cannot_hijack_a_verified_profile() -> None:
    g = IdentityGraph()
    victim = g.link(
        ev("v", "email:victim@example.com", "phone:+79990000001", verified=("email:victim@example.com",))
    )
    attacker = g.link(
        ev("a", "phone:+79990000002", "email:att@example.com", verified=("phone:+79990000002",))
    )
    # attacker types the victim's e-mail into a web form while logged in with a verified phone
    hijack = g.link(
        ev("h", "phone:+79990000002", "email:victim@example.com", verified=("phone:+79990000002",))
    )
    assert hijack.profile_id == attacker.profile_id
    assert g.lookup("email:victim@example.com") == victim.profile_id
    assert [c.payload["rule"] for c in hijack.changes if c.kind is ChangeKind.REFUSED] == [
        "unverified_bridge"
    ]
    # once the victim's e-mail is verified alongside, the link is accepted (the profiles may merge)
    ok = g.link(
        ev(
            "ok",
            "phone:+79990000002",
            "email:victim@example.com",
            verified=("phone:+79990000002", "email:victim@example.com"),
        )
    )
    assert g.lookup("email:victim@example.com") == ok.profile_id == g.lookup("phone:+79990000002")


def test_a_verified_device_next_to_a_typed_email_cannot_hijack_a_verified_profile() -> None:
    """The app's always-verified device id is no verified bridge: the e-mail the attacker typed is the only
    person value joining the victim's profile (0.3.3 merged them: each rule saw the other's half)."""
    g = IdentityGraph()
    victim = g.link(
        ev(
            "v",
            "email:victim@example.com",
            "device_id:tablet",
            verified=("email:victim@example.com", "device_id:tablet"),
        )
    )
    attacker = g.link(ev("a", "phone:+79990000002", verified=("phone:+79990000002",)))
    hijack = g.link(
        ev(
            "h",
            "phone:+79990000002",
            "email:victim@example.com",
            "device_id:tablet",
            verified=("phone:+79990000002", "device_id:tablet"),
        )
    )
    assert hijack.profile_id == attacker.profile_id != victim.profile_id
    assert g.lookup("email:victim@example.com") == victim.profile_id
    assert not [c for c in hijack.changes if c.kind is ChangeKind.MERGED]
    refused = {
        c.payload["rule"]: c.payload["identifiers"] for c in hijack.changes if c.kind is ChangeKind.REFUSED
    }
    assert refused["unverified_bridge"] == ["device_id:tablet", "email:victim@example.com"]


def test_unique_customer_ids_never_share_a_profile() -> None:
    # with default rules the shared e-mail also turns generic (two customer ids); isolate the unique rule
    g = IdentityGraph(rules=Rules(generic=False))
    a = g.link(ev("a", "customer_id:A", "email:shared@example.com"))
    b = g.link(ev("b", "customer_id:B", "email:shared@example.com"))
    assert a.profile_id != b.profile_id
    assert g.lookup("email:shared@example.com") == a.profile_id
    refused = [c for c in b.changes if c.kind is ChangeKind.REFUSED]
    assert refused and refused[0].payload["rule"] == "unique:customer_id"
    assert refused[0].profile_id == b.profile_id
    assert refused[0].payload["other_profile_id"] == a.profile_id
    # two customer ids in one event: the second is refused, never forced in
    c = g.link(ev("c", "customer_id:C", "customer_id:D"))
    assert g.lookup("customer_id:C") == c.profile_id
    assert g.lookup("customer_id:D") is None


def test_limit_drops_lowest_priority_identifiers_and_reports_the_rule() -> None:
    rules = Rules(limits={**Rules().limits, "email": TypeLimit(2)}, generic=False)
    g = IdentityGraph(rules=rules)
    base = g.link(ev("1", "customer_id:X", "email:a@x.com", "email:b@x.com"))
    more = g.link(ev("2", "customer_id:X", "email:c@x.com", "cookie_id:k1"))
    assert more.profile_id == base.profile_id
    assert g.lookup("email:c@x.com") is None
    assert g.lookup("cookie_id:k1") == base.profile_id  # lower identifiers still link
    assert [c.payload["rule"] for c in more.changes if c.kind is ChangeKind.REFUSED] == ["limit:email"]


def test_windowed_limit_counts_only_recent_values() -> None:
    day = 86_400_000
    rules = Rules(limits={**Rules().limits, "device_id": TypeLimit(1, window_ms=30 * day)}, generic=False)
    g = IdentityGraph(rules=rules)
    t0 = 1_700_000_000_000
    g.link(ev("1", "customer_id:X", "device_id:old", at=t0))
    g.link(ev("2", "customer_id:X", "device_id:new1", at=t0 + day))
    assert g.lookup("device_id:new1") is None  # within the window: limit 1
    g.link(ev("3", "customer_id:X", "device_id:new2", at=t0 + 40 * day))
    assert g.lookup("device_id:new2") == g.lookup("customer_id:X")  # old phone aged out of the window


def test_size_cap_bounds_identifiers_per_profile() -> None:
    rules = Rules(max_identifiers=3, generic=False)
    g = IdentityGraph(rules=rules)
    r = g.link(ev("1", "customer_id:X", "email:a@x.com", "phone:+71", "cookie_id:k1", "cookie_id:k2"))
    p = g.profile(r.profile_id)  # type: ignore[arg-type]
    assert p is not None and len(p.ids) == 3
    assert {c.payload["rule"] for c in r.changes if c.kind is ChangeKind.REFUSED} == {"size_cap"}


def test_shared_email_of_two_customers_turns_generic_by_default() -> None:
    g = IdentityGraph()
    a = g.link(ev("a", "customer_id:A", "email:shared@example.com"))
    b = g.link(ev("b", "customer_id:B", "email:shared@example.com"))
    assert a.profile_id != b.profile_id
    assert g.is_generic("email:shared@example.com")
    assert [c.payload["rule"] for c in b.changes if c.kind is ChangeKind.REFUSED] == ["generic_value"]
    # and it never links again, whatever later events say
    c = g.link(ev("c", "email:shared@example.com", "cookie_id:new"))
    assert c.profile_id == g.lookup("cookie_id:new") and c.profile_id not in (a.profile_id, b.profile_id)


def test_oldest_profile_survives_a_merge_and_old_ids_keep_resolving() -> None:
    g = IdentityGraph()
    old = g.link(ev("old", "email:a@x.com", at=1_000))
    new = g.link(ev("new", "phone:+71", at=2_000))
    both = g.link(ev("both", "phone:+71", "email:a@x.com", at=3_000, verified=("phone:+71", "email:a@x.com")))
    assert old.profile_id is not None and new.profile_id is not None
    assert old.profile_id < new.profile_id  # time-ordered ids
    assert both.profile_id == old.profile_id
    assert g.resolve(new.profile_id) == old.profile_id
    merged = [c for c in both.changes if c.kind is ChangeKind.MERGED]
    assert merged[0].payload["merged_profile_id"] == new.profile_id
    assert g.final_profile(new.profile_id) == old.profile_id


def test_split_moves_identifiers_and_keeps_them_apart() -> None:
    g = IdentityGraph()
    g.link(ev("1", "email:mum@x.com", "cookie_id:k1"))
    g.link(ev("2", "phone:+7123", "email:mum@x.com"))
    pid = g.lookup("email:mum@x.com")
    assert pid is not None and g.lookup("phone:+7123") == pid
    new_id, changes = g.split(pid, ["phone:+7123"], reason="support ticket 17")
    assert [c.kind for c in changes] == [ChangeKind.SPLIT, ChangeKind.CREATED]
    assert g.lookup("phone:+7123") == new_id != pid
    again = g.link(ev("3", "phone:+7123", "email:mum@x.com"))
    assert again.profile_id == new_id  # future events of the phone go to the split profile
    assert g.lookup("email:mum@x.com") == pid  # and it does not re-merge
    assert [c.payload["rule"] for c in again.changes if c.kind is ChangeKind.REFUSED] == ["split_apart"]
    with pytest.raises(UnknownProfileOrIdentifier):
        g.split(pid, ["email:nobody@x.com"])


def test_erase_removes_every_trace_and_a_later_event_starts_fresh() -> None:
    g = IdentityGraph()
    first = g.link(ev("1", "email:gone@x.com", "phone:+7555"))
    g.link(ev("2", "email:gone@x.com", "cookie_id:k9"))
    pid = first.profile_id
    assert pid is not None
    erase = g.link(ev("3", "email:gone@x.com", type="erase"))
    assert erase.profile_id is None
    assert [c.kind for c in erase.changes] == [ChangeKind.ERASED]
    assert g.lookup("email:gone@x.com") is None and g.lookup("cookie_id:k9") is None
    assert g.history(pid) == []
    g.flush()
    dump = b"".join(k + v for k, v in g.store.iter_prefix(b""))
    assert b"gone@x.com" not in dump and b"+7555" not in dump and b"k9" not in dump
    assert g.resolve(pid) == pid and g.final_profile(pid) is None
    fresh = g.link(ev("4", "email:gone@x.com"))
    assert fresh.profile_id not in (None, pid)


def test_erase_single_identifier_redacts_history() -> None:
    g = IdentityGraph()
    r = g.link(ev("1", "email:keep@x.com", "phone:+7777"))
    g.erase("phone:+7777")
    assert g.lookup("phone:+7777") is None
    assert g.lookup("email:keep@x.com") == r.profile_id
    g.flush()
    dump = b"".join(v for _, v in g.store.iter_prefix(b""))
    assert b"+7777" not in dump


def _dump(g: IdentityGraph) -> bytes:
    g.flush()
    return b"".join(k + v for k, v in g.store.iter_prefix(b""))


def test_erasing_a_split_off_identifier_redacts_it_in_the_parents_split_entry() -> None:
    for erase_profile in (False, True):
        g = IdentityGraph()
        pid = g.link(ev("1", "email:anna@x.com", "phone:+79160000001", "cookie_id:c1")).profile_id
        assert pid is not None
        new_id, _ = g.split(pid, ["phone:+79160000001"], reason="two people")
        g.erase(new_id if erase_profile else "phone:+79160000001")
        assert b"+79160000001" not in _dump(g)
        (split,) = [e for e in g.history(pid) if e["k"] == "profile_split"]
        assert split["identifiers"] == ["<erased>"] and split["split_profile_id"] == new_id


def test_an_erase_redacts_the_start_of_a_chain_split_merged_then_split_again() -> None:
    """A's phone is split off into B, B merges into the older C, C splits the phone off into D. A's history
    names the phone; neither D nor C has A as its `split_from` (B's tombstone does not keep it), so 0.4.3
    left the phone in A's entries, and left the phone's first event with A."""
    phone = "phone:+79160000001"
    for erase_profile, written_by_043 in itertools.product((False, True), (False, True)):
        g = IdentityGraph()
        g.link(ev("0", "email:c@x.com", at=500))
        first = g.link(ev("1", "email:a@x.com", phone, "cookie_id:k1", at=1_000))
        a = first.profile_id
        assert a is not None and first.anchor == phone
        g.split(a, [phone, "cookie_id:k1"], reason="two people")
        merge = g.link(ev("2", phone, "email:c@x.com", at=2_000, verified=(phone, "email:c@x.com")))
        assert [c.kind for c in merge.changes] == [ChangeKind.MERGED]
        assert merge.profile_id is not None
        d, _ = g.split(merge.profile_id, [phone, "cookie_id:k1"], reason="again")
        if written_by_043:  # no `s:` rows: read again from the histories when the state is opened
            g.flush()
            for key, _ in list(g.store.iter_prefix(b"s:")):
                g.store.delete(key)
            g = IdentityGraph(g.store)
        # the phone's first event follows it down the same chain (0.4.3 stopped at C's missing `split_from`)
        assert g.final_profile(a, first.anchor) == d
        g.erase(d if erase_profile else phone)
        assert b"+79160000001" not in _dump(g)
        cookie = "<erased>" if erase_profile else "cookie_id:k1"  # D held it too
        assert [e["identifiers"] for e in g.history(a)] == [
            [cookie, "email:a@x.com", "<erased>"],
            [cookie, "<erased>"],
        ]


def test_an_erase_redacts_the_start_of_a_chain_whose_middle_was_erased() -> None:
    """Phone and cookie split off A into B, the phone split off B into D, then the cookie's erase empties and
    erases B (an erased profile keeps no `split_from`). The phone's erase must still reach A's history, and
    its first event still ends in D until then (the `s:` rows keep the split edges, history or not)."""
    phone = "phone:+79160000001"
    for history in (True, False):
        g = IdentityGraph(history=history)
        first = g.link(ev("1", "email:a@x.com", phone, "cookie_id:k1", at=1_000))
        a = first.profile_id
        assert a is not None
        b, _ = g.split(a, [phone, "cookie_id:k1"], reason="two people")
        d, _ = g.split(b, [phone], reason="again")
        g.erase("cookie_id:k1")
        assert g.final_profile(a, first.anchor) == d
        g.erase(phone)
        assert b"+79160000001" not in _dump(g) and b"k1" not in _dump(g)
        if history:
            assert [e["identifiers"] for e in g.history(a)] == [
                ["<erased>", "email:a@x.com", "<erased>"],
                ["<erased>", "<erased>"],
            ]


def test_an_identifier_known_only_from_a_refusal_can_be_erased_and_explained() -> None:
    g = IdentityGraph()
    g.link(ev("1", "customer_id:c1", "phone:+79160000001"))
    b = g.link(ev("2", "customer_id:c1", "customer_id:c2"))  # c2 refused: one customer id per profile
    assert g.lookup("customer_id:c2") is None
    d = g.explain("customer_id:c2")
    assert d["profile_id"] is None
    assert [(r["rule"], r["profile_id"], r["e"]) for r in d["refusals"]] == [
        ("unique:customer_id", b.profile_id, "2")
    ]
    g.erase("customer_id:c2")
    assert b"c2" not in _dump(g)
    with pytest.raises(UnknownProfileOrIdentifier):
        g.explain("customer_id:c2")


def test_explain_lists_a_refusal_pinned_on_the_events_profile() -> None:
    """The victim's e-mail stays in her profile; the refusal sits on the attacker's (the event's) profile."""
    g = IdentityGraph()
    victim = g.link(ev("v", "email:victim@x.com", verified=("email:victim@x.com",)))
    attacker = g.link(ev("a", "phone:+79990000002", verified=("phone:+79990000002",)))
    g.link(ev("h", "phone:+79990000002", "email:victim@x.com", verified=("phone:+79990000002",)))
    d = g.explain("email:victim@x.com")
    assert d["profile_id"] == victim.profile_id
    assert [(r["rule"], r["profile_id"]) for r in d["refusals"]] == [
        ("unverified_bridge", attacker.profile_id)
    ]


def test_erasing_the_people_a_refusal_names_leaves_no_index_key_naming_them() -> None:
    """A refusal on the attacker's profile names two of the victim's values. Once the victim is erased, alone
    or after the attacker, no key or value names her (a first cut kept `r:` keys of the second value)."""
    for attacker_too in (False, True):
        g = IdentityGraph()
        victim = g.link(
            ev(
                "v",
                "email:victim@x.ru",
                "phone:+79995550001",
                verified=("email:victim@x.ru", "phone:+79995550001"),
            )
        )
        attacker = g.link(ev("a", "phone:+79990000002", verified=("phone:+79990000002",)))
        hijack = g.link(ev("h", "phone:+79990000002", "email:victim@x.ru", "phone:+79995550001"))
        (refusal,) = [c for c in hijack.changes if c.kind is ChangeKind.REFUSED]
        assert refusal.payload["identifiers"] == ["email:victim@x.ru", "phone:+79995550001"]
        for pid in [attacker.profile_id] * attacker_too + [victim.profile_id]:
            g.erase(pid or "")
        dump = _dump(g)
        assert b"victim@x.ru" not in dump and b"+79995550001" not in dump


def test_an_erased_value_seen_again_is_not_corroborated_by_its_erased_past() -> None:
    """Erased means never seen: the phone's record no longer remembers the e-mail, so the same bridge is
    refused again, as on a graph that never saw it (0.3.3 kept the e-mail's code there, and merged)."""

    def bridge_after(erase_first: bool) -> list[str]:
        g = IdentityGraph()
        g.link(ev("1", "phone:+79160000001", at=1_000))
        g.link(ev("2", "email:bob@x.ru", at=2_000))
        if erase_first:
            g.link(
                ev("3", "phone:+79160000001", "email:bob@x.ru", at=3_000)
            )  # refused, but now seen together
            g.erase("email:bob@x.ru")
            g.link(ev("4", "email:bob@x.ru", at=4_000))
            assert b"n:%012x:" % neighbour_code("email:bob@x.ru") not in _dump(g)
        again = g.link(ev("5", "phone:+79160000001", "email:bob@x.ru", at=5_000))
        return [c.kind.value for c in again.changes]

    assert bridge_after(erase_first=False) == ["merge_refused"]  # one unverified sighting: not corroborated
    assert bridge_after(erase_first=True) == ["merge_refused"]


def test_a_state_from_before_the_neighbour_index_is_indexed_at_its_first_erase() -> None:
    store = MemoryStore()
    g = IdentityGraph(store)
    g.link(ev("1", "phone:+79160000001", at=1_000))
    g.link(ev("2", "email:bob@x.ru", at=2_000))
    g.link(ev("3", "phone:+79160000001", "email:bob@x.ru", at=3_000))  # the phone's record notes the e-mail
    g.close()
    store.write_batch([(k, None) for k, _ in store.iter_prefix(b"n:")] + [(b"m:neighbour-index", None)])
    g = IdentityGraph(store)  # as 0.3.3 left it: codes in records, no index
    g.erase("email:bob@x.ru")
    g.link(ev("4", "email:bob@x.ru", at=4_000))
    again = g.link(ev("5", "phone:+79160000001", "email:bob@x.ru", at=5_000))
    assert [c.kind.value for c in again.changes] == ["merge_refused"]  # not corroborated by the erased past
    assert b"m:neighbour-index" in _dump(g)


def test_a_value_that_never_got_a_record_leaves_no_neighbour_index_to_erase() -> None:
    """The device turns generic in the event that first brings it, so no profile ever holds it: erasing it
    leaves nothing that names it (a first cut indexed its neighbour codes anyway, and kept them)."""
    g = IdentityGraph()
    g.link(ev("1", "customer_id:A"))
    g.link(ev("2", "customer_id:B"))
    g.link(ev("3", "customer_id:A", "customer_id:B", "device_id:dq7tab"))
    assert g.is_generic("device_id:dq7tab") and g.lookup("device_id:dq7tab") is None
    g.erase("device_id:dq7tab")
    assert b"dq7tab" not in _dump(g)


def test_erasing_a_value_with_a_colon_keeps_refusals_naming_a_longer_value() -> None:
    g = IdentityGraph(rules=Rules(limits={"cookie_id": TypeLimit(1)}))
    g.link(ev("1", "customer_id:Y", "cookie_id:a"))
    x = g.link(ev("2", "customer_id:X", "cookie_id:c"))
    g.link(ev("3", "customer_id:X", "cookie_id:a:b"))  # a second cookie for X: refused by the limit
    assert [e["rule"] for _, e in g.refusals_naming("cookie_id:a:b")] == ["limit:cookie_id"]
    assert g.refusals_naming("cookie_id:a") == []
    g.erase("cookie_id:a")
    assert [e["rule"] for e in g.history(x.profile_id or "") if e["k"] == "merge_refused"] == [
        "limit:cookie_id"
    ]


def test_a_past_event_follows_its_split_off_anchor_into_an_older_profile_it_merged_with() -> None:
    """The phone was split off, then merged into an older profile: events anchored by it end there, wherever
    the survivor sits in time (0.3.3 sent them back to the profile they were split away from)."""
    for m_at in (1_000, 2_500):  # older and younger than the split-off profile
        g = IdentityGraph()
        m = g.link(ev("m", "customer_id:Z", at=m_at, verified=("customer_id:Z",)))
        e = g.link(
            ev(
                "e",
                "email:a@x.ru",
                "phone:+79160000001",
                "cookie_id:k",
                at=2_000,
                verified=("phone:+79160000001",),
            )
        )
        assert e.profile_id is not None and e.anchor == "phone:+79160000001"
        g.split(e.profile_id, ["phone:+79160000001"], at_ms=2_000)
        g.link(
            ev(
                "z",
                "customer_id:Z",
                "phone:+79160000001",
                at=3_000,
                verified=("customer_id:Z", "phone:+79160000001"),
            )
        )
        phone_now = g.lookup("phone:+79160000001")
        assert phone_now == g.lookup("customer_id:Z") and phone_now in (
            m.profile_id,
            g.resolve(m.profile_id or ""),
        )
        assert g.final_profile(e.profile_id, e.anchor) == phone_now


def test_explain_shows_the_chain_of_events_and_merges() -> None:
    g = IdentityGraph()
    g.link(ev("e1", "email:a@x.com", at=1_000))
    g.link(ev("e2", "phone:+71", "cookie_id:k", at=2_000))
    g.link(ev("e3", "phone:+71", "email:a@x.com", at=3_000, verified=("phone:+71", "email:a@x.com")))
    d = g.explain("cookie_id:k")
    steps = d["steps"]
    assert [s["step"] for s in steps] == ["created", "merged"]
    assert steps[0]["event_id"] == "e2"
    assert steps[1]["event_id"] == "e3" and steps[1]["into"] == g.lookup("email:a@x.com")
    assert d["profile_id"] == g.lookup("cookie_id:k")


def test_order_aggregates_survive_merges() -> None:
    g = IdentityGraph()
    g.link(order("o1", "email:a@x.com", total="10.10", currency="EUR"))
    g.link(order("o2", "phone:+71", total="5.05", currency="EUR"))
    g.link(
        order(
            "o3",
            "phone:+71",
            "email:a@x.com",
            total="1",
            currency="RUB",
            verified=("phone:+71", "email:a@x.com"),
        )
    )
    p = g.profile(g.lookup("phone:+71"))  # type: ignore[arg-type]
    assert p is not None
    assert p.orders == 3 and p.revenue == {"EUR": Decimal("15.15"), "RUB": Decimal("1")}


def test_profile_ids_are_valid_time_ordered_ulids() -> None:
    from ulid import ULID

    from streams.core import derive_profile_id

    a = derive_profile_id("event-1", 1_700_000_000_000)
    assert a == derive_profile_id("event-1", 1_700_000_000_000)
    u = ULID.from_str(a)
    assert u.milliseconds == 1_700_000_000_000 and len(a) == 26
    assert derive_profile_id("event-2", 1_700_000_000_001) > a
    assert derive_profile_id("event-2", 1_700_000_000_000) != a


def test_profile_ids_meeting_a_condition_are_valid_ulids_derived_the_same_way_each_time() -> None:
    from ulid import ULID

    from streams.core import derive_profile_id
    from streams.core.ids import derive_profile_id_where

    plain = derive_profile_id("event-1", 1_700_000_000_000)
    assert derive_profile_id_where("event-1", 1_700_000_000_000, lambda pid: True) == plain
    ends_in_z = derive_profile_id_where("event-1", 1_700_000_000_000, lambda pid: pid.endswith("Z"))
    assert ends_in_z.endswith("Z") and ends_in_z[:-2] == plain[:-2]
    assert ULID.from_str(ends_in_z).milliseconds == 1_700_000_000_000
    # no variant of the first hash qualifies: the event id is salted and stepped again
    tried: list[str] = []

    def not_the_first_stem(pid: str) -> bool:
        tried.append(pid)
        return pid[:-2] != plain[:-2]

    other = derive_profile_id_where("event-1", 1_700_000_000_000, not_the_first_stem)
    assert len(tried) == 1025 and len(set(tried[:1024])) == 1024
    assert other == derive_profile_id("event-1#1", 1_700_000_000_000)


def test_a_repeated_event_id_with_other_identifiers_gets_a_free_id_the_same_way_each_time() -> None:
    from streams.core import derive_profile_id

    def profiles() -> list[str | None]:
        graph = IdentityGraph(rules=Rules())
        at = 1_700_000_000_000
        return [graph.link(ev("dup", key, at=at)).profile_id for key in ("cookie_id:a", "cookie_id:b")]

    a, b = profiles()
    assert a == derive_profile_id("dup", 1_700_000_000_000)
    assert b is not None and b != a and b[:-2] == a[:-2]
    assert profiles() == [a, b]


def test_cashier_typing_her_own_phone_once_does_not_merge_a_customer_into_a_caller() -> None:
    g = IdentityGraph()
    caller = g.link(ev("call", "phone:+79990001122", source="call_center", channel="phone"))
    member = g.link(ev("web", "loyalty_card:L1", "email:anna@example.com"))
    till = g.link(order("till", "loyalty_card:L1", "phone:+79990001122", type="store_purchase", source="pos"))
    assert till.profile_id == member.profile_id != caller.profile_id
    assert g.lookup("phone:+79990001122") == caller.profile_id
    assert [c.payload["rule"] for c in till.changes if c.kind is ChangeKind.REFUSED] == [
        "uncorroborated_bridge"
    ]


def test_a_soft_bridge_seen_twice_merges_the_same_person() -> None:
    g = IdentityGraph()
    caller = g.link(ev("call", "phone:+79990001122", source="call_center", channel="phone"))
    member = g.link(ev("web", "loyalty_card:L1", "email:anna@example.com"))
    g.link(order("till1", "loyalty_card:L1", "phone:+79990001122", type="store_purchase", source="pos"))
    again = g.link(order("till2", "loyalty_card:L1", "phone:+79990001122", type="store_purchase"))
    # the older (caller's) profile survives and now holds the card
    assert again.profile_id == caller.profile_id == g.lookup("loyalty_card:L1")
    assert g.resolve(member.profile_id) == caller.profile_id  # type: ignore[arg-type]
    assert "profiles_merged" in kinds(again.changes)


def test_a_verified_bridge_needs_no_corroboration() -> None:
    g = IdentityGraph()
    caller = g.link(ev("call", "phone:+79990001122"))
    member = g.link(ev("web", "customer_id:C1", "email:anna@example.com"))
    login = g.link(ev("login", "customer_id:C1", "phone:+79990001122", verified=("phone:+79990001122",)))
    assert login.profile_id == caller.profile_id == g.lookup("customer_id:C1")
    assert g.resolve(member.profile_id) == caller.profile_id  # type: ignore[arg-type]


def test_corroboration_can_be_switched_off_in_the_rules() -> None:
    g = IdentityGraph(rules=Rules(corroborate_soft_bridges=False))
    caller = g.link(ev("call", "phone:+79990001122"))
    g.link(ev("web", "loyalty_card:L1", "email:anna@example.com"))
    till = g.link(order("till", "loyalty_card:L1", "phone:+79990001122", type="store_purchase"))
    assert (
        g.lookup("loyalty_card:L1") == g.lookup("phone:+79990001122") == caller.profile_id == till.profile_id
    )


def test_events_anchored_on_a_value_later_found_shared_are_no_longer_attributed() -> None:
    g = IdentityGraph()
    anna = g.link(ev("a", "customer_id:anna", "device_id:family-tablet", type="login"))
    browse = g.link(ev("b", "device_id:family-tablet", type="product_view"))
    assert browse.profile_id == anna.profile_id and browse.anchor == "device_id:family-tablet"
    g.link(ev("c", "customer_id:boris", "device_id:family-tablet", type="login"))
    assert g.is_generic("device_id:family-tablet")
    # the anonymous browse could have been anyone in the family: it leaves Anna's profile
    assert g.final_profile(browse.profile_id, browse.anchor) is None
    assert g.final_profile(anna.profile_id, anna.anchor) == anna.profile_id
