"""A rule-based judge of the tiny task behind a real OpenAI-compatible HTTP endpoint (tests, demo).

It answers POST /v1/chat/completions like an LLM judge would, but by rule, deterministically:
it finds the question and the answer(s) in kubedpo's default judge templates, takes the first
word of "Words: w1 w2 ..." and its category (kubedpo_trainer.tiny), and
- pointwise: "Rating: [[10]]" when the response's first category word is the right one, [[3]]
  when it names a wrong category, [[1]] when it names none;
- pairwise: [[A]] / [[B]] for the one that is right when exactly one is, else [[tie]]
  (`bias="A"` makes it say [[A]] instead of [[tie]]: position bias, for the both-orders check).
It counts requests and fails on demand: `fail(kind, count)` makes the next `count` requests
(None: all) answer with `garbage` (a 200 whose body is not JSON), `nonsense` (a completion with
no verdict), `refuse` (a refusal), `429` (with Retry-After), `500`, or `hang` (no answer for
`hang_s` seconds, past any sane client timeout).

In tests: `tests.support.judge_server` (a pytest fixture). Standalone (demo, by hand):
    python -m kubedpo_trainer.tiny_judge --port 8765      # base URL http://127.0.0.1:8765/v1
with GET /control/stats, POST /control/fail {"kind", "count", "retryAfter", "after"}, POST /control/reset.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .judge import templates as t
from .tiny import CATEGORIES, WORD_CATEGORY

FAULT_KINDS = ("garbage", "nonsense", "refuse", "429", "500", "hang")
_WORDS = re.compile(r"Words:\s*([A-Za-z]+)")


def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    return text[i + len(start):j].strip() if i >= 0 and j >= 0 else None


def first_category(response: str) -> str | None:
    for word in re.findall(r"[A-Za-z]+", response):
        if word.lower() in CATEGORIES:
            return word.lower()
    return None


def right_category(question: str) -> str | None:
    m = _WORDS.search(question)
    return WORD_CATEGORY.get(m.group(1).lower()) if m else None


def rate(question: str, response: str) -> int:
    """10 right category, 3 a wrong one, 1 none (the pointwise rule)."""
    said = first_category(response)
    if said is None:
        return 1
    return 10 if said == right_category(question) else 3


def judge_text(content: str, bias: str | None = None) -> str:
    """The judge's answer to one user message built from a default template."""
    question = _between(content, t.QUESTION_START, "[The Start of")
    if question is None:
        return "I could not find the question in this request."
    if t.ANSWER_A_START in content:
        a = _between(content, t.ANSWER_A_START, t.ANSWER_A_END) or ""
        b = _between(content, t.ANSWER_B_START, t.ANSWER_B_END) or ""
        ok_a, ok_b = rate(question, a) == 10, rate(question, b) == 10
        verdict = "A" if ok_a and not ok_b else "B" if ok_b and not ok_a else (bias or "tie")
        return f"Assistant A is {'right' if ok_a else 'not right'}, assistant B is {'right' if ok_b else 'not right'}. [[{verdict}]]"
    answer = _between(content, t.ANSWER_START, t.ANSWER_END)
    if answer is None:
        return "I could not find the answer in this request."
    return f"The answer names {first_category(answer) or 'no category'}. Rating: [[{rate(question, answer)}]]"


@dataclass
class Fault:
    kind: str
    remaining: int | None  # None: forever
    retry_after: str = "1"
    after: int = 0  # active once this many requests have come in (succeed N, then fail)


@dataclass
class JudgeState:
    bias: str | None = None
    hang_s: float = 30.0
    delay_s: float = 0.0  # every answer takes this long (to watch concurrency, or to kill mid-run)
    api_key: str | None = None
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    answered: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    request_times: list[float] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_fault(self, n: int) -> Fault | None:
        """The fault (if any) request number `n` (1-based) gets."""
        with self.lock:
            for f in self.faults:
                if n > f.after and (f.remaining is None or f.remaining > 0):
                    if f.remaining is not None:
                        f.remaining -= 1
                    return f
            return None


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-tiny-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112},
    }


def make_app(state: JudgeState) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        with state.lock:
            state.requests += 1
            n = state.requests
            state.request_times.append(time.monotonic())
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            return await answer(request, n)
        finally:
            with state.lock:
                state.in_flight -= 1

    async def answer(request: web.Request, n: int) -> web.StreamResponse:
        if state.api_key and request.headers.get("Authorization") != f"Bearer {state.api_key}":
            state.by_kind["401"] += 1
            return web.json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}}, status=401)
        body = await request.json()
        if not body.get("messages"):
            state.by_kind["400"] += 1
            return web.json_response({"error": {"message": "messages: at least one message is required",
                                                "type": "invalid_request_error"}}, status=400)
        fault = state.take_fault(n)
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        kind = fault.kind if fault else "ok"
        state.by_kind[kind] += 1
        if kind == "429":
            return web.json_response({"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                                     status=429, headers={"Retry-After": fault.retry_after} if fault else {})
        if kind == "500":
            return web.json_response({"error": {"message": "internal error", "type": "server_error"}}, status=500)
        if kind == "hang":
            await asyncio.sleep(state.hang_s)
        if kind == "garbage":
            return web.Response(text="<html>502 bad gateway?</html>{{{", content_type="application/json")
        messages = body.get("messages") or []
        user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        content = ("Both answers are interesting." if kind == "nonsense"
                   else "I'm sorry, but I can't help with evaluating this." if kind == "refuse"
                   else judge_text(str(user), state.bias))
        with state.lock:
            state.answered += 1
        return web.json_response(_completion(str(body.get("model", "tiny-judge")), content))

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"requests": state.requests, "answered": state.answered,
                                  "byKind": dict(state.by_kind), "maxInFlight": state.max_in_flight})

    async def fail(request: web.Request) -> web.Response:
        d = await request.json()
        if d.get("kind") not in FAULT_KINDS:
            return web.json_response({"error": f"kind must be one of {FAULT_KINDS}"}, status=400)
        state.faults.append(Fault(d["kind"], d.get("count"), str(d.get("retryAfter", "1")), int(d.get("after", 0))))
        return web.json_response({"ok": True})

    async def reset(_: web.Request) -> web.Response:
        with state.lock:
            state.faults.clear()
            state.requests = state.answered = state.max_in_flight = 0
            state.by_kind.clear()
            state.request_times.clear()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/control/stats", stats)
    app.router.add_post("/control/fail", fail)
    app.router.add_post("/control/reset", reset)
    return app


class TinyJudge:
    """The server on a background thread (its own event loop): `start()`, `.url`, `stop()`."""

    def __init__(self, port: int = 0, bias: str | None = None, hang_s: float = 30.0,
                 api_key: str | None = None, delay_s: float = 0.0) -> None:
        self.state = JudgeState(bias=bias, hang_s=hang_s, api_key=api_key, delay_s=delay_s)
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> int:
        return self.state.requests

    def fail(self, kind: str, count: int | None = None, retry_after: str = "1", after: int = 0) -> None:
        """The next `count` requests (None: all) get `kind`, once `after` requests have come in."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r}: one of {FAULT_KINDS}")
        self.state.faults.append(Fault(kind, count, retry_after, after))

    def heal(self) -> None:
        self.state.faults.clear()

    def start(self) -> TinyJudge:
        ready = threading.Event()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._runner = web.AppRunner(make_app(self.state), shutdown_timeout=0.5)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            self.port = int(self._runner.addresses[0][1])
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            pending = asyncio.all_tasks(loop)  # hung handlers (fault "hang") end with the server
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=serve, name="tiny-judge", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("tiny judge did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> TinyJudge:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubedpo_trainer.tiny_judge", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=8765, help="Port on 127.0.0.1 (0: a free one).")
    p.add_argument("--bias", choices=["A", "B"], default=None, help="Say this instead of [[tie]] (position bias).")
    p.add_argument("--api-key", default=None, help="Require this bearer token.")
    p.add_argument("--delay", type=float, default=0.0, help="Seconds every answer takes.")
    p.add_argument("--fail", action="append", default=[], metavar="KIND[:COUNT]",
                   help=f"Fail the first COUNT requests (default: all) with KIND: {', '.join(FAULT_KINDS)}.")
    args = p.parse_args(argv)
    judge = TinyJudge(args.port, bias=args.bias, api_key=args.api_key, delay_s=args.delay)
    for spec in args.fail:
        kind, _, count = spec.partition(":")
        judge.fail(kind, int(count) if count else None)
    judge.start()
    print(json.dumps({"url": judge.url}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        judge.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
