"""An OpenAI-compatible chat-completions client with our retries, bounded concurrency and counts.

The official `openai` client speaks the protocol; its own retries are OFF (max_retries=0) and
tenacity retries instead, because the task must count every retry and error by kind, honour
Retry-After in both its forms (seconds, HTTP-date; and OpenAI's retry-after-ms), and give up
after `judge.llm.maxRetries` with a message naming the endpoint and the last error.

What is retried: 429, 5xx, timeouts (the client's own, and a total deadline of
`timeoutSeconds` per attempt, so a server trickling bytes cannot stall us), connection errors,
and a 200 whose body is not a chat completion (garbage from a proxy or a broken server).
What is not: 401/403 (the API key; a ConfigError naming judge.llm.apiKeySecret), 404 (the URL
or model name; a ConfigError), and other 4xx (this one request is malformed, e.g. too long for
the judge's context): that judgement ends "unparseable" and is counted as an error of kind
other, rather than failing a stage over one row.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from ..errors import ConfigError, KubeDPOError
from ..stage_config import LLMJudgeConfig
from .parsing import Answer
from .tally import Tally

log = logging.getLogger(__name__)
# The openai client's HTTP library logs every request at INFO: thousands of lines per stage that
# drown the progress; requests, latencies and errors are counted in the judge's metrics instead.
for _name in ("httpx", "httpx2", "httpcore", "openai"):
    logging.getLogger(_name).setLevel(logging.WARNING)

API_KEY_ENV = "KUBEDPO_JUDGE_API_KEY"  # the operator maps judge.llm.apiKeySecret to this variable
RETRY_AFTER_CAP_S = 300.0  # a server asking for longer is waited for this long, then asked again


class JudgeUnavailable(KubeDPOError):
    """The judge kept failing after every retry: the stage fails (exit 1, retried by a gang
    restart); every judgement made so far is in the cache, so the retry does not pay again."""


class RetriableError(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class RejectedRequest(Exception):
    """A 4xx other than auth/not-found: this request will never succeed as sent."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter between retries, unless the server says when (Retry-After)."""

    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 1.0


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, or Retry-After as seconds or an HTTP-date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify(err: Exception) -> Exception:
    """An openai exception as RetriableError(kind), RejectedRequest or ConfigError."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return RetriableError("timeout", "timed out")
    if isinstance(err, openai.APIConnectionError):
        return RetriableError("connection", f"connection error: {err.__cause__ or err}")
    if isinstance(err, openai.APIStatusError):
        code = err.status_code
        detail = f"HTTP {code}: {str(err.message)[:200]}"
        if code == 429:
            return RetriableError("429", detail, retry_after_seconds(err.response.headers))
        if code >= 500:
            return RetriableError("5xx", detail, retry_after_seconds(err.response.headers))
        if code in (401, 403):
            return ConfigError(f"judge.llm.apiKeySecret: the judge refused the API key ({detail}); "
                               f"the key reaches the pod as env {API_KEY_ENV}")
        if code == 404:
            return ConfigError(f"judge.llm.url / judge.llm.model: not found ({detail}); the client POSTs "
                               "to <url>/chat/completions")
        if code == 408:
            return RetriableError("timeout", detail)
        return RejectedRequest(detail)
    if isinstance(err, openai.APIResponseValidationError | ValueError | KeyError | TypeError):
        return RetriableError("other", f"not a chat completion: {str(err)[:200]}")
    return err


def _answer(completion: Any) -> Answer:
    """The text, the API's refusal signal and the token count of a chat completion."""
    try:
        choice = completion.choices[0]
        message = choice.message
    except (AttributeError, IndexError, TypeError) as err:
        raise ValueError(f"no choices in the response ({err})") from None
    refusal = bool(getattr(message, "refusal", None)) or choice.finish_reason == "content_filter"
    text = message.content or getattr(message, "refusal", None) or ""
    if not isinstance(text, str):
        raise ValueError("message content is not a string")
    usage = getattr(completion, "usage", None)
    tokens = int(getattr(usage, "total_tokens", 0) or 0) if usage is not None else 0
    return Answer(text=text, refusal=refusal, tokens=tokens)


class ChatClient:
    """One judge endpoint; `complete_all` runs many requests with at most `concurrency` in flight.

    Used from synchronous code: each `complete_all` runs its own event loop and client.
    """

    def __init__(self, cfg: LLMJudgeConfig, api_key: str | None, backoff: Backoff | None = None) -> None:
        self.cfg = cfg
        self.api_key = api_key
        self.backoff = backoff or Backoff()

    def complete_all(self, requests: Sequence[list[dict[str, str]]], tally: Tally,
                     on_answer: Callable[[int, Answer], None] | None = None) -> list[Answer | None]:
        """Answers in request order; None for a request the endpoint rejected (4xx). `on_answer(i,
        answer)` runs as each answer arrives (the cache keeps it at once). Raises JudgeUnavailable
        when one request still fails after maxRetries (the others are cancelled)."""
        return asyncio.run(self._complete_all(requests, tally, on_answer))

    async def _complete_all(self, requests: Sequence[list[dict[str, str]]], tally: Tally,
                            on_answer: Callable[[int, Answer], None] | None) -> list[Answer | None]:
        import openai

        client = openai.AsyncOpenAI(base_url=self.cfg.url, api_key=self.api_key or "none", max_retries=0,
                                    timeout=self.cfg.timeout_seconds)
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def one(i: int, messages: list[dict[str, str]]) -> Answer | None:
            async with sem:
                answer = await self._with_retries(client, messages, tally)
            if answer is not None and on_answer is not None:
                on_answer(i, answer)
            return answer

        try:
            tasks = [asyncio.ensure_future(one(i, m)) for i, m in enumerate(requests)]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            await client.close()

    def _wait(self, state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome else None
        if isinstance(err, RetriableError) and err.retry_after is not None:
            return min(err.retry_after, RETRY_AFTER_CAP_S)
        b = self.backoff
        return float(wait_exponential_jitter(initial=b.initial, max=b.maximum, jitter=b.jitter)(state))

    async def _with_retries(self, client: Any, messages: list[dict[str, str]], tally: Tally) -> Answer | None:
        attempts = self.cfg.max_retries + 1
        retrying = AsyncRetrying(stop=stop_after_attempt(attempts), wait=self._wait,
                                 retry=retry_if_exception_type(RetriableError), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(client, messages, tally, attempt.retry_state.attempt_number < attempts)
        except RetriableError as err:
            raise JudgeUnavailable(f"judge.llm.url {self.cfg.url}: a request still failed after "
                                   f"{self.cfg.max_retries} retries; last error: {err.kind}: {err}") from None
        except RejectedRequest as err:
            log.warning("judge %s rejected a request (counted as unparseable): %s", self.cfg.url, err)
            return None
        raise AssertionError("unreachable: tenacity returns or raises")

    async def _once(self, client: Any, messages: list[dict[str, str]], tally: Tally, will_retry: bool) -> Answer:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.timeout_seconds):
                completion = await client.chat.completions.create(
                    model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens)
            answer = _answer(completion)
        except Exception as err:  # noqa: BLE001 - every failure is classified, counted, then re-raised
            mapped = (RetriableError("timeout", f"no answer within {self.cfg.timeout_seconds:g} s")
                      if isinstance(err, TimeoutError) else classify(err))
            tally.on_request(False, time.monotonic() - started)
            kind = mapped.kind if isinstance(mapped, RetriableError) else "other"
            tally.on_error(kind, retried=isinstance(mapped, RetriableError) and will_retry)
            if mapped is err:
                raise
            raise mapped from None
        tally.on_request(True, time.monotonic() - started, answer.tokens)
        return answer
