"""A tiny key-value store interface: the core runs the same over a dict (tests) and RocksDB (replay, app)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from rocksdict import Cache, Options, Rdict

__all__ = ["MemoryStore", "RocksStore", "Store", "open_store", "rocksdb_options"]

_MEMTABLE_BYTES = 8 << 20
_BLOCK_CACHE_BYTES = 16 << 20


def rocksdb_options(memtable_bytes: int, block_cache: Cache) -> Options:
    """Options for a database its user fronts with a cache of decoded rows (the graph's, the worker's).

    Small memtables (two of `memtable_bytes`): the user batches its own writes, and RocksDB's 64 MB default
    per memtable would dominate the process's memory. Bloom filters: most reads that miss ask whether an
    identifier or profile id is new, answered from the filter without touching data blocks; the block cache
    can be small (keeping index and filter blocks in it too was measured slower: data blocks evict them).
    Give them for the default column family too when opening: reopening an existing database, rocksdict
    applies `options` only to families it creates, so the rest fall back to RocksDB's defaults (no bloom
    filter, an 8 MB block cache) from the second run on (quixio/quix-streams#1136).
    """
    from rocksdict import BlockBasedOptions, Options

    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(memtable_bytes)
    options.set_max_write_buffer_number(2)
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_block_cache(block_cache)
    options.set_block_based_table_factory(table)
    return options


@runtime_checkable
class Store(Protocol):
    """Bytes in, bytes out; `write_batch` applies many puts/deletes atomically (value None = delete)."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def write_batch(self, items: Iterable[tuple[bytes, bytes | None]]) -> None: ...

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...

    def compact(self) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Dict-backed store: the reference behaviour, and fast for tests."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        """Value for `key`, None when absent."""
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        """Set one key."""
        self._data[key] = bytes(memoryview(value))

    def delete(self, key: bytes) -> None:
        """Remove one key; absent keys are ignored."""
        self._data.pop(key, None)

    def write_batch(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Apply puts and deletes in order."""
        data = self._data
        for key, value in items:
            if value is None:
                data.pop(key, None)
            else:
                # an exact-size copy: encoders may hand back over-allocated buffers
                data[key] = bytes(memoryview(value))

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with `prefix`, in byte order (as RocksDB returns them)."""
        for key in sorted(k for k in self._data if k.startswith(prefix)):
            value = self._data.get(key)
            if value is not None:
                yield key, value

    def compact(self) -> None:
        """Nothing to rewrite: a deleted key is gone at once."""

    def close(self) -> None:
        """Nothing to release."""


class RocksStore:
    """rocksdict (RocksDB) store: persistent, survives restarts; batches go through one WriteBatch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from rocksdict import WriteBatch

        Path(path).mkdir(parents=True, exist_ok=True)
        self._path = str(path)
        self._write_batch_cls = WriteBatch
        self._db = self._open()
        self._closed = False

    def _open(self) -> Rdict:
        from rocksdict import Cache, Rdict

        opts = rocksdb_options(_MEMTABLE_BYTES, Cache(_BLOCK_CACHE_BYTES))
        return Rdict(self._path, options=opts, column_families={"default": opts})

    def get(self, key: bytes) -> bytes | None:
        """Value for `key`, None when absent."""
        value = self._db.get(key)
        return value if value is None else bytes(value)

    def put(self, key: bytes, value: bytes) -> None:
        """Set one key."""
        self._db[key] = value

    def delete(self, key: bytes) -> None:
        """Remove one key; absent keys are ignored."""
        self._db.delete(key)

    def write_batch(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Apply puts and deletes atomically in one RocksDB WriteBatch."""
        batch = self._write_batch_cls(raw_mode=True)
        put, delete = batch.put, batch.delete
        for key, value in items:
            if value is None:
                delete(key)
            else:
                put(key, value)
        self._db.write(batch)

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with `prefix`, in byte order."""
        for key, value in self._db.items(from_key=prefix):
            assert isinstance(key, bytes)
            if not key.startswith(prefix):
                break
            yield key, bytes(value)

    def compact(self) -> None:
        """Rewrite every table file, then reopen: erased values leave the disk, not only the lookups.

        RocksDB deletes by writing tombstones that carry the key, so an erased identifier stays in its files
        (old values, earlier versions of a redacted entry, the tombstones) until a compaction rewrites them,
        and the MANIFEST names each file's first and last keys until the next open starts a new one. A full
        rewrite: run it after erasing, not per event, and with no `iter_prefix` iterator open (it holds the
        database, which then cannot be reopened).
        """
        from rocksdict import BottommostLevelCompaction, CompactOptions

        options = CompactOptions()
        options.set_bottommost_level_compaction(BottommostLevelCompaction.force())
        self._db.compact_range(None, None, options)
        self._db.close()
        self._db = self._open()

    def close(self) -> None:
        """Flush and release the database (idempotent)."""
        if not self._closed:
            self._closed = True
            self._db.close()


def open_store(path: str | os.PathLike[str] | None) -> Store:
    """RocksStore at `path`, or a MemoryStore when `path` is None."""
    return MemoryStore() if path is None else RocksStore(path)
