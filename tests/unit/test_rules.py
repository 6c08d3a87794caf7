"""Rules file loading and the pure merge/attach checks the stream app reuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.core import ProfileState, Rules, TypeLimit, check_attach, check_merge, load_rules
from streams.core.rules import DEFAULT_RULES_PATH, RULES_ENV, session_owner
from streams.events import Identifier
from streams.exceptions import ConfigError, RulesError


def profile(pid: str, *keys: str, verified: tuple[str, ...] = ()) -> ProfileState:
    p = ProfileState(pid, 0)
    for k in keys:
        t = k.split(":", 1)[0]
        p.add_identifier(k, [t, 0, 0, "web", k in verified, "e", pid, None])
    return p


def i(key: str, verified: bool = False) -> Identifier:
    t, v = key.split(":", 1)
    return Identifier(t, v, verified)


def test_shipped_defaults_match_the_documented_rules() -> None:
    r = load_rules()
    assert r == Rules()
    assert r.priority[0] == "customer_id" and r.priority[-1] == "cookie_id"
    assert r.limits["customer_id"] == TypeLimit(1) and r.limits["cookie_id"] == TypeLimit(50)
    assert DEFAULT_RULES_PATH.exists()


def test_rules_file_overrides_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "rules.toml"
    f.write_text(
        'priority = ["email", "phone"]\n'
        "[protection]\nmax_identifiers = 0\nweak_cannot_bridge = false\n"
        "[limits]\nemail = { max = 2, window_days = 30 }\n"
        "[generic]\nenabled = false\n"
    )
    r = load_rules(f)
    assert r.priority == ("email", "phone") and r.max_identifiers is None and not r.weak_cannot_bridge
    assert r.limits["email"] == TypeLimit(2, 30 * 86_400_000) and r.limits["phone"] == TypeLimit(5)
    assert not r.generic_active
    monkeypatch.setenv(RULES_ENV, str(f))
    assert load_rules() == r


@pytest.mark.parametrize(
    "text",
    [
        "[protection]\nenabled = 1\n",
        "[limits]\nemail = 0\n",
        "[limits]\nemail = { window_days = 3 }\n",
        "[nonsense]\n",
        'priority = ["email", "email"]\n',
        '[protection]\nunique_types = ["cookie_id"]\n',
        "not toml at all [",
        '[shared_devices]\ntypes = ["email"]\n',
        "[shared_devices]\nmax_people = 0\n",
        "[shared_devices]\nunknown = 1\n",
        "[shared_devices]\nsession_minutes = -5\n",
    ],
)
def test_bad_rules_fail_loudly(tmp_path: Path, text: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(RulesError) as exc:
        load_rules(f)
    assert isinstance(exc.value, ConfigError)


def test_missing_rules_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError):
        load_rules(tmp_path / "absent.toml")


def test_check_merge_rules_in_isolation() -> None:
    r = Rules()
    anna = profile("A", "customer_id:anna", "device_id:ipad")
    boris = profile("B", "customer_id:boris")
    refusal = check_merge(anna, boris, [i("device_id:ipad")], [i("customer_id:boris")], r, 0)
    assert refusal is not None and refusal.rule == "unique:customer_id"
    known = profile("K", "email:k@x.com")
    anon = profile("N", "cookie_id:c1", "device_id:d1")
    assert check_merge(known, anon, [i("email:k@x.com")], [i("cookie_id:c1")], r, 0) is None
    other = profile("O", "email:o@x.com")
    weak = check_merge(known, other, [i("email:k@x.com")], [i("device_id:d9")], r, 0)
    assert weak is not None and weak.rule == "weak_bridge"
    va = profile("VA", "email:a@x.com", verified=("email:a@x.com",))
    vb = profile("VB", "phone:+71", verified=("phone:+71",))
    unv = check_merge(va, vb, [i("email:a@x.com", True)], [i("phone:+71")], r, 0)
    assert unv is not None and unv.rule == "unverified_bridge"
    assert check_merge(va, vb, [i("email:a@x.com", True)], [i("phone:+71", True)], r, 0) is None
    assert check_merge(va, vb, [], [], Rules.unprotected(), 0) is None


def test_a_verified_device_is_not_a_verified_person() -> None:
    """An app profile holding only its SDK-verified device id joins her card profile via her typed phone."""
    r = Rules()
    app = profile("APP", "device_id:d1", verified=("device_id:d1",))
    card = profile("CARD", "loyalty_card:2000", "phone:+71", verified=("loyalty_card:2000",))
    assert check_merge(app, card, [i("device_id:d1", True)], [i("phone:+71")], r, 0) is None
    # a verified person identifier on both sides still needs a verified bridge
    account = profile("ACC", "device_id:d2", "email:a@x.com", verified=("device_id:d2", "email:a@x.com"))
    unv = check_merge(account, card, [i("device_id:d2", True)], [i("phone:+71")], r, 0)
    assert unv is not None and unv.rule == "weak_bridge"
    unv = check_merge(account, card, [i("email:a@x.com")], [i("phone:+71")], r, 0)
    assert unv is not None and unv.rule == "unverified_bridge"


def test_check_attach_limits_and_cap() -> None:
    r = Rules(limits={"email": TypeLimit(1)}, max_identifiers=2)
    p = profile("P", "email:a@x.com")
    lim = check_attach(p, i("email:b@x.com"), r, 0)
    assert lim is not None and lim.rule == "limit:email"
    assert check_attach(p, i("phone:+71"), r, 0) is None
    p.add_identifier("phone:+71", ["phone", 0, 0, "web", False, "e", "P", None])
    cap = check_attach(p, i("cookie_id:c"), r, 0)
    assert cap is not None and cap.rule == "size_cap"


def test_corroborate_soft_bridges_is_read_from_the_rules_file(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text("[protection]\ncorroborate_soft_bridges = false\n")
    assert not load_rules(f).corroborate_soft_bridges
    assert load_rules().corroborate_soft_bridges
    assert not Rules.unprotected().corroborate_active


def test_shared_devices_are_read_from_the_rules_file(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text('[shared_devices]\nenabled = true\ntypes = ["device_id"]\nmax_people = 2\n')
    r = load_rules(f)
    assert r.shared_active and r.shared_types == {"device_id"} and r.shared_max_people == 2
    assert load_rules().shared_active and load_rules().shared_types == {"device_id", "cookie_id"}
    f.write_text("[shared_devices]\nenabled = false\n")
    assert not load_rules(f).shared_active
    assert not Rules.unprotected().shared_active  # plain connected components stay plain


def test_session_minutes_and_the_session_owner(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text("[shared_devices]\nsession_minutes = 10\n")
    assert load_rules(f).shared_session_ms == 600_000
    assert load_rules().shared_session_ms == 1_800_000
    f.write_text("[shared_devices]\nsession_minutes = 0\n")
    assert load_rules(f).shared_session_ms is None
    seen = [(1_000, "A"), (5_000, "B"), (9_000, "A")]
    assert session_owner(seen, 4_000, 2_000) == "B"  # nearest
    assert session_owner(seen, 3_000, 2_000) == "A"  # a tie goes to the earlier sighting
    assert session_owner(seen, 20_000, 2_000) is None  # nobody identified within the window
    assert session_owner([], 0, 2_000) is None
