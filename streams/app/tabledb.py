"""How the worker opens its table databases: one memory budget shared by all of them.

faust-streaming 0.15 opens a RocksDB database per table and partition, each with a block cache of its own
(2 GiB) and up to three memtables of 64 MB. A worker holds two tables (`ids`, `profiles`) for each partition
it owns or keeps a standby of, so its memory grew with its partitions and only each database had a bound:
16 databases could keep 3 GB in memtables before writing a file.

Here every table database of the process shares one LRU block cache, and a write-buffer manager charges their
memtables to that cache and has the database being written flush its memtable once they hold half the budget,
so `OMNISTITCH_TABLE_MEMORY_MB` covers cached blocks and memtables together. It is a target, not a hard cap:
a database that is not written keeps its memtable until its next write, so the memtables can reach one per
database (`memtable_bytes`, sized so that one per database fits in half the budget, but not below
`MIN_MEMTABLE_BYTES`); index and filter blocks of open files are outside it (keeping them in the cache was
measured slower for the replay state, `streams/core/store.py`). The worker's own cache of decoded rows
(`OMNISTITCH_CACHE_ROWS` per partition) answers most reads before RocksDB is asked.

The options are the replay state's (`streams.core.store.rocksdb_options`, bloom filters included), given for
the default column family too: rocksdict applies `options` only to families it creates, so a table reopened
after a restart fell back to RocksDB's defaults (quixio/quix-streams#1136).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faust.stores.rocksdb import RocksDBOptions
from rocksdict import AccessType, Cache, Options, Rdict, ReadOptions, WriteBufferManager

from streams.core.store import rocksdb_options

__all__ = ["MAX_MEMTABLE_BYTES", "MIN_MEMTABLE_BYTES", "TableMemory", "share_table_memory"]

# Bounds of one memtable of one database. Below the lower one, memtables would be written to files of a few
# KB each (RocksDB allocates a memtable in blocks of an eighth of its size); above the upper one a partition's
# table writes more before RocksDB writes a file, for no gain.
MIN_MEMTABLE_BYTES = 1 << 20
MAX_MEMTABLE_BYTES = 8 << 20


class TableMemory:
    """The block cache and write-buffer manager every table database of this process is opened with."""

    def __init__(self, budget_bytes: int, databases: int) -> None:
        if budget_bytes <= 0 or databases <= 0:
            raise ValueError("the table memory budget and the number of databases must be positive")
        self.budget_bytes = budget_bytes
        # one memtable per database that the worker may hold (two tables a partition) fits in half the budget
        self.memtable_bytes = max(MIN_MEMTABLE_BYTES, min(MAX_MEMTABLE_BYTES, budget_bytes // 2 // databases))
        self.cache = Cache(budget_bytes)
        # memtables may take half the budget, charged to the cache, which then holds fewer blocks; no stall:
        # writers would wait on memory that idle databases hold until their next write
        self.write_buffers = WriteBufferManager.new_write_buffer_manager_with_cache(
            budget_bytes // 2, False, self.cache
        )

    def options(self, faust_options: RocksDBOptions) -> Options:
        """The replay state's options (`rocksdb_options`) with this memory, and faust's file settings."""
        options = rocksdb_options(self.memtable_bytes, self.cache)
        if faust_options.max_open_files is not None:  # faust's: 90 % of the process's limit, per database
            options.set_max_open_files(faust_options.max_open_files)
        options.set_target_file_size_base(faust_options.target_file_size_base)
        options.set_write_buffer_manager(self.write_buffers)
        return options

    def usage_bytes(self) -> int:
        """What the shared cache holds now, memtables included (RocksDB's own accounting)."""
        return int(self.cache.get_usage())


def share_table_memory(budget_bytes: int, databases: int) -> TableMemory:
    """Open every faust table database of this process with one `TableMemory` of `budget_bytes`, sized for
    up to `databases` of them.

    Process-wide: replaces faust's `RocksDBOptions.open` (rocksdict driver). Databases opened before keep
    what they were opened with; a later call gives the databases opened after it a new budget.
    """
    memory = TableMemory(budget_bytes, databases)
    faust_open = getattr(RocksDBOptions.open, "faust_open", RocksDBOptions.open)

    def open_within_budget(self: RocksDBOptions, path: Path, *, read_only: bool = False) -> Any:
        if not self.use_rocksdict:
            return faust_open(self, path, read_only=read_only)
        options = memory.options(self)
        access = AccessType.read_write() if self.ttl is None else AccessType.with_ttl(self.ttl)
        db = Rdict(str(path), options=options, column_families={"default": options}, access_type=access)
        db.set_read_options(ReadOptions())
        return db

    open_within_budget.faust_open = faust_open  # type: ignore[attr-defined]
    RocksDBOptions.open = open_within_budget  # type: ignore[method-assign]
    return memory
