"""Queries behind the console 工作台 (workbench): what each role has to do next.

- Institution users who submit reports (报送人员, 机构管理员) get their own institution's open tasks
  without a submitted report, with days left or overdue, and their drafts, returned submissions
  (with the review comment) and submissions that failed validation.
- Reviewers (监管审查员) get the submissions waiting for review, oldest first, and the counts per
  template.
- Regulators with ``tasks.statistics`` get the institutions with the worst on-time rates
  (:mod:`admin_api.task_statistics`).

Every query here filters by the institution id it is given; the console module decides which
widgets a caller gets from their capabilities and institution.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from admin_api.models import CatalogColumn, Institution, ReportSubmission, ReportTask, ReportTaskTarget
from admin_api.submissions import catalog
from admin_api.tasks import SUBMITTED_STATES, target_state_name
from regsandbox_core.errors import RegsandboxError

DRAFT_STATE = "draft"
"""The 草稿 state; an institution without drafts, or a release without the state, simply lists none."""
WIDGET_ROWS = 20
"""Rows shown per workbench list; the full lists are on the task and submission pages."""
DAY_SECONDS = 86400


def template_name(code: str, version: int | None = None) -> str:
    """Return the Chinese name of a template version, or the code when the catalog no longer has it."""
    try:
        return catalog().get(code, version).name
    except RegsandboxError:
        return code


@dataclass(frozen=True)
class DueTask:
    task_id: int
    template_code: str
    template_name: str
    period_end: date
    deadline: datetime
    state: str
    state_name: str
    submission_id: int | None
    seconds_left: float
    """Seconds until the deadline; negative once it has passed."""

    @property
    def overdue(self) -> bool:
        return self.seconds_left <= 0

    @property
    def whole_days(self) -> int:
        """Whole days left, or whole days overdue once the deadline has passed (rounded down)."""
        return int(abs(self.seconds_left) // DAY_SECONDS)


def due_tasks(session: Session, institution_id: int, now: datetime, limit: int = WIDGET_ROWS) -> tuple[list[DueTask], int]:
    """Return the open tasks of an institution that have no submitted report yet, nearest deadline first, and their count.

    The state is that of the institution's current (non-superseded) submission of the task's
    template and period, or 未报送.
    """
    current = (
        select(ReportSubmission.id, ReportSubmission.template_code, ReportSubmission.period_end, ReportSubmission.state)
        .where(ReportSubmission.institution_id == institution_id, ReportSubmission.state != "superseded")
        .subquery("current")
    )
    conditions = [ReportTaskTarget.institution_id == institution_id, ReportTask.status == "open",
                  (current.c.state.is_(None)) | (current.c.state.not_in(SUBMITTED_STATES))]
    base = (
        select(ReportTask, current.c.id, current.c.state)
        .join(ReportTaskTarget, ReportTaskTarget.task_id == ReportTask.id)
        .outerjoin(current, and_(current.c.template_code == ReportTask.template_code,
                                 current.c.period_end == ReportTask.period_end))
        .where(*conditions)
    )
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = session.execute(base.order_by(ReportTask.deadline, ReportTask.id).limit(limit)).all()
    items = []
    for task, submission_id, state in rows:
        state = state or "not_submitted"
        seconds_left = (task.deadline - now).total_seconds()
        items.append(DueTask(task.id, task.template_code, template_name(task.template_code, task.template_version),
                             task.period_end, task.deadline, state, target_state_name(state), submission_id,
                             seconds_left))
    return items, total


def submissions_in_state(session: Session, institution_id: int | None, state: str,
                         limit: int = WIDGET_ROWS, oldest_first: bool = False) -> tuple[list[ReportSubmission], int]:
    """Return submissions in ``state`` (of one institution, or of all when None) and their count.

    Newest first by default; ``oldest_first`` orders by submission time for a review queue.
    """
    conditions = [ReportSubmission.state == state]
    if institution_id is not None:
        conditions.append(ReportSubmission.institution_id == institution_id)
    total = session.scalar(select(func.count()).select_from(ReportSubmission).where(*conditions)) or 0
    order = ((ReportSubmission.submitted_at, ReportSubmission.id) if oldest_first
             else (ReportSubmission.submitted_at.desc(), ReportSubmission.id.desc()))
    rows = list(session.scalars(select(ReportSubmission).where(*conditions).order_by(*order).limit(limit)))
    return rows, total


@dataclass(frozen=True)
class TemplateCount:
    template_code: str
    template_name: str
    count: int
    oldest: datetime


def pending_by_template(session: Session) -> list[TemplateCount]:
    """Return how many submissions wait for review per template, most first, with the oldest submission time."""
    rows = session.execute(
        select(ReportSubmission.template_code, func.count(), func.min(ReportSubmission.submitted_at))
        .where(ReportSubmission.state == "pending_review")
        .group_by(ReportSubmission.template_code)
        .order_by(func.count().desc(), ReportSubmission.template_code))
    return [TemplateCount(code, template_name(code), count, oldest) for code, count, oldest in rows]


def institution_id_of(session: Session, code: str) -> int | None:
    return session.scalar(select(Institution.id).where(Institution.code == code))


def unconfirmed_columns(session: Session) -> tuple[int, int]:
    """Return (columns no data steward has confirmed, all catalog columns), for the steward's widget."""
    total, unconfirmed = session.execute(
        select(func.count(), func.count().filter(CatalogColumn.confirmed_level.is_(None)))
    ).one()
    return unconfirmed or 0, total or 0
