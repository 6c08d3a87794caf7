"""The producer against a real broker: keys, murmur2 partitions, strict files and summary counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from typer.testing import CliRunner

from streams.cli import app
from streams.produce import ChannelProducer, event_key, murmur2_partition, produce_files
from streams.simulate import SimConfig, simulate
from streams.topic_reader import read_to_end as read_topic
from streams.validate import validate_event

pytestmark = pytest.mark.integration


def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "end-offsets-probe"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions
        }
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def pos_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    simulate(SimConfig(people=600, days=4, seed=11), out)
    return out / "raw.pos.jsonl"


def test_events_land_keyed_by_strongest_identifier_on_the_murmur2_partition(
    kafka_bootstrap: str, new_topic: Callable[..., str], pos_file: Path
) -> None:
    topic = new_topic("raw-pos", partitions=3)
    producer = ChannelProducer("pos", topic=topic, bootstrap=kafka_bootstrap)
    stats = produce_files([pos_file], producer)
    lines = pos_file.read_bytes().splitlines()
    assert stats.lines == stats.valid == stats.sent == stats.delivered == len(lines) > 20
    assert stats.invalid == stats.failed == 0

    messages = read_topic(kafka_bootstrap, topic)
    assert len(messages) == len(lines)
    assert sorted(m.value() for m in messages) == sorted(lines)
    for msg in messages:
        expected = event_key(validate_event(msg.value()))
        assert msg.key() == expected
        assert expected is not None
        assert msg.partition() == murmur2_partition(expected, 3)
    assert len({m.partition() for m in messages}) == 3


def test_bad_line_reported_by_number_and_nothing_sent(
    kafka_bootstrap: str, new_topic: Callable[..., str], pos_file: Path, tmp_path: Path
) -> None:
    topic = new_topic("raw-pos-bad", partitions=3)
    lines = pos_file.read_bytes().splitlines()[:10]
    lines.insert(6, b'{"schema_version": 1, "event_id": "x"}')
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    result = CliRunner().invoke(
        app,
        ["produce", "--source", "pos", "--topic", topic, "--bootstrap", kafka_bootstrap, str(bad), "--json"],
    )
    assert result.exit_code == 1
    summary = orjson.loads(result.stdout)
    assert summary["sent"] == 0 and summary["invalid"] == 1 and summary["valid"] == 10
    assert summary["invalid_lines"][0].startswith(f"{bad}:7: schema_violation")
    assert sum(_end_offsets(kafka_bootstrap, topic).values()) == 0


def test_cli_summary_counts_with_skip_invalid_and_rate(
    kafka_bootstrap: str, new_topic: Callable[..., str], pos_file: Path, tmp_path: Path
) -> None:
    topic = new_topic("raw-pos-cli", partitions=3)
    lines = pos_file.read_bytes().splitlines()[:30]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join([*lines[:10], b"garbage", *lines[10:]]) + b"\n")
    result = CliRunner().invoke(
        app,
        [
            "produce",
            "--source",
            "pos",
            "--topic",
            topic,
            "--bootstrap",
            kafka_bootstrap,
            "--skip-invalid",
            "--rate",
            "200",
            "--json",
            str(mixed),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout)
    n = len(lines)
    assert n == 30
    assert (summary["lines"], summary["valid"], summary["invalid"]) == (n + 1, n, 1)
    assert summary["sent"] == summary["delivered"] == n and summary["failed"] == 0
    assert summary["invalid_lines"] == [
        f"{mixed}:11: not_json: " + summary["invalid_lines"][0].split(": ", 2)[2]
    ]
    assert summary["achieved_rate"] <= 210
    assert sum(_end_offsets(kafka_bootstrap, topic).values()) == 30
