"""A real single-node Apache Kafka (KRaft) on loopback, from Maven Central jars: no Docker, no apache.org.

Used by `make kafka-up` / `make run` and by the integration tests' session fixture, so both run the same
broker the same way. Each instance lives in its own state directory (config, data, logs, pid, address).

    python deploy/kafka/localkafka.py up   --state-dir .run/kafka [--port 9092]
    python deploy/kafka/localkafka.py down --state-dir .run/kafka
    python deploy/kafka/localkafka.py status --state-dir .run/kafka
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
CLASSPATH_CACHE = HERE / ".classpath"

# What a single node needs for exactly-once: every internal topic with replication factor 1, and
# a transaction log that accepts one in-sync replica. Topics are never auto-created: the app declares its own
# partition counts. Small internal partition counts keep first group joins and transactions fast on 2 cores.
BROKER_SETTINGS = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "10",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "10",
    "group.initial.rebalance.delay.ms": "0",
    "min.insync.replicas": "1",
    "default.replication.factor": "1",
    "message.max.bytes": "2097152",
    "log.retention.hours": "168",
    "log.segment.bytes": "67108864",
    "log.cleaner.dedupe.buffer.size": "16777216",
}

LOG4J = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.request.logger=WARN
"""


def _classpath() -> str:
    """Resolve the broker jars once; later calls read the cached classpath (fast `make setup`)."""
    if not CLASSPATH_CACHE.exists() or CLASSPATH_CACHE.stat().st_mtime < POM.stat().st_mtime:
        if shutil.which("mvn") is None:
            sys.exit("localkafka: Maven (mvn) is needed to fetch the broker jars from Maven Central")
        tmp = CLASSPATH_CACHE.with_suffix(".tmp")
        # Maven's own output goes to stderr: stdout is the bootstrap address callers read.
        subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-Dstyle.color=never",
                "-f",
                str(POM),
                "dependency:build-classpath",
                f"-Dmdep.outputFile={tmp}",
            ],
            check=True,
            stdout=sys.stderr,
        )
        tmp.replace(CLASSPATH_CACHE)
    return CLASSPATH_CACHE.read_text().strip()


def _free_port(preferred: int | None = None) -> int:
    """The preferred port when it is free (stable address for `make run`), else any free loopback port."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


def _pid(state: Path) -> int | None:
    """The broker's pid when its pid file names a live process."""
    try:
        pid = int((state / "kafka.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def _metadata_ok(bootstrap: str, timeout: float) -> bool:
    """A metadata request answered by the broker: the one readiness test clients care about."""
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=timeout)
    except Exception:
        return False
    return True


def _cluster_id() -> str:
    """A random KRaft cluster id that does not start with '-'.

    The storage tool's argument parser takes such an id (1 in 64) for an option and fails; Kafka's own
    `Uuid.randomUuid` skips them likewise.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def up(state: Path, port: int | None, heap: str, timeout: float) -> str:
    """Start a broker in `state` (or report the running one) and return its bootstrap address."""
    state.mkdir(parents=True, exist_ok=True)
    if _pid(state) is not None:
        return (state / "bootstrap").read_text().strip()
    classpath = _classpath()
    broker_port, controller_port = _free_port(port), _free_port()
    while controller_port == broker_port:
        controller_port = _free_port()
    data = state / "data"
    shutil.rmtree(data, ignore_errors=True)
    settings = {
        **BROKER_SETTINGS,
        "listeners": f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker_port}",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "log.dirs": str(data),
    }
    config = state / "server.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    (state / "log4j.properties").write_text(LOG4J.format(log=state / "server.log"))
    java = ["java", f"-Dlog4j.configuration=file:{state / 'log4j.properties'}", "-cp", classpath]
    cluster_id = _cluster_id()
    subprocess.run(
        [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(state / "stdout.log", "ab") as out:
        proc = subprocess.Popen(
            [*java, f"-Xmx{heap}", "-Xms256m", "-XX:+UseG1GC", "kafka.Kafka", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (state / "kafka.pid").write_text(str(proc.pid))
    bootstrap = f"127.0.0.1:{broker_port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"localkafka: broker exited with {proc.returncode}; see {state / 'server.log'}")
        if _metadata_ok(bootstrap, timeout=2):
            (state / "bootstrap").write_text(bootstrap + "\n")
            return bootstrap
        time.sleep(0.3)
    down(state)
    sys.exit(f"localkafka: broker not ready after {timeout:.0f}s; see {state / 'server.log'}")


def down(state: Path, grace: float = 30.0) -> None:
    """Stop the broker: SIGTERM for a controlled shutdown, SIGKILL if it overstays `grace` seconds."""
    pid = _pid(state)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _pid(state) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    for name in ("kafka.pid", "bootstrap"):
        (state / name).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status", "classpath"])
    parser.add_argument("--state-dir", type=Path, default=Path(".run/kafka"))
    parser.add_argument("--port", type=int, default=None, help="preferred port (else any free one)")
    parser.add_argument("--heap", default="1g")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args()
    state = args.state_dir.resolve()
    if args.command == "up":
        print(up(state, args.port, args.heap, args.timeout))
    elif args.command == "down":
        down(state)
    elif args.command == "classpath":
        print(f"{len(_classpath().split(os.pathsep))} jars resolved")
    else:
        pid = _pid(state)
        bootstrap = (state / "bootstrap").read_text().strip() if pid else ""
        print(f"running pid={pid} bootstrap={bootstrap}" if pid else "stopped")
        sys.exit(0 if pid else 1)


if __name__ == "__main__":
    main()
