"""watibot through PgBouncer in transaction pooling mode, as users run it: Debian's `pgbouncer` (1.18: no
protocol-level prepared statements) with its own config in a temporary directory, `WATIBOT_DATABASE_URL` at the
pooler, `WATIBOT_DB_STATEMENT_CACHE_SIZE=0`, migrations over `WATIBOT_MIGRATION_DATABASE_URL` (PostgreSQL
directly). Real `watibot serve` trees, the module's own PostgreSQL cluster, a fake WATI and a fake agent; after
every scenario: no acknowledged message lost, no reply twice, and PostgreSQL saw at most the pooler's pool.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import PASSKEY, ServeProcess, free_port, fresh_database, post, serve_environment, sql_on, wait_until
from tests.fakes import FakeAgent, FakeWati
from tests.invariants import Load, check_invariant, kill_the_busiest_worker, message, wait_drained
from watibot import db
from watibot.embedded import SYSTEM_USER_WHEN_ROOT, EmbeddedCluster

Sql = Callable[..., list[tuple[Any, ...]]]
PGBOUNCER = shutil.which("pgbouncer") or next(
    (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None)
pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed (apt-get install pgbouncer; "
                       ".ci/run installs it)"),
]
SERVER_POOL = 5  # pgbouncer's default_pool_size: what PostgreSQL may see per database
WORKER_POOL = 10  # WATIBOT_DB_POOL_SIZE: each worker's own pool, to the pooler


@dataclass
class Bouncer:
    """A running pgbouncer in front of the module's cluster."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, direct_url: str) -> str:
        """The pooler's DSN for the database of `direct_url`."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{direct_url.rsplit('/', 1)[1]}"

    def show(self, what: str) -> list[dict[str, Any]]:
        """`SHOW <what>` on pgbouncer's admin console (simple query protocol, as it requires)."""
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer", autocommit=True,
                             row_factory=dict_row, connect_timeout=5) as conn:
            return conn.execute(f"SHOW {what}").fetchall()  # type: ignore[arg-type]

    def answers(self) -> bool:
        if self.process.poll() is not None:
            logs = [path.read_text() for path in self.log_path.parent.glob("*.log")]
            raise AssertionError(f"pgbouncer exited with {self.process.returncode}:\n" + "\n".join(logs))
        try:
            self.show("VERSION")
        except psycopg.OperationalError:
            return False
        return True


CONFIG = """\
[databases]
* = host=127.0.0.1 port={cluster_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/userlist.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = {pool}
reserve_pool_size = 0
max_client_conn = 500
server_login_retry = 1
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
"""


@pytest.fixture(scope="module")
def bouncer(fault_cluster: EmbeddedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bouncer]:
    """pgbouncer in transaction mode on a free port, run as the cluster's system user (it refuses root)."""
    assert PGBOUNCER is not None
    directory = tmp_path_factory.mktemp("pgbouncer")
    port = free_port()
    (directory / "userlist.txt").write_text('"postgres" ""\n')
    (directory / "pgbouncer.ini").write_text(
        CONFIG.format(cluster_port=fault_cluster.port, port=port, directory=directory, pool=SERVER_POOL))
    user = SYSTEM_USER_WHEN_ROOT if os.geteuid() == 0 else None
    if user is not None:
        entry = pwd.getpwnam(user)  # exists: the fault cluster has started
        for parent in directory.parents:  # traversable by that user (pytest's base directory is 0700)
            parent.chmod(parent.stat().st_mode | 0o055)
        for path in (directory, *directory.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    log_path = directory / "pgbouncer.log"
    with (directory / "stderr.log").open("ab") as stderr:
        process = subprocess.Popen([PGBOUNCER, str(directory / "pgbouncer.ini")], user=user,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    running = Bouncer(port, process, log_path)
    try:
        wait_until(running.answers, timeout=30, what="pgbouncer to accept connections")
        yield running
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def empty_db(fault_cluster: EmbeddedCluster) -> Iterator[str]:
    """A database with no schema at all on the fault cluster (its direct DSN)."""
    with fresh_database(fault_cluster, "empty") as url:
        yield url


def pooled_environment(bouncer: Bouncer, direct_url: str, fake_wati: FakeWati, **overrides: str) -> dict[str, str]:
    """The service through the pooler, migrations directly."""
    return serve_environment(bouncer.url(direct_url), fake_wati, WATIBOT_DB_STATEMENT_CACHE_SIZE="0",
                             WATIBOT_MIGRATION_DATABASE_URL=direct_url, WATIBOT_DB_POOL_SIZE=str(WORKER_POOL),
                             **overrides)


def check_pooled(bouncer: Bouncer, sql: Sql, direct_url: str, workers: int, multiplexed: bool = False) -> str:
    """Assert PostgreSQL saw no more than the pooler's pool for this database (and, if `multiplexed`, that more
    client connections than that shared it); a one-line account of it."""
    database = direct_url.rsplit("/", 1)[1]
    clients = [row for row in bouncer.show("CLIENTS") if row["database"] == database]
    servers = [row for row in bouncer.show("SERVERS") if row["database"] == database]
    (stats,) = [row for row in bouncer.show("STATS") if row["database"] == database]
    backends = sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                   "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")[0][0]
    assert workers * WORKER_POOL > SERVER_POOL, "the workers' pools are larger than the pooler's"
    assert len(servers) <= SERVER_POOL, f"pgbouncer opened {len(servers)} server connections"
    assert backends <= SERVER_POOL, f"PostgreSQL has {backends} backends for {database}, pool is {SERVER_POOL}"
    assert stats["total_xact_count"] > len(servers), "transactions were multiplexed over the server connections"
    if multiplexed:
        assert len(clients) > SERVER_POOL, f"only {len(clients)} client connections: pooling not exercised"
    log = bouncer.log_path.read_text()
    assert "unsupported startup parameter" not in log, log[-2000:]
    return (f"pooling: {len(clients)} client connections (pools up to {workers} x {WORKER_POOL}) over "
            f"{len(servers)} server connections (default_pool_size {SERVER_POOL}), {backends} backends, "
            f"{stats['total_xact_count']} transactions")


def assert_log_clean(serve: ServeProcess) -> None:
    """No symptom of a pooler-incompatible session feature in the service's log."""
    text = serve.log_path.read_text()
    for symptom in ("prepared statement", "26000", "42P05", "Traceback", "HTTP 500", "Internal Server Error"):
        assert symptom not in text, f"{symptom!r} in the serve log:\n{text[-4000:]}"


def _webhook(client: httpx.Client, payload: dict[str, Any]) -> tuple[int, str | None]:
    response = client.post("/webhook", params={"passkey": PASSKEY}, json=payload)
    return response.status_code, (response.json().get("status") if response.status_code == 200 else None)


def test_serve_migrates_an_empty_database_directly_and_serves_load_and_duplicates_through_the_pooler(
    bouncer: Bouncer, empty_db: str, processes: Callable[..., ServeProcess], fake_wati: FakeWati,
) -> None:
    """serve on an unmigrated database migrates over the direct DSN, then answers load and duplicate deliveries
    through transaction pooling exactly once each."""
    sql = sql_on(empty_db)
    assert sql("SELECT to_regclass('watibot.message') IS NULL") == [(True,)]
    serve = processes(pooled_environment(bouncer, empty_db, fake_wati), workers=3)
    serve.wait_ready(timeout=90)
    assert sql("SELECT version_num FROM watibot.alembic_version") == [(db.SCHEMA_REVISION,)]
    assert "connections go through a pooler" in serve.log_path.read_text()
    customers, prefix = 40, "p"
    redelivered = 0
    pairs: list[tuple[int, str | None]] = []
    with Load(serve.url, customers=customers, rate=100, total=400, prefix=prefix) as load, \
            httpx.Client(base_url=serve.url, timeout=15) as client:
        acknowledged = load.result.acknowledged
        wait_until(lambda: len(acknowledged) >= 120, timeout=60, what="load to be acknowledged")
        for number in range(120):  # redeliveries of messages already acknowledged, while the load goes on
            if f"{prefix}{number}" in acknowledged:
                payload = message(f"5037{number % customers:07d}", f"{prefix}{number}")
                assert _webhook(client, payload) == (200, "duplicate")
                redelivered += 1
        doubles = [message(f"5038{number % 10:07d}", f"d{number}") for number in range(20)]
        with ThreadPoolExecutor(8) as threads:  # the same delivery twice at the same moment
            pairs = list(threads.map(lambda payload: _webhook(client, payload), [p for p in doubles for _ in "ab"]))
        result = load.wait_done()
    for first, second in zip(pairs[::2], pairs[1::2], strict=True):
        assert sorted([first, second]) == [(200, "buffered"), (200, "duplicate")]
    assert redelivered >= 60
    assert not result.refused, f"nothing refused without a fault: {dict(result.refused)}"
    result.acknowledged |= {payload["text"] for payload in doubles}
    wait_drained(sql)
    counts = check_invariant(sql, fake_wati, result.acknowledged)
    assert sql("SELECT count(*) FROM watibot.message") == [(len(result.acknowledged),)]
    pooling = check_pooled(bouncer, sql, empty_db, workers=3, multiplexed=True)
    assert_log_clean(serve)
    print(f"\npgbouncer load: sent {result.sent}, acknowledged {len(result.acknowledged)}, refused "
          f"{dict(result.refused)}, redelivered {redelivered} (all 200 duplicate), 20 simultaneous double "
          f"deliveries (one buffered + one duplicate each); lost 0, duplicate replies 0; {counts}; {pooling}")


def test_kill_9_of_a_worker_holding_bursts_behind_the_pooler_is_taken_over_after_the_lease(
    bouncer: Bouncer, fault_db: str, fault_sql: Sql, processes: Callable[..., ServeProcess], fake_wati: FakeWati,
    fake_agent: FakeAgent,
) -> None:
    """kill -9 of a worker holding bursts through the pooler: another worker takes them after the lease and
    answers each once."""
    env = pooled_environment(bouncer, fault_db, fake_wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=fake_agent.url,
                             WATIBOT_LEASE_SECONDS="3", WATIBOT_BUFFER_SECONDS="0.3")
    serve = processes(env, workers=2)
    serve.wait_ready(timeout=90)
    report = kill_the_busiest_worker(serve, fault_sql, fake_wati, fake_agent, prefix="pk")
    pooling = check_pooled(bouncer, fault_sql, fault_db, workers=2)
    assert_log_clean(serve)
    print(f"\npgbouncer kill -9: worker held {report.held} bursts; all answered {report.recovery_seconds:.1f} s after "
          f"the kill (lease 3 s); lost 0, duplicate replies 0; {report.counts}; {pooling}")


def test_postgresql_restart_behind_the_pooler_under_load_is_503_then_recovers_losing_nothing(
    bouncer: Bouncer, fault_cluster: EmbeddedCluster, fault_db: str, fault_sql: Sql,
    processes: Callable[..., ServeProcess], fake_wati: FakeWati,
) -> None:
    """PostgreSQL restarted behind the pooler during webhook load: refusals are 503 only, the service recovers
    without a restart, and every 200 is answered once."""
    env = pooled_environment(bouncer, fault_db, fake_wati, WATIBOT_DB_TIMEOUT_SECONDS="2")
    serve = processes(env, workers=2)
    serve.wait_ready(timeout=90)
    with Load(serve.url, customers=40, rate=120, total=720, prefix="r") as load:
        wait_until(lambda: len(load.result.acknowledged) >= 150, timeout=60, what="load to start")
        stopped_at = time.monotonic()
        fault_cluster.stop("fast")
        outage_readiness = httpx.get(f"{serve.url}/readyz", timeout=15)
        # pgbouncer holds queries of a short outage until the server is back; keep it down long enough that
        # webhooks time out in its queue (WATIBOT_DB_TIMEOUT_SECONDS) and are refused
        wait_until(lambda: sum(load.result.refused.values()) >= 20, timeout=60, what="webhooks refused")
        fault_cluster.start()
        restarted_at = time.monotonic()
        result = load.wait_done()
    assert outage_readiness.status_code == 503
    assert "database unavailable" in outage_readiness.json()["problems"]
    wait_until(lambda: httpx.get(f"{serve.url}/readyz", timeout=10).status_code == 200, timeout=60,
               what="readiness again")
    recovered_after = time.monotonic() - restarted_at
    assert post(serve, message("50379999998", "after-pooled-restart")) == 200
    result.acknowledged.add("after-pooled-restart")
    wait_drained(fault_sql)
    counts = check_invariant(fault_sql, fake_wati, result.acknowledged)
    refused = sum(result.refused.values())
    assert refused >= 20, "the outage was visible to the sender as non-200"
    assert set(result.refused) <= {"HTTP 503"}, f"an outage is a 503, nothing else: {dict(result.refused)}"
    refusing = (result.last_failure or 0) - (result.first_failure or 0)
    pooling = check_pooled(bouncer, fault_sql, fault_db, workers=2)
    assert_log_clean(serve)
    print(f"\npgbouncer restart (fast): sent {result.sent}, acknowledged {len(result.acknowledged)}, refused "
          f"{refused} {dict(result.refused)}; database stopped and started again in {restarted_at - stopped_at:.1f} s; webhooks refused "
          f"for {refusing:.1f} s; ready {recovered_after:.1f} s after the restart; lost 0, duplicate replies 0; "
          f"{counts}; {pooling}")
