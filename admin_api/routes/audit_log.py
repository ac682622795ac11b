"""The audit log: services append events, audit administrators read them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.audit import source_ip
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
    actor: str | None = Query(default=None, max_length=64),
    action: str | None = Query(default=None, max_length=64),
    outcome: str | None = Query(default=None, max_length=16),
) -> list[AuditEventOut]:
    """List audit events, newest first; page with ``before_id``."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        query = query.where(AuditEvent.action == action)
    if outcome:
        query = query.where(AuditEvent.outcome == outcome)
    return [AuditEventOut.of(event) for event in session.scalars(query)]
