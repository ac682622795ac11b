"""Masking policy versions uploaded for approval (脱敏策略审批), with who uploaded and who decided.

Create Date: 2026-12-05. The approved and signed policy files stay under
``<data_dir>/policies/masking`` (see :mod:`extracts.policy`); this table records the upload and
the decision, so a security administrator other than the uploader can approve (four-eyes).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from admin_api.db import UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "masking_policy_drafts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("sm3", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("uploaded_by", sa.String(64), nullable=False),
        sa.Column("uploaded_at", UTCDateTime(), nullable=False),
        sa.Column("decided_by", sa.String(64), nullable=True),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.Column("decision_reason", sa.Text, nullable=True),
        sa.Column("signature_key", sa.String(64), nullable=True),
    )
    op.create_index("ix_masking_policy_drafts_version", "masking_policy_drafts", ["version", "state"])


def downgrade() -> None:
    op.drop_index("ix_masking_policy_drafts_version", table_name="masking_policy_drafts")
    op.drop_table("masking_policy_drafts")
