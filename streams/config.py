"""Worker settings from the environment: one place that names every knob a deployer can turn."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from streams.exceptions import ConfigError

__all__ = ["DEFAULT_SOURCES", "AppSettings"]

DEFAULT_SOURCES = ("web", "app", "pos", "call_center", "esp", "sms", "push", "messenger", "crm")


def _whole(env: dict[str, str], name: str, default: int) -> int:
    """A whole-number setting; a typo is a ConfigError naming the variable, not a traceback from int()."""
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None


def _at_least(env: dict[str, str], name: str, default: int, low: int) -> int:
    """A whole-number size that must be at least `low` (zero would not mean "unlimited")."""
    value = _whole(env, name, default)
    if value < low:
        raise ConfigError(f"{name}={value} must be at least {low}")
    return value


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class AppSettings:
    """Stream-app settings; `from_env` is the only constructor deployments use (see README's table)."""

    bootstrap: str = "127.0.0.1:9092"
    app_id: str = "omnistitch"
    partitions: int = 8
    sources: tuple[str, ...] = DEFAULT_SOURCES
    data_dir: Path = Path(".state/worker")
    web_port: int = 6066
    # loopback by default (nothing exposed by accident); 0.0.0.0 or the host's address for a remote Prometheus
    web_bind: str = "127.0.0.1"
    standby_replicas: int = 0
    replication_factor: int = 1
    rules_file: Path | None = None
    batch_linger_ms: int = 20
    batch_max_records: int = 1000
    # RocksDB memory of all the worker's table databases together, MiB (`streams/app/tabledb.py`); at least
    # 16: below that the memtables (1 MiB at least, one per database) alone would pass it
    table_memory_mb: int = 256
    # decoded rows kept per partition, most events touching profiles seen moments ago: two generations, each
    # of this many profiles (about 3.6 KB each in memory) and four times as many identifier rows (about 0.3 KB
    # each), plus the rows of the batch that fills one (`PartitionState.flush`)
    cache_rows: int = 20_000

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AppSettings:
        """Read `KAFKA_BOOTSTRAP` and `OMNISTITCH_*` variables, falling back to the defaults above."""
        env = dict(os.environ if environ is None else environ)
        defaults = cls()
        rules = env.get("OMNISTITCH_RULES_FILE")
        return cls(
            bootstrap=env.get("KAFKA_BOOTSTRAP", defaults.bootstrap),
            app_id=env.get("OMNISTITCH_APP_ID", defaults.app_id),
            partitions=_whole(env, "OMNISTITCH_PARTITIONS", defaults.partitions),
            sources=_csv(env["OMNISTITCH_SOURCES"]) if env.get("OMNISTITCH_SOURCES") else DEFAULT_SOURCES,
            data_dir=Path(env.get("OMNISTITCH_DATA_DIR", str(defaults.data_dir))),
            web_port=_whole(env, "OMNISTITCH_WEB_PORT", defaults.web_port),
            web_bind=env.get("OMNISTITCH_WEB_BIND", defaults.web_bind),
            standby_replicas=_whole(env, "OMNISTITCH_STANDBY_REPLICAS", defaults.standby_replicas),
            replication_factor=_whole(env, "OMNISTITCH_REPLICATION_FACTOR", defaults.replication_factor),
            rules_file=Path(rules) if rules else None,
            batch_linger_ms=_whole(env, "OMNISTITCH_BATCH_LINGER_MS", defaults.batch_linger_ms),
            batch_max_records=_whole(env, "OMNISTITCH_BATCH_MAX_RECORDS", defaults.batch_max_records),
            table_memory_mb=_at_least(env, "OMNISTITCH_TABLE_MEMORY_MB", defaults.table_memory_mb, 16),
            cache_rows=_at_least(env, "OMNISTITCH_CACHE_ROWS", defaults.cache_rows, 1),
        )
