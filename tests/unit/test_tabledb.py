"""The worker's table databases open within one memory budget (`streams.app.tabledb`), no broker."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from faust.stores.rocksdb import RocksDBOptions

from streams.app.tabledb import MAX_MEMTABLE_BYTES, MIN_MEMTABLE_BYTES, TableMemory, share_table_memory
from streams.config import AppSettings
from streams.exceptions import ConfigError


@pytest.fixture(autouse=True)
def _faust_open_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """`share_table_memory` patches faust process-wide; later tests get faust's own `open` back."""
    monkeypatch.setattr(RocksDBOptions, "open", RocksDBOptions.open)


def _memtable_bytes(dbs: list[Any]) -> int:
    return sum(int(db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0) for db in dbs)


def _fill(tmp: Path, name: str) -> list[Any]:
    """28 MB of rows over four databases, 7 MB each: less than one 8 MB memtable holds."""
    dbs = [RocksDBOptions().open(tmp / f"{name}-{n}") for n in range(4)]
    value = os.urandom(1000)
    for i in range(28_000):
        dbs[i % 4][b"%08d" % i] = value
    assert all(dbs[i % 4][b"%08d" % i] == value for i in range(0, 28_000, 997))
    return dbs


def test_a_table_database_keeps_its_options_when_reopened(tmp_path: Path) -> None:
    memory = share_table_memory(64 << 20, 16)
    assert memory.memtable_bytes == 2 << 20  # one per database in half the budget
    for _ in range(3):  # a restart reopens every table; rocksdict dropped the options then (0.3.3)
        db = RocksDBOptions().open(tmp_path / "table")
        db[b"k"] = b"v"
        db.close()
        newest = max((tmp_path / "table").glob("OPTIONS-*"), key=lambda f: int(f.name.split("-")[1]))
        text = newest.read_text()
        assert "filter_policy=bloomfilter" in text
        assert f"write_buffer_size={2 << 20}" in text
        assert "max_write_buffer_number=2" in text


def test_the_memtables_of_several_databases_share_the_budget(tmp_path: Path) -> None:
    """faust's options keep all 28 MB in memtables; a 16 MB budget has the written databases flush theirs
    once they hold half of it, though each memtable alone would take 8 MB."""
    faust_dbs = _fill(tmp_path, "faust")
    try:
        assert _memtable_bytes(faust_dbs) >= 28_000_000
    finally:
        for db in faust_dbs:
            db.close()

    budget = 16 << 20
    memory = share_table_memory(budget, 1)
    assert memory.memtable_bytes == MAX_MEMTABLE_BYTES
    dbs = _fill(tmp_path, "shared")
    try:
        deadline = time.monotonic() + 10
        while _memtable_bytes(dbs) > budget and time.monotonic() < deadline:
            time.sleep(0.05)  # the flushes the write-buffer manager asked for run in the background
        assert _memtable_bytes(dbs) <= budget
        assert memory.write_buffers.get_usage() > 0  # counted by the manager, charged to the shared cache
        assert memory.usage_bytes() >= memory.write_buffers.get_usage()
    finally:
        for db in dbs:
            db.close()


def test_memtables_are_sized_for_the_databases_a_worker_may_hold() -> None:
    assert TableMemory(256 << 20, 16).memtable_bytes == MAX_MEMTABLE_BYTES
    assert TableMemory(256 << 20, 64).memtable_bytes == 2 << 20
    assert TableMemory(16 << 20, 16).memtable_bytes == MIN_MEMTABLE_BYTES  # not below: files of a few KB


def test_the_memory_settings_are_whole_numbers_with_a_floor() -> None:
    assert (AppSettings.from_env({}).table_memory_mb, AppSettings.from_env({}).cache_rows) == (256, 20_000)
    assert AppSettings.from_env({"OMNISTITCH_TABLE_MEMORY_MB": "64"}).table_memory_mb == 64
    assert AppSettings.from_env({"OMNISTITCH_CACHE_ROWS": "1"}).cache_rows == 1
    with pytest.raises(ConfigError, match="OMNISTITCH_CACHE_ROWS=-5 must be at least 1"):
        AppSettings.from_env({"OMNISTITCH_CACHE_ROWS": "-5"})
    with pytest.raises(ConfigError, match="OMNISTITCH_TABLE_MEMORY_MB=8 must be at least 16"):
        AppSettings.from_env({"OMNISTITCH_TABLE_MEMORY_MB": "8"})
    with pytest.raises(ConfigError, match="is not a whole number"):
        AppSettings.from_env({"OMNISTITCH_TABLE_MEMORY_MB": "lots"})
