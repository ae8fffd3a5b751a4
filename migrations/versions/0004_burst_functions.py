"""Burst steps as functions: begin and finish a burst in one round trip each.

A claim holder used to open a transaction, lock the conversation row, run three to five statements and commit
(with a pool reset after): ~26 round trips per burst. These functions do the same steps server-side. Inside a
PL/pgSQL function every statement takes a fresh snapshot, so the order that makes completion safe is kept:
lock the conversation row first (a webhook's upsert holding it is waited for), then read the buffer, which
now sees that webhook's message.

Revision ID: 0004_burst_functions
Revises: 0003_operability
Create Date: 2026-11-30
"""

from alembic import op

revision = "0004_burst_functions"
down_revision = "0003_operability"
branch_labels = None
depends_on = None


# The functions, as this revision made them (migration 0007 restores them on its downgrade).
FUNCTIONS = """
    -- The messages of a burst as the pipeline reads them, in the order given.
    CREATE FUNCTION watibot.burst_messages(p_ids bigint[]) RETURNS jsonb
    LANGUAGE sql STABLE AS $$
        SELECT COALESCE(jsonb_agg(jsonb_build_object(
                   'id', m.id, 'provider_message_id', m.provider_message_id, 'type', m.type, 'text', m.text,
                   'wati_timestamp', m.wati_timestamp, 'received_at', m.received_at, 'data', m.payload -> 'data')
                   ORDER BY wanted.position), '[]'::jsonb)
        FROM unnest(p_ids) WITH ORDINALITY AS wanted(id, position)
        JOIN watibot.message AS m ON m.id = wanted.id
    $$;
    COMMENT ON FUNCTION watibot.burst_messages(bigint[]) IS 'The messages of a burst as JSON, in prompt order.';

    -- Release the claim and schedule what is still buffered by the window rule (fixed: first + window;
    -- sliding: latest + window, capped at first + max). Returns seconds until due, or NULL.
    CREATE FUNCTION watibot.release_claim(p_channel text, p_customer text, p_mode text, p_window float8,
                                          p_max float8) RETURNS float8
    LANGUAGE plpgsql AS $$
    DECLARE
        first_at timestamptz;
        last_at timestamptz;
        next_due timestamptz;
    BEGIN
        SELECT min(received_at), max(received_at) INTO first_at, last_at
        FROM watibot.message WHERE channel = p_channel AND customer = p_customer AND burst_id IS NULL;
        next_due := CASE
            WHEN first_at IS NULL THEN NULL
            WHEN p_mode = 'sliding' THEN LEAST(last_at + make_interval(secs => p_window),
                                               first_at + make_interval(secs => p_max))
            ELSE first_at + make_interval(secs => p_window)
        END;
        UPDATE watibot.conversation SET
            claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL, due_at = next_due,
            buffer_started_at = first_at, attempts = 0, last_error = NULL, updated_at = now()
        WHERE channel = p_channel AND customer = p_customer;
        RETURN EXTRACT(EPOCH FROM next_due - now());
    END $$;
    COMMENT ON FUNCTION watibot.release_claim(text, text, text, float8, float8) IS
        'Release a conversation''s claim and schedule its remaining buffer by the window rule.';

    -- Close a burst under a claim: status, reason, parts sent, its messages consumed (unless p_consume is false,
    -- for a superseded reply whose messages join the next burst), the claim released and the buffer scheduled.
    -- held = false: the fence no longer matches, nothing was changed.
    CREATE FUNCTION watibot.finish_burst(
        p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_status text,
        p_error text, p_parts_sent integer, p_prompt text, p_reply text, p_agent_started_at timestamptz,
        p_consume boolean, p_mode text, p_window float8, p_max float8,
        OUT held boolean, OUT wait_seconds float8)
    LANGUAGE plpgsql AS $$
    DECLARE
        ids bigint[];
    BEGIN
        PERFORM 1 FROM watibot.conversation
        WHERE channel = p_channel AND customer = p_customer AND fence = p_fence AND claimed_by = p_owner
        FOR UPDATE;
        IF NOT FOUND THEN
            held := false;
            RETURN;
        END IF;
        UPDATE watibot.burst SET
            status = p_status, error = COALESCE(p_error, error), finished_at = now(),
            parts_sent = COALESCE(p_parts_sent, parts_sent),
            sending_part = CASE WHEN p_parts_sent IS NULL THEN sending_part END,
            sent_at = CASE WHEN p_status = 'sent' THEN COALESCE(sent_at, now()) ELSE sent_at END,
            prompt = COALESCE(prompt, p_prompt), reply = COALESCE(reply, p_reply),
            agent_started_at = COALESCE(agent_started_at, p_agent_started_at),
            agent_finished_at = COALESCE(agent_finished_at, CASE WHEN p_agent_started_at IS NOT NULL THEN now() END)
        WHERE id = p_burst_id
        RETURNING message_ids INTO ids;
        IF p_consume THEN
            UPDATE watibot.message SET burst_id = p_burst_id WHERE id = ANY(ids) AND burst_id IS NULL;
        END IF;
        held := true;
        wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max);
    END $$;
    COMMENT ON FUNCTION watibot.finish_burst(text, text, bigint, text, bigint, text, text, integer, text, text,
                                             timestamptz, boolean, text, float8, float8) IS
        'Close a burst under a fenced claim: status, consume its messages, release and schedule the buffer.';

    -- Begin (or resume) the burst of a claimed conversation. Outcomes:
    --   run        a burst to process (burst_id, attempts, reply/parts if one was recorded, messages)
    --   paused     a human operator took over: released until the pause ends
    --   attention  the previous holder left a send in flight: outcome unknown, closed, not re-sent
    --   dead       the open burst has used its attempts
    --   empty      nothing buffered: released
    --   lost       the fence no longer matches: nothing changed
    CREATE FUNCTION watibot.begin_burst(
        p_channel text, p_customer text, p_fence bigint, p_owner text, p_due_at timestamptz,
        p_max_attempts integer, p_skip_human boolean, p_mode text, p_window float8, p_max float8,
        OUT outcome text, OUT wait_seconds float8, OUT burst_id bigint, OUT attempts integer, OUT reply text,
        OUT reply_parts integer, OUT parts_sent integer, OUT messages jsonb)
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        c watibot.conversation%ROWTYPE;
        b watibot.burst%ROWTYPE;
        answered bigint[];
        ids bigint[];
        human_burst bigint;
    BEGIN
        SELECT * INTO c FROM watibot.conversation
        WHERE channel = p_channel AND customer = p_customer AND fence = p_fence AND claimed_by = p_owner
        FOR UPDATE;
        IF NOT FOUND THEN
            outcome := 'lost';
            RETURN;
        END IF;

        IF c.paused_until > now() THEN
            UPDATE watibot.conversation SET claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL,
                due_at = c.paused_until, updated_at = now()
            WHERE channel = p_channel AND customer = p_customer;
            outcome := 'paused';
            wait_seconds := EXTRACT(EPOCH FROM c.paused_until - now());
            RETURN;
        END IF;

        SELECT * INTO b FROM watibot.burst AS open_burst
        WHERE open_burst.channel = p_channel AND open_burst.customer = p_customer
          AND open_burst.status IN ('processing', 'sending', 'retry');

        -- Messages an operator already answered (received before the operator's latest message).
        IF p_skip_human AND c.human_message_at IS NOT NULL THEN
            SELECT array_agg(m.id ORDER BY m.id) INTO answered FROM watibot.message AS m
            WHERE m.channel = p_channel AND m.customer = p_customer AND m.burst_id IS NULL
              AND m.received_at <= c.human_message_at;
            IF answered IS NOT NULL AND b.id IS NOT NULL THEN
                IF b.message_ids <@ answered THEN
                    UPDATE watibot.burst SET status = 'human', error = 'answered by a human operator',
                        finished_at = now() WHERE id = b.id;
                    UPDATE watibot.message SET burst_id = b.id WHERE id = ANY(b.message_ids) AND burst_id IS NULL;
                    answered := ARRAY(SELECT unnest(answered) EXCEPT SELECT unnest(b.message_ids) ORDER BY 1);
                    b := NULL;
                ELSE
                    answered := ARRAY(SELECT unnest(answered) EXCEPT SELECT unnest(b.message_ids) ORDER BY 1);
                END IF;
            END IF;
            IF cardinality(answered) > 0 THEN
                INSERT INTO watibot.burst (channel, customer, message_ids, fence, claimed_by, status, error,
                                           finished_at)
                VALUES (p_channel, p_customer, answered, p_fence, p_owner, 'human', 'answered by a human operator',
                        now())
                RETURNING id INTO human_burst;
                UPDATE watibot.message SET burst_id = human_burst WHERE id = ANY(answered) AND burst_id IS NULL;
            END IF;
        END IF;

        IF b.id IS NOT NULL THEN
            IF b.sending_part IS NOT NULL OR b.attempts >= p_max_attempts THEN
                outcome := CASE WHEN b.sending_part IS NOT NULL THEN 'attention' ELSE 'dead' END;
                UPDATE watibot.burst SET status = outcome, finished_at = now(),
                    error = CASE WHEN b.sending_part IS NOT NULL
                        THEN 'send of reply part ' || (b.sending_part + 1) || ' was in flight when its worker '
                             || 'lost the claim: outcome unknown, not re-sent'
                        ELSE 'gave up after ' || b.attempts || ' attempts; last error: ' || COALESCE(b.error, '-') END
                WHERE id = b.id;
                UPDATE watibot.message SET burst_id = b.id WHERE id = ANY(b.message_ids) AND burst_id IS NULL;
                wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max);
                RETURN;
            END IF;
            IF b.reply IS NULL THEN
                -- Nothing was said yet: the retry answers the whole buffer, newer messages included.
                SELECT array_agg(m.id ORDER BY m.wati_timestamp NULLS LAST, m.id) INTO ids FROM watibot.message AS m
                WHERE m.channel = p_channel AND m.customer = p_customer AND m.burst_id IS NULL
                  AND m.received_at <= c.claimed_at;
                ids := COALESCE(ids, b.message_ids);
            ELSE
                ids := b.message_ids;
            END IF;
            UPDATE watibot.burst SET
                status = CASE WHEN b.reply IS NULL THEN 'processing' ELSE 'sending' END, message_ids = ids,
                attempts = b.attempts + 1, fence = p_fence, claimed_by = p_owner, due_at = p_due_at,
                started_at = now()
            WHERE id = b.id;
            outcome := 'run';
            burst_id := b.id;
            attempts := b.attempts + 1;
            reply := b.reply;
            reply_parts := b.reply_parts;
            parts_sent := b.parts_sent;
            messages := watibot.burst_messages(ids);
            RETURN;
        END IF;

        -- The burst: every unconsumed message received up to the claim, by WATI timestamp, then arrival.
        SELECT array_agg(m.id ORDER BY m.wati_timestamp NULLS LAST, m.id) INTO ids FROM watibot.message AS m
        WHERE m.channel = p_channel AND m.customer = p_customer AND m.burst_id IS NULL
          AND m.received_at <= c.claimed_at;
        IF ids IS NULL THEN
            outcome := 'empty';
            wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max);
            RETURN;
        END IF;
        INSERT INTO watibot.burst (channel, customer, message_ids, fence, claimed_by, due_at)
        VALUES (p_channel, p_customer, ids, p_fence, p_owner, p_due_at)
        RETURNING id INTO burst_id;
        outcome := 'run';
        attempts := 1;
        parts_sent := 0;
        messages := watibot.burst_messages(ids);
    END $$;
    COMMENT ON FUNCTION watibot.begin_burst(text, text, bigint, text, timestamptz, integer, boolean, text,
                                            float8, float8) IS
        'Begin or resume the burst of a claimed conversation (fenced); see the outcomes in the function body.';
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("""
    DROP FUNCTION watibot.begin_burst(text, text, bigint, text, timestamptz, integer, boolean, text, float8,
                                      float8);
    DROP FUNCTION watibot.finish_burst(text, text, bigint, text, bigint, text, text, integer, text, text,
                                       timestamptz, boolean, text, float8, float8);
    DROP FUNCTION watibot.release_claim(text, text, text, float8, float8);
    DROP FUNCTION watibot.burst_messages(bigint[]);
    """)
