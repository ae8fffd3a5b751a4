"""Shared fixtures: a PostgreSQL server, a fresh migrated database per test, fakes, and app runners.

PostgreSQL: `WATIBOT_TEST_DATABASE_URL` (an admin DSN, any database) if set; otherwise the tests start their own
embedded cluster (fsync off) in a temporary directory and stop it at the end. Migrations run once into a
template database; each test gets `CREATE DATABASE … TEMPLATE` and it is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
import uvicorn

from tests.fakes import FakeAgent, FakeWati
from watibot import db
from watibot.app import create_app
from watibot.embedded import EmbeddedCluster
from watibot.settings import Settings

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "samples"
PASSKEY = "test-passkey-0123456789abcdef"
TEMPLATE = "watibot_template"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_database(url: str, database: str) -> str:
    """`url` pointing at another database of the same server."""
    base, _, rest = url.rpartition("/")
    query = ("?" + rest.split("?", 1)[1]) if "?" in rest else ""
    return f"{base}/{database}{query}"


def previous_revision() -> str:
    """The revision just before the one this code expects (downgrade targets in tests)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db.alembic_config("postgresql://unused"))
    down = script.get_revision(db.SCHEMA_REVISION).down_revision
    assert isinstance(down, str)
    return down


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def add_message(sql: Callable[..., list[tuple[Any, ...]]], customer: str, text: str | None = None,
                burst_id: int | None = None, channel: str = "c", provider_message_id: str | None = None) -> int:
    """Store one customer message at its conversation's next position (the conversation row must exist), as
    the webhook does; with `burst_id`, the message is that burst's (its range grows to cover it, and a closed
    consuming burst moves the conversation's answered_position past it)."""
    (position,) = sql("UPDATE watibot.conversation SET last_position = last_position + 1, "
                      "last_customer_message_at = now() "
                      "WHERE channel = %s AND customer = %s RETURNING last_position", channel, customer)[0]
    (message_id,) = sql(
        "INSERT INTO watibot.message (channel, customer, position, provider_message_id, type, text, payload) "
        "VALUES (%s, %s, %s, COALESCE(%s, gen_random_uuid()::text), 'text', %s, '{}') RETURNING id",
        channel, customer, position, provider_message_id, text)[0]
    if burst_id is not None:
        sql("UPDATE watibot.burst SET after_position = CASE WHEN messages = 0 THEN %s - 1 ELSE after_position END, "
            "through_position = %s, messages = messages + 1 WHERE id = %s", position, position, burst_id)
        sql("UPDATE watibot.conversation AS c SET answered_position = %s FROM watibot.burst AS b "
            "WHERE b.id = %s AND c.channel = b.channel AND c.customer = b.customer AND watibot.consumes(b.status)",
            position, burst_id)
    return int(message_id)


def add_burst(sql: Callable[..., list[tuple[Any, ...]]], customer: str, status: str, channel: str = "c",
              **columns: Any) -> int:
    """Insert one burst in `status` with optional extra columns (SQL expressions as strings); an open one
    becomes its conversation's open burst."""
    names = ", ".join(["channel", "customer", "status", "fence", "claimed_by", *columns])
    values = ", ".join(["%s", "%s", "%s", "1", "'host:1:w'", *columns.values()])
    insert = f"INSERT INTO watibot.burst ({names}) VALUES ({values}) RETURNING id"  # noqa: S608 - test's own constants
    burst_id = int(sql(insert, channel, customer, status)[0][0])
    if status in ("processing", "sending", "retry"):
        sql("UPDATE watibot.conversation SET open_burst_id = %s WHERE channel = %s AND customer = %s",
            burst_id, channel, customer)
    return burst_id


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An admin DSN of a PostgreSQL server the tests may create databases on."""
    configured = os.environ.get("WATIBOT_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    cluster = EmbeddedCluster(tmp_path_factory.mktemp("pg"), durable=False)
    cluster.start()
    try:
        yield cluster.url("postgres")
    finally:
        cluster.stop("immediate")


def admin_execute(admin_url: str, *statements: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def template_database(postgres_admin_url: str) -> str:
    """A database migrated to head, copied for each test."""
    admin_execute(postgres_admin_url, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)", f"CREATE DATABASE {TEMPLATE}")
    db.upgrade(with_database(postgres_admin_url, TEMPLATE))
    return TEMPLATE


@contextlib.contextmanager
def template_copy(admin_url: str, template: str, prefix: str = "test") -> Iterator[str]:
    """A fresh database copied from the migrated `template` (its DSN), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin_execute(admin_url, f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield with_database(admin_url, name)
    finally:
        admin_execute(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(postgres_admin_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with template_copy(postgres_admin_url, template_database) as url:
        yield url


@pytest.fixture
def sql(database_url: str) -> Iterator[Callable[..., list[tuple[Any, ...]]]]:
    """Run a query on the test database and return all rows (autocommit)."""
    conn = psycopg.connect(database_url, autocommit=True)

    def run(query: str, *params: Any) -> list[tuple[Any, ...]]:
        cursor = conn.execute(query, params or None)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []

    yield run
    conn.close()


@pytest.fixture
def fake_wati() -> Iterator[FakeWati]:
    with FakeWati() as fake:
        yield fake


@pytest.fixture
def fake_agent() -> Iterator[FakeAgent]:
    with FakeAgent() as fake:
        yield fake


def sample(name: str, **changes: Any) -> dict[str, Any]:
    """A WATI sample payload from tests/samples with some fields changed."""
    payload: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    payload.update(changes)
    return payload


def customer_message(wa_id: str, text: str, message_id: str | None = None, **changes: Any) -> dict[str, Any]:
    """A customer text message from `wa_id`."""
    fields: dict[str, Any] = {
        "waId": wa_id, "text": text, "whatsappMessageId": message_id or f"wamid.{uuid.uuid4().hex}",
        "id": uuid.uuid4().hex[:24], "timestamp": str(int(time.time())),
    }
    return sample("message-text", **(fields | changes))


def app_settings(database_url: str, wati: FakeWati | None = None, **overrides: Any) -> Settings:
    """Settings for an in-process app: short windows and leases."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "webhook_passkey": PASSKEY,
        "wati_api_url": wati.api_url if wati else None,
        "wati_api_token": "test-wati-token-secret",
        "buffer_seconds": 0.3,
        "lease_seconds": 5.0,
        "wati_timeout_seconds": 2.0,
        "agent_timeout_seconds": 4.0,
        "retry_base_seconds": 0.1,
        "retry_max_seconds": 0.5,
        "poll_seconds": 0.5,
        "db_timeout_seconds": 2.0,
        "db_startup_timeout_seconds": 10.0,
        "shutdown_grace_seconds": 2.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class RunningApp:
    """The real app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningApp:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=20, what="app startup")
        self.client = httpx.Client(base_url=self.url, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def post(self, payload: Any, passkey: str | None = PASSKEY, **kwargs: Any) -> httpx.Response:
        params = {"passkey": passkey} if passkey is not None else {}
        return self.client.post("/webhook", json=payload, params=params, **kwargs)

    @property
    def sweeper(self) -> Any:
        return self.server.config.app.state.sweeper  # type: ignore[union-attr]


@pytest.fixture
def run_app(database_url: str) -> Iterator[Callable[..., RunningApp]]:
    """Start the app (with its sweeper) in-process; stopped after the test."""
    started: list[RunningApp] = []

    def start(settings: Settings) -> RunningApp:
        app = RunningApp(settings).__enter__()
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        app.__exit__(None, None, None)


class ServeProcess:
    """`watibot serve` as a real process tree."""

    def __init__(self, env: dict[str, str], workers: int, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watibot", "serve", "--workers", str(workers), "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=timeout, what="watibot serve /readyz")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def serve_environment(database_url: str, wati: FakeWati | None, **overrides: str) -> dict[str, str]:
    """The environment for a `watibot serve` process under test."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WATIBOT_")}
    env.update({
        "WATIBOT_DATABASE_URL": database_url,
        "WATIBOT_WEBHOOK_PASSKEY": PASSKEY,
        "WATIBOT_WATI_API_TOKEN": "test-wati-token-secret",
        "WATIBOT_BUFFER_SECONDS": "0.5",
        "WATIBOT_LEASE_SECONDS": "5",
        "WATIBOT_WATI_TIMEOUT_SECONDS": "2",
        "WATIBOT_POLL_SECONDS": "0.5",
        "WATIBOT_SHUTDOWN_GRACE_SECONDS": "2",
        "WATIBOT_LOG_LEVEL": "info",
    })
    if wati is not None:
        env["WATIBOT_WATI_API_URL"] = wati.api_url
    env.update(overrides)
    return env


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `watibot serve` process trees; all are stopped after the test."""
    started: list[ServeProcess] = []

    def start(env: dict[str, str], workers: int = 2) -> ServeProcess:
        process = ServeProcess(env, workers, tmp_path / f"serve-{len(started)}.log")
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()


# -- the fault rig: a cluster of one module's own, `watibot serve` trees, and what they hold --------------------

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """A PostgreSQL cluster owned by the test module (stopped, restarted, reconfigured by its tests), never the
    machine's shared server."""
    cluster = EmbeddedCluster(tmp_path_factory.mktemp("faultpg"), durable=False)
    cluster.start()
    yield cluster
    cluster.stop("immediate")


@contextlib.contextmanager
def fresh_database(cluster: EmbeddedCluster, prefix: str) -> Iterator[str]:
    """A new empty database on `cluster` (its DSN), dropped afterwards (the cluster is started again first)."""
    cluster.start()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    try:
        yield cluster.url(name)
    finally:
        cluster.start()
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")  # type: ignore[arg-type]


@pytest.fixture
def fault_db(fault_cluster: EmbeddedCluster) -> Iterator[str]:
    """A fresh migrated database on the fault cluster (which is running again after the test)."""
    with fresh_database(fault_cluster, "fault") as url:
        db.upgrade(url)
        yield url


def sql_on(url: str) -> Sql:
    """Run a query on `url` and return all rows, reconnecting each time (the server may have restarted)."""

    def run(query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(query, params or None)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    return run


@pytest.fixture
def fault_sql(fault_db: str) -> Sql:
    """Run a query on the fault database, reconnecting each time (the server may have restarted)."""
    return sql_on(fault_db)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `watibot serve` trees (not waiting for readiness); all are stopped after the test."""
    started: list[ServeProcess] = []

    def start(env: dict[str, str], workers: int = 1) -> ServeProcess:
        process = ServeProcess(env, workers, tmp_path / f"serve-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        resume_stopped(process)
        process.stop()


def resume_stopped(process: ServeProcess) -> None:
    """SIGCONT the serve parent and its workers (a test may have stopped some)."""
    for child in [process.process.pid, *(worker.pid for worker in children(process))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)


def children(process: ServeProcess) -> list[psutil.Process]:
    """The uvicorn worker processes of a serve tree (not multiprocessing's resource tracker)."""
    try:
        found = psutil.Process(process.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in found:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


def holders(sql: Sql) -> dict[int, list[str]]:
    """Worker pid -> conversations it holds, from the owner ids (host:pid:random) in the claim column."""
    held: dict[int, list[str]] = {}
    for owner, customer in sql("SELECT claimed_by, customer FROM watibot.conversation WHERE claimed_by IS NOT NULL"):
        held.setdefault(int(owner.split(":")[1]), []).append(customer)
    return held


def post(process: ServeProcess, payload: dict[str, Any], timeout: float = 10) -> int:
    """POST one webhook to a serve tree; its HTTP status."""
    return httpx.post(f"{process.url}/webhook", params={"passkey": PASSKEY}, json=payload,
                      timeout=timeout).status_code
