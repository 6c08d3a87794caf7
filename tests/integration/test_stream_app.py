"""The stream app against the real broker: Kolya becomes one profile; bad input lands in the DLQ, named."""

from __future__ import annotations

import base64
import random
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import Producer
from rocksdict import AccessType, Options, Rdict

from streams.app.protocol import (
    INDEX_PROGRESS_KEY,
    MergeAsk,
    MergeNo,
    deferred_key,
    encode_envelopes,
    home,
    part,
)
from streams.app.restore import RESTORED_OFFSET_KEY
from streams.app.topics import create_topics
from streams.config import AppSettings
from streams.core.state import neighbour_code
from streams.evaluate import assignments_from_resolved, read_topic_to_end
from streams.events import Identifier
from streams.topic_reader import read_to_end as read_topic
from tests.integration.workers import ROOT, Worker, topic_values, wait_for


def _send(
    bootstrap: str, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "message.max.bytes": 4_000_000}
    )
    if partition is None:
        producer.produce(topic, key=key, value=value)
    else:
        producer.produce(topic, key=key, value=value, partition=partition)
    assert producer.flush(30) == 0


def _kolya(run: str) -> list[dict[str, Any]]:
    """Pizzeria purchase, then web cart, then the app login that proves they are one person."""
    phone = f"8 916 {random.randint(100, 999)}-{random.randint(10, 99)}-{random.randint(10, 99)}"
    email = f"kolya.{run}@mail.ru"
    base = {"schema_version": 1, "attributes": {}}
    return [
        {
            **base,
            "event_id": f"{run}-pos",
            "source": "pos",
            "channel": "store",
            "type": "store_purchase",
            "occurred_at": "2026-11-23T19:30:00+03:00",
            "identifiers": [
                {
                    "type": "loyalty_card",
                    "value": f"2000{random.randint(10**7, 10**8 - 1)}",
                    "verified": True,
                },
                {"type": "phone", "value": phone},
            ],
            "attributes": {
                "store_id": "msk-17",
                "order_id": f"R-{run}",
                "total": "1290.00",
                "currency": "RUB",
                "items": [{"product_id": "pepperoni-30", "qty": 1, "price": "1290.00"}],
            },
        },
        {
            **base,
            "event_id": f"{run}-web",
            "source": "web",
            "channel": "site",
            "type": "cart_updated",
            "occurred_at": "2026-11-24T09:12:00+03:00",
            "identifiers": [
                {"type": "cookie_id", "value": f"ck-{run}"},
                {"type": "email", "value": email.upper()},
            ],
            "attributes": {"items": [{"product_id": "pepperoni-30", "qty": 1, "price": "1290.00"}]},
        },
        {
            **base,
            "event_id": f"{run}-app",
            "source": "app",
            "channel": "mobile_app",
            "type": "login",
            "occurred_at": "2026-11-24T09:40:00+03:00",
            "identifiers": [
                {"type": "device_id", "value": f"dev-{run}"},
                {"type": "phone", "value": phone},
                {"type": "email", "value": email, "verified": True},
            ],
        },
    ]


def _resolve_all(bootstrap: str, events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Send events one at a time, each after the previous one is resolved, so their order is the story's."""
    resolved: dict[str, dict[str, Any]] = {}
    for event in events:
        _send(bootstrap, f"raw.{event['source']}", orjson.dumps(event))

        def seen(event_id: str = event["event_id"]) -> dict[str, Any] | None:
            for _, value in topic_values(bootstrap, "events.resolved"):
                if value and value["event_id"] == event_id:
                    return value
            return None

        resolved[event["event_id"]] = wait_for(f"resolved {event['event_id']}", seen)
    return resolved


def test_kolya_becomes_one_profile(worker: Worker, kafka_bootstrap: str) -> None:
    _kolya_becomes_one_profile(kafka_bootstrap)


def test_kolya_becomes_one_profile_through_the_smallest_caches(
    start_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    """The smallest row cache (it keeps the rows of the current and the previous batch only) and the smallest
    RocksDB budget: the rows of older batches are read back from the table databases."""
    worker = start_worker(OMNISTITCH_CACHE_ROWS="1", OMNISTITCH_TABLE_MEMORY_MB="16")
    _kolya_becomes_one_profile(kafka_bootstrap)
    assert "omnistitch_table_memory_limit_bytes 1.6777216e+07" in worker.metrics()


def _kolya_becomes_one_profile(kafka_bootstrap: str) -> None:
    run = uuid.uuid4().hex[:10]
    resolved = _resolve_all(kafka_bootstrap, _kolya(run))
    pos, web, app = (resolved[f"{run}-{name}"] for name in ("pos", "web", "app"))
    assert pos["profile_id"] != web["profile_id"]  # two people as far as anyone knew then
    survivor = pos["profile_id"]  # the oldest profile survives
    assert app["profile_id"] == survivor
    assert f"email:kolya.{run}@mail.ru" in web["identifier_keys"]  # normalised before stitching

    def survivor_changes() -> list[dict[str, Any]]:
        changes = topic_values(kafka_bootstrap, "identity.changes")
        return [v for _, v in changes if v and v["profile_id"] == survivor]

    # the merge completes a few partition hops after the event that caused it was resolved
    wait_for("the merge", lambda: any(c["kind"] == "profiles_merged" for c in survivor_changes()))
    changes = survivor_changes()
    merged = [c for c in changes if c["kind"] == "profiles_merged"]
    assert merged[0]["merged"] == [web["profile_id"]]
    assert [c["seq"] for c in changes] == sorted({c["seq"] for c in changes})

    snapshots = topic_values(kafka_bootstrap, "profiles")
    latest = {key: value for key, value in snapshots}
    assert latest[web["profile_id"].encode()] is None  # merged away: tombstoned on the compacted topic
    profile = latest[survivor.encode()]
    assert profile is not None
    assert set(profile["identifiers"]) == {"loyalty_card", "phone", "email", "cookie_id", "device_id"}
    assert profile["orders"] == {"count": 1, "revenue": {"RUB": "1290.00"}}
    assert set(profile["channels"]) == {"store", "site", "mobile_app"}
    assert web["profile_id"] in profile["merged_from"]
    # what `omnistitch assignments` computes from the topics: every event ends in the survivor
    final = assignments_from_resolved(
        read_topic_to_end(kafka_bootstrap, "events.resolved"),
        read_topic_to_end(kafka_bootstrap, "identity.changes"),
    )
    assert {final[f"{run}-{name}"] for name in ("pos", "web", "app")} == {survivor}


def test_bad_input_goes_to_dlq_with_original_bytes(worker: Worker, kafka_bootstrap: str) -> None:
    run = uuid.uuid4().hex[:10]
    bad = {
        "not_json": f"{{not json {run}".encode(),
        "not_utf8": b"\xff\xfe" + run.encode(),
        "unknown_type": orjson.dumps(
            {
                "schema_version": 1,
                "event_id": run,
                "source": "web",
                "channel": "site",
                "type": "teleport",
                "occurred_at": "2026-11-24T09:12:00+03:00",
                "identifiers": [{"type": "cookie_id", "value": run}],
            }
        ),
        "too_large": b'{"pad": "' + run.encode() + b"x" * 1_600_000 + b'"}',
    }
    for code, value in bad.items():
        _send(kafka_bootstrap, "raw.web", value, key=f"{run}-{code}".encode())

    def ours() -> dict[str, dict[str, Any]] | None:
        found = {
            key.decode().split("-", 1)[1]: value
            for key, value in topic_values(kafka_bootstrap, "dlq")
            if key and key.decode().startswith(run) and value
        }
        return found if len(found) == len(bad) else None

    records = wait_for("dlq records", ours)
    for code, value in bad.items():
        assert records[code]["error_code"] == code
        assert base64.b64decode(records[code]["original_value_b64"]) == value
        assert records[code]["source_topic"] == "raw.web" and records[code]["stage"] == "validate"
    assert worker.proc.poll() is None  # bad input never stops the worker
    metrics = worker.metrics()
    for code in bad:
        assert f'omnistitch_dlq_total{{code="{code}",stage="validate"}}' in metrics


def test_hashing_keeps_raw_phones_and_emails_out_of_tables_and_topics(
    start_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    worker = start_worker(OMNISTITCH_HMAC_KEY="k" * 32)
    run = uuid.uuid4().hex[:10]
    events = _kolya(run)
    resolved = _resolve_all(kafka_bootstrap, events)
    assert all(r["profile_id"] for r in resolved.values())
    worker.stop()  # RocksDB flushes its memtables to files on close

    phone = events[0]["identifiers"][1]["value"]
    e164 = "+7" + "".join(ch for ch in phone if ch.isdigit())[1:]
    secrets = {e164.encode(), e164[1:].encode(), f"kolya.{run}@mail.ru".encode(), f"kolya.{run}".encode()}
    files = [path for path in worker.data_dir.rglob("*") if path.is_file()]
    assert files, "the worker wrote no table files"
    for path in files:
        content = path.read_bytes()
        assert not [s for s in secrets if s in content], path
    app_id = worker.app_id
    topics = [
        "events.resolved",
        "identity.changes",
        "profiles",
        f"{app_id}-internal",
        f"{app_id}-ids-changelog",
        f"{app_id}-profiles-changelog",
    ]
    for topic in topics:
        for message in read_topic(kafka_bootstrap, topic):
            blob = (message.key() or b"") + (message.value() or b"")
            assert not [s for s in secrets if s in blob], topic


def test_tables_record_how_far_they_hold_their_changelogs_so_a_restart_reads_nothing_again(
    start_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    worker = start_worker()
    run = uuid.uuid4().hex[:10]
    _resolve_all(kafka_bootstrap, _kolya(run))
    worker.stop()

    last_row: dict[tuple[str, int], int] = {}
    for table in ("ids", "profiles"):
        for message in read_topic(kafka_bootstrap, f"{worker.app_id}-{table}-changelog"):
            last_row[(table, message.partition())] = max(
                message.offset(), last_row.get((table, message.partition()), -1)
            )
    assert last_row, "the worker wrote no table rows"
    for (table, partition), offset in last_row.items():
        db = Rdict(
            str(worker.data_dir / "v1" / "tables" / f"{table}-{partition}.db"),
            options=Options(raw_mode=True),
            access_type=AccessType.read_only(),
        )
        try:
            assert db.get(RESTORED_OFFSET_KEY) == str(offset).encode(), (table, partition)
        finally:
            db.close()

    again = start_worker(app_id=worker.app_id, data_dir=worker.data_dir)
    _resolve_all(kafka_bootstrap, _kolya(uuid.uuid4().hex[:10]))  # a batch, so the restore has run
    assert "restored 0 changelog records" in again.log.read_text()


def test_large_events_and_a_foreign_internal_record_never_stop_the_worker(
    start_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    """Waiting before the worker starts, so one batch takes them all: 300 valid events of 30 KB for one
    cookie on another partition than the cookie's, and a record on the internal topic no worker wrote.
    0.3.3 sent the 300 as one 9 MB record past the internal topic's limit, and crashed on every restart;
    the foreign record failed its batch the same way."""
    run = uuid.uuid4().hex[:10]
    app_id = f"it-{run}"
    create_topics(AppSettings(bootstrap=kafka_bootstrap, app_id=app_id))
    cookie = f"ck-{run}"
    away = (part(f"cookie_id:{cookie}", 8) + 1) % 8
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50})
    producer.produce(f"{app_id}-internal", value=b"not an envelope " + run.encode(), partition=away)
    for n in range(300):
        event = _page_view(f"{run}-{n}", cookie, "x" * 30_000)
        producer.produce("raw.web", value=orjson.dumps(event), partition=away)
    assert producer.flush(30) == 0
    worker = start_worker(app_id)

    def resolved() -> set[str] | None:
        ours = {
            v["event_id"]
            for _, v in topic_values(kafka_bootstrap, "events.resolved")
            if v and run in v["event_id"]
        }
        return ours if len(ours) == 300 else None

    wait_for("300 large events resolved", resolved, timeout=120)
    (dead,) = [
        v
        for _, v in topic_values(kafka_bootstrap, "dlq")
        if v
        and v["source_topic"] == f"{app_id}-internal"
        and run.encode() in base64.b64decode(v["original_value_b64"])
    ]
    assert (dead["error_code"], dead["stage"], dead["partition"]) == ("bad_envelope", "internal", away)
    assert worker.proc.poll() is None
    # every record was timed from its Kafka timestamp: the 300 raw events (and what other tests left on the
    # raw topics, which a new app id reads from the start), and the envelopes carrying them
    counts = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in worker.metrics().splitlines()
        if line.startswith("omnistitch_record_wait_seconds_count")
    }
    assert counts['input="raw"'] >= 300 and counts['input="internal"'] >= 2
    # the table databases' RocksDB memory is reported against its budget (`OMNISTITCH_TABLE_MEMORY_MB`)
    table_memory = {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in worker.metrics().splitlines()
        if line.startswith("omnistitch_table_memory")
    }
    assert table_memory["omnistitch_table_memory_limit_bytes"] == 256 << 20
    assert table_memory["omnistitch_table_memory_bytes"] > 0  # this test's rows: memtables, cached blocks


def test_events_deferred_while_their_profile_is_locked_wait_in_rows_that_survive_a_restart(
    start_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    """Eight events of 600 KB for a profile locked for a merge. 0.4.1 kept deferred events in the profile's
    row: past the changelog's 8 MiB, so the batch's commit failed on every restart. The lock is made by hand,
    a `MergeAsk` towards a profile id nobody has, so the merge never ends until the test sends the refusal,
    to a second worker that restored everything from the changelogs into an empty data dir."""
    run = uuid.uuid4().hex[:10]
    worker = start_worker()
    cookie = f"ck-{run}"
    internal, changelog = f"{worker.app_id}-internal", f"{worker.app_id}-profiles-changelog"
    pid = _resolve_all(kafka_bootstrap, [_page_view(f"{run}-0", cookie)])[f"{run}-0"]["profile_id"]
    nobody = "0" * 26
    ask = MergeAsk(pid, nobody, (Identifier("cookie_id", cookie, False),), (), f"{run}-ask", 1, False)
    (envelope,) = encode_envelopes([ask])
    _send(kafka_bootstrap, internal, envelope, partition=home(pid, 8))

    def profile_rows() -> dict[bytes, bytes | None]:
        return {m.key() or b"": m.value() for m in read_topic(kafka_bootstrap, changelog)}

    wait_for("the lock", lambda: b'"lk":"%s"' % nobody.encode() in (profile_rows().get(pid.encode()) or b""))
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 4_000_000})
    for n in range(1, 9):
        producer.produce("raw.web", value=orjson.dumps(_page_view(f"{run}-{n}", cookie, "x" * 600_000)))
    assert producer.flush(30) == 0
    waiting = [deferred_key(pid, n) for n in range(8)]
    wait_for("eight deferred rows", lambda: all(profile_rows().get(key) for key in waiting), timeout=120)
    assert max(len(value or b"") for value in profile_rows().values()) < 2 * 1024 * 1024
    assert worker.proc.poll() is None
    worker.stop()

    again = start_worker(app_id=worker.app_id)
    _send(kafka_bootstrap, internal, encode_envelopes([MergeNo(pid, nobody)])[0], partition=home(pid, 8))

    def resolved() -> list[tuple[str, str]] | None:
        ours = [
            (v["event_id"], v["profile_id"])
            for _, v in topic_values(kafka_bootstrap, "events.resolved")
            if v and v["event_id"].startswith(run)
        ]
        return ours if len(ours) >= 9 else None

    got = wait_for("the deferred events resolved", resolved, timeout=120)
    assert sorted(got) == sorted((f"{run}-{n}", pid) for n in range(9))  # each once, in the profile
    wait_for("their rows deleted", lambda: all(profile_rows().get(key, b"") is None for key in waiting))
    assert again.proc.poll() is None


def _bob_and_a_phone(run: str, phone: str) -> list[dict[str, Any]]:
    """Bob's e-mail and a phone, first seen apart, then together in a bridge the rules refuse (a first
    unverified sighting), and last the phone's erase."""
    base = {"schema_version": 1, "source": "web", "channel": "site", "type": "page_view", "attributes": {}}
    email, number = {"type": "email", "value": f"bob.{run}@mail.ru"}, {"type": "phone", "value": phone}
    return [
        {
            **base,
            "event_id": f"{run}-bob",
            "occurred_at": "2026-11-24T09:00:00+03:00",
            "identifiers": [email],
        },
        {
            **base,
            "event_id": f"{run}-phone",
            "occurred_at": "2026-11-24T09:01:00+03:00",
            "identifiers": [number],
        },
        {
            **base,
            "event_id": f"{run}-both",
            "occurred_at": "2026-11-24T09:02:00+03:00",
            "identifiers": [email, number],
        },
        {
            **base,
            "type": "erase",
            "event_id": f"{run}-erase",
            "occurred_at": "2026-11-24T09:03:00+03:00",
            "identifiers": [number],
        },
    ]


def _latest_rows(bootstrap: str, topic: str, key: bytes) -> dict[int, bytes | None]:
    """The last value of `key` in each partition of a changelog that has it (None: a tombstone)."""
    found: dict[int, bytes | None] = {}
    for message in read_topic(bootstrap, topic):
        if message.key() == key:
            found[message.partition() or 0] = message.value()
    return found


def _bridge_refused(bootstrap: str, run: str) -> bool:
    return any(
        v and v["kind"] == "merge_refused" and v["cause_event_id"] == f"{run}-both"
        for _, v in topic_values(bootstrap, "identity.changes")
    )


def test_an_erase_in_the_stream_forgets_the_value_where_others_noted_it(
    worker: Worker, kafka_bootstrap: str
) -> None:
    """Bob's e-mail and a phone, seen together in a refused bridge: each register notes the other's code, and
    the e-mail's partition indexes its note. Erasing the phone's profile wipes it, and a `Forget` reaches
    every partition: the e-mail's register drops the phone's code and the index row is deleted (the worker
    finds it by a prefix scan of its RocksDB table)."""
    run = uuid.uuid4().hex[:10]
    phone = f"8 916 {random.randint(100, 999)}-{random.randint(10, 99)}-{random.randint(10, 99)}"
    *seen, erase = _bob_and_a_phone(run, phone)
    resolved = _resolve_all(kafka_bootstrap, seen)
    (email_key,) = resolved[f"{run}-bob"]["identifier_keys"]  # as stored (hashed when hashing is on)
    (phone_key,) = resolved[f"{run}-phone"]["identifier_keys"]
    erased = resolved[f"{run}-phone"]["profile_id"]
    wait_for("the bridge refused: two people still", lambda: _bridge_refused(kafka_bootstrap, run))
    ids_changelog = f"{worker.app_id}-ids-changelog"
    pair = b"/nb/%d/%s" % (neighbour_code(phone_key), email_key.encode())
    email_partition = part(email_key, 8)

    def latest(key: bytes) -> tuple[bool, bytes | None]:
        rows = _latest_rows(kafka_bootstrap, ids_changelog, key)
        return (email_partition in rows, rows.get(email_partition))

    wait_for("the e-mail's note of the phone, indexed", lambda: latest(pair) == (True, b""))
    _resolve_all(kafka_bootstrap, [erase])
    wait_for("the index row deleted", lambda: latest(pair) == (True, None))
    _, register = latest(email_key.encode())
    assert register is not None and neighbour_code(phone_key) not in orjson.loads(register)["nb"]
    assert any(
        v and v["kind"] == "profile_erased" and v["profile_id"] == erased
        for _, v in topic_values(kafka_bootstrap, "identity.changes")
    )
    assert latest(INDEX_PROGRESS_KEY) == (True, b"")  # a new partition's index is complete from the start


def test_registers_written_before_the_holders_index_still_forget_an_erased_value(
    start_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    """A 0.4.1 state has registers with neighbour codes and no holders index. One is made here from a new
    state: its index rows and `/nb-indexed` rows are tombstoned on the changelog, and a second worker restores
    the rest into an empty data dir. The e-mail's register forgets the phone only because the partition
    indexes its old registers at its flushes (0.4.3 found none, and the code stayed)."""
    run = uuid.uuid4().hex[:10]
    phone = f"8 916 {random.randint(100, 999)}-{random.randint(10, 99)}-{random.randint(10, 99)}"
    *seen, erase = _bob_and_a_phone(run, phone)
    worker = start_worker()
    resolved = _resolve_all(kafka_bootstrap, seen)
    (email_key,) = resolved[f"{run}-bob"]["identifier_keys"]
    (phone_key,) = resolved[f"{run}-phone"]["identifier_keys"]
    code = neighbour_code(phone_key)
    wait_for("the bridge refused: two people still", lambda: _bridge_refused(kafka_bootstrap, run))
    ids_changelog = f"{worker.app_id}-ids-changelog"
    pair = b"/nb/%d/%s" % (code, email_key.encode())
    wait_for("the pair indexed", lambda: b"" in _latest_rows(kafka_bootstrap, ids_changelog, pair).values())
    worker.stop()
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    index_rows = {
        (m.key(), m.partition())
        for m in read_topic(kafka_bootstrap, ids_changelog)
        if (m.key() or b"").startswith(b"/nb") and m.value() is not None
    }
    assert (INDEX_PROGRESS_KEY, part(email_key, 8)) in index_rows
    for key, partition in index_rows:
        producer.produce(ids_changelog, key=key, value=None, partition=partition)
    assert producer.flush(30) == 0

    def email_register() -> list[int]:
        rows = _latest_rows(kafka_bootstrap, ids_changelog, email_key.encode())
        return list(orjson.loads(rows[part(email_key, 8)] or b"{}").get("nb", ()))

    assert code in email_register()
    again = start_worker(app_id=worker.app_id)
    _resolve_all(kafka_bootstrap, [erase])
    wait_for("the e-mail's register forgot the phone", lambda: code not in email_register())
    assert _latest_rows(kafka_bootstrap, ids_changelog, INDEX_PROGRESS_KEY).get(part(email_key, 8)) == b""
    gauge = f'omnistitch_holders_index_complete{{partition="{part(email_key, 8)}"}} 1.0'
    assert gauge in again.metrics()
    assert again.proc.poll() is None


def _page_view(event_id: str, cookie: str, note: str = "") -> dict[str, Any]:
    """A page view of one cookie; `note` makes it as large as a test needs."""
    return {
        "schema_version": 1,
        "event_id": event_id,
        "source": "web",
        "channel": "site",
        "type": "page_view",
        "occurred_at": "2026-11-24T09:12:00+03:00",
        "identifiers": [{"type": "cookie_id", "value": cookie}],
        "attributes": {"url": "https://shop.ru/menu", "note": note},
    }


def test_an_operator_splits_kolyas_profile_in_the_running_stream(
    worker: Worker, kafka_bootstrap: str
) -> None:
    """`omnistitch split` without --state: the worker moves the web identifiers to a new profile, publishes
    `profile_split` and `profile_created`, and the cookie's next event resolves to the new profile."""
    run = uuid.uuid4().hex[:10]
    resolved = _resolve_all(kafka_bootstrap, _kolya(run))
    kolya = resolved[f"{run}-pos"]["profile_id"]
    web = f"cookie_id:ck-{run}", f"email:kolya.{run}@mail.ru"
    wait_for(
        "the merge",
        lambda: any(
            v and v["kind"] == "profiles_merged" and v["profile_id"] == kolya
            for _, v in topic_values(kafka_bootstrap, "identity.changes")
        ),
    )
    split = subprocess.run(
        [sys.executable, "-m", "streams.cli", "split", kolya, *web, "--reason", "his wife's laptop"],
        env={"KAFKA_BOOTSTRAP": kafka_bootstrap, "OMNISTITCH_APP_ID": worker.app_id, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert split.returncode == 0, split.stderr
    new_id, *lines = split.stdout.splitlines()
    changes = [orjson.loads(line) for line in lines]
    assert [(c["kind"], c["profile_id"]) for c in changes] == [
        ("profile_split", kolya),
        ("profile_created", new_id),
    ]
    assert changes[0]["new_profiles"] == [new_id] and changes[0]["reason"] == "his wife's laptop"
    assert sorted(changes[1]["identifiers"]) == sorted(web)

    later = {**_kolya(run)[1], "event_id": f"{run}-web-2", "occurred_at": "2026-11-25T10:00:00+03:00"}
    later["identifiers"] = [{"type": "cookie_id", "value": f"ck-{run}"}]
    assert _resolve_all(kafka_bootstrap, [later])[f"{run}-web-2"]["profile_id"] == new_id
    latest = dict(topic_values(kafka_bootstrap, "profiles"))
    assert set(latest[new_id.encode()]["identifiers"]) == {"cookie_id", "email"}  # type: ignore[index]
    # `omnistitch assignments`: the web cart (anchored by the e-mail) follows it, as the replay's would
    final = assignments_from_resolved(
        read_topic_to_end(kafka_bootstrap, "events.resolved"),
        read_topic_to_end(kafka_bootstrap, "identity.changes"),
    )
    assert (final[f"{run}-web"], final[f"{run}-pos"], final[f"{run}-web-2"]) == (new_id, kolya, new_id)
    assert set(latest[kolya.encode()]["identifiers"]) == {"loyalty_card", "phone", "device_id"}  # type: ignore[index]
