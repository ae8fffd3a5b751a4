"""Rewrite migrations/schema.sql: the schema as `alembic upgrade head` builds it, dumped by pg_dump.

    .venv/bin/python migrations/snapshot.py

Starts a throwaway embedded PostgreSQL, migrates it to head and dumps schema `watibot` (no data, no owners).
The header of schema.sql (everything above the MARKER line) is kept as it is: it is written by hand.
tests/test_schema.py fails, naming this command, when schema.sql and the migrations disagree.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from watibot import db
from watibot.embedded import POSTGRES_BIN_PATH, EmbeddedCluster

SCHEMA_FILE = Path(__file__).resolve().parent / "schema.sql"
MARKER = "-- ==== pg_dump below: regenerate with `python migrations/snapshot.py`, do not edit by hand ===="


def dump(url: str) -> str:
    """The schema-only dump of schema watibot at `url` (without pg_dump's version lines and psql-only
    \\restrict commands, so that any client can run it and the file changes only when the schema does)."""
    out = subprocess.run(
        [str(Path(POSTGRES_BIN_PATH) / "pg_dump"), "--schema-only", "--no-owner", "--no-privileges",
         "--schema=watibot", "--dbname", url],
        check=True, capture_output=True, text=True).stdout
    kept = [line for line in out.splitlines()
            if not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped from", "-- Dumped by"))]
    return "\n".join(kept).strip() + "\n"


def main() -> int:
    header = SCHEMA_FILE.read_text().split(MARKER)[0] if SCHEMA_FILE.exists() else ""
    with tempfile.TemporaryDirectory() as directory:
        cluster = EmbeddedCluster(Path(directory), durable=False)
        cluster.start()
        try:
            url = cluster.url("postgres")
            db.upgrade(url)
            body = dump(url)
        finally:
            cluster.stop("immediate")
    SCHEMA_FILE.write_text(header + MARKER + "\n\n" + body)
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
