"""fine_tuned_models.image_spec: an image model's card (architecture, image_size, channels, class_names),
so the API checks an image line's size and prompt without reading storage; NULL for language models

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 18:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuned_models") as batch:
        batch.add_column(sa.Column("image_spec", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuned_models") as batch:
        batch.drop_column("image_spec")
