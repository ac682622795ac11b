"""Platform secrets, kept SM4-GCM-encrypted under the platform data key in ``<data_dir>/secrets``.

``regsandbox init`` calls :func:`ensure_platform_secrets`, which creates the platform keys it
needs and the encrypted file ``secrets/platform.enc.json`` (mode 0600, written atomically).
Services call :func:`load_platform_secrets`, which never creates anything and raises
:class:`~regsandbox_core.errors.ConfigurationError` when the file, the master key or the key
version that encrypted the file is missing or unusable, so the service refuses to start.

The file is a JSON document::

    {"format": "regsandbox-platform-secrets", "format_version": 1, "key": "platform/data/v1",
     "nonce": "<Base64, 12 bytes>", "ciphertext": "<Base64, SM4-GCM ciphertext and tag>"}

The plaintext is the JSON object of :class:`PlatformSecrets`. The associated data
``regsandbox-platform-secrets/1|platform/data/v<N>`` binds the ciphertext to the format and to
the key version named in the file, so an edited ``key`` field fails authentication.

Migration: a plaintext ``secrets/platform.json`` from before encryption is encrypted by
:func:`ensure_platform_secrets`, read back and compared, and only then deleted. A file written
under an older platform data key version is re-encrypted under the active version, so a
rotation of ``platform/data`` reaches this file at the next ``regsandbox init`` or ``up``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets as _random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from regsandbox_core.crypto import hmac_sm3
from regsandbox_core.errors import ConfigurationError, RegsandboxError
from regsandbox_core.files import write_private_file  # noqa: F401  (re-exported for callers)
from regsandbox_core.keystore import (
    KIND_DATA,
    MASTER_KEY_ENV,
    PLATFORM_OWNER,
    KeyDestroyed,
    KeyNotActive,
    KeyRevoked,
    KeyStore,
    KeyVersion,
    KeyVersionUnknown,
    MasterKeyMismatch,
    MasterKeyUnavailable,
)
from regsandbox_core.platform_keys import (
    KeyStoreMissing,
    ensure_platform_keys,
    log_key_event,
    master_key_path,
    open_keystore,
)
from regsandbox_core.settings import Settings
from regsandbox_core.sm import GCM_NONCE_SIZE, DecryptionFailed, sm4_gcm_decrypt, sm4_gcm_encrypt

log = logging.getLogger(__name__)

SECRETS_FORMAT = "regsandbox-platform-secrets"
SECRETS_FORMAT_VERSION = 1
_KEY_LABEL = re.compile(r"^platform/data/v([1-9][0-9]{0,8})$")
_SMTP_FIELDS = ("smtp_username", "smtp_password")


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
    smtp_username: str | None = None
    """User name for SMTP AUTH at the mail relay; None when the relay needs no authentication."""
    smtp_password: str | None = field(default=None, repr=False)
    """Password for SMTP AUTH, set with ``regsandbox secrets set-smtp``."""


def secrets_file(settings: Settings) -> Path:
    """Return ``<data_dir>/secrets/platform.enc.json``, the encrypted platform secrets."""
    return settings.secrets_dir / "platform.enc.json"


def legacy_secrets_file(settings: Settings) -> Path:
    """Return ``<data_dir>/secrets/platform.json``, the plaintext file of data directories from before encryption."""
    return settings.secrets_dir / "platform.json"


def _generated_names() -> list[str]:
    return [item.name for item in fields(PlatformSecrets) if item.name not in _SMTP_FIELDS]


def _associated_data(key_label: str) -> bytes:
    return f"{SECRETS_FORMAT}/{SECRETS_FORMAT_VERSION}|{key_label}".encode("utf-8")


def _secrets_from_values(values: Any, path: Path) -> PlatformSecrets:
    """Build PlatformSecrets from a decoded JSON object, or raise ConfigurationError naming ``path``."""
    required = _generated_names()
    if not isinstance(values, dict) or not all(isinstance(values.get(name), str) and values[name] for name in required):
        raise ConfigurationError(
            "SECRETS_INVALID",
            f"平台密钥文件 {path} 的内容缺少字段（需要 {'、'.join(required)}）。"
            "请从备份恢复该文件；无备份时删除它后运行 `regsandbox init` 重新生成（已发放的服务令牌和会话将失效）。",
        )
    optional = {name: values.get(name) for name in _SMTP_FIELDS if isinstance(values.get(name), str)}
    return PlatformSecrets(**{name: values[name] for name in required}, **optional)


def _values_of(secrets: PlatformSecrets) -> dict[str, str]:
    return {name: value for name, value in vars(secrets).items() if value is not None}


def _read_document(path: Path) -> tuple[dict[str, Any], int]:
    """Return the encrypted file's JSON document and the platform data key version it names."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _corrupt(path, f"无法读取或不是 JSON（{type(error).__name__}）") from None
    if not isinstance(document, dict) or document.get("format") != SECRETS_FORMAT \
            or document.get("format_version") != SECRETS_FORMAT_VERSION:
        raise _corrupt(path, f"不是 {SECRETS_FORMAT} 第 {SECRETS_FORMAT_VERSION} 版格式")
    match = _KEY_LABEL.match(str(document.get("key", "")))
    if match is None:
        raise _corrupt(path, f"密钥标识 {document.get('key')!r} 不是 platform/data/v<版本号>")
    return document, int(match.group(1))


def _corrupt(path: Path, reason: str) -> ConfigurationError:
    return ConfigurationError(
        "SECRETS_CORRUPT",
        f"平台密钥文件 {path} 校验失败：{reason}。文件可能被篡改或损坏。"
        "请从备份恢复该文件；无备份时删除它后运行 `regsandbox init` 重新生成（已发放的服务令牌和会话将失效）。",
    )


def _encrypt(key: KeyVersion, secrets: PlatformSecrets) -> bytes:
    nonce = _random.token_bytes(GCM_NONCE_SIZE)
    plaintext = json.dumps(_values_of(secrets), sort_keys=True).encode("utf-8")
    document = {
        "format": SECRETS_FORMAT,
        "format_version": SECRETS_FORMAT_VERSION,
        "key": key.label,
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "ciphertext": base64.b64encode(sm4_gcm_encrypt(key.key, nonce, plaintext, _associated_data(key.label))).decode("ascii"),
    }
    return (json.dumps(document, indent=1) + "\n").encode("utf-8")


def _decrypt(store: KeyStore, path: Path) -> tuple[PlatformSecrets, int]:
    """Decrypt the secrets file with the key version it names; return the secrets and that version."""
    document, version = _read_document(path)
    key = _key_version(store, path, version)
    try:
        nonce = base64.b64decode(str(document.get("nonce", "")), validate=True)
        ciphertext = base64.b64decode(str(document.get("ciphertext", "")), validate=True)
    except (binascii.Error, ValueError):
        raise _corrupt(path, "nonce 或 ciphertext 的 Base64 编码无效") from None
    if len(nonce) != GCM_NONCE_SIZE:
        raise _corrupt(path, f"nonce 长度为 {len(nonce)} 字节，应为 {GCM_NONCE_SIZE} 字节")
    try:
        plaintext = sm4_gcm_decrypt(key.key, nonce, ciphertext, _associated_data(key.label))
        values = json.loads(plaintext)
    except DecryptionFailed:
        raise _corrupt(path, f"在密钥 {key.label} 下认证失败") from None
    except ValueError:
        raise _corrupt(path, "解密后的内容不是 JSON") from None
    return _secrets_from_values(values, path), version


def _key_version(store: KeyStore, path: Path, version: int) -> KeyVersion:
    label = f"{PLATFORM_OWNER}/{KIND_DATA}/v{version}"
    try:
        return store.get(PLATFORM_OWNER, KIND_DATA, version)
    except (KeyVersionUnknown, KeyNotActive, KeyRevoked, KeyDestroyed) as error:
        raise ConfigurationError(
            error.code,
            f"平台密钥文件 {path} 由密钥 {label} 加密，但该密钥不可用：{error.message}"
            "请从加密备份恢复密钥库；无法恢复时删除该文件后运行 `regsandbox init` 重新生成平台密钥"
            "（已发放的服务令牌、会话和 MLflow 密码将失效）。",
        ) from error


def _store_error(settings: Settings, error: RegsandboxError) -> ConfigurationError:
    """Describe a key store that cannot be opened, naming the master key file, the variable and the fix."""
    path = secrets_file(settings)
    if isinstance(error, KeyStoreMissing):
        fix = "新数据目录请先运行 `regsandbox init`，它会生成主密钥、密钥库和平台密钥文件。"
    elif isinstance(error, MasterKeyUnavailable):
        fix = (f"没有主密钥，平台服务不会启动：新数据目录请先运行 `regsandbox init`；"
               f"已有数据目录请恢复主密钥文件 {master_key_path(settings)} 或设置环境变量 {MASTER_KEY_ENV}。")
    elif isinstance(error, MasterKeyMismatch):
        fix = (f"请设置正确的环境变量 {MASTER_KEY_ENV}，或恢复与密钥库匹配的主密钥文件 {master_key_path(settings)}。")
    else:
        fix = "请检查密钥库，必要时从加密备份恢复。"
    return ConfigurationError(error.code, f"无法解密平台密钥文件 {path}：{error.message} {fix}")


def _open_store(settings: Settings) -> KeyStore:
    try:
        store = open_keystore(settings, on_event=log_key_event)
        store.metadata()  # unseals the store, so a wrong master key is reported here
    except RegsandboxError as error:
        raise _store_error(settings, error) from error
    return store


def _write_verified(store: KeyStore, path: Path, secrets: PlatformSecrets) -> None:
    """Encrypt ``secrets`` under the active platform data key, write atomically and read back to compare."""
    key = store.current(PLATFORM_OWNER, KIND_DATA)
    write_private_file(path, _encrypt(key, secrets))
    read_back, version = _decrypt(store, path)
    if read_back != secrets or version != key.version:
        raise ConfigurationError(
            "SECRETS_VERIFY_FAILED",
            f"平台密钥文件 {path} 写入后回读校验不一致。请检查磁盘与密钥库后重新运行 `regsandbox init`。",
        )


def _private_dirs(settings: Settings) -> None:
    for folder in (settings.secrets_dir, settings.keys_dir):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)


def ensure_platform_secrets(settings: Settings) -> PlatformSecrets:
    """Load the platform secrets, creating, migrating or re-encrypting the file as needed.

    Creates the master key, key store and platform keys that are missing. A plaintext
    ``platform.json`` is encrypted, verified and deleted. A file under an older platform data key
    version is re-encrypted under the active one.
    """
    _private_dirs(settings)
    try:
        return _ensure_platform_secrets(settings, ensure_platform_keys(settings, []))
    except ConfigurationError:
        raise
    except RegsandboxError as error:
        # Key store errors: missing or wrong master key, no active platform data key, a corrupt store.
        raise _store_error(settings, error) from error


def _ensure_platform_secrets(settings: Settings, store: KeyStore) -> PlatformSecrets:
    path, legacy = secrets_file(settings), legacy_secrets_file(settings)
    active = store.current(PLATFORM_OWNER, KIND_DATA).version

    if path.exists():
        secrets, version = _decrypt(store, path)
        if version != active:
            _write_verified(store, path, secrets)
            log.info("re-encrypted platform secrets %s from platform/data/v%d to v%d", path, version, active)
        if legacy.exists():
            legacy.unlink()
            log.warning("deleted leftover plaintext platform secrets %s; %s is in use", legacy, path)
        return secrets

    if legacy.exists():
        try:
            values = json.loads(legacy.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ConfigurationError(
                "SECRETS_INVALID",
                f"明文平台密钥文件 {legacy} 无法读取（{type(error).__name__}），无法迁移为加密文件。"
                "请从备份恢复该文件后重新运行 `regsandbox init`。",
            ) from error
        secrets = _secrets_from_values(values, legacy)
        _write_verified(store, path, secrets)
        legacy.unlink()
        log.info("encrypted plaintext platform secrets %s into %s and deleted the plaintext", legacy, path)
        return secrets

    secrets = PlatformSecrets(**{name: _random.token_urlsafe(32) for name in _generated_names()})
    _write_verified(store, path, secrets)
    log.info("created platform secrets %s", path)
    return secrets


def load_platform_secrets(settings: Settings) -> PlatformSecrets:
    """Decrypt the platform secrets, or raise ConfigurationError naming the file or key and the fix.

    Creates nothing. Raises when the file is missing or still plaintext, the master key is missing
    or wrong, the key version that encrypted the file is unusable, or the file fails authentication.
    """
    path = secrets_file(settings)
    if not path.exists():
        legacy = legacy_secrets_file(settings)
        if legacy.exists():
            raise ConfigurationError(
                "SECRETS_NOT_ENCRYPTED",
                f"平台密钥文件 {legacy} 仍是明文，服务不会读取它。请运行 `regsandbox init`，将其加密迁移为 {path}。",
            )
        raise ConfigurationError(
            "SECRETS_MISSING",
            f"平台密钥文件 {path} 不存在。请先运行 `regsandbox init` 初始化数据目录。",
        )
    store = _open_store(settings)
    try:
        return _decrypt(store, path)[0]
    except FileNotFoundError:
        raise ConfigurationError(
            "SECRETS_MISSING", f"平台密钥文件 {path} 不存在。请先运行 `regsandbox init` 初始化数据目录。"
        ) from None


def platform_secrets_key_version(settings: Settings) -> int | None:
    """Return the platform data key version that encrypts the secrets file, or None when there is no file.

    Reads only the file's ``key`` field, so it needs no master key. Raises ConfigurationError
    when the file exists but is not a valid encrypted secrets file.
    """
    try:
        return _read_document(secrets_file(settings))[1]
    except FileNotFoundError:
        return None


def set_smtp_credentials(settings: Settings, username: str | None, password: str | None) -> PlatformSecrets:
    """Store SMTP AUTH credentials in the encrypted secrets file, or remove them when both are None.

    The secrets file must exist (``regsandbox init``). It is re-encrypted under the active platform
    data key and read back before this returns.
    """
    if (username is None) != (password is None):
        raise ConfigurationError(
            "SMTP_CREDENTIALS_INVALID", "SMTP 用户名和密码必须同时设置或同时清除。"
        )
    current = load_platform_secrets(settings)
    store = _open_store(settings)
    updated = PlatformSecrets(**{**vars(current), "smtp_username": username, "smtp_password": password})
    _write_verified(store, secrets_file(settings), updated)
    log.info("SMTP credentials %s in %s", "stored" if username is not None else "removed", secrets_file(settings))
    return updated


def service_headers(service_token: str, service: str) -> dict[str, str]:
    """Return the headers with which a platform service (hub, scheduler, registry) calls admin_api."""
    return {"Authorization": f"Bearer {service_token}", "X-Regsandbox-Service": service}


def mlflow_password(secrets: PlatformSecrets, username: str) -> str:
    """Return the MLflow password of a platform user, derived so that no copy has to be stored."""
    return hmac_sm3(secrets.derivation_key.encode("utf-8"), f"mlflow-user:{username}".encode("utf-8")).hex()[:40]
