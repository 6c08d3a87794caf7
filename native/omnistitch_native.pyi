"""Type stubs for the compiled module (maturin ships them with a py.typed marker)."""

from collections.abc import Callable
from typing import Any

class Engine:
    """The native link engine; `streams.core.native.NativeGraph` is its only user."""

    def __init__(
        self,
        store: Any,
        rules: Any,
        link_result: type,
        change: type,
        kinds: tuple[Any, Any, Any, Any],
        delegate: Callable[[Any], Any],
        cache_profiles: int,
        cold_profiles: int,
        cache_identifiers: int,
        flush_every: int,
        history: bool,
    ) -> None: ...
    def link(self, ev: Any) -> Any: ...
    def flush(self) -> None: ...
    def lend(self, factory: Callable[[], Any]) -> Any: ...
    def stats(self) -> dict[str, Any]: ...
    def cache_sizes(self) -> dict[str, int]: ...

def profile_row(profile: Any) -> bytes:
    """A `ProfileState` as its stored packed row."""

def profile_json(row: bytes) -> bytes:
    """A stored profile row (packed or JSON) as the positional JSON `ProfileState.decode` reads."""
