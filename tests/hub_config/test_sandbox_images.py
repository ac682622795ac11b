"""Production sandbox configuration files: loadable, read-only extract mount, image set."""

from __future__ import annotations

import asyncio
import grp
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from jupyterhub.spawner import SpawnException
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from regsandbox_core.secrets import ensure_platform_secrets, mlflow_password
from regsandbox_core.settings import PROJECT_ROOT, Settings, get_settings

SANDBOX_IMAGES = PROJECT_ROOT / "sandbox_images"


@pytest.fixture()
def docker_config(tmp_path, monkeypatch) -> Config:
    monkeypatch.setenv("REGSANDBOX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("REGSANDBOX_UNIX_PREFIX", "rst-")
    get_settings.cache_clear()
    ensure_platform_secrets(Settings(data_dir=tmp_path))
    config = PyFileConfigLoader("dockerspawner_config.py", path=str(SANDBOX_IMAGES)).load_config()
    yield config
    get_settings.cache_clear()


class FakeUser:
    def __init__(self, name: str, auth_state: dict) -> None:
        self.name = name
        self._auth_state = auth_state

    async def get_auth_state(self) -> dict:
        return self._auth_state


def make_spawner(name: str, auth_state: dict) -> SimpleNamespace:
    import logging

    return SimpleNamespace(
        user=FakeUser(name, auth_state),
        environment={},
        log=logging.getLogger("test"),
        template_namespace=lambda: {"username": name},
    )


def test_docker_config_image_and_spawner(docker_config):
    spawner_config = docker_config.DockerSpawner

    assert docker_config.JupyterHub.spawner_class == "dockerspawner.DockerSpawner"
    assert spawner_config.image == "regsandbox/sandbox:0.1.0"
    assert spawner_config.allowed_images == [spawner_config.image]
    assert spawner_config.mem_limit == "4G"
    assert spawner_config.cpu_limit == 2.0
    assert spawner_config.extra_host_config["cap_drop"] == ["ALL"]


def test_docker_config_extract_mounted_read_only(docker_config, tmp_path):
    spawner_config = docker_config.DockerSpawner
    templates = dict(spawner_config.read_only_volumes)

    assert list(templates.values()) == ["/srv/extract", "/srv/platform_signing_keys.json"]
    assert all("/srv/extract" not in target for target in spawner_config.volumes.values())
    spawner = make_spawner("hub_alice", {})
    spawner.environment["REGSANDBOX_INSTITUTION"] = "hubtest_a"
    source = spawner_config.format_volume_name(next(iter(templates)), spawner)
    assert source == str(tmp_path / "extracts" / "hubtest_a")


def test_docker_config_volume_without_institution_fails(docker_config):
    spawner = make_spawner("hub_alice", {})

    with pytest.raises(SpawnException):
        docker_config.DockerSpawner.format_volume_name("/x/{institution_code}", spawner)


def test_docker_hook_rejects_reporter(docker_config):
    spawner = make_spawner("hub_rita", {"role": "reporter", "institution_code": "hubtest_a"})

    with pytest.raises(SpawnException) as raised:
        asyncio.run(docker_config.DockerSpawner.pre_spawn_hook(spawner))

    assert raised.value.status_code == 403
    assert raised.value.message == "仅建模人员可以启动建模沙箱"


def test_docker_hook_assigns_institution(docker_config, tmp_path):
    group = "rst-hubtest_a"
    subprocess.run(["groupadd", group], check=True)
    try:
        spawner = make_spawner("hub_alice", {"role": "modeller", "institution_code": "hubtest_a"})
        asyncio.run(docker_config.DockerSpawner.pre_spawn_hook(spawner))
        gid = grp.getgrnam(group).gr_gid
    finally:
        subprocess.run(["groupdel", group], check=True)

    secrets = ensure_platform_secrets(Settings(data_dir=tmp_path))
    assert spawner.network_name == "regsandbox-hubtest_a"
    assert spawner.extra_host_config["group_add"] == [str(gid)]
    assert spawner.extra_host_config["security_opt"] == ["no-new-privileges"]
    assert spawner.extra_create_kwargs["labels"]["org.regsandbox.institution"] == "hubtest_a"
    assert spawner.environment["REGSANDBOX_EXTRACT_DIR"] == "/srv/extract"
    assert spawner.environment["MLFLOW_TRACKING_PASSWORD"] == mlflow_password(secrets, "hub_alice")
    assert secrets.service_token not in spawner.environment.values()


def test_kubespawner_values_mount_read_only():
    values = yaml.safe_load((SANDBOX_IMAGES / "z2jh-values.yaml").read_text(encoding="utf-8"))
    hook = values["hub"]["extraConfig"]["regsandbox"]

    assert values["singleuser"]["image"]["name"] == "regsandbox/sandbox"
    assert '"readOnly": True' in hook
    assert "regsandbox-extract-" in hook
    compile(hook, "extraConfig.regsandbox", "exec")
    assert values["singleuser"]["networkPolicy"]["egressAllowRules"]["nonPrivateIPs"] is False


def test_dockerfile_runs_singleuser_unprivileged():
    dockerfile = (SANDBOX_IMAGES / "Dockerfile").read_text(encoding="utf-8")

    assert '"jupyterhub==6.1.1"' in dockerfile
    assert "USER ${SANDBOX_UID}" in dockerfile
    assert 'CMD ["jupyterhub-singleuser"]' in dockerfile
    assert "regsandbox_kernel.install" in dockerfile
