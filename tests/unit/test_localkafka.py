"""The local broker script's pure parts (starting a broker is covered by the integration tests)."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "localkafka.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("localkafka", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """An id like '-JCFZ…' made `kafka-storage format -t` fail, so a whole test session lost its broker."""
    localkafka = _load()
    dashed = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64url starts with '-'
    plain = uuid.UUID(bytes=b"\x04" + bytes(15))
    draws = iter([dashed, plain])
    monkeypatch.setattr(localkafka.uuid, "uuid4", lambda: next(draws))
    assert localkafka._cluster_id() == "BAAAAAAAAAAAAAAAAAAAAA"
