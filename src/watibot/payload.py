"""Parsing of WATI webhook bodies: pure functions, no I/O.

Parsing is tolerant of extra and missing optional fields (WATI adds fields over time) and strict about what a
customer message cannot do without: a message id, a customer id and a usable timestamp.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

CUSTOMER_EVENTS = frozenset({"message", "message_bsuid"})
OPERATOR_EVENTS = frozenset({"sessionMessageSent", "sessionMessageSent_v2"})
DELIVERY_EVENTS = {
    f"{name}{suffix}": state
    for name, state in (("sentMessageDELIVERED", "delivered"), ("sentMessageREAD", "read"),
                        ("sentMessageREPLIED", "replied"), ("sessionMessageFailed", "failed"))
    for suffix in ("", "_v2")
}
_OUR_LOCAL_ID = re.compile(r"^([0-9]{1,18})(?:\.[0-9]{1,4})?$")
_DIGITS = re.compile(r"^[0-9]{5,20}$")
MAX_ID_LENGTH = 512
# Identifiers are indexed (channel + customer together, message ids alone): a btree entry holds ~2,700 bytes, so
# each is bounded in bytes too. 512 ASCII characters fit; 512 CJK characters (1,536 bytes) twice would not.
MAX_ID_BYTES = 600
# WATI payloads are a few levels deep; far deeper ones are refused before PostgreSQL's jsonb parser could hit
# its stack limit (which would otherwise surface as a server error).
MAX_DEPTH = 32
# Unix seconds between 2000 and 2100: anything else is not a WATI timestamp.
_MIN_TIMESTAMP, _MAX_TIMESTAMP = 946_684_800, 4_102_444_800


class PayloadError(ValueError):
    """The body is not a usable WATI event; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class CustomerMessage:
    """A message a customer sent, ready to be buffered."""

    channel: str
    customer: str
    wa_id: str | None
    provider_message_id: str
    wati_id: str | None
    type: str
    text: str | None
    wati_timestamp: datetime | None
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OperatorMessage:
    """Someone wrote to the customer from the WATI side: a human operator, unless it is one of our replies."""

    channel: str
    customer: str
    wa_id: str | None
    our_burst_id: int | None  # set when localMessageId names one of our bursts
    wati_ids: tuple[str, ...] = ()  # its ids, which name one of our V3 sends when watibot.wati_message has one
    text: str | None = None  # what was written: a V3 echo that beats the recording of its ids matches our reply


@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    """WATI's report on a reply we sent (recognised by our localMessageId, or for a V3 send by the ids WATI
    returned, kept in watibot.wati_message), naming the customer it went to."""

    burst_id: int | None  # None: look the burst up by wati_ids
    state: str  # delivered | read | replied | failed
    error: str | None
    customer: str  # bsuid or waId: the report moves the burst only if it belongs to this customer
    wa_id: str | None
    channel: str | None  # the number it was sent from, when the report says
    wati_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """Any other WATI event: acknowledged, not buffered."""

    event_type: str


class _NonFinite(ValueError):
    """NaN, Infinity, or a number too large for a double: Python's json reads them, jsonb refuses them."""


def _not_a_number(text: str) -> float:
    raise _NonFinite(text)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text[:40])
    return value


class _HugeInteger(ValueError):
    """An integer with more digits than any WATI field has (Python refuses past 4,300 digits, slowly)."""


MAX_INTEGER_DIGITS = 100


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _HugeInteger(f"{text[:20]}… ({len(text)} characters)")
    return int(text)


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode a webhook body into a JSON object, or raise `PayloadError`."""
    return check_structure(body, decode_json(body))


def decode_json(body: bytes) -> dict[str, Any]:
    """The first, cheap step of `decode_body`: the JSON object, with numbers bounded as they are parsed (enough to
    read a body passkey before any other work); raises `PayloadError`."""
    try:
        value = json.loads(body, parse_constant=_not_a_number, parse_float=_finite, parse_int=_bounded_int)
    except UnicodeDecodeError:
        raise PayloadError("body is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise PayloadError(f"body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise PayloadError("body is nested too deeply") from None
    except _NonFinite as error:
        raise PayloadError(f"body holds a number PostgreSQL cannot store (NaN, Infinity or out of range): "
                           f"{error}") from None
    except _HugeInteger as error:
        raise PayloadError(f"body holds an integer of more than {MAX_INTEGER_DIGITS} digits: {error}") from None
    if not isinstance(value, dict):
        raise PayloadError(f"body must be a JSON object, not {type(value).__name__}")
    return value


def check_structure(body: bytes, value: dict[str, Any]) -> dict[str, Any]:
    """The second step of `decode_body`: nesting bounded and text made storable (NUL, lone surrogates)."""
    # Both walks below are skipped when the raw text rules them out (each cost ~3 % of an ingest worker):
    # nesting needs an opening bracket per level; NUL and lone surrogates only come from \u escapes.
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise PayloadError(f"body is nested more than {MAX_DEPTH} levels deep")
    if b"\x00" not in body and b"\\u0000" not in body and b"\\ud" not in body and b"\\uD" not in body:
        return value  # a UTF-16/32 body has NUL bytes: walked
    cleaned: dict[str, Any] = _storable(value)
    return cleaned


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: Any) -> Any:
    """Replace what PostgreSQL text cannot hold — NUL, and lone UTF-16 surrogates (json decodes escapes such as
    \\ud800 into them; proper pairs become one character) — with U+FFFD: keep the message, lose no text."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value


def _optional_string(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PayloadError(f"field '{field}' must be a string")
    text = str(value).strip()
    if len(text) > MAX_ID_LENGTH:
        raise PayloadError(f"field '{field}' is longer than {MAX_ID_LENGTH} characters")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:  # PostgreSQL indexes bytes, not characters
        raise PayloadError(f"field '{field}' is longer than {MAX_ID_BYTES} bytes in UTF-8")
    return text or None


def parse_timestamp(value: Any) -> datetime | None:
    """WATI sends unix seconds as a string; accept a number too. Missing or empty: None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise PayloadError("field 'timestamp' must be unix seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise PayloadError("field 'timestamp' must be unix seconds (a number or a string of digits)") from None
    if not _MIN_TIMESTAMP <= seconds <= _MAX_TIMESTAMP:
        raise PayloadError("field 'timestamp' is out of range for unix seconds")
    return datetime.fromtimestamp(seconds, tz=UTC)


def our_burst_id(local_message_id: Any) -> int | None:
    """The burst id in a localMessageId we set ("123" or "123.2"), or None for anyone else's."""
    if not isinstance(local_message_id, str):
        return None
    match = _OUR_LOCAL_ID.match(local_message_id)
    return int(match.group(1)) if match else None


def _customer_key(body: dict[str, Any]) -> tuple[str | None, str | None]:
    wa_id = _optional_string(body, "waId")
    if wa_id is not None and not _DIGITS.match(wa_id):
        raise PayloadError("field 'waId' must be the customer's number: 5 to 20 digits, no '+'")
    return _optional_string(body, "bsuid") or wa_id, wa_id


def _delivery_update(event_type: str, body: dict[str, Any]) -> DeliveryUpdate | OtherEvent:
    """A report on one of our replies; another event when it is not ours or names no customer (whose reply it
    is could not be checked: anyone can post a localMessageId)."""
    burst_id = our_burst_id(body.get("localMessageId"))
    customer, wa_id = _customer_key(body)
    ids = () if burst_id is not None else _wati_ids(body)
    if (burst_id is None and not ids) or customer is None:
        return OtherEvent(event_type)
    error = None
    if DELIVERY_EVENTS[event_type] == "failed":
        error = f"{body.get('failedCode')}: {body.get('failedDetail')}"[:1000]
    return DeliveryUpdate(burst_id, DELIVERY_EVENTS[event_type], error, customer, wa_id,
                          _optional_string(body, "channelPhoneNumber"), ids)


def _wati_ids(body: dict[str, Any]) -> tuple[str, ...]:
    """The ids by which an event about one of our messages may name it: those a V3 send returns."""
    ids = (_optional_string(body, field) for field in ("localMessageId", "id", "whatsappMessageId"))
    return tuple(dict.fromkeys(value for value in ids if value))


def parse_event(body: dict[str, Any]) -> CustomerMessage | OperatorMessage | DeliveryUpdate | OtherEvent:
    """Classify a decoded webhook body: a customer message to buffer, an operator's message, a delivery report
    on one of our replies, or another event to acknowledge.

    A body with `waId` and `text` and no `eventType` is the old system's form of a customer's text message; with
    no `whatsappMessageId` or `id` it gets a generated one, so a repeated POST of it is stored twice."""
    event_type = body.get("eventType")
    legacy = event_type is None and "waId" in body and "text" in body
    if legacy:  # the old system's form: {"waId", "text"} is a customer's text message
        event_type = "message"
    if not isinstance(event_type, str) or not event_type:
        raise PayloadError("missing field 'eventType'")
    owner = body.get("owner", False)
    if not isinstance(owner, bool):
        raise PayloadError("field 'owner' must be true or false")
    if event_type in DELIVERY_EVENTS:
        return _delivery_update(event_type, body)
    if event_type in OPERATOR_EVENTS or (event_type in CUSTOMER_EVENTS and owner):
        customer, wa_id = _customer_key(body)
        if customer is None:
            return OtherEvent(event_type)
        channel = _optional_string(body, "channelPhoneNumber") or ""
        ours = our_burst_id(body.get("localMessageId"))
        text = body.get("text")
        return OperatorMessage(channel, customer, wa_id, ours, () if ours is not None else _wati_ids(body),
                               text if isinstance(text, str) and text.strip() else None)
    if event_type not in CUSTOMER_EVENTS:
        return OtherEvent(event_type)

    provider_message_id = _optional_string(body, "whatsappMessageId") or _optional_string(body, "id")
    if provider_message_id is None and legacy:
        # The old form carries no message id: each POST is a new message (a repeated POST cannot be recognised).
        provider_message_id = f"legacy.{uuid.uuid4().hex}"
    if provider_message_id is None:
        raise PayloadError("missing field 'whatsappMessageId' (and no 'id' to fall back on)")
    customer, wa_id = _customer_key(body)
    if customer is None:
        raise PayloadError("missing field 'waId' (or 'bsuid')")
    message_type = _optional_string(body, "type") or "text"
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise PayloadError("field 'text' must be a string or null")
    if message_type == "text" and (text is None or not text.strip()):
        raise PayloadError("field 'text' is missing or empty in a text message: there is nothing to answer")
    channel = _optional_string(body, "channelPhoneNumber") or ""
    return CustomerMessage(
        channel=channel,
        customer=customer,
        wa_id=wa_id,
        provider_message_id=provider_message_id,
        wati_id=_optional_string(body, "id"),
        type=message_type,
        text=text,
        wati_timestamp=parse_timestamp(body.get("timestamp")),
        payload=body,
    )


def describe(message_type: str, text: str | None, data: Any) -> str:
    """How one message reads in the agent's prompt: text as is; other types by type, caption and reference."""
    if message_type == "text":
        return text or ""
    parts = [f"[{message_type}"]
    if isinstance(data, str) and data:
        parts.append(f": {data}")
    elif isinstance(data, dict) and data:
        parts.append(": " + json.dumps(data, ensure_ascii=False, sort_keys=True)[:500])
    parts.append("]")
    if text:
        parts.append(f" {text}")
    return "".join(parts)
