"""Tables of the admin database.

Every change to these classes needs an Alembic revision in ``admin_api/migrations/versions``;
the migrations, not ``Base.metadata.create_all``, create the schema on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import JSON, BigInteger, Boolean, Date, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column, relationship

from admin_api.db import Base, UTCDateTime, utc_now

ROLE_NAMES: dict[str, str] = {
    "system_admin": "系统管理员",
    "security_admin": "安全管理员",
    "audit_admin": "审计管理员",
    "regulator_reviewer": "监管审查员",
    "regulator_analyst": "监管分析员",
    "institution_admin": "机构管理员",
    "modeller": "建模人员",
    "reporter": "报送人员",
    "data_steward": "数据治理专员",
}
"""Built-in roles and their Chinese names; custom roles are rows of :class:`Role` (see admin_api.roles)."""


class Institution(Base):
    """A supervised institution: a legal entity (法人机构, no parent) or a branch (分支机构) of one.

    The registry rules (USCC check character, types, hierarchy) live in :mod:`admin_api.institutions`.
    """

    __tablename__ = "institutions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    type: Mapped[str] = mapped_column(String(50))
    """One of admin_api.institutions.INSTITUTION_TYPES, stored in Chinese (银行, 保险, ...)."""
    uscc: Mapped[str | None] = mapped_column(String(18), unique=True, nullable=True)
    """统一社会信用代码; NULL only for rows stored before revision 0004, the API requires it."""
    licence_no: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """金融许可证号, optional."""
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("institutions.id"), nullable=True, index=True)
    contact_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    contact_phone: Mapped[str | None] = mapped_column(String(32), nullable=True)
    contact_email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    """``active`` (正常) or ``inactive`` (停用)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)

    parent: Mapped[Institution | None] = relationship(remote_side="Institution.id", lazy="joined", join_depth=1)

    @property
    def is_legal_entity(self) -> bool:
        """Whether this is a legal entity; a branch has a parent, which must itself be a legal entity."""
        return self.parent_id is None

    @property
    def parent_code(self) -> str | None:
        return self.parent.code if self.parent else None


class Role(Base):
    """A custom role: a named set of capabilities defined by the system administrator.

    Built-in roles are not stored here; :mod:`admin_api.roles` combines both.
    """

    __tablename__ = "roles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    description: Mapped[str | None] = mapped_column(String(500), nullable=True)
    scope: Mapped[str] = mapped_column(String(16))
    """``regulator`` (监管方, users belong to no institution) or ``institution`` (机构)."""
    capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(32), unique=True)
    display_name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(32))
    institution_id: Mapped[int | None] = mapped_column(ForeignKey("institutions.id"), nullable=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    """argon2id hash in PHC string format."""
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now, index=True)
    """Time of the last change to the row; ``GET /api/v1/users?updated_since=`` lets the hub and registry poll changes."""
    # Sign-in policy state (admin_api/passwords.py).
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """When the password was last set; NULL for rows older than the password policy, which count from created_at."""
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Set for administrator-issued passwords: the user can only change the password until they do."""
    failed_sign_ins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Consecutive failed sign-ins since the last success or lockout."""
    lockouts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Lockouts since the last successful sign-in; selects the lockout duration."""
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # TOTP second factor (admin_api/totp.py).
    totp_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Base64 of nonce || SM4-GCM ciphertext of the TOTP secret under the platform data key."""
    totp_key_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    totp_enabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """When the user confirmed the secret with a first code; NULL while enrolment is pending or absent."""
    totp_last_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Time step (Unix time // 30) of the last accepted code; a code of this or an earlier step is rejected."""

    institution: Mapped[Institution | None] = relationship(lazy="joined")

    @property
    def institution_code(self) -> str | None:
        return self.institution.code if self.institution else None


class PasswordHistory(Base):
    """An argon2id hash of one of a user's latest passwords, including the current one."""

    __tablename__ = "password_history"
    __table_args__ = (Index("ix_password_history_user", "user_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)


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
    name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    """Name that the owner gave a personal API token; NULL for sign-in tokens and console sessions."""
    scopes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    """Capabilities of a personal API token (kind ``api``); NULL: every capability of the user's role."""
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """Last use of a console session, to the minute; NULL until the first minute has passed."""

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
    __table_args__ = (
        Index("ix_audit_events_actor", "actor", "occurred_at"),
        # Search filters of the audit page; results are ordered by id, so id completes each index.
        Index("ix_audit_events_occurred_at", "occurred_at"),
        Index("ix_audit_events_action", "action", "id"),
        Index("ix_audit_events_institution", "institution_code", "id"),
    )

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
    prev_sm3: Mapped[str] = mapped_column(String(64))
    """``chain_sm3`` of the previous event, or ``audit_chain.GENESIS_SM3`` for the first one."""
    chain_sm3: Mapped[str] = mapped_column(String(64))
    """SM3 of ``prev_sm3`` and this event's canonical content, set by ``audit_chain`` at flush."""


class AuditChainHead(Base):
    """The single row (id 1) containing the id and digest of the newest audit event.

    Appends lock this row, so concurrent writers extend one chain, and verification compares it with
    the last stored event to detect deleted events at the end of the log.
    """

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer)
    last_sm3: Mapped[str] = mapped_column(String(64))


class ApiEndpoint(Base):
    """A named external HTTP endpoint that platform modules call through ``admin_api.api_endpoints.client_for``.

    Credentials are SM4-GCM ciphertext under the platform data key version ``credentials_key_version``;
    the clear text is never stored or returned.
    """

    __tablename__ = "api_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(100))
    base_url: Mapped[str] = mapped_column(String(500))
    auth_type: Mapped[str] = mapped_column(String(16), default="none")
    api_key_header: Mapped[str | None] = mapped_column(String(64), nullable=True)
    credentials_ciphertext: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Base64 of the 12-byte nonce followed by the SM4-GCM ciphertext and tag of the credentials JSON."""
    credentials_key_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    credentials_hint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    timeout_seconds: Mapped[int] = mapped_column(Integer, default=10)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)


class Message(Base):
    """A system message in one user's inbox; deleting sets ``deleted`` so the row stays for the record."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_inbox", "user_id", "deleted", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    category: Mapped[str] = mapped_column(String(32))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text, default="")
    link: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


SUBMISSION_STATES: dict[str, str] = {
    "draft": "草稿",
    "submitted": "已提交",
    "validation_failed": "校验未通过",
    "pending_review": "待审核",
    "accepted": "审核通过",
    "returned": "已退回",
    "superseded": "已被新版本替代",
    "withdrawn": "已作废",
}
"""States of a report submission (报表报送) and their Chinese names, used by admin_api.submissions."""


class ReportSubmission(Base):
    """One uploaded version of a report file of an institution, template and period (报表报送).

    A resubmission of the same institution, template and period adds a row with the next
    ``version`` and marks the previous one ``superseded``. Earlier versions stay readable. The
    file itself is stored encrypted under the institution's data key (admin_api.submissions).
    """

    __tablename__ = "report_submissions"
    __table_args__ = (
        UniqueConstraint("institution_id", "template_code", "period_end", "version",
                         name="uq_report_submissions_version"),
        Index("ix_report_submissions_institution", "institution_id", "period_end", "state"),
        Index("ix_report_submissions_period", "period_end", "state"),
        Index("ix_report_submissions_state", "state", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    template_code: Mapped[str] = mapped_column(String(64))
    template_version: Mapped[int] = mapped_column(Integer)
    template_digest: Mapped[str] = mapped_column(String(64))
    """SM3 of the template file the submission was validated against."""
    period_end: Mapped[date] = mapped_column(Date)
    version: Mapped[int] = mapped_column(Integer)
    """1, 2, ... per institution, template and period."""
    state: Mapped[str] = mapped_column(String(32))
    """One of :data:`SUBMISSION_STATES`."""
    original_filename: Mapped[str] = mapped_column(String(255))
    file_type: Mapped[str] = mapped_column(String(16))
    """``text`` or ``xlsx``."""
    encoding: Mapped[str | None] = mapped_column(String(16), nullable=True)
    byte_size: Mapped[int] = mapped_column(BigInteger)
    raw_sm3: Mapped[str] = mapped_column(String(64))
    """SM3 of the submitted bytes (before encryption)."""
    raw_path: Mapped[str] = mapped_column(String(500))
    """Encrypted file, relative to the data directory."""
    key_version: Mapped[int] = mapped_column(Integer)
    """Version of the institution's data key that encrypts the file."""
    row_count: Mapped[int] = mapped_column(Integer)
    error_count: Mapped[int] = mapped_column(Integer, default=0)
    warning_count: Mapped[int] = mapped_column(Integer, default=0)
    explained_warning_count: Mapped[int] = mapped_column(Integer, default=0)
    waived_warning_count: Mapped[int] = mapped_column(Integer, default=0)
    """Unexplained warnings covered by a reviewer's waiver (:class:`SubmissionWaiver`)."""
    findings_path: Mapped[str | None] = mapped_column(String(500), nullable=True)
    """Findings Parquet file relative to the data directory; NULL when the file was not validated."""
    submitted_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    reviewed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    review_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)

    institution: Mapped[Institution] = relationship(lazy="joined")
    submitter: Mapped[User] = relationship(foreign_keys=[submitted_by], lazy="joined")
    reviewer: Mapped[User | None] = relationship(foreign_keys=[reviewed_by], lazy="joined")


class SubmissionEvent(Base):
    """A state change of a report submission, with who made it and why."""

    __tablename__ = "submission_events"
    __table_args__ = (Index("ix_submission_events_submission", "submission_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("report_submissions.id", ondelete="CASCADE"))
    from_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """NULL for the upload that created the submission."""
    to_state: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)


class SubmissionRowComment(Base):
    """A reviewer's comment on one line (and optionally one field) of a returned submission."""

    __tablename__ = "submission_row_comments"
    __table_args__ = (Index("ix_submission_row_comments_submission", "submission_id", "line"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("report_submissions.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)
    field_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    comment: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)


class SubmissionWaiver(Base):
    """A reviewer's waiver (豁免) of the unexplained warnings (提示) of one rule, on all lines or on listed lines."""

    __tablename__ = "submission_waivers"
    __table_args__ = (Index("ix_submission_waivers_submission", "submission_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("report_submissions.id", ondelete="CASCADE"))
    rule_id: Mapped[str] = mapped_column(String(64))
    lines: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    """Line numbers the waiver covers; NULL covers every finding of the rule, file-level ones included."""
    finding_count: Mapped[int] = mapped_column(Integer)
    """Unexplained warnings that this waiver newly covered when it was made."""
    reason: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)


class SubmissionFieldCount(Base):
    """Non-empty values per template field of one validated upload, the input of field completeness (字段完整性).

    Written with the submission when its upload is validated. Uploads stored before this table
    existed, or without validation, have no row, and the data quality page shows "—" for them.
    """

    __tablename__ = "submission_field_counts"

    submission_id: Mapped[int] = mapped_column(ForeignKey("report_submissions.id", ondelete="CASCADE"),
                                               primary_key=True)
    row_count: Mapped[int] = mapped_column(Integer)
    """Rows counted, the same as ``report_submissions.row_count``."""
    field_count: Mapped[int] = mapped_column(Integer)
    """Fields of the template version validated against."""
    required_field_count: Mapped[int] = mapped_column(Integer)
    """Fields marked ``required`` in that template version."""
    present_values: Mapped[int] = mapped_column(BigInteger)
    """Non-empty values over all fields; field completeness is this ÷ (row_count × field_count)."""
    required_present_values: Mapped[int] = mapped_column(BigInteger)
    """Non-empty values over the required fields."""
    field_values: Mapped[dict[str, int]] = mapped_column(JSON)
    """Field code → non-empty values, in template order."""


TASK_STATUSES: dict[str, str] = {"open": "进行中", "closed": "已关闭"}
"""States of a collection task (报送任务), used by admin_api.tasks."""


class ReportTask(Base):
    """A collection task (报送任务): which institutions must submit a template for a period, and by when.

    The targets are resolved to institutions when the task is created and stored as
    :class:`ReportTaskTarget` rows, so later changes to the registry do not change an issued task.
    """

    __tablename__ = "report_tasks"
    __table_args__ = (
        Index("ix_report_tasks_status", "status", "deadline"),
        Index("ix_report_tasks_template", "template_code", "period_end"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    template_code: Mapped[str] = mapped_column(String(64))
    template_version: Mapped[int] = mapped_column(Integer)
    period_end: Mapped[date] = mapped_column(Date)
    frequency: Mapped[str] = mapped_column(String(16))
    """``monthly``, ``quarterly``, ``semiannual``, ``annual`` or ``ad_hoc``."""
    deadline: Mapped[datetime] = mapped_column(UTCDateTime())
    target_kind: Mapped[str] = mapped_column(String(16))
    """``institutions`` (codes) or ``types`` (institution types), as the creator gave them."""
    target_values: Mapped[list[str]] = mapped_column(JSON, default=list)
    """The codes or types the creator gave; the resolved institutions are the target rows."""
    reminder_days: Mapped[list[int]] = mapped_column(JSON, default=list)
    """Days before the deadline on which reporters who have not submitted get a reminder, e.g. [3, 1]."""
    status: Mapped[str] = mapped_column(String(16), default="open")
    """One of :data:`TASK_STATUSES`."""
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    closed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    creator: Mapped[User] = relationship(foreign_keys=[created_by], lazy="joined")
    closer: Mapped[User | None] = relationship(foreign_keys=[closed_by], lazy="joined")


class ReportTaskTarget(Base):
    """One institution a collection task targets, with the reminders already sent to its reporters."""

    __tablename__ = "report_task_targets"
    __table_args__ = (
        UniqueConstraint("task_id", "institution_id", name="uq_report_task_targets"),
        Index("ix_report_task_targets_institution", "institution_id", "task_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("report_tasks.id", ondelete="CASCADE"))
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    reminders_sent: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Keys of the reminders sent: the day counts as text (``"3"``) and ``"overdue"``."""

    institution: Mapped[Institution] = relationship(lazy="joined")


class CatalogColumn(Base):
    """A warehouse column in the data catalog (数据目录) with its proposed and confirmed classes.

    Warehouse tables are named by report template codes, and every field of a template is a column.
    The proposal comes from :mod:`catalog.detectors`; a data steward (数据治理专员) confirms or changes
    it. Until ``confirmed_level`` is set, :func:`catalog.classes.effective_class` applies level 4.
    Every change increments ``version`` and adds a :class:`CatalogColumnHistory` row.
    """

    __tablename__ = "catalog_columns"
    __table_args__ = (
        UniqueConstraint("table_code", "column_code", name="uq_catalog_columns"),
        Index("ix_catalog_columns_confirmed", "confirmed_level", "table_code"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    table_code: Mapped[str] = mapped_column(String(64))
    column_code: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(200))
    """Chinese name of the field in its template."""
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    data_type: Mapped[str] = mapped_column(String(16))
    """Template field type: text, code, integer, decimal or date."""
    length: Mapped[int | None] = mapped_column(Integer, nullable=True)
    template_code: Mapped[str] = mapped_column(String(64))
    template_version: Mapped[int] = mapped_column(Integer)
    """Newest template version that declares the column."""
    data_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    proposed_level: Mapped[int] = mapped_column(Integer)
    proposed_category: Mapped[str | None] = mapped_column(String(2), nullable=True)
    proposed_kind: Mapped[str] = mapped_column(String(32))
    proposed_confidence: Mapped[float] = mapped_column(Float)
    evidence: Mapped[list[dict]] = mapped_column(JSON, default=list)
    """Evidence of the proposal (catalog.detectors.Evidence.as_dict): sources, match counts, never values."""
    sampled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """When accepted warehouse values last contributed to the proposal; NULL when none did."""
    confirmed_level: Mapped[int | None] = mapped_column(Integer, nullable=True)
    confirmed_category: Mapped[str | None] = mapped_column(String(2), nullable=True)
    confirmed_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    confirmed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)


class CatalogColumnHistory(Base):
    """One version of a catalog column: the state after a change, who made it and why. Append-only (triggers)."""

    __tablename__ = "catalog_column_history"
    __table_args__ = (UniqueConstraint("column_id", "version", name="uq_catalog_column_history"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    column_id: Mapped[int] = mapped_column(ForeignKey("catalog_columns.id"))
    version: Mapped[int] = mapped_column(Integer)
    change: Mapped[str] = mapped_column(String(16))
    """``created``, ``proposed`` (a sync changed the proposal or the declaration), ``reopened`` (a changed
    declaration cleared the confirmed class), ``confirmed`` or ``changed``."""
    snapshot: Mapped[dict] = mapped_column(JSON)
    """The column's declaration, proposal and confirmed class after the change."""
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    actor: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)


class MaskingPolicyDraft(Base):
    """A masking policy version (YAML) uploaded for approval, and the decision on it.

    ``state`` is ``draft`` until a security administrator other than the uploader approves it
    (``approved``: :func:`extracts.policy.approve_policy` stored and SM2-signed the file) or
    rejects it (``rejected``). The file in ``<data_dir>/policies/masking`` is what extracts use.
    """

    __tablename__ = "masking_policy_drafts"
    __table_args__ = (Index("ix_masking_policy_drafts_version", "version", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    content: Mapped[str] = mapped_column(Text)
    """The uploaded YAML text as it will be approved and signed."""
    sm3: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="draft")
    uploaded_by: Mapped[str] = mapped_column(String(64))
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    decided_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    decision_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    signature_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Label of the platform signing key version that signed the approved file."""


__all__ = [
    "ApiEndpoint",
    "ApiToken",
    "AuditChainHead",
    "AuditEvent",
    "CatalogColumn",
    "CatalogColumnHistory",
    "Institution",
    "MaskingPolicyDraft",
    "Message",
    "ModelReview",
    "PasswordHistory",
    "ReportNotebook",
    "ReportRun",
    "ReportTask",
    "ReportTaskTarget",
    "ReportSubmission",
    "Schedule",
    "SubmissionEvent",
    "SubmissionRowComment",
    "User",
]
