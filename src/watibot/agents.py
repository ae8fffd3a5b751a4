"""Agents: what turns a burst (and the conversation's history) into one reply.

Choose one with `WATIBOT_AGENT`: `echo` (default), `http`, `openai` (any OpenAI-compatible Chat Completions
endpoint), or `package.module:function` (an async function of `AgentRequest`). Every agent raises `AgentError`
for a failed attempt; `permanent` marks the ones retrying cannot fix (a bad key, an unknown model).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from watibot.clients import TRANSIENT_STATUS, describe_status, retry_after_seconds
from watibot.settings import Settings


class AgentError(Exception):
    """The agent gave no usable reply; `permanent` when retrying cannot help."""

    def __init__(self, detail: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.permanent = permanent
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class AgentMessage:
    """One message of a burst as an agent receives it."""

    id: int
    whatsapp_message_id: str
    type: str
    text: str | None
    timestamp: str | None
    description: str


@dataclass(frozen=True, slots=True)
class Turn:
    """One earlier exchange with the customer: their burst and our reply."""

    prompt: str
    reply: str


@dataclass(frozen=True, slots=True)
class AgentRequest:
    """Everything an agent is given for one burst."""

    conversation: str
    wa_id: str | None
    burst_id: int
    messages: list[AgentMessage]
    prompt: str
    history: list[Turn] = field(default_factory=list)


class Agent(Protocol):
    """Turns a burst into one reply; None means "say nothing"."""

    uses_history: bool

    async def reply(self, request: AgentRequest) -> str | None: ...


class EchoAgent:
    """The default agent: replies with what it received, so a newcomer sees the whole path work."""

    uses_history = False

    async def reply(self, request: AgentRequest) -> str | None:
        count = len(request.messages)
        lines = [f"Received {count} message{'s' if count != 1 else ''}:"]
        lines += [f"{number}. {message.description}" for number, message in enumerate(request.messages, 1)]
        return "\n".join(lines)


def _failed_status(who: str, response: httpx.Response) -> AgentError:
    status = response.status_code
    return AgentError(
        f"{who} answered {describe_status(response)}",
        permanent=400 <= status < 500 and status not in TRANSIENT_STATUS,
        retry_after=retry_after_seconds(response.headers.get("retry-after")),
    )


async def _post_json(client: httpx.AsyncClient, who: str, url: str, body: Any, headers: dict[str, str]) -> Any:
    """POST JSON and return the decoded answer, classifying every failure as an `AgentError`."""
    try:
        response = await client.post(url, json=body, headers=headers)
    except httpx.TimeoutException:
        raise AgentError(f"{who} timed out") from None
    except httpx.TransportError as error:
        raise AgentError(f"{who} not reachable: {type(error).__name__}") from None
    if not response.is_success:
        raise _failed_status(who, response)
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AgentError(f"{who} answered a body that is not JSON") from None


class HttpAgent:
    """POSTs the burst as JSON to `WATIBOT_AGENT_URL` and expects `{"reply": "text" | null}`."""

    uses_history = False

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url
        self.client = client

    async def reply(self, request: AgentRequest) -> str | None:
        body = {
            "conversation": request.conversation,
            "wa_id": request.wa_id,
            "burst_id": request.burst_id,
            "messages": [
                {key: value for key, value in asdict(message).items() if key != "description"}
                for message in request.messages
            ],
            "prompt": request.prompt,
        }
        data = await _post_json(self.client, "agent", self.url, body, {})
        if not isinstance(data, dict) or "reply" not in data:
            raise AgentError('agent answer lacks "reply" (expected {"reply": "text"} or {"reply": null})')
        reply = data["reply"]
        if reply is not None and not isinstance(reply, str):
            raise AgentError('agent "reply" must be a string or null')
        return reply


class OpenAIAgent:
    """Any OpenAI-compatible Chat Completions endpoint, with the customer's earlier turns as context."""

    uses_history = True

    def __init__(self, settings: Settings, client: httpx.AsyncClient) -> None:
        self.url = settings.openai_base_url.rstrip("/") + "/chat/completions"
        self.model = settings.openai_model
        key = settings.openai_api_key.get_secret_value()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.system_prompt = system_prompt(settings)
        self.client = client

    def messages(self, request: AgentRequest) -> list[dict[str, str]]:
        """The Chat Completions messages: system prompt, earlier turns (oldest first), this burst."""
        messages = [{"role": "system", "content": self.system_prompt}]
        for turn in request.history:
            messages += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": turn.reply}]
        messages.append({"role": "user", "content": request.prompt})
        return messages

    async def reply(self, request: AgentRequest) -> str | None:
        body = {"model": self.model, "messages": self.messages(request)}
        try:
            data = await _post_json(self.client, "OpenAI-compatible API", self.url, body, self.headers)
        except AgentError as error:
            if "HTTP 401" in str(error):
                raise AgentError("OpenAI-compatible API rejected the key (HTTP 401): check WATIBOT_OPENAI_API_KEY",
                                 permanent=True) from None
            if "HTTP 404" in str(error):
                raise AgentError(f"OpenAI-compatible API answered 404: check WATIBOT_OPENAI_MODEL "
                                 f"({self.model!r}) and WATIBOT_OPENAI_BASE_URL", permanent=True) from None
            raise
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise AgentError("OpenAI-compatible API answer has no choices[0].message.content") from None
        if content is not None and not isinstance(content, str):
            raise AgentError("OpenAI-compatible API answer content is not text")
        return content


def system_prompt(settings: Settings) -> str:
    """`WATIBOT_SYSTEM_PROMPT_FILE` if set, else `WATIBOT_SYSTEM_PROMPT`."""
    if settings.system_prompt_file is not None:
        return Path(settings.system_prompt_file).read_text(encoding="utf-8").strip()
    return settings.system_prompt


def load_callable(target: str) -> Callable[..., Awaitable[Any]]:
    """Import the async function named `package.module:function`."""
    module_name, _, attribute = target.partition(":")
    function = getattr(importlib.import_module(module_name), attribute)
    if not inspect.iscoroutinefunction(function):
        raise TypeError(f"{target} must name an async function")
    return function  # type: ignore[no-any-return]


class CallableAgent:
    """Wraps `async def fn(request: AgentRequest) -> str | None` named as `package.module:fn`."""

    uses_history = True

    def __init__(self, target: str) -> None:
        self.function: Callable[[AgentRequest], Awaitable[str | None]] = load_callable(target)

    async def reply(self, request: AgentRequest) -> str | None:
        try:
            return await self.function(request)
        except AgentError:
            raise
        except Exception as error:
            raise AgentError(f"agent function raised {type(error).__name__}: {error}") from error


def build_agent(settings: Settings, client: httpx.AsyncClient) -> Agent:
    """The agent named by `WATIBOT_AGENT`."""
    if settings.agent == "echo":
        return EchoAgent()
    if settings.agent == "http":
        assert settings.agent_url is not None
        return HttpAgent(settings.agent_url, client)
    if settings.agent == "openai":
        return OpenAIAgent(settings, client)
    return CallableAgent(settings.agent)
