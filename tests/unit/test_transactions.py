"""Exactly-once pieces that need no broker: the clean-stop marker, and which input records a batch takes."""

from __future__ import annotations

from pathlib import Path

from streams.app.transactions import (
    CLEAN_STOP_MARKER,
    Admission,
    InputPositions,
    mark_clean_stop,
    wipe_tables_after_unclean_stop,
)


def _tables(data_dir: Path) -> Path:
    tabledir = data_dir / "v1" / "tables"
    (tabledir / "ids-0.db").mkdir(parents=True)
    (tabledir / "ids-0.db" / "000004.log").write_bytes(b"rows of a batch that never committed")
    return tabledir


def test_tables_are_wiped_after_an_unclean_stop(tmp_path: Path) -> None:
    tabledir = _tables(tmp_path)
    assert wipe_tables_after_unclean_stop(tmp_path, tabledir)
    assert not tabledir.exists()


def test_tables_are_kept_after_a_clean_stop_and_the_marker_is_used_up(tmp_path: Path) -> None:
    tabledir = _tables(tmp_path)
    mark_clean_stop(tmp_path)
    assert not wipe_tables_after_unclean_stop(tmp_path, tabledir)
    assert (tabledir / "ids-0.db" / "000004.log").exists()
    # the marker only vouches for the stop that wrote it: a crash of this run must wipe again
    assert not (tmp_path / CLEAN_STOP_MARKER).exists()
    assert wipe_tables_after_unclean_stop(tmp_path, tabledir)


RAW = "raw.web"
INTERNAL = "app-internal"


def _positions(committed: dict[tuple[str, int], int]) -> InputPositions:
    positions = InputPositions(gapless=lambda topic: topic != INTERNAL)
    positions.reset(committed, [(RAW, 0), (RAW, 1), (INTERNAL, 0)])
    return positions


def test_records_from_the_committed_offset_are_taken_and_redeliveries_skipped() -> None:
    positions = _positions({(RAW, 0): 46})
    assert [positions.admit(RAW, 0, offset) for offset in (46, 47, 48)] == [Admission.TAKE] * 3
    assert positions.admit(RAW, 0, 47) is Admission.REDELIVERED
    assert positions.admit(RAW, 1, 0) is Admission.TAKE  # never committed: from the start
    assert positions.take_seeks() == {}


def test_a_record_past_the_committed_offset_is_held_until_the_reread_brings_the_ones_before() -> None:
    # the scale tests' loss: faust never delivered offset 46, the first record after the rebalance was 47
    positions = _positions({(RAW, 0): 46})
    assert positions.admit(RAW, 0, 47) is Admission.HELD
    assert positions.admit(RAW, 0, 48) is Admission.HELD  # fetched before the re-read
    assert positions.take_seeks() == {(RAW, 0): 46}
    assert positions.take_seeks() == {}  # asked for once
    assert [positions.admit(RAW, 0, offset) for offset in (46, 47, 48)] == [Admission.TAKE] * 3
    assert positions.admit(RAW, 0, 49) is Admission.TAKE


def test_a_reread_that_starts_at_the_held_record_proves_the_offsets_between_hold_no_data() -> None:
    # a transactional topic: the committed offset can be a commit marker, which is never delivered
    positions = _positions({(INTERNAL, 0): 100})
    assert positions.admit(INTERNAL, 0, 101) is Admission.HELD
    assert positions.take_seeks() == {(INTERNAL, 0): 100}
    assert positions.admit(INTERNAL, 0, 103) is Admission.HELD
    assert positions.admit(INTERNAL, 0, 101) is Admission.TAKE
    # confirmed: later markers between records are normal on this topic
    assert positions.admit(INTERNAL, 0, 103) is Admission.TAKE
    assert positions.take_seeks() == {}


def test_a_jump_on_a_gapless_topic_is_checked_even_once_confirmed() -> None:
    positions = _positions({(RAW, 0): 0})
    assert positions.admit(RAW, 0, 0) is Admission.TAKE
    assert positions.admit(RAW, 0, 5) is Admission.HELD
    assert positions.take_seeks() == {(RAW, 0): 1}


def test_the_record_at_the_position_arriving_first_cancels_the_reread() -> None:
    positions = _positions({(RAW, 0): 46})
    assert positions.admit(RAW, 0, 47) is Admission.HELD
    assert positions.admit(RAW, 0, 46) is Admission.TAKE
    assert positions.take_seeks() == {}
    assert positions.admit(RAW, 0, 47) is Admission.TAKE


def test_a_rebalance_forgets_what_was_held() -> None:
    positions = _positions({(RAW, 0): 46})
    assert positions.admit(RAW, 0, 47) is Admission.HELD
    positions.reset({(RAW, 0): 47}, [(RAW, 0)])
    assert positions.take_seeks() == {}
    assert positions.admit(RAW, 0, 47) is Admission.TAKE
