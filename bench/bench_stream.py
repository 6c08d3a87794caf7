"""Stream app benchmark (issues 5, 6): throughput with 1 and 2 workers, latency at a fixed rate, references.

    .venv/bin/python bench/bench_stream.py [--quick] [--events 300000] [--json out.json]

One run starts its own broker (`deploy/kafka/localkafka.py`, free port, always stopped), creates the topics
with the project's code, simulates a population (`streams.simulate`, timestamps in the past month) and
preloads the first `--events` of its events into the raw topics with `ChannelProducer`, keyed and routed as
`omnistitch produce` does. Every measurement below reads those same preloaded events with its own app id /
consumer group, from the earliest offset:

1. references: a faust count-only agent with exactly-once (the framework floor) and a plain confluent-kafka
   consumer → producer, read_committed, without and with transactions (the client ceiling);
2. `omnistitch worker` x 2, then x 1: from the first output until every event is visible in
   `events.resolved` + `dlq` (read_committed). The rate is taken from the moment every worker has validated
   something (its `/metrics`), so the 2-worker figure is not one worker's head start;
3. latency: the workers of the `--latency-workers` run (2 by default, the smallest deployment that survives
   a crash) stay up (warm) while the rest of the population is sent live at `--rate` events/s, each
   event's `occurred_at` rewritten to its send time. Latency is receive time - send time on
   `events.resolved` (by `event_id`) and receive time - `last_activity_ms` on `profiles`. Skipped, with the
   reason, when those workers have not finished the preloaded events within the run timeout: live events
   would only measure the queue behind them.

CPU (user+sys from /proc/<pid>/stat, 100 % = one core) and peak RSS are sampled for every process — each
worker or reference process, the broker JVM and this bench — over each measurement window, because the
broker shares the 2 cores with the workers; the machine's total busy CPU (/proc/stat) shows what other
tenants took meanwhile. The worker is driven through its CLI and environment only.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.topics import DLQ, EVENTS_RESOLVED, PROFILES  # noqa: E402
from streams.app.topics import create_topics, raw_topic  # noqa: E402
from streams.config import AppSettings  # noqa: E402
from streams.exceptions import InvalidEvent  # noqa: E402
from streams.produce import ChannelProducer  # noqa: E402
from streams.simulate import SimConfig, simulate  # noqa: E402

LOCALKAFKA = ROOT / "deploy" / "kafka" / "localkafka.py"
REFS = Path(__file__).resolve().parent / "stream_refs.py"
RESULT_PREFIX = "BENCH-RESULT "  # stream_refs.py's result line
EVENTS_PER_PERSON = 10  # the simulator averages ~12.5 a month: size populations with a margin
TICK = 0.25  # seconds between CPU/RSS samples and progress checks
MACHINE = "machine"  # Sampler's name for all CPUs of the machine, every tenant included
EVENTS_IN = "omnistitch_events_in_total"  # a worker's /metrics counter of validated events (README)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Targets of issue 5, printed beside the figures (nothing is asserted).
TARGET_PER_WORKER = 15_000
TARGET_P99_MS = 250
TARGET_SCALING = 1.6


class RunFailed(RuntimeError):
    """One measurement could not finish (a process died or nothing came out); the others still run."""


# ----------------------------------------------------------------------------------------------------------
# Processes: started in their own session, always stopped, CPU and RSS read from /proc.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Spawned:
    """A child process with its log; every one is registered so `stop_all` can end it on any exit path."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM for a clean faust shutdown; SIGKILL if it overstays `grace`."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


_SPAWNED: list[Spawned] = []


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Spawned:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    spawned = Spawned(name, proc, log)
    _SPAWNED.append(spawned)
    return spawned


def stop_all() -> None:
    while _SPAWNED:
        _SPAWNED.pop().stop()


def _machine_busy() -> tuple[float, int]:
    """(CPU seconds busy on all cores, 0): other tenants of the shared machine show up here, not per pid."""
    with open("/proc/stat", "rb") as handle:
        ticks = [
            int(v) for v in handle.readline().split()[1:9]
        ]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK, 0


def _cpu_rss(pid: int) -> tuple[float, int] | None:
    """(user+sys CPU seconds, RSS bytes) of one process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # fields from #3 (state) on; comm may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE


class Sampler(threading.Thread):
    """CPU seconds and RSS of named processes, and the machine's busy CPU, every TICK; summed per window."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = {**pids, MACHINE: 0}
        self.samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in self.pids}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            now = time.time()
            for name, pid in self.pids.items():
                reading = _cpu_rss(pid) if pid else _machine_busy()
                if reading is not None:
                    self.samples[name].append((now, *reading))
            self._halt.wait(TICK)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def summary(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """CPU % (100 = one core) between the samples bracketing [start, end]; peak RSS within it (MB).

        The MACHINE entry is every process on the machine (its RSS is not sampled: 0).
        """
        out: dict[str, dict[str, float]] = {}
        for name, samples in self.samples.items():
            before = [s for s in samples if s[0] <= start] or samples[:1]
            after = [s for s in samples if s[0] >= end] or samples[-1:]
            if not before or not after or after[0][0] <= before[-1][0]:
                continue
            first, last = before[-1], after[0]
            inside = [s[2] for s in samples if first[0] <= s[0] <= last[0]]
            out[name] = {
                "cpu_pct": round(100 * (last[1] - first[1]) / (last[0] - first[0]), 1),
                "rss_peak_mb": round(max(inside) / 1e6, 1),
            }
        return out


# ----------------------------------------------------------------------------------------------------------
# Broker, topics, population, preload.
# ----------------------------------------------------------------------------------------------------------


def broker(command: str, state: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(LOCALKAFKA), command, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"localkafka {command} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


@dataclass
class LiveEvent:
    """A validated event for the latency phase; its `occurred_at` value is spliced in at send time."""

    source: str
    key: bytes | None
    event_id: bytes
    head: bytes  # bytes up to and including the opening quote of occurred_at's value
    tail: bytes  # bytes from its closing quote on


@dataclass
class Population:
    """What was preloaded (the throughput runs' input) and the events kept back for the live phase."""

    preloaded: int = 0
    invalid_skipped: int = 0
    preload_seconds: float = 0.0
    people: int = 0
    live: list[LiveEvent] = field(default_factory=list)


def _live_event(source: str, key: bytes | None, raw: bytes) -> LiveEvent:
    marker = b'"occurred_at":"'
    start = raw.index(marker) + len(marker)
    end = raw.index(b'"', start)
    event_id = orjson.loads(raw)["event_id"].encode()
    return LiveEvent(source, key, event_id, raw[:start], raw[end:])


def prepare(
    out: Path, producers: dict[str, ChannelProducer], bootstrap: str, preload: int, live: int, seed: int
) -> Population:
    """Simulate, then send the first `preload` valid events (in time order) and keep the next `live` ones.

    The population's month ends yesterday, so a live event stamped now is the newest of its profile and the
    snapshot's `last_activity_ms` is that event's send time.
    """
    people = max(500, math.ceil((preload + live) / EVENTS_PER_PERSON))
    days = SimConfig().days
    start = (datetime.now(UTC) - timedelta(days=days + 1)).replace(microsecond=0).isoformat()
    summary = simulate(SimConfig(people=people, seed=seed, start=start), out)
    print(f"population: {people:,} people, {summary.events:,} events in {summary.seconds:.1f}s", flush=True)
    population = Population(people=people)
    began = time.monotonic()
    with open(out / "all.jsonl", "rb") as lines:
        for line in lines:
            raw = line.strip()
            if not raw:
                continue
            source = orjson.loads(raw)["source"]
            producer = producers.get(source)
            if producer is None:
                producer = producers[source] = ChannelProducer(source, bootstrap=bootstrap)
            try:
                key, _ = producer.validate(raw)
            except InvalidEvent:
                population.invalid_skipped += 1
                continue
            if population.preloaded < preload:
                producer.send_validated(raw, key)
                population.preloaded += 1
            elif len(population.live) < live:
                population.live.append(_live_event(source, key, raw))
            else:
                break
    undelivered = sum(p.flush(120) for p in producers.values())
    failed = sum(p.stats.failed for p in producers.values())
    if undelivered or failed:
        raise RuntimeError(f"preload: {undelivered} undelivered, {failed} failed")
    population.preload_seconds = time.monotonic() - began
    shutil.rmtree(out)
    return population


# ----------------------------------------------------------------------------------------------------------
# Watching outputs.
# ----------------------------------------------------------------------------------------------------------


def _consumer_at_end(bootstrap: str, topics: list[str]) -> Consumer:
    """A read_committed consumer assigned at the topics' current ends: sees only what comes next."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-watch-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    assignment = []
    for topic in topics:
        for partition in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
            high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
            assignment.append(TopicPartition(topic, partition, high))
    consumer.assign(assignment)
    return consumer


class OutputCounter(threading.Thread):
    """Counts messages arriving on the output topics; (time, count) after every fetch."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        super().__init__(daemon=True)
        self.consumer = _consumer_at_end(bootstrap, topics)
        self.count = 0
        self.first: float | None = None
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                messages = self.consumer.consume(num_messages=10_000, timeout=0.1)
                now = time.time()
                got = sum(1 for m in messages if not m.error())
                if got and self.first is None:
                    self.first = now
                self.count += got
                self.samples.append((now, self.count))
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def count_at(self, at: float) -> int:
        return max((c for t, c in self.samples if t <= at), default=0)

    def reached(self, target: int) -> float | None:
        return next((t for t, c in self.samples if c >= target), None)


class LatencyWatcher(threading.Thread):
    """Receive time - send time per resolved event (by event_id); - last_activity_ms per profile snapshot."""

    def __init__(self, bootstrap: str, sent: dict[bytes, list[int]], live_from_ms: int) -> None:
        super().__init__(daemon=True)
        self.consumer = _consumer_at_end(bootstrap, [EVENTS_RESOLVED.name, PROFILES.name])
        self.sent = sent
        self.live_from_ms = live_from_ms
        self.resolved_ms: list[float] = []
        self.in_worker_ms: list[float] = []
        self.profile_ms: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                messages = self.consumer.consume(num_messages=5000, timeout=0.05)
                now_ms = time.time() * 1000
                for message in messages:
                    value = message.value()
                    if message.error() or value is None:  # tombstones carry no activity
                        continue
                    record = orjson.loads(value)
                    if message.topic() == EVENTS_RESOLVED.name:
                        stamps = self.sent.get(record["event_id"].encode())
                        if stamps:
                            sent_ms = stamps.pop(0)
                            self.resolved_ms.append(now_ms - sent_ms)
                            self.in_worker_ms.append(record["resolved_at_ms"] - sent_ms)
                    elif record["last_activity_ms"] >= self.live_from_ms:
                        self.profile_ms.append(now_ms - record["last_activity_ms"])
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50/p95/p99 and max, in the unit given."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 1)

    return {"n": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": rank(1.0)}


# ----------------------------------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    bootstrap: str
    broker_pid: int
    tmp: Path
    raw_topics: list[str]
    expect: int
    worker_env: dict[str, str]

    def pids(self, **procs: Spawned) -> dict[str, int]:
        return {**{n: s.proc.pid for n, s in procs.items()}, "broker": self.broker_pid, "bench": os.getpid()}

    def app_id(self, label: str) -> str:
        return f"bench-{label}-{uuid.uuid4().hex[:6]}"

    # --- references -------------------------------------------------------------------------------------

    def reference(self, label: str, mode: str, *extra: str, stop_after: bool) -> dict[str, Any]:
        """Run one stream_refs.py mode over the preloaded events; its own clock gives the rate."""
        argv = [
            sys.executable,
            str(REFS),
            mode,
            "--bootstrap",
            self.bootstrap,
            "--app-id",
            self.app_id(label),
            "--topics",
            ",".join(self.raw_topics),
            "--expect",
            str(self.expect),
            "--partitions",
            str(self.args.partitions),
            "--data-dir",
            str(self.tmp / label),
            *extra,
        ]
        (self.tmp / label).mkdir()
        ref = spawn(label, argv, self.tmp / f"{label}.log")
        sampler = Sampler(self.pids(ref=ref))
        sampler.start()
        deadline = time.monotonic() + self.args.run_timeout
        try:
            while (result := _result_line(ref.log)) is None:
                if not ref.alive():
                    raise RunFailed(f"{label} exited with {ref.proc.returncode}:\n{ref.tail()}")
                if time.monotonic() > deadline:
                    raise RunFailed(f"{label}: not done in {self.args.run_timeout:.0f}s:\n{ref.tail()}")
                time.sleep(TICK)
            time.sleep(2 * TICK)  # one more sample after the last message
        finally:
            sampler.stop()
            if stop_after:
                ref.stop()
            else:
                ref.proc.wait(30)
        result["processes"] = sampler.summary(result["first"], result["last"])
        return result

    def passthrough_topic(self) -> str:
        name = f"bench.passthrough-{uuid.uuid4().hex[:6]}"
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        admin.create_topics([NewTopic(name, num_partitions=self.args.partitions, replication_factor=1)])[
            name
        ].result(timeout=30)
        return name

    # --- workers ----------------------------------------------------------------------------------------

    def start_worker(self, app_id: str, index: int) -> tuple[Spawned, int]:
        port = _free_port()
        data_dir = self.tmp / f"{app_id}-{index}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNISTITCH_", "KAFKA_BOOTSTRAP"))}
        env.update(
            {
                "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
                "KAFKA_BOOTSTRAP": self.bootstrap,
                "OMNISTITCH_APP_ID": app_id,
                "OMNISTITCH_DATA_DIR": str(data_dir),
                "OMNISTITCH_WEB_PORT": str(port),
                "OMNISTITCH_PARTITIONS": str(self.args.partitions),
                **self.worker_env,
            }
        )
        argv = [str(Path(sys.executable).parent / "omnistitch"), "worker", "-l", "info"]
        return spawn(f"worker-{index}", argv, self.tmp / f"{app_id}-{index}.log", env), port

    def workers(self, count: int, keep: bool) -> tuple[dict[str, Any], list[tuple[Spawned, int]]]:
        """Throughput of `count` fresh workers over the preloaded events; `keep` leaves them running."""
        app_id = self.app_id(f"w{count}")
        counter = OutputCounter(self.bootstrap, [EVENTS_RESOLVED.name, DLQ.name])
        counter.start()
        started = [self.start_worker(app_id, i + 1) for i in range(count)]
        procs = {s.name: s for s, _ in started}
        sampler = Sampler(self.pids(**procs))
        sampler.start()
        launched = time.time()
        active: dict[str, float] = {}
        deadline = time.monotonic() + self.args.run_timeout
        try:
            while counter.count < self.expect and time.monotonic() < deadline:
                for spawned, port in started:
                    if not spawned.alive():
                        raise RunFailed(f"{spawned.name} exited:\n{spawned.tail()}")
                    if spawned.name not in active and _counters(port).get(EVENTS_IN, 0) > 0:
                        active[spawned.name] = time.time()
                time.sleep(TICK)
            time.sleep(2 * TICK)
            counters = {s.name: _counters(port) for s, port in started}
        finally:
            counter.stop()
            sampler.stop()
            if not keep:
                for spawned, _ in started:
                    spawned.stop()
        if counter.first is None:
            raise RunFailed(f"{count} worker(s): no output in {self.args.run_timeout:.0f}s")
        done = counter.reached(self.expect)
        end = done or counter.samples[-1][0]
        # the steady window starts once every worker processes (the 2-worker rate is not a solo head start)
        window_start = max([counter.first, *active.values()]) if len(active) == count else counter.first
        before = counter.count_at(window_start)
        seen = counter.count_at(end)
        result = {
            "workers": count,
            "complete": done is not None,
            "outputs": seen,
            "startup_s": round(counter.first - launched, 1),
            "seconds": round(end - counter.first, 2),
            "overall_events_per_s": round(seen / (end - counter.first), 1) if end > counter.first else 0.0,
            "window_s": round(end - window_start, 2),
            "outputs_before_window": before,
            "events_per_s": round((seen - before) / (end - window_start), 1) if end > window_start else 0.0,
            "all_workers_active": len(active) == count,
            "counters_by_worker": counters,
            "processes": sampler.summary(window_start, end),
        }
        return result, started

    # --- latency ----------------------------------------------------------------------------------------

    def latency(
        self, workers: list[tuple[Spawned, int]], producers: dict[str, ChannelProducer], live: list[LiveEvent]
    ) -> dict[str, Any]:
        """Send `live` at a steady rate to the warm workers, stamping each event's occurred_at at send time.

        Pacing is done here, not by ChannelProducer's `rate`: one schedule across the per-source producers,
        and the stamp must be taken right before `produce`, after any pacing sleep.
        """
        rate = self.args.rate
        sent: dict[bytes, list[int]] = {}
        live_from_ms = int(time.time() * 1000)
        watcher = LatencyWatcher(self.bootstrap, sent, live_from_ms)
        watcher.start()
        sampler = Sampler(self.pids(**{worker.name: worker for worker, _ in workers}))
        counters_before = {worker.name: _counters(port) for worker, port in workers}
        sampler.start()
        began = time.monotonic()
        wall_began = time.time()
        try:
            for i, event in enumerate(live):
                ahead = began + i / rate - time.monotonic()
                if ahead > 0.001:
                    time.sleep(ahead)
                now_ms = int(time.time() * 1000)
                occurred = datetime.fromtimestamp(now_ms / 1000, UTC).isoformat(timespec="milliseconds")
                sent.setdefault(event.event_id, []).append(now_ms)
                producers[event.source].send_validated(event.head + occurred.encode() + event.tail, event.key)
                for worker, _ in workers:
                    if not worker.alive():
                        raise RunFailed(f"latency {worker.name} exited:\n{worker.tail()}")
            send_seconds = time.monotonic() - began
            wall_sent = time.time()
            counters_sent = {worker.name: _counters(port) for worker, port in workers}
            backlog = len(live) - len(watcher.resolved_ms)
            for producer in producers.values():
                producer.flush(60)
            deadline = time.monotonic() + self.args.drain_timeout
            while len(watcher.resolved_ms) < len(live) and time.monotonic() < deadline:
                time.sleep(TICK)
        finally:
            watcher.stop()
            sampler.stop()
        return {
            "workers": len(workers),
            "target_rate": rate,
            "sent": len(live),
            "achieved_rate": round(len(live) / send_seconds, 1),
            "resolved_seen": len(watcher.resolved_ms),
            "backlog_when_sending_ended": backlog,
            "resolved_ms": percentiles(watcher.resolved_ms),
            "resolved_in_worker_ms": percentiles(watcher.in_worker_ms),
            "profiles_ms": percentiles(watcher.profile_ms),
            "processes": sampler.summary(wall_began, wall_sent),
            "transactions": _transactions(counters_before, counters_sent, send_seconds),
        }

    def latency_after(
        self,
        run: dict[str, Any],
        warm: list[tuple[Spawned, int]],
        producers: dict[str, ChannelProducer],
        population: Population,
    ) -> dict[str, Any]:
        """The latency phase on the warm workers of `run`, unless they left preloaded events unprocessed."""
        pending = population.preloaded - run["outputs"]
        try:
            if pending:
                return {
                    "error": f"skipped: the workers had {pending:,} preloaded events left after "
                    f"{self.args.run_timeout:.0f}s; live events would queue behind them"
                }
            print(
                f"-- latency at {self.args.rate:,.0f} events/s for {self.args.latency_seconds:.0f}s …",
                flush=True,
            )
            return self.latency(warm, producers, population.live)
        except RunFailed as exc:
            return {"error": str(exc)}
        finally:
            for worker, _ in warm:
                worker.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _counters(port: int) -> dict[str, float]:
    """A worker's `omnistitch_*` counters, histogram counts and sums, over all labels ({} until it runs)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith("omnistitch_") and name.endswith(("_total", "_count", "_sum")):
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def _transactions(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], seconds: float
) -> dict[str, dict[str, float]]:
    """Per worker: partition transactions per second and input records per transaction over a window."""
    out: dict[str, dict[str, float]] = {}
    for name, end in after.items():
        start = before.get(name, {})
        count = end.get("omnistitch_batch_records_count", 0.0) - start.get(
            "omnistitch_batch_records_count", 0.0
        )
        records = end.get("omnistitch_batch_records_sum", 0.0) - start.get(
            "omnistitch_batch_records_sum", 0.0
        )
        out[name] = {
            "per_s": round(count / seconds, 1) if seconds > 0 else 0.0,
            "records_each": round(records / count, 1) if count else 0.0,
        }
    return out


def _result_line(log: Path) -> dict[str, Any] | None:
    """The reference's result line (faust logs a worker's stdout, so it may sit mid-line)."""
    for line in log.read_text(errors="replace").splitlines():
        at = line.find(RESULT_PREFIX)
        if at >= 0:
            result: dict[str, Any] = orjson.loads(line[at + len(RESULT_PREFIX) :].strip())
            return result
    return None


# ----------------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------------

RUN_LABELS = {
    "faust_count": "faust count-only agent, exactly-once (floor)",
    "passthrough": "confluent consumer→producer (ceiling)",
    "passthrough_txn": "confluent consumer→producer, transactions",
    "workers_1": "omnistitch worker x 1",
    "workers_2": "omnistitch worker x 2",
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def ratios(runs: dict[str, Any]) -> dict[str, float | None]:
    def rate(name: str) -> float | None:
        run = runs.get(name)
        return run.get("events_per_s") if run and "error" not in run else None

    return {
        "worker1_over_faust_floor": _ratio(rate("workers_1"), rate("faust_count")),
        "worker1_over_client_ceiling": _ratio(rate("workers_1"), rate("passthrough")),
        "worker1_over_client_ceiling_txn": _ratio(rate("workers_1"), rate("passthrough_txn")),
        "workers2_over_workers1": _ratio(rate("workers_2"), rate("workers_1")),
    }


def _processes_line(processes: dict[str, dict[str, float]]) -> str:
    ours = {n: p for n, p in processes.items() if n != MACHINE}
    cells = [f"{n} {p['cpu_pct']:.0f}% {p['rss_peak_mb']:.0f}MB" for n, p in ours.items()]
    total = sum(p["cpu_pct"] for p in ours.values())
    line = "  ".join(cells) + f"  | ours {total:.0f}%"
    if MACHINE in processes:
        machine = processes[MACHINE]["cpu_pct"]
        line += f", machine {machine:.0f}% (others {max(0.0, machine - total):.0f}%)"
    return line


def report(result: dict[str, Any]) -> None:
    runs, cfg = result["runs"], result["config"]
    print(
        f"\n== throughput: {cfg['events']:,} preloaded events, {cfg['partitions']} partitions per topic, "
        + (
            f"faust take({cfg['faust_take']}, within={cfg['faust_within']})"
            if cfg["faust_take"]
            else "faust per event"
        )
    )
    print(f"{'run':46} {'events/s':>10} {'per worker':>11} {'window s':>9}  notes")
    for name, label in RUN_LABELS.items():
        run = runs.get(name)
        if run is None:
            continue
        if "error" in run:
            print(f"{label:46} {'failed':>10}  {run['error'].splitlines()[0]}")
            continue
        per_worker = run["events_per_s"] / run.get("workers", 1)
        seconds = run.get("window_s", run.get("seconds", 0.0))
        notes = ""
        if "workers" in run:
            notes = (
                f"overall {run['overall_events_per_s']:,.0f}/s, startup {run['startup_s']}s, "
                f"{run['outputs_before_window']:,} before window"
                + ("" if run["complete"] else f", INCOMPLETE {run['outputs']:,}/{cfg['events']:,}")
                + ("" if run["all_workers_active"] else ", NOT ALL WORKERS VALIDATED ANYTHING")
            )
        print(f"{label:46} {run['events_per_s']:>10,.0f} {per_worker:>11,.0f} {seconds:>9.1f}  {notes}")
    print(
        f"\n== CPU (user+sys, 100% = one core of {os.cpu_count()}) and peak RSS per process over each window;"
        " machine = all tenants"
    )
    for name, label in RUN_LABELS.items():
        run = runs.get(name)
        if run and "processes" in run:
            print(f"{label:46} {_processes_line(run['processes'])}")
    lat = result.get("latency")
    if lat and "error" not in lat:
        print(
            f"\n== latency: {lat['workers']} warm worker(s), {lat['sent']:,} live events "
            f"at {lat['target_rate']:,.0f}/s "
            f"(achieved {lat['achieved_rate']:,.0f}/s), {lat['resolved_seen']:,} resolved seen"
        )
        if lat["backlog_when_sending_ended"] > lat["target_rate"]:
            print(
                f"   the workers fell behind: {lat['backlog_when_sending_ended']:,} events unresolved when "
                "sending ended, so these latencies measure a growing backlog"
            )
        print(f"{'path (ms)':46} {'n':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
        for key, label in (
            ("resolved_ms", "send → events.resolved at a consumer"),
            ("resolved_in_worker_ms", "send → resolved_at_ms (worker's stamp)"),
            ("profiles_ms", "last_activity_ms → profiles at a consumer"),
        ):
            p = lat[key]
            if p["n"]:
                print(f"{label:46} {p['n']:>8,} {p['p50']:>8} {p['p95']:>8} {p['p99']:>8} {p['max']:>8}")
            else:
                print(f"{label:46} {0:>8}")
        print(f"{'CPU / RSS while sending':46} {_processes_line(lat['processes'])}")
        txns = "  ".join(
            f"{name} {t['per_s']:,.0f}/s x {t['records_each']:,.1f} records"
            for name, t in lat["transactions"].items()
        )
        print(f"{'partition transactions while sending':46} {txns}")
    elif lat:
        print(f"\n== latency: {lat['error'].splitlines()[0]}")
    r = result["ratios"]
    w1, w2 = runs.get("workers_1", {}), runs.get("workers_2", {})
    p99 = (lat or {}).get("resolved_ms", {}).get("p99")
    print("\n== against the targets of issue 5")
    _target("1 worker events/s", w1.get("events_per_s"), f"≥ {TARGET_PER_WORKER:,}")
    _target(
        "2 workers events/s per worker", (w2.get("events_per_s") or 0) / 2 or None, f"≥ {TARGET_PER_WORKER:,}"
    )
    _target("1 worker ÷ faust count-only floor", r["worker1_over_faust_floor"], "≥ 1")
    _target("1 worker ÷ confluent passthrough", r["worker1_over_client_ceiling"], "(ceiling)")
    _target("1 worker ÷ confluent passthrough, txn", r["worker1_over_client_ceiling_txn"], "(ceiling)")
    _target("2 workers ÷ 1 worker", r["workers2_over_workers1"], f"≥ {TARGET_SCALING}")
    _target("p99 send → events.resolved, ms", p99, f"≤ {TARGET_P99_MS}")


def _target(label: str, value: float | None, target: str) -> None:
    shown = "n/a" if value is None else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    print(f"{label:46} {shown:>10}  target {target}")


# ----------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def measured(runs: dict[str, Any], name: str) -> Iterator[None]:
    """Record a failed measurement as an error and go on: one broken run should not hide the others."""
    print(f"-- {RUN_LABELS.get(name, name)} …", flush=True)
    try:
        yield
    except RunFailed as exc:
        runs[name] = {"error": str(exc)}
        print(f"   failed: {exc}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes (about 2-3 minutes)")
    parser.add_argument(
        "--events", type=int, help="events preloaded for throughput (default 300k, quick 20k)"
    )
    parser.add_argument("--rate", type=float, default=5000.0, help="live events/s of the latency phase")
    parser.add_argument("--latency-seconds", type=float, help="length of the latency phase (30, quick 8)")
    parser.add_argument(
        "--latency-workers", type=int, choices=(1, 2), default=2, help="warm workers of the latency phase"
    )
    parser.add_argument(
        "--partitions", type=int, default=8, help="partitions per topic (OMNISTITCH_PARTITIONS)"
    )
    parser.add_argument(
        "--faust-take", type=int, default=2000, help="count-only batch size (0 = per event); as the worker's"
    )
    parser.add_argument("--faust-within", type=float, default=0.02, help="count-only batch wait, seconds")
    parser.add_argument("--seed", type=int, default=1, help="simulator seed")
    parser.add_argument(
        "--run-timeout", type=float, help="seconds before a measurement gives up (120, quick 45)"
    )
    parser.add_argument(
        "--drain-timeout", type=float, help="wait for live events after sending (30, quick 15)"
    )
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="KEY=VALUE", help="extra worker environment"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    args.events = args.events or (20_000 if args.quick else 300_000)
    args.latency_seconds = args.latency_seconds or (8.0 if args.quick else 30.0)
    args.run_timeout = args.run_timeout or (45.0 if args.quick else 120.0)
    args.drain_timeout = args.drain_timeout or (15.0 if args.quick else 30.0)
    worker_env = dict(item.split("=", 1) for item in args.worker_env)

    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="omnistitch-bench-stream-"))
    state = tmp / "kafka"
    began = time.monotonic()
    ok = False
    producers: dict[str, ChannelProducer] = {}
    try:
        bootstrap = broker("up", state)
        broker_pid = int((state / "kafka.pid").read_text())
        print(f"broker {bootstrap} (pid {broker_pid}), scratch {tmp}", flush=True)
        settings = AppSettings(
            bootstrap=bootstrap, app_id=f"bench-{uuid.uuid4().hex[:6]}", partitions=args.partitions
        )
        create_topics(settings)
        live_count = int(args.rate * args.latency_seconds)
        population = prepare(tmp / "population", producers, bootstrap, args.events, live_count, args.seed)
        print(
            f"preloaded {population.preloaded:,} events in {population.preload_seconds:.1f}s "
            f"({population.invalid_skipped:,} invalid skipped); {len(population.live):,} kept for live",
            flush=True,
        )
        bench = Bench(
            args,
            bootstrap,
            broker_pid,
            tmp,
            [raw_topic(source) for source in settings.sources],
            population.preloaded,
            worker_env,
        )
        runs: dict[str, Any] = {}
        take = ["--take", str(args.faust_take), "--within", str(args.faust_within)]
        with measured(runs, "faust_count"):
            runs["faust_count"] = bench.reference("faust_count", "faust-count", *take, stop_after=True)
        for name, txn in (("passthrough", []), ("passthrough_txn", ["--transactions"])):
            with measured(runs, name):
                out = ["--out-topic", bench.passthrough_topic(), *txn]
                runs[name] = bench.reference(name, "passthrough", *out, stop_after=False)
        latency: dict[str, Any] = {"error": f"not run: the {args.latency_workers}-worker run failed"}
        for count in (2, 1):
            with measured(runs, f"workers_{count}"):
                keep = count == args.latency_workers
                runs[f"workers_{count}"], warm = bench.workers(count, keep=keep)
                if keep:
                    latency = bench.latency_after(runs[f"workers_{count}"], warm, producers, population)
        result = {
            "config": {
                "events": population.preloaded,
                "people": population.people,
                "invalid_skipped": population.invalid_skipped,
                "preload_seconds": round(population.preload_seconds, 1),
                "partitions": args.partitions,
                "faust_take": args.faust_take,
                "faust_within": args.faust_within,
                "latency_rate": args.rate,
                "latency_seconds": args.latency_seconds,
                "latency_workers": args.latency_workers,
                "quick": args.quick,
                "worker_env": worker_env,
            },
            "runs": runs,
            "latency": latency,
            "ratios": ratios(runs),
        }
        report(result)
        if args.json:
            args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
            print(f"\nJSON written to {args.json}")
        ok = True
    finally:
        stop_all()
        producers.clear()  # librdkafka clients go before the broker, or they log refused connections
        broker("down", state)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)
        print(f"bench_stream: {time.monotonic() - began:.0f}s", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)  # everything started was stopped in main's finally
