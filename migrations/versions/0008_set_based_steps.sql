-- 0008_set_based_steps: the claim starts the fresh burst in the same statement (see 0008_set_based_steps.py).

CREATE FUNCTION watibot.claim_due(p_limit integer, p_owner text, p_lease float8, p_skip_human boolean)
RETURNS TABLE (channel text, customer text, wa_id text, fence bigint, previous_owner text,
               was_due_at timestamptz, claimed_at timestamptz, through bigint, burst_id bigint, messages jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    channels text[];
    customers text[];
    owners text[];
    due_ats timestamptz[];
BEGIN
    -- 1. Lock a batch of due conversations.
    -- - `due_at <= now()` ORDER BY due_at is served by the partial index conversation_due_idx (idle rows are not
    --   in it); a claimed row's due_at is its lease expiry, so an expired lease is simply due again;
    -- - SKIP LOCKED lets N claimers run at once without waiting on each other or on a webhook holding a row, so
    --   this never waits on a lock and cannot deadlock with the ordered batches.
    SELECT array_agg(d.channel), array_agg(d.customer), array_agg(d.claimed_by), array_agg(d.due_at)
    INTO channels, customers, owners, due_ats
    FROM (SELECT c.channel, c.customer, c.claimed_by, c.due_at
          FROM watibot.conversation AS c
          WHERE c.due_at <= now()
          ORDER BY c.due_at
          LIMIT p_limit
          FOR UPDATE SKIP LOCKED) AS d;

    -- 2. Claim them and begin the fresh bursts. A new statement, so a new snapshot: every message up to a locked
    --    row's last_position is visible now (the webhook that wrote it committed before the row could be locked;
    --    read in step 1's snapshot, a message committed just before the lock would be missing from the burst).
    -- - the fence is incremented so the previous holder's writes fail from now on;
    -- - last_position is the end of the burst: what arrives after the claim waits for the next one.
    RETURN QUERY
    WITH due AS (
        SELECT c.channel, c.customer, k.previous_owner, k.was_due_at, c.fence + 1 AS fence,
               c.answered_position AS after_position, c.last_position AS through_position,
               -- the buffer is plainly the next burst: begin_burst's last branch, started here
               (c.open_burst_id IS NULL AND c.last_position > c.answered_position
                AND (c.paused_until IS NULL OR c.paused_until <= now())
                AND NOT COALESCE(p_skip_human AND c.human_position > c.answered_position, false)) AS fresh
        FROM unnest(channels, customers, owners, due_ats) AS k(channel, customer, previous_owner, was_due_at)
        JOIN watibot.conversation AS c ON c.channel = k.channel AND c.customer = k.customer
    ), counted AS (
        SELECT due.channel, due.customer, due.after_position, due.through_position, due.was_due_at, due.fence,
               (SELECT count(*) FROM watibot.message AS m
                WHERE m.channel = due.channel AND m.customer = due.customer
                  AND m.position > due.after_position AND m.position <= due.through_position) AS messages
        FROM due
        WHERE due.fresh
    ), started AS (
        INSERT INTO watibot.burst (channel, customer, after_position, through_position, messages, fence, claimed_by,
                                   due_at)
        SELECT k.channel, k.customer, k.after_position, k.through_position, k.messages, k.fence, p_owner,
               k.was_due_at
        FROM counted AS k
        WHERE k.messages > 0  -- gaps only: begin_burst moves the mark past them
        RETURNING id, channel, customer
    ), claimed AS (
        UPDATE watibot.conversation AS c SET
            claimed_by = p_owner,
            claimed_at = now(),
            fence = due.fence,
            lease_expires_at = now() + make_interval(secs => p_lease),
            due_at = now() + make_interval(secs => p_lease),
            updated_at = now(),
            open_burst_id = COALESCE(s.id, c.open_burst_id)
        FROM due
        LEFT JOIN started AS s ON s.channel = due.channel AND s.customer = due.customer
        WHERE c.channel = due.channel AND c.customer = due.customer
        RETURNING c.channel, c.customer, c.wa_id, c.fence, due.previous_owner, due.was_due_at, c.claimed_at,
                  c.last_position, s.id AS burst_id, due.after_position
    )
    SELECT k.channel, k.customer, k.wa_id, k.fence, k.previous_owner, k.was_due_at, k.claimed_at,
           k.last_position, k.burst_id,
           CASE WHEN k.burst_id IS NOT NULL
                THEN watibot.burst_messages(k.channel, k.customer, k.after_position, k.last_position) END
    FROM claimed AS k;
END $$;
COMMENT ON FUNCTION watibot.claim_due IS
    'claim_due: claim up to p_limit due conversations (free, or with an expired lease) for p_owner, with a new '
    'fence and a lease of p_lease seconds. A conversation whose buffer is plainly the next burst (no open burst, '
    'no pause, no operator answer to fold in, a message above the high-water mark) gets that burst begun in the '
    'same statement: burst_id and its messages are returned, and the holder goes straight to the agent. The '
    'others (burst_id NULL) are begun by begin_burst(s).';


-- == Release: one set-based statement for a batch (release_claim is its one-row form) ==========================

CREATE FUNCTION watibot.release_claims(p_channels text[], p_customers text[], p_closed_bursts bigint[],
                                       p_due_ats timestamptz[], p_mode text, p_window float8, p_max float8)
RETURNS TABLE (channel text, customer text, wait_seconds float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH k AS (
        SELECT c.channel, c.customer, c.last_position, c.open_burst_id, k.closed_burst, k.due_at,
               -- a consuming status moves the high-water mark past the closed burst's messages
               CASE WHEN k.closed_burst IS NOT NULL AND watibot.consumes(b.status)
                    THEN GREATEST(c.answered_position, b.through_position)
                    ELSE c.answered_position END AS answered
        FROM unnest(p_channels, p_customers, p_closed_bursts, p_due_ats) AS k(channel, customer, closed_burst, due_at)
        JOIN watibot.conversation AS c ON c.channel = k.channel AND c.customer = k.customer
        LEFT JOIN watibot.burst AS b ON b.id = k.closed_burst
    ), buffer AS (
        -- the buffer left: messages above the mark (and an open burst that stays open)
        SELECT k.*,
               (SELECT m.received_at FROM watibot.message AS m
                WHERE m.channel = k.channel AND m.customer = k.customer AND m.position > k.answered
                  AND (k.last_position > k.answered OR (k.open_burst_id IS NOT NULL AND k.closed_burst IS NULL))
                ORDER BY m.position LIMIT 1) AS first_at,
               (SELECT m.received_at FROM watibot.message AS m
                WHERE m.channel = k.channel AND m.customer = k.customer
                  AND (k.last_position > k.answered OR (k.open_burst_id IS NOT NULL AND k.closed_burst IS NULL))
                ORDER BY m.position DESC LIMIT 1) AS last_at
        FROM k
    )
    UPDATE watibot.conversation AS c SET
        claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL,
        due_at = COALESCE(x.due_at, watibot.buffer_due(p_first => x.first_at, p_last => x.last_at, p_mode => p_mode,
                                                       p_window => p_window, p_max => p_max)),
        buffer_started_at = x.first_at, attempts = 0, last_error = NULL, updated_at = now(),
        answered_position = x.answered,
        open_burst_id = CASE WHEN x.closed_burst IS NULL THEN c.open_burst_id END
    FROM buffer AS x
    WHERE c.channel = x.channel AND c.customer = x.customer
    RETURNING c.channel, c.customer, EXTRACT(EPOCH FROM c.due_at - now())::float8;
END $$;
COMMENT ON FUNCTION watibot.release_claims IS
    'Release the claims on the given conversations (their rows must be locked by the caller), closing each one''s '
    'open burst p_closed_bursts[i] when given (its messages answered when its status consumes); each buffer '
    '(messages above answered_position) is due by the window rule, or p_due_ats[i] when given. Returns the seconds '
    'until each is due, or NULL when nothing is buffered.';

CREATE OR REPLACE FUNCTION watibot.release_claim(p_channel text, p_customer text, p_mode text, p_window float8,
                                                 p_max float8, p_due_at timestamptz DEFAULT NULL,
                                                 p_closed_burst bigint DEFAULT NULL)
RETURNS float8
LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT r.wait_seconds
            FROM watibot.release_claims(ARRAY[p_channel], ARRAY[p_customer], ARRAY[p_closed_burst], ARRAY[p_due_at],
                                        p_mode, p_window, p_max) AS r);
END $$;
COMMENT ON FUNCTION watibot.release_claim IS
    'release_claims for one conversation: release the claim, closing the open burst p_closed_burst when given; '
    'returns seconds until due, or NULL when nothing is buffered.';

-- == Finish: one set-based statement per step for a batch ======================================================

DROP FUNCTION watibot.finish_bursts(text[], text[], bigint[], text[], bigint[], text[], text[], integer[], text[],
                                    text[], timestamptz[], text, float8, float8);
DROP FUNCTION watibot.finish_burst(text, text, bigint, text, bigint, text, text, integer, text, text, timestamptz,
                                   text, float8, float8);

CREATE FUNCTION watibot.finish_bursts(
    p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[],
    p_statuses text[], p_errors text[], p_parts_sent integer[], p_prompts text[], p_replies text[],
    p_agent_started_ats timestamptz[], p_mode text, p_window float8, p_max float8)
RETURNS TABLE (held boolean, wait_seconds float8, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    done_positions integer[];
    done_statuses text[];
    released_channels text[];
    released_customers text[];
    released_waits float8[];
BEGIN
    PERFORM watibot.lock_conversations(p_channels, p_customers);
    -- Close each burst that is still its conversation's open one under the caller's fence.
    WITH i AS (
        SELECT * FROM unnest(p_channels, p_customers, p_fences, p_owners, p_burst_ids, p_statuses, p_errors,
                             p_parts_sent, p_prompts, p_replies, p_agent_started_ats)
            WITH ORDINALITY AS i(channel, customer, fence, owner, burst_id, status, error, parts_sent, prompt, reply,
                                 agent_started_at, position)
    ), closed AS (
        UPDATE watibot.burst AS b SET
            -- WATI reported a failed delivery while later parts went out: attention, not sent
            status = CASE WHEN i.status = 'sent' AND b.delivery_status = 'failed' THEN 'attention' ELSE i.status END,
            error = COALESCE(i.error, CASE WHEN i.status = 'sent' AND b.delivery_status = 'failed'
                THEN 'WhatsApp delivery failed after WATI accepted the reply: ' || COALESCE(b.delivery_error, '-') END,
                b.error),
            finished_at = now(),
            parts_sent = COALESCE(i.parts_sent, b.parts_sent),
            sending_part = CASE WHEN i.parts_sent IS NULL THEN b.sending_part END,
            sent_at = CASE WHEN i.status = 'sent' THEN COALESCE(b.sent_at, now()) ELSE b.sent_at END,
            prompt = COALESCE(i.prompt, b.prompt), reply = COALESCE(i.reply, b.reply),
            agent_started_at = COALESCE(i.agent_started_at, b.agent_started_at),
            agent_finished_at = COALESCE(b.agent_finished_at, CASE WHEN i.agent_started_at IS NOT NULL THEN now() END)
        FROM i
        JOIN watibot.conversation AS c
            ON c.channel = i.channel AND c.customer = i.customer AND c.fence = i.fence AND c.claimed_by = i.owner
           AND c.open_burst_id = i.burst_id
        WHERE b.id = i.burst_id
        RETURNING i.position, b.status
    )
    SELECT array_agg(closed.position::integer), array_agg(closed.status) INTO done_positions, done_statuses FROM closed;

    -- Release what was closed: a statement of its own (a new snapshot sees the closed statuses), its results kept.
    SELECT array_agg(r.channel), array_agg(r.customer), array_agg(r.wait_seconds)
    INTO released_channels, released_customers, released_waits
    FROM watibot.release_claims(
        ARRAY(SELECT p_channels[d] FROM unnest(done_positions) AS d),
        ARRAY(SELECT p_customers[d] FROM unnest(done_positions) AS d),
        ARRAY(SELECT p_burst_ids[d] FROM unnest(done_positions) AS d),
        ARRAY(SELECT NULL::timestamptz FROM unnest(done_positions) AS d), p_mode, p_window, p_max) AS r;

    RETURN QUERY
    WITH done AS (
        SELECT d.position, d.status FROM unnest(done_positions, done_statuses) AS d(position, status)
    ), released AS (
        SELECT r.channel, r.customer, r.wait_seconds
        FROM unnest(released_channels, released_customers, released_waits) AS r(channel, customer, wait_seconds)
    )
    SELECT done.position IS NOT NULL, released.wait_seconds, done.status
    FROM unnest(p_channels, p_customers) WITH ORDINALITY AS i(channel, customer, position)
    LEFT JOIN done ON done.position = i.position
    LEFT JOIN released ON done.position IS NOT NULL AND released.channel = i.channel
                      AND released.customer = i.customer
    ORDER BY i.position;
END $$;
COMMENT ON FUNCTION watibot.finish_bursts IS
    'finish_bursts: close each open burst p_burst_ids[i] as p_statuses[i]: sent (p_parts_sent accepted), no_reply,
superseded (the messages stay in the buffer and join the next burst), dead, attention or expired (with p_errors).
A burst whose delivery WATI reported failed while its later parts went out closes as attention, not sent. The
claims are released and the buffers scheduled (release_claims). held = false: the fence no longer matches or the
burst is not the open one, nothing was changed. One statement per step for the whole batch, after locking the
conversations in key order.';

-- == Mark: one set-based statement for a batch's ordinary marks (mark_sending is its one-row form) ============

DROP FUNCTION watibot.mark_sendings(text[], text[], bigint[], text[], bigint[], integer[], timestamptz[], text[],
                                    text[], integer[], timestamptz[], float8, float8, float8, text, float8, float8);
DROP FUNCTION watibot.mark_sending(text, text, bigint, text, bigint, integer, timestamptz, float8, float8, float8,
                                   text, text, integer, timestamptz, text, float8, float8);

CREATE FUNCTION watibot.mark_sendings(
    p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[],
    p_parts integer[], p_not_afters timestamptz[], p_prompts text[], p_replies text[], p_reply_parts integer[],
    p_agent_started_ats timestamptz[], p_lease float8, p_cover float8, p_session_window float8,
    p_mode text, p_window float8, p_max float8)
RETURNS TABLE (outcome text, wait_seconds float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    outcomes text[] := array_fill(NULL::text, ARRAY[cardinality(p_channels)]);
    waits float8[] := array_fill(NULL::float8, ARRAY[cardinality(p_channels)]);
    marked bigint[];
    r record;
    k integer;
    closing text;
BEGIN
    PERFORM watibot.lock_conversations(p_channels, p_customers);

    -- The ordinary mark, for the whole batch at once: the burst is still the open one under the caller's fence,
    -- the caller's deadline has not passed, and (part 1 only) no operator wrote meanwhile and the customer's last
    -- message is within the session window. The reply is recorded (the first time), the part marked in flight,
    -- and the lease made to cover the send (p_cover seconds).
    WITH i AS (
        SELECT * FROM unnest(p_channels, p_customers, p_fences, p_owners, p_burst_ids, p_parts, p_not_afters,
                             p_prompts, p_replies, p_reply_parts, p_agent_started_ats)
            WITH ORDINALITY AS i(channel, customer, fence, owner, burst_id, part, not_after, prompt, reply,
                                 reply_parts, agent_started_at, position)
    ), ready AS (
        SELECT i.*, c.lease_expires_at
        FROM i
        JOIN watibot.conversation AS c
            ON c.channel = i.channel AND c.customer = i.customer AND c.fence = i.fence AND c.claimed_by = i.owner
           AND c.open_burst_id = i.burst_id
        WHERE (i.not_after IS NULL OR clock_timestamp() <= i.not_after)
          AND (i.part > 0 OR (NOT COALESCE(c.paused_until > now(), false)
                              AND watibot.in_session_window(c.last_customer_message_at, p_session_window)))
    ), marks AS (
        UPDATE watibot.burst AS b SET
            status = 'sending', sending_part = ready.part,
            prompt = COALESCE(ready.prompt, b.prompt), reply = COALESCE(ready.reply, b.reply),
            reply_parts = COALESCE(ready.reply_parts, b.reply_parts),
            agent_started_at = COALESCE(ready.agent_started_at, b.agent_started_at),
            agent_finished_at = CASE WHEN ready.reply IS NOT NULL THEN now() ELSE b.agent_finished_at END,
            finished_at = NULL
        FROM ready
        WHERE b.id = ready.burst_id
        RETURNING ready.position
    ), covered AS (
        UPDATE watibot.conversation AS c SET
            lease_expires_at = now() + make_interval(secs => p_lease),
            due_at = now() + make_interval(secs => p_lease)
        FROM ready
        WHERE c.channel = ready.channel AND c.customer = ready.customer
          AND ready.lease_expires_at < now() + make_interval(secs => p_cover)
    )
    SELECT array_agg(marks.position) INTO marked FROM marks;

    -- The rest, one by one: the claim was lost, the deadline passed, or part 1 found an operator's pause or the
    -- session window closed.
    FOR r IN
        SELECT i.*, c.channel AS held, c.paused_until, c.answered_position, c.last_customer_message_at
        FROM unnest(p_channels, p_customers, p_fences, p_owners, p_burst_ids, p_parts, p_not_afters)
            WITH ORDINALITY AS i(channel, customer, fence, owner, burst_id, part, not_after, position)
        LEFT JOIN watibot.conversation AS c
            ON c.channel = i.channel AND c.customer = i.customer AND c.fence = i.fence AND c.claimed_by = i.owner
           AND c.open_burst_id = i.burst_id
        WHERE NOT i.position = ANY(COALESCE(marked, '{}'))
        ORDER BY i.position
    LOOP
        k := r.position;
        IF r.held IS NULL THEN
            outcomes[k] := 'lost';
            CONTINUE;
        END IF;
        IF r.not_after IS NOT NULL AND clock_timestamp() > r.not_after THEN
            -- the caller has given up and will not send: a mark now would make the next holder think a send
            -- was in flight
            outcomes[k] := 'late';
            CONTINUE;
        END IF;
        IF r.part = 0 AND r.paused_until > now() THEN
            IF (SELECT x.after_position < r.answered_position FROM watibot.burst AS x WHERE x.id = r.burst_id) THEN
                -- A replayed burst (behind the high-water mark): nothing else would answer its messages, so it
                -- stays open for after the pause; this attempt does not count.
                UPDATE watibot.burst SET status = 'retry', attempts = attempts - 1,
                    error = 'an operator wrote to the customer while the agent worked: reply not sent, retried '
                            || 'after the pause'
                WHERE id = r.burst_id;
                waits[k] := watibot.release_claim(r.channel, r.customer, p_mode, p_window, p_max,
                                                           p_due_at => r.paused_until);
                outcomes[k] := 'paused';
                CONTINUE;
            END IF;
            closing := 'superseded';
        ELSIF r.part = 0 AND NOT watibot.in_session_window(r.last_customer_message_at, p_session_window) THEN
            closing := 'expired';
        ELSE
            -- Not reached: the first statement marked every other held row in time. Should a clock step back
            -- between the two readings, write nothing: the caller does not send an unmarked part.
            outcomes[k] := 'late';
            CONTINUE;
        END IF;
        UPDATE watibot.burst AS b SET
            status = closing, sending_part = NULL,
            prompt = COALESCE(p_prompts[k], b.prompt), reply = COALESCE(p_replies[k], b.reply),
            reply_parts = COALESCE(p_reply_parts[k], b.reply_parts),
            agent_started_at = COALESCE(p_agent_started_ats[k], b.agent_started_at),
            agent_finished_at = CASE WHEN p_replies[k] IS NOT NULL THEN now() ELSE b.agent_finished_at END,
            finished_at = now(),
            error = CASE closing
                WHEN 'superseded' THEN 'an operator wrote to the customer while the agent worked: reply not sent'
                ELSE 'not sent: the customer''s latest message is older than WhatsApp''s '
                     || trim_scale(round((p_session_window / 3600)::numeric, 2))
                     || '-hour session window (a template is needed)' END
        WHERE b.id = r.burst_id;
        -- superseded: due when the pause ends; expired: its messages answered
        waits[k] := watibot.release_claim(
            r.channel, r.customer, p_mode, p_window, p_max,
            p_due_at => CASE WHEN closing = 'superseded' THEN r.paused_until END, p_closed_burst => r.burst_id);
        outcomes[k] := CASE WHEN closing = 'superseded' THEN 'paused' ELSE 'expired' END;
    END LOOP;

    RETURN QUERY
    SELECT COALESCE(outcomes[n], 'send'), waits[n] FROM generate_subscripts(p_channels, 1) AS n ORDER BY n;
END $$;
COMMENT ON FUNCTION watibot.mark_sendings IS
    'mark_sendings: before part p_parts[i] of each burst goes to WATI. Records the agent''s reply (the first time),
marks the part in flight and makes sure the lease covers the send (p_cover seconds); one UPDATE for the batch''s
ordinary marks, the rest one by one. Outcomes, in the order given:
  send       marked: send it
  late       the caller''s deadline (p_not_afters[i]) passed before this ran: nothing written (the caller has
             given up and will not send, so a mark now would make the next holder think a send was in flight)
  paused     part 1 only: an operator wrote meanwhile; the reply is discarded (superseded), released until
             the pause ends (a replayed burst stays open instead, the attempt not counted)
  expired    part 1 only: the customer''s last message is outside the session window; closed, not sent
  lost       the fence no longer matches or the burst is not the open one: nothing changed';

CREATE FUNCTION watibot.mark_sending(
    p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_part integer,
    p_not_after timestamptz, p_lease float8, p_cover float8, p_session_window float8,
    p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamptz,
    p_mode text, p_window float8, p_max float8,
    OUT outcome text, OUT wait_seconds float8)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT m.outcome, m.wait_seconds INTO outcome, wait_seconds
    FROM watibot.mark_sendings(
        ARRAY[p_channel], ARRAY[p_customer], ARRAY[p_fence], ARRAY[p_owner], ARRAY[p_burst_id], ARRAY[p_part],
        ARRAY[p_not_after], ARRAY[p_prompt], ARRAY[p_reply], ARRAY[p_reply_parts], ARRAY[p_agent_started_at],
        p_lease => p_lease, p_cover => p_cover, p_session_window => p_session_window, p_mode => p_mode,
        p_window => p_window, p_max => p_max) AS m;
END $$;
COMMENT ON FUNCTION watibot.mark_sending IS 'mark_sendings for one burst (see there for the outcomes).';

INSERT INTO watibot.schema_compatibility (revision, position, oldest_code_revision)
VALUES ('0008_set_based_steps', 8, '0007_burst_life');
