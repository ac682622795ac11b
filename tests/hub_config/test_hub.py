"""JupyterHub with AdminApiAuthenticator and InstitutionSpawner, run for real as root."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import stat
import subprocess
import time

import httpx
import pytest
from tornado import web

from hub_config.authenticator import AdminApiAuthenticator
from tests.hub_config.admin_api_stub import PASSWORD
from tests.conftest import free_port
from tests.hub_config.conftest import UNIX_PREFIX, VENV_BIN, processes_of_uid

SPAWN_TIMEOUT = 45


def wait_until_ready(hub, name: str) -> dict:
    deadline = time.monotonic() + SPAWN_TIMEOUT
    with hub.api() as api:
        while time.monotonic() < deadline:
            model = api.get(f"/users/{name}").json()
            server = model["servers"].get("")
            if server and server["ready"]:
                return model
            if not model["pending"] and not server:
                pytest.fail(f"server of {name} stopped while starting:\n{hub.hub_log.read_text()[-4000:]}")
            time.sleep(0.3)
    pytest.fail(f"server of {name} not ready within {SPAWN_TIMEOUT} s:\n{hub.hub_log.read_text()[-4000:]}")


def wait_until_stopped(hub, name: str) -> None:
    deadline = time.monotonic() + SPAWN_TIMEOUT
    with hub.api() as api:
        api.delete(f"/users/{name}/server")
        while time.monotonic() < deadline:
            model = api.get(f"/users/{name}").json()
            if not model["servers"] and not model["pending"]:
                return
            time.sleep(0.3)
    pytest.fail(f"server of {name} did not stop within {SPAWN_TIMEOUT} s")


def run_as(unix_user: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", unix_user, "--", str(VENV_BIN / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def singleuser_processes(unix_user: str) -> list[int]:
    uid = pwd.getpwnam(unix_user).pw_uid
    found = []
    for pid in processes_of_uid(uid):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except FileNotFoundError:
            continue
        if b"jupyterhub-singleuser" in cmdline:
            found.append(pid)
    return found


def process_environment(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_login_puts_user_in_institution_group(hub):
    client, response = hub.login("hub_alice", PASSWORD)
    cookies = set(client.cookies.keys())
    client.close()

    assert response.status_code == 302
    assert "jupyterhub-hub-login" in cookies
    with hub.api() as api:
        user = api.get("/users/hub_alice").json()
        group = api.get("/groups/hubtest_a").json()
    assert user["groups"] == ["hubtest_a"]
    assert user["admin"] is False
    assert "hub_alice" in group["users"]


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("hub_alice", "wrong-password", "用户名或密码错误"),
        ("hub_nobody", PASSWORD, "用户名或密码错误"),
        ("hub_dora", PASSWORD, "账号已停用"),
        ("hub_erin", PASSWORD, "的密码已超过 90 天未修改，已过期"),
    ],
)
def test_login_rejected_with_chinese_reason(hub, username, password, message):
    client, response = hub.login(username, password)
    cookies = set(client.cookies.keys())
    client.close()

    assert response.status_code == 403
    assert message in response.text
    assert "用户名" in response.text
    assert "jupyterhub-hub-login" not in cookies


def test_login_page_in_chinese(hub):
    response = httpx.get(f"{hub.hub_url}/hub/login", timeout=30)

    assert response.status_code == 200
    for text in ("用户名", "密码", "动态验证码", "登录"):
        assert text in response.text
    assert 'name="totp"' in response.text


def test_expired_password_links_console(hub):
    client, response = hub.login("hub_erin", PASSWORD)
    client.close()

    assert response.status_code == 403
    assert f'id="password_change_link" href="{hub.admin_api_url}/console/password"' in response.text
    assert 'id="totp_enrol_link"' not in response.text


def test_overlong_totp_rejected_without_echo(hub):
    code = "9" * 17

    client, response = hub.login("hub_alice", PASSWORD, code)
    client.close()

    assert response.status_code == 400
    assert "动态验证码格式无效" in response.text
    assert code not in response.text


def test_reporter_cannot_spawn(hub):
    client, response = hub.login("hub_rita", PASSWORD)
    assert response.status_code == 302

    spawn = client.get("/hub/spawn/hub_rita")
    client.close()

    assert spawn.status_code == 403
    assert "仅建模人员可以启动建模沙箱" in spawn.text
    with hub.api() as api:
        assert api.get("/users/hub_rita").json()["servers"] == {}
    denied = [event for event in hub.audit_events() if event["actor"] == "hub_rita"]
    assert len(denied) == 1
    assert denied[0]["action"] == "sandbox.spawn"
    assert denied[0]["outcome"] == "denied"
    assert denied[0]["institution_code"] == "hubtest_a"
    assert denied[0]["role"] == "reporter"
    assert denied[0]["service"] == "hub"
    assert not pwd_exists(UNIX_PREFIX + "hub_rita")


def pwd_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def running_sandboxes(hub):
    """Servers of hub_alice (hubtest_a) and hub_bob (hubtest_b), started through the browser flow."""
    clients = []
    for name in ("hub_alice", "hub_bob"):
        client, response = hub.login(name, PASSWORD)
        assert response.status_code == 302
        clients.append(client)
    # The hub keeps starting a server after the browser stops waiting, so both start in parallel.
    for client, name in zip(clients, ("hub_alice", "hub_bob")):
        try:
            client.get(f"/hub/spawn/{name}", timeout=0.5)
        except httpx.TimeoutException:
            pass
    models = {name: wait_until_ready(hub, name) for name in ("hub_alice", "hub_bob")}
    yield models
    with hub.api() as api:
        for name in models:
            api.delete(f"/users/{name}/server")
    for client in clients:
        client.close()


def test_modeller_server_runs_as_own_unix_user(hub, running_sandboxes):
    account = pwd.getpwnam(UNIX_PREFIX + "hub_alice")
    group = grp.getgrnam(UNIX_PREFIX + "hubtest_a")

    pids = singleuser_processes(UNIX_PREFIX + "hub_alice")

    assert len(pids) == 1
    assert account.pw_gid == group.gr_gid
    assert account.pw_uid != 0
    assert account.pw_shell == "/usr/sbin/nologin"
    assert os.getgrouplist(account.pw_name, account.pw_gid) == [group.gr_gid]


def test_supplementary_group_removed_on_spawn(hub):
    """A sandbox user added to another institution's group loses that group at the next start."""
    client, response = hub.login("hub_alice", PASSWORD)
    assert response.status_code == 302
    wait_until_stopped(hub, "hub_alice")
    subprocess.run(["usermod", "--append", "--groups", UNIX_PREFIX + "hubtest_b", UNIX_PREFIX + "hub_alice"], check=True)

    try:
        client.get("/hub/spawn/hub_alice", timeout=0.5)
    except httpx.TimeoutException:
        pass
    wait_until_ready(hub, "hub_alice")
    client.close()

    account = pwd.getpwnam(UNIX_PREFIX + "hub_alice")
    assert os.getgrouplist(account.pw_name, account.pw_gid) == [account.pw_gid]
    result = run_as(UNIX_PREFIX + "hub_alice", f"import os\ntry:\n    os.listdir({str(hub.settings.extracts_dir / 'hubtest_b')!r})\nexcept PermissionError:\n    print('denied')")
    assert result.stdout.strip() == "denied"


def test_modeller_home_private(hub, running_sandboxes):
    account = pwd.getpwnam(UNIX_PREFIX + "hub_alice")
    info = os.stat(account.pw_dir)

    assert account.pw_dir == str(hub.settings.sandbox_home_root / (UNIX_PREFIX + "hub_alice"))
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == account.pw_uid


def test_extract_folder_group_permissions(hub, running_sandboxes):
    for code in ("hubtest_a", "hubtest_b"):
        info = os.stat(hub.settings.extracts_dir / code)
        assert stat.S_IMODE(info.st_mode) == 0o750
        assert info.st_uid == 0
        assert info.st_gid == grp.getgrnam(UNIX_PREFIX + code).gr_gid


@pytest.mark.parametrize(("unix_user", "own", "other"), [("hub_alice", "hubtest_a", "hubtest_b"), ("hub_bob", "hubtest_b", "hubtest_a")])
def test_sandbox_reads_only_own_extract(hub, running_sandboxes, unix_user, own, other):
    extracts = hub.settings.extracts_dir
    code = (
        f"print(open({str(extracts / own / 'applications.parquet')!r}).read())\n"
        "try:\n"
        f"    open({str(extracts / other / 'applications.parquet')!r}).read()\n"
        "except PermissionError:\n"
        "    print('denied-file')\n"
        "try:\n"
        f"    __import__('os').listdir({str(extracts / other)!r})\n"
        "except PermissionError:\n"
        "    print('denied-folder')\n"
    )

    result = run_as(UNIX_PREFIX + unix_user, code)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"extract of {own}"
    assert "denied-file" in lines
    assert "denied-folder" in lines


def test_sandbox_cannot_list_other_home(hub, running_sandboxes):
    other_home = pwd.getpwnam(UNIX_PREFIX + "hub_bob").pw_dir

    result = run_as(UNIX_PREFIX + "hub_alice", f"import os\ntry:\n    os.listdir({other_home!r})\nexcept PermissionError:\n    print('denied')")

    assert result.stdout.strip() == "denied"


def test_sandbox_environment_has_no_platform_secrets(hub, running_sandboxes):
    from regsandbox_core.secrets import mlflow_password

    pid = singleuser_processes(UNIX_PREFIX + "hub_alice")[0]
    env = process_environment(pid)
    secret_values = set(vars(hub.secrets).values())

    assert env["REGSANDBOX_EXTRACT_DIR"] == str(hub.settings.extracts_dir / "hubtest_a")
    assert env["REGSANDBOX_INSTITUTION"] == "hubtest_a"
    assert env["MLFLOW_TRACKING_URI"] == hub.settings.mlflow_url
    assert env["MLFLOW_TRACKING_USERNAME"] == "hub_alice"
    assert env["MLFLOW_TRACKING_PASSWORD"] == mlflow_password(hub.secrets, "hub_alice")
    assert env["HOME"] == pwd.getpwnam(UNIX_PREFIX + "hub_alice").pw_dir
    assert env["PATH"].split(":")[0] == str(VENV_BIN)
    assert not secret_values & set(env.values())
    assert not [key for key in env if key.startswith("REGSANDBOX_") and key not in ("REGSANDBOX_EXTRACT_DIR", "REGSANDBOX_INSTITUTION")]


def test_spawn_audited_as_success(hub, running_sandboxes):
    events = [event for event in hub.audit_events() if event["actor"] == "hub_alice"]

    assert events
    assert {event["outcome"] for event in events} == {"success"}
    assert events[0]["institution_code"] == "hubtest_a"


def test_authenticator_reports_admin_api_down():
    authenticator = AdminApiAuthenticator(
        admin_api_url=f"http://127.0.0.1:{free_port()}", service_token="unused", request_timeout=3
    )

    with pytest.raises(web.HTTPError) as raised:
        asyncio.run(authenticator.authenticate(None, {"username": "hub_alice", "password": PASSWORD}))

    assert raised.value.status_code == 503
    assert "身份认证服务暂时不可用" in raised.value.log_message
