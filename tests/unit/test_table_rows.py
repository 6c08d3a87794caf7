"""The worker's `RowStore` over faust's table databases (`streams.app.worker._TableRows`), no broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faust.stores.rocksdb import RocksDBOptions
from faust.stores.rocksdb import Store as RocksDBStore

from streams.app.protocol import INDEX_PROGRESS_KEY, IdRow, PartitionState, TableName
from streams.app.restore import RESTORED_OFFSET_KEY
from streams.app.worker import _TableRows
from streams.core.rules import load_rules


class _Table:
    """What `_TableRows` reads of a faust table: `data._db_for_partition(p)`."""

    def __init__(self, db: Any) -> None:
        self.data = self
        self._db = db

    def _db_for_partition(self, partition: int) -> Any:
        return self._db


def test_a_scan_of_a_table_database_yields_its_rows_only(tmp_path: Path) -> None:
    """A database holds the restore's offset and, if faust once kept the partition as a standby, faust's own
    offset. Neither is a register: indexing the registers of a 0.4.1 state decoded faust's `b"1158"` as one
    and stopped the worker (found in review)."""
    tables: dict[TableName, Any] = {
        name: _Table(RocksDBOptions().open(tmp_path / name)) for name in ("ids", "profiles")
    }
    ids = tables["ids"].data._db
    ids[b"email:a@x.ru"] = IdRow("P1", False, [123]).encode()
    ids[RocksDBStore.offset_key] = b"1158"
    ids[RESTORED_OFFSET_KEY] = b"1158"
    rows = _TableRows(tables, 0)
    assert list(rows.items("ids", b"")) == [(b"email:a@x.ru", IdRow("P1", False, [123]).encode())]
    written = PartitionState(0, 1, load_rules(), rows).flush()
    assert written == [("ids", b"/nb/123/email:a@x.ru", b""), ("ids", INDEX_PROGRESS_KEY, b"")]
    assert rows.get("ids", b"/nb/123/email:a@x.ru") == b""
