"""Personal API tokens: named bearer tokens limited to chosen capabilities (scopes) and a lifetime.

A personal token is an ``api_tokens`` row of kind ``api`` with a ``name`` and a ``scopes`` list;
:func:`admin_api.deps.require` admits it only for capabilities in that list (and ``public``). The
token is returned once and only its SM3 digest is stored. Only a sign-in token or console session
can create one, so a personal token cannot mint tokens with wider scopes or a later expiry.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.errors import conflict, forbidden, invalid, not_found
from admin_api.models import ApiToken, User
from admin_api.security import CAPABILITIES, Principal, allows, token_digest

MAX_ACTIVE_TOKENS = 20
"""Unexpired, unrevoked personal tokens one user may hold."""
UNSCOPABLE = frozenset({"public", "console.use", "me.tokens"})
"""Capabilities a personal token cannot carry: public needs no token, the console needs a session."""


def grantable_scopes(role: str) -> list[str]:
    return sorted(c for c in CAPABILITIES if c not in UNSCOPABLE and allows(role, c))


def _owner(session: Session, caller: Principal) -> User:
    return session.scalars(select(User).where(User.username == caller.username)).one()


def create_token(
    session: Session, request: Request, caller: Principal, *, name: str, scopes: list[str], expires_in_days: int,
) -> tuple[ApiToken, str]:
    """Store a personal token of the caller and return it with the clear token; commit."""
    max_days = request.app.state.settings.personal_token_max_days
    if caller.scopes is not None:
        raise forbidden("PERSONAL_TOKEN_NOT_ALLOWED",
                        "个人访问令牌不能用来创建新令牌，请先用用户名和密码登录，再用登录得到的访问令牌创建。")
    if not name.strip():
        raise invalid("TOKEN_NAME_MISSING", "令牌名称（name）不能为空，请填写用途，例如“季度报送脚本”。")
    if not 1 <= expires_in_days <= max_days:
        raise invalid("TOKEN_EXPIRY_INVALID",
                      f"有效期（expires_in_days）为 {expires_in_days} 天，须在 1 到 {max_days} 天之间。")
    allowed = grantable_scopes(caller.role)
    if not scopes:
        raise invalid("TOKEN_SCOPES_MISSING", f"请至少选择一项权限（scopes），可选：{'、'.join(allowed)}。")
    outside = sorted(set(scopes) - set(allowed))
    if outside:
        raise invalid("TOKEN_SCOPES_INVALID",
                      f"权限 {'、'.join(outside)} 不在您的角色可授予的范围内，可选：{'、'.join(allowed) or '无'}。")

    owner = _owner(session, caller)
    now = utc_now()
    active = session.scalar(select(func.count()).select_from(ApiToken).where(
        ApiToken.user_id == owner.id, ApiToken.name.is_not(None), ApiToken.revoked_at.is_(None),
        ApiToken.expires_at > now))
    if (active or 0) >= MAX_ACTIVE_TOKENS:
        raise conflict("TOO_MANY_TOKENS",
                       f"您已有 {MAX_ACTIVE_TOKENS} 个有效的个人访问令牌，请先吊销不再使用的令牌。")

    token = secrets.token_urlsafe(32)
    row = ApiToken(token_sm3=token_digest(token), kind="api", user_id=owner.id, name=name.strip(),
                   scopes=sorted(set(scopes)), expires_at=now + timedelta(days=expires_in_days))
    session.add(row)
    session.flush()
    add_event(session, request, caller, "tokens.create", f"token:{row.id}", "success",
              {"name": row.name, "scopes": row.scopes, "expires_at": row.expires_at.isoformat()})
    session.commit()
    return row, token


def list_tokens(session: Session, caller: Principal) -> list[ApiToken]:
    """Return the caller's personal tokens, newest first, including expired and revoked ones."""
    owner = _owner(session, caller)
    query = select(ApiToken).where(ApiToken.user_id == owner.id, ApiToken.name.is_not(None))
    return list(session.scalars(query.order_by(ApiToken.id.desc()).limit(200)))


def revoke_token(session: Session, request: Request, caller: Principal, token_id: int) -> ApiToken:
    """Revoke one of the caller's personal tokens; commit. Another user's token is reported as not found."""
    owner = _owner(session, caller)
    row = session.scalars(select(ApiToken).where(
        ApiToken.id == token_id, ApiToken.user_id == owner.id, ApiToken.name.is_not(None))).first()
    if row is None:
        raise not_found("TOKEN_NOT_FOUND", f"您没有编号为 {token_id} 的个人访问令牌。")
    if row.revoked_at is None:
        row.revoked_at = utc_now()
        add_event(session, request, caller, "tokens.revoke", f"token:{row.id}", "success", {"name": row.name})
        session.commit()
    return row
