"""The real trainer process on the tiny task: it learns, it is DDP-exact, it fails cleanly.

Every run here is a real `kubedpo-trainer` subprocess (CPU, gloo for 2 ranks) on the locally
built tiny Llama; nothing is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubedpo_trainer.errors import EXIT_CONFIG
from tests.support.runs import run_trainer, tiny_config

pytestmark = pytest.mark.slow


def test_held_out_reward_accuracy_rises(tiny, tmp_path: Path) -> None:
    """Step 0: policy == reference, every implicit reward is 0, so no pair is ranked right.

    (TRL counts a tie as wrong, hence 0.0 rather than a coin-flip 0.5; the margin is exactly 0.)
    After ~150 steps the held-out accuracy must be >= 0.9.
    """
    cfg = tiny_config(tiny, tmp_path, training={"maxSteps": 150, "batchSize": 16, "evalOnStart": True,
                                                "loggingSteps": 25})
    run = run_trainer(cfg, tmp_path, env={"KUBEDPO_RESULT_FILE": str(tmp_path / "result.json")})
    assert run.returncode == 0, run.stderr[-3000:]
    s = run.summary()
    # The task result (the operator's termination message): the final step's numbers.
    assert json.loads((tmp_path / "result.json").read_text()) == {
        "step": 150, "loss": pytest.approx(s["train"]["loss"]), "outputUri": str(tmp_path / "output"),
        "evalRewardAccuracy": pytest.approx(s["eval"]["eval_rewards_accuracies"])}
    assert s["eval_at_start"]["eval_rewards_accuracies"] <= 0.5
    assert abs(s["eval_at_start"]["eval_rewards_margins"]) < 1e-6
    assert s["eval"]["eval_rewards_accuracies"] >= 0.9, s["eval"]
    assert s["eval"]["eval_rewards_margins"] > 0.1
    assert s["eval"]["eval_loss"] < s["eval_at_start"]["eval_loss"]
    out = tmp_path / "output"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@pytest.mark.multiproc
def test_two_ranks_match_one_rank_with_same_global_batch(tiny, tmp_path: Path) -> None:
    """2 ranks x 4 pairs == 1 rank x 8 pairs: same rows per step (no shuffle buffer), DDP averages
    gradients, so the loss at every step agrees to float32 round-off (tolerance 1e-4: padding to
    different lengths changes reduction order, nothing else)."""
    common = {"data": {"shuffleBuffer": 1}, "training": {"maxSteps": 6, "lrScheduler": "constant"}}
    one = run_trainer(tiny_config(tiny, tmp_path / "one", data=common["data"],
                                  training={**common["training"], "batchSize": 8}), tmp_path / "one")
    two = run_trainer(tiny_config(tiny, tmp_path / "two", data=common["data"],
                                  training={**common["training"], "batchSize": 4}), tmp_path / "two",
                      nproc=2, torchrun=True)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = [r["loss"] for r in one.train_logs()]
    l2 = [r["loss"] for r in two.train_logs()]
    assert len(l1) == len(l2) == 6
    assert l1[-1] < l1[0]  # it trained, so the comparison is not between constants
    for a, b in zip(l1, l2, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    # logits/* are TRL's global token means, not a mean of the two ranks' means (which differ
    # whenever the ranks hold different numbers of response tokens).
    for key in ("logits_chosen", "logits_rejected"):
        assert [r[key] for r in two.train_logs()] == pytest.approx([r[key] for r in one.train_logs()], abs=1e-4)
        assert two.summary()["eval"][f"eval_{key}"] == pytest.approx(one.summary()["eval"][f"eval_{key}"], abs=1e-4)
    # tokens/s for the whole job (status.progress.tokensPerSecond): the same rows per step, so the
    # job's token count at every step equals the single rank's, and its rate is that count over
    # the time rank 0 measured (elapsed = step / steps_per_second); rank 0's own rate is lower.
    assert [r["job_tokens"] for r in two.train_logs()] == [r["job_tokens"] for r in one.train_logs()]
    for r in (*one.train_logs(), *two.train_logs()):
        assert r["job_tokens_per_second"] == pytest.approx(r["job_tokens"] * r["steps_per_second"] / r["step"])
    assert all(r["job_tokens_per_second"] == r["tokens_per_second"] for r in one.train_logs())
    assert all(r["job_tokens_per_second"] > 1.2 * r["tokens_per_second"] for r in two.train_logs())


def test_malformed_row_fails_with_file_and_line(tiny, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = [json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})] * 20
    rows[6] = '{"prompt": "p", "chosen": "a"'  # line 7: cut off
    (bad / "part-0.jsonl").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(tiny, tmp_path, data={"train": str(bad), "eval": None, "shuffleBuffer": 1},
                      training={"batchSize": 2, "maxSteps": 5})
    cfg["data"].pop("eval")
    run = run_trainer(cfg, tmp_path)
    assert run.returncode == EXIT_CONFIG, run.stderr[-2000:]
    assert "part-0.jsonl:7" in run.stderr


def test_bad_rows_skipped_and_counted_under_skip_policy(tiny, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = [json.dumps({"prompt": f"Words: cat dog {i}.", "chosen": " animal", "rejected": " color"})
            for i in range(30)]
    good[3] = '{"prompt": "p", "chosen": 5, "rejected": "x"}'  # ill-typed
    good[11] = "not json"
    (data / "part-0.jsonl").write_text("\n".join(good) + "\n")
    cfg = tiny_config(tiny, tmp_path, data={"train": str(data), "onBadRecord": "skip", "shuffleBuffer": 1,
                                            "maxPromptLength": 4},
                      training={"batchSize": 4, "maxSteps": 3})
    cfg["data"].pop("eval")
    run = run_trainer(cfg, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    totals = run.summary()["data"]
    assert totals["bad_records"] == 2
    assert totals["truncated_prompts"] > 0  # prompts are longer than 4 tokens: cut, and counted
    # The global order's positions are fixed (rank-independent, resumable): a bad row inside a
    # batch is dropped, not replaced by a later one, so 3 steps x 4 positions = good rows + bad rows.
    assert totals["rows"] + totals["bad_records"] == 12


def test_lora_run_exports_only_the_adapter(tiny, tmp_path: Path) -> None:
    cfg = tiny_config(tiny, tmp_path, model={"lora": {"rank": 4, "alpha": 8, "mergeOnExport": True}},
                      training={"maxSteps": 3})
    run = run_trainer(cfg, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "output"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert run.summary()["step"] == 3


def test_precomputed_reference_trains_like_live(tiny, tmp_path: Path) -> None:
    """referenceLogps: precompute gives the live run's losses (same numbers, looked up) and
    still evaluates after the reference model was freed."""
    runs = {}
    for mode in ("live", "precompute"):
        cfg = tiny_config(tiny, tmp_path / mode, training={"maxSteps": 5, "referenceLogps": mode})
        runs[mode] = run_trainer(cfg, tmp_path / mode)
        assert runs[mode].returncode == 0, runs[mode].stderr[-3000:]
    live = [r["loss"] for r in runs["live"].train_logs()]
    pre = [r["loss"] for r in runs["precompute"].train_logs()]
    assert live == pytest.approx(pre, abs=1e-5) and live[-1] < live[0]
    assert "precomputed reference log-probs for 2304 rows" in runs["precompute"].stderr
    assert runs["precompute"].summary()["eval"]["eval_loss"] == pytest.approx(
        runs["live"].summary()["eval"]["eval_loss"], abs=1e-5)


def test_gradient_accumulation_matches_the_bigger_batch(tiny, tmp_path: Path) -> None:
    """batchSize 4 x gradientAccumulationSteps 2 == batchSize 8: same rows per optimizer step,
    same averaged gradient, so the same loss at every step (1e-4, reduction order)."""
    losses = {}
    for name, tr in {"big": {"batchSize": 8}, "accum": {"batchSize": 4, "gradientAccumulationSteps": 2}}.items():
        cfg = tiny_config(tiny, tmp_path / name, data={"shuffleBuffer": 1}, training={"maxSteps": 5, **tr})
        run = run_trainer(cfg, tmp_path / name)
        assert run.returncode == 0, run.stderr[-3000:]
        losses[name] = [r["loss"] for r in run.train_logs()]
    assert len(losses["big"]) == 5 and len(set(losses["big"])) == 5  # weights moved: not a constant
    assert losses["big"] == pytest.approx(losses["accum"], abs=1e-4)
