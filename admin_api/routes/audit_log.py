"""The audit log: services append events, audit administrators search and export them.

Every event is chained by SM3 when it is flushed (admin_api.audit_chain); the search filters are
described in admin_api.audit_search.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from admin_api.audit import source_ip
from admin_api.audit_search import export_response, parse_filter, search
from admin_api.deps import get_session, require
from admin_api.models import AuditEvent
from admin_api.schemas import AuditEventIn, AuditEventOut
from admin_api.security import Principal

router = APIRouter()


@router.post("/audit/events", response_model=AuditEventOut, status_code=201)
def append_event(
    body: AuditEventIn,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("audit.append")),
) -> AuditEventOut:
    """Append an event reported by a platform service."""
    event = AuditEvent(
        request_id=request.state.request_id,
        actor=body.actor,
        role=body.role,
        institution_code=body.institution_code,
        source_ip=body.source_ip or source_ip(request),
        action=body.action,
        resource=body.resource,
        outcome=body.outcome,
        detail=body.detail,
        recorded_by=caller.username,
    )
    session.add(event)
    session.commit()
    return AuditEventOut.of(event)


@router.get("/audit/events", response_model=list[AuditEventOut])
def list_events(
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("audit.read")),
    limit: int = Query(default=100, ge=1, le=1000),
    before_id: int | None = Query(default=None, ge=1),
    time_from: str | None = Query(default=None, alias="from"),
    time_to: str | None = Query(default=None, alias="to"),
    actor: str | None = Query(default=None),
    action: str | None = Query(default=None),
    institution: str | None = Query(default=None),
    outcome: str | None = Query(default=None),
) -> list[AuditEventOut]:
    """Search audit events, newest first; page with ``before_id`` set to the last id of the previous page."""
    audit_filter = parse_filter(time_from, time_to, actor, action, institution, outcome)
    return [AuditEventOut.of(event) for event in search(session, audit_filter, limit, before_id)]


@router.get("/audit/events.csv")
def export_events(
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("audit.read")),
    time_from: str | None = Query(default=None, alias="from"),
    time_to: str | None = Query(default=None, alias="to"),
    actor: str | None = Query(default=None),
    action: str | None = Query(default=None),
    institution: str | None = Query(default=None),
    outcome: str | None = Query(default=None),
) -> StreamingResponse:
    """Export the matching events as CSV, newest first, up to ``audit_export_max_rows`` rows (audited)."""
    audit_filter = parse_filter(time_from, time_to, actor, action, institution, outcome)
    return export_response(request, session, caller, audit_filter)
