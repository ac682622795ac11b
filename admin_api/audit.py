"""Writing audit events.

:func:`add_event` adds an event to the caller's session, so a write and its audit event are
committed together; :mod:`admin_api.audit_chain` chains every event when it is flushed.
:func:`record_event` commits an event on its own session; it is used for
denials and failed sign-ins, whose request session is rolled back. :func:`record_operator_event`
commits an event of a command-line operation, which has no HTTP request.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

# Imported for its before_flush listener, which gives every new AuditEvent its id and SM3 chain digests.
from admin_api import audit_chain  # noqa: F401
from admin_api.models import AuditEvent
from admin_api.security import Principal

logger = logging.getLogger(__name__)

def source_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def _build_event(
    request: Request,
    principal: Principal,
    action: str,
    resource: str,
    outcome: str,
    detail: dict[str, Any] | None,
    ip: str | None = None,
) -> AuditEvent:
    return AuditEvent(
        request_id=getattr(request.state, "request_id", None),
        actor=principal.username,
        role=principal.role,
        institution_code=principal.institution_code,
        source_ip=ip or source_ip(request),
        action=action,
        resource=resource,
        outcome=outcome,
        detail=json.dumps(detail, ensure_ascii=False, sort_keys=True) if detail else None,
    )


def add_event(
    session: Session,
    request: Request,
    principal: Principal,
    action: str,
    resource: str,
    outcome: str = "success",
    detail: dict[str, Any] | None = None,
    ip: str | None = None,
) -> AuditEvent:
    """Add an audit event to ``session``; it is stored when the caller commits.

    ``ip`` replaces the request's peer address, e.g. when the hub reports its user's address.
    """
    event = _build_event(request, principal, action, resource, outcome, detail, ip)
    session.add(event)
    return event


def record_event(
    request: Request,
    principal: Principal,
    action: str,
    resource: str,
    outcome: str,
    detail: dict[str, Any] | None = None,
    ip: str | None = None,
) -> None:
    """Store an audit event at once in its own transaction."""
    session: Session = request.app.state.session_factory()
    try:
        session.add(_build_event(request, principal, action, resource, outcome, detail, ip))
        session.commit()
    finally:
        session.close()
    logger.info(
        "audit %s %s by %s on %s (request %s)",
        outcome, action, principal.username, resource, getattr(request.state, "request_id", "-"),
    )


def record_operator_event(
    session_factory: sessionmaker[Session],
    actor: str,
    action: str,
    resource: str,
    outcome: str,
    detail: dict[str, Any] | None = None,
    *,
    role: str = "operator",
) -> None:
    """Store an audit event of an operator command (e.g. ``regsandbox keys``) at once in its own transaction.

    ``actor`` names the operator, for example ``cli:root``. The event has no request id or source address.
    """
    session = session_factory()
    try:
        session.add(AuditEvent(
            actor=actor[:64], role=role, action=action, resource=resource[:500], outcome=outcome,
            detail=json.dumps(detail, ensure_ascii=False, sort_keys=True) if detail else None,
        ))
        session.commit()
    finally:
        session.close()
    logger.info("audit %s %s by %s on %s (command line)", outcome, action, actor, resource)
