"""Institution registry fields: USCC, licence number, type, hierarchy, contact, status.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

Rows stored before this revision keep a NULL ``uscc`` until an administrator fills it in, and get
status ``active`` and ``updated_at`` equal to ``created_at``. The unique constraint on ``name``
fails the upgrade when two existing institutions share a name; rename one of them first.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from admin_api.db import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch_alter_table copies the table on SQLite, which cannot add constraints in place.
    with op.batch_alter_table("institutions") as batch:
        batch.add_column(sa.Column("uscc", sa.String(18), nullable=True))
        batch.add_column(sa.Column("licence_no", sa.String(32), nullable=True))
        batch.add_column(sa.Column("parent_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("contact_name", sa.String(100), nullable=True))
        batch.add_column(sa.Column("contact_phone", sa.String(32), nullable=True))
        batch.add_column(sa.Column("contact_email", sa.String(254), nullable=True))
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="active"))
        batch.add_column(sa.Column("updated_at", UTCDateTime(), nullable=True))
        batch.create_unique_constraint("uq_institutions_name", ["name"])
        batch.create_unique_constraint("uq_institutions_uscc", ["uscc"])
        batch.create_foreign_key("fk_institutions_parent_id", "institutions", ["parent_id"], ["id"])
        batch.create_index("ix_institutions_parent_id", ["parent_id"])

    op.execute("UPDATE institutions SET updated_at = created_at")
    with op.batch_alter_table("institutions") as batch:
        batch.alter_column("updated_at", existing_type=UTCDateTime(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("institutions") as batch:
        batch.drop_index("ix_institutions_parent_id")
        batch.drop_constraint("fk_institutions_parent_id", type_="foreignkey")
        batch.drop_constraint("uq_institutions_uscc", type_="unique")
        batch.drop_constraint("uq_institutions_name", type_="unique")
        for column in ("updated_at", "status", "contact_email", "contact_phone", "contact_name", "parent_id",
                       "licence_no", "uscc"):
            batch.drop_column(column)
