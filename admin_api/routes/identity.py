"""Sign-in, the caller, users and institutions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.deps import check_institution, get_session, require
from admin_api.errors import not_found
from admin_api.models import Institution, User
from admin_api.schemas import InstitutionPublic, SignIn, TokenResponse, UserListItem, UserPublic, VerifyRequest
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
    user = authenticate(session, request, body.username, body.password, action="auth.token")
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
    user = authenticate(session, request, body.username, body.password, action="auth.verify", ip=body.source_ip)
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


@router.get("/institutions", response_model=list[InstitutionPublic])
def list_institutions(
    session: Session = Depends(get_session), caller: Principal = Depends(require("institutions.read"))
) -> list[InstitutionPublic]:
    """List the institutions visible to the caller: institution users see their own only."""
    query = select(Institution).order_by(Institution.code)
    if caller.institution_code is not None:
        query = query.where(Institution.code == caller.institution_code)
    return [InstitutionPublic(code=i.code, name=i.name, type=i.type) for i in session.scalars(query)]


@router.get("/institutions/{code}", response_model=InstitutionPublic)
def get_institution(
    code: str,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.read")),
) -> InstitutionPublic:
    """Return one institution; institution users may only read their own."""
    check_institution(request, caller, "institutions.read", code)
    institution = session.scalars(select(Institution).where(Institution.code == code)).first()
    if institution is None:
        raise not_found("INSTITUTION_NOT_FOUND", f"机构代码 {code} 不存在。")
    return InstitutionPublic(code=institution.code, name=institution.name, type=institution.type)
