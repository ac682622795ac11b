"""Objects the admin_api tests create directly or through the API."""

from __future__ import annotations

import secrets

from sqlalchemy import select

from admin_api.db import utc_now
from admin_api.models import ApiToken, AuditEvent, ReportNotebook, ReportRun, User
from admin_api.security import CONSOLE_SESSION_LIFETIME, issue_token

from .conftest import Env


def notebook_id(env: Env, path_stem: str) -> int:
    with env.db() as session:
        return session.scalars(
            select(ReportNotebook.id).where(ReportNotebook.path == f"notebooks/reports/{path_stem}.ipynb")
        ).one()


def approved_schedule(env: Env, *, fresh: bool = False) -> int:
    """Return the id of a schedule of the approved quarterly notebook, creating both once per env."""
    cached = getattr(env, "_schedule_id", None)
    if cached is not None and not fresh:
        return cached
    quarterly = notebook_id(env, "quarterly_risk")
    with env.db() as session:
        status = session.scalars(select(ReportNotebook.status).where(ReportNotebook.id == quarterly)).one()
    if status != "approved":
        response = env.client.post(f"/api/v1/report-notebooks/{quarterly}/approve", headers=env.auth("reviewer"))
        assert response.status_code == 200, response.text
    response = env.client.post(
        "/api/v1/schedules",
        headers=env.auth("sysadmin"),
        json={"name": f"季度报告-{secrets.token_hex(4)}", "notebook_id": quarterly, "cron": "0 8 1 */3 *",
              "recipients": ["risk@regulator.example"]},
    )
    assert response.status_code == 201, response.text
    if not fresh:
        env._schedule_id = response.json()["id"]  # type: ignore[attr-defined]
    return response.json()["id"]


def insert_run(env: Env, schedule_id: int, status: str) -> int:
    with env.db() as session:
        run = ReportRun(schedule_id=schedule_id, trigger="manual", status=status, requested_by="sysadmin")
        if status == "running":
            run.claimed_by, run.claimed_at = "service:scheduler", utc_now()
        session.add(run)
        session.commit()
        return run.id


def console_cookie(env: Env, username: str) -> dict[str, str]:
    """Return a Cookie header of a new console session of ``username``, made without the form."""
    with env.db() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        token, _ = issue_token(session, user, "console", CONSOLE_SESSION_LIFETIME)
        session.commit()
    return {"Cookie": f"regsandbox_session={token}"}


def audit_events(env: Env, request_id: str) -> list[AuditEvent]:
    with env.db() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.request_id == request_id)))


def tokens_of(env: Env, username: str) -> list[ApiToken]:
    with env.db() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        return list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id)))
