"""Task judge end to end against the real HTTP test judge: pairs, rationales, counts, cache, faults.

Requests are counted at the judge server, so "never pays twice" is measured where the cost is.
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

from kubedpo_trainer.errors import ConfigError
from kubedpo_trainer.judge.cache import FLUSH_EVERY
from kubedpo_trainer.judge.client import Backoff
from kubedpo_trainer.judge.llm_judge import LLMJudge
from kubedpo_trainer.judge.task import JudgeTask
from kubedpo_trainer.result import read_result
from kubedpo_trainer.signals import StopRequest
from kubedpo_trainer.stage_config import RESULT_FILE_ENV
from kubedpo_trainer.tiny_judge import TinyJudge, first_category, right_category
from tests.judge.conftest import judge_config, llm, parse
from tests.support.judge_server import read_jsonl, tiny_generations, write_generations

REPO = Path(__file__).parents[2]
FAST = Backoff(initial=0.01, maximum=0.05, jitter=0.0)
# Unique judge requests per prompt of the fixture (responses right, wrong, none, right):
# pairwise both orders, identical texts never asked, identical requests asked once: 3 pairs x 2.
PAIRWISE_PER_PROMPT = 6


def run_task(cfg: dict[str, Any]) -> tuple[JudgeTask, dict[str, Any]]:
    c = parse(cfg)
    task = JudgeTask(c, StopRequest(), judge=LLMJudge(c.judge, FAST) if c.judge and c.judge.kind == "llm" else None)
    return task, task.run()


def test_pairwise_judge_writes_pairs_rationales_summary_and_result(
        judge_server: TinyJudge, generations: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RESULT_FILE_ENV, str(tmp_path / "result.json"))
    out = str(tmp_path / "out")
    cfg = judge_config(out, {"kind": "llm", "llm": llm(judge_server.url), "generations": generations["gen"],
                             "compare": {"vsBase": [generations["gen"], generations["base"]]}})
    task, result = run_task(cfg)
    pairs = read_jsonl(f"{out}/pairs/part-00000.jsonl") + read_jsonl(f"{out}/pairs/part-00001.jsonl")
    assert len(pairs) == 12  # one per prompt (bestVsWorst)
    for p in pairs:
        assert first_category(p["chosen"]) == right_category(p["prompt"])  # the right answer is chosen
        # Copeland: wrong and none both lose to the two right answers (-2); the first of them is the worst
        assert first_category(p["rejected"]) not in (None, right_category(p["prompt"]))
        assert p["margin"] == 4.0 and len(p["id"]) == 16
    rationales = read_jsonl(f"{out}/rationales/part-00000.jsonl")
    assert rationales[0]["chosen"] == 0 and rationales[0]["rejected"] == 1
    assert rationales[0]["scores"] == [2.0, -2.0, -2.0, 2.0] and "[[A]]" in rationales[0]["rationale"]
    # win rate: candidate right on 6 prompts, baseline right on 2 -> 4 wins, 2 ties
    assert result["winRates"] == {"vsBase": pytest.approx((4 + 0.5 * 2) / 6)}
    unit_requests = 12 * PAIRWISE_PER_PROMPT
    # compare: identical answers are a tie without asking, the other 4 in both orders; those (right
    # vs wrong of the same prompts) were already asked while ranking, so they come from the cache
    assert judge_server.requests == unit_requests
    assert result == read_result(tmp_path / "result.json")
    assert result | {"winRates": None} == {
        "prompts": 12, "pairs": 12, "ties": 24, "unparseable": 0, "refusals": 0, "inconsistent": 0,
        "requests": unit_requests, "cacheHits": 8, "errors": {}, "emptyResponses": 0, "winRates": None}
    summary = json.loads(Path(out, "kubedpo_judge_summary.json").read_text())
    assert summary["compare"]["vsBase"]["wins"] == 4 and summary["compare"]["vsBase"]["ties"] == 2
    # per prompt: (0,3) identical and (1,2) both wrong are ties, the other 4 preferences
    assert summary["verdicts"] == {"pair": 12 * 4, "tie": 12 * 2}
    m = task.metrics.registry.get_sample_value
    labels = {"dpojob": "local", "namespace": "", "rank": "0"}
    assert m("kubedpo_step", labels) == 12 and m("kubedpo_total_steps", labels) == 12
    assert m("kubedpo_judge_pairs_total", labels) == 12
    assert m("kubedpo_judge_requests_total", labels | {"outcome": "ok"}) == unit_requests
    assert m("kubedpo_judge_cache_hits_total", labels) == 8
    assert m("kubedpo_judge_verdicts_total", labels | {"verdict": "tie"}) == 24 + 2  # + compare's ties
    assert m("kubedpo_tokens_per_second", labels) > 0
    assert m("kubedpo_job_tokens_per_second", labels) == m("kubedpo_tokens_per_second", labels)  # one rank


def test_pointwise_all_above_margin(judge_server: TinyJudge, generations: dict[str, Any], tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    cfg = judge_config(out, {"kind": "llm", "llm": llm(judge_server.url, mode="pointwise"),
                             "generations": generations["gen"],
                             "pairs": {"strategy": "allAboveMargin", "minMargin": 2.0}})
    _, result = run_task(cfg)
    pairs = read_jsonl(f"{out}/pairs/part-00000.jsonl")
    # scores 10, 3, 1, 10: margins above 2 -> (0,1), (0,2), (3,1), (3,2); (1,2) differs by exactly 2
    assert sorted(p["margin"] for p in pairs) == [7.0] * 12 + [9.0] * 12
    assert result["pairs"] == 12 * 4 and result["ties"] == 12  # the two right answers tie
    assert judge_server.requests == 12 * 3  # the repeated right answer is asked once


def test_rerun_and_restart_never_pay_twice(judge_server: TinyJudge, generations: dict[str, Any],
                                           tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    cfg = judge_config(out, {"kind": "llm", "llm": llm(judge_server.url), "generations": generations["gen"],
                             "compare": {"vsBase": [generations["gen"], generations["base"]]}})
    _, first = run_task(cfg)
    paid = judge_server.requests
    _, again = run_task(cfg)  # finished units are skipped; compare comes from the cache
    assert judge_server.requests == paid
    assert again["winRates"] == first["winRates"] and again["pairs"] == first["pairs"]
    for part in Path(out, "pairs").iterdir():  # a unit lost (e.g. output deleted): judged again, from the cache
        part.unlink()
    _, third = run_task(cfg)
    assert judge_server.requests == paid
    assert third["cacheHits"] == 12 * PAIRWISE_PER_PROMPT + 8 and third["requests"] == 0
    # another output with the same judge config and cache: also free
    cfg2 = judge_config(str(tmp_path / "out2"), {**cfg["judge"], "cacheUri": f"{out}/judge-cache"})
    run_task(cfg2)
    assert judge_server.requests == paid
    # a different judge config (system prompt) is a different cache: it pays
    cfg3 = judge_config(str(tmp_path / "out3"), {**cfg["judge"], "cacheUri": f"{out}/judge-cache",
                                                   "llm": llm(judge_server.url, systemPrompt="Be terse.")})
    run_task(cfg3)
    assert judge_server.requests == 2 * paid


def test_unparseable_refusals_and_position_bias_are_counted_never_paired(tmp_path: Path) -> None:
    rows = tiny_generations(4, seed=5, pattern=("right", "wrong", "none"))
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows])
    with TinyJudge(bias="A") as judge:  # says [[A]] where it should say [[tie]]
        judge.fail("nonsense", 2)
        judge.fail("refuse", 1)
        out = str(tmp_path / "out")
        _, result = run_task(judge_config(out, {"kind": "llm", "llm": llm(judge.url, concurrency=1),
                                                "generations": gen}))
    # per prompt: (right, wrong) and (right, none) are decided; (wrong, none) is a tie -> biased -> inconsistent
    # concurrency 1: requests arrive in order. Row 0: (0,1) both orders nonsense -> unparseable, (0,2)
    # first order refused -> refusal, (1,2) biased -> inconsistent: no decided comparison, no pair.
    # Rows 1-3: right beats wrong and none, (wrong, none) inconsistent -> one pair each.
    assert (result["unparseable"], result["refusals"], result["inconsistent"], result["ties"]) == (1, 1, 4, 0)
    pairs = read_jsonl(f"{out}/pairs/part-00000.jsonl")
    assert result["pairs"] == len(pairs) == 3 and rows[0]["id"] not in {p["id"] for p in pairs}
    for p in pairs:
        assert first_category(p["chosen"]) == right_category(p["prompt"])


def test_custom_template_is_used_and_a_bad_one_fails_before_any_request(
        judge_server: TinyJudge, generations: dict[str, Any], tmp_path: Path) -> None:
    bad = judge_config(str(tmp_path / "bad"), {"kind": "llm", "llm": llm(judge_server.url, template="{prompt} {answer}"),
                                               "generations": generations["gen"]})
    with pytest.raises(ConfigError, match=r"judge.llm.template: unknown placeholder \{answer\}"):
        run_task(bad)
    assert judge_server.requests == 0


def cli(config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None,
        name: str = "cfg.json") -> subprocess.Popen[str]:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return subprocess.Popen([sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(path), "--log-format", "json"],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_judge_loses_at_most_the_unflushed_judgements(tmp_path: Path) -> None:
    """SIGKILL mid-unit: the restart pays again for at most FLUSH_EVERY - 1 unflushed answers plus the
    requests in flight (concurrency), never for what was flushed."""
    rows = tiny_generations(40, seed=9)
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows])
    unique = 40 * PAIRWISE_PER_PROMPT
    concurrency = 4
    with TinyJudge(delay_s=0.05) as judge:
        cfg = judge_config(str(tmp_path / "out"), {"kind": "llm", "llm": llm(judge.url, concurrency=concurrency),
                                                   "generations": gen})
        proc = cli(cfg, tmp_path)
        deadline = time.monotonic() + 120
        while judge.requests < 100 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        first = judge.requests
        assert 100 <= first < unique, "the judge was not killed mid-unit"
        proc = cli(cfg, tmp_path)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        second = judge.requests - first
    assert second >= unique - first  # what was never asked must be asked
    assert second <= unique - first + (FLUSH_EVERY - 1) + concurrency, (first, second)
    assert len(read_jsonl(tmp_path / "out" / "pairs" / "part-00000.jsonl")) == 40


@pytest.mark.slow
def test_a_judge_that_never_recovers_fails_the_task_and_keeps_what_it_paid_for(tmp_path: Path) -> None:
    rows = tiny_generations(12, seed=4)
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows[:6], rows[6:]])
    with TinyJudge() as judge:
        judge.fail("500", after=40)  # the first 40 answers arrive, then every request fails
        cfg = judge_config(str(tmp_path / "out"), {"kind": "llm", "llm": llm(judge.url, maxRetries=2, concurrency=2),
                                                   "generations": gen})
        proc = cli(cfg, tmp_path)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, output
        assert f"judge.llm.url {judge.url}: a request still failed after 2 retries; last error: 5xx: HTTP 500" in output
        assert Path(tmp_path, "out", "pairs", "part-00000.jsonl").exists()  # unit 0 (36 requests) finished
        assert not Path(tmp_path, "out", "pairs", "part-00001.jsonl").exists()
        judge.heal()
        before = judge.requests
        proc = cli(cfg, tmp_path)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        # unit 1: 36 unique requests, of which the 4 answered before the failure are cached
        assert judge.requests - before == 36 - 4


def test_cache_and_output_on_seaweedfs(s3: Any, judge_server: TinyJudge, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    rows = tiny_generations(6, seed=2)
    write_generations(s3.uri("round-1/generations"), [rows[:3], rows[3:]])
    write_generations(s3.uri("round-1/generations"), [[dict(r, responses=r["responses"][:1]) for r in rows]],
                      split="heldout")
    write_generations(s3.uri("base"), [[dict(r, responses=r["responses"][1:2]) for r in rows]], split="heldout")
    judge = {"kind": "llm", "llm": llm(judge_server.url), "generations": s3.uri("round-1/generations/"),
             "cacheUri": s3.uri("judge-cache/"), "compare": {"vsBase": [s3.uri("round-1/generations/"), s3.uri("base/")]}}
    cfg = judge_config(s3.uri("round-1/judge/"), judge, s3={"endpointUrl": s3.endpoint})
    _, result = run_task(cfg)
    assert result["pairs"] == 6 and result["winRates"] == {"vsBase": 1.0}
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert {"round-1/judge/pairs/part-00000.jsonl", "round-1/judge/rationales/part-00001.jsonl",
            "round-1/judge/kubedpo_judge_summary.json"} <= set(keys)
    assert sum(k.startswith("judge-cache/") for k in keys) == 1  # this run's segments merged into one
    paid = judge_server.requests
    cfg2 = judge_config(s3.uri("round-1/judge-again/"), judge, s3={"endpointUrl": s3.endpoint})
    _, again = run_task(cfg2)
    assert judge_server.requests == paid and again["requests"] == 0 and again["pairs"] == 6
    assert again["cacheHits"] == paid + result["cacheHits"]  # compare was served from the cache both times


@pytest.mark.slow
def test_sigterm_exits_75_and_keeps_every_answer_received(tmp_path: Path) -> None:
    """Preemption: the cache is flushed on the way out, so the restart pays only for the requests
    that were in flight (at most `concurrency`), not for the unflushed buffer."""
    rows = tiny_generations(30, seed=21)
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows])
    unique = 30 * PAIRWISE_PER_PROMPT
    with TinyJudge(delay_s=0.05) as judge:
        cfg = judge_config(str(tmp_path / "out"), {"kind": "llm", "llm": llm(judge.url, concurrency=2),
                                                   "generations": gen})
        proc = cli(cfg, tmp_path)
        deadline = time.monotonic() + 120
        while judge.requests < 41 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 75, output
        first = judge.requests
        assert first < unique
        proc = cli(cfg, tmp_path)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        second = judge.requests - first
    assert unique - first <= second <= unique - first + 2, (first, second)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_share_the_units_and_rank_0_sums_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = tiny_generations(12, seed=22)
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows[0:3], rows[3:6], rows[6:9], rows[9:12]])
    with TinyJudge() as judge:
        cfg = judge_config(str(tmp_path / "out"), {"kind": "llm", "llm": llm(judge.url), "generations": gen})
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(cfg))
        result_file = tmp_path / "result.json"
        proc = subprocess.run([sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(path), "--log-format",
                               "json", "--nproc-per-node", "2", "--master-port", "0"], cwd=REPO, text=True,
                              env={**os.environ, RESULT_FILE_ENV: str(result_file)}, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert judge.requests == 12 * PAIRWISE_PER_PROMPT
    logs = proc.stdout + proc.stderr
    assert "[rank 0]" in logs and "[rank 1]" in logs and "judge unit 1 " in logs and "judge unit 0 " in logs
    result = read_result(result_file)
    assert result is not None and result["prompts"] == 12 and result["pairs"] == 12
    assert result["requests"] == 12 * PAIRWISE_PER_PROMPT


def test_bad_generation_rows_and_compares_name_the_file_or_field(judge_server: TinyJudge, tmp_path: Path) -> None:
    from kubedpo_trainer.errors import InputError

    gen = tmp_path / "gen" / "train"
    gen.mkdir(parents=True)
    row = tiny_generations(1)[0]
    (gen / "part-00000.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "responses": "one"}) + "\n")
    cfg = judge_config(str(tmp_path / "out"), {"kind": "llm", "llm": llm(judge_server.url),
                                               "generations": str(tmp_path / "gen")})
    with pytest.raises(InputError, match=r"part-00000.jsonl:2: responses: expected a list of strings"):
        run_task(cfg)
    other = tmp_path / "other"
    write_generations(str(other), [[dict(tiny_generations(1, seed=99)[0], responses=[" x"])]], split="heldout")
    write_generations(str(tmp_path / "gen"), [[row]], split="heldout")
    cfg = judge_config(str(tmp_path / "out2"), {"kind": "llm", "llm": llm(judge_server.url),
                                                "compare": {"vsOther": [str(tmp_path / "gen"), str(other)]}})
    with pytest.raises(InputError, match=r"judge.compare.vsOther: no prompt id in both"):
        run_task(cfg)


def test_standalone_judge_process_with_control_endpoints() -> None:
    import urllib.request

    from tests.support.seaweed import free_ports

    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.judge_server", "--port", str(port),
                             "--fail", "500:1"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"url": f"http://127.0.0.1:{port}/v1"}
        base = f"http://127.0.0.1:{port}"

        def post(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        msg = {"model": "m", "messages": [{"role": "user", "content": "[User Question]\nWords: cat dog.\n\n"
               "[The Start of the Assistant's Answer]\nanimal\n[The End of the Assistant's Answer]"}]}
        assert post("/v1/chat/completions", msg)[0] == 500  # --fail 500:1
        status, body = post("/v1/chat/completions", msg)
        assert status == 200 and body["choices"][0]["message"]["content"].endswith("Rating: [[10]]")
        assert post("/control/fail", {"kind": "429", "count": 1, "retryAfter": "3"}) == (200, {"ok": True})
        assert post("/v1/chat/completions", msg)[0] == 429
        with urllib.request.urlopen(base + "/control/stats", timeout=10) as r:
            stats = json.loads(r.read())
        assert stats["requests"] == 3 and stats["byKind"] == {"500": 1, "ok": 1, "429": 1}
    finally:
        proc.terminate()
        proc.wait(10)



def test_empty_responses_are_judged_counted_and_paired_as_rejected(judge_server: TinyJudge, tmp_path: Path) -> None:
    """A policy that stops at once samples "" (seen in make demo-iterative): the judge rates it like
    any answer naming no category, so it ends up the rejected side of a pair, which DPO trains on
    (the EOS token alone) to teach the policy not to stop; the summary counts such answers."""
    rows = tiny_generations(3, seed=31, pattern=("wrong", "right", "none"))
    rows = [dict(r, responses=["", *r["responses"], "  "]) for r in rows]
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows])
    out = str(tmp_path / "out")
    for mode, requests in (("pairwise", 3 * 10 * 2), ("pointwise", 3 * 5)):
        before = judge_server.requests
        _, result = run_task(judge_config(f"{out}-{mode}", {"kind": "llm", "llm": llm(judge_server.url, mode=mode),
                                                            "generations": gen}))
        pairs = read_jsonl(f"{out}-{mode}/pairs/part-00000.jsonl")
        assert result["emptyResponses"] == 6 and len(pairs) == 3
        assert judge_server.requests - before == requests  # every pair of the 5 texts, both orders
        for p in pairs:
            assert first_category(p["chosen"]) == right_category(p["prompt"])
            assert p["rejected"] == ""  # rated like "none" (1); the first of the worst
