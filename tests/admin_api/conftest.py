"""Fixtures of the admin_api tests: a migrated, seeded database on SQLite and on PostgreSQL.

``env`` is parametrised over both backends. Each backend gets its own data directory, platform
secrets, report notebook folder and, for PostgreSQL, a database with a random name on
127.0.0.1:5432 that is dropped at the end of the session.

The model registry here is :class:`DictRegistry`, an in-process stand-in with the two methods
of ``model_registry.client.MlflowAdmin`` that admin_api uses. test_registry_mlflow.py runs a
review against a real MLflow server through the real client.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from admin_api.app import create_app
from admin_api.db import make_engine, make_session_factory
from admin_api.migrate import upgrade_to_head
from admin_api.seed import seed_demo
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import PlatformSecrets, ensure_platform_secrets
from regsandbox_core.settings import Settings

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BACKENDS = ["sqlite", "postgresql"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DictRegistry:
    """Model registry kept in a dict: {(name, version): {run_id, creation_timestamp, tags, metrics}}."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], dict[str, Any]] = {}
        self.fail = False

    def add(self, name: str, version: str, auc: float, ks: float) -> None:
        self.versions[(name, version)] = {
            "run_id": secrets.token_hex(16),
            "creation_timestamp": 1796400000000,
            "tags": {},
            "metrics": {"auc": auc, "ks": ks},
        }

    def list_model_versions(self) -> list[dict[str, Any]]:
        if self.fail:
            raise ConnectionError("registry switched off by the test")
        return [
            {"name": name, "version": version, **{**item, "tags": dict(item["tags"])}}
            for (name, version), item in self.versions.items()
        ]

    def set_model_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        if self.fail:
            raise ConnectionError("registry switched off by the test")
        self.versions[(name, version)]["tags"].update(tags)


def create_postgres_database() -> tuple[str, str]:
    """Create a database with a random name; return (name, SQLAlchemy URL)."""
    name = f"rst_admin_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_postgres_database(name: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of the backend named by the test's ``backend`` parameter."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'admin.db'}"
        return
    name, url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(name)


def write_notebook(path: Path, title: str | None) -> None:
    metadata: dict[str, Any] = {"kernelspec": {"name": "python3", "display_name": "Python 3"}}
    if title:
        metadata["regsandbox"] = {"title": title}
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# 报告"]}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}))


def make_project_root(root: Path) -> Path:
    write_notebook(root / "notebooks" / "reports" / "quarterly_risk.ipynb", "季度风险监测报告")
    write_notebook(root / "notebooks" / "reports" / "plain_report.ipynb", None)
    return root


@dataclass
class Env:
    """One running admin_api app on one database backend, with the demo data seeded."""

    backend: str
    settings: Settings
    secrets: PlatformSecrets
    project_root: Path
    registry: DictRegistry
    client: TestClient
    passwords: dict[str, str]
    session_factory: sessionmaker[Session]
    _tokens: dict[str, str] = field(default_factory=dict)

    def token(self, username: str) -> str:
        if username not in self._tokens:
            response = self.client.post(
                "/api/v1/auth/token", json={"username": username, "password": self.passwords[username]}
            )
            assert response.status_code == 200, response.text
            self._tokens[username] = response.json()["access_token"]
        return self._tokens[username]

    def auth(self, username: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(username)}"}

    def service(self, name: str = "scheduler") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets.service_token}", "X-Regsandbox-Service": name}

    def db(self) -> Session:
        return self.session_factory()


def build_env(backend: str, database: str, data_dir: Path, project_root: Path) -> Env:
    # The demo users sign in without a second factor here; test_totp.py switches the TOTP requirement on.
    settings = Settings(data_dir=data_dir, database_url=database, mlflow_port=free_port(), totp_required_roles=[])
    platform_secrets = ensure_platform_secrets(settings)
    upgrade_to_head(database)
    session_factory = make_session_factory(make_engine(database))
    with session_factory() as session:
        passwords = seed_demo(session, settings, project_root)
        codes = [code for (code,) in session.execute(text("SELECT code FROM institutions ORDER BY code"))]
    ensure_platform_keys(settings, codes, on_event=None)
    registry = DictRegistry()
    registry.add("bank_a.scorecard", "1", auc=0.7812, ks=0.4123)
    registry.add("bank_a.scorecard", "2", auc=0.7901, ks=0.4250)
    registry.add("bank_b.pd_model", "1", auc=0.7450, ks=0.3810)
    registry.add("bank_c.lgd", "1", auc=0.7011, ks=0.3302)
    registry.add("scratch_model", "1", auc=0.5, ks=0.1)
    app = create_app(settings, registry=registry, project_root=project_root)
    return Env(backend, settings, platform_secrets, project_root, registry, TestClient(app), passwords,
               session_factory)


def backend_env(backend: str, tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Env]:
    """Build, yield and tear down a seeded environment on ``backend`` with folders named after ``label``."""
    data_dir = tmp_path_factory.mktemp(f"{label}-{backend}")
    project_root = make_project_root(tmp_path_factory.mktemp(f"{label}-project-{backend}"))
    if backend == "sqlite":
        built = build_env(backend, f"sqlite:///{data_dir / 'admin.db'}", data_dir, project_root)
        with built.client:
            yield built
        return
    name, url = create_postgres_database()
    try:
        built = build_env(backend, url, data_dir, project_root)
        with built.client:
            yield built
        built.client.app.state.engine.dispose()
        built.session_factory.kw["bind"].dispose()
    finally:
        drop_postgres_database(name)


@pytest.fixture(scope="session", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from backend_env(request.param, tmp_path_factory, "data")
