"""User management API, the self-service password change and TOTP enrolment.

``GET /users`` (list) lives in routes/identity.py. Every user write needs ``users.write``
(system administrators). The ``/auth/*`` endpoints here take the user name and password in the
body, so a user whose password expired or who must enrol TOTP can still use them. A rejected write
is stored in the audit log with outcome ``failed``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from admin_api import user_files, users
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.limits import MAX_UPLOAD_BODY_BYTES
from admin_api.errors import ApiError
from admin_api.models import User
from admin_api.passwords import password_expires_at
from admin_api.security import Principal
from admin_api.services import authenticate, user_principal

router = APIRouter()
T = TypeVar("T")


class UserDetail(BaseModel):
    username: str
    display_name: str
    email: str
    role: str
    institution_code: str | None
    is_active: bool
    must_change_password: bool
    password_expires_at: datetime | None
    locked_until: datetime | None
    failed_sign_ins: int
    totp_enrolled: bool
    created_at: datetime

    @classmethod
    def of(cls, user: User, request: Request) -> UserDetail:
        return cls(
            username=user.username, display_name=user.display_name, email=user.email, role=user.role,
            institution_code=user.institution_code, is_active=user.is_active,
            must_change_password=user.must_change_password,
            password_expires_at=password_expires_at(user, request.app.state.settings),
            locked_until=user.locked_until, failed_sign_ins=user.failed_sign_ins,
            totp_enrolled=user.totp_enabled_at is not None, created_at=user.created_at,
        )


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(max_length=64)
    display_name: str = Field(max_length=100)
    email: str = Field(max_length=254)
    role: str = Field(max_length=32)
    institution_code: str | None = Field(default=None, max_length=32)
    password: str | None = Field(default=None, max_length=1024)
    """Initial password; omitted: the server generates one and returns it once."""


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(default=None, max_length=100)
    email: str | None = Field(default=None, max_length=254)
    role: str | None = Field(default=None, max_length=32)
    institution_code: str | None = Field(default=None, max_length=32)
    """Send null to remove the institution (regulator roles); leave the field out to keep it."""


class UserWithPassword(BaseModel):
    user: UserDetail
    password: str | None
    """One-time password, shown only in this response; null when the caller chose the password."""


class TotpEnrol(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class TotpConfirm(TotpEnrol):
    code: str = Field(max_length=16)


class TotpSecret(BaseModel):
    secret: str
    """Base32 secret to type into an authenticator app; shown only in this response."""
    otpauth_uri: str
    """The same secret as an otpauth:// URI, for a QR code."""


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(max_length=64)
    old_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024)
    totp: str | None = Field(default=None, max_length=16)
    """Current TOTP code; required when the user has enrolled a second factor."""


def _audited(request: Request, session: Session, caller: Principal, action: str, resource: str,
             write: Callable[[], T]) -> T:
    """Run ``write``; on an ApiError roll back, store a ``failed`` (403: ``denied``) audit event with the code and re-raise."""
    try:
        return write()
    except ApiError as error:
        session.rollback()
        record_event(request, caller, action, resource, "denied" if error.status == 403 else "failed",
                     {"code": error.code})
        raise


@router.post("/auth/password", status_code=204)
def change_password(
    body: PasswordChange,
    request: Request,
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("public")),
) -> None:
    """Change one's own password with the old one; works for an expired or administrator-issued password.

    Signs the user out everywhere: all their tokens and console sessions are revoked.
    """
    user = authenticate(session, request, body.username, body.old_password, action="auth.password",
                        totp_code=body.totp, purpose="password")
    principal = user_principal(user)
    _audited(request, session, principal, "auth.password", f"user:{user.username}",
             lambda: users.change_own_password(session, request, user, body.new_password))


@router.post("/auth/totp/enrol", response_model=TotpSecret)
def enrol_totp(
    body: TotpEnrol,
    request: Request,
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("public")),
) -> TotpSecret:
    """Start TOTP enrolment with user name and password: returns the secret once; confirm it with a first code."""
    user = authenticate(session, request, body.username, body.password, action="auth.totp_enrol",
                        purpose="totp_enrol")
    secret, uri = _audited(request, session, user_principal(user), "auth.totp_enrol", f"user:{user.username}",
                           lambda: users.start_totp_enrolment(session, request, user))
    return TotpSecret(secret=secret, otpauth_uri=uri)


@router.post("/auth/totp/confirm", status_code=204)
def confirm_totp(
    body: TotpConfirm,
    request: Request,
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("public")),
) -> None:
    """Confirm the pending TOTP secret with the current code; from then on every sign-in needs a code."""
    user = authenticate(session, request, body.username, body.password, action="auth.totp_confirm",
                        purpose="totp_enrol")
    _audited(request, session, user_principal(user), "auth.totp_confirm", f"user:{user.username}",
             lambda: users.confirm_totp_enrolment(session, request, user, body.code))


@router.post("/users/{username}/totp/reset", response_model=UserDetail)
def reset_totp(
    username: str, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write")),
) -> UserDetail:
    """Remove a user's TOTP second factor, e.g. after a lost device; the user enrols again."""
    user = _audited(request, session, caller, "users.totp_reset", f"user:{username}",
                    lambda: users.reset_totp(session, request, caller, username))
    return UserDetail.of(user, request)


@router.get("/users/{username}", response_model=UserDetail)
def get_user(
    username: str, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.list")),
) -> UserDetail:
    """Return one user with password and lockout state; institution administrators read their own institution's users."""
    user = _audited(request, session, caller, "users.read", f"user:{username[:64]}",
                    lambda: users.find_managed_user(session, caller, username))
    return UserDetail.of(user, request)


@router.post("/users", response_model=UserWithPassword, status_code=201)
def create_user(
    body: UserCreate, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write")),
) -> UserWithPassword:
    """Create a user. The initial password is generated (and returned once) unless given; it must be changed at first sign-in."""
    user, generated = _audited(request, session, caller, "users.create", f"user:{body.username[:64]}", lambda: users.create_user(
        session, request, caller, username=body.username, display_name=body.display_name, email=body.email,
        role=body.role, institution_code=body.institution_code, password=body.password,
    ))
    return UserWithPassword(user=UserDetail.of(user, request), password=generated)


@router.patch("/users/{username}", response_model=UserDetail)
def update_user(
    username: str, body: UserUpdate, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write")),
) -> UserDetail:
    """Change display name, email, role or institution of a user."""
    changes: dict[str, Any] = {name: getattr(body, name) for name in body.model_fields_set}
    for name in ("display_name", "email", "role"):
        if name in changes and changes[name] is None:
            del changes[name]
    user = _audited(request, session, caller, "users.update", f"user:{username}",
                    lambda: users.update_user(session, request, caller, username, changes))
    return UserDetail.of(user, request)


@router.post("/users/{username}/disable", response_model=UserDetail)
def disable_user(
    username: str, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write")),
) -> UserDetail:
    """Disable a user and revoke all their access tokens and console sessions at once."""
    user = _audited(request, session, caller, "users.disable", f"user:{username}",
                    lambda: users.set_active(session, request, caller, username, False))
    return UserDetail.of(user, request)


@router.post("/users/{username}/enable", response_model=UserDetail)
def enable_user(
    username: str, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write")),
) -> UserDetail:
    """Enable a disabled user."""
    user = _audited(request, session, caller, "users.enable", f"user:{username}",
                    lambda: users.set_active(session, request, caller, username, True))
    return UserDetail.of(user, request)


@router.post("/users/{username}/unlock", response_model=UserDetail)
def unlock_user(
    username: str, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write")),
) -> UserDetail:
    """Lift a lockout after repeated failed sign-ins."""
    user = _audited(request, session, caller, "users.unlock", f"user:{username}",
                    lambda: users.unlock_user(session, request, caller, username))
    return UserDetail.of(user, request)


@router.post("/users/{username}/reset-password", response_model=UserWithPassword)
def reset_password(
    username: str, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write")),
) -> UserWithPassword:
    """Give a user a new one-time password (returned once) that must be changed at the next sign-in."""
    user, password = _audited(request, session, caller, "users.reset_password", f"user:{username}",
                              lambda: users.reset_password(session, request, caller, username))
    return UserWithPassword(user=UserDetail.of(user, request), password=password)


EXPORT_MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


@router.get("/users/import/template")
def user_import_template(
    format: Literal["csv", "xlsx"] = Query(default="xlsx"),
    _caller: Principal = Depends(require("users.write")),
) -> Response:
    """Download an empty user import file with the Chinese column headers."""
    rows = user_files.template_rows()
    content = user_files.write_csv(rows) if format == "csv" else user_files.write_xlsx(rows)
    return Response(content, media_type=EXPORT_MEDIA_TYPES[format], headers={
        "Content-Disposition": f'attachment; filename="users_template.{format}"'})


@router.post("/users/import", max_body_size=MAX_UPLOAD_BODY_BYTES)
def import_users(
    request: Request,
    file: UploadFile = File(description="CSV（UTF-8 或 GB18030）或 XLSX 文件，首行为表头：用户名、姓名、电子邮箱、角色、机构代码"),
    mode: Literal["all_or_nothing", "valid_only"] = Query(default="all_or_nothing"),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write")),
) -> JSONResponse:
    """Create users from a file, each with a one-time password; by default nothing is imported when any row is bad.

    Returns 200 with the counts, the rejected rows and the one-time passwords (shown only in this
    response) when at least one user was imported, else 422 ``IMPORT_ROWS_INVALID`` with the counts
    and the rejected rows.
    """
    data = file.file.read(user_files.MAX_FILE_BYTES + 1)
    result = user_files.run_import(request, session, caller, data, file.filename or "upload", mode)
    return JSONResponse(user_files.result_body(result), status_code=200 if result.imported else 422,
                        headers={"Cache-Control": "no-store"})
