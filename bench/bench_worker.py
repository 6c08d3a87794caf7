"""The worker's CPU per event without Kafka: its per-partition steps over 8 in-memory partitions (issue 5).

Usage:  .venv/bin/python bench/bench_worker.py [--people 10000] [--partitions 8] [--batch 1000] [--repeat 3]
                                              [--profile 30] [--json]

Simulates a population (`streams.simulate`, in a temporary directory) and places each raw event on the
partition `omnistitch produce` would send it to (its key is its strongest normalised identifier; an event
that does not validate goes round robin). Then it runs the worker's own steps (`streams/app/steps.py`:
validate, the protocol, the output records and the changed rows) over `--partitions` in-memory partitions:
up to `--batch` input records of one partition at a time, round robin, every envelope for another partition
queued behind that partition's records, until every queue is empty. It does that `--repeat` times on fresh
states and prints the fastest run's CPU per event (this process's), every run's, and the records each event
produced.

No Kafka I/O is in the figure: it is the floor the worker's fetches, producers and transactions come on
top of. CPU time still varies by 10-30 % between runs on these shared machines (other tenants share the
cores' caches), so compare the fastest of several runs, interleaved, as `bench_stream.py` can't be.
15k events/s per worker (issue 5's target) leaves about 65 µs per event for everything.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.app.protocol import Effects, PartitionState, TableName
from streams.app.steps import PartitionSteps
from streams.core.rules import load_rules
from streams.exceptions import InvalidEvent
from streams.normalize import NormalizationSettings
from streams.produce import event_key, murmur2_partition
from streams.runtime import tune_gc
from streams.simulate import SimConfig, simulate
from streams.validate import Validator

INTERNAL = "omnistitch-internal"
CHANGELOGS: dict[TableName, str] = {
    "ids": "omnistitch-ids-changelog",
    "profiles": "omnistitch-profiles-changelog",
}
# (topic, key, value) of one input record
Input = tuple[str, bytes | None, bytes]


class _Outbox:
    """Counts output records by topic; envelopes for other partitions join those partitions' queues."""

    def __init__(self, queues: list[deque[Input]], out: Counter[str]) -> None:
        self.queues = queues
        self.out = out

    def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        self.out[topic] += 1
        if topic == INTERNAL:
            assert partition is not None and value is not None
            self.queues[partition].append((topic, key, value))


def _placed(lines: list[bytes], partitions: int) -> list[deque[Input]]:
    """Each raw event on the partition its producer key sends it to (a separate validator: a cold cache)."""
    placing = Validator(NormalizationSettings.from_env())
    queues: list[deque[Input]] = [deque() for _ in range(partitions)]
    for n, raw in enumerate(lines):
        try:
            key = event_key(placing.validate(raw))
        except InvalidEvent:
            key = None
        partition = n % partitions if key is None else murmur2_partition(key, partitions)
        queues[partition].append(("raw", key, raw))
    return queues


def run(placed: list[deque[Input]], batch: int) -> dict[str, Any]:
    """Stitch every placed record through the worker's steps (fresh states); CPU seconds, output records."""
    queues = [deque(queue) for queue in placed]
    partitions = len(queues)
    steps = PartitionSteps(Validator(NormalizationSettings.from_env()), INTERNAL, dict(CHANGELOGS))
    rules = load_rules(None)
    states = [PartitionState(p, partitions, rules) for p in range(partitions)]
    out: Counter[str] = Counter()
    outbox = _Outbox(queues, out)
    inputs = batches = 0
    now_ms = int(time.time() * 1000)
    cpu, wall = time.process_time(), time.perf_counter()
    while any(queues):
        for p, queue in enumerate(queues):
            if not queue:
                continue
            fx, state = Effects(), states[p]
            for _ in range(min(batch, len(queue))):
                topic, key, value = queue.popleft()
                steps.take(state, fx, outbox, topic, p, inputs, key, value, now_ms)
                inputs += 1
            steps.publish(state, fx, outbox, now_ms)
            batches += 1
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_s": cpu, "wall_s": wall, "inputs": inputs, "batches": batches, "out": dict(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=10_000, help="simulated people (about 13 events each)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1000, help="records per partition batch")
    ap.add_argument("--repeat", type=int, default=3, help="runs over the same events; the fastest counts")
    ap.add_argument("--profile", type=int, default=0, help="also print cProfile's top N functions (slower)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="omnistitch-bench-worker-") as tmp:
        simulate(SimConfig(people=args.people, seed=args.seed), tmp)
        lines = [line for line in (Path(tmp) / "all.jsonl").read_bytes().splitlines() if line.strip()]
    queues = _placed(lines, args.partitions)
    tune_gc()  # as every omnistitch process does
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    runs = [run(queues, args.batch) for _ in range(max(args.repeat, 1))]
    if profiler is not None:
        profiler.disable()
    result = min(runs, key=lambda r: float(r["cpu_s"]))
    events = result["out"].get("events.resolved", 0) + result["out"].get("dlq", 0)
    result.update(
        events=events,
        us_per_event=round(result["cpu_s"] / events * 1e6, 1),
        us_per_event_runs=[round(r["cpu_s"] / events * 1e6, 1) for r in runs],
        events_per_cpu_s=round(events / result["cpu_s"]),
        records_out_per_event={t: round(n / events, 3) for t, n in sorted(result["out"].items())},
        profiled=bool(profiler),
    )
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        for name in ("events", "inputs", "batches", "cpu_s", "us_per_event", "us_per_event_runs"):
            print(f"{name:<28} {result[name]}")
        for name in ("events_per_cpu_s", "profiled"):
            print(f"{name:<28} {result[name]}")
        for topic, per_event in result["records_out_per_event"].items():
            print(f"  out per event {topic:<28} {per_event}")
        print("target: 15k events/s per worker leaves about 65 µs per event, Kafka included")
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
