"""Merge protection as data, plus pure checks over profile summaries for the graph and the stream app."""

from __future__ import annotations

import bisect
import functools
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.core.state import R_TYPE, R_VERIFIED, ProfileState
from streams.events import Identifier
from streams.exceptions import RulesError

__all__ = [
    "DEFAULT_RULES_PATH",
    "RULES_ENV",
    "Refusal",
    "Rules",
    "TypeLimit",
    "check_attach",
    "check_merge",
    "is_soft_side",
    "load_rules",
    "session_owner",
]

DEFAULT_RULES_PATH = Path(__file__).with_name("default_rules.toml")
RULES_ENV = "OMNISTITCH_RULES_FILE"
_DAY_MS = 86_400_000

# Rule names: bounded, so they can label metrics and the `rule` of a merge_refused change.
RULE_LIMIT = "limit"  # reported as "limit:<type>"
RULE_UNIQUE = "unique"  # reported as "unique:<type>"
RULE_WEAK_BRIDGE = "weak_bridge"
RULE_UNVERIFIED_BRIDGE = "unverified_bridge"
RULE_SIZE_CAP = "size_cap"
RULE_SPLIT_APART = "split_apart"
RULE_GENERIC = "generic_value"
RULE_UNCORROBORATED = "uncorroborated_bridge"
RULE_SHARED = "shared_device"


@dataclass(frozen=True, slots=True)
class TypeLimit:
    """At most `max` distinct values of a type per profile; with `window_ms`, counting recent ones only."""

    max: int
    window_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a link was refused: `rule` is a bounded name, `detail` is for humans."""

    rule: str
    detail: str


@dataclass(frozen=True)
class Rules:
    """Everything merge protection needs; built from the TOML rules file (see default_rules.toml)."""

    priority: tuple[str, ...] = ("customer_id", "loyalty_card", "phone", "email", "device_id", "cookie_id")
    protection: bool = True
    strong_types: frozenset[str] = frozenset({"customer_id", "loyalty_card", "phone", "email"})
    unique_types: frozenset[str] = frozenset({"customer_id", "loyalty_card"})
    weak_cannot_bridge: bool = True
    verified_beats_unverified: bool = True
    max_identifiers: int | None = 100
    # a profile resting on typed values only (no verified, no unique-type identifier) merges with another
    # identified profile through a soft bridge (one unverified phone / e-mail) only once the same bridge was
    # seen in an earlier event too: one cashier typing her own phone no longer merges a caller into a member
    corroborate_soft_bridges: bool = True
    limits: Mapping[str, TypeLimit] = field(
        default_factory=lambda: {
            "customer_id": TypeLimit(1),
            "loyalty_card": TypeLimit(1),
            "phone": TypeLimit(5),
            "email": TypeLimit(5),
            "device_id": TypeLimit(10),
            "cookie_id": TypeLimit(50),
        }
    )
    generic: bool = True
    generic_types: frozenset[str] = frozenset({"phone", "email", "device_id", "cookie_id"})
    generic_max: Mapping[str, int] = field(
        default_factory=lambda: {"customer_id": 1, "loyalty_card": 1, "phone": 3, "email": 3}
    )

    # a weak value (device, cookie) seen with person identifiers of more than `shared_max_people` distinct
    # profiles is a shared device (family tablet, shop kiosk): it keeps its past links but stops attributing
    # events on its own, and events it anchored are no longer attributed (see docs/core.md)
    shared_devices: bool = True
    shared_types: frozenset[str] = frozenset({"device_id", "cookie_id"})
    shared_person_types: frozenset[str] = frozenset({"customer_id", "loyalty_card", "phone", "email"})
    shared_max_people: int = 1
    # final attribution of an anonymous event on a shared value: the person identified on that same device
    # within this many ms of it (one visit, as web analytics count sessions); None = never attributed
    shared_session_ms: int | None = 30 * 60_000

    @property
    def shared_active(self) -> bool:
        """Whether shared-device detection runs at all (never without protection)."""
        return self.protection and self.shared_devices and bool(self.shared_types)

    @functools.cached_property
    def rank(self) -> dict[str, int]:
        """Type → priority rank (0 = highest); unlisted types rank after all listed ones (built once: the
        stream ranks every event's identifiers with it)."""
        return {t: i for i, t in enumerate(self.priority)}

    @property
    def generic_active(self) -> bool:
        """Whether generic-value detection runs at all."""
        return self.protection and self.generic and bool(self.generic_types) and bool(self.generic_max)

    @property
    def corroborate_active(self) -> bool:
        """Whether soft bridges between identified profiles need a repeated sighting."""
        return self.protection and self.corroborate_soft_bridges

    @property
    def tracks_neighbours(self) -> bool:
        """Whether the graph records, per soft value, the strong identifiers seen with it elsewhere."""
        return (self.generic_active or self.corroborate_active) and bool(self.generic_max)

    @classmethod
    def unprotected(cls) -> Rules:
        """No merge protection: every co-occurrence links (plain connected components)."""
        return cls(protection=False, generic=False, corroborate_soft_bridges=False, shared_devices=False)


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RulesError(f"{where} must be a list of non-empty strings")
    return list(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RulesError(f"{where} must be true or false")
    return value


def _pos_int(value: Any, where: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise RulesError(f"{where} must be an integer >= {0 if allow_zero else 1}")
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise RulesError(
            f"unknown key(s) in {where}: {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _limit(value: Any, where: str) -> TypeLimit:
    if isinstance(value, Mapping):
        _check_keys(value, {"max", "window_days"}, where)
        if "max" not in value:
            raise RulesError(f"{where} needs `max`")
        window = value.get("window_days")
        window_ms = None if window is None else _pos_int(window, f"{where}.window_days") * _DAY_MS
        return TypeLimit(_pos_int(value["max"], f"{where}.max"), window_ms)
    return TypeLimit(_pos_int(value, where))


def rules_from_mapping(data: Mapping[str, Any], base: Rules | None = None) -> Rules:
    """Rules from a parsed TOML document, starting from `base` (the defaults) for missing keys."""
    r = base or Rules()
    _check_keys(data, {"priority", "protection", "limits", "generic", "shared_devices"}, "rules file")
    kw: dict[str, Any] = {}
    if "priority" in data:
        prio = _str_list(data["priority"], "priority")
        if len(set(prio)) != len(prio):
            raise RulesError("priority lists a type twice")
        kw["priority"] = tuple(prio)
    prot = data.get("protection", {})
    if not isinstance(prot, Mapping):
        raise RulesError("[protection] must be a table")
    _check_keys(
        prot,
        {
            "enabled",
            "strong_types",
            "unique_types",
            "weak_cannot_bridge",
            "verified_beats_unverified",
            "max_identifiers",
            "corroborate_soft_bridges",
        },
        "[protection]",
    )
    if "enabled" in prot:
        kw["protection"] = _bool(prot["enabled"], "protection.enabled")
    for name in ("strong_types", "unique_types"):
        if name in prot:
            kw[name] = frozenset(_str_list(prot[name], f"protection.{name}"))
    for name in ("weak_cannot_bridge", "verified_beats_unverified", "corroborate_soft_bridges"):
        if name in prot:
            kw[name] = _bool(prot[name], f"protection.{name}")
    if "max_identifiers" in prot:
        cap = prot["max_identifiers"]
        kw["max_identifiers"] = None if cap == 0 else _pos_int(cap, "protection.max_identifiers")
    if "limits" in data:
        lim = data["limits"]
        if not isinstance(lim, Mapping):
            raise RulesError("[limits] must be a table")
        merged = dict(r.limits)
        merged.update({t: _limit(v, f"limits.{t}") for t, v in lim.items()})
        kw["limits"] = merged
    gen = data.get("generic", {})
    if not isinstance(gen, Mapping):
        raise RulesError("[generic] must be a table")
    _check_keys(gen, {"enabled", "types", "max_distinct_strong"}, "[generic]")
    if "enabled" in gen:
        kw["generic"] = _bool(gen["enabled"], "generic.enabled")
    if "types" in gen:
        kw["generic_types"] = frozenset(_str_list(gen["types"], "generic.types"))
    if "max_distinct_strong" in gen:
        mds = gen["max_distinct_strong"]
        if not isinstance(mds, Mapping):
            raise RulesError("generic.max_distinct_strong must be a table")
        gm = dict(r.generic_max)
        gm.update({t: _pos_int(v, f"generic.max_distinct_strong.{t}") for t, v in mds.items()})
        kw["generic_max"] = gm
    shared = data.get("shared_devices", {})
    if not isinstance(shared, Mapping):
        raise RulesError("[shared_devices] must be a table")
    _check_keys(
        shared, {"enabled", "types", "person_types", "max_people", "session_minutes"}, "[shared_devices]"
    )
    if "enabled" in shared:
        kw["shared_devices"] = _bool(shared["enabled"], "shared_devices.enabled")
    if "types" in shared:
        kw["shared_types"] = frozenset(_str_list(shared["types"], "shared_devices.types"))
    if "person_types" in shared:
        people = _str_list(shared["person_types"], "shared_devices.person_types")
        kw["shared_person_types"] = frozenset(people)
    if "max_people" in shared:
        kw["shared_max_people"] = _pos_int(shared["max_people"], "shared_devices.max_people")
    if "session_minutes" in shared:
        minutes = _pos_int(shared["session_minutes"], "shared_devices.session_minutes", allow_zero=True)
        kw["shared_session_ms"] = minutes * 60_000 or None
    out = Rules(**{**_as_kwargs(r), **kw})
    bad = sorted(out.unique_types - out.strong_types)
    if bad:
        raise RulesError(f"unique_types must be strong types too: {', '.join(bad)}")
    bad = sorted(out.shared_types & out.strong_types)
    if bad:
        raise RulesError(f"shared_devices.types must be weak types: {', '.join(bad)}")
    return out


def _as_kwargs(r: Rules) -> dict[str, Any]:
    return {f: getattr(r, f) for f in r.__dataclass_fields__}


def load_rules(path: str | os.PathLike[str] | None = None) -> Rules:
    """Rules from `path`, else from $OMNISTITCH_RULES_FILE, else the shipped defaults; RulesError if bad."""
    chosen = path if path is not None else os.environ.get(RULES_ENV) or None
    base = rules_from_mapping(_read_toml(DEFAULT_RULES_PATH), Rules())
    if chosen is None:
        return base
    return rules_from_mapping(_read_toml(Path(chosen)), base)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise RulesError(f"cannot read rules file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"rules file {path} is not valid TOML: {exc}") from exc


# --- pure checks ---------------------------------------------------------------------------------------


def _since(limit: TypeLimit, now_ms: int) -> int | None:
    return None if limit.window_ms is None else now_ms - limit.window_ms


def check_attach(p: ProfileState, ident: Identifier, rules: Rules, now_ms: int) -> Refusal | None:
    """Whether the new identifier `ident` may join profile `p` (per-type limit, unique types, size cap)."""
    if not rules.protection:
        return None
    t = ident.type
    if t in rules.unique_types and p.types.get(t, 0) > 0:
        return Refusal(f"{RULE_UNIQUE}:{t}", f"profile already holds a {t}")
    limit = rules.limits.get(t)
    if limit is not None and p.count_type(t, _since(limit, now_ms)) + 1 > limit.max:
        return Refusal(f"{RULE_LIMIT}:{t}", f"more than {limit.max} {t} per profile")
    if rules.max_identifiers is not None and len(p.ids) + 1 > rules.max_identifiers:
        return Refusal(RULE_SIZE_CAP, f"more than {rules.max_identifiers} identifiers per profile")
    return None


def check_merge(
    a: ProfileState,
    b: ProfileState,
    side_a: Sequence[Identifier],
    side_b: Sequence[Identifier],
    rules: Rules,
    now_ms: int,
    *,
    corroborated: bool = True,
) -> Refusal | None:
    """Whether profiles `a` and `b` may merge, given the event's identifiers already in each (`side_*`).

    The event is the evidence: its identifiers on each side are what bridges the two profiles.
    `corroborated` says whether this bridge was already seen in an earlier event (the graph keeps that).
    """
    if not rules.protection:
        return None
    if b.id in a.apart or a.id in b.apart:
        return Refusal(RULE_SPLIT_APART, "profiles were split apart by an operator")
    for t in sorted(rules.unique_types):
        if a.types.get(t, 0) and b.types.get(t, 0):
            return Refusal(f"{RULE_UNIQUE}:{t}", f"both profiles hold a different {t}")
    strong = rules.strong_types
    if rules.weak_cannot_bridge:
        bridge_strong = any(i.type in strong for i in side_a) and any(i.type in strong for i in side_b)
        if not bridge_strong and a.has_type_in(strong) and b.has_type_in(strong):
            return Refusal(
                RULE_WEAK_BRIDGE, "only weak identifiers link two profiles that each hold a strong one"
            )
    if rules.verified_beats_unverified:
        # verified *person* values on both sides, as `_holds_verified` counts them: an SDK's always-verified
        # device id next to a typed e-mail is no verified bridge (it would let anyone who types a victim's
        # e-mail in an app take over her profile; weak ids alone may not bridge either)
        bridge_verified = any(i.verified and i.type in strong for i in side_a) and any(
            i.verified and i.type in strong for i in side_b
        )
        if not bridge_verified and _holds_verified(a, rules) and _holds_verified(b, rules):
            return Refusal(
                RULE_UNVERIFIED_BRIDGE,
                "an unverified identifier links two profiles that each hold a verified one",
            )
    if (
        rules.corroborate_soft_bridges
        and not corroborated
        and a.has_type_in(strong)
        and b.has_type_in(strong)
        and (_soft(a, side_a, rules) or _soft(b, side_b, rules))
    ):
        return Refusal(
            RULE_UNCORROBORATED,
            "a single unverified value links two identified profiles; waiting for a second sighting",
        )
    for t in sorted(set(a.types) | set(b.types)):
        limit = rules.limits.get(t)
        if limit is None:
            continue
        since = _since(limit, now_ms)
        if a.count_type(t, since) + b.count_type(t, since) > limit.max:
            return Refusal(f"{RULE_LIMIT}:{t}", f"more than {limit.max} {t} per profile")
    if rules.max_identifiers is not None and len(a.ids) + len(b.ids) > rules.max_identifiers:
        return Refusal(RULE_SIZE_CAP, f"more than {rules.max_identifiers} identifiers per profile")
    return None


def session_owner(sightings: Sequence[tuple[int, str]], at_ms: int, window_ms: int) -> str | None:
    """Who used a shared device at `at_ms`: the profile identified on it nearest in time, within the window.

    `sightings` are (time, final profile) of identified events on the device, sorted. A family tablet is
    used by one person at a time, and the web visit that ends in a login starts anonymously: the browse
    minutes before (or after) someone identified on the device are theirs; anything further off stays
    unattributed. Ties go to the earlier sighting (determinism).
    """
    i = bisect.bisect_left(sightings, (at_ms - window_ms, ""))
    best: tuple[int, str] | None = None
    for when, profile in sightings[i:]:
        if when > at_ms + window_ms:
            break
        gap = abs(when - at_ms)
        if best is None or gap < best[0]:
            best = (gap, profile)
    return None if best is None else best[1]


def is_soft_side(side: Sequence[Identifier], rules: Rules) -> bool:
    """A bridge side is soft when it holds no verified and no unique-type identifier and < 2 strong ones.

    Soft sides are what cashiers, household members and typos produce: one typed phone or e-mail.
    """
    strong = 0
    for i in side:
        if i.verified or i.type in rules.unique_types:
            return False
        if i.type in rules.strong_types:
            strong += 1
    return strong < 2


def _soft(p: ProfileState, side: Sequence[Identifier], rules: Rules) -> bool:
    """A soft bridge into a soft profile: its identity rests on typed values only (no verified, no unique)."""
    return (
        is_soft_side(side, rules) and not _holds_verified(p, rules) and not p.has_type_in(rules.unique_types)
    )


def _holds_verified(p: ProfileState, rules: Rules) -> bool:
    """Whether a verified *person* identifier is held: a verified device or cookie names no one.

    An SDK's device id is always "verified"; counting it made an anonymous app profile look like a known
    person, so the visitor's own typed phone could never bring it into her profile (`unverified_bridge`).
    """
    strong = rules.strong_types
    return any(r[R_VERIFIED] and r[R_TYPE] in strong for r in p.ids.values())


def strong_types_of(p: ProfileState, rules: Rules) -> list[str]:
    """The strong types a profile holds (for explanations)."""
    return sorted({r[R_TYPE] for r in p.ids.values() if r[R_TYPE] in rules.strong_types})
