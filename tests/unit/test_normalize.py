"""Identifier normalisation on real-world messy input: two spellings of one person must meet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.exceptions import ConfigError, IdentifierRejected, RejectReason
from streams.normalize import (
    NormalizationSettings,
    Normalizer,
    hash_identifier,
    normalize_identifier,
)

KEY = b"k" * 32
DEFAULT_TYPES = ("phone", "email", "device_id", "loyalty_card", "customer_id", "cookie_id")


def rejected(type_: str, raw: str, settings: NormalizationSettings | None = None) -> RejectReason:
    with pytest.raises(IdentifierRejected) as info:
        normalize_identifier(type_, raw, settings)
    return info.value.reason


@pytest.mark.parametrize(
    "raw",
    [
        "+7 (916) 123-45-67",
        "8 916 123-45-67",
        "+7 916 1234567",
        "89161234567",
        "79161234567",
        "9161234567",
        "8(916)123 45 67",
        " +7-916-123-45-67 ",
        "89161234567".translate({ord(d): ord(d) + 0xFEE0 for d in "0123456789"}),  # full-width digits
        "+7 916 123 45 67\u200b",  # zero-width space pasted from a messenger
    ],
)
def test_russian_phone_spellings_meet_in_one_e164(raw: str) -> None:
    assert normalize_identifier("phone", raw) == "+79161234567"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+1 (212) 555-0100", "+12125550100"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+375 29 123-45-67", "+375291234567"),
        ("+7 701 123 4567", "+77011234567"),
        ("+49 30 901820", "+4930901820"),
    ],
)
def test_international_phones_keep_their_country(raw: str, expected: str) -> None:
    assert normalize_identifier("phone", raw) == expected


def test_default_region_decides_numbers_without_country_code() -> None:
    us = NormalizationSettings(default_region="US")
    assert normalize_identifier("phone", "(212) 555-0100", us) == "+12125550100"
    assert rejected("phone", "(212) 555-0100") is RejectReason.INVALID_PHONE


@pytest.mark.parametrize("raw", ["123", "+7 916", "call me", "+7 916 123 45 67 89 00", "+999 1234567"])
def test_invalid_phones_are_rejected(raw: str) -> None:
    assert rejected("phone", raw) is RejectReason.INVALID_PHONE


@pytest.mark.parametrize("raw", ["+7 777 777 77 77", "8 (999) 999-99-99", "+7 (900) 123-45-67"])
def test_placeholder_phones_are_blocked(raw: str) -> None:
    assert rejected("phone", raw) is RejectReason.BLOCKED_VALUE


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Ivan.Petrov@Mail.RU ", "ivan.petrov@mail.ru"),
        ("IVAN@YANDEX.RU", "ivan@yandex.ru"),
        ("user@Пример.РФ", "user@xn--e1afmkfd.xn--p1ai"),
        ("Почта@пример.рф", "почта@xn--e1afmkfd.xn--p1ai"),
        ("jürgen@Bücher.DE", "jürgen@xn--bcher-kva.de"),
        ("I.Van+promo@GoogleMail.com", "i.van+promo@googlemail.com"),  # provider rules off by default
    ],
)
def test_emails_are_lowercased_with_idna_domains(raw: str, expected: str) -> None:
    assert normalize_identifier("email", raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("I.Van+promo@GoogleMail.com", "ivan@gmail.com"),
        ("i.v.a.n@gmail.com", "ivan@gmail.com"),
        ("ivan+shop@ya.ru", "ivan@yandex.ru"),
        ("ivan.petrov+x@mail.ru", "ivan.petrov+x@mail.ru"),  # unknown provider: untouched
    ],
)
def test_provider_rules_when_enabled(raw: str, expected: str) -> None:
    rules = NormalizationSettings(email_provider_rules=True)
    assert normalize_identifier("email", raw, rules) == expected


@pytest.mark.parametrize("raw", ["ivan@", "ivan.mail.ru", "ivan@@mail.ru", "ivan@localhost", "a b@mail.ru"])
def test_invalid_emails_are_rejected(raw: str) -> None:
    assert rejected("email", raw) is RejectReason.INVALID_EMAIL


@pytest.mark.parametrize(
    "raw",
    ["test@test.com", "TEST@Test.com", "NoEmail@Mail.ru", "no@no.ru", "noreply@shop.ru", "a@example.com"],
)
def test_placeholder_emails_are_blocked(raw: str) -> None:
    assert rejected("email", raw) is RejectReason.BLOCKED_VALUE


def test_device_ids_are_lowercased_and_zero_advertising_ids_refused() -> None:
    assert normalize_identifier("device_id", "  6D92078A-8246-4BA4-AE5B-76104861E7DC ") == (
        "6d92078a-8246-4ba4-ae5b-76104861e7dc"
    )
    assert rejected("device_id", "00000000-0000-0000-0000-000000000000") is RejectReason.ZERO_DEVICE_ID


def test_loyalty_cards_keep_digits_only() -> None:
    assert normalize_identifier("loyalty_card", "2000 1234 5678") == "200012345678"
    assert normalize_identifier("loyalty_card", "2000-1234-5678") == "200012345678"
    assert rejected("loyalty_card", "2000-12AB") is RejectReason.INVALID_LOYALTY_CARD
    assert rejected("loyalty_card", "1111 1111 1111") is RejectReason.BLOCKED_VALUE


def test_loyalty_checksum_is_optional() -> None:
    luhn = NormalizationSettings(loyalty_checksum=True)
    assert normalize_identifier("loyalty_card", "4539 1488 0343 6467", luhn) == "4539148803436467"
    assert rejected("loyalty_card", "4539 1488 0343 6468", luhn) is RejectReason.BAD_CHECKSUM
    assert normalize_identifier("loyalty_card", "4539 1488 0343 6468") == "4539148803436468"


def test_crm_and_cookie_ids_are_trimmed_but_keep_case() -> None:
    assert normalize_identifier("customer_id", "  CRM-AbC-42 ") == "CRM-AbC-42"
    assert normalize_identifier("cookie_id", "GA1.2.3") == "GA1.2.3"
    assert rejected("cookie_id", "abc\x00def") is RejectReason.INVALID_CHARACTERS


@pytest.mark.parametrize("type_", DEFAULT_TYPES)
@pytest.mark.parametrize(
    "raw", ["null", "NULL", "undefined", "Unknown", "anonymous", "0", "-1", "[object Object]"]
)
def test_generic_placeholders_are_blocked_for_every_type(type_: str, raw: str) -> None:
    assert rejected(type_, raw) is RejectReason.BLOCKED_VALUE


def test_empty_too_long_and_unknown_type() -> None:
    assert rejected("phone", "   ") is RejectReason.EMPTY
    assert rejected("customer_id", "x" * 257) is RejectReason.TOO_LONG
    assert rejected("passport", "4510 123456") is RejectReason.UNKNOWN_IDENTIFIER_TYPE


def test_identifier_types_are_configurable() -> None:
    extra = NormalizationSettings(identifier_types=frozenset({"phone", "telegram_id"}))
    assert normalize_identifier("telegram_id", " @Ivan ", extra) == "@Ivan"
    assert rejected("email", "ivan@mail.ru", extra) is RejectReason.UNKNOWN_IDENTIFIER_TYPE


def test_hashing_links_equal_identifiers_without_storing_them() -> None:
    hashed = NormalizationSettings(hmac_key=KEY)
    a = normalize_identifier("phone", "8 916 123-45-67", hashed)
    b = normalize_identifier("phone", "+7 (916) 123-45-67", hashed)
    assert a == b == hash_identifier("phone", "+79161234567", KEY)
    assert len(a) == 64 and "79161234567" not in a
    assert normalize_identifier("email", "Ivan@Mail.ru", hashed) == hash_identifier(
        "email", "ivan@mail.ru", KEY
    )
    # other key, other hash; loyalty cards are not in the default hashed types
    assert normalize_identifier("phone", "89161234567", NormalizationSettings(hmac_key=b"x" * 32)) != a
    assert normalize_identifier("loyalty_card", "2000 1234 5678", hashed) == "200012345678"
    assert hash_identifier("phone", "1", KEY) != hash_identifier("email", "1", KEY)


def test_settings_repr_never_shows_the_key() -> None:
    assert "k" * 32 not in repr(NormalizationSettings(hmac_key=KEY))


def test_cache_is_bounded_and_replays_rejections() -> None:
    normalizer = Normalizer(NormalizationSettings(cache_size=2))
    for _ in range(2):
        for raw in ("89161234567", "89161234568", "89161234569"):
            assert normalizer.normalize("phone", raw) == "+7" + raw[1:]
        for _ in range(2):
            with pytest.raises(IdentifierRejected) as info:
                normalizer.normalize("phone", "123")
            assert info.value.reason is RejectReason.INVALID_PHONE
    assert len(normalizer._cache) <= 2


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    blocklist = tmp_path / "blocked.toml"
    blocklist.write_text(
        '[values]\nemail = ["boss@shop.ru"]\n"*" = ["N.A."]\n[patterns]\nphone = ["^\\\\+7495"]\n',
        encoding="utf-8",
    )
    loaded = NormalizationSettings.from_env(
        {
            "OMNISTITCH_DEFAULT_REGION": "kz",
            "OMNISTITCH_HMAC_KEY": "s" * 20,
            "OMNISTITCH_BLOCKLIST_FILE": str(blocklist),
            "OMNISTITCH_EMAIL_PROVIDER_RULES": "yes",
            "OMNISTITCH_HASHED_TYPES": "phone, email,customer_id",
            "OMNISTITCH_MAX_EVENT_BYTES": "65536",
        }
    )
    assert loaded.hashed_types == {"phone", "email", "customer_id"}
    assert loaded.max_event_bytes == 65536
    with pytest.raises(ConfigError):
        NormalizationSettings.from_env({"OMNISTITCH_MAX_EVENT_BYTES": "1MB"})
    assert loaded.default_region == "KZ"
    assert loaded.hmac_key == b"s" * 20
    assert loaded.email_provider_rules
    plain = NormalizationSettings.from_env({"OMNISTITCH_BLOCKLIST_FILE": str(blocklist)})
    assert rejected("email", "Boss@shop.ru", plain) is RejectReason.BLOCKED_VALUE
    assert rejected("cookie_id", "n.a.", plain) is RejectReason.BLOCKED_VALUE
    assert rejected("phone", "+7 495 123-45-67", plain) is RejectReason.BLOCKED_VALUE
    assert rejected("email", "test@test.com", plain) is RejectReason.BLOCKED_VALUE  # defaults kept
    assert normalize_identifier("phone", "+7 916 123 45 67", plain) == "+79161234567"


def test_from_env_defaults_and_key_file(tmp_path: Path) -> None:
    assert NormalizationSettings.from_env({}) == NormalizationSettings()
    secret = tmp_path / "key"
    secret.write_bytes(b"0123456789abcdef0123\n")
    assert NormalizationSettings.from_env({"OMNISTITCH_HMAC_KEY_FILE": str(secret)}).hmac_key == (
        b"0123456789abcdef0123"
    )


def test_json_blocklist(tmp_path: Path) -> None:
    blocklist = tmp_path / "blocked.json"
    blocklist.write_text(json.dumps({"values": {"customer_id": ["CRM-0"]}}), encoding="utf-8")
    loaded = NormalizationSettings.from_env({"OMNISTITCH_BLOCKLIST_FILE": str(blocklist)})
    assert rejected("customer_id", "CRM-0", loaded) is RejectReason.BLOCKED_VALUE


@pytest.mark.parametrize(
    "env",
    [
        {"OMNISTITCH_DEFAULT_REGION": "XX"},
        {"OMNISTITCH_HMAC_KEY": "short"},
        {"OMNISTITCH_HMAC_KEY": "s" * 20, "OMNISTITCH_HMAC_KEY_FILE": "/nonexistent"},
        {"OMNISTITCH_HMAC_KEY_FILE": "/nonexistent/key"},
        {"OMNISTITCH_EMAIL_PROVIDER_RULES": "maybe"},
        {"OMNISTITCH_BLOCKLIST_FILE": "/nonexistent/blocked.toml"},
    ],
)
def test_from_env_refuses_bad_configuration(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        NormalizationSettings.from_env(env)


@pytest.mark.parametrize(
    "content",
    ['[values]\nemail = "not-a-list"\n', '[patterns]\nphone = ["("]\n', "[other]\n", "not toml ["],
)
def test_bad_blocklist_files_are_config_errors(tmp_path: Path, content: str) -> None:
    blocklist = tmp_path / "blocked.toml"
    blocklist.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError):
        NormalizationSettings.from_env({"OMNISTITCH_BLOCKLIST_FILE": str(blocklist)})


@settings(max_examples=300, deadline=None)
@given(type_=st.sampled_from(DEFAULT_TYPES), raw=st.text(max_size=40))
def test_any_text_normalises_or_is_rejected_and_canonical_form_is_a_fixed_point(type_: str, raw: str) -> None:
    try:
        value = normalize_identifier(type_, raw)
    except IdentifierRejected:
        return
    assert value == value.strip() and value
    assert normalize_identifier(type_, value) == value


@settings(max_examples=200, deadline=None)
@given(digits=st.text(alphabet="0123456789", min_size=10, max_size=10), style=st.integers(0, 3))
def test_any_russian_mobile_spelling_gives_the_same_key(digits: str, style: int) -> None:
    national = "9" + digits[1:]
    spelled = [
        f"+7{national}",
        f"8{national}",
        f"8 ({national[:3]}) {national[3:6]}-{national[6:8]}-{national[8:]}",
        f"+7 {national[:3]} {national[3:]}",
    ][style]
    try:
        expected = normalize_identifier("phone", f"+7{national}")
    except IdentifierRejected as exc:
        assert rejected("phone", spelled) is exc.reason
        return
    assert normalize_identifier("phone", spelled) == expected
