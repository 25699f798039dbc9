"""Task judge: generation shards -> preference pairs + rationales, then win rates, summary and result.

Units of work are the input shards under `judge.generations` + train/ (sorted); unit u belongs to
rank u % world. A finished unit is three objects, each written whole: stats/part-<u>.json (its
counts), rationales/part-<u>.jsonl, then pairs/part-<u>.jsonl LAST, so an existing pairs part
means a finished unit, and a restart skips it without reading a byte or asking the judge.
Within a unit, rows are judged in chunks (live progress; the cache flushes as answers arrive).
Rank 0 then measures `judge.compare` win rates, waits until every unit's stats exist (other
ranks' too), and writes kubedpo_judge_summary.json and the task result.

Ranks do not talk to each other (no process group): the LLM judge needs no torch at all, and a
reward model scores on each rank's own device.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from .. import storage
from ..config import TrainerConfig
from ..errors import InputError
from ..metrics import task_identity
from ..result import write_result
from ..signals import StopRequest
from ..stage_config import (
    GENERATIONS_HELDOUT,
    GENERATIONS_TRAIN,
    JUDGE_PAIRS,
    JUDGE_RATIONALES,
    JUDGE_SUMMARY,
)
from .cache import JudgementCache, fingerprint
from .judge_metrics import JudgeMetrics
from .pairs import Scored, make_pairs, win_outcome, win_rate
from .rows import GenerationRow, count_rows, jsonl, list_shards, pair_row, rationale_row, read_generations
from .tally import Tally

log = logging.getLogger(__name__)

JUDGE_STATS = "stats/"  # per-unit counts, so the summary survives restarts that skip finished units
CHUNK_ROWS = 64         # rows judged together: progress granularity, and a bound on memory per rank
WAIT_POLL_S = 2.0


class Judge(Protocol):
    kind: str
    cache: JudgementCache | None

    def fingerprint_parts(self) -> dict[str, Any]: ...
    def score(self, rows: Sequence[tuple[Any, list[str]]], tally: Tally) -> list[Scored]: ...
    def compare(self, items: Sequence[tuple[Any, str, str]], tally: Tally) -> list[str]: ...


def build_judge(cfg: TrainerConfig) -> Judge:
    assert cfg.judge is not None
    if cfg.judge.kind == "llm":
        from .llm_judge import LLMJudge

        return LLMJudge(cfg.judge)
    from .reward_judge import RewardModelJudge

    return RewardModelJudge(cfg.judge)


def part_name(u: int, suffix: str = ".jsonl") -> str:
    return f"part-{u:05d}{suffix}"


def rationale_text(scored: Scored, chosen: int, rejected: int) -> str:
    """The judge's own words behind a pair: the direct comparison when there was one, else both ratings."""
    direct = scored.notes.get((min(chosen, rejected), max(chosen, rejected)))
    if direct is not None:
        return direct
    parts = [scored.notes.get((i, i)) for i in (chosen, rejected)]
    if all(p is not None for p in parts):
        return f"[chosen {chosen}] {parts[0]}\n\n[rejected {rejected}] {parts[1]}"
    return f"scores (Copeland: wins - losses): {scored.scores}"


class JudgeTask:
    def __init__(self, cfg: TrainerConfig, stop: StopRequest, judge: Judge | None = None) -> None:
        assert cfg.judge is not None
        self.cfg, self.jc, self.stop = cfg, cfg.judge, stop
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.out = cfg.output.uri
        storage.configure(cfg.s3)
        job, namespace, attempt = task_identity()
        self.metrics = JudgeMetrics(job, namespace, self.rank)
        self.metrics.set(attempt=attempt)
        if self.rank == 0 and cfg.metrics.port:
            log.info("metrics on :%d/metrics", self.metrics.serve(cfg.metrics.port))
        self.judge = judge or build_judge(cfg)
        parts = self.judge.fingerprint_parts()
        self.cache = JudgementCache(self.jc.cache_uri or storage.join(self.out, "judge-cache"), fingerprint(parts),
                                    self.rank)
        self.judge.cache = self.cache
        self.started = time.monotonic()
        self.done_prompts = 0
        self.run_prompts = 0  # judged in this run (the rate behind the ETA)
        self.total_prompts = 0

    def uri(self, folder: str, u: int, suffix: str = ".jsonl") -> str:
        return storage.join(self.out, folder, part_name(u, suffix))

    # --- units ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.cache.load()
        try:
            shards = list_shards(storage.join(self.jc.generations, GENERATIONS_TRAIN)) if self.jc.generations else []
            mine = [u for u in range(len(shards)) if u % self.world == self.rank]
            pending = []
            for u in mine:
                if storage.exists(self.uri(JUDGE_PAIRS, u)):
                    self.done_prompts += self._unit_stats(u).prompts
                else:
                    pending.append(u)
            self.total_prompts = self.done_prompts + sum(count_rows(shards[u]) for u in pending)
            log.info("judge: %d units (%d on rank %d, %d already done), %d prompts on this rank",
                     len(shards), len(mine), self.rank, len(mine) - len(pending), self.total_prompts)
            self._progress()
            for u in pending:
                self._unit(u, shards[u])
            compare = self._compare() if self.rank == 0 and self.jc.compare else {}
            self.cache.compact()
        finally:
            self.cache.flush()
        if self.rank != 0:
            return {}
        return self._finish(len(shards), compare)

    def _unit_stats(self, u: int) -> Tally:
        try:
            return Tally.from_dict(json.loads(storage.read_bytes(self.uri(JUDGE_STATS, u, ".json"))))
        except (InputError, ValueError) as err:
            raise InputError(f"{self.uri(JUDGE_STATS, u, '.json')}: unit {u} has pairs but no readable "
                             f"stats ({err}); delete its pairs part to judge it again") from None

    def _unit(self, u: int, shard: str) -> None:
        rows = read_generations(shard)
        tally = Tally(observer=self.metrics)
        pair_rows: list[dict[str, Any]] = []
        rationale_rows: list[dict[str, Any]] = []
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start:start + CHUNK_ROWS]
            # Empty answers (a policy that stopped at once) are judged like any other: as a pair's
            # rejected side they teach the policy not to stop (DPO takes the EOS token alone).
            tally.empty += sum(1 for r in chunk for x in r.responses if not x.strip())
            scored = self.judge.score([(r.prompt, r.responses) for r in chunk], tally)
            for row, s in zip(chunk, scored, strict=True):
                self._rows_of(row, s, tally, pair_rows, rationale_rows)
            tally.prompts += len(chunk)
            self.done_prompts += len(chunk)
            self.run_prompts += len(chunk)
            self._progress()
        storage.write_bytes(self.uri(JUDGE_STATS, u, ".json"), json.dumps(tally.as_dict()).encode())
        storage.write_bytes(self.uri(JUDGE_RATIONALES, u), jsonl(rationale_rows))
        storage.write_bytes(self.uri(JUDGE_PAIRS, u), jsonl(pair_rows))  # last: the unit is done
        self.cache.flush()
        log.info("judge unit %d (%s): %d prompts -> %d pairs; verdicts %s; %d requests, %d cache hits",
                 u, shard, tally.prompts, tally.pairs, dict(tally.verdicts), tally.requests, tally.cache_hits)

    def _rows_of(self, row: GenerationRow, scored: Scored, tally: Tally, pair_rows: list[dict[str, Any]],
                 rationale_rows: list[dict[str, Any]]) -> None:
        tally.on_verdicts(scored.verdicts)
        pairs = make_pairs(scored.scores, row.responses, self.jc.pairs.strategy, self.jc.pairs.min_margin)
        for p in pairs:
            pair_rows.append(pair_row(row, p))
            rationale_rows.append(rationale_row(row, p, scored.scores, rationale_text(scored, p.chosen, p.rejected)))
        tally.on_pairs(len(pairs))

    def _progress(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.run_prompts / elapsed
        left = self.total_prompts - self.done_prompts
        tokens_per_second = self.metrics.tokens_total / elapsed
        self.metrics.set(step=self.done_prompts, total_steps=self.total_prompts,
                         eta_seconds=left / rate if rate > 0 else 0.0, tokens_per_second=tokens_per_second)
        if self.world == 1:
            self.metrics.set(job_tokens_per_second=tokens_per_second)

    # --- win rates --------------------------------------------------------------------------------

    def _heldout(self, name: str, prefix: str) -> dict[str, GenerationRow]:
        where = storage.join(prefix, GENERATIONS_HELDOUT)
        try:
            shards = list_shards(where)
        except InputError as err:
            raise InputError(f"judge.compare.{name}: {err}") from None
        return {r.id: r for s in shards for r in read_generations(s)}

    def _compare(self) -> dict[str, dict[str, Any]]:
        assert self.jc.compare is not None
        results: dict[str, dict[str, Any]] = {}
        for name, prefixes in self.jc.compare.items():
            if len(prefixes) != 2:
                raise InputError(f"judge.compare.{name}: expected [candidate prefix, baseline prefix], "
                                 f"got {len(prefixes)} entries")
            cand, base = (self._heldout(name, p) for p in prefixes)
            ids = sorted(set(cand) & set(base))
            if not ids:
                raise InputError(f"judge.compare.{name}: no prompt id in both {prefixes[0]} and {prefixes[1]} "
                                 f"(held-out responses of the same prompts are compared)")
            items = [(cand[i].prompt, c, b) for i in ids
                     for c, b in zip(cand[i].responses, base[i].responses, strict=False)]
            tally = Tally(observer=self.metrics)
            outcomes: Counter[str] = Counter()
            for start in range(0, len(items), CHUNK_ROWS):
                chunk = items[start:start + CHUNK_ROWS]
                verdicts = self.judge.compare(chunk, tally)
                tally.on_verdicts(Counter(v if v not in ("i", "j") else "pair" for v in verdicts))
                outcomes.update(win_outcome(v) for v in verdicts)
            rate = win_rate(outcomes)
            results[name] = {"winRate": rate, "wins": outcomes["win"], "losses": outcomes["loss"],
                             "ties": outcomes["tie"], "unjudged": outcomes["unjudged"], "prompts": len(ids),
                             "comparisons": len(items), "verdicts": dict(tally.verdicts),
                             "candidate": prefixes[0], "baseline": prefixes[1], "tally": tally.as_dict()}
            log.info("win rate %s: %s (%d wins, %d ties, %d losses, %d unjudged over %d prompts)", name,
                     "n/a" if rate is None else f"{rate:.3f}", outcomes["win"], outcomes["tie"], outcomes["loss"],
                     outcomes["unjudged"], len(ids))
        return results

    # --- summary and result ---------------------------------------------------------------------

    def _wait_for_units(self, n_units: int) -> list[Tally]:
        """Every unit's stats (other ranks' included), waiting for ranks still at work."""
        last_log = 0.0
        while True:
            missing = [u for u in range(n_units) if not storage.exists(self.uri(JUDGE_PAIRS, u))]
            if not missing:
                return [self._unit_stats(u) for u in range(n_units)]
            if time.monotonic() - last_log > 60:
                log.info("rank 0: waiting for %d units of other ranks (%s...)", len(missing), missing[:5])
                last_log = time.monotonic()
            time.sleep(WAIT_POLL_S)

    def _finish(self, n_units: int, compare: dict[str, dict[str, Any]]) -> dict[str, Any]:
        total = Tally()
        for unit in self._wait_for_units(n_units):
            total.add(unit)
        spent = Tally()
        spent.add(total)
        for c in compare.values():
            spent.add(Tally.from_dict(c["tally"]))
        v = total.verdicts
        result = {
            "prompts": total.prompts, "pairs": total.pairs, "ties": v["tie"], "unparseable": v["unparseable"],
            "refusals": v["refusal"], "inconsistent": v["inconsistent"], "requests": spent.requests,
            "cacheHits": spent.cache_hits, "errors": dict(spent.errors), "emptyResponses": total.empty,
            "winRates": {name: c["winRate"] for name, c in compare.items()},
        }
        summary = {**result, "kind": self.judge.kind, "units": n_units, "retries": spent.retries,
                   "tokens": spent.tokens, "truncated": total.truncated, "verdicts": dict(v),
                   "compare": {n: {k: x for k, x in c.items() if k != "tally"} for n, c in compare.items()},
                   "cacheUri": self.cache.prefix, "judgeFingerprint": self.cache.fp,
                   "pairsUri": storage.join(self.out, JUDGE_PAIRS) + "/", "seconds": time.monotonic() - self.started}
        storage.write_bytes(storage.join(self.out, JUDGE_SUMMARY), json.dumps(summary, indent=2).encode())
        write_result(result, self.rank)
        log.info("judge done: %s", json.dumps(result, sort_keys=True))
        return result


def run_judge(cfg: TrainerConfig, stop: StopRequest) -> None:
    JudgeTask(cfg, stop).run()
