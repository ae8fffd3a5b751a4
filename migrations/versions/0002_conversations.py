"""Conversations: human takeover pause, delivery state of sent replies, superseded/expired/human bursts.

Revision ID: 0002_conversations
Revises: 0001_core
Create Date: 2026-11-30
"""

from alembic import op

revision = "0002_conversations"
down_revision = "0001_core"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE watibot.conversation
        ADD COLUMN paused_until     timestamptz,
        ADD COLUMN human_message_at timestamptz;
    COMMENT ON COLUMN watibot.conversation.paused_until IS
        'A human operator wrote to the customer: the bot stays silent until then (WATIBOT_HUMAN_PAUSE_SECONDS).';
    COMMENT ON COLUMN watibot.conversation.human_message_at IS
        'When an operator last wrote to the customer; messages received before it count as answered by a human.';

    ALTER TABLE watibot.burst
        ADD COLUMN delivery_status text,
        ADD COLUMN delivery_error  text,
        ADD COLUMN delivered_at    timestamptz,
        ADD COLUMN read_at         timestamptz,
        DROP CONSTRAINT burst_status_check,
        ADD CONSTRAINT burst_status_check CHECK (status IN ('processing', 'sending', 'retry', 'sent', 'no_reply',
            'dead', 'attention', 'replayed', 'superseded', 'expired', 'human'));
    COMMENT ON COLUMN watibot.burst.status IS
        'processing (agent running) | sending (reply recorded, parts going out) | retry (waiting to retry) | '
        'sent | no_reply (agent chose silence) | dead (gave up, see error) | attention (a send with unknown '
        'outcome, or a failed delivery: not re-sent, a human decides) | replayed (messages put back by watibot '
        'replay) | superseded (newer messages arrived before sending: reply discarded, messages answered by the '
        'next burst) | expired (outside WhatsApp''s 24-hour window: not sent) | human (answered by an operator)';
    COMMENT ON COLUMN watibot.burst.delivery_status IS
        'What WATI reported after accepting the reply: delivered | read | replied | failed.';
    COMMENT ON COLUMN watibot.burst.delivery_error IS 'failedCode and failedDetail of a sessionMessageFailed event.';
    """)


def downgrade() -> None:
    op.execute("""
    UPDATE watibot.burst SET status = 'dead' WHERE status IN ('superseded', 'expired', 'human');
    ALTER TABLE watibot.burst
        DROP CONSTRAINT burst_status_check,
        ADD CONSTRAINT burst_status_check CHECK (status IN ('processing', 'sending', 'retry', 'sent', 'no_reply',
            'dead', 'attention', 'replayed')),
        DROP COLUMN read_at,
        DROP COLUMN delivered_at,
        DROP COLUMN delivery_error,
        DROP COLUMN delivery_status;
    ALTER TABLE watibot.conversation DROP COLUMN human_message_at, DROP COLUMN paused_until;
    """)
