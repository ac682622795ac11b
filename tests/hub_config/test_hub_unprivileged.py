"""InstitutionSpawner when the hub is not root: shared Unix user, with a warning."""

from __future__ import annotations

import os
import pwd
import stat

import httpx

from tests.hub_config.admin_api_stub import PASSWORD
from tests.hub_config.conftest import HUB_OPERATOR, UNIX_PREFIX
from tests.hub_config.test_hub import singleuser_processes, wait_until_ready


def test_unprivileged_hub_runs_server_as_itself(unprivileged_hub):
    hub = unprivileged_hub
    client, response = hub.login("hub_alice", PASSWORD)
    assert response.status_code == 302

    try:
        client.get("/hub/spawn/hub_alice", timeout=0.5)
    except httpx.TimeoutException:
        pass  # the hub goes on starting the server after the client stops waiting
    wait_until_ready(hub, "hub_alice")
    client.close()

    assert len(singleuser_processes(HUB_OPERATOR)) == 1
    home = hub.settings.hub_dir / "homes" / "hub_alice"
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert "institutions are NOT isolated" in hub.hub_log.read_text()
    assert UNIX_PREFIX + "hub_alice" not in {entry.pw_name for entry in pwd.getpwall()}


def test_unprivileged_hub_still_rejects_reporter(unprivileged_hub):
    client, response = unprivileged_hub.login("hub_rita", PASSWORD)
    assert response.status_code == 302

    spawn = client.get("/hub/spawn/hub_rita")
    client.close()

    assert spawn.status_code == 403
    assert "仅建模人员可以启动建模沙箱" in spawn.text


def test_unprivileged_hub_runs_user_sync(unprivileged_hub):
    """The user sync runs as the hub's Unix user and reads the platform secrets from the environment."""
    log = unprivileged_hub.hub_log.read_text()

    assert "hub_config.user_sync: hub user sync started" in log
    assert "hub user sync not started" not in log
    assert "hub_config.user_sync: round failed" not in log
