"""One contract for every store backend: what the graph relies on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.core import MemoryStore, RocksStore, Store

SUPPORTED_STORES = ["memory", "rocksdict"]


@pytest.fixture(params=SUPPORTED_STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else RocksStore(tmp_path / "db")
    yield s
    s.close()


def test_get_put_delete(store: Store) -> None:
    assert store.get(b"k") is None
    store.put(b"k", b"v1")
    store.put(b"k", b"v2")
    assert store.get(b"k") == b"v2"
    store.delete(b"k")
    store.delete(b"never-there")
    assert store.get(b"k") is None


def test_batch_applies_puts_and_deletes_in_order(store: Store) -> None:
    store.put(b"gone", b"x")
    store.write_batch([(b"a", b"1"), (b"b", b"2"), (b"gone", None), (b"a", b"3")])
    assert store.get(b"a") == b"3" and store.get(b"b") == b"2" and store.get(b"gone") is None


def test_iter_prefix_is_ordered_and_bounded(store: Store) -> None:
    store.write_batch([(b"p:2", b"b"), (b"p:1", b"a"), (b"q:1", b"c"), (b"o:9", b"d"), (b"p:10", b"e")])
    assert list(store.iter_prefix(b"p:")) == [(b"p:1", b"a"), (b"p:10", b"e"), (b"p:2", b"b")]
    assert list(store.iter_prefix(b"z:")) == []


def test_binary_values_round_trip(store: Store) -> None:
    blob = bytes(range(256))
    store.put(b"\x00bin", blob)
    assert store.get(b"\x00bin") == blob


def test_rocksdict_survives_restart(tmp_path: Path) -> None:
    s = RocksStore(tmp_path / "db")
    s.write_batch([(b"a", b"1")])
    s.close()
    s.close()  # idempotent
    again = RocksStore(tmp_path / "db")
    assert again.get(b"a") == b"1"
    again.close()


def _options_of(path: Path) -> str:
    """The newest OPTIONS file RocksDB wrote: the settings the database actually runs with."""
    return max(path.glob("OPTIONS-*"), key=lambda f: int(f.name.split("-")[1])).read_text()


def test_rocks_store_keeps_its_bloom_filter_when_reopened(tmp_path: Path) -> None:
    for _ in range(3):  # rocksdict applied our options only when it created the database (0.3.3)
        store = RocksStore(tmp_path)
        store.put(b"k", b"v")
        store.close()
        assert "filter_policy=bloomfilter" in _options_of(tmp_path)


def test_compact_leaves_no_deleted_value_in_the_files(tmp_path: Path) -> None:
    store = RocksStore(tmp_path)
    store.write_batch([(b"i:email:gone-qz8vw@jx4t.ru", b"P1"), (b"i:email:kept@x.ru", b"P2")])
    store.close()
    store = RocksStore(tmp_path)  # the value now sits in a table file, not only in the log
    store.delete(b"i:email:gone-qz8vw@jx4t.ru")
    store.compact()
    assert store.get(b"i:email:kept@x.ru") == b"P2" and store.get(b"i:email:gone-qz8vw@jx4t.ru") is None
    store.close()
    files = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.is_file())
    assert b"qz8vw" not in files
