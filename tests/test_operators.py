"""The operator commands as users run them: `watibot status / conversation / dead / replay / prune` processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import (
    RunningApp,
    add_burst,
    add_message,
    app_settings,
    customer_message,
    previous_revision,
    wait_until,
)
from tests.fakes import Answer, FakeWati
from tests.test_cli import watibot
from watibot import db

Sql = Callable[..., list[tuple[Any, ...]]]


def run(database_url: str, *args: str) -> Any:
    """`watibot ARGS` against the test database."""
    return watibot(*args, env={"WATIBOT_DATABASE_URL": database_url})


def dead_burst_from_a_real_run(run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati,
                               sql: Sql) -> tuple[RunningApp, int]:
    """A customer message whose reply WATI refused permanently (401): the burst is dead."""
    fake_wati.script = [Answer(status=401, body={"error": "bad token"})]
    app = run_app(app_settings(database_url, fake_wati))
    app.post(customer_message("50376819621", "please book a table"))
    (row,) = wait_until(lambda: sql("SELECT id FROM watibot.burst WHERE status = 'dead'"), what="a dead burst")
    return app, int(row[0])


@pytest.mark.parametrize("command", ["serve", "migrate", "status", "conversation", "dead", "replay", "prune",
                                     "db-url", "webhook-url"])
def test_every_command_has_help_with_exit_codes(command: str) -> None:
    """`watibot COMMAND --help` explains the command and ends with the exit codes scripts rely on."""
    result = watibot(command, "--help")
    assert result.returncode == 0
    assert "Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error." in result.stdout


def test_status_prints_a_table_and_json_with_the_claims_of_each_worker(database_url: str, sql: Sql) -> None:
    """status shows every count by name, and --json adds health fields and the claims held per worker."""
    sql("INSERT INTO watibot.conversation (channel, customer, due_at, claimed_by, claimed_at, lease_expires_at) "
        "VALUES ('c', '1', now() + interval '20 s', 'host-a:41:ab', now(), now() + interval '20 s'), "
        "('c', '2', now() + interval '1 hour', NULL, NULL, NULL)")
    table = run(database_url, "status")
    assert table.returncode == 0, table.stderr
    for label in ("buffering", "due", "in flight", "lease expired", "buffered messages", "dead", "attention",
                  "schema", db.SCHEMA_REVISION, "host-a:41:ab"):
        assert label in table.stdout
    data = json.loads(run(database_url, "status", "--json").stdout)
    assert (data["buffering"], data["in_flight"], data["dead_bursts"]) == (1, 1, 0)
    assert data["workers"] == [{"owner": "host-a:41:ab", "held": 1, "expired": 0,
                                "worst_lease_left_seconds": pytest.approx(20, abs=5)}]


def test_status_exits_1_when_the_database_is_unreachable() -> None:
    """A script can tell "the database is away" from a healthy answer by the exit code."""
    result = watibot("status", env={"WATIBOT_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none",
                                    "WATIBOT_DB_TIMEOUT_SECONDS": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr


def test_conversation_prints_messages_bursts_and_replies_in_order(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati
) -> None:
    """After a real burst, the timeline lists the messages, then the burst, then the reply that was sent."""
    app = run_app(app_settings(database_url, fake_wati))
    app.post(customer_message("50376819621", "first question"))
    app.post(customer_message("50376819621", "second question"))
    fake_wati.wait_for_sent(1)
    result = run(database_url, "conversation", "50376819621")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    positions = [text.index(marker) for marker in ("first question", "second question", "2 messages", "Received 2")]
    assert positions == sorted(positions)
    assert "sent" in text
    missing = run(database_url, "conversation", "50300000000")
    assert missing.returncode == 1
    assert "no conversation" in missing.stderr


def test_dead_lists_the_reason_and_replay_gets_the_customer_answered(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """A dead burst shows up in `watibot dead` with its reason; `watibot replay` puts it back and it is sent."""
    _app, burst_id = dead_burst_from_a_real_run(run_app, database_url, fake_wati, sql)
    listed = run(database_url, "dead")
    assert listed.returncode == 0
    assert str(burst_id) in listed.stdout and "HTTP 401" in listed.stdout
    (entry,) = json.loads(run(database_url, "dead", "--json").stdout)
    assert (entry["burst_id"], entry["status"], entry["messages"]) == (burst_id, "dead", 1)

    replayed = run(database_url, "replay", str(burst_id))
    assert replayed.returncode == 0, replayed.stderr
    assert "1 messages back in the buffer" in replayed.stdout and "due now" in replayed.stdout
    (sent,) = fake_wati.wait_for_sent(1)
    assert sent["text"] == "Received 1 message:\n1. please book a table"
    assert sql("SELECT status, replayed_from FROM watibot.burst WHERE id = %s", burst_id) == [("replayed", "dead")]
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(1,)])
    assert json.loads(run(database_url, "dead", "--json").stdout) == []


def test_replay_refuses_a_burst_that_is_not_dead_and_changes_nothing(database_url: str, sql: Sql) -> None:
    """Replaying a sent (or unknown) burst exits 1 with a clear message; the database is unchanged."""
    sql("INSERT INTO watibot.conversation (channel, customer) VALUES ('c', '1')")
    burst_id = add_burst(sql, "1", "sent", finished_at="now()")
    add_message(sql, "1", burst_id=burst_id)
    result = run(database_url, "replay", str(burst_id))
    assert result.returncode == 1
    assert f"burst {burst_id} is sent: only dead or attention bursts can be replayed" in result.stderr
    assert sql("SELECT count(*) FROM watibot.message_outcome WHERE burst_id IS NULL") == [(0,)]
    assert sql("SELECT due_at FROM watibot.conversation") == [(None,)]
    unknown = run(database_url, "replay", "999999")
    assert (unknown.returncode, "does not exist" in unknown.stderr) == (1, True)
    assert run(database_url, "replay", "not-a-number").returncode == 2


def test_replay_of_a_claimed_conversation_leaves_its_lease_alone(database_url: str, sql: Sql) -> None:
    """While a worker holds the conversation (and has no burst open), replay opens the burst for the holder to
    run; due_at stays the lease. With a burst open, replay is refused and changes nothing."""
    sql("INSERT INTO watibot.conversation (channel, customer, due_at, claimed_by, claimed_at, lease_expires_at) "
        "VALUES ('c', '1', now() + interval '30 s', 'w', now(), now() + interval '30 s')")
    burst_id = add_burst(sql, "1", "attention", error="'unknown'", finished_at="now()")
    add_message(sql, "1", burst_id=burst_id)
    before = sql("SELECT due_at FROM watibot.conversation")
    result = run(database_url, "replay", str(burst_id))
    assert result.returncode == 0, result.stderr
    assert "claimed right now" in result.stdout
    assert sql("SELECT due_at FROM watibot.conversation") == before
    assert sql("SELECT count(*) FROM watibot.message_outcome WHERE burst_id IS NULL") == [(1,)]
    assert sql("SELECT b.status, b.messages FROM watibot.conversation c JOIN watibot.burst b "
               "ON b.id = c.open_burst_id") == [("retry", 1)]

    other = add_burst(sql, "1", "dead", error="'gave up'", finished_at="now()")
    busy = run(database_url, "replay", str(other))
    assert (busy.returncode, "has a burst in progress" in busy.stderr) == (1, True)
    assert sql("SELECT status FROM watibot.burst WHERE id = %s", other) == [("dead",)]


def test_prune_deletes_old_finished_bursts_only_and_keeps_metrics_totals(database_url: str, sql: Sql) -> None:
    """prune removes old finished bursts and their messages; buffered messages, open, recent and dead stay."""
    sql("INSERT INTO watibot.conversation (channel, customer) VALUES ('c', '1')")

    def burst(status: str, finished: str | None) -> int:
        return add_burst(sql, "1", status, due_at="now() - interval '40 days'",
                         started_at="now() - interval '40 days' + interval '0.3 s'",
                         finished_at="NULL" if finished is None else f"now() - interval '{finished}'")

    def message(burst_id: int | None) -> None:
        add_message(sql, "1", burst_id=burst_id)

    old = [burst("sent", "40 days") for _ in range(7)]
    for burst_id in old:
        message(burst_id)
        message(burst_id)
    recent = burst("sent", "1 day")
    message(recent)
    dead = burst("dead", "40 days")
    message(dead)
    burst("retry", None)
    message(None)
    totals_before = sql("SELECT series, label, count FROM ("
                        "SELECT 'outcome' AS series, outcome AS label, count(*) AS count "
                        "FROM watibot.finished_burst_facts GROUP BY outcome) t ORDER BY 1, 2")

    result = run(database_url, "prune", "--older-than", "30d", "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    assert "pruned 7 bursts and 14 messages" in result.stdout
    assert sql("SELECT status, finished_at IS NULL FROM watibot.burst ORDER BY id") == [
        ("sent", False), ("dead", False), ("retry", True)]
    assert sql("SELECT count(*) FILTER (WHERE burst_id IS NULL), count(*) FROM watibot.message_outcome") == [(1, 3)]
    assert sql("SELECT count, sum FROM watibot.pruned_burst_totals WHERE series = 'claim_lag'") == [
        (7, pytest.approx(2.1))]
    live = sql("SELECT outcome, count(*) FROM watibot.finished_burst_facts GROUP BY outcome ORDER BY 1")
    pruned = sql("SELECT label, count FROM watibot.pruned_burst_totals WHERE series = 'outcome'")
    assert dict(live) | {"sent": dict(live)["sent"] + dict(pruned)["sent"]} == {
        label: count for _, label, count in totals_before}

    with_dead = run(database_url, "prune", "--older-than", "30d", "--include-dead")
    assert "pruned 1 bursts and 1 messages" in with_dead.stdout
    assert run(database_url, "prune", "--older-than", "soon").returncode == 2


def test_operator_commands_on_an_unmigrated_database_say_to_migrate(database_url: str) -> None:
    """Against a schema older than this code (or none), the commands exit 1 and say `watibot migrate`."""
    older = previous_revision()
    db.downgrade(database_url, older)
    for args in (["status"], ["dead"], ["prune", "--older-than", "30d"]):
        result = run(database_url, *args)
        assert result.returncode == 1
        expected = f"schema at {older}, expected {db.SCHEMA_REVISION}: run `watibot migrate`"
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
    db.downgrade(database_url, "base")
    result = run(database_url, "status")
    assert (result.returncode, "schema is not migrated" in result.stderr) == (1, True)


HOSTILE_TEXTS = [
    "[/] unbalanced closing tag",
    "[link=https://e.example]x[/link][bold red]URGENT[/] :smiley:",
    "\x1b[2J\x1b[31mred and a cleared screen\x1b]8;;https://evil.example\x07link\x1b]8;;\x07",
    "line one\rOVERWRITTEN \u202eevil\u202c \x00nul",
]


def test_operator_commands_print_customer_text_literally_with_control_characters_visible(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql,
) -> None:
    """Markup, emoji codes, ESC sequences, carriage returns and bidi overrides a customer wrote reach neither
    `conversation` nor `dead` as markup or control codes: they print literally, escapes spelled out, exit 0."""
    fake_wati.script = [Answer(status=401, body={"error": "bad token"})]
    app = run_app(app_settings(database_url, fake_wati))
    for n, text in enumerate(HOSTILE_TEXTS):
        assert app.post(customer_message("50376819621", text, message_id=f"wamid.hostile.{n}")).status_code == 200
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'dead'") == [(1,)], what="dead")
    sql("UPDATE watibot.burst SET error = %s", HOSTILE_TEXTS[1] + " " + HOSTILE_TEXTS[2])
    story = run(database_url, "conversation", "50376819621")
    dead = run(database_url, "dead")
    for result in (story, dead):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\u202e" not in result.stdout
        assert "\\x1b[2J" in squashed(result.stdout)
    flat = squashed(story.stdout)
    assert "[/]unbalancedclosingtag" in flat
    assert "[link=https://e.example]x[/link][boldred]URGENT[/]" in flat
    assert ":smiley:" in flat and "\N{SMILING FACE WITH OPEN MOUTH}" not in flat
    assert "lineone⏎OVERWRITTEN\\u202eevil" in flat  # a carriage return splits lines as a newline does
    assert "[link=https://e.example]x[/link][boldred]URGENT" in squashed(dead.stdout)


def squashed(table: str) -> str:
    """A table's text without whitespace and borders, so a cell's content reads whole however it wrapped."""
    import re

    return re.sub(r"[\s│┃║]", "", table)


def test_replay_of_a_burst_wati_accepted_is_refused_without_force(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql,
) -> None:
    """An attention burst whose reply WATI accepted (delivery failed later) is not replayed without --force, nor
    one whose send outcome is unknown; each refusal says why and changes nothing; --force replays."""
    from tests.conftest import sample

    app = run_app(app_settings(database_url, fake_wati))
    app.post(customer_message("50376819621", "accepted then failed"))
    (sent,) = fake_wati.wait_for_sent(1)
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("sent",)])
    failed = sample("session-message-failed", localMessageId=sent["local_message_id"], waId="50376819621")
    assert app.post(failed).json() == {"status": "recorded"}
    (burst_id,) = sql("SELECT id FROM watibot.burst WHERE status = 'attention'")[0]
    refused = run(database_url, "replay", str(burst_id))
    assert refused.returncode == 1
    assert "WATI accepted its reply" in refused.stderr and "--force" in refused.stderr
    assert sql("SELECT status FROM watibot.burst") == [("attention",)]
    sql("UPDATE watibot.burst SET sent_at = NULL, parts_sent = 0, sending_part = 0")  # as a send cut mid-flight
    unknown = run(database_url, "replay", str(burst_id))
    assert (unknown.returncode, "outcome is unknown" in unknown.stderr) == (1, True)
    forced = run(database_url, "replay", "--force", str(burst_id))
    assert forced.returncode == 0, forced.stderr
    assert sql("SELECT status FROM watibot.burst WHERE id = %s", burst_id) == [("replayed",)]
    fake_wati.wait_for_sent(2)
