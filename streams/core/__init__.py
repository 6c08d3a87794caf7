"""The stitching core: identifiers in, profiles and identity changes out; no Kafka, no Faust."""

from __future__ import annotations

from streams.core.explain import explain, format_explanation
from streams.core.graph import ChangeKind, IdentityChange, IdentityGraph, LinkResult
from streams.core.ids import derive_profile_id, derive_split_id
from streams.core.rules import Refusal, Rules, TypeLimit, check_attach, check_merge, load_rules
from streams.core.state import ProfileState
from streams.core.store import MemoryStore, RocksStore, Store, open_store

__all__ = [
    "ChangeKind",
    "IdentityChange",
    "IdentityGraph",
    "LinkResult",
    "MemoryStore",
    "ProfileState",
    "Refusal",
    "RocksStore",
    "Rules",
    "Store",
    "TypeLimit",
    "check_attach",
    "check_merge",
    "derive_profile_id",
    "derive_split_id",
    "explain",
    "format_explanation",
    "load_rules",
    "open_store",
]
