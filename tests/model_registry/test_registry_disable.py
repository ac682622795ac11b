"""A disabled user loses MLflow access: real admin_api, real MLflow and the sync loop as ``make up`` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import mlflow_password
from regsandbox_core.settings import PROJECT_ROOT
from tests.hub_config.conftest import _prepare_real_admin_api, stop_process, wait_for
from tests.model_registry.conftest import RunningMlflow

SYNC_SECONDS = 2.0
"""Interval of the sync loop in this test (REGSANDBOX_REGISTRY_SYNC_SECONDS; the default is 15 s)."""
PROPAGATION_BOUND = 60.0
VENV_BIN = Path(sys.executable).parent


@dataclass
class Platform:
    mlflow: RunningMlflow
    admin_api_url: str
    passwords: dict[str, str]
    sync_log: Path


@pytest.fixture(scope="module")
def platform(mlflow_server: RunningMlflow) -> Iterator[Platform]:
    """admin_api with the demo accounts and ``python -m model_registry.sync --loop`` next to the MLflow server."""
    settings = mlflow_server.settings
    ensure_platform_keys(settings, ["bank_a", "bank_b", "bank_c"], on_event=None)
    env = {key: value for key, value in os.environ.items() if not key.startswith("REGSANDBOX_")}
    env.update({
        "REGSANDBOX_DATA_DIR": str(settings.data_dir),
        "REGSANDBOX_ADMIN_API_PORT": str(settings.admin_api_port),
        "REGSANDBOX_MLFLOW_PORT": str(settings.mlflow_port),
        "REGSANDBOX_TOTP_REQUIRED_ROLES": "[]",
        "REGSANDBOX_REGISTRY_SYNC_SECONDS": str(SYNC_SECONDS),
        "PYTHONPATH": str(PROJECT_ROOT),
    })
    passwords = _prepare_real_admin_api(env)
    processes: list[subprocess.Popen] = []
    logs = []
    try:
        admin_log = settings.data_dir / "admin_api.log"
        logs.append(admin_log.open("wb"))
        processes.append(subprocess.Popen(
            [str(VENV_BIN / "uvicorn"), "admin_api.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(settings.admin_api_port)],
            cwd=PROJECT_ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
        ))
        wait_for(f"{settings.admin_api_url}/healthz", 30, processes[-1], admin_log)

        sync_log = settings.data_dir / "registry_sync.log"
        logs.append(sync_log.open("wb"))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "model_registry.sync", "--loop"],
            cwd=PROJECT_ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
        ))
        yield Platform(mlflow_server, settings.admin_api_url, passwords, sync_log)
    finally:
        for process in reversed(processes):
            stop_process(process)
        for handle in logs:
            handle.close()


def wait_for_status(client: httpx.Client, status: int, what: str, log: Path) -> float:
    """Poll MLflow as ``client`` until a request returns ``status``; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < PROPAGATION_BOUND:
        response = client.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "bank_a/sandbox"})
        if response.status_code == status:
            return time.monotonic() - started
        time.sleep(0.2)
    pytest.fail(f"{what} not seen within {PROPAGATION_BOUND} s:\n{log.read_text()[-4000:]}")


def test_disabled_user_loses_mlflow_access(platform: Platform) -> None:
    mlflow = platform.mlflow
    modeller = mlflow.user_client("modeller_a", mlflow_password(mlflow.secrets, "modeller_a"))
    wait_for_status(modeller, 200, "MLflow access of modeller_a", platform.sync_log)
    token = httpx.post(
        f"{platform.admin_api_url}/api/v1/auth/token",
        json={"username": "sysadmin", "password": platform.passwords["sysadmin"]},
        timeout=30,
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}

    disabled = httpx.post(f"{platform.admin_api_url}/api/v1/users/modeller_a/disable", headers=headers, timeout=30)
    assert disabled.status_code == 200, disabled.text
    lost = wait_for_status(modeller, 401, "401 for disabled modeller_a", platform.sync_log)
    print(f"\nmlflow: disable to 401 in {lost:.1f} s (sync interval {SYNC_SECONDS} s)")
    enabled = httpx.post(f"{platform.admin_api_url}/api/v1/users/modeller_a/enable", headers=headers, timeout=30)
    assert enabled.status_code == 200, enabled.text
    regained = wait_for_status(modeller, 200, "MLflow access of re-enabled modeller_a", platform.sync_log)
    modeller.close()
    log = platform.sync_log.read_text()

    assert lost < PROPAGATION_BOUND
    assert regained < PROPAGATION_BOUND
    assert "model_registry.sync: deleted MLflow user 'modeller_a'" in log
    assert "model_registry.sync: created MLflow user 'modeller_a'" in log
    assert mlflow_password(mlflow.secrets, "modeller_a") not in log
    assert mlflow.secrets.service_token not in log
