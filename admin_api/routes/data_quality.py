"""数据质量: GET /api/v1/data-quality returns the quality measures per institution, template and period.

GET /api/v1/data-quality/fields returns the field completeness of one report field by field.
Institution users get their own institution's data only. Every read is audited as ``quality.read``,
and a rejected one with outcome ``failed`` and its error code.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session

from admin_api import data_quality, field_completeness
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError

router = APIRouter()


@router.get("/data-quality")
def read_data_quality(
    request: Request,
    institution: str = Query(default="", max_length=32, description="机构代码；机构用户只能查看本机构"),
    template_code: str = Query(default="", max_length=64, description="报表模板代码；不填表示全部模板"),
    period_from: str = Query(default="", max_length=16, description="起始报告期末日期，YYYYMMDD"),
    period_to: str = Query(default="", max_length=16, description="截止报告期末日期，YYYYMMDD"),
    group_by: list[str] = Query(default=[], max_length=3, description="institution、template、period，不填表示三者"),
    sort: str = Query(default="key", max_length=32,
                      description="key、completeness、field_completeness、required_field_completeness、validity 或 timeliness"),
    offset: int = Query(default=0, ge=0, le=1_000_000),
    limit: int = Query(default=100, ge=1, le=data_quality.MAX_PAGE_SIZE),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require(data_quality.CAPABILITY)),
) -> dict[str, Any]:
    """Submission and field completeness, validity (rule pass rate) and timeliness by group, with totals."""
    try:
        quality_filter = data_quality.parse_filter(request, caller, session, institution=institution,
                                                   template_code=template_code, period_from=period_from,
                                                   period_to=period_to, group_by=group_by)
        report = data_quality.quality_report(session, request.app.state.settings, quality_filter, sort=sort,
                                             offset=offset, limit=limit)
    except RegsandboxError as error:
        session.rollback()
        if error.status != 403:  # check_institution stored the denial already
            record_event(request, caller, "quality.read", "data_quality", "failed", {"code": error.code})
        raise
    data_quality.record_read(session, request, caller, quality_filter, report)
    return {
        "group_by": list(quality_filter.group_by), "group_count": report.group_count, "offset": report.offset,
        "limit": report.limit, "rows": [row.as_dict() for row in report.rows], "total": report.total.as_dict(),
        "estimated_uploads": report.estimated_uploads, "notes": report.notes,
    }


@router.get("/data-quality/fields")
def read_field_completeness(
    request: Request,
    institution: str = Query(default="", max_length=32, description="机构代码；机构用户不填即为本机构"),
    template_code: str = Query(default="", max_length=64, description="报表模板代码"),
    period: str = Query(default="", max_length=16, description="报告期末日期，YYYYMMDD"),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require(data_quality.CAPABILITY)),
) -> dict[str, Any]:
    """Field completeness of the current version of one report, field by field, lowest first."""
    try:
        report = field_completeness.parse_report(request, caller, session, institution=institution,
                                                 template_code=template_code, period=period)
        breakdown = field_completeness.field_breakdown(session, report)
    except RegsandboxError as error:
        session.rollback()
        if error.status != 403:  # check_institution stored the denial already
            record_event(request, caller, "quality.read", "data_quality", "failed", {"code": error.code})
        raise
    field_completeness.record_fields_read(session, request, caller, breakdown)
    return breakdown.as_dict()
