"""Sign-in, the caller and users. Institutions are in :mod:`admin_api.routes.institutions`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.deps import get_session, require
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
    session: Session = Depends(get_session), _caller: Principal = Depends(require("users.list"))
) -> list[UserListItem]:
    """List all users."""
    users = session.scalars(select(User).order_by(User.username))
    return [
        UserListItem(username=u.username, display_name=u.display_name, role=u.role,
                     institution_code=u.institution_code, is_active=u.is_active, email=u.email)
        for u in users
    ]

