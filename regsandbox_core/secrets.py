"""Platform secrets and per-institution keys kept under ``<data_dir>/secrets`` and ``<data_dir>/keys``.

Files are created once by ``regsandbox init`` with mode 0600 and written atomically. A service
that finds them missing refuses to start with :class:`~regsandbox_core.errors.ConfigurationError`.
"""

from __future__ import annotations

import json
import os
import re
import secrets as _random
from dataclasses import dataclass
from pathlib import Path

from regsandbox_core.crypto import hmac_sm3
from regsandbox_core.errors import ConfigurationError
from regsandbox_core.files import write_private_file  # noqa: F401  (re-exported for callers)
from regsandbox_core.settings import Settings

_INSTITUTION_CODE = re.compile(r"^[a-z][a-z0-9_]{1,31}$")


@dataclass(frozen=True)
class PlatformSecrets:
    """Secrets shared by the platform's services, never sent to a browser or a sandbox."""

    service_token: str
    """Bearer token with which services (hub, scheduler, registry sync) call admin_api."""
    session_secret: str
    """Key that signs console session cookies."""
    mlflow_flask_secret: str
    """MLFLOW_FLASK_SERVER_SECRET_KEY of the MLflow auth app."""
    mlflow_admin_password: str
    """Password of the MLflow auth app's ``admin`` user."""
    derivation_key: str
    """Key from which per-user MLflow passwords are derived (see :func:`mlflow_password`)."""


def _secrets_file(settings: Settings) -> Path:
    return settings.secrets_dir / "platform.json"


def ensure_platform_secrets(settings: Settings) -> PlatformSecrets:
    """Load the platform secrets, generating and storing them on first use."""
    path = _secrets_file(settings)
    if path.exists():
        return load_platform_secrets(settings)
    values = {name: _random.token_urlsafe(32) for name in PlatformSecrets.__dataclass_fields__}
    settings.secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.secrets_dir, 0o700)
    write_private_file(path, json.dumps(values, indent=2).encode("utf-8"))
    return PlatformSecrets(**values)


def load_platform_secrets(settings: Settings) -> PlatformSecrets:
    """Load the platform secrets or raise ConfigurationError naming the missing file."""
    path = _secrets_file(settings)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return PlatformSecrets(**{name: values[name] for name in PlatformSecrets.__dataclass_fields__})
    except (OSError, ValueError, KeyError) as error:
        raise ConfigurationError(
            "SECRETS_MISSING",
            f"平台密钥文件 {path} 缺失或无法读取（{type(error).__name__}）。请先运行 `regsandbox init` 初始化数据目录。",
        ) from error


def service_headers(service_token: str, service: str) -> dict[str, str]:
    """Return the headers with which a platform service (hub, scheduler, registry) calls admin_api."""
    return {"Authorization": f"Bearer {service_token}", "X-Regsandbox-Service": service}


def mlflow_password(secrets: PlatformSecrets, username: str) -> str:
    """Return the MLflow password of a platform user, derived so that no copy has to be stored."""
    return hmac_sm3(secrets.derivation_key.encode("utf-8"), f"mlflow-user:{username}".encode("utf-8")).hex()[:40]


def tokenisation_key_path(settings: Settings, institution_code: str) -> Path:
    if not _INSTITUTION_CODE.match(institution_code):
        raise ValueError(f"invalid institution code {institution_code!r}")
    return settings.keys_dir / "tokenisation" / f"{institution_code}.key"


def ensure_tokenisation_key(settings: Settings, institution_code: str) -> bytes:
    """Return the institution's 32-byte HMAC-SM3 tokenisation key, creating it on first use."""
    path = tokenisation_key_path(settings, institution_code)
    if path.exists():
        return path.read_bytes()
    settings.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(settings.keys_dir, 0o700)
    key = _random.token_bytes(32)
    write_private_file(path, key)
    return key
