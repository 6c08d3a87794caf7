"""Producer library without a broker: keys, validation first, strict files, pacing, delivery counts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from typer.testing import CliRunner

from streams.cli import app
from streams.exceptions import InvalidEvent
from streams.normalize import NormalizationSettings, hash_identifier
from streams.produce import ChannelProducer, murmur2, murmur2_partition, produce_files, producer_config


@pytest.fixture(autouse=True)
def _no_normalisation_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The producer reads OMNISTITCH_* by default: tests start from none, whatever the shell exports."""
    import os

    for name in list(os.environ):
        if name.startswith("OMNISTITCH_"):
            monkeypatch.delenv(name)


class FakeProducer:
    """Records produce() calls and acknowledges (or fails) them on poll/flush, like librdkafka."""

    instances: ClassVar[list[FakeProducer]] = []

    def __init__(self, config: dict[str, Any], fail_every: int = 0) -> None:
        self.config = config
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self._pending: list[Any] = []
        self.fail_every = fail_every
        FakeProducer.instances.append(self)

    def produce(self, topic: str, value: bytes, key: bytes | None = None, *, on_delivery: Any = None) -> None:
        self.sent.append((topic, value, key))
        self._pending.append(on_delivery)

    def poll(self, timeout: float = 0.0) -> int:
        pending, self._pending = self._pending, []
        for callback in pending:
            n = len(self.sent)
            failed = self.fail_every and n % self.fail_every == 0
            callback("KafkaError{code=MSG_TIMED_OUT}" if failed else None, None)
        return len(pending)

    def flush(self, timeout: float = 0.0) -> int:
        self.poll()
        return 0


def _producer(source: str = "pos", fail_every: int = 0, **kw: Any) -> tuple[ChannelProducer, FakeProducer]:
    holder: list[FakeProducer] = []

    def factory(conf: dict[str, Any]) -> FakeProducer:
        holder.append(FakeProducer(conf, fail_every))
        return holder[0]

    producer = ChannelProducer(source, producer_factory=factory, **kw)
    return producer, holder[0]


def _event(
    event_id: str = "e1", source: str = "pos", identifiers: list[dict[str, Any]] | None = None
) -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "event_id": event_id,
            "source": source,
            "channel": "store",
            "type": "store_purchase",
            "occurred_at": "2026-11-24T10:00:00+03:00",
            "identifiers": identifiers
            if identifiers is not None
            else [
                {"type": "phone", "value": "+7 (916) 123-45-67"},
                {"type": "loyalty_card", "value": "2000 1234 5678", "verified": True},
            ],
            "attributes": {"store_id": "msk-17", "order_id": "R-981", "total": "1290.00", "currency": "RUB"},
        }
    )


def test_murmur2_matches_kafka_java_test_vectors() -> None:
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2
    assert murmur2(b"21") == -973932308
    assert murmur2(b"foobar") == -790332482
    assert murmur2(b"a-little-bit-long-string") == -985981536
    assert murmur2(b"a-little-bit-longer-string") == -1486304829
    assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == -58897971
    assert murmur2(b"abc") == 479470107
    assert 0 <= murmur2_partition(b"21", 8) < 8


def test_safe_producer_settings() -> None:
    conf = producer_config("h:1", "cid")
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["partitioner"] == "murmur2_random" and conf["compression.type"] == "gzip"


def test_key_is_strongest_normalised_identifier_and_topic_defaults_to_raw_source() -> None:
    producer, fake = _producer()
    assert producer.send(_event()) == b"loyalty_card:200012345678"
    email_and_phone = [
        {"type": "email", "value": "Ann@Mail.RU"},
        {"type": "phone", "value": "8 916 123 45 67"},
    ]
    assert producer.send(_event("e2", identifiers=email_and_phone)) == b"phone:+79161234567"
    customer = [{"type": "cookie_id", "value": "c1"}, {"type": "customer_id", "value": "C42"}]
    assert producer.send(_event("e3", identifiers=customer)) == b"customer_id:C42"
    assert [(t, k) for t, _, k in fake.sent] == [
        ("raw.pos", b"loyalty_card:200012345678"),
        ("raw.pos", b"phone:+79161234567"),
        ("raw.pos", b"customer_id:C42"),
    ]
    assert fake.sent[0][1] == _event()  # the value is the event as given


def test_elapsed_runs_from_the_first_send_to_the_last_flush() -> None:
    """A gateway builds its producer at start-up and sends later: the rate is the sending's, not the uptime's
    (0.3.3 counted from construction, and stopped the clock at the first flush for good)."""
    producer, _ = _producer()
    time.sleep(0.3)
    producer.send(_event())
    producer.flush()
    assert producer.stats.elapsed < 0.25
    first = producer.stats.elapsed
    time.sleep(0.3)
    producer.send(_event("e2"))
    producer.flush()
    assert producer.stats.elapsed >= first + 0.3 and producer.stats.sent == 2


def test_invalid_event_is_never_sent() -> None:
    producer, fake = _producer()
    with pytest.raises(InvalidEvent):
        producer.send(b'{"schema_version": 1}')
    with pytest.raises(InvalidEvent):
        producer.send(_event(source="web"))  # does not belong on raw.pos
    with pytest.raises(InvalidEvent) as exc:
        producer.send(_event(identifiers=[{"type": "phone", "value": "+70000000000"}]))
    assert exc.value.code == "no_usable_identifier"
    assert fake.sent == []
    assert producer.stats.invalid == 3


def _file(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "pos.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_strict_file_with_a_bad_line_sends_nothing_and_names_the_line(tmp_path: Path) -> None:
    path = _file(tmp_path, [_event("e1"), _event("e2"), b"", b"{broken", _event("e4")])
    producer, fake = _producer()
    stats = produce_files([path], producer)
    assert fake.sent == []
    assert stats.invalid == 1 and stats.valid == 3 and stats.lines == 4 and stats.sent == 0
    assert stats.invalid_lines[0].line == 4 and stats.invalid_lines[0].code == "not_json"
    assert str(stats.invalid_lines[0]).startswith(f"{path}:4: not_json")


def test_skip_invalid_sends_the_rest_and_counts_are_right(tmp_path: Path) -> None:
    path = _file(tmp_path, [_event("e1"), b"{broken", _event("e3"), _event("e4", source="web")])
    producer, fake = _producer()
    stats = produce_files([path], producer, skip_invalid=True)
    assert [orjson.loads(v)["event_id"] for _, v, _ in fake.sent] == ["e1", "e3"]
    assert (stats.lines, stats.valid, stats.invalid, stats.sent, stats.delivered) == (4, 2, 2, 2, 2)
    assert [i.line for i in stats.invalid_lines] == [2, 4]


def test_delivery_errors_are_counted_and_kept(tmp_path: Path) -> None:
    path = _file(tmp_path, [_event(f"e{i}") for i in range(6)])
    producer, _ = _producer(fail_every=3)
    stats = produce_files([path], producer)
    assert stats.sent == 6 and stats.failed == 2 and stats.delivered == 4
    assert "MSG_TIMED_OUT" in stats.delivery_errors[0]


def test_rate_limit_paces_sending_and_reports_achieved_rate(tmp_path: Path) -> None:
    path = _file(tmp_path, [_event(f"e{i}") for i in range(100)])
    producer, _ = _producer(rate=500)
    began = time.monotonic()
    stats = produce_files([path], producer)
    took = time.monotonic() - began
    assert stats.sent == 100
    assert took >= 99 / 500 * 0.95  # paced, not a burst
    assert 300 < stats.achieved_rate <= 520


def test_cli_produce_strict_failure_and_json_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    FakeProducer.instances.clear()
    bad = _file(tmp_path, [_event("e1"), b"nope"])
    result = CliRunner().invoke(app, ["produce", "--source", "pos", str(bad), "--no-progress"])
    assert result.exit_code == 1
    assert f"{bad}:2: not_json" in result.output and "nothing sent" in result.output
    assert FakeProducer.instances[-1].sent == []

    good = tmp_path / "good.jsonl"
    good.write_bytes(_event("e1") + b"\n" + _event("e2") + b"\n")
    result = CliRunner().invoke(
        app, ["produce", "--source", "pos", "--topic", "t1", "--bootstrap", "h:9", "--json", str(good)]
    )
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout)
    assert summary["topic"] == "t1" and summary["sent"] == 2 and summary["delivered"] == 2
    assert FakeProducer.instances[-1].config["bootstrap.servers"] == "h:9"


def test_bootstrap_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "envhost:1234")
    producer, fake = _producer()
    assert fake.config["bootstrap.servers"] == "envhost:1234"
    assert producer.topic == "raw.pos"


def test_cli_produce_from_stdin_is_validated_before_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    FakeProducer.instances.clear()
    data = _event("e1") + b"\n" + _event("e2") + b"\n"
    result = CliRunner().invoke(app, ["produce", "--source", "pos", "--json", "-"], input=data)
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["delivered"] == 2
    assert [orjson.loads(v)["event_id"] for _, v, _ in FakeProducer.instances[-1].sent] == ["e1", "e2"]


def _message(event_id: str, source: str) -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "event_id": event_id,
            "source": source,
            "channel": source,
            "type": "message_sent",
            "occurred_at": "2026-11-24T10:00:00+03:00",
            "identifiers": [{"type": "phone", "value": "+79161234567"}],
            "attributes": {"channel": source, "campaign": "black-friday"},
        }
    )


def _blocklist(tmp_path: Path) -> Path:
    path = tmp_path / "blocked.toml"
    path.write_text('[values]\nphone = ["+79161234567"]\n', encoding="utf-8")
    return path


PHONE_ONLY = [{"type": "phone", "value": "+7 916 123-45-67"}]


def test_default_settings_are_the_environments_as_validate_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNISTITCH_BLOCKLIST_FILE", str(_blocklist(tmp_path)))
    producer, fake = _producer()
    with pytest.raises(InvalidEvent) as exc:
        producer.send(_event(identifiers=PHONE_ONLY))
    assert exc.value.code == "no_usable_identifier"
    monkeypatch.delenv("OMNISTITCH_BLOCKLIST_FILE")
    monkeypatch.setenv("OMNISTITCH_MAX_EVENT_BYTES", "100")
    producer, fake = _producer()
    with pytest.raises(InvalidEvent) as exc:
        producer.send(_event())
    assert exc.value.code == "too_large"
    assert fake.sent == []
    # explicit settings still win over the environment
    pinned, fake = _producer(settings=NormalizationSettings())
    assert pinned.send(_event(identifiers=PHONE_ONLY)) == b"phone:+79161234567"
    assert len(fake.sent) == 1


def test_with_an_hmac_key_in_the_environment_the_kafka_key_is_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "k" * 32
    monkeypatch.setenv("OMNISTITCH_HMAC_KEY", secret)
    producer, fake = _producer()
    key = producer.send(_event(identifiers=PHONE_ONLY))
    assert key == f"phone:{hash_identifier('phone', '+79161234567', secret.encode())}".encode()
    assert b"79161234567" not in (key or b"")
    assert fake.sent[0][2] == key


def test_cli_produce_refuses_what_validate_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    FakeProducer.instances.clear()
    monkeypatch.setenv("OMNISTITCH_BLOCKLIST_FILE", str(_blocklist(tmp_path)))
    path = _file(tmp_path, [_event("e1"), _event("e2", identifiers=PHONE_ONLY)])
    checked = CliRunner().invoke(app, ["validate", str(path)])
    assert checked.exit_code == 1 and "2\tno_usable_identifier" in checked.stdout
    result = CliRunner().invoke(app, ["produce", "--source", "pos", "--no-progress", str(path)])
    assert result.exit_code == 1
    assert f"{path}:2: no_usable_identifier" in result.output and "nothing sent" in result.output
    assert FakeProducer.instances[-1].sent == []

    monkeypatch.delenv("OMNISTITCH_BLOCKLIST_FILE")
    monkeypatch.setenv("OMNISTITCH_MAX_EVENT_BYTES", "100")
    result = CliRunner().invoke(app, ["produce", "--source", "pos", "--json", str(path)])
    assert result.exit_code == 1
    summary = orjson.loads(result.stdout)
    assert summary["sent"] == 0 and summary["invalid"] == 2
    assert all(": too_large: " in line for line in summary["invalid_lines"])


def test_cli_produce_with_broken_normalisation_settings_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    monkeypatch.setenv("OMNISTITCH_HMAC_KEY", "short")
    path = _file(tmp_path, [_event("e1")])
    result = CliRunner().invoke(app, ["produce", "--source", "pos", "--no-progress", str(path)])
    assert result.exit_code == 2
    assert "produce failed" in result.output and "hmac key" in result.output


def test_source_check_compares_topics_so_viber_goes_on_raw_sms(tmp_path: Path) -> None:
    producer, fake = _producer("sms")
    assert producer.topic == "raw.sms"
    producer.send(_message("s1", "sms"))
    producer.send(_message("v1", "viber"))
    with pytest.raises(InvalidEvent) as exc:
        producer.send(_message("m1", "messenger"))  # raw.messenger: not this topic
    assert exc.value.code == "unknown_source" and "'raw.messenger'" in exc.value.message
    viber, _ = _producer("viber")
    assert viber.topic == "raw.sms"
    viber.send(_message("s2", "sms"))
    assert [orjson.loads(v)["event_id"] for _, v, _ in fake.sent] == ["s1", "v1"]


def test_cli_produce_viber_file_with_source_sms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    FakeProducer.instances.clear()
    path = tmp_path / "raw.viber.jsonl"
    path.write_bytes(b"".join(_message(f"v{i}", "viber") + b"\n" for i in range(3)))
    result = CliRunner().invoke(app, ["produce", "--source", "sms", "--json", str(path)])
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout)
    assert summary["topic"] == "raw.sms" and summary["invalid"] == 0 and summary["delivered"] == 3
    assert {t for t, _, _ in FakeProducer.instances[-1].sent} == {"raw.sms"}
