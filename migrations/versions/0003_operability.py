"""Operability: psql views over the buffer and the workers, metric facts, pruning support, table tuning.

Revision ID: 0003_operability
Revises: 0002_conversations
Create Date: 2026-11-30
"""

from alembic import op

revision = "0003_operability"
down_revision = "0002_conversations"
branch_labels = None
depends_on = None

# The psql views, as this revision made them (migration 0007 restores them on its downgrade).
VIEWS = """
    CREATE VIEW watibot.buffering AS
    SELECT c.channel, c.customer, c.wa_id,
           count(m.id) AS messages,
           CASE WHEN c.attempts > 0 THEN 'retry' ELSE 'window' END AS waiting_for,
           c.buffer_started_at AS first_message_at,
           c.due_at,
           round(EXTRACT(EPOCH FROM c.due_at - now())::numeric, 1) AS seconds_until_due,
           c.attempts, c.last_error
    FROM watibot.conversation AS c
    LEFT JOIN watibot.message AS m
        ON m.channel = c.channel AND m.customer = c.customer AND m.burst_id IS NULL
    WHERE c.claimed_by IS NULL AND c.due_at > now()
    GROUP BY c.channel, c.customer
    ORDER BY c.due_at;
    COMMENT ON VIEW watibot.buffering IS
        'Conversations waiting for their buffer window to end (or for a retry), with seconds until due.';

    CREATE VIEW watibot.overdue AS
    SELECT c.channel, c.customer, c.wa_id,
           count(m.id) AS messages,
           c.due_at,
           round(EXTRACT(EPOCH FROM now() - c.due_at)::numeric, 1) AS lag_seconds,
           c.attempts, c.last_error
    FROM watibot.conversation AS c
    LEFT JOIN watibot.message AS m
        ON m.channel = c.channel AND m.customer = c.customer AND m.burst_id IS NULL
    WHERE c.claimed_by IS NULL AND c.due_at <= now()
    GROUP BY c.channel, c.customer
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
    LEFT JOIN watibot.burst AS b
        ON b.channel = c.channel AND b.customer = c.customer AND b.status IN ('processing', 'sending', 'retry')
    WHERE c.claimed_by IS NOT NULL
    ORDER BY c.claimed_at;
    COMMENT ON VIEW watibot.in_flight IS
        'Claimed conversations: which worker holds them, lease left (negative: expired, another worker will '
        'take over), the open burst and its attempts.';

    CREATE VIEW watibot.dead AS
    SELECT b.id AS burst_id, b.channel, b.customer, b.status,
           b.error AS reason,
           b.attempts,
           cardinality(b.message_ids) AS messages,
           left(b.prompt, 200) AS prompt,
           b.parts_sent, b.reply_parts,
           b.created_at, b.finished_at
    FROM watibot.burst AS b
    WHERE b.status IN ('dead', 'attention')
    ORDER BY b.id;
    COMMENT ON VIEW watibot.dead IS
        'Bursts that need a human: dead (gave up; reason says why) or attention (a send with unknown outcome). '
        '`watibot replay BURST_ID` puts the messages back in the buffer.';

    CREATE VIEW watibot.recent_bursts AS
    SELECT b.id AS burst_id, b.channel, b.customer, b.status, b.attempts,
           cardinality(b.message_ids) AS messages,
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
           (SELECT count(*) FROM watibot.message WHERE burst_id IS NULL) AS buffered_messages,
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
"""


def upgrade() -> None:
    op.execute("""
    -- Bursts change status a few times and record reply progress in between: leave room for HOT updates.
    ALTER TABLE watibot.burst SET (
        fillfactor = 80,
        autovacuum_vacuum_scale_factor = 0.05,
        autovacuum_analyze_scale_factor = 0.05
    );

    ALTER TABLE watibot.burst ADD COLUMN replayed_from text;
    COMMENT ON COLUMN watibot.burst.replayed_from IS
        'Status (dead or attention) the burst had when `watibot replay` put its messages back in the buffer.';

    -- Pruning walks finished bursts oldest first; the health view reads the latest finish.
    CREATE INDEX burst_finished_idx ON watibot.burst (finished_at) WHERE finished_at IS NOT NULL;

    CREATE TABLE watibot.pruned_burst_totals (
        series text             NOT NULL,
        label  text             NOT NULL,
        count  bigint           NOT NULL,
        sum    double precision NOT NULL DEFAULT 0,
        PRIMARY KEY (series, label)
    );
    COMMENT ON TABLE watibot.pruned_burst_totals IS
        'Totals of the bursts deleted by `watibot prune`, by series (outcome, claim_lag, agent_seconds) and label '
        '(outcome or histogram bucket), so that /metrics counters computed from the database never go backwards.';

    -- Histogram buckets (upper bounds in seconds) for claim lag and agent time. They live in the schema because
    -- bursts removed by `watibot prune` are folded into pruned_burst_totals by bucket: changing them is a
    -- migration. width_bucket counts thresholds <= x (lower-inclusive) while Prometheus buckets are x <= le, so
    -- both sides are negated: 14 - width_bucket(-x, negated bounds reversed) is the 1-based index of the first
    -- bound >= x (14 = +Inf).
    CREATE FUNCTION watibot.histogram_bucket(seconds float8) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (ARRAY['0.05', '0.1', '0.25', '0.5', '1', '2.5', '5', '10', '30', '60', '120', '300', '600', '+Inf'])[
        14 - width_bucket(-seconds, ARRAY[-600, -300, -120, -60, -30, -10, -5, -2.5, -1, -0.5, -0.25, -0.1,
                                          -0.05]::float8[])]
    $$;
    COMMENT ON FUNCTION watibot.histogram_bucket(float8) IS
        'The Prometheus histogram bucket (le label) that a duration in seconds falls in.';

    CREATE VIEW watibot.finished_burst_facts AS
    SELECT b.id AS burst_id,
           COALESCE(b.replayed_from, b.status) AS outcome,
           b.replayed_from IS NOT NULL AS replayed,
           EXTRACT(EPOCH FROM b.started_at - b.due_at)::float8 AS claim_lag_seconds,
           watibot.histogram_bucket(EXTRACT(EPOCH FROM b.started_at - b.due_at)::float8) AS claim_lag_le,
           EXTRACT(EPOCH FROM b.agent_finished_at - b.agent_started_at)::float8 AS agent_seconds,
           watibot.histogram_bucket(EXTRACT(EPOCH FROM b.agent_finished_at - b.agent_started_at)::float8) AS agent_le
    FROM watibot.burst AS b
    WHERE b.finished_at IS NOT NULL;
    COMMENT ON VIEW watibot.finished_burst_facts IS
        'One row per finished burst: outcome (as first decided, even if replayed since) and the histogram bucket '
        'of its claim lag (started_at - due_at) and agent time. Read by /metrics and folded in by prune.';

    """)
    op.execute(VIEWS)


def downgrade() -> None:
    op.execute("""
    DROP VIEW watibot.health;
    DROP VIEW watibot.recent_bursts;
    DROP VIEW watibot.dead;
    DROP VIEW watibot.in_flight;
    DROP VIEW watibot.overdue;
    DROP VIEW watibot.buffering;
    DROP VIEW watibot.finished_burst_facts;
    DROP FUNCTION watibot.histogram_bucket(float8);
    DROP TABLE watibot.pruned_burst_totals;
    DROP INDEX watibot.burst_finished_idx;
    ALTER TABLE watibot.burst DROP COLUMN replayed_from;
    ALTER TABLE watibot.burst RESET (fillfactor, autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor);
    """)
