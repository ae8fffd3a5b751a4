"""Hardening (issue 13): /metrics costs the database the same whatever the history size.

The burst counters and histograms of /metrics were recomputed from every finished burst at each scrape (0.4-0.55 s
of database work at 300k bursts). Now they are a rollup plus a short tail:

- `watibot.burst_totals_rollup` holds the totals (the series and labels of `watibot.burst_fact_totals`) of the
  bursts that still exist and finished before `watibot.burst_totals_mark.rolled_through`;
- `watibot.roll_up_burst_totals` moves the mark forward, folding the bursts it passes (at most p_max_bursts per
  call). /metrics calls it, so it runs at most every few seconds per worker and does work only when the mark is
  more than twice p_margin old; the mark stays p_margin behind now() so that a burst whose finishing transaction
  (finished_at = now(), its start) commits late is still ahead of it;
- a scrape reads rollup + pruned_burst_totals + the bursts finished at or after the mark, in one snapshot.

Finished bursts rarely change (a replay sets replayed_from and status, a delivery report may turn a sent burst to
attention or dead). Triggers keep the rollup exact for rows behind the mark: a row trigger on an update of a
finished burst's facts or an insert of a finished burst, and a statement trigger on delete (prune: the rollup
forgets the bursts it deletes, which prune itself folds into pruned_burst_totals as before). They take the mark row
FOR SHARE, roll_up_burst_totals takes it FOR UPDATE: a correction and a roll-up never interleave. Finishing a
burst (finished_at NULL -> set) fires nothing: the hot path is unchanged.

An expand migration: code at 0009_wati_accounts still computes its totals from every burst and keeps working.

Revision ID: 0010_hardening
Revises: 0009_wati_accounts
Create Date: 2026-12-06
"""

from alembic import op

revision = "0010_hardening"
down_revision = "0009_wati_accounts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE watibot.burst_totals_rollup (
        series text NOT NULL,
        label text NOT NULL,
        count bigint NOT NULL,
        sum float8 NOT NULL,
        PRIMARY KEY (series, label)
    );
    COMMENT ON TABLE watibot.burst_totals_rollup IS
        'Totals (as watibot.burst_fact_totals) of the existing bursts finished before '
        'burst_totals_mark.rolled_through: /metrics adds pruned_burst_totals and the bursts finished since.';

    CREATE TABLE watibot.burst_totals_mark (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        rolled_through timestamptz NOT NULL
    );
    COMMENT ON TABLE watibot.burst_totals_mark IS
        'One row: bursts finished before rolled_through are counted in burst_totals_rollup.';
    INSERT INTO watibot.burst_totals_mark (rolled_through) VALUES ('-infinity');

    -- The same series as watibot.burst_fact_totals (and finished_burst_facts), over a range of finish times (by
    -- burst_finished_idx: the roll-up and the scrape's tail) and over rows given by value (a trigger's OLD row, or
    -- the rows a DELETE removed, are no longer in the table). tests/test_metrics.py checks that they agree.
    CREATE FUNCTION watibot.burst_range_totals(p_from timestamptz, p_to timestamptz)
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
    COMMENT ON FUNCTION watibot.burst_range_totals IS
        'watibot.burst_fact_totals over the bursts finished in [p_from, p_to) (the rollup and /metrics).';

    CREATE FUNCTION watibot.burst_row_totals(p_bursts watibot.burst[])
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
    COMMENT ON FUNCTION watibot.burst_row_totals IS
        'watibot.burst_fact_totals over burst rows given by value (for the rollup triggers).';

    CREATE FUNCTION watibot.add_to_burst_rollup(p_series text[], p_labels text[], p_counts bigint[],
                                                p_sums float8[], p_sign integer)
    RETURNS void LANGUAGE sql AS $$
        INSERT INTO watibot.burst_totals_rollup AS r (series, label, count, sum)
        SELECT t.series, t.label, p_sign * t.count, p_sign * t.sum
        FROM unnest(p_series, p_labels, p_counts, p_sums) AS t (series, label, count, sum)
        ORDER BY t.series, t.label
        ON CONFLICT (series, label) DO UPDATE SET count = r.count + EXCLUDED.count, sum = r.sum + EXCLUDED.sum
    $$;

    CREATE FUNCTION watibot.roll_up_burst_totals(p_margin interval, p_max_bursts integer)
    RETURNS timestamptz LANGUAGE plpgsql AS $$
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
    COMMENT ON FUNCTION watibot.roll_up_burst_totals IS
        'Fold the bursts finished between the mark and now() - p_margin (at most about p_max_bursts) into '
        'burst_totals_rollup and move the mark; does nothing while the mark is within 2 x p_margin of now(). '
        'Returns the mark (NULL when another transaction holds it).';

    CREATE FUNCTION watibot.burst_rollup_correct() RETURNS trigger LANGUAGE plpgsql AS $$
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
    COMMENT ON FUNCTION watibot.burst_rollup_correct IS
        'Trigger: a finished burst behind the rollup mark changed (replay, delivery report) or was inserted '
        'finished: move its totals in burst_totals_rollup.';

    CREATE FUNCTION watibot.burst_rollup_forget() RETURNS trigger LANGUAGE plpgsql AS $$
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
    COMMENT ON FUNCTION watibot.burst_rollup_forget IS
        'Trigger: bursts behind the rollup mark were deleted (prune folds them into pruned_burst_totals): take '
        'their totals out of burst_totals_rollup.';

    CREATE TRIGGER burst_rollup_update
        AFTER UPDATE OF status, replayed_from, finished_at, started_at, due_at, agent_started_at, agent_finished_at
        ON watibot.burst FOR EACH ROW
        WHEN (OLD.finished_at IS NOT NULL AND (OLD.status, OLD.replayed_from, OLD.finished_at, OLD.started_at,
              OLD.due_at, OLD.agent_started_at, OLD.agent_finished_at) IS DISTINCT FROM
              (NEW.status, NEW.replayed_from, NEW.finished_at, NEW.started_at, NEW.due_at, NEW.agent_started_at,
               NEW.agent_finished_at))
        EXECUTE FUNCTION watibot.burst_rollup_correct();
    CREATE TRIGGER burst_rollup_insert
        AFTER INSERT ON watibot.burst FOR EACH ROW WHEN (NEW.finished_at IS NOT NULL)
        EXECUTE FUNCTION watibot.burst_rollup_correct();
    CREATE TRIGGER burst_rollup_delete
        AFTER DELETE ON watibot.burst REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
        EXECUTE FUNCTION watibot.burst_rollup_forget();

    INSERT INTO watibot.schema_compatibility (revision, position, oldest_code_revision)
    VALUES ('0010_hardening', 10, '0009_wati_accounts');
    """)


def downgrade() -> None:
    op.execute("""
    DELETE FROM watibot.schema_compatibility WHERE revision = '0010_hardening';
    DROP TRIGGER burst_rollup_delete ON watibot.burst;
    DROP TRIGGER burst_rollup_insert ON watibot.burst;
    DROP TRIGGER burst_rollup_update ON watibot.burst;
    DROP FUNCTION watibot.burst_rollup_forget();
    DROP FUNCTION watibot.burst_rollup_correct();
    DROP FUNCTION watibot.roll_up_burst_totals(interval, integer);
    DROP FUNCTION watibot.add_to_burst_rollup(text[], text[], bigint[], float8[], integer);
    DROP FUNCTION watibot.burst_row_totals(watibot.burst[]);
    DROP FUNCTION watibot.burst_range_totals(timestamptz, timestamptz);
    DROP TABLE watibot.burst_totals_mark;
    DROP TABLE watibot.burst_totals_rollup;
    """)
