"""报表应用: query accepted report data with aggregates, and export the same query as CSV or XLSX.

Regulators read every institution's accepted data, and institution users (报送人员, 机构管理员) read
their own institution's only. Every query and export is audited. A rejected one is audited with
outcome ``failed`` and its error code, and a denial of another institution as ``denied`` where it happens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.orm import Session

from admin_api import report_data
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.keyaccess import request_keystore
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError

router = APIRouter()
T = TypeVar("T")


def audited(request: Request, session: Session, caller: Principal, action: str, template_code: str,
            work: Callable[[], T]) -> T:
    """Run ``work``. On a platform error, roll back, store a ``failed`` audit event with the code and re-raise.

    403 errors come from ``check_institution``, which already stored a ``denied`` event.
    """
    try:
        return work()
    except RegsandboxError as error:
        session.rollback()
        if error.status != 403:
            record_event(request, caller, action, f"report_data:{template_code[:64]}", "failed", {"code": error.code})
        raise


@router.post("/report-data/query", response_model=report_data.ReportDataOut)
def query_report_data(
    body: report_data.ReportQueryIn, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require(report_data.CAPABILITY)),
) -> report_data.ReportDataOut:
    """Query accepted data of one template: grouped aggregates with totals, or a page of masked detail rows."""
    return audited(request, session, caller, "report_data.query", body.template_code, lambda: report_data.run_query(
        session, request, caller, request_keystore(request), request.app.state.settings, body))


def _export(kind: str, body: report_data.ReportQueryIn, request: Request, session: Session,
            caller: Principal) -> Response:
    content, name = audited(request, session, caller, "report_data.export", body.template_code,
                            lambda: report_data.export_table(session, request, caller, request_keystore(request),
                                                             request.app.state.settings, body, kind))
    return Response(content, media_type=report_data.MEDIA_TYPES[kind], headers={
        "Content-Disposition": report_data.content_disposition(name), "Cache-Control": "no-store"})


@router.post("/report-data/export.csv")
def export_report_data_csv(
    body: report_data.ReportQueryIn, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require(report_data.CAPABILITY)),
) -> Response:
    """Export the result of the same query as CSV (UTF-8 with BOM). Detail exports stop at 50,000 rows."""
    return _export("csv", body, request, session, caller)


@router.post("/report-data/export.xlsx")
def export_report_data_xlsx(
    body: report_data.ReportQueryIn, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require(report_data.CAPABILITY)),
) -> Response:
    """Export the result of the same query as an XLSX workbook. Detail exports stop at 50,000 rows."""
    return _export("xlsx", body, request, session, caller)
