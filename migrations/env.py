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
config = context.config

if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: the migrations are plain SQL in migrations/versions")

url = config.attributes.get("database_url") or resolve_database_url()
engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
try:
    with engine.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        connection.commit()
        context.configure(connection=connection, version_table_schema=SCHEMA, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
finally:
    engine.dispose()
