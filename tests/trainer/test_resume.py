"""Issue 4 at trainer level, against a real SeaweedFS: exactly-once resume after SIGKILL,
SIGTERM preemption, cut-off checkpoints, and S3 faults during reads and checkpoint uploads.

Every run is a real 2-rank trainer (our launcher, gloo on CPU) reading model, data and
checkpoints from S3. Row accounting uses the trainer's opt-in audit log (KUBEDPO_ROW_LOG).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedpo_trainer import storage
from kubedpo_trainer.errors import EXIT_PREEMPTED
from kubedpo_trainer.tiny import write_preference_task
from tests.support.runs import free_port

pytestmark = pytest.mark.slow

ROWS, WORLD, BATCH = 384, 2, 4  # 48 steps per epoch, every row used (384 = 48 * 2 * 4)
STEPS = ROWS // (WORLD * BATCH)


@pytest.fixture
def s3_task(s3, tiny, tmp_path: Path) -> dict[str, str]:
    """Model and a 384-row task uploaded to a fresh bucket."""
    train, _ = write_preference_task(tmp_path / "task", ROWS, 8, seed=3, fmt="standard", shards=3)
    storage.upload_dir(train, s3.uri("data/train/"))
    storage.upload_dir(tiny.model_dir, s3.uri("models/tiny/"))
    return {"model": s3.uri("models/tiny/"), "train": s3.uri("data/train/")}


class Launch:
    """One `kubedpo-trainer --nproc-per-node 2` process group, as a pod would run it."""

    def __init__(self, cfg: dict[str, Any], work: Path, env: dict[str, str], world: int = WORLD) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.world = world
        (work / "rows").mkdir(exist_ok=True)
        self.work = work
        (work / "config.yaml").write_text(yaml.safe_dump(cfg))
        self.log = open(work / "stderr.log", "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(work / "config.yaml"),
             "--nproc-per-node", str(world), "--master-port", str(free_port())],
            env={**os.environ, **env, "KUBEDPO_ROW_LOG": str(work / "rows"), "OMP_NUM_THREADS": "1",
                 "KUBEDPO_CACHE_DIR": str(work / "cache")},
            stderr=self.log, stdout=self.log, start_new_session=True,
        )

    def steps_done(self) -> int:
        f = self.work / "rows" / "rank-0.jsonl"
        if not f.exists():
            return 0
        lines = [x for x in f.read_text().splitlines() if x.endswith("}")]
        return json.loads(lines[-1])["step"] if lines else 0

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.steps_done() < step:
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, f"never reached step {step}:\n{self.stderr()}"
            time.sleep(0.05)

    def wait(self, timeout: float = 240) -> int:
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the whole pod: launcher and both ranks
        self.wait()

    def stderr(self) -> str:
        return self.full_log()[-4000:]

    def full_log(self) -> str:
        return (self.work / "stderr.log").read_text()

    def rows_by_step(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for r in range(self.world):
            for line in (self.work / "rows" / f"rank-{r}.jsonl").read_text().splitlines():
                if line.endswith("}"):
                    rec = json.loads(line)
                    out.setdefault(rec["step"], []).extend(rec["rows"])
        return out

    def losses(self) -> dict[int, float]:
        text = self.full_log()
        out = {}
        for line in text.splitlines():
            i = line.find('{"event": "train"')
            if i >= 0:
                rec = json.loads(line[i:])
                out[rec["step"]] = rec["loss"]
        return out


def _cfg(task: dict[str, str], s3, name: str, endpoint: str | None = None, **training: Any) -> dict[str, Any]:
    return {
        "model": {"uri": task["model"]},
        "data": {"train": task["train"], "maxLength": 64, "maxPromptLength": 32, "shuffleBuffer": 32},
        "training": {"learningRate": 1e-3, "batchSize": BATCH, "epochs": 1, "loggingSteps": 1,
                     "warmupRatio": 0.1, **training},
        "checkpoint": {"uri": s3.uri(f"runs/{name}/ckpt/"), "everySteps": 10, "keepLast": 2},
        "output": {"uri": s3.uri(f"runs/{name}/final/")},
        "s3": {"endpointUrl": endpoint or s3.endpoint, "maxAttempts": 6},
        "metrics": {"port": 0},
    }


PACKED = {"packing": {"maxTokens": 48, "sharePrompt": True}, "referenceLogps": "precompute"}


@pytest.mark.parametrize("training", [{}, PACKED], ids=["padded", "packed-precomputed"])
def test_sigkill_mid_epoch_resumes_exactly_once(s3, s3_task, tmp_path: Path, training: dict[str, Any]) -> None:
    """Uninterrupted run vs. a run SIGKILLed at step >= 25 (last complete checkpoint: 20) and
    restarted: every row of the epoch is trained exactly once in the final history (steps 21..25
    are retrained once, identically), and the loss at every step after resume equals the
    uninterrupted run's (tolerance 1e-5; CPU gloo is deterministic, the state is restored
    bit-exactly, so only summation-order noise could differ).

    Packed (a token budget that splits each step into several micro-batches) with precomputed
    reference log-probs: the same, and the restarted attempt reads the reference table from the
    cache beside the checkpoints instead of recomputing it."""
    env = s3.env()
    base = Launch(_cfg(s3_task, s3, "base", **training), tmp_path / "base", env)
    assert base.wait() == 0, base.stderr()
    base_rows, base_loss = base.rows_by_step(), base.losses()
    assert len(base_loss) == STEPS

    first = Launch(_cfg(s3_task, s3, "killed", **training), tmp_path / "first", env)
    first.wait_for_step(25)
    first.kill()
    killed_at = max(first.rows_by_step())
    assert 25 <= killed_at < STEPS

    second = Launch(_cfg(s3_task, s3, "killed", **training), tmp_path / "second", env)
    assert second.wait() == 0, second.stderr()
    if training:
        assert f"{ROWS} rows reused from the cache, 0 computed" in second.full_log()
    resumed = second.rows_by_step()
    start = min(resumed) - 1
    assert start % 10 == 0 and start <= killed_at  # a complete checkpoint, at or before the kill
    assert "resumed from" in second.full_log()

    # The trained history: steps 1..start from the first run, start+1..end from the second.
    history = {s: r for s, r in first.rows_by_step().items() if s <= start} | resumed
    counts = Counter(r for rows in history.values() for r in rows)
    assert len(counts) == ROWS and set(counts.values()) == {1}, "every row exactly once"
    assert history == base_rows  # the same rows at the same steps as the uninterrupted run
    for s in range(start + 1, killed_at + 1):  # retrained once, identically
        assert sorted(first.rows_by_step()[s]) == sorted(resumed[s])
    second_loss = second.losses()
    for s in range(start + 1, STEPS + 1):
        assert second_loss[s] == pytest.approx(base_loss[s], abs=1e-5), s
    assert storage.exists(s3.uri("runs/killed/final/kubedpo_summary.json"))


def test_sigkill_then_resume_with_another_number_of_ranks_2_1_2(s3, s3_task, tmp_path: Path) -> None:
    """2 ranks x batch 4, SIGKILLed; resumed on 1 rank x batch 4 x accumulation 2 (the same global
    batch of 8), SIGKILLed; finished on 2 ranks again. The trained history has every row exactly
    once and the same rows at the same steps as an uninterrupted 2-rank run, and every step's
    loss equals that run's within 1e-5 absolute (DDP's all-reduce and accumulation could add the
    same gradients in another order; measured: identical at the log's 6 decimals)."""
    env = s3.env()
    base = Launch(_cfg(s3_task, s3, "base212"), tmp_path / "base", env)
    assert base.wait() == 0, base.stderr()
    base_rows, base_loss = base.rows_by_step(), base.losses()

    runs = [Launch(_cfg(s3_task, s3, "w212"), tmp_path / "a", env)]
    runs[0].wait_for_step(15)
    runs[0].kill()
    runs.append(Launch(_cfg(s3_task, s3, "w212", gradientAccumulationSteps=2), tmp_path / "b", env, world=1))
    runs[1].wait_for_step(25)
    runs[1].kill()
    runs.append(Launch(_cfg(s3_task, s3, "w212"), tmp_path / "c", env))
    assert runs[2].wait() == 0, runs[2].stderr()
    history: dict[int, list[str]] = {}
    losses: dict[int, float] = {}
    for run, nxt in zip(runs, [*runs[1:], None], strict=True):
        until = min(nxt.rows_by_step()) - 1 if nxt is not None else STEPS
        history |= {s: r for s, r in run.rows_by_step().items() if s <= until}
        losses |= {s: v for s, v in run.losses().items() if s <= until}
    assert "resumed from" in runs[1].full_log() and "resumed from" in runs[2].full_log()
    assert min(runs[1].rows_by_step()) > 1 and min(runs[2].rows_by_step()) > min(runs[1].rows_by_step())
    counts = Counter(r for rows in history.values() for r in rows)
    assert len(counts) == ROWS and set(counts.values()) == {1}, "every row exactly once"
    assert {s: sorted(r) for s, r in history.items()} == {s: sorted(r) for s, r in base_rows.items()}
    assert sorted(losses) == list(range(1, STEPS + 1))
    for s in losses:
        assert losses[s] == pytest.approx(base_loss[s], abs=1e-5), s


def test_changed_global_batch_is_refused_at_resume(s3, s3_task, tmp_path: Path) -> None:
    env = s3.env()
    cfg = _cfg(s3_task, s3, "gb", maxSteps=10)
    cfg["checkpoint"]["everySteps"] = 5
    assert Launch(cfg, tmp_path / "a", env).wait() == 0
    cfg["training"]["maxSteps"] = 12
    run = Launch(cfg, tmp_path / "b", env, world=1)  # 1 x 4 x 1 != 2 x 4 x 1
    assert run.wait() == 2, run.stderr()
    assert "exact resume needs the same global batch size" in run.full_log()


def test_sigterm_checkpoints_exits_75_and_restart_continues(s3, s3_task, tmp_path: Path) -> None:
    env = s3.env()
    cfg = _cfg(s3_task, s3, "preempt", maxSteps=30)
    cfg["checkpoint"]["everySteps"] = 1000  # only the preemption checkpoint
    run = Launch(cfg, tmp_path / "a", env)
    run.wait_for_step(5)
    os.kill(run.proc.pid, signal.SIGTERM)  # the kubelet signals the pod's PID 1: our launcher
    assert run.wait() == EXIT_PREEMPTED, run.stderr()
    stopped = max(run.rows_by_step())
    from kubedpo_trainer.checkpoint import latest_complete

    assert latest_complete(s3.uri("runs/preempt/ckpt/")) == stopped
    again = Launch(cfg, tmp_path / "b", env)
    assert again.wait() == 0, again.stderr()
    assert min(again.rows_by_step()) == stopped + 1 and max(again.rows_by_step()) == 30


def test_cut_off_or_damaged_checkpoint_is_never_resumed(s3, s3_task, tmp_path: Path) -> None:
    """Issue 4 (cut off: no COMPLETE) and issue 10 (damaged after COMPLETE): the restart skips
    both, with a warning naming each, and resumes from the newest checkpoint that verifies."""
    env = s3.env()
    cfg = _cfg(s3_task, s3, "cut", maxSteps=20)
    cfg["checkpoint"]["everySteps"] = 5
    cfg["checkpoint"]["keepLast"] = 5
    assert Launch(cfg, tmp_path / "a", env).wait() == 0
    client, prefix = s3.client(), "runs/cut/ckpt/"
    # Simulate a pod killed while uploading step 20: every file there but the marker.
    client.delete_object(Bucket=s3.bucket, Key=prefix + "step-000020/COMPLETE")
    client.delete_object(Bucket=s3.bucket, Key="runs/cut/final/kubedpo_summary.json")
    # Step 15: bytes flipped inside the tensor data (same size; resumed silently before manifests).
    key = prefix + "step-000015/model.safetensors"
    data = bytearray(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    data[-100:-96] = bytes(b ^ 0xFF for b in data[-100:-96])
    client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
    # Step 10: optimizer.pt deleted (failed every restart with a wrong message about FSDP before).
    client.delete_object(Bucket=s3.bucket, Key=prefix + "step-000010/optimizer.pt")
    cfg["training"]["maxSteps"] = 22
    again = Launch(cfg, tmp_path / "b", env)
    assert again.wait() == 0, again.stderr()
    log = again.full_log()
    assert "step-000005 (step 5)" in log
    assert "step-000015 fails verification, skipped: model.safetensors: SHA-256 differs" in log
    assert "step-000010 fails verification, skipped: optimizer.pt: missing" in log
    assert min(again.rows_by_step()) == 6


def test_s3_faults_during_reads_and_checkpoint_uploads(s3, s3_task, fault_proxy, tmp_path: Path) -> None:
    """Connections dropped mid-body on data reads, 500/503 on reads and on checkpoint PUTs:
    the run completes, every row is trained exactly once, and the retries are counted."""
    fault_proxy.drop_after(2000, count=3, methods=("GET",), path_contains="/data/train/")
    fault_proxy.status(503, count=2, methods=("GET",), path_contains="/data/train/")
    fault_proxy.status(500, count=3, methods=("PUT",), path_contains="/ckpt/")
    fault_proxy.drop_request(count=1, methods=("PUT",), path_contains="/ckpt/")
    cfg = _cfg(s3_task, s3, "faulty", endpoint=fault_proxy.endpoint)
    run = Launch(cfg, tmp_path / "a", s3.env())
    assert run.wait() == 0, run.stderr()
    counts = Counter(r for rows in run.rows_by_step().values() for r in rows)
    assert len(counts) == ROWS and set(counts.values()) == {1}
    assert fault_proxy.pending() == 0, "every programmed fault was hit"
    summary = json.loads(storage.read_bytes(s3.uri("runs/faulty/final/kubedpo_summary.json")))
    assert summary["storage"]["s3_retries"] >= 9
    from kubedpo_trainer.checkpoint import complete_steps

    assert complete_steps(s3.uri("runs/faulty/ckpt/")) == [30, 40]


@pytest.mark.parametrize(
    ("case", "expect_code"),
    [("missing_bucket", 2), ("empty_prefix", 2), ("wrong_secret", 2), ("corrupt_shard", 2)],
)
def test_bad_s3_input_exits_clearly_without_leaking_secrets(s3, s3_task, tmp_path: Path, case: str,
                                                            expect_code: int) -> None:
    env = s3.env()
    cfg = _cfg(s3_task, s3, case)
    cfg["checkpoint"] = {}
    named = cfg["data"]["train"]
    if case == "missing_bucket":
        named = cfg["data"]["train"] = "s3://no-such-bucket-kubedpo/train/"
    elif case == "empty_prefix":
        named = cfg["data"]["train"] = s3.uri("nothing/here/")
    elif case == "wrong_secret":
        env = {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value-123"}
        named = cfg["model"]["uri"]
    elif case == "corrupt_shard":
        storage.write_bytes(s3.uri("bad/part-0.jsonl.gz"), b"\x1f\x8b\x08\x00 definitely not gzip")
        named = cfg["data"]["train"] = s3.uri("bad/part-0.jsonl.gz")
    run = Launch(cfg, tmp_path / "a", env)
    assert run.wait() == expect_code, run.stderr()
    log = run.full_log()
    assert named.rstrip("/") in log
    assert "wrong-secret-value-123" not in log and env["AWS_SECRET_ACCESS_KEY"] not in log.replace(
        "wrong-secret-value-123", "")


def _sigterm_and_time(run: Launch) -> tuple[int, float]:
    t0 = time.monotonic()
    os.kill(run.proc.pid, signal.SIGTERM)  # the kubelet signals the pod's PID 1: our launcher
    code = run.wait(timeout=120)
    return code, time.monotonic() - t0


def _wait_until(cond, what: str, run: Launch, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert run.proc.poll() is None, run.stderr()
        assert time.monotonic() < deadline, f"never {what}:\n{run.stderr()}"
        time.sleep(0.05)


GRACE = 10.0


def test_sigterm_during_model_download_exits_75_within_grace(s3, s3_task, fault_proxy, tmp_path: Path) -> None:
    """Issue 10: a SIGTERM before the loop (here: the model's weights hang mid-download) is a
    preemption, exit 75 with a log line, not a crash counted against maxRestarts."""
    fault_proxy.stall_after(1000, count=20, path_contains="/models/tiny/model.safetensors")
    cfg = _cfg(s3_task, s3, "early", endpoint=fault_proxy.endpoint)
    cfg["checkpoint"]["preemptionGraceSeconds"] = GRACE
    run = Launch(cfg, tmp_path / "a", s3.env())
    _wait_until(lambda: fault_proxy.injected["stall_after"] >= 1, "stalled the model download", run)
    code, took = _sigterm_and_time(run)
    assert code == EXIT_PREEMPTED, run.stderr()
    assert took < GRACE, f"exited {took:.1f}s after SIGTERM, grace {GRACE}s"
    assert "before training started" in run.stderr()


def test_sigterm_with_a_stalled_data_read_exits_75_within_grace(s3, s3_task, fault_proxy, tmp_path: Path) -> None:
    """Issue 10: the step cannot finish while a data read hangs; the stop still ends the process
    with exit 75 inside preemptionGraceSeconds (without a checkpoint: the last complete one stays)."""
    cfg = _cfg(s3_task, s3, "stalled", endpoint=fault_proxy.endpoint)
    cfg["checkpoint"]["preemptionGraceSeconds"] = GRACE
    run = Launch(cfg, tmp_path / "a", s3.env())
    run.wait_for_step(2)
    fault_proxy.stall_after(0, count=1000, path_contains="/data/train/")
    _wait_until(lambda: fault_proxy.injected["stall_after"] >= 1, "stalled a data read", run)
    # Buffered rows may carry the loop a few steps further: signal once it is really stuck.
    last, since = run.steps_done(), time.monotonic()
    while time.monotonic() - since < 3.0:
        assert run.proc.poll() is None, run.stderr()
        if run.steps_done() != last:
            last, since = run.steps_done(), time.monotonic()
        time.sleep(0.1)
    code, took = _sigterm_and_time(run)
    assert code == EXIT_PREEMPTED, run.stderr()
    assert took < GRACE, f"exited {took:.1f}s after SIGTERM, grace {GRACE}s"
