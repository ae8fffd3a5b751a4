"""What the operator commands print: `watibot status`, `conversation`, `dead`, `replay` and `prune`.

The data comes from `store.OperatorStore`; this module only shapes it into tables (rich) and parses arguments.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from watibot.logs import visible
from watibot.store import OperatorStore
from watibot.store.records import ConversationStory, ReplayResult

_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w`, `45s` as a timedelta; ValueError otherwise (argparse reports it, exit 2)."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 90m, 2w or 45s")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def console() -> Console:
    """stdout; wide when piped, so that scripts and greps see whole lines. No markup and no emoji codes: what
    customers wrote is printed as they wrote it (`[bold]` stays `[bold]`), control characters made visible."""
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False, soft_wrap=False, markup=False,
                   emoji=False)


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} s"


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str | None, width: int = 70) -> str:
    if text is None:
        return ""
    flat = visible(" ⏎ ".join(text.splitlines()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def status_data(repository: OperatorStore) -> dict[str, Any]:
    """Everything `watibot status` shows: the legacy counts, the health row and the claims per worker."""
    counts = await repository.status()
    health = await repository.health()
    return {
        **counts,
        "schema_revision": health["schema_revision"],
        "dead_bursts": health["dead"],
        "attention_bursts": health["attention"],
        "busy_workers": health["busy_workers"],
        "bursts_last_hour": health["bursts_last_hour"],
        "last_burst_finished_at": health["last_burst_finished_at"],
        "workers": await repository.workers_in_flight(),
    }


def render_status(out: Console, data: dict[str, Any]) -> None:
    """The status table and the claims per worker."""
    table = Table(title="watibot status", title_justify="left")
    table.add_column("what")
    table.add_column("now", justify="right")
    table.add_column("meaning")
    rows = [
        ("buffering", data["buffering"], "conversations waiting for their window to end (or a retry)"),
        ("due", data["due"], "due and not yet claimed"),
        ("oldest due", _seconds(data["oldest_due_seconds"]), "how late the most overdue one is"),
        ("in flight", data["in_flight"], "claimed, lease valid"),
        ("lease expired", data["lease_expired"], "claimed, lease expired: another worker will take over"),
        ("buffered messages", data["buffered_messages"], "messages not yet answered"),
        ("paused", data["paused"], "conversations where a human operator took over (bot silent)"),
        ("dead", data["dead_bursts"], "bursts that gave up (watibot dead, watibot replay)"),
        ("attention", data["attention_bursts"], "send outcome unknown or delivery failed: a human decides"),
        ("bursts last hour", data["bursts_last_hour"], "bursts finished in the last hour"),
        ("last burst", _time(data["last_burst_finished_at"]), "when the latest burst finished"),
        ("schema", data["schema_revision"], "database migration revision"),
    ]
    for name, value, meaning in rows:
        table.add_row(name, str(value), meaning)
    out.print(table)
    workers = Table(title="claims per worker (host:pid:id)", title_justify="left")
    for column in ("worker", "held", "lease expired", "worst lease left"):
        workers.add_column(column, justify="left" if column == "worker" else "right")
    for worker in data["workers"]:
        workers.add_row(worker["owner"], str(worker["held"]), str(worker["expired"]),
                        _seconds(worker["worst_lease_left_seconds"]))
    if not data["workers"]:
        workers.add_row("(no claims held right now)", "", "", "")
    out.print(workers)


def render_conversation(out: Console, story: ConversationStory) -> None:
    """One conversation as a timeline: messages, bursts and replies in the order they happened."""
    conversation = story.conversation
    state = "idle"
    if conversation["claimed_by"]:
        state = f"claimed by {conversation['claimed_by']} until {_time(conversation['lease_expires_at'])}"
    elif conversation["due_at"]:
        state = f"due at {_time(conversation['due_at'])}"
    error = f"; last error: {_short(conversation['last_error'], 200)}" if conversation["last_error"] else ""
    out.print(visible(f"conversation {conversation['channel']}/{conversation['customer']} "
                      f"(waId {conversation['wa_id']}): {state}") + error)
    events: list[tuple[datetime, int, str, str, str]] = []
    for message in story.messages:
        where = f"burst {message['burst_id']}" if message["burst_id"] else "buffered"
        events.append((message["received_at"], 0, f"message {message['id']}",
                       f"{message['type']}: {_short(message['text'])}", where))
    for burst in story.bursts:
        status = burst["status"] + (f" (was {burst['replayed_from']})" if burst["replayed_from"] else "")
        events.append((burst["created_at"], 1, f"burst {burst['id']}",
                       f"{burst['messages']} messages, attempt {burst['attempts']}", status))
        if burst["reply"] is not None:
            events.append((burst["sent_at"] or burst["finished_at"] or burst["created_at"], 2,
                           f"reply {burst['id']}", _short(burst["reply"]), "sent" if burst["sent_at"] else ""))
        if burst["error"]:
            events.append((burst["finished_at"] or burst["created_at"], 3, f"error {burst['id']}",
                           _short(burst["error"], 100), burst["status"]))
    table = Table()
    for column in ("time", "what", "detail", "state"):
        table.add_column(column)
    for when, _, what, detail, state_text in sorted(events, key=lambda event: (event[0], event[1])):
        table.add_row(_time(when), what, detail, state_text)
    out.print(table)


def render_dead(out: Console, bursts: list[dict[str, Any]]) -> None:
    """Dead and attention bursts with their reasons."""
    table = Table(title="bursts that need a human (replay with `watibot replay BURST_ID`)", title_justify="left")
    for column in ("burst", "status", "conversation", "messages", "attempts", "finished", "reason"):
        table.add_column(column)
    for burst in bursts:
        table.add_row(str(burst["burst_id"]), burst["status"], visible(f"{burst['channel']}/{burst['customer']}"),
                      str(burst["messages"]), str(burst["attempts"]), _time(burst["finished_at"]),
                      _short(burst["reason"], 100))
    out.print(table)


def describe_replay(result: ReplayResult) -> str:
    """One line saying what the replay did."""
    when = ("due now" if result.due_now
            else "claimed right now: answered when its holder releases the conversation")
    return (f"burst {result.burst_id} ({result.replayed_from}) replayed as burst {result.new_burst_id}: "
            f"{result.messages} messages back in the buffer of {result.channel}/{result.customer}, {when}")
