"""Index users by their last change, for the hub and registry synchronisation (``updated_since``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_users_updated_at", "users", ["updated_at"])
    op.create_index("ix_users_institution_id", "users", ["institution_id"])


def downgrade() -> None:
    op.drop_index("ix_users_institution_id", table_name="users")
    op.drop_index("ix_users_updated_at", table_name="users")
