"""shards count their stored results (succeeded, failed, tokens; filled in from request_results),
their workers' deaths, the request running alone when one died (suspect), and the tokens their
requests may generate (requested_tokens; 0 for shards made before); batches count failed finalizations

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 02:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

COUNTERS = {
    "succeeded": ("count(*)", "outcome = 'succeeded'", sa.Integer()),
    "failed": ("count(*)", "outcome = 'failed'", sa.Integer()),
    "prompt_tokens": ("coalesce(sum(prompt_tokens), 0)", "1 = 1", sa.BigInteger()),
    "completion_tokens": ("coalesce(sum(completion_tokens), 0)", "1 = 1", sa.BigInteger()),
}


def upgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        for name, (_, _, type_) in COUNTERS.items():
            batch.add_column(sa.Column(name, type_, nullable=False, server_default="0"))
        batch.add_column(sa.Column("deaths", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("requested_tokens", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("suspect", sa.String(length=512), nullable=True))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("finalize_failures", sa.Integer(), nullable=False, server_default="0"))
    for name, (aggregate, where, _) in COUNTERS.items():  # existing batches keep their progress
        op.execute(f"UPDATE shards SET {name} = (SELECT {aggregate} FROM request_results "
                   f"WHERE request_results.shard_id = shards.id AND {where})")


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("finalize_failures")
    with op.batch_alter_table("shards") as batch:
        for name in (*COUNTERS, "deaths", "suspect", "requested_tokens"):
            batch.drop_column(name)
