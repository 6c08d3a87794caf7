"""The `omnistitch` command line: one typer app, each subcommand implemented next to the code it drives."""

from __future__ import annotations

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="omnistitch",
    help="Identity stitching on Kafka: run the stream app, replay files offline, simulate and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# --- contracts commands ---
# --- core commands (replay, export, explain) ---
# --- simulate / evaluate / produce commands ---
# --- stream app commands (topics, worker) ---


def main() -> None:
    """Console-script entry point."""
    app()
