"""The data catalog (数据目录): warehouse columns with their classes, and the append-only history of each.

Create Date: 2026-12-05. The revision id is set only in ``revision`` below, so a renumbering edits one line
(and ``down_revision``).

``catalog_column_history`` rejects UPDATE and DELETE with triggers, like ``audit_events``, so
every past version of a column's classes stays as it was recorded.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from admin_api.db import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_HISTORY = "catalog_column_history"
_POSTGRES_APPEND_ONLY = f"""
CREATE FUNCTION {_HISTORY}_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '{_HISTORY} is append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER {_HISTORY}_no_change BEFORE UPDATE OR DELETE ON {_HISTORY}
    FOR EACH ROW EXECUTE FUNCTION {_HISTORY}_append_only();
"""


def upgrade() -> None:
    op.create_table(
        "catalog_columns",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("table_code", sa.String(64), nullable=False),
        sa.Column("column_code", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("data_type", sa.String(16), nullable=False),
        sa.Column("length", sa.Integer, nullable=True),
        sa.Column("template_code", sa.String(64), nullable=False),
        sa.Column("template_version", sa.Integer, nullable=False),
        sa.Column("data_owner", sa.String(100), nullable=True),
        sa.Column("proposed_level", sa.Integer, nullable=False),
        sa.Column("proposed_category", sa.String(2), nullable=True),
        sa.Column("proposed_kind", sa.String(32), nullable=False),
        sa.Column("proposed_confidence", sa.Float, nullable=False),
        sa.Column("evidence", sa.JSON, nullable=False),
        sa.Column("sampled_at", UTCDateTime(), nullable=True),
        sa.Column("confirmed_level", sa.Integer, nullable=True),
        sa.Column("confirmed_category", sa.String(2), nullable=True),
        sa.Column("confirmed_kind", sa.String(32), nullable=True),
        sa.Column("confirmed_by", sa.String(64), nullable=True),
        sa.Column("confirmed_at", UTCDateTime(), nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("table_code", "column_code", name="uq_catalog_columns"),
    )
    op.create_index("ix_catalog_columns_confirmed", "catalog_columns", ["confirmed_level", "table_code"])
    op.create_table(
        _HISTORY,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("column_id", sa.Integer, sa.ForeignKey("catalog_columns.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("snapshot", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("column_id", "version", name="uq_catalog_column_history"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_POSTGRES_APPEND_ONLY)
        return
    for statement in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {_HISTORY}_no_{statement.lower()} BEFORE {statement} ON {_HISTORY} "
            f"BEGIN SELECT RAISE(ABORT, '{_HISTORY} is append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {_HISTORY}_no_change ON {_HISTORY}")
        op.execute(f"DROP FUNCTION IF EXISTS {_HISTORY}_append_only()")
    else:
        for statement in ("UPDATE", "DELETE"):
            op.execute(f"DROP TRIGGER IF EXISTS {_HISTORY}_no_{statement.lower()}")
    op.drop_table(_HISTORY)
    op.drop_index("ix_catalog_columns_confirmed", table_name="catalog_columns")
    op.drop_table("catalog_columns")
