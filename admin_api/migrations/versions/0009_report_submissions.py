"""Report submissions (报表报送): uploaded versions, their state changes and reviewers' row comments.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from admin_api.db import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "report_submissions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("institution_id", sa.Integer, sa.ForeignKey("institutions.id"), nullable=False),
        sa.Column("template_code", sa.String(64), nullable=False),
        sa.Column("template_version", sa.Integer, nullable=False),
        sa.Column("template_digest", sa.String(64), nullable=False),
        sa.Column("period_end", sa.Date, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("original_filename", sa.String(255), nullable=False),
        sa.Column("file_type", sa.String(16), nullable=False),
        sa.Column("encoding", sa.String(16), nullable=True),
        sa.Column("byte_size", sa.BigInteger, nullable=False),
        sa.Column("raw_sm3", sa.String(64), nullable=False),
        sa.Column("raw_path", sa.String(500), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("error_count", sa.Integer, nullable=False),
        sa.Column("warning_count", sa.Integer, nullable=False),
        sa.Column("explained_warning_count", sa.Integer, nullable=False),
        sa.Column("findings_path", sa.String(500), nullable=True),
        sa.Column("submitted_by", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("submitted_at", UTCDateTime(), nullable=False),
        sa.Column("reviewed_by", sa.Integer, sa.ForeignKey("users.id"), nullable=True),
        sa.Column("reviewed_at", UTCDateTime(), nullable=True),
        sa.Column("review_comment", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("institution_id", "template_code", "period_end", "version",
                            name="uq_report_submissions_version"),
    )
    op.create_index("ix_report_submissions_institution", "report_submissions",
                    ["institution_id", "period_end", "state"])
    op.create_index("ix_report_submissions_period", "report_submissions", ["period_end", "state"])
    op.create_index("ix_report_submissions_state", "report_submissions", ["state", "id"])
    op.create_table(
        "submission_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("submission_id", sa.Integer, sa.ForeignKey("report_submissions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_submission_events_submission", "submission_events", ["submission_id", "id"])
    op.create_table(
        "submission_row_comments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("submission_id", sa.Integer, sa.ForeignKey("report_submissions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("field_code", sa.String(64), nullable=True),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("author", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_submission_row_comments_submission", "submission_row_comments", ["submission_id", "line"])


def downgrade() -> None:
    op.drop_index("ix_submission_row_comments_submission", table_name="submission_row_comments")
    op.drop_table("submission_row_comments")
    op.drop_index("ix_submission_events_submission", table_name="submission_events")
    op.drop_table("submission_events")
    op.drop_index("ix_report_submissions_state", table_name="report_submissions")
    op.drop_index("ix_report_submissions_period", table_name="report_submissions")
    op.drop_index("ix_report_submissions_institution", table_name="report_submissions")
    op.drop_table("report_submissions")
