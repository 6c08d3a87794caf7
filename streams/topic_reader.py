"""Reading a topic to its current end as a downstream consumer would (read_committed): CLI and tests."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Message, TopicPartition

__all__ = ["TopicNotFound", "read_to_end"]


class TopicNotFound(LookupError):
    """The topic does not exist on the cluster (a typo, or the app never created it)."""


def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Message]:
    """Every committed message of `topic` up to the end it has now, by partition; no offsets kept."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"omnistitch-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise TopicNotFound(f"topic {topic!r} not found on {bootstrap}")
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in metadata.partitions
        }
        pending = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                # under read_committed the end may be a transaction marker: done once the position passes it
                for tp in consumer.position([TopicPartition(topic, p) for p in list(pending)]):
                    if tp.offset >= ends[tp.partition]:
                        pending.discard(tp.partition)
                continue
            if msg.error():
                continue
            messages.append(msg)
            if (msg.offset() or 0) + 1 >= ends[msg.partition()]:
                pending.discard(msg.partition())
        if pending:
            raise TimeoutError(f"{topic}: partitions {sorted(pending)} not read to the end in {timeout}s")
        return messages
    finally:
        consumer.close()
