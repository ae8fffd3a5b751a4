"""The schema as one file, the burst's rules written once, and the layers of the code."""

from __future__ import annotations

import ast
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import admin_execute, with_database
from watibot.store.records import CONSUMING_STATUSES, OPEN_STATUSES, BurstStatus

Sql = Callable[..., list[tuple[Any, ...]]]
ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "migrations" / "schema.sql"

# Every object of schema watibot, as the catalogs describe it: two databases with the same rows have the same
# tables, columns (in order, with types, defaults and comments), constraints, indexes, views, functions (bodies
# and comments) and storage options.
CATALOG = """
WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = 'watibot')
SELECT 'relation', c.relname, c.relkind::text || ' ' || COALESCE(array_to_string(c.reloptions, ','), '') || ' '
       || COALESCE(obj_description(c.oid, 'pg_class'), '')
FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'columns', c.relname, string_agg(a.attname, ', ' ORDER BY a.attnum)
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relkind IN ('r', 'v')
GROUP BY c.relname
UNION ALL
SELECT 'column', c.relname || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull || ' identity=' || a.attidentity::text
       || ' default=' || COALESCE(pg_get_expr(d.adbin, d.adrelid), '') || ' '
       || COALESCE(col_description(c.oid, a.attnum), '')
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relkind IN ('r', 'v')
UNION ALL
SELECT 'constraint', c.relname || '.' || k.conname, pg_get_constraintdef(k.oid)
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid WHERE k.connamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'index', c.relname, pg_get_indexdef(c.oid)
FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relkind = 'i'
UNION ALL
SELECT 'view', c.relname, pg_get_viewdef(c.oid)
FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relkind = 'v'
UNION ALL
SELECT 'function', p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       pg_get_functiondef(p.oid) || COALESCE(obj_description(p.oid, 'pg_proc'), '')
FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'schema', 'watibot', COALESCE(obj_description((SELECT oid FROM ns), 'pg_namespace'), '')
"""


def catalog(url: str) -> set[tuple[str, str, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {tuple(row) for row in conn.execute(CATALOG).fetchall()}  # type: ignore[misc]


@pytest.fixture
def empty_database(postgres_admin_url: str) -> Iterator[str]:
    """A database with nothing in it."""
    name = f"empty_{uuid.uuid4().hex[:12]}"
    admin_execute(postgres_admin_url, f"CREATE DATABASE {name}")
    try:
        yield with_database(postgres_admin_url, name)
    finally:
        admin_execute(postgres_admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_schema_sql_is_what_the_migrations_build(database_url: str, empty_database: str) -> None:
    """A database built from migrations/schema.sql has exactly the objects `alembic upgrade head` builds."""
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(SCHEMA_FILE.read_text())  # type: ignore[arg-type]
    migrated, snapshot = catalog(database_url), catalog(empty_database)
    only_migrated = sorted(migrated - snapshot)
    only_snapshot = sorted(snapshot - migrated)
    assert (only_migrated, only_snapshot) == ([], []), (
        "migrations/schema.sql is out of date: run `python migrations/snapshot.py`")


def test_schema_sql_opens_with_the_state_diagram_of_every_status() -> None:
    """The hand-written head of schema.sql draws the burst's life and names every status in it."""
    header = SCHEMA_FILE.read_text().split("-- ==== pg_dump below")[0]
    assert "== The burst's life ==" in header
    missing = [status.value for status in BurstStatus if not re.search(rf"\b{status.value}\b", header)]
    assert missing == []


def test_burst_status_lists_exactly_the_statuses_of_the_check_constraint(sql: Sql) -> None:
    """BurstStatus and the burst table's CHECK constraint list the same statuses."""
    (definition,) = sql("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'burst_status_check'")[0]
    assert set(re.findall(r"'(\w+)'::text", definition)) == {status.value for status in BurstStatus}


def test_which_statuses_consume_is_the_same_rule_in_sql_and_python(sql: Sql) -> None:
    """watibot.consumes() and BurstStatus.consumes agree on every status; open ones never consume."""
    statuses = [status.value for status in BurstStatus]
    in_sql = dict(sql("SELECT s, watibot.consumes(s) FROM unnest(%s::text[]) AS s", statuses))
    assert in_sql == {status.value: status.consumes for status in BurstStatus}
    assert not OPEN_STATUSES & CONSUMING_STATUSES


# -- layers -------------------------------------------------------------------------------------------------------
# routes and the sweeper call the pipeline, the pipeline calls the stores, the stores call db; never upwards.
# (watibot.metrics is beside the layers: its counters are recorded from every layer.)
LAYERS = {
    "watibot.app": 5, "watibot.cli": 5, "watibot.ingest": 5, "watibot.operators": 5,
    "watibot.sweeper": 4,
    "watibot.pipeline": 3,
    "watibot.store": 2,
    "watibot.batching": 1, "watibot.db": 1,
}


def _layer(module: str) -> int | None:
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def test_modules_import_only_from_layers_below_them() -> None:
    """routes/CLI → sweeper → pipeline → store → db: no module imports one from its own layer's callers."""
    package = ROOT / "src" / "watibot"
    upward = []
    for path in package.rglob("*.py"):
        module = "watibot." + ".".join(path.relative_to(package).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        own = _layer(module)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                target = _layer(name)
                if target is not None and target > own:
                    upward.append(f"{module} imports {name}")
    assert upward == []
