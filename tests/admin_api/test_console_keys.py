"""The console page 密钥管理: which roles may open it, the forms of the security administrator, CSRF and key material.

The last test drives the page in headless Chromium against admin_api served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from .conftest import Env
from .helpers import audit_events, serve_admin_api
from .test_keys import OWNER, assert_no_material, entry, pending_version, store

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _signed_in(env: Env, username: str) -> tuple[TestClient, str]:
    """Return a browser signed in as ``username`` through the login form and the CSRF token of its session."""
    browser = TestClient(env.client.app)
    form = browser.get("/console/login")
    response = browser.post(
        "/console/login",
        data={"username": username, "password": env.passwords[username],
              "csrf_token": _CSRF.search(form.text).group(1)},  # type: ignore[union-attr]
        follow_redirects=False,
    )
    assert response.status_code == 303
    home = browser.get("/console/")
    return browser, _CSRF.search(home.text).group(1)  # type: ignore[union-attr]


def _events(env: Env, request_id: str, action: str) -> list[tuple[str, str]]:
    return [(event.actor, event.outcome) for event in audit_events(env, request_id) if event.action == action]


def test_keys_page_security_admin_forms(env: Env) -> None:
    admin, _ = _signed_in(env, "secadmin")
    pending = pending_version(env, "data")

    page = admin.get("/console/keys")

    assert page.status_code == 200
    assert "<h2>密钥管理</h2>" in page.text
    assert "平台（<code>platform</code>）· 签名密钥（SM2）" in page.text
    assert "浦东示范银行甲（<code>bank_a</code>）· 令牌化密钥（HMAC-SM3）" in page.text
    assert '<td class="state-active">启用</td>' in page.text
    assert 'action="/console/keys/bank_a/data/rotate"' in page.text
    assert 'name="reason"' in page.text
    assert f'placeholder="输入 {OWNER}/data/v{pending} 确认"' in page.text
    assert f'action="/console/keys/{OWNER}/data/versions/{pending}/activate"' in page.text
    assert 'action="/console/keys/bank_a/data/versions/1/destroy"' not in page.text  # active: rotate or revoke first
    assert store(env).master.key_id in page.text
    assert_no_material(env, page.text)


def test_keys_page_audit_admin_read_only(env: Env) -> None:
    auditor, _ = _signed_in(env, "auditor")

    page = auditor.get("/console/keys")

    assert page.status_code == 200
    assert "平台（<code>platform</code>）· 数据加密密钥（SM4）" in page.text
    assert "您的角色只能查看密钥信息" in page.text
    assert 'action="/console/keys' not in page.text
    assert page.text.count("<form") == 1  # the sign-out form of the header
    assert_no_material(env, page.text)


@pytest.mark.parametrize("username", ["sysadmin", "reviewer", "modeller_a", "reporter_a"])
def test_keys_page_other_roles_forbidden(env: Env, username: str) -> None:
    browser, _ = _signed_in(env, username)

    page = browser.get("/console/keys")

    assert page.status_code == 403
    assert "无权执行此操作：查看密钥信息" in page.text
    assert 'href="/console/keys"' not in browser.get("/console/").text


def test_keys_page_anonymous_to_login(env: Env) -> None:
    response = TestClient(env.client.app).get("/console/keys", follow_redirects=False)

    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"


@pytest.mark.parametrize(("username", "links", "hidden"), [
    ("secadmin", ["/console/keys"], ["/console/audit", "/console/schedules", "/console/models"]),
    ("auditor", ["/console/keys", "/console/audit"], ["/console/schedules", "/console/models"]),
    ("sysadmin", ["/console/schedules"], ["/console/keys", "/console/audit"]),
])
def test_navigation_per_role(env: Env, username: str, links: list[str], hidden: list[str]) -> None:
    browser, _ = _signed_in(env, username)

    home = browser.get("/console/").text

    for link in links:
        assert f'href="{link}"' in home
    for link in hidden:
        assert f'href="{link}"' not in home


def test_keys_console_rotate_revoke_destroy(env: Env) -> None:
    admin, csrf = _signed_in(env, "secadmin")
    previous = next(item["version"] for item in store(env).metadata()["keys"]
                    if (item["owner"], item["kind"], item["state"]) == (OWNER, "data", "active"))

    rotated = admin.post(f"/console/keys/{OWNER}/data/rotate", data={"csrf_token": csrf},
                         headers={"X-Request-ID": f"console-rotate-{env.backend}"})
    assert rotated.status_code == 200
    assert "已轮换密钥：新版本" in rotated.text
    assert entry(env, OWNER, "data", previous)["state"] == "decrypt_only"
    assert _events(env, f"console-rotate-{env.backend}", "key.rotate") == [("secadmin", "success")]
    assert_no_material(env, rotated.text)

    revoked = admin.post(f"/console/keys/{OWNER}/data/versions/{previous}/revoke",
                         data={"csrf_token": csrf, "reason": "控制台测试吊销"},
                         headers={"X-Request-ID": f"console-revoke-{env.backend}"})
    assert revoked.status_code == 200
    assert f"已吊销密钥版本 {OWNER}/data/v{previous}" in revoked.text
    assert "原因：控制台测试吊销" in revoked.text
    assert entry(env, OWNER, "data", previous)["revoke_reason"] == "控制台测试吊销"
    assert _events(env, f"console-revoke-{env.backend}", "key.revoke") == [("secadmin", "success")]

    mismatch = admin.post(f"/console/keys/{OWNER}/data/versions/{previous}/destroy",
                          data={"csrf_token": csrf, "confirm": "销毁"},
                          headers={"X-Request-ID": f"console-mismatch-{env.backend}"})
    assert mismatch.status_code == 422
    assert f"请输入 {OWNER}/data/v{previous} 确认销毁" in mismatch.text
    assert 'role="alert"' in mismatch.text
    assert entry(env, OWNER, "data", previous)["state"] == "revoked"
    assert _events(env, f"console-mismatch-{env.backend}", "key.destroy") == [("secadmin", "failed")]

    destroyed = admin.post(f"/console/keys/{OWNER}/data/versions/{previous}/destroy",
                           data={"csrf_token": csrf, "confirm": f"{OWNER}/data/v{previous}"})
    assert destroyed.status_code == 200
    assert f"已销毁密钥版本 {OWNER}/data/v{previous} 的密钥材料" in destroyed.text
    assert entry(env, OWNER, "data", previous)["state"] == "destroyed"


def test_keys_console_state_conflict_message(env: Env) -> None:
    admin, csrf = _signed_in(env, "secadmin")
    active = next(item["version"] for item in store(env).metadata()["keys"]
                  if (item["owner"], item["kind"], item["state"]) == (OWNER, "token", "active"))

    response = admin.post(f"/console/keys/{OWNER}/token/versions/{active}/destroy",
                          data={"csrf_token": csrf, "confirm": f"{OWNER}/token/v{active}"},
                          headers={"X-Request-ID": f"console-conflict-{env.backend}"})

    assert response.status_code == 409
    assert "当前状态为「启用」，不能销毁" in response.text
    assert entry(env, OWNER, "token", active)["state"] == "active"
    assert _events(env, f"console-conflict-{env.backend}", "key.destroy") == [("secadmin", "failed")]


def test_keys_console_revoke_short_reason(env: Env) -> None:
    admin, csrf = _signed_in(env, "secadmin")
    version = pending_version(env, "data")

    response = admin.post(f"/console/keys/{OWNER}/data/versions/{version}/revoke",
                          data={"csrf_token": csrf, "reason": " x "})

    assert response.status_code == 422
    assert "吊销原因长度为 1 个字符" in response.text
    assert entry(env, OWNER, "data", version)["state"] == "pending"


def test_keys_console_csrf_rejected(env: Env) -> None:
    admin, _ = _signed_in(env, "secadmin")
    version = pending_version(env, "data")
    request_id = f"console-csrf-{env.backend}"

    response = admin.post(f"/console/keys/{OWNER}/data/versions/{version}/destroy",
                          data={"csrf_token": "forged", "confirm": f"{OWNER}/data/v{version}"},
                          headers={"X-Request-ID": request_id})

    assert response.status_code == 403
    assert "CSRF_INVALID" in response.text
    assert entry(env, OWNER, "data", version)["state"] == "pending"
    assert _events(env, request_id, "keys.operate") == [("secadmin", "denied")]


def test_keys_console_auditor_cannot_post(env: Env) -> None:
    auditor, csrf = _signed_in(env, "auditor")
    before = store(env).metadata()["keys"]

    response = auditor.post(f"/console/keys/{OWNER}/data/rotate", data={"csrf_token": csrf})

    assert response.status_code == 403
    assert "无权执行此操作：管理密钥" in response.text
    assert store(env).metadata()["keys"] == before


# --- headless Chromium ---------------------------------------------------------------------------


@pytest.fixture
def served_admin_api(env: Env, tmp_path: Path) -> Iterator[str]:
    """Serve the env's data directory and database with uvicorn on 127.0.0.1; return its URL."""
    # As in the env fixture, the demo users sign in without TOTP.
    with serve_admin_api(env, tmp_path / "uvicorn.log", REGSANDBOX_TOTP_REQUIRED_ROLES="[]") as url:
        yield url


def test_keys_page_in_chromium(env: Env, served_admin_api: str) -> None:
    from playwright.sync_api import sync_playwright

    version = pending_version(env, "token")
    label = f"{OWNER}/token/v{version}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", "secadmin")
            page.fill("input[name=password]", env.passwords["secadmin"])
            page.click("button[type=submit]")
            page.click("header a:has-text('密钥管理')")
            page.wait_for_load_state()
            row = page.locator(f"#key-{OWNER}-token-v{version}")
            assert "待启用" in row.inner_text()

            # The browser rejects an empty confirmation (required), so the admin types a wrong one.
            row.locator("input[name=confirm]").fill("确认")
            row.locator("button:has-text('销毁')").click()
            page.wait_for_load_state()
            assert f"请输入 {label} 确认销毁" in page.locator("p.error").inner_text()

            row = page.locator(f"#key-{OWNER}-token-v{version}")
            row.locator("input[name=confirm]").fill(label)
            row.locator("button:has-text('销毁')").click()
            page.wait_for_load_state()
            assert f"已销毁密钥版本 {label}" in page.locator("p.notice").inner_text()
            assert "已销毁" in page.locator(f"#key-{OWNER}-token-v{version}").inner_text()
            assert_no_material(env, page.content())
        finally:
            browser.close()
    assert entry(env, OWNER, "token", version)["state"] == "destroyed"
