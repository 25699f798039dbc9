"""Local scratch folders named after the process that owns them, so the next start can remove the
ones a killed run left behind.

A SIGKILLed trainer (OOM killer, `kubectl delete --force`, a laptop's Ctrl-\\) runs no cleanup:
its staged checkpoint (a whole model and optimizer state) and resume downloads stay in /tmp, and
on a node-local cache volume or a laptop they pile up run after run. Every folder made here is
`kubedpo-<kind>-<pid>.<start>-<suffix>`: the owner's pid and its start time (clock ticks since
boot, from /proc), so a reused pid is not mistaken for the owner. `clean_stale()` at start
removes each folder whose owner is gone. A folder shared by the local ranks of one node is owned
by their launcher (the parent process: our launcher or torchrun), alive as long as any rank is.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^kubedpo-[a-z]+-(\d+)\.(\d+)-")


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (after the command name, which may hold spaces); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def owner_tag(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{_start_time(pid) or 0}"


def alive(pid: int, start: str) -> bool:
    return _start_time(pid) == start


def root() -> Path:
    return Path(tempfile.gettempdir())


def make(kind: str, base: Path | None = None) -> Path:
    """A new folder owned by this process."""
    return Path(tempfile.mkdtemp(prefix=f"kubedpo-{kind}-{owner_tag()}-", dir=base or root()))


def node_shared(kind: str, key: str, base: Path | None = None) -> Path:
    """A folder every local rank of this launch finds under the same name (owned by the launcher)."""
    path = (base or root()) / f"kubedpo-{kind}-{owner_tag(os.getppid())}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def clean_stale(base: Path | None = None) -> list[Path]:
    """Remove the scratch folders whose owner process is gone; returns them."""
    removed = []
    for path in sorted((base or root()).glob("kubedpo-*")):
        m = _NAME.match(path.name)
        if m is None or not path.is_dir() or alive(int(m.group(1)), m.group(2)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    if removed:
        log.info("removed %d scratch folder(s) left by runs that were killed: %s", len(removed),
                 ", ".join(p.name for p in removed[:5]))
    return removed
