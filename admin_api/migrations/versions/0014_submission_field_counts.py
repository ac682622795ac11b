"""Non-empty values per field of each validated upload, for the field completeness measure (字段完整性).

Uploads stored before this revision get no row: their field completeness is unknown, not 0.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "submission_field_counts",
        sa.Column("submission_id", sa.Integer, sa.ForeignKey("report_submissions.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("field_count", sa.Integer, nullable=False),
        sa.Column("required_field_count", sa.Integer, nullable=False),
        sa.Column("present_values", sa.BigInteger, nullable=False),
        sa.Column("required_present_values", sa.BigInteger, nullable=False),
        sa.Column("field_values", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("submission_field_counts")
