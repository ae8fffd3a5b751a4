"""Outbound HTTP: the WATI send API and the agents.

Every failure is classified where it happens, because the pipeline's choices hang on it:
- `SendRejected`: WATI certainly did not accept the message (connection refused, an error status) — safe to
  retry (or permanent, for 4xx other than 408/429);
- `SendUnknown`: the request may have reached WATI (timeout or broken connection after it left) — never
  re-sent automatically.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from watibot.settings import Settings

WATI_MAX_TEXT = 4096
_TRANSIENT_STATUS = frozenset({408, 425, 429})


def http_client(timeout: float, limit: int) -> httpx.AsyncClient:
    """The HTTP client for outbound calls: pooled, bounded, with an overall timeout per request."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        follow_redirects=False,
    )


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a `Retry-After` header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class SendRejected(Exception):
    """WATI did not accept the message; `permanent` when retrying cannot help."""

    def __init__(self, detail: str, *, permanent: bool, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.permanent = permanent
        self.retry_after = retry_after


class SendUnknown(Exception):
    """The message may or may not have reached WATI."""


class AgentError(Exception):
    """The agent gave no usable reply; `permanent` when retrying cannot help."""

    def __init__(self, detail: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.permanent = permanent
        self.retry_after = retry_after


def _describe_status(response: httpx.Response) -> str:
    snippet = response.text[:200].replace("\n", " ") if response.content else ""
    return f"HTTP {response.status_code}" + (f": {snippet}" if snippet else "")


class WatiClient:
    """Sends session messages through WATI's v1 API."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient) -> None:
        self.base_url = settings.wati_api_url.rstrip("/") if settings.wati_api_url else None
        self.token = settings.wati_api_token.get_secret_value()
        self.client = client

    async def send_text(self, wa_id: str, text: str, local_message_id: str) -> None:
        """Send one text message (at most 4096 characters); raises `SendRejected` or `SendUnknown`."""
        if self.base_url is None:
            raise SendRejected("WATIBOT_WATI_API_URL is not set: reply not sent", permanent=True)
        url = f"{self.base_url}/api/v1/sendSessionMessage/{wa_id}"
        try:
            response = await self.client.post(
                url,
                params={"messageText": text, "localMessageId": local_message_id},
                headers={"Authorization": f"Bearer {self.token}"},
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            raise SendRejected(f"WATI not reachable: {type(error).__name__}", permanent=False) from None
        except httpx.TransportError as error:
            raise SendUnknown(f"WATI send outcome unknown: {type(error).__name__}") from None
        if response.is_success:
            return
        status = response.status_code
        transient = status >= 500 or status in _TRANSIENT_STATUS
        raise SendRejected(
            f"WATI answered {_describe_status(response)}",
            permanent=not transient,
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
        )


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
class AgentRequest:
    """Everything an agent is given for one burst."""

    conversation: str
    wa_id: str | None
    burst_id: int
    messages: list[AgentMessage]
    prompt: str
    history: list[dict[str, Any]] = field(default_factory=list)


class Agent(Protocol):
    """Turns a burst into one reply; None means "say nothing"."""

    async def reply(self, request: AgentRequest) -> str | None: ...


class EchoAgent:
    """The default agent: replies with what it received, so a newcomer sees the whole path work."""

    async def reply(self, request: AgentRequest) -> str | None:
        count = len(request.messages)
        lines = [f"Received {count} message{'s' if count != 1 else ''}:"]
        lines += [f"{number}. {message.description}" for number, message in enumerate(request.messages, 1)]
        return "\n".join(lines)


class HttpAgent:
    """POSTs the burst as JSON to `WATIBOT_AGENT_URL` and expects `{"reply": "text" | null}`."""

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
        try:
            response = await self.client.post(self.url, json=body)
        except httpx.TimeoutException:
            raise AgentError("agent timed out") from None
        except httpx.TransportError as error:
            raise AgentError(f"agent not reachable: {type(error).__name__}") from None
        if not response.is_success:
            status = response.status_code
            raise AgentError(
                f"agent answered {_describe_status(response)}",
                permanent=400 <= status < 500 and status not in _TRANSIENT_STATUS,
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AgentError("agent answered a body that is not JSON") from None
        if not isinstance(data, dict) or "reply" not in data:
            raise AgentError('agent answer lacks "reply" (expected {"reply": "text"} or {"reply": null})')
        reply = data["reply"]
        if reply is not None and not isinstance(reply, str):
            raise AgentError('agent "reply" must be a string or null')
        return reply


class CallableAgent:
    """Wraps `async def fn(request: AgentRequest) -> str | None` named as `package.module:fn`."""

    def __init__(self, target: str) -> None:
        module_name, _, attribute = target.partition(":")
        function = getattr(importlib.import_module(module_name), attribute)
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"WATIBOT_AGENT={target} must name an async function")
        self.function: Callable[[AgentRequest], Awaitable[str | None]] = function

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
    return CallableAgent(settings.agent)


def split_text(text: str, limit: int = WATI_MAX_TEXT) -> list[str]:
    """Split a reply into parts of at most `limit` characters, at a paragraph, line or word break if one is near."""
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[:limit]
        cut = max(window.rfind("\n\n"), window.rfind("\n"), window.rfind(" "))
        if cut < limit // 2:
            cut = limit
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest or not parts:
        parts.append(rest)
    return parts
