"""Command line and configuration of the MLflow tracking server with its basic-auth app.

``python -m model_registry.server`` replaces itself with ``mlflow server`` (the launcher runs it).
Everything the server stores lives under ``<data_dir>/mlflow`` (mode 0700): the tracking database
``mlflow.db``, the auth database ``basic_auth.db``, the auth configuration ``basic_auth.ini`` and
the uploaded artifacts.
"""

from __future__ import annotations

import configparser
import io
import logging
import os
import sys
import time
from pathlib import Path

import httpx

from regsandbox_core.errors import ConfigurationError, RegsandboxError
from regsandbox_core.logs import configure_logging
from regsandbox_core.secrets import PlatformSecrets, load_platform_secrets, write_private_file
from regsandbox_core.settings import Settings, get_settings

log = logging.getLogger(__name__)

ADMIN_USERNAME = "admin"
AUTH_CACHE_TTL_SECONDS = 30

# Variables that would loosen the server's checks or point it elsewhere if the launcher's own
# environment carried them; the child gets them only from prepare_server.
_REMOVED_ENV = (
    "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE",
    "MLFLOW_SERVER_ALLOWED_HOSTS",
    "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS",
    "MLFLOW_ENABLE_WORKSPACES",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def mlflow_paths(settings: Settings) -> dict[str, Path]:
    """Return the files and folders of the MLflow server under the data directory."""
    root = settings.mlflow_dir
    return {
        "root": root,
        "backend_db": root / "mlflow.db",
        "auth_db": root / "basic_auth.db",
        "auth_ini": root / "basic_auth.ini",
        "artifacts": root / "artifacts",
    }


def write_auth_config(settings: Settings) -> Path:
    """Write ``basic_auth.ini`` (mode 0600) and return its path.

    Users without a grant get no access (``NO_PERMISSIONS``; MLflow's default is READ for
    everyone). The auth database path is absolute because MLflow resolves a relative SQLite
    path against the server's working directory. The admin password is not written here: it is
    passed in ``MLFLOW_AUTH_ADMIN_PASSWORD``, which MLflow 3.17 prefers over ``admin_password``.
    """
    paths = mlflow_paths(settings)
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",
        "database_uri": f"sqlite:///{paths['auth_db']}",
        "admin_username": ADMIN_USERNAME,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
        # Each credential check is a scrypt hash (N=32768) paid by every request, so successful
        # checks are cached. A password change or deletion clears the entry on the worker that
        # handled it. Other workers keep accepting the old credential for at most this TTL.
        "auth_cache_ttl_seconds": str(AUTH_CACHE_TTL_SECONDS),
    }
    buffer = io.StringIO()
    config.write(buffer)
    write_private_file(paths["auth_ini"], buffer.getvalue().encode("utf-8"))
    return paths["auth_ini"]


def _mlflow_command() -> list[str]:
    script = Path(sys.executable).parent / "mlflow"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mlflow"]


def prepare_server(settings: Settings, secrets: PlatformSecrets) -> tuple[list[str], dict[str, str]]:
    """Create ``<data_dir>/mlflow`` and the auth ini; return the argv and the full child environment.

    The server listens on 127.0.0.1 only and accepts only ``Host`` headers naming the loopback
    address (MLflow's default also accepts private network ranges). Artifacts are uploaded
    through the server (``--artifacts-destination``), so clients never write to the folder.
    """
    paths = mlflow_paths(settings)
    paths["root"].mkdir(parents=True, exist_ok=True)
    os.chmod(paths["root"], 0o700)
    paths["artifacts"].mkdir(exist_ok=True)
    write_auth_config(settings)

    port = settings.mlflow_port
    allowed_hosts = ",".join(
        [f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "localhost"]
    )
    argv = [
        *_mlflow_command(),
        "server",
        "--app-name", "basic-auth",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{paths['backend_db']}",
        "--artifacts-destination", str(paths["artifacts"]),
        "--workers", str(settings.mlflow_workers),
        "--allowed-hosts", allowed_hosts,
    ]

    env = {name: value for name, value in os.environ.items() if name not in _REMOVED_ENV}
    env.update(
        {
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.mlflow_flask_secret,
            "MLFLOW_AUTH_CONFIG_PATH": str(paths["auth_ini"]),
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN_USERNAME,
            "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.mlflow_admin_password,
            # The server must not report usage to an outside host.
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
    )
    return argv, env


def wait_until_ready(url: str, timeout: float = 60.0) -> None:
    """Poll ``<url>/health`` until the server returns HTTP 200.

    Raises :class:`RegsandboxError` ``REGISTRY_START_TIMEOUT`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    health_url = url.rstrip("/") + "/health"
    while True:
        try:
            if httpx.get(health_url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise RegsandboxError(
                "REGISTRY_START_TIMEOUT",
                f"模型登记服务（MLflow）在 {timeout:g} 秒内未就绪：{health_url}。请查看 MLflow 日志后重试。",
                status=503,
            )
        time.sleep(0.3)


def main() -> None:
    """Exec ``mlflow server`` with the platform's settings and secrets."""
    configure_logging()
    settings = get_settings()
    try:
        secrets = load_platform_secrets(settings)
    except ConfigurationError as error:
        print(error.message, file=sys.stderr)
        raise SystemExit(2) from None
    argv, env = prepare_server(settings, secrets)
    log.info("starting MLflow server on 127.0.0.1:%d, data in %s", settings.mlflow_port, settings.mlflow_dir)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
