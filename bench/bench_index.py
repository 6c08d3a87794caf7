"""Indexing a partition's registers written before the holders index existed (0.4.1 and older, §7 of
docs/stream-protocol.md).

Run: `.venv/bin/python bench/bench_index.py [--registers 200000]`. Prints figures; asserts nothing.

One RocksDB database (rocksdict, as the worker's `ids` table) holds `--registers` registers, each noting two
neighbour codes. A `PartitionState` over it flushes until its index is complete, once for a 0.4.1 state (no
pair rows: each step writes them) and once for a 0.4.2 state (pair rows there, no completion row: each step
looks them up). It prints the steps, the time in all, the longest step (a step runs inside one batch's
transaction) and the rows written.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson
from rocksdict import Options, Rdict, WriteBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.app.protocol import INDEX_PROGRESS_KEY, INDEX_STEP_REGISTERS, PartitionState, Row, TableName
from streams.core.rules import load_rules


class _Rows:
    """`RowStore` over one database standing for the `ids` table."""

    def __init__(self, db: Rdict) -> None:
        self.db = db

    def get(self, table: TableName, key: bytes) -> bytes | None:
        value = self.db.get(key)
        return None if value is None else bytes(value)

    def keys(self, table: TableName, prefix: bytes) -> Iterable[bytes]:
        keys = self.db.keys(from_key=prefix)
        return [bytes(key) for key in itertools.takewhile(lambda key: key.startswith(prefix), keys)]

    def items(self, table: TableName, start: bytes) -> Iterable[tuple[bytes, bytes]]:
        for key, value in self.db.items(from_key=start):
            yield key, bytes(value)

    def write(self, rows: Sequence[Row]) -> None:
        batch = WriteBatch(raw_mode=True)
        for _, key, value in rows:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self.db.write(batch)


def _index(db: Rdict) -> tuple[int, float, float, int]:
    """Flush a new partition state until the index is complete: (steps, seconds, longest step, rows)."""
    state = PartitionState(0, 1, load_rules(), _Rows(db))
    steps = rows = 0
    total = longest = 0.0
    while db.get(INDEX_PROGRESS_KEY) != b"":
        started = time.perf_counter()
        rows += len(state.flush())
        took = time.perf_counter() - started
        steps, total, longest = steps + 1, total + took, max(longest, took)
    return steps, total, longest, rows


def main(argv: list[str] | None = None) -> int:
    """Build the database, index it as a 0.4.1 state, then as a 0.4.2 one; print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registers", type=int, default=200_000)
    args = ap.parse_args(argv)
    rnd = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="omnistitch-bench-index-") as tmp:
        db = Rdict(tmp, options=Options(raw_mode=True))
        batch = WriteBatch(raw_mode=True)
        for i in range(args.registers):
            register = {"p": f"P{i}", "g": False, "nb": [rnd.getrandbits(40), rnd.getrandbits(40)]}
            batch.put(f"email:u{i}@x.ru".encode(), orjson.dumps(register))
        db.write(batch)
        print(f"{args.registers:,} registers of two codes each, {INDEX_STEP_REGISTERS:,} per step")
        for state in ("0.4.1 (no pair rows)", "0.4.2 (pair rows there)"):
            db.delete(INDEX_PROGRESS_KEY)  # what a 0.4.2 state lacks: its pairs stay from the first pass
            steps, total, longest, rows = _index(db)
            figures = f"{steps:>4} steps  {total:6.2f} s in all  longest {longest:5.2f} s  {rows:,} rows"
            print(f"{state:<26} {figures}")
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
