-- 0007_burst_life: consume by high-water mark; message rows written once; the burst's transitions rewritten
-- with named parameters, each rule once. The current schema as a whole is migrations/schema.sql.

-- == The data: positions and ranges ==============================================================================

ALTER TABLE watibot.conversation
    ADD COLUMN last_position            bigint NOT NULL DEFAULT 0,
    ADD COLUMN answered_position        bigint NOT NULL DEFAULT 0,
    ADD COLUMN human_position           bigint,
    ADD COLUMN last_customer_message_at timestamptz,
    ADD COLUMN open_burst_id            bigint;
COMMENT ON COLUMN watibot.conversation.last_position IS
    'Position of the newest message stored for the conversation. Assigned by the webhook statement that inserts '
    'the messages, under this row''s lock: positions grow in commit order (gaps possible, never reordered).';
COMMENT ON COLUMN watibot.conversation.answered_position IS
    'High-water mark: every message at or below it was answered by a closed burst (sent, no_reply, human, dead, '
    'attention, expired). The buffer is the messages above it.';
COMMENT ON COLUMN watibot.conversation.human_position IS
    'last_position when an operator last wrote to the customer: messages up to it count as answered by a human.';
COMMENT ON COLUMN watibot.conversation.last_customer_message_at IS
    'When the customer last wrote (the earlier of WATI''s timestamp and our receipt): opens WhatsApp''s session window.';
COMMENT ON COLUMN watibot.conversation.open_burst_id IS
    'The burst being processed, sent or waiting to retry; NULL when none is open (at most one by construction).';

ALTER TABLE watibot.message ADD COLUMN position bigint;
COMMENT ON COLUMN watibot.message.position IS
    'Order of the message in its conversation (see conversation.last_position). Written once, with the row.';

ALTER TABLE watibot.burst
    ADD COLUMN after_position   bigint,
    ADD COLUMN through_position bigint,
    ADD COLUMN messages         integer;
ALTER TABLE watibot.burst
    ALTER COLUMN after_position SET DEFAULT 0, ALTER COLUMN through_position SET DEFAULT 0,
    ALTER COLUMN messages SET DEFAULT 0;
COMMENT ON COLUMN watibot.burst.after_position IS 'The burst is the messages after this position ...';
COMMENT ON COLUMN watibot.burst.through_position IS '... up to and including this one (fixed at the claim).';
COMMENT ON COLUMN watibot.burst.messages IS 'Number of messages in the burst.';

-- Existing data: consumed messages first (grouped by their burst), then the open burst's, then the rest of the
-- buffer, each in arrival (id) order. So answered_position is the count of consumed messages and every burst is
-- a contiguous range.
WITH open_burst AS (
    SELECT channel, customer, message_ids FROM watibot.burst WHERE status IN ('processing', 'sending', 'retry')
), ordered AS (
    SELECT m.id,
           row_number() OVER (PARTITION BY m.channel, m.customer
                              ORDER BY m.burst_id IS NULL, COALESCE(m.id = ANY(o.message_ids), false) DESC,
                                       m.burst_id, m.id) AS position
    FROM watibot.message AS m
    LEFT JOIN open_burst AS o ON o.channel = m.channel AND o.customer = m.customer
)
UPDATE watibot.message AS m SET position = ordered.position FROM ordered WHERE m.id = ordered.id;

UPDATE watibot.burst AS b SET
    after_position = COALESCE(r.first - 1, 0), through_position = COALESCE(r.last, 0),
    messages = cardinality(b.message_ids)
FROM (
    SELECT b.id, min(m.position) AS first, max(m.position) AS last
    FROM watibot.burst AS b LEFT JOIN watibot.message AS m ON m.id = ANY(b.message_ids)
    GROUP BY b.id
) AS r
WHERE r.id = b.id;

UPDATE watibot.conversation AS c SET
    last_position = COALESCE(s.last, 0),
    answered_position = COALESCE(s.consumed, 0),
    last_customer_message_at = s.last_at,
    human_position = CASE WHEN c.human_message_at IS NOT NULL THEN COALESCE(s.human, 0) END,
    open_burst_id = (SELECT b.id FROM watibot.burst AS b WHERE b.channel = c.channel AND b.customer = c.customer
                       AND b.status IN ('processing', 'sending', 'retry'))
FROM watibot.conversation AS c2
LEFT JOIN LATERAL (
    SELECT max(m.position) AS last,
           count(*) FILTER (WHERE m.burst_id IS NOT NULL) AS consumed,
           max(LEAST(m.received_at, COALESCE(m.wati_timestamp, m.received_at))) AS last_at,
           max(m.position) FILTER (WHERE m.received_at <= c2.human_message_at) AS human
    FROM watibot.message AS m WHERE m.channel = c2.channel AND m.customer = c2.customer
) AS s ON true
WHERE c.channel = c2.channel AND c.customer = c2.customer;

-- == What goes: the rewritten message column and what read it ===================================================

DROP VIEW watibot.health;
DROP VIEW watibot.recent_bursts;
DROP VIEW watibot.dead;
DROP VIEW watibot.in_flight;
DROP VIEW watibot.overdue;
DROP VIEW watibot.buffering;
DROP FUNCTION watibot.begin_burst(text, text, bigint, text, timestamptz, integer, boolean, text, float8, float8);
DROP FUNCTION watibot.finish_burst(text, text, bigint, text, bigint, text, text, integer, text, text,
                                   timestamptz, boolean, text, float8, float8);
DROP FUNCTION watibot.mark_sending(text, text, bigint, text, float8, bigint, integer, float8, text, text,
                                   integer, timestamptz);
DROP FUNCTION watibot.release_claim(text, text, text, float8, float8);
DROP FUNCTION watibot.burst_messages(bigint[]);

ALTER TABLE watibot.message ALTER COLUMN position SET NOT NULL, DROP COLUMN burst_id;
-- Indexes and their readers. message: the primary key (prune), provider_message_id (duplicate deliveries) and
-- this one: a burst's messages, the first and last of the buffer, `watibot conversation`, the session window's
-- source. message_buffered_idx, message_conversation_idx and message_burst_idx served the rewritten burst_id.
DROP INDEX watibot.message_conversation_idx;
CREATE UNIQUE INDEX message_position_idx ON watibot.message (channel, customer, position);
ALTER TABLE watibot.message SET (fillfactor = 100);
-- The open burst is conversation.open_burst_id now; burst_open_idx's uniqueness is structural.
DROP INDEX watibot.burst_open_idx;
ALTER TABLE watibot.burst
    ALTER COLUMN after_position SET NOT NULL, ALTER COLUMN through_position SET NOT NULL,
    ALTER COLUMN messages SET NOT NULL, DROP COLUMN message_ids;
-- Operators message the customer by position now (conversation.human_position).
COMMENT ON COLUMN watibot.conversation.human_message_at IS 'When an operator last wrote to the customer.';

-- == Rules, each written once ===================================================================================

CREATE FUNCTION watibot.buffer_due(p_first timestamptz, p_last timestamptz, p_mode text, p_window float8,
                                   p_max float8) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_first IS NULL THEN NULL
        WHEN p_mode = 'sliding' THEN LEAST(p_last + make_interval(secs => p_window),
                                           p_first + make_interval(secs => p_max))
        ELSE p_first + make_interval(secs => p_window)
    END
$$;
COMMENT ON FUNCTION watibot.buffer_due IS
    'The window rule: when a buffer whose first and latest messages arrived at p_first and p_last is due. '
    'fixed: first message + window; sliding: latest + window, at most first + max.';

CREATE FUNCTION watibot.in_session_window(p_last_customer_message_at timestamptz, p_window_seconds float8)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT COALESCE(p_last_customer_message_at > now() - make_interval(secs => p_window_seconds), false)
$$;
COMMENT ON FUNCTION watibot.in_session_window IS
    'The session-window rule: a free-form reply may go out only within p_window_seconds of the customer''s last '
    'message (WhatsApp''s 24-hour window).';

-- Which statuses answer their messages (closing such a burst moves answered_position past them).
CREATE FUNCTION watibot.consumes(p_status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_status IN ('sent', 'no_reply', 'human', 'dead', 'attention', 'expired')
$$;
COMMENT ON FUNCTION watibot.consumes(text) IS
    'Whether a burst closed with this status answered its messages (superseded and replayed did not).';

-- == The burst's life ===========================================================================================
-- The state diagram and the list of statuses are at the top of migrations/schema.sql (the schema as it is now).

CREATE FUNCTION watibot.held_conversation(p_channel text, p_customer text, p_fence bigint, p_owner text)
RETURNS watibot.conversation
LANGUAGE plpgsql AS $$  -- plpgsql, not sql: its plan is cached per connection
DECLARE
    c watibot.conversation%ROWTYPE;
BEGIN
    SELECT * INTO c FROM watibot.conversation
    WHERE channel = p_channel AND customer = p_customer AND fence = p_fence AND claimed_by = p_owner
    FOR UPDATE;
    RETURN c;  -- all NULL when not held
END $$;
COMMENT ON FUNCTION watibot.held_conversation IS
    'The claim holder''s conversation row, locked; NULL when the fence no longer matches.';

CREATE FUNCTION watibot.lock_conversations(p_channels text[], p_customers text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM watibot.conversation AS c
    JOIN unnest(p_channels, p_customers) AS k(channel, customer) ON c.channel = k.channel AND c.customer = k.customer
    ORDER BY c.channel COLLATE "C", c.customer COLLATE "C"
    FOR UPDATE OF c;
END $$;
COMMENT ON FUNCTION watibot.lock_conversations IS
    'Lock conversation rows in key byte order before a batch works on them one by one, so that batches, webhooks
and heartbeats (which lock in the same order) never deadlock. ORDER BY is applied before the locking clause
(PostgreSQL, SELECT "The Locking Clause"), so the locks are taken in this order whatever the plan.';

CREATE FUNCTION watibot.burst_messages(p_channel text, p_customer text, p_after bigint, p_through bigint)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT COALESCE(jsonb_agg(jsonb_build_object(
                   'id', m.id, 'provider_message_id', m.provider_message_id, 'type', m.type, 'text', m.text,
                   'wati_timestamp', m.wati_timestamp, 'received_at', m.received_at, 'data', m.payload -> 'data')
                   ORDER BY m.wati_timestamp NULLS LAST, m.position), '[]'::jsonb)
        FROM watibot.message AS m
        WHERE m.channel = p_channel AND m.customer = p_customer AND m.position > p_after
          AND m.position <= p_through);
END $$;
COMMENT ON FUNCTION watibot.burst_messages IS
    'The messages after p_after up to p_through, in prompt order (WATI''s timestamp, then arrival).';

CREATE FUNCTION watibot.release_claim(p_channel text, p_customer text, p_mode text, p_window float8, p_max float8,
                                      p_due_at timestamptz DEFAULT NULL, p_closed_burst bigint DEFAULT NULL)
RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    c watibot.conversation%ROWTYPE;
    answered bigint;
    first_at timestamptz;
    last_at timestamptz;
    next_due timestamptz;
BEGIN
    SELECT * INTO c FROM watibot.conversation WHERE channel = p_channel AND customer = p_customer;
    answered := c.answered_position;
    IF p_closed_burst IS NOT NULL THEN
        -- The open burst was just closed: a consuming status moves the high-water mark past its messages.
        SELECT GREATEST(answered, b.through_position) INTO answered FROM watibot.burst AS b
        WHERE b.id = p_closed_burst AND watibot.consumes(b.status);
        answered := COALESCE(answered, c.answered_position);
    END IF;
    IF c.last_position > answered OR (c.open_burst_id IS NOT NULL AND p_closed_burst IS NULL) THEN
        SELECT m.received_at INTO first_at FROM watibot.message AS m
        WHERE m.channel = p_channel AND m.customer = p_customer AND m.position > answered
        ORDER BY m.position LIMIT 1;
        SELECT m.received_at INTO last_at FROM watibot.message AS m
        WHERE m.channel = p_channel AND m.customer = p_customer ORDER BY m.position DESC LIMIT 1;
    END IF;
    next_due := COALESCE(p_due_at, watibot.buffer_due(p_first => first_at, p_last => last_at, p_mode => p_mode,
                                                      p_window => p_window, p_max => p_max));
    UPDATE watibot.conversation SET
        claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL, due_at = next_due,
        buffer_started_at = first_at, attempts = 0, last_error = NULL, updated_at = now(),
        answered_position = answered,
        open_burst_id = CASE WHEN p_closed_burst IS NULL THEN open_burst_id END
    WHERE channel = p_channel AND customer = p_customer;
    RETURN EXTRACT(EPOCH FROM next_due - now());
END $$;
COMMENT ON FUNCTION watibot.release_claim IS
    'Release the claim, closing the open burst p_closed_burst when given (its messages answered when its status '
    'consumes); the buffer (messages above answered_position) is due by the window rule, or p_due_at when '
    'given. Returns seconds until due, or NULL when nothing is buffered.';

CREATE FUNCTION watibot.begin_burst(
    p_channel text, p_customer text, p_fence bigint, p_owner text, p_due_at timestamptz, p_through bigint,
    p_max_attempts integer, p_skip_human boolean, p_mode text, p_window float8, p_max float8,
    OUT outcome text, OUT wait_seconds float8, OUT burst_id bigint, OUT attempts integer, OUT reply text,
    OUT reply_parts integer, OUT parts_sent integer, OUT messages jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c watibot.conversation%ROWTYPE;
    b watibot.burst%ROWTYPE;
    through bigint;
BEGIN
    c := watibot.held_conversation(p_channel => p_channel, p_customer => p_customer, p_fence => p_fence,
                                   p_owner => p_owner);
    IF c.channel IS NULL THEN
        outcome := 'lost';
        RETURN;
    END IF;

    IF c.paused_until > now() THEN
        wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max,
                                              p_due_at => c.paused_until);
        outcome := 'paused';
        RETURN;
    END IF;

    IF c.open_burst_id IS NOT NULL THEN
        SELECT * INTO b FROM watibot.burst WHERE id = c.open_burst_id;
    END IF;

    -- (A replayed burst lies behind the high-water mark: the operator's answer covers newer messages, not it.)
    IF p_skip_human AND c.human_position > c.answered_position THEN
        IF b.id IS NOT NULL AND b.after_position >= c.answered_position AND c.human_position >= b.through_position
        THEN
            UPDATE watibot.burst SET status = 'human', error = 'answered by a human operator', finished_at = now(),
                through_position = c.human_position,
                messages = (SELECT count(*) FROM watibot.message AS m
                            WHERE m.channel = p_channel AND m.customer = p_customer
                              AND m.position > b.after_position AND m.position <= c.human_position)
            WHERE id = b.id;
            UPDATE watibot.conversation SET answered_position = c.human_position, open_burst_id = NULL
            WHERE channel = p_channel AND customer = p_customer;
            b := NULL;
        ELSIF b.id IS NULL OR b.after_position < c.answered_position THEN
            INSERT INTO watibot.burst (channel, customer, after_position, through_position, messages, fence,
                                       claimed_by, status, error, finished_at)
            SELECT p_channel, p_customer, c.answered_position, c.human_position, count(*), p_fence, p_owner,
                   'human', 'answered by a human operator', now()
            FROM watibot.message AS m
            WHERE m.channel = p_channel AND m.customer = p_customer
              AND m.position > c.answered_position AND m.position <= c.human_position;
            UPDATE watibot.conversation SET answered_position = c.human_position
            WHERE channel = p_channel AND customer = p_customer;
        END IF;
        SELECT * INTO c FROM watibot.conversation WHERE channel = p_channel AND customer = p_customer;
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
            wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max,
                                                  p_closed_burst => b.id);
            RETURN;
        END IF;
        -- Nothing was said yet: the retry answers the whole buffer up to the claim, newer messages included
        -- (a replayed burst behind the high-water mark keeps its own range).
        through := CASE WHEN b.reply IS NULL AND b.through_position >= c.answered_position
                        THEN GREATEST(b.through_position, p_through) ELSE b.through_position END;
        UPDATE watibot.burst SET
            status = CASE WHEN b.reply IS NULL THEN 'processing' ELSE 'sending' END,
            through_position = through,
            messages = CASE WHEN through = b.through_position THEN b.messages ELSE (
                SELECT count(*) FROM watibot.message AS m WHERE m.channel = p_channel AND m.customer = p_customer
                  AND m.position > b.after_position AND m.position <= through) END,
            attempts = b.attempts + 1, fence = p_fence, claimed_by = p_owner, due_at = p_due_at, started_at = now()
        WHERE id = b.id;
        outcome := 'run';
        burst_id := b.id;
        attempts := b.attempts + 1;
        reply := b.reply;
        reply_parts := b.reply_parts;
        parts_sent := b.parts_sent;
        messages := watibot.burst_messages(p_channel, p_customer, b.after_position, through);
        RETURN;
    END IF;

    -- The burst: every message after the high-water mark, up to the claim's position.
    IF p_through <= c.answered_position THEN
        outcome := 'empty';
        wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max);
        RETURN;
    END IF;
    messages := watibot.burst_messages(p_channel, p_customer, c.answered_position, p_through);
    IF jsonb_array_length(messages) = 0 THEN
        -- Only gaps (positions a lost duplicate race used up): nothing to answer, and nothing can land there.
        UPDATE watibot.conversation SET answered_position = p_through
        WHERE channel = p_channel AND customer = p_customer;
        outcome := 'empty';
        messages := NULL;
        wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max);
        RETURN;
    END IF;
    INSERT INTO watibot.burst (channel, customer, after_position, through_position, messages, fence, claimed_by,
                               due_at)
    VALUES (p_channel, p_customer, c.answered_position, p_through, jsonb_array_length(messages), p_fence, p_owner,
            p_due_at)
    RETURNING id INTO burst_id;
    UPDATE watibot.conversation SET open_burst_id = burst_id WHERE channel = p_channel AND customer = p_customer;
    outcome := 'run';
    attempts := 1;
    parts_sent := 0;
END $$;
COMMENT ON FUNCTION watibot.begin_burst IS
    'begin_burst: begin (or resume) the burst of a claimed conversation, up to p_through (the conversation''s
last_position read by the claim). Outcomes:
  run        a burst to process (burst_id, attempts, reply/parts if one was recorded, messages)
  paused     an operator took over: released until the pause ends
  attention  the previous holder left a send in flight: outcome unknown, closed, not re-sent
  dead       the open burst has used its attempts
  empty      nothing buffered: released
  lost       the fence no longer matches: nothing changed
Messages an operator answered (up to human_position) are closed as a `human` burst first.';

CREATE FUNCTION watibot.mark_sending(
    p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_part integer,
    p_not_after timestamptz, p_lease float8, p_cover float8, p_session_window float8,
    p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamptz,
    p_mode text, p_window float8, p_max float8,
    OUT outcome text, OUT wait_seconds float8)
LANGUAGE plpgsql AS $$
DECLARE
    c watibot.conversation%ROWTYPE;
    closing text;
BEGIN
    c := watibot.held_conversation(p_channel => p_channel, p_customer => p_customer, p_fence => p_fence,
                                   p_owner => p_owner);
    IF c.channel IS NULL OR c.open_burst_id IS DISTINCT FROM p_burst_id THEN
        outcome := 'lost';
        RETURN;
    END IF;
    IF clock_timestamp() > p_not_after THEN
        outcome := 'late';
        RETURN;
    END IF;
    IF p_part = 0 AND c.paused_until > now() THEN
        IF (SELECT x.after_position < c.answered_position FROM watibot.burst AS x WHERE x.id = p_burst_id) THEN
            -- A replayed burst (behind the high-water mark): nothing else would answer its messages, so it stays
            -- open for after the pause; this attempt does not count.
            UPDATE watibot.burst SET status = 'retry', attempts = attempts - 1,
                error = 'an operator wrote to the customer while the agent worked: reply not sent, retried after '
                        || 'the pause'
            WHERE id = p_burst_id;
            wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max,
                                                  p_due_at => c.paused_until);
            outcome := 'paused';
            RETURN;
        END IF;
        closing := 'superseded';
    ELSIF p_part = 0 AND NOT watibot.in_session_window(c.last_customer_message_at, p_session_window) THEN
        closing := 'expired';
    END IF;
    UPDATE watibot.burst SET
        status = COALESCE(closing, 'sending'),
        sending_part = CASE WHEN closing IS NULL THEN p_part END,
        prompt = COALESCE(p_prompt, prompt), reply = COALESCE(p_reply, reply),
        reply_parts = COALESCE(p_reply_parts, reply_parts),
        agent_started_at = COALESCE(p_agent_started_at, agent_started_at),
        agent_finished_at = CASE WHEN p_reply IS NOT NULL THEN now() ELSE agent_finished_at END,
        finished_at = CASE WHEN closing IS NOT NULL THEN now() END,
        error = CASE closing
            WHEN 'superseded' THEN 'an operator wrote to the customer while the agent worked: reply not sent'
            WHEN 'expired' THEN 'not sent: the customer''s latest message is older than WhatsApp''s '
                                || trim_scale(round((p_session_window / 3600)::numeric, 2))
                                || '-hour session window (a template is needed)'
            ELSE error END
    WHERE id = p_burst_id;
    IF closing IS NOT NULL THEN  -- superseded: due when the pause ends; expired: its messages answered
        wait_seconds := watibot.release_claim(
            p_channel, p_customer, p_mode, p_window, p_max,
            p_due_at => CASE WHEN closing = 'superseded' THEN c.paused_until END, p_closed_burst => p_burst_id);
        outcome := CASE WHEN closing = 'superseded' THEN 'paused' ELSE 'expired' END;
    ELSE
        IF c.lease_expires_at < now() + make_interval(secs => p_cover) THEN
            UPDATE watibot.conversation SET
                lease_expires_at = now() + make_interval(secs => p_lease),
                due_at = now() + make_interval(secs => p_lease)
            WHERE channel = p_channel AND customer = p_customer;
        END IF;
        outcome := 'send';
    END IF;
END $$;
COMMENT ON FUNCTION watibot.mark_sending IS
    'mark_sending: before part p_part goes to WATI. Records the agent''s reply (the first time), marks the part in
flight and makes sure the lease covers the send (p_cover seconds). Outcomes:
  send       marked: send it
  late       the caller''s deadline (p_not_after) passed before this ran: nothing written (the caller has given
             up and will not send, so a mark now would make the next holder think a send was in flight)
  paused     part 1 only: an operator wrote meanwhile; the reply is discarded (superseded), released until
             the pause ends
  expired    part 1 only: the customer''s last message is outside the session window; closed, not sent
  lost       the fence no longer matches: nothing changed';

CREATE FUNCTION watibot.part_sent(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint,
                                  p_part integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF (watibot.held_conversation(p_channel => p_channel, p_customer => p_customer, p_fence => p_fence,
                                  p_owner => p_owner)).open_burst_id IS DISTINCT FROM p_burst_id THEN
        RETURN false;
    END IF;
    UPDATE watibot.burst SET sending_part = NULL, parts_sent = p_part + 1 WHERE id = p_burst_id;
    RETURN FOUND;
END $$;
COMMENT ON FUNCTION watibot.part_sent IS
    'part_sent: WATI accepted part p_part, and more parts follow (finish_burst records the last one).';

CREATE FUNCTION watibot.finish_burst(
    p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_status text,
    p_error text, p_parts_sent integer, p_prompt text, p_reply text, p_agent_started_at timestamptz,
    p_mode text, p_window float8, p_max float8,
    OUT held boolean, OUT wait_seconds float8, OUT status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    c watibot.conversation%ROWTYPE;
BEGIN
    c := watibot.held_conversation(p_channel => p_channel, p_customer => p_customer, p_fence => p_fence,
                                   p_owner => p_owner);
    IF c.channel IS NULL OR c.open_burst_id IS DISTINCT FROM p_burst_id THEN
        held := false;
        RETURN;
    END IF;
    UPDATE watibot.burst AS b SET
        status = CASE WHEN p_status = 'sent' AND b.delivery_status = 'failed' THEN 'attention' ELSE p_status END,
        error = COALESCE(p_error, CASE WHEN p_status = 'sent' AND b.delivery_status = 'failed'
            THEN 'WhatsApp delivery failed after WATI accepted the reply: ' || COALESCE(b.delivery_error, '-') END,
            b.error),
        finished_at = now(),
        parts_sent = COALESCE(p_parts_sent, b.parts_sent),
        sending_part = CASE WHEN p_parts_sent IS NULL THEN b.sending_part END,
        sent_at = CASE WHEN p_status = 'sent' THEN COALESCE(b.sent_at, now()) ELSE b.sent_at END,
        prompt = COALESCE(p_prompt, b.prompt), reply = COALESCE(p_reply, b.reply),
        agent_started_at = COALESCE(p_agent_started_at, b.agent_started_at),
        agent_finished_at = COALESCE(b.agent_finished_at, CASE WHEN p_agent_started_at IS NOT NULL THEN now() END)
    WHERE b.id = p_burst_id
    RETURNING b.status INTO status;
    held := true;
    wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max,
                                          p_closed_burst => p_burst_id);
END $$;
COMMENT ON FUNCTION watibot.finish_burst IS
    'finish_burst: close the open burst as p_status: sent (p_parts_sent accepted), no_reply, superseded (the
messages stay in the buffer and join the next burst), dead, attention or expired (with p_error). A burst
whose delivery WATI reported failed while its later parts went out closes as attention, not sent. The claim is
released and the buffer scheduled. held = false: the fence no longer matches, nothing was changed.';

CREATE FUNCTION watibot.fail_burst(
    p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_error text,
    p_permanent boolean, p_retry_in float8, p_max_attempts integer, p_mode text, p_window float8, p_max float8,
    OUT outcome text, OUT wait_seconds float8, OUT attempts integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    b watibot.burst%ROWTYPE;
BEGIN
    IF (watibot.held_conversation(p_channel => p_channel, p_customer => p_customer, p_fence => p_fence,
                                  p_owner => p_owner)).open_burst_id IS DISTINCT FROM p_burst_id THEN
        outcome := 'lost';
        RETURN;
    END IF;
    SELECT * INTO b FROM watibot.burst WHERE id = p_burst_id;
    attempts := b.attempts;
    IF p_permanent OR b.attempts >= p_max_attempts THEN
        UPDATE watibot.burst SET status = 'dead', sending_part = NULL, finished_at = now(),
            error = CASE WHEN p_permanent THEN p_error ELSE 'gave up after ' || b.attempts || ' attempts: ' || p_error END
        WHERE id = p_burst_id;
        wait_seconds := watibot.release_claim(p_channel, p_customer, p_mode, p_window, p_max,
                                              p_closed_burst => p_burst_id);
        outcome := 'dead';
        RETURN;
    END IF;
    UPDATE watibot.burst SET status = 'retry', sending_part = NULL, error = p_error WHERE id = p_burst_id;
    UPDATE watibot.conversation SET
        claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL,
        due_at = now() + make_interval(secs => p_retry_in), attempts = b.attempts, last_error = p_error,
        updated_at = now()
    WHERE channel = p_channel AND customer = p_customer;
    wait_seconds := p_retry_in;
    outcome := 'retry';
END $$;
COMMENT ON FUNCTION watibot.fail_burst IS
    'fail_burst: the agent or WATI failed (WATI certainly did not take the part: no send in flight). With attempts
left and a transient error the burst waits p_retry_in seconds (outcome retry); otherwise it is dead.';

CREATE FUNCTION watibot.hand_back(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    left_attempts integer := 0;
BEGIN
    IF (watibot.held_conversation(p_channel => p_channel, p_customer => p_customer, p_fence => p_fence,
                                  p_owner => p_owner)).channel IS NULL THEN
        RETURN false;
    END IF;
    IF p_burst_id IS NOT NULL THEN
        UPDATE watibot.burst SET status = 'retry', attempts = attempts - 1 WHERE id = p_burst_id
        RETURNING attempts INTO left_attempts;
    END IF;
    UPDATE watibot.conversation SET
        claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL, due_at = now(),
        attempts = COALESCE(left_attempts, 0), updated_at = now()
    WHERE channel = p_channel AND customer = p_customer;
    RETURN true;
END $$;
COMMENT ON FUNCTION watibot.hand_back IS
    'hand_back: a stopping worker releases its claim, due now; the open burst (if begun) keeps its reply and
progress and the attempt does not count. false: the fence no longer matches.';

CREATE FUNCTION watibot.replay_burst(p_burst_id bigint, p_force boolean,
                                     OUT outcome text, OUT channel text, OUT customer text, OUT replayed_from text,
                                     OUT messages integer, OUT due_now boolean, OUT new_burst_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    c watibot.conversation%ROWTYPE;
    b watibot.burst%ROWTYPE;
BEGIN
    SELECT * INTO b FROM watibot.burst AS x WHERE x.id = p_burst_id;
    IF NOT FOUND THEN
        outcome := 'unknown';
        RETURN;
    END IF;
    SELECT * INTO c FROM watibot.conversation AS x WHERE x.channel = b.channel AND x.customer = b.customer
    FOR UPDATE;
    SELECT * INTO b FROM watibot.burst AS x WHERE x.id = p_burst_id FOR UPDATE;
    IF NOT FOUND THEN  -- pruned meanwhile
        outcome := 'unknown';
        RETURN;
    END IF;
    channel := b.channel;
    customer := b.customer;
    replayed_from := b.status;
    messages := b.messages;
    IF b.status NOT IN ('dead', 'attention') THEN
        outcome := 'not_replayable';
    ELSIF NOT p_force AND (b.sent_at IS NOT NULL OR b.parts_sent > 0) THEN
        outcome := 'accepted';
    ELSIF NOT p_force AND b.sending_part IS NOT NULL THEN
        outcome := 'unknown_outcome';
    ELSIF c.open_burst_id IS NOT NULL THEN
        outcome := 'busy';
    ELSE
        UPDATE watibot.burst AS x SET status = 'replayed', replayed_from = b.status WHERE x.id = p_burst_id;
        INSERT INTO watibot.burst (channel, customer, after_position, through_position, messages, fence, claimed_by,
                                   status, attempts, due_at)
        VALUES (b.channel, b.customer, b.after_position, b.through_position, b.messages, c.fence, 'replay', 'retry',
                0, now())
        RETURNING id INTO new_burst_id;
        due_now := c.claimed_by IS NULL;
        UPDATE watibot.conversation AS x SET open_burst_id = new_burst_id,
            due_at = CASE WHEN c.claimed_by IS NULL THEN now() ELSE x.due_at END,
            buffer_started_at = COALESCE(x.buffer_started_at, now()), updated_at = now()
        WHERE x.channel = b.channel AND x.customer = b.customer;
        outcome := 'replayed';
    END IF;
END $$;
COMMENT ON FUNCTION watibot.replay_burst IS
    'replay_burst: `watibot replay`: a dead or attention burst becomes replayed and a new open burst over the same
messages is due now (a conversation that is claimed picks it up when its holder releases it).
Refused (outcome says why): unknown, not dead/attention, another burst open, or (without p_force) a reply WATI
may have delivered.';

-- Batches (see batching.py): one statement runs a step for many bursts, after locking their conversations in
-- order; results come back in the order given.
CREATE FUNCTION watibot.begin_bursts(
    p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_due_ats timestamptz[],
    p_throughs bigint[], p_max_attempts integer, p_skip_human boolean, p_mode text, p_window float8, p_max float8)
RETURNS TABLE (outcome text, wait_seconds float8, burst_id bigint, attempts integer, reply text,
               reply_parts integer, parts_sent integer, messages jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM watibot.lock_conversations(p_channels, p_customers);
    RETURN QUERY
    SELECT b.* FROM unnest(p_channels, p_customers, p_fences, p_owners, p_due_ats, p_throughs)
        WITH ORDINALITY AS i(channel, customer, fence, owner, due_at, through, position)
    CROSS JOIN LATERAL watibot.begin_burst(
        p_channel => i.channel, p_customer => i.customer, p_fence => i.fence, p_owner => i.owner,
        p_due_at => i.due_at, p_through => i.through, p_max_attempts => p_max_attempts,
        p_skip_human => p_skip_human, p_mode => p_mode, p_window => p_window, p_max => p_max) AS b
    ORDER BY i.position;
END $$;

CREATE FUNCTION watibot.mark_sendings(
    p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[],
    p_parts integer[], p_not_afters timestamptz[], p_prompts text[], p_replies text[], p_reply_parts integer[],
    p_agent_started_ats timestamptz[], p_lease float8, p_cover float8, p_session_window float8,
    p_mode text, p_window float8, p_max float8)
RETURNS TABLE (outcome text, wait_seconds float8)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM watibot.lock_conversations(p_channels, p_customers);
    RETURN QUERY
    SELECT s.* FROM unnest(p_channels, p_customers, p_fences, p_owners, p_burst_ids, p_parts, p_not_afters,
                           p_prompts, p_replies, p_reply_parts, p_agent_started_ats)
        WITH ORDINALITY AS i(channel, customer, fence, owner, burst_id, part, not_after, prompt, reply, reply_parts,
                             agent_started_at, position)
    CROSS JOIN LATERAL watibot.mark_sending(
        p_channel => i.channel, p_customer => i.customer, p_fence => i.fence, p_owner => i.owner,
        p_burst_id => i.burst_id, p_part => i.part, p_not_after => i.not_after, p_lease => p_lease,
        p_cover => p_cover, p_session_window => p_session_window, p_prompt => i.prompt, p_reply => i.reply,
        p_reply_parts => i.reply_parts, p_agent_started_at => i.agent_started_at,
        p_mode => p_mode, p_window => p_window, p_max => p_max) AS s
    ORDER BY i.position;
END $$;

CREATE FUNCTION watibot.finish_bursts(
    p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[],
    p_statuses text[], p_errors text[], p_parts_sent integer[], p_prompts text[], p_replies text[],
    p_agent_started_ats timestamptz[], p_mode text, p_window float8, p_max float8)
RETURNS TABLE (held boolean, wait_seconds float8, status text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM watibot.lock_conversations(p_channels, p_customers);
    RETURN QUERY
    SELECT f.* FROM unnest(p_channels, p_customers, p_fences, p_owners, p_burst_ids, p_statuses, p_errors,
                           p_parts_sent, p_prompts, p_replies, p_agent_started_ats)
        WITH ORDINALITY AS i(channel, customer, fence, owner, burst_id, status, error, parts_sent, prompt, reply,
                             agent_started_at, position)
    CROSS JOIN LATERAL watibot.finish_burst(
        p_channel => i.channel, p_customer => i.customer, p_fence => i.fence, p_owner => i.owner,
        p_burst_id => i.burst_id, p_status => i.status, p_error => i.error, p_parts_sent => i.parts_sent,
        p_prompt => i.prompt, p_reply => i.reply, p_agent_started_at => i.agent_started_at,
        p_mode => p_mode, p_window => p_window, p_max => p_max) AS f
    ORDER BY i.position;
END $$;

-- == Metrics ====================================================================================================

CREATE FUNCTION watibot.burst_fact_totals(p_burst_ids bigint[] DEFAULT NULL)
RETURNS TABLE (series text, label text, count bigint, sum float8)
LANGUAGE sql STABLE AS $$
    SELECT * FROM (
        SELECT CASE WHEN GROUPING(f.outcome) = 0 THEN 'outcome'
                    WHEN GROUPING(f.replayed) = 0 THEN 'replayed'
                    WHEN GROUPING(f.claim_lag_le) = 0 THEN 'claim_lag'
                    ELSE 'agent_seconds' END AS series,
               COALESCE(f.outcome, f.replayed::text, f.claim_lag_le, f.agent_le) AS label,
               count(*) AS count,
               COALESCE(CASE WHEN GROUPING(f.claim_lag_le) = 0 THEN sum(f.claim_lag_seconds)
                             WHEN GROUPING(f.agent_le) = 0 THEN sum(f.agent_seconds) END, 0)::float8 AS sum
        FROM watibot.finished_burst_facts AS f
        WHERE p_burst_ids IS NULL OR f.burst_id = ANY(p_burst_ids)
        GROUP BY GROUPING SETS ((f.outcome), (f.replayed), (f.claim_lag_le), (f.agent_le))
    ) AS totals
    WHERE totals.label IS NOT NULL AND totals.label <> 'false'
$$;
COMMENT ON FUNCTION watibot.burst_fact_totals IS
    'Counts and sums of finished bursts (all, or those of p_burst_ids) by series: outcome, replayed, and the '
    'histogram buckets of claim_lag and agent_seconds. Read by /metrics; `watibot prune` folds the totals of the '
    'bursts it deletes into pruned_burst_totals with it.';

-- == Views (psql) ===============================================================================================

-- Which burst answered each message: the newest consuming burst whose range holds it (NULL: still buffered).
CREATE VIEW watibot.message_outcome AS
SELECT m.id AS message_id, m.channel, m.customer, m.position, m.received_at, m.type, m.text,
       b.id AS burst_id, b.status
FROM watibot.message AS m
LEFT JOIN LATERAL (
    SELECT x.id, x.status FROM watibot.burst AS x
    WHERE x.channel = m.channel AND x.customer = m.customer
      AND m.position > x.after_position AND m.position <= x.through_position
      AND watibot.consumes(x.status)
    ORDER BY x.id DESC
    LIMIT 1
) AS b ON true;
COMMENT ON VIEW watibot.message_outcome IS
    'Every stored message with the burst that answered it (sent, no_reply, human, dead, attention, expired); '
    'burst_id NULL: still buffered (above the conversation''s answered_position, or in an open burst).';

CREATE VIEW watibot.buffering AS
SELECT c.channel, c.customer, c.wa_id,
       (SELECT count(*) FROM watibot.message AS m WHERE m.channel = c.channel AND m.customer = c.customer
          AND m.position > c.answered_position) AS messages,
       CASE WHEN c.attempts > 0 THEN 'retry' ELSE 'window' END AS waiting_for,
       c.buffer_started_at AS first_message_at,
       c.due_at,
       round(EXTRACT(EPOCH FROM c.due_at - now())::numeric, 1) AS seconds_until_due,
       c.attempts, c.last_error
FROM watibot.conversation AS c
WHERE c.claimed_by IS NULL AND c.due_at > now()
ORDER BY c.due_at;
COMMENT ON VIEW watibot.buffering IS
    'Conversations waiting for their buffer window to end (or for a retry), with seconds until due.';

CREATE VIEW watibot.overdue AS
SELECT c.channel, c.customer, c.wa_id,
       (SELECT count(*) FROM watibot.message AS m WHERE m.channel = c.channel AND m.customer = c.customer
          AND m.position > c.answered_position) AS messages,
       c.due_at,
       round(EXTRACT(EPOCH FROM now() - c.due_at)::numeric, 1) AS lag_seconds,
       c.attempts, c.last_error
FROM watibot.conversation AS c
WHERE c.claimed_by IS NULL AND c.due_at <= now()
ORDER BY c.due_at;
COMMENT ON VIEW watibot.overdue IS
    'Conversations that are due but not claimed, most overdue first. A lag of more than a few poll intervals '
    'means no sweeper is claiming (workers down, or all busy at WATIBOT_CONCURRENCY).';

CREATE VIEW watibot.in_flight AS
SELECT c.channel, c.customer,
       c.claimed_by AS owner,
       c.claimed_at,
       round(EXTRACT(EPOCH FROM now() - c.claimed_at)::numeric, 1) AS held_seconds,
       round(EXTRACT(EPOCH FROM c.lease_expires_at - now())::numeric, 1) AS lease_left_seconds,
       c.lease_expires_at <= now() AS lease_expired,
       c.fence,
       b.id AS burst_id, b.status AS burst_status,
       COALESCE(b.attempts, c.attempts) AS attempts,
       b.parts_sent, b.reply_parts, b.sending_part
FROM watibot.conversation AS c
LEFT JOIN watibot.burst AS b ON b.id = c.open_burst_id
WHERE c.claimed_by IS NOT NULL
ORDER BY c.claimed_at;
COMMENT ON VIEW watibot.in_flight IS
    'Claimed conversations: which worker holds them, lease left (negative: expired, another worker will '
    'take over), the open burst and its attempts.';

CREATE VIEW watibot.dead AS
SELECT b.id AS burst_id, b.channel, b.customer, b.status,
       b.error AS reason,
       b.attempts,
       b.messages,
       left(b.prompt, 200) AS prompt,
       b.parts_sent, b.reply_parts,
       b.created_at, b.finished_at
FROM watibot.burst AS b
WHERE b.status IN ('dead', 'attention')
ORDER BY b.id;
COMMENT ON VIEW watibot.dead IS
    'Bursts that need a human: dead (gave up; reason says why) or attention (a send with unknown outcome). '
    '`watibot replay BURST_ID` answers their messages again.';

CREATE VIEW watibot.recent_bursts AS
SELECT b.id AS burst_id, b.channel, b.customer, b.status, b.attempts,
       b.messages,
       left(b.prompt, 80) AS prompt,
       left(b.reply, 80) AS reply,
       b.error,
       round(EXTRACT(EPOCH FROM b.started_at - b.due_at)::numeric, 3) AS claim_lag_seconds,
       round(EXTRACT(EPOCH FROM b.agent_finished_at - b.agent_started_at)::numeric, 3) AS agent_seconds,
       round(EXTRACT(EPOCH FROM b.sent_at - b.agent_finished_at)::numeric, 3) AS send_seconds,
       round(EXTRACT(EPOCH FROM b.finished_at - b.created_at)::numeric, 3) AS total_seconds,
       b.claimed_by AS worker,
       b.created_at, b.finished_at
FROM watibot.burst AS b
WHERE b.created_at > now() - interval '24 hours'
ORDER BY b.id DESC;
COMMENT ON VIEW watibot.recent_bursts IS
    'Bursts of the last 24 hours, newest first: prompt and reply (first 80 characters), outcome and timings '
    '(claim lag = start - due, agent, send, total).';

CREATE VIEW watibot.health AS
SELECT (SELECT version_num FROM watibot.alembic_version) AS schema_revision,
       count(*) FILTER (WHERE c.claimed_by IS NULL AND c.due_at > now()) AS buffering,
       count(*) FILTER (WHERE c.claimed_by IS NULL AND c.due_at <= now()) AS overdue,
       COALESCE(round(EXTRACT(EPOCH FROM now() - min(c.due_at)
           FILTER (WHERE c.claimed_by IS NULL AND c.due_at <= now()))::numeric, 1), 0) AS max_lag_seconds,
       count(*) FILTER (WHERE c.claimed_by IS NOT NULL AND c.lease_expires_at > now()) AS in_flight,
       count(*) FILTER (WHERE c.claimed_by IS NOT NULL AND c.lease_expires_at <= now()) AS leases_expired,
       count(DISTINCT c.claimed_by) AS busy_workers,
       COALESCE(sum(c.last_position - c.answered_position), 0)::bigint AS buffered_messages,
       (SELECT count(*) FROM watibot.conversation WHERE paused_until > now()) AS paused,
       (SELECT count(*) FROM watibot.burst WHERE status = 'dead') AS dead,
       (SELECT count(*) FROM watibot.burst WHERE status = 'attention') AS attention,
       (SELECT count(*) FROM watibot.burst WHERE finished_at > now() - interval '1 hour') AS bursts_last_hour,
       (SELECT max(finished_at) FROM watibot.burst WHERE finished_at IS NOT NULL) AS last_burst_finished_at
FROM watibot.conversation AS c
WHERE c.due_at IS NOT NULL;
COMMENT ON VIEW watibot.health IS
    'One row: buffering and overdue conversations (with the worst lag), claims in flight and with expired '
    'leases, buffered messages, conversations paused for a human operator, dead and attention bursts, '
    'throughput of the last hour.';

INSERT INTO watibot.schema_compatibility (revision, position, oldest_code_revision)
VALUES ('0007_burst_life', 7, '0007_burst_life');
