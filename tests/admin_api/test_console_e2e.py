"""The console walk-through in headless Chromium with the default second-factor rule switched on.

The system administrator and the audit administrator enrol TOTP through the API, as a new
administrator would. Then the system administrator signs in with a code, creates an institution
and a user, and the audit administrator signs in with a code and finds both writes in the audit
log. admin_api is served by uvicorn on 127.0.0.1 against the module's own database, so the
enrolments stay out of the other modules' environments.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyotp
import pytest
from sqlalchemy import select

from admin_api.models import AuditEvent

from .conftest import BACKENDS, Env, backend_env
from .helpers import serve_admin_api
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS
from .test_institutions import make_uscc

TOTP_ROLES = '["system_admin", "security_admin", "audit_admin", "regulator_reviewer"]'
"""The default of the setting totp_required_roles, which the other test environments switch off."""
STEP = 30


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from backend_env(request.param, tmp_path_factory, "e2e")


@pytest.fixture
def served_with_totp(env: Env, tmp_path: Path) -> Iterator[str]:
    """Serve the env's database with uvicorn on 127.0.0.1, TOTP required for administrators; return its URL."""
    with serve_admin_api(env, tmp_path / "uvicorn.log", REGSANDBOX_TOTP_REQUIRED_ROLES=TOTP_ROLES) as url:
        yield url


def enrol_totp(url: str, username: str, password: str) -> str:
    """Enrol and confirm a TOTP secret through the API with the current code; return the secret."""
    enrolled = httpx.post(f"{url}/api/v1/auth/totp/enrol", json={"username": username, "password": password})
    assert enrolled.status_code == 200, enrolled.text
    secret = enrolled.json()["secret"]
    confirmed = httpx.post(f"{url}/api/v1/auth/totp/confirm",
                           json={"username": username, "password": password, "code": pyotp.TOTP(secret).now()})
    assert confirmed.status_code == 204, confirmed.text
    return secret


def next_code(secret: str) -> str:
    """Return the code of the next step: the confirmation used up the current one, and one step of drift is accepted."""
    return pyotp.TOTP(secret).at(int(time.time()) + STEP)


def sign_in(page, url: str, username: str, password: str, code: str | None) -> None:  # noqa: ANN001
    page.goto(f"{url}/console/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    if code:
        page.fill("input[name=totp]", code)
    page.click("form.login button[type=submit]")
    page.wait_for_load_state()


def test_walkthrough_with_totp(env: Env, served_with_totp: str) -> None:
    from playwright.sync_api import sync_playwright

    url = served_with_totp
    admin_secret = enrol_totp(url, "sysadmin", env.passwords["sysadmin"])
    auditor_secret = enrol_totp(url, "auditor", env.passwords["auditor"])
    code = f"e2e_{secrets.token_hex(4)}"
    institution_name = f"端到端测试银行{code}"
    username = f"e2e_{secrets.token_hex(4)}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            sign_in(page, url, "sysadmin", env.passwords["sysadmin"], None)
            assert "动态验证码" in page.locator("p.error").inner_text()
            assert "退出登录" not in page.content()

            sign_in(page, url, "sysadmin", env.passwords["sysadmin"], next_code(admin_secret))
            assert "退出登录" in page.content(), page.locator("main").inner_text()

            page.click("header a:has-text('机构管理')")
            page.wait_for_load_state()
            form = page.locator("#create-institution")
            form.locator("input[name=code]").fill(code)
            form.locator("input[name=name]").fill(institution_name)
            form.locator("input[name=uscc]").fill(make_uscc())
            form.locator("select[name=type]").select_option("银行")
            form.locator("button[type=submit]").click()
            page.wait_for_load_state()
            assert f"已新建机构 {code}" in page.locator("p.notice").inner_text()

            page.click("header a:has-text('用户管理')")
            page.wait_for_load_state()
            form = page.locator("#create-user")
            form.locator("input[name=username]").fill(username)
            form.locator("input[name=display_name]").fill("端到端用户")
            form.locator("input[name=email]").fill(f"{username}@e2e-bank.example")
            form.locator("select[name=role]").select_option("modeller")
            form.locator("input[name=institution_code]").fill(code)
            form.locator("button[type=submit]").click()
            page.wait_for_load_state()
            one_time_password = page.locator("#one-time-password-value").inner_text()
            assert len(one_time_password) >= env.settings.password_min_length
            page.click("header button:has-text('退出登录')")
            page.wait_for_load_state()
            assert page.url.endswith("/console/login")

            sign_in(page, url, "auditor", env.passwords["auditor"], next_code(auditor_secret))
            assert "退出登录" in page.content(), page.locator("main").inner_text()
            page.click("header a[href='/console/audit']")
            page.wait_for_load_state()

            page.fill("#audit-action", "institutions.create")
            page.click("#audit-filter button[type=submit]")
            page.wait_for_load_state()
            row = page.locator("table.audit tbody tr", has_text=f"institution:{code}")
            assert row.count() == 1
            assert "sysadmin" in row.inner_text()
            assert "成功" in row.inner_text()

            page.fill("#audit-action", "users.create")
            page.click("#audit-filter button[type=submit]")
            page.wait_for_load_state()
            row = page.locator("table.audit tbody tr", has_text=f"user:{username}")
            assert row.count() == 1
            assert "sysadmin" in row.inner_text()
            assert code in row.inner_text()
            assert one_time_password not in page.content()
        finally:
            browser.close()

    with env.db() as session:
        logins = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "console.login",
                                                              AuditEvent.actor.in_(["sysadmin", "auditor"]))))
    assert sorted((event.actor, event.outcome, json.loads(event.detail or "{}").get("code")) for event in logins) == [
        ("auditor", "success", None), ("sysadmin", "failed", "TOTP_REQUIRED"), ("sysadmin", "success", None)]
    first = httpx.post(f"{url}/api/v1/auth/token", json={"username": username, "password": one_time_password})
    assert first.json()["code"] == "PASSWORD_CHANGE_REQUIRED"
