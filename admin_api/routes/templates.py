"""报表模板: list, read and download report template versions; system administrators check, add and delete them.

Everyone who submits, reads or reviews reports reads templates (``templates.read``). Only the system
administrator writes them (``templates.write``). A version in use by a collection task or a report
submission is immutable. Rejected writes are audited with outcome ``failed``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from sqlalchemy.orm import Session

from admin_api import report_templates
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.errors import invalid
from admin_api.security import Principal
from intake.template_store import MAX_TEMPLATE_BYTES
from regsandbox_core.errors import RegsandboxError

router = APIRouter()

MAX_TEMPLATE_BODY_BYTES = MAX_TEMPLATE_BYTES + 64 * 1024
"""A template file of up to MAX_TEMPLATE_BYTES plus room for the multipart framing."""
YAML_MEDIA_TYPE = "application/yaml; charset=utf-8"


def read_upload(file: UploadFile) -> tuple[bytes, str]:
    """Return the content and file name of an uploaded template; reject a file above MAX_TEMPLATE_BYTES."""
    content = file.file.read(MAX_TEMPLATE_BYTES + 1)
    name = (file.filename or "upload.yaml")[:200]
    if len(content) > MAX_TEMPLATE_BYTES:
        raise invalid("TEMPLATE_TOO_LARGE", f"报表模板文件 {name} 超过上限 {MAX_TEMPLATE_BYTES} 字节。请检查是否选错了文件。")
    return content, name


@router.get("/templates", response_model=report_templates.TemplateListing)
def list_templates(
    q: str = Query(default="", max_length=64, description="按模板代码或名称筛选"),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("templates.read")),
) -> report_templates.TemplateListing:
    """List templates with their versions, in-use flags and SM3 digests; administrators also get unloadable files."""
    return report_templates.list_templates(session, caller, q)


@router.get("/templates/{code}/versions/{version}", response_model=report_templates.TemplateDetail)
def read_version(
    code: str, version: int, session: Session = Depends(get_session),
    _caller: Principal = Depends(require("templates.read")),
) -> report_templates.TemplateDetail:
    """Return one version: fields (代码、名称、类型、长度、精度、必填), primary key, code lists and rules."""
    return report_templates.template_detail(session, code, version)


@router.get("/templates/{code}/versions/{version}/yaml")
def download_version(
    code: str, version: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("templates.read")),
) -> Response:
    """Download the YAML file of one version, as stored."""
    content, name = report_templates.download(session, request, caller, code, version)
    return Response(content, media_type=YAML_MEDIA_TYPE, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/templates/check", response_model=report_templates.CheckResult, max_body_size=MAX_TEMPLATE_BODY_BYTES)
def check_template(
    file: UploadFile = File(description="报表模板 YAML 文件，最大 1 MB"),
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("templates.write")),
) -> report_templates.CheckResult:
    """Check a template file without storing it, and list every problem found (预检)."""
    content, name = read_upload(file)
    return report_templates.check_upload(session, content, name)


@router.post("/templates", response_model=report_templates.TemplateDetail, status_code=201,
             max_body_size=MAX_TEMPLATE_BODY_BYTES)
def upload_template(
    request: Request,
    file: UploadFile = File(description="报表模板 YAML 文件，最大 1 MB；模板代码和版本号取自文件内容"),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("templates.write")),
) -> report_templates.TemplateDetail:
    """Add a new template version. An existing code and version is rejected (409), so no version is ever replaced."""
    try:
        content, name = read_upload(file)
        stored = report_templates.upload(session, request, caller, content, name)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "templates.upload", f"template_file:{(file.filename or '-')[:100]}", "failed",
                     {"code": error.code})
        raise
    return report_templates.template_detail(session, stored.code, stored.version)


@router.delete("/templates/{code}/versions/{version}", status_code=204)
def delete_version(
    code: str, version: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("templates.write")),
) -> Response:
    """Delete a version that a system administrator added and that no task or submission uses."""
    try:
        report_templates.delete(session, request, caller, code, version)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "templates.delete", f"template:{code[:64]}.v{version}", "failed",
                     {"code": error.code})
        raise
    return Response(status_code=204)
