"""Report notebooks, schedules and report runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.cron import parse_cron
from admin_api.db import utc_now
from admin_api.deps import get_session, require
from admin_api.errors import conflict, invalid, not_found
from admin_api.models import ReportNotebook, ReportRun, Schedule
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
from admin_api.services import (
    claim_run,
    get_schedule,
    notebook_file,
    queue_run,
    require_approved,
    validate_recipients,
)
from regsandbox_core.crypto import sm3_file

router = APIRouter()


def _get_notebook(session: Session, notebook_id: int) -> ReportNotebook:
    notebook = session.get(ReportNotebook, notebook_id)
    if notebook is None:
        raise not_found("NOTEBOOK_NOT_FOUND", f"报告笔记本 {notebook_id} 不存在。")
    return notebook


@router.get("/report-notebooks", response_model=list[NotebookOut])
def list_notebooks(
    session: Session = Depends(get_session), _caller: Principal = Depends(require("notebooks.read"))
) -> list[NotebookOut]:
    """List report notebooks with status and SM3 digest."""
    return [NotebookOut.of(n) for n in session.scalars(select(ReportNotebook).order_by(ReportNotebook.id))]


@router.post("/report-notebooks/{notebook_id}/approve", response_model=NotebookOut)
def approve_notebook(
    notebook_id: int,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("notebooks.approve")),
) -> NotebookOut:
    """Approve the notebook file as it is now; its SM3 digest is recorded."""
    notebook = _get_notebook(session, notebook_id)
    path = notebook_file(request.app.state.project_root, notebook)
    try:
        digest = sm3_file(path)
    except OSError as error:
        raise not_found(
            "NOTEBOOK_FILE_NOT_FOUND", f"报告笔记本文件 {notebook.path} 无法读取（{type(error).__name__}），请确认文件存在。"
        ) from error
    notebook.status, notebook.sm3_digest = "approved", digest
    notebook.approved_by, notebook.approved_at = caller.username, utc_now()
    add_event(session, request, caller, "notebooks.approve", f"report_notebook:{notebook.id}", "success",
              {"path": notebook.path, "sm3": digest})
    session.commit()
    return NotebookOut.of(notebook)


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
    name = body.name.strip()
    if not name:
        raise invalid("INVALID_NAME", "调度名称不能为空。")
    cron, _trigger = parse_cron(body.cron)
    recipients = validate_recipients(body.recipients)
    notebook = _get_notebook(session, body.notebook_id)
    if body.enabled:
        require_approved(notebook)
    if session.scalars(select(Schedule).where(Schedule.name == name)).first() is not None:
        raise conflict("SCHEDULE_EXISTS", f"调度名称 {name} 已被使用，请换一个名称。")

    schedule = Schedule(name=name, notebook_id=notebook.id, cron=cron, recipients=recipients,
                        enabled=body.enabled, created_by=caller.username)
    session.add(schedule)
    try:
        session.flush()
    except IntegrityError as error:
        session.rollback()
        raise conflict("SCHEDULE_EXISTS", f"调度名称 {name} 已被使用，请换一个名称。") from error
    add_event(session, request, caller, "schedules.create", f"schedule:{schedule.id}", "success",
              {"name": name, "notebook_id": notebook.id, "cron": cron, "enabled": body.enabled})
    session.commit()
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
    schedule = get_schedule(session, schedule_id)
    changes: dict[str, object] = {}
    if body.cron is not None:
        schedule.cron, _trigger = parse_cron(body.cron)
        changes["cron"] = schedule.cron
    if body.recipients is not None:
        schedule.recipients = validate_recipients(body.recipients)
        changes["recipients"] = len(schedule.recipients)
    if body.enabled is not None:
        if body.enabled:
            require_approved(schedule.notebook)
        schedule.enabled = body.enabled
        changes["enabled"] = body.enabled
    add_event(session, request, caller, "schedules.update", f"schedule:{schedule.id}", "success", changes)
    session.commit()
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
    """Take a queued run; returns the notebook path, approved digest and recipients, or 409 when taken."""
    run = claim_run(session, request, caller, run_id)
    notebook = run.schedule.notebook
    return ClaimedRun(
        **RunOut.of(run).model_dump(),
        notebook_id=notebook.id,
        notebook_name=notebook.name,
        notebook_path=notebook.path,
        notebook_file=str(notebook_file(request.app.state.project_root, notebook)),
        approved_sm3=notebook.sm3_digest or "",
        recipients=list(run.schedule.recipients),
    )


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
