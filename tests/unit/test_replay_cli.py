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


def test_an_event_with_only_blocked_values_gets_a_null_assignment_line(tmp_path: Path) -> None:
    """Issue 4: one line per valid event, `null` when none of its identifiers links, "e.g. only blocked or
    generic values" (0.3.3 counted it invalid, `no_usable_identifier`, and wrote no line)."""
    src = tmp_path / "blocked.jsonl"
    src.write_bytes(
        envelope("b1", "10:00:00", ("email", "test@test.com", False), ("phone", "+7 000 000 00 00", False))
        + b"\n"
        + envelope("b2", "10:01:00", ("email", "anna@mail.ru", False))
        + b"\n"
        + b'{"schema_version": 1, "event_id": "b3", "identifiers": []}\n'
    )
    out = tmp_path / "a.jsonl"
    result = runner.invoke(
        app, ["replay", str(src), "--state", str(tmp_path / "s"), "--assignments", str(out)]
    )
    assert result.exit_code == 0, result.output
    by_id = {r["event_id"]: r["profile_id"] for r in read(out)}
    assert by_id["b1"] is None and by_id["b2"] is not None and "b3" not in by_id  # b3 breaks the contract
    assert "schema_violation" in result.output and "no_usable_identifier" not in result.output


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


# --- split / erase on a replay state ---

KOLYA = ("cookie_id:c-77", "email:kolya@mail.ru", "phone:+79161234567", "device_id:dev-kolya-1")


def replayed(src: Path, state: Path, out: Path) -> dict[str, str | None]:
    """Replay `src` into `state` through the CLI; event id → final profile id."""
    r = runner.invoke(app, ["replay", str(src), "--state", str(state), "--assignments", str(out)])
    assert r.exit_code == 0, r.output
    return {row["event_id"]: row["profile_id"] for row in read(out)}


def exported(state: Path) -> dict[str, str]:
    r = runner.invoke(app, ["export", "--state", str(state)])
    assert r.exit_code == 0, r.output
    return {row["identifier"]: row["profile_id"] for row in map(orjson.loads, r.stdout.splitlines())}


def state_bytes(state: Path) -> bytes:
    """Every file of the state directory, concatenated: what an erased value must no longer be found in."""
    return b"".join(p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file())


def test_split_moves_identifiers_to_a_new_profile_and_later_replays_keep_them_apart(
    kolya_file: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    kolya = replayed(kolya_file, state, tmp_path / "a.jsonl")["e1"]
    assert kolya is not None
    r = runner.invoke(
        app,
        [
            "split",
            "--state",
            str(state),
            kolya,
            "phone:+79161234567",
            "device_id:dev-kolya-1",
            "--reason",
            "his sister's phone",
        ],
    )
    assert r.exit_code == 0, r.output
    new_id, *lines = r.stdout.splitlines()
    assert new_id != kolya and len(new_id) == len(kolya)
    split, created = map(orjson.loads, lines)
    assert split["kind"] == "profile_split" and split["profile_id"] == kolya
    assert split["new_profiles"] == [new_id] and split["reason"] == "his sister's phone"
    assert split["seq"] > 1 and split["cause_event_id"] is None
    assert created["kind"] == "profile_created" and created["profile_id"] == new_id and created["seq"] == 1
    assert created["identifiers"] == ["device_id:dev-kolya-1", "phone:+79161234567"]
    assert exported(state) == {
        "cookie_id:c-77": kolya,
        "email:kolya@mail.ru": kolya,
        "phone:+79161234567": new_id,
        "device_id:dev-kolya-1": new_id,
    }
    why = runner.invoke(app, ["explain", "--state", str(state), "phone:+79161234567"])
    assert why.exit_code == 0, why.output
    assert f"split off {kolya} into {new_id} (his sister's phone)" in why.stdout

    # the state goes on: her app events follow the device, and an event naming both sides merges nothing
    later = tmp_path / "later.jsonl"
    later.write_bytes(
        envelope("g1", "13:00:00", ("device_id", "dev-kolya-1", False), source="app", channel="app")
        + b"\n"
        + envelope("g2", "13:05:00", ("phone", "+79161234567", True), ("email", "kolya@mail.ru", True))
        + b"\n"
        + envelope("g3", "13:10:00", ("cookie_id", "c-77", False))
        + b"\n"
    )
    got = replayed(later, state, tmp_path / "b.jsonl")
    assert got["g1"] == new_id and got["g3"] == kolya and got["g2"] in (kolya, new_id)
    assert exported(state) == {
        "cookie_id:c-77": kolya,
        "email:kolya@mail.ru": kolya,
        "phone:+79161234567": new_id,
        "device_id:dev-kolya-1": new_id,
    }
    refused = runner.invoke(app, ["explain", "--state", str(state), "email:kolya@mail.ru", "--json"])
    assert refused.exit_code == 0, refused.output
    assert "split_apart" in {r["rule"] for r in orjson.loads(refused.stdout)["refusals"]}


# Values sharing no four bytes with anything else stored. RocksDB compresses its table files (Snappy), which
# writes the first copy of such a value in each block literally except perhaps a few bytes at each end (joined
# to a match with the text around it): a byte search for the middle finds any copy left in the files.
QUIET = {
    "cookie_id": "ck-9fh3kq2wbx7",
    "email": "qz8vw.l2@jx4t.ru",
    "customer_id": "mr-5gk8rzy6e1h",
    "device_id": "dv-7yq2xw5pa3n",
}


def traces(state: Path) -> list[str]:
    """The QUIET values whose middle is still somewhere in the state directory's files."""
    data = state_bytes(state)
    return [v for v in QUIET.values() if v[3:-3].encode() in data]


@pytest.fixture
def quiet_file(tmp_path: Path) -> Path:
    c, e, u, d = (QUIET[t] for t in ("cookie_id", "email", "customer_id", "device_id"))
    path = tmp_path / "quiet.jsonl"
    path.write_bytes(
        envelope("x1", "10:00:00", ("cookie_id", c, False), ("email", e, False))
        + b"\n"
        + envelope(
            "x2",
            "10:05:00",
            ("email", e, True),
            ("customer_id", u, True),
            ("device_id", d, False),
            type="login",
            source="app",
            channel="app",
            attributes={},
        )
        + b"\n"
    )
    return path


def test_erase_an_identifier_then_a_profile_removes_them_from_export_and_from_the_state_files(
    quiet_file: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    person = replayed(quiet_file, state, tmp_path / "a.jsonl")["x1"]
    assert person is not None
    assert exported(state) == {f"{t}:{v}": person for t, v in QUIET.items()}
    assert traces(state) == list(QUIET.values())

    one = runner.invoke(app, ["erase", "--state", str(state), f"cookie_id:{QUIET['cookie_id']}"])
    assert one.exit_code == 0, one.output
    assert one.stdout == ""  # the person keeps other identifiers: no identity change
    assert f"erased identifier cookie_id:{QUIET['cookie_id']} from profile {person}" in one.stderr
    assert exported(state) == {f"{t}:{v}": person for t, v in QUIET.items() if t != "cookie_id"}
    assert traces(state) == [v for t, v in QUIET.items() if t != "cookie_id"]

    whole = runner.invoke(app, ["erase", "--state", str(state), person])
    assert whole.exit_code == 0, whole.output
    (record,) = map(orjson.loads, whole.stdout.splitlines())
    assert record["kind"] == "profile_erased" and record["profile_id"] == person
    assert exported(state) == {}
    assert traces(state) == []
    again = runner.invoke(app, ["erase", "--state", str(state), person])
    assert again.exit_code == 0 and again.stdout == "" and "already erased" in again.stderr

    # the state goes on: the same e-mail later is a new person, the erased profile id is not reused
    later = tmp_path / "later.jsonl"
    later.write_bytes(envelope("h1", "14:00:00", ("email", QUIET["email"], True)) + b"\n")
    fresh = replayed(later, state, tmp_path / "b.jsonl")["h1"]
    assert fresh is not None and fresh != person
    assert exported(state) == {f"email:{QUIET['email']}": fresh}


def test_an_erase_event_in_the_input_leaves_no_copy_in_the_state_files(
    quiet_file: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    replayed(quiet_file, state, tmp_path / "a.jsonl")
    assert traces(state) == list(QUIET.values())
    erase = tmp_path / "erase.jsonl"
    erase.write_bytes(
        envelope("z1", "12:00:00", ("email", QUIET["email"], True), type="erase", attributes={}) + b"\n"
    )
    assert replayed(erase, state, tmp_path / "b.jsonl") == {"z1": None}
    assert exported(state) == {}
    assert traces(state) == []


def test_an_erase_event_for_a_value_only_a_refusal_names_also_compacts(tmp_path: Path) -> None:
    state, src = tmp_path / "state", tmp_path / "in.jsonl"
    src.write_bytes(
        envelope("r1", "10:00:00", ("customer_id", "cu-1", True), ("phone", "+79160000001", False))
        + b"\n"
        + envelope("r2", "10:01:00", ("customer_id", "cu-1", True), ("customer_id", "czq8secret7", True))
        + b"\n"  # the second customer id is refused (one per profile) and owned by no profile
    )
    replayed(src, state, tmp_path / "a.jsonl")
    assert b"q8secr" in state_bytes(state)
    erase = tmp_path / "erase.jsonl"
    erase.write_bytes(
        envelope("z1", "12:00:00", ("customer_id", "czq8secret7", True), type="erase", attributes={})
    )
    replayed(erase, state, tmp_path / "b.jsonl")
    assert b"q8secr" not in state_bytes(state)


def test_erase_after_a_split_scrubs_the_refusals_and_history_naming_the_value(
    quiet_file: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    person = replayed(quiet_file, state, tmp_path / "a.jsonl")["x1"]
    assert person is not None
    device = f"device_id:{QUIET['device_id']}"
    split = runner.invoke(app, ["split", "--state", str(state), person, device])
    assert split.exit_code == 0, split.output
    tablet = split.stdout.split()[0]
    later = tmp_path / "later.jsonl"
    later.write_bytes(
        envelope(
            "g1",
            "13:00:00",
            ("device_id", QUIET["device_id"], True),
            ("customer_id", QUIET["customer_id"], True),
        )
        + b"\n"
    )
    replayed(later, state, tmp_path / "b.jsonl")
    assert QUIET["device_id"] in traces(state)
    refusals = runner.invoke(app, ["explain", "--state", str(state), device, "--json"])
    assert [r["rule"] for r in orjson.loads(refusals.stdout)["refusals"]] == ["split_apart"]

    r = runner.invoke(app, ["erase", "--state", str(state), device])
    assert r.exit_code == 0, r.output
    (record,) = map(orjson.loads, r.stdout.splitlines())  # its profile held nothing else
    assert record["kind"] == "profile_erased" and record["profile_id"] == tablet
    assert exported(state) == {f"{t}:{v}": person for t, v in QUIET.items() if t != "device_id"}
    assert traces(state) == [v for t, v in QUIET.items() if t != "device_id"]
    why = runner.invoke(app, ["explain", "--state", str(state), person])
    assert why.exit_code == 0 and QUIET["device_id"] not in why.stdout
    gone = runner.invoke(app, ["explain", "--state", str(state), device])
    assert gone.exit_code == 1


def test_split_and_erase_errors_exit_2_and_leave_the_state_as_it_was(
    kolya_file: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    kolya = replayed(kolya_file, state, tmp_path / "a.jsonl")["e1"]
    assert kolya is not None
    before = exported(state)
    cases = [
        (
            ["split", "--state", str(state), "01NOSUCHPROFILE0000000000", "email:kolya@mail.ru"],
            "no live profile",
        ),
        (["split", "--state", str(state), kolya, "email:somebody@else.com"], "not in profile"),
        (["split", "--state", str(state), kolya, *KOLYA], "every identifier"),
        (["split", "--state", str(tmp_path / "nope"), kolya, "email:kolya@mail.ru"], "no state directory"),
        (["erase", "--state", str(state), "email:somebody@else.com"], "unknown profile or identifier"),
        (["erase", "--state", str(state), "01NOSUCHPROFILE0000000000"], "unknown profile or identifier"),
        (["erase", "--state", str(tmp_path / "nope"), kolya], "no state directory"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and r.stdout == "", (args, r.output)
    assert not (tmp_path / "nope").exists()
    assert exported(state) == before
