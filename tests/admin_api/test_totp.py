"""TOTP second factor: enrolment, confirmation, sign-in with a code, replay, required roles, reset."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from sqlalchemy import select, update

from admin_api.models import User

from .conftest import Env
from .helpers import audit_events
from .test_passwords import make_user, sign_in, user_row

STEP = 30


def code_at(secret: str, steps_ahead: int = 0) -> str:
    """Return the code of the current step plus ``steps_ahead``; the server accepts one step of drift."""
    return pyotp.TOTP(secret).at(int(time.time()) + steps_ahead * STEP)


def token_request(env: Env, username: str, password: str, code: str | None, request_id: str | None = None):  # noqa: ANN201
    headers = {"X-Request-ID": request_id} if request_id else {}
    return env.client.post("/api/v1/auth/token", headers=headers,
                           json={"username": username, "password": password, "totp": code})


def enrol(env: Env, username: str, password: str) -> str:
    response = env.client.post("/api/v1/auth/totp/enrol", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return response.json()["secret"]


def confirm(env: Env, username: str, password: str, code: str, request_id: str | None = None):  # noqa: ANN201
    headers = {"X-Request-ID": request_id} if request_id else {}
    return env.client.post("/api/v1/auth/totp/confirm", headers=headers,
                           json={"username": username, "password": password, "code": code})


def enrolled_user(env: Env, role: str = "regulator_reviewer") -> tuple[str, str, str]:
    """Create a user with a confirmed secret (the current step's code is used up); return (name, password, secret)."""
    username, password = make_user(env, role=role)
    secret = enrol(env, username, password)
    assert confirm(env, username, password, code_at(secret)).status_code == 204
    return username, password, secret


@pytest.fixture
def totp_required(env: Env) -> Iterator[None]:
    """Switch on the default TOTP requirement for the test, as outside the test fixtures."""
    env.token("sysadmin")  # an administrator token issued before the switch, for tests that create users
    original = env.client.app.state.settings
    env.client.app.state.settings = original.model_copy(
        update={"totp_required_roles": ["system_admin", "security_admin", "audit_admin", "regulator_reviewer"]}
    )
    try:
        yield
    finally:
        env.client.app.state.settings = original


def test_enrol_returns_secret_once(env: Env) -> None:
    username, password = make_user(env)
    request_id = f"enrol-{username}"

    response = env.client.post("/api/v1/auth/totp/enrol", headers={"X-Request-ID": request_id},
                               json={"username": username, "password": password})

    assert response.status_code == 200
    body = response.json()
    uri = urlsplit(body["otpauth_uri"])
    assert uri.scheme == "otpauth"
    assert uri.netloc == "totp"
    assert parse_qs(uri.query)["secret"] == [body["secret"]]
    assert parse_qs(uri.query)["issuer"] == ["regsandbox"]
    assert len(body["secret"]) == 32
    row = user_row(env, username)
    assert body["secret"] not in row.totp_secret
    assert row.totp_key_version is not None
    assert row.totp_enabled_at is None
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("auth.totp_enrol", "success")]
    assert sign_in(env, username, password).status_code == 200  # pending: no code needed yet


def test_enrol_wrong_password_rejected(env: Env) -> None:
    username, password = make_user(env)

    response = env.client.post("/api/v1/auth/totp/enrol", json={"username": username, "password": password + "x"})

    assert response.status_code == 401
    assert user_row(env, username).totp_secret is None


def test_confirm_wrong_code_audited(env: Env) -> None:
    username, password = make_user(env)
    secret = enrol(env, username, password)
    wrong = "000000" if code_at(secret) != "000000" else "111111"
    request_id = f"confirm-wrong-{username}"

    response = confirm(env, username, password, wrong, request_id)

    assert response.status_code == 401
    assert response.json()["code"] == "TOTP_INVALID"
    assert "6 位数字" in response.json()["detail"]
    assert user_row(env, username).totp_enabled_at is None
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("auth.totp_confirm", "failed")]


def test_sign_in_needs_code(env: Env) -> None:
    username, password, secret = enrolled_user(env)
    request_id = f"totp-wrong-{username}"
    current = code_at(secret)
    wrong = "000000" if current != "000000" else "111111"

    missing = token_request(env, username, password, None)
    bad = token_request(env, username, password, wrong, request_id)
    good = token_request(env, username, password, code_at(secret, 1))

    assert missing.status_code == 401
    assert missing.json()["code"] == "TOTP_REQUIRED"
    assert "字段 totp" in missing.json()["detail"]
    assert bad.status_code == 401
    assert bad.json()["code"] == "TOTP_INVALID"
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("auth.token", "failed")]
    assert good.status_code == 200, good.text
    assert user_row(env, username).failed_sign_ins == 0


def test_wrong_codes_lock_account(env: Env) -> None:
    username, password, secret = enrolled_user(env)
    wrong = "000000" if code_at(secret) != "000000" else "111111"
    for _ in range(5):
        assert token_request(env, username, password, wrong).json()["code"] == "TOTP_INVALID"

    locked = token_request(env, username, password, code_at(secret, 1))

    assert locked.status_code == 429
    assert locked.json()["code"] == "ACCOUNT_LOCKED"


def test_reused_code_rejected(env: Env) -> None:
    username, password, secret = enrolled_user(env)
    code = code_at(secret, 1)

    first = token_request(env, username, password, code)
    again = token_request(env, username, password, code)
    older = token_request(env, username, password, code_at(secret))

    assert first.status_code == 200
    assert again.status_code == 401
    assert again.json()["code"] == "TOTP_REUSED"
    assert "下一个验证码" in again.json()["detail"]
    assert older.json()["code"] == "TOTP_REUSED"


def test_required_role_must_enrol(env: Env, totp_required: None) -> None:
    username, password = make_user(env, role="audit_admin")
    modeller, modeller_password = make_user(env, role="reporter")
    request_id = f"must-enrol-{username}"

    refused = token_request(env, username, password, None, request_id)
    other_role = sign_in(env, modeller, modeller_password)
    secret = enrol(env, username, password)
    confirmed = confirm(env, username, password, code_at(secret))
    signed_in = token_request(env, username, password, code_at(secret, 1))

    assert refused.status_code == 403
    assert refused.json()["code"] == "TOTP_ENROLMENT_REQUIRED"
    assert "审计管理员必须使用动态验证码登录" in refused.json()["detail"]
    assert "/api/v1/auth/totp/enrol" in refused.json()["detail"]
    assert [e.outcome for e in audit_events(env, request_id)] == ["denied"]
    assert other_role.status_code == 200
    assert confirmed.status_code == 204
    assert signed_in.status_code == 200


def test_required_role_changes_password_first(env: Env, totp_required: None) -> None:
    username = f"tt_{int(time.time() * 1000) % 10**8}"
    created = env.client.post("/api/v1/users", headers=env.auth("sysadmin"), json={
        "username": username, "display_name": "新审查员", "email": "new@regulator.example",
        "role": "regulator_reviewer"})
    one_time = created.json()["password"]
    new = "Review-Quarter-2026!"

    enrol_first = env.client.post("/api/v1/auth/totp/enrol", json={"username": username, "password": one_time})
    changed = env.client.post("/api/v1/auth/password", json={
        "username": username, "old_password": one_time, "new_password": new})
    secret = enrol(env, username, new)

    assert enrol_first.status_code == 403
    assert enrol_first.json()["code"] == "PASSWORD_CHANGE_REQUIRED"
    assert changed.status_code == 204
    assert confirm(env, username, new, code_at(secret)).status_code == 204


def test_enrolled_change_password_needs_code(env: Env) -> None:
    username, password, secret = enrolled_user(env)
    body = {"username": username, "old_password": password, "new_password": "Another-Strong-2026"}

    without = env.client.post("/api/v1/auth/password", json=body)
    with_code = env.client.post("/api/v1/auth/password", json={**body, "totp": code_at(secret, 1)})

    assert without.status_code == 401
    assert without.json()["code"] == "TOTP_REQUIRED"
    assert with_code.status_code == 204


def test_already_enrolled_then_reset(env: Env) -> None:
    username, password, _secret = enrolled_user(env)

    again = env.client.post("/api/v1/auth/totp/enrol", json={"username": username, "password": password})
    denied = env.client.post(f"/api/v1/users/{username}/totp/reset", headers=env.auth("reporter_a"))
    request_id = f"totp-reset-{username}"
    reset = env.client.post(f"/api/v1/users/{username}/totp/reset",
                            headers={**env.auth("sysadmin"), "X-Request-ID": request_id})

    assert again.status_code == 409
    assert again.json()["code"] == "TOTP_ALREADY_ENROLLED"
    assert "联系系统管理员重置" in again.json()["detail"]
    assert denied.status_code == 403
    assert reset.status_code == 200
    assert reset.json()["totp_enrolled"] is False
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("users.totp_reset", "success")]
    assert sign_in(env, username, password).status_code == 200
    assert enrol(env, username, password)


def test_secret_bound_to_user(env: Env) -> None:
    first, _first_password, secret = enrolled_user(env)
    second, second_password = make_user(env)
    source = user_row(env, first)
    with env.db() as session:
        session.execute(update(User).where(User.username == second).values(
            totp_secret=source.totp_secret, totp_key_version=source.totp_key_version,
            totp_enabled_at=source.totp_enabled_at))
        session.commit()

    response = token_request(env, second, second_password, code_at(secret, 1))

    assert response.status_code == 409
    assert response.json()["code"] == "TOTP_SECRET_UNREADABLE"


def _login_csrf(env: Env, path: str) -> str:
    page = env.client.get(path)
    return page.cookies.get("regsandbox_login_csrf") or env.client.cookies.get("regsandbox_login_csrf")


def test_console_login_with_code(env: Env) -> None:
    username, password, secret = enrolled_user(env)
    wrong = "000000" if code_at(secret, 1) != "000000" else "111111"

    refused = env.client.post("/console/login", follow_redirects=False, data={
        "username": username, "password": password, "totp": wrong, "csrf_token": _login_csrf(env, "/console/login")})
    accepted = env.client.post("/console/login", follow_redirects=False, data={
        "username": username, "password": password, "totp": code_at(secret, 1),
        "csrf_token": _login_csrf(env, "/console/login")})

    assert refused.status_code == 401
    assert "动态验证码错误" in refused.text
    assert accepted.status_code == 303
    assert accepted.headers["location"] == "/console/"


def test_console_enrolment_pages(env: Env, totp_required: None) -> None:
    username, password = make_user(env, role="security_admin")

    started = env.client.post("/console/totp/enrol", data={
        "username": username, "password": password, "csrf_token": _login_csrf(env, "/console/totp")})
    secret = started.text.split('<code id="totp-secret">')[1].split("</code>")[0]
    csrf = started.cookies.get("regsandbox_login_csrf") or env.client.cookies.get("regsandbox_login_csrf")
    confirmed = env.client.post("/console/totp/confirm", data={
        "username": username, "password": password, "code": code_at(secret), "csrf_token": csrf})
    forged = env.client.post("/console/totp/enrol", data={"username": username, "password": password,
                                                          "csrf_token": "forged"})

    assert started.status_code == 200
    assert "仅显示这一次" in started.text
    assert confirmed.status_code == 200
    assert "已绑定动态验证码" in confirmed.text
    assert forged.status_code == 403
    with env.db() as session:
        assert session.scalars(select(User.totp_enabled_at).where(User.username == username)).one() is not None
    assert token_request(env, username, password, code_at(secret, 1)).status_code == 200
