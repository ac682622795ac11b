"""Every route × every role × own/other institution, with the exact status and the audit of denials."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from admin_api.models import Institution
from admin_api.security import csrf_token

from .conftest import Env
from .helpers import approved_schedule, audit_events, console_cookie, insert_run, notebook_id

USERS = {
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
ROLES = ["anonymous", "service", *USERS]
ALL_USERS = frozenset(USERS)
OWN, OTHER = "bank_a", "bank_b"
MODEL_OF = {"bank_a": "bank_a.scorecard", "bank_b": "bank_b.pd_model"}
USER_OF = {"bank_a": "modeller_a", "bank_b": "modeller_b"}
INSTITUTION_ROLES = frozenset({"institution_admin", "modeller", "reporter"})
REGULATORS = frozenset({"regulator_reviewer", "regulator_analyst"})


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    allowed: frozenset[str]
    ok: int
    body: Any = None
    scoped: bool = False
    """Institution users get 403 when the path names another institution."""
    console: bool = False
    listed: bool = False
    """A list of model versions. The list returned to a modeller contains their own institution's models only."""


ROUTES = {
    "auth.token": Route("POST", "/api/v1/auth/token", frozenset(ROLES), 200, body="signin"),
    "auth.verify": Route("POST", "/api/v1/auth/verify", frozenset({"service"}), 200, body="verify"),
    "me": Route("GET", "/api/v1/me", ALL_USERS, 200),
    "users": Route("GET", "/api/v1/users", frozenset({"system_admin", "institution_admin", "service"}), 200),
    "user.read": Route("GET", "/api/v1/users/{user}", frozenset({"system_admin", "institution_admin", "service"}), 200,
                       scoped=True),
    "user.unlock": Route("POST", "/api/v1/users/{user}/unlock", frozenset({"system_admin", "institution_admin"}), 200,
                         scoped=True),
    "roles.list": Route("GET", "/api/v1/roles", frozenset({"system_admin", "security_admin", "audit_admin"}), 200),
    "roles.create": Route("POST", "/api/v1/roles", frozenset({"system_admin"}), 201, body="role"),
    "institutions": Route("GET", "/api/v1/institutions", ALL_USERS | {"service"}, 200),
    "institution": Route("GET", "/api/v1/institutions/{inst}", ALL_USERS | {"service"}, 200, scoped=True),
    "audit.append": Route("POST", "/api/v1/audit/events", frozenset({"service"}), 201, body={
        "actor": "modeller_a", "action": "hub.spawn", "resource": "server:modeller_a", "outcome": "success",
        "institution_code": "bank_a"}),
    "audit.list": Route("GET", "/api/v1/audit/events", frozenset({"audit_admin"}), 200),
    "audit.export": Route("GET", "/api/v1/audit/events.csv", frozenset({"audit_admin"}), 200),
    "models.list": Route("GET", "/api/v1/models", REGULATORS | {"modeller", "service"}, 200,
                         listed=True),
    "models.review": Route("POST", "/api/v1/models/{model}/versions/1/review", frozenset({"regulator_reviewer"}),
                           200, body={"decision": "returned", "comment": "请补充样本外验证结果"}),
    "notebooks.list": Route("GET", "/api/v1/report-notebooks",
                            REGULATORS | {"system_admin", "service"}, 200),
    "notebooks.approve": Route("POST", "/api/v1/report-notebooks/{notebook}/approve",
                               frozenset({"regulator_reviewer"}), 200),
    "schedules.list": Route("GET", "/api/v1/schedules", REGULATORS | {"system_admin", "service"}, 200),
    "schedules.read": Route("GET", "/api/v1/schedules/{schedule}", REGULATORS | {"system_admin", "service"}, 200),
    "schedules.create": Route("POST", "/api/v1/schedules", frozenset({"system_admin"}), 201, body="schedule"),
    "schedules.update": Route("PATCH", "/api/v1/schedules/{schedule}", frozenset({"system_admin"}), 200,
                              body={"enabled": True}),
    "runs.queue": Route("POST", "/api/v1/schedules/{schedule}/runs",
                        frozenset({"system_admin", "regulator_reviewer", "service"}), 201, body={"trigger": "manual"}),
    "runs.list": Route("GET", "/api/v1/report-runs?status=queued", REGULATORS | {"system_admin", "service"}, 200),
    "runs.claim": Route("POST", "/api/v1/report-runs/{queued_run}/claim", frozenset({"service"}), 200),
    "runs.finish": Route("POST", "/api/v1/report-runs/{running_run}/finish", frozenset({"service"}), 200,
                         body={"status": "succeeded"}),
    "data_quality": Route("GET", "/api/v1/data-quality?institution={inst}",
                          REGULATORS | {"data_steward", "reporter", "institution_admin"}, 200, scoped=True),
    "reidentify": Route("POST", "/api/v1/reidentification", frozenset({"regulator_reviewer"}), 422,
                        body={"institution": "bank_a", "table": "applications", "column": "id_number",
                              "token": "0" * 32, "reason": "权限表：缺少案件编号"}),
    "console.home": Route("GET", "/console/", ALL_USERS, 200, console=True),
    "console.data_quality": Route("GET", "/console/data-quality?institution={inst}",
                                  REGULATORS | {"data_steward", "reporter", "institution_admin"}, 200, console=True,
                                  scoped=True),
    "console.reidentification": Route("GET", "/console/reidentification", frozenset({"regulator_reviewer"}), 200,
                                      console=True),
    "console.models": Route("GET", "/console/models", REGULATORS | {"modeller"}, 200,
                            console=True, listed=True),
    "console.schedules": Route("GET", "/console/schedules", REGULATORS | {"system_admin"}, 200,
                               console=True),
    "console.audit": Route("GET", "/console/audit", frozenset({"audit_admin"}), 200, console=True),
    "console.review": Route("POST", "/console/models/review", frozenset({"regulator_reviewer"}), 303, console=True,
                            body={"name": "{model}", "version": "1", "decision": "returned", "comment": "表单退回"}),
    "console.run": Route("POST", "/console/schedules/{schedule}/run", frozenset({"system_admin", "regulator_reviewer"}),
                         303, console=True, body={}),
    "console.approve": Route("POST", "/console/report-notebooks/{notebook}/approve",
                             frozenset({"regulator_reviewer"}), 303, console=True, body={}),
    "console.schedule_create": Route("POST", "/console/schedules", frozenset({"system_admin"}), 303, console=True,
                                     body="console_schedule"),
    "console.schedule_toggle": Route("POST", "/console/schedules/{schedule}/enabled", frozenset({"system_admin"}),
                                     303, console=True, body={"enabled": "true"}),
    "console.logout": Route("POST", "/console/logout", ALL_USERS, 303, console=True, body={}),
}


def expected_status(route: Route, role: str, scope: str) -> int:
    if role in route.allowed:
        if route.scoped and role in INSTITUTION_ROLES and scope == "other":
            return 403
        return route.ok
    if route.console and role in ("anonymous", "service"):
        return 303  # to the login form
    return 401 if role == "anonymous" else 403


def _body(env: Env, body: Any) -> Any:
    if body == "signin":
        return {"username": "reporter_b", "password": env.passwords["reporter_b"]}
    if body == "verify":
        return {"username": "reporter_b", "password": env.passwords["reporter_b"], "source_ip": "127.0.0.9"}
    if body == "role":
        return {"code": f"perm_{secrets.token_hex(4)}", "name": f"权限表角色-{secrets.token_hex(4)}",
                "scope": "institution", "capabilities": ["me.read", "models.read"]}
    if body == "schedule":
        return {"name": f"权限表-{secrets.token_hex(4)}", "notebook_id": notebook_id(env, "quarterly_risk"),
                "cron": "30 7 * * mon-fri", "recipients": ["a@regulator.example"]}
    return body


def _path(env: Env, template: str, institution: str) -> str:
    values: dict[str, Any] = {"inst": institution, "model": MODEL_OF[institution], "user": USER_OF[institution]}
    if "{notebook}" in template:
        values["notebook"] = notebook_id(env, "quarterly_risk")
    if "{schedule}" in template or "_run}" in template:
        values["schedule"] = approved_schedule(env)
    if "{queued_run}" in template:
        values["queued_run"] = insert_run(env, values["schedule"], "queued")
    if "{running_run}" in template:
        values["running_run"] = insert_run(env, values["schedule"], "running")
    return template.format(**values)


def _headers(env: Env, route: Route, role: str) -> dict[str, str]:
    if role == "anonymous":
        return {}
    if role == "service":
        return env.service("scheduler")
    if route.console:
        return console_cookie(env, USERS[role])
    return env.auth(USERS[role])


def _form(env: Env, route: Route, headers: dict[str, str], institution: str) -> dict[str, str]:
    """Return the console form of ``route`` with the CSRF token of the session in ``headers``."""
    session_token = headers.get("Cookie", "=").split("=", 1)[1]
    if route.body == "console_schedule":
        approved_schedule(env)  # approves the quarterly notebook once
        form = {"name": f"表单权限表-{secrets.token_hex(4)}", "notebook_id": str(notebook_id(env, "quarterly_risk")),
                "cron": "30 7 * * 1-5", "recipients": "a@regulator.example", "enabled": "on"}
    else:
        form = {key: value.format(model=MODEL_OF[institution]) for key, value in route.body.items()}
    return {**form, "csrf_token": csrf_token(env.secrets.session_secret, session_token)}


ALL_MODELS = {"bank_a.scorecard", "bank_b.pd_model", "bank_c.lgd", "scratch_model"}


def _check_listed_models(route: Route, role: str, listing: Any) -> None:
    """A modeller of bank_a sees bank_a's models only; regulators and services see every model."""
    if route.console:
        listed_names = {name for name in ALL_MODELS if f"<td>{name}</td>" in listing}
    else:
        listed_names = {item["name"] for item in listing}
        if role == "modeller":
            assert {item["institution_code"] for item in listing} == {OWN}
    assert listed_names == ({MODEL_OF[OWN]} if role == "modeller" else ALL_MODELS)


CASES = [
    pytest.param(name, role, scope, id=f"{name}-{role}-{scope}")
    for name in ROUTES
    for role in ROLES
    for scope in ("own", "other")
]


@pytest.mark.parametrize(("route_name", "role", "scope"), CASES)
def test_route_permission(env: Env, route_name: str, role: str, scope: str) -> None:
    route = ROUTES[route_name]
    institution = OWN if scope == "own" else OTHER
    request_id = f"perm-{secrets.token_hex(8)}"
    headers = {**_headers(env, route, role), "X-Request-ID": request_id}

    path = _path(env, route.path, institution)
    if route.console and route.method == "POST":
        response = env.client.post(path, headers=headers, data=_form(env, route, headers, institution),
                                   follow_redirects=False)
    else:
        response = env.client.request(route.method, path, headers=headers, json=_body(env, route.body),
                                      follow_redirects=False)

    expected = expected_status(route, role, scope)
    assert response.status_code == expected, response.text
    assert response.headers["X-Request-ID"] == request_id
    if route.listed and expected == 200:
        _check_listed_models(route, role, response.text if route.console else response.json())
    if expected in (401, 403):
        if not route.console:
            assert set(response.json()) == {"code", "detail"}
        denials = [event for event in audit_events(env, request_id) if event.outcome == "denied"]
        assert len(denials) == 1
        assert denials[0].actor == (USERS.get(role) or ("service:scheduler" if role == "service" else "anonymous"))
        assert denials[0].source_ip == "testclient"


@pytest.mark.parametrize("username", ["modeller_a", "reporter_a"])
def test_institutions_list_own_only(env: Env, username: str) -> None:
    response = env.client.get("/api/v1/institutions", headers=env.auth(username))

    assert response.status_code == 200
    assert [item["code"] for item in response.json()] == ["bank_a"]


def test_institutions_list_regulator_all(env: Env) -> None:
    response = env.client.get("/api/v1/institutions", headers=env.auth("reviewer"))

    with env.db() as session:  # Other test modules add institutions to the shared database.
        stored = session.execute(select(Institution.code, Institution.name)).all()
    listed = [(item["code"], item["name"]) for item in response.json()]
    assert sorted(listed) == sorted(tuple(row) for row in stored)
    assert {("bank_a", "浦东示范银行甲"), ("bank_b", "浦东示范银行乙"), ("bank_c", "浦东示范银行丙")} <= set(listed)


def test_denial_detail_chinese(env: Env) -> None:
    response = env.client.post(
        "/api/v1/models/bank_a.scorecard/versions/1/review",
        headers=env.auth("modeller_a"),
        json={"decision": "approved", "comment": ""},
    )

    assert response.status_code == 403
    assert response.json() == {"code": "FORBIDDEN", "detail": "当前角色（建模人员）无权执行此操作：审查模型版本。"}
