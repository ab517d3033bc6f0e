"""one job machinery for several kinds: a jobs parent (id, tenant, kind) that batches specialise (one
jobs row per existing batch), shards reference jobs (batch_id renamed job_id), and the fine-tune kind's
tables (fine_tuning_jobs, fine_tuning_events, fine_tuned_models)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 05:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# 0001 left the foreign keys unnamed: PostgreSQL named them <table>_<column>_fkey; on SQLite, batch mode
# reflects them and names them by this convention so that they can be dropped.
SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def _fk_name(table: str, column: str, referred: str) -> str:
    if op.get_bind().dialect.name == "sqlite":
        return f"fk_{table}_{column}_{referred}"
    return f"{table}_{column}_fkey"


def _status(*values: str, name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=32)


def upgrade() -> None:
    op.create_table(
        'jobs',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('kind', _status('batch', 'fine_tune', name='jobkind'), nullable=False),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_jobs_tenant_kind_created', 'jobs', ['tenant_id', 'kind', 'created_at'])
    op.execute("INSERT INTO jobs (id, tenant_id, kind, created_at) SELECT id, tenant_id, 'batch', created_at "
               "FROM batches")
    with op.batch_alter_table('batches', naming_convention=SQLITE_NAMES) as batch:
        batch.create_foreign_key('fk_batches_id_jobs', 'jobs', ['id'], ['id'], ondelete='CASCADE')
    with op.batch_alter_table('shards', naming_convention=SQLITE_NAMES) as batch:
        batch.drop_constraint(_fk_name('shards', 'batch_id', 'batches'), type_='foreignkey')
        batch.drop_constraint('uq_shards_batch_index', type_='unique')
        batch.drop_index('ix_shards_batch_id')
        batch.alter_column('batch_id', new_column_name='job_id', existing_type=sa.String(length=64),
                           existing_nullable=False)
    with op.batch_alter_table('shards', naming_convention=SQLITE_NAMES) as batch:
        batch.create_foreign_key('fk_shards_job_id_jobs', 'jobs', ['job_id'], ['id'], ondelete='CASCADE')
        batch.create_unique_constraint('uq_shards_job_index', ['job_id', 'index'])
        batch.create_index('ix_shards_job_id', ['job_id'])

    op.create_table(
        'fine_tuning_jobs',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('model', sa.String(length=256), nullable=False),
        sa.Column('training_file', sa.String(length=64), nullable=False),
        sa.Column('validation_file', sa.String(length=64), nullable=True),
        sa.Column('method', sa.JSON(), nullable=False),
        sa.Column('hyperparameters', sa.JSON(), nullable=False),
        sa.Column('suffix', sa.String(length=64), nullable=True),
        sa.Column('seed', sa.BigInteger(), nullable=False),
        sa.Column('metadata', sa.JSON(), nullable=True),
        sa.Column('status', _status('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled',
                                    name='finetunestatus'), nullable=False),
        sa.Column('fine_tuned_model', sa.String(length=256), nullable=True),
        sa.Column('trained_tokens', sa.BigInteger(), nullable=True),
        sa.Column('result_files', sa.JSON(), nullable=False),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('step', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('resume_key', sa.String(length=1024), nullable=True),
        sa.Column('total_steps', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.Column('started_at', sa.BigInteger(), nullable=True),
        sa.Column('finished_at', sa.BigInteger(), nullable=True),
        sa.Column('estimated_finish', sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(['id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_fine_tuning_jobs_tenant_created', 'fine_tuning_jobs', ['tenant_id', 'created_at'])
    op.create_table(
        'fine_tuning_events',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.Column('level', sa.String(length=16), nullable=False),
        sa.Column('type', sa.String(length=16), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_fine_tuning_events_job_id', 'fine_tuning_events', ['job_id'])
    op.create_table(
        'fine_tuned_models',
        sa.Column('id', sa.String(length=256), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('job_id', sa.String(length=64), nullable=False),
        sa.Column('base_model', sa.String(length=256), nullable=False),
        sa.Column('adapter_key', sa.String(length=1024), nullable=False),
        sa.Column('checkpoint_step', sa.Integer(), nullable=True),
        sa.Column('metrics', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_fine_tuned_models_tenant_id', 'fine_tuned_models', ['tenant_id'])
    op.create_index('ix_fine_tuned_models_job_id', 'fine_tuned_models', ['job_id'])


def downgrade() -> None:
    op.drop_table('fine_tuned_models')
    op.drop_table('fine_tuning_events')
    op.drop_table('fine_tuning_jobs')
    with op.batch_alter_table('shards') as batch:
        batch.drop_constraint('fk_shards_job_id_jobs', type_='foreignkey')
        batch.drop_constraint('uq_shards_job_index', type_='unique')
        batch.drop_index('ix_shards_job_id')
        batch.alter_column('job_id', new_column_name='batch_id', existing_type=sa.String(length=64),
                           existing_nullable=False)
    with op.batch_alter_table('shards') as batch:
        batch.create_foreign_key('shards_batch_id_fkey', 'batches', ['batch_id'], ['id'], ondelete='CASCADE')
        batch.create_unique_constraint('uq_shards_batch_index', ['batch_id', 'index'])
        batch.create_index('ix_shards_batch_id', ['batch_id'])
    with op.batch_alter_table('batches') as batch:
        batch.drop_constraint('fk_batches_id_jobs', type_='foreignkey')
    op.drop_table('jobs')
