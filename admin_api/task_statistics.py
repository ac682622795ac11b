"""On-time and acceptance rates of collection tasks (报送任务), per institution or per task.

Only tasks whose deadline has passed are counted. Each target (one task × one institution) counts
once, however many versions the institution uploaded:

- submitted (已报送): a submission of the task's template and period by the institution reached
  待审核 (``pending_review``) or 审核通过 at some time. The first such state change in
  ``submission_events`` is the target's submission time, so a later return or resubmission does
  not move it.
- on time (按时报送): that first submission time is no later than the deadline; late (逾期报送):
  after it; missing (未报送): never submitted.
- accepted (审核通过): the institution's current (non-superseded) submission is accepted.

Drafts (草稿) never count: only a draft can be withdrawn, and a draft reaches 待审核 only when the
reporter submits it, which is its submission time.

按时报送率 = on time / targets and 审核通过率 = accepted / submitted (None when nothing was
submitted). Each call runs one grouped SQL query over the targets instead of a query per
institution. The rows are sorted in SQL, worst on-time rate first by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal

from fastapi import Request
from sqlalchemy import Float, and_, case, cast, func, literal, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Subquery

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.deps import deny
from admin_api.errors import forbidden, invalid
from admin_api.models import Institution, ReportSubmission, ReportTask, ReportTaskTarget, SubmissionEvent
from admin_api.security import Principal
from admin_api.tasks import SUBMITTED_STATES

Grouping = Literal["institution", "task"]
SORT_KEYS = {
    "on_time_rate": "按时报送率",
    "acceptance_rate": "审核通过率",
    "missing": "未报送数",
    "late": "逾期报送数",
    "targets": "应报数",
    "key": "机构代码或任务编号",
}
"""Columns the rows can be sorted by, with the names shown on the console."""
MIN_YEAR, MAX_YEAR = 2000, 2100


@dataclass(frozen=True)
class RateRow:
    """Counts of one institution (``code`` set) or one task (``task_id`` set); the rates are derived."""

    code: str | None
    name: str
    """Institution name, or the task's template code."""
    institution_type: str | None
    task_id: int | None
    period_end: date | None
    deadline: datetime | None
    targets: int
    submitted: int
    on_time: int
    accepted: int

    @property
    def late(self) -> int:
        return self.submitted - self.on_time

    @property
    def missing(self) -> int:
        return self.targets - self.submitted

    @property
    def on_time_rate(self) -> float:
        return self.on_time / self.targets if self.targets else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.submitted if self.submitted else None


@dataclass(frozen=True)
class RateFilter:
    year: int | None = None
    """Year of the tasks' reporting period end (报告期末); None for every year."""
    template_code: str | None = None


def parse_filter(year_text: str, template_code: str) -> RateFilter:
    """Check the filter form; raise 422 with a Chinese message for a year that is not a four-digit number."""
    year_text = year_text.strip()
    year = None
    if year_text:
        if not year_text.isdigit() or not MIN_YEAR <= int(year_text) <= MAX_YEAR:
            raise invalid("YEAR_INVALID", f"年度“{year_text[:10]}”无效，请填写 {MIN_YEAR} 到 {MAX_YEAR} 之间的四位年份，"
                                          "例如 2026，或留空统计全部年度。")
        year = int(year_text)
    return RateFilter(year=year, template_code=template_code.strip()[:64] or None)


def check_regulator(request: Request, caller: Principal) -> None:
    """Deny institution users (403, audited): the rates compare institutions with each other."""
    if caller.institution_code is not None:
        raise deny(request, caller, "tasks.statistics", forbidden(
            "STATISTICS_FORBIDDEN", "报送统计比较各机构的报送情况，只对监管机构用户开放。"))


def _period_range(year: int | None) -> list[ColumnElement[bool]]:
    if year is None:
        return []
    return [ReportTask.period_end >= date(year, 1, 1), ReportTask.period_end <= date(year, 12, 31)]


def first_submissions() -> Subquery:
    """Return the subquery of the first time each (institution, template, period) reached a submitted state.

    Columns: ``institution_id``, ``template_code``, ``period_end`` and ``first_at``, over every version.
    """
    return (
        select(ReportSubmission.institution_id, ReportSubmission.template_code, ReportSubmission.period_end,
               func.min(SubmissionEvent.at).label("first_at"))
        .join(SubmissionEvent, SubmissionEvent.submission_id == ReportSubmission.id)
        .where(SubmissionEvent.to_state.in_(SUBMITTED_STATES))
        .group_by(ReportSubmission.institution_id, ReportSubmission.template_code, ReportSubmission.period_end)
        .subquery("first_submission")
    )


def rate_rows(session: Session, grouping: Grouping, rate_filter: RateFilter, *, sort: str = "on_time_rate",
              descending: bool = False, now: datetime | None = None, limit: int | None = None) -> list[RateRow]:
    """Return the rates of each institution or each task with at least one due target, in one grouped query.

    ``sort`` is a key of :data:`SORT_KEYS`, and ascending order puts the worst rates first. Equal
    rates are ordered by the number of missing reports (on-time rate) or by the on-time rate
    (acceptance rate), then by institution code or task id. Rows with nothing submitted sort after
    every acceptance rate.
    """
    if sort not in SORT_KEYS:
        raise invalid("SORT_INVALID", f"排序字段“{sort[:32]}”无效，可选：{'、'.join(f'{k}（{v}）' for k, v in SORT_KEYS.items())}。")
    now = now or utc_now()
    period_conditions = _period_range(rate_filter.year)
    task_conditions = [ReportTask.deadline <= now, *period_conditions]
    if rate_filter.template_code:
        task_conditions.append(ReportTask.template_code == rate_filter.template_code)

    first = first_submissions()
    accepted_now = (
        select(ReportSubmission.institution_id, ReportSubmission.template_code, ReportSubmission.period_end)
        .where(ReportSubmission.state == "accepted")
        .distinct()
        .subquery("accepted_now")
    )
    same_report = (lambda table: and_(table.c.institution_id == ReportTaskTarget.institution_id,
                                      table.c.template_code == ReportTask.template_code,
                                      table.c.period_end == ReportTask.period_end))

    targets = func.count(ReportTaskTarget.id)
    submitted = func.sum(case((first.c.first_at.is_not(None), 1), else_=0))
    on_time = func.sum(case((first.c.first_at <= ReportTask.deadline, 1), else_=0))
    accepted = func.sum(case((accepted_now.c.institution_id.is_not(None), 1), else_=0))
    if grouping == "institution":
        keys = (Institution.code, Institution.name, Institution.type, literal(None).label("task_id"))
        group = (Institution.id, Institution.code, Institution.name, Institution.type)
        tie_breaker: ColumnElement = Institution.code
    else:
        keys = (ReportTask.template_code, ReportTask.period_end, ReportTask.deadline, ReportTask.id)
        group = (ReportTask.id, ReportTask.template_code, ReportTask.period_end, ReportTask.deadline)
        tie_breaker = ReportTask.id

    query = (
        select(*keys, targets, submitted, on_time, accepted)
        .select_from(ReportTaskTarget)
        .join(ReportTask, ReportTask.id == ReportTaskTarget.task_id)
        .join(Institution, Institution.id == ReportTaskTarget.institution_id)
        .outerjoin(first, same_report(first))
        .outerjoin(accepted_now, same_report(accepted_now))
        .where(*task_conditions)
        .group_by(*group)
        .order_by(*_ordering(sort, descending, targets, submitted, on_time, accepted, tie_breaker))
    )
    if limit is not None:
        query = query.limit(limit)
    return [_row(grouping, values) for values in session.execute(query)]


def _ordering(sort: str, descending: bool, targets: ColumnElement, submitted: ColumnElement, on_time: ColumnElement,
              accepted: ColumnElement, tie_breaker: ColumnElement) -> list[ColumnElement]:
    on_time_rate = cast(on_time, Float) / targets
    acceptance_rate = case((submitted > 0, cast(accepted, Float) / submitted))
    missing = targets - submitted
    expression: ColumnElement = {
        "on_time_rate": on_time_rate,
        "acceptance_rate": acceptance_rate,
        "missing": missing,
        "late": submitted - on_time,
        "targets": targets,
        "key": tie_breaker,
    }[sort]
    # Equal rates are ordered by the next measure, in the same direction: more missing reports rank
    # worse than fewer at an equal on-time rate, and a lower on-time rate at an equal acceptance rate.
    secondary = {"on_time_rate": -missing, "acceptance_rate": on_time_rate}.get(sort)
    ordered = [expression.desc() if descending else expression.asc()]
    if secondary is not None:
        ordered.append(secondary.desc() if descending else secondary.asc())
    # NULL acceptance rates (nothing submitted) go last in both directions; NULLS LAST differs between backends.
    nulls_last = case((expression.is_(None), 1), else_=0)
    return [nulls_last, *ordered, tie_breaker]


def _row(grouping: Grouping, values: tuple) -> RateRow:
    first, second, third, task_id, targets, submitted, on_time, accepted = values
    counts = (int(targets), int(submitted or 0), int(on_time or 0), int(accepted or 0))
    if grouping == "institution":
        return RateRow(first, second, third, None, None, None, *counts)
    return RateRow(None, first, None, task_id, second, third, *counts)


def totals(rows: list[RateRow]) -> RateRow:
    """Sum the rows of one grouping into one row for the whole selection."""
    return RateRow(None, "合计", None, None, None, None, sum(row.targets for row in rows),
                   sum(row.submitted for row in rows), sum(row.on_time for row in rows),
                   sum(row.accepted for row in rows))


def record_read(session: Session, request: Request, caller: Principal, rate_filter: RateFilter, view: str) -> None:
    """Store the audit event of a statistics read and commit it."""
    add_event(session, request, caller, "tasks.statistics", "task_statistics", "success", {
        "view": view, "year": rate_filter.year, "template": rate_filter.template_code})
    session.commit()
