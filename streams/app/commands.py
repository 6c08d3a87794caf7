"""CLI for deployers: create topics, run a worker, watch stitched profiles as a downstream consumer would."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape

from streams.app.topics import create_topics
from streams.config import AppSettings

__all__ = ["topics_app", "watch_command", "worker_command"]

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
