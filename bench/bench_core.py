"""Benchmark of the stitching core on rocksdict, beside networkx.connected_components on the same edges.

Usage:  .venv/bin/python bench/bench_core.py [--events 1000000] [--unprotected] [--json]
        (or OMNISTITCH_BENCH_EVENTS=200000)

Synthetic NormalizedEvents are generated directly (no JSON, no validation) so only the core is measured;
generation happens in chunks outside the timed region. The data mirrors the simulator's shape (about 12
events per person, the simulator's source mix; about 3 in 4 events touch only known identifiers of one
profile and change nothing but aggregates — `events_without_changes` reports the measured share), not a
stream of brand-new identities. Peak RSS is read after the core run, before networkx builds its graph,
and half-way through (after a flush, untimed, with the identifiers stored then), so that what each further
identifier costs (`rss_mb_per_1m_more_identifiers`) reads apart from what the process holds whatever the
data (the interpreter, libraries, RocksDB's memtables, the hot cache, a write batch).
`--cache-profiles` / `--cold-profiles` / `--cache-identifiers` set the graph's cache sizes (the
memory / speed trade-off, see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from streams.core import IdentityGraph, RocksStore, Rules
from streams.core.native import NativeGraph, native_available
from streams.events import Identifier, NormalizedEvent
from streams.runtime import tune_gc

CHUNK = 10_000
T0 = 1_767_225_600_000  # 2026-01-01


def _person_ids(p: int) -> dict[str, Identifier]:
    """A person's identifiers, derived from the person number (nothing is kept between chunks).

    Shares follow the simulator's defaults: 12% anonymous (cookie only), phone 95%, e-mail 85%, account
    62%, loyalty card 55%, app 45%.
    """
    r = (p * 2654435761) & 0xFFFFFFFF  # cheap stable hash for per-person traits
    ids: dict[str, Identifier] = {"cookie": Identifier("cookie_id", f"k{p}")}
    if r % 100 < 12:
        return ids
    if (r >> 7) % 100 < 95:
        ids["phone"] = Identifier("phone", f"+7900{p:07d}")
    if (r >> 14) % 100 < 85:
        ids["email"] = Identifier("email", f"user{p}@mail.ru", verified=(r >> 21) % 4 != 0)
    if (r >> 3) % 100 < 62:
        ids["customer"] = Identifier("customer_id", f"C{p}", verified=True)
    if (r >> 10) % 100 < 55:
        ids["loyalty"] = Identifier("loyalty_card", f"2000{p:08d}", verified=True)
    if (r >> 17) % 100 < 45:
        ids["device"] = Identifier("device_id", f"d{p}", verified=True)
    return ids


# (share, event type, source, channel, identifier slots, needs every slot) — the simulator's source mix:
# web 31%, e-mail campaigns 22%, push 13%, app 10%, sms 7%, crm 7%, pos 5%, calls 3%, messengers 2%
_KINDS: tuple[tuple[float, str, str, str, tuple[str, ...]], ...] = (
    (0.31, "page_view", "web", "web", ("cookie", "customer")),
    (0.22, "message_sent", "esp", "email", ("email", "customer")),
    (0.13, "message_sent", "push", "push", ("device", "customer")),
    (0.10, "product_view", "app", "app", ("device", "customer")),
    (0.07, "message_sent", "sms", "sms", ("phone", "customer")),
    (0.07, "identify", "crm", "crm", ("customer", "loyalty", "phone", "email")),
    (0.05, "store_purchase", "pos", "store", ("loyalty", "phone")),
    (0.03, "call", "call_center", "phone", ("phone", "customer")),
    (0.02, "message_received", "messenger", "whatsapp", ("phone",)),
)


def events(n: int, per_person: int = 12, seed: int = 7) -> Iterator[list[NormalizedEvent]]:
    """n synthetic events in chunks, shaped like `omnistitch simulate` output.

    About `per_person` events per person; people arrive over the run (a new person with probability
    1/per_person, otherwise a known one, recent ones likelier), so ~92% of events touch only known
    identifiers and most new identifiers arrive one or two at a time; 3% of web visits use a fresh cookie.
    """
    rng = random.Random(seed)
    chunk: list[NormalizedEvent] = []
    arrived = 0
    new_share = 1 / per_person
    cum: list[float] = list(itertools.accumulate(k[0] for k in _KINDS))
    for i in range(n):
        if arrived == 0 or rng.random() < new_share:
            p = arrived
            arrived += 1
        elif rng.random() < 0.5 and arrived > 4000:
            p = arrived - 1 - min(int(rng.expovariate(1 / 2000)), arrived - 1)  # recently active people
        else:
            p = rng.randrange(arrived)
        ids = _person_ids(p)
        x = rng.random() * cum[-1]
        k = 0
        while cum[k] < x:
            k += 1
        _, etype, source, channel, slots = _KINDS[k]
        picked = [ids[s] for s in slots if s in ids]
        if not picked or (slots[0] not in ids):
            etype, source, channel = "page_view", "web", "web"
            picked = [ids["cookie"]]
            if "customer" in ids and rng.random() < 0.8:
                picked.append(ids["customer"])
        if source == "web" and rng.random() < 0.03:
            picked[0] = Identifier("cookie_id", f"k{p}n{i}")  # cleared cookies, a new browser
        attrs: dict[str, object] = {}
        if etype == "store_purchase":
            attrs = {"total": Decimal("990.00"), "currency": "RUB", "order_id": f"o{i}"}
        chunk.append(
            NormalizedEvent(
                event_id=f"ev{i:09d}",
                source=source,
                channel=channel,
                type=etype,
                occurred_at_ms=T0 + i * 50,
                identifiers=tuple(picked),
                attributes=attrs,
            )
        )
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a summary (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=int(os.environ.get("OMNISTITCH_BENCH_EVENTS", "1000000")))
    ap.add_argument("--per-person", type=int, default=12, help="Average events per person (default 12).")
    ap.add_argument("--cache-profiles", type=int, default=None, help="Hot cache size (decoded profiles).")
    ap.add_argument("--cold-profiles", type=int, default=None, help="Cold cache size (encoded profiles).")
    ap.add_argument("--cache-identifiers", type=int, default=None, help="Identifier owner cache size.")
    ap.add_argument("--flush-every", type=int, default=None, help="Events per write batch (graph default).")
    ap.add_argument("--unprotected", action="store_true", help="Merge protection off (plain components).")
    ap.add_argument("--no-history", action="store_true", help="Do not store change history (explain).")
    ap.add_argument(
        "--engine",
        choices=("native", "python"),
        default="native" if native_available() else "python",
        help="The Rust link path (default when built) or the Python graph.",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rules = Rules.unprotected() if args.unprotected else Rules()
    rss_start = _rss_mb()
    # wall time; the linking thread's CPU time; the process's CPU time in the same windows (RocksDB's flushes
    # and compactions run beside the linking thread): on a shared machine, CPU time is the steadier figure
    core_seconds = core_cpu = process_cpu = 0.0
    n_events = n_links = quiet = 0
    with tempfile.TemporaryDirectory(prefix="omnistitch-bench-") as tmp:
        sizes = {
            "cache_profiles": args.cache_profiles,
            "cold_profiles": args.cold_profiles,
            "cache_identifiers": args.cache_identifiers,
            "flush_every": args.flush_every,
        }
        extra: dict[str, Any] = {k: v for k, v in sizes.items() if v is not None}
        graph: IdentityGraph | NativeGraph
        if args.engine == "native":
            graph = NativeGraph(RocksStore(tmp), rules, history=not args.no_history, **extra)
        else:
            graph = IdentityGraph(RocksStore(tmp), rules, history=not args.no_history, **extra)
        link = graph.link
        tune_gc()  # as the CLI does: the figures are the replay's
        halfway: tuple[int, float] | None = None  # (identifiers, peak RSS) half-way through
        for chunk in events(args.events, args.per_person):
            if halfway is None and n_events >= args.events // 2:
                graph.flush()
                halfway = (sum(1 for _ in graph.store.iter_prefix(b"i:")), _rss_mb())
            n_events += len(chunk)
            n_links += sum(len(e.identifiers) for e in chunk)
            t, c, pc = time.perf_counter(), time.thread_time(), time.process_time()
            for e in chunk:
                if not link(e).changes:
                    quiet += 1
            core_seconds += time.perf_counter() - t
            core_cpu += time.thread_time() - c
            process_cpu += time.process_time() - pc
            del chunk
        t, c, pc = time.perf_counter(), time.thread_time(), time.process_time()
        graph.flush()
        core_seconds += time.perf_counter() - t
        core_cpu += time.thread_time() - c
        process_cpu += time.process_time() - pc
        identifiers = sum(1 for _ in graph.store.iter_prefix(b"i:"))
        stats = dict(graph.stats)
        caches = graph.cache_sizes() if isinstance(graph, NativeGraph) else None
        rss_core = _rss_mb()
        graph.close()
        db_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())

    # networkx on the same edge list (built untimed; graph construction + components timed)
    import networkx as nx

    edges: list[tuple[str, str]] = []
    nodes: list[str] = []
    for chunk in events(args.events, args.per_person):
        for e in chunk:
            keys = [i.key for i in e.identifiers]
            if len(keys) == 1:
                nodes.append(keys[0])
            edges.extend(itertools.pairwise(keys))
    t = time.perf_counter()
    g = nx.Graph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    components = sum(1 for _ in nx.connected_components(g))
    nx_seconds = time.perf_counter() - t

    out = {
        "events": n_events,
        "identifier_links": n_links,
        "identifiers": identifiers,
        "protection": not args.unprotected,
        "data": f"simulator-shaped: ~{args.per_person} events/person, most touching only known identifiers",
        "events_per_person": args.per_person,
        "events_without_changes": round(quiet / n_events, 3) if n_events else None,
        "engine": args.engine,
        "cache_profiles": graph.cache_profiles,
        "cold_profiles": graph.cold_profiles,
        "cache_identifiers": graph.cache_identifiers,
        "core_seconds": round(core_seconds, 3),
        "events_per_s": round(n_events / core_seconds),
        "links_per_s": round(n_links / core_seconds),
        "linking_thread_cpu_s": round(core_cpu, 3),
        "events_per_linking_cpu_s": round(n_events / core_cpu),
        "process_cpu_s": round(process_cpu, 3),
        "peak_rss_mb_after_core": round(rss_core, 1),
        "rss_mb_at_start": round(rss_start, 1),
        "rss_mb_per_1m_identifiers": round((rss_core - rss_start) / identifiers * 1e6, 1)
        if identifiers
        else None,
        "peak_rss_mb_per_1m_identifiers_total": round(rss_core / identifiers * 1e6, 1)
        if identifiers
        else None,
        "identifiers_halfway": halfway[0] if halfway else None,
        "peak_rss_mb_halfway": round(halfway[1], 1) if halfway else None,
        "rss_mb_per_1m_more_identifiers": round((rss_core - halfway[1]) / (identifiers - halfway[0]) * 1e6, 1)
        if halfway and identifiers > halfway[0]
        else None,
        "rss_note": f"ru_maxrss of the whole process; events generated lazily, {CHUNK} held at a time",
        "rocksdb_bytes": db_bytes,
        "native_caches": caches,
        "profiles_live": stats["profiles_live"],
        "merges": stats["merges"],
        "refusals": stats["refusals"],
        "networkx_seconds": round(nx_seconds, 3),
        "networkx_components": components,
        "ratio_networkx_time_over_core_time": round(nx_seconds / core_seconds, 3),
    }
    if args.json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        for k, v in out.items():
            print(f"{k:38} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
