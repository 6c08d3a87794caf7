"""The clean-stop marker decides whether local tables can be trusted after a restart."""

from __future__ import annotations

from pathlib import Path

from streams.app.transactions import CLEAN_STOP_MARKER, mark_clean_stop, wipe_tables_after_unclean_stop


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
