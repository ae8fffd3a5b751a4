"""Agents: the OpenAI-compatible agent with memory in PostgreSQL, and a Python function as the agent."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningApp, app_settings, customer_message, wait_until
from tests.fakes import Answer, FakeHttpServer, FakeWati

Sql = Callable[..., list[tuple[Any, ...]]]
ROOT = Path(__file__).resolve().parents[1]


class FakeOpenAI(FakeHttpServer):
    """`POST /v1/chat/completions`: answers "reply N" for the N-th request."""

    def __init__(self) -> None:
        super().__init__()
        self.default = lambda request: Answer(body={
            "id": "chatcmpl-1", "object": "chat.completion", "model": request["json"]["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"reply {len(self.arrivals)}"}}],
        })


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def openai_settings(database_url: str, wati: FakeWati, openai: FakeOpenAI, **overrides: Any) -> Any:
    return app_settings(database_url, wati, agent="openai", openai_base_url=f"{openai.url}/v1",
                        openai_api_key="sk-test-secret", openai_model="test-model",
                        system_prompt="You are the booking assistant.", **overrides)


def test_openai_agent_sends_the_system_prompt_history_and_the_whole_burst(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_openai: FakeOpenAI
) -> None:
    """The second burst reaches the model with the first burst and its reply as history, in order."""
    app = run_app(openai_settings(database_url, fake_wati, fake_openai, buffer_seconds=0.5))
    app.post(customer_message("50376819621", "hi"))
    app.post(customer_message("50376819621", "I want to book"))
    fake_wati.wait_for_sent(1)
    app.post(customer_message("50376819621", "for 2 people"))
    sent = fake_wati.wait_for_sent(2)
    assert [message["text"] for message in sent] == ["reply 1", "reply 2"]
    first, second = fake_openai.requests
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["authorization"] == "Bearer sk-test-secret"
    assert first["json"] == {"model": "test-model", "messages": [
        {"role": "system", "content": "You are the booking assistant."},
        {"role": "user", "content": "hi\nI want to book"},
    ]}
    assert second["json"]["messages"] == [
        {"role": "system", "content": "You are the booking assistant."},
        {"role": "user", "content": "hi\nI want to book"},
        {"role": "assistant", "content": "reply 1"},
        {"role": "user", "content": "for 2 people"},
    ]


def test_history_is_bounded_by_turns_and_characters(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_openai: FakeOpenAI
) -> None:
    """Only the newest turns that fit WATIBOT_HISTORY_TURNS and WATIBOT_HISTORY_CHARS are sent."""
    app = run_app(openai_settings(database_url, fake_wati, fake_openai, history_turns=2, history_chars=30))
    for number in range(4):
        app.post(customer_message("50376819621", f"question {number}"))
        fake_wati.wait_for_sent(number + 1)
    last = fake_openai.requests[-1]["json"]["messages"]
    # 2 turns allowed, but 30 characters hold only one ("question 2" + "reply 3" = 17; two would be 34)
    assert last[1:] == [
        {"role": "user", "content": "question 2"},
        {"role": "assistant", "content": "reply 3"},
        {"role": "user", "content": "question 3"},
    ]


@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, "rejected the key (HTTP 401): check WATIBOT_OPENAI_API_KEY"), (404, "check WATIBOT_OPENAI_MODEL")],
)
def test_openai_bad_key_or_model_is_dead_at_once_with_a_clear_reason(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_openai: FakeOpenAI,
    sql: Sql, status: int, reason: str,
) -> None:
    """A 401 or 404 from the model API cannot be fixed by retrying: the burst is dead, saying what to check."""
    fake_openai.default = lambda request: Answer(status=status, body={"error": {"message": "nope"}})
    app = run_app(openai_settings(database_url, fake_wati, fake_openai))
    app.post(customer_message("50376819621", "hello"))
    (row,) = wait_until(lambda: sql("SELECT attempts, error FROM watibot.burst WHERE status = 'dead'"))
    assert row[0] == 1
    assert reason in row[1]
    assert fake_wati.requests == []


def test_openai_rate_limit_is_retried_after_the_requested_delay(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_openai: FakeOpenAI, sql: Sql
) -> None:
    """429 with Retry-After from the model API is retried once the delay has passed, then answered."""
    fake_openai.script = [Answer(status=429, headers={"Retry-After": "1"}, body={"error": {}})]
    app = run_app(openai_settings(database_url, fake_wati, fake_openai))
    app.post(customer_message("50376819621", "hello"))
    fake_wati.wait_for_sent(1)
    first, second = fake_openai.requests
    assert second["received"] - first["received"] >= 0.95
    wait_until(lambda: sql("SELECT status, attempts FROM watibot.burst") == [("sent", 2)])


def test_python_function_agent_from_the_example(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """WATIBOT_AGENT=examples.agent:reply runs the documented example, including a silent answer."""
    sys.path.insert(0, str(ROOT))
    try:
        app = run_app(app_settings(database_url, fake_wati, agent="examples.agent:reply"))
        app.post(customer_message("50376819621", "I want to book"))
        (sent,) = fake_wati.wait_for_sent(1)
        assert sent["text"] == "Happy to help with a booking! For which date and how many people?"
        app.post(customer_message("50376819621", "thanks"))
        wait_until(lambda: sql("SELECT status FROM watibot.burst ORDER BY id") == [("sent",), ("no_reply",)])
        app.post(customer_message("50376819621", "and parking?"))
        fake_wati.wait_for_sent(2)
        assert fake_wati.sent[-1]["text"] == "Thanks for your message! (we have talked 1 times before)"
    finally:
        sys.path.remove(str(ROOT))
