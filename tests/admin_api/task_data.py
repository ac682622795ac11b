"""Collection tasks, targets, submissions and their state changes written straight into the database.

The statistics and workbench tests need submissions at chosen times (before or after a deadline
that has passed), which an upload through the API cannot produce. Rows are bulk-inserted so a
dataset of 400 institutions × 20 tasks takes seconds on both backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from admin_api.models import Institution, ReportSubmission, ReportTask, ReportTaskTarget, SubmissionEvent, User


@dataclass
class Upload:
    """One submission version: its current state and its state changes as (to_state, time) pairs."""

    state: str
    events: Sequence[tuple[str, datetime]]
    review_comment: str | None = None
    warning_count: int = 0
    error_count: int = 0


@dataclass
class Seeder:
    """Bulk writer of the rows; ``flush`` inserts what was added since the last call."""

    session: Session
    user_id: int
    submissions: list[dict] = field(default_factory=list)
    events: list[list[tuple[str, datetime]]] = field(default_factory=list)

    @classmethod
    def for_user(cls, session: Session, username: str) -> Seeder:
        return cls(session, session.scalars(select(User.id).where(User.username == username)).one())

    def institutions(self, codes: Sequence[str], kind: str = "银行") -> dict[str, int]:
        self.session.execute(insert(Institution), [
            {"code": code, "name": f"统计测试机构{code}", "type": kind, "status": "active"} for code in codes])
        rows = self.session.execute(select(Institution.code, Institution.id).where(Institution.code.in_(codes)))
        return dict(rows.all())

    def task(self, template_code: str, period_end: date, deadline: datetime, institution_ids: Sequence[int]) -> int:
        task_id = self.session.scalar(insert(ReportTask).values(
            template_code=template_code, template_version=1, period_end=period_end, frequency="monthly",
            deadline=deadline, target_kind="institutions", target_values=[], reminder_days=[3, 1], status="open",
            created_by=self.user_id, created_at=deadline).returning(ReportTask.id))
        self.session.execute(insert(ReportTaskTarget), [
            {"task_id": task_id, "institution_id": institution_id, "reminders_sent": []}
            for institution_id in institution_ids])
        return task_id

    def uploads(self, institution_id: int, template_code: str, period_end: date, versions: Sequence[Upload]) -> None:
        """Add the versions of one institution's report; every version but the last ends ``superseded``."""
        for number, upload in enumerate(versions, start=1):
            last = number == len(versions)
            self.submissions.append({
                "institution_id": institution_id, "template_code": template_code, "template_version": 1,
                "template_digest": "0" * 64, "period_end": period_end, "version": number,
                "state": upload.state if last else "superseded", "original_filename": "report.txt",
                "file_type": "text", "byte_size": 100, "raw_sm3": "0" * 64,
                "raw_path": f"intake/test/{institution_id}-{template_code}-{period_end:%Y%m%d}-{number}",
                "key_version": 1, "row_count": 1, "error_count": upload.error_count,
                "warning_count": upload.warning_count, "explained_warning_count": 0, "submitted_by": self.user_id,
                "submitted_at": upload.events[0][1], "review_comment": upload.review_comment,
                "reviewed_at": upload.events[-1][1] if upload.state in ("accepted", "returned") else None,
                "created_at": upload.events[0][1], "updated_at": upload.events[-1][1],
            })
            self.events.append(list(upload.events))

    def flush(self) -> None:
        if not self.submissions:
            return
        ids = self.session.scalars(insert(ReportSubmission).returning(ReportSubmission.id, sort_by_parameter_order=True),
                                   self.submissions).all()
        rows = []
        for submission_id, changes in zip(ids, self.events, strict=True):
            previous = None
            for to_state, at in changes:
                rows.append({"submission_id": submission_id, "from_state": previous, "to_state": to_state,
                             "actor": "seed", "at": at})
                previous = to_state
        self.session.execute(insert(SubmissionEvent), rows)
        self.submissions, self.events = [], []
