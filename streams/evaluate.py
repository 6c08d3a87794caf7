"""Accuracy against ground truth: how close a stitching is to the real people, next to the naive baseline.

Why these metrics: pairwise precision/recall count pairs of events put together (a merge of two big profiles
costs quadratically, which is how wrong merges hurt a business: one person's offers sent to another), B-cubed
averages per event (small profiles count as much as big ones). Both are computed from contingency counts,
`n_ij` = events of true person `i` in predicted profile `j`, so a million events take a second, not n² pairs.

Three columns are reported side by side:

- the assignments under test (`replay --assignments` output or `assignments_from_resolved`);
- the naive baseline: connected components over every normalised identifier, no protection at all;
- the identifier ceiling: components over identifiers *within* each true person, i.e. the best any stitching
  by shared identifiers can do (precision 1; recall shows how much of the population is linkable at all).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from streams.core.rules import RULE_GENERIC, RULE_SHARED
from streams.topic_reader import TopicNotFound, read_to_end

if TYPE_CHECKING:
    from streams.normalize import NormalizationSettings

__all__ = [
    "Scores",
    "assignments_command",
    "assignments_from_resolved",
    "baseline_assignments",
    "evaluate_command",
    "read_assignments",
    "read_topic_to_end",
    "read_truth",
    "score",
]

# refusal rules that mark a value as no longer linking: events it anchored are unattributed, as in the replay
_STOPS_LINKING = frozenset({RULE_GENERIC, RULE_SHARED})
_SINGLETON = "\x00"  # prefix of the synthetic label of an unassigned event: never equal to a real profile id


@dataclass(frozen=True, slots=True)
class Scores:
    """One stitching's accuracy against truth; every count is over unique truth events."""

    events: int
    people: int
    profiles: int
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f1: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float
    over_merged_profiles: int  # predicted profiles holding events of more than one true person
    split_people: int  # true people whose events are spread over more than one profile
    largest_profile_events: int
    largest_profile_people: int
    true_pairs: int
    predicted_pairs: int
    correct_pairs: int
    unassigned_events: int  # truth events missing from the assignments (scored as singletons)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for `--json`."""
        return asdict(self)


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def _ratio(num: float, den: float) -> float:
    return num / den if den else 1.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def score(truth: Mapping[str, str], assignments: Mapping[str, str | None]) -> Scores:
    """Score predicted profiles against true people in O(n): contingency counts, then n-choose-2 sums.

    Events in `truth` but not in `assignments`, or assigned `None`, are singletons; events only in
    `assignments` are ignored (truth defines the population).
    """
    # step "contingency": (profile, person) -> n_ij ; profile -> b_j ; person -> a_i
    cells: Counter[tuple[str, str]] = Counter()
    unassigned = 0
    for event_id, person in truth.items():
        profile = assignments.get(event_id)
        if profile is None:
            if event_id not in assignments:
                unassigned += 1
            profile = _SINGLETON + event_id
        cells[(profile, person)] += 1
    sizes: Counter[str] = Counter()
    persons: Counter[str] = Counter()
    people_in: Counter[str] = Counter()
    for (profile, person), n in cells.items():
        sizes[profile] += n
        persons[person] += n
        people_in[profile] += 1
    n_events = len(truth)
    correct = sum(_pairs(n) for n in cells.values())
    predicted = sum(_pairs(n) for n in sizes.values())
    true_pairs = sum(_pairs(n) for n in persons.values())
    # B-cubed: per event, |own profile ∩ own person| / |own profile| (precision) or / |own person| (recall)
    bp = sum(n * n / sizes[profile] for (profile, _), n in cells.items())
    br = sum(n * n / persons[person] for (_, person), n in cells.items())
    p, r = _ratio(correct, predicted), _ratio(correct, true_pairs)
    bcp, bcr = _ratio(bp, n_events), _ratio(br, n_events)
    profiles_of: Counter[str] = Counter(person for (_, person) in cells)
    largest = max(sizes, key=lambda k: (sizes[k], people_in[k]), default=None)
    return Scores(
        events=n_events,
        people=len(persons),
        profiles=len(sizes),
        pairwise_precision=p,
        pairwise_recall=r,
        pairwise_f1=_f1(p, r),
        bcubed_precision=bcp,
        bcubed_recall=bcr,
        bcubed_f1=_f1(bcp, bcr),
        over_merged_profiles=sum(1 for k in people_in.values() if k > 1),
        split_people=sum(1 for k in profiles_of.values() if k > 1),
        largest_profile_events=sizes[largest] if largest is not None else 0,
        largest_profile_people=people_in[largest] if largest is not None else 0,
        true_pairs=true_pairs,
        predicted_pairs=predicted,
        correct_pairs=correct,
        unassigned_events=unassigned,
    )


# ----------------------------------------------------------------------------------------------------------
# Reading files.
# ----------------------------------------------------------------------------------------------------------


def _json_lines(path: Path | str) -> Iterator[tuple[int, Any]]:
    with Path(path).open("rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, orjson.loads(line)


def read_truth(path: Path | str) -> dict[str, str]:
    """`{"event_id", "person_id"}` lines -> event id -> person id."""
    return {rec["event_id"]: str(rec["person_id"]) for _, rec in _json_lines(path)}


def read_assignments(path: Path | str) -> dict[str, str | None]:
    """`{"event_id", "profile_id"}` lines (a null profile_id = singleton); an event's last line wins."""
    out: dict[str, str | None] = {}
    for _, rec in _json_lines(path):
        profile = rec.get("profile_id")
        out[rec["event_id"]] = None if profile is None else str(profile)
    return out


def assignments_from_resolved(
    resolved: Iterable[Mapping[str, Any]], changes: Iterable[Mapping[str, Any]] = ()
) -> dict[str, str | None]:
    """Final profile per event from the stream app's output, as `replay --assignments` would write it.

    A resolved event carries the profile it joined *at resolve time*; later merges move it on. `changes`
    are `identity.changes` records: a `profiles_merged` record says each id in `merged` was folded into its
    `survivor`, and the chain is followed to its end (cycles are cut). An event whose `anchor` was later found
    generic or shared (a `merge_refused` record with rule `generic_value` or `shared_device`) is unattributed,
    as in the replay. An event whose final profile (merges followed) was erased (`profile_erased`) gets None,
    as `replay` gives it: erased is where a chain ends, so the check is made after following merges. An
    event whose anchor a `profile_split` later moved out of the profile the event ends in follows it to the
    split-off profile (merges followed again), as the core's `final_profile` does. The last resolved record
    of an event wins (at-least-once delivery may repeat one).
    """
    merged_into: dict[str, str] = {}
    generic: set[str] = set()
    erased: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {}  # moved identifier → (parent, split-off profile), in order
    for change in changes:
        kind = change.get("kind")
        if kind == "profile_split":
            for key in change.get("identifiers") or ():
                for child in change.get("new_profiles") or ():
                    splits.setdefault(str(key), []).append((str(change["profile_id"]), str(child)))
        if kind == "merge_refused" and change.get("rule") in _STOPS_LINKING:
            generic.update(change.get("identifiers") or ())
        if kind == "profile_erased":
            erased.add(str(change["profile_id"]))
        if kind != "profiles_merged":
            continue
        survivor = str(change["survivor"])
        for merged in change.get("merged") or ():
            if merged != survivor:
                merged_into[str(merged)] = survivor
    out: dict[str, str | None] = {}
    anchors: dict[str, str] = {}
    for rec in resolved:
        profile = rec.get("profile_id")
        event_id = str(rec["event_id"])
        out[event_id] = None if profile is None else str(profile)
        if rec.get("anchor"):
            anchors[event_id] = str(rec["anchor"])
    for event_id, anchor in anchors.items():
        if anchor in generic:
            out[event_id] = None
    cache: dict[str, str] = {}
    for event_id, profile in out.items():
        if profile is None:
            continue
        final = _final(profile, merged_into, cache) if profile in merged_into else profile
        moves = splits.get(anchors.get(event_id, ""), ())
        for _ in moves:  # a split of a split: until none applies (records come in partition order, not time)
            step = next((c for p, c in moves if _final(p, merged_into, cache) == final), None)
            if step is None:
                break
            final = _final(step, merged_into, cache)
        out[event_id] = None if final in erased else final
    return out


def _final(profile: str, merged_into: Mapping[str, str], cache: dict[str, str]) -> str:
    path, seen, current = [], set(), profile
    while current in merged_into and current not in seen:
        if current in cache:
            current = cache[current]
            break
        seen.add(current)
        path.append(current)
        current = merged_into[current]
    for p in path:
        cache[p] = current
    return current


def baseline_assignments(
    events_path: Path | str,
    truth: Mapping[str, str] | None = None,
    settings: NormalizationSettings | None = None,
) -> tuple[dict[str, str | None], dict[str, str | None] | None, int]:
    """Naive connected components over all normalised identifiers (and, given truth, the per-person ceiling).

    Returns (naive assignments, ceiling assignments or None, events refused by validation). Identifiers come
    from a `Validator` with `settings` (default `NormalizationSettings.from_env()`, as `replay` reads them),
    so the baseline sees exactly the keys and refusals the core sees; refused events are singletons.
    """
    from streams.exceptions import InvalidEvent
    from streams.normalize import NormalizationSettings
    from streams.validate import Validator

    validate = Validator(NormalizationSettings.from_env() if settings is None else settings).validate

    # step "keys": event id -> its identifier keys ; union-find over "type:value" keys
    naive = _UnionFind()
    ceiling = _UnionFind()
    event_keys: dict[str, tuple[str, ...]] = {}
    refused = 0
    with Path(events_path).open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = validate(line)
            except InvalidEvent:
                refused += 1
                continue
            if event.event_id in event_keys:
                continue  # duplicate delivery
            keys = tuple(i.key for i in event.identifiers)
            event_keys[event.event_id] = keys
            if keys:
                naive.union_all(keys)
                if truth is not None:
                    person = truth.get(event.event_id, "")
                    ceiling.union_all(tuple(f"{person}\x1f{k}" for k in keys))
    naive_out: dict[str, str | None] = {}
    ceiling_out: dict[str, str | None] | None = {} if truth is not None else None
    for event_id, keys in event_keys.items():
        naive_out[event_id] = naive.find(keys[0]) if keys else None
        if ceiling_out is not None and truth is not None:
            person = truth.get(event_id, "")
            ceiling_out[event_id] = ceiling.find(f"{person}\x1f{keys[0]}") if keys else None
    return naive_out, ceiling_out, refused


class _UnionFind:
    """Path-halving union-find over string keys: a million identifiers in about a second."""

    __slots__ = ("parent",)

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        if parent.setdefault(x, x) == x:
            return x
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    def union_all(self, keys: tuple[str, ...]) -> None:
        first = self.find(keys[0])
        for key in keys[1:]:
            other = self.find(key)
            if other != first:
                self.parent[other] = first


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------

_ROWS: tuple[tuple[str, str, str], ...] = (
    ("pairwise precision", "pairwise_precision", "f"),
    ("pairwise recall", "pairwise_recall", "f"),
    ("pairwise F1", "pairwise_f1", "f"),
    ("B-cubed precision", "bcubed_precision", "f"),
    ("B-cubed recall", "bcubed_recall", "f"),
    ("B-cubed F1", "bcubed_f1", "f"),
    ("profiles", "profiles", "d"),
    ("over-merged profiles (>1 person)", "over_merged_profiles", "d"),
    ("split people (>1 profile)", "split_people", "d"),
    ("largest profile: events", "largest_profile_events", "d"),
    ("largest profile: people", "largest_profile_people", "d"),
    ("unassigned events", "unassigned_events", "d"),
)


def evaluate_command(
    truth: Annotated[Path, typer.Option("--truth", help="truth.jsonl from `omnistitch simulate`.")],
    assignments: Annotated[
        Path | None,
        typer.Option(
            help="{event_id, profile_id} lines (`replay --assignments` or `omnistitch assignments`)."
        ),
    ] = None,
    events: Annotated[
        Path | None,
        typer.Option(help="The same events (all.jsonl): adds the naive baseline and the identifier ceiling."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Pairwise and B-cubed accuracy of a stitching against ground truth, next to the naive baseline."""
    if assignments is None and events is None:
        raise typer.BadParameter("give --assignments, --events (baseline), or both")
    truth_map = read_truth(truth)
    if not truth_map:
        # with no population every score is a vacuous 1.0: an error, not a perfect result
        raise typer.BadParameter(f"{truth} holds no truth events", param_hint="'--truth'")
    columns: dict[str, Scores] = {}
    if assignments is not None:
        columns["assignments"] = score(truth_map, read_assignments(assignments))
    refused = 0
    if events is not None:
        from streams.exceptions import ConfigError
        from streams.normalize import NormalizationSettings

        try:
            settings = NormalizationSettings.from_env()  # the keys and refusals `replay` would see
        except ConfigError as exc:
            typer.echo(f"evaluate failed: {exc}", err=True)
            raise typer.Exit(2) from exc
        naive, ceiling, refused = baseline_assignments(events, truth_map, settings)
        columns["naive baseline"] = score(truth_map, naive)
        if ceiling is not None:
            columns["identifier ceiling"] = score(truth_map, ceiling)
    for warning in _warnings(columns):
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        payload: dict[str, Any] = {
            "events": len(truth_map),
            "people": len(set(truth_map.values())),
            "refused_by_validation": refused,
            **{name.replace(" ", "_"): s.as_dict() for name, s in columns.items()},
        }
        typer.echo(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
        return
    from rich.console import Console
    from rich.table import Table

    first = next(iter(columns.values()))
    table = Table(title=f"Accuracy on {first.events:,} events of {first.people:,} people")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for label, attr, kind in _ROWS:
        cells = [
            f"{getattr(s, attr):.4f}" if kind == "f" else f"{getattr(s, attr):,}" for s in columns.values()
        ]
        table.add_row(label, *cells)
    ceiling_scores = columns.get("identifier ceiling")
    if ceiling_scores is not None and ceiling_scores.pairwise_recall > 0:
        # how much of what is linkable at all each stitching found
        table.add_row(
            "pairwise recall / ceiling",
            *(f"{s.pairwise_recall / ceiling_scores.pairwise_recall:.4f}" for s in columns.values()),
        )
    console = Console()
    console.print(table)
    if refused:
        console.print(f"{refused:,} event lines refused by validation (scored as singletons)")


def _warnings(columns: Mapping[str, Scores]) -> Iterator[str]:
    """Scores that look fine but mean nothing: a wrong file, or precision 1.0 for 0 of 0 predicted pairs."""
    for name, s in columns.items():
        if s.unassigned_events == s.events:
            yield f"{name}: none of the {s.events:,} truth events is in it (another run's file?)"
        if s.predicted_pairs == 0 and s.true_pairs > 0:
            yield f"{name}: no two events were put together; pairwise precision 1.0 is 0/0, not a result"


def read_topic_to_end(bootstrap: str, topic: str, timeout: float = 120.0) -> Iterator[dict[str, Any]]:
    """Every committed JSON record of `topic` up to its current end (read_committed, no offsets kept)."""
    try:
        messages = read_to_end(bootstrap, topic, timeout)
    except TopicNotFound as exc:
        raise typer.BadParameter(str(exc)) from None
    for message in messages:
        value = message.value()
        if value:
            yield orjson.loads(value)


def assignments_command(
    out: Annotated[Path, typer.Option("--out", help="Where to write {event_id, profile_id} lines.")],
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP).")
    ] = None,
    topic: Annotated[str, typer.Option(help="The stream app's resolved-events topic.")] = "events.resolved",
    changes_topic: Annotated[
        str, typer.Option(help="Profile changes topic (merges, generic values, erasures).")
    ] = "identity.changes",
) -> None:
    """Read the stream app's output to its end and write final assignments for `omnistitch evaluate`."""
    import os

    from streams.produce import DEFAULT_BOOTSTRAP

    server = bootstrap or os.environ.get("KAFKA_BOOTSTRAP") or DEFAULT_BOOTSTRAP
    changes = list(read_topic_to_end(server, changes_topic))
    final = assignments_from_resolved(read_topic_to_end(server, topic), changes)
    with out.open("wb") as f:
        for event_id, profile in final.items():
            f.write(orjson.dumps({"event_id": event_id, "profile_id": profile}) + b"\n")
    typer.echo(f"{len(final):,} assignments -> {out}", err=True)
