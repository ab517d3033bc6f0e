"""Alembic environment: the URL comes from the caller (db.migrate), never from an ini file."""

from alembic import context

from db.models import Base
from db.session import get_engine

config = context.config
url = config.get_main_option("sqlalchemy.url")

if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    with get_engine(url).connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode copies a table and drops the old one; with foreign keys on, SQLite's DROP TABLE
            # first deletes its rows and so cascades into every table that references it. (Only
            # outside a transaction does this pragma take effect: it is the connection's first statement.)
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
