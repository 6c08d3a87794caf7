""" "Why are these linked": the chain of events and rules that put an identifier in its profile."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streams.core.state import ACTIVE, MERGED, R_FIRST, R_ORIGIN, R_VIA
from streams.exceptions import UnknownProfileOrIdentifier

if TYPE_CHECKING:
    from streams.core.graph import IdentityGraph

__all__ = ["explain", "format_explanation"]


def _find(history: list[dict[str, Any]], pred: Any) -> dict[str, Any] | None:
    for entry in history:
        if pred(entry):
            return entry
    return None


def explain(graph: IdentityGraph, target: str) -> dict[str, Any]:
    """Explanation of an identifier ("type:value") or a profile id, as a JSON-able dict."""
    graph.flush()
    if ":" in target:
        return _explain_identifier(graph, target)
    return _explain_profile(graph, target)


def _explain_identifier(graph: IdentityGraph, key: str) -> dict[str, Any]:
    pid = graph.lookup(key)
    generic = graph.is_generic(key)
    # refusals naming it, on whichever profile they were pinned (the event's, often not the value's own)
    refusals = [
        {**entry, "profile_id": holder}
        for holder, entry in graph.refusals_naming(key)
        if entry["k"] == "merge_refused"
    ]
    if pid is None:
        if generic or refusals:
            return {
                "identifier": key,
                "generic": generic,
                "profile_id": None,
                "steps": [],
                "refusals": refusals,
            }
        raise UnknownProfileOrIdentifier(f"identifier {key} is in no profile")
    live = graph.profile(pid)
    assert live is not None
    rec = live.ids[key]
    origin: str = rec[R_ORIGIN]
    via: str = rec[R_VIA]
    steps: list[dict[str, Any]] = []
    hist = graph.history(origin)
    if via.startswith("split:"):
        entry = _find(hist, lambda e: e["k"] == "profile_created" and key in e.get("identifiers", ()))
        steps.append(
            {
                "step": "split",
                "profile_id": origin,
                "from_profile_id": via[6:],
                "at_ms": rec[R_FIRST],
                **_tail(entry),
            }
        )
    else:
        entry = _find(
            hist,
            lambda e: (
                (e["k"] == "profile_created" and key in e.get("identifiers", ()))
                or (e["k"] == "identifiers_attached" and e.get("identifier") == key)
            ),
        )
        step = "created" if entry is not None and entry["k"] == "profile_created" else "attached"
        steps.append(
            {"step": step, "profile_id": origin, "event_id": via, "at_ms": rec[R_FIRST], **_tail(entry)}
        )
    # follow merges from where it arrived to where it lives
    cur = graph._get_profile(origin)
    hops = 0
    while cur is not None and cur.status == MERGED and cur.merged_into is not None and hops < 10_000:
        into = cur.merged_into
        src = cur.id
        entry = _find(
            graph.history(into),
            lambda e, s=src: e["k"] == "profiles_merged" and e.get("merged_profile_id") == s,
        )
        steps.append({"step": "merged", "profile_id": src, "into": into, **_tail(entry)})
        cur = graph._get_profile(into)
        hops += 1
    return {
        "identifier": key,
        "generic": generic,
        "profile_id": live.id,
        "steps": steps,
        "refusals": refusals,
    }


def _tail(entry: dict[str, Any] | None) -> dict[str, Any]:
    if entry is None:
        return {}
    out = {k: v for k, v in entry.items() if k not in ("k", "t")}
    if "e" in out:
        out["event_id"] = out.pop("e")
    return out


def _explain_profile(graph: IdentityGraph, pid: str) -> dict[str, Any]:
    p = graph._get_profile(pid)
    if p is None:
        raise UnknownProfileOrIdentifier(f"unknown profile {pid}")
    resolved = graph.resolve(pid)
    out: dict[str, Any] = {"profile_id": pid, "status": p.status, "resolves_to": resolved}
    live = graph.profile(pid)
    if live is not None and live.status == ACTIVE:
        out["snapshot"] = live.snapshot()
        out["history"] = {q: graph.history(q) for q in [live.id, *live.merged_from]}
    else:
        out["history"] = {pid: graph.history(pid)}
    return out


def format_explanation(d: dict[str, Any]) -> str:
    """Readable text for the CLI."""
    lines: list[str] = []
    if "identifier" in d:
        lines.append(
            f"{d['identifier']} → profile {d['profile_id'] or '(none)'}"
            + ("  [GENERIC: no longer links]" if d["generic"] else "")
        )
        for s in d["steps"]:
            ev = s.get("event_id")
            if s["step"] == "created":
                with_ = ", ".join(s.get("identifiers", []))
                lines.append(f"  created profile {s['profile_id']} by event {ev} with {with_}")
            elif s["step"] == "attached":
                bridge = ", ".join(s.get("bridge", [])) or "?"
                lines.append(f"  attached to {s['profile_id']} by event {ev}, seen with {bridge}")
            elif s["step"] == "split":
                why = s.get("reason") or "operator"
                lines.append(f"  split off {s['from_profile_id']} into {s['profile_id']} ({why})")
            else:
                lines.append(
                    f"  {s['profile_id']} merged into {s['into']} by event {ev}: "
                    f"{', '.join(s.get('bridge', []))} seen with {', '.join(s.get('bridge_other', []))}"
                )
        for r in d["refusals"]:
            lines.append(f"  refused by {r['rule']} on {r['profile_id']} (event {r['e']}): {r['detail']}")
        return "\n".join(lines)
    lines.append(f"profile {d['profile_id']} [{d['status']}] resolves to {d['resolves_to']}")
    snap = d.get("snapshot")
    if snap:
        lines.append(f"  events {snap['events']}, orders {snap['orders']}, revenue {snap['revenue']}")
        for key, info in snap["identifiers"].items():
            lines.append(
                f"  {key}  first {info['first_seen_ms']} last {info['last_seen_ms']} via {info['source']}"
                + (" verified" if info["verified"] else "")
            )
    for pid, hist in d["history"].items():
        lines.append(f"  history of {pid}:")
        for e in hist:
            rest = {k: v for k, v in e.items() if k not in ("k", "e", "t")}
            lines.append(f"    {e['k']} event={e['e']} at={e['t']} {rest}")
    return "\n".join(lines)
