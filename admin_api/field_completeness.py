"""Field completeness (字段完整性) of one report, field by field, for the page 数据质量.

A report is one institution's template and period. Its current version is the one that
:func:`admin_api.data_quality.newest_versions` picks for the grouped measure. The counts are read
from that version's :class:`~admin_api.models.SubmissionFieldCount` row, so no report file is
decrypted or read. Institution users may read their own institution's reports only, and naming
another is refused with 403 ``INSTITUTION_FORBIDDEN`` (audited).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from fastapi import Request
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.data_quality import CAPABILITY, QualityFilter, newest_versions
from admin_api.deps import check_institution
from admin_api.errors import invalid, not_found
from admin_api.models import SUBMISSION_STATES, Institution, ReportSubmission, SubmissionFieldCount
from admin_api.security import Principal
from admin_api.submissions import catalog
from intake.warehouse_query import parse_period_text
from regsandbox_core.errors import RegsandboxError


@dataclass(frozen=True)
class ReportKey:
    """One institution's report of a template and period."""

    institution: str
    template_code: str
    period_end: date

    def quality_filter(self) -> QualityFilter:
        return QualityFilter(self.institution, self.template_code, self.period_end, self.period_end)


@dataclass(frozen=True)
class FieldValues:
    """Non-empty values of one field in the rows of a report version."""

    code: str
    name: str | None
    """Chinese name from the template version; None when that version is no longer in the catalog."""
    required: bool
    present: int
    rows: int

    @property
    def completeness(self) -> float | None:
        return self.present / self.rows if self.rows else None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "required": self.required, "present": self.present,
                "rows": self.rows, "completeness": self.completeness}


@dataclass(frozen=True)
class FieldBreakdown:
    """The current version of one report and its fields, lowest completeness first (template order among equals).

    ``fields`` is empty and the ratios are None when the version was uploaded before field counts were stored.
    """

    institution: str
    template_code: str
    period_end: date
    submission_id: int
    version: int
    state: str
    template_version: int
    rows: int
    fields: list[FieldValues]
    field_completeness: float | None
    required_field_completeness: float | None

    @property
    def counted(self) -> bool:
        return bool(self.fields)

    @property
    def state_name(self) -> str:
        return SUBMISSION_STATES.get(self.state, self.state)

    def as_dict(self) -> dict[str, Any]:
        return {
            "institution": self.institution, "template_code": self.template_code,
            "period_end": f"{self.period_end:%Y%m%d}", "submission_id": self.submission_id, "version": self.version,
            "state": self.state, "state_name": self.state_name,
            "template_version": self.template_version, "rows": self.rows, "counted": self.counted,
            "field_completeness": self.field_completeness,
            "required_field_completeness": self.required_field_completeness,
            "fields": [item.as_dict() for item in self.fields],
        }


def parse_report(request: Request, caller: Principal, session: Session, *, institution: str, template_code: str,
                 period: str) -> ReportKey:
    """Check the report named by the request; raise 422 naming a bad or missing value, or 403 (audited)."""
    code = institution.strip() or caller.institution_code
    if code is None:
        raise invalid("INSTITUTION_MISSING", "查看字段完整性明细须指定机构代码，请在机构列表中选择一个机构。")
    check_institution(request, caller, CAPABILITY, code)
    if session.scalar(select(Institution.id).where(Institution.code == code)) is None:
        raise invalid("INSTITUTION_NOT_FOUND", f"机构代码“{code[:32]}”不存在，请检查机构代码或在机构列表中选择。")
    template = template_code.strip()
    if not template:
        raise invalid("TEMPLATE_MISSING", "查看字段完整性明细须指定报表模板，请在报表模板列表中选择。")
    if template not in catalog().codes():
        raise invalid("TEMPLATE_NOT_FOUND", f"报表模板“{template[:64]}”不存在，请在报表模板列表中选择。")
    if not period.strip():
        raise invalid("PERIOD_MISSING", "查看字段完整性明细须指定报告期，格式为 YYYYMMDD，例如 20261130。")
    return ReportKey(code, template, parse_period_text(period, "报告期"))


def _fields(row: ReportSubmission, counts: SubmissionFieldCount) -> list[FieldValues]:
    try:
        template_fields = {item.code: item for item in catalog().get(row.template_code, row.template_version).fields}
    except RegsandboxError:
        template_fields = {}
    fields = []
    for code, present in counts.field_values.items():
        item = template_fields.get(code)
        fields.append(FieldValues(code, item.name if item else None, bool(item and item.required), int(present),
                                  counts.row_count))
    order = {item.code: index for index, item in enumerate(fields)}
    return sorted(fields, key=lambda item: (item.completeness if item.completeness is not None else 1.0,
                                            order[item.code]))


def field_breakdown(session: Session, report: ReportKey) -> FieldBreakdown:
    """Return the per-field counts of the report's current version, or raise 404 ``QUALITY_REPORT_NOT_FOUND``."""
    newest = newest_versions(report.quality_filter())
    found = session.execute(
        select(ReportSubmission, SubmissionFieldCount)
        .join(newest, and_(newest.c.institution_id == ReportSubmission.institution_id,
                           newest.c.template_code == ReportSubmission.template_code,
                           newest.c.period_end == ReportSubmission.period_end,
                           newest.c.version == ReportSubmission.version))
        .outerjoin(SubmissionFieldCount, SubmissionFieldCount.submission_id == ReportSubmission.id)
    ).first()
    if found is None:
        raise not_found("QUALITY_REPORT_NOT_FOUND",
                        f"机构 {report.institution} 报表 {report.template_code} 报告期 {report.period_end:%Y%m%d} "
                        "没有已提交并经过校验的版本，请检查报告期或先报送该报表。")
    row, counts = found
    if counts is None:
        return FieldBreakdown(report.institution, row.template_code, row.period_end, row.id, row.version, row.state,
                              row.template_version, row.row_count, [], None, None)
    cells = counts.row_count * counts.field_count
    required_cells = counts.row_count * counts.required_field_count
    return FieldBreakdown(
        report.institution, row.template_code, row.period_end, row.id, row.version, row.state, row.template_version,
        counts.row_count, _fields(row, counts), counts.present_values / cells if cells else None,
        counts.required_present_values / required_cells if required_cells else None)


def record_fields_read(session: Session, request: Request, caller: Principal, breakdown: FieldBreakdown) -> None:
    """Store the audit event of a per-field completeness read and commit it."""
    add_event(session, request, caller, "quality.read", f"submission:{breakdown.submission_id}", "success", {
        "institution": breakdown.institution, "template": breakdown.template_code,
        "period_end": f"{breakdown.period_end:%Y%m%d}", "version": breakdown.version, "view": "fields"})
    session.commit()
