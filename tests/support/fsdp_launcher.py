"""The trainer's CLI with accelerate's state forced to FSDP on CPU (gloo): the forced-FSDP shim.

accelerate 1.15 grants FSDP only on GPU-type backends; on CPU it keeps MULTI_CPU (DDP). This makes
its state say FSDP where it would have said MULTI_CPU, exactly as its GPU branch does; everything
after that is accelerate's and torch's real FSDP2. Used by tests/trainer/test_fsdp.py and
bench/fsdp_loading.py:  torchrun --nproc-per-node 2 tests/support/fsdp_launcher.py --config job.yaml
"""

import sys

from accelerate import state as _st
from accelerate.utils import DistributedType

_orig = _st.AcceleratorState.__init__


def _init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
    _orig(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        _st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


_st.AcceleratorState.__init__ = _init
from kubedpo_trainer.cli import main  # noqa: E402

main(sys.argv[1:])
