"""Collection tasks (报送任务): which institutions must submit a report template for a period, and by when.

A regulator creates a task for one template version and period end, with a deadline and targets
given either as institution codes or as institution types. The targets are resolved to
institutions when the task is created and stored as :class:`~admin_api.models.ReportTaskTarget`
rows, so later registry changes do not change an issued task.

The state of a target is the state of the institution's current submission of the template and
period (:mod:`admin_api.submissions`): its newest non-superseded version that passed validation,
else its newest that failed. A target is overdue (已逾期) when the deadline
passed without an accepted or pending submission. :func:`send_due_reminders` posts system messages
to the reporters (报送人员) of targets that have not submitted, ``reminder_days`` days before the
deadline and once after it; :class:`ReminderSender` runs it in a thread of admin_api.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from fastapi import Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.deps import check_institution
from admin_api.errors import conflict, invalid, not_found
from admin_api.messages import post_message, user_id_of
from admin_api.models import (
    SUBMISSION_STATES,
    TASK_STATUSES,
    Institution,
    ReportSubmission,
    ReportTask,
    ReportTaskTarget,
    SubmissionEvent,
)
from admin_api.security import Principal
from admin_api.submissions import FREQUENCY_NAMES, catalog, parse_period
from intake.template_model import Template
from regsandbox_core.errors import RegsandboxError

log = logging.getLogger("regsandbox.tasks")

MAX_PAGE_SIZE = 200
MAX_TARGETS = 500
MAX_REMINDER_DAY = 90
NOT_SUBMITTED = "not_submitted"
TARGET_STATE_OVERRIDES = {NOT_SUBMITTED: "未报送", "pending_review": "已报送待审核"}
"""Names of target states that differ from the submission state's name in SUBMISSION_STATES."""
SUBMITTED_STATES = frozenset({"pending_review", "accepted"})
"""States that count as submitted: no reminder, not overdue."""
OVERDUE_NAME = "已逾期"
OVERDUE_KEY = "overdue"
_CHINA = ZoneInfo("Asia/Shanghai")
"""Deadlines in messages are shown in Beijing time."""


def target_state_name(state: str) -> str:
    """Return the Chinese name of a target state: its current submission's state, or 未报送."""
    return TARGET_STATE_OVERRIDES.get(state) or SUBMISSION_STATES.get(state, state)


# --- inputs -------------------------------------------------------------------------------------


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template_code: str = Field(min_length=1, max_length=64, description="报表模板代码，如 EAST_DGXDYWJJB")
    template_version: int | None = Field(default=None, ge=1, description="模板版本，缺省为最新版本")
    period_end: str = Field(min_length=1, max_length=16, description="报告期末日期，YYYYMMDD")
    frequency: str | None = Field(default=None, max_length=16,
                                  description="monthly、quarterly、annual 或 ad_hoc，缺省为模板的报送频度")
    deadline: AwareDatetime = Field(description="报送截止时间，带时区，如 2026-12-15T18:00:00+08:00")
    institution_codes: list[str] | None = Field(default=None, max_length=MAX_TARGETS)
    institution_types: list[str] | None = Field(default=None, max_length=20)
    reminder_days: list[int] = Field(default_factory=lambda: [3, 1], max_length=10)


def _template(code: str, version: int | None) -> Template:
    templates = catalog()
    if code not in templates:
        known = "、".join(templates.codes())
        raise invalid("TEMPLATE_NOT_FOUND", f"报表模板代码“{code[:64]}”不存在。可选的模板有：{known}。")
    try:
        return templates.get(code, version)
    except RegsandboxError as error:
        raise invalid("TEMPLATE_NOT_FOUND", error.message) from None


def check_task_period(frequency: str, day: date) -> None:
    """Check that ``day`` ends a period of ``frequency`` (月末, 季末, 半年末, 年末); ad hoc tasks accept any day."""
    if frequency == "ad_hoc":
        return
    month_end = (day + timedelta(days=1)).day == 1
    months = {"monthly": range(1, 13), "quarterly": (3, 6, 9, 12), "semiannual": (6, 12), "annual": (12,)}[frequency]
    if month_end and day.month in months:
        return
    valid = {
        "monthly": "每月最后一天，例如 20261130",
        "quarterly": "3、6、9、12 月的最后一天，例如 20260930",
        "semiannual": "6 月 30 日或 12 月 31 日，例如 20260630",
        "annual": "12 月 31 日，例如 20261231",
    }[frequency]
    raise invalid("PERIOD_FREQUENCY_MISMATCH",
                  f"报送频度为{FREQUENCY_NAMES[frequency]}，报告期末日期 {day:%Y%m%d} 不是报告期末。有效的日期为{valid}。")


def _resolve_targets(session: Session, body: TaskCreate) -> tuple[str, list[str], list[Institution]]:
    codes = [item.strip() for item in body.institution_codes or [] if item.strip()]
    types = [item.strip() for item in body.institution_types or [] if item.strip()]
    if bool(codes) == bool(types):
        raise invalid("TASK_TARGETS_INVALID", "请在 institution_codes（机构代码）和 institution_types（机构类型）中"
                                              "只填写一项，且至少列出一个值。")
    active = select(Institution).where(Institution.status == "active")
    if codes:
        found = {row.code: row for row in session.scalars(active.where(Institution.code.in_(codes)))}
        missing = [code for code in codes if code not in found]
        if missing:
            raise invalid("TASK_TARGET_UNKNOWN", f"机构代码 {'、'.join(missing[:20])[:300]} 不存在或已停用，"
                                                 "请核对机构代码后重新发布任务。")
        return "institutions", list(dict.fromkeys(codes)), sorted(found.values(), key=lambda row: row.code)
    rows = list(session.scalars(active.where(Institution.type.in_(types)).order_by(Institution.code)))
    if not rows:
        raise invalid("TASK_NO_TARGET", f"机构类型 {'、'.join(types)[:200]} 下没有正常状态的机构，任务没有报送对象。"
                                        "请改选机构类型或直接列出机构代码。")
    return "types", list(dict.fromkeys(types)), rows


def create_task(session: Session, request: Request, caller: Principal, body: TaskCreate,
                now: datetime | None = None) -> ReportTask:
    """Validate ``body``, store the task and its resolved targets, audit and commit; 422 with a Chinese message otherwise."""
    now = now or utc_now()
    template = _template(body.template_code, body.template_version)
    frequency = body.frequency or template.frequency
    if frequency not in FREQUENCY_NAMES:
        known = "、".join(f"{code}（{name}）" for code, name in FREQUENCY_NAMES.items())
        raise invalid("FREQUENCY_INVALID", f"报送频度“{frequency[:16]}”无效，可选：{known}。")
    day = parse_period(body.period_end)
    check_task_period(frequency, day)
    if body.deadline <= now:
        raise invalid("DEADLINE_PASSED", f"截止时间 {body.deadline.isoformat()} 已过（当前时间 {now.isoformat(timespec='seconds')}），"
                                         "请填写将来的截止时间。")
    bad_days = [value for value in body.reminder_days if not 1 <= value <= MAX_REMINDER_DAY]
    if bad_days:
        raise invalid("REMINDER_DAYS_INVALID", f"提醒天数 {bad_days[0]} 无效，应为 1 到 {MAX_REMINDER_DAY} 之间的整数，例如 [3, 1]。")
    kind, values, institutions = _resolve_targets(session, body)
    task = ReportTask(
        template_code=template.code, template_version=template.version, period_end=day, frequency=frequency,
        deadline=body.deadline, target_kind=kind, target_values=values,
        reminder_days=sorted(set(body.reminder_days), reverse=True), status="open",
        created_by=user_id_of(session, caller), created_at=now,
    )
    session.add(task)
    session.flush()
    for institution in institutions:
        session.add(ReportTaskTarget(task_id=task.id, institution_id=institution.id, reminders_sent=[]))
    add_event(session, request, caller, "tasks.create", f"task:{task.id}", "success", {
        "template": f"{template.code}.v{template.version}", "period_end": f"{day:%Y%m%d}",
        "targets": [row.code for row in institutions][:50], "target_count": len(institutions)})
    session.commit()
    return task


def close_task(session: Session, request: Request, caller: Principal, task_id: int) -> ReportTask:
    task = get_task(session, task_id)
    if task.status != "open":
        raise conflict("TASK_STATE_INVALID", f"报送任务 {task_id} 已关闭，不能再次关闭。")
    task.status = "closed"
    task.closed_by = user_id_of(session, caller)
    task.closed_at = utc_now()
    add_event(session, request, caller, "tasks.close", f"task:{task_id}")
    session.commit()
    return task


# --- reading ------------------------------------------------------------------------------------


def get_task(session: Session, task_id: int) -> ReportTask:
    task = session.get(ReportTask, task_id)
    if task is None:
        raise not_found("TASK_NOT_FOUND", f"报送任务 {task_id} 不存在，请刷新任务列表后重试。")
    return task


@dataclass(frozen=True)
class TargetState:
    institution: Institution
    state: str
    submission_id: int | None
    submitted_at: datetime | None
    first_submitted_at: datetime | None = None
    """When any submission of the target first reached a submitted state (待审核 or 审核通过); None if never."""


def first_submission_times(session: Session, task: ReportTask, institution_ids: list[int]) -> dict[int, datetime]:
    """Return, per institution, when a submission of the task's template and period first reached a submitted state.

    The time comes from the state changes in ``submission_events``, so a submission later returned
    or superseded by a resubmission still keeps the target's first submission time.
    """
    if not institution_ids:
        return {}
    rows = session.execute(
        select(ReportSubmission.institution_id, func.min(SubmissionEvent.at))
        .join(SubmissionEvent, SubmissionEvent.submission_id == ReportSubmission.id)
        .where(ReportSubmission.template_code == task.template_code, ReportSubmission.period_end == task.period_end,
               ReportSubmission.institution_id.in_(institution_ids), SubmissionEvent.to_state.in_(SUBMITTED_STATES))
        .group_by(ReportSubmission.institution_id))
    return {institution_id: at for institution_id, at in rows}


def _latest_submissions(session: Session, task: ReportTask, institution_ids: list[int]) -> dict[int, ReportSubmission]:
    """Return the current submission of the task's template and period of each institution.

    That is the newest submitted, non-superseded version that passed validation, else the newest
    that failed it. A version that fails validation does not supersede a pending, returned or
    accepted one (:func:`admin_api.submissions.supersede_previous`), so that one stays current.
    """
    if not institution_ids:
        return {}
    rows = session.scalars(
        select(ReportSubmission).where(
            ReportSubmission.template_code == task.template_code, ReportSubmission.period_end == task.period_end,
            ReportSubmission.institution_id.in_(institution_ids),
            ReportSubmission.state.notin_(("superseded", "draft", "withdrawn")),  # drafts were never submitted
        ).order_by(case((ReportSubmission.state == "validation_failed", 0), else_=1), ReportSubmission.version)
    )
    return {row.institution_id: row for row in rows}


def target_states(session: Session, task: ReportTask, institution_id: int | None = None) -> list[TargetState]:
    """Return the state of each target of ``task`` (only ``institution_id``'s when given), ordered by code."""
    query = select(ReportTaskTarget).where(ReportTaskTarget.task_id == task.id)
    if institution_id is not None:
        query = query.where(ReportTaskTarget.institution_id == institution_id)
    targets = list(session.scalars(query))
    ids = [target.institution_id for target in targets]
    latest = _latest_submissions(session, task, ids)
    first = first_submission_times(session, task, ids)
    states = []
    for target in sorted(targets, key=lambda item: item.institution.code):
        row = latest.get(target.institution_id)
        states.append(TargetState(target.institution, row.state if row else NOT_SUBMITTED,
                                  row.id if row else None, row.submitted_at if row else None,
                                  first.get(target.institution_id)))
    return states


def is_overdue(task: ReportTask, state: str, now: datetime) -> bool:
    return now >= task.deadline and state not in SUBMITTED_STATES


class TaskOut(BaseModel):
    id: int
    template_code: str
    template_version: int
    template_name: str
    period_end: date
    frequency: str
    frequency_name: str
    deadline: datetime
    target_kind: str
    target_values: list[str]
    target_count: int
    reminder_days: list[int]
    status: str
    status_name: str
    created_by: str
    created_at: datetime
    closed_at: datetime | None
    own_state: str | None = None
    """For institution users: the state of their own institution (not_submitted, validation_failed, ...)."""
    own_state_name: str | None = None
    own_submission_id: int | None = None
    overdue: bool | None = None
    overdue_name: str | None = None

    @classmethod
    def of(cls, task: ReportTask, target_count: int, own: TargetState | None = None,
           now: datetime | None = None) -> TaskOut:
        try:
            name = catalog().get(task.template_code, task.template_version).name
        except RegsandboxError:
            name = task.template_code
        out = cls(
            id=task.id, template_code=task.template_code, template_version=task.template_version, template_name=name,
            period_end=task.period_end, frequency=task.frequency,
            frequency_name=FREQUENCY_NAMES.get(task.frequency, task.frequency), deadline=task.deadline,
            target_kind=task.target_kind, target_values=list(task.target_values), target_count=target_count,
            reminder_days=list(task.reminder_days), status=task.status,
            status_name=TASK_STATUSES.get(task.status, task.status), created_by=task.creator.username,
            created_at=task.created_at, closed_at=task.closed_at,
        )
        if own is not None:
            overdue = is_overdue(task, own.state, now or utc_now())
            out.own_state, out.own_state_name = own.state, target_state_name(own.state)
            out.own_submission_id = own.submission_id
            out.overdue, out.overdue_name = overdue, OVERDUE_NAME if overdue else None
        return out


class TargetOut(BaseModel):
    institution_code: str
    institution_name: str
    institution_type: str
    state: str
    state_name: str
    submission_id: int | None
    submitted_at: datetime | None
    first_submitted_at: datetime | None = None
    on_time: bool
    """First submitted (待审核 or 审核通过) no later than the deadline; a later return or resubmission does not change it."""
    overdue: bool
    overdue_name: str | None


class TaskDetail(TaskOut):
    targets: list[TargetOut]
    submitted_count: int
    on_time_count: int
    accepted_count: int
    overdue_count: int


def task_detail(session: Session, request: Request, caller: Principal, task_id: int,
                now: datetime | None = None) -> TaskDetail:
    """Return a task with the state of each target. Institution users see their own target only; others are denied."""
    now = now or utc_now()
    task = get_task(session, task_id)
    own_id = None
    if caller.institution_code is not None:
        own_id = session.scalar(select(Institution.id).where(Institution.code == caller.institution_code))
        targeted = own_id is not None and session.scalar(select(func.count()).select_from(ReportTaskTarget).where(
            ReportTaskTarget.task_id == task.id, ReportTaskTarget.institution_id == own_id))
        if not targeted:
            check_institution(request, caller, "tasks.read", "、".join(_target_codes(session, task))[:200] or "-")
    states = target_states(session, task, own_id)
    targets = []
    for item in states:
        on_time = item.first_submitted_at is not None and item.first_submitted_at <= task.deadline
        overdue = is_overdue(task, item.state, now)
        targets.append(TargetOut(
            institution_code=item.institution.code, institution_name=item.institution.name,
            institution_type=item.institution.type, state=item.state,
            state_name=target_state_name(item.state), submission_id=item.submission_id,
            submitted_at=item.submitted_at, first_submitted_at=item.first_submitted_at, on_time=on_time,
            overdue=overdue, overdue_name=OVERDUE_NAME if overdue else None))
    total = session.scalar(select(func.count()).select_from(ReportTaskTarget).where(ReportTaskTarget.task_id == task.id))
    base = TaskOut.of(task, total or 0, states[0] if own_id is not None and states else None, now)
    return TaskDetail(
        **base.model_dump(), targets=targets,
        submitted_count=sum(item.state in SUBMITTED_STATES for item in targets),
        on_time_count=sum(item.on_time for item in targets),
        accepted_count=sum(item.state == "accepted" for item in targets),
        overdue_count=sum(item.overdue for item in targets),
    )


def _target_codes(session: Session, task: ReportTask) -> list[str]:
    return list(session.scalars(
        select(Institution.code).join(ReportTaskTarget, ReportTaskTarget.institution_id == Institution.id)
        .where(ReportTaskTarget.task_id == task.id).order_by(Institution.code)))


def list_tasks(
    session: Session,
    request: Request,
    caller: Principal,
    *,
    status: str | None,
    template_code: str | None,
    period_text: str | None,
    institution_code: str | None,
    offset: int,
    limit: int,
    now: datetime | None = None,
) -> tuple[list[TaskOut], int]:
    """Return one page of tasks, newest first, and the total. Institution users see tasks targeting them only."""
    now = now or utc_now()
    conditions = []
    if status:
        if status not in TASK_STATUSES:
            known = "、".join(f"{code}（{name}）" for code, name in TASK_STATUSES.items())
            raise invalid("TASK_STATUS_INVALID", f"任务状态“{status[:16]}”无效，可选：{known}。")
        conditions.append(ReportTask.status == status)
    if template_code:
        conditions.append(ReportTask.template_code == template_code)
    if period_text:
        conditions.append(ReportTask.period_end == parse_period(period_text))
    own_id = None
    if caller.institution_code is not None:
        if institution_code and institution_code != caller.institution_code:
            check_institution(request, caller, "tasks.read", institution_code)
        institution_code = caller.institution_code
        own_id = session.scalar(select(Institution.id).where(Institution.code == caller.institution_code)) or -1
    if institution_code:
        conditions.append(ReportTask.id.in_(
            select(ReportTaskTarget.task_id).join(Institution, Institution.id == ReportTaskTarget.institution_id)
            .where(Institution.code == institution_code)))
    base = select(ReportTask).where(*conditions)
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    tasks = list(session.scalars(base.order_by(ReportTask.id.desc()).offset(offset).limit(limit)))
    counts = dict(session.execute(
        select(ReportTaskTarget.task_id, func.count()).where(ReportTaskTarget.task_id.in_([task.id for task in tasks]))
        .group_by(ReportTaskTarget.task_id)).all()) if tasks else {}
    items = []
    for task in tasks:
        own = None
        if own_id is not None:
            states = target_states(session, task, own_id)
            own = states[0] if states else None
        items.append(TaskOut.of(task, counts.get(task.id, 0), own, now))
    return items, total


# --- reminders ----------------------------------------------------------------------------------


def send_due_reminders(session: Session, now: datetime | None = None) -> int:
    """Post the due reminders of every open task and commit; return how many messages were posted.

    A target has not submitted when it has no pending or accepted submission. Its reporters get
    one reminder when ``now`` is within N days before the deadline, for each N of ``reminder_days``,
    and one 逾期 message after the deadline. Each reminder key is recorded on the
    target row, so a reminder is sent at most once and a second run at the same time posts nothing.
    When several thresholds fall due together (the sender was not running), only the nearest
    one is posted and the others are recorded as passed.
    """
    now = now or utc_now()
    posted = 0
    tasks = list(session.scalars(select(ReportTask).where(ReportTask.status == "open").order_by(ReportTask.id)))
    for task in tasks:
        due_days = [days for days in task.reminder_days if now >= task.deadline - timedelta(days=days)]
        overdue = now >= task.deadline
        if not due_days and not overdue:
            continue
        targets = list(session.scalars(select(ReportTaskTarget).where(ReportTaskTarget.task_id == task.id)))
        latest = _latest_submissions(session, task, [target.institution_id for target in targets])
        for target in targets:
            sent = set(target.reminders_sent or [])
            keys = {str(days) for days in due_days} | ({OVERDUE_KEY} if overdue else set())
            if keys <= sent:
                continue
            row = latest.get(target.institution_id)
            if row is not None and row.state in SUBMITTED_STATES:
                continue
            posted += _post_reminder(session, task, target, sent, keys, overdue, due_days, now)
            target.reminders_sent = sorted(sent | keys)
        session.commit()
    return posted


def _post_reminder(session: Session, task: ReportTask, target: ReportTaskTarget, sent: set[str], keys: set[str],
                   overdue: bool, due_days: list[int], now: datetime) -> int:
    period = f"{task.period_end:%Y-%m-%d}"
    deadline = f"{task.deadline.astimezone(_CHINA):%Y-%m-%d %H:%M}"
    code = target.institution.code
    if overdue:
        if OVERDUE_KEY in sent:
            return 0
        title = f"报送已逾期：报表 {task.template_code} {period}"
        body = (f"报送任务 {task.id} 要求贵机构（{code}）在 {deadline}（北京时间）前报送报表 {task.template_code} "
                f"报告期 {period}，截止时间已过，尚未收到待审核或审核通过的报送。请尽快上传。")
    else:
        nearest = min(due_days)
        if str(nearest) in sent:
            return 0
        left = task.deadline - now
        title = f"报送提醒：报表 {task.template_code} {period} 距截止还有 {nearest} 天"
        body = (f"报送任务 {task.id} 要求贵机构（{code}）在 {deadline}（北京时间）前报送报表 {task.template_code} "
                f"报告期 {period}，目前尚未收到待审核或审核通过的报送（剩余约 {_hours(left)} 小时）。请按时上传。")
    return post_message(session, category="system", title=title, body=body, role="reporter", institution=code)


def _hours(left: timedelta) -> int:
    return max(0, int(left.total_seconds() // 3600))


class ReminderSender:
    """A daemon thread of admin_api that runs :func:`send_due_reminders` every ``interval`` seconds until stopped."""

    def __init__(self, sessions: sessionmaker[Session], interval: float) -> None:
        self._sessions = sessions
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-reminders", daemon=True)

    def start(self) -> None:
        log.info("task reminder sender started, every %.0f s", self._interval)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        log.info("task reminder sender stopped")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                with self._sessions() as session:
                    posted = send_due_reminders(session)
                if posted:
                    log.info("task reminders posted: %s", posted)
            except Exception as error:  # noqa: BLE001  # the sender keeps running; the next interval retries
                log.error("task reminders failed, retrying in %.0f s: %s: %s", self._interval,
                          type(error).__name__, getattr(error, "code", error))
