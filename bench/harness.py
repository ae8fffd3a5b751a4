"""Infrastructure for the benchmarks: the PostgreSQL cluster, child processes, percentiles, CPU and memory probes.

Nothing here measures anything by itself; `bench.parts` does, using these pieces.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from watibot import db
from watibot.embedded import EmbeddedCluster

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = json.loads((ROOT / "tests" / "samples" / "message-text.json").read_text())
PASSKEY = "bench-passkey-0123456789abcdef"
TEMPLATE = "bench_template"
CHANNEL = "50322220000"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages of the machine (other engineers share it)."""
    return [round(value, 2) for value in os.getloadavg()]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` quantile (nearest rank) of `values`, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def summary_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of a list of durations in seconds, in milliseconds."""
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "p50_ms": ms(percentile(seconds, 0.50)),
        "p95_ms": ms(percentile(seconds, 0.95)),
        "p99_ms": ms(percentile(seconds, 0.99)),
        "max_ms": ms(max(seconds) if seconds else None),
        "mean_ms": ms(statistics.fmean(seconds) if seconds else None),
        "count": len(seconds),
    }


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


class Cluster:
    """The benchmark's own PostgreSQL 18 (embedded wheel), fsync on, with pg_stat_statements loaded."""

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.embedded = EmbeddedCluster(data_dir, durable=durable)

    def start(self) -> None:
        self.embedded.init()
        conf = self.embedded.pgdata / "postgresql.auto.conf"
        text = conf.read_text()
        if "pg_stat_statements" not in text:
            # A Unix socket too (the embedded default is TCP only), for the what-if runs over a socket.
            self.socket_dir.mkdir(exist_ok=True)
            if self.embedded._user is not None:
                entry = pwd.getpwnam(self.embedded._user)
                os.chown(self.socket_dir, entry.pw_uid, entry.pw_gid)
            conf.write_text(text + "shared_preload_libraries = 'pg_stat_statements'\n"
                            "pg_stat_statements.track_utility = on\n"
                            f"unix_socket_directories = '{self.socket_dir}'\n")
        self.embedded.start()
        self.admin(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)", f"CREATE DATABASE {TEMPLATE}")
        db.upgrade(self.url(TEMPLATE))
        with psycopg.connect(self.url(TEMPLATE), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def stop(self) -> None:
        self.embedded.stop("fast")

    @property
    def socket_dir(self) -> Path:
        return self.embedded.data_dir / "socket"

    def url(self, database: str = "postgres") -> str:
        return self.embedded.url(database)

    def socket_url(self, url: str) -> str:
        """The same database reached over the Unix socket instead of TCP."""
        database = url.rsplit("/", 1)[1]
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.embedded.port}"

    def admin(self, *statements: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def fresh_database(self, prefix: str) -> str:
        """A new database copied from the migrated template; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url(name)

    def drop(self, url: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def server_processes(self) -> list[psutil.Process]:
        """The postmaster and every backend and auxiliary process."""
        pid = int((self.embedded.pgdata / "postmaster.pid").read_text().split()[0])
        postmaster = psutil.Process(pid)
        return [postmaster, *postmaster.children(recursive=True)]


def sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement (autocommit) and return its rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(query, params or None)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


class CpuMeter:
    """CPU seconds used by a changing set of processes between `start()` and `stop()`.

    Backends come and go (connections open and close during a run), so a thread re-reads the set every 0.1 s and
    keeps the last figure seen per process; a process first seen after `start()` counts from 0.
    """

    def __init__(self, processes: Callable[[], list[psutil.Process]], interval: float = 0.1) -> None:
        self.processes = processes
        self.interval = interval
        self.before: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[int, float]:
        seen = {}
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                seen[process.pid] = times.user + times.system
        return seen

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.last.update(self._read())

    def start(self) -> None:
        self.before = self._read()
        self.last = dict(self.before)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.last.update(self._read())
        return sum(value - self.before.get(pid, 0.0) for pid, value in self.last.items())


class RssSampler:
    """Samples the resident memory of each process in a set every `interval` seconds, in a thread."""

    def __init__(self, processes: Callable[[], list[psutil.Process]], interval: float = 0.25) -> None:
        self.processes = processes
        self.interval = interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for process in self.processes():
                with contextlib.suppress(psutil.Error):
                    rss = process.memory_info().rss
                    self.peak[process.pid] = max(self.peak.get(process.pid, 0), rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self) -> list[float]:
        return sorted(round(value / 2**20, 1) for value in self.peak.values())


class Child:
    """A child process with its output in a log file; stopped by its own pid, never by name."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=ROOT)
        self.psutil = psutil.Process(self.process.pid)

    def workers(self) -> list[psutil.Process]:
        """The uvicorn worker processes (children that are Python, not the resource tracker)."""
        try:
            children = self.psutil.children(recursive=True)
        except psutil.Error:
            return []
        workers = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                    workers.append(child)
        return workers or [self.psutil]

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def count_in_log(self, word: str) -> int:
        self._log.flush()
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines() if word in line)

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Children:
    """Every child process started for one run, stopped in reverse order at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(f"{len(self.started):02d}-{name}", argv, env or dict(os.environ), self.log_dir)
        self.started.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.started):
            child.stop()


def wait_http(url: str, child: Child, timeout: float = 60) -> None:
    """Wait until `url` answers 200, failing early if `child` exits."""
    def ready() -> bool:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout, what=url)


def serve_env(database_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a `watibot serve` under benchmark: our database, our passkey, quiet logs."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WATIBOT_")}
    env.update({
        "WATIBOT_DATABASE_URL": database_url,
        "WATIBOT_WEBHOOK_PASSKEY": PASSKEY,
        "WATIBOT_WATI_API_TOKEN": "bench-token",
        "WATIBOT_LOG_LEVEL": "warning",
    })
    env.update(overrides)
    return env


def start_serve(children: Children, name: str, workers: int, env: dict[str, str],
                what_if: bool = False) -> tuple[Child, str]:
    """`watibot serve --workers N` on a free port, ready; returns the child and its base URL.

    `what_if`: the same app under the same uvicorn, through `bench.what_if` (pool without reset).
    """
    port = free_port()
    if what_if:
        argv = [sys.executable, "-m", "uvicorn", "bench.what_if:create_app", "--factory", "--workers", str(workers),
                "--port", str(port), "--log-level", "warning", "--no-access-log"]
    else:
        argv = [sys.executable, "-m", "watibot", "serve", "--workers", str(workers), "--port", str(port),
                "--no-migrate"]
    child = children.start(name, argv, env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", child)
    wait_until(lambda: len(child.workers()) >= workers, 30, what="uvicorn workers")
    return child, url


def start_bare(children: Children, workers: int) -> tuple[Child, str]:
    """The bare FastAPI endpoint (bench/bare_app.py) under the same uvicorn, N workers."""
    port = free_port()
    child = children.start(f"bare-{workers}w", [
        sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--workers", str(workers), "--port", str(port),
        "--log-level", "warning", "--no-access-log",
    ])
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", child)
    wait_until(lambda: len(child.workers()) >= workers, 30, what="uvicorn workers")
    return child, url


@contextlib.contextmanager
def fake_outside(children: Children) -> Iterator[str]:
    """The fake WATI + agent (bench/fakes.py) in its own process; yields its base URL."""
    port = free_port()
    child = children.start("fakes", [sys.executable, "-m", "bench.fakes", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/stats", child)
    yield url


def wrk_available() -> bool:
    return shutil.which("wrk") is not None
