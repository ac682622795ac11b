"""The platform key store as admin_api uses it, with key events written to the audit log.

``create_app`` opens the store once (:func:`open_platform_keystore`) and refuses to start when
the master key or the store is unusable. Routes call :func:`request_keystore`, which returns the
same store bound to an audit callback for the current request: every key operation and every
failed key access becomes an audit event ``key.<operation>`` naming the caller. Successful reads
(a decryption fetching its key) are logged only, because the route that reads protected data
audits the access itself.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from admin_api.audit import record_event
from admin_api.security import ANONYMOUS_PRINCIPAL, Principal
from regsandbox_core.errors import ConfigurationError, RegsandboxError
from regsandbox_core.keystore import KeyStore
from regsandbox_core.platform_keys import log_key_event, open_keystore
from regsandbox_core.settings import Settings

_READS = frozenset({"current", "get", "public_key", "metadata"})
_DETAIL_FIELDS = ("previous_version", "previous_state", "state", "code", "reason")


def open_platform_keystore(settings: Settings) -> KeyStore:
    """Open the key store and unseal it once, so a wrong or missing master key stops the service now."""
    try:
        store = open_keystore(settings, on_event=log_key_event)
        store.metadata()
    except RegsandboxError as error:
        raise ConfigurationError(error.code, error.message) from error
    return store


def request_keystore(request: Request) -> KeyStore:
    """Return the platform key store with key events audited against the caller of ``request``."""
    base: KeyStore = request.app.state.keystore

    def on_event(action: str, owner: str, kind: str, version: int | None, outcome: str, detail: dict) -> None:
        log_key_event(action, owner, kind, version, outcome, detail)
        if action in _READS and outcome == "success":
            return
        principal: Principal = getattr(request.state, "principal", ANONYMOUS_PRINCIPAL)
        safe: dict[str, Any] = {name: detail[name] for name in _DETAIL_FIELDS if name in detail}
        label = f"{owner}/{kind}" + (f"/v{version}" if version is not None else "")
        # The key store reports "failure"; the audit log names the same outcome "failed".
        logged_outcome = "failed" if outcome == "failure" else outcome
        record_event(request, principal, action=f"key.{action}", resource=f"key:{label}", outcome=logged_outcome,
                     detail=safe or None)

    return KeyStore(base.path, base.master, on_event)
