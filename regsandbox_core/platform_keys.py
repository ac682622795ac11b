"""The platform's key store in the data directory: where it lives, how it is opened and provisioned.

``regsandbox init`` calls :func:`ensure_platform_keys`, which creates the master key
``<data_dir>/secrets/master.key`` (unless ``REGSANDBOX_MASTER_KEY`` is set), the platform's
SM2 signing key, SM4 data key and HMAC-SM3 key ``platform/token`` (the extract watermark key of
:mod:`extracts.watermark`), and one SM4 data key and one HMAC-SM3 token key per institution, in
``<data_dir>/keys/keystore.json``.
Services and the extract builder call :func:`open_keystore`, which never creates anything.

Migration: an institution that already has a plain tokenisation key file from
:func:`ensure_tokenisation_key` gets that key as token version 1, so the
tokens in existing extracts stay the same (:meth:`KeyStore.import_key`). The imported key is
then read back and compared.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets as _random
from pathlib import Path

from regsandbox_core.keystore import (
    KIND_DATA,
    KIND_SIGNING,
    KIND_TOKEN,
    MASTER_KEY_ENV,
    PLATFORM_OWNER,
    TOKEN_KEY_SIZE,
    AuditCallback,
    FileMasterKey,
    KeyStore,
    KeyStoreError,
    master_key_from_environment,
)
from regsandbox_core.files import write_private_file
from regsandbox_core.settings import Settings

__all__ = [
    "KeyStoreMissing",
    "ensure_platform_keys",
    "ensure_tokenisation_key",
    "keystore_path",
    "log_key_event",
    "master_key_path",
    "open_keystore",
    "tokenisation_key_path",
]

log = logging.getLogger(__name__)

_INSTITUTION_CODE = re.compile(r"^[a-z][a-z0-9_]{1,31}$")


class KeyStoreMissing(KeyStoreError):
    """The data directory has no key store yet: ``regsandbox init`` was not run."""

    status = 503

    def __init__(self, path: Path) -> None:
        super().__init__(
            "keystore_missing",
            f"密钥库 {path} 不存在，无法取得令牌化密钥和平台签名密钥。"
            "请先运行 `regsandbox init` 初始化数据目录（会生成主密钥和密钥库），再重试。",
        )


def keystore_path(settings: Settings) -> Path:
    """Return ``<data_dir>/keys/keystore.json``."""
    return settings.keys_dir / "keystore.json"


def master_key_path(settings: Settings) -> Path:
    """Return ``<data_dir>/secrets/master.key``, the master key file used when the variable is unset."""
    return settings.secrets_dir / "master.key"


def log_key_event(action: str, owner: str, kind: str, version: int | None, outcome: str, detail: dict) -> None:
    """Audit callback that logs a key store event in English; details hold states and codes, never keys."""
    safe_detail = {name: value for name, value in detail.items()
                   if name in ("previous_version", "previous_state", "state", "code")}
    if outcome != "success":
        level = logging.WARNING
    else:
        level = logging.DEBUG if action in ("current", "get", "public_key", "metadata") else logging.INFO
    log.log(level, "key store %s %s/%s/v%s %s %s", action, owner, kind, version, outcome, safe_detail)


def open_keystore(settings: Settings, on_event: AuditCallback | None = None) -> KeyStore:
    """Open the data directory's key store; raise :class:`KeyStoreMissing` when init has not created it.

    The master key comes from ``REGSANDBOX_MASTER_KEY`` or ``<data_dir>/secrets/master.key``;
    :class:`~regsandbox_core.keystore.MasterKeyUnavailable` names the problem when neither works.
    """
    path = keystore_path(settings)
    if not path.is_file():
        raise KeyStoreMissing(path)
    return KeyStore(path, master_key_from_environment(settings.data_dir), on_event)


def tokenisation_key_path(settings: Settings, institution_code: str) -> Path:
    """Return ``<data_dir>/keys/tokenisation/<code>.key``, the plain key file used before the key store."""
    if not _INSTITUTION_CODE.match(institution_code):
        raise ValueError(f"invalid institution code {institution_code!r}")
    return settings.keys_dir / "tokenisation" / f"{institution_code}.key"


def ensure_tokenisation_key(settings: Settings, institution_code: str) -> bytes:
    """Return the institution's plain 32-byte HMAC-SM3 tokenisation key file, creating it on first use.

    Only data directories from before the key store have these files; :func:`ensure_platform_keys`
    imports them. New code takes token keys from the key store.
    """
    path = tokenisation_key_path(settings, institution_code)
    if path.exists():
        return path.read_bytes()
    settings.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(settings.keys_dir, 0o700)
    key = _random.token_bytes(32)
    write_private_file(path, key)
    return key


def _has_versions(store: KeyStore, owner: str, kind: str) -> bool:
    return any(entry["owner"] == owner and entry["kind"] == kind for entry in store.metadata()["keys"])


def _import_token_key(store: KeyStore, code: str, material: bytes) -> None:
    """Store a plain tokenisation key as ``<code>/token/v1`` and check that it reads back unchanged."""
    version = store.import_key(code, KIND_TOKEN, material)
    stored = store.current(code, KIND_TOKEN)
    if version != 1 or stored.version != 1 or not hmac.compare_digest(stored.key, material):
        raise KeyStoreError(
            "token_key_import_failed",
            f"机构 {code} 的原有令牌化密钥导入密钥库后校验不一致（版本 v{stored.version}）。"
            "请停止生成数据提取，保留原密钥文件，并联系平台管理员检查密钥库。",
        )


def ensure_platform_keys(settings: Settings, institution_codes: list[str],
                         on_event: AuditCallback | None = log_key_event) -> KeyStore:
    """Create what is missing of master key, key store, signing, data and token keys; return the store.

    Idempotent: an (owner, kind) that has any version, in whatever state, is left alone, so a key
    an administrator revoked is not silently replaced. A plain tokenisation key file of an
    institution without token versions is imported as version 1 and then left in place.
    """
    if not os.environ.get(MASTER_KEY_ENV):
        path = master_key_path(settings)
        # A store without its master key file means the key was lost or moved. A new master key
        # could never open that store, so the read below reports the missing file instead.
        if not path.exists() and not keystore_path(settings).exists():
            FileMasterKey.create(path)
            log.info("created master key file %s", path)
    store = KeyStore(keystore_path(settings), master_key_from_environment(settings.data_dir), on_event)

    for owner, kind in [(PLATFORM_OWNER, KIND_SIGNING), (PLATFORM_OWNER, KIND_DATA), (PLATFORM_OWNER, KIND_TOKEN)] + [
        (code, KIND_DATA) for code in institution_codes
    ]:
        if not _has_versions(store, owner, kind):
            store.generate(owner, kind)
    for code in institution_codes:
        if _has_versions(store, code, KIND_TOKEN):
            continue
        plain = tokenisation_key_path(settings, code)
        if plain.is_file() and plain.stat().st_size == TOKEN_KEY_SIZE:
            _import_token_key(store, code, plain.read_bytes())
            log.warning("imported plain tokenisation key %s as %s/token/v1; the file can be deleted "
                        "once a key store backup exists", plain, code)
        else:
            store.generate(code, KIND_TOKEN)
    return store
