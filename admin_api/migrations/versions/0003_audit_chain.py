"""Chain every audit event to the previous one by an SM3 digest.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Adds ``prev_sm3`` and ``chain_sm3`` to ``audit_events`` and the single-row table
``audit_chain_head``, chains the existing rows in id order with
:func:`admin_api.audit_chain.chain_digest`, and adds the indexes of the audit search. The
append-only triggers are switched off only while the existing rows get their digests.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from admin_api.audit_chain import GENESIS_SM3, HEAD_ID, chain_digest
from admin_api.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BATCH_ROWS = 1000
_SQLITE_TRIGGERS = ("UPDATE", "DELETE")
_INDEXES = {
    "ix_audit_events_occurred_at": ["occurred_at"],
    "ix_audit_events_action": ["action", "id"],
    "ix_audit_events_institution": ["institution_code", "id"],
}

_events = sa.table(
    "audit_events",
    sa.column("id", sa.Integer),
    sa.column("occurred_at", UTCDateTime()),
    sa.column("request_id", sa.String),
    sa.column("actor", sa.String),
    sa.column("role", sa.String),
    sa.column("institution_code", sa.String),
    sa.column("source_ip", sa.String),
    sa.column("action", sa.String),
    sa.column("resource", sa.String),
    sa.column("outcome", sa.String),
    sa.column("detail", sa.Text),
    sa.column("recorded_by", sa.String),
    sa.column("prev_sm3", sa.String),
    sa.column("chain_sm3", sa.String),
)


def _is_postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _drop_sqlite_triggers() -> None:
    for statement in _SQLITE_TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS audit_events_no_{statement.lower()}")


def _create_sqlite_triggers() -> None:
    # The same statements as revision 0001.
    for statement in _SQLITE_TRIGGERS:
        op.execute(
            f"CREATE TRIGGER audit_events_no_{statement.lower()} BEFORE {statement} ON audit_events "
            "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
        )


def _chain_existing_rows() -> tuple[int, str]:
    """Give every existing row its digests in id order; return the last id and digest."""
    connection = op.get_bind()
    prev_sm3 = GENESIS_SM3
    last_id = 0
    update = (
        sa.update(_events)
        .where(_events.c.id == sa.bindparam("row_id"))
        .values(prev_sm3=sa.bindparam("new_prev"), chain_sm3=sa.bindparam("new_chain"))
    )
    while True:
        batch = connection.execute(
            sa.select(_events).where(_events.c.id > last_id).order_by(_events.c.id).limit(_BATCH_ROWS)
        ).all()
        if not batch:
            return last_id, prev_sm3
        changes = []
        for row in batch:
            digest = chain_digest(prev_sm3, row)
            changes.append({"row_id": row.id, "new_prev": prev_sm3, "new_chain": digest})
            prev_sm3 = digest
            last_id = row.id
        connection.execute(update, changes)


def upgrade() -> None:
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last_id", sa.Integer, nullable=False),
        sa.Column("last_sm3", sa.String(64), nullable=False),
    )
    op.add_column("audit_events", sa.Column("prev_sm3", sa.String(64), nullable=True))
    op.add_column("audit_events", sa.Column("chain_sm3", sa.String(64), nullable=True))

    if _is_postgres():
        op.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update")
    else:
        _drop_sqlite_triggers()
    last_id, last_sm3 = _chain_existing_rows()

    if _is_postgres():
        op.alter_column("audit_events", "prev_sm3", existing_type=sa.String(64), nullable=False)
        op.alter_column("audit_events", "chain_sm3", existing_type=sa.String(64), nullable=False)
        op.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update")
    else:
        # SQLite cannot add NOT NULL to a column, so the table is copied; its triggers are recreated after.
        with op.batch_alter_table("audit_events", recreate="always") as batch:
            batch.alter_column("prev_sm3", existing_type=sa.String(64), nullable=False)
            batch.alter_column("chain_sm3", existing_type=sa.String(64), nullable=False)
        _create_sqlite_triggers()

    for name, columns in _INDEXES.items():
        op.create_index(name, "audit_events", columns)
    op.bulk_insert(head, [{"id": HEAD_ID, "last_id": last_id, "last_sm3": last_sm3}])


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="audit_events")
    # Dropping a column is DDL, which the row triggers do not block; SQLite does it in place from 3.35 on.
    op.drop_column("audit_events", "chain_sm3")
    op.drop_column("audit_events", "prev_sm3")
    op.drop_table("audit_chain_head")
    if _is_postgres():
        # Chained ids were assigned by the application, so the id sequence must catch up before
        # revision 0002's inserts rely on it again.
        op.execute(
            "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), COALESCE(MAX(id), 0) + 1, false) "
            "FROM audit_events"
        )
