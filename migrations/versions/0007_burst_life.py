"""One burst, one place: consume by high-water mark, write message rows once, the burst's life rewritten.

A burst is now "the conversation's messages after `answered_position`, up to the position fixed at the claim":
consuming it is one write to the conversation, whatever its size. Positions are assigned by the webhook statement
under the conversation row's lock, so they grow in commit order (a global sequence would not: an id drawn before
a claim may commit after it). `message.burst_id` (rewritten for every message of every burst: non-HOT, two
indexes and a foreign key check each) and `burst.message_ids` are gone; three message indexes went with them.
The burst's transitions are rewritten with named parameters and the rules each written once (window, session
window, which statuses consume); batches lock their conversations in an explicit ordered step. The SQL is in
0007_burst_life.sql beside this file; migrations/schema.sql is the whole schema as it is now.

A contract migration (the previous code's functions are gone): older workers stop claiming when it runs.
The downgrade restores 0006 with the data: message.burst_id from the ranges, burst.message_ids, the old
functions and views.

Revision ID: 0007_burst_life
Revises: 0006_schema_compatibility
Create Date: 2026-12-02
"""

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = "0007_burst_life"
down_revision = "0006_schema_compatibility"
branch_labels = None
depends_on = None

HERE = Path(__file__).resolve().parent


def _revision_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"watibot_migration_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.execute((HERE / "0007_burst_life.sql").read_text())


def downgrade() -> None:
    op.execute("""
    DELETE FROM watibot.schema_compatibility WHERE revision = '0007_burst_life';

    ALTER TABLE watibot.message ADD COLUMN burst_id bigint REFERENCES watibot.burst;
    ALTER TABLE watibot.burst ADD COLUMN message_ids bigint[];
    UPDATE watibot.message AS m SET burst_id = o.burst_id
    FROM watibot.message_outcome AS o WHERE o.message_id = m.id AND o.burst_id IS NOT NULL;
    UPDATE watibot.burst AS b SET message_ids = ARRAY(
        SELECT m.id FROM watibot.message AS m
        WHERE m.channel = b.channel AND m.customer = b.customer
          AND m.position > b.after_position AND m.position <= b.through_position
        ORDER BY m.position);
    ALTER TABLE watibot.burst ALTER COLUMN message_ids SET NOT NULL;
    COMMENT ON COLUMN watibot.message.burst_id IS 'The burst that consumed it; NULL while buffered.';
    COMMENT ON COLUMN watibot.burst.message_ids IS 'watibot.message ids of this burst, in prompt order.';

    DROP VIEW watibot.health;
    DROP VIEW watibot.recent_bursts;
    DROP VIEW watibot.dead;
    DROP VIEW watibot.in_flight;
    DROP VIEW watibot.overdue;
    DROP VIEW watibot.buffering;
    DROP VIEW watibot.message_outcome;
    DROP FUNCTION watibot.begin_bursts(text[], text[], bigint[], text[], timestamptz[], bigint[], integer, boolean,
                                       text, float8, float8);
    DROP FUNCTION watibot.mark_sendings(text[], text[], bigint[], text[], bigint[], integer[], timestamptz[],
                                        text[], text[], integer[], timestamptz[], float8, float8, float8, text,
                                        float8, float8);
    DROP FUNCTION watibot.finish_bursts(text[], text[], bigint[], text[], bigint[], text[], text[], integer[],
                                        text[], text[], timestamptz[], text, float8, float8);
    DROP FUNCTION watibot.burst_fact_totals(bigint[]);
    DROP FUNCTION watibot.replay_burst(bigint, boolean);
    DROP FUNCTION watibot.hand_back(text, text, bigint, text, bigint);
    DROP FUNCTION watibot.fail_burst(text, text, bigint, text, bigint, text, boolean, float8, integer, text, float8,
                                     float8);
    DROP FUNCTION watibot.finish_burst(text, text, bigint, text, bigint, text, text, integer, text, text,
                                       timestamptz, text, float8, float8);
    DROP FUNCTION watibot.part_sent(text, text, bigint, text, bigint, integer);
    DROP FUNCTION watibot.mark_sending(text, text, bigint, text, bigint, integer, timestamptz, float8, float8,
                                       float8, text, text, integer, timestamptz, text, float8, float8);
    DROP FUNCTION watibot.begin_burst(text, text, bigint, text, timestamptz, bigint, integer, boolean, text,
                                      float8, float8);
    DROP FUNCTION watibot.release_claim(text, text, text, float8, float8, timestamptz, bigint);
    DROP FUNCTION watibot.burst_messages(text, text, bigint, bigint);
    DROP FUNCTION watibot.lock_conversations(text[], text[]);
    DROP FUNCTION watibot.held_conversation(text, text, bigint, text);
    DROP FUNCTION watibot.consumes(text);
    DROP FUNCTION watibot.in_session_window(timestamptz, float8);
    DROP FUNCTION watibot.buffer_due(timestamptz, timestamptz, text, float8, float8);

    DROP INDEX watibot.message_position_idx;
    ALTER TABLE watibot.message RESET (fillfactor), DROP COLUMN position;
    CREATE INDEX message_buffered_idx ON watibot.message (channel, customer, id) WHERE burst_id IS NULL;
    CREATE INDEX message_conversation_idx ON watibot.message (channel, customer, received_at);
    CREATE INDEX message_burst_idx ON watibot.message (burst_id) WHERE burst_id IS NOT NULL;
    CREATE UNIQUE INDEX burst_open_idx ON watibot.burst (channel, customer)
        WHERE status IN ('processing', 'sending', 'retry');
    ALTER TABLE watibot.burst DROP COLUMN after_position, DROP COLUMN through_position, DROP COLUMN messages;
    ALTER TABLE watibot.conversation
        DROP COLUMN last_position, DROP COLUMN answered_position, DROP COLUMN human_position,
        DROP COLUMN last_customer_message_at, DROP COLUMN open_burst_id;
    COMMENT ON COLUMN watibot.conversation.human_message_at IS
        'When an operator last wrote to the customer; messages received before it count as answered by a human.';
    """)
    op.execute(_revision_module("0003_operability").VIEWS)
    op.execute(_revision_module("0004_burst_functions").FUNCTIONS)
    op.execute(_revision_module("0005_batched_steps").FUNCTIONS)
