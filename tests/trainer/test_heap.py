"""The trainer keeps the cyclic GC off what lives for the whole run (heap.py says why).

Trainer.setup runs in this process on the tiny model (1 rank, CPU): afterwards the imported
modules, the models and the optimizer are in the permanent generation, so a full collection
(and the one a listing of many shards used to trigger before step 1) walks only what the run
allocates later.
"""

from __future__ import annotations

import gc
from pathlib import Path

from kubedpo_trainer.config import parse_config
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


def test_trainer_setup_freezes_imports_and_models(tiny: TinyArtifacts, tmp_path: Path) -> None:
    from kubedpo_trainer.train import Trainer

    cfg = parse_config(tiny_config(tiny, tmp_path, training={"maxSteps": 1}))
    gc.unfreeze()
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert gc.get_freeze_count() > 20_000, "imports and models should be out of the collector's reach"
        params = list(trainer.models.policy.parameters())
        assert params and not _gc_sees(params[0]), "the policy's parameters are still walked by every collection"
        assert not _gc_sees(trainer.optimizer), "the optimizer is still walked by every collection"
    finally:
        trainer.log.close()
        gc.unfreeze()
