"""Stream workers as real processes for integration tests: start, wait until ready, read what they publish."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from streams.topic_reader import read_to_end as read_topic

ROOT = Path(__file__).resolve().parents[2]
LOCALKAFKA = ROOT / "deploy" / "kafka" / "localkafka.py"


class BrokerError(RuntimeError):
    """`localkafka.py` failed; its output says why."""


def localkafka(command: str, state_dir: Path) -> str:
    """Run `localkafka.py COMMAND --state-dir DIR`, the project's own broker; returns its last output line."""
    result = subprocess.run(
        [sys.executable, str(LOCALKAFKA), command, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BrokerError(f"local Kafka broker '{command}' failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    """One `omnistitch worker` process with its own app id, data dir and web port."""

    def __init__(
        self,
        bootstrap: str,
        tmp: Path,
        app_id: str,
        extra_env: dict[str, str] | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.port = _free_port()
        self.log = tmp / f"worker-{self.port}.log"
        self.data_dir = data_dir or tmp / f"data-{self.port}"
        self.app_id = app_id
        env = {
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
            "KAFKA_BOOTSTRAP": bootstrap,
            "OMNISTITCH_APP_ID": app_id,
            "OMNISTITCH_DATA_DIR": str(self.data_dir),
            "OMNISTITCH_WEB_PORT": str(self.port),
            **(extra_env or {}),
        }
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker", "-l", "info"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            if "Worker ready" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        """kill -9: no shutdown, no commit, no flush."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def topic_values(bootstrap: str, topic: str) -> list[tuple[bytes | None, dict[str, Any] | None]]:
    return [
        (m.key(), None if m.value() is None else orjson.loads(m.value()))
        for m in read_topic(bootstrap, topic)
    ]
