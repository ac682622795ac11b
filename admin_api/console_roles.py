"""The console page 角色管理: the roles and their capabilities, and the custom roles of the system administrator.

System, security and audit administrators read the page (``roles.read``); only the system
administrator defines, changes and deletes custom roles (``roles.write``). The forms call
:mod:`admin_api.roles`, so the rules, messages and audit events are those of ``/api/v1/roles``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from admin_api import roles
from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.errors import ApiError
from admin_api.routes.roles import holder_counts
from admin_api.routes.users import _audited
from admin_api.security import CAPABILITIES, Principal

router = APIRouter(prefix="/console", include_in_schema=False)

_NOTICES = {"created": "已新建角色 {}。", "updated": "已保存角色 {} 的修改。", "deleted": "已删除角色 {}。"}


def _capability_table() -> list[dict[str, Any]]:
    """Return every capability a custom role may hold, with its name, scopes and reserved administrator."""
    grantable = {scope: roles.grantable_capabilities(scope) for scope in roles.SCOPE_NAMES}
    reserved = {cap: admin for admin, caps in roles.SEPARATED_DUTIES.items() for cap in caps}
    return [
        {"code": cap, "name": label, "institution": cap in grantable[roles.INSTITUTION],
         "reserved_to": roles.role_name(reserved[cap]) if cap in reserved else ""}
        for cap, (label, _holders) in CAPABILITIES.items() if cap in grantable[roles.REGULATOR]
    ]


def _roles_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
                error: str | None = None, form: dict[str, Any] | None = None) -> Response:
    notice = None
    done, code = request.query_params.get("done", ""), request.query_params.get("role", "")
    if done in _NOTICES and roles.ROLE_CODE_PATTERN.match(code):
        notice = _NOTICES[done].format(code)
    return _page(
        request, "roles.html", caller, status_code=status_code, roles=list(roles.all_roles().values()),
        counts=holder_counts(session), capabilities=_capability_table(), capability_names=CAPABILITIES,
        scope_names=roles.SCOPE_NAMES, notice=None if error else notice, error=error, form=form or {},
    )


def _done(action: str, code: str) -> Response:
    return RedirectResponse(f"/console/roles?{urlencode({'done': action, 'role': code})}", status_code=303)


@router.get("/roles", response_class=HTMLResponse)
def roles_page(request: Request, session: Session = Depends(get_session),
               caller: Principal = Depends(require("roles.read", console=True))) -> Response:
    """Show every role with its scope, capabilities and number of users, and the custom-role forms."""
    return _roles_page(request, session, caller)


@router.post("/roles", response_class=HTMLResponse)
def create_role_form(
    request: Request,
    code: str = Form(default="", max_length=64),
    name: str = Form(default="", max_length=100),
    scope: str = Form(default="", max_length=16),
    description: str = Form(default="", max_length=1000),
    capabilities: list[str] = Form(default=[], max_length=64),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("roles.write", console=True)),
) -> Response:
    """Define a custom role (same as POST /api/v1/roles)."""
    _check_csrf(request, caller, "roles.write", csrf)
    form = {"code": code.strip(), "name": name, "scope": scope, "description": description,
            "capabilities": capabilities}
    try:
        _audited(request, session, caller, "roles.create", f"role:{form['code'][:64]}", lambda: roles.create_role(
            session, request, caller, code=form["code"], name=name, scope=scope, capabilities=capabilities,
            description=description))
    except ApiError as error:
        return _roles_page(request, session, caller, status_code=error.status, error=error.message, form=form)
    return _done("created", form["code"])


@router.post("/roles/{code}/edit", response_class=HTMLResponse)
def update_role_form(
    code: str,
    request: Request,
    name: str = Form(default="", max_length=100),
    description: str = Form(default="", max_length=1000),
    capabilities: list[str] = Form(default=[], max_length=64),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("roles.write", console=True)),
) -> Response:
    """Save a custom role's name, description and capabilities (same as PATCH /api/v1/roles/{code})."""
    _check_csrf(request, caller, "roles.write", csrf)
    changes = {"name": name, "description": description, "capabilities": capabilities}
    try:
        _audited(request, session, caller, "roles.update", f"role:{code[:64]}",
                 lambda: roles.update_role(session, request, caller, code, changes))
    except ApiError as error:
        return _roles_page(request, session, caller, status_code=error.status, error=error.message)
    return _done("updated", code)


@router.post("/roles/{code}/delete", response_class=HTMLResponse)
def delete_role_form(
    code: str,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("roles.write", console=True)),
) -> Response:
    """Delete a custom role that no user has (same as DELETE /api/v1/roles/{code})."""
    _check_csrf(request, caller, "roles.write", csrf)
    try:
        _audited(request, session, caller, "roles.delete", f"role:{code[:64]}",
                 lambda: roles.delete_role(session, request, caller, code))
    except ApiError as error:
        return _roles_page(request, session, caller, status_code=error.status, error=error.message)
    return _done("deleted", code)
