"""`tests/native_toolchain.py`: the one answer to "can this machine build the native engine?"."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.native_toolchain import can_build


def _fake_cargo(bin_dir: Path, version_line: str) -> None:
    cargo = bin_dir / "cargo"
    cargo.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    cargo.chmod(cargo.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize(
    ("version_line", "expected"),
    [
        ("cargo 1.95.0 (f2d3ce0bd 2026-03-21)", True),
        ("cargo 1.85.0 (d73d2caf9 2024-12-31)", True),
        ("cargo 1.75.0", False),  # Ubuntu 24.04's: too old for the locked crates
        ("cargo 1.63.0", False),  # Debian 12's
        ("not a version", False),
    ],
)
def test_cargo_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version_line: str, expected: bool
) -> None:
    _fake_cargo(tmp_path, version_line)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert can_build() is expected


def test_no_cargo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert can_build() is False
