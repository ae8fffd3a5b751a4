"""Set-based steps: the claim begins the fresh burst; a batch is marked, finished and released by one statement each.

Measured in bench/ (drain, pg_stat_statements with nested statements): a burst cost PostgreSQL ~0.8 ms, most of
it the per-row PL/pgSQL of the batch wrappers (each row a chain of small statements, each with its own executor
start) and a second claim-time round trip. Now:

- `watibot.claim_due` takes a batch of due conversations (`FOR UPDATE SKIP LOCKED` on `due_at`, as before) and, for
  each one whose buffer is plainly the next burst (no burst open, no operator pause, no operator answer to fold in,
  at least one message above the high-water mark), inserts that burst and writes the claim and `open_burst_id` in
  one update of the conversation row. Everything else it claims (a retry or a burst whose holder died, a pause, an
  operator's answer, gaps only) is begun by `begin_bursts` as before. `begin_burst`'s last branch and
  `claim_due`'s `fresh` column start the same burst (after the high-water mark, through the claim's
  last_position, attempts 1).
- `watibot.release_claims` releases a batch of claims in one UPDATE; `release_claim` is its one-row form, so the
  release rule (the mark moves when the closed burst's status consumes; the buffer left is due by the window
  rule) is still written once.
- `watibot.finish_bursts` closes its batch with one UPDATE of the bursts and one `release_claims`, instead of a
  `finish_burst` call per row (dropped: only the batch wrapper called it).
- `watibot.mark_sendings` makes the batch's ordinary marks (held, in time, and for part 1 neither paused nor
  outside the session window) with one UPDATE of the bursts and one of the leases that need covering; the rest
  (lost, late, paused, expired) are decided one by one in the same function. `mark_sending` is its one-row form.

An expand migration: the functions code at 0007 calls keep their signatures and outcomes, so it keeps working.
The downgrade puts 0007's `release_claim`, `finish_burst(s)` and `mark_sending(s)` back (read from 0007's SQL).

Revision ID: 0008_set_based_steps
Revises: 0007_burst_life
Create Date: 2026-12-06
"""

import re
from pathlib import Path

from alembic import op

revision = "0008_set_based_steps"
down_revision = "0007_burst_life"
branch_labels = None
depends_on = None

HERE = Path(__file__).resolve().parent


def upgrade() -> None:
    op.execute((HERE / "0008_set_based_steps.sql").read_text())


def _previous(name: str) -> str:
    """0007's CREATE FUNCTION statement for `name`, with its COMMENT when it has one."""
    text = (HERE / "0007_burst_life.sql").read_text()
    start = text.index(f"CREATE FUNCTION watibot.{name}(")
    end = text.index("END $$;", start) + len("END $$;")
    comment = re.match(rf"\s*COMMENT ON FUNCTION watibot\.{name} IS\s*(?:'(?:[^']|'')*'\s*)+;", text[end:])
    return text[start:end] + (comment.group(0) if comment else "")


def downgrade() -> None:
    restored = ";\n".join(_previous(name) for name in ("release_claim", "finish_burst", "finish_bursts",
                                                        "mark_sending", "mark_sendings"))
    op.execute("""
    DELETE FROM watibot.schema_compatibility WHERE revision = '0008_set_based_steps';
    DROP FUNCTION watibot.claim_due(integer, text, float8, boolean);
    DROP FUNCTION watibot.finish_bursts(text[], text[], bigint[], text[], bigint[], text[], text[], integer[], text[],
                                        text[], timestamptz[], text, float8, float8);
    DROP FUNCTION watibot.release_claim(text, text, text, float8, float8, timestamptz, bigint);
    DROP FUNCTION watibot.release_claims(text[], text[], bigint[], timestamptz[], text, float8, float8);
    DROP FUNCTION watibot.mark_sendings(text[], text[], bigint[], text[], bigint[], integer[], timestamptz[], text[],
                                        text[], integer[], timestamptz[], float8, float8, float8, text, float8, float8);
    DROP FUNCTION watibot.mark_sending(text, text, bigint, text, bigint, integer, timestamptz, float8, float8, float8,
                                       text, text, integer, timestamptz, text, float8, float8);
    """)
    op.execute(restored + ";")
