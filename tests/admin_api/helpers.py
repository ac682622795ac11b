"""Objects the admin_api tests create directly or through the API."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from sqlalchemy import select

from admin_api.db import utc_now
from admin_api.models import ApiToken, AuditEvent, ReportNotebook, ReportRun, User
from admin_api.security import CONSOLE_SESSION_LIFETIME, issue_token

from .conftest import Env, free_port


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


@contextlib.contextmanager
def serve_admin_api(env: Env, log_path: Path, **settings: str) -> Iterator[str]:
    """Serve the env's database and data directory with uvicorn on 127.0.0.1 and yield its URL.

    ``settings`` are extra REGSANDBOX_* environment variables. The server is stopped on exit.
    """
    port = free_port()
    environment = {**os.environ, "REGSANDBOX_DATA_DIR": str(env.settings.data_dir),
                   "REGSANDBOX_DATABASE_URL": env.settings.sqlalchemy_url,
                   "REGSANDBOX_MLFLOW_PORT": str(free_port()), **settings}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "admin_api.app:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port)],
            env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    httpx.get(f"{url}/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    assert process.poll() is None, log_path.read_text()
                    time.sleep(0.2)
            else:
                raise AssertionError("admin_api did not start within 30 s")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
