"""The `omnistitch` entry point itself: what a deployer sees for a wrong setting or a blank line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _omnistitch(*args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMNISTITCH_", "KAFKA_"))}
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        input=stdin,
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (
            ("topics", "create"),
            {"OMNISTITCH_PARTITIONS": "eight"},
            b"OMNISTITCH_PARTITIONS='eight' is not a whole",
        ),
        (("validate", "-"), {"OMNISTITCH_HMAC_KEY": "short"}, b"hmac key must be at least 16 bytes"),
    ],
)
def test_a_wrong_setting_is_one_line_and_exit_2(
    args: tuple[str, ...], env: dict[str, str], says: bytes
) -> None:
    run = _omnistitch(*args, **env)
    assert run.returncode == 2
    assert says in run.stderr and b"Traceback" not in run.stderr


def test_validate_skips_blank_lines_as_produce_and_replay_do() -> None:
    run = _omnistitch("validate", "-", stdin=b"\n  \r\n")
    assert (run.returncode, run.stdout) == (0, b"")
