"""Task generate: sample responses from the current policy into whole, atomically written shards.

Reads data.train's prompts (and data.eval's held-out prompts) through the training data
stream (shards, index, ranged reads, `file:line` errors, onBadRecord) in file order, cuts them
into units of `generate.promptsPerShard` (rows.py) and runs unit j of all units (train, then
held-out) on rank j % world, round by round. A unit's part is written whole with one
`storage.write_bytes` (S3: one PUT; local: temp file + rename), so an existing part is a finished
unit: a restarted attempt lists the parts once and skips them (never recomputes them).

After each round the ranks agree, in one small all-reduce, on the job-wide progress (rank 0's
metrics) and on stopping: on SIGTERM each rank abandons its unit between two generate batches,
keeps the parts already written and the task exits 75 (preempted) well inside the grace period.
At the end rank 0 writes `kubedpo_generate_summary.json` into output.uri and the task result.
Prompt and response counts cover every part of the output, skipped ones included (read back);
`tokens` and `tokensPerSecond` are this attempt's generation only. `emptyResponses` counts
responses that decode to "" (the policy ended at once): the judge sees them as they are.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..config import TrainerConfig
from ..data.formats import BadRecord
from ..data.stream import PreferenceStream, default_index_uri
from ..errors import ConfigError, InputError, Preempted
from ..metrics import task_identity
from ..result import write_result
from ..signals import StopRequest
from ..stage_config import GENERATE_SUMMARY, GENERATIONS_HELDOUT, GENERATIONS_TRAIN
from .metrics import GenerateMetrics
from .rows import Unit, decode_part, encode_part, generation_row, parse_prompt, plan_units, unit_seed
from .spec import check_spec

log = logging.getLogger(__name__)

TOTALS = ("prompts", "heldOutPrompts", "responses", "heldOutResponses", "tokens", "badRecords",
          "truncatedPrompts", "unitsWritten", "unitsSkipped", "positionsDone", "positionsSkipped", "emptyResponses")


@dataclass
class Tally:
    """This rank's running totals (summed over ranks at every round's all-reduce)."""

    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0.0))

    def add(self, **amounts: float) -> None:
        for k, v in amounts.items():
            self.values[k] += v


def refuse_vllm() -> None:
    """engine vllm is refused: never silently replaced by the slower engine, never run untested."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("generate.engine: vllm is not installed in this trainer image; use engine "
                          "transformers (the default) or an image with vllm")
    raise ConfigError("generate.engine: vllm is installed, but this build has no tested vllm path yet; "
                      "use engine transformers")


def run_generate(cfg: TrainerConfig, stop: StopRequest) -> dict[str, Any]:
    """Run the task; returns the result written for rank 0 (also on other ranks, for tests)."""
    assert cfg.generate is not None  # the schema requires it with task generate
    if cfg.generate.engine == "vllm":
        refuse_vllm()
    return _Generate(cfg, stop).run()


class _Generate:
    def __init__(self, cfg: TrainerConfig, stop: StopRequest) -> None:
        assert cfg.generate is not None
        self.cfg, self.g, self.stop = cfg, cfg.generate, stop
        self.tally = Tally()
        self.started = time.monotonic()

    # --- setup ------------------------------------------------------------------------------

    def _setup(self) -> None:
        import torch
        from accelerate import Accelerator

        from ..models import load_frozen, load_tokenizer
        from ..precision import plan_precision
        from .sampler import PromptEncoder, Sampler

        cfg = self.cfg
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.acc = Accelerator(cpu=device == "cpu")
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        storage.configure(cfg.s3)
        job, namespace, attempt = task_identity()
        self.metrics = GenerateMetrics(job, namespace, self.rank)
        self.metrics.set(attempt=attempt)
        if self.rank == 0 and cfg.metrics.port:
            log.info("metrics on :%d/metrics", self.metrics.serve(cfg.metrics.port))
        self._check_spec()
        self.tokenizer = load_tokenizer(cfg, self.acc)
        self.units = self._plan()
        self.existing = {GENERATIONS_TRAIN: _parts(storage.join(cfg.output.uri, GENERATIONS_TRAIN)),
                         GENERATIONS_HELDOUT: _parts(storage.join(cfg.output.uri, GENERATIONS_HELDOUT))}
        self.total_positions = sum(u.size for u in self.units)
        self.metrics.set(generate_prompts_total=self.total_positions, total_steps=self.total_positions)
        if cfg.training.distributed.strategy == "fsdp":
            log.warning("training.distributed.strategy fsdp: task generate holds the whole model on every "
                        "rank (no sharding); the strategy applies to training tasks only")
        plan = plan_precision(cfg.training.precision, cfg.model.dtype, self.acc.device)
        model = load_frozen(cfg.model.uri, cfg, self.acc.device, plan.reference_dtype, self.acc)
        self.sampler = Sampler(model, self.tokenizer, self.acc.device, plan.autocast_dtype)
        self.encode = PromptEncoder(self.tokenizer, cfg.data.max_prompt_length, cfg.data.truncation_side)
        log.info("generate: %d units (%d prompt rows) over %d ranks, precision %s", len(self.units),
                 self.total_positions, self.world, plan.name)

    def _check_spec(self) -> None:
        """Existing parts are reused only if they were sampled with this spec (spec.py)."""
        if self.rank == 0:
            check_spec(self.cfg)
        self.acc.wait_for_everyone()

    def _stream(self, uri: str) -> PreferenceStream:
        """The data stream in file order (no shuffle): the prompts' global order for every world size."""
        index = self.cfg.data.index_uri or (storage.join(self.cfg.checkpoint.uri, "data-index")
                                           if self.cfg.checkpoint.uri else default_index_uri())
        return PreferenceStream(self.cfg.data, uri, self.tokenizer, self.rank, self.world, 1, shuffle=False,
                                index_uri=index, barrier=self.acc.wait_for_everyone)

    def _plan(self) -> list[Unit]:
        d, g = self.cfg.data, self.g
        self.train = self._stream(d.train)
        n = self.train.rows_per_epoch()  # every rank: builds or reads the index (collective)
        units = plan_units("train", min(n, g.max_prompts or n), g.prompts_per_shard)
        self.heldout: PreferenceStream | None = None
        if d.eval and g.held_out_samples > 0:
            self.heldout = self._stream(d.eval)
            m = self.heldout.rows_per_epoch()
            units += plan_units("heldout", min(m, d.eval_max_rows or m), g.prompts_per_shard)
        return units

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self._setup()
            self.stop.training_started()
            t0 = time.monotonic()
            rounds = math.ceil(len(self.units) / self.world)
            for k in range(rounds):
                j = k * self.world + self.rank
                stopped = self._do(self.units[j]) if j < len(self.units) else False
                totals = self._agree(stopped)
                self._report(totals, time.monotonic() - t0)
                if totals["stop"]:
                    raise Preempted(f"stopped on SIGTERM after {int(totals['positionsDone'])} of "
                                    f"{self.total_positions} prompts; finished parts are kept and skipped "
                                    "on restart")
            return self._finish(time.monotonic() - t0)
        finally:
            self._close()

    def _do(self, unit: Unit) -> bool:
        """Run or skip one unit; True if it was abandoned on SIGTERM."""
        folder = GENERATIONS_TRAIN if unit.split == "train" else GENERATIONS_HELDOUT
        uri = storage.join(self.cfg.output.uri, folder, unit.name)
        held = unit.split == "heldout"
        if unit.name in self.existing[folder]:
            rows = decode_part(storage.read_bytes(uri))
            self._count(rows, held, unit)
            self.tally.add(unitsSkipped=1, positionsSkipped=unit.size)
            log.info("%s%s: exists, skipped (%d rows)", folder, unit.name, len(rows))
            return False
        rows_or_none = self._generate(unit)
        if rows_or_none is None:
            return True
        storage.write_bytes(uri, encode_part(rows_or_none))
        self._count(rows_or_none, held, unit)
        self.tally.add(unitsWritten=1)
        return False

    def _count(self, rows: list[dict[str, Any]], held: bool, unit: Unit) -> None:
        responses = sum(len(r["responses"]) for r in rows)
        self.tally.add(emptyResponses=sum(x == "" for r in rows for x in r["responses"]))
        if held:
            self.tally.add(heldOutPrompts=len(rows), heldOutResponses=responses)
        else:
            self.tally.add(prompts=len(rows), responses=responses)
        self.tally.add(positionsDone=unit.size)

    def _generate(self, unit: Unit) -> list[dict[str, Any]] | None:
        """The unit's generation rows, or None when SIGTERM arrived (the unit is abandoned)."""
        import torch

        from .sampler import Counts, Sampling, batched

        g = self.g
        stream = self.train if unit.split == "train" else self.heldout
        assert stream is not None
        prompts, sources, ids = [], [], []
        counts = Counts()
        for raw in stream.read_positions(0, range(unit.start, unit.stop)):
            try:
                prompt = parse_prompt(raw.raw)
            except BadRecord as err:
                if self.cfg.data.on_bad_record == "fail":
                    raise InputError(f"{raw.row_id}: {err} (data.onBadRecord=fail; set skip to drop such rows)") from None
                self.tally.add(badRecords=1)
                log.warning("%s: %s (skipped: data.onBadRecord=skip)", raw.row_id, err)
                continue
            prompts.append(prompt)
            sources.append(raw.row_id)
            ids.append(self.encode(prompt, raw.row_id, counts))
        held = unit.split == "heldout"
        temperature = g.held_out_temperature if held and g.held_out_temperature is not None else g.temperature
        sampling = Sampling(g.held_out_samples if held else g.samples_per_prompt, temperature, g.top_p, g.top_k,
                            g.max_new_tokens)
        torch.manual_seed(unit_seed(g.seed, unit))  # CPU and every CUDA device: output independent of ranks
        responses: list[list[str]] = []
        for batch in batched(ids, g.batch_size):
            if self.stop.requested:
                log.warning("SIGTERM: abandoning %s %s (%d of %d prompts done)", unit.split, unit.name,
                            len(responses), len(ids))
                return None
            responses += self.sampler.generate(batch, sampling, counts)
        self.tally.add(tokens=counts.tokens, truncatedPrompts=counts.truncated_prompts)
        return [generation_row(p, r, s) for p, r, s in zip(prompts, responses, sources, strict=True)]

    def _agree(self, stopped: bool) -> dict[str, float]:
        """Job-wide totals and the stop flag, in one all-reduce (every rank, every round)."""
        import torch

        keys = list(TOTALS)
        mine = [float(stopped or self.stop.requested)] + [self.tally.values[k] for k in keys]
        t = self.acc.reduce(torch.tensor(mine, dtype=torch.float64, device=self.acc.device), reduction="sum")
        vals = t.tolist()
        return {"stop": vals[0] > 0, **dict(zip(keys, vals[1:], strict=True))}

    def _report(self, totals: dict[str, float], elapsed: float) -> None:
        """Progress gauges; the rate counts only what this attempt generated (skipped parts took no time)."""
        done = totals["positionsDone"]
        rate = (done - totals["positionsSkipped"]) / max(elapsed, 1e-9)
        eta = (self.total_positions - done) / rate if rate > 0 else float("nan")
        self.metrics.set(step=done, generate_prompts_done=done, eta_seconds=eta,
                         tokens_per_second=totals["tokens"] / max(elapsed, 1e-9))
        self.metrics.advance("generate_tokens", totals["tokens"])
        self.metrics.advance("bad_records", totals["badRecords"])
        self.metrics.advance("truncated_prompts", totals["truncatedPrompts"])
        if self.rank == 0:
            log.info("%s", json.dumps({"event": "generate", "prompts_done": int(done),
                                       "prompts_total": self.total_positions, "tokens": int(totals["tokens"]),
                                       "tokens_per_second": round(totals["tokens"] / max(elapsed, 1e-9), 1),
                                       "eta_seconds": round(eta, 1) if math.isfinite(eta) else None}))

    def _finish(self, elapsed: float) -> dict[str, Any]:
        totals = self._agree(False)
        ints = {k: int(totals[k]) for k in TOTALS}
        tps = totals["tokens"] / max(elapsed, 1e-9)
        result = {"prompts": ints["prompts"], "heldOutPrompts": ints["heldOutPrompts"],
                  "responses": ints["responses"], "tokens": ints["tokens"], "tokensPerSecond": round(tps, 3)}
        if self.rank == 0:
            summary = {**ints, "tokensPerSecond": tps, "units": len(self.units), "ranks": self.world,
                       "seconds": round(time.monotonic() - self.started, 2),
                       "train": storage.join(self.cfg.output.uri, GENERATIONS_TRAIN),
                       "heldout": storage.join(self.cfg.output.uri, GENERATIONS_HELDOUT),
                       "config": self.cfg.to_wire()}
            storage.write_bytes(storage.join(self.cfg.output.uri, GENERATE_SUMMARY),
                                json.dumps(summary, indent=2).encode())
            write_result(result, self.rank)
            log.info("generate done: %s", json.dumps(result))
        self.acc.wait_for_everyone()
        return result

    def _close(self) -> None:
        """Tear the process group down here: interpreter teardown with a live one can abort."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _parts(prefix: str) -> set[str]:
    """Names of the finished parts under `prefix` (none yet: empty)."""
    try:
        objects = storage.list_objects(prefix)
    except InputError:
        return set()
    return {o.uri.rsplit("/", 1)[-1] for o in objects if o.uri.rsplit("/", 1)[-1].startswith("part-")
            and o.uri.endswith(".jsonl")}
