"""Migrations on SQLite and PostgreSQL, the demo seed, the operator commands and the server start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from admin_api.db import Base, make_engine, make_session_factory
from admin_api.migrate import alembic_config, current_revision, head_revision, upgrade_to_head
from admin_api.models import Institution, ReportNotebook, User
from admin_api.security import verify_password
from admin_api.seed import seed_demo
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import ensure_platform_secrets
from regsandbox_core.settings import Settings

from .conftest import BACKENDS, free_port, make_project_root

TABLES = {"institutions", "users", "api_tokens", "model_reviews", "report_notebooks", "schedules", "report_runs",
          "audit_events", "audit_chain_head", "password_history", "api_endpoints", "messages", "roles",
          "report_submissions", "submission_events", "submission_row_comments", "report_tasks", "report_task_targets",
          "submission_waivers", "catalog_columns", "catalog_column_history", "masking_policy_drafts",
          "submission_field_counts", "alembic_version"}


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_migrations_upgrade_downgrade(database_url: str) -> None:
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        assert current_revision(engine) == head_revision()
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []

        command.downgrade(alembic_config(database_url), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        upgrade_to_head(database_url)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_seed_demo_idempotent(database_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    project_root = make_project_root(tmp_path / "project")
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    try:
        with factory() as session:
            created = seed_demo(session, settings, project_root)
        with factory() as session:
            again = seed_demo(session, settings, project_root)
            institutions = {i.code: (i.name, i.type) for i in session.scalars(select(Institution))}
            users = {u.username: u for u in session.scalars(select(User))}
            notebooks = {n.path: n for n in session.scalars(select(ReportNotebook))}
    finally:
        engine.dispose()

    assert set(created) == {"modeller_a", "modeller_b", "modeller_c", "reporter_a", "reporter_b", "reporter_c",
                            "instadmin_a", "reviewer", "analyst", "sysadmin", "secadmin", "auditor", "steward"}
    assert again == {}
    assert all(len(password) >= 16 for password in created.values())
    assert len(set(created.values())) == len(created)
    assert institutions == {"bank_a": ("浦东示范银行甲", "银行"), "bank_b": ("浦东示范银行乙", "银行"),
                            "bank_c": ("浦东示范银行丙", "银行")}
    assert users["reporter_c"].role == "reporter"
    assert users["reporter_c"].institution_code == "bank_c"
    assert users["sysadmin"].role == "system_admin"
    assert users["sysadmin"].institution_code is None
    assert (users["secadmin"].role, users["secadmin"].display_name) == ("security_admin", "吴刚（安全管理员）")
    assert (users["auditor"].role, users["auditor"].display_name) == ("audit_admin", "孙丽（审计管理员）")
    assert users["secadmin"].institution_code is None
    assert users["auditor"].institution_code is None
    assert users["modeller_a"].password_hash.startswith("$argon2id$")
    assert verify_password(users["modeller_a"].password_hash, created["modeller_a"])
    assert all(u.email.split("@")[1].endswith(".example") for u in users.values())
    assert set(notebooks) == {"notebooks/reports/quarterly_risk.ipynb", "notebooks/reports/plain_report.ipynb"}
    assert {n.status for n in notebooks.values()} == {"pending"}


def _manage(data_dir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "REGSANDBOX_DATA_DIR": str(data_dir)}
    environment.pop("REGSANDBOX_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "admin_api.manage", *arguments],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )


def test_manage_commands(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    unmigrated = _manage(data_dir, "seed-demo")
    assert unmigrated.returncode != 0
    assert "请先运行" in unmigrated.stderr

    assert _manage(data_dir, "migrate").returncode == 0
    assert (data_dir / "admin.db").stat().st_mode & 0o777 == 0o600

    first = _manage(data_dir, "seed-demo")
    second = _manage(data_dir, "seed-demo")
    assert first.returncode == 0
    assert len(json.loads(first.stdout)) == 13
    assert json.loads(second.stdout) == {}

    disabled = _manage(data_dir, "set-active", "modeller_a", "--disable")
    missing = _manage(data_dir, "set-active", "nobody", "--enable")
    assert disabled.returncode == 0
    assert "已停用" in disabled.stderr
    assert missing.returncode == 1
    assert "不存在" in missing.stderr
    engine = make_engine(f"sqlite:///{data_dir / 'admin.db'}")
    with make_session_factory(engine)() as session:
        assert session.scalars(select(User.is_active).where(User.username == "modeller_a")).one() is False
    engine.dispose()


def _uvicorn(data_dir: Path, port: int) -> subprocess.Popen[str]:
    environment = {**os.environ, "REGSANDBOX_DATA_DIR": str(data_dir), "REGSANDBOX_ADMIN_API_PORT": str(port),
                   "REGSANDBOX_MLFLOW_PORT": str(free_port())}
    environment.pop("REGSANDBOX_DATABASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "admin_api.app:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_server_refuses_without_secrets(tmp_path: Path) -> None:
    process = _uvicorn(tmp_path / "data", free_port())
    try:
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode != 0
    assert "平台密钥文件" in stderr
    assert "regsandbox init" in stderr


def test_server_serves_after_init(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir)
    ensure_platform_secrets(settings)
    ensure_platform_keys(settings, [], on_event=None)
    upgrade_to_head(settings.sqlalchemy_url)
    port = free_port()
    process = _uvicorn(data_dir, port)
    try:
        deadline = time.monotonic() + 30
        response = None
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/v1/me", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert response is not None, "admin_api did not start within 30 s"
        assert response.status_code == 401
        assert response.json()["code"] == "NOT_AUTHENTICATED"
        assert response.headers["x-request-id"]
    finally:
        process.terminate()
        process.wait(timeout=15)
