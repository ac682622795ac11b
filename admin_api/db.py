"""Database engine, sessions and the UTC timestamp column type shared by the models.

The same code runs on SQLite (the embedded default, ``<data_dir>/admin.db``) and on PostgreSQL
(``postgresql+psycopg://...``). Sessions never expire loaded objects on commit, so a route can
still read what it wrote after committing.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

SQLITE_BUSY_TIMEOUT_SECONDS = 15
POOL_SIZE = 20
"""Connections each engine keeps open, and also how many it may open beyond them: so 40 at most.
admin_api admits POOL_SIZE requests at a time (admin_api.admission), each needing up to two."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back as an aware ``datetime`` in UTC.

    SQLite keeps no time zone, so values are normalised to UTC before they are written.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every admin_api table."""


def _prepare_sqlite_file(url: str) -> None:
    """Create the folder of a SQLite database file and the file itself with mode 0600."""
    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = os.path.abspath(database)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        descriptor = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(descriptor)


def make_engine(url: str) -> Engine:
    """Create the engine of the admin database at ``url``.

    SQLite connections wait up to ``SQLITE_BUSY_TIMEOUT_SECONDS`` for a lock, enforce foreign
    keys and may be used from FastAPI's worker threads. Both backends pool up to 2 × POOL_SIZE connections.
    """
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_SIZE)

    _prepare_sqlite_file(url)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        pool_size=POOL_SIZE, max_overflow=POOL_SIZE,
    )

    @event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
