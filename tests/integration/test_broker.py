"""The broker is real: confluent-kafka produces, a faust (aiokafka) worker consumes into a rocksdb table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from streams.topic_reader import read_to_end as read_topic

PARTITIONS = 4
KEYS = [f"phone:+7916{n:07d}" for n in range(200)]


def _java_partition(key: bytes, partitions: int) -> int:
    """Kafka's Java default partitioner (and faust's): murmur2, sign bit cleared, modulo partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_confluent_murmur2_random_matches_java_partitioner(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic("partitioner", PARTITIONS)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    landed: dict[str, int] = {}

    def record(err: object, msg: object) -> None:
        assert err is None, err
        landed[msg.key().decode()] = msg.partition()  # type: ignore[attr-defined]

    for key in KEYS:
        producer.produce(topic, key=key.encode(), value=b"x", on_delivery=record)
    assert producer.flush(30) == 0
    assert landed == {key: _java_partition(key.encode(), PARTITIONS) for key in KEYS}
    assert len(set(landed.values())) == PARTITIONS


def test_faust_worker_consumes_into_rocksdb_table_with_changelog(
    kafka_bootstrap: str, kafka_admin: AdminClient, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    source, out = new_topic("probe-in", PARTITIONS), new_topic("probe-out", PARTITIONS)
    app_id = f"probe-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for key in KEYS:
        for _ in range(2):
            producer.produce(source, key=key.encode(), value=b"{}")
    assert producer.flush(30) == 0

    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": kafka_bootstrap,
        "PROBE_APP_ID": app_id,
        "PROBE_TOPIC": source,
        "PROBE_OUT": out,
        "PROBE_PARTITIONS": str(PARTITIONS),
        "PROBE_DATADIR": str(tmp_path / "data"),
    }
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed in finally
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("probe_app.py")), "worker", "-l", "warn"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"reader-{app_id}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([out])
    rows: list[tuple[str, int, int]] = []
    try:
        deadline = time.monotonic() + 120
        while len(rows) < 2 * len(KEYS) and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            key, partition, count = msg.value().decode().split(",")
            rows.append((key, int(partition), int(count)))
    finally:
        consumer.close()
        worker.terminate()
        worker.wait(60)
        log.close()

    assert len(rows) == 2 * len(KEYS), (tmp_path / "worker.log").read_text()[-3000:]
    # faust read each key from the partition the Java partitioner gives it, and counted it twice
    assert {(k, p) for k, p, _ in rows} == {(k, _java_partition(k.encode(), PARTITIONS)) for k in KEYS}
    assert sorted(c for k, _, c in rows if k == KEYS[0]) == [1, 2]
    # the table is on RocksDB on disk, and its changelog is a real topic on the broker
    assert list((tmp_path / "data").rglob("*.sst")) or list((tmp_path / "data").rglob("CURRENT"))
    changelog = f"{app_id}-counts-changelog"
    topics = kafka_admin.list_topics(timeout=10).topics
    assert changelog in topics
    assert len(topics[changelog].partitions) == PARTITIONS
    latest = {msg.key(): msg.value() for msg in read_topic(kafka_bootstrap, changelog)}
    assert len(latest) == len(KEYS)
    assert set(latest.values()) == {b"2"}
