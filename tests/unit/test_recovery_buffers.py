"""faust's own table recovery loop, no broker: it writes standby partitions' rows only."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from faust.types import TP
from faust.types.tuples import Message

from streams.app.worker import create_app
from streams.config import AppSettings


async def _recover(data_dir: Path) -> tuple[Any, TP, TP, TP]:
    """Feed faust's `_slurp_changelogs` a record of a standby partition, an active one and a revoked one."""
    app = create_app(AppSettings(app_id="recovery-test", data_dir=data_dir, partitions=3))
    recovery: Any = app.tables.recovery
    profiles = app.tables["profiles"]
    topic = profiles.changelog_topic.get_topic_name()
    standby, active, revoked = TP(topic, 2), TP(topic, 1), TP(topic, 0)
    recovery.standby_tps.add(standby)
    recovery.active_tps.add(active)
    recovery.tp_to_table.update({standby: profiles, active: profiles})

    def record(tp: TP, offset: int, key: bytes) -> Any:
        message = Message(tp.topic, tp.partition, offset, 0.0, 0, None, key, b"row", None, None, None)
        return app.create_event(key, b"row", None, message)

    app.flow_control.resume()
    queue = app.tables.changelog_queue
    slurp = asyncio.ensure_future(type(recovery)._slurp_changelogs(recovery))
    try:
        await queue.put(record(standby, 0, b"standby"))
        await queue.put(record(active, 7, b"active"))  # the worker restores active partitions itself
        await queue.put(record(revoked, 1158, b"late"))  # fetched before the revocation, handled after it
        while queue.qsize():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        recovery.flush_buffers()  # as at the end of a recovery or at the next revocation
    finally:
        slurp.cancel()
    return profiles.data, standby, active, revoked


def test_faust_recovery_writes_standby_rows_only(tmp_path: Path) -> None:
    store, standby, active, revoked = asyncio.run(_recover(tmp_path))
    assert store.persisted_offset(standby) == 0
    assert store._db_for_partition(standby.partition).get(b"standby") == b"row"
    assert store.persisted_offset(active) is None
    assert store._db_for_partition(active.partition).get(b"active") is None
    # unconfined, faust 0.15.3 applied the revoked partition's record too and set its persisted offset to 1158
    assert store.persisted_offset(revoked) is None
    assert store._db_for_partition(revoked.partition).get(b"late") is None
