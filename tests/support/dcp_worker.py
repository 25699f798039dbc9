"""One rank of the resharding test (run under torchrun): FSDP2 on gloo, the trainer's DCP functions.

    python -m torch.distributed.run --nproc-per-node=N tests/support/dcp_worker.py MODE MODEL_DIR CKPT EXPECT

save: shard the tiny model over N ranks, take two AdamW steps, write a DCP checkpoint to CKPT and
      the full (gathered) model and optimizer state to EXPECT, from rank 0.
load: shard a fresh copy over this run's ranks, print the DCP files this rank's shards need, load CKPT, gather the full state and compare it
      with EXPECT, exactly; then write EXPECT.loaded with what was loaded (rank 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from kubedpo_trainer.sharded_checkpoint import load_sharded, save_sharded, shard_files_needed


def build(model_dir: str, world: int):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def full_state(model, opt) -> dict:
    m, o = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": m, "optimizer": o.get("state", {})}  # empty off rank 0


def main(mode: str, model_dir: str, ckpt: str, expect: str) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    model, opt = build(model_dir, world)
    if mode == "save":
        torch.manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (4, 16))
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        save_sharded(model, opt, Path(ckpt))
        state = full_state(model, opt)
        if dist.get_rank() == 0:
            torch.save(state, expect)
    else:
        needs = sorted(shard_files_needed(model, opt)(Path(ckpt)))  # what resume would fetch for this rank
        print(f"rank {dist.get_rank()} needs {','.join(needs)}", flush=True)
        load_sharded(model, opt, Path(ckpt))
        state = full_state(model, opt)
        if dist.get_rank() == 0:
            torch.save(state, expect + ".loaded")
    local = sum(p.to_local().numel() for p in model.parameters())
    print(f"rank {dist.get_rank()} of {world}: {local} of {sum(p.numel() for p in model.parameters())} "
          "parameters local", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
