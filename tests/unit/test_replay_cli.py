"""The replay / export / explain commands, driven through the real typer app as evaluators do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

import streams.replay as replay_module
from streams.cli import app

runner = CliRunner()


def envelope(
    event_id: str, at: str, *ids: tuple[str, str, bool], type: str = "page_view", **kw: Any
) -> bytes:
    body: dict[str, Any] = {
        "schema_version": 1,
        "event_id": event_id,
        "source": kw.get("source", "web"),
        "channel": kw.get("channel", "web"),
        "type": type,
        "occurred_at": f"2026-11-01T{at}+03:00",
        "identifiers": [{"type": t, "value": v, "verified": ver} for t, v, ver in ids],
        "attributes": kw.get("attributes", {"url": "https://pizza.example/"}),
    }
    return orjson.dumps(body)


@pytest.fixture
def kolya_file(tmp_path: Path) -> Path:
    lines = [
        envelope("e1", "10:00:00", ("cookie_id", "c-77", False), ("email", "Kolya@Mail.ru", False)),
        envelope(
            "e2",
            "10:05:00",
            ("phone", "+7 916 123 45 67", False),
            ("device_id", "dev-kolya-1", False),
            source="app",
            channel="app",
            attributes={"screen": "cart"},
        ),
        envelope(
            "e3",
            "10:06:00",
            ("phone", "+79161234567", True),  # the app's profile screen: both confirmed by the user
            ("email", "kolya@mail.ru", True),
            source="app",
            channel="app",
            attributes={"screen": "profile"},
        ),
        b"{not json",
        envelope("e4", "11:00:00", ("cookie_id", "c-other", False)),
        envelope("e5", "12:00:00", ("cookie_id", "c-other", False), type="erase", attributes={}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_replay_writes_final_profiles_and_counts_invalid_lines(kolya_file: Path, tmp_path: Path) -> None:
    out, res = tmp_path / "assign.jsonl", tmp_path / "resolved.jsonl"
    result = runner.invoke(
        app,
        [
            "replay",
            str(kolya_file),
            "--state",
            str(tmp_path / "state"),
            "--assignments",
            str(out),
            "--resolved",
            str(res),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "invalid lines" in result.output and "not_json" in result.output
    rows = read(out)
    assert [r["event_id"] for r in rows] == ["e1", "e2", "e3", "e4", "e5"]
    by_id = {r["event_id"]: r["profile_id"] for r in rows}
    # e2 started its own profile (phone + device) and was merged into Kolya's older one by e3
    assert by_id["e1"] == by_id["e2"] == by_id["e3"] is not None
    assert by_id["e4"] is None and by_id["e5"] is None  # erased, and the erase event itself
    resolved = read(res)
    assert {r["event_id"] for r in resolved} == {"e1", "e2", "e3"}
    assert all(r["profile_id"] == by_id["e1"] for r in resolved)

    exported = runner.invoke(
        app, ["export", "--state", str(tmp_path / "state"), "--out", str(tmp_path / "x.jsonl")]
    )
    assert exported.exit_code == 0, exported.output
    ids = {r["identifier"]: r["profile_id"] for r in read(tmp_path / "x.jsonl")}
    assert set(ids) == {
        "cookie_id:c-77",
        "email:kolya@mail.ru",
        "phone:+79161234567",
        "device_id:dev-kolya-1",
    }
    assert set(ids.values()) == {by_id["e1"]}

    why = runner.invoke(app, ["explain", "--state", str(tmp_path / "state"), "device_id:dev-kolya-1"])
    assert why.exit_code == 0, why.output
    assert "by event e2" in why.output and "merged into" in why.output and "e3" in why.output
    prof = runner.invoke(app, ["explain", "--state", str(tmp_path / "state"), by_id["e1"], "--json"])
    assert prof.exit_code == 0 and orjson.loads(prof.stdout)["status"] == "active"
    missing = runner.invoke(app, ["explain", "--state", str(tmp_path / "state"), "email:nobody@x.com"])
    assert missing.exit_code == 1


def test_replay_is_deterministic_across_state_dirs(kolya_file: Path, tmp_path: Path) -> None:
    outs = []
    for n in range(2):
        out = tmp_path / f"a{n}.jsonl"
        r = runner.invoke(
            app, ["replay", str(kolya_file), "--state", str(tmp_path / f"s{n}"), "--assignments", str(out)]
        )
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_replay_rules_file_from_env_and_bad_rules(kolya_file: Path, tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text("[protection]\nenabled = false\n")
    r = runner.invoke(
        app,
        [
            "replay",
            str(kolya_file),
            "--state",
            str(tmp_path / "s"),
            "--assignments",
            str(tmp_path / "a.jsonl"),
        ],
        env={"OMNISTITCH_RULES_FILE": str(rules)},
    )
    assert r.exit_code == 0, r.output
    rules.write_text("[protection]\nenabled = 'yes'\n")
    bad = runner.invoke(
        app,
        [
            "replay",
            str(kolya_file),
            "--state",
            str(tmp_path / "s2"),
            "--assignments",
            str(tmp_path / "b.jsonl"),
            "--rules",
            str(rules),
        ],
    )
    assert bad.exit_code == 2 and "protection.enabled" in bad.output


def test_parallel_validation_gives_the_same_output_as_in_process(
    kolya_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # blocks of 2 lines across 2 worker processes: results must come back in input order, events intact
    monkeypatch.setattr(replay_module, "_CHUNK_LINES", 2)
    runs = []
    for workers in (0, 2):
        out, res = tmp_path / f"a{workers}.jsonl", tmp_path / f"r{workers}.jsonl"
        summary = replay_module.replay(
            [kolya_file], tmp_path / f"s{workers}", out, resolved=res, workers=workers
        )
        resolved = [{k: v for k, v in r.items() if k != "resolved_at_ms"} for r in read(res)]
        runs.append((out.read_bytes(), resolved, summary.lines, summary.valid, dict(summary.invalid)))
    assert runs[0] == runs[1]
    assert runs[1][2:] == (6, 5, {"not_json": 1})


def test_replay_workers_env_must_be_a_number(kolya_file: Path, tmp_path: Path) -> None:
    args = ["replay", str(kolya_file), "--state", str(tmp_path / "s"), "--assignments", str(tmp_path / "a")]
    r = runner.invoke(app, args, env={"OMNISTITCH_REPLAY_WORKERS": "many"})
    assert r.exit_code == 2
    assert "OMNISTITCH_REPLAY_WORKERS" in r.output
    r = runner.invoke(app, args, env={"OMNISTITCH_REPLAY_WORKERS": "1"})
    assert r.exit_code == 0, r.output
    assert len(read(tmp_path / "a")) == 5


def test_anonymous_visits_on_a_shared_tablet_go_to_whoever_logged_in_that_session(tmp_path: Path) -> None:
    tablet = ("device_id", "tab-1", True)
    lines = [
        envelope("f1", "10:00:00", tablet, ("customer_id", "anna", True), type="login"),
        envelope("f2", "10:02:00", tablet),  # Anna browsing after her login
        envelope("f4", "14:50:00", tablet),  # Boris browsing before his login
        envelope("f3", "15:00:00", tablet, ("customer_id", "boris", True), type="login"),  # now shared
        envelope("f5", "20:00:00", tablet),  # nobody identified on the tablet around then
    ]
    src = tmp_path / "family.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "a.jsonl"
    args = ["replay", str(src), "--state", str(tmp_path / "s"), "--assignments", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    got = {r["event_id"]: r["profile_id"] for r in read(out)}
    assert got["f2"] == got["f1"] and got["f4"] == got["f3"] != got["f1"]
    assert got["f5"] is None
    rules = tmp_path / "r.toml"
    rules.write_text("[shared_devices]\nsession_minutes = 0\n")
    out0 = tmp_path / "a0.jsonl"
    args = ["replay", str(src), "--state", str(tmp_path / "s0"), "--assignments", str(out0)]
    assert runner.invoke(app, [*args, "--rules", str(rules)]).exit_code == 0
    got0 = {r["event_id"]: r["profile_id"] for r in read(out0)}
    assert got0["f2"] is None and got0["f4"] is None and got0["f5"] is None
