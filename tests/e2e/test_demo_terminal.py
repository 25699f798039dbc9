"""`make demo` on a real terminal (tmux): the live display, not JSON lines, and the curves PNG.

tmux gives the program a real pseudo-terminal and `capture-pane` returns the screen as a person
sees it, so this checks what rich actually drew (the bar's line while training runs, the eval
tables and the summary), not what we meant to draw. docs/demo-session.md shows one such capture.
Piped output keeping the JSON lines is checked by tests/e2e/test_local_run.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")]


def test_make_demo_on_a_terminal_shows_progress_and_writes_curves(tmp_path: Path) -> None:
    session = f"kubedpo-demo-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "exit-code"
    demo_dir = tmp_path / "demo"
    cmd = (f"cd {REPO} && make demo DEMO_ARGS='--dir {demo_dir}'; echo $? > {done}; sleep 600")
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("KUBEDPO_LOG_FORMAT", None)
    subprocess.run(["tmux", "-L", session, "new-session", "-d", "-s", session, "-x", "150", "-y", "50", cmd],
                   check=True, env=env)
    seen_running: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while not done.exists() and time.monotonic() < deadline:
            screen = subprocess.run(["tmux", "-L", session, "capture-pane", "-p", "-t", session],
                                    capture_output=True, text=True).stdout
            if "DPO" in screen and "ETA" in screen and "/256" in screen and not seen_running:
                seen_running.append(screen)  # the live line, captured while training runs
            time.sleep(0.5)
        screen = subprocess.run(["tmux", "-L", session, "capture-pane", "-p", "-J", "-S", "-300", "-t", session],
                                capture_output=True, text=True).stdout
    finally:
        subprocess.run(["tmux", "-L", session, "kill-server"], capture_output=True)
    assert done.exists(), f"demo did not finish in time:\n{screen}"
    assert done.read_text().strip() == "0", screen
    assert seen_running, f"no live progress line seen while training:\n{screen}"
    live = seen_running[0]
    for part in ("step ", "loss ", "reward acc ", "margin ", "tok/s ", "ETA "):
        assert part in live, (part, live)
    assert '"event": "train"' not in screen  # a terminal gets the display, not the JSON lines
    assert "eval at step 0" in screen and "run summary" in screen
    assert "a coin flip scores 0.500" in screen
    png = demo_dir / "output" / "training_curves.png"
    assert f"training curves: {png}" in screen
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000

