"""Secrets stay secret, only the authenticated webhook changes state, and no SQL is built from strings."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import PASSKEY, ServeProcess, customer_message, serve_environment, wait_until
from tests.fakes import Answer, FakeAgent, FakeWati
from watibot.app import create_app

SOURCE = Path(__file__).resolve().parents[1] / "src" / "watibot"
WATI_TOKEN = "test-wati-token-secret"
Sql = Callable[..., list[tuple[Any, ...]]]


def test_no_secret_appears_in_logs_or_error_bodies(
    serve: Callable[..., ServeProcess], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """At debug level, through accepted and refused webhooks and failing WATI calls, no passkey or token is logged."""
    fake_wati.default = lambda request: Answer(status=401, body={"error": "unauthorized"})
    process = serve(serve_environment(database_url, fake_wati, WATIBOT_LOG_LEVEL="debug", WATIBOT_AGENT="http",
                                      WATIBOT_AGENT_URL=fake_agent.url), workers=1)
    bodies = []
    for passkey in (PASSKEY, PASSKEY[:-1] + "x", ""):
        response = httpx.post(f"{process.url}/webhook", params={"passkey": passkey},
                              json=customer_message("50376819621", "secret check"))
        bodies.append(response.text)
    response = httpx.post(f"{process.url}/webhook", json={**customer_message("50376819621", "b"), "passkey": "z" * 20})
    bodies.append(response.text)
    wait_until(lambda: sql("SELECT 1 FROM watibot.burst WHERE status = 'dead'"), what="the WATI failure")
    process.stop()
    log = process.log_path.read_text()
    assert "buffered" in log, "debug logging was on"
    for secret in (PASSKEY, WATI_TOKEN, "z" * 20):
        assert secret not in log
        assert all(secret not in body for body in bodies)
    assert sql("SELECT count(*) FROM watibot.message WHERE payload ? 'passkey'") == [(0,)]


def test_only_the_webhook_accepts_state_changing_methods() -> None:
    """Every route other than the authenticated /webhook is read-only (GET/HEAD)."""
    app = create_app()
    for route in app.routes:
        methods = getattr(route, "methods", set()) or set()
        if methods - {"GET", "HEAD"}:
            assert route.path == "/webhook", f"{route.path} changes state without the passkey check"  # type: ignore[attr-defined]


_SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE)\b")


def test_no_sql_is_built_by_string_formatting() -> None:
    """No f-string, %-format or .format() in the package builds SQL: every value travels as a query parameter."""
    offenders = []
    for path in SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.JoinedStr):
                text = "".join(part.value for part in node.values if isinstance(part, ast.Constant))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant):
                text = str(node.left.value)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
                  and isinstance(node.func.value, ast.Constant)):
                text = str(node.func.value.value)
            if text and _SQL_WORDS.search(text):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_a_hostile_bsuid_cannot_change_the_wati_request_path_or_query(
    run_app: Callable[..., Any], database_url: str, fake_wati: FakeWati,
) -> None:
    """A bsuid made of `../`, `?`, `&` and `#` reaches WATI as one escaped path segment: the request goes to
    sendSessionMessage with watibot's own query, never to another path or with an injected parameter."""
    import time

    from tests.conftest import app_settings, sample

    hostile = [
        "../../../evil/x?messageText=INJECTED&localMessageId=9#",
        "a/b/../../sendTemplateMessage",
        "%2e%2e%2fencoded%3Fq=1",
    ]
    app = run_app(app_settings(database_url, fake_wati))
    for n, bsuid in enumerate(hostile):
        event = sample("message-bsuid", bsuid=bsuid, whatsappMessageId=f"wamid.hostile-bsuid.{n}",
                       text=f"hello {n}", timestamp=str(int(time.time())))
        assert app.post(event).json() == {"status": "buffered"}
    fake_wati.wait_for_sent(len(hostile))
    from urllib.parse import unquote

    for request in fake_wati.requests:
        prefix = f"/{FakeWati.TENANT}/api/v1/sendSessionMessage/"
        assert request["path"].startswith(prefix)
        segment = request["path"].removeprefix(prefix)
        assert "/" not in segment and "?" not in segment and "#" not in segment
        assert unquote(segment) in hostile
        assert set(request["query"]) == {"messageText", "localMessageId", "channelPhoneNumber"}
        assert "INJECTED" not in request["query"]["messageText"]
        assert request["query"]["localMessageId"].isdigit()


def test_api_documentation_can_be_turned_off_for_a_public_host(
    run_app: Callable[..., Any], database_url: str, fake_wati: FakeWati,
) -> None:
    """WATIBOT_API_DOCS=false: /docs, /redoc and /openapi.json answer 404 while the webhook still works."""
    from tests.conftest import app_settings, customer_message

    app = run_app(app_settings(database_url, fake_wati, api_docs=False))
    assert [app.client.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")] == [404] * 3
    assert app.post(customer_message("50376819621", "hello")).status_code == 200
    assert app.client.get("/healthz").status_code == 200


def test_a_non_ascii_passkey_works_in_the_query_the_header_and_the_body(
    run_app: Callable[..., Any], database_url: str, sql: Sql
) -> None:
    """A UTF-8 passkey is accepted as a percent-encoded query, a raw UTF-8 header and a body field; its latin-1
    spelling, a truncated one and invalid UTF-8 in the header are 401."""
    from tests.conftest import app_settings

    passkey = "clé-secrète-ñandú-日本語"
    app = run_app(app_settings(database_url, webhook_passkey=passkey, sweeper=False, buffer_seconds=60))
    url = f"{app.url}/webhook"
    accepted = [
        httpx.post(url, params={"passkey": passkey}, json=customer_message("50376819621", "q", "wamid.q")),
        httpx.post(url, headers={"X-Watibot-Passkey": passkey.encode()},
                   json=customer_message("50376819621", "h", "wamid.h")),
        httpx.post(url, json={**customer_message("50376819621", "b", "wamid.b"), "passkey": passkey}),
    ]
    assert [response.status_code for response in accepted] == [200, 200, 200], [r.text for r in accepted]
    refused = [
        httpx.post(url, headers={"X-Watibot-Passkey": passkey.encode("utf-8").decode("latin-1").encode("utf-8")},
                   json=customer_message("50376819621", "x1", "wamid.x1")),
        httpx.post(url, headers={"X-Watibot-Passkey": passkey.encode()[:-1]},
                   json=customer_message("50376819621", "x2", "wamid.x2")),
        httpx.post(url, headers={"X-Watibot-Passkey": b"\xff\xfe" + passkey.encode()},
                   json=customer_message("50376819621", "x3", "wamid.x3")),
    ]
    assert [response.status_code for response in refused] == [401, 401, 401]
    assert sorted(row[0] for row in sql("SELECT text FROM watibot.message")) == ["b", "h", "q"]
