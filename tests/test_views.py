"""The psql views in schema watibot: what an operator sees during an incident, straight from the tables."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import add_burst, add_message
from watibot import db

Sql = Callable[..., list[tuple[Any, ...]]]

VIEWS = ("buffering", "overdue", "in_flight", "dead", "recent_bursts", "health", "finished_burst_facts",
         "message_outcome")


@pytest.fixture
def incident(sql: Sql) -> Sql:
    """A database in the middle of an incident: buffering, overdue, in flight, expired, dead and sent work."""
    sql("""INSERT INTO watibot.conversation (channel, customer, due_at, buffer_started_at, claimed_by, claimed_at,
                                             lease_expires_at, attempts, last_error) VALUES
        ('c', 'buffering', now() + interval '40 s', now() - interval '25 s', NULL, NULL, NULL, 0, NULL),
        ('c', 'overdue', now() - interval '90 s', now() - interval '155 s', NULL, NULL, NULL, 2, 'HTTP 500'),
        ('c', 'held', now() + interval '20 s', now() - interval '70 s', 'host:1:w', now() - interval '10 s',
         now() + interval '20 s', 1, NULL),
        ('c', 'expired', now() - interval '5 s', now() - interval '99 s', 'host:2:w', now() - interval '35 s',
         now() - interval '5 s', 1, NULL),
        ('c', 'idle', NULL, NULL, NULL, NULL, NULL, 0, NULL)""")
    add_message(sql, "buffering", "hello")
    add_message(sql, "buffering", "again")
    add_message(sql, "overdue", "late")
    add_burst(sql, "held", "processing")
    dead = add_burst(sql, "idle", "dead", error="'gave up after 5 attempts: HTTP 500'", finished_at="now()")
    add_message(sql, "idle", "lost", dead)
    add_burst(sql, "idle", "attention", error="'send outcome unknown'", finished_at="now()")
    add_burst(sql, "idle", "sent", prompt="'hi there'", reply="'Hello!'", due_at="now() - interval '3 s'",
              started_at="now() - interval '2.9 s'", agent_started_at="now() - interval '2.8 s'",
              agent_finished_at="now() - interval '1.3 s'", sent_at="now() - interval '1 s'",
              finished_at="now() - interval '1 s'")
    return sql


def test_every_view_is_commented(sql: Sql) -> None:
    """`\\dv+ watibot.*` explains every view: each has a COMMENT."""
    rows = sql("SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
               "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'watibot' AND c.relkind = 'v'")
    assert {name for name, _ in rows} == set(VIEWS)
    assert all(comment for _, comment in rows)


def test_buffering_and_overdue_views_show_due_times_lag_and_message_counts(incident: Sql) -> None:
    """buffering lists the waiting conversation with seconds until due; overdue the late one with its lag."""
    buffering = incident("SELECT customer, messages, waiting_for, seconds_until_due FROM watibot.buffering")
    assert len(buffering) == 1
    customer, messages, waiting_for, seconds = buffering[0]
    assert (customer, messages, waiting_for) == ("buffering", 2, "window")
    assert 30 < seconds <= 40
    overdue = incident("SELECT customer, messages, lag_seconds, attempts, last_error FROM watibot.overdue")
    assert len(overdue) == 1
    assert overdue[0][:2] == ("overdue", 1) and overdue[0][3:] == (2, "HTTP 500")
    assert 90 <= overdue[0][2] < 120


def test_in_flight_view_shows_owner_lease_left_and_expired_leases(incident: Sql) -> None:
    """in_flight names the holder, the lease left (negative when expired) and the open burst."""
    rows = incident("SELECT customer, owner, lease_left_seconds, lease_expired, burst_status, attempts "
                    "FROM watibot.in_flight ORDER BY customer")
    assert [row[0] for row in rows] == ["expired", "held"]
    expired, held = rows
    assert expired[1] == "host:2:w" and expired[2] < 0 and expired[3] is True
    assert held[1] == "host:1:w" and 10 < held[2] <= 20 and held[3] is False
    assert (held[4], held[5]) == ("processing", 1)


def test_dead_view_lists_dead_and_attention_bursts_with_their_reason(incident: Sql) -> None:
    """dead shows both kinds of bursts that need a human, with the reason and message count."""
    rows = incident("SELECT status, reason, messages FROM watibot.dead ORDER BY burst_id")
    assert [(status, reason) for status, reason, _ in rows] == [
        ("dead", "gave up after 5 attempts: HTTP 500"), ("attention", "send outcome unknown")]


def test_recent_bursts_view_shows_prompt_reply_and_timings(incident: Sql) -> None:
    """recent_bursts computes claim lag, agent and send times for a sent burst."""
    (row,) = incident("SELECT prompt, reply, claim_lag_seconds, agent_seconds, send_seconds "
                      "FROM watibot.recent_bursts WHERE status = 'sent'")
    assert row[:2] == ("hi there", "Hello!")
    assert [float(value) for value in row[2:]] == pytest.approx([0.1, 1.5, 0.3], abs=0.01)


def test_health_view_is_one_row_summarising_the_incident(incident: Sql) -> None:
    """health is a single row with every count the operator checks first."""
    rows = incident("SELECT schema_revision, buffering, overdue, in_flight, leases_expired, busy_workers, "
                    "buffered_messages, dead, attention, bursts_last_hour, max_lag_seconds FROM watibot.health")
    assert len(rows) == 1
    *counts, lag = rows[0]
    assert counts == [db.SCHEMA_REVISION, 1, 1, 1, 1, 2, 3, 1, 1, 3]
    assert 90 <= lag < 120


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [(0.0, "0.05"), (0.05, "0.05"), (0.051, "0.1"), (1.0, "1"), (1.5, "2.5"), (600.0, "600"), (601.0, "+Inf")],
)
def test_histogram_bucket_is_upper_inclusive_like_prometheus(sql: Sql, seconds: float, bucket: str) -> None:
    """A duration falls in the first bucket whose upper bound is at least the duration."""
    assert sql("SELECT watibot.histogram_bucket(%s)", seconds) == [(bucket,)]


def test_every_query_of_the_readme_psql_cookbook_runs(incident: Sql) -> None:
    """The README's psql cookbook queries all run against the current schema."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cookbook = readme.split("## psql cookbook", 1)[1].split("\n## ", 1)[0]
    statements = [statement.strip() for block in re.findall(r"```sql\n(.+?)```", cookbook, flags=re.DOTALL)
                  for statement in block.split(";\n") if statement.strip()]
    assert len(statements) >= 7
    for statement in statements:
        incident(statement)
