"""Alembic environment: a stock one, fed a token URL by migrate.py or ``DATABASE_URL``."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
target_metadata = None

# The URL comes from DATABASE_URL, as in the seed's migrate.sh:
#   export DATABASE_URL="$(iampg url HOST --user postgres --format sqlalchemy)"
#   alembic -c examples/alembic_migration/alembic.ini upgrade head
# (an environment variable skips ConfigParser, so its % signs need no doubling), or from
# sqlalchemy.url, set by migrate.py with every % doubled.
url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
if not url:
    msg = "no database URL: set DATABASE_URL (iampg url --format sqlalchemy) or run migrate.py"
    raise SystemExit(msg)


def run_migrations_offline() -> None:
    """Emit the SQL without connecting (``alembic upgrade head --sql``)."""
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Connect with the token URL (one connection, no pool) and migrate."""
    connectable = engine_from_config(
        {"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
