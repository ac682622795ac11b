"""A real MLflow tracking server with the basic-auth app, started once per test module."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from model_registry.client import MlflowAdmin
from model_registry.server import ADMIN_USERNAME, prepare_server, wait_until_ready
from regsandbox_core.secrets import PlatformSecrets, ensure_platform_secrets
from regsandbox_core.settings import Settings
from tests.conftest import free_port


@dataclass
class RunningMlflow:
    settings: Settings
    secrets: PlatformSecrets
    url: str
    log_path: Path

    def admin(self) -> MlflowAdmin:
        return MlflowAdmin(self.url, ADMIN_USERNAME, self.secrets.mlflow_admin_password)

    def user_client(self, username: str, password: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=(username, password), timeout=10)


def _stop_group(process: subprocess.Popen) -> None:
    """Stop the server and its workers: they run in a process group of their own, led by ``process``."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMlflow]:
    data_dir = tmp_path_factory.mktemp("mlflow-data")
    settings = Settings(data_dir=data_dir, mlflow_port=free_port(), admin_api_port=free_port())
    secrets = ensure_platform_secrets(settings)
    argv, env = prepare_server(settings, secrets)
    log_path = data_dir / "mlflow-server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=data_dir
        )
    try:
        try:
            wait_until_ready(settings.mlflow_url, timeout=90)
        except Exception:
            print(log_path.read_text(errors="replace")[-4000:])
            raise
        yield RunningMlflow(settings, secrets, settings.mlflow_url, log_path)
    finally:
        _stop_group(process)
