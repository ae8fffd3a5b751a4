"""A primary and a synchronous hot standby, both embedded clusters, for the failover tests.

The primary is an `EmbeddedCluster`; the standby is a `pg_basebackup -R` of it (with a physical replication
slot, so no WAL it needs is recycled before it connects) on a port of its own. Once the standby streams, the
primary is made to wait for it on every commit:

- `synchronous_standby_names = '*'`: any one connected standby is the synchronous one (there is one).
- `synchronous_commit = on`: a COMMIT returns only after the standby has flushed the commit's WAL to its own
  disk. Promotion replays all WAL the standby has received before it takes writes, so every commit the primary
  acknowledged is on the promoted standby. `remote_apply` would also make the commit visible to queries on the
  standby before it returns; watibot never reads from a standby, so `on` is enough and costs one replay less
  per commit.

The standby's copy of postgresql.auto.conf carries the primary's settings: its port is rewritten, and it gets
no `synchronous_standby_names` (it has no standby of its own: once promoted it would wait forever on commit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import wait_until
from watibot.embedded import EmbeddedCluster, _free_port

SLOT = "standby1"
APPLICATION_NAME = "standby1"


def query(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh autocommit connection (the server may have changed role since the last)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(statement, params or None)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def _rewrite_conf(cluster: EmbeddedCluster, drop: tuple[str, ...], add: dict[str, str]) -> None:
    conf = cluster.pgdata / "postgresql.auto.conf"
    kept = [line for line in conf.read_text().splitlines()
            if not any(line.replace(" ", "").startswith(f"{key}=") for key in drop)]
    conf.write_text("\n".join([*kept, *(f"{key} = {value}" for key, value in add.items())]) + "\n")


def base_backup(primary: EmbeddedCluster, data_dir: Path) -> EmbeddedCluster:
    """A hot standby of `primary`, made by pg_basebackup, on its own port, started and streaming."""
    standby = EmbeddedCluster(data_dir, durable=False)
    standby.data_dir.mkdir(parents=True, exist_ok=True)
    standby._prepare_permissions()  # the directory must belong to the system user the binaries run as
    conninfo = f"host=127.0.0.1 port={primary.port} user=postgres application_name={APPLICATION_NAME}"
    standby._run("pg_basebackup", "-d", conninfo, "-D", str(standby.pgdata), "-R", "-X", "stream",
                 "-C", "-S", SLOT, "--checkpoint=fast", timeout=120)
    _rewrite_conf(standby, drop=("port", "synchronous_standby_names"),
                  add={"port": str(_free_port()), "synchronous_standby_names": "''"})
    standby.start()
    return standby


def replication(primary: EmbeddedCluster) -> list[tuple[str, str, str]]:
    """(application_name, state, sync_state) of each standby connected to `primary`."""
    return query(primary.url("postgres"),  # type: ignore[return-value]
                 "SELECT application_name, state, sync_state FROM pg_stat_replication")


def make_synchronous(primary: EmbeddedCluster) -> None:
    """Have every commit on `primary` wait for the standby's flush; return once the standby is `sync`."""
    url = primary.url("postgres")
    query(url, "ALTER SYSTEM SET synchronous_standby_names = '*'")
    query(url, "ALTER SYSTEM SET synchronous_commit = 'on'")
    query(url, "SELECT pg_reload_conf()")
    wait_until(lambda: replication(primary) == [(APPLICATION_NAME, "streaming", "sync")], timeout=30,
               what="the standby to be the synchronous one")


def in_recovery(cluster: EmbeddedCluster) -> bool:
    return bool(query(cluster.url("postgres"), "SELECT pg_is_in_recovery()")[0][0])


def promote(standby: EmbeddedCluster) -> None:
    """`pg_ctl promote -w`: returns once the standby has left recovery and takes writes."""
    standby._run("pg_ctl", "promote", "-D", str(standby.pgdata), "-w", "-t", "60")


@contextlib.contextmanager
def replicated_pair(base: Path) -> Iterator[tuple[EmbeddedCluster, EmbeddedCluster]]:
    """A started primary (with the `watibot` database migrated) and its synchronous standby; both stopped at
    the end whatever became of them."""
    from watibot import db

    primary = EmbeddedCluster(base / "primary", durable=False)
    standby: EmbeddedCluster | None = None
    try:
        primary.start()  # creates the watibot database, before commits wait for a standby
        db.upgrade(primary.url())
        standby = base_backup(primary, base / "standby")
        make_synchronous(primary)
        yield primary, standby
    finally:
        with contextlib.suppress(Exception):
            primary.stop("immediate")
        if standby is not None:
            with contextlib.suppress(Exception):
                standby.stop("immediate")
