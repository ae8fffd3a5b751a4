"""Outbound HTTP: the client factory and the WATI send API (agents live in `watibot.agents`).

Every failure is classified where it happens, because the pipeline's choices hang on it:
- `SendRejected`: WATI certainly did not accept the message (connection refused, an error status, a 2xx whose
  body says `"result": false`) — safe to retry (or permanent, for 4xx other than 408/429 and WATI's refusals);
- `SendUnknown`: the request may have reached WATI (timeout or broken connection after it left, a V3 2xx
  without a message id, a 502/503/504 from a gateway rather than WATI) — re-sent only when WATI's message
  history shows it absent (`WatiClient.find_sent`, used by the pipeline).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from watibot.settings import Settings

WATI_MAX_TEXT = 4096
TRANSIENT_STATUS = frozenset({408, 425, 429})
GATEWAY_STATUS = frozenset({502, 503, 504})  # without WATI's own (JSON) error body: the outcome is unknown
HISTORY_PAGE = 50  # the newest messages of a contact looked at when reconciling a send
HISTORY_CLOCK_SLACK = timedelta(minutes=2)  # our clock and WATI's may differ


def wati_session(timeout: float, limit: int) -> aiohttp.ClientSession:
    """The HTTP session for WATI sends (create it inside the running event loop).

    aiohttp directly, not httpx: httpcore scans its whole pool for every request, which dominated workers
    sending hundreds of replies at once (bench: half a worker's samples), and the httpx-aiohttp mapping turns
    a server disconnect after the request left into `ConnectTimeout` ("not sent"). Here `WatiClient` tells the
    connect phase from the rest itself.
    """
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
        connector=aiohttp.TCPConnector(limit=limit),
        raise_for_status=False,
    )


def agent_http_client(timeout: float, limit: int) -> httpx.AsyncClient:
    """The client for agent calls: httpx's API on aiohttp's connection pool.

    httpcore scans its whole pool for every request, so with hundreds of slow agent calls in flight its cost
    per request grows with concurrency (2 ms at 1, 8 ms at 100 here); aiohttp's stays under 1 ms. Agent calls
    may be repeated safely (a retry asks the agent again), so the coarser error mapping is fine here.
    """
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits),
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
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


class HistoryUnavailable(Exception):
    """WATI's message history could not be read, so an unknown send stays unknown."""


def describe_status(response: httpx.Response) -> str:
    snippet = response.text[:200].replace("\n", " ") if response.content else ""
    return f"HTTP {response.status_code}" + (f": {snippet}" if snippet else "")


def wati_v3_host(api_url: str) -> str:
    """The V3 base from `WATIBOT_WATI_API_URL`: V3 paths carry no tenant id, so a last path segment of digits
    (the tenant id of a v1 URL, https://live-mt-server.wati.io/123456) is dropped."""
    split = urlsplit(api_url.rstrip("/"))
    head, _, last = split.path.rpartition("/")
    path = head if last.isdigit() else split.path
    return urlunsplit((split.scheme, split.netloc, path, "", "")).rstrip("/")


class WatiClient:
    """Sends session messages through WATI's v1 API (`sendSessionMessage`, the default) or its V3 API
    (`POST /api/ext/v3/conversations/messages/text`), as `WATIBOT_WATI_API` says."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.api = settings.wati_api
        url = settings.wati_api_url
        self.base_url = None if not url else url.rstrip("/") if self.api == "v1" else wati_v3_host(url)
        self.token = settings.wati_api_token.get_secret_value()
        self.session = session

    async def send_text(self, wa_id: str, text: str, local_message_id: str, channel: str = "") -> tuple[str, ...]:
        """Send one text message (at most 4096 characters) from `channel`, the number the conversation belongs
        to (WATI's default number when empty); returns the ids WATI gave the message (V3; none for v1, whose
        reports carry our `local_message_id`). Raises `SendRejected` or `SendUnknown`.

        Only a failure to connect, an error status or WATI's own refusal (`"result": false`) means "not sent". A
        timeout or broken connection once connected means the request may have reached WATI, and so do a V3
        acceptance without a message id and a gateway's 502/503/504: unknown, never retried blindly (the pipeline
        looks for it with `find_sent` first).
        """
        if self.base_url is None:
            raise SendRejected("WATIBOT_WATI_API_URL is not set: reply not sent", permanent=True)
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.api == "v3":
            # The target names the channel: a contact with open conversations on several numbers gets 409 otherwise.
            target = f"{channel}:{wa_id}" if channel else wa_id
            request = self.session.post(f"{self.base_url}/api/ext/v3/conversations/messages/text",
                                        json={"target": target, "text": text}, headers=headers)
        else:
            # The target is one escaped path segment: a bsuid is customer-controlled text ("../", "?", "#").
            params = {"messageText": text, "localMessageId": local_message_id}
            if channel:
                params["channelPhoneNumber"] = channel
            request = self.session.post(f"{self.base_url}/api/v1/sendSessionMessage/{quote(wa_id, safe='')}",
                                        params=params, headers=headers)
        status, body = await self._exchange(request, channel)
        return self._accepted(status, body)

    async def send_template(self, wa_id: str, channel: str, template: str, parameters: dict[str, str],
                            broadcast_name: str, local_message_id: str) -> None:
        """Send an approved template to `wa_id` from `channel` (outside the session window, where a free-form
        message is refused): v1 `POST {api}/api/v1/sendTemplateMessage?whatsappNumber=…` with JSON
        `{"template_name", "broadcast_name", "parameters": [{"name", "value"}], "channel_number"}`, or V3
        `POST {host}/api/ext/v3/messageTemplates/send` with one recipient. Raises `SendRejected` or `SendUnknown`
        exactly as `send_text` does (an unknown outcome is never looked up: the burst needs attention)."""
        if self.base_url is None:
            raise SendRejected("WATIBOT_WATI_API_URL is not set: template not sent", permanent=True)
        headers = {"Authorization": f"Bearer {self.token}"}
        named = [{"name": name, "value": value} for name, value in parameters.items()]
        if self.api == "v3":
            recipient = {"target": f"{channel}:{wa_id}" if channel else wa_id, "local_message_id": local_message_id,
                         "custom_params": named}
            request = self.session.post(f"{self.base_url}/api/ext/v3/messageTemplates/send", headers=headers,
                                        json={"template_name": template, "broadcast_name": broadcast_name,
                                              "channel": channel or None, "recipients": [recipient]})
        else:
            payload: dict[str, Any] = {"template_name": template, "broadcast_name": broadcast_name,
                                       "parameters": named}
            if channel:
                payload["channel_number"] = channel
            request = self.session.post(f"{self.base_url}/api/v1/sendTemplateMessage",
                                        params={"whatsappNumber": wa_id}, json=payload, headers=headers)
        status, body = await self._exchange(request, channel)
        if isinstance(body, dict) and (body.get("result") is False or body.get("success") is False):
            info = body.get("info") or body.get("error") or body.get("message") or "no reason given"
            raise SendRejected(f"WATI refused the template (HTTP {status}): {str(info)[:200]}", permanent=True)
        if self.api == "v3" and not (isinstance(body, dict) and body.get("success") is True):
            raise SendUnknown(f"WATI answered HTTP {status} without success: template outcome unknown")

    async def _exchange(self, request: Any, channel: str) -> tuple[int, Any]:
        """Make one send request: (status, parsed JSON body or None) for a 2xx; otherwise raises `SendRejected`
        (certainly not sent) or `SendUnknown` (may have reached WATI)."""
        body: Any = None
        try:
            async with request as response:
                status = response.status
                if 200 <= status < 300:
                    try:
                        body = json.loads(await response.read())
                    except (aiohttp.ClientError, TimeoutError, ValueError):
                        body = None  # v1: accepted all the same; V3: no message id, so unknown (below)
                    retry_after = None
                else:
                    text_body = await response.text(errors="replace")
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            raise SendRejected(f"WATI not reachable: {type(error).__name__}", permanent=False) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise SendUnknown(f"WATI send outcome unknown: {type(error).__name__}") from None
        if 200 <= status < 300:
            return status, body
        snippet = text_body[:200].replace("\n", " ")
        if status in GATEWAY_STATUS and not _json_object(text_body):
            # A proxy's page, not WATI's error: the request may have reached WATI before the gateway gave up.
            raise SendUnknown(f"WATI send outcome unknown: HTTP {status} from a gateway"
                              + (f": {snippet[:80]}" if snippet else ""))
        if status == HTTPStatus.CONFLICT and self.api == "v3":
            why = ("the channel named did not settle it" if channel
                   else "the message named no channel (its webhook had no channelPhoneNumber)")
            raise SendRejected(f"WATI answered HTTP 409: the contact has several open conversations and {why}"
                               + (f": {snippet}" if snippet else ""), permanent=True)
        transient = status >= 500 or status in TRANSIENT_STATUS
        raise SendRejected(
            f"WATI answered HTTP {status}" + (f": {snippet}" if snippet else ""),
            permanent=not transient, retry_after=retry_after,
        )

    async def find_sent(self, wa_id: str, text: str, local_message_id: str, channel: str,
                        since: datetime) -> tuple[str, ...] | None:
        """Look for a message we sent in WATI's history of the contact (v1 `getMessages`, V3
        `conversations/{target}/messages`): its WATI ids when it is there (possibly none), None when it is not.

        Ours is the outbound message with our `localMessageId` (v1), or else the one with exactly this text
        created since `since` (less two minutes for clocks that differ). Raises `HistoryUnavailable`.
        """
        if self.base_url is None:
            raise HistoryUnavailable("WATIBOT_WATI_API_URL is not set")
        if self.api == "v3":
            target = f"{channel}:{wa_id}" if channel else wa_id
            url = f"{self.base_url}/api/ext/v3/conversations/{quote(target, safe='')}/messages"
            params = {"page_number": "1", "page_size": str(HISTORY_PAGE)}
        else:
            url = f"{self.base_url}/api/v1/getMessages/{quote(wa_id, safe='')}"
            params = {"pageSize": str(HISTORY_PAGE), "pageNumber": "1"}
        try:
            async with self.session.get(url, params=params,
                                        headers={"Authorization": f"Bearer {self.token}"}) as response:
                status = response.status
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise HistoryUnavailable(f"WATI's message history not reachable: {type(error).__name__}") from None
        if not 200 <= status < 300:
            raise HistoryUnavailable(f"WATI's message history answered HTTP {status}")
        try:
            body = json.loads(raw)
        except ValueError:
            raise HistoryUnavailable("WATI's message history is not JSON") from None
        if isinstance(body, dict) and body.get("result") is False:
            raise HistoryUnavailable(f"WATI's message history refused: {str(body.get('info'))[:200]}")
        earliest = since - HISTORY_CLOCK_SLACK
        for item in _history_items(body):
            ids = tuple(str(item[key]) for key in ("id", "local_message_id", "localMessageId", "whatsappMessageId")
                        if isinstance(item.get(key), str | int) and str(item[key]))
            local = item.get("localMessageId", item.get("local_message_id"))
            if self.api == "v1" and local:  # v1 sends carry ours: another id is another message
                if local == local_message_id:
                    return ids
                continue
            if item.get("owner", item.get("is_owner", True)) is False or item.get("text") != text:
                continue
            created = _instant(item.get("created", item.get("created_at", item.get("timestamp"))))
            if created is None or created >= earliest:
                return ids
        return None

    def _accepted(self, status: int, body: Any) -> tuple[str, ...]:
        """What a 2xx means: WATI's refusal (`"result": false`, permanent, its `info` the reason), or the ids of
        the accepted message (V3: none is an unknown outcome)."""
        if isinstance(body, dict) and body.get("result") is False:
            info = body.get("info") or body.get("error") or body.get("message") or "no reason given"
            raise SendRejected(f"WATI refused the message (HTTP {status}, result false): {str(info)[:200]}",
                               permanent=True)
        if self.api == "v1":
            return ()
        message = body.get("message") if isinstance(body, dict) else None
        ids = tuple(dict.fromkeys(
            str(message[key]) for key in ("id", "local_message_id", "whatsapp_message_id")
            if isinstance(message, dict) and isinstance(message.get(key), str | int) and str(message[key])))
        if not ids:
            raise SendUnknown(f"WATI answered HTTP {status} without a message id: outcome unknown")
        return ids


def _json_object(text: str) -> bool:
    """Whether an error body is WATI's own (a JSON object) rather than a gateway's page."""
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _history_items(body: Any) -> list[dict[str, Any]]:
    """The messages of a history answer, whichever envelope holds them (v1 `messages.items`, V3 a list under
    `messages`, `items` or `data`)."""
    found: Any = body
    for _ in range(3):
        if isinstance(found, list):
            return [item for item in found if isinstance(item, dict)]
        if not isinstance(found, dict):
            return []
        found = next((found[key] for key in ("messages", "items", "data") if key in found), None)
    return []


def _instant(value: Any) -> datetime | None:
    """A history item's creation time (ISO 8601 or unix seconds), None when it has none readable."""
    try:
        if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
            return datetime.fromtimestamp(float(value), UTC)
        if isinstance(value, str) and value:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None
    return None


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
