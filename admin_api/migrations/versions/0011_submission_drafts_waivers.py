"""Report submission drafts and reviewers' waivers of warnings (提示).

Drafts and discarded drafts are new values of ``report_submissions.state`` and need no column.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from admin_api.db import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("report_submissions") as batch:
        batch.add_column(sa.Column("waived_warning_count", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "submission_waivers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("submission_id", sa.Integer, sa.ForeignKey("report_submissions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("rule_id", sa.String(64), nullable=False),
        sa.Column("lines", sa.JSON, nullable=True),
        sa.Column("finding_count", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("author", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_submission_waivers_submission", "submission_waivers", ["submission_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_submission_waivers_submission", table_name="submission_waivers")
    op.drop_table("submission_waivers")
    with op.batch_alter_table("report_submissions") as batch:
        batch.drop_column("waived_warning_count")
