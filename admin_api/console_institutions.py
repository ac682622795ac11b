"""The console page 机构管理: search and page through institutions, create, edit, deactivate, import, export.

Every user with ``institutions.read`` can view the list (institution users only their own
institution). The forms need ``institutions.write`` and call the same functions as the API, so
the rules, messages and audit events are the same. A successful form redirects back to the list
with a result message; a rejected one shows the Chinese message and keeps the typed values.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.errors import ApiError
from admin_api.institution_files import MAX_FILE_BYTES, MAX_ROWS, ImportResult, template_rows, write_xlsx
from admin_api.institutions import (
    CODE_PATTERN,
    INSTITUTION_TYPES,
    STATUS_NAMES,
    InstitutionCreate,
    InstitutionFields,
    create_institution,
    find_institution,
    search_institutions,
    set_status,
    update_institution,
)
from admin_api.limits import MAX_UPLOAD_BODY_BYTES
from admin_api.routes.institutions import EXPORT_MEDIA_TYPES, audited_write, export_response, import_summary, run_import
from admin_api.security import Principal
from admin_api.spreadsheets import write_csv

router = APIRouter(prefix="/console", include_in_schema=False)

PAGE_SIZE = 50
_NOTICES = {
    "created": "已新建机构 {}。",
    "updated": "已保存机构 {} 的修改。",
    "deactivated": "已停用机构 {}。",
    "reactivated": "已恢复机构 {}。",
}
_OPTIONAL_FIELDS = ("licence_no", "parent_code", "contact_name", "contact_phone", "contact_email")


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done", "")
    code = request.query_params.get("code", "")
    if done in _NOTICES and CODE_PATTERN.match(code):
        return _NOTICES[done].format(code)
    return None


def _list_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
               error: str | None = None, form: dict[str, Any] | None = None,
               import_result: ImportResult | None = None, import_message: str | None = None) -> Response:
    params = request.query_params
    text = params.get("q", "")[:200]
    kind = params.get("type", "") if params.get("type", "") in INSTITUTION_TYPES else ""
    status = params.get("status", "") if params.get("status", "") in STATUS_NAMES else ""
    offset_text = params.get("offset", "0")
    offset = int(offset_text) if offset_text.isdigit() else 0
    institutions, total = search_institutions(session, caller, text=text, kind=kind or None, status=status or None,
                                              limit=PAGE_SIZE, offset=offset)
    filters = {key: value for key, value in (("q", text), ("type", kind), ("status", status)) if value}
    previous_url = f"?{urlencode({**filters, 'offset': max(offset - PAGE_SIZE, 0)})}" if offset > 0 else None
    next_url = f"?{urlencode({**filters, 'offset': offset + PAGE_SIZE})}" if offset + PAGE_SIZE < total else None
    return _page(request, "institutions.html", caller, status_code=status_code, institutions=institutions,
                 total=total, first=offset + 1 if institutions else 0, last=offset + len(institutions),
                 previous_url=previous_url, next_url=next_url, filters={"q": text, "type": kind, "status": status},
                 types=INSTITUTION_TYPES, institution_status_names=STATUS_NAMES, notice=None if error else _notice(request),
                 error=error, form=form or {}, import_result=import_result, import_message=import_message,
                 max_megabytes=MAX_FILE_BYTES // 1024 // 1024, max_rows=MAX_ROWS)


def _done(action: str, code: str) -> Response:
    return RedirectResponse(f"/console/institutions?{urlencode({'done': action, 'code': code})}", status_code=303)


@router.get("/institutions", response_class=HTMLResponse)
def institutions_page(request: Request, session: Session = Depends(get_session),
                      caller: Principal = Depends(require("institutions.read", console=True))) -> Response:
    """List institutions with search and paging; administrators also get the forms."""
    return _list_page(request, session, caller)


@router.post("/institutions", response_class=HTMLResponse)
def create_form(
    request: Request,
    code: str = Form(default="", max_length=64),
    name: str = Form(default="", max_length=400),
    type: str = Form(default="", max_length=50),
    uscc: str = Form(default="", max_length=64),
    licence_no: str = Form(default="", max_length=200),
    parent_code: str = Form(default="", max_length=64),
    contact_name: str = Form(default="", max_length=400),
    contact_phone: str = Form(default="", max_length=100),
    contact_email: str = Form(default="", max_length=400),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.write", console=True)),
) -> Response:
    """Create an institution (same as POST /api/v1/institutions)."""
    _check_csrf(request, caller, "institutions.write", csrf)
    form = {"code": code, "name": name, "type": type, "uscc": uscc, "licence_no": licence_no,
            "parent_code": parent_code, "contact_name": contact_name, "contact_phone": contact_phone,
            "contact_email": contact_email}
    body = InstitutionCreate(**form)
    try:
        audited_write(request, session, caller, "institutions.create", f"institution:{code}",
                      lambda: create_institution(request, session, caller, body))
    except ApiError as error:
        return _list_page(request, session, caller, status_code=error.status, error=error.message, form=form)
    return _done("created", code.strip())


@router.get("/institutions/export")
def export_file(request: Request, format: Literal["csv", "xlsx"] = Query(default="xlsx"),
                session: Session = Depends(get_session),
                caller: Principal = Depends(require("institutions.read", console=True))) -> Response:
    """Download the visible institutions (same as GET /api/v1/institutions/export)."""
    return export_response(request, session, caller, format)


@router.get("/institutions/import/template")
def template_file(format: Literal["csv", "xlsx"] = Query(default="xlsx"),
                  _caller: Principal = Depends(require("institutions.write", console=True))) -> Response:
    content = write_csv(template_rows()) if format == "csv" else write_xlsx(template_rows())
    return Response(content, media_type=EXPORT_MEDIA_TYPES[format], headers={
        "Content-Disposition": f'attachment; filename="institutions_template.{format}"'})


@router.post("/institutions/import", response_class=HTMLResponse, max_body_size=MAX_UPLOAD_BODY_BYTES)
def import_form(
    request: Request,
    file: UploadFile = File(),
    mode: Literal["all_or_nothing", "valid_only"] = Form(default="all_or_nothing"),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.write", console=True)),
) -> Response:
    """Import a CSV or XLSX file and show the result with every rejected row."""
    _check_csrf(request, caller, "institutions.write", csrf)
    data = file.file.read(MAX_FILE_BYTES + 1)
    try:
        result = run_import(request, session, caller, data, file.filename or "upload", mode)
    except ApiError as error:
        return _list_page(request, session, caller, status_code=error.status, error=error.message)
    return _list_page(request, session, caller, status_code=200 if result.imported else 422,
                      import_result=result, import_message=import_summary(result))


@router.get("/institutions/{code}/edit", response_class=HTMLResponse)
def edit_page(code: str, request: Request, session: Session = Depends(get_session),
              caller: Principal = Depends(require("institutions.write", console=True))) -> Response:
    """Show the edit form of one institution."""
    institution = find_institution(session, code)
    form = {"name": institution.name, "type": institution.type, "uscc": institution.uscc or ""}
    form.update({field: getattr(institution, field) or "" for field in _OPTIONAL_FIELDS})
    return _page(request, "institution_edit.html", caller, institution=institution, form=form,
                 types=INSTITUTION_TYPES, error=None)


@router.post("/institutions/{code}/edit", response_class=HTMLResponse)
def edit_form(
    code: str,
    request: Request,
    name: str = Form(default="", max_length=400),
    type: str = Form(default="", max_length=50),
    uscc: str = Form(default="", max_length=64),
    licence_no: str = Form(default="", max_length=200),
    parent_code: str = Form(default="", max_length=64),
    contact_name: str = Form(default="", max_length=400),
    contact_phone: str = Form(default="", max_length=100),
    contact_email: str = Form(default="", max_length=400),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.write", console=True)),
) -> Response:
    """Save the edit form (same as PATCH /api/v1/institutions/{code} with every field)."""
    _check_csrf(request, caller, "institutions.write", csrf)
    form = {"name": name, "type": type, "uscc": uscc, "licence_no": licence_no, "parent_code": parent_code,
            "contact_name": contact_name, "contact_phone": contact_phone, "contact_email": contact_email}
    body = InstitutionFields(**form)
    try:
        audited_write(request, session, caller, "institutions.update", f"institution:{code}",
                      lambda: update_institution(request, session, caller, code, body))
    except ApiError as error:
        institution = find_institution(session, code)
        return _page(request, "institution_edit.html", caller, status_code=error.status, institution=institution,
                     form=form, types=INSTITUTION_TYPES, error=error.message)
    return _done("updated", code)


def _status_form(request: Request, session: Session, caller: Principal, code: str, csrf: str, status: str) -> Response:
    _check_csrf(request, caller, "institutions.write", csrf)
    action = "deactivate" if status == "inactive" else "reactivate"
    try:
        audited_write(request, session, caller, f"institutions.{action}", f"institution:{code}",
                      lambda: set_status(request, session, caller, code, status))
    except ApiError as error:
        return _list_page(request, session, caller, status_code=error.status, error=error.message)
    return _done(f"{action}d", code)


@router.post("/institutions/{code}/deactivate", response_class=HTMLResponse)
def deactivate_form(code: str, request: Request, csrf: str = Form(default="", alias="csrf_token", max_length=200),
                    session: Session = Depends(get_session),
                    caller: Principal = Depends(require("institutions.write", console=True))) -> Response:
    """Set the status to 停用."""
    return _status_form(request, session, caller, code, csrf, "inactive")


@router.post("/institutions/{code}/reactivate", response_class=HTMLResponse)
def reactivate_form(code: str, request: Request, csrf: str = Form(default="", alias="csrf_token", max_length=200),
                    session: Session = Depends(get_session),
                    caller: Principal = Depends(require("institutions.write", console=True))) -> Response:
    """Set the status back to 正常."""
    return _status_form(request, session, caller, code, csrf, "active")
