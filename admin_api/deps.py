"""The authorisation dependency used by every route, and the database session dependency.

``Depends(require("models.review"))`` resolves the caller into a :class:`Principal` and checks
that its role has the capability. API routes accept a bearer token: the service token with an
``X-Regsandbox-Service`` header, or a user's access token. Console routes accept the session
cookie only, so a browser cookie can never drive an API write. API routes also declare
:data:`BEARER_SCHEME`, so the OpenAPI document describes how clients authenticate. Every denial returns
401 or 403 and is stored in the audit log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from admin_api.audit import record_event
from admin_api.errors import ApiError, forbidden, unauthenticated
from admin_api.roles import registry as role_registry
from admin_api.roles import role_name
from admin_api.security import (
    ANONYMOUS_PRINCIPAL,
    CAPABILITIES,
    SERVICE,
    SERVICE_NAMES,
    Principal,
    allows,
    find_token,
)
from regsandbox_core.crypto import constant_time_equal

SESSION_COOKIE = "regsandbox_session"

BEARER_SCHEME = HTTPBearer(
    scheme_name="BearerToken",
    auto_error=False,
    description=(
        "用户访问令牌：调用 POST /api/v1/auth/token 获得，放在请求头 “Authorization: Bearer <令牌>” 中，"
        "有效期 8 小时。平台服务使用服务令牌，并同时发送请求头 X-Regsandbox-Service（hub、scheduler 或 registry）。"
    ),
)
"""Bearer scheme declared on every API route in the OpenAPI document. :func:`require` checks the token itself."""


async def get_session(request: Request) -> AsyncIterator[Session]:
    """Open the request's database session, and close it after the route.

    An async dependency, so opening (which does no I/O) costs no trip to a worker thread. Closing a
    session that still holds a connection rolls back; on PostgreSQL that is a round trip to the
    server, so it runs in a worker thread, while SQLite's in-process rollback runs here.
    """
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction() and session.get_bind().dialect.name != "sqlite":
            await run_in_threadpool(session.close)
        else:
            session.close()


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthenticated("INVALID_TOKEN", "Authorization 请求头格式无效，应为 “Bearer <令牌>”。")
    return value.strip()


def _service_principal(request: Request) -> Principal:
    name = request.headers.get("x-regsandbox-service", "")
    if name not in SERVICE_NAMES:
        raise unauthenticated(
            "SERVICE_HEADER_INVALID",
            f"服务令牌须与 X-Regsandbox-Service 请求头一起使用，取值为 {'、'.join(sorted(SERVICE_NAMES))}；"
            f"收到的是 {name!r}。",
        )
    return Principal(kind=SERVICE, username=f"service:{name}", role=SERVICE)


class _Denied(Exception):
    """A denial whose caller is already known, so the audit event can name it."""

    def __init__(self, principal: Principal, error: ApiError) -> None:
        super().__init__(error.code)
        self.principal = principal
        self.error = error


def _user_principal(session: Session, token: str, kind: str, idle_timeout: timedelta | None = None) -> Principal:
    holder = find_token(session, token, kind, idle_timeout=idle_timeout)
    if holder is None:
        if kind == "console":
            raise unauthenticated("NOT_AUTHENTICATED", "会话已过期或无效，请重新登录。")
        raise unauthenticated("INVALID_TOKEN", "访问令牌无效或已过期，请重新调用 /api/v1/auth/token 登录。")
    principal = Principal(kind="user", username=holder.username, role=holder.role,
                          institution_code=holder.institution_code,
                          scopes=frozenset(holder.scopes) if holder.scopes is not None else None, user_id=holder.user_id)
    if not holder.is_active:
        raise _Denied(principal, forbidden("USER_DISABLED", f"用户 {holder.username} 已被停用，请联系系统管理员。"))
    return principal


def resolve_principal(request: Request, session: Session, *, console: bool) -> Principal:
    """Return the caller of ``request``, or ANONYMOUS_PRINCIPAL when it sent no credentials.

    Raises ApiError (401) for invalid credentials and _Denied (403) for a disabled user.
    """
    if console:
        cookie = request.cookies.get(SESSION_COOKIE)
        idle = timedelta(minutes=request.app.state.settings.console_idle_minutes)
        return _user_principal(session, cookie, "console", idle) if cookie else ANONYMOUS_PRINCIPAL

    token = _bearer_token(request)
    if token is None:
        return ANONYMOUS_PRINCIPAL
    if constant_time_equal(token, request.app.state.secrets.service_token):
        return _service_principal(request)
    return _user_principal(session, token, "api")


def deny(request: Request, principal: Principal, capability: str, error: ApiError) -> ApiError:
    """Store the denial in the audit log and return ``error`` for the caller to raise."""
    record_event(
        request,
        principal,
        action=capability,
        resource=f"{request.method} {request.url.path}",
        outcome="denied",
        detail={"code": error.code},
    )
    return error


def require(capability: str, *, console: bool = False) -> Callable[..., Principal]:
    """Build the dependency that admits callers whose role has ``capability``."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")

    def dependency(request: Request, session: Session = Depends(get_session)) -> Principal:
        return _authorise(request, session, capability, console)

    dependency.capability = capability  # type: ignore[attr-defined]  # read by the permission matrix
    if console or capability == "public":
        return dependency

    def api_dependency(
        request: Request,
        session: Session = Depends(get_session),
        _declared: HTTPAuthorizationCredentials | None = Security(BEARER_SCHEME),
    ) -> Principal:
        return _authorise(request, session, capability, console)

    api_dependency.capability = capability  # type: ignore[attr-defined]
    return api_dependency


def _authorise(request: Request, session: Session, capability: str, console: bool) -> Principal:
    """Resolve the caller and check ``capability``; every denial is audited."""
    try:
        principal = resolve_principal(request, session, console=console)
    except _Denied as denied:
        raise deny(request, denied.principal, capability, denied.error) from None
    except ApiError as error:
        if console:
            raise  # a console visitor without a valid session is sent to the login form
        raise deny(request, ANONYMOUS_PRINCIPAL, capability, error) from None

    request.state.principal = principal
    role_registry.refresh_if_stale(session)
    in_scope = principal.scopes is None or capability == "public" or capability in principal.scopes
    if allows(principal.role, capability) and in_scope:
        return principal
    if allows(principal.role, capability):
        raise deny(request, principal, capability, forbidden(
            "TOKEN_SCOPE_FORBIDDEN", f"此个人访问令牌的权限范围不含“{CAPABILITIES[capability][0]}”（{capability}），"
            "请使用含该权限的令牌，或重新登录获取访问令牌。"
        ))
    if principal.kind == "anonymous":
        if console:
            raise unauthenticated("NOT_AUTHENTICATED", "请先登录。")
        raise deny(request, principal, capability, unauthenticated(
            "NOT_AUTHENTICATED", "未提供访问令牌。请在 Authorization 请求头中提供 “Bearer <令牌>”。"
        ))
    raise deny(request, principal, capability, forbidden(
        "FORBIDDEN", f"当前角色（{role_name(principal.role)}）无权执行此操作：{CAPABILITIES[capability][0]}。"
    ))


def check_institution(request: Request, principal: Principal, capability: str, institution_code: str | None) -> None:
    """Deny an institution user access to another institution's resource (403, audited)."""
    if principal.institution_code is None or principal.institution_code == institution_code:
        return
    raise deny(request, principal, capability, forbidden(
        "INSTITUTION_FORBIDDEN", f"您只能访问本机构（{principal.institution_code}）的数据，无权访问机构 {institution_code}。"
    ))
