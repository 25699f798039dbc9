"""Resume fetches each checkpoint file once per node, and each rank only what it reads; scratch
folders of killed runs are removed at the next start.

Counted at the HTTP level through the tests' S3 proxy in front of SeaweedFS, for a real 2-rank
trainer (our launcher, gloo on CPU) on one node. Before, each rank downloaded the whole
checkpoint into its own temp folder: every object twice.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kubedpo_trainer import scratch
from tests.trainer.test_resume import Launch, _cfg, s3_task  # noqa: F401 - s3_task is a fixture


def test_scratch_folders_of_dead_owners_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE)
    pid = int(dead.communicate()[0])
    start = scratch._start_time(pid)  # gone: None
    assert start is None
    killed = tmp_path / f"kubedpo-ckpt-{pid}.12345-abcd"
    (killed / "rank0" / "step-000010").mkdir(parents=True)
    (killed / "rank0" / "step-000010" / "optimizer.pt").write_bytes(b"x" * 1000)
    mine = scratch.make("ckpt", tmp_path)
    shared = scratch.node_shared("resume", "k", tmp_path)  # owned by this test's parent: alive
    reused = tmp_path / f"kubedpo-export-{scratch.owner_tag().split('.')[0]}.1-x"  # a reused pid: not its owner
    reused.mkdir()
    cache = tmp_path / "kubedpo-cache"  # the model cache is not scratch
    cache.mkdir()
    assert set(scratch.clean_stale(tmp_path)) == {killed, reused}
    assert mine.is_dir() and shared.is_dir() and cache.is_dir() and not killed.exists()


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_on_one_node_fetch_each_checkpoint_file_once(s3, s3_task, fault_proxy,  # noqa: F811
                                                               tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"  # the trainers' TMPDIR: scratch folders of this test's runs only
    tmp.mkdir()
    env = {**s3.env(), "TMPDIR": str(tmp)}
    first = Launch(_cfg(s3_task, s3, "once", maxSteps=10), tmp_path / "a", env)
    assert first.wait() == 0, first.stderr()
    second = Launch(_cfg(s3_task, s3, "once", endpoint=fault_proxy.endpoint, maxSteps=12), tmp_path / "b", env)
    assert second.wait() == 0, second.stderr()
    assert "resumed from" in second.full_log() and "(step 10)" in second.full_log()

    prefix = f"/{s3.bucket}/runs/once/ckpt/step-000010/"
    gets = Counter({path.removeprefix(prefix): n for (method, path), n in fault_proxy.seen.items()
                    if method == "GET" and path.startswith(prefix)})
    files = {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng-rank0.pt",
             "rng-rank1.pt", "data-rank0.json", "data-rank1.json"}
    assert files <= set(gets), gets
    assert all(gets[f] == 1 for f in files), f"fetched more than once on one node: {gets}"
    # Nothing left behind: the node's shared folder is removed once both ranks have loaded.
    assert sorted(p.name for p in tmp.iterdir()) == []
