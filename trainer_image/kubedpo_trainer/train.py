"""The DPO training loop on accelerate: setup, step, evaluate, checkpoint, export.

One readable class in the torchtune-recipe shape. Each step: one concatenated chosen+rejected
forward of the policy (with grad) and one of the reference (no grad, or the LoRA adapter
disabled), a loss from the registry, backward, clip, optimizer and scheduler step. The same
code runs 1 CPU process, N local ranks (gloo) or N pods x M GPUs (nccl): accelerate reads the
rank and rendezvous from the environment the launcher (ours, torchrun or accelerate) sets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from . import checkpoint as ckpt
from . import collectives, heap, loop_state, resume_source, scratch, storage
from . import distributed as dist_cfg
from .batch import Batch
from .config import TrainerConfig, resolve_log_format
from .data.stream import PreferenceStream, RowKind
from .errors import InputError, Preempted
from .evaluate import evaluate
from .export import export_final
from .forward import concatenated_forward, dpo_metrics, logit_totals
from .gpu_memory import cuda_memory_reader, max_over_ranks, peak_memory_bytes
from .losses import LossInputs, beta_at, compute_loss
from .metrics import TrainerMetrics, task_identity
from .models import load_models, load_tokenizer
from .packed_step import train_step_packed
from .precision import plan_precision
from .progress import StepLogger
from .reference import Reference
from .reference_cache import precompute
from .result import write_result
from .signals import StopRequest

log = logging.getLogger(__name__)


class Trainer:
    # What the task trains on; SFTTrainer (sft_train.py) overrides both.
    row_kind: RowKind = "preference"
    uses_reference = True
    unused_gauges: frozenset[str] = frozenset()  # exported only once set (metrics.TrainerMetrics)

    def __init__(self, cfg: TrainerConfig, stop: StopRequest | None = None) -> None:
        self.cfg = cfg
        # Usually installed by the CLI before torch is imported: a SIGTERM during start-up exits 75.
        self.stop = stop or StopRequest(cfg.checkpoint.preemption_grace_seconds)
        self.step = 0
        self.skipped_steps = 0  # groups of padding rows only: no optimizer step, no training log
        self.tokens_total = 0.0
        self.step_times: list[float] = []
        self._scratch_dirs: list[Path] = []
        self.started = time.monotonic()

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        heap.freeze_long_lived()  # the imports: see heap.py
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = plan_precision(t.precision, cfg.model.dtype, device)
        self.acc = Accelerator(
            cpu=device == "cpu",
            mixed_precision=self.precision.accelerate_mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            fsdp_plugin=dist_cfg.fsdp_plugin(cfg),
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if self.acc.is_local_main_process:
            scratch.clean_stale()  # staged checkpoints and downloads of runs that were killed
        self.fsdp = self.acc.distributed_type == DistributedType.FSDP
        dist_cfg.log_distributed_type(self.acc, dist_cfg.wants_fsdp(cfg))
        dist_cfg.settle_loading_env(cfg, self.fsdp)
        set_seed(t.seed)
        if not sys.stderr.isatty() or resolve_log_format() == "rich":
            hf_logging.disable_progress_bar()  # pods get JSON lines; a terminal gets our one display
        job, namespace, attempt = task_identity()
        self.metrics = TrainerMetrics(job=job, namespace=namespace, rank=self.rank, unused=self.unused_gauges)
        # Every retry advances kubedpo_s3_retries_total as it happens (s3transfer's threads, the export
        # included), counting on from the CLI's start-up checks.
        storage.configure(cfg.s3, keep_count=True,
                          on_retry=lambda total: self.metrics.sync_counter("s3_retries", total))
        self.metrics.set({"attempt": attempt})  # gang restarts so far
        if self.rank == 0 and cfg.metrics.port:
            self.metrics_port = self.metrics.serve(cfg.metrics.port)
            log.info("metrics on :%d/metrics", self.metrics_port)
        self.memory_reader = cuda_memory_reader(device)
        self.tokenizer = load_tokenizer(cfg, self.acc)
        rss_before = dist_cfg.host_rss_bytes()
        self.models = load_models(cfg, self.acc, plan=self.precision, with_reference=self.uses_reference,
                                  prepare_reference=(
            (lambda m: dist_cfg.shard_reference(self.acc, m)) if self.fsdp else None))
        # Under FSDP the precompute pass waits until the policy is sharded: LoRA's reference is the
        # policy itself (adapter off), and ranks but 0 hold it on the meta device until then.
        late_precompute = t.reference_logps == "precompute" and self.fsdp
        self.reference = (precompute(cfg, self.acc, self.models, self.tokenizer)
                          if t.reference_logps == "precompute" and not late_precompute else Reference(self.models))
        # FSDP1 flattens the parameters: the optimizer must see the wrapped model's. FSDP2 (and
        # DDP) take model and optimizer together: accelerate swaps in the sharded DTensor params.
        fsdp1 = self.fsdp and not self.acc.is_fsdp2
        if fsdp1:
            self.models.policy = self.acc.prepare(self.models.policy)
        params = [p for p in self.models.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                           fused=fused_adamw_ok(params))
        heap.freeze_long_lived()  # the models and the optimizer, before the data set is listed
        self.train_stream = PreferenceStream(
            cfg.data, cfg.data.train, self.tokenizer, self.rank, self.world, t.batch_size,
            accumulation=t.gradient_accumulation_steps, index_uri=index_uri(cfg), barrier=self.acc.wait_for_everyone,
            rows=self.row_kind,
        )
        self.total_steps = self._total_steps()
        self.scheduler = get_scheduler(
            t.lr_scheduler,
            self.optimizer,
            num_warmup_steps=math.ceil(t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        # The scheduler is stepped by us once per optimizer step: accelerate's wrapper would
        # step it once per process.
        if fsdp1:
            self.optimizer = self.acc.prepare(self.optimizer)
        else:
            self.models.policy, self.optimizer = self.acc.prepare(self.models.policy, self.optimizer)
            if self.fsdp:
                dist_cfg.rebind_optimizer(self.optimizer, self.models.policy)
        self.memory = dist_cfg.memory_per_rank(self.acc, self.models.policy, self.models.reference, rss_before)
        if late_precompute:
            self.reference = precompute(cfg, self.acc, self.models, self.tokenizer)
        if self.fsdp and t.gradient_checkpointing:
            log.info("activation checkpointing: %d layers", dist_cfg.checkpointed_layers(self.models.policy))
        self.writer = None
        if cfg.checkpoint.uri:
            self.writer = ckpt.CheckpointWriter(
                cfg.checkpoint.uri, self.rank, self.world, cfg.checkpoint.keep_last,
                staging=self._scratch("ckpt"),
                on_complete=lambda step: self.metrics.set(
                    {"last_checkpoint_step": step, "last_checkpoint_timestamp_seconds": time.time()}),
            )
        self._resume()
        self.log = StepLogger(self.rank, self.total_steps, self.metrics, start_step=self.step)
        heap.freeze_long_lived()  # what accelerate prepared, the writer, the resumed state

    def _total_steps(self) -> int:
        t = self.cfg.training
        per_epoch = self.train_stream.batches_per_epoch() // t.gradient_accumulation_steps
        if per_epoch < 1 and not t.max_steps:
            raise InputError(
                f"{self.cfg.data.train}: too few rows for one optimizer step "
                f"(batchSize {t.batch_size} x gradientAccumulationSteps "
                f"{t.gradient_accumulation_steps} x {self.world} ranks)"
            )
        # As TRL/transformers: maxSteps overrides epochs (the stream cycles epochs until then).
        return t.max_steps or per_epoch * t.epochs

    # --- checkpoints ------------------------------------------------------------------------

    def _resume(self) -> None:
        uri = self.cfg.checkpoint.uri
        if not uri:
            return
        target = resume_source.folder(uri)
        try:
            self._load_checkpoint(uri, target)
        finally:
            self.acc.wait_for_everyone()  # every local rank has read the shared folder
            resume_source.release(target, self.acc.is_local_main_process)

    def _load_checkpoint(self, ckpt_uri: str, target: Path) -> None:
        sharded = (lambda f: set()) if not self.fsdp else resume_source.fsdp_needs(self.models.policy, self.optimizer)
        found = resume_source.agreed(ckpt_uri, target, ckpt.rank_needs(self.rank, sharded),
                                     lambda v: collectives.gather_int(self.acc, v))
        if found is None:
            return
        self.step = loop_state.restore(self._state(), found, self.rank)
        log.info("resumed from %s (step %d)", found.uri, self.step)

    def _state(self) -> loop_state.LoopState:
        return loop_state.LoopState(self.models.policy, self.acc.unwrap_model(self.models.policy), self.optimizer,
                                    self.scheduler, self.train_stream, self.fsdp)

    def _snapshot(self) -> ckpt.Snapshot:
        return loop_state.snapshot(self._state(), self.step, self.rank, self.world, self.total_steps)

    def save_checkpoint(self, wait: bool = False) -> None:
        if self.writer is None:
            return
        blocked = self.writer.save(self._snapshot(), wait=wait)
        self.metrics.observe("checkpoint_seconds", blocked)
        self.last_checkpoint_time = time.monotonic()

    def _check_grace(self) -> None:
        if self.stop.requested_at is None:
            return
        took = time.monotonic() - self.stop.requested_at
        grace = self.cfg.checkpoint.preemption_grace_seconds
        if took > grace:
            log.warning("preemption checkpoint took %.1fs, over checkpoint.preemptionGraceSeconds=%.0fs: "
                        "raise it, or the kubelet may kill the pod before the checkpoint completes", took, grace)

    def _agree(self) -> tuple[bool, bool]:
        """(stop now, checkpoint by time): one tiny all-reduce so every rank acts on the same step."""
        every = self.cfg.checkpoint.every_minutes
        due = every is not None and time.monotonic() - self.last_checkpoint_time >= every * 60
        stop, checkpoint = collectives.any_rank(self.acc, self.stop.requested, due)
        return stop, checkpoint

    # --- the loop ---------------------------------------------------------------------------

    def train_step(self, batches: list[Batch]) -> dict[str, float] | None:
        """One optimizer step over `gradientAccumulationSteps` micro-batches; None when skipped.

        A group with no real row on any rank (only the weight-0 padding onBadRecord=skip leaves
        at an epoch's end) is skipped by every rank alike: stepping AdamW on zero gradients
        would still move the weights (momentum, weight decay), and its loss 0 / accuracy 1.0
        are no measurement. The scheduler still advances: the schedule follows the step count.
        """
        t = self.cfg.training
        real = [int((b["weight"] > 0).sum()) for b in batches]  # pairs that count, per micro-batch
        if collectives.sum_over_ranks(self.acc, float(sum(real))) == 0:
            self.scheduler.step()
            return None
        if t.packing is not None:
            return train_step_packed(self, batches)
        beta = beta_at(self.step, self.total_steps, t)
        sums: dict[str, float] = {}
        logits: list[torch.Tensor] = []
        grad_norm = float("nan")
        for batch, n in zip(batches, real, strict=True):
            with self.acc.accumulate(self.models.policy):
                policy = concatenated_forward(self.models.policy, batch)
                with self.acc.autocast():  # the policy's forward is autocast by accelerate: match it
                    ref = self.reference.logps(batch)
                out = compute_loss(t.loss, LossInputs.from_forward(policy, ref, batch), beta, t)
                self.acc.backward(out.loss)
                if self.acc.sync_gradients:
                    grad_norm = self._clip()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in dpo_metrics(out, policy).items():
                sums[k] = sums.get(k, 0.0) + v * n  # weighted by real pairs: padding is no data
            logits.append(logit_totals(policy) * (n > 0))
            self.metrics.inc("samples", n)
            self.metrics.inc("tokens", batch["num_tokens"])
            self.tokens_total += batch["num_tokens"]
        self.scheduler.step()
        values = collectives.mean_over_ranks(self.acc, sums, float(sum(real)), torch.stack(logits))
        values.update(grad_norm=grad_norm, learning_rate=self.scheduler.get_last_lr()[0], beta=beta)
        return values

    def _clip(self) -> float:
        max_norm = self.cfg.training.max_grad_norm
        if max_norm is None:
            grads = [p.grad for p in self.models.policy.parameters() if p.grad is not None]
            return float(torch.linalg.vector_norm(torch.stack([_full(g.norm()) for g in grads])))
        return float(_full(self.acc.clip_grad_norm_(self.models.policy.parameters(), max_norm)))

    def evaluate(self) -> dict[str, float]:
        if not self.cfg.data.eval:
            return {}
        beta = beta_at(self.step, self.total_steps, self.cfg.training)
        values = evaluate(self.cfg, self.acc, self.models, self.reference, self.tokenizer, beta)
        self.metrics.set(values)
        self.log.eval(self.step, values)
        return values

    def _scratch(self, kind: str) -> Path:
        """A local temp folder removed when the run ends; a SIGKILL's is removed by the next start."""
        path = scratch.make(kind)
        self._scratch_dirs.append(path)
        return path

    def run(self) -> dict[str, Any]:
        self.stop.install()
        try:
            return self._run()
        finally:
            for path in self._scratch_dirs:
                shutil.rmtree(path, ignore_errors=True)

    def _run(self) -> dict[str, Any]:
        self.setup()
        self.stop.training_started()
        self.last_checkpoint_time = time.monotonic()
        t, c = self.cfg.training, self.cfg.checkpoint
        eval_start = self.evaluate() if (self.step == 0 and t.eval_on_start) else {}
        eval_values: dict[str, float] = {}
        values: dict[str, float] = {}
        batches = self.train_stream.batches(until_step=self.total_steps, accumulation=t.gradient_accumulation_steps,
                                            start_step=self.step)
        for group in batches:
            t0 = time.perf_counter()
            stepped = self.train_step(group.batches)
            self.step += 1
            if stepped is None:
                self.skipped_steps += 1
                log.info("step %d: only weight-0 padding rows on every rank (rows dropped by "
                         "data.onBadRecord=skip); no optimizer step, not logged", self.step)
            else:
                values = stepped
            self.metrics.observe("data_wait_seconds", group.wait_seconds)
            self.step_times.append(time.perf_counter() - t0)
            self.metrics.observe("step_seconds", self.step_times[-1])
            self._record_rows(group)
            stop, due = self._agree()
            if stepped is not None and (self.step % t.logging_steps == 0 or self.step == self.total_steps):
                job_tokens = self._sync_counters()
                if self.memory_reader is not None:  # a collective, at the same steps on every rank
                    self.metrics.set_gpu_memory(max_over_ranks(self.memory_reader, self.acc.gather, self.acc.device))
                self.log.train(self.step, values, epoch=self.train_stream.epoch_progress(),
                               tokens_total=self.tokens_total, job_tokens_total=job_tokens)
            if t.eval_steps and self.step % t.eval_steps == 0:
                eval_values = self.evaluate()
            if stop:
                self.save_checkpoint(wait=True)
                self._check_grace()
                raise Preempted(f"stopped at step {self.step} on SIGTERM; checkpoint written")
            if due or (c.every_steps and self.step % c.every_steps == 0):
                self.save_checkpoint()
        if t.eval_steps is None or self.step % t.eval_steps != 0:
            eval_values = self.evaluate()
        if self.writer is not None:
            self.writer.wait()
        summary = {"step": self.step, "total_steps": self.total_steps, "skipped_steps": self.skipped_steps,
                   "train": values, "eval": eval_values,
                   "eval_at_start": eval_start, "data": self._data_totals(),
                   "storage": {"s3_retries": int(collectives.sum_over_ranks(self.acc, float(storage.retry_count())))},
                   "seconds": round(time.monotonic() - self.started, 2), "config": self.cfg.to_wire(),
                   "timing": {"step_seconds": self.step_times, "peak_memory_bytes": peak_memory_bytes()},
                   "memory": self.memory}
        self.log.finish(summary, self.cfg.output.uri)  # the curves PNG, before the output's marker
        self._export(summary)
        write_result(self.result(summary), self.rank)
        self.log.close()
        return summary

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The task result (result.py) for the operator / local runner: step, loss, eval, output."""
        out: dict[str, Any] = {"step": summary["step"], "loss": summary["train"].get("loss"),
                               "outputUri": self.cfg.output.uri}
        if "eval_rewards_accuracies" in summary["eval"]:
            out["evalRewardAccuracy"] = summary["eval"]["eval_rewards_accuracies"]
        return out

    def _data_totals(self) -> dict[str, int]:
        """Data stats summed over ranks: what was read, skipped and truncated (never silent)."""
        st = self.train_stream.stats
        keys = ("rows", "bad_records", "truncated_prompts", "truncated_responses")
        sums = collectives.sum_each(self.acc, [float(getattr(st, k)) for k in keys])
        return {k: int(v) for k, v in zip(keys, sums, strict=True)}

    def _sync_counters(self) -> int:
        """Only rank 0 serves metrics, so its data counters carry the whole job's totals: every
        rank calls this at each logging step (two small all-reduces). Returns the job's tokens."""
        totals = self._data_totals()
        for key in ("bad_records", "truncated_prompts", "truncated_responses"):
            self.metrics.sync_counter(key, totals[key])
        job_tokens = int(collectives.sum_over_ranks(self.acc, self.tokens_total))
        self.metrics.sync_counter("job_tokens", job_tokens)
        return job_tokens

    def _record_rows(self, group: Any) -> None:
        """Opt-in audit log of trained row ids (KUBEDPO_ROW_LOG=dir): exactly-once evidence."""
        target = os.environ.get("KUBEDPO_ROW_LOG")
        if target:
            rows = [r for b in group.batches for r in b["row_ids"]]
            with open(Path(target) / f"rank-{self.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "rows": rows}) + "\n")

    def _export(self, summary: dict[str, Any]) -> None:
        self.acc.wait_for_everyone()
        full = self.acc.get_state_dict(self.models.policy) if self.fsdp else None  # FSDP: a collective
        if self.rank == 0:
            model = self.acc.unwrap_model(self.models.policy)
            export_final(model, self.tokenizer, self.cfg, summary, state_dict=full)
            log.info("model written to %s", self.cfg.output.uri)
        self.acc.wait_for_everyone()


def index_uri(cfg: TrainerConfig) -> str | None:
    """Where the shard index lives: data.indexUri, else beside the checkpoints (shared by attempts)."""
    if cfg.data.index_uri:
        return cfg.data.index_uri
    return storage.join(cfg.checkpoint.uri, "data-index") if cfg.checkpoint.uri else None


def _full(t: torch.Tensor) -> torch.Tensor:
    """A norm computed on FSDP2's sharded (DTensor) grads, reduced over the shards."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fused_adamw_ok(params: list[torch.nn.Parameter]) -> bool:
    """The fused AdamW kernel: one pass per step instead of a dozen foreach ops.

    On a 19M-parameter model on CPU it takes the optimizer step from ~55 ms to ~5 ms (see
    BENCHMARKS.md); TRL uses it by default too. It needs floating-point params on CPU or CUDA.
    """
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
