"""The console page 报表应用: a query form over accepted report data, the result table and its CSV/XLSX export.

The form is sent with GET, so a result page can be bookmarked and reloaded. The export is a POST
with the CSRF token. Both call :mod:`admin_api.report_data`, so the checks, the institution scope
and the audit events are those of the API.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from admin_api import report_data
from admin_api.audit import record_event
from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.errors import invalid
from admin_api.keyaccess import request_keystore
from admin_api.security import Principal
from admin_api.submissions import catalog
from intake.template_model import Template
from intake.warehouse_query import AGGREGATE_FUNCTIONS, code_fields, numeric_fields
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)

MEASURE_FUNCTIONS = ("sum", "avg", "min", "max")


def _template_or_none(code: str) -> Template | None:
    templates = catalog()
    return templates.get(code) if code in templates else None


def _body(form: dict[str, Any]) -> report_data.ReportQueryIn:
    """Build the API request from the form. Raises 422 ``INVALID_REQUEST`` when a value breaks a field limit."""
    filters: dict[str, list[str]] = {}
    for item in form["filters"]:
        code, _, value = item.partition(":")
        filters.setdefault(code, []).append(value)
    aggregates = []
    for item in form["aggregates"]:
        function, _, field = item.partition(":")
        aggregates.append({"function": function, "field": field or None})
    try:
        return report_data.ReportQueryIn(
            template_code=form["template_code"], institutions=form["institutions"] or None,
            period_from=form["period_from"], period_to=form["period_to"], filters=filters,
            group_by=form["group_by"], aggregates=aggregates, mode=form["mode"], offset=form["offset"],
            limit=report_data.MAX_PAGE_SIZE if form["mode"] == "detail" else 50)
    except ValidationError as error:
        fields = "、".join(sorted({".".join(str(part) for part in item["loc"]) for item in error.errors()}))
        raise invalid("INVALID_REQUEST", f"查询条件无效（{fields}），请检查后重新查询。") from None


def _form(template_code: str, shown_template: str, institutions: list[str], period_from: str, period_to: str,
          group_by: list[str], aggregates: list[str], filters: list[str], mode: str, offset: int) -> dict[str, Any]:
    """Return the form's values. Fields chosen for another template than the one shown are dropped."""
    same = template_code == shown_template
    return {
        "template_code": template_code.strip(), "institutions": [code for code in institutions if code],
        "period_from": period_from.strip(), "period_to": period_to.strip(),
        "group_by": group_by if same else [], "aggregates": aggregates if same else ["count:"],
        "filters": filters if same else [], "mode": mode if mode in ("aggregate", "detail") else "aggregate",
        "offset": offset, "ready": same and bool(template_code and period_from and period_to),
    }


def _context(request: Request, session: Session, caller: Principal, form: dict[str, Any]) -> dict[str, Any]:
    template = _template_or_none(form["template_code"])
    institutions = report_data.readable_institutions(session, request, caller, None)
    return {
        "form": form, "templates": [catalog().get(code) for code in catalog().codes()],
        "template": template, "institutions": institutions,
        "code_fields": code_fields(template) if template else [],
        "numeric_fields": numeric_fields(template) if template else [],
        "function_names": AGGREGATE_FUNCTIONS, "measure_functions": MEASURE_FUNCTIONS,
        "own_institution": caller.institution_code, "page_size": report_data.MAX_PAGE_SIZE,
        "open_filters": {item.partition(":")[0] for item in form["filters"]},
    }


def _failed(request: Request, session: Session, caller: Principal, action: str, template_code: str,
            error: RegsandboxError) -> None:
    session.rollback()
    if error.status != 403:  # check_institution stored the denial already
        record_event(request, caller, action, f"report_data:{template_code[:64]}", "failed", {"code": error.code})


@router.get("/report-data", response_class=HTMLResponse)
def report_data_page(
    request: Request,
    template_code: str = Query(default="", max_length=64),
    shown_template: str = Query(default="", max_length=64),
    institutions: list[str] = Query(default=[], max_length=report_data.MAX_INSTITUTIONS),
    period_from: str = Query(default="", max_length=16),
    period_to: str = Query(default="", max_length=16),
    group_by: list[str] = Query(default=[], max_length=10),
    aggregates: list[str] = Query(default=[], max_length=40),
    filters: list[str] = Query(default=[], max_length=200),
    mode: str = Query(default="aggregate", max_length=16),
    offset: int = Query(default=0, ge=0, le=100_000_000),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require(report_data.CAPABILITY, console=True)),
) -> Response:
    """Show the query form, and the result table with totals when a template and a period range are chosen."""
    form = _form(template_code, shown_template, institutions, period_from, period_to, group_by, aggregates, filters,
                 mode, offset)
    context = _context(request, session, caller, form)
    if not form["ready"]:
        missing_period = bool(form["template_code"]) and template_code == shown_template and not (
            form["period_from"] and form["period_to"])
        error = "请填写起始报告期和截止报告期（YYYYMMDD，例如 20251130），再点击“查询”。" if missing_period else None
        return _page(request, "report_data.html", caller, status_code=422 if error else 200, result=None, error=error,
                     **context)
    try:
        result = report_data.run_query(session, request, caller, request_keystore(request),
                                       request.app.state.settings, _body(form))
    except RegsandboxError as error:
        _failed(request, session, caller, "report_data.query", form["template_code"], error)
        return _page(request, "report_data.html", caller, status_code=error.status, result=None, error=error.message,
                     **context)
    return _page(request, "report_data.html", caller, result=result, error=None, **context)


@router.post("/report-data/export")
def report_data_export(
    request: Request,
    kind: str = Form(default="csv", max_length=8),
    template_code: str = Form(default="", max_length=64),
    institutions: list[str] = Form(default=[], max_length=report_data.MAX_INSTITUTIONS),
    period_from: str = Form(default="", max_length=16),
    period_to: str = Form(default="", max_length=16),
    group_by: list[str] = Form(default=[], max_length=10),
    aggregates: list[str] = Form(default=[], max_length=40),
    filters: list[str] = Form(default=[], max_length=200),
    mode: str = Form(default="aggregate", max_length=16),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require(report_data.CAPABILITY, console=True)),
) -> Response:
    """Download the result of the form's query as CSV or XLSX (same as POST /api/v1/report-data/export.{csv,xlsx})."""
    _check_csrf(request, caller, report_data.CAPABILITY, csrf)
    form = _form(template_code, template_code, institutions, period_from, period_to, group_by, aggregates, filters,
                 mode, 0)
    try:
        if kind not in report_data.MEDIA_TYPES:
            raise invalid("EXPORT_FORMAT_INVALID", f"导出格式“{kind}”无效，只能是 csv 或 xlsx。")
        content, name = report_data.export_table(session, request, caller, request_keystore(request),
                                                 request.app.state.settings, _body(form), kind)
    except RegsandboxError as error:
        _failed(request, session, caller, "report_data.export", template_code, error)
        return _page(request, "report_data.html", caller, status_code=error.status, result=None, error=error.message,
                     **_context(request, session, caller, form))
    return Response(content, media_type=report_data.MEDIA_TYPES[kind], headers={
        "Content-Disposition": report_data.content_disposition(name), "Cache-Control": "no-store"})
