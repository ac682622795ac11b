"""Sign-in, the caller and users. Institutions are in :mod:`admin_api.routes.institutions`."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api import users as user_admin
from admin_api.deps import get_session, require
from admin_api.errors import invalid
from admin_api.models import User
from admin_api.schemas import SignIn, TokenResponse, UserListItem, UserPublic, VerifyRequest
from admin_api.security import API_TOKEN_LIFETIME, Principal, issue_token
from admin_api.services import authenticate

router = APIRouter()


@router.post("/auth/token", response_model=TokenResponse)
def sign_in(
    body: SignIn,
    request: Request,
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("public")),
) -> TokenResponse:
    """Sign in with user name and password and receive a bearer token."""
    user = authenticate(session, request, body.username, body.password, action="auth.token", totp_code=body.totp)
    token, _expires_at = issue_token(session, user, "api", API_TOKEN_LIFETIME)
    session.commit()
    return TokenResponse(
        access_token=token, expires_in=int(API_TOKEN_LIFETIME.total_seconds()), user=UserPublic.of(user)
    )


@router.post("/auth/verify", response_model=UserPublic)
def verify(
    body: VerifyRequest,
    request: Request,
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("auth.verify")),
) -> UserPublic:
    """Check a user's password on behalf of the hub; the user's address is audited."""
    user = authenticate(session, request, body.username, body.password, action="auth.verify", ip=body.source_ip,
                        totp_code=body.totp)
    session.commit()
    return UserPublic.of(user)


@router.get("/me", response_model=UserPublic)
def me(session: Session = Depends(get_session), caller: Principal = Depends(require("me.read"))) -> UserPublic:
    """Return the signed-in user."""
    user = session.scalars(select(User).where(User.username == caller.username)).one()
    return UserPublic.of(user)


@router.get("/users", response_model=list[UserListItem])
def list_users(
    response: Response,
    q: str | None = Query(default=None, max_length=100, description="用户名或姓名的片段"),
    role: str | None = Query(default=None, max_length=32),
    institution_code: str | None = Query(default=None, max_length=32),
    active: bool | None = Query(default=None, description="true：仅正常用户；false：仅已停用用户"),
    updated_since: datetime | None = Query(default=None, description="只列出此时间之后有变更的用户（ISO 8601，含时区）"),
    limit: int = Query(default=user_admin.LIST_LIMIT_DEFAULT, ge=1, le=user_admin.LIST_LIMIT_MAX),
    offset: int = Query(default=0, ge=0),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.list")),
) -> list[UserListItem]:
    """List one page of the users visible to the caller, ordered by user name.

    Institution administrators see their own institution's users only. The header ``X-Total-Count``
    contains the number of matches across all pages. Services poll changes with ``updated_since``.
    """
    if updated_since is not None and updated_since.tzinfo is None:
        raise invalid("UPDATED_SINCE_TIMEZONE_MISSING",
                      f"updated_since={updated_since.isoformat()} 缺少时区，请写成如 2026-12-05T08:00:00+08:00 或以 Z 结尾的 UTC 时间。")
    page, total = user_admin.search_user_summaries(session, caller, text=q, role=role, institution_code=institution_code,
                                                   active=active, updated_since=updated_since, limit=limit,
                                                   offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return page  # type: ignore[return-value]  # dicts of UserListItem's fields, validated once by response_model
