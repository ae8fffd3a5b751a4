"""Bad input gets a precise answer and loses nothing: a table of hostile and odd webhook bodies, each with the
status it gets and what it leaves in the database; a property test of the parser; schemathesis over the API.

Issue 13's classes, each with at least three variants against a real server: 1 bodies that made a 500
(test_class_1_…), 2 hostile identifiers and text into a URL, a terminal and the log (test_class_2_…), 3 forged
delivery reports (test_class_3_…), 4 /metrics under load (tests/test_metrics.py, bench/metrics_load.py), 5 slow
and broken clients (test_slow_and_broken_clients_…), 6 oversize bursts and replies (test_oversize_…), 7 CLI
edges (test_class_7_…; more in tests/test_cli.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from tests.conftest import PASSKEY, RunningApp, app_settings, sample
from watibot.payload import CustomerMessage, OtherEvent, PayloadError, decode_body, parse_event

Sql = Callable[..., list[tuple[Any, ...]]]


def body(**changes: Any) -> bytes:
    """The sample customer message with some fields changed (None removes a field)."""
    payload = sample("message-text")
    for key, value in changes.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return json.dumps(payload).encode()


@dataclass
class Case:
    name: str
    content: bytes
    status: int
    stored_texts: list[str | None] = field(default_factory=list)
    content_type: str = "application/json"
    detail: str | None = None
    answer: str | None = None


def nested(depth: int) -> bytes:
    """The sample message with `data` nested `depth` levels deep, built as text (too deep for json.dumps)."""
    head = json.dumps(sample("message-text"))[:-1]
    return f'{head}, "data": {"[" * depth}{"]" * depth}}}'.encode()


def with_raw(field: str, raw: str) -> bytes:
    """The sample message with `field` set to a raw JSON token (numbers json.dumps cannot or would not write)."""
    head = json.dumps({k: v for k, v in sample("message-text").items() if k != field})[:-1]
    return f'{head}, "{field}": {raw}}}'.encode()


TEXT = sample("message-text")["text"]
CASES = [
    Case("integer of 5,000 digits", with_raw("x", "1" + "0" * 4999), 422, detail="more than 100 digits"),
    Case("negative integer of 5,000 digits", with_raw("x", "-" + "9" * 5000), 422, detail="more than 100 digits"),
    Case("timestamp of 400 digits", with_raw("timestamp", "1" + "0" * 399), 422, detail="more than 100 digits"),
    Case("timestamp of 60 digits (beyond unix seconds)", with_raw("timestamp", "1" + "0" * 59), 422,
         detail="out of range"),
    Case("timestamp string 1e400", body(timestamp="1e400"), 422, detail="field 'timestamp'"),
    Case("bsuid of 512 CJK characters", body(bsuid="界" * 512), 422, detail="field 'bsuid' is longer than 600 bytes"),
    Case("channelPhoneNumber of 512 CJK characters", body(channelPhoneNumber="界" * 512), 422,
         detail="field 'channelPhoneNumber' is longer than 600 bytes"),
    Case("message id of 300 CJK characters", body(whatsappMessageId="界" * 300), 422,
         detail="field 'whatsappMessageId' is longer than 600 bytes"),
    Case("non-JSON", b"hello there", 422, detail="not valid JSON"),
    Case("empty body", b"", 422, detail="not valid JSON"),
    Case("invalid UTF-8", b'{"text": "\xff\xfe"}', 422, detail="not UTF-8"),
    Case("JSON array", b"[1, 2, 3]", 422, detail="JSON object, not list"),
    Case("JSON string", b'"message"', 422, detail="JSON object, not str"),
    Case("missing eventType (no waId and text: not the old system's form)", body(eventType=None, text=None), 422,
         detail="missing field 'eventType'"),
    Case("the old system's form: waId and text, no eventType", body(eventType=None), 200, [TEXT],
         answer="buffered"),
    Case("the old system's form with no message id", b'{"waId": "50376819621", "text": "Message 1"}', 200,
         ["Message 1"], answer="buffered"),
    Case("missing waId", body(waId=None), 422, detail="missing field 'waId'"),
    Case("waId with letters", body(waId="5037abc9621"), 422, detail="field 'waId' must be"),
    Case("waId with plus sign", body(waId="+50376819621"), 422, detail="field 'waId' must be"),
    Case("missing both message ids", body(whatsappMessageId=None, id=None), 422, detail="whatsappMessageId"),
    Case("message id too long", body(whatsappMessageId="w" * 600), 422, detail="longer than 512"),
    Case("text is a number", body(text=42), 422, detail="field 'text' must be a string"),
    Case("owner is a string", body(owner="false"), 422, detail="field 'owner' must be true or false"),
    Case("timestamp is a word", body(timestamp="yesterday"), 422, detail="field 'timestamp'"),
    Case("timestamp out of range", body(timestamp="99999999999"), 422, detail="out of range"),
    Case("nested 33 levels", nested(33), 422, detail="nested more than 32 levels"),
    Case("nested 5000 levels", nested(5000), 422),
    Case("wrong content type and not JSON", b"waId=1&text=hi", 415, content_type="application/x-www-form-urlencoded",
         detail="application/json"),
    Case("JSON declared as text/plain", body(), 200, [TEXT], content_type="text/plain", answer="buffered"),
    Case("JSON declared as form-encoded (curl -d)", body(), 200, [TEXT],
         content_type="application/x-www-form-urlencoded", answer="buffered"),
    Case("oversized body", body(text="x" * 300_000), 413, detail="larger than"),
    Case("empty text", body(text=""), 422, detail="field 'text' is missing or empty in a text message"),
    Case("text message without text", body(text=None), 422, detail="field 'text' is missing or empty"),
    Case("text message with blank text", body(text=" \n "), 422, detail="field 'text' is missing or empty"),
    Case("null text (media without caption)", body(text=None, type="image", data="data/images/a.jpg"), 200,
         [None], answer="buffered"),
    Case("5,000-character text", body(text="a" * 5000), 200, ["a" * 5000], answer="buffered"),
    Case("emoji, RTL and combining characters", body(text="👍🏽 مرحبا שלום e\u0301 \u202e"), 200,
         ["👍🏽 مرحبا שלום e\u0301 \u202e"], answer="buffered"),
    Case("NUL bytes in text", body(text="a\u0000b"), 200, ["a\ufffdb"], answer="buffered"),
    Case("lone UTF-16 surrogate in text", body(text="a\ud800b"), 200, ["a\ufffdb"], answer="buffered"),
    Case("NaN in the body", body(data=float("nan")), 422, detail="cannot store (NaN, Infinity"),
    Case("number beyond a double", json.dumps(sample("message-text"))[:-1].encode() + b', "data": 1e999}', 422,
         detail="cannot store (NaN, Infinity or out of range): 1e999"),
    Case("timestamp as a number", body(timestamp=1762478993), 200, [TEXT], answer="buffered"),
    Case("timestamp as a string", body(timestamp="1762478993"), 200, [TEXT], answer="buffered"),
    Case("timestamp missing", body(timestamp=None), 200, [TEXT], answer="buffered"),
    Case("owner true (an operator's message: pauses the bot)", body(owner=True), 200, answer="paused"),
    Case("unknown eventType", body(eventType="somethingNew"), 200, answer="ignored"),
    Case("message_bsuid without waId", json.dumps(sample("message-bsuid")).encode(), 200, ["Hello again"],
         answer="buffered"),
    Case("a huge number of fields", json.dumps({**sample("message-text"),
                                                **{f"field{n}": n for n in range(10_000)}}).encode(), 200,
         [TEXT], answer="buffered"),
    Case("charset in content type", body(), 200, [TEXT], content_type="application/json; charset=utf-8",
         answer="buffered"),
]


@pytest.fixture
def app(run_app: Callable[..., RunningApp], database_url: str) -> RunningApp:
    return run_app(app_settings(database_url, sweeper=False, buffer_seconds=60))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_table(app: RunningApp, sql: Sql, case: Case) -> None:
    """Each body gets its precise status and message, and the database holds exactly what was valid."""
    response = app.client.post("/webhook", content=case.content, params={"passkey": PASSKEY},
                               headers={"content-type": case.content_type})
    assert response.status_code == case.status, response.text
    if case.detail is not None:
        assert case.detail in response.json()["detail"]
    if case.answer is not None:
        assert response.json() == {"status": case.answer}
    assert [row[0] for row in sql("SELECT text FROM watibot.message ORDER BY id")] == case.stored_texts


def test_duplicate_and_out_of_order_deliveries(app: RunningApp, sql: Sql) -> None:
    """A duplicate id is stored once; an older message delivered later is stored and ordered by its timestamp."""
    newer = sample("message-text", whatsappMessageId="wamid.new", text="newer", timestamp="1762479000")
    older = sample("message-text", whatsappMessageId="wamid.old", text="older", timestamp="1762478000")
    assert app.post(newer).json() == {"status": "buffered"}
    assert app.post(older).json() == {"status": "buffered"}
    assert app.post(newer).json() == {"status": "duplicate"}
    assert sql("SELECT text FROM watibot.message ORDER BY wati_timestamp") == [("older",), ("newer",)]


def test_lying_content_length_stores_nothing(app: RunningApp, sql: Sql) -> None:
    """A Content-Length smaller than the body sent: the server reads only what was declared, which is not valid."""
    import socket

    payload = body(text="x" * 1000)
    request = (f"POST /webhook?passkey={PASSKEY} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: 20\r\nConnection: close\r\n\r\n").encode() + payload
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as connection:
        connection.sendall(request)
        answer = connection.recv(65536).decode(errors="replace")
    assert answer.split(" ")[1] in {"400", "422"}
    assert sql("SELECT count(*) FROM watibot.message") == [(0,)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
WATI_KEYS = ["eventType", "owner", "waId", "bsuid", "whatsappMessageId", "id", "text", "type", "timestamp",
             "channelPhoneNumber", "data"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(WATI_KEYS) | st.text(max_size=10), json_values, max_size=12))
def test_parser_accepts_or_explains_any_json_object(value: dict[str, Any]) -> None:
    """For any JSON object the parser returns an event or a PayloadError — never another exception."""
    try:
        event = parse_event(decode_body(json.dumps(value).encode()))
    except PayloadError as error:
        assert str(error)
    else:
        assert isinstance(event, CustomerMessage | OtherEvent)


@settings(max_examples=200, deadline=None)
@given(
    wa_id=st.from_regex(r"[0-9]{5,20}", fullmatch=True),
    text=st.text().filter(lambda s: s.strip() != ""),
    message_id=st.text(min_size=1, max_size=100).filter(lambda s: s.strip() != ""),
    timestamp=st.integers(min_value=946_684_800, max_value=4_102_444_800),
)
def test_parser_keeps_every_customer_message_intact(wa_id: str, text: str, message_id: str, timestamp: int) -> None:
    """Any well-formed customer message parses, with its text kept (NUL replaced) and its ids unchanged."""
    raw = {"eventType": "message", "owner": False, "waId": wa_id, "whatsappMessageId": message_id, "text": text,
           "timestamp": str(timestamp)}
    event = parse_event(decode_body(json.dumps(raw).encode()))
    assert isinstance(event, CustomerMessage)
    assert event.customer == wa_id
    assert event.provider_message_id == message_id.replace("\x00", "\ufffd").strip()
    assert event.text == text.replace("\x00", "\ufffd")
    assert event.wati_timestamp is not None and int(event.wati_timestamp.timestamp()) == timestamp


# -- 5. slow and broken clients, against a real `watibot serve` over raw sockets ---------------------------------

@dataclass
class SlowClient:
    name: str
    head: bytes  # request line and headers, without the blank line
    sent: bytes  # what of the body is sent before the client stalls or goes away
    then: str  # "stall": wait for the answer; "close": FIN; "reset": RST


def _head(length: int | None, *, chunked: bool = False, passkey_in_query: bool = True) -> bytes:
    target = f"/webhook?passkey={PASSKEY}" if passkey_in_query else "/webhook"
    lines = [f"POST {target} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


SLOW_BODY = body(text="slow " * 200)
SLOW_CLIENTS = [
    SlowClient("declares 5000 bytes, sends 100 and stalls", _head(5000), SLOW_BODY[:100], "stall"),
    SlowClient("declares 300 bytes, sends none and stalls", _head(300), b"", "stall"),
    SlowClient("chunked, one chunk then stalls", _head(None, chunked=True), b"10\r\n" + SLOW_BODY[:16] + b"\r\n",
               "stall"),
    SlowClient("declares 5000 bytes, sends 100 and closes", _head(5000), SLOW_BODY[:100], "close"),
    SlowClient("declares 5000 bytes, sends 4000 and resets", _head(5000), SLOW_BODY[:4000], "reset"),
    SlowClient("passkey in the body, sends half and closes", _head(len(SLOW_BODY), passkey_in_query=False),
               SLOW_BODY[: len(SLOW_BODY) // 2], "close"),
]


def _play(port: int, client: SlowClient) -> bytes:
    """Send the client's bytes; for a stall, read until the server closes (20 s deadline) and return it all."""
    import socket
    import struct

    connection = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        connection.sendall(client.head + client.sent)
        if client.then == "stall":
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
            return received
        if client.then == "reset":
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return b""
    finally:
        connection.close()


@pytest.mark.processes
def test_slow_and_broken_clients_get_408_or_one_debug_line(
    serve: Callable[..., Any], database_url: str, sql: Sql
) -> None:
    """A body that stalls gets 408 within WATIBOT_WEBHOOK_BODY_TIMEOUT_SECONDS and its connection closed; a client
    gone mid-body is one debug line; nothing is stored and the log holds no traceback or error."""
    from tests.conftest import serve_environment, wait_until

    process = serve(serve_environment(database_url, None, WATIBOT_WEBHOOK_BODY_TIMEOUT_SECONDS="1",
                                      WATIBOT_SWEEPER="false", WATIBOT_LOG_LEVEL="debug"), workers=1)
    for client in SLOW_CLIENTS:
        started = time.monotonic()
        received = _play(process.port, client)
        if client.then == "stall":
            assert received.startswith(b"HTTP/1.1 408 "), (client.name, received[:200])
            assert b"body not received within 1 s" in received
            assert b"connection: close" in received.lower()
            assert time.monotonic() - started < 15, client.name  # answered at the timeout, then closed
        else:
            assert received == b""
    gone = sum(client.then != "stall" for client in SLOW_CLIENTS)

    def disconnect_lines() -> int | None:
        lines = process.log_path.read_text().count("webhook answered 400 disconnected")
        return lines if lines >= gone else None

    assert wait_until(disconnect_lines, timeout=20, what="a debug line per client gone") == gone
    log = process.log_path.read_text()
    assert log.count("webhook answered 408 body_timeout") == len(SLOW_CLIENTS) - gone
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert sql("SELECT count(*) FROM watibot.message") == [(0,)]


# -- 6. oversize bursts and replies: what the agent reads and what is sent are capped ----------------------------

@dataclass
class Oversize:
    name: str
    texts: list[str]  # the burst's messages, oldest first
    caps: dict[str, int]
    reply: str | None  # the agent's reply; None: the fake agent's echo of the texts it got
    agent_texts: list[str]  # what the agent receives
    marker: str | None  # the prompt's first line
    sent_parts: int
    truncated: bool  # the last part sent ends with the marker


LONG_REPLY = " ".join(f"word{number}" for number in range(4000))  # ~35k characters: 9 parts
OVERSIZE = [
    Oversize("12 messages, 5 allowed", [f"m{n:02d}" for n in range(12)], {"burst_max_messages": 5}, "ok",
             [f"m{n:02d}" for n in range(7, 12)],
             "[watibot: 7 earlier messages of this burst (21 characters) left out, the newest 5 follow]", 1, False),
    Oversize("6 messages of 50 characters, 120 allowed", [str(n) * 50 for n in range(6)], {"burst_max_chars": 120},
             "ok", ["4" * 50, "5" * 50],
             "[watibot: 4 earlier messages of this burst (200 characters) left out, the newest 2 follow]", 1, False),
    Oversize("one message of 500 characters, 100 allowed", ["x" * 500], {"burst_max_chars": 100}, "ok", ["x" * 100],
             "[watibot: the last message is cut to its first 100 of 500 characters]", 1, False),
    Oversize("a 9-part reply, 2 parts allowed", ["tell me everything"], {"reply_max_parts": 2}, LONG_REPLY,
             ["tell me everything"], None, 2, True),
    Oversize("a 9-part reply, 1 part allowed", ["tell me everything"], {"reply_max_parts": 1}, LONG_REPLY,
             ["tell me everything"], None, 1, True),
    Oversize("a 9-part reply, 9 parts allowed", ["tell me everything"], {"reply_max_parts": 9}, LONG_REPLY,
             ["tell me everything"], None, 9, False),
]


@pytest.mark.parametrize("case", OVERSIZE, ids=[case.name for case in OVERSIZE])
def test_oversize_bursts_and_replies_are_capped(
    run_app: Callable[..., RunningApp], database_url: str, sql: Sql, case: Oversize, fake_wati: Any, fake_agent: Any
) -> None:
    """The agent reads the newest messages within the caps after a marker line, every message is consumed, and a
    reply past WATIBOT_REPLY_MAX_PARTS is cut with a marker; the stored prompt and reply_parts show the caps."""
    from tests.conftest import customer_message, wait_until
    from tests.fakes import Answer

    if case.reply is not None:
        fake_agent.default = lambda request: Answer(body={"reply": case.reply})
    # Posted to a worker without a sweeper, answered by one started afterwards: one burst, whatever the timing.
    first = run_app(app_settings(database_url, fake_wati, sweeper=False))
    now = int(time.time())
    for number, text in enumerate(case.texts):
        assert first.post(customer_message("50376819621", text, f"wamid.over.{number}",
                                           timestamp=str(now - 60 + number))).status_code == 200
    run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url, **case.caps))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("sent",)], timeout=30, what="the burst sent")
    (request,) = fake_agent.requests
    assert [message["text"] for message in request["json"]["messages"]] == case.agent_texts
    prompt_lines = request["json"]["prompt"].split("\n")
    if case.marker is None:
        assert prompt_lines == case.agent_texts
    else:
        assert prompt_lines == [case.marker, *case.agent_texts]
    sent = fake_wati.sent
    assert len(sent) == case.sent_parts
    assert all(len(message["text"]) <= 4096 for message in sent)
    assert sent[-1]["text"].endswith("\n[…]") == case.truncated
    (prompt, reply, parts, messages), = sql("SELECT prompt, reply, reply_parts, messages FROM watibot.burst")
    assert (prompt, parts, messages) == (request["json"]["prompt"], case.sent_parts, len(case.texts))
    assert reply == (case.reply or "")
    assert sql("SELECT last_position, answered_position FROM watibot.conversation") == \
        [(len(case.texts), len(case.texts))], "every message consumed by the burst"


# -- the classes (issue 13), each against a real `watibot serve` with its log ------------------------------
# Class 4 (/metrics load) is bench/metrics_load.py and tests/test_metrics.py; class 5 is
# test_slow_and_broken_clients_get_408_or_one_debug_line and class 6 test_oversize_bursts_and_replies_are_capped
# above; class 7 is test_cli_edges_are_usage_errors below. Elsewhere, with more variants: class 2 in
# tests/test_security.py (WATI path), test_operators.py (terminal), test_logs.py (log lines); class 3 in
# test_conversations.py; class 7 in test_cli.py.

@dataclass
class Hostile:
    name: str
    payload: bytes
    status: int
    answer: dict[str, str] | None = None
    passkey_in_query: bool = True


def raw_event(event: dict[str, Any], **raw: str) -> bytes:
    """`event` as JSON with fields set to raw JSON tokens (numbers json.dumps cannot or would not write)."""
    head = json.dumps({key: value for key, value in event.items() if key not in raw})[:-1]
    return (head + "".join(f', "{key}": {value}' for key, value in raw.items()) + "}").encode()


CLASS_1 = [  # bodies that made a 500 an anonymous sender could trigger
    Hostile("integer of 5,000 digits", with_raw("x", "1" + "0" * 4999), 422),
    Hostile("timestamp integer of 400 digits", with_raw("timestamp", "9" * 400), 422),
    Hostile("bsuid of 512 CJK characters", body(bsuid="界" * 512), 422),
    Hostile("channelPhoneNumber of 512 CJK characters", body(channelPhoneNumber="界" * 512), 422),
    Hostile("integer of 5,000 digits, passkey in the body", raw_event(
        {**sample("message-text"), "passkey": PASSKEY}, x="1" + "0" * 4999), 401, passkey_in_query=False),
    Hostile("bsuid of 512 CJK characters, no passkey at all", body(bsuid="界" * 512), 401, passkey_in_query=False),
    Hostile("nested 33 levels, a wrong passkey in the body", nested(33).replace(b'{', b'{"passkey": "wrong", ', 1),
            401, passkey_in_query=False),
]


def _serve_with_log(serve: Callable[..., Any], database_url: str, wati: Any) -> Any:
    from tests.conftest import serve_environment

    return serve(serve_environment(database_url, wati, WATIBOT_LOG_LEVEL="debug"), workers=1)


def _post(url: str, case: Hostile) -> Any:
    import httpx

    return httpx.post(f"{url}/webhook", content=case.payload, headers={"content-type": "application/json"},
                      params={"passkey": PASSKEY} if case.passkey_in_query else {}, timeout=10)


def _no_traceback(process: Any) -> str:
    """The serve log, asserting it holds no traceback and no line logged at ERROR."""
    import re

    log: str = process.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if re.match(r"^\S+ \S+ ERROR ", line)], log[-3000:]
    return log


@pytest.mark.processes
def test_class_1_bodies_that_made_a_500_get_a_precise_4xx_and_store_nothing(
    serve: Callable[..., Any], database_url: str, sql: Sql, fake_wati: Any
) -> None:
    """Huge integers, out-of-range timestamps and identifiers too big for the index get 422 with a passkey, 401
    without; nothing is stored or sent, and the serve log holds no traceback or error."""
    process = _serve_with_log(serve, database_url, fake_wati)
    for case in CLASS_1:
        response = _post(process.url, case)
        assert response.status_code == case.status, (case.name, response.text)
        assert "detail" in response.json()
    assert sql("SELECT count(*) FROM watibot.message") == [(0,)]
    assert sql("SELECT count(*) FROM watibot.conversation") == [(0,)]
    assert fake_wati.requests == []
    _no_traceback(process)


@pytest.mark.processes
def test_class_2_hostile_identifiers_and_text_reach_no_url_terminal_or_log_line(
    serve: Callable[..., Any], database_url: str, sql: Sql, fake_wati: Any
) -> None:
    """A bsuid with `../`, `?`, `#` or a newline and a text with markup and ESC are stored as given (200), reach
    WATI as one escaped path segment, forge no log line, and print literally in `watibot conversation`."""
    from urllib.parse import unquote

    from tests.conftest import wait_until
    from tests.fakes import FakeWati
    from tests.test_cli import watibot

    hostile_ids = ["../../../evil/x?messageText=INJECTED&localMessageId=9#",
                   "x\n2026-01-01 00:00:00,000 ERROR watibot.forged[1]: FORGED LINE",
                   "a/b/../../sendTemplateMessage"]
    hostile_text = "[/] [link=https://e.example]x[/link] \x1b[2J [bold red]URGENT[/]"
    process = _serve_with_log(serve, database_url, fake_wati)
    now = int(time.time())
    for number, bsuid in enumerate(hostile_ids):
        event = sample("message-bsuid", bsuid=bsuid, whatsappMessageId=f"wamid.class2.{number}", text=hostile_text,
                       timestamp=str(now))
        response = _post(process.url, Hostile("", json.dumps(event).encode(), 200))
        assert response.json() == {"status": "buffered"}
    fake_wati.wait_for_sent(len(hostile_ids))
    prefix = f"/{FakeWati.TENANT}/api/v1/sendSessionMessage/"
    segments = sorted(unquote(request["path"].removeprefix(prefix)) for request in fake_wati.requests)
    assert all(request["path"].startswith(prefix) and request["path"].count("/") == prefix.count("/")
               for request in fake_wati.requests)
    assert segments == sorted(hostile_ids)
    assert sorted(row[0] for row in sql("SELECT customer FROM watibot.conversation")) == sorted(hostile_ids)
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(3,)], what="sent")
    log = _no_traceback(process)
    forged = [line for line in log.splitlines() if line.startswith("2026-01-01")]
    assert forged == [], "a bsuid's newline forged a log line"
    assert "x\\n2026-01-01 00:00:00,000 ERROR watibot.forged[1]: FORGED LINE" in log  # spelled out, in its line
    assert "\x1b" not in log
    story = watibot("conversation", hostile_ids[0], env={"WATIBOT_DATABASE_URL": database_url})
    assert story.returncode == 0 and "Traceback" not in story.stderr, story.stderr
    assert "\x1b" not in story.stdout and "[/]" in story.stdout


@pytest.mark.processes
def test_class_3_forged_delivery_reports_move_no_other_customers_burst(
    serve: Callable[..., Any], database_url: str, sql: Sql, fake_wati: Any
) -> None:
    """Failure reports carrying a real localMessageId but naming another customer, nobody, or another channel are
    answered `ignored`: the burst stays sent, replay still refuses it, and the customer gets no second reply."""
    from tests.conftest import customer_message, wait_until
    from tests.test_cli import watibot

    process = _serve_with_log(serve, database_url, fake_wati)
    assert _post(process.url, Hostile("", json.dumps(customer_message("50376819621", "hi")).encode(), 200)).json() \
        == {"status": "buffered"}
    (sent,) = fake_wati.wait_for_sent(1)
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("sent",)], what="the burst sent")
    forged = [{"waId": "50376819699"}, {"waId": None}, {"channelPhoneNumber": "50399999999"},
              {"waId": "50376819699", "channelPhoneNumber": None, "localMessageId": "1"}]
    for changes in forged:
        report = sample("session-message-failed", localMessageId=sent["local_message_id"], waId="50376819621",
                        channelPhoneNumber="50322220000")
        report.update(changes)
        report = {key: value for key, value in report.items() if value is not None}
        response = _post(process.url, Hostile("", json.dumps(report).encode(), 200))
        assert response.json() == {"status": "ignored"}, changes
    assert sql("SELECT status, delivery_status FROM watibot.burst") == [("sent", None)]
    (burst_id,) = sql("SELECT id FROM watibot.burst")[0]
    replay = watibot("replay", str(burst_id), env={"WATIBOT_DATABASE_URL": database_url})
    assert replay.returncode != 0 and "Traceback" not in replay.stderr
    assert len(fake_wati.sent) == 1 and sql("SELECT count(*) FROM watibot.burst") == [(1,)]
    _no_traceback(process)


CLI_EDGES = [  # class 7: each is a usage error (exit 2) that touches nothing
    ["replay", "999999999999999999999"],
    ["dead", "--limit", "99999999999999999999"],
    ["prune", "--older-than", "30d", "--batch-size", "99999999999999999999"],
    ["prune", "--older-than", "99999999999d"],
    ["conversation", "\udcff\udcfe"],
]


def test_class_7_cli_edges_are_usage_errors(database_url: str, sql: Sql) -> None:
    """Huge ids, limits, batch sizes and ages and a customer that is not UTF-8 exit 2 with a usage message and no
    traceback, and the database is unchanged; migrating back is refused with exit 1 and the schema stays."""
    from tests.test_cli import watibot
    from watibot import db

    snapshot = "SELECT (SELECT count(*) FROM watibot.burst), (SELECT count(*) FROM watibot.message), " \
               "(SELECT version_num FROM watibot.alembic_version)"
    before = sql(snapshot)
    for args in CLI_EDGES:
        result = watibot(*args, env={"WATIBOT_DATABASE_URL": database_url})
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and "error: argument" in result.stderr, args
    for revision in ("0001_core", "base", "no_such_revision"):
        result = watibot("migrate", revision, env={"WATIBOT_DATABASE_URL": database_url})
        assert result.returncode != 0 and "Traceback" not in result.stderr, (revision, result.stderr)
    assert sql(snapshot) == before == [(0, 0, db.SCHEMA_REVISION)]
