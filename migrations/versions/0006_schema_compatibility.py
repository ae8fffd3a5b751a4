"""Schema compatibility: which code revisions each schema revision still serves (expand/contract upgrades).

During a rolling upgrade old and new code run on one database. Code at revision N cannot know what a later
migration changed, so the database says it: `watibot.schema_compatibility` has one row per revision with the
oldest code revision that still works on a schema at that revision. Code at N is compatible with the schema at
R when N lies between R's `oldest_code_revision` and R itself (by `position`); `/readyz`, the sweeper and the
operator commands follow that rule.

The rule for every migration from this one on (tests/test_migrations.py checks the rows exist):
- an *expand* migration (adds tables, nullable or defaulted columns, new functions; changes nothing the
  previous code reads or calls) inserts its row with the previous revision as `oldest_code_revision`;
- a *contract* migration (drops or renames what older code uses, changes a function's signature) inserts its
  own revision: older workers turn not-ready and stop claiming when it runs;
- its downgrade deletes its row.

This revision only adds the table, so it serves code at 0005_batched_steps too (that code demands its exact
revision, so it still turns not-ready: the last upgrade that does).

Revision ID: 0006_schema_compatibility
Revises: 0005_batched_steps
Create Date: 2026-12-01
"""

from alembic import op

revision = "0006_schema_compatibility"
down_revision = "0005_batched_steps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE watibot.schema_compatibility (
        revision text PRIMARY KEY,
        position integer NOT NULL UNIQUE,
        oldest_code_revision text NOT NULL REFERENCES watibot.schema_compatibility (revision)
            DEFERRABLE INITIALLY DEFERRED
    );
    COMMENT ON TABLE watibot.schema_compatibility IS
        'One row per schema revision: the oldest code revision that still works on it (expand/contract upgrades).';
    COMMENT ON COLUMN watibot.schema_compatibility.revision IS 'An alembic revision of this schema.';
    COMMENT ON COLUMN watibot.schema_compatibility.position IS 'Order of the revision in the migration history.';
    COMMENT ON COLUMN watibot.schema_compatibility.oldest_code_revision IS
        'Code at this revision or later (up to revision) may run on a schema at revision.';
    INSERT INTO watibot.schema_compatibility (revision, position, oldest_code_revision) VALUES
        ('0001_core', 1, '0001_core'),
        ('0002_conversations', 2, '0002_conversations'),
        ('0003_operability', 3, '0003_operability'),
        ('0004_burst_functions', 4, '0004_burst_functions'),
        ('0005_batched_steps', 5, '0005_batched_steps'),
        ('0006_schema_compatibility', 6, '0005_batched_steps');
    """)


def downgrade() -> None:
    op.execute("DROP TABLE watibot.schema_compatibility")
