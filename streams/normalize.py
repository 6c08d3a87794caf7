"""Identifier normalisation: one person must get one key from every channel, or nothing stitches."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import re
import tomllib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from schemas.envelope import DEFAULT_IDENTIFIER_TYPES, SOURCE_FAMILIES
from streams.exceptions import ConfigError, IdentifierRejected, RejectReason

__all__ = [
    "ANY_TYPE",
    "DEFAULT_BLOCKED_PATTERNS",
    "DEFAULT_BLOCKED_VALUES",
    "NormalizationSettings",
    "Normalizer",
    "PerSettings",
    "hash_identifier",
    "normalize_identifier",
    "normalizer_for",
]

# Key of the blocklists that apply to every identifier type (matched on the trimmed, case-folded raw value).
ANY_TYPE = "*"

# Placeholders people and tills type when they have no real value; exact matches on the normalised value.
DEFAULT_BLOCKED_VALUES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        ANY_TYPE: frozenset(
            [
                "null",
                "none",
                "nil",
                "undefined",
                "unknown",
                "anonymous",
                "anon",
                "guest",
                "n/a",
                "na",
                "nan",
                "0",
                "-1",
                "000",
                "test",
                "default",
                "{}",
                "[]",
                "true",
                "false",
                "-",
                "--",
                "?",
                "[object object]",
            ]
        ),
        "email": frozenset(
            [
                "test@test.com",
                "test@test.ru",
                "test@mail.ru",
                "test@gmail.com",
                "test@example.com",
                "no@no.ru",
                "no@no.com",
                "noemail@noemail.com",
                "noemail@mail.ru",
                "none@none.com",
                "email@email.com",
                "mail@mail.ru",
                "a@a.ru",
                "a@a.com",
                "x@x.ru",
                "x@x.com",
                "asd@asd.ru",
                "qwe@qwe.ru",
                "123@123.ru",
                "user@example.com",
            ]
        ),
        "phone": frozenset({"+71234567890", "+79001234567", "+79123456789", "+79876543210"}),
        "device_id": frozenset({"ffffffff-ffff-ffff-ffff-ffffffffffff"}),
    }
)

# Families of placeholders; matched with `re.search` on the normalised (unhashed) value.
DEFAULT_BLOCKED_PATTERNS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "email": (
            r"^(no-?e?mail|no-?reply|do-?not-?reply|none|null|test|fake|nomail|noname)\d*@",
            r"@(example\.(com|net|org)|test\.(com|ru)|noemail\.\w+|no-?mail\.\w+)$",
        ),
        # E.164 with every subscriber digit the same: +70000000000, +77777777777, +12222222222.
        "phone": (r"^\+\d{0,3}?(\d)\1{6,}$",),
        "loyalty_card": (r"^(\d)\1+$", r"^0*1234567890?$"),
    }
)

_T = TypeVar("_T")
_TRUTHY = {"1", "true", "yes", "on"}
_FALSY = {"0", "false", "no", "off", ""}
_MIN_HMAC_KEY_BYTES = 16
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))  # zero-width chars pasted from apps

# Mailbox providers that ignore dots and/or `+tag` in the local part: domain → (canonical domain, dots, plus).
_PROVIDER_RULES: Mapping[str, tuple[str, bool, bool]] = MappingProxyType(
    {
        "gmail.com": ("gmail.com", True, True),
        "googlemail.com": ("gmail.com", True, True),
        "yandex.ru": ("yandex.ru", False, True),
        "ya.ru": ("yandex.ru", False, True),
        "yandex.com": ("yandex.ru", False, True),
        "yandex.by": ("yandex.ru", False, True),
        "yandex.kz": ("yandex.ru", False, True),
        "yandex.ua": ("yandex.ru", False, True),
        "outlook.com": ("outlook.com", False, True),
        "hotmail.com": ("hotmail.com", False, True),
        "icloud.com": ("icloud.com", False, True),
        "proton.me": ("proton.me", False, True),
        "protonmail.com": ("protonmail.com", False, True),
    }
)


@dataclass(frozen=True, slots=True)
class NormalizationSettings:
    """Everything that changes an identifier's key; one frozen object so a cache can never mix two configs."""

    default_region: str = "RU"
    identifier_types: frozenset[str] = frozenset(DEFAULT_IDENTIFIER_TYPES)
    sources: frozenset[str] = frozenset(SOURCE_FAMILIES)
    blocked_values: Mapping[str, frozenset[str]] = field(default_factory=lambda: DEFAULT_BLOCKED_VALUES)
    blocked_patterns: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: DEFAULT_BLOCKED_PATTERNS)
    email_provider_rules: bool = False
    loyalty_checksum: bool = False
    hmac_key: bytes | None = field(default=None, repr=False)
    hashed_types: frozenset[str] = frozenset({"phone", "email"})
    max_event_bytes: int = 1024 * 1024
    max_identifier_length: int = 256
    cache_size: int = 100_000

    def __post_init__(self) -> None:
        """Refuse unusable settings at construction, not on the millionth event."""
        if self.default_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ConfigError(f"default_region {self.default_region!r} is not a phonenumbers region")
        if self.hmac_key is not None and len(self.hmac_key) < _MIN_HMAC_KEY_BYTES:
            raise ConfigError(f"hmac key must be at least {_MIN_HMAC_KEY_BYTES} bytes")
        if self.max_event_bytes <= 0 or self.max_identifier_length <= 0 or self.cache_size < 0:
            raise ConfigError("max_event_bytes, max_identifier_length must be > 0 and cache_size >= 0")
        for type_, patterns in self.blocked_patterns.items():
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"blocked pattern for {type_!r} does not compile: {exc}") from exc

    @property
    def hashing(self) -> bool:
        """True when phone/e-mail (the hashed types) must never leave normalisation in clear."""
        return self.hmac_key is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NormalizationSettings:
        """Build settings from `OMNISTITCH_*` variables so deployments configure without code."""
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        if region := env.get("OMNISTITCH_DEFAULT_REGION", "").strip():
            changes["default_region"] = region.upper()
        changes["hmac_key"] = _hmac_key_from_env(env)
        rules = env.get("OMNISTITCH_EMAIL_PROVIDER_RULES", "").strip().lower()
        if rules in _TRUTHY:
            changes["email_provider_rules"] = True
        elif rules not in _FALSY:
            raise ConfigError(f"OMNISTITCH_EMAIL_PROVIDER_RULES={rules!r} is not a boolean")
        if path := env.get("OMNISTITCH_BLOCKLIST_FILE", "").strip():
            values, patterns = _read_blocklist(Path(path))
            changes["blocked_values"] = _merge(DEFAULT_BLOCKED_VALUES, values, frozenset.union)
            changes["blocked_patterns"] = _merge(DEFAULT_BLOCKED_PATTERNS, patterns, tuple.__add__)
        if hashed := env.get("OMNISTITCH_HASHED_TYPES", "").strip():
            changes["hashed_types"] = frozenset(t.strip() for t in hashed.split(",") if t.strip())
        if size := env.get("OMNISTITCH_MAX_EVENT_BYTES", "").strip():
            if not size.isdigit():
                raise ConfigError(f"OMNISTITCH_MAX_EVENT_BYTES={size!r} is not a whole number of bytes")
            changes["max_event_bytes"] = int(size)
        return replace(cls(), **changes)


def _hmac_key_from_env(env: Mapping[str, str]) -> bytes | None:
    """The key comes from a variable or a mounted secret file, never both (which wins would be a guess)."""
    inline = env.get("OMNISTITCH_HMAC_KEY", "")
    path = env.get("OMNISTITCH_HMAC_KEY_FILE", "")
    if inline and path:
        raise ConfigError("set OMNISTITCH_HMAC_KEY or OMNISTITCH_HMAC_KEY_FILE, not both")
    if inline:
        return inline.encode()
    if path:
        try:
            return Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read OMNISTITCH_HMAC_KEY_FILE: {exc}") from exc
    return None


def _read_blocklist(path: Path) -> tuple[dict[str, frozenset[str]], dict[str, tuple[str, ...]]]:
    """Parse `{"values": {type: [..]}, "patterns": {type: [..]}}` from TOML or JSON (by extension)."""
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read blocklist {path}: {exc}") from exc
    if not isinstance(data, dict) or set(data) - {"values", "patterns"}:
        raise ConfigError(f"blocklist {path}: top level must hold only 'values' and 'patterns' tables")
    tables: list[dict[str, tuple[str, ...]]] = []
    for section in ("values", "patterns"):
        table = data.get(section, {})
        if not isinstance(table, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in table.values()
        ):
            raise ConfigError(f"blocklist {path}: [{section}] must map identifier type → list of strings")
        tables.append({str(k): tuple(v) for k, v in table.items()})
    values = {k: frozenset(v.casefold() if k == ANY_TYPE else v for v in vs) for k, vs in tables[0].items()}
    return values, tables[1]


def _merge(
    base: Mapping[str, _T], extra: Mapping[str, _T], combine: Callable[[_T, _T], _T]
) -> Mapping[str, _T]:
    """Add per-type extras to the shipped defaults (extras never remove a default)."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = combine(merged[key], value) if key in merged else value
    return MappingProxyType(merged)


def hash_identifier(type_: str, value: str, key: bytes) -> str:
    """HMAC-SHA256 of `type:value`, so equal identifiers still link but the clear value is unrecoverable."""
    return hmac.new(key, f"{type_}:{value}".encode(), hashlib.sha256).hexdigest()


def _luhn_ok(digits: str) -> bool:
    """Luhn check digit, used by most loyalty-card ranges."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class Normalizer:
    """Settings compiled once (regexes, blocklists) plus a bounded cache: identifiers repeat a lot."""

    __slots__ = ("_any_blocked", "_any_pattern", "_blocked", "_cache", "_patterns", "settings")

    def __init__(self, settings: NormalizationSettings | None = None) -> None:
        self.settings = settings or NormalizationSettings()
        blocked = self.settings.blocked_values
        self._any_blocked = frozenset(v.casefold() for v in blocked.get(ANY_TYPE, ()))
        self._blocked = {t: vs for t, vs in blocked.items() if t != ANY_TYPE}
        self._patterns = {
            t: re.compile("|".join(f"(?:{p})" for p in ps))
            for t, ps in self.settings.blocked_patterns.items()
            if ps and t != ANY_TYPE
        }
        any_patterns = self.settings.blocked_patterns.get(ANY_TYPE, ())
        self._any_pattern = re.compile("|".join(f"(?:{p})" for p in any_patterns)) if any_patterns else None
        # (type, raw value) → (canonical, stored) forms, or the reason it was rejected
        self._cache: dict[tuple[str, str], tuple[str, str] | RejectReason] = {}

    def normalize(self, type_: str, raw: str) -> str:
        """The stored form: normalised, then HMAC-hashed if hashing is on for this type."""
        return self._lookup(type_, raw)[1]

    def canonical(self, type_: str, raw: str) -> str:
        """The normalised clear value (never hashed): for scrubbing, simulators and hashing-off setups."""
        return self._lookup(type_, raw)[0]

    def _lookup(self, type_: str, raw: str) -> tuple[str, str]:
        """(canonical, stored) from the cache, computing and remembering it (or the rejection) on a miss."""
        cache_key = (type_, raw)
        hit = self._cache.get(cache_key)
        if hit is None:
            try:
                canonical = self._canonical(type_, raw)
            except IdentifierRejected as exc:
                hit = exc.reason
            else:
                key, stored = self.settings.hmac_key, canonical
                if key is not None and type_ in self.settings.hashed_types:
                    stored = hash_identifier(type_, canonical, key)
                hit = (canonical, stored)
            self._remember(cache_key, hit)
        if isinstance(hit, RejectReason):
            raise IdentifierRejected(hit, f"{type_} identifier rejected")
        return hit

    def _canonical(self, type_: str, raw: str) -> str:
        """Generic checks (type, empty, length, placeholders), the type's canonicaliser, its blocklists."""
        if type_ not in self.settings.identifier_types:
            raise IdentifierRejected(RejectReason.UNKNOWN_IDENTIFIER_TYPE, f"type {type_!r} not configured")
        value = raw.translate(_INVISIBLE).strip()
        if not value:
            raise IdentifierRejected(RejectReason.EMPTY)
        if len(value) > self.settings.max_identifier_length:
            raise IdentifierRejected(RejectReason.TOO_LONG)
        folded = value.casefold()
        if folded in self._any_blocked or (self._any_pattern and self._any_pattern.search(folded)):
            raise IdentifierRejected(RejectReason.BLOCKED_VALUE)
        canonical = _CANONICALIZERS.get(type_, _case_preserving)(self, value)
        if canonical in self._blocked.get(type_, ()):
            raise IdentifierRejected(RejectReason.BLOCKED_VALUE)
        pattern = self._patterns.get(type_)
        if pattern is not None and pattern.search(canonical):
            raise IdentifierRejected(RejectReason.BLOCKED_VALUE)
        return canonical

    def _remember(self, cache_key: tuple[str, str], value: tuple[str, str] | RejectReason) -> None:
        """Bounded FIFO, evicted an eighth at a time into a fresh dict.

        Deleting a dict's first key one by one leaves holes that every later `next(iter(...))` rescans
        (46 µs an eviction at 100k entries, profiled); rebuilding once per size/8 inserts is O(1) amortised.
        """
        cache = self._cache
        size = self.settings.cache_size
        if len(cache) >= size:
            if not size:
                return
            self._cache = cache = dict(itertools.islice(cache.items(), max(1, size // 8), None))
        cache[cache_key] = value

    def _phone(self, value: str) -> str:
        """E.164 via libphonenumber; `8 916 …` and `+7 916 …` meet in the default region."""
        try:
            number = phonenumbers.parse(value, self.settings.default_region)
        except phonenumbers.NumberParseException:
            raise IdentifierRejected(RejectReason.INVALID_PHONE, "unparseable") from None
        if not phonenumbers.is_valid_number(number):
            raise IdentifierRejected(RejectReason.INVALID_PHONE, "not a valid number")
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    def _email(self, value: str) -> str:
        """Lowercase mailbox at the IDNA (punycode) domain; syntax only, no DNS (the hot path stays local)."""
        try:
            parsed = validate_email(value, check_deliverability=False)
        except EmailNotValidError:
            raise IdentifierRejected(RejectReason.INVALID_EMAIL, "not a valid address") from None
        local, domain = parsed.local_part.lower(), parsed.ascii_domain.lower()
        if self.settings.email_provider_rules and domain in _PROVIDER_RULES:
            domain, drop_dots, drop_tag = _PROVIDER_RULES[domain]
            if drop_tag:
                local = local.split("+", 1)[0]
            if drop_dots:
                local = local.replace(".", "")
            if not local:
                raise IdentifierRejected(RejectReason.INVALID_EMAIL, "empty local part after provider rules")
        return f"{local}@{domain}"

    def _device_id(self, value: str) -> str:
        """Advertising ids are case-insensitive hex; the all-zero id means tracking is off, not a person."""
        if not value.isprintable():
            raise IdentifierRejected(RejectReason.INVALID_CHARACTERS)
        device = value.lower()
        if not device.replace("-", "").strip("0"):
            raise IdentifierRejected(RejectReason.ZERO_DEVICE_ID)
        return device

    def _loyalty_card(self, value: str) -> str:
        """Cards are printed with spaces and dashes and scanned without; keep the digits only."""
        digits = "".join(unicodedata.normalize("NFKC", value).replace("-", "").split())
        if not (digits.isascii() and digits.isdigit()) or not 4 <= len(digits) <= 32:
            raise IdentifierRejected(RejectReason.INVALID_LOYALTY_CARD, "expected 4-32 digits")
        if self.settings.loyalty_checksum and not _luhn_ok(digits):
            raise IdentifierRejected(RejectReason.BAD_CHECKSUM, "Luhn check digit mismatch")
        return digits


def _case_preserving(normalizer: Normalizer, value: str) -> str:
    """CRM ids, cookie ids and configured extra types: trimmed only, because their case can matter."""
    if not value.isprintable():
        raise IdentifierRejected(RejectReason.INVALID_CHARACTERS)
    return value


_CANONICALIZERS: dict[str, Callable[[Normalizer, str], str]] = {
    "phone": Normalizer._phone,
    "email": Normalizer._email,
    "device_id": Normalizer._device_id,
    "loyalty_card": Normalizer._loyalty_card,
}

_DEFAULT_SETTINGS = NormalizationSettings()


class PerSettings(Generic[_T]):
    """One shared object per settings instance (Normalizer, Validator): one-off calls keep their caches.

    Keyed by identity, so a lookup never hashes the settings; there are a handful of live configs at most, so
    it is simply cleared when it grows past eight.
    """

    def __init__(self, build: Callable[[NormalizationSettings], _T]) -> None:
        self._build = build
        self._entries: dict[int, tuple[NormalizationSettings, _T]] = {}

    def get(self, settings: NormalizationSettings | None) -> _T:
        settings = settings or _DEFAULT_SETTINGS
        entry = self._entries.get(id(settings))
        if entry is None or entry[0] is not settings:
            if len(self._entries) >= 8:
                self._entries.clear()
            entry = (settings, self._build(settings))
            self._entries[id(settings)] = entry
        return entry[1]


_NORMALIZERS: PerSettings[Normalizer] = PerSettings(Normalizer)


def normalizer_for(settings: NormalizationSettings | None = None) -> Normalizer:
    """One shared Normalizer (and cache) per settings object."""
    return _NORMALIZERS.get(settings)


def normalize_identifier(type_: str, raw_value: str, settings: NormalizationSettings | None = None) -> str:
    """The key value stored and linked for one raw identifier; raises IdentifierRejected with a reason."""
    return normalizer_for(settings).normalize(type_, raw_value)
