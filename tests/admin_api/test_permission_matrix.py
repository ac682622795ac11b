"""The generated permission matrix: every route declares one capability, and every role gets exactly its outcome.

The route list comes from the application, so a new route is covered without editing this file.
Each request names objects that do not exist (``zz_missing``, id 999999) and sends an empty body,
so an admitted caller gets a 404 or 422 and nothing changes, while a refused caller gets 401 or 403.
The requests run against an environment of their own, because denials add audit rows.
A second pass sends every route that names a user or an institution, as each institution role, once
for an object of the caller's own institution and once for another institution's, and checks the
exact outcome: admitted, refused for the role, or refused for the institution.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from admin_api.models import Institution, User
from admin_api.permission_matrix import MATRIX_ROLES, RoutePermission, render, route_capabilities
from admin_api.security import ANONYMOUS, SERVICE, csrf_token

from .conftest import BACKENDS, Env, backend_env
from .helpers import console_cookie

DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "permissions.md"
USER_OF_ROLE = {
    "system_admin": "sysadmin",
    "regulator_reviewer": "reviewer",
    "regulator_analyst": "analyst",
    "institution_admin": "instadmin_a",
    "modeller": "modeller_a",
    "reporter": "reporter_a",
    "security_admin": "secadmin",
    "audit_admin": "auditor",
    "data_steward": "steward",
}
_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]+)?\}")
_DENIAL_CODES = {"FORBIDDEN", "NOT_AUTHENTICATED"}


@pytest.fixture(scope="module", params=BACKENDS)
def matrix_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from backend_env(request.param, tmp_path_factory, "matrix")


def _missing_path(path: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        return "999999" if name.endswith("id") or name in ("version",) else "zz_missing"

    return _PARAMETER.sub(value, path)


def _permissions(env: Env) -> list[RoutePermission]:
    return list(route_capabilities(env.client.app))


def test_every_route_declares_capability(env: Env) -> None:
    permissions = _permissions(env)

    assert len(permissions) > 20
    assert all(item.capability for item in permissions)


def test_permissions_page_current(env: Env) -> None:
    expected = render(_permissions(env))

    assert DOCS_PAGE.read_text(encoding="utf-8") == expected, (
        "docs/permissions.md is out of date: run `.venv/bin/python -m admin_api.permission_matrix > docs/permissions.md`"
    )


def _headers(env: Env, role: str, console: bool) -> dict[str, str]:
    if role == ANONYMOUS:
        return {}
    if role == SERVICE:
        return {} if console else env.service()
    username = USER_OF_ROLE[role]
    return console_cookie(env, username) if console else env.auth(username)


def _outcome(env: Env, item: RoutePermission, role: str) -> tuple[int, str | None]:
    path = _missing_path(item.path)
    headers = _headers(env, role, item.console)
    if item.console:
        response = env.client.request(item.method, path, headers=headers, follow_redirects=False)
    else:
        response = env.client.request(item.method, path, json={} if item.method != "GET" else None, headers=headers)
    code = None
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        code = body.get("code") if isinstance(body, dict) else None
    return response.status_code, code


def test_api_routes_match_matrix(matrix_env: Env) -> None:
    mismatches = []
    for item in _permissions(matrix_env):
        if item.console or item.capability == "public":
            continue
        for role in MATRIX_ROLES:
            status, code = _outcome(matrix_env, item, role)
            denied = status in (401, 403) and code in _DENIAL_CODES
            if denied == (role in item.roles):
                mismatches.append(f"{item.method} {item.path} as {role}: {status} {code}")

    assert mismatches == []


def test_console_routes_match_matrix(matrix_env: Env) -> None:
    mismatches = []
    for item in _permissions(matrix_env):
        if not item.console or item.capability == "public" or item.method != "GET":
            continue
        for role in MATRIX_ROLES:
            if role == SERVICE:
                continue  # the service token is not a console credential
            status, _code = _outcome(matrix_env, item, role)
            # Console refusals: 303 to the login form without a session, 403 page for a role without the capability.
            denied = status == 403 or (status == 303 and role == ANONYMOUS)
            if denied == (role in item.roles):
                mismatches.append(f"{item.method} {item.path} as {role}: {status}")

    assert mismatches == []


INSTITUTION_SCOPED_ROLES = ("institution_admin", "modeller", "reporter")
OWN, OTHER = "bank_a", "bank_b"
_SCOPED_PATH = re.compile(r"\{username\}|/institutions/\{code\}")


def _throwaway_user(env: Env, institution_code: str) -> str:
    """Store a reporter of ``institution_code`` that a route may change freely; return the name."""
    username = f"mx_{secrets.token_hex(4)}"
    with env.db() as session:
        institution_id = session.scalars(select(Institution.id).where(Institution.code == institution_code)).one()
        session.add(User(username=username, display_name="矩阵用户", email=f"{username}@roles.example", role="reporter",
                         institution_id=institution_id, password_hash="", is_active=True))
        session.commit()
    return username


def _scoped_outcome(env: Env, item: RoutePermission, role: str, institution_code: str) -> tuple[int, str | None]:
    path = item.path.replace("{code}", institution_code)
    if "{username}" in path:
        path = path.replace("{username}", _throwaway_user(env, institution_code))
    headers = _headers(env, role, item.console)
    if item.console and item.method == "POST":
        session_token = headers["Cookie"].split("=", 1)[1]
        form = {"csrf_token": csrf_token(env.secrets.session_secret, session_token)}
        response = env.client.post(path, headers=headers, data=form, follow_redirects=False)
    elif item.console:
        response = env.client.get(path, headers=headers, follow_redirects=False)
    else:
        response = env.client.request(item.method, path, json={} if item.method != "GET" else None, headers=headers)
    code = None
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        code = body.get("code") if isinstance(body, dict) else None
    elif response.status_code == 403 and "您只能" in response.text:
        code = "INSTITUTION_FORBIDDEN"  # console pages show the same Chinese message as the API
    return response.status_code, code


def test_institution_routes_own_other(matrix_env: Env) -> None:
    """Every route naming a user or an institution × every institution role × own/other institution."""
    mismatches = []
    routes = [item for item in _permissions(matrix_env) if _SCOPED_PATH.search(item.path)]
    assert len(routes) >= 10
    for item in routes:
        for role in INSTITUTION_SCOPED_ROLES:
            for scope, institution_code in (("own", OWN), ("other", OTHER)):
                status, code = _scoped_outcome(matrix_env, item, role, institution_code)
                if role not in item.roles:
                    expected_ok = status == 403 and (item.console or code == "FORBIDDEN")
                elif scope == "other":
                    expected_ok = status == 403 and code == "INSTITUTION_FORBIDDEN"
                else:
                    expected_ok = status not in (401, 403)
                if not expected_ok:
                    mismatches.append(f"{item.method} {item.path} as {role} on {scope}: {status} {code}")

    assert mismatches == []
