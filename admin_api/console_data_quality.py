"""The console page 数据质量: filters, then the quality measures per group with totals.

The form is sent with GET, so a result can be bookmarked. It calls :mod:`admin_api.data_quality`, so
the institution scope and the audit event are those of the API. When the filters name one
institution, one template and one period (起始报告期 = 截止报告期), the page also lists the fields
of that report with the lowest completeness (:mod:`admin_api.field_completeness`).
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api import data_quality, field_completeness
from admin_api.audit import record_event
from admin_api.console import _page
from admin_api.deps import get_session, require
from admin_api.models import Institution
from admin_api.security import Principal
from admin_api.submissions import catalog
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)
PAGE = "data_quality.html"
PAGE_SIZE = 100
LOWEST_FIELDS = 10
"""Fields listed in the per-field breakdown, lowest completeness first."""


def _institutions(session: Session, caller: Principal) -> dict[str, str]:
    query = select(Institution.code, Institution.name).order_by(Institution.code)
    if caller.institution_code is not None:
        query = query.where(Institution.code == caller.institution_code)
    return dict(session.execute(query).all())


@router.get("/data-quality", response_class=HTMLResponse)
def data_quality_page(
    request: Request,
    institution: str = Query(default="", max_length=32),
    template_code: str = Query(default="", max_length=64),
    period_from: str = Query(default="", max_length=16),
    period_to: str = Query(default="", max_length=16),
    group_by: list[str] = Query(default=[], max_length=3),
    sort: str = Query(default="key", max_length=32),
    offset: int = Query(default=0, ge=0, le=1_000_000),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require(data_quality.CAPABILITY, console=True)),
) -> Response:
    """Show the filters and the measures of each group, worst first when sorted by a measure."""
    form = {"institution": institution.strip(), "template_code": template_code.strip(),
            "period_from": period_from.strip(), "period_to": period_to.strip(),
            "group_by": group_by or list(data_quality.DIMENSIONS), "sort": sort, "offset": offset}
    context = {"form": form, "institutions": _institutions(session, caller),
               "templates": [(code, catalog().get(code).name) for code in catalog().codes()],
               "dimensions": data_quality.DIMENSIONS, "sort_keys": data_quality.SORT_KEYS, "page_size": PAGE_SIZE,
               "own_institution": caller.institution_code,
               "page_query": urlencode({key: value for key, value in form.items() if key != "offset"}, doseq=True)}
    try:
        quality_filter = data_quality.parse_filter(request, caller, session, institution=institution,
                                                   template_code=template_code, period_from=period_from,
                                                   period_to=period_to, group_by=group_by)
        report = data_quality.quality_report(session, request.app.state.settings, quality_filter, sort=sort,
                                             offset=offset, limit=PAGE_SIZE)
    except RegsandboxError as error:
        session.rollback()
        if error.status != 403:
            record_event(request, caller, "quality.read", "data_quality", "failed", {"code": error.code})
        return _page(request, PAGE, caller, status_code=error.status, report=None, error=error.message, **context)
    data_quality.record_read(session, request, caller, quality_filter, report)
    breakdown, breakdown_error = _breakdown(request, caller, session, quality_filter)
    return _page(request, PAGE, caller, report=report, error=None, shown=quality_filter.group_by,
                 breakdown=breakdown, breakdown_error=breakdown_error, lowest_fields=LOWEST_FIELDS, **context)


def _breakdown(request: Request, caller: Principal, session: Session, quality_filter: data_quality.QualityFilter,
               ) -> tuple[field_completeness.FieldBreakdown | None, str | None]:
    """Return the per-field breakdown when the filter names one report, or the message why there is none."""
    institution, template_code, period_end = (quality_filter.institution, quality_filter.template_code,
                                              quality_filter.period_from)
    if not (institution and template_code and period_end and period_end == quality_filter.period_to):
        return None, None
    try:
        breakdown = field_completeness.field_breakdown(
            session, field_completeness.ReportKey(institution, template_code, period_end))
    except RegsandboxError as error:
        session.rollback()
        return None, error.message
    field_completeness.record_fields_read(session, request, caller, breakdown)
    return breakdown, None
