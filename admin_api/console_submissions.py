"""The console pages 报表报送 (upload, own submissions, drafts) and 报表审核 (review queue, waivers, decisions).

The forms call the same functions as the API (:mod:`admin_api.submissions`,
:mod:`admin_api.submission_workflow`), so the checks of role and institution, the state rules and
the audit events are the same. A rejected form shows the Chinese message on its page and stores an
audit event with outcome ``failed``.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from admin_api import submission_workflow, submissions, tasks
from admin_api.console import _check_csrf, _failed, _page
from admin_api.deps import get_session, require
from admin_api.errors import invalid
from admin_api.keyaccess import request_keystore
from admin_api.models import SUBMISSION_STATES
from admin_api.routes.submissions import MAX_SUBMISSION_BODY_BYTES, REPORT_MEDIA_TYPES
from admin_api.security import Principal, allows
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)

LIST_PAGE_SIZE = 50
FINDINGS_PAGE_SIZE = 50
ROW_COMMENT_SLOTS = 5
"""Empty row-comment lines on the return form. The API takes more."""
_LINE_SEPARATORS = re.compile(r"[\s,，;；、]+")
_NOTICES = {
    "uploaded": "已上传并完成校验。",
    "draft": "已保存为草稿：草稿只有本机构可见，确认无误后请点击“提交草稿”。",
    "submitted": "草稿已提交。",
    "discarded": "草稿已作废，记录保留备查。",
    "waived": "已豁免所选提示。",
    "accepted": "已审核通过，数据已写入数据仓库。",
    "returned": "已退回，机构将收到退回意见。",
}


def _templates() -> list[dict[str, str]]:
    catalog = submissions.catalog()
    return [{"code": code, "name": catalog.get(code).name,
             "frequency": submissions.FREQUENCY_NAMES.get(catalog.get(code).frequency, "")}
            for code in catalog.codes()]


def _list_context(session: Session, request: Request, caller: Principal, *, state: str, template: str,
                  period: str, institution: str, page: int) -> dict[str, Any]:
    """Return the template context of a submissions list. A bad filter gives ``error`` and an empty list."""
    context: dict[str, Any] = {"items": [], "total": 0, "page": page, "pages": 1, "error": None,
                               "filters": {"state": state, "template": template, "period": period,
                                           "institution": institution},
                               "state_names": SUBMISSION_STATES, "query": ""}
    try:
        rows, total = submissions.list_submissions(
            session, request, caller, template_code=template or None, period_text=period or None,
            state=state or None, institution_code=institution or None, offset=(page - 1) * LIST_PAGE_SIZE,
            limit=LIST_PAGE_SIZE)
    except RegsandboxError as error:
        context["error"] = error.message
        return context
    filled = {key: value for key, value in context["filters"].items() if value}
    context.update(items=[submissions.SubmissionOut.of(row) for row in rows], total=total,
                   pages=max(1, (total + LIST_PAGE_SIZE - 1) // LIST_PAGE_SIZE), query=urlencode(filled))
    return context


def _submissions_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
                      error: str | None = None, form: dict[str, Any] | None = None, state: str = "",
                      template: str = "", period: str = "", page: int = 1, version: int | None = None) -> Response:
    context = _list_context(session, request, caller, state=state, template=template, period=period,
                            institution="", page=page)
    return _page(request, "submissions.html", caller, status_code=status_code,
                 **{**context, "error": error or context["error"]}, templates=_templates(),
                 form=form or {"template_code": template, "period_end": period, "mode": "submit",
                               "template_version": version},
                 notice=None if error else _NOTICES.get(request.query_params.get("done", "")))


@router.get("/submissions", response_class=HTMLResponse)
def submissions_page(
    request: Request,
    state: str = Query(default="", max_length=32),
    template: str = Query(default="", max_length=64),
    period: str = Query(default="", max_length=16),
    version: int | None = Query(default=None, ge=1, le=999_999),
    page: int = Query(default=1, ge=1, le=100000),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.read", console=True)),
) -> Response:
    """Show the upload form (报送人员) and the visible submissions, newest first, with a state filter."""
    return _submissions_page(request, session, caller, state=state.strip(), template=template.strip(),
                             period=period.strip(), page=page, version=version)


@router.get("/submissions/new", response_class=HTMLResponse)
def upload_for_task(
    request: Request,
    task: int | None = Query(default=None, ge=1, le=2**31 - 1),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.submit", console=True)),
) -> Response:
    """Open the upload form filled with the template and period of collection task ``task`` (the 上传报表 links).

    Without ``task`` (a bookmark or a typed address) the empty upload form opens.
    """
    if task is None:
        return RedirectResponse("/console/submissions#upload", status_code=303)
    try:
        detail = tasks.task_detail(session, request, caller, task)
    except RegsandboxError as error:
        return _submissions_page(request, session, caller, status_code=error.status, error=error.message)
    query = urlencode({"template": detail.template_code, "period": f"{detail.period_end:%Y%m%d}",
                       "version": detail.template_version})
    return RedirectResponse(f"/console/submissions?{query}#upload", status_code=303)


@router.post("/submissions", response_class=HTMLResponse, max_body_size=MAX_SUBMISSION_BODY_BYTES)
def upload_form(
    request: Request,
    template_code: str = Form(default="", max_length=64),
    period_end: str = Form(default="", max_length=16),
    mode: Literal["submit", "draft"] = Form(default="submit"),
    template_version: int | None = Form(default=None, ge=1, le=999_999),
    file: UploadFile | None = File(default=None),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.submit", console=True)),
) -> Response:
    """Upload a report file as with POST /api/v1/submissions, saved as a draft or submitted."""
    _check_csrf(request, caller, "submissions.submit", csrf)
    draft = mode == "draft"
    action = "submissions.save_draft" if draft else "submissions.submit"
    form = {"template_code": template_code, "period_end": period_end, "mode": mode, "template_version": template_version}
    resource = f"submission:{caller.institution_code or '-'}/{template_code[:64]}/{period_end[:16]}"
    try:
        if not template_code.strip():
            raise invalid("TEMPLATE_REQUIRED", "请选择报表模板。")
        if file is None or not file.filename:
            raise invalid("FILE_REQUIRED", "请选择要上传的报表文件（TXT、CSV 或 XLSX）。")
        row = submissions.submit(session, request, caller, request_keystore(request), request.app.state.settings,
                                 template_code=template_code, period_text=period_end, filename=file.filename,
                                 stream=file.file, draft=draft, template_version=template_version)
    except RegsandboxError as error:
        _failed(request, session, caller, action, resource, error)
        return _submissions_page(request, session, caller, status_code=error.status, error=error.message, form=form)
    return RedirectResponse(f"/console/submissions/{row.id}?done={'draft' if draft else 'uploaded'}", status_code=303)


@router.get("/reviews", response_class=HTMLResponse)
def reviews_page(
    request: Request,
    template: str = Query(default="", max_length=64),
    period: str = Query(default="", max_length=16),
    institution: str = Query(default="", max_length=32),
    page: int = Query(default=1, ge=1, le=100000),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.review", console=True)),
) -> Response:
    """Show the review queue: submissions of every institution that are pending review (待审核)."""
    context = _list_context(session, request, caller, state="pending_review", template=template.strip(),
                            period=period.strip(), institution=institution.strip(), page=page)
    return _page(request, "reviews.html", caller, **context, templates=_templates(),
                 notice=_NOTICES.get(request.query_params.get("done", "")))


# --- detail -------------------------------------------------------------------------------------


def _detail_page(request: Request, session: Session, caller: Principal, submission_id: int, *,
                 status_code: int = 200, error: str | None = None, page: int = 1, severity: str = "",
                 form: dict[str, Any] | None = None) -> Response:
    row = submissions.visible_submission(session, request, caller, submission_id, "submissions.read")
    detail = submissions.SubmissionDetail.load(session, row)
    findings = None
    open_rules: list[submission_workflow.OpenWarnings] = []
    settings = request.app.state.settings
    if row.findings_path is not None:
        findings = submission_workflow.findings_page(session, request, caller, settings, submission_id,
                                                     (page - 1) * FINDINGS_PAGE_SIZE, FINDINGS_PAGE_SIZE,
                                                     severity or None)
        if row.state == "pending_review" and detail.unresolved_warning_count and allows(caller.role,
                                                                                         "submissions.review"):
            open_rules = list(submission_workflow.open_warnings(settings.data_dir / row.findings_path,
                                                                submissions.report_waivers(session, row.id)).values())
    own = caller.institution_code == detail.institution_code
    pages = max(1, ((findings.total if findings else 0) + FINDINGS_PAGE_SIZE - 1) // FINDINGS_PAGE_SIZE)
    done = request.query_params.get("done", "")
    if done in ("uploaded", "submitted") and detail.state == "validation_failed" and not error:
        error = (f"已上传，但校验未通过：错误 {detail.error_count} 条。请查看下方的校验结果或下载错误报告，"
                 "修正文件后重新上传。")
    return _page(request, "submission_detail.html", caller, status_code=status_code, item=detail, findings=findings,
                 page=page, pages=pages, severity=severity, open_rules=open_rules, own=own, error=error,
                 notice=None if error else _NOTICES.get(done),
                 form=form or {}, row_comment_slots=ROW_COMMENT_SLOTS)


@router.get("/submissions/{submission_id}", response_class=HTMLResponse)
def detail_page(
    submission_id: int,
    request: Request,
    page: int = Query(default=1, ge=1, le=1_000_000),
    severity: Literal["", "error", "warning"] = Query(default=""),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.read", console=True)),
) -> Response:
    """Show one submission: its state, the findings (paged, values masked), state changes, comments and waivers."""
    return _detail_page(request, session, caller, submission_id, page=page, severity=severity)


@router.get("/submissions/{submission_id}/errors.{kind}")
def error_report_file(
    submission_id: int, kind: Literal["csv", "xlsx"], request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.read", console=True)),
) -> Response:
    """Download the findings as CSV or XLSX (as GET /api/v1/submissions/{id}/errors.csv or .xlsx)."""
    path, name = submissions.error_report(session, request, caller, request.app.state.settings, submission_id, kind)
    return FileResponse(path, media_type=REPORT_MEDIA_TYPES[kind], filename=name,
                        headers={"Cache-Control": "no-store"})


@router.get("/submissions/{submission_id}/raw")
def raw_file(
    submission_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.review", console=True)),
) -> Response:
    """Download the submitted file as uploaded (as GET /api/v1/submissions/{id}/raw). The read is audited."""
    path, name = submissions.decrypt_raw(session, request, caller, request_keystore(request),
                                         request.app.state.settings, submission_id)
    return FileResponse(path, media_type="application/octet-stream", filename=name,
                        headers={"Cache-Control": "no-store"}, background=BackgroundTask(path.unlink, missing_ok=True))


def _act(request: Request, session: Session, caller: Principal, submission_id: int, capability: str, action: str,
         csrf: str, work: Any, done: str, form: dict[str, Any] | None = None) -> Response:
    """Run one form action on a submission; show the detail page with the message when it is rejected."""
    _check_csrf(request, caller, capability, csrf)
    try:
        work()
    except RegsandboxError as error:
        if error.status == 403:
            raise
        _failed(request, session, caller, action, f"submission:{submission_id}", error)
        return _detail_page(request, session, caller, submission_id, status_code=error.status, error=error.message,
                            form=form)
    return RedirectResponse(f"/console/submissions/{submission_id}?done={done}", status_code=303)


@router.post("/submissions/{submission_id}/submit", response_class=HTMLResponse)
def submit_form(submission_id: int, request: Request, csrf: str = Form(default="", alias="csrf_token", max_length=200),
                session: Session = Depends(get_session),
                caller: Principal = Depends(require("submissions.submit", console=True))) -> Response:
    """Submit a draft (as POST /api/v1/submissions/{id}/submit)."""
    return _act(request, session, caller, submission_id, "submissions.submit", "submissions.submit_draft", csrf,
                lambda: submission_workflow.submit_draft(session, request, caller, submission_id), "submitted")


@router.post("/submissions/{submission_id}/discard", response_class=HTMLResponse)
def discard_form(submission_id: int, request: Request,
                 csrf: str = Form(default="", alias="csrf_token", max_length=200),
                 session: Session = Depends(get_session),
                 caller: Principal = Depends(require("submissions.submit", console=True))) -> Response:
    """Discard a draft (as POST /api/v1/submissions/{id}/discard)."""
    return _act(request, session, caller, submission_id, "submissions.submit", "submissions.discard", csrf,
                lambda: submission_workflow.discard_draft(session, request, caller, submission_id), "discarded")


def parse_lines(text: str) -> list[int] | None:
    """Parse line numbers separated by spaces, commas or 、. An empty text means every line (None)."""
    parts = [part for part in _LINE_SEPARATORS.split(text.strip()) if part]
    if not parts:
        return None
    bad = [part for part in parts if not part.isascii() or not part.isdigit() or int(part) < 1]
    if bad:
        raise invalid("WAIVER_LINES_INVALID", f"行号“{bad[0][:20]}”无效：行号应为正整数，多个行号用逗号或空格分隔，"
                                              "例如 2, 5, 18；不填则豁免该规则的全部提示。")
    return [int(part) for part in parts]


@router.post("/submissions/{submission_id}/waive", response_class=HTMLResponse)
def waive_form(submission_id: int, request: Request, rule_id: str = Form(default="", max_length=64),
               lines: str = Form(default="", max_length=100_000), reason: str = Form(default="", max_length=4000),
               csrf: str = Form(default="", alias="csrf_token", max_length=200),
               session: Session = Depends(get_session),
               caller: Principal = Depends(require("submissions.review", console=True))) -> Response:
    """Waive the open warnings of one rule, on the listed lines or all (as POST /api/v1/submissions/{id}/waivers)."""
    return _act(request, session, caller, submission_id, "submissions.review", "submissions.waive", csrf,
                lambda: submission_workflow.waive(session, request, caller, request.app.state.settings, submission_id,
                                                  rule_id=rule_id, lines=parse_lines(lines), reason=reason),
                "waived", form={"rule_id": rule_id, "lines": lines, "reason": reason})


@router.post("/submissions/{submission_id}/accept", response_class=HTMLResponse)
def accept_form(submission_id: int, request: Request, comment: str = Form(default="", max_length=2000),
                csrf: str = Form(default="", alias="csrf_token", max_length=200),
                session: Session = Depends(get_session),
                caller: Principal = Depends(require("submissions.review", console=True))) -> Response:
    """Accept a submission pending review (as POST /api/v1/submissions/{id}/accept)."""
    return _act(request, session, caller, submission_id, "submissions.review", "submissions.accept", csrf,
                lambda: submissions.review(session, request, caller, submission_id, "accepted", comment),
                "accepted", form={"accept_comment": comment})


def _row_comments(lines: list[str], fields: list[str], comments: list[str]) -> list[submissions.RowCommentIn]:
    """Pair the row-comment inputs of the return form, skipping the slots left empty."""
    result = []
    for index, comment in enumerate(comments):
        line = lines[index].strip() if index < len(lines) else ""
        field = fields[index].strip() if index < len(fields) else ""
        if not (line or field or comment.strip()):
            continue
        if not line.isascii() or not line.isdigit() or int(line) < 1:
            raise invalid("ROW_COMMENT_LINE_INVALID",
                          f"第 {index + 1} 条行级意见的行号“{line[:20]}”无效，请填写文件中的行号（正整数）。")
        if not comment.strip():
            raise invalid("ROW_COMMENT_EMPTY", f"第 {line} 行的行级意见为空，请填写意见或清空该行。")
        text = comment.strip()[:submissions.MAX_COMMENT_LENGTH]
        result.append(submissions.RowCommentIn(int(line), field or None, text))
    return result


@router.post("/submissions/{submission_id}/return", response_class=HTMLResponse)
def return_form(submission_id: int, request: Request, comment: str = Form(default="", max_length=2000),
                row_line: list[str] = Form(default=[]), row_field: list[str] = Form(default=[]),
                row_comment: list[str] = Form(default=[]),
                csrf: str = Form(default="", alias="csrf_token", max_length=200),
                session: Session = Depends(get_session),
                caller: Principal = Depends(require("submissions.review", console=True))) -> Response:
    """Return a submission pending review with a comment and row comments (as POST /api/v1/submissions/{id}/return)."""
    form = {"return_comment": comment,
            "rows": [{"line": line, "field": field, "comment": text}
                     for line, field, text in zip(row_line, row_field, row_comment)]}
    return _act(request, session, caller, submission_id, "submissions.review", "submissions.return", csrf,
                lambda: submissions.review(session, request, caller, submission_id, "returned", comment,
                                           _row_comments(row_line, row_field, row_comment)),
                "returned", form=form)
