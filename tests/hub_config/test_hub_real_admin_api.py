"""The hub against the real admin_api: the login check, its messages, the user sync and audit events.

The modellers that start servers here belong to the institutions hubsync_a and hubsync_b, which
the tests create through admin_api's API. Their Unix groups therefore cannot collide with the
groups that other tests create for the demo institutions.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import time
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import pyotp
import pytest
from stdnum.cn import uscc as uscc_number

from hub_config.authenticator import AdminApiAuthenticator
from tests.hub_config.conftest import SYNC_USERS, UNIX_PREFIX, USER_SYNC_SECONDS
from tests.hub_config.test_hub import process_environment, singleuser_processes, wait_until_ready

PROPAGATION_BOUND = 60.0
"""Seconds within which a change in admin_api must reach the hub."""
INITIAL_PASSWORD = "Init-Passw0rd-2026"


def test_real_login_sets_institution_group(real_admin_hub):
    hub = real_admin_hub
    client, response = hub.login("modeller_a", hub.passwords["modeller_a"])
    client.close()

    assert response.status_code == 302
    with hub.api() as api:
        assert api.get("/users/modeller_a").json()["groups"] == ["bank_a"]


def test_real_regulator_has_no_group(real_admin_hub):
    hub = real_admin_hub
    client, response = hub.login("analyst", hub.passwords["analyst"])
    client.close()

    assert response.status_code == 302
    with hub.api() as api:
        assert api.get("/users/analyst").json()["groups"] == []


def test_real_wrong_password_rejected(real_admin_hub):
    client, response = real_admin_hub.login("modeller_b", "wrong-password")
    client.close()

    assert response.status_code == 403
    assert "用户名或密码错误" in response.text


def test_real_disabled_account_rejected(real_admin_hub):
    hub = real_admin_hub
    client, response = hub.login("modeller_c", hub.passwords["modeller_c"])
    client.close()

    assert response.status_code == 403
    assert "用户 modeller_c 已被停用" in response.text


def test_real_reporter_spawn_denied_and_audited(real_admin_hub):
    hub = real_admin_hub
    client, response = hub.login("reporter_a", hub.passwords["reporter_a"])
    assert response.status_code == 302

    spawn = client.get("/hub/spawn/reporter_a")
    client.close()

    assert spawn.status_code == 403, hub.hub_log.read_text()[-4000:]
    assert "仅建模人员可以启动建模沙箱" in spawn.text
    events = hub.audit_events(action="sandbox.spawn", actor="reporter_a")
    assert len(events) == 1
    assert events[0]["actor"] == "reporter_a"
    assert events[0]["outcome"] == "denied"
    assert events[0]["role"] == "reporter"
    assert events[0]["institution_code"] == "bank_a"


def test_real_refresh_rejects_disabled_account(real_admin_hub):
    hub = real_admin_hub
    authenticator = AdminApiAuthenticator(admin_api_url=hub.admin_api_url, service_token=hub.secrets.service_token)

    disabled = asyncio.run(authenticator.refresh_user(SimpleNamespace(name="modeller_c")))
    active = asyncio.run(authenticator.refresh_user(SimpleNamespace(name="modeller_a")))

    assert disabled is False
    assert active["groups"] == ["bank_a"]
    assert active["admin"] is False
    assert active["auth_state"]["role"] == "modeller"


# Messages of refused sign-ins


def test_real_locked_account_shows_time(real_admin_hub):
    hub = real_admin_hub
    for _attempt in range(5):
        client, response = hub.login("reporter_b", "wrong-password")
        client.close()
        assert response.status_code == 403

    client, response = hub.login("reporter_b", hub.passwords["reporter_b"])
    client.close()

    assert response.status_code == 429
    assert "用户 reporter_b 因连续 5 次登录失败已被锁定" in response.text
    assert "请在北京时间" in response.text


def test_real_totp_sign_in(real_admin_hub):
    """reviewer's role requires a second factor: enrol through the API, then sign in with the code."""
    hub = real_admin_hub
    password = hub.passwords["reviewer"]
    api = f"{hub.admin_api_url}/api/v1"

    client, unenrolled = hub.login("reviewer", password)
    client.close()
    enrolment = httpx.post(f"{api}/auth/totp/enrol", json={"username": "reviewer", "password": password}, timeout=30)
    assert enrolment.status_code == 200, enrolment.text
    generator = pyotp.TOTP(enrolment.json()["secret"])
    confirmed_at = time.time()
    confirm = httpx.post(
        f"{api}/auth/totp/confirm",
        json={"username": "reviewer", "password": password, "code": generator.at(confirmed_at)},
        timeout=30,
    )
    assert confirm.status_code == 204, confirm.text
    client, without_code = hub.login("reviewer", password)
    client.close()
    valid_codes = {generator.at(confirmed_at + offset) for offset in (-30, 0, 30, 60)}
    wrong_code = next(code for code in ("000000", "111111", "222222") if code not in valid_codes)
    client, with_wrong_code = hub.login("reviewer", password, wrong_code)
    client.close()
    # The code of the next 30-second step: the confirmed one cannot be used twice.
    client, signed_in = hub.login("reviewer", password, generator.at(confirmed_at + 30))
    client.close()

    assert unenrolled.status_code == 403
    assert "尚未绑定" in unenrolled.text
    assert f'id="totp_enrol_link" href="{hub.admin_api_url}/console/totp"' in unenrolled.text
    assert without_code.status_code == 401
    assert "已绑定动态验证码" in without_code.text
    assert with_wrong_code.status_code == 401
    assert "动态验证码错误或已过期" in with_wrong_code.text
    assert signed_in.status_code == 302
    with hub.api() as hub_api:
        assert hub_api.get("/users/reviewer").json()["groups"] == []


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_real_totp_login_form_in_chromium(real_admin_hub):
    """secadmin enrols a second factor, which its role does not require, then signs in through the form."""
    from playwright.sync_api import sync_playwright

    hub = real_admin_hub
    password = hub.passwords["secadmin"]
    api = f"{hub.admin_api_url}/api/v1"
    secret = httpx.post(f"{api}/auth/totp/enrol", json={"username": "secadmin", "password": password}, timeout=30)
    assert secret.status_code == 200, secret.text
    generator = pyotp.TOTP(secret.json()["secret"])
    confirmed_at = time.time()
    confirm = httpx.post(
        f"{api}/auth/totp/confirm",
        json={"username": "secadmin", "password": password, "code": generator.at(confirmed_at)},
        timeout=30,
    )
    assert confirm.status_code == 204, confirm.text
    valid_codes = {generator.at(confirmed_at + offset) for offset in (-30, 0, 30, 60)}
    wrong_code = next(code for code in ("000000", "111111", "222222") if code not in valid_codes)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{hub.hub_url}/hub/login")
            page.fill("#username_input", "secadmin")
            page.fill("#password_input", password)
            page.fill("#totp_input", wrong_code)
            page.click("#login_submit")
            page.wait_for_load_state()
            rejected_error = page.locator("p.login_error").inner_text()
            rejected_url = page.url

            page.fill("#password_input", password)
            page.fill("#totp_input", generator.at(confirmed_at + 30))
            page.click("#login_submit")
            page.wait_for_load_state()
            signed_in_url = page.url
            signed_in_text = page.locator("body").inner_text()
        finally:
            browser.close()

    assert "动态验证码错误或已过期" in rejected_error
    assert "/hub/login" in rejected_url
    assert "/hub/login" not in signed_in_url
    # secadmin may sign in to the hub but, not being a modeller, may not start a sandbox.
    assert "仅建模人员可以启动建模沙箱" in signed_in_text


# Users created through admin_api for the user sync


def _uscc(index: int) -> str:
    body = f"91310115MA1K5H{index:03d}"
    return body + uscc_number.calc_check_digit(body)


@dataclass
class SyncAccounts:
    passwords: dict[str, str]
    sysadmin: httpx.Client
    """Client of admin_api's API signed in as the system administrator."""


@pytest.fixture(scope="module")
def sync_accounts(real_admin_hub):
    """Institutions hubsync_a and hubsync_b and the modellers hubsync_m1 to _m4 of hubsync_a.

    m1 to m3 changed their administrator-issued password; m4 still has it.
    """
    hub = real_admin_hub
    sysadmin = httpx.Client(
        base_url=f"{hub.admin_api_url}/api/v1",
        headers={"Authorization": f"Bearer {hub.admin_api_token('sysadmin')}"},
        timeout=30,
    )
    for index, code in enumerate(("hubsync_a", "hubsync_b")):
        created = sysadmin.post(
            "/institutions", json={"code": code, "name": f"同步测试银行{index}", "type": "银行", "uscc": _uscc(index)}
        )
        assert created.status_code == 201, created.text
    passwords = {}
    for name in SYNC_USERS:
        created = sysadmin.post(
            "/users",
            json={"username": name, "display_name": f"同步测试{name[-2:]}", "email": f"{name}@hubsync.example",
                  "role": "modeller", "institution_code": "hubsync_a", "password": INITIAL_PASSWORD},
        )
        assert created.status_code == 201, created.text
        passwords[name] = INITIAL_PASSWORD
    for name in SYNC_USERS[:3]:
        new_password = f"Sync-{secrets.token_urlsafe(12)}-9a"
        changed = httpx.post(
            f"{hub.admin_api_url}/api/v1/auth/password",
            json={"username": name, "old_password": INITIAL_PASSWORD, "new_password": new_password},
            timeout=30,
        )
        assert changed.status_code == 204, changed.text
        passwords[name] = new_password
    yield SyncAccounts(passwords, sysadmin)
    sysadmin.close()


def test_real_issued_password_links_console(real_admin_hub, sync_accounts):
    hub = real_admin_hub

    client, response = hub.login("hubsync_m4", INITIAL_PASSWORD)
    client.close()

    assert response.status_code == 403
    assert "首次使用前必须修改" in response.text
    assert f'id="password_change_link" href="{hub.admin_api_url}/console/password"' in response.text


def start_server(hub, name: str, password: str) -> httpx.Client:
    """Sign in, start the server and open it once through the proxy; return the browser client."""
    client, response = hub.login(name, password)
    assert response.status_code == 302, response.text
    try:
        client.get(f"/hub/spawn/{name}", timeout=0.5)
    except httpx.TimeoutException:
        pass
    wait_until_ready(hub, name)
    opened = client.get(f"/user/{name}/lab", follow_redirects=True)
    assert opened.status_code == 200, opened.text[-2000:]
    return client


def wait_for_hub(hub, name: str, condition, what: str) -> float:
    """Poll the hub user ``name`` (None once deleted) until ``condition`` holds; return the seconds it took."""
    started = time.monotonic()
    with hub.api() as api:
        while time.monotonic() - started < PROPAGATION_BOUND:
            response = api.get(f"/users/{name}")
            model = response.json() if response.status_code == 200 else None
            if condition(model):
                return time.monotonic() - started
            time.sleep(0.2)
    pytest.fail(f"{what} not seen within {PROPAGATION_BOUND} s:\n{hub.hub_log.read_text()[-4000:]}")


def sync_events(hub, action: str, resource: str) -> list[dict]:
    return [event for event in hub.audit_events(action=action) if event["resource"] == resource]


def test_real_disable_stops_server_and_removes_hub_user(real_admin_hub, sync_accounts):
    hub = real_admin_hub
    client = start_server(hub, "hubsync_m1", sync_accounts.passwords["hubsync_m1"])
    assert client.get("/user/hubsync_m1/api/status").status_code == 200

    disabled = sync_accounts.sysadmin.post("/users/hubsync_m1/disable")
    assert disabled.status_code == 200, disabled.text
    seconds = wait_for_hub(hub, "hubsync_m1", lambda model: model is None, "removal of hubsync_m1")
    print(f"\nhub: disable to hub user removed in {seconds:.1f} s (sync interval {USER_SYNC_SECONDS} s)")

    server = client.get("/user/hubsync_m1/api/status")
    home = client.get("/hub/home")
    client.close()
    _, again = hub.login("hubsync_m1", sync_accounts.passwords["hubsync_m1"])
    stops = sync_events(hub, "sandbox.stop", "sandbox:hubsync_m1")
    removals = sync_events(hub, "hub.user_remove", "hub-user:hubsync_m1")

    assert seconds < PROPAGATION_BOUND
    assert singleuser_processes(UNIX_PREFIX + "hubsync_m1") == []
    assert server.status_code != 200
    assert home.status_code == 302
    assert "/hub/login" in home.headers["location"]
    assert again.status_code == 403
    assert "已被停用" in again.text
    assert [event["outcome"] for event in stops] == ["success"]
    assert stops[0]["institution_code"] == "hubsync_a"
    assert stops[0]["actor"] == "hub-user-sync"
    assert "账号已停用" in stops[0]["detail"]
    assert [event["outcome"] for event in removals] == ["success"]


def test_real_institution_change_moves_group_and_stops(real_admin_hub, sync_accounts):
    hub = real_admin_hub
    client = start_server(hub, "hubsync_m2", sync_accounts.passwords["hubsync_m2"])

    moved = sync_accounts.sysadmin.patch("/users/hubsync_m2", json={"institution_code": "hubsync_b"})
    assert moved.status_code == 200, moved.text
    seconds = wait_for_hub(
        hub, "hubsync_m2", lambda model: model["groups"] == ["hubsync_b"] and not model["servers"], "move of hubsync_m2"
    )
    print(f"\nhub: institution change to group moved and server stopped in {seconds:.1f} s")
    stops = sync_events(hub, "sandbox.stop", "sandbox:hubsync_m2")
    try:
        client.get("/hub/spawn/hubsync_m2", timeout=0.5)
    except httpx.TimeoutException:
        pass
    wait_until_ready(hub, "hubsync_m2")
    client.close()
    unix_user = UNIX_PREFIX + "hubsync_m2"
    environment = process_environment(singleuser_processes(unix_user)[0])

    assert seconds < PROPAGATION_BOUND
    assert [event["outcome"] for event in stops] == ["success"]
    assert "所属机构已由 hubsync_a 变更为 hubsync_b" in stops[0]["detail"]
    assert environment["REGSANDBOX_INSTITUTION"] == "hubsync_b"
    assert pwd.getpwnam(unix_user).pw_gid == os.stat(hub.settings.extracts_dir / "hubsync_b").st_gid


def test_real_role_change_stops_server(real_admin_hub, sync_accounts):
    hub = real_admin_hub
    client = start_server(hub, "hubsync_m3", sync_accounts.passwords["hubsync_m3"])

    changed = sync_accounts.sysadmin.patch("/users/hubsync_m3", json={"role": "reporter"})
    assert changed.status_code == 200, changed.text
    seconds = wait_for_hub(hub, "hubsync_m3", lambda model: not model["servers"], "stop of hubsync_m3")
    print(f"\nhub: role change to server stopped in {seconds:.1f} s")
    spawn = client.get("/hub/spawn/hubsync_m3")
    client.close()
    stops = sync_events(hub, "sandbox.stop", "sandbox:hubsync_m3")

    assert seconds < PROPAGATION_BOUND
    assert [event["outcome"] for event in stops] == ["success"]
    assert "角色已变更为 reporter" in stops[0]["detail"]
    assert spawn.status_code == 403, hub.hub_log.read_text()[-4000:]
    assert "仅建模人员可以启动建模沙箱" in spawn.text


def test_real_user_sync_logs_start(real_admin_hub):
    log = real_admin_hub.hub_log.read_text()

    assert "hub_config.user_sync: hub user sync started" in log
    assert "hub_config.user_sync: round failed" not in log
    assert real_admin_hub.secrets.service_token not in log
