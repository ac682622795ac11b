"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from admin_api.models import AuditEvent, ReportNotebook, ReportRun, Schedule, User


class SignIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    totp: str | None = Field(default=None, max_length=16)
    """Current 6-digit TOTP code; required once the user has enrolled a second factor."""


class VerifyRequest(SignIn):
    source_ip: str | None = Field(default=None, max_length=64)


class UserPublic(BaseModel):
    username: str
    display_name: str
    role: str
    institution_code: str | None
    institution_name: str | None
    email: str

    @classmethod
    def of(cls, user: User) -> UserPublic:
        return cls(
            username=user.username,
            display_name=user.display_name,
            role=user.role,
            institution_code=user.institution_code,
            institution_name=user.institution.name if user.institution else None,
            email=user.email,
        )


class UserListItem(BaseModel):
    username: str
    display_name: str
    role: str
    institution_code: str | None
    is_active: bool
    email: str


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    """Seconds until the token expires."""
    user: UserPublic


class InstitutionPublic(BaseModel):
    code: str
    name: str
    type: str


class AuditEventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str = Field(min_length=1, max_length=64)
    action: str = Field(min_length=1, max_length=64)
    resource: str = Field(min_length=1, max_length=500)
    outcome: Literal["success", "denied", "failed"]
    institution_code: str | None = Field(default=None, max_length=32)
    detail: str | None = Field(default=None, max_length=4000)
    source_ip: str | None = Field(default=None, max_length=64)
    role: str | None = Field(default=None, max_length=32)


class AuditEventOut(BaseModel):
    id: int
    occurred_at: datetime
    request_id: str | None
    actor: str
    role: str | None
    institution_code: str | None
    source_ip: str | None
    action: str
    resource: str
    outcome: str
    detail: str | None
    recorded_by: str | None
    prev_sm3: str
    chain_sm3: str

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventOut:
        return cls.model_validate(event, from_attributes=True)


class ReviewRequest(BaseModel):
    decision: str = Field(max_length=16)
    comment: str = Field(default="", max_length=4000)


class SignatureSummary(BaseModel):
    """The SM2 signature of a stored decision: signing key, time, and whether it verifies now."""

    key: str | None
    """Key label, e.g. ``platform/signing/v1``."""
    signed_at: str | None
    """ISO 8601 time of signing, as recorded in the envelope."""
    valid: bool
    """False when the envelope or the row changed after signing, or the key is revoked or unknown."""


class ReviewOut(BaseModel):
    id: int
    model_name: str
    model_version: str
    institution_code: str | None
    decision: str
    comment: str
    reviewer: str
    decided_at: datetime
    signature: SignatureSummary | None = None


class NotebookOut(BaseModel):
    id: int
    name: str
    path: str
    status: str
    sm3_digest: str | None
    approved_by: str | None
    approved_at: datetime | None
    signature: SignatureSummary | None = None
    """Summary of the approval signature; None while the notebook is not approved or was approved unsigned."""

    @classmethod
    def of(cls, notebook: ReportNotebook, signature: dict | None = None) -> NotebookOut:
        return cls(
            id=notebook.id, name=notebook.name, path=notebook.path, status=notebook.status,
            sm3_digest=notebook.sm3_digest, approved_by=notebook.approved_by, approved_at=notebook.approved_at,
            signature=signature,
        )


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    notebook_id: int
    cron: str = Field(max_length=200)
    recipients: list[str] = Field(max_length=200)
    enabled: bool = True


class ScheduleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field(default=None, max_length=200)
    recipients: list[str] | None = Field(default=None, max_length=200)
    enabled: bool | None = None


class ScheduleOut(BaseModel):
    id: int
    name: str
    notebook_id: int
    notebook_name: str
    cron: str
    recipients: list[str]
    enabled: bool
    created_by: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, schedule: Schedule) -> ScheduleOut:
        return cls(
            id=schedule.id, name=schedule.name, notebook_id=schedule.notebook_id,
            notebook_name=schedule.notebook.name, cron=schedule.cron, recipients=list(schedule.recipients),
            enabled=schedule.enabled, created_by=schedule.created_by, created_at=schedule.created_at,
            updated_at=schedule.updated_at,
        )


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trigger: Literal["manual", "cron"] = "manual"


class RunOut(BaseModel):
    id: int
    schedule_id: int
    schedule_name: str
    trigger: str
    status: str
    requested_by: str
    queued_at: datetime
    claimed_by: str | None
    claimed_at: datetime | None
    finished_at: datetime | None
    error_code: str | None
    error_message: str | None
    archive_path: str | None

    @classmethod
    def of(cls, run: ReportRun) -> RunOut:
        return cls(
            id=run.id, schedule_id=run.schedule_id, schedule_name=run.schedule.name, trigger=run.trigger,
            status=run.status, requested_by=run.requested_by, queued_at=run.queued_at, claimed_by=run.claimed_by,
            claimed_at=run.claimed_at, finished_at=run.finished_at, error_code=run.error_code,
            error_message=run.error_message, archive_path=run.archive_path,
        )


class ClaimedRun(RunOut):
    """A claimed run with everything the report runner needs."""

    notebook_id: int
    notebook_name: str
    notebook_path: str
    """Path relative to the project root, as registered."""
    notebook_file: str
    """Absolute path of the notebook file."""
    approved_sm3: str
    """SM3 digest recorded at approval; the runner must refuse a file with another digest."""
    approval_signature: dict | None = None
    """Envelope of the notebook approval signature; the runner verifies it before running."""
    recipients: list[str]


class FinishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["succeeded", "failed"]
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=10000)
    archive_path: str | None = Field(default=None, max_length=500)


class KeyVersionOut(BaseModel):
    """One key version as the key store's metadata lists it; never contains key material."""

    owner: str
    owner_name: str
    kind: str
    kind_name: str
    version: int
    state: str
    state_name: str
    created_at: datetime | None
    activated_at: datetime | None
    deactivated_at: datetime | None
    revoked_at: datetime | None
    revoke_reason: str | None
    destroyed_at: datetime | None
    public_key: str | None
    """Hex SM2 public key of a signing version; None for data and token keys."""


class KeyListOut(BaseModel):
    master_key_id: str
    """Name of the master key that wraps every version; it reveals nothing about the key."""
    keys: list[KeyVersionOut]


class KeyRevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    reason: str = Field(min_length=2, max_length=200)


class KeyDestroyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    confirm: str = Field(max_length=200)
    """Must be exactly ``<owner>/<kind>/v<version>`` of the version to destroy."""
