"""The console page 用户管理: list and search, the forms, the one-time password, CSRF and role denials."""

from __future__ import annotations

import re
import secrets

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from admin_api.models import AuditEvent, User

from .conftest import Env
from .helpers import tokens_of
from .test_console_keys import _signed_in
from .test_passwords import make_user, sign_in

_ONE_TIME = re.compile(r'<code id="one-time-password-value">([^<]+)</code>')


def new_name() -> str:
    return f"cu_{secrets.token_hex(4)}"


def create_fields(**overrides: str) -> dict[str, str]:
    fields = {"username": new_name(), "display_name": "控制台新用户", "email": "console@bank-a.example",
              "role": "reporter", "institution_code": "bank_a"}
    fields.update(overrides)
    return fields


def stored(env: Env, username: str) -> User | None:
    with env.db() as session:
        return session.scalars(select(User).where(User.username == username)).first()


def events_of(env: Env, action: str, username: str) -> list[AuditEvent]:
    with env.db() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action,
                                                             AuditEvent.resource == f"user:{username}")))


def test_page_lists_users_for_sysadmin(env: Env) -> None:
    admin, _ = _signed_in(env, "sysadmin")

    page = admin.get("/console/users")

    assert page.status_code == 200
    assert "<h2>用户管理</h2>" in page.text
    assert 'id="user-reviewer"' in page.text
    assert 'id="create-user"' in page.text
    assert 'href="/console/users">用户管理</a>' in page.text


def test_page_search_filters(env: Env) -> None:
    marker = secrets.token_hex(3)
    admin, csrf = _signed_in(env, "sysadmin")
    for index, (role, code) in enumerate([("reporter", "bank_a"), ("modeller", "bank_b"), ("reporter", "bank_b")]):
        response = admin.post("/console/users", data={
            **create_fields(username=f"se_{marker}_{index}", display_name=f"检索{marker}", role=role,
                            institution_code=code), "csrf_token": csrf})
        assert response.status_code == 201, response.text

    by_name = admin.get("/console/users", params={"q": f"检索{marker}"})
    by_role = admin.get("/console/users", params={"q": marker, "role": "reporter"})
    by_institution = admin.get("/console/users", params={"q": marker, "institution": "bank_b"})
    by_status = admin.get("/console/users", params={"q": marker, "status": "disabled"})

    assert "共 3 个用户，当前显示第 1–3 个" in by_name.text
    assert "共 2 个用户" in by_role.text
    assert f'id="user-se_{marker}_1"' not in by_role.text
    assert "共 2 个用户" in by_institution.text
    assert f'id="user-se_{marker}_0"' not in by_institution.text
    assert "共 0 个用户" in by_status.text
    assert "没有符合条件的用户" in by_status.text


def test_page_paging_fifty_per_page(env: Env) -> None:
    admin, _ = _signed_in(env, "sysadmin")
    with env.db() as session:
        total = len(list(session.scalars(select(User.id))))
    if total <= 50:
        marker = secrets.token_hex(3)
        with env.db() as session:
            for index in range(51 - total):
                session.add(User(username=f"pg_{marker}_{index}", display_name="翻页", email="p@regulator.example",
                                 role="regulator_reviewer", password_hash="", is_active=True))
            session.commit()

    first = admin.get("/console/users")
    second = admin.get("/console/users", params={"offset": "50"})

    assert "当前显示第 1–50 个" in first.text
    assert first.text.count('<tr id="user-') == 50
    assert 'href="?offset=50">下一页</a>' in first.text
    assert "当前显示第 51–" in second.text
    assert 'href="?offset=0">上一页</a>' in second.text


def test_create_shows_password_once(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    fields = create_fields()

    response = admin.post("/console/users", data={**fields, "csrf_token": csrf})

    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    assert f"已新建用户 {fields['username']}" in response.text
    password = _ONE_TIME.search(response.text).group(1)  # type: ignore[union-attr]
    assert password not in admin.get("/console/users").text
    assert stored(env, fields["username"]).must_change_password is True
    events = events_of(env, "users.create", fields["username"])
    assert [event.outcome for event in events] == ["success"]
    assert password not in str(events[0].detail)
    first_sign_in = sign_in(env, fields["username"], password)
    assert first_sign_in.status_code == 403
    assert first_sign_in.json()["code"] == "PASSWORD_CHANGE_REQUIRED"


def test_create_invalid_keeps_values(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    fields = create_fields(role="modeller", institution_code="")

    response = admin.post("/console/users", data={**fields, "csrf_token": csrf})

    assert response.status_code == 422
    assert "必须属于一个机构" in response.text
    assert f'value="{fields["username"]}"' in response.text
    assert stored(env, fields["username"]) is None
    assert [event.outcome for event in events_of(env, "users.create", fields["username"])] == ["failed"]


def test_create_without_csrf_rejected(env: Env) -> None:
    admin, _ = _signed_in(env, "sysadmin")
    fields = create_fields()

    missing = admin.post("/console/users", data=fields)
    wrong = admin.post("/console/users", data={**fields, "csrf_token": "wrong"})

    assert missing.status_code == 403
    assert wrong.status_code == 403
    assert "表单已过期" in missing.text
    assert stored(env, fields["username"]) is None


def test_edit_form_saves(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    fields = create_fields()
    admin.post("/console/users", data={**fields, "csrf_token": csrf})
    page = admin.get(f"/console/users/{fields['username']}/edit")

    response = admin.post(f"/console/users/{fields['username']}/edit", follow_redirects=False, data={
        "display_name": "改名后", "email": "moved@bank-b.example", "role": "modeller", "institution_code": "bank_b",
        "csrf_token": csrf})

    assert page.status_code == 200
    assert 'value="console@bank-a.example"' in page.text
    assert response.status_code == 303
    assert f"已保存用户 {fields['username']} 的修改" in admin.get(response.headers["location"]).text
    user = stored(env, fields["username"])
    assert (user.display_name, user.role, user.institution_code) == ("改名后", "modeller", "bank_b")
    assert [event.outcome for event in events_of(env, "users.update", fields["username"])] == ["success"]


def test_edit_admin_role_change_rejected(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")

    response = admin.post("/console/users/secadmin/edit", data={
        "display_name": "吴刚", "email": "secadmin@regulator.example", "role": "audit_admin", "institution_code": "",
        "csrf_token": csrf})

    assert response.status_code == 409
    assert "必须由不同账号担任" in response.text
    assert stored(env, "secadmin").role == "security_admin"


def test_disable_revokes_tokens_and_enable(env: Env) -> None:
    username, password = make_user(env)
    token = sign_in(env, username, password).json()["access_token"]
    admin, csrf = _signed_in(env, "sysadmin")

    disabled = admin.post(f"/console/users/{username}/disable", data={"csrf_token": csrf}, follow_redirects=False)

    assert disabled.status_code == 303
    assert "其访问令牌和控制台会话均已注销" in admin.get(disabled.headers["location"]).text
    assert stored(env, username).is_active is False
    assert all(row.revoked_at is not None for row in tokens_of(env, username))
    me = env.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code in (401, 403)
    enabled = admin.post(f"/console/users/{username}/enable", data={"csrf_token": csrf}, follow_redirects=False)
    assert enabled.status_code == 303
    assert stored(env, username).is_active is True


def test_disable_own_account_rejected(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")

    response = admin.post("/console/users/sysadmin/disable", data={"csrf_token": csrf})

    assert response.status_code == 409
    assert "不能停用本人账号" in response.text
    assert stored(env, "sysadmin").is_active is True


def test_unlock_clears_lockout(env: Env) -> None:
    username, password = make_user(env)
    for attempt in range(env.settings.sign_in_max_failures):
        sign_in(env, username, f"wrong-{attempt}")
    assert sign_in(env, username, password).status_code == 429
    admin, csrf = _signed_in(env, "sysadmin")
    page = admin.get("/console/users", params={"q": username})
    assert f'action="/console/users/{username}/unlock"' in page.text

    response = admin.post(f"/console/users/{username}/unlock", data={"csrf_token": csrf}, follow_redirects=False)

    assert response.status_code == 303
    user = stored(env, username)
    assert user.locked_until is None
    assert user.failed_sign_ins == 0
    assert sign_in(env, username, password).status_code == 200


def test_reset_password_shown_once(env: Env) -> None:
    username, password = make_user(env)
    sign_in(env, username, password)
    admin, csrf = _signed_in(env, "sysadmin")

    response = admin.post(f"/console/users/{username}/reset-password", data={"csrf_token": csrf})

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    one_time = _ONE_TIME.search(response.text).group(1)  # type: ignore[union-attr]
    assert one_time not in admin.get("/console/users").text
    assert all(row.revoked_at is not None for row in tokens_of(env, username))
    assert sign_in(env, username, password).status_code == 401
    assert sign_in(env, username, one_time).json()["code"] == "PASSWORD_CHANGE_REQUIRED"
    assert [event.outcome for event in events_of(env, "users.reset_password", username)] == ["success"]


@pytest.mark.parametrize("username", ["reviewer", "modeller_a", "secadmin", "auditor"])
def test_other_roles_forbidden(env: Env, username: str) -> None:
    browser, csrf = _signed_in(env, username)
    fields = create_fields()

    page = browser.get("/console/users")
    created = browser.post("/console/users", data={**fields, "csrf_token": csrf})
    disabled = browser.post("/console/users/reporter_b/disable", data={"csrf_token": csrf})
    home = browser.get("/console/")

    assert page.status_code == 403
    assert "无法完成请求" in page.text
    assert created.status_code == 403
    assert stored(env, fields["username"]) is None
    assert disabled.status_code == 403
    assert stored(env, "reporter_b").is_active is True
    assert 'href="/console/users"' not in home.text


def test_page_anonymous_to_login(env: Env) -> None:
    response = TestClient(env.client.app).get("/console/users", follow_redirects=False)

    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"
