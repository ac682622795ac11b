"""Files of the hub under ``<data_dir>/hub`` and the token of the ``regsandbox`` hub service."""

from __future__ import annotations

import os
import secrets as _random
from pathlib import Path

from regsandbox_core.crypto import hmac_sm3
from regsandbox_core.secrets import PlatformSecrets, write_private_file
from regsandbox_core.settings import Settings

HUB_SERVICE_NAME = "regsandbox"
"""Name of the hub service through which platform programs read users, groups and servers."""


def prepare_hub_dir(settings: Settings) -> Path:
    """Create ``<data_dir>/hub`` with mode 0700 and return it."""
    hub_dir = settings.hub_dir
    hub_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(hub_dir, 0o700)
    return hub_dir


def ensure_crypt_key(settings: Settings) -> str:
    """Return the 32-byte auth-state encryption key (hex), created on first use in ``hub/crypt_key`` (0600).

    It plays the part of ``JUPYTERHUB_CRYPT_KEY``. Losing it only drops the stored auth
    state: users sign in again and the authenticator writes a new one.
    """
    path = settings.hub_dir / "crypt_key"
    if path.exists():
        return path.read_text(encoding="ascii").strip()
    key = _random.token_hex(32)
    write_private_file(path, key.encode("ascii"))
    return key


def hub_service_api_token(secrets: PlatformSecrets) -> str:
    """Return the API token of the ``regsandbox`` hub service, derived from the platform secrets.

    Every platform program that can decrypt the platform secrets computes the same token,
    so no further file has to be stored or shared.
    """
    return hmac_sm3(secrets.derivation_key.encode("utf-8"), b"jupyterhub-service:regsandbox").hex()
