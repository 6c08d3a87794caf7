"""faust's own table recovery loop, no broker: a revoked partition's late records stay unapplied."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from faust.types import TP
from faust.types.tuples import Message

from streams.app.worker import create_app
from streams.config import AppSettings


async def _recover(data_dir: Path) -> tuple[Any, TP, TP]:
    """Feed faust's `_slurp_changelogs` a record of a partition it restores, then one of a revoked one."""
    app = create_app(AppSettings(app_id="recovery-test", data_dir=data_dir, partitions=2))
    recovery: Any = app.tables.recovery
    profiles = app.tables["profiles"]
    topic = profiles.changelog_topic.get_topic_name()
    restoring, revoked = TP(topic, 1), TP(topic, 0)
    recovery.active_tps.add(restoring)
    recovery.tp_to_table[restoring] = profiles

    def record(tp: TP, offset: int, key: bytes) -> Any:
        message = Message(tp.topic, tp.partition, offset, 0.0, 0, None, key, b"row", None, None, None)
        return app.create_event(key, b"row", None, message)

    app.flow_control.resume()
    queue = app.tables.changelog_queue
    slurp = asyncio.ensure_future(type(recovery)._slurp_changelogs(recovery))
    try:
        await queue.put(record(restoring, 0, b"kept"))
        await queue.put(record(revoked, 1158, b"late"))  # fetched before the revocation, handled after it
        while queue.qsize():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        recovery.flush_buffers()  # as at the end of a recovery or at the next revocation
    finally:
        slurp.cancel()
    return profiles.data, restoring, revoked


def test_a_revoked_partitions_late_changelog_record_is_neither_applied_nor_marked_restored(
    tmp_path: Path,
) -> None:
    store, restoring, revoked = asyncio.run(_recover(tmp_path))
    assert store.persisted_offset(restoring) == 0
    assert store._db_for_partition(restoring.partition).get(b"kept") == b"row"
    # unguarded, faust 0.15.3 applied it and set the persisted offset to 1158: a later recovery of the
    # partition would start there, above rows it never restored
    assert store.persisted_offset(revoked) is None
    assert store._db_for_partition(revoked.partition).get(b"late") is None
