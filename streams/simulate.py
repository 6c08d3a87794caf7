"""A seeded omnichannel population with ground truth: realistic, noisy input to measure stitching against.

Why a simulator: nobody can publish a real retailer's customer events with the true person behind each one,
and accuracy claims mean nothing without that truth. The population behaves like a Russian omnichannel
retailer's customers over a month (site and app browsing, carts continued across channels, store purchases
with loyalty card and phone, call-center orders, e-mail/SMS/Viber/push campaigns and opens, consents) and
carries the noise that breaks naive stitching, each behind a knob in `SimConfig`:

- households: shared family tablets and computers, household phones given at the till or calling the call
  center, one family e-mail used by several members;
- cashiers: placeholder phones and e-mails (`+70000000000`, `test@test.com`, the store's own phone, the
  cashier's own phone or e-mail) typed instead of the customer's;
- typos in typed e-mails, unverified e-mails, Russian and international phones in every spelling;
- recycled phone numbers (the CRM still holds the previous owner), several devices per person, device and
  cookie churn, duplicate deliveries of the same event.

Output, all JSON lines in time order: `raw.<source>.jsonl` per source, the same events merged in
`all.jsonl`, and `truth.jsonl` (`{"event_id", "person_id"}`), kept apart so nothing downstream can peek at
the answer. A seed fully determines the output. Generation streams day by day, so memory stays at a few
days of events.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
import phonenumbers
import typer

__all__ = [
    "NOISE_KNOBS",
    "SOURCES",
    "SimConfig",
    "SimSummary",
    "config_with",
    "simulate",
    "simulate_command",
]

SOURCES: tuple[str, ...] = (
    "web",
    "app",
    "pos",
    "call_center",
    "esp",
    "sms",
    "viber",
    "push",
    "webpush",
    "messenger",
    "crm",
)

_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000
_MIN_MS = 60_000


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Every knob of the population; defaults mean to look like a real retailer's month, not an easy one."""

    people: int = 100_000
    days: int = 30
    seed: int = 1
    start: str = "2026-11-01T00:00:00+03:00"

    # --- behaviour ---
    sessions_per_month: float = 2.6  # mean own-initiative sessions per person (site, app, store, call, chat)
    anonymous_share: float = 0.12  # people who only ever browse the site without identifying themselves
    registered_share: float = 0.62  # people with an online account (CRM customer id)
    loyalty_share: float = 0.55  # people with a loyalty card
    email_share: float = 0.85  # people with an e-mail address
    phone_share: float = 0.95  # people with a mobile phone
    app_share: float = 0.45  # people with the mobile app
    international_share: float = 0.04  # people with a non-Russian phone number
    email_campaigns_per_week: float = 2.0
    sms_campaigns_per_week: float = 1.0
    viber_campaigns_per_week: float = 0.5
    push_campaigns_per_week: float = 2.0
    webpush_campaigns_per_week: float = 1.0
    crm_update_share: float = (
        0.08  # registered people whose CRM profile is synced (identify) during the period
    )
    crm_import: bool = (
        True  # the period opens with the CRM's import of every known customer (a real roll-out)
    )
    app_login_share: float = 0.85  # app users with an account (ordering in the app needs one)
    consent_change_share: float = 0.03  # people who change a marketing consent during the period

    # --- noise ---
    shared_device_rate: float = 0.25  # multi-person households with a shared family tablet / computer
    shared_device_use: float = 0.35  # share of a member's app/web sessions done on the shared device
    household_phone_rate: float = 0.12  # multi-person households where members give one phone (till, calls)
    household_email_rate: float = 0.05  # multi-person households where members type one family e-mail
    placeholder_phone_rate: float = 0.04  # store purchases where the cashier types a placeholder phone
    placeholder_email_rate: float = 0.02  # e-receipts sent to a placeholder / the cashier's own e-mail
    email_typo_rate: float = 0.03  # typed e-mails (till, call center, guest checkout) with a typo
    unverified_email_rate: float = 0.25  # accounts whose e-mail was never verified
    recycled_phone_rate: float = 0.005  # people whose phone number is recycled to another person mid-period
    extra_device_rate: float = 0.30  # app users with a second device (tablet, work phone)
    device_churn_rate: float = 0.01  # app sessions on a brand-new phone (new device id)
    cookie_churn_rate: float = 0.06  # web sessions starting on a fresh cookie (cleared, ITP, new browser)
    duplicate_rate: float = 0.002  # events delivered twice by the channel (same event_id)

    def scaled_stores(self) -> int:
        """One store per ~1000 people, at least five: stores are where placeholders concentrate."""
        return max(5, self.people // 1000)


@dataclass(slots=True)
class SimSummary:
    """What `simulate` wrote: counts and sizes per file, for the CLI and the bench."""

    out_dir: Path
    people: int
    events: int = 0  # lines in all.jsonl (duplicates included)
    unique_events: int = 0  # lines in truth.jsonl
    per_source: dict[str, int] = field(default_factory=dict)
    bytes_all: int = 0
    bytes_total: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------
# Vocabulary: names, domains, products, stores.
# ----------------------------------------------------------------------------------------------------------

_FIRST = [
    "ivan",
    "alexey",
    "sergey",
    "dmitry",
    "andrey",
    "maxim",
    "artem",
    "nikita",
    "mikhail",
    "egor",
    "pavel",
    "roman",
    "oleg",
    "kirill",
    "denis",
    "anton",
    "vladimir",
    "igor",
    "yuri",
    "boris",
    "anna",
    "maria",
    "elena",
    "olga",
    "natalia",
    "irina",
    "tatiana",
    "ekaterina",
    "svetlana",
    "yulia",
    "daria",
    "anastasia",
    "ksenia",
    "polina",
    "alina",
    "victoria",
    "sofia",
    "vera",
    "lyudmila",
    "galina",
    "marina",
]
_LAST = [
    "ivanov",
    "petrov",
    "sidorov",
    "smirnov",
    "kuznetsov",
    "popov",
    "vasiliev",
    "sokolov",
    "mikhailov",
    "novikov",
    "fedorov",
    "morozov",
    "volkov",
    "alekseev",
    "lebedev",
    "semenov",
    "egorov",
    "pavlov",
    "kozlov",
    "stepanov",
    "nikolaev",
    "orlov",
    "andreev",
    "makarov",
    "nikitin",
    "zakharov",
    "zaitsev",
    "soloviev",
    "borisov",
    "yakovlev",
    "grigoriev",
    "romanov",
    "vorobiev",
    "sergeev",
    "frolov",
    "belov",
]
_DOMAINS = ("mail.ru", "gmail.com", "yandex.ru", "bk.ru", "list.ru", "inbox.ru", "rambler.ru", "ya.ru")
_DOMAIN_W = (30, 25, 25, 5, 4, 4, 4, 3)
_DOMAIN_TYPOS = {
    "mail.ru": ("mail.ry", "mial.ru", "mail.r", "maill.ru"),
    "gmail.com": ("gmial.com", "gmail.con", "gmal.com", "gmail.co"),
    "yandex.ru": ("yandex.ri", "yandx.ru", "yadex.ru", "yandex.r"),
}
_PIZZAS = tuple(
    (f"{name}-{size}", price)
    for name, base in (
        ("pepperoni", 690),
        ("margherita", 590),
        ("four-cheese", 790),
        ("hawaiian", 720),
        ("bbq-chicken", 820),
        ("veggie", 650),
        ("carbonara", 850),
        ("diablo", 760),
    )
    for size, price in ((25, base), (30, base + 300), (35, base + 550))
)
_PRODUCTS = (
    *_PIZZAS,
    ("cola-1l", 150),
    ("fries", 190),
    ("wings-8", 450),
    ("cheesecake", 290),
    ("juice-1l", 170),
)
_CAMPAIGN_KINDS = ("weekly-deals", "new-menu", "birthday", "winback", "weekend-2for1", "loyalty-points")
_CITIES = ("msk", "spb", "ekb", "nsk", "kzn", "nnv", "sam", "krd")
_CITY_TZ = (3, 3, 5, 7, 3, 3, 4, 3)
_CITY_CODE = ("495", "812", "343", "383", "843", "831", "846", "861")
# Russian mobiles: 9XX + a subscriber number not starting with 0 (all valid per libphonenumber); the
# international ranges below are checked with libphonenumber as numbers are drawn.
_INTL = (  # (country code, prefix, digits after prefix, grouping of national number)
    ("44", "74", 8, (4, 6)),
    ("44", "78", 8, (4, 6)),
    ("49", "151", 8, (3, 8)),
    ("49", "170", 7, (3, 7)),
    ("375", "29", 7, (2, 3, 2, 2)),
    ("375", "33", 7, (2, 3, 2, 2)),
    ("998", "90", 7, (2, 3, 2, 2)),
    ("90", "532", 7, (3, 3, 4)),
    ("7", "701", 7, (3, 3, 4)),
    ("7", "747", 7, (3, 3, 4)),
)
_FAKE_PHONES = ("+70000000000", "89999999999", "+7 (999) 999-99-99", "0", "+7 (900) 000-00-00", "81111111111")
_FAKE_EMAILS = ("test@test.com", "no@mail.ru", "123@mail.ru", "net@net.ru", "noemail@gmail.com", "a@a.ru")
_HOUR_W = (1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 2, 3, 4, 5, 6, 7, 7, 6, 6, 6, 7, 9, 10, 10, 8, 5, 2)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# ----------------------------------------------------------------------------------------------------------
# The population.
# ----------------------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Household:
    members: list[_Person] = field(default_factory=list)
    shared_device: str | None = None  # family tablet with the app
    shared_cookie: str | None = None  # family computer's browser
    phone: str | None = None  # the phone everyone gives (E.164 digits without '+')
    phone_fmt_local: bool = True
    email: str | None = None  # the family e-mail some type at the till / checkout


@dataclass(slots=True, eq=False)
class _Person:
    idx: int
    pid: str
    hh: _Household
    tz: timezone
    city: int
    first: str
    last: str
    anonymous: bool
    phone: str | None  # E.164 digits without '+'
    phone_until: int = 1 << 62  # ms: recycled away from this person at this time (then `next_phone`)
    phone_from: int = 0  # ms: a recycled number reaches its new owner at this time
    next_phone: str | None = None
    crm_phone: str | None = None  # what the CRM holds: stale for a person whose number was recycled
    email: str | None = None
    email_verified: bool = False
    customer_id: str | None = None
    loyalty: str | None = None
    devices: list[str] = field(default_factory=list)
    # a list, not a set: push campaigns iterate it, and set order follows PYTHONHASHSEED (not the seed)
    logged_devices: list[str] = field(default_factory=list)
    cookies: list[str] = field(default_factory=list)
    logged_cookies: set[str] = field(default_factory=set)
    push_cookie: str | None = None
    consent: dict[str, bool] = field(default_factory=dict)
    channel_cum: tuple[float, ...] = ()
    cart: list[dict[str, Any]] | None = None
    home_store: int = 0
    viber: bool = False

    def log_in_device(self, device: str) -> None:
        """Remember a device the person is logged in on, in first-login order (deterministic iteration)."""
        if device not in self.logged_devices:
            self.logged_devices.append(device)


@dataclass(slots=True)
class _Store:
    store_id: str
    phone: str
    cashiers: tuple[tuple[str, str, str], ...]  # (cashier_id, own phone digits, own e-mail)
    tz: timezone


_SESSION_KINDS = ("web", "app", "store", "call", "chat")


class _Sim:
    """All mutable generation state; one instance per run (no globals, so runs are independent)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        start = datetime.fromisoformat(cfg.start)
        if start.tzinfo is None:
            start = start.replace(tzinfo=timezone(timedelta(hours=3)))
        self.start_ms = int(start.timestamp() * 1000)
        start_offset = start.utcoffset()
        self.start_offset_h = int(start_offset.total_seconds()) // 3600 if start_offset else 0
        self.end_ms = self.start_ms + cfg.days * _DAY_MS
        self.tzs = {h: timezone(timedelta(hours=h)) for h in (0, 1, 2, 3, 4, 5, 7)}
        self.hour_cum = _cumulative(_HOUR_W)
        self.domain_cum = _cumulative(_DOMAIN_W)
        self.used: set[str] = set()
        self.seq = 0
        self.buffer: list[tuple[int, int, str, bytes, str, str]] = []
        self.ids = 0
        self.stores: list[_Store] = []
        self.people: list[_Person] = []

    # --- unique values --------------------------------------------------------------------------------------

    def _unique(self, make: Any) -> str:
        while True:
            value: str = make()
            if value not in self.used:
                self.used.add(value)
                return value

    def new_ru_mobile(self) -> str:
        rng = self.rng
        # 9XX then a subscriber number not starting with 0 (9XX-0… blocks are largely unallocated)
        return self._unique(lambda: f"79{rng.randrange(100):02d}{rng.randrange(10**6, 10**7)}")

    def new_intl_mobile(self) -> str:
        rng = self.rng
        while True:  # not every digit run in a range is allocated: keep only what libphonenumber accepts
            cc, prefix, n, _ = rng.choice(_INTL)
            digits = f"{cc}{prefix}{rng.randrange(10**n):0{n}d}"
            if digits not in self.used and phonenumbers.is_valid_number(phonenumbers.parse(f"+{digits}")):
                self.used.add(digits)
                return digits

    def new_device(self) -> str:
        rng = self.rng
        h = f"{rng.getrandbits(128):032x}"
        ios = rng.random() < 0.45
        value = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"
        return value.upper() if ios else value

    def new_cookie(self) -> str:
        rng = self.rng
        return f"{rng.randrange(10**9, 10**10)}.{(self.start_ms // 1000) - rng.randrange(90 * 86400)}"

    def new_customer_id(self) -> str:
        rng = self.rng
        return self._unique(lambda: f"C{rng.randrange(10**7, 10**8)}")

    def new_loyalty(self) -> str:
        rng = self.rng
        return self._unique(lambda: _with_luhn(f"2000{rng.randrange(10**7):07d}"))

    def new_email(self, first: str, last: str) -> str:
        rng = self.rng
        domain = _DOMAINS[bisect.bisect(self.domain_cum, rng.random() * self.domain_cum[-1])]

        def make() -> str:
            style = rng.randrange(5)
            if style == 0:
                local = f"{first}.{last}"
            elif style == 1:
                local = f"{first[0]}{last}{rng.randrange(100)}"
            elif style == 2:
                local = f"{first}{rng.randrange(1960, 2008)}"
            elif style == 3:
                local = f"{last}.{first[0]}{rng.randrange(10, 1000)}"
            else:
                local = f"{first}_{last}{rng.randrange(1000)}"
            return f"{local}@{domain}"

        return self._unique(make)

    # --- population -----------------------------------------------------------------------------------------

    def build(self) -> None:
        cfg, rng = self.cfg, self.rng
        for s in range(cfg.scaled_stores()):
            city = s % len(_CITIES)
            store_phone = self._unique(lambda c=city: f"7{_CITY_CODE[c]}{rng.randrange(10**7):07d}")
            cashiers = tuple(
                (
                    f"K{s:03d}{k}",
                    self.new_ru_mobile(),
                    self.new_email(rng.choice(_FIRST), rng.choice(_LAST))
                    if k
                    else f"kassa.{_CITIES[city]}{s}@pizzeria-shop.ru",
                )
                for k in range(3)
            )
            self.stores.append(
                _Store(f"{_CITIES[city]}-{s}", store_phone, cashiers, self.tzs[_CITY_TZ[city]])
            )

        idx = 0
        while idx < cfg.people:
            size = min(_pick(rng, (1, 2, 3, 4), (34, 31, 20, 15)), cfg.people - idx)
            hh = _Household()
            city = _pick(rng, range(len(_CITIES)), (35, 15, 10, 8, 8, 8, 8, 8))
            last = rng.choice(_LAST)
            for _ in range(size):
                person = self._person(idx, hh, city, last)
                hh.members.append(person)
                self.people.append(person)
                idx += 1
            self._household_noise(hh)
        self._recycle_phones()

    def _person(self, idx: int, hh: _Household, city: int, last: str) -> _Person:
        cfg, rng = self.cfg, self.rng
        first = rng.choice(_FIRST)
        intl = rng.random() < cfg.international_share
        tz = self.tzs[rng.choice((0, 1, 2))] if intl else self.tzs[_CITY_TZ[city]]
        anonymous = rng.random() < cfg.anonymous_share
        p = _Person(idx, f"p{idx:07d}", hh, tz, city, first, last, anonymous, None)
        p.cookies = [self.new_cookie() for _ in range(1 if rng.random() < 0.6 else 2)]
        if anonymous:
            p.channel_cum = _cumulative((1, 0, 0, 0, 0))
            return p
        if rng.random() < cfg.phone_share:
            p.phone = self.new_intl_mobile() if intl else self.new_ru_mobile()
            p.crm_phone = p.phone
        if rng.random() < cfg.email_share:
            p.email = self.new_email(first, last)
            p.email_verified = rng.random() >= cfg.unverified_email_rate
        if rng.random() < cfg.registered_share and (p.email or p.phone):
            p.customer_id = self.new_customer_id()
        if rng.random() < cfg.loyalty_share:
            p.loyalty = self.new_loyalty()
        if rng.random() < cfg.app_share:
            p.devices = [self.new_device()]
            if rng.random() < cfg.extra_device_rate:
                p.devices.append(self.new_device())
            if p.customer_id is None and (p.email or p.phone) and rng.random() < cfg.app_login_share:
                p.customer_id = self.new_customer_id()
            if p.customer_id:
                p.logged_devices = list(dict.fromkeys(p.devices))
        if p.customer_id and rng.random() < 0.8:  # "remember me": most customers stay logged in
            p.logged_cookies.add(p.cookies[0])
        if p.customer_id and p.logged_cookies and rng.random() < 0.1:
            p.push_cookie = p.cookies[0] if p.cookies[0] in p.logged_cookies else None
        p.consent = {
            "email": rng.random() < 0.7,
            "sms": rng.random() < 0.55,
            "push": rng.random() < 0.6,
            "viber": rng.random() < 0.4,
        }
        p.viber = p.phone is not None and rng.random() < 0.6
        p.home_store = rng.randrange(len(self.stores))
        # channel mix: web, app, store, call, chat — store people go to stores, app people use the app
        p.channel_cum = _cumulative(
            (
                3.0 if p.customer_id else 1.0,
                4.0 if p.devices else 0.0,
                4.0 if p.loyalty else 1.2,
                0.8 if p.phone else 0.0,
                0.3 if p.phone else 0.0,
            )
        )
        return p

    def _household_noise(self, hh: _Household) -> None:
        cfg, rng = self.cfg, self.rng
        members = [m for m in hh.members if not m.anonymous]
        if len(members) < 2:
            return
        if rng.random() < cfg.shared_device_rate:
            hh.shared_device = self.new_device()
            hh.shared_cookie = self.new_cookie()
            for m in members:  # the family tablet brings the app to those without their own phone app
                if not m.devices:
                    weights = [b - a for a, b in zip((0.0, *m.channel_cum[:-1]), m.channel_cum, strict=True)]
                    weights[1] = 1.5
                    m.channel_cum = _cumulative(weights)
        if rng.random() < cfg.household_phone_rate:
            owner = next((m for m in members if m.phone), None)
            # a landline (city number) or the owner's mobile, given by everyone in the family
            hh.phone = (
                self._unique(lambda: f"7{_CITY_CODE[members[0].city]}{rng.randrange(10**7):07d}")
                if owner is None or rng.random() < 0.4
                else owner.phone
            )
        if rng.random() < cfg.household_email_rate:
            owner = next((m for m in members if m.email), None)
            hh.email = owner.email if owner else None

    def _recycle_phones(self) -> None:
        """Hand some numbers to a new owner mid-period; the previous owner's CRM record keeps the number."""
        cfg, rng = self.cfg, self.rng
        donors = [p for p in self.people if p.phone and p.phone.startswith("79")]
        takers = [p for p in self.people if p.phone is None and not p.anonymous]
        n = min(int(len(donors) * cfg.recycled_phone_rate), len(takers))
        for old, new in zip(rng.sample(donors, n), rng.sample(takers, n), strict=True):
            switch = self.start_ms + rng.randrange(cfg.days * _DAY_MS // 4, cfg.days * _DAY_MS * 3 // 4)
            assert old.phone is not None
            new.phone = old.phone
            new.phone_from = switch + rng.randrange(0, 3 * _DAY_MS)
            new.crm_phone = None  # the new owner reaches the CRM only by using the number
            old.phone_until = switch
            old.next_phone = self.new_ru_mobile()
            # old.crm_phone stays: campaigns keep texting the recycled number under the old customer id

    # --- formatting -----------------------------------------------------------------------------------------

    def fmt_phone(self, digits: str) -> str:
        """One of the many ways people and systems write the same number."""
        rng = self.rng
        if digits.startswith("7") and len(digits) == 11 and digits[1] in "3489":
            a, b, c, d = digits[1:4], digits[4:7], digits[7:9], digits[9:]
            style = rng.randrange(11)
            return (
                f"+7 ({a}) {b}-{c}-{d}",
                f"+7 {a} {b}-{c}-{d}",
                f"+7 {a} {b} {c} {d}",
                f"+7{a}{b}{c}{d}",
                f"7{a}{b}{c}{d}",
                f"8{a}{b}{c}{d}",
                f"8 {a} {b}-{c}-{d}",
                f"8 ({a}) {b}-{c}-{d}",
                f"8-{a}-{b}-{c}-{d}",
                f"+7-{a}-{b}-{c}-{d}",
                f"+7({a}){b}{c}{d}",
            )[style]
        for cc, prefix, _, groups in _INTL:
            if digits.startswith(cc + prefix):
                national = digits[len(cc) :]
                parts, pos = [], 0
                for g in groups:
                    parts.append(national[pos : pos + g])
                    pos += g
                style = rng.randrange(3)
                if style == 0:
                    return f"+{cc} {' '.join(parts)}"
                if style == 1:
                    return f"+{digits}"
                return f"+{cc} ({parts[0]}) {' '.join(parts[1:])}"
        return f"+{digits}"

    def typed_email(self, email: str) -> str:
        """An e-mail as typed by a person or a cashier: case, stray spaces, sometimes a typo."""
        rng = self.rng
        if rng.random() < self.cfg.email_typo_rate:
            local, _, domain = email.partition("@")
            kind = rng.randrange(3)
            if kind == 0 and domain in _DOMAIN_TYPOS:
                domain = rng.choice(_DOMAIN_TYPOS[domain])
            elif kind == 1 and len(local) > 3:
                i = rng.randrange(len(local) - 1)
                local = local[:i] + local[i + 1] + local[i] + local[i + 2 :]
            elif len(local) > 3:
                i = rng.randrange(len(local))
                local = local[:i] + local[i + 1 :]
            email = f"{local}@{domain}"
        r = rng.random()
        if r < 0.1:
            return email.capitalize()
        if r < 0.13:
            return f" {email} "
        if r < 0.15:
            return email.upper()
        return email

    def fmt_card(self, card: str) -> str:
        return card if self.rng.random() < 0.5 else f"{card[:4]} {card[4:8]} {card[8:]}"

    # --- emitting -------------------------------------------------------------------------------------------

    def emit(
        self,
        person: _Person,
        ts: int,
        source: str,
        channel: str,
        etype: str,
        identifiers: list[dict[str, Any]],
        attributes: dict[str, Any] | None = None,
        consent: dict[str, bool] | None = None,
        tz: timezone | None = None,
    ) -> None:
        rng = self.rng
        if ts >= self.end_ms:
            return
        n = (ts << 80) | rng.getrandbits(80)
        chars = []
        for _ in range(26):
            chars.append(_CROCKFORD[n & 31])
            n >>= 5
        event_id = "".join(reversed(chars))
        zone = tz or person.tz
        occurred = datetime.fromtimestamp(ts / 1000, zone).isoformat(timespec="milliseconds")
        if source == "esp":
            occurred = occurred.replace("+00:00", "Z")
        event: dict[str, Any] = {
            "schema_version": 1,
            "event_id": event_id,
            "source": source,
            "channel": channel,
            "type": etype,
            "occurred_at": occurred,
            "identifiers": identifiers,
            "attributes": attributes or {},
        }
        if consent is not None:
            event["consent"] = consent
        line = orjson.dumps(event)
        self.seq += 1
        self.buffer.append((ts, self.seq, source, line, event_id, person.pid))
        if rng.random() < self.cfg.duplicate_rate:
            self.seq += 1
            # a retried delivery: the same line again, right behind the first (files stay in time order)
            self.buffer.append((ts, self.seq, source, line, "", person.pid))

    # --- identifiers at a point in time ---------------------------------------------------------------------

    def phone_at(self, p: _Person, ts: int) -> str | None:
        if p.phone is None or ts < p.phone_from:
            return None
        return p.phone if ts < p.phone_until else p.next_phone

    def given_phone(self, p: _Person, ts: int) -> str | None:
        """The phone a person gives at the till or calls from: their own, or the household one."""
        if p.hh.phone is not None and self.rng.random() < 0.6:
            return p.hh.phone
        return self.phone_at(p, ts)

    def given_email(self, p: _Person) -> str | None:
        if p.hh.email is not None and self.rng.random() < 0.6:
            return p.hh.email
        return p.email

    def ident(self, kind: str, value: str, verified: bool = False) -> dict[str, Any]:
        return {"type": kind, "value": value, "verified": verified}

    # --- sessions -------------------------------------------------------------------------------------------

    def items(self, n: int | None = None) -> list[dict[str, Any]]:
        rng = self.rng
        count = n or _pick(rng, (1, 2, 3, 4), (45, 30, 15, 10))
        out = []
        for product, price in rng.sample(_PRODUCTS, count):
            qty = 1 if rng.random() < 0.8 else 2
            out.append({"product_id": product, "qty": qty, "price": f"{price}.00"})
        return out

    def order_attrs(self, items: list[dict[str, Any]], prefix: str, **extra: Any) -> dict[str, Any]:
        total = sum(int(i["price"][:-3]) * i["qty"] for i in items)
        self.ids += 1
        return {
            "order_id": f"{prefix}-{self.ids:08d}",
            "total": f"{total}.00",
            "currency": "RUB",
            "items": items,
            **extra,
        }

    def session(self, p: _Person, ts: int, kind: str) -> None:
        if kind == "web":
            self.web(p, ts)
        elif kind == "app":
            self.app(p, ts)
        elif kind == "store":
            self.store(p, ts)
        elif kind == "call":
            self.call(p, ts)
        else:
            self.chat(p, ts)

    def _step(self, ts: int, lo: int = 5_000, hi: int = 120_000) -> int:
        return ts + self.rng.randrange(lo, hi)

    def web(self, p: _Person, ts: int) -> None:
        cfg, rng = self.cfg, self.rng
        shared = p.hh.shared_cookie is not None and rng.random() < cfg.shared_device_use
        if shared:
            assert p.hh.shared_cookie is not None
            cookie = p.hh.shared_cookie
            logged = False  # the family computer is logged out between people (or logs in below)
        else:
            slot = rng.randrange(len(p.cookies))
            if rng.random() < cfg.cookie_churn_rate:
                p.cookies[slot] = self.new_cookie()
            cookie = p.cookies[slot]
            logged = cookie in p.logged_cookies and p.customer_id is not None
        base = [self.ident("cookie_id", cookie)]

        def ids() -> list[dict[str, Any]]:
            if logged and p.customer_id:
                return [*base, self.ident("customer_id", p.customer_id, True)]
            return list(base)

        for _ in range(_pick(rng, (1, 2, 3, 4), (35, 30, 20, 15))):
            self.emit(p, ts, "web", "web", "page_view", ids(), {"url": f"/menu/{rng.randrange(40)}"})
            ts = self._step(ts)
        for product, _ in rng.sample(_PRODUCTS, _pick(rng, (0, 1, 2, 3), (30, 40, 20, 10))):
            self.emit(p, ts, "web", "web", "product_view", ids(), {"product_id": product})
            ts = self._step(ts)
        if p.anonymous:
            return
        buying = rng.random() < (0.35 if p.customer_id else 0.5)  # guests mostly come to order
        if p.customer_id and not logged and (buying or rng.random() < 0.75):  # points, saved addresses
            ts = self._step(ts)
            assert p.customer_id is not None
            login_ids = [*base, self.ident("customer_id", p.customer_id, True)]
            if p.email and rng.random() < 0.7:
                login_ids.append(self.ident("email", p.email, p.email_verified))
            self.emit(p, ts, "web", "web", "login", login_ids)
            logged = True
            if not shared:
                p.logged_cookies.add(cookie)
        elif p.customer_id is None and p.email and rng.random() < 0.04:
            self.signup(p, ts, "web", base)
            logged = not shared
            if not shared:
                p.logged_cookies.add(cookie)
            ts = self._step(ts)
        if not buying:
            if rng.random() < 0.3:
                p.cart = self.items()
                self.emit(p, ts, "web", "web", "cart_updated", ids(), {"items": p.cart, "currency": "RUB"})
            return
        cart = p.cart or self.items()
        p.cart = None
        self.emit(p, ts, "web", "web", "cart_updated", ids(), {"items": cart, "currency": "RUB"})
        ts = self._step(ts, 30_000, 300_000)
        order_ids = ids()
        phone = self.phone_at(p, ts)
        if logged and p.customer_id:
            if p.email:
                order_ids.append(self.ident("email", p.email, p.email_verified))
        else:
            email = self.given_email(p)
            if email:
                order_ids.append(self.ident("email", self.typed_email(email)))
        if phone and rng.random() < 0.85:
            order_ids.append(self.ident("phone", self.fmt_phone(phone)))
        self.emit(p, ts, "web", "web", "order_placed", order_ids, self.order_attrs(cart, "W", delivery=True))

    def signup(self, p: _Person, ts: int, source: str, base: list[dict[str, Any]]) -> None:
        p.customer_id = self.new_customer_id()
        ids = [*base, self.ident("customer_id", p.customer_id, True)]
        if p.email:
            ids.append(self.ident("email", self.typed_email(p.email) if source == "web" else p.email))
        if p.phone and ts >= p.phone_from:
            ids.append(self.ident("phone", self.fmt_phone(p.phone), source == "app"))
        self.emit(p, ts, source, source, "signup", ids)
        # the CRM learns the new customer a little later
        crm_ids = [self.ident("customer_id", p.customer_id, True)]
        if p.email:
            crm_ids.append(self.ident("email", p.email, p.email_verified))
        p.crm_phone = self.phone_at(p, ts)
        if p.crm_phone:
            crm_ids.append(self.ident("phone", f"+{p.crm_phone}", source == "app"))
        self.emit(p, self._step(ts, 60_000, 900_000), "crm", "crm", "identify", crm_ids)

    def app(self, p: _Person, ts: int) -> None:
        cfg, rng = self.cfg, self.rng
        if p.hh.shared_device is not None and (not p.devices or rng.random() < cfg.shared_device_use):
            device = p.hh.shared_device
            logged = False
        else:
            if rng.random() < cfg.device_churn_rate:
                p.devices[0] = self.new_device()
            device = rng.choice(p.devices)
            logged = device in p.logged_devices and p.customer_id is not None
        base = [self.ident("device_id", device, True)]
        buying = rng.random() < 0.4
        if not logged and p.customer_id and (buying or rng.random() < 0.5):
            # phone + one-time code: the app's login verifies the phone
            login_ids = [*base, self.ident("customer_id", p.customer_id, True)]
            phone = self.phone_at(p, ts)
            if phone:
                login_ids.append(self.ident("phone", self.fmt_phone(phone), True))
            self.emit(p, ts, "app", "app", "login", login_ids)
            ts = self._step(ts)
            logged = True
            if device != p.hh.shared_device:
                p.log_in_device(device)
        elif p.customer_id is None and self.phone_at(p, ts) and rng.random() < 0.08:
            self.signup(p, ts, "app", base)
            logged = True
            p.log_in_device(device)
            ts = self._step(ts)

        def ids() -> list[dict[str, Any]]:
            if logged and p.customer_id:
                return [*base, self.ident("customer_id", p.customer_id, True)]
            return list(base)

        for product, _ in rng.sample(_PRODUCTS, _pick(rng, (1, 2, 3, 4), (30, 35, 20, 15))):
            self.emit(p, ts, "app", "app", "product_view", ids(), {"product_id": product})
            ts = self._step(ts)
        if not buying:
            if rng.random() < 0.25:
                p.cart = self.items()
                self.emit(p, ts, "app", "app", "cart_updated", ids(), {"items": p.cart, "currency": "RUB"})
            return
        cart = p.cart or self.items()  # a cart started on the site continues in the app
        p.cart = None
        self.emit(p, ts, "app", "app", "cart_updated", ids(), {"items": cart, "currency": "RUB"})
        ts = self._step(ts, 20_000, 240_000)
        order_ids = ids()
        phone = self.phone_at(p, ts)
        if phone:
            order_ids.append(self.ident("phone", self.fmt_phone(phone), logged))
        self.emit(p, ts, "app", "app", "order_placed", order_ids, self.order_attrs(cart, "A", delivery=True))

    def store(self, p: _Person, ts: int) -> None:
        cfg, rng = self.cfg, self.rng
        st = self.stores[p.home_store if rng.random() < 0.8 else rng.randrange(len(self.stores))]
        cashier_id, cashier_phone, cashier_email = rng.choice(st.cashiers)
        ids: list[dict[str, Any]] = []
        card = p.loyalty is not None and rng.random() < 0.85
        if card:
            assert p.loyalty is not None
            ids.append(self.ident("loyalty_card", self.fmt_card(p.loyalty), True))
        if rng.random() < cfg.placeholder_phone_rate:
            r = rng.random()  # the store's own phone, the cashier's own mobile, or a made-up number
            if r < 0.35:
                fake = self.fmt_phone(st.phone)
            elif r < 0.55:
                fake = self.fmt_phone(cashier_phone)
            else:
                fake = _FAKE_PHONES[rng.randrange(len(_FAKE_PHONES))]
            ids.append(self.ident("phone", fake))
        elif rng.random() < (0.35 if card else 0.6):
            phone = self.given_phone(p, ts)
            if phone:
                ids.append(self.ident("phone", self.fmt_phone(phone)))
        if rng.random() < 0.12:  # e-receipt
            if rng.random() < cfg.placeholder_email_rate / 0.12:
                fake_email = cashier_email if rng.random() < 0.5 else rng.choice(_FAKE_EMAILS)
                ids.append(self.ident("email", fake_email))
            else:
                email = self.given_email(p)
                if email:
                    ids.append(self.ident("email", self.typed_email(email)))
        cart = p.cart if p.cart and rng.random() < 0.5 else self.items()
        p.cart = None
        attrs = self.order_attrs(cart, "R", store_id=st.store_id, cashier_id=cashier_id)
        consent = None
        if ids and rng.random() < 0.3:
            consent = {"sms": p.consent.get("sms", False), "email": p.consent.get("email", False)}
        if all(i["value"] in _FAKE_PHONES or i["value"] in _FAKE_EMAILS for i in ids):
            # Nothing but a placeholder (or nothing at all): validation would refuse it as having no usable
            # identifier, so the simulator leaves it out and every simulated event is a valid one.
            return
        self.emit(p, ts, "pos", "store", "store_purchase", ids, attrs, consent, tz=st.tz)

    def call(self, p: _Person, ts: int) -> None:
        rng = self.rng
        phone = self.given_phone(p, ts)
        if phone is None:
            return
        ids = [self.ident("phone", self.fmt_phone(phone))]
        if p.customer_id and rng.random() < 0.6:  # the operator finds the customer card
            ids.append(self.ident("customer_id", p.customer_id, True))
        agent = f"agent-{rng.randrange(60):02d}"
        reason = rng.choice(("order", "order", "order", "delivery-status", "complaint", "question"))
        self.emit(
            p,
            ts,
            "call_center",
            "phone",
            "call",
            ids,
            {
                "direction": "inbound",
                "agent_id": agent,
                "reason": reason,
                "duration_s": rng.randrange(30, 900),
            },
        )
        if reason == "order":
            ts = self._step(ts, 60_000, 600_000)
            ids2 = list(ids)
            if rng.random() < 0.2 and p.email:
                ids2.append(self.ident("email", self.typed_email(p.email)))
            attrs = self.order_attrs(self.items(), "P", agent_id=agent, delivery=True)
            self.emit(p, ts, "call_center", "phone", "order_placed", ids2, attrs)

    def chat(self, p: _Person, ts: int) -> None:
        rng = self.rng
        phone = self.phone_at(p, ts)
        if phone is None:
            return
        messenger = "whatsapp" if rng.random() < 0.6 else "telegram"
        ids = [self.ident("phone", self.fmt_phone(phone), True)]
        for _ in range(_pick(rng, (1, 2, 3), (50, 30, 20))):
            attrs = {"channel": messenger, "message_id": f"m{rng.getrandbits(40):x}"}
            self.emit(p, ts, "messenger", messenger, "message_received", ids, attrs)
            ts = self._step(ts, 20_000, 600_000)

    # --- campaigns, CRM and consents ------------------------------------------------------------------------

    def campaigns(self) -> list[tuple[int, int, str, str]]:
        """(send time, seq, kind, campaign name) for the whole period, at 10:00-19:00 Moscow time."""
        cfg, rng = self.cfg, self.rng
        weeks = cfg.days / 7
        plan: list[tuple[int, int, str, str]] = []
        for kind, per_week in (
            ("email", cfg.email_campaigns_per_week),
            ("sms", cfg.sms_campaigns_per_week),
            ("viber", cfg.viber_campaigns_per_week),
            ("push", cfg.push_campaigns_per_week),
            ("webpush", cfg.webpush_campaigns_per_week),
        ):
            for _ in range(round(per_week * weeks)):
                day = rng.randrange(cfg.days)
                at = self.start_ms + day * _DAY_MS + (10 + rng.randrange(9)) * _HOUR_MS
                plan.append((at, len(plan), kind, f"{rng.choice(_CAMPAIGN_KINDS)}-{day + 1:02d}"))
        plan.sort()
        return plan

    def campaign(self, at: int, kind: str, name: str) -> None:
        rng = self.rng
        for p in self.people:
            if p.customer_id is None or rng.random() < 0.4:  # each campaign targets a segment
                continue
            ts = at + rng.randrange(0, 2 * _HOUR_MS)  # sending a big campaign takes a while
            cust = self.ident("customer_id", p.customer_id, True)
            attrs = {"campaign": name, "sender": "PizzaShop", "channel": kind}
            if kind == "email" and p.email and p.consent["email"]:
                ids = [self.ident("email", p.email, p.email_verified), cust]
                self.emit(p, ts, "esp", "email", "message_sent", ids, attrs, tz=self.tzs[0])
                if rng.random() < 0.22:
                    ts += int(rng.expovariate(1 / (6 * _HOUR_MS)))
                    self.emit(p, ts, "esp", "email", "email_opened", ids, attrs, tz=self.tzs[0])
                    if rng.random() < 0.15:
                        ts += rng.randrange(5_000, 300_000)
                        self.emit(p, ts, "esp", "email", "email_clicked", ids, attrs, tz=self.tzs[0])
            elif kind in ("sms", "viber") and p.crm_phone and p.consent["sms"]:
                if kind == "viber" and not (p.viber and p.consent["viber"]):
                    continue
                ids = [self.ident("phone", f"+{p.crm_phone}"), cust]
                self.emit(p, ts, kind, kind, "message_sent", ids, attrs)
            elif kind == "push" and p.logged_devices and p.consent["push"]:
                for device in p.logged_devices:
                    ids = [self.ident("device_id", device, True), cust]
                    self.emit(p, ts, "push", "push", "message_sent", ids, attrs)
                    if rng.random() < 0.07:
                        ts += int(rng.expovariate(1 / _HOUR_MS))
                        self.emit(p, ts, "push", "push", "push_opened", ids, attrs)
            elif kind == "webpush" and p.push_cookie and p.consent["push"]:
                ids = [self.ident("cookie_id", p.push_cookie), cust]
                self.emit(p, ts, "webpush", "webpush", "message_sent", ids, attrs)
                if rng.random() < 0.05:
                    ts += int(rng.expovariate(1 / _HOUR_MS))
                    self.emit(p, ts, "webpush", "webpush", "push_opened", ids, attrs)

    def crm_update(self, p: _Person, ts: int, reason: str = "profile_sync") -> None:
        """What the CRM holds: cards are issued against a phone, so card holders have one, account or not."""
        ids = []
        if p.customer_id:
            ids.append(self.ident("customer_id", p.customer_id, True))
        if p.loyalty:
            ids.append(self.ident("loyalty_card", p.loyalty, True))
        if p.crm_phone:
            ids.append(self.ident("phone", f"+{p.crm_phone}"))
        if p.email and p.customer_id:
            ids.append(self.ident("email", p.email, p.email_verified))
        if not ids:
            return
        self.ids += 1
        attrs = {"reason": reason, "record_id": f"crm-{self.ids:08d}"}
        self.emit(p, ts, "crm", "crm", "identify", ids, attrs, tz=self.tzs[3])

    def consent_change(self, p: _Person, ts: int) -> None:
        if p.customer_id is None:
            return
        rng = self.rng
        channel = rng.choice(("email", "sms", "push"))
        p.consent[channel] = not p.consent.get(channel, False)
        source = "web" if rng.random() < 0.5 else ("app" if p.devices else "crm")
        ids = [self.ident("customer_id", p.customer_id, True)]
        change = {channel: p.consent[channel]}
        self.emit(p, ts, source, source, "consent_changed", ids, {"changes": change}, change)

    # --- the run --------------------------------------------------------------------------------------------

    def plan(self) -> list[list[tuple[int, int, int, str]]]:
        """Sessions per day: (start, seq, person index, kind)."""
        cfg, rng = self.cfg, self.rng
        by_day: list[list[tuple[int, int, int, str]]] = [[] for _ in range(cfg.days)]
        seq = 0
        scale = cfg.days / 30
        for p in self.people:
            offset = p.tz.utcoffset(None)
            local_shift = (int(offset.total_seconds()) // 3600 if offset else 0) - self.start_offset_h
            activity = rng.lognormvariate(-0.32, 0.8)
            lam = cfg.sessions_per_month * scale * activity
            if p.anonymous:
                lam *= 0.6
            sessions = [
                (
                    rng.randrange(cfg.days),
                    _SESSION_KINDS[bisect.bisect(p.channel_cum, rng.random() * p.channel_cum[-1])],
                )
                for _ in range(_poisson(rng, lam))
            ]
            if cfg.crm_import and (p.customer_id or p.loyalty):
                sessions.append((-1, "import"))
            if p.customer_id and rng.random() < cfg.crm_update_share:
                sessions.append((rng.randrange(cfg.days), "crm"))
            if p.customer_id and rng.random() < cfg.consent_change_share:
                sessions.append((rng.randrange(cfg.days), "consent"))
            for day, kind in sessions:
                if kind == "import":  # the import runs in the first hour of the period
                    seq += 1
                    by_day[0].append((self.start_ms + rng.randrange(_HOUR_MS), seq, p.idx, kind))
                    continue
                if kind == "store":  # stores open 10:00-22:00 local time
                    hour = rng.randrange(10, 22) - local_shift
                else:
                    hour = bisect.bisect(self.hour_cum, rng.random() * self.hour_cum[-1]) - local_shift
                at = self.start_ms + day * _DAY_MS + hour * _HOUR_MS + rng.randrange(_HOUR_MS)
                at = max(self.start_ms, at)
                seq += 1
                # bucket by the actual start: a local-time shift may move a session to a neighbouring day
                by_day[min(cfg.days - 1, (at - self.start_ms) // _DAY_MS)].append((at, seq, p.idx, kind))
        for bucket in by_day:
            bucket.sort()
        return by_day

    def run(self, writers: _Writers) -> None:
        self.build()
        by_day = self.plan()
        campaigns = self.campaigns()
        ci = 0
        for d, sessions in enumerate(by_day):
            boundary = self.start_ms + (d + 1) * _DAY_MS
            # (start, seq, person index or -1 for a campaign, kind)
            todays = list(sessions)
            while ci < len(campaigns) and campaigns[ci][0] < boundary:
                at, seq, ckind, name = campaigns[ci]
                todays.append((at, -seq - 1, -1, f"{ckind}|{name}"))
                ci += 1
            todays.sort()
            for at, _, who, kind in todays:
                if who < 0:
                    ckind, _, name = kind.partition("|")
                    self.campaign(at, ckind, name)
                    continue
                person = self.people[who]
                if kind == "crm":
                    self.crm_update(person, at)
                elif kind == "import":
                    self.crm_update(person, at, "crm_import")
                elif kind == "consent":
                    self.consent_change(person, at)
                else:
                    self.session(person, at, kind)
            self.flush(boundary, writers)
        self.flush(self.end_ms + _DAY_MS, writers)

    def flush(self, before: int, writers: _Writers) -> None:
        ready = [e for e in self.buffer if e[0] < before]
        self.buffer = [e for e in self.buffer if e[0] >= before]
        ready.sort()
        writers.write(ready)


class _Writers:
    """Open files for one run; counts lines and bytes as it goes."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.per_source: dict[str, IO[bytes]] = {
            s: (out / f"raw.{s}.jsonl").open("wb", buffering=1 << 20) for s in SOURCES
        }
        self.all = (out / "all.jsonl").open("wb", buffering=1 << 20)
        self.truth = (out / "truth.jsonl").open("wb", buffering=1 << 20)
        self.counts = dict.fromkeys(SOURCES, 0)
        self.events = 0
        self.unique = 0

    def write(self, ready: list[tuple[int, int, str, bytes, str, str]]) -> None:
        all_lines = []
        truth_lines = []
        per: dict[str, list[bytes]] = {}
        for _, _, source, line, event_id, pid in ready:
            all_lines.append(line)
            per.setdefault(source, []).append(line)
            if event_id:  # a duplicate delivery has no truth line of its own
                truth_lines.append(b'{"event_id":"%s","person_id":"%s"}' % (event_id.encode(), pid.encode()))
        if all_lines:
            self.all.write(b"\n".join(all_lines) + b"\n")
        if truth_lines:
            self.truth.write(b"\n".join(truth_lines) + b"\n")
        for source, lines in per.items():
            self.per_source[source].write(b"\n".join(lines) + b"\n")
            self.counts[source] += len(lines)
        self.events += len(all_lines)
        self.unique += len(truth_lines)

    def close(self) -> None:
        for f in (*self.per_source.values(), self.all, self.truth):
            f.close()


def _with_luhn(body: str) -> str:
    """Append the Luhn check digit, as real card ranges do (so `loyalty_checksum` deployments accept them)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def _cumulative(weights: Any) -> tuple[float, ...]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return tuple(out)


def _pick(rng: random.Random, values: Any, weights: Any) -> Any:
    return rng.choices(values, weights)[0]


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, prod = math.exp(-lam), 0, rng.random()
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k


def _check_config(cfg: SimConfig) -> None:
    """Refuse a config that cannot make a population, before any file is created (ValueError, one line).

    Without it `days=0` failed deep inside generation after leaving empty files behind, and `people=0` wrote
    an empty population and reported success.
    """
    if cfg.people < 1:
        raise ValueError(f"people must be at least 1, got {cfg.people}")
    if cfg.days < 1:
        raise ValueError(f"days must be at least 1, got {cfg.days}")
    try:
        datetime.fromisoformat(cfg.start)
    except ValueError:
        raise ValueError(
            f"start must be an ISO-8601 date-time such as {_DEFAULT.start}, got {cfg.start!r}"
        ) from None


def simulate(cfg: SimConfig, out_dir: Path | str) -> SimSummary:
    """Write a population's events and truth to `out_dir`; the same config always writes the same bytes."""
    _check_config(cfg)
    out = Path(out_dir)
    began = time.perf_counter()
    sim = _Sim(cfg)
    writers = _Writers(out)
    try:
        sim.run(writers)
    finally:
        writers.close()
    summary = SimSummary(out_dir=out, people=cfg.people)
    summary.events = writers.events
    summary.unique_events = writers.unique
    summary.per_source = {s: n for s, n in writers.counts.items()}
    summary.bytes_all = (out / "all.jsonl").stat().st_size
    summary.bytes_total = sum(f.stat().st_size for f in out.glob("*.jsonl"))
    summary.seconds = time.perf_counter() - began
    return summary


_DEFAULT = SimConfig()


def simulate_command(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for raw.<source>.jsonl, all.jsonl, truth.jsonl.")
    ],
    people: Annotated[int, typer.Option(min=1, help="Number of people in the population.")] = _DEFAULT.people,
    days: Annotated[int, typer.Option(min=1, help="Length of the period in days.")] = _DEFAULT.days,
    seed: Annotated[
        int, typer.Option(help="Random seed: the same seed writes the same files.")
    ] = _DEFAULT.seed,
    start: Annotated[str, typer.Option(help="Start of the period, ISO-8601 with offset.")] = _DEFAULT.start,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override any SimConfig knob: --set placeholder_phone_rate=0.1 (repeatable)."
        ),
    ] = None,
    noise: Annotated[
        float, typer.Option(help="Multiply every noise rate by this factor (0 = a clean population).")
    ] = 1.0,
) -> None:
    """Generate a noisy omnichannel population with ground truth (envelope-v1 JSON lines)."""
    from rich.console import Console

    cfg = config_with(SimConfig(people=people, days=days, seed=seed, start=start), set_, noise)
    try:
        _check_config(cfg)  # before the output directory exists: a usage error leaves nothing behind
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    _output_dir(out)
    summary = simulate(cfg, out)
    console = Console(stderr=True)
    console.print(
        f"[bold]{summary.events:,}[/] events ({summary.unique_events:,} unique) "
        f"for {summary.people:,} people "
        f"in {summary.seconds:.1f}s -> {summary.out_dir} (all.jsonl {summary.bytes_all / 1e6:.1f} MB)"
    )
    for source, n in sorted(summary.per_source.items(), key=lambda kv: -kv[1]):
        console.print(f"  raw.{source}.jsonl  {n:,}")


def _output_dir(out: Path) -> None:
    """Create `--out`, or a usage error (exit 2) naming it, instead of an OSError traceback from mkdir."""
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="'--out'")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot create {out}: {exc.strerror or exc}", param_hint="'--out'"
        ) from None


NOISE_KNOBS: tuple[str, ...] = (
    "shared_device_rate",
    "household_phone_rate",
    "household_email_rate",
    "placeholder_phone_rate",
    "placeholder_email_rate",
    "email_typo_rate",
    "unverified_email_rate",
    "recycled_phone_rate",
    "device_churn_rate",
    "cookie_churn_rate",
    "duplicate_rate",
)


def config_with(cfg: SimConfig, overrides: list[str] | None = None, noise: float = 1.0) -> SimConfig:
    """Apply `knob=value` overrides and a noise multiplier: how the CLI and bench vary one knob at a time."""
    values = asdict(cfg)
    if noise != 1.0:
        for knob in NOISE_KNOBS:
            values[knob] = min(1.0, values[knob] * noise)
    types = {f.name: f.type for f in fields(SimConfig)}
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in types:
            raise typer.BadParameter(
                f"unknown knob {name!r}; known: {', '.join(sorted(types))}", param_hint="'--set'"
            )
        values[name] = _knob_value(name, types[name], raw)
    return SimConfig(**values)


_YES_NO = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _knob_value(name: str, kind: Any, raw: str) -> Any:
    """`raw` as the knob's type; a clean usage error for a value that is not one (no ValueError traceback).

    Yes/no knobs are parsed, not stored as given: the string 'false' is truthy, so it switched nothing off.
    """
    text = raw.strip()
    if kind in ("bool", bool):
        if text.lower() in _YES_NO:
            return _YES_NO[text.lower()]
        raise typer.BadParameter(
            f"{name} is yes/no: true/false, yes/no or 1/0, got {raw!r}", param_hint="'--set'"
        )
    try:
        if kind in ("int", int):
            return int(text)
        if kind in ("float", float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
    except ValueError:
        expected = "a whole number" if kind in ("int", int) else "a number"
        raise typer.BadParameter(f"{name} must be {expected}, got {raw!r}", param_hint="'--set'") from None
    return raw
