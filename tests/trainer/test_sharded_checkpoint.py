"""Model and optimizer state written by FSDP2 on 2 ranks load on 1 rank, and back (gloo, CPU).

Real torch.distributed.checkpoint and FSDP2 (`fully_shard` on a CPU mesh): each run is its own
torchrun with that many ranks; the comparison is against the state gathered at save time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.runs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

WORKER = Path(__file__).parents[1] / "support" / "dcp_worker.py"


def _run(nproc: int, mode: str, model_dir: Path, ckpt: Path, expect: Path) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), mode, str(model_dir), str(ckpt), str(expect)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _assert_equal(saved: Path, loaded: Path) -> None:
    a, b = torch.load(saved, weights_only=False), torch.load(loaded, weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"].keys() == b["optimizer"].keys() and a["optimizer"]
    for name, s in a["optimizer"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(s[k]), torch.as_tensor(b["optimizer"][name][k])), (name, k)
    assert any(s["exp_avg"].abs().max() > 0 for s in a["optimizer"].values())  # real moments, not zeros


# What each reading rank fetches at resume (resume_source): the files its shards' pieces are in, and
# rank 0's, which holds the entries every rank has alike (DCP's dedup, sent to the lowest rank).
NEEDS = {(2, 1): {0: "__0_0.distcp,__1_0.distcp"}, (1, 2): {0: "__0_0.distcp", 1: "__0_0.distcp"},
         (2, 2): {0: "__0_0.distcp", 1: "__0_0.distcp,__1_0.distcp"}}


@pytest.mark.parametrize(("writers", "readers"), [(2, 1), (1, 2), (2, 2)])
def test_state_saved_by_n_ranks_loads_on_m(tiny, tmp_path: Path, writers: int, readers: int) -> None:
    ckpt, expect = tmp_path / "dcp", tmp_path / "expect.pt"
    out = _run(writers, "save", tiny.model_dir, ckpt, expect)
    assert f"of {writers}:" in out
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == [".metadata"] + [f"__{r}_0.distcp" for r in range(writers)]  # one file per writing rank
    out = _run(readers, "load", tiny.model_dir, ckpt, expect)
    assert f"of {readers}:" in out
    for rank, files in NEEDS[(writers, readers)].items():
        assert f"rank {rank} needs {files}\n" in out, out
    _assert_equal(expect, Path(str(expect) + ".loaded"))
