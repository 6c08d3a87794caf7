"""The worker's table databases open within one memory budget (`streams.app.tabledb`), no broker."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from faust.stores.rocksdb import RocksDBOptions

from streams.app.tabledb import MEMTABLE_BYTES, share_table_memory
from streams.config import AppSettings
from streams.exceptions import ConfigError


def _memtable_bytes(db: object) -> int:
    return int(db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0)  # type: ignore[attr-defined]


def test_a_table_database_keeps_its_options_when_reopened(tmp_path: Path) -> None:
    share_table_memory(64 << 20)
    for _ in range(3):  # a restart reopens every table; rocksdict dropped the options then (0.3.3)
        db = RocksDBOptions().open(tmp_path / "table")
        db[b"k"] = b"v"
        db.close()
        newest = max((tmp_path / "table").glob("OPTIONS-*"), key=lambda f: int(f.name.split("-")[1]))
        text = newest.read_text()
        assert "filter_policy=bloomfilter" in text
        assert f"write_buffer_size={MEMTABLE_BYTES}" in text
        assert "max_write_buffer_number=2" in text


def test_the_databases_memtables_stay_within_the_budget_together(tmp_path: Path) -> None:
    """40 MB over four databases, a 16 MB budget: with faust's own options all of it stayed in memtables."""
    budget = 16 << 20
    memory = share_table_memory(budget)
    dbs = [RocksDBOptions().open(tmp_path / f"table-{n}") for n in range(4)]
    try:
        value = os.urandom(1000)
        for i in range(40_000):
            dbs[i % 4][b"%08d" % i] = value
        deadline = time.monotonic() + 10
        while sum(map(_memtable_bytes, dbs)) > budget and time.monotonic() < deadline:
            time.sleep(0.05)  # the flushes the write-buffer manager asked for run in the background
        assert sum(map(_memtable_bytes, dbs)) <= budget
        assert memory.usage_bytes() > 0  # the memtables are charged to the shared cache
        assert all(dbs[i % 4][b"%08d" % i] == value for i in range(0, 40_000, 997))
    finally:
        for db in dbs:
            db.close()


def test_the_memory_settings_are_positive_whole_numbers() -> None:
    assert (AppSettings.from_env({}).table_memory_mb, AppSettings.from_env({}).cache_rows) == (256, 20_000)
    assert AppSettings.from_env({"OMNISTITCH_TABLE_MEMORY_MB": "64"}).table_memory_mb == 64
    assert AppSettings.from_env({"OMNISTITCH_CACHE_ROWS": "1"}).cache_rows == 1
    with pytest.raises(ConfigError, match="OMNISTITCH_CACHE_ROWS=-5 must be at least 1"):
        AppSettings.from_env({"OMNISTITCH_CACHE_ROWS": "-5"})
    with pytest.raises(ConfigError, match="OMNISTITCH_TABLE_MEMORY_MB=0 must be at least 1"):
        AppSettings.from_env({"OMNISTITCH_TABLE_MEMORY_MB": "0"})
    with pytest.raises(ConfigError, match="is not a whole number"):
        AppSettings.from_env({"OMNISTITCH_TABLE_MEMORY_MB": "lots"})
