"""The console page 报表模板: search templates, read a version, and, for the system administrator, check, upload and delete.

The forms call the same functions as ``/api/v1/templates`` (:mod:`admin_api.report_templates`),
so they check and audit the same way. The upload form has two buttons: 预检 lists every problem
of the file without storing it, 上传 stores it as a new version when it has none.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from admin_api import report_templates
from admin_api.console import _check_csrf, _failed, _page
from admin_api.deps import get_session, require
from admin_api.routes.templates import MAX_TEMPLATE_BODY_BYTES, YAML_MEDIA_TYPE, read_upload
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)

_DELETED_NOTICE = re.compile(r"^[A-Z][A-Z0-9_]{1,63} 第 [0-9]{1,9} 版$")
"""The ``deleted`` query parameter that the delete form redirects with; anything else shows no notice."""


def _list_page(request: Request, session: Session, caller: Principal, *, query: str = "", status_code: int = 200,
               error: str | None = None, check: report_templates.CheckResult | None = None,
               checked_name: str | None = None) -> Response:
    listing = report_templates.list_templates(session, caller, query)
    notice = None
    deleted = request.query_params.get("deleted", "")
    if _DELETED_NOTICE.match(deleted) and error is None and check is None:
        notice = f"已删除报表模板 {deleted}。"
    return _page(request, "report_templates.html", caller, status_code=status_code, listing=listing, query=query,
                 error=error, notice=notice, check=check, checked_name=checked_name)


@router.get("/templates", response_class=HTMLResponse)
def templates_page(request: Request, q: str = Query(default="", max_length=64), session: Session = Depends(get_session),
                   caller: Principal = Depends(require("templates.read", console=True))) -> Response:
    """List templates and their versions, filtered by code or name; administrators get the upload form."""
    return _list_page(request, session, caller, query=q)


@router.post("/templates/check", response_class=HTMLResponse, max_body_size=MAX_TEMPLATE_BODY_BYTES)
def check_form(
    request: Request,
    file: UploadFile = File(),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("templates.write", console=True)),
) -> Response:
    """Check an uploaded file without storing it and show every problem (预检)."""
    _check_csrf(request, caller, "templates.write", csrf)
    try:
        content, name = read_upload(file)
    except RegsandboxError as error:
        return _list_page(request, session, caller, status_code=error.status, error=error.message)
    result = report_templates.check_upload(session, content, name)
    return _list_page(request, session, caller, status_code=200 if result.ok else 422, check=result, checked_name=name)


@router.post("/templates", response_class=HTMLResponse, max_body_size=MAX_TEMPLATE_BODY_BYTES)
def upload_form(
    request: Request,
    file: UploadFile = File(),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("templates.write", console=True)),
) -> Response:
    """Store an uploaded file as a new version; on any problem show all problems, as the check does."""
    _check_csrf(request, caller, "templates.write", csrf)
    name = (file.filename or "upload.yaml")[:200]
    try:
        content, name = read_upload(file)
        stored = report_templates.upload(session, request, caller, content, name)
    except RegsandboxError as error:
        _failed(request, session, caller, "templates.upload", f"template_file:{name[:100]}", error)
        result = report_templates.CheckResult(
            ok=False, problems=[report_templates.Problem(code=code, detail=text)
                                for code, text in (getattr(error, "problems", ()) or ((error.code, error.message),))],
            template=None)
        return _list_page(request, session, caller, status_code=error.status, check=result, checked_name=name,
                          error=f"未上传：文件 {name} 有 {len(result.problems)} 处问题，见下方列表。")
    return RedirectResponse(f"/console/templates/{quote(stored.code)}/{stored.version}?uploaded=1", status_code=303)


def _detail_page(request: Request, session: Session, caller: Principal, code: str, version: int, *,
                 status_code: int = 200, error: str | None = None) -> Response:
    detail = report_templates.template_detail(session, code, version)
    notice = "已上传新版本，系统已重新加载模板目录。" if request.query_params.get("uploaded") and error is None else None
    context: dict[str, Any] = {"detail": detail, "error": error, "notice": notice}
    return _page(request, "report_template_detail.html", caller, status_code=status_code, **context)


@router.get("/templates/{code}/{version}", response_class=HTMLResponse)
def version_page(code: str, version: int, request: Request, session: Session = Depends(get_session),
                 caller: Principal = Depends(require("templates.read", console=True))) -> Response:
    """Show one version: fields, primary key, code lists and rules with their 级别 (错误/提示)."""
    return _detail_page(request, session, caller, code, version)


@router.get("/templates/{code}/{version}/yaml")
def download_version(code: str, version: int, request: Request, session: Session = Depends(get_session),
                     caller: Principal = Depends(require("templates.read", console=True))) -> Response:
    """Download the YAML file of one version (as GET /api/v1/templates/{code}/versions/{version}/yaml)."""
    content, name = report_templates.download(session, request, caller, code, version)
    return Response(content, media_type=YAML_MEDIA_TYPE, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/templates/{code}/{version}/delete", response_class=HTMLResponse)
def delete_form(
    code: str,
    version: int,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("templates.write", console=True)),
) -> Response:
    """Delete an added version that no task or submission uses, after the browser's confirmation."""
    _check_csrf(request, caller, "templates.write", csrf)
    try:
        removed = report_templates.delete(session, request, caller, code, version)
    except RegsandboxError as error:
        _failed(request, session, caller, "templates.delete", f"template:{code[:64]}.v{version}", error)
        if error.status == 404:
            return _list_page(request, session, caller, status_code=404, error=error.message)
        return _detail_page(request, session, caller, code, version, status_code=error.status, error=error.message)
    return RedirectResponse(f"/console/templates?deleted={quote(f'{removed.code} 第 {removed.version} 版')}",
                            status_code=303)
