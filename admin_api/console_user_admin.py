"""The console page 用户管理: search and page through users, create, edit, disable and enable, unlock, reset password.

Only roles with ``users.write`` (system administrators) open the page. The forms call the functions
of :mod:`admin_api.users` through the same audit wrapper as the API, so the rules, Chinese messages
and audit events are the same as for ``/api/v1/users``. A generated one-time password appears only
in the response to the create or reset form, and that response carries ``Cache-Control: no-store``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from admin_api import users
from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.errors import ApiError
from admin_api.models import ROLE_NAMES, Institution, User
from admin_api.routes.users import _audited
from admin_api.security import Principal

router = APIRouter(prefix="/console", include_in_schema=False)

PAGE_SIZE = 50
STATUS_NAMES = {"active": "正常", "disabled": "已停用"}
_NOTICES = {
    "updated": "已保存用户 {} 的修改。",
    "disabled": "已停用用户 {}，其访问令牌和控制台会话均已注销。",
    "enabled": "已启用用户 {}。",
    "unlocked": "已解锁用户 {}。",
}
_ONE_TIME_TITLES = {"created": "已新建用户 {}。", "reset": "已重置用户 {} 的密码，其访问令牌和控制台会话均已注销。"}


def search_users(session: Session, *, text: str, role: str | None, institution_code: str | None,
                 status: str | None, limit: int, offset: int) -> tuple[list[User], int]:
    """Return one page of users ordered by user name, and the number of users matching the filters.

    ``text`` matches a substring of the user name or the display name, ignoring ASCII case.
    NOTE: the substring match cannot use an index, so it scans the users table (20,000 rows at the target scale).
    """
    conditions: list[Any] = []
    if text:
        conditions.append(or_(User.username.icontains(text, autoescape=True),
                              User.display_name.icontains(text, autoescape=True)))
    if role:
        conditions.append(User.role == role)
    if institution_code:
        conditions.append(User.institution_id.in_(select(Institution.id).where(Institution.code == institution_code)))
    if status:
        conditions.append(User.is_active.is_(status == "active"))
    total = session.scalar(select(func.count()).select_from(User).where(*conditions)) or 0
    rows = session.scalars(select(User).where(*conditions).order_by(User.username).limit(limit).offset(offset))
    return list(rows.unique()), total


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done", "")
    username = request.query_params.get("user", "")
    if done in _NOTICES and users.USERNAME_PATTERN.match(username):
        return _NOTICES[done].format(username)
    return None


def _list_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
               error: str | None = None, form: dict[str, str] | None = None,
               one_time: dict[str, str] | None = None) -> Response:
    params = request.query_params
    text = params.get("q", "").strip()[:100]
    role = params.get("role", "") if params.get("role", "") in ROLE_NAMES else ""
    institution_code = params.get("institution", "").strip()[:32]
    status = params.get("status", "") if params.get("status", "") in STATUS_NAMES else ""
    offset_text = params.get("offset", "0")
    offset = int(offset_text) if offset_text.isdigit() else 0
    found, total = search_users(session, text=text, role=role or None, institution_code=institution_code or None,
                                status=status or None, limit=PAGE_SIZE, offset=offset)
    filters = {key: value for key, value in (("q", text), ("role", role), ("institution", institution_code),
                                             ("status", status)) if value}
    previous_url = f"?{urlencode({**filters, 'offset': max(offset - PAGE_SIZE, 0)})}" if offset > 0 else None
    next_url = f"?{urlencode({**filters, 'offset': offset + PAGE_SIZE})}" if offset + PAGE_SIZE < total else None
    response = _page(
        request, "users.html", caller, status_code=status_code, users=found, total=total,
        first=offset + 1 if found else 0, last=offset + len(found), previous_url=previous_url, next_url=next_url,
        filters={"q": text, "role": role, "institution": institution_code, "status": status},
        roles=ROLE_NAMES, institution_roles=users.INSTITUTION_ROLES, user_status_names=STATUS_NAMES,
        notice=None if error or one_time else _notice(request), error=error, form=form or {}, one_time=one_time,
    )
    if one_time:
        response.headers["Cache-Control"] = "no-store"
    return response


def _done(action: str, username: str) -> Response:
    return RedirectResponse(f"/console/users?{urlencode({'done': action, 'user': username})}", status_code=303)


@router.get("/users", response_class=HTMLResponse)
def users_page(request: Request, session: Session = Depends(get_session),
               caller: Principal = Depends(require("users.write", console=True))) -> Response:
    """List users with search and paging, and the form that creates one."""
    return _list_page(request, session, caller)


@router.post("/users", response_class=HTMLResponse)
def create_form(
    request: Request,
    username: str = Form(default="", max_length=64),
    display_name: str = Form(default="", max_length=100),
    email: str = Form(default="", max_length=254),
    role: str = Form(default="", max_length=32),
    institution_code: str = Form(default="", max_length=32),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write", console=True)),
) -> Response:
    """Create a user with a generated password (same as POST /api/v1/users without a password) and show it once."""
    _check_csrf(request, caller, "users.write", csrf)
    form = {"username": username.strip(), "display_name": display_name, "email": email.strip(), "role": role,
            "institution_code": institution_code.strip()}
    try:
        user, password = _audited(request, session, caller, "users.create", f"user:{form['username'][:64]}",
                                  lambda: users.create_user(
                                      session, request, caller, username=form["username"],
                                      display_name=display_name, email=form["email"], role=role,
                                      institution_code=form["institution_code"] or None, password=None))
    except ApiError as error:
        return _list_page(request, session, caller, status_code=error.status, error=error.message, form=form)
    one_time = {"title": _ONE_TIME_TITLES["created"].format(user.username), "username": user.username,
                "password": password or ""}
    return _list_page(request, session, caller, status_code=201, one_time=one_time)


def _edit_values(user: User) -> dict[str, str]:
    return {"display_name": user.display_name, "email": user.email, "role": user.role,
            "institution_code": user.institution_code or ""}


@router.get("/users/{username}/edit", response_class=HTMLResponse)
def edit_page(username: str, request: Request, session: Session = Depends(get_session),
              caller: Principal = Depends(require("users.write", console=True))) -> Response:
    """Show the edit form of one user."""
    user = users.find_user(session, username)
    return _page(request, "user_edit.html", caller, user=user, form=_edit_values(user), roles=ROLE_NAMES,
                 user_status_names=STATUS_NAMES, error=None)


@router.post("/users/{username}/edit", response_class=HTMLResponse)
def edit_form(
    username: str,
    request: Request,
    display_name: str = Form(default="", max_length=100),
    email: str = Form(default="", max_length=254),
    role: str = Form(default="", max_length=32),
    institution_code: str = Form(default="", max_length=32),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write", console=True)),
) -> Response:
    """Save the edit form (same as PATCH /api/v1/users/{username} with every field; an empty institution removes it)."""
    _check_csrf(request, caller, "users.write", csrf)
    form = {"display_name": display_name, "email": email.strip(), "role": role,
            "institution_code": institution_code.strip()}
    changes: dict[str, Any] = {**form, "institution_code": form["institution_code"] or None}
    try:
        _audited(request, session, caller, "users.update", f"user:{username}",
                 lambda: users.update_user(session, request, caller, username, changes))
    except ApiError as error:
        user = users.find_user(session, username)
        return _page(request, "user_edit.html", caller, status_code=error.status, user=user, form=form,
                     roles=ROLE_NAMES, user_status_names=STATUS_NAMES, error=error.message)
    return _done("updated", username)


def _account_form(request: Request, session: Session, caller: Principal, username: str, csrf: str,
                  action: str, write: Any, done: str) -> Response:
    """Run one of the one-click account operations and return to the list with its result."""
    _check_csrf(request, caller, "users.write", csrf)
    try:
        _audited(request, session, caller, action, f"user:{username}", write)
    except ApiError as error:
        return _list_page(request, session, caller, status_code=error.status, error=error.message)
    return _done(done, username)


@router.post("/users/{username}/disable", response_class=HTMLResponse)
def disable_form(username: str, request: Request, csrf: str = Form(default="", alias="csrf_token", max_length=200),
                 session: Session = Depends(get_session),
                 caller: Principal = Depends(require("users.write", console=True))) -> Response:
    """Disable a user and revoke their tokens and console sessions (same as POST /api/v1/users/{username}/disable)."""
    return _account_form(request, session, caller, username, csrf, "users.disable",
                         lambda: users.set_active(session, request, caller, username, False), "disabled")


@router.post("/users/{username}/enable", response_class=HTMLResponse)
def enable_form(username: str, request: Request, csrf: str = Form(default="", alias="csrf_token", max_length=200),
                session: Session = Depends(get_session),
                caller: Principal = Depends(require("users.write", console=True))) -> Response:
    """Enable a disabled user."""
    return _account_form(request, session, caller, username, csrf, "users.enable",
                         lambda: users.set_active(session, request, caller, username, True), "enabled")


@router.post("/users/{username}/unlock", response_class=HTMLResponse)
def unlock_form(username: str, request: Request, csrf: str = Form(default="", alias="csrf_token", max_length=200),
                session: Session = Depends(get_session),
                caller: Principal = Depends(require("users.write", console=True))) -> Response:
    """Lift a lockout after repeated failed sign-ins."""
    return _account_form(request, session, caller, username, csrf, "users.unlock",
                         lambda: users.unlock_user(session, request, caller, username), "unlocked")


@router.post("/users/{username}/reset-password", response_class=HTMLResponse)
def reset_password_form(username: str, request: Request,
                        csrf: str = Form(default="", alias="csrf_token", max_length=200),
                        session: Session = Depends(get_session),
                        caller: Principal = Depends(require("users.write", console=True))) -> Response:
    """Give a user a new one-time password and show it once (same as POST /api/v1/users/{username}/reset-password)."""
    _check_csrf(request, caller, "users.write", csrf)
    try:
        user, password = _audited(request, session, caller, "users.reset_password", f"user:{username}",
                                  lambda: users.reset_password(session, request, caller, username))
    except ApiError as error:
        return _list_page(request, session, caller, status_code=error.status, error=error.message)
    one_time = {"title": _ONE_TIME_TITLES["reset"].format(user.username), "username": user.username,
                "password": password}
    return _list_page(request, session, caller, one_time=one_time)
