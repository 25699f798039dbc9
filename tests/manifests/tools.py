"""Find the external tools the manifest and metrics tests run for real (helm, prometheus).

CI installs them with scripts/install-tools.sh before `make test`; on a machine without them the
tests try that same script once, and skip (naming the reason) only if it cannot install them.
Shared by tests/manifests and tests/metrics.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install-tools.sh"
TOOLS_BIN = ROOT / ".tools" / "bin"


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def require_tool(name: str) -> str:
    """Path of `name`, installing it with scripts/install-tools.sh if missing; else pytest.skip."""
    found = _which(name)
    if found:
        return found
    try:
        proc = subprocess.run(["bash", str(INSTALL), name], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"{name} is not installed and {INSTALL.name} could not run: {err}")
    found = _which(name)
    if not found:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        pytest.skip(f"{name} is not installed and `{INSTALL.name} {name}` failed "
                    f"(exit {proc.returncode}): {' | '.join(tail)}")
    return found
