"""Task generate with the real trainer process on the tiny model: the rows it writes, the same
bytes from 1 rank on a local folder and 2 ranks on SeaweedFS, resume without recompute after
SIGKILL, exit 75 on SIGTERM, bad prompt rows named by file:line.

Every run is a real `kubedpo-trainer` process (CPU; 2 ranks through the launcher, gloo).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedpo_trainer import storage
from kubedpo_trainer.errors import EXIT_CONFIG, EXIT_PREEMPTED
from kubedpo_trainer.generate.rows import prompt_id
from kubedpo_trainer.tiny import write_preference_task
from tests.support.runs import free_port, run_trainer

pytestmark = pytest.mark.slow


def gen_config(model: str, train: str, out: str, eval_uri: str | None = None, **generate: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"train": train, "maxPromptLength": 48}
    if eval_uri:
        data.update(eval=eval_uri, evalMaxRows=6)
    return {"task": "generate", "model": {"uri": model}, "data": data, "output": {"uri": out},
            "metrics": {"port": 0},
            "generate": {"samplesPerPrompt": 3, "heldOutSamples": 2, "maxNewTokens": 6, "batchSize": 4,
                         "promptsPerShard": 8, "maxPrompts": 20, "seed": 5, **generate}}


def parts(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.jsonl"))}


def test_rows_k_responses_held_out_summary_and_result(tiny, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    out = tmp_path / "gen"
    run = run_trainer(gen_config(str(tiny.model_dir), tiny.train_uri, str(out), tiny.eval_uri), tmp_path,
                      env={"KUBEDPO_RESULT_FILE": str(result)})
    assert run.returncode == 0, run.stderr[-3000:]
    train = parts(out / "train")
    assert list(train) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]  # 8 + 8 + 4 prompts
    rows = [json.loads(x) for data in train.values() for x in data.decode().splitlines()]
    source_rows = (Path(tiny.train_uri) / "part-00000.jsonl").read_text().splitlines()
    assert len(rows) == 20
    for i, r in enumerate(rows):  # file order: the first 20 rows of the first shard
        assert set(r) == {"id", "prompt", "responses", "source"}
        assert r["source"] == f"{tiny.train_uri}/part-00000.jsonl:{i + 1}"
        assert r["prompt"] == json.loads(source_rows[i])["prompt"] and r["id"] == prompt_id(r["prompt"])
        assert len(r["responses"]) == 3 and all(isinstance(x, str) and "</s>" not in x for x in r["responses"])
    assert len({x for r in rows for x in r["responses"]}) > 20  # sampled (temperature 1), not one answer repeated
    held = [json.loads(x) for x in (out / "heldout" / "part-00000.jsonl").read_text().splitlines()]
    assert len(held) == 6 and all(len(r["responses"]) == 2 for r in held)
    summary = json.loads((out / "kubedpo_generate_summary.json").read_text())
    got = json.loads(result.read_text())
    assert got == {"prompts": 20, "heldOutPrompts": 6, "responses": 60, "tokens": summary["tokens"],
                   "tokensPerSecond": pytest.approx(summary["tokensPerSecond"], rel=1e-3)}
    assert 0 < summary["tokens"] <= (20 * 3 + 6 * 2) * 6
    assert summary["unitsWritten"] == 4 and summary["unitsSkipped"] == 0
    assert summary["emptyResponses"] == sum(x == "" for r in rows + held for x in r["responses"])


def test_chat_prompts_rendered_with_the_template_and_greedy_repeats(tiny, tmp_path: Path) -> None:
    """Conversational prompts go through the chat template (generation prompt added); responses
    hold no template tokens. Temperature 0 is greedy: the K responses of a prompt are equal.
    Under training.precision bf16-mixed (bf16 autocast; not run on a GPU here)."""
    train, _ = write_preference_task(tmp_path / "conv", 4, 1, fmt="conversational", shards=1)
    out = tmp_path / "gen"
    cfg = gen_config(str(tiny.model_dir), train, str(out), temperature=0, maxPrompts=4)
    cfg["training"] = {"precision": "bf16-mixed"}  # bf16 autocast, as on a GPU (CPU autocast here)
    run = run_trainer(cfg, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "precision bf16-mixed" in run.stderr
    rows = [json.loads(x) for x in (out / "train" / "part-00000.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and isinstance(rows[0]["prompt"], list)
    for r in rows:
        assert len(set(r["responses"])) == 1 and len(r["responses"]) == 3
        assert not any(t in r["responses"][0] for t in ("<|assistant|>", "<|user|>", "</s>", "<s>"))


@pytest.mark.multiproc
def test_one_rank_local_equals_two_ranks_on_s3(s3, tiny, tmp_path: Path) -> None:
    """Same data and spec: 1 rank writing a local folder and 2 ranks writing SeaweedFS produce the
    same parts byte for byte but for the `source` prefix (units and their seeds do not depend on
    the ranks)."""
    storage.upload_dir(tiny.model_dir, s3.uri("model/"))
    storage.upload_dir(tiny.train_uri, s3.uri("data/train/"))
    storage.upload_dir(tiny.eval_uri, s3.uri("data/eval/"))
    local = run_trainer(gen_config(str(tiny.model_dir), tiny.train_uri, str(tmp_path / "one"), tiny.eval_uri),
                        tmp_path / "run1")
    assert local.returncode == 0, local.stderr[-3000:]
    cfg = gen_config(s3.uri("model/"), s3.uri("data/train/"), s3.uri("gen/"), s3.uri("data/eval/"))
    cfg["s3"] = {"endpointUrl": s3.endpoint}
    two = run_trainer(cfg, tmp_path / "run2", nproc=2, env={**s3.env(), "KUBEDPO_CACHE_DIR": str(tmp_path / "c")})
    assert two.returncode == 0, two.stderr[-3000:]
    for split, local_data, s3_data in (("train", tiny.train_uri, s3.uri("data/train")),
                                       ("heldout", tiny.eval_uri, s3.uri("data/eval"))):
        mine = parts(tmp_path / "one" / split)
        theirs = {u.rsplit("/", 1)[-1]: storage.read_bytes(u).replace(s3_data.encode(), local_data.encode())
                  for u in (o.uri for o in storage.list_objects(s3.uri(f"gen/{split}/")))}
        assert mine and mine == theirs, split  # byte for byte, once the sources' prefixes are swapped
    assert json.loads(storage.read_bytes(s3.uri("gen/kubedpo_generate_summary.json")))["ranks"] == 2


class Proc:
    """One generate pod (one rank, or the launcher and `nproc` ranks) that the test can kill."""

    def __init__(self, cfg: dict[str, Any], work: Path, nproc: int | None = None) -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.yaml").write_text(yaml.safe_dump(cfg))
        self.log = work / "stderr.log"
        launch = ["--nproc-per-node", str(nproc), "--master-port", str(free_port())] if nproc else []
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(work / "config.yaml"), *launch],
                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=f, stderr=f, start_new_session=True)

    def wait_for_parts(self, folder: Path, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(list(folder.glob("part-*.jsonl"))) < n:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.01)

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout=timeout)


SLOW = {"maxPrompts": 48, "promptsPerShard": 4, "batchSize": 2, "samplesPerPrompt": 4, "maxNewTokens": 24}


def test_sigkill_then_restart_recomputes_only_unfinished_units(tiny, tmp_path: Path) -> None:
    """12 units; SIGKILL once 3 parts exist; the restart skips exactly the parts that were written
    (untouched) and writes the rest, and the final parts equal an uninterrupted run's."""
    cfg = gen_config(str(tiny.model_dir), tiny.train_uri, str(tmp_path / "gen"), **SLOW)
    first = Proc(cfg, tmp_path / "first")
    first.wait_for_parts(tmp_path / "gen" / "train", 3)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gen" / "train").glob("part-*.jsonl")}
    assert 3 <= len(kept) < 12
    assert not list((tmp_path / "gen").glob("kubedpo_generate_summary.json"))
    second = run_trainer(cfg, tmp_path / "second")
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((tmp_path / "gen" / "kubedpo_generate_summary.json").read_text())
    assert (summary["unitsSkipped"], summary["unitsWritten"]) == (len(kept), 12 - len(kept))
    assert summary["prompts"] == 48 and summary["responses"] == 48 * 4
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gen" / "train").glob("part-*.jsonl")
            if p.name in kept} == kept  # never rewritten
    whole = run_trainer(gen_config(str(tiny.model_dir), tiny.train_uri, str(tmp_path / "whole"), **SLOW),
                        tmp_path / "third")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert parts(tmp_path / "gen" / "train") == parts(tmp_path / "whole" / "train")

    # The same output with another spec: refused, naming what changed, nothing rewritten.
    other = run_trainer(gen_config(str(tiny.model_dir), tiny.train_uri, str(tmp_path / "gen"),
                                   **{**SLOW, "temperature": 0.5}), tmp_path / "fourth")
    assert other.returncode == EXIT_CONFIG, other.stderr[-3000:]
    assert "holds generations of another spec (generate.temperature: 1.0 -> 0.5)" in other.stderr


@pytest.mark.parametrize("nproc", [None, pytest.param(2, marks=pytest.mark.multiproc)], ids=["1-rank", "2-ranks"])
def test_sigterm_exits_75_keeping_finished_parts(tiny, tmp_path: Path, nproc: int | None) -> None:
    """SIGTERM to the pod's process (2 ranks: the launcher, which forwards it): every rank abandons
    its unit between two generate calls, the ranks agree at the round's all-reduce, exit 75."""
    cfg = gen_config(str(tiny.model_dir), tiny.train_uri, str(tmp_path / "gen"), **SLOW)
    run = Proc(cfg, tmp_path / "run", nproc)
    run.wait_for_parts(tmp_path / "gen" / "train", 2)
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == EXIT_PREEMPTED, run.log.read_text()[-3000:]
    assert time.monotonic() - t0 < 20  # inside the default 25 s grace period
    log = run.log.read_text()
    assert "stopped on SIGTERM" in log
    written = list((tmp_path / "gen" / "train").glob("part-*.jsonl"))
    assert 2 <= len(written) < 12 and not list((tmp_path / "gen" / "train").glob("*.tmp"))


def test_bad_prompt_rows_named_or_skipped_and_counted(tiny, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"prompt": f"Words: cat {i}. Answer:"}) for i in range(6)]
    lines[3] = json.dumps({"question": "no prompt"})  # line 4
    (data / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    cfg = gen_config(str(tiny.model_dir), str(data), str(tmp_path / "gen"), maxPrompts=6)
    run = run_trainer(cfg, tmp_path / "fail")
    assert run.returncode == EXIT_CONFIG, run.stderr[-2000:]
    assert f"{data}/part-0.jsonl:4: missing field 'prompt'" in run.stderr
    cfg["data"]["onBadRecord"] = "skip"
    run = run_trainer(cfg, tmp_path / "skip")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "gen" / "train" / "part-00000.jsonl").read_text().splitlines()]
    assert [r["source"].rsplit(":", 1)[1] for r in rows] == ["1", "2", "3", "5", "6"]
    summary = json.loads((tmp_path / "gen" / "kubedpo_generate_summary.json").read_text())
    assert summary["badRecords"] == 1 and summary["prompts"] == 5
