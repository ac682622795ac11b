"""The console pages 本人信息 and 个人访问令牌, and the 用户管理 page driven in headless Chromium."""

from __future__ import annotations

import re
import secrets

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.db import utc_now
from admin_api.display import beijing
from admin_api.models import ApiToken, AuditEvent, User
from admin_api.passwords import password_expires_at

from .conftest import Env
from .test_console_keys import _CSRF, CHROMIUM, CHROMIUM_ARGS, _signed_in, served_admin_api  # noqa: F401
from .test_passwords import make_user, sign_in
from .test_totp import code_at, confirm, enrol

_NEW_TOKEN = re.compile(r'<code id="new-token-value">([^<]+)</code>')
_ONE_TIME = re.compile(r'<code id="one-time-password-value">([^<]+)</code>')


def console_as(env: Env, username: str, password: str, totp_code: str | None = None) -> tuple[TestClient, str]:
    """Return a browser signed in through the login form and the CSRF token of its session."""
    browser = TestClient(env.client.app)
    form = browser.get("/console/login")
    csrf = _CSRF.search(form.text).group(1)  # type: ignore[union-attr]
    data = {"username": username, "password": password, "csrf_token": csrf}
    if totp_code:
        data["totp"] = totp_code
    response = browser.post("/console/login", data=data, follow_redirects=False)
    assert response.status_code == 303, response.text
    home = browser.get("/console/")
    return browser, _CSRF.search(home.text).group(1)  # type: ignore[union-attr]


def token_fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {"name": "季度报送脚本", "scopes": ["me.read"], "expires_in_days": "7"}
    fields.update(overrides)
    return fields


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def personal_tokens_of(session: Session, user: User) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.name.is_not(None))))


def token_events(env: Env, username: str, action: str) -> list[AuditEvent]:
    with env.db() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.actor == username,
                                                             AuditEvent.action == action)))


# --- 本人信息 --------------------------------------------------------------------------------

def test_me_page_shows_account(env: Env) -> None:
    browser, _ = _signed_in(env, "modeller_a")

    page = browser.get("/console/me")

    assert page.status_code == 200
    assert "<h2>个人设置 · 本人信息</h2>" in page.text
    assert "<code>modeller_a</code>" in page.text
    assert "建模人员（<code>modeller</code>）" in page.text
    assert "（<code>bank_a</code>）" in page.text
    with env.db() as session:
        user = session.scalars(select(User).where(User.username == "modeller_a")).one()
    expires_at = password_expires_at(user, env.settings)
    expiry = re.search(r'<tr id="password-expiry">.*?</tr>', page.text, re.S).group(0)  # type: ignore[union-attr]
    assert f"至北京时间 {beijing(expires_at)}，还剩 {(expires_at - utc_now()).days} 天" in expiry
    totp_row = re.search(r'<tr id="totp-status">.*?</tr>', page.text, re.S).group(0)  # type: ignore[union-attr]
    assert "未绑定" in totp_row
    assert 'href="/console/password"' in page.text
    assert 'href="/console/totp"' in page.text
    assert 'href="/console/tokens"' in page.text
    assert 'id="nav-me"' in page.text


def test_me_page_totp_enrolled(env: Env) -> None:
    username, password = make_user(env)
    secret = enrol(env, username, password)
    assert confirm(env, username, password, code_at(secret)).status_code == 204
    browser, _ = console_as(env, username, password, code_at(secret, 1))

    page = browser.get("/console/me")

    totp_row = re.search(r'<tr id="totp-status">.*?</tr>', page.text, re.S).group(0)  # type: ignore[union-attr]
    assert "已绑定" in totp_row
    assert "未绑定" not in totp_row


def test_me_pages_anonymous_to_login(env: Env) -> None:
    anonymous = TestClient(env.client.app)

    for path in ("/console/me", "/console/tokens"):
        response = anonymous.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"] == "/console/login"


# --- 个人访问令牌 ----------------------------------------------------------------------------

def test_token_created_shown_once(env: Env) -> None:
    username, password = make_user(env)
    browser, csrf = console_as(env, username, password)

    response = browser.post("/console/tokens", data={**token_fields(), "csrf_token": csrf})

    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    token = _NEW_TOKEN.search(response.text).group(1)  # type: ignore[union-attr]
    me = env.client.get("/api/v1/me", headers=bearer(token))
    assert me.status_code == 200
    assert me.json()["username"] == username
    listing = browser.get("/console/tokens")
    assert token not in listing.text
    row = re.search(r'<tr id="token-\d+">.*?</tr>', listing.text, re.S).group(0)  # type: ignore[union-attr]
    assert "季度报送脚本" in row
    assert "查看本人信息（<code>me.read</code>）" in row
    assert "有效" in row
    assert [event.outcome for event in token_events(env, username, "tokens.create")] == ["success"]


def test_token_scope_limits_use(env: Env) -> None:
    username, password = make_user(env)
    browser, csrf = console_as(env, username, password)

    response = browser.post("/console/tokens", data={**token_fields(scopes=["institutions.read"]), "csrf_token": csrf})

    token = _NEW_TOKEN.search(response.text).group(1)  # type: ignore[union-attr]
    assert env.client.get("/api/v1/institutions", headers=bearer(token)).status_code == 200
    denied = env.client.get("/api/v1/me", headers=bearer(token))
    assert denied.status_code == 403
    assert denied.json()["code"] == "TOKEN_SCOPE_FORBIDDEN"


def test_token_invalid_keeps_values(env: Env) -> None:
    username, password = make_user(env)
    browser, csrf = console_as(env, username, password)

    no_scope = browser.post("/console/tokens", data={**token_fields(scopes=[]), "csrf_token": csrf})
    too_long = browser.post("/console/tokens", data={**token_fields(expires_in_days="400"), "csrf_token": csrf})
    not_number = browser.post("/console/tokens", data={**token_fields(expires_in_days="一周"), "csrf_token": csrf})
    outside = browser.post("/console/tokens", data={**token_fields(scopes=["users.write"]), "csrf_token": csrf})

    assert no_scope.status_code == 422
    assert "请至少选择一项权限" in no_scope.text
    assert 'value="季度报送脚本"' in no_scope.text
    assert too_long.status_code == 422
    assert f"须在 1 到 {env.settings.personal_token_max_days} 天之间" in too_long.text
    assert not_number.status_code == 422
    assert "有效期“一周”无效" in not_number.text
    assert outside.status_code == 422
    assert "users.write" in outside.text
    assert "不在您的角色可授予的范围内" in outside.text
    assert 'id="new-token-value"' not in no_scope.text + too_long.text + not_number.text + outside.text
    with env.db() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        assert personal_tokens_of(session, user) == []
    assert [event.outcome for event in token_events(env, username, "tokens.create")] == ["failed"] * 4


def test_token_revoke_form(env: Env) -> None:
    username, password = make_user(env)
    browser, csrf = console_as(env, username, password)
    created = browser.post("/console/tokens", data={**token_fields(), "csrf_token": csrf})
    token = _NEW_TOKEN.search(created.text).group(1)  # type: ignore[union-attr]
    token_id = re.search(r"（编号 (\d+)）", created.text).group(1)  # type: ignore[union-attr]

    response = browser.post(f"/console/tokens/{token_id}/revoke", data={"csrf_token": csrf}, follow_redirects=False)

    assert response.status_code == 303
    page = browser.get(response.headers["location"])
    assert "已吊销个人访问令牌" in page.text
    row = re.search(rf'<tr id="token-{token_id}">.*?</tr>', page.text, re.S).group(0)  # type: ignore[union-attr]
    assert "已吊销（" in row
    assert f'action="/console/tokens/{token_id}/revoke"' not in page.text
    assert env.client.get("/api/v1/me", headers=bearer(token)).status_code == 401
    assert [event.outcome for event in token_events(env, username, "tokens.revoke")] == ["success"]


def test_token_revoke_other_users(env: Env) -> None:
    owner, owner_password = make_user(env)
    other, other_password = make_user(env)
    owner_browser, owner_csrf = console_as(env, owner, owner_password)
    created = owner_browser.post("/console/tokens", data={**token_fields(), "csrf_token": owner_csrf})
    token = _NEW_TOKEN.search(created.text).group(1)  # type: ignore[union-attr]
    token_id = re.search(r"（编号 (\d+)）", created.text).group(1)  # type: ignore[union-attr]
    other_browser, other_csrf = console_as(env, other, other_password)

    response = other_browser.post(f"/console/tokens/{token_id}/revoke", data={"csrf_token": other_csrf})

    assert response.status_code == 404
    assert f"您没有编号为 {token_id} 的个人访问令牌" in response.text
    assert env.client.get("/api/v1/me", headers=bearer(token)).status_code == 200


def test_token_forms_need_csrf(env: Env) -> None:
    username, password = make_user(env)
    browser, _ = console_as(env, username, password)

    created = browser.post("/console/tokens", data=token_fields())
    revoked = browser.post("/console/tokens/1/revoke", data={"csrf_token": "wrong"})

    assert created.status_code == 403
    assert revoked.status_code == 403
    assert "表单已过期" in created.text
    with env.db() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        assert personal_tokens_of(session, user) == []


# --- headless Chromium -------------------------------------------------------------------------

def test_tokens_page_in_chromium(env: Env, served_admin_api: str) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    username, password = make_user(env)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", username)
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            page.wait_for_load_state()
            page.click("header a:has-text('个人设置')")
            page.wait_for_load_state()
            assert username in page.locator("#me").inner_text()
            page.click("main a:has-text('个人访问令牌')")
            page.wait_for_load_state()

            form = page.locator("#create-token")
            form.locator("input[name=name]").fill("浏览器令牌")
            form.locator("input[name=scopes][value='me.read']").check()
            form.locator("input[name=expires_in_days]").fill("3")
            form.locator("button[type=submit]").click()
            page.wait_for_load_state()
            token = page.locator("#new-token-value").inner_text()
            assert httpx.get(f"{served_admin_api}/api/v1/me", headers=bearer(token)).status_code == 200

            page.goto(f"{served_admin_api}/console/tokens")  # a reload would submit the form again
            assert page.locator("#new-token-value").count() == 0
            assert token not in page.content()
            row = page.locator("#tokens tbody tr", has_text="浏览器令牌")
            assert "有效" in row.inner_text()
            row.locator("button:has-text('吊销')").click()
            page.wait_for_load_state()
            assert "已吊销个人访问令牌" in page.locator("p.notice").inner_text()
            assert "已吊销" in page.locator("#tokens tbody tr", has_text="浏览器令牌").inner_text()
        finally:
            browser.close()
    assert httpx.get(f"{served_admin_api}/api/v1/me", headers=bearer(token)).status_code == 401


def test_users_page_in_chromium(env: Env, served_admin_api: str) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    username = f"web_{secrets.token_hex(4)}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", "sysadmin")
            page.fill("input[name=password]", env.passwords["sysadmin"])
            page.click("button[type=submit]")
            page.wait_for_load_state()
            page.click("header a:has-text('用户管理')")
            page.wait_for_load_state()

            form = page.locator("#create-user")
            form.locator("input[name=username]").fill(username)
            form.locator("input[name=display_name]").fill("浏览器用户")
            form.locator("input[name=email]").fill(f"{username}@bank-b.example")
            form.locator("select[name=role]").select_option("reporter")
            form.locator("input[name=institution_code]").fill("bank_b")
            form.locator("button[type=submit]").click()
            page.wait_for_load_state()
            first_password = page.locator("#one-time-password-value").inner_text()
            assert f"已新建用户 {username}" in page.locator("#one-time-password").inner_text()

            page.fill("form.search input[name=q]", username)
            page.click("form.search button[type=submit]")
            page.wait_for_load_state()
            row = page.locator(f"#user-{username}")
            assert "正常" in row.inner_text()
            row.locator("button:has-text('停用')").click()
            page.wait_for_load_state()
            assert f"已停用用户 {username}" in page.locator("p.notice").inner_text()
            assert "已停用" in page.locator(f"#user-{username}").inner_text()

            page.locator(f"#user-{username}").locator("button:has-text('重置密码')").click()
            page.wait_for_load_state()
            second_password = page.locator("#one-time-password-value").inner_text()
            assert second_password != first_password
            page.goto(f"{served_admin_api}/console/users?q={username}")
            assert second_password not in page.content()
        finally:
            browser.close()

    with env.db() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
    assert (user.is_active, user.must_change_password, user.institution_code) == (False, True, "bank_b")
    assert sign_in(env, username, first_password).status_code == 401
    disabled = sign_in(env, username, second_password)
    assert disabled.status_code == 403
    assert disabled.json()["code"] == "USER_DISABLED"
    with env.db() as session:
        actions = [event.action for event in session.scalars(select(AuditEvent).where(
            AuditEvent.actor == "sysadmin", AuditEvent.resource == f"user:{username}").order_by(AuditEvent.id))]
    assert actions == ["users.create", "users.disable", "users.reset_password"]
