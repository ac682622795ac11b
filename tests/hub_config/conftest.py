"""Fixtures that run a real JupyterHub (with configurable-http-proxy) against an admin_api stand-in."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from jupyterhub.spawner import set_user_setuid

from hub_config.hubfiles import hub_service_api_token
from tests.conftest import free_port
from tests.hub_config.admin_api_stub import PASSWORD as STUB_PASSWORD
from tests.hub_config.extract_files import write_extract
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import PlatformSecrets, ensure_platform_secrets
from regsandbox_core.settings import PROJECT_ROOT, Settings

UNIX_PREFIX = "rst-"
INSTITUTIONS = ("hubtest_a", "hubtest_b")
HUB_USERS = ("hub_alice", "hub_bob", "hub_rita", "hub_dora", "hub_erin")
SYNC_INSTITUTIONS = ("hubsync_a", "hubsync_b")
"""Institutions that the tests against the real admin_api create through its API."""
SYNC_USERS = ("hubsync_m1", "hubsync_m2", "hubsync_m3", "hubsync_m4")
"""Modellers that the tests against the real admin_api create, start and then disable or move."""
USER_SYNC_SECONDS = 2.0
"""Interval of the hub's user sync in these tests (the default is 15 s)."""
TOTP_REQUIRED_ROLES = '["regulator_reviewer"]'
"""Roles that need a second factor with the real admin_api; the auditor and sysadmin sign in with a password."""
HUB_OPERATOR = "rst-hubop"
"""Unix user that runs the hub in the unprivileged tests."""
VENV_BIN = Path(sys.executable).parent


def wait_for(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    """Poll ``url`` until it returns 200; fail with the process log when the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode} before {url} responded:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not respond within {timeout} s:\n{log.read_text()[-4000:]}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def remove_test_accounts() -> None:
    """Kill processes of the rst- test users, then delete those users and groups."""
    for unix_name in [UNIX_PREFIX + name for name in HUB_USERS + SYNC_USERS] + [HUB_OPERATOR]:
        try:
            uid = pwd.getpwnam(unix_name).pw_uid
        except KeyError:
            continue
        for pid in processes_of_uid(uid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        subprocess.run(["userdel", unix_name], check=False, capture_output=True)
    for code in INSTITUTIONS + SYNC_INSTITUTIONS:
        try:
            grp.getgrnam(UNIX_PREFIX + code)
        except KeyError:
            continue
        subprocess.run(["groupdel", UNIX_PREFIX + code], check=False, capture_output=True)


def processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                pids.append(int(entry.name))
        except FileNotFoundError:
            continue
    return pids


@dataclass
class HubFixture:
    settings: Settings
    secrets: PlatformSecrets
    hub_url: str
    admin_api_url: str
    service_token: str
    hub_log: Path
    audit_token: str
    """Bearer token that may read admin_api's audit log (service token for the stand-in, auditor for the real one)."""
    passwords: dict[str, str]
    """Passwords of the accounts stored in admin_api, by user name."""
    child_env: dict[str, str]
    """Environment (REGSANDBOX_* settings) with which the platform processes were started."""

    def api(self) -> httpx.Client:
        """Client of the hub REST API authenticated as the regsandbox hub service."""
        return httpx.Client(
            base_url=f"{self.hub_url}/hub/api",
            headers={"Authorization": f"token {self.service_token}"},
            timeout=30,
        )

    def audit_events(self, **filters: str) -> list[dict]:
        """Return the newest audit events, newest first; ``filters`` are query parameters such as ``action``."""
        response = httpx.get(
            f"{self.admin_api_url}/api/v1/audit/events",
            params=filters,
            headers={"Authorization": f"Bearer {self.audit_token}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()

    def login(self, username: str, password: str, totp: str = "") -> tuple[httpx.Client, httpx.Response]:
        """Sign in through the login form as a browser does; return the client (with cookies) and the response."""
        client = httpx.Client(base_url=self.hub_url, timeout=60)
        client.get("/hub/login")
        xsrf = client.cookies.get("_xsrf")
        response = client.post(
            "/hub/login",
            data={"username": username, "password": password, "totp": totp, "_xsrf": xsrf},
        )
        return client, response

    def admin_api_token(self, username: str) -> str:
        """Return an API token of an account of the real admin_api that signs in with its password only."""
        response = httpx.post(
            f"{self.admin_api_url}/api/v1/auth/token",
            json={"username": username, "password": self.passwords[username]},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["access_token"]


@pytest.fixture(scope="module")
def hub(request) -> HubFixture:
    """A running hub (as root) and admin_api stand-in on free ports with a fresh data dir under /tmp."""
    return start_platform(request, hub_unix_user=None)


@pytest.fixture(scope="module")
def unprivileged_hub(request) -> HubFixture:
    """Like ``hub``, but the hub runs as the ordinary Unix user ``rst-hubop``."""
    return start_platform(request, hub_unix_user=HUB_OPERATOR)


@pytest.fixture(scope="module")
def real_admin_hub(request) -> HubFixture:
    """A hub (as root) against the real admin_api with its demo accounts; modeller_c is disabled."""
    return start_platform(request, hub_unix_user=None, real_admin_api=True)


def _prepare_real_admin_api(env: dict[str, str]) -> dict[str, str]:
    """Migrate a fresh admin database, create the demo accounts, disable modeller_c; return the passwords.

    The three ``admin_api.manage`` commands run in one interpreter, which saves two start-ups.
    Only ``seed-demo`` writes to stdout: the JSON of the new accounts' passwords.
    """
    script = (
        "import sys\n"
        "from admin_api.manage import main\n"
        "sys.exit(main(['migrate']) or main(['seed-demo']) or main(['set-active', 'modeller_c', '--disable']))\n"
    )
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-c", script],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(f"preparing admin_api failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def start_platform(request, hub_unix_user: str | None, real_admin_api: bool = False) -> HubFixture:
    """Start admin_api (the stand-in or the real one) and the hub (as root or ``hub_unix_user``); stop both at teardown."""
    if os.geteuid() != 0:
        pytest.fail("the hub tests create Unix users and must run as root")
    remove_test_accounts()

    # Under /tmp (not pytest's 0700 tmp_path) so that sandbox users can traverse to their extract.
    data_dir = Path(tempfile.mkdtemp(prefix="rst-hub-", dir="/tmp"))
    os.chmod(data_dir, 0o711)
    home_root = data_dir / "homes"
    home_root.mkdir(mode=0o755)
    ports = {name: free_port() for name in ("ADMIN_API", "HUB", "HUB_API", "PROXY_API", "MLFLOW")}
    env = {key: value for key, value in os.environ.items() if not key.startswith("REGSANDBOX_")}
    env.update({f"REGSANDBOX_{name}_PORT": str(port) for name, port in ports.items()})
    env.update(
        {
            "REGSANDBOX_DATA_DIR": str(data_dir),
            "REGSANDBOX_UNIX_PREFIX": UNIX_PREFIX,
            "REGSANDBOX_SANDBOX_HOME_ROOT": str(home_root),
            "REGSANDBOX_SANDBOX_PYTHON": str(VENV_BIN / "python"),
            # The tests read the audit log as the audit admin with a password only.
            "REGSANDBOX_TOTP_REQUIRED_ROLES": TOTP_REQUIRED_ROLES if real_admin_api else "[]",
            "REGSANDBOX_HUB_USER_SYNC_SECONDS": str(USER_SYNC_SECONDS),
            "PYTHONPATH": str(PROJECT_ROOT),
        }
    )
    settings = Settings(
        data_dir=data_dir,
        unix_prefix=UNIX_PREFIX,
        sandbox_home_root=home_root,
        **{f"{name.lower()}_port": port for name, port in ports.items()},
    )
    secrets = ensure_platform_secrets(settings)
    ensure_platform_keys(settings, ["bank_a", "bank_b", "bank_c"], on_event=None)
    for code in INSTITUTIONS + SYNC_INSTITUTIONS:
        write_extract(settings, code)
    settings.logs_dir.mkdir(mode=0o700)
    settings.hub_dir.mkdir(mode=0o700)
    hub_preexec = None
    if hub_unix_user:
        subprocess.run(
            ["useradd", "--no-create-home", "--home-dir", str(settings.hub_dir), "--shell", "/usr/sbin/nologin", hub_unix_user],
            check=True,
        )
        subprocess.run(["chown", "-R", f"{hub_unix_user}:", str(data_dir)], check=True)
        # admin_api runs as root and the hub as the operator, but the master key file may belong to
        # one user only, so both take the master key from the environment.
        env["REGSANDBOX_MASTER_KEY"] = (settings.secrets_dir / "master.key").read_text(encoding="ascii").strip()
        hub_preexec = set_user_setuid(hub_unix_user, chdir=False)
        env["HOME"] = str(settings.hub_dir)

    processes: list[subprocess.Popen] = []
    logs = []

    def cleanup() -> None:
        for process in reversed(processes):
            stop_process(process)
        for handle in logs:
            handle.close()
        remove_test_accounts()
        shutil.rmtree(data_dir, ignore_errors=True)

    request.addfinalizer(cleanup)

    if real_admin_api:
        passwords = _prepare_real_admin_api(env)
        admin_command = [str(VENV_BIN / "uvicorn"), "admin_api.app:create_app", "--factory"]
    else:
        passwords = {name: STUB_PASSWORD for name in HUB_USERS}
        admin_command = [str(VENV_BIN / "uvicorn"), "--app-dir", str(Path(__file__).parent), "admin_api_stub:create_app", "--factory"]
    admin_log = settings.logs_dir / "admin_api.log"
    logs.append(admin_log.open("wb"))
    processes.append(
        subprocess.Popen(
            admin_command + ["--host", "127.0.0.1", "--port", str(ports["ADMIN_API"])],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
        )
    )
    wait_for(f"{settings.admin_api_url}/healthz", 30, processes[-1], admin_log)

    hub_log = settings.logs_dir / "jupyterhub.log"
    logs.append(hub_log.open("wb"))
    processes.append(
        subprocess.Popen(
            [str(VENV_BIN / "jupyterhub"), "-f", str(PROJECT_ROOT / "hub_config" / "jupyterhub_config.py")],
            cwd=settings.hub_dir,
            env=env,
            preexec_fn=hub_preexec,
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
        )
    )
    wait_for(f"{settings.hub_url}/hub/api/", 60, processes[-1], hub_log)

    audit_token = secrets.service_token
    if real_admin_api:
        response = httpx.post(
            f"{settings.admin_api_url}/api/v1/auth/token",
            json={"username": "auditor", "password": passwords["auditor"]},
            timeout=30,
        )
        response.raise_for_status()
        audit_token = response.json()["access_token"]

    return HubFixture(
        settings=settings,
        secrets=secrets,
        hub_url=settings.hub_url,
        admin_api_url=settings.admin_api_url,
        service_token=hub_service_api_token(secrets),
        hub_log=hub_log,
        audit_token=audit_token,
        passwords=passwords,
        child_env=env,
    )
