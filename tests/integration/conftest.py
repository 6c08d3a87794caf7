"""Integration fixtures: one real Kafka broker per session, started by the project, never mocked."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from tests.integration.workers import ROOT, BrokerError, Worker, localkafka

TEST_BROKER_STATE = ROOT / ".run" / "test-kafka"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here needs the broker: marked, so `-m "not integration"` runs the unit tests only."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.integration)


def _broker(command: str) -> str:
    try:
        return localkafka(command, TEST_BROKER_STATE)
    except BrokerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real broker's address: `OMNISTITCH_TEST_BOOTSTRAP` if given, else one started for this session."""
    external = os.environ.get("OMNISTITCH_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    bootstrap = _broker("up")
    try:
        yield bootstrap
    finally:
        _broker("down")


@pytest.fixture
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def new_topic(kafka_admin: AdminClient) -> Callable[..., str]:
    """Factory: a uniquely named topic per call, so tests never see each other's messages."""

    def create(prefix: str, partitions: int = 3, config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
        )
        futures[name].result(timeout=30)
        return name

    return create


@pytest.fixture
def start_worker(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory: a ready worker (a new app id and data dir unless given); all are stopped at the end."""
    subprocess.run(
        [sys.executable, "-m", "streams.cli", "topics", "create"],
        env={"KAFKA_BOOTSTRAP": kafka_bootstrap, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    started: list[Worker] = []

    def start(app_id: str | None = None, data_dir: Path | None = None, **extra_env: str) -> Worker:
        running = Worker(
            kafka_bootstrap, tmp_path, app_id or f"it-{uuid.uuid4().hex[:8]}", extra_env, data_dir
        )
        started.append(running)
        running.wait_ready()
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


@pytest.fixture
def worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker()
