"""User management API: create, edit, disable and enable, unlock, reset password, and its denials."""

from __future__ import annotations

import json
import secrets

import pytest
from sqlalchemy import select

from admin_api.db import utc_now
from admin_api.models import ApiToken, User
from admin_api.passwords import check_strength, generate_password
from admin_api.security import token_digest

from .conftest import Env
from .helpers import audit_events, console_cookie, tokens_of
from .test_passwords import change, make_user, sign_in


def new_name(prefix: str = "u") -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def create(env: Env, request_id: str | None = None, **fields):  # noqa: ANN003, ANN201
    headers = {**env.auth("sysadmin"), **({"X-Request-ID": request_id} if request_id else {})}
    body = {"username": new_name(), "display_name": "新用户", "email": "new@bank-a.example", "role": "reporter",
            "institution_code": "bank_a", **fields}
    return env.client.post("/api/v1/users", json=body, headers=headers)


def patch(env: Env, username: str, request_id: str | None = None, **fields):  # noqa: ANN003, ANN201
    headers = {**env.auth("sysadmin"), **({"X-Request-ID": request_id} if request_id else {})}
    return env.client.patch(f"/api/v1/users/{username}", json=fields, headers=headers)


def post(env: Env, username: str, operation: str, request_id: str | None = None):  # noqa: ANN201
    headers = {**env.auth("sysadmin"), **({"X-Request-ID": request_id} if request_id else {})}
    return env.client.post(f"/api/v1/users/{username}/{operation}", headers=headers)


def test_create_generated_password_shown_once(env: Env) -> None:
    username = new_name()
    request_id = f"create-{username}"

    response = create(env, request_id, username=username)

    assert response.status_code == 201, response.text
    body = response.json()
    password = body["password"]
    check_strength(password, username, env.settings)
    assert body["user"]["must_change_password"] is True
    assert body["user"]["institution_code"] == "bank_a"
    detail = env.client.get(f"/api/v1/users/{username}", headers=env.auth("sysadmin")).json()
    assert "password" not in detail
    events = audit_events(env, request_id)
    assert [(e.action, e.outcome) for e in events] == [("users.create", "success")]
    assert password not in events[0].detail
    listed = env.client.get("/api/v1/users", params={"q": username}, headers=env.auth("sysadmin")).json()
    assert username in {item["username"] for item in listed}


def test_created_user_must_change_password(env: Env) -> None:
    username = new_name()
    password = create(env, username=username).json()["password"]

    first = sign_in(env, username, password)
    new = generate_password(username, env.settings)
    changed = change(env, username, password, new)

    assert first.status_code == 403
    assert first.json()["code"] == "PASSWORD_CHANGE_REQUIRED"
    assert "首次使用前必须修改" in first.json()["detail"]
    assert changed.status_code == 204
    assert sign_in(env, username, new).status_code == 200


def test_create_with_given_password_checked(env: Env) -> None:
    username = new_name()
    request_id = f"weak-create-{username}"

    weak = create(env, request_id, username=username, password="Short-1")
    good = create(env, username=username, password="Quarterly-Risk-2026")

    assert weak.status_code == 422
    assert weak.json()["code"] == "PASSWORD_TOO_SHORT"
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("users.create", "failed")]
    assert good.status_code == 201
    assert good.json()["password"] is None
    assert sign_in(env, username, "Quarterly-Risk-2026").json()["code"] == "PASSWORD_CHANGE_REQUIRED"


@pytest.mark.parametrize(
    ("fields", "status", "code", "fragment"),
    [
        ({"role": "modeller", "institution_code": None}, 422, "INSTITUTION_REQUIRED", "必须属于一个机构"),
        ({"role": "regulator_reviewer", "institution_code": "bank_a"}, 422, "INSTITUTION_NOT_ALLOWED", "不能属于机构 bank_a"),
        ({"institution_code": "bank_zz"}, 422, "INSTITUTION_NOT_FOUND", "机构代码 bank_zz 不存在"),
        ({"role": "root"}, 422, "ROLE_INVALID", "角色 'root' 无效"),
        ({"username": "Bad Name"}, 422, "USERNAME_INVALID", "用户名 'Bad Name' 无效"),
        ({"username": "sysadmin"}, 409, "USER_EXISTS", "用户名 sysadmin 已被使用"),
        ({"email": "not-an-email"}, 422, "EMAIL_INVALID", "'not-an-email' 格式无效"),
        ({"display_name": "  "}, 422, "DISPLAY_NAME_MISSING", "姓名（display_name）不能为空"),
    ],
)
def test_create_rejections(env: Env, fields: dict, status: int, code: str, fragment: str) -> None:
    response = create(env, **fields)

    assert response.status_code == status
    assert response.json()["code"] == code
    assert fragment in response.json()["detail"]


def test_create_rejected_writes_nothing(env: Env) -> None:
    username = new_name()

    create(env, username=username, role="modeller", institution_code=None)

    with env.db() as session:
        assert session.scalars(select(User).where(User.username == username)).first() is None


def test_reporter_cannot_write_users(env: Env) -> None:
    request_id = f"reporter-create-{secrets.token_hex(4)}"
    headers = {**env.auth("reporter_a"), "X-Request-ID": request_id}

    response = env.client.post("/api/v1/users", headers=headers, json={
        "username": new_name(), "display_name": "x", "email": "x@bank-a.example", "role": "reporter",
        "institution_code": "bank_a"})
    disable = env.client.post("/api/v1/users/modeller_a/disable", headers=env.auth("reporter_a"))

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"
    assert "管理用户账号" in response.json()["detail"]
    assert disable.status_code == 403
    events = audit_events(env, request_id)
    assert [(e.actor, e.action, e.outcome) for e in events] == [("reporter_a", "users.write", "denied")]


@pytest.mark.parametrize("username", ["secadmin", "auditor", "reviewer"])
def test_other_roles_cannot_write_users(env: Env, username: str) -> None:
    response = env.client.post("/api/v1/users/modeller_a/unlock", headers=env.auth(username))

    assert response.status_code == 403


def test_expired_token_rejected(env: Env) -> None:
    username, password = make_user(env)
    token = sign_in(env, username, password).json()["access_token"]
    with env.db() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.token_sm3 == token_digest(token))).one()
        row.expires_at = utc_now()
        session.commit()

    response = env.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_TOKEN"


def test_edit_contact_and_role(env: Env) -> None:
    username = create(env, role="modeller", institution_code="bank_b").json()["user"]["username"]
    request_id = f"edit-{username}"

    edited = patch(env, username, request_id, display_name="改名后", email="renamed@bank-b.example", role="reporter")
    to_regulator = patch(env, username, role="regulator_reviewer", institution_code=None)

    assert edited.status_code == 200, edited.text
    assert edited.json()["display_name"] == "改名后"
    assert edited.json()["role"] == "reporter"
    assert edited.json()["institution_code"] == "bank_b"
    changes = json.loads(audit_events(env, request_id)[0].detail)["changes"]
    assert changes["role"] == {"from": "modeller", "to": "reporter"}
    assert to_regulator.status_code == 200
    assert to_regulator.json()["institution_code"] is None


def test_edit_institution_rules(env: Env) -> None:
    username = create(env).json()["user"]["username"]

    regulator_with_bank = patch(env, username, role="regulator_reviewer")
    unknown = patch(env, username, institution_code="bank_zz")

    assert regulator_with_bank.status_code == 422
    assert regulator_with_bank.json()["code"] == "INSTITUTION_NOT_ALLOWED"
    assert unknown.status_code == 422
    assert unknown.json()["code"] == "INSTITUTION_NOT_FOUND"


@pytest.mark.parametrize(
    ("start", "target"),
    [("security_admin", "audit_admin"), ("audit_admin", "system_admin"), ("system_admin", "security_admin")],
)
def test_admin_role_change_rejected(env: Env, start: str, target: str) -> None:
    username = create(env, role=start, institution_code=None).json()["user"]["username"]
    request_id = f"admin-role-{username}"

    response = patch(env, username, request_id, role=target)

    assert response.status_code == 409
    assert response.json()["code"] == "ADMIN_ROLE_CHANGE_FORBIDDEN"
    assert "必须由不同账号担任" in response.json()["detail"]
    assert "新建用户" in response.json()["detail"]
    assert env.client.get(f"/api/v1/users/{username}", headers=env.auth("sysadmin")).json()["role"] == start
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("users.update", "failed")]


def test_admin_role_to_other_role_allowed(env: Env) -> None:
    username = create(env, role="audit_admin", institution_code=None).json()["user"]["username"]

    response = patch(env, username, role="regulator_reviewer")

    assert response.status_code == 200
    assert response.json()["role"] == "regulator_reviewer"


def test_own_role_and_account_protected(env: Env) -> None:
    role = patch(env, "sysadmin", role="regulator_reviewer")
    disable = post(env, "sysadmin", "disable")

    assert role.status_code == 409
    assert disable.status_code == 409
    assert disable.json()["code"] == "OWN_ACCOUNT_DISABLE_FORBIDDEN"


def test_disable_revokes_tokens_at_once(env: Env) -> None:
    username, password = make_user(env)
    token = sign_in(env, username, password).json()["access_token"]
    cookie = console_cookie(env, username)
    bearer = {"Authorization": f"Bearer {token}"}
    assert env.client.get("/api/v1/me", headers=bearer).status_code == 200
    request_id = f"disable-{username}"

    disabled = post(env, username, "disable", request_id)

    assert disabled.status_code == 200
    assert disabled.json()["is_active"] is False
    assert env.client.get("/api/v1/me", headers=bearer).status_code == 401
    assert env.client.get("/console/", headers=cookie, follow_redirects=False).status_code == 303
    assert all(row.revoked_at is not None for row in tokens_of(env, username))
    events = audit_events(env, request_id)
    assert [(e.action, e.outcome) for e in events] == [("users.disable", "success")]
    assert json.loads(events[0].detail)["revoked_tokens"] == 2
    assert sign_in(env, username, password).json()["code"] == "USER_DISABLED"

    enabled = post(env, username, "enable")
    assert enabled.json()["is_active"] is True
    assert env.client.get("/api/v1/me", headers=bearer).status_code == 401
    assert sign_in(env, username, password).status_code == 200


def test_unlock_lifts_lockout(env: Env) -> None:
    username, password = make_user(env)
    for attempt in range(5):
        sign_in(env, username, f"wrong-{attempt}")
    assert sign_in(env, username, password).status_code == 429
    request_id = f"unlock-{username}"

    unlocked = post(env, username, "unlock", request_id)

    assert unlocked.status_code == 200
    assert unlocked.json()["locked_until"] is None
    assert sign_in(env, username, password).status_code == 200
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("users.unlock", "success")]


def test_reset_password_one_time(env: Env) -> None:
    username, password = make_user(env)
    token = sign_in(env, username, password).json()["access_token"]
    request_id = f"reset-{username}"

    reset = post(env, username, "reset-password", request_id)

    assert reset.status_code == 200
    one_time = reset.json()["password"]
    check_strength(one_time, username, env.settings)
    assert reset.json()["user"]["must_change_password"] is True
    assert env.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert sign_in(env, username, password).status_code == 401
    assert sign_in(env, username, one_time).json()["code"] == "PASSWORD_CHANGE_REQUIRED"
    new = generate_password(username, env.settings)
    assert change(env, username, one_time, new).status_code == 204
    assert sign_in(env, username, new).status_code == 200
    events = audit_events(env, request_id)
    assert [(e.action, e.outcome) for e in events] == [("users.reset_password", "success")]
    assert one_time not in (events[0].detail or "")


def test_unknown_user_not_found(env: Env) -> None:
    for response in (post(env, "nobody_here", "disable"), patch(env, "nobody_here", display_name="x"),
                     env.client.get("/api/v1/users/nobody_here", headers=env.auth("sysadmin"))):
        assert response.status_code == 404
        assert response.json()["code"] == "USER_NOT_FOUND"


def test_search_literal_case_insensitive(env: Env) -> None:
    """``q`` is a literal substring of the user name or display name: no SQL, no LIKE wildcards, any ASCII case."""
    marker = secrets.token_hex(3)
    plain = create(env, username=f"srch_{marker}_a1", display_name="张三").json()["user"]["username"]
    underscored = create(env, username=f"srch{marker}xa2", display_name=f"李%四{marker}").json()["user"]["username"]

    def found(text: str) -> set[str]:
        response = env.client.get("/api/v1/users", params={"q": text}, headers=env.auth("sysadmin"))
        assert response.status_code == 200, response.text
        return {item["username"] for item in response.json()}

    assert found(f"SRCH_{marker.upper()}") == {plain}
    assert found(f"srch{marker}") == {underscored}
    assert found(f"{marker}_a") == {plain}  # "_" is not "any character", so srch<marker>xa2 does not match
    assert found(f"%四{marker}") == {underscored}
    assert found(f"{marker}%") == set()
    assert found(f"' OR '1'='1 {marker}") == set()
