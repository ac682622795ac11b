"""Every platform service refuses to start without the right master key, with a Chinese message and no traceback."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regsandbox_core.secrets import ensure_platform_secrets
from regsandbox_core.settings import PROJECT_ROOT, Settings
from tests.conftest import free_port

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT = 90

SERVICES = {
    "admin_api": [sys.executable, "-m", "uvicorn", "admin_api.app:create_app", "--factory", "--host", "127.0.0.1"],
    "hub": [str(VENV_BIN / "jupyterhub"), "-f", str(PROJECT_ROOT / "hub_config" / "jupyterhub_config.py")],
    "scheduler": [sys.executable, "-m", "reporting.scheduler"],
    "registry_sync": [sys.executable, "-m", "model_registry.sync", "--loop", "30"],
    "mlflow": [sys.executable, "-m", "model_registry.server"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory after init's key and secrets step; each test removes or replaces the master key."""
    folder = tmp_path_factory.mktemp("data")
    environment_key = os.environ.pop("REGSANDBOX_MASTER_KEY", None)
    try:
        ensure_platform_secrets(Settings(data_dir=folder))
    finally:
        if environment_key is not None:
            os.environ["REGSANDBOX_MASTER_KEY"] = environment_key
    for name in ("hub", "mlflow"):
        (folder / name).mkdir(mode=0o700, exist_ok=True)
    return folder


def _start(service: str, data_dir: Path, master_key: str | None) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("REGSANDBOX_")}
    environment.update(
        REGSANDBOX_DATA_DIR=str(data_dir),
        REGSANDBOX_HOST="127.0.0.1",
        REGSANDBOX_ADMIN_API_PORT=str(free_port()),
        REGSANDBOX_HUB_PORT=str(free_port()),
        REGSANDBOX_HUB_API_PORT=str(free_port()),
        REGSANDBOX_PROXY_API_PORT=str(free_port()),
        REGSANDBOX_MLFLOW_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    if master_key is not None:
        environment["REGSANDBOX_MASTER_KEY"] = master_key
    argv = list(SERVICES[service])
    if service == "admin_api":
        argv += ["--port", environment["REGSANDBOX_ADMIN_API_PORT"]]
    # A service that wrongly starts is killed by the timeout, which fails the test.
    return subprocess.run(argv, env=environment, cwd=data_dir / "hub" if service == "hub" else PROJECT_ROOT,
                          capture_output=True, text=True, timeout=START_TIMEOUT)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_refuses_without_master_key_file(service: str, data_dir: Path) -> None:
    master = data_dir / "secrets" / "master.key"
    saved = master.read_bytes()
    master.unlink()
    try:
        result = _start(service, data_dir, None)
    finally:
        master.write_bytes(saved)
        master.chmod(0o600)

    assert result.returncode != 0, result.stderr
    assert f"主密钥文件 {master} 不存在" in result.stderr
    assert "REGSANDBOX_MASTER_KEY" in result.stderr
    assert "regsandbox init" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_refuses_wrong_master_key(service: str, data_dir: Path) -> None:
    wrong = base64.b64encode(b"wrong master key").decode("ascii")

    result = _start(service, data_dir, wrong)

    assert result.returncode != 0, result.stderr
    assert "密钥库由主密钥" in result.stderr  # the mismatch message names both master key ids
    assert "REGSANDBOX_MASTER_KEY" in result.stderr
    assert "Traceback" not in result.stderr
