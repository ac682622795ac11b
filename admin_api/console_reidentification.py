"""The console page 令牌反查: the request form and, after a lookup, the raw value for the named case.

The form is a POST with the CSRF token, so the value never appears in a URL or the browser history.
It calls :mod:`admin_api.reidentification`, so the checks, the hourly limit and the audit events are
those of the API. The response is marked ``Cache-Control: no-store``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api import reidentification
from admin_api.audit import record_event
from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.errors import invalid
from admin_api.models import Institution
from admin_api.routes.reidentification import run_audited
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)
PAGE = "reidentification.html"


def _institutions(session: Session) -> dict[str, str]:
    return dict(session.execute(select(Institution.code, Institution.name).order_by(Institution.code)).all())


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/reidentification", response_class=HTMLResponse)
def reidentification_form(
    request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require(reidentification.CAPABILITY, console=True)),
) -> Response:
    """Show the empty re-identification form."""
    return _page(request, PAGE, caller, form=reidentification.ReidentificationIn(), result=None, error=None,
                 institutions=_institutions(session), limit=request.app.state.settings.reidentify_max_per_hour)


@router.post("/reidentification", response_class=HTMLResponse)
def reidentification_lookup(
    request: Request,
    institution: str = Form(default="", max_length=32),
    table: str = Form(default="", max_length=64),
    column: str = Form(default="", max_length=64),
    token: str = Form(default="", max_length=128),
    case_number: str = Form(default="", max_length=64),
    reason: str = Form(default="", max_length=500),
    key_version: str = Form(default="", max_length=8),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require(reidentification.CAPABILITY, console=True)),
) -> Response:
    """Look up the token and show the raw value, or the form again with the Chinese error."""
    _check_csrf(request, caller, reidentification.CAPABILITY, csrf)
    version = key_version.strip()
    body = reidentification.ReidentificationIn(
        institution=institution, table=table, column=column, token=token, case_number=case_number, reason=reason,
        key_version=int(version) if version.isdigit() and 1 <= int(version) <= 10_000 else None)
    context = {"form": body, "institutions": _institutions(session),
               "limit": request.app.state.settings.reidentify_max_per_hour}
    try:
        if version and body.key_version is None:
            rejected = invalid("KEY_VERSION_INVALID", f"令牌化密钥版本“{version}”无效，应为正整数，例如 1。不确定时请留空。")
            record_event(request, caller, reidentification.ACTION, reidentification.audit_resource(body), "failed",
                         {**reidentification.audit_detail(body), "code": rejected.code})
            raise rejected
        result = run_audited(request, session, caller, body)
    except RegsandboxError as error:
        return _no_store(_page(request, PAGE, caller, status_code=error.status, result=None, error=error.message,
                               error_code=error.code, **context))
    return _no_store(_page(request, PAGE, caller, result=result, error=None, **context))
