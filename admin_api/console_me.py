"""The console pages 个人设置: 本人信息 (``/console/me``) and 个人访问令牌 (``/console/tokens``).

Every signed-in user opens both pages for their own account only. The token forms call the same
functions as ``/api/v1/me/tokens`` (:mod:`admin_api.personal_tokens`), so the scope and expiry rules,
the Chinese messages and the audit events are the same. A new token appears only in the response
to the create form, and that response carries ``Cache-Control: no-store``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api import personal_tokens, totp
from admin_api.audit import record_event
from admin_api.console import _check_csrf, _page
from admin_api.db import utc_now
from admin_api.deps import get_session, require
from admin_api.errors import ApiError
from admin_api.models import ApiToken, User
from admin_api.passwords import password_expires_at
from admin_api.security import CAPABILITIES, Principal

router = APIRouter(prefix="/console", include_in_schema=False)

DEFAULT_TOKEN_DAYS = 30
_DAYS = re.compile(r"[0-9]{1,4}")
_NOTICES = {"revoked": "已吊销个人访问令牌，使用它的请求会立即被拒绝。"}


def _own_user(session: Session, caller: Principal) -> User:
    return session.scalars(select(User).where(User.username == caller.username)).one()


@router.get("/me", response_class=HTMLResponse)
def me_page(request: Request, session: Session = Depends(get_session),
            caller: Principal = Depends(require("console.use", console=True))) -> Response:
    """Show the caller's account: name, role, institution, password expiry and second-factor status."""
    user = _own_user(session, caller)
    expires_at = password_expires_at(user, request.app.state.settings)
    days_left = None
    if expires_at is not None:
        days_left = max(0, (expires_at - utc_now()).days)
    totp_state = "none"
    if totp.is_enrolled(user):
        totp_state = "enrolled"
    elif user.totp_secret:
        totp_state = "pending"
    return _page(request, "me.html", caller, user=user, password_expires_at=expires_at, days_left=days_left,
                 totp_state=totp_state, totp_required=totp.is_required(user, request))


def _token_state(row: ApiToken, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    return "expired" if row.expires_at <= now else "active"


def _tokens_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
                 error: str | None = None, form: dict[str, Any] | None = None,
                 created: dict[str, Any] | None = None) -> Response:
    now = utc_now()
    rows = personal_tokens.list_tokens(session, caller)
    max_days = request.app.state.settings.personal_token_max_days
    response = _page(
        request, "tokens.html", caller, status_code=status_code,
        tokens=[(row, _token_state(row, now)) for row in rows],
        scope_names={name: label for name, (label, _roles) in CAPABILITIES.items()},
        grantable=personal_tokens.grantable_scopes(caller.role), max_days=max_days,
        max_active=personal_tokens.MAX_ACTIVE_TOKENS, error=error,
        form=form or {"name": "", "scopes": [], "expires_in_days": str(min(DEFAULT_TOKEN_DAYS, max_days))},
        created=created, notice=None if error or created else _NOTICES.get(request.query_params.get("done", "")),
    )
    if created:
        response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/tokens", response_class=HTMLResponse)
def tokens_page(request: Request, session: Session = Depends(get_session),
                caller: Principal = Depends(require("me.tokens", console=True))) -> Response:
    """List the caller's personal access tokens with the form that creates one."""
    return _tokens_page(request, session, caller)


@router.post("/tokens", response_class=HTMLResponse)
def create_token_form(
    request: Request,
    name: str = Form(default="", max_length=100),
    scopes: list[str] = Form(default=[], max_length=64),
    expires_in_days: str = Form(default="", max_length=10),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("me.tokens", console=True)),
) -> Response:
    """Create a personal access token (same as POST /api/v1/me/tokens) and show it once."""
    _check_csrf(request, caller, "me.tokens", csrf)
    form = {"name": name, "scopes": scopes, "expires_in_days": expires_in_days.strip()}
    max_days = request.app.state.settings.personal_token_max_days
    try:
        if not _DAYS.fullmatch(form["expires_in_days"]):
            raise ApiError("TOKEN_EXPIRY_INVALID",
                           f"有效期“{form['expires_in_days']}”无效，请填写 1 到 {max_days} 之间的整数天数。", status=422)
        row, token = personal_tokens.create_token(session, request, caller, name=name, scopes=scopes,
                                                  expires_in_days=int(form["expires_in_days"]))
    except ApiError as error:
        session.rollback()
        record_event(request, caller, "tokens.create", "token:new", "denied" if error.status == 403 else "failed",
                     {"code": error.code})
        return _tokens_page(request, session, caller, status_code=error.status, error=error.message, form=form)
    created = {"id": row.id, "name": row.name, "token": token, "expires_at": row.expires_at}
    return _tokens_page(request, session, caller, status_code=201, created=created)


@router.post("/tokens/{token_id}/revoke", response_class=HTMLResponse)
def revoke_token_form(
    token_id: int,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("me.tokens", console=True)),
) -> Response:
    """Revoke one of the caller's personal access tokens (same as DELETE /api/v1/me/tokens/{id})."""
    _check_csrf(request, caller, "me.tokens", csrf)
    try:
        personal_tokens.revoke_token(session, request, caller, token_id)
    except ApiError as error:
        session.rollback()
        record_event(request, caller, "tokens.revoke", f"token:{token_id}", "failed", {"code": error.code})
        return _tokens_page(request, session, caller, status_code=error.status, error=error.message)
    return RedirectResponse("/console/tokens?done=revoked", status_code=303)
