"""The trainer keeps the cyclic GC off what lives for the whole run (heap.py says why).

Trainer.setup runs in a fresh process on the tiny model (1 rank, CPU): afterwards the imported
modules, the models and the optimizer are in the permanent generation, so a full collection
(and the one a listing of many shards used to trigger before step 1) walks only what the run
allocates later.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from kubedpo_trainer.heap import freeze_long_lived
from kubedpo_trainer.tiny import TinyArtifacts
from tests.support.runs import tiny_config


def _gc_sees(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_freeze_takes_live_objects_out_of_collections() -> None:
    gc.unfreeze()
    try:
        held = [[i] for i in range(1000)]  # tracked containers
        assert _gc_sees(held[0])
        assert freeze_long_lived() >= 1000
        assert not _gc_sees(held[0]), "a frozen object is still walked by collections"
        del held  # reference counting still frees frozen objects
    finally:
        gc.unfreeze()


# In a process of its own: Trainer.setup changes process-wide state (accelerate, env, seeds)
# that other in-process tests must not inherit.
_PROBE = r"""
import gc, json, sys
from kubedpo_trainer.config import parse_config
from kubedpo_trainer.train import Trainer
trainer = Trainer(parse_config(json.loads(sys.argv[1])))
trainer.setup()
walked = {id(o) for o in gc.get_objects()}
param = next(iter(trainer.models.policy.parameters()))
print(json.dumps({"frozen": gc.get_freeze_count(), "param": id(param) in walked,
                  "optimizer": id(trainer.optimizer) in walked}))
trainer.log.close()
"""


def test_trainer_setup_freezes_imports_and_models(tiny: TinyArtifacts, tmp_path: Path) -> None:
    cfg = tiny_config(tiny, tmp_path, training={"maxSteps": 1})
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["frozen"] > 20_000, f"imports and models should be out of the collector's reach: {seen}"
    assert not seen["param"], "the policy's parameters are still walked by every collection"
    assert not seen["optimizer"], "the optimizer is still walked by every collection"
