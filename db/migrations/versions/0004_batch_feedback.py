"""batch_feedback: ratings of a batch's lines (good/bad or 1-5, kept as given and as a 1-5 score), with an
optional corrected answer and comment; one row per (batch, custom_id), a later rating replaces it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 06:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# The same mapping as db/feedback.py's RATING_SCORE_SQL, written out: a migration never imports app code.
RATING_SCORE = ("score BETWEEN 1 AND 5 AND score = CASE rating WHEN 'good' THEN 5 WHEN 'bad' THEN 1 "
                "WHEN '1' THEN 1 WHEN '2' THEN 2 WHEN '3' THEN 3 WHEN '4' THEN 4 WHEN '5' THEN 5 ELSE 0 END")


def upgrade() -> None:
    op.create_table(
        "batch_feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("custom_id", sa.String(length=512), nullable=False),
        sa.Column("rating", sa.String(length=4), nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("corrected", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(RATING_SCORE, name="ck_batch_feedback_rating_score"),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_batch_feedback_batch_id_batches",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_batch_feedback_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_feedback_batch_custom_id"),
    )


def downgrade() -> None:
    op.drop_table("batch_feedback")
