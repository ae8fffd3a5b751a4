-- watibot's schema as it is now: what `alembic upgrade head` builds (tests/test_schema.py checks that they agree).
--
-- The migrations in versions/ are the history; this file is what a reader opens. Below the marker it is a
-- pg_dump of schema watibot (regenerate it with `python migrations/snapshot.py`); every table, column, view and
-- function carries its own COMMENT. Above the marker, written by hand: how a burst lives.
--
-- == The burst's life ============================================================================================
--
-- A conversation is one row of watibot.conversation; its messages are rows of watibot.message, each written once
-- at the next position of its conversation (last_position, advanced under the conversation row's lock by the
-- webhook statement that inserts it). answered_position is the high-water mark: every message at or below it
-- has been answered. A burst is a range of positions (after_position, through_position]; closing it is one write
-- to the conversation (answered_position := through_position), whatever its size.
--
--   webhook ──> buffer (messages above conversation.answered_position) ──claim_due──> begin_burst
--   (claim_due begins a fresh burst itself, in the same statement, when nothing else can be in the way: no burst
--   open, no pause, no operator answer to fold in, a message above the mark; begin_burst handles the rest)
--
--   begin_burst ──> processing ──(agent)──> mark_sending ──> sending ──> part_sent ──> … ──> finish_bursts
--        │              │  no reply ──────────────────────────────────────────> no_reply
--        │              │  newer messages (supersede) ────────────────────────> superseded (buffer kept)
--        │              │  agent / WATI failure: fail_burst ──> retry ──(due)──> begin_burst
--        │              │                                └─ attempts used / permanent ──> dead
--        │              └─ stopping: hand_back ──> retry (attempt not counted)
--        │  mark_sending finds: pause (operator wrote) ──> superseded; window closed ──> expired;
--        │                      caller's deadline passed ──> nothing written (late)
--        │  with WATIBOT_WINDOW_TEMPLATE, mark_template comes first on part 1: window closed ──> sending the
--        │  template instead of the reply (burst.template) ──> finish_bursts (sent); otherwise mark_sending as above
--        │  a send's outcome unknown (timeout, dropped connection, a gateway's 5xx): the sender reads WATI's
--        │  history: found ──> recorded as sent; absent after the grace ──> sent once more; unreadable ──> attention
--        │  sent, but WATI reported a failed delivery meanwhile ──> attention
--        └─ finds the open burst with a send in flight (its holder died) ──> attention
--           finds its attempts used ──> dead; the operator answered ──> human; nothing buffered ──> empty
--   dead | attention ──(watibot replay)──> replayed, and a new open burst over the same messages
--
-- A replay's burst lies behind the high-water mark, where no later burst would answer its messages: it is never
-- superseded, an operator's pause keeps it open (retry, the attempt not counted), and an operator's answer to
-- newer messages closes those as a separate `human` burst. Supersede stops once the buffer is older than
-- WATIBOT_BUFFER_MAX_SECONDS, so a customer who keeps typing is still answered.
--
-- Statuses: open = processing, sending, retry (conversation.open_burst_id points at it); consuming = sent,
-- no_reply, human, dead, attention, expired (closing one moves answered_position to its through_position);
-- superseded and replayed consume nothing. Every transition below takes the conversation row lock and checks the
-- claim's fence first (FOR UPDATE, then read: a webhook holding the lock is waited for, and its messages are
-- then visible to the next statement).

-- Where each rule lives (each once):
--   the buffer window (fixed / sliding, capped) ... buffer_due(), used by the webhook statement and release_claims()
--   releasing a claim (mark, next due) ........... release_claims() (a batch, one UPDATE); release_claim() is its
--                                                   one-row form
--   starting a fresh burst ........................ claim_due()'s fresh branch and begin_burst()'s last branch
--                                                   (the same range and attempt 1; claim_due for the common case,
--                                                   begin_burst after a pause, a takeover or an operator answer)
--   WhatsApp's session window .................... in_session_window(), checked by mark_sending() on part 1
--                                                   (and by mark_template(), which sends a template outside it)
--   which statuses answer their messages .......... consumes(); BurstStatus.consumes in Python (a test compares)
--   open statuses ................................. conversation.open_burst_id points at the open burst; the
--                                                   CHECK constraint lists every status, as BurstStatus does
--   max attempts .................................. begin_burst() (a holder died mid-attempt) and fail_burst()
--                                                   (a failed attempt), both against p_max_attempts. A claim that
--                                                   begins a fresh burst is its first attempt: a holder that dies
--                                                   right after claiming counts one (a burst that kills its worker
--                                                   every time ends dead instead of looping)
--   supersede cap ................................. the store's SHOULD_SUPERSEDE (buffer younger than its max)
--
-- Indexes and their readers:
--   conversation_pkey ........... every fenced step, webhooks' upsert
--   conversation_due_idx ........ the claim (claim_due: due_at <= now() ORDER BY due_at), next_due_wait
--   message_pkey ................ message_outcome (operators)
--   message_provider_message_id_key  duplicate deliveries
--   message_position_idx ........ a burst's messages, the first and last of the buffer, prune, operators
--   burst_pkey .................. every step on a burst
--   burst_conversation_idx ...... the agent's history, `watibot conversation`, message_outcome
--   burst_problem_idx ........... watibot.dead, health's dead/attention counts
--   burst_finished_idx .......... prune (oldest finished first), health's last hour, the metrics rollup (a range of
--                                 finish times)
--   wati_message_pkey ........... a V3 reply's delivery reports and echoes (the ids WATI returned for it)
--   wati_message_burst_idx ...... prune (deleted with the burst, ON DELETE CASCADE)
--
-- ==== pg_dump below: regenerate with `python migrations/snapshot.py`, do not edit by hand ====

--
-- PostgreSQL database dump
--



SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET transaction_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: watibot; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA watibot;


--
-- Name: SCHEMA watibot; Type: COMMENT; Schema: -; Owner: -
--

COMMENT ON SCHEMA watibot IS 'watibot: WhatsApp burst buffer coordinated by PostgreSQL.';


--
-- Name: add_to_burst_rollup(text[], text[], bigint[], double precision[], integer); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.add_to_burst_rollup(p_series text[], p_labels text[], p_counts bigint[], p_sums double precision[], p_sign integer) RETURNS void
    LANGUAGE sql
    AS $$
        INSERT INTO watibot.burst_totals_rollup AS r (series, label, count, sum)
        SELECT t.series, t.label, p_sign * t.count, p_sign * t.sum
        FROM unnest(p_series, p_labels, p_counts, p_sums) AS t (series, label, count, sum)
        ORDER BY t.series, t.label
        ON CONFLICT (series, label) DO UPDATE SET count = r.count + EXCLUDED.count, sum = r.sum + EXCLUDED.sum
    $$;


--
-- Name: begin_burst(text, text, bigint, text, timestamp with time zone, bigint, integer, boolean, text, double precision, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.begin_burst(p_channel text, p_customer text, p_fence bigint, p_owner text, p_due_at timestamp with time zone, p_through bigint, p_max_attempts integer, p_skip_human boolean, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision, OUT burst_id bigint, OUT attempts integer, OUT reply text, OUT reply_parts integer, OUT parts_sent integer, OUT messages jsonb) RETURNS record
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION begin_burst(p_channel text, p_customer text, p_fence bigint, p_owner text, p_due_at timestamp with time zone, p_through bigint, p_max_attempts integer, p_skip_human boolean, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision, OUT burst_id bigint, OUT attempts integer, OUT reply text, OUT reply_parts integer, OUT parts_sent integer, OUT messages jsonb); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.begin_burst(p_channel text, p_customer text, p_fence bigint, p_owner text, p_due_at timestamp with time zone, p_through bigint, p_max_attempts integer, p_skip_human boolean, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision, OUT burst_id bigint, OUT attempts integer, OUT reply text, OUT reply_parts integer, OUT parts_sent integer, OUT messages jsonb) IS 'begin_burst: begin (or resume) the burst of a claimed conversation, up to p_through (the conversation''s
last_position read by the claim). Outcomes:
  run        a burst to process (burst_id, attempts, reply/parts if one was recorded, messages)
  paused     an operator took over: released until the pause ends
  attention  the previous holder left a send in flight: outcome unknown, closed, not re-sent
  dead       the open burst has used its attempts
  empty      nothing buffered: released
  lost       the fence no longer matches: nothing changed
Messages an operator answered (up to human_position) are closed as a `human` burst first.';


--
-- Name: begin_bursts(text[], text[], bigint[], text[], timestamp with time zone[], bigint[], integer, boolean, text, double precision, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.begin_bursts(p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_due_ats timestamp with time zone[], p_throughs bigint[], p_max_attempts integer, p_skip_human boolean, p_mode text, p_window double precision, p_max double precision) RETURNS TABLE(outcome text, wait_seconds double precision, burst_id bigint, attempts integer, reply text, reply_parts integer, parts_sent integer, messages jsonb)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: buffer_due(timestamp with time zone, timestamp with time zone, text, double precision, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.buffer_due(p_first timestamp with time zone, p_last timestamp with time zone, p_mode text, p_window double precision, p_max double precision) RETURNS timestamp with time zone
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE
        WHEN p_first IS NULL THEN NULL
        WHEN p_mode = 'sliding' THEN LEAST(p_last + make_interval(secs => p_window),
                                           p_first + make_interval(secs => p_max))
        ELSE p_first + make_interval(secs => p_window)
    END
$$;


--
-- Name: FUNCTION buffer_due(p_first timestamp with time zone, p_last timestamp with time zone, p_mode text, p_window double precision, p_max double precision); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.buffer_due(p_first timestamp with time zone, p_last timestamp with time zone, p_mode text, p_window double precision, p_max double precision) IS 'The window rule: when a buffer whose first and latest messages arrived at p_first and p_last is due. fixed: first message + window; sliding: latest + window, at most first + max.';


--
-- Name: burst_fact_totals(bigint[]); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.burst_fact_totals(p_burst_ids bigint[] DEFAULT NULL::bigint[]) RETURNS TABLE(series text, label text, count bigint, sum double precision)
    LANGUAGE sql STABLE
    AS $$
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


--
-- Name: FUNCTION burst_fact_totals(p_burst_ids bigint[]); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.burst_fact_totals(p_burst_ids bigint[]) IS 'Counts and sums of finished bursts (all, or those of p_burst_ids) by series: outcome, replayed, and the histogram buckets of claim_lag and agent_seconds. Read by /metrics; `watibot prune` folds the totals of the bursts it deletes into pruned_burst_totals with it.';


--
-- Name: burst_messages(text, text, bigint, bigint); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.burst_messages(p_channel text, p_customer text, p_after bigint, p_through bigint) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $$
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


--
-- Name: FUNCTION burst_messages(p_channel text, p_customer text, p_after bigint, p_through bigint); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.burst_messages(p_channel text, p_customer text, p_after bigint, p_through bigint) IS 'The messages after p_after up to p_through, in prompt order (WATI''s timestamp, then arrival).';


--
-- Name: burst_range_totals(timestamp with time zone, timestamp with time zone); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.burst_range_totals(p_from timestamp with time zone, p_to timestamp with time zone) RETURNS TABLE(series text, label text, count bigint, sum double precision)
    LANGUAGE sql STABLE
    AS $$
        SELECT * FROM (
            SELECT CASE WHEN GROUPING(f.outcome) = 0 THEN 'outcome'
                        WHEN GROUPING(f.replayed) = 0 THEN 'replayed'
                        WHEN GROUPING(f.claim_lag_le) = 0 THEN 'claim_lag'
                        ELSE 'agent_seconds' END AS series,
                   COALESCE(f.outcome, f.replayed::text, f.claim_lag_le, f.agent_le) AS label,
                   count(*) AS count,
                   COALESCE(CASE WHEN GROUPING(f.claim_lag_le) = 0 THEN sum(f.claim_lag_seconds)
                                 WHEN GROUPING(f.agent_le) = 0 THEN sum(f.agent_seconds) END, 0)::float8 AS sum
            FROM (
                SELECT COALESCE(b.replayed_from, b.status) AS outcome,
                       b.replayed_from IS NOT NULL AS replayed,
                       EXTRACT(EPOCH FROM b.started_at - b.due_at)::float8 AS claim_lag_seconds,
                       watibot.histogram_bucket(EXTRACT(EPOCH FROM b.started_at - b.due_at)::float8) AS claim_lag_le,
                       EXTRACT(EPOCH FROM b.agent_finished_at - b.agent_started_at)::float8 AS agent_seconds,
                       watibot.histogram_bucket(EXTRACT(EPOCH FROM b.agent_finished_at - b.agent_started_at)::float8)
                           AS agent_le
                FROM watibot.burst AS b
                WHERE b.finished_at >= p_from AND b.finished_at < p_to
            ) AS f
            GROUP BY GROUPING SETS ((f.outcome), (f.replayed), (f.claim_lag_le), (f.agent_le))
        ) AS totals
        WHERE totals.label IS NOT NULL AND totals.label <> 'false'
    $$;


--
-- Name: FUNCTION burst_range_totals(p_from timestamp with time zone, p_to timestamp with time zone); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.burst_range_totals(p_from timestamp with time zone, p_to timestamp with time zone) IS 'watibot.burst_fact_totals over the bursts finished in [p_from, p_to) (the rollup and /metrics).';


--
-- Name: burst_rollup_correct(); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.burst_rollup_correct() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    DECLARE
        v_mark timestamptz;
    BEGIN
        SELECT rolled_through INTO v_mark FROM watibot.burst_totals_mark FOR SHARE;
        IF TG_OP = 'UPDATE' AND OLD.finished_at < v_mark THEN
            PERFORM watibot.add_to_burst_rollup(array_agg(t.series), array_agg(t.label), array_agg(t.count),
                                                array_agg(t.sum), -1)
            FROM watibot.burst_row_totals(ARRAY[OLD]) AS t;
        END IF;
        IF NEW.finished_at < v_mark THEN
            PERFORM watibot.add_to_burst_rollup(array_agg(t.series), array_agg(t.label), array_agg(t.count),
                                                array_agg(t.sum), 1)
            FROM watibot.burst_row_totals(ARRAY[NEW]) AS t;
        END IF;
        RETURN NULL;
    END $$;


--
-- Name: FUNCTION burst_rollup_correct(); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.burst_rollup_correct() IS 'Trigger: a finished burst behind the rollup mark changed (replay, delivery report) or was inserted finished: move its totals in burst_totals_rollup.';


--
-- Name: burst_rollup_forget(); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.burst_rollup_forget() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    DECLARE
        v_mark timestamptz;
    BEGIN
        SELECT rolled_through INTO v_mark FROM watibot.burst_totals_mark FOR SHARE;
        PERFORM watibot.add_to_burst_rollup(array_agg(t.series), array_agg(t.label), array_agg(t.count),
                                            array_agg(t.sum), -1)
        FROM watibot.burst_row_totals(ARRAY(SELECT g::watibot.burst FROM gone AS g
                                            WHERE g.finished_at < v_mark)) AS t;
        RETURN NULL;
    END $$;


--
-- Name: FUNCTION burst_rollup_forget(); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.burst_rollup_forget() IS 'Trigger: bursts behind the rollup mark were deleted (prune folds them into pruned_burst_totals): take their totals out of burst_totals_rollup.';


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: burst; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.burst (
    id bigint NOT NULL,
    channel text NOT NULL,
    customer text NOT NULL,
    status text DEFAULT 'processing'::text NOT NULL,
    prompt text,
    reply text,
    reply_parts integer,
    parts_sent integer DEFAULT 0 NOT NULL,
    sending_part integer,
    attempts integer DEFAULT 1 NOT NULL,
    fence bigint NOT NULL,
    claimed_by text NOT NULL,
    error text,
    due_at timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    agent_started_at timestamp with time zone,
    agent_finished_at timestamp with time zone,
    sent_at timestamp with time zone,
    finished_at timestamp with time zone,
    delivery_status text,
    delivery_error text,
    delivered_at timestamp with time zone,
    read_at timestamp with time zone,
    replayed_from text,
    after_position bigint DEFAULT 0 NOT NULL,
    through_position bigint DEFAULT 0 NOT NULL,
    messages integer DEFAULT 0 NOT NULL,
    template text,
    CONSTRAINT burst_status_check CHECK ((status = ANY (ARRAY['processing'::text, 'sending'::text, 'retry'::text, 'sent'::text, 'no_reply'::text, 'dead'::text, 'attention'::text, 'replayed'::text, 'superseded'::text, 'expired'::text, 'human'::text])))
)
WITH (fillfactor='80', autovacuum_vacuum_scale_factor='0.05', autovacuum_analyze_scale_factor='0.05');


--
-- Name: TABLE burst; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.burst IS 'One row per burst: the messages answered together, the prompt, the reply and how sending went.';


--
-- Name: COLUMN burst.status; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.status IS 'processing (agent running) | sending (reply recorded, parts going out) | retry (waiting to retry) | sent | no_reply (agent chose silence) | dead (gave up, see error) | attention (a send with unknown outcome, or a failed delivery: not re-sent, a human decides) | replayed (messages put back by watibot replay) | superseded (newer messages arrived before sending: reply discarded, messages answered by the next burst) | expired (outside WhatsApp''s 24-hour window: not sent) | human (answered by an operator)';


--
-- Name: COLUMN burst.prompt; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.prompt IS 'The combined text given to the agent.';


--
-- Name: COLUMN burst.reply_parts; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.reply_parts IS 'Number of WATI messages the reply is split into (4096 chars each).';


--
-- Name: COLUMN burst.parts_sent; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.parts_sent IS 'Reply parts WATI accepted; a retry resumes after them.';


--
-- Name: COLUMN burst.sending_part; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.sending_part IS 'Set just before a part is handed to WATI and cleared when the outcome is known. Found set by another worker, the outcome is unknown: the burst goes to attention instead of sending twice.';


--
-- Name: COLUMN burst.fence; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.fence IS 'Conversation fence of the attempt that last worked on this burst.';


--
-- Name: COLUMN burst.claimed_by; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.claimed_by IS 'Worker of the latest attempt.';


--
-- Name: COLUMN burst.due_at; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.due_at IS 'The conversation due_at that started this burst (claim lag = started_at - due_at).';


--
-- Name: COLUMN burst.delivery_status; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.delivery_status IS 'What WATI reported after accepting the reply: delivered | read | replied | failed.';


--
-- Name: COLUMN burst.delivery_error; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.delivery_error IS 'failedCode and failedDetail of a sessionMessageFailed event.';


--
-- Name: COLUMN burst.replayed_from; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.replayed_from IS 'Status (dead or attention) the burst had when `watibot replay` put its messages back in the buffer.';


--
-- Name: COLUMN burst.after_position; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.after_position IS 'The burst is the messages after this position ...';


--
-- Name: COLUMN burst.through_position; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.through_position IS '... up to and including this one (fixed at the claim).';


--
-- Name: COLUMN burst.messages; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.messages IS 'Number of messages in the burst.';


--
-- Name: COLUMN burst.template; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.burst.template IS 'The approved template (WATIBOT_WINDOW_TEMPLATE) sent instead of the reply because the customer''s latest message was outside the session window; NULL: the reply itself (or nothing) was sent.';


--
-- Name: burst_row_totals(watibot.burst[]); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.burst_row_totals(p_bursts watibot.burst[]) RETURNS TABLE(series text, label text, count bigint, sum double precision)
    LANGUAGE sql STABLE
    AS $$
        SELECT * FROM (
            SELECT CASE WHEN GROUPING(f.outcome) = 0 THEN 'outcome'
                        WHEN GROUPING(f.replayed) = 0 THEN 'replayed'
                        WHEN GROUPING(f.claim_lag_le) = 0 THEN 'claim_lag'
                        ELSE 'agent_seconds' END AS series,
                   COALESCE(f.outcome, f.replayed::text, f.claim_lag_le, f.agent_le) AS label,
                   count(*) AS count,
                   COALESCE(CASE WHEN GROUPING(f.claim_lag_le) = 0 THEN sum(f.claim_lag_seconds)
                                 WHEN GROUPING(f.agent_le) = 0 THEN sum(f.agent_seconds) END, 0)::float8 AS sum
            FROM (
                SELECT COALESCE(b.replayed_from, b.status) AS outcome,
                       b.replayed_from IS NOT NULL AS replayed,
                       EXTRACT(EPOCH FROM b.started_at - b.due_at)::float8 AS claim_lag_seconds,
                       watibot.histogram_bucket(EXTRACT(EPOCH FROM b.started_at - b.due_at)::float8) AS claim_lag_le,
                       EXTRACT(EPOCH FROM b.agent_finished_at - b.agent_started_at)::float8 AS agent_seconds,
                       watibot.histogram_bucket(EXTRACT(EPOCH FROM b.agent_finished_at - b.agent_started_at)::float8)
                           AS agent_le
                FROM unnest(p_bursts) AS b
                WHERE b.finished_at IS NOT NULL
            ) AS f
            GROUP BY GROUPING SETS ((f.outcome), (f.replayed), (f.claim_lag_le), (f.agent_le))
        ) AS totals
        WHERE totals.label IS NOT NULL AND totals.label <> 'false'
    $$;


--
-- Name: FUNCTION burst_row_totals(p_bursts watibot.burst[]); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.burst_row_totals(p_bursts watibot.burst[]) IS 'watibot.burst_fact_totals over burst rows given by value (for the rollup triggers).';


--
-- Name: claim_due(integer, text, double precision, boolean); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.claim_due(p_limit integer, p_owner text, p_lease double precision, p_skip_human boolean) RETURNS TABLE(channel text, customer text, wa_id text, fence bigint, previous_owner text, was_due_at timestamp with time zone, claimed_at timestamp with time zone, through bigint, burst_id bigint, messages jsonb)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION claim_due(p_limit integer, p_owner text, p_lease double precision, p_skip_human boolean); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.claim_due(p_limit integer, p_owner text, p_lease double precision, p_skip_human boolean) IS 'claim_due: claim up to p_limit due conversations (free, or with an expired lease) for p_owner, with a new fence and a lease of p_lease seconds. A conversation whose buffer is plainly the next burst (no open burst, no pause, no operator answer to fold in, a message above the high-water mark) gets that burst begun in the same statement: burst_id and its messages are returned, and the holder goes straight to the agent. The others (burst_id NULL) are begun by begin_burst(s).';


--
-- Name: consumes(text); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.consumes(p_status text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT p_status IN ('sent', 'no_reply', 'human', 'dead', 'attention', 'expired')
$$;


--
-- Name: FUNCTION consumes(p_status text); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.consumes(p_status text) IS 'Whether a burst closed with this status answered its messages (superseded and replayed did not).';


--
-- Name: fail_burst(text, text, bigint, text, bigint, text, boolean, double precision, integer, text, double precision, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.fail_burst(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_error text, p_permanent boolean, p_retry_in double precision, p_max_attempts integer, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision, OUT attempts integer) RETURNS record
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION fail_burst(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_error text, p_permanent boolean, p_retry_in double precision, p_max_attempts integer, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision, OUT attempts integer); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.fail_burst(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_error text, p_permanent boolean, p_retry_in double precision, p_max_attempts integer, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision, OUT attempts integer) IS 'fail_burst: the agent or WATI failed (WATI certainly did not take the part: no send in flight). With attempts
left and a transient error the burst waits p_retry_in seconds (outcome retry); otherwise it is dead.';


--
-- Name: finish_bursts(text[], text[], bigint[], text[], bigint[], text[], text[], integer[], text[], text[], timestamp with time zone[], text, double precision, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.finish_bursts(p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[], p_statuses text[], p_errors text[], p_parts_sent integer[], p_prompts text[], p_replies text[], p_agent_started_ats timestamp with time zone[], p_mode text, p_window double precision, p_max double precision) RETURNS TABLE(held boolean, wait_seconds double precision, status text)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION finish_bursts(p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[], p_statuses text[], p_errors text[], p_parts_sent integer[], p_prompts text[], p_replies text[], p_agent_started_ats timestamp with time zone[], p_mode text, p_window double precision, p_max double precision); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.finish_bursts(p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[], p_statuses text[], p_errors text[], p_parts_sent integer[], p_prompts text[], p_replies text[], p_agent_started_ats timestamp with time zone[], p_mode text, p_window double precision, p_max double precision) IS 'finish_bursts: close each open burst p_burst_ids[i] as p_statuses[i]: sent (p_parts_sent accepted), no_reply,
superseded (the messages stay in the buffer and join the next burst), dead, attention or expired (with p_errors).
A burst whose delivery WATI reported failed while its later parts went out closes as attention, not sent. The
claims are released and the buffers scheduled (release_claims). held = false: the fence no longer matches or the
burst is not the open one, nothing was changed. One statement per step for the whole batch, after locking the
conversations in key order.';


--
-- Name: hand_back(text, text, bigint, text, bigint); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.hand_back(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION hand_back(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.hand_back(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint) IS 'hand_back: a stopping worker releases its claim, due now; the open burst (if begun) keeps its reply and
progress and the attempt does not count. false: the fence no longer matches.';


--
-- Name: conversation; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.conversation (
    channel text NOT NULL,
    customer text NOT NULL,
    wa_id text,
    due_at timestamp with time zone,
    buffer_started_at timestamp with time zone,
    claimed_by text,
    claimed_at timestamp with time zone,
    lease_expires_at timestamp with time zone,
    fence bigint DEFAULT 0 NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    last_error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    paused_until timestamp with time zone,
    human_message_at timestamp with time zone,
    last_position bigint DEFAULT 0 NOT NULL,
    answered_position bigint DEFAULT 0 NOT NULL,
    human_position bigint,
    last_customer_message_at timestamp with time zone,
    open_burst_id bigint,
    CONSTRAINT conversation_check CHECK (((claimed_by IS NULL) = (lease_expires_at IS NULL)))
)
WITH (fillfactor='70', autovacuum_vacuum_scale_factor='0.02', autovacuum_analyze_scale_factor='0.02', autovacuum_vacuum_cost_delay='0');


--
-- Name: TABLE conversation; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.conversation IS 'One row per customer per WhatsApp number: the timer (due_at) and the claim (claimed_by, lease, fence).';


--
-- Name: COLUMN conversation.channel; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.channel IS 'WATI channelPhoneNumber: our number that received the messages ('''' when WATI sent none).';


--
-- Name: COLUMN conversation.customer; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.customer IS 'The customer: WATI bsuid when sent, otherwise waId.';


--
-- Name: COLUMN conversation.wa_id; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.wa_id IS 'Latest waId seen; replies are sent to it.';


--
-- Name: COLUMN conversation.due_at; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.due_at IS 'When a sweeper should next look at this conversation: end of the buffer window, a retry time, or the lease expiry while claimed. NULL: nothing to do.';


--
-- Name: COLUMN conversation.buffer_started_at; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.buffer_started_at IS 'Arrival of the first message of the burst being buffered (start of the window).';


--
-- Name: COLUMN conversation.claimed_by; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.claimed_by IS 'Worker id holding the claim; NULL when free.';


--
-- Name: COLUMN conversation.lease_expires_at; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.lease_expires_at IS 'The claim is the holder''s until then; a heartbeat extends it, and after it any worker may take over.';


--
-- Name: COLUMN conversation.fence; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.fence IS 'Incremented by every claim. Writes by a claim holder check it, so a worker that lost its claim can neither send nor complete.';


--
-- Name: COLUMN conversation.attempts; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.attempts IS 'Attempts of the current burst (0 when none is open).';


--
-- Name: COLUMN conversation.last_error; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.last_error IS 'Error of the latest failed attempt, if any.';


--
-- Name: COLUMN conversation.paused_until; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.paused_until IS 'A human operator wrote to the customer: the bot stays silent until then (WATIBOT_HUMAN_PAUSE_SECONDS).';


--
-- Name: COLUMN conversation.human_message_at; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.human_message_at IS 'When an operator last wrote to the customer.';


--
-- Name: COLUMN conversation.last_position; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.last_position IS 'Position of the newest message stored for the conversation. Assigned by the webhook statement that inserts the messages, under this row''s lock: positions grow in commit order (gaps possible, never reordered).';


--
-- Name: COLUMN conversation.answered_position; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.answered_position IS 'High-water mark: every message at or below it was answered by a closed burst (sent, no_reply, human, dead, attention, expired). The buffer is the messages above it.';


--
-- Name: COLUMN conversation.human_position; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.human_position IS 'last_position when an operator last wrote to the customer: messages up to it count as answered by a human.';


--
-- Name: COLUMN conversation.last_customer_message_at; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.last_customer_message_at IS 'When the customer last wrote (the earlier of WATI''s timestamp and our receipt): opens WhatsApp''s session window.';


--
-- Name: COLUMN conversation.open_burst_id; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.conversation.open_burst_id IS 'The burst being processed, sent or waiting to retry; NULL when none is open (at most one by construction).';


--
-- Name: held_conversation(text, text, bigint, text); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.held_conversation(p_channel text, p_customer text, p_fence bigint, p_owner text) RETURNS watibot.conversation
    LANGUAGE plpgsql
    AS $$  -- plpgsql, not sql: its plan is cached per connection
DECLARE
    c watibot.conversation%ROWTYPE;
BEGIN
    SELECT * INTO c FROM watibot.conversation
    WHERE channel = p_channel AND customer = p_customer AND fence = p_fence AND claimed_by = p_owner
    FOR UPDATE;
    RETURN c;  -- all NULL when not held
END $$;


--
-- Name: FUNCTION held_conversation(p_channel text, p_customer text, p_fence bigint, p_owner text); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.held_conversation(p_channel text, p_customer text, p_fence bigint, p_owner text) IS 'The claim holder''s conversation row, locked; NULL when the fence no longer matches.';


--
-- Name: histogram_bucket(double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.histogram_bucket(seconds double precision) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT (ARRAY['0.05', '0.1', '0.25', '0.5', '1', '2.5', '5', '10', '30', '60', '120', '300', '600', '+Inf'])[
        14 - width_bucket(-seconds, ARRAY[-600, -300, -120, -60, -30, -10, -5, -2.5, -1, -0.5, -0.25, -0.1,
                                          -0.05]::float8[])]
    $$;


--
-- Name: FUNCTION histogram_bucket(seconds double precision); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.histogram_bucket(seconds double precision) IS 'The Prometheus histogram bucket (le label) that a duration in seconds falls in.';


--
-- Name: in_session_window(timestamp with time zone, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.in_session_window(p_last_customer_message_at timestamp with time zone, p_window_seconds double precision) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
    SELECT COALESCE(p_last_customer_message_at > now() - make_interval(secs => p_window_seconds), false)
$$;


--
-- Name: FUNCTION in_session_window(p_last_customer_message_at timestamp with time zone, p_window_seconds double precision); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.in_session_window(p_last_customer_message_at timestamp with time zone, p_window_seconds double precision) IS 'The session-window rule: a free-form reply may go out only within p_window_seconds of the customer''s last message (WhatsApp''s 24-hour window).';


--
-- Name: lock_conversations(text[], text[]); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.lock_conversations(p_channels text[], p_customers text[]) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM 1 FROM watibot.conversation AS c
    JOIN unnest(p_channels, p_customers) AS k(channel, customer) ON c.channel = k.channel AND c.customer = k.customer
    ORDER BY c.channel COLLATE "C", c.customer COLLATE "C"
    FOR UPDATE OF c;
END $$;


--
-- Name: FUNCTION lock_conversations(p_channels text[], p_customers text[]); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.lock_conversations(p_channels text[], p_customers text[]) IS 'Lock conversation rows in key byte order before a batch works on them one by one, so that batches, webhooks
and heartbeats (which lock in the same order) never deadlock. ORDER BY is applied before the locking clause
(PostgreSQL, SELECT "The Locking Clause"), so the locks are taken in this order whatever the plan.';


--
-- Name: mark_sending(text, text, bigint, text, bigint, integer, timestamp with time zone, double precision, double precision, double precision, text, text, integer, timestamp with time zone, text, double precision, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.mark_sending(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_part integer, p_not_after timestamp with time zone, p_lease double precision, p_cover double precision, p_session_window double precision, p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamp with time zone, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision) RETURNS record
    LANGUAGE plpgsql
    AS $$
BEGIN
    SELECT m.outcome, m.wait_seconds INTO outcome, wait_seconds
    FROM watibot.mark_sendings(
        ARRAY[p_channel], ARRAY[p_customer], ARRAY[p_fence], ARRAY[p_owner], ARRAY[p_burst_id], ARRAY[p_part],
        ARRAY[p_not_after], ARRAY[p_prompt], ARRAY[p_reply], ARRAY[p_reply_parts], ARRAY[p_agent_started_at],
        p_lease => p_lease, p_cover => p_cover, p_session_window => p_session_window, p_mode => p_mode,
        p_window => p_window, p_max => p_max) AS m;
END $$;


--
-- Name: FUNCTION mark_sending(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_part integer, p_not_after timestamp with time zone, p_lease double precision, p_cover double precision, p_session_window double precision, p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamp with time zone, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.mark_sending(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_part integer, p_not_after timestamp with time zone, p_lease double precision, p_cover double precision, p_session_window double precision, p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamp with time zone, p_mode text, p_window double precision, p_max double precision, OUT outcome text, OUT wait_seconds double precision) IS 'mark_sendings for one burst (see there for the outcomes).';


--
-- Name: mark_sendings(text[], text[], bigint[], text[], bigint[], integer[], timestamp with time zone[], text[], text[], integer[], timestamp with time zone[], double precision, double precision, double precision, text, double precision, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.mark_sendings(p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[], p_parts integer[], p_not_afters timestamp with time zone[], p_prompts text[], p_replies text[], p_reply_parts integer[], p_agent_started_ats timestamp with time zone[], p_lease double precision, p_cover double precision, p_session_window double precision, p_mode text, p_window double precision, p_max double precision) RETURNS TABLE(outcome text, wait_seconds double precision)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION mark_sendings(p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[], p_parts integer[], p_not_afters timestamp with time zone[], p_prompts text[], p_replies text[], p_reply_parts integer[], p_agent_started_ats timestamp with time zone[], p_lease double precision, p_cover double precision, p_session_window double precision, p_mode text, p_window double precision, p_max double precision); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.mark_sendings(p_channels text[], p_customers text[], p_fences bigint[], p_owners text[], p_burst_ids bigint[], p_parts integer[], p_not_afters timestamp with time zone[], p_prompts text[], p_replies text[], p_reply_parts integer[], p_agent_started_ats timestamp with time zone[], p_lease double precision, p_cover double precision, p_session_window double precision, p_mode text, p_window double precision, p_max double precision) IS 'mark_sendings: before part p_parts[i] of each burst goes to WATI. Records the agent''s reply (the first time),
marks the part in flight and makes sure the lease covers the send (p_cover seconds); one UPDATE for the batch''s
ordinary marks, the rest one by one. Outcomes, in the order given:
  send       marked: send it
  late       the caller''s deadline (p_not_afters[i]) passed before this ran: nothing written (the caller has
             given up and will not send, so a mark now would make the next holder think a send was in flight)
  paused     part 1 only: an operator wrote meanwhile; the reply is discarded (superseded), released until
             the pause ends (a replayed burst stays open instead, the attempt not counted)
  expired    part 1 only: the customer''s last message is outside the session window; closed, not sent
  lost       the fence no longer matches or the burst is not the open one: nothing changed';


--
-- Name: mark_template(text, text, bigint, text, bigint, timestamp with time zone, double precision, double precision, double precision, text, text, text, integer, timestamp with time zone); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.mark_template(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_not_after timestamp with time zone, p_lease double precision, p_cover double precision, p_session_window double precision, p_template text, p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamp with time zone, OUT outcome text) RETURNS text
    LANGUAGE plpgsql
    AS $$
    DECLARE
        c watibot.conversation;
        b watibot.burst;
    BEGIN
        PERFORM watibot.lock_conversations(ARRAY[p_channel], ARRAY[p_customer]);
        SELECT * INTO c FROM watibot.conversation AS x
        WHERE x.channel = p_channel AND x.customer = p_customer AND x.fence = p_fence AND x.claimed_by = p_owner
          AND x.open_burst_id = p_burst_id;
        IF NOT FOUND THEN
            outcome := 'lost';
            RETURN;
        END IF;
        IF clock_timestamp() > p_not_after THEN
            outcome := 'late';  -- the caller has given up and will not send: nothing written
            RETURN;
        END IF;
        SELECT * INTO b FROM watibot.burst WHERE id = p_burst_id;
        IF b.parts_sent > 0 OR COALESCE(c.paused_until > now(), false)
           OR (b.template IS NULL AND watibot.in_session_window(c.last_customer_message_at, p_session_window)) THEN
            outcome := 'reply';  -- the ordinary mark decides (send, paused, expired, lost, late)
            RETURN;
        END IF;
        UPDATE watibot.burst SET
            status = 'sending', sending_part = 0, template = p_template,
            prompt = COALESCE(p_prompt, prompt), reply = COALESCE(p_reply, reply),
            reply_parts = COALESCE(p_reply_parts, reply_parts),
            agent_started_at = COALESCE(p_agent_started_at, agent_started_at),
            agent_finished_at = CASE WHEN p_reply IS NOT NULL THEN now() ELSE agent_finished_at END,
            finished_at = NULL
        WHERE id = p_burst_id;
        IF c.lease_expires_at < now() + make_interval(secs => p_cover) THEN
            UPDATE watibot.conversation SET
                lease_expires_at = now() + make_interval(secs => p_lease),
                due_at = now() + make_interval(secs => p_lease)
            WHERE channel = p_channel AND customer = p_customer;
        END IF;
        outcome := 'send';
    END $$;


--
-- Name: FUNCTION mark_template(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_not_after timestamp with time zone, p_lease double precision, p_cover double precision, p_session_window double precision, p_template text, p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamp with time zone, OUT outcome text); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.mark_template(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_not_after timestamp with time zone, p_lease double precision, p_cover double precision, p_session_window double precision, p_template text, p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamp with time zone, OUT outcome text) IS 'mark_template: before the first part of a burst, with WATIBOT_WINDOW_TEMPLATE set. Outcomes:
  send   the customer''s latest message is outside the session window (or an earlier attempt sent the template
         way): the reply is recorded (the first time), the burst marked sending part 0 with template p_template,
         the lease made to cover the send; send the template, not the reply
  reply  inside the window, paused, or a part already sent: nothing written; mark_sending decides as usual
  late   the caller''s deadline (p_not_after) passed before this ran: nothing written
  lost   the fence no longer matches or the burst is not the open one: nothing written';


--
-- Name: part_sent(text, text, bigint, text, bigint, integer); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.part_sent(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_part integer) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF (watibot.held_conversation(p_channel => p_channel, p_customer => p_customer, p_fence => p_fence,
                                  p_owner => p_owner)).open_burst_id IS DISTINCT FROM p_burst_id THEN
        RETURN false;
    END IF;
    UPDATE watibot.burst SET sending_part = NULL, parts_sent = p_part + 1 WHERE id = p_burst_id;
    RETURN FOUND;
END $$;


--
-- Name: FUNCTION part_sent(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_part integer); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.part_sent(p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint, p_part integer) IS 'part_sent: WATI accepted part p_part, and more parts follow (finish_burst records the last one).';


--
-- Name: release_claim(text, text, text, double precision, double precision, timestamp with time zone, bigint); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.release_claim(p_channel text, p_customer text, p_mode text, p_window double precision, p_max double precision, p_due_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_closed_burst bigint DEFAULT NULL::bigint) RETURNS double precision
    LANGUAGE plpgsql
    AS $$
BEGIN
    RETURN (SELECT r.wait_seconds
            FROM watibot.release_claims(ARRAY[p_channel], ARRAY[p_customer], ARRAY[p_closed_burst], ARRAY[p_due_at],
                                        p_mode, p_window, p_max) AS r);
END $$;


--
-- Name: FUNCTION release_claim(p_channel text, p_customer text, p_mode text, p_window double precision, p_max double precision, p_due_at timestamp with time zone, p_closed_burst bigint); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.release_claim(p_channel text, p_customer text, p_mode text, p_window double precision, p_max double precision, p_due_at timestamp with time zone, p_closed_burst bigint) IS 'release_claims for one conversation: release the claim, closing the open burst p_closed_burst when given; returns seconds until due, or NULL when nothing is buffered.';


--
-- Name: release_claims(text[], text[], bigint[], timestamp with time zone[], text, double precision, double precision); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.release_claims(p_channels text[], p_customers text[], p_closed_bursts bigint[], p_due_ats timestamp with time zone[], p_mode text, p_window double precision, p_max double precision) RETURNS TABLE(channel text, customer text, wait_seconds double precision)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION release_claims(p_channels text[], p_customers text[], p_closed_bursts bigint[], p_due_ats timestamp with time zone[], p_mode text, p_window double precision, p_max double precision); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.release_claims(p_channels text[], p_customers text[], p_closed_bursts bigint[], p_due_ats timestamp with time zone[], p_mode text, p_window double precision, p_max double precision) IS 'Release the claims on the given conversations (their rows must be locked by the caller), closing each one''s open burst p_closed_bursts[i] when given (its messages answered when its status consumes); each buffer (messages above answered_position) is due by the window rule, or p_due_ats[i] when given. Returns the seconds until each is due, or NULL when nothing is buffered.';


--
-- Name: replay_burst(bigint, boolean); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.replay_burst(p_burst_id bigint, p_force boolean, OUT outcome text, OUT channel text, OUT customer text, OUT replayed_from text, OUT messages integer, OUT due_now boolean, OUT new_burst_id bigint) RETURNS record
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION replay_burst(p_burst_id bigint, p_force boolean, OUT outcome text, OUT channel text, OUT customer text, OUT replayed_from text, OUT messages integer, OUT due_now boolean, OUT new_burst_id bigint); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.replay_burst(p_burst_id bigint, p_force boolean, OUT outcome text, OUT channel text, OUT customer text, OUT replayed_from text, OUT messages integer, OUT due_now boolean, OUT new_burst_id bigint) IS 'replay_burst: `watibot replay`: a dead or attention burst becomes replayed and a new open burst over the same
messages is due now (a conversation that is claimed picks it up when its holder releases it).
Refused (outcome says why): unknown, not dead/attention, another burst open, or (without p_force) a reply WATI
may have delivered.';


--
-- Name: roll_up_burst_totals(interval, integer); Type: FUNCTION; Schema: watibot; Owner: -
--

CREATE FUNCTION watibot.roll_up_burst_totals(p_margin interval, p_max_bursts integer) RETURNS timestamp with time zone
    LANGUAGE plpgsql
    AS $$
    DECLARE
        v_mark timestamptz;
        v_through timestamptz := now() - p_margin;
        v_limit timestamptz;
    BEGIN
        -- SKIP LOCKED: another worker is rolling up, or a correction is in progress; try at the next scrape.
        SELECT rolled_through INTO v_mark FROM watibot.burst_totals_mark FOR UPDATE SKIP LOCKED;
        IF NOT FOUND OR v_mark >= now() - 2 * p_margin THEN
            RETURN v_mark;
        END IF;
        SELECT b.finished_at INTO v_limit FROM watibot.burst AS b
        WHERE b.finished_at >= v_mark AND b.finished_at < v_through
        ORDER BY b.finished_at OFFSET p_max_bursts LIMIT 1;
        IF v_limit IS NOT NULL AND v_limit > v_mark THEN
            v_through := v_limit;
        END IF;
        PERFORM watibot.add_to_burst_rollup(array_agg(t.series), array_agg(t.label), array_agg(t.count),
                                            array_agg(t.sum), 1)
        FROM watibot.burst_range_totals(v_mark, v_through) AS t;
        UPDATE watibot.burst_totals_mark SET rolled_through = v_through;
        RETURN v_through;
    END $$;


--
-- Name: FUNCTION roll_up_burst_totals(p_margin interval, p_max_bursts integer); Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON FUNCTION watibot.roll_up_burst_totals(p_margin interval, p_max_bursts integer) IS 'Fold the bursts finished between the mark and now() - p_margin (at most about p_max_bursts) into burst_totals_rollup and move the mark; does nothing while the mark is within 2 x p_margin of now(). Returns the mark (NULL when another transaction holds it).';


--
-- Name: alembic_version; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.alembic_version (
    version_num character varying(32) NOT NULL
);


--
-- Name: message; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.message (
    id bigint NOT NULL,
    channel text NOT NULL,
    customer text NOT NULL,
    provider_message_id text NOT NULL,
    wati_id text,
    type text NOT NULL,
    text text,
    wati_timestamp timestamp with time zone,
    received_at timestamp with time zone DEFAULT now() NOT NULL,
    payload jsonb NOT NULL,
    "position" bigint NOT NULL
)
WITH (autovacuum_vacuum_scale_factor='0.05', autovacuum_analyze_scale_factor='0.05', fillfactor='100');


--
-- Name: TABLE message; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.message IS 'Every customer message WATI delivered, stored once.';


--
-- Name: COLUMN message.provider_message_id; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.message.provider_message_id IS 'whatsappMessageId, or WATI''s id when that is missing.';


--
-- Name: COLUMN message.wati_id; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.message.wati_id IS 'WATI''s own record id.';


--
-- Name: COLUMN message.wati_timestamp; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.message.wati_timestamp IS 'WATI timestamp (when the customer sent it).';


--
-- Name: COLUMN message.received_at; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.message.received_at IS 'When watibot committed it (database clock).';


--
-- Name: COLUMN message.payload; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.message.payload IS 'The webhook body as received.';


--
-- Name: COLUMN message."position"; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.message."position" IS 'Order of the message in its conversation (see conversation.last_position). Written once, with the row.';


--
-- Name: buffering; Type: VIEW; Schema: watibot; Owner: -
--

CREATE VIEW watibot.buffering AS
 SELECT channel,
    customer,
    wa_id,
    ( SELECT count(*) AS count
           FROM watibot.message m
          WHERE ((m.channel = c.channel) AND (m.customer = c.customer) AND (m."position" > c.answered_position))) AS messages,
        CASE
            WHEN (attempts > 0) THEN 'retry'::text
            ELSE 'window'::text
        END AS waiting_for,
    buffer_started_at AS first_message_at,
    due_at,
    round(EXTRACT(epoch FROM (due_at - now())), 1) AS seconds_until_due,
    attempts,
    last_error
   FROM watibot.conversation c
  WHERE ((claimed_by IS NULL) AND (due_at > now()))
  ORDER BY due_at;


--
-- Name: VIEW buffering; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON VIEW watibot.buffering IS 'Conversations waiting for their buffer window to end (or for a retry), with seconds until due.';


--
-- Name: burst_id_seq; Type: SEQUENCE; Schema: watibot; Owner: -
--

ALTER TABLE watibot.burst ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME watibot.burst_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: burst_totals_mark; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.burst_totals_mark (
    singleton boolean DEFAULT true NOT NULL,
    rolled_through timestamp with time zone NOT NULL,
    CONSTRAINT burst_totals_mark_singleton_check CHECK (singleton)
);


--
-- Name: TABLE burst_totals_mark; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.burst_totals_mark IS 'One row: bursts finished before rolled_through are counted in burst_totals_rollup.';


--
-- Name: burst_totals_rollup; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.burst_totals_rollup (
    series text NOT NULL,
    label text NOT NULL,
    count bigint NOT NULL,
    sum double precision NOT NULL
);


--
-- Name: TABLE burst_totals_rollup; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.burst_totals_rollup IS 'Totals (as watibot.burst_fact_totals) of the existing bursts finished before burst_totals_mark.rolled_through: /metrics adds pruned_burst_totals and the bursts finished since.';


--
-- Name: dead; Type: VIEW; Schema: watibot; Owner: -
--

CREATE VIEW watibot.dead AS
 SELECT id AS burst_id,
    channel,
    customer,
    status,
    error AS reason,
    attempts,
    messages,
    "left"(prompt, 200) AS prompt,
    parts_sent,
    reply_parts,
    created_at,
    finished_at
   FROM watibot.burst b
  WHERE (status = ANY (ARRAY['dead'::text, 'attention'::text]))
  ORDER BY id;


--
-- Name: VIEW dead; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON VIEW watibot.dead IS 'Bursts that need a human: dead (gave up; reason says why) or attention (a send with unknown outcome). `watibot replay BURST_ID` answers their messages again.';


--
-- Name: finished_burst_facts; Type: VIEW; Schema: watibot; Owner: -
--

CREATE VIEW watibot.finished_burst_facts AS
 SELECT id AS burst_id,
    COALESCE(replayed_from, status) AS outcome,
    (replayed_from IS NOT NULL) AS replayed,
    (EXTRACT(epoch FROM (started_at - due_at)))::double precision AS claim_lag_seconds,
    watibot.histogram_bucket((EXTRACT(epoch FROM (started_at - due_at)))::double precision) AS claim_lag_le,
    (EXTRACT(epoch FROM (agent_finished_at - agent_started_at)))::double precision AS agent_seconds,
    watibot.histogram_bucket((EXTRACT(epoch FROM (agent_finished_at - agent_started_at)))::double precision) AS agent_le
   FROM watibot.burst b
  WHERE (finished_at IS NOT NULL);


--
-- Name: VIEW finished_burst_facts; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON VIEW watibot.finished_burst_facts IS 'One row per finished burst: outcome (as first decided, even if replayed since) and the histogram bucket of its claim lag (started_at - due_at) and agent time. Read by /metrics and folded in by prune.';


--
-- Name: health; Type: VIEW; Schema: watibot; Owner: -
--

CREATE VIEW watibot.health AS
 SELECT ( SELECT alembic_version.version_num
           FROM watibot.alembic_version) AS schema_revision,
    count(*) FILTER (WHERE ((claimed_by IS NULL) AND (due_at > now()))) AS buffering,
    count(*) FILTER (WHERE ((claimed_by IS NULL) AND (due_at <= now()))) AS overdue,
    COALESCE(round(EXTRACT(epoch FROM (now() - min(due_at) FILTER (WHERE ((claimed_by IS NULL) AND (due_at <= now()))))), 1), (0)::numeric) AS max_lag_seconds,
    count(*) FILTER (WHERE ((claimed_by IS NOT NULL) AND (lease_expires_at > now()))) AS in_flight,
    count(*) FILTER (WHERE ((claimed_by IS NOT NULL) AND (lease_expires_at <= now()))) AS leases_expired,
    count(DISTINCT claimed_by) AS busy_workers,
    (COALESCE(sum((last_position - answered_position)), (0)::numeric))::bigint AS buffered_messages,
    ( SELECT count(*) AS count
           FROM watibot.conversation
          WHERE (conversation.paused_until > now())) AS paused,
    ( SELECT count(*) AS count
           FROM watibot.burst
          WHERE (burst.status = 'dead'::text)) AS dead,
    ( SELECT count(*) AS count
           FROM watibot.burst
          WHERE (burst.status = 'attention'::text)) AS attention,
    ( SELECT count(*) AS count
           FROM watibot.burst
          WHERE (burst.finished_at > (now() - '01:00:00'::interval))) AS bursts_last_hour,
    ( SELECT max(burst.finished_at) AS max
           FROM watibot.burst
          WHERE (burst.finished_at IS NOT NULL)) AS last_burst_finished_at
   FROM watibot.conversation c
  WHERE (due_at IS NOT NULL);


--
-- Name: VIEW health; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON VIEW watibot.health IS 'One row: buffering and overdue conversations (with the worst lag), claims in flight and with expired leases, buffered messages, conversations paused for a human operator, dead and attention bursts, throughput of the last hour.';


--
-- Name: in_flight; Type: VIEW; Schema: watibot; Owner: -
--

CREATE VIEW watibot.in_flight AS
 SELECT c.channel,
    c.customer,
    c.claimed_by AS owner,
    c.claimed_at,
    round(EXTRACT(epoch FROM (now() - c.claimed_at)), 1) AS held_seconds,
    round(EXTRACT(epoch FROM (c.lease_expires_at - now())), 1) AS lease_left_seconds,
    (c.lease_expires_at <= now()) AS lease_expired,
    c.fence,
    b.id AS burst_id,
    b.status AS burst_status,
    COALESCE(b.attempts, c.attempts) AS attempts,
    b.parts_sent,
    b.reply_parts,
    b.sending_part
   FROM (watibot.conversation c
     LEFT JOIN watibot.burst b ON ((b.id = c.open_burst_id)))
  WHERE (c.claimed_by IS NOT NULL)
  ORDER BY c.claimed_at;


--
-- Name: VIEW in_flight; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON VIEW watibot.in_flight IS 'Claimed conversations: which worker holds them, lease left (negative: expired, another worker will take over), the open burst and its attempts.';


--
-- Name: instance_secret; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.instance_secret (
    name text NOT NULL,
    value text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Name: TABLE instance_secret; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.instance_secret IS 'Secrets watibot generated for itself, e.g. the webhook passkey when WATIBOT_WEBHOOK_PASSKEY is unset.';


--
-- Name: message_id_seq; Type: SEQUENCE; Schema: watibot; Owner: -
--

ALTER TABLE watibot.message ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME watibot.message_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: message_outcome; Type: VIEW; Schema: watibot; Owner: -
--

CREATE VIEW watibot.message_outcome AS
 SELECT m.id AS message_id,
    m.channel,
    m.customer,
    m."position",
    m.received_at,
    m.type,
    m.text,
    b.id AS burst_id,
    b.status
   FROM (watibot.message m
     LEFT JOIN LATERAL ( SELECT x.id,
            x.status
           FROM watibot.burst x
          WHERE ((x.channel = m.channel) AND (x.customer = m.customer) AND (m."position" > x.after_position) AND (m."position" <= x.through_position) AND watibot.consumes(x.status))
          ORDER BY x.id DESC
         LIMIT 1) b ON (true));


--
-- Name: VIEW message_outcome; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON VIEW watibot.message_outcome IS 'Every stored message with the burst that answered it (sent, no_reply, human, dead, attention, expired); burst_id NULL: still buffered (above the conversation''s answered_position, or in an open burst).';


--
-- Name: overdue; Type: VIEW; Schema: watibot; Owner: -
--

CREATE VIEW watibot.overdue AS
 SELECT channel,
    customer,
    wa_id,
    ( SELECT count(*) AS count
           FROM watibot.message m
          WHERE ((m.channel = c.channel) AND (m.customer = c.customer) AND (m."position" > c.answered_position))) AS messages,
    due_at,
    round(EXTRACT(epoch FROM (now() - due_at)), 1) AS lag_seconds,
    attempts,
    last_error
   FROM watibot.conversation c
  WHERE ((claimed_by IS NULL) AND (due_at <= now()))
  ORDER BY due_at;


--
-- Name: VIEW overdue; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON VIEW watibot.overdue IS 'Conversations that are due but not claimed, most overdue first. A lag of more than a few poll intervals means no sweeper is claiming (workers down, or all busy at WATIBOT_CONCURRENCY).';


--
-- Name: pruned_burst_totals; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.pruned_burst_totals (
    series text NOT NULL,
    label text NOT NULL,
    count bigint NOT NULL,
    sum double precision DEFAULT 0 NOT NULL
);


--
-- Name: TABLE pruned_burst_totals; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.pruned_burst_totals IS 'Totals of the bursts deleted by `watibot prune`, by series (outcome, claim_lag, agent_seconds) and label (outcome or histogram bucket), so that /metrics counters computed from the database never go backwards.';


--
-- Name: recent_bursts; Type: VIEW; Schema: watibot; Owner: -
--

CREATE VIEW watibot.recent_bursts AS
 SELECT id AS burst_id,
    channel,
    customer,
    status,
    attempts,
    messages,
    "left"(prompt, 80) AS prompt,
    "left"(reply, 80) AS reply,
    error,
    round(EXTRACT(epoch FROM (started_at - due_at)), 3) AS claim_lag_seconds,
    round(EXTRACT(epoch FROM (agent_finished_at - agent_started_at)), 3) AS agent_seconds,
    round(EXTRACT(epoch FROM (sent_at - agent_finished_at)), 3) AS send_seconds,
    round(EXTRACT(epoch FROM (finished_at - created_at)), 3) AS total_seconds,
    claimed_by AS worker,
    created_at,
    finished_at
   FROM watibot.burst b
  WHERE (created_at > (now() - '24:00:00'::interval))
  ORDER BY id DESC;


--
-- Name: VIEW recent_bursts; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON VIEW watibot.recent_bursts IS 'Bursts of the last 24 hours, newest first: prompt and reply (first 80 characters), outcome and timings (claim lag = start - due, agent, send, total).';


--
-- Name: schema_compatibility; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.schema_compatibility (
    revision text NOT NULL,
    "position" integer NOT NULL,
    oldest_code_revision text NOT NULL
);


--
-- Name: TABLE schema_compatibility; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.schema_compatibility IS 'One row per schema revision: the oldest code revision that still works on it (expand/contract upgrades).';


--
-- Name: COLUMN schema_compatibility.revision; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.schema_compatibility.revision IS 'An alembic revision of this schema.';


--
-- Name: COLUMN schema_compatibility."position"; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.schema_compatibility."position" IS 'Order of the revision in the migration history.';


--
-- Name: COLUMN schema_compatibility.oldest_code_revision; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.schema_compatibility.oldest_code_revision IS 'Code at this revision or later (up to revision) may run on a schema at revision.';


--
-- Name: wati_message; Type: TABLE; Schema: watibot; Owner: -
--

CREATE TABLE watibot.wati_message (
    wati_message_id text NOT NULL,
    burst_id bigint NOT NULL,
    part integer NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT wati_message_part_check CHECK ((part >= 0))
);


--
-- Name: TABLE wati_message; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON TABLE watibot.wati_message IS 'An id WATI returned for a part we sent (V3 API): its reports and echoes carry it instead of our localMessageId. Deleted with its burst (watibot prune).';


--
-- Name: COLUMN wati_message.wati_message_id; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.wati_message.wati_message_id IS 'WATI''s message id or local_message_id, as its send answer gave it.';


--
-- Name: COLUMN wati_message.burst_id; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.wati_message.burst_id IS 'The burst whose reply the message carried.';


--
-- Name: COLUMN wati_message.part; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.wati_message.part IS 'Which part of the reply (0 = the first).';


--
-- Name: COLUMN wati_message.recorded_at; Type: COMMENT; Schema: watibot; Owner: -
--

COMMENT ON COLUMN watibot.wati_message.recorded_at IS 'When WATI''s answer was recorded (database clock).';


--
-- Name: alembic_version alembic_version_pkc; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.alembic_version
    ADD CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num);


--
-- Name: burst burst_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.burst
    ADD CONSTRAINT burst_pkey PRIMARY KEY (id);


--
-- Name: burst_totals_mark burst_totals_mark_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.burst_totals_mark
    ADD CONSTRAINT burst_totals_mark_pkey PRIMARY KEY (singleton);


--
-- Name: burst_totals_rollup burst_totals_rollup_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.burst_totals_rollup
    ADD CONSTRAINT burst_totals_rollup_pkey PRIMARY KEY (series, label);


--
-- Name: conversation conversation_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.conversation
    ADD CONSTRAINT conversation_pkey PRIMARY KEY (channel, customer);


--
-- Name: instance_secret instance_secret_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.instance_secret
    ADD CONSTRAINT instance_secret_pkey PRIMARY KEY (name);


--
-- Name: message message_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.message
    ADD CONSTRAINT message_pkey PRIMARY KEY (id);


--
-- Name: message message_provider_message_id_key; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.message
    ADD CONSTRAINT message_provider_message_id_key UNIQUE (provider_message_id);


--
-- Name: pruned_burst_totals pruned_burst_totals_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.pruned_burst_totals
    ADD CONSTRAINT pruned_burst_totals_pkey PRIMARY KEY (series, label);


--
-- Name: schema_compatibility schema_compatibility_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.schema_compatibility
    ADD CONSTRAINT schema_compatibility_pkey PRIMARY KEY (revision);


--
-- Name: schema_compatibility schema_compatibility_position_key; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.schema_compatibility
    ADD CONSTRAINT schema_compatibility_position_key UNIQUE ("position");


--
-- Name: wati_message wati_message_pkey; Type: CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.wati_message
    ADD CONSTRAINT wati_message_pkey PRIMARY KEY (wati_message_id);


--
-- Name: burst_conversation_idx; Type: INDEX; Schema: watibot; Owner: -
--

CREATE INDEX burst_conversation_idx ON watibot.burst USING btree (channel, customer, id);


--
-- Name: burst_finished_idx; Type: INDEX; Schema: watibot; Owner: -
--

CREATE INDEX burst_finished_idx ON watibot.burst USING btree (finished_at) WHERE (finished_at IS NOT NULL);


--
-- Name: burst_problem_idx; Type: INDEX; Schema: watibot; Owner: -
--

CREATE INDEX burst_problem_idx ON watibot.burst USING btree (id) WHERE (status = ANY (ARRAY['dead'::text, 'attention'::text]));


--
-- Name: conversation_due_idx; Type: INDEX; Schema: watibot; Owner: -
--

CREATE INDEX conversation_due_idx ON watibot.conversation USING btree (due_at) WHERE (due_at IS NOT NULL);


--
-- Name: message_position_idx; Type: INDEX; Schema: watibot; Owner: -
--

CREATE UNIQUE INDEX message_position_idx ON watibot.message USING btree (channel, customer, "position");


--
-- Name: wati_message_burst_idx; Type: INDEX; Schema: watibot; Owner: -
--

CREATE INDEX wati_message_burst_idx ON watibot.wati_message USING btree (burst_id);


--
-- Name: burst burst_rollup_delete; Type: TRIGGER; Schema: watibot; Owner: -
--

CREATE TRIGGER burst_rollup_delete AFTER DELETE ON watibot.burst REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION watibot.burst_rollup_forget();


--
-- Name: burst burst_rollup_insert; Type: TRIGGER; Schema: watibot; Owner: -
--

CREATE TRIGGER burst_rollup_insert AFTER INSERT ON watibot.burst FOR EACH ROW WHEN ((new.finished_at IS NOT NULL)) EXECUTE FUNCTION watibot.burst_rollup_correct();


--
-- Name: burst burst_rollup_update; Type: TRIGGER; Schema: watibot; Owner: -
--

CREATE TRIGGER burst_rollup_update AFTER UPDATE OF status, replayed_from, finished_at, started_at, due_at, agent_started_at, agent_finished_at ON watibot.burst FOR EACH ROW WHEN (((old.finished_at IS NOT NULL) AND (((((((old.status IS DISTINCT FROM new.status) OR (old.replayed_from IS DISTINCT FROM new.replayed_from)) OR (old.finished_at IS DISTINCT FROM new.finished_at)) OR (old.started_at IS DISTINCT FROM new.started_at)) OR (old.due_at IS DISTINCT FROM new.due_at)) OR (old.agent_started_at IS DISTINCT FROM new.agent_started_at)) OR (old.agent_finished_at IS DISTINCT FROM new.agent_finished_at)))) EXECUTE FUNCTION watibot.burst_rollup_correct();


--
-- Name: burst burst_channel_customer_fkey; Type: FK CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.burst
    ADD CONSTRAINT burst_channel_customer_fkey FOREIGN KEY (channel, customer) REFERENCES watibot.conversation(channel, customer);


--
-- Name: message message_channel_customer_fkey; Type: FK CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.message
    ADD CONSTRAINT message_channel_customer_fkey FOREIGN KEY (channel, customer) REFERENCES watibot.conversation(channel, customer);


--
-- Name: schema_compatibility schema_compatibility_oldest_code_revision_fkey; Type: FK CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.schema_compatibility
    ADD CONSTRAINT schema_compatibility_oldest_code_revision_fkey FOREIGN KEY (oldest_code_revision) REFERENCES watibot.schema_compatibility(revision) DEFERRABLE INITIALLY DEFERRED;


--
-- Name: wati_message wati_message_burst_id_fkey; Type: FK CONSTRAINT; Schema: watibot; Owner: -
--

ALTER TABLE ONLY watibot.wati_message
    ADD CONSTRAINT wati_message_burst_id_fkey FOREIGN KEY (burst_id) REFERENCES watibot.burst(id) ON DELETE CASCADE;


--
-- PostgreSQL database dump complete
--
