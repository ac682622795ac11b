"""Production spawner settings: one Docker container per modeller (DockerSpawner 14).

Load it after the main configuration from a site configuration file, for example::

    # /etc/regsandbox/jupyterhub_config.py
    load_subconfig("/opt/regsandbox/hub_config/jupyterhub_config.py")
    load_subconfig("/opt/regsandbox/sandbox_images/dockerspawner_config.py")

and start ``jupyterhub -f /etc/regsandbox/jupyterhub_config.py``. Isolation then comes from
containers instead of local Unix users:

- image ``regsandbox/sandbox`` built from ``sandbox_images/Dockerfile``;
- the institution's extract ``<data_dir>/extracts/<code>`` bind-mounted read-only at
  ``/srv/extract``, and no other institution's folder;
- the container joins only the Docker network ``regsandbox-<code>``, created with
  ``docker network create --internal regsandbox-<code>``. The hub and MLflow containers are
  attached to every such network. A sandbox thus reaches the hub and MLflow, but not the
  internet and not another institution's sandboxes;
- memory, CPU and process limits, no Linux capabilities, no privilege escalation;
- container labels naming the platform user and institution for operators and audits.

Roles are checked as in the local setup: only ``modeller`` may start a sandbox. The published
extract is verified as in the local setup too (manifest signature and table digests, see
:func:`hub_config.spawner.check_published_extract`); the hub reads it at its own
``<data_dir>/extracts``, so a hub in a container needs that folder mounted.
"""

import asyncio
import grp
import os

from hub_config.spawner import (
    MESSAGE_NO_ACCOUNT_STATE,
    MESSAGE_ROLE_DENIED,
    check_published_extract,
    extract_refusal,
    post_spawn_audit,
)
from jupyterhub.spawner import SpawnException
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.secrets import load_platform_secrets, mlflow_password
from regsandbox_core.settings import get_settings

c = get_config()  # noqa: F821 (injected by JupyterHub's config loader)

settings = get_settings()

SANDBOX_IMAGE = "regsandbox/sandbox:0.1.0"
EXTRACT_MOUNT = "/srv/extract"
TRUSTED_KEYS_MOUNT = "/srv/platform_signing_keys.json"
SPAWN_ROLES = {"modeller"}
AUDIT_TIMEOUT = 5.0
"""Seconds to wait for admin_api to store the audit event of a refused start."""
# Bind-mount sources are paths on the Docker host. When the hub itself runs in a container,
# its data dir differs from the host's: set REGSANDBOX_DOCKER_EXTRACTS_HOST_DIR to the host path.
EXTRACTS_HOST_DIR = os.environ.get("REGSANDBOX_DOCKER_EXTRACTS_HOST_DIR", str(settings.extracts_dir))
# Sandboxes reach MLflow by its container name on the institution network.
MLFLOW_URL_IN_SANDBOX = os.environ.get("REGSANDBOX_DOCKER_MLFLOW_URL", "http://regsandbox-mlflow:5000")


def format_institution_volume(template, spawner):
    """Fill ``{institution_code}`` (and DockerSpawner's usual fields) in a volume template.

    The institution code is set by :func:`assign_institution` before the container is created;
    a missing code raises, so no container ever starts with an unresolved mount.
    """
    code = spawner.environment.get("REGSANDBOX_INSTITUTION")
    if not code:
        raise SpawnException(MESSAGE_NO_ACCOUNT_STATE, reason="no_institution", status_code=403)
    return template.format(institution_code=code, **spawner.template_namespace())


async def assign_institution(spawner):
    """Reject non-modellers and point the container at the modeller's institution.

    Sets the environment, the institution network, the Unix group that may read the extract
    and the labels. Raises SpawnException (HTTP 403) for every role except ``modeller``, and
    (HTTP 500, audited ``denied``) when the institution's published extract does not verify.
    """
    auth_state = await spawner.user.get_auth_state() or {}
    role = auth_state.get("role")
    code = auth_state.get("institution_code")
    if role not in SPAWN_ROLES:
        spawner.log.warning("Rejecting spawn of %s: role %r may not start a sandbox", spawner.user.name, role)
        raise SpawnException(MESSAGE_ROLE_DENIED, reason="role_denied", status_code=403)
    if not code:
        raise SpawnException(MESSAGE_NO_ACCOUNT_STATE, reason="no_institution", status_code=403)

    # A tampered or incomplete extract must not be mounted.
    try:
        await asyncio.to_thread(check_published_extract, settings, code)
    except RegsandboxError as error:
        spawner.log.error("Rejecting spawn of %s: extract of %s does not verify: %s", spawner.user.name, code, error.code)
        refusal, detail = extract_refusal(code, error)
        await post_spawn_audit(spawner, settings.admin_api_url, AUDIT_TIMEOUT, "denied", role, code, detail)
        raise refusal from error

    # The extract is root:<prefix><code> 0750 on the host; the container user joins that group.
    try:
        extract_gid = grp.getgrnam(f"{settings.unix_prefix}{code}").gr_gid
    except KeyError as error:
        raise SpawnException(
            f"机构 {code} 的 Unix 组 {settings.unix_prefix}{code} 不存在，无法挂载数据提取。"
            "请系统管理员先运行 `python -m admin_api.manage extracts-build --unix-group-prefix "
            f"{settings.unix_prefix}` 生成该机构的数据提取。",
            reason="extract_group_missing",
            status_code=500,
        ) from error

    secrets = load_platform_secrets(settings)
    spawner.environment.update(
        {
            "REGSANDBOX_INSTITUTION": code,
            "REGSANDBOX_EXTRACT_DIR": EXTRACT_MOUNT,
            "REGSANDBOX_TRUSTED_KEYS": TRUSTED_KEYS_MOUNT,
            "MLFLOW_TRACKING_URI": MLFLOW_URL_IN_SANDBOX,
            "MLFLOW_TRACKING_USERNAME": spawner.user.name,
            "MLFLOW_TRACKING_PASSWORD": mlflow_password(secrets, spawner.user.name),
        }
    )
    spawner.network_name = f"regsandbox-{code}"
    spawner.extra_host_config = {**SANDBOX_HOST_CONFIG, "group_add": [str(extract_gid)]}
    spawner.extra_create_kwargs = {
        "labels": {
            "org.regsandbox.user": spawner.user.name,
            "org.regsandbox.institution": code,
        }
    }


c.JupyterHub.spawner_class = "dockerspawner.DockerSpawner"
c.DockerSpawner.image = SANDBOX_IMAGE
c.DockerSpawner.allowed_images = [SANDBOX_IMAGE]
# Images are built and loaded by the operator; the hub never pulls from a registry.
c.DockerSpawner.pull_policy = "never"
c.DockerSpawner.cmd = ["jupyterhub-singleuser"]
c.DockerSpawner.default_url = "/lab"
c.DockerSpawner.notebook_dir = "/home/modeller"
c.DockerSpawner.pre_spawn_hook = assign_institution

# Mounts: the extract read-only, the home in a named volume per user (kept across restarts).
c.DockerSpawner.format_volume_name = format_institution_volume
# The platform's public signing keys let the kernel helper verify the extract manifest.
c.DockerSpawner.read_only_volumes = {
    f"{EXTRACTS_HOST_DIR}/{{institution_code}}": EXTRACT_MOUNT,
    f"{EXTRACTS_HOST_DIR}/platform_signing_keys.json": TRUSTED_KEYS_MOUNT,
}
c.DockerSpawner.volumes = {"regsandbox-home-{username}": "/home/modeller"}

# Network: the hub must listen where containers on the institution networks can reach it.
c.DockerSpawner.use_internal_ip = True
c.JupyterHub.hub_ip = "0.0.0.0"
c.JupyterHub.hub_connect_ip = os.environ.get("REGSANDBOX_DOCKER_HUB_HOST", "regsandbox-hub")

# Resources. Example sizes for a credit-scoring workload; adjust to the host.
c.DockerSpawner.mem_limit = "4G"
c.DockerSpawner.cpu_limit = 2.0
SANDBOX_HOST_CONFIG = {
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
    "pids_limit": 512,
}
c.DockerSpawner.extra_host_config = SANDBOX_HOST_CONFIG
c.DockerSpawner.remove = True
c.Spawner.start_timeout = 120
