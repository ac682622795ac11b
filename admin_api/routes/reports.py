"""Report notebooks, schedules and report runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.deps import get_session, require
from admin_api.errors import conflict, invalid, not_found
from admin_api.models import ReportNotebook, ReportRun, Schedule
from admin_api.report_files import download_report_file
from admin_api.schemas import (
    ClaimedRun,
    FinishRequest,
    NotebookOut,
    RunOut,
    RunRequest,
    ScheduleIn,
    ScheduleOut,
    ScheduleUpdate,
)
from admin_api.security import Principal
from admin_api import services
from admin_api.services import claim_run, get_notebook, get_schedule, notebook_file, queue_run
from admin_api.signatures import approval_signature, request_trusted_keys, signature_download

router = APIRouter()


@router.get("/report-notebooks", response_model=list[NotebookOut])
def list_notebooks(
    request: Request,
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("notebooks.read")),
) -> list[NotebookOut]:
    """List report notebooks with status, SM3 digest and the approval signature summary."""
    trusted = request_trusted_keys(request)
    return [NotebookOut.of(n, approval_signature(n, trusted))
            for n in session.scalars(select(ReportNotebook).order_by(ReportNotebook.id))]


@router.post("/report-notebooks/{notebook_id}/approve", response_model=NotebookOut)
def approve_notebook(
    notebook_id: int,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("notebooks.approve")),
) -> NotebookOut:
    """Approve the notebook file as it is now; its SM3 digest is recorded and the approval signed."""
    notebook = services.approve_notebook(session, request, caller, request.app.state.project_root, notebook_id)
    return NotebookOut.of(notebook, approval_signature(notebook, request_trusted_keys(request)))


@router.get("/report-notebooks/{notebook_id}/signature", response_class=Response)
def notebook_signature_file(
    notebook_id: int, session: Session = Depends(get_session), _caller: Principal = Depends(require("notebooks.read"))
) -> Response:
    """Download the SM2-signed envelope of a notebook's current approval, for ``regsandbox verify``."""
    notebook = get_notebook(session, notebook_id)
    if notebook.status != "approved" or notebook.signature is None:
        raise not_found(
            "SIGNATURE_NOT_FOUND",
            f"报告笔记本 {notebook.name}（编号 {notebook_id}）没有已签名的审批记录；请由监管审查员审批（或重新审批）后再下载。",
        )
    return signature_download(notebook.signature, f"notebook-approval-{notebook.id}.json")


@router.get("/schedules", response_model=list[ScheduleOut])
def list_schedules(
    session: Session = Depends(get_session), _caller: Principal = Depends(require("schedules.read"))
) -> list[ScheduleOut]:
    """List report schedules."""
    return [ScheduleOut.of(s) for s in session.scalars(select(Schedule).order_by(Schedule.id))]


@router.get("/schedules/{schedule_id}", response_model=ScheduleOut)
def read_schedule(
    schedule_id: int, session: Session = Depends(get_session), _caller: Principal = Depends(require("schedules.read"))
) -> ScheduleOut:
    """Return one report schedule."""
    return ScheduleOut.of(get_schedule(session, schedule_id))


@router.post("/schedules", response_model=ScheduleOut, status_code=201)
def create_schedule(
    body: ScheduleIn,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("schedules.write")),
) -> ScheduleOut:
    """Create a schedule; an enabled one needs an approved notebook, a disabled one may wait for approval."""
    schedule = services.create_schedule(
        session, request, caller, name=body.name, notebook_id=body.notebook_id, cron=body.cron,
        recipients=body.recipients, enabled=body.enabled,
    )
    return ScheduleOut.of(schedule)


@router.patch("/schedules/{schedule_id}", response_model=ScheduleOut)
def update_schedule(
    schedule_id: int,
    body: ScheduleUpdate,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("schedules.write")),
) -> ScheduleOut:
    """Change a schedule's cron, recipients or enabled flag; enabling needs an approved notebook."""
    schedule = services.update_schedule(
        session, request, caller, schedule_id, cron=body.cron, recipients=body.recipients, enabled=body.enabled
    )
    return ScheduleOut.of(schedule)


@router.post("/schedules/{schedule_id}/runs", response_model=RunOut, status_code=201)
def request_run(
    schedule_id: int,
    request: Request,
    body: RunRequest | None = None,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("runs.queue")),
) -> RunOut:
    """Queue a run of a schedule (``trigger`` manual or cron)."""
    run = queue_run(session, request, caller, schedule_id, (body or RunRequest()).trigger)
    return RunOut.of(run)


@router.get("/report-runs", response_model=list[RunOut])
def list_runs(
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("runs.read")),
    status: Literal["queued", "running", "succeeded", "failed"] | None = Query(default=None),
    limit: int = Query(default=200, ge=1, le=1000),
) -> list[RunOut]:
    """List report runs, oldest queued first when filtering by status, else newest first."""
    query = select(ReportRun).limit(limit)
    if status is not None:
        query = query.where(ReportRun.status == status).order_by(ReportRun.id)
    else:
        query = query.order_by(ReportRun.id.desc())
    return [RunOut.of(run) for run in session.scalars(query)]


@router.post("/report-runs/{run_id}/claim", response_model=ClaimedRun)
def claim(
    run_id: int,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("runs.work")),
) -> ClaimedRun:
    """Take a queued run; returns the notebook path, approved digest, approval signature and recipients.

    409 when the run is taken. ``approval_signature`` is the stored envelope, or null for an
    approval made before signing, which the runner rejects.
    """
    run = claim_run(session, request, caller, run_id)
    notebook = run.schedule.notebook
    return ClaimedRun(
        **RunOut.of(run).model_dump(),
        notebook_id=notebook.id,
        notebook_name=notebook.name,
        notebook_path=notebook.path,
        notebook_file=str(notebook_file(request.app.state.project_root, notebook)),
        approved_sm3=notebook.sm3_digest or "",
        approval_signature=_stored_envelope(notebook.signature),
        recipients=list(run.schedule.recipients),
    )


def _stored_envelope(stored: str | None) -> dict | None:
    """Return a stored envelope as an object; an unreadable one becomes None, which the runner rejects."""
    if stored is None:
        return None
    try:
        envelope = json.loads(stored)
    except ValueError:
        return None
    return envelope if isinstance(envelope, dict) else None


def _check_archive_path(reports_dir: Path, value: str) -> str:
    path = Path(value)
    resolved = (path if path.is_absolute() else reports_dir / path).resolve()
    if not resolved.is_relative_to(reports_dir.resolve()):
        raise invalid(
            "INVALID_ARCHIVE_PATH", f"归档路径 {value!r} 不在报告归档目录 {reports_dir} 内，请提供该目录下的路径。"
        )
    return str(resolved)


@router.post("/report-runs/{run_id}/finish", response_model=RunOut)
def finish(
    run_id: int,
    body: FinishRequest,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("runs.work")),
) -> RunOut:
    """Record the outcome of a claimed run."""
    run = session.get(ReportRun, run_id)
    if run is None:
        raise not_found("RUN_NOT_FOUND", f"报告运行 {run_id} 不存在。")
    if run.status != "running":
        raise conflict("RUN_NOT_RUNNING", f"报告运行 {run_id} 当前状态为 {run.status}，只有运行中的任务才能结束。")
    if body.status == "failed" and not body.error_code:
        raise invalid("ERROR_CODE_REQUIRED", "失败的运行必须提供 error_code。")
    archive_path = _check_archive_path(request.app.state.settings.reports_dir, body.archive_path) \
        if body.archive_path else None

    run.status, run.finished_at, run.archive_path = body.status, utc_now(), archive_path
    run.error_code = body.error_code if body.status == "failed" else None
    run.error_message = body.error_message if body.status == "failed" else None
    # A failed run (e.g. SMTP unreachable) is a failed outcome in the audit log, not a successful call.
    outcome = "success" if body.status == "succeeded" else "failed"
    add_event(session, request, caller, "runs.finish", f"report_run:{run.id}", outcome,
              {"status": body.status, "error_code": run.error_code})
    session.commit()
    return RunOut.of(run)


@router.get("/report-runs/{run_id}/files/{name}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def download_run_file(
    run_id: int,
    name: str,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("runs.read")),
) -> StreamingResponse:
    """Download an archived report file, decrypted after its signed manifest and digests verified.

    ``name`` is a plaintext file name from the run's manifest, such as ``report.html``. Every
    download and every failure is audited as ``report.download``.
    """
    return download_report_file(request, session, caller, run_id, name)
