"""CLI for deployers: create topics, run a worker, watch stitched profiles as a downstream consumer would."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape

from streams.app.topics import create_topics
from streams.config import AppSettings

__all__ = ["split_in_stream", "topics_app", "watch_command", "worker_command"]

# how long `omnistitch split` waits for the stream app to emit the split
SPLIT_WAIT_SECONDS = 60.0

topics_app = typer.Typer(help="Manage the app's Kafka topics.", no_args_is_help=True)


@topics_app.command("create")
def topics_create_command() -> None:
    """Create every raw, output and DLQ topic with its partitions and cleanup policy (idempotent)."""
    settings = AppSettings.from_env()
    for name, outcome in sorted(create_topics(settings).items()):
        typer.echo(f"{outcome:8} {name}")


def worker_command(
    loglevel: str = typer.Option("info", "--loglevel", "-l", help="crit, error, warn, info or debug."),
) -> None:
    """Run one stream worker (settings from KAFKA_BOOTSTRAP and OMNISTITCH_* variables; see README)."""
    import faust

    from streams.app.worker import create_app

    settings = AppSettings.from_env()
    create_topics(settings)
    app = create_app(settings)
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()


def watch_command(
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Replay the topics from the start."),
    changes: bool = typer.Option(True, "--changes/--no-changes", help="Also print identity changes."),
) -> None:
    """Print profile snapshots (and identity changes) as they are published; Ctrl-C to stop."""
    from confluent_kafka import Consumer

    settings = AppSettings.from_env()
    console = Console(highlight=False)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap,
            "group.id": f"omnistitch-watch-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(["profiles", *(["identity.changes"] if changes else [])])
    try:
        while True:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            key = (message.key() or b"").decode()
            value = message.value()
            if value is None:
                console.print(f"[dim]profile {key} tombstoned[/dim]")
                continue
            record = orjson.loads(value)
            if message.topic() == "profiles":
                console.print(_profile_line(record))
            else:
                console.print(f"[yellow]{record['kind']}[/yellow] {key} seq={record['seq']}")
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def _profile_line(record: dict[str, Any]) -> str:
    """One readable line per snapshot: who, through which identifiers and channels, how much they bought."""
    identifiers: dict[str, list[Any]] = record.get("identifiers") or {}
    orders: dict[str, Any] = record.get("orders") or {}
    channels: dict[str, Any] = record.get("channels") or {}
    ids = ", ".join(f"{type_}={len(values)}" for type_, values in sorted(identifiers.items()))
    revenue = ", ".join(f"{amount} {cur}" for cur, amount in sorted((orders.get("revenue") or {}).items()))
    detail = (
        f"{record['profile_id']} seq={record['seq']} ids({ids}) channels({', '.join(sorted(channels))}) "
        f"orders={orders.get('count', 0)}"
    )
    return f"[bold green]profile[/bold green] {escape(detail)} {escape(revenue)}"


def split_in_stream(profile_id: str, identifiers: list[str], reason: str) -> None:
    """`omnistitch split` on the stream app: a `Split` on the internal topic for the profile's partition,
    then its `profile_split` and `profile_created` read back from `identity.changes` and printed."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from streams.app.protocol import Split, destination, encode_envelopes
    from streams.app.topics import internal_topic
    from streams.topic_reader import end_offsets

    settings = AppSettings.from_env()
    request = f"split-{uuid.uuid4().hex}"
    msg = Split(profile_id, tuple(identifiers), reason, int(time.time() * 1000), request)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap,
            "group.id": f"omnistitch-split-{uuid.uuid4().hex[:8]}",  # assigned, never joins or commits
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    try:
        # from where identity.changes ends now: the split's changes can only come after
        metadata = consumer.list_topics("identity.changes", timeout=10).topics["identity.changes"]
        ends = end_offsets(settings.bootstrap, (("identity.changes", p) for p in metadata.partitions))
        consumer.assign([TopicPartition(topic, p, offset) for (topic, p), offset in ends.items()])
        # the profile's home by the deployment's own partition count, not this shell's OMNISTITCH_PARTITIONS
        internal = internal_topic(settings)
        found = consumer.list_topics(internal, timeout=10).topics.get(internal)
        if found is None or found.error is not None or not found.partitions:
            typer.echo(
                f"split failed: no topic {internal} (is OMNISTITCH_APP_ID the deployment's?)", err=True
            )
            raise typer.Exit(2)
        dest = destination(msg, len(found.partitions))
        failures: list[str] = []
        producer = Producer({"bootstrap.servers": settings.bootstrap})
        for envelope in encode_envelopes([msg]):
            producer.produce(
                internal,
                key=str(dest).encode(),
                value=envelope,
                partition=dest,
                on_delivery=lambda err, _: failures.append(str(err)) if err else None,
            )
        if producer.flush(30) or failures:
            reason = ", ".join(failures) or "timed out"
            typer.echo(f"split failed: the request was not delivered ({reason})", err=True)
            raise typer.Exit(2)
        changes: list[dict[str, Any]] = []
        deadline = time.monotonic() + SPLIT_WAIT_SECONDS
        while len(changes) < 2 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            value = None if message is None or message.error() else message.value()
            if value is None:
                continue
            record = orjson.loads(value)
            if record.get("cause_event_id") == request:
                changes.append(record)
    finally:
        consumer.close()
    if len(changes) < 2:
        typer.echo(
            f"no split of {profile_id} seen in {SPLIT_WAIT_SECONDS:.0f}s: is a worker running, is the "
            "profile known and live, and does it hold every identifier named (and more)? A refused request "
            'counts in omnistitch_protocol_dropped_total{reason="split_refused"} (or "erased_profile")',
            err=True,
        )
        raise typer.Exit(1)
    changes.sort(key=lambda c: c["kind"] != "profile_split")
    typer.echo(changes[1]["profile_id"])
    for record in changes:
        typer.echo(orjson.dumps(record).decode())
