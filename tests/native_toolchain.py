"""Exit 0 when this machine can build the native engine (cargo >= 1.85 on PATH), 1 otherwise.

One answer for the Makefile (build it or not) and tests/unit/test_native.py (require the module or skip):
an old distribution cargo must neither break `make setup` nor let a missing module pass unnoticed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

MIN_CARGO = (1, 85)


def can_build() -> bool:
    """Whether cargo is on PATH and at least `MIN_CARGO` (the crate's rust-version)."""
    cargo = shutil.which("cargo")
    if cargo is None:
        return False
    try:
        out = subprocess.run(
            [cargo, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    found = re.search(r"(\d+)\.(\d+)", out)
    return found is not None and (int(found[1]), int(found[2])) >= MIN_CARGO


if __name__ == "__main__":
    sys.exit(0 if can_build() else 1)
