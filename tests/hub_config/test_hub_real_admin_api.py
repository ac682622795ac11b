"""The hub against the real admin_api: the login check and audit events of the HTTP contract.

Spawning modellers is covered with the stand-in (test_hub.py), whose institution names
cannot collide with Unix groups that other tests create for the demo institutions.
"""

from __future__ import annotations

import pwd
import subprocess

from tests.hub_config.conftest import PROJECT_ROOT, UNIX_PREFIX, VENV_BIN


def test_real_login_sets_institution_group(real_admin_hub):
    hub = real_admin_hub
    client, response = hub.login("modeller_a", hub.passwords["modeller_a"])
    client.close()

    assert response.status_code == 302
    with hub.api() as api:
        assert api.get("/users/modeller_a").json()["groups"] == ["bank_a"]


def test_real_regulator_has_no_group(real_admin_hub):
    hub = real_admin_hub
    client, response = hub.login("reviewer", hub.passwords["reviewer"])
    client.close()

    assert response.status_code == 302
    with hub.api() as api:
        assert api.get("/users/reviewer").json()["groups"] == []


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
    assert "账号已停用" in response.text


def test_real_reporter_spawn_denied_and_audited(real_admin_hub):
    hub = real_admin_hub
    client, response = hub.login("reporter_a", hub.passwords["reporter_a"])
    assert response.status_code == 302

    spawn = client.get("/hub/spawn/reporter_a")
    client.close()

    assert spawn.status_code == 403
    assert "仅建模人员可以启动建模沙箱" in spawn.text
    events = [event for event in hub.audit_events() if event["action"] == "sandbox.spawn"]
    assert len(events) == 1
    assert events[0]["actor"] == "reporter_a"
    assert events[0]["outcome"] == "denied"
    assert events[0]["role"] == "reporter"
    assert events[0]["institution_code"] == "bank_a"


def test_real_account_disabled_after_login_cannot_spawn(real_admin_hub):
    hub = real_admin_hub
    client, response = hub.login("modeller_b", hub.passwords["modeller_b"])
    assert response.status_code == 302
    disable = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "admin_api.manage", "set-active", "modeller_b", "--disable"],
        env=hub.child_env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert disable.returncode == 0, disable.stderr

    spawn = client.get("/hub/spawn/modeller_b")
    client.close()

    assert spawn.status_code == 403
    assert UNIX_PREFIX + "modeller_b" not in {entry.pw_name for entry in pwd.getpwall()}
