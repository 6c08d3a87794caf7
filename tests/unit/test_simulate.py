"""The simulated population: valid, time-ordered, deterministic, truth kept apart, and really noisy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import orjson
import pytest
import typer
from typer.testing import CliRunner

from streams.cli import app
from streams.evaluate import baseline_assignments, read_truth, score
from streams.simulate import _FAKE_PHONES, SOURCES, SimConfig, config_with, simulate
from streams.validate import validate_event

SMALL = SimConfig(people=1500, days=10, seed=7)


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    simulate(SMALL, out)
    return out


def _events(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _utc(event: dict) -> float:
    return datetime.fromisoformat(event["occurred_at"]).timestamp()


def test_every_event_is_valid_envelope_v1(population: Path) -> None:
    for line in (population / "all.jsonl").read_bytes().splitlines():
        validate_event(line)  # raises InvalidEvent on the first bad one


def test_files_are_time_ordered_and_per_source_files_partition_all(population: Path) -> None:
    merged = _events(population / "all.jsonl")
    times = [_utc(e) for e in merged]
    assert times == sorted(times)
    per_source: Counter[bytes] = Counter()
    for source in SOURCES:
        events = _events(population / f"raw.{source}.jsonl")
        assert all(e["source"] == source for e in events)
        source_times = [_utc(e) for e in events]
        assert source_times == sorted(source_times)
        per_source.update((population / f"raw.{source}.jsonl").read_bytes().splitlines())
    assert per_source == Counter((population / "all.jsonl").read_bytes().splitlines())


def test_truth_is_complete_and_never_inside_events(population: Path) -> None:
    truth = read_truth(population / "truth.jsonl")
    raw = (population / "all.jsonl").read_bytes()
    ids = {e["event_id"] for e in _events(population / "all.jsonl")}
    assert set(truth) == ids
    assert b"person_id" not in raw
    assert not re.search(rb"p\d{7}", raw)  # person ids never leak into events
    assert len(set(truth.values())) > SMALL.people * 0.8


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, population: Path) -> None:
    simulate(SMALL, tmp_path / "again")
    assert (tmp_path / "again" / "all.jsonl").read_bytes() == (population / "all.jsonl").read_bytes()
    assert (tmp_path / "again" / "truth.jsonl").read_bytes() == (population / "truth.jsonl").read_bytes()
    simulate(SimConfig(people=1500, days=10, seed=8), tmp_path / "other")
    assert (tmp_path / "other" / "all.jsonl").read_bytes() != (population / "all.jsonl").read_bytes()


def test_every_channel_and_the_main_behaviours_appear(population: Path) -> None:
    events = _events(population / "all.jsonl")
    assert {e["source"] for e in events} == set(SOURCES)
    types = Counter(e["type"] for e in events)
    for expected in (
        "page_view",
        "product_view",
        "cart_updated",
        "order_placed",
        "store_purchase",
        "login",
        "call",
        "message_sent",
        "message_received",
        "email_opened",
        "push_opened",
        "consent_changed",
        "identify",
    ):
        assert types[expected] > 0, expected


def test_noise_is_present(population: Path) -> None:
    events = _events(population / "all.jsonl")
    phones = [i["value"] for e in events for i in e["identifiers"] if i["type"] == "phone"]
    spellings = {
        "8 916 123-45-67": r"^8 \d{3} \d{3}-\d\d-\d\d$",
        "+7 (916) 123-45-67": r"^\+7 \(\d{3}\) \d{3}-\d\d-\d\d$",
        "79161234567": r"^7\d{10}$",
        "+44 / +49 / +375 …": r"^\+(44|49|375|998|90) ",
    }
    for name, pattern in spellings.items():
        assert any(re.search(pattern, p) for p in phones), name
    assert set(phones) & set(_FAKE_PHONES)  # "+70000000000" and friends, typed by cashiers
    assert any(not i["verified"] for e in events for i in e["identifiers"] if i["type"] == "email")
    # identifiers shared by different true people (households, placeholders, recycled numbers)
    truth = read_truth(population / "truth.jsonl")
    owners: dict[str, set[str]] = defaultdict(set)
    for e in events:
        for ident in validate_event(orjson.dumps(e)).identifiers:
            owners[ident.key].add(truth[e["event_id"]])
    shared = Counter(k.split(":", 1)[0] for k, people in owners.items() if len(people) > 1)
    assert shared["phone"] > 0 and shared["device_id"] > 0 and shared["cookie_id"] > 0


def test_placeholders_join_many_people(tmp_path: Path) -> None:
    """A store's own phone typed for everyone: one identifier shared by many true people."""
    simulate(config_with(SimConfig(people=600, days=10, seed=5), ["placeholder_phone_rate=0.5"]), tmp_path)
    truth = read_truth(tmp_path / "truth.jsonl")
    owners: dict[str, set[str]] = defaultdict(set)
    for line in (tmp_path / "all.jsonl").read_bytes().splitlines():
        event = validate_event(line)
        for ident in event.identifiers:
            owners[ident.key].add(truth[event.event_id])
    assert max(len(p) for k, p in owners.items() if k.startswith("phone:")) >= 5


def test_email_typo_knob(tmp_path: Path) -> None:
    """Typed e-mails get typos: with the knob turned up they must show, with it at zero they must not."""
    typo_domains = (
        "mail.ry",
        "mial.ru",
        "mail.r",
        "maill.ru",
        "gmial.com",
        "gmail.con",
        "gmal.com",
        "gmail.co",
    )
    typo_domains += ("yandex.ri", "yandx.ru", "yadex.ru", "yandex.r")

    def typos(rate: str) -> int:
        out = tmp_path / rate
        simulate(config_with(SimConfig(people=600, days=10, seed=5), [f"email_typo_rate={rate}"]), out)
        events = _events(out / "all.jsonl")
        emails = [
            i["value"].strip().lower() for e in events for i in e["identifiers"] if i["type"] == "email"
        ]
        return sum(e.endswith(typo_domains) for e in emails)

    assert typos("0.9") > 0
    assert typos("0.0") == 0


def test_noise_knob_zero_gives_a_clean_population_naive_is_exact(tmp_path: Path, population: Path) -> None:
    """Without noise no identifier is shared by two people, so naive stitching makes no false merge."""
    clean = config_with(SimConfig(people=800, days=10, seed=3), noise=0.0)
    simulate(clean, tmp_path / "clean")
    truth = read_truth(tmp_path / "clean" / "truth.jsonl")
    naive, _, refused = baseline_assignments(tmp_path / "clean" / "all.jsonl", truth)
    assert refused == 0
    assert score(truth, naive).pairwise_precision == 1.0
    noisy_truth = read_truth(population / "truth.jsonl")
    noisy, _, _ = baseline_assignments(population / "all.jsonl", noisy_truth)
    assert score(noisy_truth, noisy).pairwise_precision < 0.99


def test_config_overrides() -> None:
    cfg = config_with(SimConfig(), ["placeholder_phone_rate=0.5", "days=7"], noise=2.0)
    assert cfg.placeholder_phone_rate == 0.5 and cfg.days == 7
    assert cfg.email_typo_rate == SimConfig().email_typo_rate * 2
    with pytest.raises(Exception, match="unknown knob"):
        config_with(SimConfig(), ["no_such_knob=1"])


def test_cli_simulate(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--people", "200", "--days", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "all.jsonl").stat().st_size > 0
    assert (tmp_path / "truth.jsonl").stat().st_size > 0
    assert (tmp_path / "raw.pos.jsonl").exists()


def test_same_seed_same_bytes_across_processes(tmp_path: Path) -> None:
    """The seed alone fixes the bytes: no set or hash order (PYTHONHASHSEED differs per process) leaks in."""
    digests = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"hash{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        args = ["simulate", "--people", "300", "--days", "10", "--seed", "1", "--out", str(out)]
        subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, check=True, capture_output=True)
        digests.append({p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))})
    assert digests[0].keys() == {f"raw.{s}.jsonl" for s in SOURCES} | {"all.jsonl", "truth.jsonl"}
    for name, data in digests[0].items():
        assert data == digests[1][name], name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("false", False),
        ("FALSE", False),
        ("no", False),
        ("0", False),
        ("True", True),
        ("yes", True),
        ("1", True),
    ],
)
def test_yes_no_knobs_are_parsed(raw: str, expected: bool) -> None:
    cfg = config_with(SimConfig(), [f"crm_import={raw}"])
    assert cfg.crm_import is expected


def test_crm_import_false_leaves_the_import_out(tmp_path: Path) -> None:
    """`--set crm_import=false` must switch the opening import off (the raw string 'false' is truthy)."""

    def imports(value: str) -> int:
        out = tmp_path / value
        args = [
            "simulate",
            "--people",
            "200",
            "--days",
            "3",
            "--out",
            str(out),
            "--set",
            f"crm_import={value}",
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return sum(
            b'"reason":"crm_import"' in line for line in (out / "raw.crm.jsonl").read_bytes().splitlines()
        )

    assert imports("true") > 0
    assert imports("false") == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("crm_import=maybe", "crm_import"),
        ("duplicate_rate=abc", "duplicate_rate"),
        ("people=many", "people"),
        ("days=", "days"),
    ],
)
def test_bad_knob_values_are_usage_errors(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(typer.BadParameter, match=message):
        config_with(SimConfig(), [override])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["simulate", "--people", "50", "--days", "1", "--out", str(out), "--set", override]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--days", "0"],
        ["--days", "-2"],
        ["--people", "0"],
        ["--people", "-5"],
        ["--set", "days=0"],
        ["--set", "people=-1"],
        ["--start", "notadate"],
        ["--set", "start=notadate"],
    ],
)
def test_bad_sizes_and_start_are_usage_errors_and_write_nothing(tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", "--people", "50", "--days", "2", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("cfg", [SimConfig(people=0), SimConfig(days=0), SimConfig(start="notadate")])
def test_simulate_refuses_a_bad_config_before_writing(tmp_path: Path, cfg: SimConfig) -> None:
    with pytest.raises(ValueError):
        simulate(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["file", "file/below"])
def test_out_on_a_regular_file_is_a_usage_error(tmp_path: Path, target: str) -> None:
    (tmp_path / "file").write_text("keep me")
    result = CliRunner().invoke(
        app, ["simulate", "--people", "50", "--days", "1", "--out", str(tmp_path / target)]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "--out" in result.output
    assert (tmp_path / "file").read_text() == "keep me"
