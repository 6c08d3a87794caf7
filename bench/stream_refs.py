"""Reference points for `bench_stream.py`, each run as its own process so its CPU and RSS are its own.

- `faust-count`: a faust-streaming app with the worker's broker settings and exactly-once, whose only agent
  counts events over all raw topics: the framework floor any faust worker pays before doing real work.
- `passthrough`: a plain confluent-kafka consumer → producer copying every raw message to a scratch topic,
  read_committed, with or without transactions: the client ceiling on the same broker and data.

Each prints one line `BENCH-RESULT {json}` (first/last wall-clock seconds and counts) once it has seen
`--expect` messages; `passthrough` then exits, `faust-count` is stopped by the bench.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

RESULT_PREFIX = "BENCH-RESULT "


def _report(first: float, first_n: int, last: float, count: int, **extra: Any) -> None:
    """The rate excludes the first batch: its messages were fetched before the clock started."""
    seconds = last - first
    rate = (count - first_n) / seconds if seconds > 0 else 0.0
    line = orjson.dumps(
        {
            "first": first,
            "last": last,
            "count": count,
            "seconds": round(seconds, 2),
            "events_per_s": round(rate, 1),
            **extra,
        }
    )
    print(RESULT_PREFIX + line.decode(), flush=True)


def faust_count(args: argparse.Namespace) -> None:
    """Count-only agent; `--take N` counts `stream.take(N, within=…)` batches, 0 iterates event by event."""
    import faust

    app = faust.App(
        args.app_id,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        datadir=str(args.data_dir),
        processing_guarantee="exactly_once",
        topic_partitions=args.partitions,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
    )
    topic = app.topic(*args.topics, key_type=bytes, value_type=bytes)
    seen: dict[str, Any] = {"count": 0, "first": None, "first_n": 0, "done": False}

    def note(n: int) -> None:
        now = time.time()
        if seen["first"] is None:
            seen["first"], seen["first_n"] = now, n
        seen["count"] += n
        if not seen["done"] and seen["count"] >= args.expect:
            seen["done"] = True
            _report(seen["first"], seen["first_n"], now, seen["count"], take=args.take)

    @app.agent(topic)
    async def count(stream: Any) -> None:
        if args.take:
            async for batch in stream.take(args.take, within=args.within):
                note(len(batch))
        else:
            async for _ in stream:
                note(1)

    faust.Worker(app, loglevel="warn").execute_from_commandline()


def passthrough(args: argparse.Namespace) -> None:
    """Copy raw → scratch topic; `--transactions`: one transaction (messages + offsets) per poll batch."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.app_id,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": not args.transactions,
        }
    )
    config: dict[str, Any] = {
        "bootstrap.servers": args.bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "partitioner": "murmur2_random",
    }
    if args.transactions:
        config["transactional.id"] = f"{args.app_id}-tx"
    producer = Producer(config)
    if args.transactions:
        producer.init_transactions()
    consumer.subscribe(args.topics)
    count, first, first_n = 0, 0.0, 0
    while count < args.expect:
        messages = consumer.consume(num_messages=args.batch, timeout=0.5)
        if not messages:
            continue
        if not count:
            first, first_n = time.time(), len(messages)
        if args.transactions:
            producer.begin_transaction()
        for message in messages:
            if message.error():
                continue
            while True:
                try:
                    producer.produce(args.out_topic, message.value(), message.key())
                    break
                except BufferError:
                    producer.poll(0.05)
            count += 1
        if args.transactions:
            positions = [tp for tp in consumer.position(consumer.assignment()) if tp.offset >= 0]
            producer.send_offsets_to_transaction(
                [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in positions],
                consumer.consumer_group_metadata(),
            )
            producer.commit_transaction()
        else:
            producer.poll(0)
    remaining = producer.flush(60)
    _report(first, first_n, time.time(), count, transactions=args.transactions, undelivered=remaining)
    consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["faust-count", "passthrough"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--app-id", required=True, help="faust app id / consumer group (unique per run)")
    parser.add_argument("--topics", required=True, type=lambda s: s.split(","), help="comma-separated")
    parser.add_argument("--expect", required=True, type=int, help="messages to see before reporting")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, default=Path("."))
    parser.add_argument("--take", type=int, default=2000, help="faust-count batch size (0 = per event)")
    parser.add_argument("--within", type=float, default=0.02, help="faust-count batch wait, seconds")
    parser.add_argument("--out-topic", default="", help="passthrough destination")
    parser.add_argument("--transactions", action="store_true", help="passthrough inside transactions")
    parser.add_argument("--batch", type=int, default=2000, help="passthrough messages per poll")
    args = parser.parse_args()
    if args.mode == "faust-count":
        faust_count(args)
    else:
        if not args.out_topic:
            sys.exit("passthrough needs --out-topic")
        passthrough(args)


if __name__ == "__main__":
    main()
