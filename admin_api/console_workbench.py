"""The console page 工作台 (workbench): each signed-in user's next steps, by capability and institution.

Widgets and who gets them:

- 待报送任务, 草稿, 被退回的报送, 校验未通过的报送: institution users with ``tasks.read`` or
  ``submissions.read``, for their own institution only.
- 待审核报送 and the counts per template: users with ``submissions.review`` who belong to no institution.
- 报送情况最差的机构: users with ``tasks.statistics`` who belong to no institution; each view is audited.

A user whose role has none of these gets a short note and the link to the home page.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from admin_api import task_statistics, workbench
from admin_api.console import _page
from admin_api.db import utc_now
from admin_api.deps import get_session, require
from admin_api.security import Principal, allows

router = APIRouter(prefix="/console", include_in_schema=False)

WORST_ROWS = 10
"""Institutions listed in the statistics widget; the full table is on /console/tasks/statistics."""


def _institution_widgets(session: Session, caller: Principal) -> dict[str, Any]:
    institution_id = workbench.institution_id_of(session, caller.institution_code or "")
    if institution_id is None:
        return {}
    widgets: dict[str, Any] = {}
    if allows(caller.role, "tasks.read"):
        widgets["due"], widgets["due_total"] = workbench.due_tasks(session, institution_id, utc_now())
    if allows(caller.role, "submissions.read"):
        for name, state in (("drafts", workbench.DRAFT_STATE), ("returned", "returned"),
                            ("failed", "validation_failed")):
            widgets[name], widgets[f"{name}_total"] = workbench.submissions_in_state(session, institution_id, state)
    return widgets


def _review_widgets(session: Session) -> dict[str, Any]:
    queue, total = workbench.submissions_in_state(session, None, "pending_review", oldest_first=True)
    return {"queue": queue, "queue_total": total, "by_template": workbench.pending_by_template(session)}


def _statistics_widget(session: Session, request: Request, caller: Principal) -> dict[str, Any]:
    rate_filter = task_statistics.RateFilter()
    worst = task_statistics.rate_rows(session, "institution", rate_filter, limit=WORST_ROWS)
    task_statistics.record_read(session, request, caller, rate_filter, "workbench")
    return {"worst": worst}


@router.get("/workbench", response_class=HTMLResponse)
def workbench_page(request: Request, session: Session = Depends(get_session),
                   caller: Principal = Depends(require("console.use", console=True))) -> Response:
    """Show the widgets the caller's capabilities and institution allow."""
    widgets: dict[str, Any] = {}
    if caller.institution_code is not None:
        widgets.update(_institution_widgets(session, caller))
    if caller.institution_code is None and allows(caller.role, "submissions.review"):
        widgets.update(_review_widgets(session))
    if caller.institution_code is None and allows(caller.role, "tasks.statistics"):
        widgets.update(_statistics_widget(session, request, caller))
    if allows(caller.role, "catalog.classify"):
        widgets["catalog_unconfirmed"], widgets["catalog_total"] = workbench.unconfirmed_columns(session)
    return _page(request, "workbench.html", caller, widgets=widgets, template_name=workbench.template_name,
                 now=utc_now())
