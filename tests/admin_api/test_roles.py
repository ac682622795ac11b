"""Roles as data: built-in and custom roles, separation of the three administrators, institution administrators."""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import func, select

from admin_api.db import utc_now
from admin_api.models import Institution, Role, User
from admin_api.passwords import generate_password, set_password
from admin_api.security import csrf_token

from .conftest import Env
from .helpers import audit_events, console_cookie

BUILTIN = {
    "system_admin": "regulator", "security_admin": "regulator", "audit_admin": "regulator",
    "regulator_reviewer": "regulator", "regulator_analyst": "regulator", "data_steward": "regulator",
    "institution_admin": "institution", "modeller": "institution", "reporter": "institution",
}


def unique(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def create_role(env: Env, request_id: str | None = None, **fields):  # noqa: ANN003, ANN201
    body = {"code": unique("r"), "name": unique("角色"), "scope": "institution", "capabilities": ["me.read"],
            **fields}
    headers = {**env.auth("sysadmin"), **({"X-Request-ID": request_id} if request_id else {})}
    return env.client.post("/api/v1/roles", json=body, headers=headers)


def user_with_role(env: Env, role: str, institution_code: str | None) -> str:
    """Store an active user of ``role`` with a password that needs no change; return the name (password in env)."""
    username = unique("ru")
    password = generate_password(username, env.settings)
    with env.db() as session:
        institution_id = None
        if institution_code:
            institution_id = session.scalars(select(Institution.id).where(Institution.code == institution_code)).one()
        user = User(username=username, display_name="角色测试", email=f"{username}@roles.example", role=role,
                    institution_id=institution_id, password_hash="", is_active=True)
        session.add(user)
        session.flush()
        set_password(session, user, password, env.settings, must_change=False)
        session.commit()
    env.passwords[username] = password
    return username


def role_count(env: Env) -> int:
    with env.db() as session:
        return session.scalar(select(func.count()).select_from(Role)) or 0


def test_builtin_roles_listed(env: Env) -> None:
    response = env.client.get("/api/v1/roles", headers=env.auth("auditor"))

    assert response.status_code == 200
    listed = {item["code"]: item for item in response.json()}
    assert {code: listed[code]["scope"] for code in BUILTIN} == BUILTIN
    assert all(listed[code]["builtin"] for code in BUILTIN)
    assert listed["institution_admin"]["name"] == "机构管理员"
    assert listed["regulator_analyst"]["name"] == "监管分析员"
    assert "users.write" in listed["institution_admin"]["capabilities"]
    assert "audit.read" in listed["audit_admin"]["capabilities"]
    assert listed["modeller"]["users"] >= 3


def test_capabilities_listed(env: Env) -> None:
    response = env.client.get("/api/v1/capabilities", headers=env.auth("secadmin"))

    capabilities = {item["code"]: item for item in response.json()}
    assert capabilities["keys.operate"]["reserved_to"] == "security_admin"
    assert capabilities["audit.read"]["reserved_to"] == "audit_admin"
    assert capabilities["institutions.write"]["grantable_scopes"] == ["regulator"]
    assert capabilities["models.read"]["grantable_scopes"] == ["regulator", "institution"]
    assert capabilities["runs.work"]["grantable_scopes"] == []


def test_custom_role_grants_capabilities(env: Env) -> None:
    code = unique("viewer")
    created = create_role(env, code=code, name=unique("模型查看员"), capabilities=["me.read", "models.read"])
    assert created.status_code == 201, created.text
    username = user_with_role(env, code, "bank_a")

    models = env.client.get("/api/v1/models", headers=env.auth(username))
    users = env.client.get("/api/v1/users", headers=env.auth(username))

    assert models.status_code == 200
    assert {item["institution_code"] for item in models.json()} == {"bank_a"}
    assert users.status_code == 403
    assert users.json()["code"] == "FORBIDDEN"
    assert created.json()["name"] in users.json()["detail"]


def test_custom_role_change_applies_at_once(env: Env) -> None:
    code = unique("grow")
    assert create_role(env, code=code, capabilities=["me.read"]).status_code == 201
    username = user_with_role(env, code, "bank_b")
    assert env.client.get("/api/v1/models", headers=env.auth(username)).status_code == 403

    updated = env.client.patch(f"/api/v1/roles/{code}", headers=env.auth("sysadmin"),
                               json={"capabilities": ["me.read", "models.read"]})

    assert updated.status_code == 200, updated.text
    assert updated.json()["users"] == 1
    assert env.client.get("/api/v1/models", headers=env.auth(username)).status_code == 200


def test_custom_role_audited(env: Env) -> None:
    code = unique("audited")
    request_id = f"role-{code}"

    assert create_role(env, request_id, code=code).status_code == 201

    events = audit_events(env, request_id)
    assert [(event.action, event.outcome, event.resource) for event in events] == [
        ("roles.create", "success", f"role:{code}")]


def test_institution_role_rejects_regulator_capability(env: Env) -> None:
    before = role_count(env)
    request_id = f"role-bad-{secrets.token_hex(4)}"

    response = create_role(env, request_id, capabilities=["me.read", "institutions.write"])

    assert response.status_code == 422
    assert response.json()["code"] == "ROLE_CAPABILITY_INVALID"
    assert "institutions.write" in response.json()["detail"]
    assert role_count(env) == before
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("roles.create", "failed")]


def test_service_capability_not_grantable(env: Env) -> None:
    response = create_role(env, scope="regulator", capabilities=["audit.append"])

    assert response.status_code == 422
    assert response.json()["code"] == "ROLE_CAPABILITY_INVALID"


def test_role_combining_two_admins_rejected(env: Env) -> None:
    before = role_count(env)

    response = create_role(env, scope="regulator", capabilities=["users.write", "audit.read"])

    assert response.status_code == 409
    assert response.json()["code"] == "ROLE_SEPARATION_OF_DUTIES"
    assert "系统管理员" in response.json()["detail"]
    assert "审计管理员" in response.json()["detail"]
    assert role_count(env) == before


def test_role_one_admin_duty_allowed(env: Env) -> None:
    response = create_role(env, scope="regulator", capabilities=["institutions.read", "institutions.write"])

    assert response.status_code == 201, response.text


def test_bad_role_fields_rejected(env: Env) -> None:
    cases = [
        ({"code": "Bad-Code"}, 422, "ROLE_CODE_INVALID"),
        ({"code": "system_admin"}, 409, "ROLE_EXISTS"),
        ({"name": "系统管理员"}, 409, "ROLE_NAME_EXISTS"),
        ({"scope": "global"}, 422, "ROLE_SCOPE_INVALID"),
        ({"name": " "}, 422, "ROLE_NAME_INVALID"),
        ({"capabilities": ["no.such"]}, 422, "ROLE_CAPABILITY_INVALID"),
    ]
    before = role_count(env)
    for fields, status, code in cases:
        response = create_role(env, **fields)
        assert response.status_code == status, (fields, response.text)
        assert response.json()["code"] == code
    assert role_count(env) == before


def test_builtin_role_immutable(env: Env) -> None:
    patched = env.client.patch("/api/v1/roles/system_admin", headers=env.auth("sysadmin"),
                               json={"capabilities": ["me.read"]})
    deleted = env.client.delete("/api/v1/roles/modeller", headers=env.auth("sysadmin"))

    assert patched.status_code == 409
    assert patched.json()["code"] == "ROLE_BUILTIN_IMMUTABLE"
    assert deleted.status_code == 409
    assert deleted.json()["code"] == "ROLE_BUILTIN_IMMUTABLE"


def test_role_in_use_not_deleted(env: Env) -> None:
    code = unique("used")
    assert create_role(env, code=code).status_code == 201
    user_with_role(env, code, "bank_a")

    response = env.client.delete(f"/api/v1/roles/{code}", headers=env.auth("sysadmin"))

    assert response.status_code == 409
    assert response.json()["code"] == "ROLE_IN_USE"
    assert env.client.get(f"/api/v1/roles/{code}", headers=env.auth("sysadmin")).status_code == 200


def test_unused_role_deleted(env: Env) -> None:
    code = unique("gone")
    assert create_role(env, code=code).status_code == 201

    response = env.client.delete(f"/api/v1/roles/{code}", headers=env.auth("sysadmin"))

    assert response.status_code == 204
    missing = env.client.get(f"/api/v1/roles/{code}", headers=env.auth("sysadmin"))
    assert missing.status_code == 404
    assert missing.json()["code"] == "ROLE_NOT_FOUND"


def test_held_role_duty_change_rejected(env: Env) -> None:
    code = unique("instwriter")
    assert create_role(env, code=code, scope="regulator", capabilities=["institutions.write"]).status_code == 201
    user_with_role(env, code, None)

    response = env.client.patch(f"/api/v1/roles/{code}", headers=env.auth("sysadmin"),
                                json={"capabilities": ["keys.read", "keys.operate"]})

    assert response.status_code == 409
    assert response.json()["code"] == "ROLE_DUTY_CHANGE_FORBIDDEN"


def test_user_moves_between_admin_duties_rejected(env: Env) -> None:
    code = unique("keyop")
    assert create_role(env, code=code, scope="regulator", capabilities=["keys.read", "keys.operate"]).status_code == 201
    username = user_with_role(env, "system_admin", None)

    response = env.client.patch(f"/api/v1/users/{username}", headers=env.auth("sysadmin"), json={"role": code})

    assert response.status_code == 409
    assert response.json()["code"] == "ADMIN_ROLE_CHANGE_FORBIDDEN"


def test_custom_regulator_role_requires_totp(env: Env) -> None:
    code = unique("regview")
    assert create_role(env, code=code, scope="regulator", capabilities=["me.read"]).status_code == 201
    username = user_with_role(env, code, None)

    response = env.client.post("/api/v1/auth/token",
                               json={"username": username, "password": env.passwords[username]})

    assert response.status_code == 403
    assert response.json()["code"] == "TOTP_ENROLMENT_REQUIRED"


def test_custom_role_user_needs_matching_institution(env: Env) -> None:
    code = unique("instrole")
    assert create_role(env, code=code).status_code == 201

    without = env.client.post("/api/v1/users", headers=env.auth("sysadmin"), json={
        "username": unique("nu"), "display_name": "无机构", "email": "x@bank-a.example", "role": code})

    assert without.status_code == 422
    assert without.json()["code"] == "INSTITUTION_REQUIRED"


def test_roles_write_denied_to_security_admin(env: Env) -> None:
    request_id = f"role-deny-{secrets.token_hex(4)}"
    headers = {**env.auth("secadmin"), "X-Request-ID": request_id}

    response = env.client.post("/api/v1/roles", headers=headers, json={
        "code": unique("x"), "name": unique("x"), "scope": "regulator", "capabilities": ["me.read"]})

    assert response.status_code == 403
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("roles.write", "denied")]


# ---- institution administrators -------------------------------------------------------------------------------


def test_institution_admin_lists_own_users(env: Env) -> None:
    response = env.client.get("/api/v1/users?limit=1000", headers=env.auth("instadmin_a"))
    other = env.client.get("/api/v1/users?institution_code=bank_b", headers=env.auth("instadmin_a"))

    assert response.status_code == 200
    assert {item["institution_code"] for item in response.json()} == {"bank_a"}
    assert int(response.headers["X-Total-Count"]) == len(response.json())
    assert other.json() == []
    assert other.headers["X-Total-Count"] == "0"


def test_institution_admin_creates_own_user(env: Env) -> None:
    username = unique("ia")

    response = env.client.post("/api/v1/users", headers=env.auth("instadmin_a"), json={
        "username": username, "display_name": "甲行新人", "email": "new@bank-a.example", "role": "modeller"})

    assert response.status_code == 201, response.text
    assert response.json()["user"]["institution_code"] == "bank_a"


def test_institution_admin_other_institution_denied(env: Env) -> None:
    username = unique("ib")
    request_id = f"ia-other-{username}"
    headers = {**env.auth("instadmin_a"), "X-Request-ID": request_id}

    response = env.client.post("/api/v1/users", headers=headers, json={
        "username": username, "display_name": "乙行新人", "email": "new@bank-b.example", "role": "modeller",
        "institution_code": "bank_b"})

    assert response.status_code == 403
    assert response.json()["code"] == "INSTITUTION_FORBIDDEN"
    with env.db() as session:
        assert session.scalars(select(User).where(User.username == username)).first() is None
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("users.create", "denied")]


def test_institution_admin_cannot_grant_admin_roles(env: Env) -> None:
    for role in ("institution_admin", "system_admin", "regulator_reviewer"):
        response = env.client.post("/api/v1/users", headers=env.auth("instadmin_a"), json={
            "username": unique("ic"), "display_name": "越权", "email": "x@bank-a.example", "role": role})
        assert response.status_code == 403, role
        assert response.json()["code"] == "ROLE_NOT_ASSIGNABLE"


def test_institution_admin_manages_only_own(env: Env) -> None:
    own = user_with_role(env, "reporter", "bank_a")
    other = user_with_role(env, "reporter", "bank_b")

    disabled = env.client.post(f"/api/v1/users/{own}/disable", headers=env.auth("instadmin_a"))
    denied = env.client.post(f"/api/v1/users/{other}/disable", headers=env.auth("instadmin_a"))
    moved = env.client.patch(f"/api/v1/users/{own}", headers=env.auth("instadmin_a"),
                             json={"institution_code": "bank_b"})

    assert disabled.status_code == 200
    assert disabled.json()["is_active"] is False
    assert denied.status_code == 403
    assert denied.json()["code"] == "INSTITUTION_FORBIDDEN"
    assert moved.status_code == 403
    assert moved.json()["code"] == "INSTITUTION_FORBIDDEN"
    with env.db() as session:
        assert session.scalars(select(User.is_active).where(User.username == other)).one() is True


# ---- paging of GET /users ------------------------------------------------------------------------------------


def test_users_paged(env: Env) -> None:
    first = env.client.get("/api/v1/users?limit=3&offset=0", headers=env.service("hub"))
    second = env.client.get("/api/v1/users?limit=3&offset=3", headers=env.service("hub"))

    total = int(first.headers["X-Total-Count"])
    assert total >= 12
    assert len(first.json()) == 3
    names = [item["username"] for item in first.json() + second.json()]
    assert names == sorted(names)
    assert len(set(names)) == 6


def test_users_filtered(env: Env) -> None:
    response = env.client.get("/api/v1/users?role=modeller&institution_code=bank_b&active=true",
                              headers=env.auth("sysadmin"))

    assert {item["username"] for item in response.json()} >= {"modeller_b"}
    assert {(item["role"], item["institution_code"]) for item in response.json()} == {("modeller", "bank_b")}


def test_users_updated_since(env: Env) -> None:
    since = utc_now() - timedelta(seconds=1)
    username = user_with_role(env, "reporter", "bank_c")

    response = env.client.get("/api/v1/users", params={"updated_since": since.isoformat()},
                              headers=env.service("registry"))

    assert username in {item["username"] for item in response.json()}
    assert "sysadmin" not in {item["username"] for item in response.json()}


def test_users_updated_since_needs_timezone(env: Env) -> None:
    response = env.client.get("/api/v1/users?updated_since=2026-12-05T08:00:00", headers=env.service("hub"))

    assert response.status_code == 422
    assert response.json()["code"] == "UPDATED_SINCE_TIMEZONE_MISSING"


def test_users_limit_bounded(env: Env) -> None:
    response = env.client.get("/api/v1/users?limit=5000", headers=env.service("hub"))

    assert response.status_code == 422


# ---- console page --------------------------------------------------------------------------------------------


def test_console_roles_read_only_for_auditor(env: Env) -> None:
    page = env.client.get("/console/roles", headers=console_cookie(env, "auditor"))

    assert page.status_code == 200
    assert "机构管理员" in page.text
    assert 'id="role-create"' not in page.text
    assert "您的角色只能查看角色和权限" in page.text


def test_console_roles_denied_to_institution_admin(env: Env) -> None:
    page = env.client.get("/console/roles", headers=console_cookie(env, "instadmin_a"))

    assert page.status_code == 403


def test_console_role_create_form(env: Env) -> None:
    headers = console_cookie(env, "sysadmin")
    session_token = headers["Cookie"].split("=", 1)[1]
    code = unique("form")
    form = {"code": code, "name": unique("表单角色"), "scope": "institution", "description": "表单新建",
            "capabilities": ["me.read", "models.read"], "csrf_token": csrf_token(env.secrets.session_secret,
                                                                               session_token)}

    created = env.client.post("/console/roles", headers=headers, data=form, follow_redirects=False)
    bad = env.client.post("/console/roles", headers=headers, follow_redirects=False,
                          data={**form, "code": unique("bad"), "name": unique("坏"), "capabilities": ["keys.operate"]})

    assert created.status_code == 303
    page = env.client.get(created.headers["location"], headers=headers)
    assert f"已新建角色 {code}。" in page.text
    assert f'id="role-{code}"' in page.text
    assert bad.status_code == 422
    assert "keys.operate" in bad.text


def test_console_users_scoped_for_institution_admin(env: Env) -> None:
    page = env.client.get("/console/users", headers=console_cookie(env, "instadmin_a"))

    assert page.status_code == 200
    assert "modeller_a" in page.text
    assert "modeller_b" not in page.text
    assert '<option value="system_admin"' not in page.text
