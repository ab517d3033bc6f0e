"""Job state in SQL: typed SQLAlchemy 2.0 tables, Alembic migrations, keyword-only query functions.

db/ knows nothing of HTTP, Celery or torch. SQL is the truth about every batch, shard and request;
Redis only wakes workers up.
"""
