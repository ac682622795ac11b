"""Personal API tokens of the signed-in user (``/api/v1/me/tokens``)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from admin_api import personal_tokens
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.errors import ApiError
from admin_api.models import ApiToken
from admin_api.security import Principal

router = APIRouter()


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=100)
    scopes: list[str] = Field(max_length=64)
    """Capabilities the token may use, a subset of the caller's role (GET /me/tokens/scopes lists them)."""
    expires_in_days: int = Field(default=30)


class TokenOut(BaseModel):
    id: int
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiToken) -> TokenOut:
        return cls(id=row.id, name=row.name or "", scopes=row.scopes or [], created_at=row.created_at,
                   expires_at=row.expires_at, revoked_at=row.revoked_at)


class TokenCreated(TokenOut):
    token: str
    """The bearer token, shown only in this response."""


@router.get("/me/tokens/scopes", response_model=list[str])
def grantable_scopes(caller: Principal = Depends(require("me.tokens"))) -> list[str]:
    """List the capabilities the caller may put into a personal token."""
    return personal_tokens.grantable_scopes(caller.role)


@router.post("/me/tokens", response_model=TokenCreated, status_code=201)
def create_token(
    body: TokenCreate, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("me.tokens")),
) -> TokenCreated:
    """Create a personal token; the token is returned once and stored as its SM3 digest."""
    try:
        row, token = personal_tokens.create_token(session, request, caller, name=body.name, scopes=body.scopes,
                                                  expires_in_days=body.expires_in_days)
    except ApiError as error:
        session.rollback()
        record_event(request, caller, "tokens.create", "token:new", "failed", {"code": error.code})
        raise
    return TokenCreated(**TokenOut.of(row).model_dump(), token=token)


@router.get("/me/tokens", response_model=list[TokenOut])
def list_tokens(session: Session = Depends(get_session),
                caller: Principal = Depends(require("me.tokens"))) -> list[TokenOut]:
    """List the caller's personal tokens (newest 200) without the tokens themselves."""
    return [TokenOut.of(row) for row in personal_tokens.list_tokens(session, caller)]


@router.delete("/me/tokens/{token_id}", status_code=204)
def revoke_token(
    token_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("me.tokens")),
) -> None:
    """Revoke one of the caller's personal tokens; it stops working at once."""
    try:
        personal_tokens.revoke_token(session, request, caller, token_id)
    except ApiError as error:
        session.rollback()
        record_event(request, caller, "tokens.revoke", f"token:{token_id}", "failed", {"code": error.code})
        raise
