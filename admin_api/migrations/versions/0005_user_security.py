"""Password policy, lockout, TOTP and personal API tokens.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from admin_api.db import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_USER_COLUMNS = ("password_changed_at", "must_change_password", "failed_sign_ins", "lockouts", "locked_until",
                 "totp_secret", "totp_key_version", "totp_enabled_at", "totp_last_step")


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("password_changed_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("must_change_password", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("failed_sign_ins", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("lockouts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("locked_until", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("totp_secret", sa.Text, nullable=True))
        batch.add_column(sa.Column("totp_key_version", sa.Integer, nullable=True))
        batch.add_column(sa.Column("totp_enabled_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("totp_last_step", sa.Integer, nullable=True))

    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("name", sa.String(100), nullable=True))
        batch.add_column(sa.Column("scopes", sa.JSON, nullable=True))
        batch.add_column(sa.Column("last_seen_at", UTCDateTime(), nullable=True))

    op.create_table(
        "password_history",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_password_history_user", "password_history", ["user_id", "created_at"])
    # The current password of every existing user is the first history entry, so it cannot be set again.
    op.execute(
        "INSERT INTO password_history (user_id, password_hash, created_at) "
        "SELECT id, password_hash, updated_at FROM users"
    )


def downgrade() -> None:
    op.drop_index("ix_password_history_user", table_name="password_history")
    op.drop_table("password_history")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("last_seen_at")
        batch.drop_column("scopes")
        batch.drop_column("name")
    with op.batch_alter_table("users") as batch:
        for column in reversed(_USER_COLUMNS):
            batch.drop_column(column)
