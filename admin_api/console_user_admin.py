"""The console page 用户管理: search and page through users, create, edit, disable and enable, unlock, reset password.

Only roles with ``users.write`` open the page: system administrators for every user, institution
administrators (机构管理员) for their own institution's users. The forms call the functions
of :mod:`admin_api.users` through the same audit wrapper as the API, so the rules, Chinese messages
and audit events are the same as for ``/api/v1/users``. A generated one-time password appears only
in the response to the create or reset form, and that response carries ``Cache-Control: no-store``.
"""

from __future__ import annotations

import base64
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from admin_api import roles, user_files, users
from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.errors import ApiError
from admin_api.limits import MAX_UPLOAD_BODY_BYTES
from admin_api.models import User
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
IMPORT_LIMITS = {"megabytes": user_files.MAX_FILE_BYTES // 1024 // 1024, "rows": user_files.MAX_ROWS}


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done", "")
    username = request.query_params.get("user", "")
    if done in _NOTICES and users.USERNAME_PATTERN.match(username):
        return _NOTICES[done].format(username)
    return None


def _list_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
               error: str | None = None, form: dict[str, str] | None = None,
               one_time: dict[str, str] | None = None, import_view: dict[str, Any] | None = None) -> Response:
    params = request.query_params
    text = params.get("q", "").strip()[:100]
    role = params.get("role", "") if roles.get_role(params.get("role", "")) else ""
    institution_code = params.get("institution", "").strip()[:32]
    status = params.get("status", "") if params.get("status", "") in STATUS_NAMES else ""
    offset_text = params.get("offset", "0")
    offset = int(offset_text) if offset_text.isdigit() else 0
    found, total = users.search_users(session, caller, text=text, role=role or None,
                                      institution_code=institution_code or None,
                                      active=(status == "active") if status else None, limit=PAGE_SIZE, offset=offset)
    filters = {key: value for key, value in (("q", text), ("role", role), ("institution", institution_code),
                                             ("status", status)) if value}
    previous_url = f"?{urlencode({**filters, 'offset': max(offset - PAGE_SIZE, 0)})}" if offset > 0 else None
    next_url = f"?{urlencode({**filters, 'offset': offset + PAGE_SIZE})}" if offset + PAGE_SIZE < total else None
    response = _page(
        request, "users.html", caller, status_code=status_code, users=found, total=total,
        first=offset + 1 if found else 0, last=offset + len(found), previous_url=previous_url, next_url=next_url,
        filters={"q": text, "role": role, "institution": institution_code, "status": status},
        **_role_choices(caller), user_status_names=STATUS_NAMES,
        notice=None if error or one_time else _notice(request), error=error, form=form or {}, one_time=one_time,
        import_view=import_view, import_limits=IMPORT_LIMITS,
    )
    if one_time or import_view:
        response.headers["Cache-Control"] = "no-store"
    return response


def _role_choices(caller: Principal, current: str | None = None) -> dict[str, Any]:
    """Return the template values for role names: every role for labels, the assignable ones (and ``current``) for the forms."""
    assignable = roles.assignable_roles(caller)
    if current is not None and current not in assignable and roles.get_role(current):
        assignable = {current: roles.get_role(current), **assignable}
    every = roles.all_roles()
    return {
        "roles": {code: info.name for code, info in every.items()},
        "filter_roles": {code: info.name for code, info in every.items()
                         if caller.institution_code is None or info.scope == roles.INSTITUTION},
        "assignable": {code: info.name for code, info in assignable.items()},
        "institution_roles": {code for code, info in assignable.items() if info.scope == roles.INSTITUTION},
    }


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
    user = users.find_managed_user(session, caller, username)
    return _page(request, "user_edit.html", caller, user=user, form=_edit_values(user), **_role_choices(caller, user.role),
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
        user = users.find_managed_user(session, caller, username)
        return _page(request, "user_edit.html", caller, status_code=error.status, user=user, form=form,
                     **_role_choices(caller, user.role), user_status_names=STATUS_NAMES, error=error.message)
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


def _csv_data_uri(rows: Any) -> str:
    """Return a data: URI of a CSV file, so the page offers it for download without the server storing it."""
    return "data:text/csv;charset=utf-8;base64," + base64.b64encode(user_files.write_csv(rows)).decode("ascii")


@router.get("/users/import/template")
def user_import_template(format: Literal["csv", "xlsx"] = Query(default="xlsx"),
                         _caller: Principal = Depends(require("users.write", console=True))) -> Response:
    """Download an empty user import file (same as GET /api/v1/users/import/template)."""
    rows = user_files.template_rows()
    content = user_files.write_csv(rows) if format == "csv" else user_files.write_xlsx(rows)
    media_type = "text/csv; charset=utf-8" if format == "csv" else (
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")
    return Response(content, media_type=media_type,
                    headers={"Content-Disposition": f'attachment; filename="users_template.{format}"'})


@router.post("/users/import", response_class=HTMLResponse, max_body_size=MAX_UPLOAD_BODY_BYTES)
def import_form(
    request: Request,
    file: UploadFile = File(),
    mode: Literal["all_or_nothing", "valid_only"] = Form(default="all_or_nothing"),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("users.write", console=True)),
) -> Response:
    """Import users from a CSV or XLSX file (same as POST /api/v1/users/import) and show the one-time passwords once.

    The rejected rows and the passwords can be downloaded as CSV files built into the page as
    data: URIs; the server keeps neither.
    """
    _check_csrf(request, caller, "users.write", csrf)
    data = file.file.read(user_files.MAX_FILE_BYTES + 1)
    try:
        result = user_files.run_import(request, session, caller, data, file.filename or "upload", mode)
    except ApiError as error:
        return _list_page(request, session, caller, status_code=error.status, error=error.message)
    view = {
        "result": result,
        "message": user_files.import_summary(result),
        "report_uri": _csv_data_uri(user_files.error_report_rows(result.errors)) if result.errors else None,
        "passwords_uri": _csv_data_uri(user_files.password_rows(result.passwords)) if result.passwords else None,
    }
    return _list_page(request, session, caller, status_code=200 if result.imported else 422, import_view=view)
