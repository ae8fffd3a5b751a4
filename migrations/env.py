"""Alembic environment: plain-SQL migrations.

Alembic talks to PostgreSQL through psycopg (its simple-query protocol runs a migration's multi-statement SQL);
the service itself uses asyncpg. The database URL is, in order: `config.attributes["database_url"]` (set by
`watibot migrate` / `serve`), `WATIBOT_DATABASE_URL` (or `.env`), or the embedded server under
`WATIBOT_DATA_DIR`, started if needed.
"""

from alembic import context
from sqlalchemy import create_engine, pool, text

from watibot.db import resolve_database_url, sqlalchemy_url

SCHEMA = "watibot"
# Session-level advisory lock held while migrating: `watibot migrate` started on several hosts at once (each
# unit's ExecStartPre) runs one after the other, and the later ones find the database at head.
MIGRATION_LOCK = 0x77617469626F74  # "watibot"
config = context.config

if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: the migrations are plain SQL in migrations/versions")

url = config.attributes.get("database_url") or resolve_database_url()
engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
try:
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        connection.commit()
        context.configure(connection=connection, version_table_schema=SCHEMA, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
finally:
    engine.dispose()
