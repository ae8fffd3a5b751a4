"""Outside the 24-hour window (issue 12, part 5): an approved template instead of closing the burst `expired`.

With `WATIBOT_WINDOW_TEMPLATE` set, the pipeline asks `watibot.mark_template` before the first part instead of
`mark_sending`. It marks the burst's send in flight (`sending`, part 0) with the template's name in the new
`burst.template` column only when the customer's latest message is outside the session window (or an earlier
attempt of the burst already went the template way); otherwise it writes nothing and answers `reply`, and the
ordinary `mark_sending` decides as before (send, paused, expired, lost, late). So a free-form reply still never
goes out of the window: only `mark_sending` lets one go, and only inside it. `mark_sendings` is unchanged.

An expand migration: a nullable column and a new function; code at 0010_hardening neither reads nor calls them.

Revision ID: 0011_window_template
Revises: 0010_hardening
Create Date: 2026-12-06
"""

from alembic import op

revision = "0011_window_template"
down_revision = "0010_hardening"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE watibot.burst ADD COLUMN template text;
    COMMENT ON COLUMN watibot.burst.template IS
        'The approved template (WATIBOT_WINDOW_TEMPLATE) sent instead of the reply because the customer''s latest '
        'message was outside the session window; NULL: the reply itself (or nothing) was sent.';

    CREATE FUNCTION watibot.mark_template(
        p_channel text, p_customer text, p_fence bigint, p_owner text, p_burst_id bigint,
        p_not_after timestamptz, p_lease float8, p_cover float8, p_session_window float8, p_template text,
        p_prompt text, p_reply text, p_reply_parts integer, p_agent_started_at timestamptz,
        OUT outcome text)
    LANGUAGE plpgsql AS $$
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
    COMMENT ON FUNCTION watibot.mark_template IS
        'mark_template: before the first part of a burst, with WATIBOT_WINDOW_TEMPLATE set. Outcomes:
  send   the customer''s latest message is outside the session window (or an earlier attempt sent the template
         way): the reply is recorded (the first time), the burst marked sending part 0 with template p_template,
         the lease made to cover the send; send the template, not the reply
  reply  inside the window, paused, or a part already sent: nothing written; mark_sending decides as usual
  late   the caller''s deadline (p_not_after) passed before this ran: nothing written
  lost   the fence no longer matches or the burst is not the open one: nothing written';

    INSERT INTO watibot.schema_compatibility (revision, position, oldest_code_revision)
        VALUES ('0011_window_template', 11, '0010_hardening');
    """)


def downgrade() -> None:
    op.execute("""
    DELETE FROM watibot.schema_compatibility WHERE revision = '0011_window_template';
    DROP FUNCTION watibot.mark_template(text, text, bigint, text, bigint, timestamptz, float8, float8, float8, text,
                                        text, text, integer, timestamptz);
    ALTER TABLE watibot.burst DROP COLUMN template;
    """)
