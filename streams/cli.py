"""The `omnistitch` command line: one typer app, each subcommand implemented next to the code it drives."""

from __future__ import annotations

import typer

from streams.runtime import tune_gc

__all__ = ["app", "main"]

app = typer.Typer(
    name="omnistitch",
    help="Identity stitching on Kafka: run the stream app, replay files offline, simulate and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# --- contracts commands ---


@app.command("schemas")
def schemas_command(
    check: bool = typer.Option(False, "--check", help="Exit 1 if committed files drifted from the models."),
) -> None:
    """Regenerate schemas/json/*.json and schemas/asyncapi.yaml from the pydantic contracts."""
    from schemas.generate import main as generate_main

    raise typer.Exit(generate_main(["--check"] if check else []))


@app.command("validate")
def validate_command(
    path: str = typer.Argument(..., help="JSON-lines file of raw events, or - for stdin."),
) -> None:
    """Validate raw events line by line and print `ok` or the DLQ error code for each (for producers)."""
    import sys

    from streams.exceptions import InvalidEvent
    from streams.normalize import NormalizationSettings
    from streams.validate import Validator

    validator = Validator(NormalizationSettings.from_env())
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    failures = 0
    with stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue  # blank lines: skipped, as `produce` and `replay` skip them
            try:
                event = validator.validate(line.rstrip(b"\r\n"))
            except InvalidEvent as exc:
                failures += 1
                typer.echo(f"{number}\t{exc.code}\t{exc.message}")
            else:
                dropped = ",".join(f"{t}:{r}" for t, r in event.dropped)
                typer.echo(f"{number}\tok\t{event.type}" + (f"\tdropped={dropped}" if dropped else ""))
    raise typer.Exit(1 if failures else 0)


# --- core commands (replay, export, explain, split, erase) ---
from streams.replay import (  # noqa: E402
    erase_command,
    explain_command,
    export_command,
    replay_command,
    split_command,
)

app.command("replay")(replay_command)
app.command("export")(export_command)
app.command("explain")(explain_command)
app.command("split")(split_command)
app.command("erase")(erase_command)
# --- simulate / evaluate / produce commands ---
from streams.evaluate import assignments_command, evaluate_command  # noqa: E402
from streams.produce import produce_command  # noqa: E402
from streams.simulate import simulate_command  # noqa: E402

app.command("simulate")(simulate_command)
app.command("evaluate")(evaluate_command)
app.command("produce")(produce_command)
app.command("assignments")(assignments_command)

# --- stream app commands (topics, worker) ---
from streams.app.commands import topics_app, watch_command, worker_command  # noqa: E402

app.add_typer(topics_app, name="topics")
app.command("worker")(worker_command)
app.command("watch")(watch_command)


def main() -> None:
    """Console-script entry point; a wrong setting is one line naming it and exit 2, not a traceback."""
    from streams.exceptions import ConfigError

    tune_gc()
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"omnistitch: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
