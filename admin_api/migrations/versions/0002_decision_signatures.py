"""Store the SM2-signed envelope of each model review decision and notebook approval.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

``signature`` contains the JSON envelope of :func:`regsandbox_core.signing.sign_object`. Rows
written before this revision keep NULL, which the API reports as unsigned.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TABLES = ("model_reviews", "report_notebooks")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column("signature", sa.Text, nullable=True))


def downgrade() -> None:
    # SQLite supports DROP COLUMN from version 3.35 on, so no table copy is needed.
    for table in _TABLES:
        op.drop_column(table, "signature")
