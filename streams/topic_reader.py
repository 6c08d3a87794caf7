"""Reading topics to their current end as a downstream consumer would (read_committed): CLI, worker, tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

__all__ = ["TopicNotFound", "committed_messages", "end_offsets", "read_to_end", "topic_ids"]


class TopicNotFound(LookupError):
    """The topic does not exist on the cluster (a typo, or the app never created it)."""


def committed_messages(
    bootstrap: str, starts: Mapping[tuple[str, int], int], timeout: float
) -> Iterator[Message]:
    """Committed messages of each (topic, partition) from its start offset to the end it has now.

    In offset order per partition. The end is librdkafka's partition EOF, which a `read_committed` consumer
    reaches past trailing transaction markers and aborted records. Raises TimeoutError when some partition has
    not reached its end after `timeout` seconds.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"omnistitch-reader-{uuid.uuid4().hex}",  # assigned, never joins or commits
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 20,  # the end is what a reader waits for: empty fetches return at once
        }
    )
    try:
        consumer.assign(
            [TopicPartition(topic, partition, start) for (topic, partition), start in starts.items()]
        )
        pending = set(starts)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"partitions {sorted(pending)} not read to the end in {timeout}s")
            for message in consumer.consume(1000, timeout=0.05):
                key = (message.topic() or "", message.partition() or 0)
                error = message.error()
                if error is None:
                    if key in pending:  # past its end: written since, not asked for
                        yield message
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(key)
                elif error.fatal():
                    raise KafkaException(error)
                # other errors are transient: librdkafka retries by itself
    finally:
        consumer.close()


def end_offsets(
    bootstrap: str, partitions: Iterable[tuple[str, int]], timeout: float = 30.0
) -> dict[tuple[str, int], int]:
    """The offset each (topic, partition) ends at now for a `read_committed` reader (the last stable offset:
    librdkafka answers watermark queries by the consumer's isolation level, read_committed by default)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"omnistitch-reader-{uuid.uuid4().hex}"})
    try:
        return {
            (topic, partition): consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )[1]
            for topic, partition in partitions
        }
    finally:
        consumer.close()


def topic_ids(bootstrap: str, topics: Iterable[str], timeout: float = 30.0) -> dict[str, str]:
    """Each topic's id: a topic deleted and created again under the same name gets a new one."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.describe_topics(TopicCollection(sorted(set(topics))))
    return {name: str(future.result(timeout=timeout).topic_id) for name, future in futures.items()}


def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Message]:
    """Every committed message of `topic` up to the end it has now, by partition; no offsets kept."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise TopicNotFound(f"topic {topic!r} not found on {bootstrap}")
    starts = dict.fromkeys(((topic, partition) for partition in metadata.partitions), OFFSET_BEGINNING)
    return list(committed_messages(bootstrap, starts, timeout))
