"""WATI accounts: the ids WATI returns for the parts we send (V3), so that its reports and echoes find the burst.

WATI's V3 send API takes no caller-supplied `localMessageId`: it returns the message's `id` (and its own
`local_message_id`), which its later webhooks (delivery reports, the `sessionMessageSent` echo of our own reply)
carry. `watibot.wati_message` keeps each of them with the burst and part it was returned for. v1 sends keep
naming the burst in `localMessageId` and write nothing here.

An expand migration (a new table; nothing the previous code reads or calls changes): it serves code at
0008_set_based_steps too.

Revision ID: 0009_wati_accounts
Revises: 0008_set_based_steps
Create Date: 2026-12-06
"""

from alembic import op

revision = "0009_wati_accounts"
down_revision = "0008_set_based_steps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE watibot.wati_message (
        wati_message_id text PRIMARY KEY,
        burst_id bigint NOT NULL REFERENCES watibot.burst (id) ON DELETE CASCADE,
        part integer NOT NULL CHECK (part >= 0),
        recorded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX wati_message_burst_idx ON watibot.wati_message (burst_id);
    COMMENT ON TABLE watibot.wati_message IS
        'An id WATI returned for a part we sent (V3 API): its reports and echoes carry it instead of our '
        'localMessageId. Deleted with its burst (watibot prune).';
    COMMENT ON COLUMN watibot.wati_message.wati_message_id IS
        'WATI''s message id or local_message_id, as its send answer gave it.';
    COMMENT ON COLUMN watibot.wati_message.burst_id IS 'The burst whose reply the message carried.';
    COMMENT ON COLUMN watibot.wati_message.part IS 'Which part of the reply (0 = the first).';
    COMMENT ON COLUMN watibot.wati_message.recorded_at IS 'When WATI''s answer was recorded (database clock).';
    INSERT INTO watibot.schema_compatibility (revision, position, oldest_code_revision)
        VALUES ('0009_wati_accounts', 9, '0008_set_based_steps');
    """)


def downgrade() -> None:
    op.execute("""
    DELETE FROM watibot.schema_compatibility WHERE revision = '0009_wati_accounts';
    DROP TABLE watibot.wati_message;
    """)
