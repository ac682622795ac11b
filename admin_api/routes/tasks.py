"""报送任务: create, list, read and close collection tasks.

Regulators (监管审查员) and the system administrator create and close tasks; regulators read every
task with the state of each target institution. Institution users (报送人员, 机构管理员) see the tasks
that target their own institution, with their own state only. Rejected writes are audited with
outcome ``failed``; denials are audited as ``denied`` where they happen.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.orm import Session

from admin_api import tasks
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError

router = APIRouter()


@router.post("/tasks", response_model=tasks.TaskDetail, status_code=201)
def create_task(
    body: tasks.TaskCreate, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("tasks.write")),
) -> tasks.TaskDetail:
    """Create a collection task; institution types are resolved to the active institutions of those types now."""
    try:
        task = tasks.create_task(session, request, caller, body)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "tasks.create", f"task:{body.template_code[:64]}/{body.period_end[:16]}",
                     "failed", {"code": error.code})
        raise
    return tasks.task_detail(session, request, caller, task.id)


@router.get("/tasks", response_model=list[tasks.TaskOut])
def list_tasks(
    request: Request,
    response: Response,
    status: str | None = Query(default=None, max_length=16, description="open 或 closed"),
    template_code: str | None = Query(default=None, max_length=64),
    period_end: str | None = Query(default=None, max_length=16, description="YYYYMMDD"),
    institution_code: str | None = Query(default=None, max_length=32),
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=50, ge=1, le=tasks.MAX_PAGE_SIZE),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("tasks.read")),
) -> list[tasks.TaskOut]:
    """List tasks, newest first, with the total in the X-Total-Count header; institution users get their own state."""
    items, total = tasks.list_tasks(session, request, caller, status=status, template_code=template_code,
                                    period_text=period_end, institution_code=institution_code,
                                    offset=offset, limit=limit)
    response.headers["X-Total-Count"] = str(total)
    return items


@router.get("/tasks/{task_id}", response_model=tasks.TaskDetail)
def read_task(
    task_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("tasks.read")),
) -> tasks.TaskDetail:
    """Return a task with the state of each target, the on-time, accepted and overdue counts."""
    return tasks.task_detail(session, request, caller, task_id)


@router.post("/tasks/{task_id}/close", response_model=tasks.TaskDetail)
def close_task(
    task_id: int, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require("tasks.write")),
) -> tasks.TaskDetail:
    """Close an open task: no more reminders are sent for it."""
    try:
        tasks.close_task(session, request, caller, task_id)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "tasks.close", f"task:{task_id}", "failed", {"code": error.code})
        raise
    return tasks.task_detail(session, request, caller, task_id)
