"""A minimal faust worker for the foundation test: aiokafka consumer, rocksdict table, exactly-once."""

from __future__ import annotations

import os

import faust

app = faust.App(
    os.environ["PROBE_APP_ID"],
    broker=f"kafka://{os.environ['KAFKA_BOOTSTRAP']}",
    store="rocksdb://",
    datadir=os.environ["PROBE_DATADIR"],
    processing_guarantee="exactly_once",
    topic_partitions=int(os.environ["PROBE_PARTITIONS"]),
    topic_replication_factor=1,
    web_enabled=False,
    key_serializer="raw",
    value_serializer="raw",
)
source = app.topic(os.environ["PROBE_TOPIC"], key_type=bytes, value_type=bytes)
seen = app.topic(os.environ["PROBE_OUT"], key_type=bytes, value_type=bytes)
counts = app.Table("counts", default=int, partitions=int(os.environ["PROBE_PARTITIONS"]))


@app.agent(source)
async def count(stream: faust.StreamT[bytes]) -> None:
    """Shard key: the message key (the table is co-partitioned with the source topic)."""
    async for event in stream.events():
        key = event.key.decode()
        counts[key] += 1
        # ("key", "partition the consumer read it from", "count so far")
        await seen.send(key=event.key, value=f"{key},{event.message.partition},{counts[key]}".encode())


if __name__ == "__main__":
    app.main()
