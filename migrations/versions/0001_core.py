"""Core schema: conversations (the claim), messages (the buffer) and bursts (processing runs).

Revision ID: 0001_core
Revises:
Create Date: 2026-11-30
"""

from alembic import op

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE watibot.conversation (
        channel           text        NOT NULL,
        customer          text        NOT NULL,
        wa_id             text,
        due_at            timestamptz,
        buffer_started_at timestamptz,
        claimed_by        text,
        claimed_at        timestamptz,
        lease_expires_at  timestamptz,
        fence             bigint      NOT NULL DEFAULT 0,
        attempts          integer     NOT NULL DEFAULT 0,
        last_error        text,
        created_at        timestamptz NOT NULL DEFAULT now(),
        updated_at        timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (channel, customer),
        CHECK ((claimed_by IS NULL) = (lease_expires_at IS NULL))
    ) WITH (
        fillfactor = 70,
        autovacuum_vacuum_scale_factor = 0.02,
        autovacuum_analyze_scale_factor = 0.02,
        autovacuum_vacuum_cost_delay = 0
    );

    -- The claim reads only rows that have something to do; idle conversations (due_at NULL) are not in it.
    CREATE INDEX conversation_due_idx ON watibot.conversation (due_at) WHERE due_at IS NOT NULL;

    COMMENT ON TABLE watibot.conversation IS
        'One row per customer per WhatsApp number: the timer (due_at) and the claim (claimed_by, lease, fence).';
    COMMENT ON COLUMN watibot.conversation.channel IS
        'WATI channelPhoneNumber: our number that received the messages ('''' when WATI sent none).';
    COMMENT ON COLUMN watibot.conversation.customer IS
        'The customer: WATI bsuid when sent, otherwise waId.';
    COMMENT ON COLUMN watibot.conversation.wa_id IS 'Latest waId seen; replies are sent to it.';
    COMMENT ON COLUMN watibot.conversation.due_at IS
        'When a sweeper should next look at this conversation: end of the buffer window, a retry time, or '
        'the lease expiry while claimed. NULL: nothing to do.';
    COMMENT ON COLUMN watibot.conversation.buffer_started_at IS
        'Arrival of the first message of the burst being buffered (start of the window).';
    COMMENT ON COLUMN watibot.conversation.claimed_by IS 'Worker id holding the claim; NULL when free.';
    COMMENT ON COLUMN watibot.conversation.lease_expires_at IS
        'The claim is the holder''s until then; a heartbeat extends it, and after it any worker may take over.';
    COMMENT ON COLUMN watibot.conversation.fence IS
        'Incremented by every claim. Writes by a claim holder check it, so a worker that lost its claim can '
        'neither send nor complete.';
    COMMENT ON COLUMN watibot.conversation.attempts IS 'Attempts of the current burst (0 when none is open).';
    COMMENT ON COLUMN watibot.conversation.last_error IS 'Error of the latest failed attempt, if any.';

    CREATE TABLE watibot.burst (
        id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel           text        NOT NULL,
        customer          text        NOT NULL,
        status            text        NOT NULL DEFAULT 'processing',
        message_ids       bigint[]    NOT NULL,
        prompt            text,
        reply             text,
        reply_parts       integer,
        parts_sent        integer     NOT NULL DEFAULT 0,
        sending_part      integer,
        attempts          integer     NOT NULL DEFAULT 1,
        fence             bigint      NOT NULL,
        claimed_by        text        NOT NULL,
        error             text,
        due_at            timestamptz,
        created_at        timestamptz NOT NULL DEFAULT now(),
        started_at        timestamptz NOT NULL DEFAULT now(),
        agent_started_at  timestamptz,
        agent_finished_at timestamptz,
        sent_at           timestamptz,
        finished_at       timestamptz,
        FOREIGN KEY (channel, customer) REFERENCES watibot.conversation,
        CHECK (status IN ('processing', 'sending', 'retry', 'sent', 'no_reply', 'dead', 'attention', 'replayed'))
    );
    -- At most one open burst per conversation; its retries reuse the row.
    CREATE UNIQUE INDEX burst_open_idx ON watibot.burst (channel, customer)
        WHERE status IN ('processing', 'sending', 'retry');
    CREATE INDEX burst_conversation_idx ON watibot.burst (channel, customer, id);
    CREATE INDEX burst_problem_idx ON watibot.burst (id) WHERE status IN ('dead', 'attention');

    COMMENT ON TABLE watibot.burst IS
        'One row per burst: the messages answered together, the prompt, the reply and how sending went.';
    COMMENT ON COLUMN watibot.burst.status IS
        'processing (agent running) | sending (reply recorded, parts going out) | retry (waiting to retry) | '
        'sent | no_reply (agent chose silence) | dead (gave up, see error) | attention (a send with unknown '
        'outcome: not re-sent, a human decides) | replayed (messages put back by watibot replay)';
    COMMENT ON COLUMN watibot.burst.message_ids IS 'watibot.message ids of this burst, in prompt order.';
    COMMENT ON COLUMN watibot.burst.prompt IS 'The combined text given to the agent.';
    COMMENT ON COLUMN watibot.burst.reply_parts IS 'Number of WATI messages the reply is split into (4096 chars each).';
    COMMENT ON COLUMN watibot.burst.parts_sent IS 'Reply parts WATI accepted; a retry resumes after them.';
    COMMENT ON COLUMN watibot.burst.sending_part IS
        'Set just before a part is handed to WATI and cleared when the outcome is known. Found set by another '
        'worker, the outcome is unknown: the burst goes to attention instead of sending twice.';
    COMMENT ON COLUMN watibot.burst.fence IS 'Conversation fence of the attempt that last worked on this burst.';
    COMMENT ON COLUMN watibot.burst.claimed_by IS 'Worker of the latest attempt.';
    COMMENT ON COLUMN watibot.burst.due_at IS 'The conversation due_at that started this burst (claim lag = started_at - due_at).';

    CREATE TABLE watibot.message (
        id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel             text        NOT NULL,
        customer            text        NOT NULL,
        provider_message_id text        NOT NULL,
        wati_id             text,
        type                text        NOT NULL,
        text                text,
        wati_timestamp      timestamptz,
        received_at         timestamptz NOT NULL DEFAULT now(),
        burst_id            bigint      REFERENCES watibot.burst,
        payload             jsonb       NOT NULL,
        FOREIGN KEY (channel, customer) REFERENCES watibot.conversation,
        CONSTRAINT message_provider_message_id_key UNIQUE (provider_message_id)
    ) WITH (autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
    -- The buffer: messages not yet consumed by a burst, per conversation. Small by construction.
    CREATE INDEX message_buffered_idx ON watibot.message (channel, customer, id) WHERE burst_id IS NULL;
    CREATE INDEX message_conversation_idx ON watibot.message (channel, customer, received_at);
    CREATE INDEX message_burst_idx ON watibot.message (burst_id) WHERE burst_id IS NOT NULL;

    COMMENT ON TABLE watibot.message IS 'Every customer message WATI delivered, stored once.';
    COMMENT ON COLUMN watibot.message.provider_message_id IS 'whatsappMessageId, or WATI''s id when that is missing.';
    COMMENT ON COLUMN watibot.message.wati_id IS 'WATI''s own record id.';
    COMMENT ON COLUMN watibot.message.wati_timestamp IS 'WATI timestamp (when the customer sent it).';
    COMMENT ON COLUMN watibot.message.received_at IS 'When watibot committed it (database clock).';
    COMMENT ON COLUMN watibot.message.burst_id IS 'The burst that consumed it; NULL while buffered.';
    COMMENT ON COLUMN watibot.message.payload IS 'The webhook body as received.';

    COMMENT ON SCHEMA watibot IS 'watibot: WhatsApp burst buffer coordinated by PostgreSQL.';

    CREATE TABLE watibot.instance_secret (
        name       text PRIMARY KEY,
        value      text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE watibot.instance_secret IS
        'Secrets watibot generated for itself, e.g. the webhook passkey when WATIBOT_WEBHOOK_PASSKEY is unset.';
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE watibot.instance_secret;
    DROP TABLE watibot.message;
    DROP TABLE watibot.burst;
    DROP TABLE watibot.conversation;
    """)
