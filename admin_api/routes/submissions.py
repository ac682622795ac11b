"""报表报送 and 报表审核: upload report files, list and read submissions, error reports, the original file, review.

Institution users (报送人员, 机构管理员) submit and read their own institution's submissions only;
regulators read every institution's. Only the regulator reviewer (监管审查员) reviews and
downloads the original file and waives warnings (提示). A draft is seen by its own institution
only, which submits or discards it. Rejected writes are audited with outcome ``failed`` (denials by the
authorisation checks are audited as ``denied`` where they happen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from admin_api import submission_workflow, submissions
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.keyaccess import request_keystore
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError

router = APIRouter()
T = TypeVar("T")

MAX_SUBMISSION_BODY_BYTES = 2 * 1024**3 + 1024**2
"""A report file of up to 2 GiB (intake.reader.DEFAULT_MAX_BYTES) plus room for the multipart framing and form fields."""
REPORT_MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


class RowCommentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: int = Field(ge=1, le=2_000_000_000)
    field_code: str | None = Field(default=None, max_length=64)
    comment: str = Field(min_length=1, max_length=submissions.MAX_COMMENT_LENGTH)


class AcceptBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str | None = Field(default=None, max_length=submissions.MAX_COMMENT_LENGTH)


class ReturnBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field(min_length=1, max_length=submissions.MAX_COMMENT_LENGTH)
    row_comments: list[RowCommentBody] = Field(default_factory=list)


class WaiverBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rule_id: str = Field(min_length=1, max_length=64, description="规则编号，如 R-JJ-025")
    lines: list[int] | None = Field(default=None, max_length=submission_workflow.MAX_WAIVER_LINES,
                                    description="要豁免的行号；不填则豁免该规则的全部未说明提示")
    reason: str = Field(min_length=1, max_length=submissions.MAX_COMMENT_LENGTH, description="豁免理由")


def _audited(request: Request, session: Session, caller: Principal, action: str, resource: str,
             work: Callable[[], T]) -> T:
    """Run ``work``. On a platform error, roll back, store a ``failed`` audit event with the code and re-raise.

    403 errors come from ``deny`` or ``check_institution``, which already stored a ``denied`` event.
    """
    try:
        return work()
    except RegsandboxError as error:
        session.rollback()
        if error.status != 403:
            record_event(request, caller, action, resource, "failed", {"code": error.code})
        raise


@router.post("/submissions", response_model=submissions.SubmissionDetail, status_code=201,
             max_body_size=MAX_SUBMISSION_BODY_BYTES)
def submit_report(
    request: Request,
    template_code: str = Form(max_length=64, description="报表模板代码，如 EAST_DGXDYWJJB"),
    period_end: str = Form(max_length=16, description="报告期末日期，YYYYMMDD，如 20261130"),
    file: UploadFile = File(description="报表文件：按模板分隔的 TXT/CSV（UTF-8 或 GB18030）或 XLSX，最大 2 GB"),
    draft: bool = Form(default=False, description="true：保存为草稿，仅本机构可见，之后再提交"),
    template_version: int | None = Form(default=None, ge=1, le=999_999,
                                        description="模板版本号，按报送任务要求的版本填写；不填则使用最新版本"),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.submit")),
) -> submissions.SubmissionDetail:
    """Upload a report file of the caller's institution: staged, validated, stored encrypted, and recorded.

    The state is ``validation_failed`` when an error was found, else ``pending_review``. The previous
    version of the same template and period becomes ``superseded``. With ``draft`` the state is
    ``draft`` and nothing is superseded until the draft is submitted. A file that cannot be read is
    rejected with 422 and the reader's code, and nothing is stored.
    """
    resource = f"submission:{caller.institution_code or '-'}/{template_code[:64]}/{period_end[:16]}"
    action = "submissions.save_draft" if draft else "submissions.submit"
    row = _audited(request, session, caller, action, resource, lambda: submissions.submit(
        session, request, caller, request_keystore(request), request.app.state.settings,
        template_code=template_code, period_text=period_end, filename=file.filename, stream=file.file, draft=draft,
        template_version=template_version,
    ))
    return submissions.SubmissionDetail.load(session, row)


@router.get("/submissions", response_model=list[submissions.SubmissionOut])
def list_reports(
    request: Request,
    response: Response,
    template_code: str | None = Query(default=None, max_length=64),
    period_end: str | None = Query(default=None, max_length=16, description="YYYYMMDD"),
    state: str | None = Query(default=None, max_length=32),
    institution_code: str | None = Query(default=None, max_length=32),
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=50, ge=1, le=submissions.MAX_PAGE_SIZE),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.read")),
) -> list[submissions.SubmissionOut]:
    """List submissions, newest first, with the total in the X-Total-Count header."""
    rows, total = submissions.list_submissions(
        session, request, caller, template_code=template_code, period_text=period_end, state=state,
        institution_code=institution_code, offset=offset, limit=limit)
    response.headers["X-Total-Count"] = str(total)
    return [submissions.SubmissionOut.of(row) for row in rows]


@router.get("/submissions/{submission_id}", response_model=submissions.SubmissionDetail)
def read_report(
    submission_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.read")),
) -> submissions.SubmissionDetail:
    """Return one submission with its state changes and the reviewer's row comments."""
    row = submissions.visible_submission(session, request, caller, submission_id, "submissions.read")
    return submissions.SubmissionDetail.load(session, row)


def _error_report(kind: str, submission_id: int, request: Request, session: Session, caller: Principal) -> FileResponse:
    path, name = submissions.error_report(session, request, caller, request.app.state.settings, submission_id, kind)
    return FileResponse(path, media_type=REPORT_MEDIA_TYPES[kind], filename=name,
                        headers={"Cache-Control": "no-store"})


@router.get("/submissions/{submission_id}/errors.csv")
def report_errors_csv(
    submission_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.read")),
) -> FileResponse:
    """Download the validation findings as CSV (UTF-8 with BOM)."""
    return _error_report("csv", submission_id, request, session, caller)


@router.get("/submissions/{submission_id}/errors.xlsx")
def report_errors_xlsx(
    submission_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.read")),
) -> FileResponse:
    """Download the validation findings as an XLSX workbook."""
    return _error_report("xlsx", submission_id, request, session, caller)


@router.get("/submissions/{submission_id}/raw")
def report_raw(
    submission_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.review")),
) -> FileResponse:
    """Download the submitted file as uploaded (decrypted). The access is audited as a read of protected data."""
    path, name = _audited(request, session, caller, "submissions.raw_read", f"submission:{submission_id}",
                          lambda: submissions.decrypt_raw(session, request, caller, request_keystore(request),
                                                          request.app.state.settings, submission_id))
    return FileResponse(path, media_type="application/octet-stream", filename=name,
                        headers={"Cache-Control": "no-store"},
                        background=BackgroundTask(path.unlink, missing_ok=True))


@router.post("/submissions/{submission_id}/accept", response_model=submissions.SubmissionDetail)
def accept_report(
    submission_id: int, request: Request, body: AcceptBody | None = None, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.review")),
) -> submissions.SubmissionDetail:
    """Accept a submission that is pending review (审核通过) and send the submitter a system message."""
    comment = body.comment if body else None
    row = _audited(request, session, caller, "submissions.accept", f"submission:{submission_id}",
                   lambda: submissions.review(session, request, caller, submission_id, "accepted", comment))
    return submissions.SubmissionDetail.load(session, row)


@router.post("/submissions/{submission_id}/return", response_model=submissions.SubmissionDetail)
def return_report(
    submission_id: int, body: ReturnBody, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.review")),
) -> submissions.SubmissionDetail:
    """Return a submission that is pending review (退回) with a comment and optional row comments."""
    row_comments = [submissions.RowCommentIn(item.line, item.field_code, item.comment) for item in body.row_comments]
    row = _audited(request, session, caller, "submissions.return", f"submission:{submission_id}",
                   lambda: submissions.review(session, request, caller, submission_id, "returned", body.comment,
                                              row_comments))
    return submissions.SubmissionDetail.load(session, row)


@router.post("/submissions/{submission_id}/submit", response_model=submissions.SubmissionDetail)
def submit_draft(
    submission_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.submit")),
) -> submissions.SubmissionDetail:
    """Submit a draft of the caller's institution: it becomes ``validation_failed`` or ``pending_review``."""
    row = _audited(request, session, caller, "submissions.submit_draft", f"submission:{submission_id}",
                   lambda: submission_workflow.submit_draft(session, request, caller, submission_id))
    return submissions.SubmissionDetail.load(session, row)


@router.post("/submissions/{submission_id}/discard", response_model=submissions.SubmissionDetail)
def discard_draft(
    submission_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.submit")),
) -> submissions.SubmissionDetail:
    """Discard a draft of the caller's institution (state ``withdrawn``, kept for the audit trail)."""
    row = _audited(request, session, caller, "submissions.discard", f"submission:{submission_id}",
                   lambda: submission_workflow.discard_draft(session, request, caller, submission_id))
    return submissions.SubmissionDetail.load(session, row)


@router.get("/submissions/{submission_id}/findings", response_model=submission_workflow.FindingsPage)
def read_findings(
    submission_id: int, request: Request,
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=50, ge=1, le=submissions.MAX_PAGE_SIZE),
    severity: str | None = Query(default=None, max_length=16, description="error（错误）或 warning（提示）"),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.read")),
) -> submission_workflow.FindingsPage:
    """Return one page of the validation findings (values masked), with the waiver reason of waived warnings."""
    return submission_workflow.findings_page(session, request, caller, request.app.state.settings, submission_id,
                                             offset, limit, severity)


@router.post("/submissions/{submission_id}/waivers", response_model=submissions.SubmissionDetail)
def waive_warnings(
    submission_id: int, body: WaiverBody, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("submissions.review")),
) -> submissions.SubmissionDetail:
    """Waive the unexplained warnings (提示) of one rule, on all lines or the listed ones, with a reason."""
    row = _audited(request, session, caller, "submissions.waive", f"submission:{submission_id}",
                   lambda: submission_workflow.waive(session, request, caller, request.app.state.settings,
                                                     submission_id, rule_id=body.rule_id, lines=body.lines,
                                                     reason=body.reason))
    return submissions.SubmissionDetail.load(session, row)
