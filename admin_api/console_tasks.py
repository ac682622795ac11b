"""The console pages 报送任务 and 报送统计: list, create, view and close collection tasks, and their rates.

The forms call the functions of :mod:`admin_api.tasks`, so the checks, Chinese messages and
audit events are those of the API. Institution users (``tasks.read``) see only the tasks that
target their institution, with their own state, and get a 403 page for another institution's
task. The statistics page needs ``tasks.statistics`` and is refused to institution users.
Deadlines are typed and shown in 北京时间.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from admin_api import task_statistics, tasks
from admin_api.console import _check_csrf, _failed, _page
from admin_api.db import utc_now
from admin_api.deps import get_session, require
from admin_api.display import BEIJING
from admin_api.errors import invalid
from admin_api.institutions import INSTITUTION_TYPES
from admin_api.models import TASK_STATUSES
from admin_api.security import Principal
from admin_api.submissions import FREQUENCY_NAMES, catalog
from admin_api.workbench import template_name
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)

PAGE_SIZE = 50
_SEPARATORS = re.compile(r"[\s,，;；、]+")
_DEADLINE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})$")
_NOTICES = {"created": "已发布报送任务 {}。", "closed": "已关闭报送任务 {}，不再发送提醒。"}


def _template_choices() -> list[dict[str, Any]]:
    """Every version of every catalog template, newest version first within a code."""
    templates = catalog()
    choices = []
    for code in templates.codes():
        for version in sorted(templates.versions(code), reverse=True):
            template = templates.get(code, version)
            choices.append({"value": f"{code}:{version}", "code": code, "version": version, "name": template.name,
                            "frequency": FREQUENCY_NAMES.get(template.frequency, template.frequency)})
    return choices


def _template_codes() -> list[tuple[str, str]]:
    templates = catalog()
    return [(code, templates.get(code).name) for code in templates.codes()]


def _split(text: str) -> list[str]:
    return [part for part in _SEPARATORS.split(text) if part]


def parse_deadline(text: str) -> datetime:
    """Read a 北京时间 deadline typed as ``YYYY-MM-DDTHH:MM`` (an HTML datetime-local field) or with a space."""
    match = _DEADLINE.match(text.strip())
    if match is None:
        raise invalid("DEADLINE_INVALID", f"截止时间“{text.strip()[:40]}”格式无效，请按北京时间填写，"
                                          "格式为 YYYY-MM-DD HH:MM，例如 2026-12-15 18:00。")
    year, month, day, hour, minute = (int(part) for part in match.groups())
    try:
        return datetime(year, month, day, hour, minute, tzinfo=BEIJING)
    except ValueError:
        raise invalid("DEADLINE_INVALID", f"截止时间“{text.strip()}”不是有效的日期时间，请检查月份、日期和时刻。") from None


def _parse_template(value: str) -> tuple[str, int | None]:
    code, _, version = value.partition(":")
    if not code:
        raise invalid("TEMPLATE_REQUIRED", "请选择报表模板及版本。")
    if version and not version.isdigit():
        raise invalid("TEMPLATE_NOT_FOUND", f"模板版本“{version[:10]}”无效，请从列表中选择模板版本。")
    return code, int(version) if version else None


def _task_body(form: dict[str, Any]) -> tasks.TaskCreate:
    """Build the API body from the form; 422 with a Chinese message for values the API model rejects."""
    code, version = _parse_template(form["template"])
    reminder_parts = _split(form["reminder_days"])
    bad = [part for part in reminder_parts if not part.isdigit()]
    if bad:
        raise invalid("REMINDER_DAYS_INVALID", f"提醒天数“{bad[0][:10]}”无效，请填写截止前的天数，用逗号分隔，例如 3,1。")
    by_types = form["target_kind"] == "types"
    codes = _split(form["institution_codes"])
    if not by_types and len(codes) > tasks.MAX_TARGETS:
        raise invalid("TASK_TARGETS_INVALID", f"一次最多列出 {tasks.MAX_TARGETS} 个机构代码（当前 {len(codes)} 个），"
                                              "请按机构类型发布或分批发布。")
    try:
        return tasks.TaskCreate(
            template_code=code, template_version=version, period_end=form["period_end"].strip(),
            frequency=form["frequency"] or None, deadline=parse_deadline(form["deadline"]),
            institution_codes=None if by_types else codes, institution_types=form["institution_types"] if by_types else None,
            reminder_days=[int(part) for part in reminder_parts])
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise invalid("INVALID_REQUEST", f"字段 {field} 的值无效：{first['msg']}。请修改后重新提交。") from None


def _list_filters(request: Request, caller: Principal) -> dict[str, str]:
    params = request.query_params
    filters = {name: params.get(name, "").strip()[:64] for name in ("status", "template_code", "period_end")}
    filters["institution_code"] = "" if caller.institution_code else params.get("institution_code", "").strip()[:32]
    return filters


def _list_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
               error: str | None = None, form: dict[str, Any] | None = None) -> Response:
    filters = _list_filters(request, caller)
    offset_text = request.query_params.get("offset", "0")
    offset = int(offset_text) if offset_text.isdigit() else 0
    items: list[tasks.TaskOut] = []
    total = 0
    try:
        items, total = tasks.list_tasks(session, request, caller, status=filters["status"] or None,
                                        template_code=filters["template_code"] or None,
                                        period_text=filters["period_end"] or None,
                                        institution_code=filters["institution_code"] or None,
                                        offset=offset, limit=PAGE_SIZE)
    except RegsandboxError as filter_error:
        if filter_error.status == 403:
            raise
        error, status_code = error or filter_error.message, filter_error.status
    filled = {key: value for key, value in filters.items() if value}
    previous_url = f"?{urlencode({**filled, 'offset': max(offset - PAGE_SIZE, 0)})}" if offset > 0 else None
    next_url = f"?{urlencode({**filled, 'offset': offset + PAGE_SIZE})}" if offset + PAGE_SIZE < total else None
    notice = None
    done, task_id = request.query_params.get("done", ""), request.query_params.get("task", "")
    if not error and done in _NOTICES and task_id.isdigit():
        notice = _NOTICES[done].format(task_id)
    return _page(request, "tasks.html", caller, status_code=status_code, items=items, total=total,
                 first=offset + 1 if items else 0, last=offset + len(items), previous_url=previous_url,
                 next_url=next_url, filters=filters, task_statuses=TASK_STATUSES, templates=_template_choices(),
                 template_codes=_template_codes(),
                 frequencies=FREQUENCY_NAMES, institution_types=INSTITUTION_TYPES, notice=notice, error=error,
                 form=form or {"target_kind": "institutions", "reminder_days": "3,1", "institution_types": []},
                 now=utc_now())


@router.get("/tasks", response_class=HTMLResponse)
def tasks_page(request: Request, session: Session = Depends(get_session),
               caller: Principal = Depends(require("tasks.read", console=True))) -> Response:
    """List collection tasks with filters; institution users see their own tasks, writers get the new-task form."""
    return _list_page(request, session, caller)


@router.post("/tasks", response_class=HTMLResponse)
def create_task_form(
    request: Request,
    template: str = Form(default="", max_length=100),
    period_end: str = Form(default="", max_length=16),
    frequency: str = Form(default="", max_length=16),
    deadline: str = Form(default="", max_length=40),
    target_kind: str = Form(default="institutions", max_length=16),
    institution_codes: str = Form(default="", max_length=40000),
    institution_types: list[str] = Form(default=[]),
    reminder_days: str = Form(default="", max_length=100),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("tasks.write", console=True)),
) -> Response:
    """Publish a collection task with the checks of POST /api/v1/tasks."""
    _check_csrf(request, caller, "tasks.write", csrf)
    form = {"template": template, "period_end": period_end, "frequency": frequency, "deadline": deadline,
            "target_kind": target_kind, "institution_codes": institution_codes,
            "institution_types": [item[:50] for item in institution_types[:20]], "reminder_days": reminder_days}
    try:
        task = tasks.create_task(session, request, caller, _task_body(form))
    except RegsandboxError as error:
        _failed(request, session, caller, "tasks.create", f"task:{template[:64]}/{period_end[:16]}", error)
        return _list_page(request, session, caller, status_code=error.status, error=error.message, form=form)
    return RedirectResponse(f"/console/tasks/{task.id}?done=created", status_code=303)


@router.get("/tasks/statistics", response_class=HTMLResponse)
def statistics_page(request: Request, session: Session = Depends(get_session),
                    caller: Principal = Depends(require("tasks.statistics", console=True))) -> Response:
    """Show the on-time and acceptance rates per institution and per task, worst first unless sorted otherwise."""
    task_statistics.check_regulator(request, caller)
    params = request.query_params
    sort = params.get("sort", "on_time_rate")
    descending = params.get("order", "asc") == "desc"
    form = {"year": params.get("year", "")[:10], "template_code": params.get("template_code", "")[:64],
            "sort": sort, "order": "desc" if descending else "asc"}
    try:
        rate_filter = task_statistics.parse_filter(form["year"], form["template_code"])
        institutions = task_statistics.rate_rows(session, "institution", rate_filter, sort=sort, descending=descending)
        by_task = task_statistics.rate_rows(session, "task", rate_filter, sort=sort, descending=descending)
    except RegsandboxError as error:
        return _page(request, "task_statistics.html", caller, status_code=error.status, error=error.message,
                     form=form, institutions=[], by_task=[], total=None, sort_keys=task_statistics.SORT_KEYS,
                     template_codes=_template_codes())
    task_statistics.record_read(session, request, caller, rate_filter, "page")
    return _page(request, "task_statistics.html", caller, error=None, form=form, institutions=institutions,
                 template_name=template_name,
                 by_task=by_task, total=task_statistics.totals(institutions), sort_keys=task_statistics.SORT_KEYS,
                 template_codes=_template_codes())


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
def task_page(task_id: int, request: Request, session: Session = Depends(get_session),
              caller: Principal = Depends(require("tasks.read", console=True))) -> Response:
    """Show one task and the state of each target; institution users see their own target only."""
    detail = tasks.task_detail(session, request, caller, task_id)
    state = request.query_params.get("state", "")
    targets = [item for item in detail.targets if not state or item.state == state
               or (state == tasks.OVERDUE_KEY and item.overdue)]
    state_counts: dict[str, int] = {}
    for item in detail.targets:
        state_counts[item.state] = state_counts.get(item.state, 0) + 1
    done = request.query_params.get("done", "")
    return _page(request, "task_detail.html", caller, task=detail, targets=targets, state=state,
                 state_counts=state_counts, state_name=tasks.target_state_name,
                 notice=_NOTICES[done].format(task_id) if done in _NOTICES else None, error=None)


@router.post("/tasks/{task_id}/close", response_class=HTMLResponse)
def close_task_form(
    task_id: int,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("tasks.write", console=True)),
) -> Response:
    """Close an open task (as POST /api/v1/tasks/{id}/close)."""
    _check_csrf(request, caller, "tasks.write", csrf)
    try:
        tasks.close_task(session, request, caller, task_id)
    except RegsandboxError as error:
        _failed(request, session, caller, "tasks.close", f"task:{task_id}", error)
        if error.status == 404:
            raise
        detail = tasks.task_detail(session, request, caller, task_id)
        return _page(request, "task_detail.html", caller, status_code=error.status, task=detail,
                     targets=detail.targets, state="", state_counts={}, state_name=tasks.target_state_name,
                     notice=None, error=error.message)
    return RedirectResponse(f"/console/tasks/{task_id}?done=closed", status_code=303)
