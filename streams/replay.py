"""Offline replay, export and explain: the backfill path and the evaluators' entry point to the core."""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from streams.core import IdentityGraph, RocksStore, format_explanation, load_rules
from streams.exceptions import InvalidEvent, OmnistitchError

__all__ = ["ReplaySummary", "explain_command", "export_command", "replay", "replay_command"]

_RULES_HELP = "Merge-protection rules (TOML); default: shipped rules. Env: OMNISTITCH_RULES_FILE."


class ReplaySummary:
    """What a replay did: counts for the summary table (and for tests)."""

    def __init__(self) -> None:
        self.lines = 0
        self.valid = 0
        self.invalid: Counter[str] = Counter()
        self.unassigned = 0
        self.seconds = 0.0
        self.stats: dict[str, Any] = {}

    @property
    def events_per_second(self) -> float:
        """Valid events stitched per wall-clock second."""
        return self.valid / self.seconds if self.seconds > 0 else 0.0


def _lines(paths: list[Path], progress: Progress | None) -> Iterator[bytes]:
    task = None
    if progress is not None:
        total = sum(p.stat().st_size for p in paths if p.is_file())
        task = progress.add_task("replay", total=total or None)
    for path in paths:
        fh: BinaryIO
        with sys.stdin.buffer if str(path) == "-" else path.open("rb") as fh:
            for line in fh:
                if progress is not None and task is not None:
                    progress.advance(task, len(line))
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield line


def replay(
    inputs: list[Path],
    state: Path,
    assignments: Path,
    *,
    rules_path: Path | None = None,
    resolved: Path | None = None,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Validate and stitch envelope-v1 lines in order, then write each valid event's final profile."""
    from streams.normalize import NormalizationSettings
    from streams.validate import Validator

    rules = load_rules(rules_path)
    validator = Validator(NormalizationSettings.from_env())
    summary = ReplaySummary()
    graph = IdentityGraph(RocksStore(state), rules)
    started = time.perf_counter()
    link = graph.link
    validate = validator.validate
    # spool: one line per valid event [event_id, profile at link time, anchor, resolved body | null]
    with tempfile.TemporaryFile() as spool:
        write = spool.write
        for raw in _lines(inputs, progress):
            summary.lines += 1
            try:
                event = validate(raw)
            except InvalidEvent as exc:
                summary.invalid[str(exc.code)] += 1
                continue
            summary.valid += 1
            result = link(event)
            body = None
            if resolved is not None:
                body = {
                    "schema_version": 1,
                    "event_id": event.event_id,
                    "identifier_keys": [i.key for i in event.identifiers],
                    "dropped": [{"type": t, "reason": r} for t, r in event.dropped],
                    "occurred_at_ms": event.occurred_at_ms,
                    "resolved_at_ms": int(time.time() * 1000),
                    "event": event.envelope,
                }
            write(orjson.dumps([event.event_id, result.profile_id, result.anchor, body], default=str) + b"\n")
        graph.flush()
        # step "final": follow merges (and splits) to where each event's profile ended up
        follow_splits = graph.stats["splits"] > 0
        memo: dict[str, str | None] = {}
        spool.seek(0)
        assignments.parent.mkdir(parents=True, exist_ok=True)
        res_fh = resolved.open("wb") if resolved is not None else None
        try:
            with assignments.open("wb") as out:
                for line in spool:
                    event_id, pid, anchor, body = orjson.loads(line)
                    if pid is None or (anchor is not None and graph.is_generic(anchor)):
                        final = None  # no profile, or its anchor turned out shared: not attributable
                    elif follow_splits:
                        final = graph.final_profile(pid, anchor)
                    else:
                        final = memo.get(pid, "")
                        if final == "":
                            final = memo[pid] = graph.final_profile(pid)
                    if final is None:
                        summary.unassigned += 1
                    out.write(orjson.dumps({"event_id": event_id, "profile_id": final}) + b"\n")
                    if res_fh is not None and body is not None and final is not None:
                        body["profile_id"] = final
                        res_fh.write(orjson.dumps(body, default=str) + b"\n")
        finally:
            if res_fh is not None:
                res_fh.close()
    summary.seconds = time.perf_counter() - started
    summary.stats = dict(graph.stats)
    graph.close()
    return summary


def _print_summary(console: Console, s: ReplaySummary) -> None:
    st = s.stats
    table = Table(title="omnistitch replay", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("lines read", f"{s.lines:,}")
    table.add_row("valid events", f"{s.valid:,}")
    table.add_row("invalid lines", f"{sum(s.invalid.values()):,}")
    for code, n in sorted(s.invalid.items()):
        table.add_row(f"  invalid: {code}", f"{n:,}")
    table.add_row("events without a profile", f"{s.unassigned:,}")
    table.add_row("live profiles (state)", f"{st.get('profiles_live', 0):,}")
    table.add_row("profiles created (state)", f"{st.get('profiles_created', 0):,}")
    table.add_row("merges (state)", f"{st.get('merges', 0):,}")
    table.add_row("generic values (state)", f"{st.get('generic', 0):,}")
    refusals = st.get("refusals", {})
    table.add_row("refusals (state)", f"{sum(refusals.values()):,}")
    for rule, n in sorted(refusals.items()):
        table.add_row(f"  refused: {rule}", f"{n:,}")
    table.add_row("time", f"{s.seconds:.2f} s")
    table.add_row("events/s", f"{s.events_per_second:,.0f}")
    console.print(table)


def replay_command(
    inputs: list[Path] = typer.Argument(..., help="envelope-v1 JSON-lines files, replayed in order."),  # noqa: B008
    state: Path = typer.Option(..., "--state", help="RocksDB state directory (created, or continued)."),  # noqa: B008
    assignments: Path = typer.Option(  # noqa: B008
        ..., "--assignments", help='Output: {"event_id", "profile_id"} per valid event, final profile.'
    ),
    rules: Path | None = typer.Option(None, "--rules", envvar="OMNISTITCH_RULES_FILE", help=_RULES_HELP),  # noqa: B008
    resolved: Path | None = typer.Option(  # noqa: B008
        None, "--resolved", help="Output: resolved events (ResolvedEvent shape) with their final profile."
    ),
) -> None:
    """Stitch event files offline into a state directory; write each event's final profile id."""
    console = Console(stderr=True)
    try:
        if console.is_terminal:
            columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
            with Progress(*columns, console=console, transient=True) as progress:
                summary = replay(
                    inputs, state, assignments, rules_path=rules, resolved=resolved, progress=progress
                )
        else:
            summary = replay(inputs, state, assignments, rules_path=rules, resolved=resolved)
    except (OmnistitchError, OSError) as exc:
        console.print(f"[red]replay failed:[/red] {exc}")
        raise typer.Exit(2) from exc
    _print_summary(console, summary)


def export_command(
    state: Path = typer.Option(..., "--state", help="State directory written by `replay`."),  # noqa: B008
    out: Path | None = typer.Option(None, "--out", help="Output file (default: stdout)."),  # noqa: B008
) -> None:
    """Write {"identifier": "type:value", "profile_id": ...} for every identifier in the state."""
    if not state.is_dir():
        typer.echo(f"no state directory at {state}", err=True)
        raise typer.Exit(2)
    graph = IdentityGraph(RocksStore(state))
    fh = out.open("wb") if out is not None else sys.stdout.buffer
    try:
        for key, pid in graph.iter_identifiers():
            fh.write(orjson.dumps({"identifier": key, "profile_id": pid}) + b"\n")
        fh.flush()
    finally:
        if out is not None:
            fh.close()
        graph.close()


def explain_command(
    target: str = typer.Argument(..., help='An identifier ("email:kolya@example.com") or a profile id.'),
    state: Path = typer.Option(..., "--state", help="State directory written by `replay`."),  # noqa: B008
    as_json: bool = typer.Option(False, "--json", help="Print the explanation as JSON."),
) -> None:
    """Why is this identifier in this profile: the events and rules that put it there."""
    if not state.is_dir():
        typer.echo(f"no state directory at {state}", err=True)
        raise typer.Exit(2)
    graph = IdentityGraph(RocksStore(state))
    try:
        d = graph.explain(target)
    except OmnistitchError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    finally:
        graph.close()
    if as_json:
        typer.echo(orjson.dumps(d, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(format_explanation(d))
