"""Accuracy metrics: O(n) contingency sums must equal brute-force pair counting; baselines and CLI."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from streams.cli import app
from streams.evaluate import assignments_from_resolved, baseline_assignments, read_assignments, score
from streams.normalize import NormalizationSettings


@pytest.fixture(autouse=True)
def _no_normalisation_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline reads OMNISTITCH_* by default: tests start from none, whatever the shell exports."""
    import os

    for name in list(os.environ):
        if name.startswith("OMNISTITCH_"):
            monkeypatch.delenv(name)


def _brute(truth: dict[str, str], pred: dict[str, str | None]) -> tuple[int, int, int, float, float]:
    labels = {e: (pred.get(e) or f"single-{e}") for e in truth}
    events = sorted(truth)
    correct = predicted = true_pairs = 0
    for a, b in itertools.combinations(events, 2):
        same_pred = labels[a] == labels[b]
        same_true = truth[a] == truth[b]
        correct += same_pred and same_true
        predicted += same_pred
        true_pairs += same_true
    bp = sum(
        sum(1 for f in events if labels[f] == labels[e] and truth[f] == truth[e])
        / sum(1 for f in events if labels[f] == labels[e])
        for e in events
    ) / len(events)
    br = sum(
        sum(1 for f in events if labels[f] == labels[e] and truth[f] == truth[e])
        / sum(1 for f in events if truth[f] == truth[e])
        for e in events
    ) / len(events)
    return correct, predicted, true_pairs, bp, br


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(0, 5))),
        min_size=1,
        max_size=25,
    )
)
def test_contingency_counts_equal_brute_force(rows: list[tuple[int, int | None]]) -> None:
    truth = {f"e{i}": f"p{t}" for i, (t, _) in enumerate(rows)}
    pred = {f"e{i}": (None if p is None else f"c{p}") for i, (_, p) in enumerate(rows)}
    s = score(truth, pred)
    correct, predicted, true_pairs, bp, br = _brute(truth, pred)
    assert (s.correct_pairs, s.predicted_pairs, s.true_pairs) == (correct, predicted, true_pairs)
    assert s.bcubed_precision == pytest.approx(bp)
    assert s.bcubed_recall == pytest.approx(br)


def test_hand_computed_example() -> None:
    # person A: a1 a2 a3 ; person B: b1 b2 ; profile X = {a1, a2, b1}, Y = {a3}, b2 unassigned
    truth = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B"}
    pred: dict[str, str | None] = {"a1": "X", "a2": "X", "b1": "X", "a3": "Y"}
    s = score(truth, pred)
    assert s.correct_pairs == 1 and s.predicted_pairs == 3 and s.true_pairs == 4
    assert s.pairwise_precision == pytest.approx(1 / 3)
    assert s.pairwise_recall == pytest.approx(1 / 4)
    assert s.over_merged_profiles == 1
    assert s.split_people == 2
    assert (s.largest_profile_events, s.largest_profile_people) == (3, 2)
    assert s.unassigned_events == 1
    assert s.profiles == 3


def test_perfect_and_degenerate_stitchings() -> None:
    truth = {f"e{i}": f"p{i % 3}" for i in range(12)}
    perfect = score(truth, {e: f"x-{p}" for e, p in truth.items()})
    assert perfect.pairwise_f1 == 1.0 and perfect.bcubed_f1 == 1.0 and perfect.over_merged_profiles == 0
    singletons = score(truth, {})
    assert singletons.pairwise_precision == 1.0 and singletons.pairwise_recall == 0.0
    everything = score(truth, dict.fromkeys(truth, "giant"))
    assert everything.pairwise_recall == 1.0
    assert everything.pairwise_precision == pytest.approx(3 * 6 / 66)
    assert everything.largest_profile_people == 3


def test_assignments_from_resolved_follows_merge_chains() -> None:
    resolved = [
        {"event_id": "e1", "profile_id": "P1"},
        {"event_id": "e2", "profile_id": "P2"},
        {"event_id": "e3", "profile_id": "P3"},
        {"event_id": "e4", "profile_id": None},
        {"event_id": "e5", "profile_id": "C1"},
    ]
    changes = [
        {"kind": "profiles_merged", "profile_id": "P2", "survivor": "P2", "merged": ["P1"]},
        {"kind": "profiles_merged", "profile_id": "P3", "survivor": "P3", "merged": ["P2"]},
        {"kind": "identifiers_attached", "profile_id": "P3", "identifiers": ["email:a@b.ru"]},
        {"kind": "profiles_merged", "profile_id": "C2", "survivor": "C2", "merged": ["C1"]},
        {"kind": "profiles_merged", "profile_id": "C1", "survivor": "C1", "merged": ["C2"]},  # cycle
    ]
    final = assignments_from_resolved(resolved, changes)
    assert final["e1"] == final["e2"] == final["e3"] == "P3"
    assert final["e4"] is None
    assert final["e5"] in {"C1", "C2"}


def test_assignments_from_resolved_unattributes_events_anchored_by_a_value_later_found_generic() -> None:
    resolved = [
        {"event_id": "call", "profile_id": "P1", "anchor": "phone:+74950000000"},
        {"event_id": "login", "profile_id": "P1", "anchor": "email:a@b.ru"},
    ]
    changes = [
        {
            "kind": "merge_refused",
            "profile_id": "P2",
            "rule": "generic_value",
            "identifiers": ["phone:+74950000000"],
        },
        {"kind": "merge_refused", "profile_id": "P1", "rule": "unique_id", "identifiers": ["email:a@b.ru"]},
    ]
    final = assignments_from_resolved(resolved, changes)
    assert final == {"call": None, "login": "P1"}  # as `replay --assignments` assigns them


def test_assignments_from_resolved_unattributes_events_anchored_by_a_device_later_found_shared() -> None:
    resolved = [
        {"event_id": "browse", "profile_id": "P1", "anchor": "device_id:tablet"},
        {"event_id": "login", "profile_id": "P1", "anchor": "customer_id:anna"},
    ]
    changes = [
        {
            "kind": "merge_refused",
            "profile_id": "P2",
            "rule": "shared_device",
            "identifiers": ["device_id:tablet"],
        }
    ]
    assert assignments_from_resolved(resolved, changes) == {"browse": None, "login": "P1"}


def test_assignments_from_resolved_gives_events_of_an_erased_profile_none() -> None:
    resolved = [
        {"event_id": "lost", "profile_id": "P1"},  # P1 merged into P2, then P2 erased
        {"event_id": "gone", "profile_id": "P2"},
        {"event_id": "alone", "profile_id": "E1"},  # erased, nothing after
        {"event_id": "kept", "profile_id": "Q1"},  # merged into Q2, never erased
        {"event_id": "again", "profile_id": "P9"},  # the same person after the erase: a fresh profile
    ]
    changes: list[dict[str, Any]] = [
        {"kind": "profiles_merged", "profile_id": "P2", "survivor": "P2", "merged": ["P1"]},
        {"kind": "profiles_merged", "profile_id": "Q2", "survivor": "Q2", "merged": ["Q1"]},
        {"kind": "profile_erased", "profile_id": "P2", "reason": "gdpr"},
        {"kind": "profile_created", "profile_id": "P9", "identifiers": ["phone:+79161234567"]},
        {"kind": "profile_erased", "profile_id": "E1", "reason": None},
    ]
    final = assignments_from_resolved(resolved, changes)
    assert final == {"lost": None, "gone": None, "alone": None, "kept": "Q2", "again": "P9"}


def test_assignments_from_resolved_follow_a_split_off_anchor_as_the_replay_does() -> None:
    """Kolya's profile P held his wife's laptop cookie; the operator split it off to N, which then merged
    into her older profile W. Her past visits (anchored by the cookie) end in W, his stay in P."""
    resolved = [
        {"event_id": "her-visit", "profile_id": "P", "anchor": "cookie_id:laptop"},
        {"event_id": "his-order", "profile_id": "P", "anchor": "phone:+79160000001"},
        {"event_id": "before-merge", "profile_id": "P0", "anchor": "cookie_id:laptop"},  # P0 merged into P
    ]
    changes: list[dict[str, Any]] = [
        {"kind": "profiles_merged", "profile_id": "P", "survivor": "P", "merged": ["P0"]},
        {
            "kind": "profile_split",
            "profile_id": "P",
            "new_profiles": ["N"],
            "identifiers": ["cookie_id:laptop"],
        },
        {"kind": "profiles_merged", "profile_id": "W", "survivor": "W", "merged": ["N"]},
    ]
    final = assignments_from_resolved(resolved, changes)
    assert final == {"her-visit": "W", "his-order": "P", "before-merge": "W"}
    # a split of the split-off profile, read first (another partition of identity.changes): followed anyway
    chained = [
        {
            "kind": "profile_split",
            "profile_id": "N",
            "new_profiles": ["N2"],
            "identifiers": ["cookie_id:laptop"],
        },
        {
            "kind": "profile_split",
            "profile_id": "P",
            "new_profiles": ["N"],
            "identifiers": ["cookie_id:laptop"],
        },
    ]
    assert assignments_from_resolved(resolved[:1], chained) == {"her-visit": "N2"}


def _event(event_id: str, *identifiers: tuple[str, str]) -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "event_id": event_id,
            "source": "pos",
            "channel": "store",
            "type": "store_purchase",
            "occurred_at": "2026-11-24T10:00:00+03:00",
            "identifiers": [{"type": t, "value": v} for t, v in identifiers],
            "attributes": {"store_id": "msk-1", "order_id": event_id, "total": "1.00", "currency": "RUB"},
        }
    )


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    lines = [
        _event("e1", ("phone", "8 916 123-45-67"), ("loyalty_card", "2000 1234 5678")),
        _event("e2", ("phone", "+7 (916) 123 45 67")),  # same phone, other spelling
        _event("e3", ("phone", "+7 (916) 123 45 67"), ("loyalty_card", "200099998888")),  # the household
        _event("e4", ("email", "Ann@Mail.ru")),
        _event("e4", ("email", "Ann@Mail.ru")),  # duplicate delivery
        b'{"not": "an event"}',
    ]
    (tmp_path / "all.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    truth = [("e1", "A"), ("e2", "A"), ("e3", "B"), ("e4", "C")]
    (tmp_path / "truth.jsonl").write_bytes(
        b"".join(orjson.dumps({"event_id": e, "person_id": p}) + b"\n" for e, p in truth)
    )
    (tmp_path / "assign.jsonl").write_bytes(
        b"".join(
            orjson.dumps({"event_id": e, "profile_id": p}) + b"\n"
            for e, p in [("e1", "X"), ("e2", "X"), ("e3", None), ("e4", "Z")]
        )
    )
    return tmp_path


def test_naive_baseline_joins_every_shared_identifier_and_ceiling_does_not(tiny: Path) -> None:
    truth = {"e1": "A", "e2": "A", "e3": "B", "e4": "C"}
    naive, ceiling, refused = baseline_assignments(tiny / "all.jsonl", truth)
    assert refused == 1
    assert naive["e1"] == naive["e2"] == naive["e3"] != naive["e4"]
    assert ceiling is not None
    assert ceiling["e1"] == ceiling["e2"] != ceiling["e3"]
    assert score(truth, ceiling).pairwise_precision == 1.0
    assert score(truth, naive).over_merged_profiles == 1


def test_cli_evaluate_json_and_table(tiny: Path) -> None:
    runner = CliRunner()
    args = ["evaluate", "--truth", str(tiny / "truth.jsonl"), "--events", str(tiny / "all.jsonl")]
    result = runner.invoke(app, [*args, "--assignments", str(tiny / "assign.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    data = orjson.loads(result.stdout)
    assert data["assignments"]["pairwise_precision"] == 1.0
    assert data["assignments"]["pairwise_recall"] == 1.0
    assert data["naive_baseline"]["over_merged_profiles"] == 1
    assert data["identifier_ceiling"]["pairwise_precision"] == 1.0
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "naive baseline" in table.stdout and "pairwise F1" in table.stdout
    assert read_assignments(tiny / "assign.jsonl")["e3"] is None


def test_baseline_validates_with_the_environments_settings(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocklist = tiny / "blocked.toml"
    blocklist.write_text('[values]\nphone = ["+79161234567"]\n', encoding="utf-8")
    monkeypatch.setenv("OMNISTITCH_BLOCKLIST_FILE", str(blocklist))
    naive, _, refused = baseline_assignments(tiny / "all.jsonl")
    assert refused == 2  # e2 had nothing but the blocked phone, as `validate` and `replay` say
    assert "e2" not in naive and naive["e1"] != naive["e3"]  # the blocked phone links no one
    pinned, _, refused = baseline_assignments(tiny / "all.jsonl", settings=NormalizationSettings())
    assert refused == 1 and pinned["e1"] == pinned["e2"] == pinned["e3"]
    monkeypatch.setenv("OMNISTITCH_MAX_EVENT_BYTES", "100")
    result = CliRunner().invoke(
        app, ["evaluate", "--truth", str(tiny / "truth.jsonl"), "--events", str(tiny / "all.jsonl"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["refused_by_validation"] == 6


def test_cli_evaluate_refuses_an_empty_truth(tiny: Path) -> None:
    empty = tiny / "empty.jsonl"
    empty.write_bytes(b"\n")
    for extra in (["--assignments", str(tiny / "assign.jsonl")], ["--events", str(tiny / "all.jsonl")]):
        result = CliRunner().invoke(app, ["evaluate", "--truth", str(empty), *extra, "--json"])
        assert result.exit_code == 2
        assert "no truth events" in result.output
        assert result.stdout == ""


def test_cli_evaluate_warns_when_the_assignments_match_no_truth_event(tiny: Path) -> None:
    other = tiny / "other.jsonl"
    other.write_bytes(orjson.dumps({"event_id": "x1", "profile_id": "X"}) + b"\n")
    result = CliRunner().invoke(
        app, ["evaluate", "--truth", str(tiny / "truth.jsonl"), "--assignments", str(other), "--json"]
    )
    assert result.exit_code == 0
    data = orjson.loads(result.stdout)["assignments"]
    assert data["unassigned_events"] == data["events"] == 4 and data["predicted_pairs"] == 0
    assert "none of the 4 truth events" in result.stderr
    assert "pairwise precision 1.0 is 0/0" in result.stderr
    fine = CliRunner().invoke(
        app, ["evaluate", "--truth", str(tiny / "truth.jsonl"), "--assignments", str(tiny / "assign.jsonl")]
    )
    assert fine.exit_code == 0 and "warning" not in fine.stderr
