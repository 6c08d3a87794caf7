"""The worker's own table restore against a real broker: transactional changelogs, markers, aborts."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rocksdict import Options, Rdict

from streams.app.restore import RESTORED_OFFSET_KEY, ChangelogRestorer


def _transaction(producer: Producer, topic: str, rows: list[tuple[bytes, bytes]], *, commit: bool) -> None:
    producer.begin_transaction()
    for key, value in rows:
        producer.produce(topic, value, key, partition=0)
    producer.flush(30)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def test_a_restore_applies_committed_records_past_the_restored_offset_and_records_how_far(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic("changelog", partitions=1, config={"cleanup.policy": "compact"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    _transaction(producer, topic, [(b"a", b"a1"), (b"b", b"b1")], commit=True)
    _transaction(producer, topic, [(b"a", b"aborted")], commit=False)
    _transaction(producer, topic, [(b"a", b"a2"), (b"c", b"c1")], commit=True)
    db = Rdict(str(tmp_path / "rows.db"), options=Options(raw_mode=True))
    restorer = ChangelogRestorer(kafka_bootstrap)

    assert restorer.restore({(topic, 0): db}) == 4
    assert (db.get(b"a"), db.get(b"b"), db.get(b"c")) == (b"a2", b"b1", b"c1")
    # offsets: a1 b1 marker, aborted marker, a2 c1 marker: the last record applied is c1 at 6
    assert db.get(RESTORED_OFFSET_KEY) == b"6"

    db.put(b"b", b"written by this worker")  # as a batch does; its changelog record follows
    _transaction(producer, topic, [(b"b", b"b2")], commit=True)
    assert restorer.restore({(topic, 0): db}) == 1  # only what lies past the restored offset
    assert (db.get(b"a"), db.get(b"b"), db.get(RESTORED_OFFSET_KEY)) == (b"a2", b"b2", b"8")

    assert restorer.restore({(topic, 0): db}) == 0  # at the end already: nothing read, nothing written
    db.close()


def test_a_database_ahead_of_its_changelog_is_rebuilt_from_it(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Topics recreated (or another cluster) under a kept data dir: the database says it holds the changelog
    up to offset 40, the changelog has 2 records. Its rows are no one's: rebuilt from the log (0.3.3 resumed
    past the end and kept them, so a profile showed orders no topic had)."""
    topic = new_topic("changelog", partitions=1, config={"cleanup.policy": "compact"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    _transaction(producer, topic, [(b"a", b"a1"), (b"b", b"b1")], commit=True)
    db = Rdict(str(tmp_path / "rows.db"), options=Options(raw_mode=True))
    db.put(b"stale", b"from the old cluster")
    db.put(b"a", b"old a")
    db.put(RESTORED_OFFSET_KEY, b"40")

    assert ChangelogRestorer(kafka_bootstrap).restore({(topic, 0): db}) == 2
    assert (db.get(b"stale"), db.get(b"a"), db.get(b"b")) == (None, b"a1", b"b1")
    assert db.get(RESTORED_OFFSET_KEY) == b"1"
    db.close()


def test_a_database_from_a_changelog_since_recreated_is_rebuilt_even_when_the_new_one_is_longer(
    kafka_bootstrap: str, kafka_admin: AdminClient, tmp_path: Path
) -> None:
    """The changelog topic was deleted and created again, and has grown past the offset the database holds:
    only its id tells the logs apart (the offset check alone resumed mid-log with the old rows)."""
    topic = f"changelog-{uuid.uuid4().hex[:10]}"

    def create() -> None:
        deadline = time.monotonic() + 60
        while True:  # a deleted topic's name is free again only once the deletion completes
            futures = kafka_admin.create_topics([NewTopic(topic, 1, 1, config={"cleanup.policy": "compact"})])
            try:
                futures[topic].result(timeout=30)
                return
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def fill(rows: list[tuple[bytes, bytes]]) -> None:
        producer = Producer(
            {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}"}
        )
        producer.init_transactions(30)
        _transaction(producer, topic, rows, commit=True)

    create()
    fill([(b"old", b"1")])
    db = Rdict(str(tmp_path / "rows.db"), options=Options(raw_mode=True))
    restorer = ChangelogRestorer(kafka_bootstrap)
    assert restorer.restore({(topic, 0): db}) == 1 and db.get(RESTORED_OFFSET_KEY) == b"0"
    kafka_admin.delete_topics([topic])[topic].result(timeout=30)
    create()
    fill([(f"new{i}".encode(), b"2") for i in range(5)])

    assert restorer.restore({(topic, 0): db}) == 5
    assert db.get(b"old") is None and db.get(b"new0") == b"2" and db.get(RESTORED_OFFSET_KEY) == b"4"
    db.close()
