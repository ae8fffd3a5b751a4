"""The outside world for tests: a fake WATI API and a fake agent, each a real HTTP server on 127.0.0.1.

Each runs a `ThreadingHTTPServer` in a thread, records what it receives, and answers by a script that a test
can change. `wait_for` blocks on a condition with a deadline (no sleeps as synchronisation).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Answer:
    """How the fake answers one request."""

    status: int = 200
    body: Any = None  # a JSON value, or a function of the request returning one
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hang_until: threading.Event | None = None
    raw: bytes | None = None  # sent as is (text/html), instead of `body` as JSON: a gateway's page
    record: bool | None = None  # FakeWati: whether the message enters WATI's history (None: when accepted)
    drop: bool = False  # close the connection instead of answering (after recording, if `record`)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients killed mid-request (the fault tests do that) are expected: stay quiet about them."""


class FakeHttpServer:
    """Base: records requests, answers by `script` (a list consumed first) then `default`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.arrivals: list[dict[str, Any]] = []  # recorded on receipt, before the answer
        self.script: list[Answer] = []
        self.default: Callable[[dict[str, Any]], Answer] = lambda request: Answer()
        self._condition = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                split = urlsplit(self.path)
                request = {
                    "path": split.path,
                    "query": {key: values[0] for key, values in parse_qs(split.query).items()},
                    "headers": {name.lower(): value for name, value in self.headers.items()},  # case-insensitive
                    "json": json.loads(raw) if raw else None,
                    "received": time.monotonic(),
                }
                with fake._condition:
                    fake.arrivals.append(request)
                    fake._condition.notify_all()
                    answer = fake.script.pop(0) if fake.script else fake.default(request)
                if answer.hang_until is not None:
                    answer.hang_until.wait(60)
                if answer.delay:
                    time.sleep(answer.delay)
                body = answer.body(request) if callable(answer.body) else answer.body
                with fake._condition:
                    request["status"] = answer.status
                    request["response"] = body
                    fake.received(request, answer)
                    fake.requests.append(request)
                    fake._condition.notify_all()
                if answer.drop:
                    self.close_connection = True  # no answer at all: the client sees the connection end
                    return
                payload = answer.raw if answer.raw is not None else json.dumps(
                    body if body is not None else {"result": True}).encode()
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-type", "text/html" if answer.raw is not None else "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:
                split = urlsplit(self.path)
                status, body = fake.get(split.path, {key: values[0] for key, values in parse_qs(split.query).items()})
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def received(self, request: dict[str, Any], answer: Answer) -> None:
        """Called under the lock once the answer is chosen, before it is sent (subclasses keep state)."""

    def get(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        """The answer to a GET: (status, JSON body)."""
        return 404, {"error": "not found"}

    def __enter__(self) -> FakeHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0,
                 arrived: bool = False) -> list[dict[str, Any]]:
        """Wait until `predicate(requests)` holds (answered requests, or received ones with `arrived`)."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while not predicate(self.arrivals if arrived else self.requests):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"condition not met within {timeout} s; requests so far: {self.requests}")
                self._condition.wait(remaining)
            return list(self.arrivals if arrived else self.requests)


class FakeWati(FakeHttpServer):
    """WATI's send APIs as its documentation describes them: v1 `POST /{tenant}/api/v1/sendSessionMessage/{target}`
    (text, localMessageId and channelPhoneNumber in the query) and V3 `POST /api/ext/v3/conversations/messages/text`
    (JSON `{"target", "text"}`, `target` a phone or `channel:phone`; answers the message with its `id` and
    `local_message_id`, and 409 when the contact has several open conversations and no channel is named).
    Templates: v1 `POST /{tenant}/api/v1/sendTemplateMessage?whatsappNumber=…` and V3 `POST
    /api/ext/v3/messageTemplates/send`. `sent` lists the messages WATI accepted, by either API."""

    TENANT = "1234"
    V3_SEND = "/api/ext/v3/conversations/messages/text"
    V1_TEMPLATE = f"/{TENANT}/api/v1/sendTemplateMessage"
    V3_TEMPLATE = "/api/ext/v3/messageTemplates/send"

    def __init__(self) -> None:
        super().__init__()
        self.several_open: set[str] = set()  # contacts with open conversations on several of our numbers
        self.default = self.answer
        self.history: dict[str, list[dict[str, Any]]] = {}  # contact -> the messages WATI holds, oldest first
        self.history_status = 200  # another status makes the message history unavailable
        self.history_requests: list[dict[str, Any]] = []

    def received(self, request: dict[str, Any], answer: Answer) -> None:
        """A send WATI took enters the contact's history (also when the answer is then lost or a gateway's)."""
        request["recorded"] = answer.record if answer.record is not None else self.accepted(request)
        if not request["recorded"]:
            return
        message = self._message(request)
        entry = {"id": (message["ids"] or [uuid.uuid4().hex[:24]])[0], "text": message["text"], "owner": True,
                 "created": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "type": "text",
                 "channelPhoneNumber": message["channel"]}
        if message.get("template"):
            entry.update(type="template", template=message["template"])
        if request["path"] in (self.V3_SEND, self.V3_TEMPLATE):
            entry["local_message_id"] = message["ids"][1] if len(message["ids"]) > 1 else str(uuid.uuid4())
        else:
            entry["localMessageId"] = message["local_message_id"] or str(uuid.uuid4())
        self.history.setdefault(message["wa_id"], []).append(entry)

    def get(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        """The message history: v1 `GET /{tenant}/api/v1/getMessages/{phone}` (`messages.items`, newest first)
        and V3 `GET /api/ext/v3/conversations/{target}/messages` (`messages`, newest first)."""
        with self._condition:
            self.history_requests.append({"path": path, "query": query})
            if self.history_status != 200:
                return self.history_status, {"error": "history unavailable"}
            v1 = f"/{self.TENANT}/api/v1/getMessages/"
            v3 = re.fullmatch(r"/api/ext/v3/conversations/([^/]+)/messages", path)
            if path.startswith(v1):
                items = list(reversed(self.history.get(unquote(path.removeprefix(v1)), [])))
                return 200, {"result": "success", "messages": {"items": items, "total": len(items)}}
            if v3:
                channel, _, wa_id = unquote(v3.group(1)).rpartition(":")
                items = [item for item in reversed(self.history.get(wa_id, []))
                         if not channel or item["channelPhoneNumber"] in (channel, None)]
                return 200, {"messages": items}
            return 404, {"error": "not found"}

    @property
    def api_url(self) -> str:
        return f"{self.url}/{self.TENANT}"

    def answer(self, request: dict[str, Any]) -> Answer:
        """WATI's answer to a send the test did not script."""
        if request["path"] == self.V3_TEMPLATE:
            return Answer(body={"success": True, "broadcast_id": uuid.uuid4().hex[:24], "recipients": [
                {"target": recipient["target"], "local_message_id": recipient.get("local_message_id")}
                for recipient in request["json"]["recipients"]]})
        if request["path"] != self.V3_SEND:
            return Answer(body={"result": True, "info": "Message sent"})
        target = request["json"]["target"]
        if ":" not in target and target in self.several_open:
            return Answer(409, {"error": "The contact has more than one open conversation: use channel:phone"})
        return Answer(body=lambda request: {"message": {"id": uuid.uuid4().hex[:24],
                                                        "local_message_id": str(uuid.uuid4()),
                                                        "text": request["json"]["text"]}})

    @staticmethod
    def accepted(request: dict[str, Any]) -> bool:
        """WATI took the message: a 200 whose body is not `"result": false`, or a send it recorded whatever the
        client then saw (a dropped connection, a gateway's 502)."""
        if "recorded" in request:
            return bool(request["recorded"])
        response = request.get("response")
        return request["status"] == 200 and not (isinstance(response, dict) and response.get("result") is False)

    @property
    def sent(self) -> list[dict[str, Any]]:
        with self._condition:
            return [self._message(request) for request in self.requests if self.accepted(request)]

    def _message(self, request: dict[str, Any]) -> dict[str, Any]:
        """One send as WATI took it; a template send (v1 `sendTemplateMessage?whatsappNumber=…` with JSON
        `{"template_name", "broadcast_name", "parameters", "channel_number"}`, or V3 `messageTemplates/send` with
        one recipient) has no text and names its `template` and `parameters`."""
        if request["path"] in (self.V1_TEMPLATE, self.V3_TEMPLATE):
            body = request["json"]
            if request["path"] == self.V1_TEMPLATE:
                wa_id, channel = request["query"]["whatsappNumber"], body.get("channel_number")
                parameters, local_id = body.get("parameters", []), None
            else:
                (recipient,) = body["recipients"]
                channel, _, wa_id = recipient["target"].rpartition(":")
                parameters, local_id = recipient.get("custom_params", []), recipient.get("local_message_id")
            return {"api": "v3" if request["path"] == self.V3_TEMPLATE else "v1", "wa_id": wa_id,
                    "channel": channel or None, "text": None, "local_message_id": local_id, "ids": [],
                    "template": body["template_name"], "broadcast_name": body["broadcast_name"],
                    "parameters": parameters}
        if request["path"] == self.V3_SEND:
            target = request["json"]["target"]
            channel, _, wa_id = target.rpartition(":")
            response = request.get("response")
            message = (response.get("message") if isinstance(response, dict) else None) or {}
            return {"api": "v3", "wa_id": wa_id, "channel": channel or None, "text": request["json"]["text"],
                    "local_message_id": None, "ids": [message[key] for key in ("id", "local_message_id")
                                                      if key in message]}
        return {
            "api": "v1",
            "wa_id": request["path"].rsplit("/", 1)[-1],
            "text": request["query"].get("messageText"),
            "local_message_id": request["query"].get("localMessageId"),
            "channel": request["query"].get("channelPhoneNumber"),
            "ids": [],
        }

    def wait_for_sent(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        self.wait_for(lambda requests: sum(1 for r in requests if self.accepted(r)) >= count, timeout)
        return self.sent


def echo_reply(request: dict[str, Any]) -> dict[str, str]:
    """An agent answer that lists each message's text on a numbered line, so that tests/invariants.py can trace
    every reply back to the messages it answers."""
    lines = (f"{n}. {message['text']}" for n, message in enumerate(request["json"]["messages"], 1))
    return {"reply": "Received:\n" + "\n".join(lines)}


class FakeAgent(FakeHttpServer):
    """An HTTP agent: by default replies with the texts it got, joined by ' | '."""

    def __init__(self) -> None:
        super().__init__()
        self.default = lambda request: Answer(
            body={"reply": " | ".join(message["text"] or "" for message in request["json"]["messages"])}
        )
