"""Alembic environment of the admin database.

The database URL is ``config.attributes["sqlalchemy_url"]`` when the caller set it (see
:func:`admin_api.migrate.alembic_config`), else ``Settings.sqlalchemy_url`` of this process.
"""

from __future__ import annotations

from alembic import context

from admin_api import models  # noqa: F401  (registers the tables on Base.metadata)
from admin_api.db import Base, make_engine
from regsandbox_core.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    return config.attributes.get("sqlalchemy_url") or get_settings().sqlalchemy_url


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
