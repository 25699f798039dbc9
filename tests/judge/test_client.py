"""The LLM judge client against a real HTTP judge: retries, Retry-After, errors by kind, concurrency, keys.

The judge is tests.support.judge_server (a real aiohttp server speaking chat completions on
127.0.0.1); nothing here is mocked. Backoff without Retry-After is shortened to milliseconds so
waits measured at the server can only come from the Retry-After header.
"""

from __future__ import annotations

import email.utils
import socket
import time

import pytest

from kubedpo_trainer.errors import ConfigError
from kubedpo_trainer.judge import templates as t
from kubedpo_trainer.judge.client import (
    API_KEY_ENV,
    Backoff,
    ChatClient,
    JudgeUnavailable,
    retry_after_seconds,
)
from kubedpo_trainer.judge.parsing import parse_pairwise
from kubedpo_trainer.judge.tally import Tally
from kubedpo_trainer.stage_config import LLMJudgeConfig
from kubedpo_trainer.tiny_judge import TinyJudge

FAST = Backoff(initial=0.01, maximum=0.05, jitter=0.0)
QUESTION = "Words: cat red apple. What kind of thing is the first word? Answer:"


def request(a: str = " animal", b: str = " color") -> list[dict[str, str]]:
    return t.messages(t.render_pairwise(t.DEFAULT_PAIRWISE, QUESTION, a, b), None)


def client(url: str, **kw: object) -> ChatClient:
    cfg = LLMJudgeConfig(url=url, model="tiny", **{"timeout_seconds": 10.0, "max_retries": 4, **kw})
    return ChatClient(cfg, None, FAST)


def gaps(judge: TinyJudge) -> list[float]:
    ts = judge.state.request_times
    return [b - a for a, b in zip(ts, ts[1:], strict=False)]


def test_the_rule_judge_answers_through_the_openai_client(judge_server: TinyJudge) -> None:
    tally = Tally()
    answers = client(judge_server.url).complete_all([request(), request(" color", " animal"),
                                                     request(" fruit", " tool")], tally)
    assert [parse_pairwise(a) for a in answers if a] == ["A", "B", "tie"]
    assert tally.requests == 3 and not tally.errors and tally.tokens == 3 * 112


def test_retry_after_seconds_is_honoured(judge_server: TinyJudge) -> None:
    judge_server.fail("429", 1, retry_after="1")
    judge_server.fail("500", 1)  # no Retry-After: our own (shortened) backoff
    tally = Tally()
    assert client(judge_server.url).complete_all([request()], tally)[0] is not None
    first, second = gaps(judge_server)
    assert 0.95 <= first < 3.0, f"429 with Retry-After: 1 was retried after {first:.2f} s"
    assert second < 0.9, f"a 500 without Retry-After waited {second:.2f} s"
    assert tally.errors == {"429": 1, "5xx": 1} and tally.retries == 2 and tally.requests == 3


def test_retry_after_http_date_is_honoured(judge_server: TinyJudge) -> None:
    judge_server.fail("429", 1, retry_after=email.utils.formatdate(time.time() + 2, usegmt=True))
    assert client(judge_server.url).complete_all([request()], Tally())[0] is not None
    (wait,) = gaps(judge_server)
    assert 0.9 <= wait <= 3.5  # the date has one-second resolution


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    now = time.time()
    assert retry_after_seconds({"retry-after": email.utils.formatdate(now + 30, usegmt=True)}, now) == \
        pytest.approx(30, abs=1)
    assert retry_after_seconds({"retry-after": email.utils.formatdate(now - 30, usegmt=True)}, now) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_every_kind_of_error_is_retried_and_counted(judge_server: TinyJudge) -> None:
    for kind in ("429", "500", "hang", "garbage"):
        judge_server.fail(kind, 1, retry_after="0")
    tally = Tally()
    answers = client(judge_server.url, timeout_seconds=1.5).complete_all([request()], tally)
    assert answers[0] is not None and parse_pairwise(answers[0]) == "A"
    assert tally.errors == {"429": 1, "5xx": 1, "timeout": 1, "other": 1}
    assert tally.retries == 4 and tally.requests == 5 and judge_server.requests == 5


def test_connection_errors_are_retried_then_fail_naming_the_endpoint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    tally = Tally()
    with pytest.raises(JudgeUnavailable, match=rf"judge.llm.url http://127.0.0.1:{port}/v1: .* after 2 retries; "
                                               "last error: connection"):
        client(f"http://127.0.0.1:{port}/v1", max_retries=2).complete_all([request()], tally)
    assert tally.errors == {"connection": 3}


def test_a_judge_that_never_recovers_fails_with_the_last_error(judge_server: TinyJudge) -> None:
    judge_server.fail("500")
    tally = Tally()
    with pytest.raises(JudgeUnavailable) as err:
        client(judge_server.url, max_retries=3).complete_all([request()], tally)
    assert judge_server.url in str(err.value) and "after 3 retries" in str(err.value) and "HTTP 500" in str(err.value)
    assert judge_server.requests == 4 and tally.errors == {"5xx": 4} and tally.retries == 3
    assert err.value.exit_code == 1


def test_concurrency_is_bounded(judge_server: TinyJudge) -> None:
    judge_server.state.delay_s = 0.2
    answers = client(judge_server.url, concurrency=3).complete_all(
        [request(f" cat{i}", " color") for i in range(12)], Tally())
    assert len(answers) == 12 and all(answers)
    assert judge_server.state.max_in_flight == 3


def test_api_key_from_env_and_a_refused_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubedpo_trainer.judge.llm_judge import LLMJudge
    from kubedpo_trainer.stage_config import JudgeConfig

    with TinyJudge(api_key="sk-right-key") as judge:
        cfg = JudgeConfig(kind="llm", llm=LLMJudgeConfig(url=judge.url, model="m", max_retries=5), generations="x")
        monkeypatch.setenv(API_KEY_ENV, "sk-right-key")
        assert LLMJudge(cfg, FAST).ask([request()], Tally())[0] is not None
        monkeypatch.setenv(API_KEY_ENV, "sk-wrong-key")
        with pytest.raises(ConfigError, match="judge.llm.apiKeySecret") as err:
            LLMJudge(cfg, FAST).ask([request()], Tally())
        assert "sk-wrong-key" not in str(err.value) and "sk-right-key" not in str(err.value)
        assert judge.requests == 2  # a refused key is not retried


def test_a_request_the_endpoint_rejects_is_not_retried(judge_server: TinyJudge) -> None:
    """A 4xx (e.g. the judge prompt is too long for the judge's context) ends that one judgement
    (counted as an error of kind other) instead of failing the stage."""
    tally = Tally()  # the rule judge answers 400 to a request without messages
    answers = client(judge_server.url).complete_all([[]], tally)
    assert answers == [None] and tally.errors == {"other": 1} and judge_server.requests == 1


def test_the_http_library_does_not_log_every_request(caplog: pytest.LogCaptureFixture) -> None:
    """A stage makes thousands of requests; httpx logs each at INFO, which drowned `make demo-iterative`'s
    terminal. Requests are counted in the judge's metrics instead."""
    import logging

    import kubedpo_trainer.judge.client  # noqa: F401

    caplog.set_level(logging.INFO)  # the trainer's root level (KUBEDPO_LOG_LEVEL defaults to INFO)
    for name in ("httpx", "httpx2", "openai"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
