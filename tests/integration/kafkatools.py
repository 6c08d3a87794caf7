"""Reading topics back in tests: to the end of what is committed, as a downstream consumer would."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Message, TopicPartition


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Message]:
    """Every committed message of `topic` (read_committed), in partition order, up to the current end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions
        }
        pending = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                # under read_committed the end may be a transaction marker: past it when position reaches end
                for tp in consumer.position([TopicPartition(topic, p) for p in list(pending)]):
                    if tp.offset >= ends[tp.partition]:
                        pending.discard(tp.partition)
                continue
            if msg.error():
                continue
            messages.append(msg)
            if msg.offset() + 1 >= ends[msg.partition()]:
                pending.discard(msg.partition())
        if pending:
            raise TimeoutError(f"{topic}: partitions {sorted(pending)} not read to the end in {timeout}s")
        return messages
    finally:
        consumer.close()
