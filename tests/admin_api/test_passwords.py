"""Password policy, history, expiry, lockout and the self-service password change."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select, update

from admin_api.db import utc_now
from admin_api.errors import ApiError
from admin_api.models import ApiToken, PasswordHistory, User
from admin_api.passwords import check_strength, generate_password, set_password
from admin_api.security import hash_one_time_password, token_digest, verify_password
from regsandbox_core.settings import Settings

from .conftest import Env
from .helpers import audit_events, console_cookie

SETTINGS = Settings()


def make_user(env: Env, *, role: str = "regulator_reviewer") -> tuple[str, str]:
    """Create an active user with a policy-compliant password that needs no change; return (name, password)."""
    username = f"pw_{secrets.token_hex(4)}"
    password = generate_password(username, env.settings)
    with env.db() as session:
        user = User(username=username, display_name="密码测试", email=f"{username}@regulator.example", role=role,
                    institution_id=None, password_hash="", is_active=True)
        session.add(user)
        session.flush()
        set_password(session, user, password, env.settings, must_change=False)
        session.commit()
    return username, password


def sign_in(env: Env, username: str, password: str, request_id: str | None = None):  # noqa: ANN201
    headers = {"X-Request-ID": request_id} if request_id else {}
    return env.client.post("/api/v1/auth/token", json={"username": username, "password": password}, headers=headers)


def change(env: Env, username: str, old: str, new: str, request_id: str | None = None):  # noqa: ANN201
    headers = {"X-Request-ID": request_id} if request_id else {}
    return env.client.post("/api/v1/auth/password", headers=headers,
                           json={"username": username, "old_password": old, "new_password": new})


def user_row(env: Env, username: str) -> User:
    with env.db() as session:
        return session.scalars(select(User).where(User.username == username)).one()


@pytest.mark.parametrize(
    ("password", "code", "fragment"),
    [
        ("Ab1-short", "PASSWORD_TOO_SHORT", "至少需要 12 个字符"),
        ("abcdefghijkl", "PASSWORD_TOO_SIMPLE", "大写字母、数字、符号"),
        ("abcdefgh1234", "PASSWORD_TOO_SIMPLE", "大写字母、符号"),
        ("xx-Alice-2026", "PASSWORD_CONTAINS_USERNAME", "不能包含用户名 alice"),
    ],
)
def test_strength_rejections(password: str, code: str, fragment: str) -> None:
    with pytest.raises(ApiError) as raised:
        check_strength(password, "alice", SETTINGS)

    assert raised.value.code == code
    assert raised.value.status == 422
    assert fragment in raised.value.message


@pytest.mark.parametrize("password", ["Abcdefgh1234", "abcdefgh-123", "ABCDEFGH-123", "Abcdefgh-xyz"])
def test_strength_accepts_three_classes(password: str) -> None:
    check_strength(password, "alice", SETTINGS)


def test_generated_passwords_satisfy_policy() -> None:
    for _ in range(200):
        password = generate_password("sysadmin", SETTINGS)
        check_strength(password, "sysadmin", SETTINGS)
        assert len(password) == 20


def test_seed_passwords_satisfy_policy(env: Env) -> None:
    for username, password in env.passwords.items():
        check_strength(password, username, env.settings)
    with env.db() as session:
        seeded = session.scalars(select(User).where(User.username == "sysadmin")).one()
        history = session.scalars(select(PasswordHistory).where(PasswordHistory.user_id == seeded.id)).all()
    assert seeded.must_change_password is False
    assert seeded.password_changed_at is not None
    assert len(history) == 1


def test_change_rejects_weak_password(env: Env) -> None:
    username, password = make_user(env)
    request_id = f"weak-{username}"

    response = change(env, username, password, "short", request_id)

    assert response.status_code == 422
    assert response.json()["code"] == "PASSWORD_TOO_SHORT"
    assert "至少需要 12 个字符" in response.json()["detail"]
    assert sign_in(env, username, password).status_code == 200
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("auth.password", "failed")]


def test_change_rejects_last_five_passwords(env: Env) -> None:
    username, first = make_user(env)
    used = [first]
    for _ in range(4):
        new = generate_password(username, env.settings)
        assert change(env, username, used[-1], new).status_code == 204
        used.append(new)

    for old in used:
        response = change(env, username, used[-1], old)
        assert response.status_code == 422
        assert response.json()["code"] == "PASSWORD_REUSED"
        assert "最近 5 次" in response.json()["detail"]

    sixth = generate_password(username, env.settings)
    assert change(env, username, used[-1], sixth).status_code == 204
    assert change(env, username, sixth, first).status_code == 204  # the first one left the history
    with env.db() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        kept = session.scalars(select(PasswordHistory).where(PasswordHistory.user_id == user.id)).all()
    assert len(kept) == 5


def test_change_with_wrong_old_password(env: Env) -> None:
    username, password = make_user(env)

    response = change(env, username, password + "x", generate_password(username, env.settings))

    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_CREDENTIALS"
    assert user_row(env, username).failed_sign_ins == 1


def test_expired_password_only_changes(env: Env) -> None:
    username, password = make_user(env)
    old_token = sign_in(env, username, password).json()["access_token"]
    with env.db() as session:
        session.execute(update(User).where(User.username == username)
                        .values(password_changed_at=utc_now() - timedelta(days=91)))
        session.commit()

    expired = sign_in(env, username, password, f"expired-{username}")
    verify = env.client.post("/api/v1/auth/verify", headers=env.service("hub"),
                             json={"username": username, "password": password})
    new = generate_password(username, env.settings)
    changed = change(env, username, password, new, f"changed-{username}")

    assert expired.status_code == 403
    assert expired.json()["code"] == "PASSWORD_EXPIRED"
    assert "超过 90 天未修改" in expired.json()["detail"]
    assert "POST /api/v1/auth/password" in expired.json()["detail"]
    assert verify.status_code == 403
    assert [e.outcome for e in audit_events(env, f"expired-{username}")] == ["denied"]
    assert changed.status_code == 204
    assert [(e.action, e.outcome) for e in audit_events(env, f"changed-{username}")] == [("auth.password", "success")]
    assert sign_in(env, username, new).status_code == 200
    assert env.client.get("/api/v1/me", headers={"Authorization": f"Bearer {old_token}"}).status_code == 401


def test_lockout_after_five_failures(env: Env) -> None:
    username, password = make_user(env)
    for attempt in range(4):
        assert sign_in(env, username, f"wrong-{attempt}").status_code == 401
    assert user_row(env, username).failed_sign_ins == 4

    fifth = sign_in(env, username, "wrong-5", f"fifth-{username}")
    locked = sign_in(env, username, password, f"locked-{username}")

    assert fifth.status_code == 401
    assert locked.status_code == 429
    assert locked.json()["code"] == "ACCOUNT_LOCKED"
    assert "连续 5 次登录失败已被锁定" in locked.json()["detail"]
    assert "联系系统管理员解锁" in locked.json()["detail"]
    row = user_row(env, username)
    assert row.lockouts == 1
    assert row.failed_sign_ins == 0
    assert timedelta(seconds=50) < row.locked_until - utc_now() <= timedelta(minutes=1)
    assert "locked_until" in audit_events(env, f"fifth-{username}")[0].detail
    assert [e.outcome for e in audit_events(env, f"locked-{username}")] == ["denied"]


def test_lockout_grows_then_resets(env: Env) -> None:
    username, password = make_user(env)
    for attempt in range(5):
        sign_in(env, username, f"wrong-{attempt}")
    with env.db() as session:  # let the first lockout run out
        session.execute(update(User).where(User.username == username).values(locked_until=utc_now()))
        session.commit()
    for attempt in range(5):
        sign_in(env, username, f"again-{attempt}")
    second = user_row(env, username)
    assert second.lockouts == 2
    assert timedelta(minutes=4) < second.locked_until - utc_now() <= timedelta(minutes=5)

    with env.db() as session:
        session.execute(update(User).where(User.username == username).values(locked_until=utc_now()))
        session.commit()
    assert sign_in(env, username, password).status_code == 200
    reset = user_row(env, username)
    assert (reset.failed_sign_ins, reset.lockouts, reset.locked_until) == (0, 0, None)


def test_success_resets_failure_counter(env: Env) -> None:
    username, password = make_user(env)
    for attempt in range(4):
        sign_in(env, username, f"wrong-{attempt}")
    assert sign_in(env, username, password).status_code == 200
    for attempt in range(4):
        sign_in(env, username, f"wrong-again-{attempt}")

    assert sign_in(env, username, password).status_code == 200
    assert user_row(env, username).lockouts == 0


def test_console_login_locked_message(env: Env) -> None:
    username, password = make_user(env)
    for attempt in range(5):
        sign_in(env, username, f"wrong-{attempt}")
    browser = env.client
    form = browser.get("/console/login")
    csrf = form.cookies.get("regsandbox_login_csrf") or browser.cookies.get("regsandbox_login_csrf")

    response = browser.post("/console/login", data={"username": username, "password": password, "csrf_token": csrf},
                            follow_redirects=False)

    assert response.status_code == 429
    assert "已被锁定" in response.text


def test_tampered_session_cookie_redirects(env: Env) -> None:
    cookie = console_cookie(env, "reviewer")["Cookie"]
    tampered = cookie[:-2] + ("A" if cookie[-2] != "A" else "B") + cookie[-1]

    response = env.client.get("/console/", headers={"Cookie": tampered}, follow_redirects=False)

    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"


def console_change(env: Env, username: str, old: str, new: str, confirm: str | None = None):  # noqa: ANN201
    form = env.client.get("/console/password")
    csrf = form.cookies.get("regsandbox_login_csrf") or env.client.cookies.get("regsandbox_login_csrf")
    return env.client.post("/console/password", follow_redirects=False, data={
        "username": username, "old_password": old, "new_password": new,
        "new_password_confirm": new if confirm is None else confirm, "csrf_token": csrf})


def test_console_expired_password_changed(env: Env) -> None:
    username, password = make_user(env)
    with env.db() as session:
        session.execute(update(User).where(User.username == username)
                        .values(password_changed_at=utc_now() - timedelta(days=91)))
        session.commit()
    form = env.client.get("/console/login")
    csrf = form.cookies.get("regsandbox_login_csrf") or env.client.cookies.get("regsandbox_login_csrf")

    login = env.client.post("/console/login", follow_redirects=False,
                            data={"username": username, "password": password, "csrf_token": csrf})
    new = generate_password(username, env.settings)
    changed = console_change(env, username, password, new)

    assert login.status_code == 403
    assert "已过期" in login.text
    assert "/console/password" in login.text
    assert changed.status_code == 200
    assert "密码已修改" in changed.text
    assert sign_in(env, username, new).status_code == 200


def test_console_change_rejections(env: Env) -> None:
    username, password = make_user(env)

    mismatch = console_change(env, username, password, "Another-Pass-2026", confirm="Other-Pass-2026")
    weak = console_change(env, username, password, "abc")
    reused = console_change(env, username, password, password)
    no_csrf = env.client.post("/console/password", data={"username": username, "old_password": password,
                                                          "new_password": "x", "new_password_confirm": "x",
                                                          "csrf_token": "forged"})

    assert mismatch.status_code == 422
    assert "两次输入的新密码不一致" in mismatch.text
    assert weak.status_code == 422
    assert "至少需要 12 个字符" in weak.text
    assert reused.status_code == 422
    assert "最近 5 次" in reused.text
    assert no_csrf.status_code == 403
    assert sign_in(env, username, password).status_code == 200


def _session_row(env: Env, cookie: dict[str, str]) -> ApiToken:
    token = cookie["Cookie"].split("=", 1)[1]
    with env.db() as session:
        return session.scalars(select(ApiToken).where(ApiToken.token_sm3 == token_digest(token))).one()


def _set_last_seen(env: Env, row_id: int, minutes_ago: float) -> None:
    with env.db() as session:
        session.execute(update(ApiToken).where(ApiToken.id == row_id)
                        .values(last_seen_at=utc_now() - timedelta(minutes=minutes_ago)))
        session.commit()


def test_idle_console_session_rejected(env: Env) -> None:
    cookie = console_cookie(env, "reviewer")
    row = _session_row(env, cookie)
    _set_last_seen(env, row.id, 31)

    home = env.client.get("/console/", headers=cookie, follow_redirects=False)
    login = env.client.get("/console/login", headers=cookie, follow_redirects=False)

    assert home.status_code == 303
    assert home.headers["location"] == "/console/login"
    assert login.status_code == 200  # the form, not a redirect loop back to the home page


def test_console_session_last_seen_updated(env: Env) -> None:
    cookie = console_cookie(env, "reviewer")
    row = _session_row(env, cookie)
    _set_last_seen(env, row.id, 29)

    assert env.client.get("/console/", headers=cookie, follow_redirects=False).status_code == 200
    touched = _session_row(env, cookie).last_seen_at
    assert utc_now() - touched < timedelta(minutes=1)

    assert env.client.get("/console/", headers=cookie, follow_redirects=False).status_code == 200
    assert _session_row(env, cookie).last_seen_at == touched  # written at most once a minute


def test_one_time_hash_verifies() -> None:
    stored = hash_one_time_password("Xy7-one-time-pass")

    assert stored.startswith("$sm3-onetime$")
    assert verify_password(stored, "Xy7-one-time-pass")
    assert not verify_password(stored, "Xy7-one-time-pasS")
    assert not verify_password("$sm3-onetime$zz$00", "Xy7-one-time-pass")
    assert hash_one_time_password("Xy7-one-time-pass") != stored  # salted


def test_generated_password_replaced_by_argon2(env: Env) -> None:
    username = f"ot_{secrets.token_hex(4)}"
    created = env.client.post("/api/v1/users", headers=env.auth("sysadmin"), json={
        "username": username, "display_name": "一次性密码", "email": "ot@bank-a.example", "role": "reporter",
        "institution_code": "bank_a"})
    one_time = created.json()["password"]
    assert user_row(env, username).password_hash.startswith("$sm3-onetime$")
    new = generate_password(username, env.settings)

    assert change(env, username, one_time, new).status_code == 204

    assert user_row(env, username).password_hash.startswith("$argon2id$")
    assert sign_in(env, username, new).status_code == 200
    assert sign_in(env, username, one_time).status_code == 401


def test_new_hashes_use_the_configured_argon2id_cost(env: Env) -> None:
    username, _password = make_user(env, role="reporter")

    stored = user_row(env, username).password_hash

    assert stored.startswith("$argon2id$v=19$m=47104,t=1,p=1$")
    assert (env.settings.password_hash_memory_kib, env.settings.password_hash_iterations,
            env.settings.password_hash_lanes) == (47104, 1, 1)


def test_sign_in_rehashes_other_cost(env: Env) -> None:
    username, password = make_user(env, role="reporter")
    older = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=2).hash(password)
    with env.db() as session:
        session.execute(update(User).where(User.username == username).values(password_hash=older))
        session.commit()

    wrong = sign_in(env, username, password + "x")
    assert wrong.status_code == 401
    assert user_row(env, username).password_hash == older  # a failed sign-in changes nothing
    right = sign_in(env, username, password)

    assert right.status_code == 200, right.text
    rehashed = user_row(env, username).password_hash
    assert rehashed.startswith("$argon2id$v=19$m=47104,t=1,p=1$")
    assert sign_in(env, username, password).status_code == 200
