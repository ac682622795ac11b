"""Collection tasks (报送任务) and the institutions each one targets.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from admin_api.db import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "report_tasks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("template_code", sa.String(64), nullable=False),
        sa.Column("template_version", sa.Integer, nullable=False),
        sa.Column("period_end", sa.Date, nullable=False),
        sa.Column("frequency", sa.String(16), nullable=False),
        sa.Column("deadline", UTCDateTime(), nullable=False),
        sa.Column("target_kind", sa.String(16), nullable=False),
        sa.Column("target_values", sa.JSON, nullable=False),
        sa.Column("reminder_days", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_by", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("closed_by", sa.Integer, sa.ForeignKey("users.id"), nullable=True),
        sa.Column("closed_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_report_tasks_status", "report_tasks", ["status", "deadline"])
    op.create_index("ix_report_tasks_template", "report_tasks", ["template_code", "period_end"])
    op.create_table(
        "report_task_targets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task_id", sa.Integer, sa.ForeignKey("report_tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("institution_id", sa.Integer, sa.ForeignKey("institutions.id"), nullable=False),
        sa.Column("reminders_sent", sa.JSON, nullable=False),
        sa.UniqueConstraint("task_id", "institution_id", name="uq_report_task_targets"),
    )
    op.create_index("ix_report_task_targets_institution", "report_task_targets", ["institution_id", "task_id"])


def downgrade() -> None:
    op.drop_index("ix_report_task_targets_institution", table_name="report_task_targets")
    op.drop_table("report_task_targets")
    op.drop_index("ix_report_tasks_template", table_name="report_tasks")
    op.drop_index("ix_report_tasks_status", table_name="report_tasks")
    op.drop_table("report_tasks")
