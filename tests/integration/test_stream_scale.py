"""The partitioned stream app at scale and under faults (issue 5, tests 2 to 4), each on a broker of its own.

A simulated population (≥ 50k events) is produced to all raw topics at once while 2 or 3 workers share the
8 partitions; workers are killed with SIGKILL, added and removed mid-stream. Everything is read back
`read_committed` and compared with the single-process core replaying the same events:
- every input event appears exactly once in `events.resolved` or `dlq`;
- orders and revenue summed over live profiles equal the sums over the input;
- no identifier is in two live profiles; with protection off the identifier partition *equals* the replay's,
  with protection on pairwise F1 against the replay is at least 0.995 (issue 5).
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from streams.app.topics import create_topics, internal_topic, raw_topic
from streams.config import DEFAULT_SOURCES, AppSettings
from streams.core import IdentityGraph, MemoryStore, Rules
from streams.core.rules import load_rules
from streams.core.state import ORDER_TYPES
from streams.evaluate import assignments_from_resolved, score
from streams.exceptions import InvalidEvent
from streams.produce import ChannelProducer
from streams.simulate import SimConfig, simulate
from streams.topic_reader import committed_messages, end_offsets, read_to_end
from streams.validate import validate_event
from tests.integration.workers import BrokerError, Worker, localkafka, wait_for

PARTITIONS = 8
# ~12.9 events per simulated person: 4,000 people ≈ 51k events
PEOPLE = 4_000
LIVE_RATE = 5_000  # events/s: the rate the latency target is set at
UNPROTECTED_RULES = """
[protection]
enabled = false
corroborate_soft_bridges = false
[generic]
enabled = false
[shared_devices]
enabled = false
"""


@dataclass
class Cluster:
    """A fresh broker, the app's topics, and the workers started on it (all stopped at the end)."""

    bootstrap: str
    app_id: str
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def start(self, data_dir: Path | None = None) -> Worker:
        worker = Worker(self.bootstrap, self.tmp, self.app_id, self.env, data_dir)
        self.workers.append(worker)
        worker.wait_ready()
        return worker


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    state = tmp_path / "kafka"
    try:
        bootstrap = localkafka("up", state)
    except BrokerError as exc:
        pytest.fail(str(exc), pytrace=False)
    app_id = f"scale-{uuid.uuid4().hex[:8]}"
    create_topics(AppSettings(bootstrap=bootstrap, app_id=app_id, partitions=PARTITIONS))
    running = Cluster(bootstrap, app_id, tmp_path, {"OMNISTITCH_PARTITIONS": str(PARTITIONS)})
    try:
        yield running
    finally:
        for worker in running.workers:
            worker.stop()
        localkafka("down", state)


@dataclass
class Population:
    """The simulated input in time order, its invalid extras, and each valid order's amount."""

    lines: list[bytes]
    bad: list[bytes]
    valid_ids: Counter[str]
    orders: dict[str, tuple[str, Decimal] | None]  # event_id → (currency, total), None without a total


def _population(tmp: Path, people: int, seed: int) -> Population:
    out = tmp / "sim"
    simulate(SimConfig(people=people, days=30, seed=seed, duplicate_rate=0.0), out)
    lines = (out / "all.jsonl").read_bytes().splitlines()
    valid: Counter[str] = Counter()
    orders: dict[str, tuple[str, Decimal] | None] = {}
    for line in lines:
        try:
            event = validate_event(line)
        except InvalidEvent:
            continue
        valid[event.event_id] += 1
        if event.type in ORDER_TYPES:
            total = event.attributes.get("total")
            currency = str(event.attributes.get("currency") or "XXX")
            orders[event.event_id] = None if total is None else (currency, Decimal(str(total)))
    # broken messages a real channel also sends: each must reach the DLQ exactly once, crash or not
    bad = [f'{{"schema_version": 1, "event_id": "bad-{i}", "broken'.encode() for i in range(25)]
    return Population(lines, bad, valid, orders)


class Feed(threading.Thread):
    """Produces the population to its raw topics (one producer per source, all at once), optionally paced."""

    def __init__(self, bootstrap: str, population: Population, rate: float | None) -> None:
        super().__init__(daemon=True)
        self.bootstrap = bootstrap
        self.population = population
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producers: dict[str, ChannelProducer] = {}
            began = time.monotonic()
            for i, line in enumerate(self.population.lines):
                source = orjson.loads(line)["source"]
                producer = producers.get(source)
                if producer is None:
                    producer = producers[source] = ChannelProducer(source, bootstrap=self.bootstrap)
                key, _ = producer.validate(line)
                producer.send_validated(line, key)
                self.sent += 1
                if self.rate is not None and i % 100 == 0:
                    ahead = began + i / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            for producer in producers.values():
                assert producer.flush() == 0, producer.stats
            raw = Producer({"bootstrap.servers": self.bootstrap})
            for value in self.population.bad:
                raw.produce("raw.web", value)
            assert raw.flush(30) == 0
        except BaseException as exc:  # reported by the test thread
            self.error = exc


def _unconsumed(cluster: Cluster) -> int:
    """Input records (raw and internal) past the offsets the app's group has committed: work not done yet.

    Stable output topics are not enough: partitions of a worker killed right after joining stall, sending
    nothing, until the group's session timeout hands them on, with merges still waiting in them.
    """
    internal = internal_topic(AppSettings(app_id=cluster.app_id))
    inputs = [internal, *(raw_topic(source) for source in DEFAULT_SOURCES)]
    consumer = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": cluster.app_id})
    try:
        committed = consumer.committed(
            [TopicPartition(topic, p) for topic in inputs for p in range(PARTITIONS)], timeout=10
        )
    finally:
        consumer.close()
    starts = {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else OFFSET_BEGINNING for tp in committed}
    return sum(1 for _ in committed_messages(cluster.bootstrap, starts, 60))


@dataclass
class Outputs:
    """What the app published, read back `read_committed`."""

    resolved: list[dict[str, Any]]
    dlq_ids: list[str]
    changes: list[dict[str, Any]]
    live: dict[str, dict[str, Any]]
    snapshots: list[tuple[str, dict[str, Any] | None]]  # every `profiles` record, each key's in order


def _read_outputs(bootstrap: str) -> Outputs:
    resolved = [orjson.loads(m.value()) for m in read_to_end(bootstrap, "events.resolved")]
    dlq_ids = []
    for m in read_to_end(bootstrap, "dlq"):
        original = base64.b64decode(orjson.loads(m.value())["original_value_b64"])
        marker = original.split(b'"event_id": "', 1)[1].split(b'"', 1)[0]
        dlq_ids.append(marker.decode())
    changes = [orjson.loads(m.value()) for m in read_to_end(bootstrap, "identity.changes")]
    snapshots = [
        (m.key().decode(), None if m.value() is None else orjson.loads(m.value()))
        for m in read_to_end(bootstrap, "profiles")
    ]
    latest = dict(snapshots)
    live = {key: snapshot for key, snapshot in latest.items() if snapshot is not None}
    return Outputs(resolved, dlq_ids, changes, live, snapshots)


def _wait_quiescent(cluster: Cluster, population: Population, timeout: float = 300) -> Outputs:
    """Until every input is accounted for and no partition has sent anything for a while."""
    expected = len(population.valid_ids) + len(population.bad)

    def all_out() -> bool:
        seen = set(
            orjson.loads(m.value())["event_id"] for m in read_to_end(cluster.bootstrap, "events.resolved")
        )
        return len(seen) + len(read_to_end(cluster.bootstrap, "dlq")) >= expected

    try:
        wait_for("every input resolved or dead-lettered", all_out, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; unresolved valid input: {_unresolved(cluster.bootstrap)}") from None
    topics = [internal_topic(AppSettings(app_id=cluster.app_id)), "profiles", "identity.changes"]
    watched = [(topic, p) for topic in topics for p in range(PARTITIONS)]
    while True:  # quiet for 5 s, and every input record (raw and internal) handled and committed
        wait_for("every input record consumed", lambda: _unconsumed(cluster) == 0, timeout=timeout)
        last = end_offsets(cluster.bootstrap, watched)
        stable_since = time.monotonic()
        while time.monotonic() - stable_since < 5:
            time.sleep(1)
            now = end_offsets(cluster.bootstrap, watched)
            if now != last:
                last, stable_since = now, time.monotonic()
        if _unconsumed(cluster) == 0:
            return _read_outputs(cluster.bootstrap)


def _unresolved(bootstrap: str) -> dict[str, list[int]]:
    """Offsets of the valid raw records whose event is in no `events.resolved` record, by topic partition."""
    resolved = {orjson.loads(m.value())["event_id"] for m in read_to_end(bootstrap, "events.resolved")}
    missing: dict[str, list[int]] = {}
    for topic in (raw_topic(source) for source in DEFAULT_SOURCES):
        for m in read_to_end(bootstrap, topic):
            try:
                event_id = orjson.loads(m.value())["event_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # one of the invalid extras: accounted for in `dlq`
            if event_id not in resolved:
                missing.setdefault(f"{topic}[{m.partition()}]", []).append(m.offset())
    return missing


def _replay(population: Population, rules: Rules) -> tuple[dict[str, str | None], list[set[str]]]:
    """The single-process core over the same events in time order: final assignments and identifier sets."""
    graph = IdentityGraph(MemoryStore(), rules)
    linked: list[tuple[str, str | None, str | None]] = []
    for line in population.lines:
        try:
            event = validate_event(line)
        except InvalidEvent:
            continue
        result = graph.link(event)
        linked.append((event.event_id, result.profile_id, result.anchor))
    graph.flush()
    final = {event_id: graph.final_profile(pid, anchor) for event_id, pid, anchor in linked}
    groups: dict[str, set[str]] = {}
    for key, pid in graph.iter_identifiers():
        live = graph.resolve(pid)
        if live is not None:
            groups.setdefault(live, set()).add(key)
    return final, list(groups.values())


def _identifier_sets(outputs: Outputs) -> list[set[str]]:
    return [
        {f"{type_}:{seen['value']}" for type_, values in profile["identifiers"].items() for seen in values}
        for profile in outputs.live.values()
    ]


def _check_exactly_once_and_sums(outputs: Outputs, population: Population) -> None:
    counted = Counter(r["event_id"] for r in outputs.resolved) + Counter(outputs.dlq_ids)
    expected = population.valid_ids + Counter(f"bad-{i}" for i in range(len(population.bad)))
    assert counted == expected, {
        "duplicated": sum(1 for k, n in counted.items() if n > expected.get(k, 0)),
        "missing": sum(1 for k in expected if k not in counted),
    }
    # an order resolved to no profile (only blocked or generic identifiers) is counted nowhere, as in the core
    attributed = {r["event_id"] for r in outputs.resolved if r["profile_id"] is not None}
    expected_orders = [amount for event_id, amount in population.orders.items() if event_id in attributed]
    expected_revenue: dict[str, Decimal] = {}
    for amount in expected_orders:
        if amount is not None:
            expected_revenue[amount[0]] = expected_revenue.get(amount[0], Decimal(0)) + amount[1]
    orders = sum(p["orders"]["count"] for p in outputs.live.values())
    revenue: dict[str, Decimal] = {}
    for profile in outputs.live.values():
        for currency, amount in profile["orders"]["revenue"].items():
            revenue[currency] = revenue.get(currency, Decimal(0)) + Decimal(amount)
    assert (orders, revenue) == (len(expected_orders), expected_revenue)
    sets = _identifier_sets(outputs)
    everywhere = Counter(key for keys in sets for key in keys)
    assert not [key for key, n in everywhere.items() if n > 1], "an identifier is in two live profiles"


def _check_profiles_only_move_forward(outputs: Outputs) -> None:
    """No profile goes back in time: a worker that restored a stale table row would repeat a change `seq`
    (`identity.changes`) or publish fewer orders than before (`profiles`), sums alone may not show it."""
    repeated = []
    last_seq: dict[str, int] = {}
    for change in outputs.changes:
        profile_id, seq = change["profile_id"], change["seq"]
        if seq <= last_seq.get(profile_id, 0):
            repeated.append((profile_id, last_seq[profile_id], seq, change["kind"]))
        last_seq[profile_id] = seq
    assert not repeated, f"{len(repeated)} changes repeat or precede a seq: {repeated[:5]}"
    went_back = []
    last: dict[str, tuple[int, int]] = {}
    for key, snapshot in outputs.snapshots:
        if snapshot is None:
            continue
        now = (snapshot["seq"], snapshot["orders"]["count"])
        before = last.get(key, now)
        if now[0] < before[0] or now[1] < before[1]:
            went_back.append((key, before, now))
        last[key] = now
    assert not went_back, f"{len(went_back)} profile snapshots went back (seq, orders): {went_back[:5]}"


def _check_no_state_lost(cluster: Cluster) -> None:
    """A protocol message for a profile its home does not know means a table was not restored."""
    for worker in cluster.workers:
        if worker.proc.poll() is None:
            assert 'reason="unknown_profile"' not in worker.metrics(), worker.log


def _stream_assignments(outputs: Outputs) -> dict[str, str | None]:
    return assignments_from_resolved(iter(outputs.resolved), iter(outputs.changes))


def _feed_and_wait(
    cluster: Cluster, population: Population, rate: float | None, at: Callable[[Feed], None]
) -> Outputs:
    feed = Feed(cluster.bootstrap, population, rate)
    feed.start()
    at(feed)
    feed.join(600)
    assert feed.error is None, feed.error
    outputs = _wait_quiescent(cluster, population)
    _check_no_state_lost(cluster)
    return outputs


def _when(feed: Feed, share: float) -> None:
    wait_for(f"{share:.0%} of the feed", lambda: feed.sent >= share * len(feed.population.lines), timeout=300)


def test_two_workers_equal_the_replay_without_protection(cluster: Cluster) -> None:
    rules_file = cluster.tmp / "unprotected.toml"
    rules_file.write_text(UNPROTECTED_RULES)
    cluster.env["OMNISTITCH_RULES_FILE"] = str(rules_file)
    population = _population(cluster.tmp, PEOPLE, seed=5)
    assert len(population.valid_ids) >= 50_000
    cluster.start()
    cluster.start()
    outputs = _feed_and_wait(cluster, population, rate=None, at=lambda feed: None)
    _check_exactly_once_and_sums(outputs, population)
    _check_profiles_only_move_forward(outputs)
    _, replay_sets = _replay(population, load_rules(rules_file))
    stream_sets = _identifier_sets(outputs)
    assert sorted(map(sorted, stream_sets)) == sorted(map(sorted, replay_sets))


def test_two_workers_match_the_replay_with_protection(cluster: Cluster) -> None:
    population = _population(cluster.tmp, PEOPLE, seed=6)
    cluster.start()
    cluster.start()
    # live traffic, as the stream sees it in production (a backfill belongs to `omnistitch replay`)
    outputs = _feed_and_wait(cluster, population, rate=LIVE_RATE, at=lambda feed: None)
    _check_exactly_once_and_sums(outputs, population)
    _check_profiles_only_move_forward(outputs)
    replay_final, _ = _replay(population, load_rules(None))
    # the replay is the reference: an event it leaves without a profile is a singleton
    reference = {event_id: pid or f"none:{event_id}" for event_id, pid in replay_final.items()}
    scores = score(reference, _stream_assignments(outputs))
    print(f"stream vs replay: {scores}")
    # issue 5: >= 0.995. Measured 0.9975-0.9990 in 0.3.2 (0.3.1: 0.9924-0.9944): shared devices as in the
    # core, merges judged on every identifier of the event and, for the evidence rules, on the event's time
    assert scores.pairwise_f1 >= 0.995, scores


def test_kill_9_and_restart_mid_stream_loses_and_repeats_nothing(cluster: Cluster) -> None:
    population = _population(cluster.tmp, PEOPLE, seed=7)
    cluster.start()
    victim = cluster.start()

    def kill_and_restart(feed: Feed) -> None:
        _when(feed, 0.4)
        victim.kill()
        _when(feed, 0.6)
        cluster.start(data_dir=victim.data_dir)

    outputs = _feed_and_wait(cluster, population, rate=LIVE_RATE, at=kill_and_restart)
    _check_exactly_once_and_sums(outputs, population)
    _check_profiles_only_move_forward(outputs)


def test_a_third_worker_joins_and_leaves_mid_stream(cluster: Cluster) -> None:
    population = _population(cluster.tmp, PEOPLE, seed=8)
    cluster.start()
    cluster.start()

    def scale_out_and_in(feed: Feed) -> None:
        _when(feed, 0.3)
        third = cluster.start()
        _when(feed, 0.6)
        third.stop()
        _when(feed, 0.8)
        cluster.start().kill()  # and one that dies right after joining

    outputs = _feed_and_wait(cluster, population, rate=LIVE_RATE, at=scale_out_and_in)
    _check_exactly_once_and_sums(outputs, population)
    _check_profiles_only_move_forward(outputs)
