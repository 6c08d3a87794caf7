"""Offline replay, export and explain: the backfill path and the evaluators' entry point to the core."""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from streams.core import IdentityChange, IdentityGraph, RocksStore, format_explanation, load_rules
from streams.core.graph import ERASE_TYPE
from streams.core.native import NativeGraph, native_available
from streams.core.rules import session_owner
from streams.events import Identifier, NormalizedEvent
from streams.exceptions import ConfigError, InvalidEvent, OmnistitchError, UnknownProfileOrIdentifier
from streams.normalize import NormalizationSettings
from streams.publish import change_record, dumps, resolved_record
from streams.validate import Validator

__all__ = [
    "ReplaySummary",
    "erase_command",
    "explain_command",
    "export_command",
    "open_state",
    "replay",
    "replay_command",
    "split_command",
]

# `replay --engine`: the Rust linker, the Python graph, or the Rust one when it is built
ENGINES = ("auto", "native", "python")
# Lines per block handed to a validation worker: big enough that pickling overhead is per block, small enough
# that the first events reach the graph at once.
_CHUNK_LINES = 2_000
# Blocks in flight per worker: keeps every worker busy while bounding memory (the file is never read ahead).
_WINDOW_PER_WORKER = 4
_MAX_WORKERS = 8
# Below this input size (~30k events) validation stays in-process: starting a worker takes about a second.
_PARALLEL_MIN_BYTES = 20 * 1024 * 1024
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
        self.engine = "python"

    @property
    def events_per_second(self) -> float:
        """Valid events stitched per wall-clock second."""
        return self.valid / self.seconds if self.seconds > 0 else 0.0


def _chunks(paths: list[Path], progress: Progress | None) -> Iterator[list[bytes]]:
    """Non-blank lines in blocks of `_CHUNK_LINES`; the progress bar advances once per block, not per line."""
    task = None
    if progress is not None:
        total = sum(p.stat().st_size for p in paths if p.is_file())
        task = progress.add_task("replay", total=total or None)
    chunk: list[bytes] = []
    size = 0
    for path in paths:
        fh: BinaryIO
        with sys.stdin.buffer if str(path) == "-" else path.open("rb") as fh:
            for line in fh:
                size += len(line)
                line = line.rstrip(b"\r\n")
                if line.strip():
                    chunk.append(line)
                    if len(chunk) >= _CHUNK_LINES:
                        if progress is not None and task is not None:
                            progress.advance(task, size)
                        yield chunk
                        chunk, size = [], 0
    if progress is not None and task is not None:
        progress.advance(task, size)
    if chunk:
        yield chunk


# (validated event | InvalidEvent code) per line, in input order
_Checked = list["NormalizedEvent | str"]
# NormalizedEvent as plain fields for the trip between processes: a frozen slotted dataclass unpickles
# field by field in Python (~40 µs an event, more than linking it); a tuple unpickles in C (~15 µs with
# the rebuild). (event_id, source, channel, type, occurred_at_ms, ((type, value, verified), ...),
# attributes, consent, dropped, envelope)
_Flat = tuple[str, str, str, str, int, tuple[tuple[str, str, bool], ...], Any, Any, Any, Any]
_worker_validator: Validator | None = None


def _init_worker() -> None:
    """Build the validator (settings from the inherited environment, compiled normaliser) once per process."""
    global _worker_validator
    _worker_validator = Validator(NormalizationSettings.from_env(), keep_unlinkable=True)


def _check_chunk(lines: list[bytes], keep_envelope: bool) -> list[_Flat | str]:
    """Validate a block of lines in a worker process: validation is pure, only stitching needs order."""
    validator = _worker_validator
    assert validator is not None  # set by _init_worker
    return [
        ev
        if isinstance(ev, str)
        else (
            ev.event_id,
            ev.source,
            ev.channel,
            ev.type,
            ev.occurred_at_ms,
            tuple([(i.type, i.value, i.verified) for i in ev.identifiers]),
            ev.attributes,
            ev.consent,
            ev.dropped,
            ev.envelope if keep_envelope else {},  # the core never reads it; only --resolved does
        )
        for ev in _check(validator, lines)
    ]


def _rebuild(block: list[_Flat | str]) -> _Checked:
    return [
        f
        if isinstance(f, str)
        else NormalizedEvent(f[0], f[1], f[2], f[3], f[4], tuple([Identifier(*i) for i in f[5]]), *f[6:])
        for f in block
    ]


def _check(validator: Validator, lines: list[bytes]) -> _Checked:
    validate = validator.validate
    out: _Checked = []
    append = out.append
    for raw in lines:
        try:
            append(validate(raw))
        except InvalidEvent as exc:
            append(str(exc.code))
    return out


def _workers(requested: int | None, total_bytes: int) -> int:
    """Validation processes (0 = in-process): `requested`, OMNISTITCH_REPLAY_WORKERS, or one per CPU."""
    if requested is None:
        env = os.environ.get("OMNISTITCH_REPLAY_WORKERS", "").strip()
        if env:
            if not env.isdigit():
                raise ConfigError(f"OMNISTITCH_REPLAY_WORKERS={env!r} is not a whole number")
            requested = int(env)
        elif total_bytes < _PARALLEL_MIN_BYTES:
            requested = 0  # starting processes costs more than validating a small file
        else:
            requested = min(os.cpu_count() or 1, _MAX_WORKERS)  # validation is the slower half
    return max(requested, 0)


def _checked(
    paths: list[Path],
    progress: Progress | None,
    settings: NormalizationSettings,
    workers: int,
    keep_envelope: bool,
) -> Iterator[_Checked]:
    """Validated blocks in input order: in-process, or from `workers` processes, a bounded window ahead."""
    chunks = _chunks(paths, progress)
    if workers <= 0:
        validator = Validator(settings, keep_unlinkable=True)
        for chunk in chunks:
            yield _check(validator, chunk)
        return
    # fork where there is one: workers start at once with everything imported, and callers need no
    # `if __name__ == "__main__"` guard; the children touch neither the console nor the store
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        window: deque[Future[list[_Flat | str]]] = deque()
        for chunk in chunks:
            window.append(pool.submit(_check_chunk, chunk, keep_envelope))
            if len(window) >= _WINDOW_PER_WORKER * workers:
                yield _rebuild(window.popleft().result())
        while window:
            yield _rebuild(window.popleft().result())


def replay(
    inputs: list[Path],
    state: Path,
    assignments: Path,
    *,
    rules_path: Path | None = None,
    resolved: Path | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    engine: str = "auto",
) -> ReplaySummary:
    """Validate (in parallel when it pays), stitch in input order, write each valid event's final profile.

    `engine`: "native" links with the Rust engine, "python" with `IdentityGraph`, "auto" (default) with the
    native one when it is built. Both write the same assignments and the same keys and values in the state.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} (one of: {', '.join(ENGINES)})")
    native = engine == "native" or (engine == "auto" and native_available())
    if native and not native_available():
        raise ConfigError("the native engine is not built (omnistitch_native): run `make setup` with cargo")
    rules = load_rules(rules_path)
    settings = NormalizationSettings.from_env()  # config errors surface here, before any process starts
    total_bytes = sum(p.stat().st_size for p in inputs if str(p) != "-" and p.is_file())
    n_workers = _workers(workers, total_bytes)
    summary = ReplaySummary()
    summary.engine = "native" if native else "python"
    linker = NativeGraph(RocksStore(state), rules) if native else IdentityGraph(RocksStore(state), rules)
    erasing = False  # an erase event: its values must leave RocksDB's files too (compaction at the end)
    started = time.perf_counter()
    link = linker.link
    invalid = summary.invalid
    # spool: one line per valid event [event_id, profile at link time, anchor, resolved body | null,
    # occurred_at_ms, identifier keys when it carries a device / cookie (for session attribution) | null]
    session_ms = rules.shared_session_ms if rules.shared_active else None
    shared_types = rules.shared_types
    with tempfile.TemporaryFile() as spool:
        write = spool.write
        for block in _checked(inputs, progress, settings, n_workers, resolved is not None):
            summary.lines += len(block)
            for event in block:
                if isinstance(event, str):
                    invalid[event] += 1
                    continue
                summary.valid += 1
                erasing = erasing or event.type == ERASE_TYPE
                result = link(event)
                # the final profile is filled in once all input is linked
                body = (
                    resolved_record(event, None, int(time.time() * 1000), result.anchor)
                    if resolved is not None
                    else None
                )
                keys = None
                if session_ms is not None and any(i.type in shared_types for i in event.identifiers):
                    keys = [i.key for i in event.identifiers]
                write(
                    orjson.dumps(
                        [event.event_id, result.profile_id, result.anchor, body, event.occurred_at_ms, keys],
                        default=str,
                    )
                    + b"\n"
                )
        # step "final" reads the state through the Python graph (the native engine only links)
        graph = linker.python() if isinstance(linker, NativeGraph) else linker
        graph.flush()
        # step "final": follow merges (and splits) to where each event's profile ended up
        final_of = _FinalProfiles(graph)
        sightings = _shared_sightings(spool, final_of, shared_types) if session_ms is not None else {}
        spool.seek(0)
        assignments.parent.mkdir(parents=True, exist_ok=True)
        res_fh = resolved.open("wb") if resolved is not None else None
        try:
            with assignments.open("wb") as out:
                for line in spool:
                    event_id, pid, anchor, body, at, keys = orjson.loads(line)
                    final = final_of(pid, anchor)
                    if final is None and sightings and keys and session_ms is not None:
                        # an anonymous visit on a shared device: whoever identified on it in the same session
                        final = _session_final(graph, keys, at, sightings, shared_types, session_ms)
                    if final is None:
                        summary.unassigned += 1
                    out.write(orjson.dumps({"event_id": event_id, "profile_id": final}) + b"\n")
                    if res_fh is not None and body is not None and final is not None:
                        body["profile_id"] = final
                        res_fh.write(orjson.dumps(body, default=str) + b"\n")
        finally:
            if res_fh is not None:
                res_fh.close()
    if erasing:
        graph.compact()
    summary.seconds = time.perf_counter() - started
    summary.stats = dict(graph.stats)
    graph.close()
    return summary


class _FinalProfiles:
    """Where an event linked to `pid` by `anchor` belongs once all input is linked (memoised per profile)."""

    def __init__(self, graph: IdentityGraph) -> None:
        self.graph = graph
        self.follow_splits = graph.stats["splits"] > 0
        self.memo: dict[str, str | None] = {}

    def __call__(self, pid: str | None, anchor: str | None) -> str | None:
        graph = self.graph
        if pid is None or (anchor is not None and graph.is_generic(anchor)):
            return None  # no profile, or its anchor turned out shared: not attributable
        if self.follow_splits:
            return graph.final_profile(pid, anchor)
        final = self.memo.get(pid, "")
        if final == "":
            final = self.memo[pid] = graph.final_profile(pid)
        return final


def _shared_sightings(
    spool: BinaryIO, final_of: _FinalProfiles, shared_types: frozenset[str]
) -> dict[str, list[tuple[int, str]]]:
    """Per device / cookie now marked shared: (time, final profile) of each event naming a person on it."""
    graph = final_of.graph
    out: dict[str, list[tuple[int, str]]] = {}
    spool.seek(0)
    for line in spool:
        _, pid, anchor, _, at, keys = orjson.loads(line)
        if not keys:
            continue
        shared = [k for k in keys if k.split(":", 1)[0] in shared_types and graph.is_generic(k)]
        if not shared or not any(
            k.split(":", 1)[0] not in shared_types and not graph.is_generic(k) for k in keys
        ):
            continue
        final = final_of(pid, anchor)
        if final is not None:
            for key in shared:
                out.setdefault(key, []).append((at, final))
    for seen in out.values():
        seen.sort()
    return out


def _session_final(
    graph: IdentityGraph,
    keys: list[str],
    at: int,
    sightings: dict[str, list[tuple[int, str]]],
    shared_types: frozenset[str],
    window_ms: int,
) -> str | None:
    """The session owner of an event carrying nothing but shared devices / cookies and generic values."""
    shared = []
    for key in keys:
        if key.split(":", 1)[0] in shared_types:
            shared.append(key)
        elif not graph.is_generic(key):
            return None  # a usable person identifier that still gave no profile (erased): leave it
    for key in sorted(shared):
        seen = sightings.get(key)
        owner = session_owner(seen, at, window_ms) if seen else None
        if owner is not None:
            return owner
    return None


def _print_summary(console: Console, s: ReplaySummary) -> None:
    st = s.stats
    table = Table(title="omnistitch replay", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("engine", s.engine)
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
    engine: str = typer.Option(
        "auto",
        "--engine",
        help="Linker: native (Rust), python, or auto (native when built); same output either way.",
    ),
) -> None:
    """Stitch event files offline into a state directory; write each event's final profile id."""
    console = Console(stderr=True)
    try:
        if console.is_terminal:
            columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
            with Progress(*columns, console=console, transient=True) as progress:
                summary = replay(
                    inputs,
                    state,
                    assignments,
                    rules_path=rules,
                    resolved=resolved,
                    progress=progress,
                    engine=engine,
                )
        else:
            summary = replay(inputs, state, assignments, rules_path=rules, resolved=resolved, engine=engine)
    except (OmnistitchError, OSError) as exc:
        console.print(f"[red]replay failed:[/red] {exc}")
        raise typer.Exit(2) from exc
    _print_summary(console, summary)


def open_state(state: Path) -> IdentityGraph:
    """The graph over a state directory `replay` wrote, for the commands that read or amend one.

    A missing directory is an error (one line, exit 2) rather than opened: RocksStore would create an empty
    state there, and every lookup would then answer "unknown" instead of pointing at the mistyped path.
    """
    if not state.is_dir():
        typer.echo(f"no state directory at {state}", err=True)
        raise typer.Exit(2)
    return IdentityGraph(RocksStore(state))


def export_command(
    state: Path = typer.Option(..., "--state", help="State directory written by `replay`."),  # noqa: B008
    out: Path | None = typer.Option(None, "--out", help="Output file (default: stdout)."),  # noqa: B008
) -> None:
    """Write {"identifier": "type:value", "profile_id": ...} for every identifier in the state."""
    graph = open_state(state)
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
    graph = open_state(state)
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


def _print_changes(changes: tuple[IdentityChange, ...]) -> None:
    """One JSON line per change, in the shape the stream app publishes on `identity.changes`."""
    for change in changes:
        typer.echo(dumps(change_record(change)).decode())


def split_command(
    profile_id: str = typer.Argument(..., help="The live profile to split."),
    identifiers: list[str] = typer.Argument(  # noqa: B008
        ..., help='Identifiers ("type:value", as `export` lists them) to move to a new profile.'
    ),
    state: Path | None = typer.Option(  # noqa: B008
        None, "--state", help="State directory written by `replay`; without it, the running stream app's."
    ),
    reason: str = typer.Option("", "--reason", help="Why, kept in the history (`explain` shows it)."),
) -> None:
    """Undo a wrong merge: move identifiers to a new profile that never merges with this one again.

    Prints the new profile id, then the identity changes as JSON lines (the `identity.changes` shape). In the
    stream app (no `--state`): the request goes to the profile's partition, and the changes are read back
    from `identity.changes` (settings from KAFKA_BOOTSTRAP and OMNISTITCH_* variables).
    """
    if state is None:
        from streams.app.commands import split_in_stream

        split_in_stream(profile_id, identifiers, reason)
        return
    graph = open_state(state)
    try:
        new_id, changes = graph.split(profile_id, identifiers, reason=reason)
    except (UnknownProfileOrIdentifier, ValueError) as exc:
        typer.echo(f"split failed: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        graph.close()
    typer.echo(new_id)
    _print_changes(changes)


def erase_command(
    target: str = typer.Argument(..., help='A profile id, or one identifier ("type:value").'),
    state: Path = typer.Option(..., "--state", help="State directory written by `replay`."),  # noqa: B008
) -> None:
    """Right to be forgotten: erase a profile or one identifier; the state is compacted so no copy stays.

    Prints the identity changes as JSON lines; none when the identifier's profile keeps others (see stderr).
    """
    graph = open_state(state)
    try:
        profile = graph.profile(target)
        owner = None if profile is not None else graph.lookup(target)
        changes = graph.erase(target, at_ms=int(time.time() * 1000))
        graph.compact()
    except UnknownProfileOrIdentifier as exc:
        typer.echo(f"erase failed: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        graph.close()
    _print_changes(changes)
    if profile is not None and not changes:
        typer.echo(f"profile {target} was already erased", err=True)
    elif profile is None:
        held = f"from profile {owner}" if owner is not None else "(no profile held it)"
        typer.echo(f"erased identifier {target} {held}", err=True)
