"""Decisions of the hub's user sync that need no hub: when a running server must stop.

The sync itself runs against a real hub and the real admin_api in test_hub_real_admin_api.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from hub_config.user_sync import auth_state_of, sandbox_mismatch

SPAWN_ROLES = frozenset({"modeller"})


def hub_user(groups: list[str], server: dict | None) -> dict:
    return {"name": "alice", "groups": groups, "servers": {"": server} if server is not None else {}}


def running(institution_code: str | None, pending: str | None = None) -> dict:
    state = {"pid": 123}
    if institution_code:
        state.update(institution_code=institution_code, role="modeller")
    return {"name": "", "ready": pending is None, "pending": pending, "state": state}


def account(role: str = "modeller", institution_code: str | None = "bank_a") -> dict:
    return {"username": "alice", "role": role, "institution_code": institution_code, "is_active": True,
            "display_name": "甲"}


@pytest.mark.parametrize(
    ("user", "record", "expected"),
    [
        (hub_user(["bank_a"], None), account(), None),
        (hub_user(["bank_a"], running("bank_a")), account(), None),
        (hub_user(["bank_a"], running("bank_a")), account(institution_code="bank_b"), "所属机构已由 bank_a 变更为 bank_b"),
        (hub_user(["bank_b"], running("bank_a")), account(institution_code="bank_b"), "所属机构已由 bank_a 变更为 bank_b"),
        (hub_user(["bank_a"], running("bank_a")), account(role="reporter"), "角色已变更为 reporter，该角色不能使用建模沙箱"),
        (hub_user(["bank_a"], running("bank_a", pending="spawn")), account(role="reporter"), None),
        (hub_user(["bank_a"], running("bank_a", pending="stop")), account(institution_code="bank_b"), None),
        (hub_user(["bank_a"], running(None)), account(), None),
        (hub_user(["bank_a"], running(None)), account(institution_code="bank_b"), "所属机构已变更为 bank_b"),
    ],
    ids=["no-server", "unchanged", "moved", "moved-group-already", "role-lost", "starting", "stopping",
         "old-state-same-group", "old-state-other-group"],
)
def test_sandbox_mismatch(user, record, expected):
    assert sandbox_mismatch(user, record, SPAWN_ROLES) == expected


def test_auth_state_of_regulator():
    state = auth_state_of(account(role="regulator_reviewer", institution_code=None))

    assert state == {"role": "regulator_reviewer", "institution_code": None, "display_name": "甲"}


def test_command_without_hub_environment_exits():
    completed = subprocess.run(
        [sys.executable, "-m", "hub_config.user_sync", "--interval", "0.5"],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 2
    assert "JUPYTERHUB_API_URL" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_command_rejects_bad_interval():
    completed = subprocess.run(
        [sys.executable, "-m", "hub_config.user_sync", "--interval", "-1"],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 2
    assert "--interval 必须为正数" in completed.stderr


def test_command_stops_when_the_hub_is_gone(tmp_path):
    """A sync left behind by a killed hub notices that its parent changed and exits within an interval."""
    import os
    import time
    from pathlib import Path

    from regsandbox_core.secrets import ensure_platform_secrets
    from regsandbox_core.settings import Settings

    ensure_platform_secrets(Settings(data_dir=tmp_path))
    env = {"PATH": "/usr/bin:/bin", "REGSANDBOX_DATA_DIR": str(tmp_path),
           "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api", "JUPYTERHUB_API_TOKEN": "unused"}
    # The stand-in hub starts the sync, waits until it runs and exits without stopping it, as a killed hub would.
    stand_in_hub = (
        "import pathlib, subprocess, sys, time\n"
        "log = pathlib.Path(sys.argv[1])\n"
        "p = subprocess.Popen([sys.executable, '-m', 'hub_config.user_sync', '--interval', '1'],"
        " stdout=subprocess.DEVNULL, stderr=log.open('w'))\n"
        "deadline = time.monotonic() + 30\n"
        "while 'hub user sync started' not in log.read_text() and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
        "print(p.pid)\n"
    )
    launcher = subprocess.run([sys.executable, "-c", stand_in_hub, str(tmp_path / "sync.log")],
                              env=env, capture_output=True, text=True, timeout=60, check=True)
    pid = int(launcher.stdout)

    def running() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    if running():
        os.kill(pid, 9)
    assert not running()
    assert "has exited without stopping this service" in (tmp_path / "sync.log").read_text()
