"""The Chinese web console: sign-in, model review, report notebooks and schedules, and the audit log.

Pages are rendered on the server from ``admin_api/templates``. The session cookie
``regsandbox_session`` (HttpOnly, SameSite=Lax) carries a random token whose SM3 digest is an
``api_tokens`` row of kind ``console``, so logging out or disabling a user ends the session.
Every POST form carries a CSRF token: before sign-in it must match the ``regsandbox_login_csrf``
cookie, afterwards it is HMAC-SM3 of the session token under the platform session secret.
A form whose input is rejected shows the Chinese message on its own page. It also stores an audit
event with outcome ``failed`` and the error code. Pages show times in 北京时间 (Asia/Shanghai).
"""

from __future__ import annotations

import re
import secrets as _random
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from admin_api.audit import add_event, record_event
from admin_api.audit_search import OUTCOMES, AuditFilter, export_response, parse_filter, search
from admin_api.db import utc_now
from admin_api.deps import SESSION_COOKIE, deny, get_session, require
from admin_api.errors import forbidden, invalid
from admin_api.models import ApiToken, ReportNotebook, ReportRun, Schedule, User
from admin_api.report_files import archived_file_names, download_report_file
from admin_api.roles import role_name
from admin_api.security import (
    ANONYMOUS_PRINCIPAL,
    CONSOLE_SESSION_LIFETIME,
    Principal,
    allows,
    csrf_token,
    find_token,
    issue_token,
)
from admin_api.services import (
    REVIEW_STATUS_NAMES,
    approve_notebook,
    authenticate,
    create_schedule,
    list_models,
    queue_run,
    review_model,
    update_schedule,
    visible_models,
)
from admin_api.signatures import approval_signature, request_trusted_keys
from regsandbox_core.crypto import constant_time_equal
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)

LOGIN_CSRF_COOKIE = "regsandbox_login_csrf"


def _session_csrf(request: Request) -> str:
    return csrf_token(request.app.state.secrets.session_secret, request.cookies.get(SESSION_COOKIE, ""))


def _check_csrf(request: Request, principal: Principal, capability: str, submitted: str) -> None:
    if not constant_time_equal(submitted, _session_csrf(request)):
        raise deny(request, principal, capability, forbidden(
            "CSRF_INVALID", "表单已过期或来源无效，请刷新页面后重新提交。"
        ))


def _failed(request: Request, session: Session, principal: Principal, action: str, resource: str,
            error: RegsandboxError) -> None:
    """Store the audit event of a rejected form: outcome ``failed`` with the error code."""
    session.rollback()
    if getattr(error, "audited", False):  # a failed signature was stored by the service already
        return
    record_event(request, principal, action, resource, "failed", {"code": error.code})


def _page(request: Request, name: str, principal: Principal | None, status_code: int = 200, **context: Any) -> Response:
    base = {
        "principal": principal,
        "role_name": role_name(principal.role) if principal else "",
        "can": (lambda capability: allows(principal.role, capability)) if principal else (lambda _c: False),
        "csrf": _session_csrf(request) if principal else "",
        "status_names": REVIEW_STATUS_NAMES,
    }
    return request.app.state.templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)


def _login_form(request: Request, error: str | None = None, status_code: int = 200) -> Response:
    token = _random.token_urlsafe(24)
    response = request.app.state.templates.TemplateResponse(
        request, "login.html", {"principal": None, "csrf": token, "error": error}, status_code=status_code
    )
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="lax", path="/console",
                        secure=request.app.state.settings.console_cookies_secure)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, session: Session = Depends(get_session),
               _caller: Principal = Depends(require("public"))) -> Response:
    """Show the sign-in form, or go to the home page when already signed in."""
    cookie = request.cookies.get(SESSION_COOKIE)
    idle = timedelta(minutes=request.app.state.settings.console_idle_minutes)
    if cookie and find_token(session, cookie, "console", idle_timeout=idle) is not None:
        return RedirectResponse("/console/", status_code=303)
    return _login_form(request)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    username: str = Form(default="", max_length=64),
    password: str = Form(default="", max_length=1024),
    totp_code: str = Form(default="", alias="totp", max_length=16),
    csrf_token_field: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("public")),
) -> Response:
    """Check the form, start a console session and go to the home page."""
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not constant_time_equal(csrf_token_field, expected):
        record_event(request, ANONYMOUS_PRINCIPAL, "console.login", f"user:{username[:64]}", "denied",
                     {"code": "CSRF_INVALID"})
        return _login_form(request, "表单已过期，请重新输入用户名和密码。", status_code=403)
    try:
        user = authenticate(session, request, username.strip(), password, action="console.login",
                            totp_code=totp_code or None)
    except RegsandboxError as error:
        return _login_form(request, error.message, status_code=error.status)

    token, _expires_at = issue_token(session, user, "console", CONSOLE_SESSION_LIFETIME)
    session.commit()
    response = RedirectResponse("/console/", status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(CONSOLE_SESSION_LIFETIME.total_seconds()),
                        httponly=True, samesite="lax", path="/",
                        secure=request.app.state.settings.console_cookies_secure)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/console")
    return response


@router.post("/logout")
def logout(
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("console.use", console=True)),
) -> Response:
    """End the console session."""
    _check_csrf(request, caller, "console.use", csrf)
    holder = find_token(session, request.cookies.get(SESSION_COOKIE, ""), "console")
    if holder is not None:
        session.execute(update(ApiToken).where(ApiToken.id == holder.token_id).values(revoked_at=utc_now()))
    add_event(session, request, caller, "console.logout", f"user:{caller.username}")
    session.commit()
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: Session = Depends(get_session),
         caller: Principal = Depends(require("console.use", console=True))) -> Response:
    """Show the signed-in user and the pages their role may use."""
    user = session.scalars(select(User).where(User.username == caller.username)).one()
    administrators = list(session.scalars(
        select(User).where(User.role == "system_admin", User.is_active.is_(True)).order_by(User.username)
    ))
    return _page(request, "home.html", caller, user=user, administrators=administrators)


def _model_items(session: Session, request: Request, caller: Principal) -> list[dict[str, Any]]:
    return visible_models(list_models(session, request.app.state.registry, request_trusted_keys(request)), caller)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: Session = Depends(get_session),
                caller: Principal = Depends(require("models.read", console=True))) -> Response:
    """Show model versions with AUC/KS and review status; reviewers get the review form.

    A regulator sees every institution's versions, a modeller those of their own institution.
    """
    items = _model_items(session, request, caller)
    return _page(request, "models.html", caller, items=items, notice=request.query_params.get("done"), error=None)


@router.post("/models/review", response_class=HTMLResponse)
def review_form(
    request: Request,
    name: str = Form(max_length=256),
    version: str = Form(max_length=32),
    decision: str = Form(max_length=16),
    comment: str = Form(default="", max_length=4000),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("models.review", console=True)),
) -> Response:
    """Approve or return a model version from the review form."""
    _check_csrf(request, caller, "models.review", csrf)
    try:
        review_model(session, request, caller, request.app.state.registry, name, version, decision, comment)
    except RegsandboxError as error:
        _failed(request, session, caller, "models.review", f"model:{name}/{version}", error)
        items = _model_items(session, request, caller) if error.code != "REGISTRY_UNAVAILABLE" else []
        return _page(request, "models.html", caller, status_code=error.status, items=items, notice=None,
                     error=error.message)
    return RedirectResponse(f"/console/models?done={quote(f'{name} 版本 {version}')}", status_code=303)


_NOTICES = {
    "queued": "已加入运行队列（运行编号 {}）。",
    "created": "已新建报告调度（编号 {}）。",
    "enabled": "已启用报告调度（编号 {}）。",
    "disabled": "已停用报告调度（编号 {}）。",
    "approved": "已审批通过报告笔记本（编号 {}），并记录了文件的 SM3 摘要。",
}
_RECIPIENT_SEPARATORS = re.compile(r"[\s,，;；、]+")


def _notice(request: Request) -> str | None:
    for key, template in _NOTICES.items():
        value = request.query_params.get(key, "")
        if value.isdigit():
            return template.format(value)
    return None


def _schedules_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
                    error: str | None = None, form: dict[str, Any] | None = None) -> Response:
    """Render the schedules page: notebooks, schedules, the new-schedule form and recent runs."""
    notebooks = list(session.scalars(select(ReportNotebook).order_by(ReportNotebook.id)))
    schedules = list(session.scalars(select(Schedule).order_by(Schedule.id)))
    runs = list(session.scalars(select(ReportRun).order_by(ReportRun.id.desc()).limit(50)))
    trusted = request_trusted_keys(request)
    approval_signatures = {notebook.id: approval_signature(notebook, trusted) for notebook in notebooks}
    return _page(request, "schedules.html", caller, status_code=status_code, notebooks=notebooks,
                 approval_signatures=approval_signatures,
                 schedules=schedules, runs=runs, notice=None if error else _notice(request), error=error,
                 run_files={run.id: archived_file_names(request.app.state.settings, run) for run in runs},
                 form=form or {"enabled": True})


@router.get("/schedules", response_class=HTMLResponse)
def schedules_page(request: Request, session: Session = Depends(get_session),
                   caller: Principal = Depends(require("schedules.read", console=True))) -> Response:
    """List report notebooks, schedules and recent runs, with the forms the caller's role may use."""
    return _schedules_page(request, session, caller)


@router.get("/report-runs/{run_id}/files/{name}")
def download_run_file(run_id: int, name: str, request: Request, session: Session = Depends(get_session),
                      caller: Principal = Depends(require("runs.read", console=True))) -> Response:
    """Download a decrypted archived report file, with the checks of GET /api/v1/report-runs/{id}/files/{name}."""
    return download_report_file(request, session, caller, run_id, name)


@router.post("/schedules/{schedule_id}/run", response_class=HTMLResponse)
def run_now(
    schedule_id: int,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("runs.queue", console=True)),
) -> Response:
    """Queue a manual run of a schedule."""
    _check_csrf(request, caller, "runs.queue", csrf)
    try:
        run = queue_run(session, request, caller, schedule_id, "manual")
    except RegsandboxError as error:
        _failed(request, session, caller, "runs.queue", f"schedule:{schedule_id}", error)
        return _schedules_page(request, session, caller, status_code=error.status, error=error.message)
    return RedirectResponse(f"/console/schedules?queued={run.id}", status_code=303)


@router.post("/report-notebooks/{notebook_id}/approve", response_class=HTMLResponse)
def approve_notebook_form(
    notebook_id: int,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("notebooks.approve", console=True)),
) -> Response:
    """Approve a report notebook as its file is now (same as POST /api/v1/report-notebooks/{id}/approve)."""
    _check_csrf(request, caller, "notebooks.approve", csrf)
    try:
        approve_notebook(session, request, caller, request.app.state.project_root, notebook_id)
    except RegsandboxError as error:
        _failed(request, session, caller, "notebooks.approve", f"report_notebook:{notebook_id}", error)
        return _schedules_page(request, session, caller, status_code=error.status, error=error.message)
    return RedirectResponse(f"/console/schedules?approved={notebook_id}", status_code=303)


def _recipient_list(text: str) -> list[str]:
    return [part for part in _RECIPIENT_SEPARATORS.split(text) if part]


@router.post("/schedules", response_class=HTMLResponse)
def create_schedule_form(
    request: Request,
    name: str = Form(default="", max_length=1000),
    notebook_id: str = Form(default="", max_length=20),
    cron: str = Form(default="", max_length=1000),
    recipients: str = Form(default="", max_length=20000),
    enabled: str = Form(default="", max_length=10),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("schedules.write", console=True)),
) -> Response:
    """Create a report schedule with the same checks as POST /api/v1/schedules."""
    _check_csrf(request, caller, "schedules.write", csrf)
    form = {"name": name, "notebook_id": notebook_id, "cron": cron, "recipients": recipients, "enabled": bool(enabled)}
    try:
        if not notebook_id.isdigit():
            raise invalid("INVALID_NOTEBOOK", "请选择一个已审批的报告笔记本。")
        schedule = create_schedule(session, request, caller, name=name, notebook_id=int(notebook_id), cron=cron,
                                   recipients=_recipient_list(recipients), enabled=bool(enabled))
    except RegsandboxError as error:
        _failed(request, session, caller, "schedules.create", f"schedule:{name.strip()[:100]}", error)
        return _schedules_page(request, session, caller, status_code=error.status, error=error.message, form=form)
    return RedirectResponse(f"/console/schedules?created={schedule.id}", status_code=303)


@router.post("/schedules/{schedule_id}/enabled", response_class=HTMLResponse)
def toggle_schedule_form(
    schedule_id: int,
    request: Request,
    enabled: str = Form(default="", max_length=10),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("schedules.write", console=True)),
) -> Response:
    """Enable or disable a schedule; only the enabled flag changes (as PATCH /api/v1/schedules/{id})."""
    _check_csrf(request, caller, "schedules.write", csrf)
    try:
        if enabled not in ("true", "false"):
            raise invalid("INVALID_ENABLED", f"启用状态 {enabled!r} 无效，只能是 true（启用）或 false（停用）。")
        update_schedule(session, request, caller, schedule_id, enabled=enabled == "true")
    except RegsandboxError as error:
        _failed(request, session, caller, "schedules.update", f"schedule:{schedule_id}", error)
        return _schedules_page(request, session, caller, status_code=error.status, error=error.message)
    done = "enabled" if enabled == "true" else "disabled"
    return RedirectResponse(f"/console/schedules?{done}={schedule_id}", status_code=303)


AUDIT_PAGE_ROWS = 200
_AUDIT_FILTER_FIELDS = ("from", "to", "actor", "action", "institution", "outcome")


def _audit_form(values: dict[str, str | None]) -> dict[str, str]:
    return {name: (values.get(name) or "").strip() for name in _AUDIT_FILTER_FIELDS}


def _audit_filter(form: dict[str, str]) -> AuditFilter:
    return parse_filter(form["from"], form["to"], form["actor"], form["action"], form["institution"], form["outcome"])


def _audit_page(request: Request, session: Session, caller: Principal, form: dict[str, str],
                before_id: str | None = None) -> Response:
    filled = {name: value for name, value in form.items() if value}
    settings = request.app.state.settings
    context: dict[str, Any] = {"form": form, "outcomes": OUTCOMES, "events": [], "next_page": None,
                               "first_page": urlencode(filled), "retention_days": settings.audit_retention_days,
                               "export_max_rows": settings.audit_export_max_rows}
    try:
        audit_filter = _audit_filter(form)
        before = None
        if before_id:
            if not before_id.isdigit() or int(before_id) < 1:
                raise invalid("INVALID_BEFORE_ID", f"分页位置 before_id={before_id!r} 无效，应为正整数。请从第一页重新查询。")
            before = int(before_id)
    except RegsandboxError as error:
        return _page(request, "audit.html", caller, status_code=error.status, error=error.message, **context)
    events = search(session, audit_filter, AUDIT_PAGE_ROWS, before)
    if len(events) == AUDIT_PAGE_ROWS:
        context["next_page"] = urlencode({**filled, "before_id": events[-1].id})
    return _page(request, "audit.html", caller, **{**context, "events": events, "paged": before is not None})


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, session: Session = Depends(get_session),
               caller: Principal = Depends(require("audit.read", console=True)),
               time_from: str | None = Query(default=None, alias="from"),
               time_to: str | None = Query(default=None, alias="to"),
               actor: str | None = None, action: str | None = None, institution: str | None = None,
               outcome: str | None = None, before_id: str | None = None) -> Response:
    """Search audit events with the filter form, 200 per page, newest first."""
    form = _audit_form({"from": time_from, "to": time_to, "actor": actor, "action": action,
                        "institution": institution, "outcome": outcome})
    return _audit_page(request, session, caller, form, before_id)


@router.post("/audit/export")
def audit_export(request: Request, session: Session = Depends(get_session),
                 caller: Principal = Depends(require("audit.read", console=True)),
                 csrf_token: str = Form(""), time_from: str = Form("", alias="from"), time_to: str = Form("", alias="to"),
                 actor: str = Form(""), action: str = Form(""), institution: str = Form(""),
                 outcome: str = Form("")) -> Response:
    """Download the events matching the filter form as CSV (as GET /api/v1/audit/events.csv)."""
    _check_csrf(request, caller, "audit.read", csrf_token)
    form = _audit_form({"from": time_from, "to": time_to, "actor": actor, "action": action,
                        "institution": institution, "outcome": outcome})
    try:
        audit_filter = _audit_filter(form)
    except RegsandboxError as error:
        _failed(request, session, caller, "audit.export", "audit_events", error)
        return _audit_page(request, session, caller, form)
    return export_response(request, session, caller, audit_filter)
