"""The "sending" mark as a function, so a worker can run the marks of many bursts in one statement.

Its session-window check reads only the messages received inside the window (the statement it replaces read
every message of the conversation on every send).

Since this revision a worker runs each burst step (begin, mark sending, finish) for all its bursts that reach
that step together, as one statement calling the step's function once per burst, in a fixed order of
conversations (so batches never deadlock with each other or with the heartbeat), and one commit.

Revision ID: 0005_batched_steps
Revises: 0004_burst_functions
Create Date: 2026-11-30
"""

from alembic import op

revision = "0005_batched_steps"
down_revision = "0004_burst_functions"
branch_labels = None
depends_on = None


# The functions, as this revision made them (migration 0007 restores them on its downgrade).
FUNCTIONS = """
    -- Before a reply part goes to WATI: extend the lease to cover the send, record the agent's reply (first
    -- time only) and mark the part in flight, unless the customer's newest message is older than WhatsApp's
    -- session window (may_send false, nothing marked). held = false: the fence no longer matches, or the burst
    -- is not there; nothing changed.
    CREATE FUNCTION watibot.mark_sending(
        p_channel text, p_customer text, p_fence bigint, p_owner text, p_lease float8, p_burst_id bigint,
        p_part integer, p_window float8, p_prompt text, p_reply text, p_reply_parts integer,
        p_agent_started_at timestamptz, OUT held boolean, OUT may_send boolean)
    LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE watibot.conversation SET
            lease_expires_at = now() + make_interval(secs => p_lease),
            due_at = now() + make_interval(secs => p_lease)
        WHERE channel = p_channel AND customer = p_customer AND fence = p_fence AND claimed_by = p_owner;
        IF NOT FOUND THEN
            held := false;
            may_send := false;
            RETURN;
        END IF;
        -- A customer message inside the window. A message is received after it is sent, so only messages
        -- received inside the window can qualify: an index range on message_conversation_idx, however long the
        -- conversation's history (the statement this replaces read every message of the conversation).
        SELECT COALESCE(p_part > 0 OR EXISTS (
            SELECT 1 FROM watibot.message AS m
            WHERE m.channel = p_channel AND m.customer = p_customer
              AND m.received_at > now() - make_interval(secs => p_window)
              AND COALESCE(m.wati_timestamp, m.received_at) > now() - make_interval(secs => p_window)), false)
        INTO may_send;
        UPDATE watibot.burst SET
            status = 'sending',
            sending_part = CASE WHEN may_send THEN p_part END,
            prompt = COALESCE(p_prompt, prompt), reply = COALESCE(p_reply, reply),
            reply_parts = COALESCE(p_reply_parts, reply_parts),
            agent_started_at = COALESCE(p_agent_started_at, agent_started_at),
            agent_finished_at = CASE WHEN p_reply IS NOT NULL THEN now() ELSE agent_finished_at END
        WHERE id = p_burst_id;
        held := FOUND;
    END $$;
    COMMENT ON FUNCTION watibot.mark_sending(text, text, bigint, text, float8, bigint, integer, float8, text, text,
                                             integer, timestamptz) IS
        'Fenced: extend the lease, record the reply, mark a part in flight before it goes to WATI.';
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("""
    DROP FUNCTION watibot.mark_sending(text, text, bigint, text, float8, bigint, integer, float8, text, text,
                                       integer, timestamptz);
    """)
