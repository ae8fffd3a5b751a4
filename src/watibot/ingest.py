"""`POST /webhook`: authenticate, parse, store with one committed statement, answer.

Nothing slow happens here: no agent call, no WATI call. The answer is 200 only after the message is committed;
any doubt about the database is a 503, which WATI retries (every 10 minutes, for about a day).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from watibot.db import DatabaseError
from watibot.metrics import count_webhook
from watibot.payload import (
    CustomerMessage,
    DeliveryUpdate,
    OperatorMessage,
    OtherEvent,
    PayloadError,
    check_structure,
    decode_json,
    parse_event,
)

log = logging.getLogger("watibot.ingest")
router = APIRouter()

PASSKEY_HEADER = "X-Watibot-Passkey"
# A statement that timed out may still reach the server and commit later (a partition that heals delivers the
# bytes TCP held): a 503 promises only "not known to be stored". WATI's retry carries the same message id, which
# is stored once whatever happened (answered `duplicate` if the first try committed after all).
UNAVAILABLE_DETAIL = ("database unavailable: not stored, or not known to be; retry later (a retry of the same "
                      "message is recognised and stored once)")
_LOGGED_BY_RECEIVE = frozenset({"buffered", "duplicate", "ignored"})  # answers with their own debug line

_WEBHOOK_BODY_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "eventType": {"type": "string", "example": "message"},
                        "whatsappMessageId": {"type": "string"},
                        "id": {"type": "string"},
                        "waId": {"type": "string", "pattern": "^[0-9]{5,20}$"},
                        "bsuid": {"type": "string"},
                        "owner": {"type": "boolean"},
                        "type": {"type": "string"},
                        "text": {"type": ["string", "null"]},
                        "timestamp": {"type": ["string", "number"]},
                        "channelPhoneNumber": {"type": "string"},
                        "passkey": {"type": "string"},
                    },
                    "description": "A WATI webhook event (see WATI's docs); extra fields are kept. A body with "
                    "waId and text and no eventType is the old system's form of a customer's text message.",
                }
            }
        },
    }
}


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    """The body exceeded the configured limit."""


async def _read_limited(request: Request, limit: int, timeout: float) -> bytes:  # noqa: ASYNC109 - a deadline
    """Read the body, stopping as soon as it passes `limit` bytes, whatever Content-Length claimed, within
    `timeout` seconds (TimeoutError past it; ClientDisconnect when the client goes away mid-body)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
    return b"".join(chunks)


def _query_passkey(query_string: bytes) -> str | None:
    """`passkey` from the query string, read as Starlette's `query_params` would (the last one wins), without
    building its multi-dict for every webhook."""
    if b"passkey" not in query_string:
        return None
    values = [value for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
              if name == "passkey"]
    return values[-1] if values else None


def _header_passkey(request: Request) -> str | None:
    """The X-Watibot-Passkey header read as UTF-8 (Starlette decodes header bytes as latin-1, so a non-ASCII
    passkey, which works in the query string and the body, would never match in the header). Bytes that are not
    UTF-8 are kept as surrogates: they match no passkey."""
    value = request.headers.get(PASSKEY_HEADER)
    if value is None or value.isascii():
        return value
    return value.encode("latin-1").decode("utf-8", "surrogateescape")


def _passkey_matches(given: object, expected: bytes) -> bool:
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected)


@router.post(
    "/webhook",
    openapi_extra=_WEBHOOK_BODY_SCHEMA,
    responses={
        200: {"description": 'Stored or acknowledged: {"status": "buffered" | "duplicate" | "paused" | '
                             '"recorded" | "ignored"}'},
        401: {"description": "Missing or wrong passkey"},
        408: {"description": "Body not received within WATIBOT_WEBHOOK_BODY_TIMEOUT_SECONDS (connection closed)"},
        413: {"description": "Body larger than WATIBOT_WEBHOOK_MAX_BODY_BYTES"},
        415: {"description": "Content-Type is not JSON and neither is the body (a JSON body is accepted whatever "
                             "its Content-Type)"},
        422: {"description": "Not a usable WATI event; the detail says why"},
        503: {"description": "Database unavailable: not stored, or not known to be; retry later (the retry of a "
                             "message that was stored after all is answered duplicate)"},
    },
)
async def webhook(request: Request) -> JSONResponse:
    """Receive one WATI event."""
    return await answer(request)


async def answer(request: Request) -> JSONResponse:
    """The answer to one webhook request, counted and logged (a bug's 500 too)."""
    try:
        response, status = await _receive(request)
    except Exception:
        log.exception("webhook failed with an unexpected error; nothing is known to be stored")
        response, status = _error(500, "internal error; retry later"), None
    label = count_webhook(response.status_code, status)  # "disconnected": nobody reads this answer
    if label not in _LOGGED_BY_RECEIVE:  # one debug line per webhook, whatever the answer
        log.debug("webhook answered %d %s", response.status_code, label)
    return response


class WebhookFastPath:
    """ASGI middleware: `POST /webhook` goes straight to `answer`, past FastAPI's exception middleware, router and
    endpoint machinery (py-spy: a seventh of an ingest worker's time, more than the handler's own database
    work). The route stays declared for the OpenAPI schema and answers any request this does not take; an
    unexpected error still reaches Starlette's ServerErrorMiddleware, which sits outside user middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/webhook":
            response = await answer(Request(scope, receive))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _ok(status: str) -> tuple[JSONResponse, str]:
    return JSONResponse({"status": status}), status


async def _receive(request: Request) -> tuple[JSONResponse, str | None]:  # noqa: PLR0911 - one return per answer
    state = request.app.state
    expected: bytes = state.passkey
    limit: int = state.settings.webhook_max_body_bytes

    presented = _query_passkey(request.scope["query_string"]) or _header_passkey(request)
    if presented is not None and not _passkey_matches(presented, expected):
        return _error(401, "missing or wrong passkey"), None
    body_timeout: float = state.settings.webhook_body_timeout_seconds
    try:
        body = await _read_limited(request, limit, body_timeout)
    except BodyTooLarge:
        return _error(413, f"body larger than {limit} bytes"), None
    except TimeoutError:
        # The connection is closed after this answer: the rest of the body may still be on its way.
        return _error(408, f"body not received within {body_timeout:g} s", {"Connection": "close"}), None
    except ClientDisconnect:
        return _error(400, "client disconnected before sending the whole body"), "disconnected"
    try:
        event = decode_json(body)  # bounded in size and numbers: the least work before a body passkey is checked
        if presented is None and not _passkey_matches(event.get("passkey"), expected):
            return _error(401, "missing or wrong passkey"), None
        event = check_structure(body, event)
    except PayloadError as error:
        if presented is None:
            return _error(401, "missing or wrong passkey"), None
        # A body that parses as JSON is taken whatever its Content-Type (curl -d sends form-encoded by default);
        # one that does not, declared as something else, is refused for its type.
        if "json" not in request.headers.get("content-type", "application/json").lower():
            return _error(415, "Content-Type must be application/json (and the body is not JSON)"), None
        return _error(422, str(error)), None
    event.pop("passkey", None)  # a secret: never stored with the payload

    try:
        parsed = parse_event(event)
    except PayloadError as error:
        return _error(422, str(error)), None
    if isinstance(parsed, OtherEvent):
        log.debug("ignored event %s", parsed.event_type)
        return _ok("ignored")
    try:
        return _ok(await _store(state, parsed))
    except DatabaseError as error:
        log.warning("webhook refused, not known to be stored: %s", error)
        return _error(503, UNAVAILABLE_DETAIL, {"Retry-After": "5"}), None


async def _store(state: Any, event: CustomerMessage | OperatorMessage | DeliveryUpdate) -> str:
    """Commit what the event means; returns the status to answer. Raises DatabaseError (not known to be stored)."""
    if isinstance(event, OperatorMessage):
        if await state.stores.ingest.operator_message(event):
            return "paused"
        log.debug("ignored our own reply's echo for %s/%s", event.channel, event.customer)
        return "ignored"
    if isinstance(event, DeliveryUpdate):
        if await state.stores.ingest.delivery_update(event):
            return "recorded"
        log.debug("ignored a delivery report that names no burst of this customer's")
        return "ignored"
    result = await state.stores.ingest.ingest(event)
    if result.duplicate:
        log.debug("duplicate delivery %s", event.provider_message_id)
        return "duplicate"
    if state.sweeper is not None:
        state.sweeper.hint(result.wait_seconds)
    log.debug("buffered %s for %s/%s", event.provider_message_id, event.channel, event.customer)
    return "buffered"
