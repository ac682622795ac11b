"""Drafts (草稿) and reviewers' waivers (豁免) of report submissions, and paged reading of their findings.

A draft is an upload stored with state ``draft`` (:func:`admin_api.submissions.submit` with
``draft=True``). Only its own institution can read it. Submitting it records ``draft → submitted`` and
``submitted → validation_failed`` or ``pending_review`` from the findings of its upload, and
supersedes the earlier submitted version then. Discarding it sets ``withdrawn`` and keeps the row
and its files for the audit trail.

A waiver covers the unexplained warnings (提示) of one rule, on all lines or on listed lines, with a
reviewer's reason. Accepting a submission needs every warning explained in 备注 or waived.

NOTE: a submitted draft keeps the findings of its upload. Files of its batch uploaded or accepted
after the draft was saved are not validated against it again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from fastapi import Request
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.errors import conflict, invalid, not_found
from admin_api.models import SUBMISSION_STATES, ReportSubmission, SubmissionEvent, SubmissionWaiver, User
from admin_api.security import Principal
from admin_api.submissions import (
    MAX_COMMENT_LENGTH,
    PRIVATE_STATES,
    _caller_institution,
    label,
    post_outcome_message,
    report_waivers,
    supersede_previous,
    visible_submission,
)
from intake.error_report import SEVERITY_NAMES, Waiver, waiver_for
from regsandbox_core.settings import Settings

FINDING_COLUMNS = ("line", "field_code", "field_name", "value", "rule_id", "rule_name", "severity", "explained",
                   "message")
BATCH_ROWS = 8_192
MAX_WAIVER_LINES = 10_000
LINES_NAMED = 10
"""Line numbers quoted in an error message at most."""


def _user_id(session: Session, caller: Principal) -> int:
    if caller.user_id is not None:
        return caller.user_id
    return session.scalars(select(User.id).where(User.username == caller.username)).one()


def _require_state(row: ReportSubmission, state: str, action: str) -> None:
    if row.state != state:
        raise conflict("SUBMISSION_STATE_INVALID",
                       f"{label(row)}当前状态为“{SUBMISSION_STATES.get(row.state, row.state)}”，"
                       f"只有“{SUBMISSION_STATES[state]}”的报送可以{action}。")


# --- drafts -------------------------------------------------------------------------------------


def submit_draft(session: Session, request: Request, caller: Principal, submission_id: int) -> ReportSubmission:
    """Submit a draft of the caller's institution: record both transitions, supersede, audit and tell the caller."""
    row = visible_submission(session, request, caller, submission_id, "submissions.submit")
    _caller_institution(session, request, caller)
    _require_state(row, "draft", "提交")
    newer = session.scalar(select(func.max(ReportSubmission.version)).where(
        ReportSubmission.institution_id == row.institution_id, ReportSubmission.template_code == row.template_code,
        ReportSubmission.period_end == row.period_end, ReportSubmission.version > row.version,
        ReportSubmission.state.notin_(PRIVATE_STATES)))
    if newer is not None:
        raise conflict("DRAFT_OUTDATED", f"{label(row)}是草稿，但同一报表同一报告期已提交了更新的第 {newer} 版，"
                                         "提交此草稿会替代更新的版本。请作废此草稿；如需报送其内容，请重新上传。")

    final = "validation_failed" if row.error_count else "pending_review"
    session.add(SubmissionEvent(submission_id=row.id, from_state="draft", to_state="submitted", actor=caller.username))
    session.add(SubmissionEvent(submission_id=row.id, from_state="submitted", to_state=final, actor=caller.username))
    row.state = final
    row.submitted_by = _user_id(session, caller)
    row.submitted_at = utc_now()
    superseded = supersede_previous(session, row, caller)
    add_event(session, request, caller, "submissions.submit_draft", f"submission:{row.id}", "success", {
        "template": row.template_code, "period_end": f"{row.period_end:%Y%m%d}", "version": row.version,
        "state": final, "errors": row.error_count, "warnings": row.warning_count,
        "superseded": [old.id for old in superseded]})
    session.flush()
    session.refresh(row)
    post_outcome_message(session, row, caller)
    session.commit()
    return row


def discard_draft(session: Session, request: Request, caller: Principal, submission_id: int) -> ReportSubmission:
    """Discard a draft of the caller's institution (state ``withdrawn``), keeping the row and its files for audit."""
    row = visible_submission(session, request, caller, submission_id, "submissions.submit")
    _require_state(row, "draft", "作废")
    session.add(SubmissionEvent(submission_id=row.id, from_state="draft", to_state="withdrawn", actor=caller.username,
                                comment="机构作废草稿"))
    row.state = "withdrawn"
    add_event(session, request, caller, "submissions.discard", f"submission:{row.id}", "success", {
        "template": row.template_code, "period_end": f"{row.period_end:%Y%m%d}", "version": row.version})
    session.commit()
    session.refresh(row)
    return row


# --- findings -----------------------------------------------------------------------------------


def _batches(path: Path, columns: Sequence[str]) -> Iterator[Any]:
    parquet = pq.ParquetFile(path)
    try:
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(columns))
    finally:
        parquet.close()


@dataclass
class OpenWarnings:
    """Unexplained, unwaived warnings of one rule: count by line (None for file-level findings)."""

    rule_id: str
    rule_name: str
    lines: dict[int | None, int]

    @property
    def count(self) -> int:
        return sum(self.lines.values())


def open_warnings(path: Path, waivers: Sequence[Waiver]) -> dict[str, OpenWarnings]:
    """Return the warnings of a findings file that are neither explained nor waived, by rule id."""
    found: dict[str, OpenWarnings] = {}
    for batch in _batches(path, ("line", "rule_id", "rule_name", "severity", "explained")):
        mask = pc.and_(pc.equal(batch.column("severity"), "warning"),
                       pc.invert(pc.fill_null(batch.column("explained"), False)))
        warnings = batch.filter(mask)
        columns = [warnings.column(name).to_pylist() for name in ("line", "rule_id", "rule_name")]
        for line, rule_id, rule_name in zip(*columns):
            if waiver_for(waivers, rule_id, line, "warning", False) is not None:
                continue
            entry = found.setdefault(rule_id, OpenWarnings(rule_id, rule_name or "", {}))
            entry.lines[line] = entry.lines.get(line, 0) + 1
    return found


class FindingOut(BaseModel):
    line: int | None
    field_code: str | None
    field_name: str | None
    value: str | None
    """Masked as in the findings file: personal numbers and names never appear in full."""
    rule_id: str | None
    rule_name: str | None
    severity: str
    severity_name: str
    explained: bool
    message: str | None
    waiver_reason: str | None


class FindingsPage(BaseModel):
    total: int
    offset: int
    items: list[FindingOut]


def findings_page(session: Session, request: Request, caller: Principal, settings: Settings, submission_id: int,
                  offset: int, limit: int, severity: str | None = None) -> FindingsPage:
    """Return one page of a submission's findings in file order, with the waiver reason of each waived warning."""
    row = visible_submission(session, request, caller, submission_id, "submissions.read")
    if severity is not None and severity not in SEVERITY_NAMES:
        raise invalid("SEVERITY_INVALID", f"级别“{severity[:16]}”无效，可选：error（错误）、warning（提示）。")
    if row.findings_path is None:
        raise not_found("FINDINGS_UNAVAILABLE", f"报送记录 {submission_id} 没有校验结果（文件未经校验）。")
    waivers = report_waivers(session, row.id)
    items: list[FindingOut] = []
    total = 0
    for batch in _batches(settings.data_dir / row.findings_path, FINDING_COLUMNS):
        if severity is not None:
            batch = batch.filter(pc.equal(batch.column("severity"), severity))
        start, size = total, batch.num_rows
        total += size
        if len(items) >= limit or start + size <= offset:
            continue
        window = batch.slice(max(0, offset - start), limit - len(items))
        for record in window.to_pylist():
            waiver = waiver_for(waivers, record["rule_id"], record["line"], record["severity"], record["explained"])
            items.append(FindingOut(
                line=record["line"], field_code=record["field_code"], field_name=record["field_name"],
                value=record["value"], rule_id=record["rule_id"], rule_name=record["rule_name"],
                severity=record["severity"] or "", explained=bool(record["explained"]),
                severity_name=SEVERITY_NAMES.get(record["severity"], record["severity"] or ""),
                message=record["message"], waiver_reason=waiver.reason if waiver else None))
    add_event(session, request, caller, "submissions.findings_read", f"submission:{row.id}", "success",
              {"offset": offset, "returned": len(items), "severity": severity})
    session.commit()
    return FindingsPage(total=total, offset=offset, items=items)


# --- waivers ------------------------------------------------------------------------------------


def _line_list(lines: Sequence[int]) -> str:
    shown = "、".join(str(line) for line in lines[:LINES_NAMED])
    return shown + (f" 等（共 {len(lines)} 个）" if len(lines) > LINES_NAMED else "")


def waive(session: Session, request: Request, caller: Principal, settings: Settings, submission_id: int, *,
          rule_id: str, lines: Sequence[int] | None, reason: str) -> ReportSubmission:
    """Waive the open warnings of ``rule_id`` (on ``lines`` only when given) of a submission pending review.

    Raises 422 for a missing reason, a rule without open warnings or lines without one, and 409 in
    another state. The cached error reports are deleted so the next download shows the waiver.
    """
    row = visible_submission(session, request, caller, submission_id, "submissions.review")
    reason = reason.strip()
    rule_id = rule_id.strip()
    if not reason:
        raise invalid("WAIVER_REASON_REQUIRED", "豁免提示须填写豁免理由，说明核实情况。")
    if len(reason) > MAX_COMMENT_LENGTH:
        raise invalid("WAIVER_REASON_TOO_LONG", f"豁免理由最多 {MAX_COMMENT_LENGTH} 字，收到 {len(reason)} 字。")
    _require_state(row, "pending_review", "豁免提示")
    if row.findings_path is None:
        raise conflict("FINDINGS_UNAVAILABLE", f"{label(row)}没有校验结果，没有可豁免的提示。")
    unique_lines = sorted(set(lines)) if lines else None
    if unique_lines is not None and len(unique_lines) > MAX_WAIVER_LINES:
        raise invalid("WAIVER_LINES_TOO_MANY", f"一次最多豁免 {MAX_WAIVER_LINES} 行，收到 {len(unique_lines)} 行；"
                                               "如需豁免该规则的全部提示，请不填行号。")

    existing = report_waivers(session, row.id)
    pending = open_warnings(settings.data_dir / row.findings_path, existing)
    entry = pending.get(rule_id)
    if entry is None:
        known = "、".join(f"{item.rule_id}（{item.count} 条）" for item in pending.values()) or "无"
        raise invalid("WAIVER_RULE_INVALID", f"规则“{rule_id[:64]}”在{label(row)}中没有待处理的提示。"
                                             f"尚待处理提示的规则：{known}。")
    if unique_lines is None:
        covered = entry.count
    else:
        missing = [line for line in unique_lines if line not in entry.lines]
        if missing:
            valid = _line_list(sorted(line for line in entry.lines if line is not None))
            raise invalid("WAIVER_LINES_INVALID", f"规则 {rule_id} 在第 {_line_list(missing)} 行没有待处理的提示，"
                                                  f"请只填写该规则有提示的行号：{valid}。")
        covered = sum(entry.lines[line] for line in unique_lines)

    waiver = SubmissionWaiver(submission_id=row.id, rule_id=rule_id, lines=unique_lines, finding_count=covered,
                              reason=reason, author=caller.username)
    session.add(waiver)
    row.waived_warning_count = (row.waived_warning_count or 0) + covered
    add_event(session, request, caller, "submissions.waive", f"submission:{row.id}", "success", {
        "institution": row.institution.code, "rule_id": rule_id, "lines": len(unique_lines) if unique_lines else None,
        "findings": covered, "unresolved": row.warning_count - row.explained_warning_count - row.waived_warning_count})
    session.commit()
    folder = settings.data_dir / Path(row.findings_path).parent
    for kind in ("csv", "xlsx"):
        (folder / f"errors.{kind}").unlink(missing_ok=True)
    session.refresh(row)
    return row
