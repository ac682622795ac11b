"""Tables of the admin database.

Every change to these classes needs an Alembic revision in ``admin_api/migrations/versions``;
the migrations, not ``Base.metadata.create_all``, create the schema on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from admin_api.db import Base, UTCDateTime, utc_now

ROLE_NAMES: dict[str, str] = {
    "system_admin": "系统管理员",
    "regulator_reviewer": "监管审查员",
    "modeller": "建模人员",
    "reporter": "报送人员",
    "security_admin": "安全管理员",
    "audit_admin": "审计管理员",
}


class Institution(Base):
    __tablename__ = "institutions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(32), unique=True)
    display_name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(32))
    institution_id: Mapped[int | None] = mapped_column(ForeignKey("institutions.id"), nullable=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    """argon2id hash in PHC string format."""
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)

    institution: Mapped[Institution | None] = relationship(lazy="joined")

    @property
    def institution_code(self) -> str | None:
        return self.institution.code if self.institution else None


class ApiToken(Base):
    """A bearer token (``kind`` api) or a console session (``kind`` console) of one user.

    Only the SM3 digest of the token is stored; the token itself is shown to its owner once.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sm3: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    user: Mapped[User] = relationship(lazy="joined")


class ModelReview(Base):
    """One review decision on a registered model version; the newest one per version counts."""

    __tablename__ = "model_reviews"
    __table_args__ = (Index("ix_model_reviews_version", "model_name", "model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(32))
    institution_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    decision: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str] = mapped_column(Text, default="")
    reviewer: Mapped[str] = mapped_column(String(32))
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    signature: Mapped[str | None] = mapped_column(Text, nullable=True)
    """JSON envelope of the SM2 signature (kind ``model_review``); NULL for decisions stored before signing."""


class ReportNotebook(Base):
    __tablename__ = "report_notebooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(500), unique=True)
    """Path of the .ipynb file relative to the project root."""
    status: Mapped[str] = mapped_column(String(16), default="pending")
    sm3_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """SM3 of the file as it was when approved; a runner must refuse a file with another digest."""
    approved_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    signature: Mapped[str | None] = mapped_column(Text, nullable=True)
    """JSON envelope of the SM2 signature of the newest approval (kind ``notebook_approval``)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)


class Schedule(Base):
    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    notebook_id: Mapped[int] = mapped_column(ForeignKey("report_notebooks.id"))
    cron: Mapped[str] = mapped_column(String(200))
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)

    notebook: Mapped[ReportNotebook] = relationship(lazy="joined")


class ReportRun(Base):
    """A run of a schedule's notebook: queued → running (claimed) → succeeded or failed."""

    __tablename__ = "report_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("schedules.id"))
    trigger: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    archive_path: Mapped[str | None] = mapped_column(String(500), nullable=True)

    schedule: Mapped[Schedule] = relationship(lazy="joined")


class AuditEvent(Base):
    """An entry of the append-only audit log; database triggers reject UPDATE and DELETE."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_actor", "actor", "occurred_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    actor: Mapped[str] = mapped_column(String(64))
    role: Mapped[str | None] = mapped_column(String(32), nullable=True)
    institution_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    source_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(500))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    recorded_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Service that appended the event through the API, when it was not admin_api itself."""


__all__ = [
    "ApiToken",
    "AuditEvent",
    "Institution",
    "ModelReview",
    "ReportNotebook",
    "ReportRun",
    "Schedule",
    "User",
]
