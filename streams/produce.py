"""Channel producers: envelope-v1 events onto `raw.<source>` safely, for real channel systems and for load.

Why a library and not just a CLI: a POS gateway or a web collector should send exactly the way the bench
does — validated before sending (a bad event never reaches Kafka half-formed), keyed by the event's strongest
normalised identifier so that every event of one person tends to land on one partition, idempotent with
`acks=all` so retries never duplicate or reorder, and with the same `murmur2_random` partitioner as Faust and
the Java clients so keys map to the same partitions whoever produces them.

Files (`omnistitch produce`): by default every line of every file is validated *before anything is sent*; one
bad line (reported as `FILE:LINE: code: message`) means nothing is sent, so a file never arrives half-way.
`--skip-invalid` instead sends the valid lines and reports the bad ones. Validation reads the same
`OMNISTITCH_*` normalisation settings as `omnistitch validate`, `replay` and the worker.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import orjson
import typer
from murmurhash2 import murmurhash2

from schemas.envelope import DEFAULT_IDENTIFIER_TYPES
from schemas.topics import RAW_TOPIC_BY_SOURCE
from streams.events import NormalizedEvent
from streams.exceptions import ConfigError, ErrorCode, InvalidEvent
from streams.normalize import NormalizationSettings

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "KEY_PRIORITY",
    "ChannelProducer",
    "InvalidLine",
    "ProduceStats",
    "event_key",
    "murmur2",
    "murmur2_partition",
    "produce_command",
    "produce_files",
    "producer_config",
]

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
# Strongest first: a customer id or a card outlives phones, e-mails, devices and cookies.
KEY_PRIORITY: tuple[str, ...] = DEFAULT_IDENTIFIER_TYPES
_RANK = {t: i for i, t in enumerate(KEY_PRIORITY)}
_KAFKA_MURMUR2_SEED = 0x9747B28C
_MAX_LISTED = 20  # invalid lines and delivery errors kept verbatim; the rest are only counted


def event_key(event: NormalizedEvent) -> bytes | None:
    """Kafka key of a raw event: `type:value` of its strongest normalised identifier (first one on a tie)."""
    best = None
    best_rank = len(KEY_PRIORITY)
    for ident in event.identifiers:
        rank = _RANK.get(ident.type, len(KEY_PRIORITY))
        if best is None or rank < best_rank:
            best, best_rank = ident, rank
    return best.key.encode() if best is not None else None


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (signed 32-bit), bit for bit as `org.apache.kafka.common.utils.Utils.murmur2`.

    Native (the `murmurhash2` package): the worker hashes every identifier and profile id it routes, and the
    pure-Python loop was 7 % of its CPU.
    """
    h = murmurhash2(data, _KAFKA_MURMUR2_SEED)
    return h - (1 << 32) if h & 0x80000000 else h


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition the Java default partitioner (and librdkafka's `murmur2_random`) gives a non-null key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def producer_config(
    bootstrap: str, client_id: str, compression: str = "gzip", linger_ms: int = 20, **extra: Any
) -> dict[str, Any]:
    """librdkafka settings for safe channel producing (idempotent, acks=all, murmur2_random, batching).

    gzip by default because the Faust consumers (aiokafka) can always decompress it; lz4/zstd need extra
    Python packages on the consumer side.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": compression,
        "linger.ms": linger_ms,
        "batch.num.messages": 10_000,
        "partitioner": "murmur2_random",
        "message.timeout.ms": 120_000,
    }
    config.update(extra)
    return config


class _Producer(Protocol):
    """The part of `confluent_kafka.Producer` we use (a fake in unit tests)."""

    def produce(
        self, topic: str, value: bytes, key: bytes | None = ..., *, on_delivery: Any = ...
    ) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...


@dataclass(frozen=True, slots=True)
class InvalidLine:
    """A refused line: where it is and why (`code` is an ErrorCode value); never its content (PII)."""

    file: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.code}: {self.message}"


@dataclass(slots=True)
class ProduceStats:
    """Counts of one producer's life; delivery counts are final only after `flush`."""

    lines: int = 0  # non-blank lines read (files only)
    valid: int = 0
    invalid: int = 0
    sent: int = 0  # handed to librdkafka
    delivered: int = 0  # acknowledged by all in-sync replicas
    failed: int = 0  # delivery reported an error (after librdkafka's own retries)
    bytes_sent: int = 0
    invalid_lines: list[InvalidLine] = field(default_factory=list)
    delivery_errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def elapsed(self) -> float:
        """Seconds from the first send to the end of `flush` (or to now while running)."""
        return (self.finished or time.monotonic()) - self.started

    @property
    def achieved_rate(self) -> float:
        """Events per second actually sent, to compare with the requested `--rate`."""
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for `--json` and the bench."""
        return {
            "lines": self.lines,
            "valid": self.valid,
            "invalid": self.invalid,
            "sent": self.sent,
            "delivered": self.delivered,
            "failed": self.failed,
            "bytes_sent": self.bytes_sent,
            "elapsed_s": round(self.elapsed, 3),
            "achieved_rate": round(self.achieved_rate, 1),
            "invalid_lines": [str(i) for i in self.invalid_lines],
            "delivery_errors": list(self.delivery_errors),
        }


class ChannelProducer:
    """Validate, key and send envelope-v1 events of one source; usable directly by a channel's gateway.

    `settings=None` means `NormalizationSettings.from_env()` (read once, here): the same `OMNISTITCH_*`
    blocklist, size limit, HMAC key, region and e-mail rules as `omnistitch validate`, `replay` and the
    worker, so an event they would refuse is never sent, and with hashing on the Kafka key is the hashed
    identifier. Pass settings explicitly to pin them (tests, a gateway configured in code).

    `check_source`: refuse an event whose `source` writes to another raw topic than this producer's `source`
    (`RAW_TOPIC_BY_SOURCE`: a `viber` event belongs on `raw.sms` as much as an `sms` one does).

    >>> with ChannelProducer("pos") as producer:          # doctest: +SKIP
    ...     producer.send(b'{"schema_version": 1, ...}')   # raises InvalidEvent, nothing sent
    """

    def __init__(
        self,
        source: str,
        *,
        topic: str | None = None,
        bootstrap: str | None = None,
        rate: float | None = None,
        compression: str = "gzip",
        linger_ms: int = 20,
        check_source: bool = True,
        settings: NormalizationSettings | None = None,
        config: Mapping[str, Any] | None = None,
        producer_factory: Callable[[dict[str, Any]], _Producer] | None = None,
    ) -> None:
        from streams.validate import Validator

        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (events per second) or None for as fast as possible")
        self.source = source
        self._home_topic = _raw_topic(source)
        self.topic = topic or self._home_topic
        self.bootstrap = bootstrap or os.environ.get("KAFKA_BOOTSTRAP") or DEFAULT_BOOTSTRAP
        self.rate = rate
        self.check_source = check_source
        self.stats = ProduceStats()
        # from the environment unless given: a producer must refuse exactly what validate/replay/worker refuse
        self.settings = settings if settings is not None else NormalizationSettings.from_env()
        self._validator = Validator(self.settings)
        self._paced_from: float | None = None
        self._paced_sent = 0
        conf = producer_config(
            self.bootstrap, f"omnistitch-produce-{source}", compression, linger_ms, **dict(config or {})
        )
        if producer_factory is None:
            from confluent_kafka import Producer

            self._producer: _Producer = Producer(conf)
        else:
            self._producer = producer_factory(conf)

    # step "validate": raw bytes -> (key, NormalizedEvent) or InvalidEvent
    def validate(self, raw: bytes) -> tuple[bytes | None, NormalizedEvent]:
        """The key and normalised event for `raw`, or InvalidEvent (with `.code`) if it must not be sent."""
        event = self._validator.validate(raw)
        # by topic, not by name: sources sharing a raw topic (sms and viber on raw.sms) belong together
        if self.check_source and (home := _raw_topic(event.source)) != self._home_topic:
            raise InvalidEvent(
                ErrorCode.UNKNOWN_SOURCE,
                f"source {event.source!r} does not belong on {self._home_topic!r} (its topic is {home!r})",
            )
        return event_key(event), event

    def send(self, event: bytes | str | Mapping[str, Any]) -> bytes | None:
        """Validate then send one event, returning its key; an invalid event raises InvalidEvent, unsent."""
        raw = _as_bytes(event)
        try:
            key, _ = self.validate(raw)
        except InvalidEvent:
            self.stats.invalid += 1
            raise
        self.stats.valid += 1
        self.send_validated(raw, key)
        return key

    def send_validated(self, raw: bytes, key: bytes | None) -> None:
        """Send an already validated event: paced to `rate`, retried on a full local queue."""
        if self.stats.sent == 0:
            self.stats.started = time.monotonic()  # from the first send, not from building the producer
        self.stats.finished = None  # sending (again): the clock runs until the next `flush`
        if self.rate is not None:
            self._pace()
        while True:
            try:
                self._producer.produce(self.topic, raw, key, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let librdkafka deliver, then retry
                self._producer.poll(0.05)
        self.stats.sent += 1
        self.stats.bytes_sent += len(raw)
        self._producer.poll(0)

    def _pace(self) -> None:
        """Keep the average at `rate`: sleep (serving callbacks) whenever ahead of schedule by > 2 ms."""
        assert self.rate is not None
        now = time.monotonic()
        if self._paced_from is None:
            self._paced_from = now
        due = self._paced_from + self._paced_sent / self.rate
        ahead = due - now
        if ahead > 0.002:
            self._producer.poll(ahead)
            remaining = due - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
        self._paced_sent += 1

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.stats.failed += 1
            if len(self.stats.delivery_errors) < _MAX_LISTED:
                self.stats.delivery_errors.append(str(err))
        else:
            self.stats.delivered += 1

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks (a long-running gateway calls this from its loop)."""
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 60.0) -> int:
        """Wait for every delivery report; returns how many are still outstanding (0 = all settled)."""
        remaining = self._producer.flush(timeout)
        self.stats.finished = time.monotonic()
        return remaining

    def __enter__(self) -> ChannelProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def _raw_topic(source: str) -> str:
    """The raw topic a source's producer writes to (`raw.<source>` for one the catalogue does not list)."""
    return RAW_TOPIC_BY_SOURCE.get(source, f"raw.{source}")


def _as_bytes(event: bytes | str | Mapping[str, Any]) -> bytes:
    if isinstance(event, bytes):
        return event.strip()
    if isinstance(event, str):
        return event.strip().encode()
    return orjson.dumps(dict(event))


# ----------------------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------------------


def _lines(paths: Iterable[Path]) -> Iterator[tuple[str, int, bytes, int]]:
    """(file name, line number, stripped line, bytes consumed) for every non-blank line; `-` is stdin."""
    for path in paths:
        name = str(path)
        handle = sys.stdin.buffer if name == "-" else path.open("rb")
        try:
            for number, line in enumerate(handle, 1):
                stripped = line.strip()
                if stripped:
                    yield name, number, stripped, len(line)
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()


def produce_files(
    paths: Iterable[Path | str],
    producer: ChannelProducer,
    *,
    skip_invalid: bool = False,
    on_progress: Callable[[str, int], None] | None = None,
    flush_timeout: float = 120.0,
) -> ProduceStats:
    """Send JSON-lines files through `producer`; strict by default (any bad line -> nothing sent at all).

    `on_progress(phase, bytes)` is called with phase "validate" or "send" as lines are consumed.
    """
    files = [Path(p) for p in paths]
    if any(str(p) == "-" for p in files) and not skip_invalid:
        # stdin can be read once only: keep it in a temporary file to validate first, then send
        tmp = _Buffered(sys.stdin.buffer.read())
        try:
            return _produce(
                [tmp.path if str(p) == "-" else p for p in files],
                producer,
                skip_invalid=skip_invalid,
                on_progress=on_progress,
                flush_timeout=flush_timeout,
            )
        finally:
            tmp.path.unlink(missing_ok=True)
    return _produce(
        files, producer, skip_invalid=skip_invalid, on_progress=on_progress, flush_timeout=flush_timeout
    )


def _produce(
    files: list[Path],
    producer: ChannelProducer,
    *,
    skip_invalid: bool,
    on_progress: Callable[[str, int], None] | None,
    flush_timeout: float,
) -> ProduceStats:
    stats = producer.stats

    def refuse(name: str, number: int, exc: InvalidEvent) -> None:
        stats.invalid += 1
        if len(stats.invalid_lines) < _MAX_LISTED:
            stats.invalid_lines.append(InvalidLine(name, number, str(exc.code), exc.message))

    if not skip_invalid:
        # pass 1 "validate": nothing is sent unless every line is valid
        for name, number, raw, size in _lines(files):
            stats.lines += 1
            try:
                producer.validate(raw)
            except InvalidEvent as exc:
                refuse(name, number, exc)
            else:
                stats.valid += 1
            if on_progress:
                on_progress("validate", size)
        if stats.invalid:
            stats.finished = time.monotonic()
            return stats
    # pass 2 "send" (or the only pass with skip_invalid): (key, raw) -> Kafka
    stats.started = time.monotonic()
    for name, number, raw, size in _lines(files):
        try:
            key, _ = producer.validate(raw)
        except InvalidEvent as exc:
            stats.lines += 1
            refuse(name, number, exc)
        else:
            if skip_invalid:
                stats.lines += 1
                stats.valid += 1
            producer.send_validated(raw, key)
        if on_progress:
            on_progress("send", size)
    producer.flush(flush_timeout)
    return stats


class _Buffered:
    """stdin kept in a temporary file so the strict mode can read it twice."""

    def __init__(self, data: bytes) -> None:
        import tempfile

        with tempfile.NamedTemporaryFile(prefix="omnistitch-stdin-", suffix=".jsonl", delete=False) as handle:
            handle.write(data)
        self.path = Path(handle.name)


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------


def produce_command(
    files: Annotated[
        list[Path], typer.Argument(help="JSON-lines files of envelope-v1 events ('-' = stdin).")
    ],
    source: Annotated[
        str, typer.Option(help="Channel source (pos, web, app, viber, …): its raw topic (viber → raw.sms).")
    ],
    topic: Annotated[
        str | None, typer.Option(help="Override the topic (default: the source's raw topic).")
    ] = None,
    bootstrap: Annotated[
        str | None, typer.Option(help=f"Bootstrap servers (default $KAFKA_BOOTSTRAP or {DEFAULT_BOOTSTRAP}).")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Events per second (default: as fast as possible).")
    ] = None,
    skip_invalid: Annotated[
        bool,
        typer.Option(help="Send the valid lines, report bad ones (default: send nothing if any is bad)."),
    ] = False,
    any_source: Annotated[
        bool, typer.Option(help="Accept events whose `source` belongs on another raw topic.")
    ] = False,
    compression: Annotated[
        str, typer.Option(help="gzip (Faust reads it), or lz4/zstd/snappy/none.")
    ] = "gzip",
    linger_ms: Annotated[int, typer.Option(help="How long librdkafka waits to fill a batch.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")
    ] = None,
) -> None:
    """Validate and send channel events to Kafka, keyed by their strongest identifier.

    Validated with the `OMNISTITCH_*` normalisation settings, exactly as `omnistitch validate` checks them.
    """
    from rich.console import Console

    console = Console(stderr=True)
    try:
        # settings from OMNISTITCH_* (as `validate`, `replay` and the worker): what they refuse is never sent
        settings = NormalizationSettings.from_env()
    except ConfigError as exc:
        console.print(f"[red]produce failed:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    producer = ChannelProducer(
        source,
        topic=topic,
        bootstrap=bootstrap,
        rate=rate,
        compression=compression,
        linger_ms=linger_ms,
        check_source=not any_source,
        settings=settings,
    )
    show = console.is_terminal if progress is None else progress
    total = sum(f.stat().st_size for f in files if str(f) != "-")
    if show and total:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        tasks: dict[str, Any] = {}

        def on_progress(phase: str, size: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.advance(tasks[phase], size)

        with bar:
            stats = produce_files(files, producer, skip_invalid=skip_invalid, on_progress=on_progress)
    else:
        stats = produce_files(files, producer, skip_invalid=skip_invalid)
    if as_json:
        typer.echo(orjson.dumps({"topic": producer.topic, **stats.as_dict()}).decode())
    else:
        for bad in stats.invalid_lines:
            console.print(f"[red]invalid[/] {bad}", highlight=False, soft_wrap=True)
        if stats.invalid > len(stats.invalid_lines):
            console.print(f"… and {stats.invalid - len(stats.invalid_lines)} more invalid lines")
        if stats.invalid and not skip_invalid:
            message = f"[red]{stats.invalid} invalid of {stats.lines} lines: nothing sent[/]"
            console.print(message, soft_wrap=True)
        for err in stats.delivery_errors:
            console.print(f"[red]delivery error[/] {err}", highlight=False, soft_wrap=True)
        console.print(
            f"{producer.topic}: {stats.lines:,} lines, {stats.valid:,} valid, {stats.invalid:,} invalid, "
            f"{stats.sent:,} sent, {stats.delivered:,} delivered, {stats.failed:,} failed "
            f"in {stats.elapsed:.2f}s ({stats.achieved_rate:,.0f}/s"
            + (f", target {rate:,.0f}/s)" if rate else ")"),
            highlight=False,
            soft_wrap=True,
        )
    undelivered = stats.sent - stats.delivered
    if (stats.invalid and not skip_invalid) or stats.failed or undelivered:
        raise typer.Exit(1)
