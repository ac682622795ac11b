"""Versioned key store whose key material is wrapped under a master key (key-encryption key).

Keys are grouped by owner (an institution code or ``platform``) and kind:

- ``data``: 16-byte SM4 key for SM4-GCM data encryption;
- ``token``: 32-byte HMAC-SM3 tokenisation key;
- ``signing``: SM2 key pair. The public key is stored in clear, the private key wrapped.

Every (owner, kind) has versions 1, 2, ... that are never reused, and at most one version
is active. The allowed transitions are:

==============  =======================================  ==================================
state           use                                      next states
==============  =======================================  ==================================
pending         none (``generate(activate=False)``)      active, revoked, destroyed
active          encrypt, decrypt, sign                   decrypt_only, revoked
decrypt_only    decrypt data written before a rotation   active, revoked, destroyed
revoked         none, rejected for every use             destroyed
destroyed       none, wrapped material erased            (final)
==============  =======================================  ==================================

An active version becomes decrypt_only when another version is activated (:meth:`KeyStore.rotate`).
Activating a decrypt_only version again undoes a rotation. Destroying a version makes data
encrypted under it unreadable (crypto-shredding).

The store is one JSON file, written atomically with mode 0600 under an exclusive ``flock``
of ``<path>.lock``. Each wrapped key is SM4-GCM ciphertext under the master key, with the
associated data ``regsandbox-key/1|<owner>|<kind>|<version>``, so a wrapped key moved to
another entry fails to unwrap. A seal, the master-key wrapping of the SM3 digest of the whole
index, detects edited states, times or public keys.

NOTE: the seal does not detect a whole older copy of the file put back in place (rollback).
Crypto-shredding also only reaches copies the store controls: an older keystore file or a
backup made before :meth:`KeyStore.destroy` still contains the wrapped key.

No method writes key material to a log, to the audit callback or to :meth:`KeyStore.metadata`.
Only :meth:`KeyStore.current` and :meth:`KeyStore.get` return it, to in-process callers, and
:meth:`KeyStore.backup` writes it encrypted under the operator's backup key.
"""

from __future__ import annotations

import abc
import base64
import binascii
import contextlib
import fcntl
import hmac
import json
import logging
import os
import re
import secrets as _random
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import write_private_file
from regsandbox_core.sm import (
    GCM_NONCE_SIZE,
    SM4_KEY_SIZE,
    DecryptionFailed,
    generate_sm2_keypair,
    generate_sm4_key,
    sm2_public_key_from_private,
    sm3_digest,
    sm3_hex,
    sm4_gcm_decrypt,
    sm4_gcm_encrypt,
)

__all__ = [
    "AuditCallback",
    "BackupInvalid",
    "EnvMasterKey",
    "FileMasterKey",
    "KIND_DATA",
    "KIND_SIGNING",
    "KIND_TOKEN",
    "KeyDestroyed",
    "KeyNotActive",
    "KeyRevoked",
    "KeyStateInvalid",
    "KeyStore",
    "KeyStoreCorrupt",
    "KeyStoreError",
    "KeyStoreInputInvalid",
    "KeyVersion",
    "KeyVersionUnknown",
    "MASTER_KEY_ENV",
    "MasterKeyMismatch",
    "MasterKeyProvider",
    "MasterKeyUnavailable",
    "NoActiveKey",
    "master_key_from_environment",
]

log = logging.getLogger(__name__)

KIND_DATA = "data"
KIND_TOKEN = "token"
KIND_SIGNING = "signing"
KINDS = (KIND_DATA, KIND_TOKEN, KIND_SIGNING)
PLATFORM_OWNER = "platform"

STATE_PENDING = "pending"
STATE_ACTIVE = "active"
STATE_DECRYPT_ONLY = "decrypt_only"
STATE_REVOKED = "revoked"
STATE_DESTROYED = "destroyed"
STATES = (STATE_PENDING, STATE_ACTIVE, STATE_DECRYPT_ONLY, STATE_REVOKED, STATE_DESTROYED)

STATE_LABELS = {
    STATE_PENDING: "待启用",
    STATE_ACTIVE: "启用",
    STATE_DECRYPT_ONLY: "仅解密",
    STATE_REVOKED: "已吊销",
    STATE_DESTROYED: "已销毁",
}

MASTER_KEY_ENV = "REGSANDBOX_MASTER_KEY"
TOKEN_KEY_SIZE = 32
SM2_PRIVATE_KEY_SIZE = 32
_MATERIAL_SIZES = {KIND_DATA: SM4_KEY_SIZE, KIND_TOKEN: TOKEN_KEY_SIZE, KIND_SIGNING: SM2_PRIVATE_KEY_SIZE}

_OWNER = re.compile(r"^[a-z][a-z0-9_]{1,31}$")
_STORE_FORMAT = "regsandbox-keystore"
_STORE_FORMAT_VERSION = 1
_SEAL_AAD = b"regsandbox-keystore-seal/1"
_WRAP_FORMAT = b"\x01"
_BACKUP_MAGIC = b"RSKB\x01"
_BACKUP_FORMAT = "regsandbox-keystore-backup"
_READ_ACTIONS = frozenset({"current", "get", "public_key", "metadata"})
_ENTRY_FIELDS = ("owner", "kind", "version", "state", "created_at", "activated_at", "deactivated_at",
                 "revoked_at", "revoke_reason", "destroyed_at", "public_key")

AuditCallback = Callable[[str, str, str, "int | None", str, dict], None]
"""``on_event(action, owner, kind, version, outcome, detail)``; outcome is ``success`` or ``failure``.

Operations on the whole store (``metadata``, ``rewrap_all``, ``backup``, ``restore``) pass owner and
kind ``*`` and version None.
A failure's detail contains the error ``code``. An exception raised by the callback propagates
to the caller of the operation, after the operation was already written.
"""


# --- errors --------------------------------------------------------------------------------


class KeyStoreError(RegsandboxError):
    """Base class of the key store's errors."""

    status = 500


class MasterKeyUnavailable(KeyStoreError):
    """The master key file or variable is missing, unreadable, too widely readable or malformed."""

    def __init__(self, message: str) -> None:
        super().__init__("master_key_unavailable", message)


class MasterKeyMismatch(KeyStoreError):
    """The key store was sealed under another master key than the one given."""

    def __init__(self, expected: str, given: str) -> None:
        super().__init__(
            "master_key_mismatch",
            f"密钥库由主密钥 {expected} 保护，当前提供的主密钥为 {given}。"
            "请使用正确的主密钥；主密钥轮换后旧主密钥不再可用。",
        )


class KeyStoreCorrupt(KeyStoreError):
    """The key store file cannot be parsed, or its seal or a wrapped key fails to verify."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            "keystore_corrupt",
            f"密钥库文件 {path} 校验失败：{reason}。文件可能被篡改或损坏，请从加密备份恢复。",
        )


class KeyStoreInputInvalid(KeyStoreError):
    """An owner, kind, version or backup key passed to the store is invalid."""

    status = 400


class KeyVersionUnknown(KeyStoreError):
    """No key version with this owner, kind and number exists."""

    status = 404

    def __init__(self, owner: str, kind: str, version: int) -> None:
        super().__init__(
            "key_version_unknown",
            f"密钥 {owner}/{kind}/v{version} 不存在。请用密钥元数据确认所有者、类型和版本号。",
        )


class NoActiveKey(KeyStoreError):
    """No version of this owner and kind is active, so nothing can be encrypted."""

    status = 409

    def __init__(self, owner: str, kind: str) -> None:
        super().__init__(
            "key_no_active_version",
            f"{owner}/{kind} 没有处于启用状态的密钥版本，无法加密或签名。请先生成或启用一个版本。",
        )


class KeyNotActive(KeyStoreError):
    """The version is pending: it was generated but never activated, so it protects no data."""

    status = 409

    def __init__(self, owner: str, kind: str, version: int) -> None:
        super().__init__(
            "key_not_active",
            f"密钥 {owner}/{kind}/v{version} 尚未启用，不能使用。请先启用该版本。",
        )


class KeyRevoked(KeyStoreError):
    """The version was revoked and is refused for every use."""

    status = 409

    def __init__(self, owner: str, kind: str, version: int) -> None:
        super().__init__(
            "key_revoked",
            f"密钥 {owner}/{kind}/v{version} 已吊销，不能再用于加密、解密或签名验证。"
            "如需读取其保护的数据，请联系密钥管理员评估。",
        )


class KeyDestroyed(KeyStoreError):
    """The version was destroyed: its material is erased and data under it is unreadable."""

    status = 410

    def __init__(self, owner: str, kind: str, version: int) -> None:
        super().__init__(
            "key_destroyed",
            f"密钥 {owner}/{kind}/v{version} 已销毁，密钥材料已删除，其保护的数据无法再解密。",
        )


class KeyStateInvalid(KeyStoreError):
    """A lifecycle transition is not allowed from the version's current state."""

    status = 409

    def __init__(self, label: str, action: str, state: str, hint: str) -> None:
        super().__init__(
            "key_state_transition_invalid",
            f"密钥 {label} 当前状态为「{STATE_LABELS[state]}」，不能{action}。{hint}",
        )


class BackupInvalid(KeyStoreError):
    """A backup file is malformed, or its authentication fails under the given backup key."""

    status = 400

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            "keystore_backup_invalid",
            f"密钥库备份 {path} 无法恢复：{reason}。请确认备份文件完整且备份密钥正确。",
        )


# --- master keys ---------------------------------------------------------------------------


class MasterKeyProvider(abc.ABC):
    """Key-encryption key that wraps and unwraps key material; a KMS or PKCS#11 HSM can implement it.

    ``wrap`` must authenticate ``aad`` and ``unwrap`` must raise :class:`DecryptionFailed` (or
    another :class:`RegsandboxError`) when the blob or the aad differ. ``key_id`` names the master
    key without revealing it and changes when the master key changes.
    """

    @property
    @abc.abstractmethod
    def key_id(self) -> str: ...

    @abc.abstractmethod
    def wrap(self, key_bytes: bytes, aad: bytes) -> bytes: ...

    @abc.abstractmethod
    def unwrap(self, blob: bytes, aad: bytes) -> bytes: ...


class _Sm4MasterKey(MasterKeyProvider):
    """SM4-GCM key wrapping with a local 16-byte master key; the blob is ``01 || nonce || ct || tag``."""

    def __init__(self, key: bytes) -> None:
        self.__key = bytes(key)
        # The id is a truncated SM3 of the key under a label, so it reveals nothing usable.
        self._key_id = "sm4:" + sm3_hex(b"regsandbox-master-key-id/1|" + self.__key)[:16]

    @property
    def key_id(self) -> str:
        return self._key_id

    def wrap(self, key_bytes: bytes, aad: bytes) -> bytes:
        nonce = _random.token_bytes(GCM_NONCE_SIZE)
        return _WRAP_FORMAT + nonce + sm4_gcm_encrypt(self.__key, nonce, bytes(key_bytes), aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 1 + GCM_NONCE_SIZE or blob[:1] != _WRAP_FORMAT:
            raise DecryptionFailed("SM4-GCM", "封装格式不正确")
        nonce = blob[1 : 1 + GCM_NONCE_SIZE]
        return sm4_gcm_decrypt(self.__key, nonce, blob[1 + GCM_NONCE_SIZE :], aad)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self._key_id!r})"


def _decode_master_key(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MasterKeyUnavailable(f"{source}的内容不是合法的 Base64 编码。请写入 16 字节 SM4 主密钥的 Base64 编码。") from None
    if len(key) != SM4_KEY_SIZE:
        raise MasterKeyUnavailable(
            f"{source}解码后为 {len(key)} 字节，SM4 主密钥必须是 {SM4_KEY_SIZE} 字节。"
        )
    return key


class FileMasterKey(_Sm4MasterKey):
    """Master key read from a file that contains the Base64 text of 16 random bytes.

    The file must be a regular file owned by the current user. Group and other must have no
    permission bits (mode 0600 or 0400), or :class:`MasterKeyUnavailable` is raised.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        super().__init__(_read_master_key_file(self.path))

    @classmethod
    def create(cls, path: Path) -> FileMasterKey:
        """Write a new random master key to ``path`` with mode 0600; refuse to overwrite one."""
        path = Path(path)
        if path.exists():
            raise MasterKeyUnavailable(f"主密钥文件 {path} 已存在，不会覆盖。更换主密钥请写入新文件后执行重新封装。")
        write_private_file(path, base64.b64encode(generate_sm4_key()) + b"\n")
        return cls(path)


def _check_master_key_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise MasterKeyUnavailable(f"主密钥路径 {path} 不是普通文件。请指向存放 Base64 主密钥的文件。")
    if info.st_uid != os.geteuid():
        raise MasterKeyUnavailable(
            f"主密钥文件 {path} 的属主（uid {info.st_uid}）不是当前服务用户（uid {os.geteuid()}）。"
            "请将属主改为服务用户并设置权限 0600。"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise MasterKeyUnavailable(
            f"主密钥文件 {path} 的权限为 {mode:04o}，组用户或其他用户可以访问。"
            f"请执行 `chmod 600 {path}` 后重试。"
        )


def _read_master_key_file(path: Path) -> bytes:
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MasterKeyUnavailable(
            f"主密钥文件 {path} 不存在。请由密钥管理员放置主密钥文件（权限 0600），或设置环境变量 {MASTER_KEY_ENV}。"
        ) from None
    except OSError as error:
        raise MasterKeyUnavailable(
            f"主密钥文件 {path} 无法读取（{error.strerror}）。请确认服务用户对该文件有读权限，且它不是符号链接。"
        ) from None
    try:
        # The checks use the opened descriptor, so the file cannot be swapped in between.
        _check_master_key_file(path, os.fstat(handle))
        text = os.read(handle, 4096).decode("ascii", errors="replace")
    except OSError as error:
        raise MasterKeyUnavailable(f"主密钥文件 {path} 无法读取（{error.strerror}）。") from None
    finally:
        os.close(handle)
    return _decode_master_key(text, f"主密钥文件 {path} ")


class EnvMasterKey(_Sm4MasterKey):
    """Master key from an environment variable holding the Base64 text of 16 bytes."""

    def __init__(self, variable: str = MASTER_KEY_ENV, environ: Mapping[str, str] | None = None) -> None:
        value = (os.environ if environ is None else environ).get(variable)
        if not value:
            raise MasterKeyUnavailable(f"环境变量 {variable} 未设置或为空。请设置为 16 字节 SM4 主密钥的 Base64 编码。")
        super().__init__(_decode_master_key(value, f"环境变量 {variable} "))


def master_key_from_environment(data_dir: Path, environ: Mapping[str, str] | None = None) -> MasterKeyProvider:
    """Return the master key from ``REGSANDBOX_MASTER_KEY`` when set, else from ``<data_dir>/secrets/master.key``."""
    environ = os.environ if environ is None else environ
    if environ.get(MASTER_KEY_ENV):
        return EnvMasterKey(MASTER_KEY_ENV, environ)
    return FileMasterKey(Path(data_dir) / "secrets" / "master.key")


# --- key store -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyVersion:
    """One usable key version. ``key`` is the SM4 key, HMAC key or SM2 private key, never printed."""

    owner: str
    kind: str
    version: int
    key: bytes = field(repr=False)
    public_key: bytes | None = None

    @property
    def label(self) -> str:
        return f"{self.owner}/{self.kind}/v{self.version}"


@dataclass
class _Event:
    version: int | None
    detail: dict[str, Any]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _canonical(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _wrap_aad(owner: str, kind: str, version: int) -> bytes:
    return f"regsandbox-key/1|{owner}|{kind}|{version}".encode("utf-8")


def _check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not _OWNER.match(owner):
        raise KeyStoreInputInvalid(
            "key_owner_invalid",
            f"密钥所有者 {owner!r} 无效。所有者是机构代码（小写字母开头，2–32 位小写字母、数字或下划线）或 platform。",
        )
    return owner


def _check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise KeyStoreInputInvalid(
            "key_kind_invalid", f"密钥类型 {kind!r} 无效。可选：{'、'.join(KINDS)}。"
        )
    return kind  # type: ignore[return-value]


def _check_version(version: object) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise KeyStoreInputInvalid("key_version_invalid", f"密钥版本号 {version!r} 无效，必须是正整数。")
    return version


def _check_backup_key(backup_key: object) -> bytes:
    if not isinstance(backup_key, (bytes, bytearray)) or len(backup_key) != SM4_KEY_SIZE:
        size = len(backup_key) if isinstance(backup_key, (bytes, bytearray)) else type(backup_key).__name__
        raise KeyStoreInputInvalid(
            "backup_key_invalid", f"备份密钥必须是 {SM4_KEY_SIZE} 字节的 SM4 密钥，实际为 {size}。"
        )
    return bytes(backup_key)


class KeyStore:
    """Versioned keys per owner and kind in one JSON file, wrapped under ``master``.

    Every public method loads the file, so several processes can share one store; methods that
    change it hold an exclusive lock for the whole read-modify-write.
    """

    def __init__(self, path: Path, master: MasterKeyProvider, on_event: AuditCallback | None = None) -> None:
        self.path = Path(path)
        self.master = master
        self.on_event = on_event
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    # --- audit and file access ---

    def _emit(self, action: str, owner: str, kind: str, version: int | None, outcome: str, detail: dict) -> None:
        # Reads happen on every decryption, so successful reads are logged at debug only.
        if outcome != "success":
            level = logging.WARNING
        elif action in _READ_ACTIONS:
            level = logging.DEBUG
        else:
            level = logging.INFO
        log.log(level, "key %s %s/%s/v%s %s %s", action, owner, kind, version, outcome, detail.get("code", ""))
        if self.on_event is not None:
            self.on_event(action, owner, kind, version, outcome, dict(detail))

    @contextlib.contextmanager
    def _event(self, action: str, owner: str, kind: str, version: int | None = None) -> Iterator[_Event]:
        event = _Event(version, {})
        try:
            yield event
        except RegsandboxError as error:
            self._emit(action, str(owner), str(kind), event.version, "failure", {**event.detail, "code": error.code})
            raise
        except Exception as error:
            self._emit(action, str(owner), str(kind), event.version, "failure",
                       {**event.detail, "code": "internal_error", "error": type(error).__name__})
            raise
        self._emit(action, owner, kind, event.version, "success", event.detail)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)

    def _seal(self, master: MasterKeyProvider, keys: list[dict]) -> str:
        digest = sm3_digest(_canonical({"format": _STORE_FORMAT, "master_key_id": master.key_id, "keys": keys}))
        return base64.b64encode(master.wrap(digest, _SEAL_AAD)).decode("ascii")

    def _load(self) -> list[dict]:
        """Return the key entries after checking format, master key id and seal."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            document = json.loads(raw)
            keys = document["keys"]
            stored_master = document["master_key_id"]
            seal = base64.b64decode(document["seal"], validate=True)
            if document.get("format") != _STORE_FORMAT or document.get("format_version") != _STORE_FORMAT_VERSION:
                raise ValueError("format")
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise KeyStoreCorrupt(self.path, "文件不是本平台的密钥库格式") from None
        if stored_master != self.master.key_id:
            raise MasterKeyMismatch(str(stored_master), self.master.key_id)

        expected = sm3_digest(_canonical({"format": _STORE_FORMAT, "master_key_id": stored_master, "keys": keys}))
        try:
            sealed = self.master.unwrap(seal, _SEAL_AAD)
        except DecryptionFailed:
            raise KeyStoreCorrupt(self.path, "完整性封印无法用主密钥解开") from None
        if not hmac.compare_digest(sealed, expected):
            raise KeyStoreCorrupt(self.path, "密钥状态、时间或公钥与完整性封印不一致")
        return keys

    def _save(self, keys: list[dict], master: MasterKeyProvider | None = None) -> None:
        master = master or self.master
        keys = sorted(keys, key=lambda entry: (entry["owner"], entry["kind"], entry["version"]))
        document = {
            "format": _STORE_FORMAT,
            "format_version": _STORE_FORMAT_VERSION,
            "master_key_id": master.key_id,
            "keys": keys,
            "seal": self._seal(master, keys),
        }
        write_private_file(self.path, json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8"))

    def _unwrap(self, master: MasterKeyProvider, entry: dict) -> bytes:
        aad = _wrap_aad(entry["owner"], entry["kind"], entry["version"])
        try:
            material = master.unwrap(base64.b64decode(entry["wrapped"], validate=True), aad)
        except (DecryptionFailed, binascii.Error, ValueError):
            raise KeyStoreCorrupt(
                self.path, f"密钥 {entry['owner']}/{entry['kind']}/v{entry['version']} 的封装数据无法解开"
            ) from None
        if len(material) != _MATERIAL_SIZES[entry["kind"]]:
            raise KeyStoreCorrupt(self.path, f"密钥 {entry['owner']}/{entry['kind']}/v{entry['version']} 长度不正确")
        return material

    @staticmethod
    def _find(keys: list[dict], owner: str, kind: str, version: int) -> dict:
        for entry in keys:
            if entry["owner"] == owner and entry["kind"] == kind and entry["version"] == version:
                return entry
        raise KeyVersionUnknown(owner, kind, version)

    @staticmethod
    def _active(keys: list[dict], owner: str, kind: str) -> dict | None:
        for entry in keys:
            if entry["owner"] == owner and entry["kind"] == kind and entry["state"] == STATE_ACTIVE:
                return entry
        return None

    def _new_entry(self, keys: list[dict], owner: str, kind: str, material: bytes | None = None) -> dict:
        versions = [entry["version"] for entry in keys if entry["owner"] == owner and entry["kind"] == kind]
        version = max(versions, default=0) + 1
        public_key = None
        if material is not None:
            material = bytes(material)
        elif kind == KIND_SIGNING:
            pair = generate_sm2_keypair()
            material, public_key = pair.private_key, pair.public_key.hex()
        elif kind == KIND_DATA:
            material = generate_sm4_key()
        else:
            material = _random.token_bytes(TOKEN_KEY_SIZE)
        wrapped = self.master.wrap(material, _wrap_aad(owner, kind, version))
        entry = {
            "owner": owner, "kind": kind, "version": version, "state": STATE_PENDING,
            "created_at": _now(), "activated_at": None, "deactivated_at": None,
            "revoked_at": None, "revoke_reason": None, "destroyed_at": None,
            "public_key": public_key, "wrapped": base64.b64encode(wrapped).decode("ascii"),
        }
        keys.append(entry)
        return entry

    @staticmethod
    def _make_active(keys: list[dict], entry: dict) -> int | None:
        """Activate ``entry``, move the previous active version to decrypt_only and return that version's number."""
        previous = KeyStore._active(keys, entry["owner"], entry["kind"])
        now = _now()
        if previous is not None and previous is not entry:
            previous["state"] = STATE_DECRYPT_ONLY
            previous["deactivated_at"] = now
        entry["state"] = STATE_ACTIVE
        entry["activated_at"] = now
        entry["deactivated_at"] = None
        return previous["version"] if previous is not None and previous is not entry else None

    # --- lifecycle ---

    def generate(self, owner: str, kind: str, *, activate: bool = True) -> int:
        """Generate a new version and return its number. It becomes active unless ``activate`` is false.

        With ``activate`` the previous active version becomes decrypt_only, as in :meth:`rotate`.
        """
        with self._event("generate", owner, kind) as event:
            owner, kind = _check_owner(owner), _check_kind(kind)
            with self._locked():
                keys = self._load()
                entry = self._new_entry(keys, owner, kind)
                event.version = entry["version"]
                if activate:
                    event.detail["previous_version"] = self._make_active(keys, entry)
                event.detail["state"] = entry["state"]
                self._save(keys)
            return entry["version"]

    def import_key(self, owner: str, kind: str, material: bytes, *, activate: bool = True) -> int:
        """Store existing key bytes as a new version (e.g. a key kept outside the store until now).

        Only ``data`` and ``token`` keys can be imported, because a signing key also needs its
        public key. Returns the new version, which becomes active unless ``activate`` is false.
        """
        with self._event("import", owner, kind) as event:
            owner, kind = _check_owner(owner), _check_kind(kind)
            if kind == KIND_SIGNING or not isinstance(material, (bytes, bytearray)) \
                    or len(material) != _MATERIAL_SIZES[kind]:
                size = len(material) if isinstance(material, (bytes, bytearray)) else type(material).__name__
                raise KeyStoreInputInvalid(
                    "key_import_invalid",
                    f"无法导入 {owner}/{kind} 密钥（{size}）：只能导入 data（{SM4_KEY_SIZE} 字节）"
                    f"或 token（{TOKEN_KEY_SIZE} 字节）类型的密钥。",
                )
            with self._locked():
                keys = self._load()
                entry = self._new_entry(keys, owner, kind, material)
                event.version = entry["version"]
                if activate:
                    event.detail["previous_version"] = self._make_active(keys, entry)
                event.detail["state"] = entry["state"]
                self._save(keys)
            return entry["version"]

    def activate(self, owner: str, kind: str, version: int) -> None:
        """Activate a pending or decrypt_only version; the previous active version becomes decrypt_only."""
        with self._event("activate", owner, kind, version) as event:
            owner, kind, version = _check_owner(owner), _check_kind(kind), _check_version(version)
            with self._locked():
                keys = self._load()
                entry = self._find(keys, owner, kind, version)
                if entry["state"] == STATE_ACTIVE:
                    return
                if entry["state"] not in (STATE_PENDING, STATE_DECRYPT_ONLY):
                    raise KeyStateInvalid(
                        f"{owner}/{kind}/v{version}", "重新启用", entry["state"],
                        "已吊销或已销毁的密钥不能恢复使用，请生成新版本。",
                    )
                event.detail["previous_version"] = self._make_active(keys, entry)
                self._save(keys)

    def rotate(self, owner: str, kind: str) -> int:
        """Generate and activate a new version. The old active version only decrypts from now on."""
        with self._event("rotate", owner, kind) as event:
            owner, kind = _check_owner(owner), _check_kind(kind)
            with self._locked():
                keys = self._load()
                if self._active(keys, owner, kind) is None:
                    raise NoActiveKey(owner, kind)
                entry = self._new_entry(keys, owner, kind)
                event.version = entry["version"]
                event.detail["previous_version"] = self._make_active(keys, entry)
                self._save(keys)
            return entry["version"]

    def revoke(self, owner: str, kind: str, version: int, reason: str = "") -> None:
        """Revoke a version, for example after a suspected compromise, so that every later use is rejected."""
        with self._event("revoke", owner, kind, version) as event:
            owner, kind, version = _check_owner(owner), _check_kind(kind), _check_version(version)
            event.detail["reason"] = str(reason)[:500]
            with self._locked():
                keys = self._load()
                entry = self._find(keys, owner, kind, version)
                if entry["state"] in (STATE_REVOKED, STATE_DESTROYED):
                    raise KeyStateInvalid(f"{owner}/{kind}/v{version}", "吊销", entry["state"], "该版本已不可使用。")
                event.detail["previous_state"] = entry["state"]
                entry["state"] = STATE_REVOKED
                entry["revoked_at"] = _now()
                entry["revoke_reason"] = str(reason)[:500]
                self._save(keys)

    def destroy(self, owner: str, kind: str, version: int) -> None:
        """Erase a version's wrapped material so that data under it becomes unreadable (crypto-shredding).

        The active version must be rotated or revoked first. A signing key keeps its public key,
        so signatures made before the destruction still verify.
        """
        with self._event("destroy", owner, kind, version) as event:
            owner, kind, version = _check_owner(owner), _check_kind(kind), _check_version(version)
            with self._locked():
                keys = self._load()
                entry = self._find(keys, owner, kind, version)
                if entry["state"] in (STATE_ACTIVE, STATE_DESTROYED):
                    hint = "请先轮换或吊销该版本。" if entry["state"] == STATE_ACTIVE else "密钥材料已删除。"
                    raise KeyStateInvalid(f"{owner}/{kind}/v{version}", "销毁", entry["state"], hint)
                event.detail["previous_state"] = entry["state"]
                entry["state"] = STATE_DESTROYED
                entry["destroyed_at"] = _now()
                entry["wrapped"] = None
                self._save(keys)

    # --- use ---

    def current(self, owner: str, kind: str) -> KeyVersion:
        """Return the active version with its key, for encryption, tokenisation or signing."""
        with self._event("current", owner, kind) as event:
            owner, kind = _check_owner(owner), _check_kind(kind)
            keys = self._load()
            entry = self._active(keys, owner, kind)
            if entry is None:
                raise NoActiveKey(owner, kind)
            event.version = entry["version"]
            return self._key_version(entry)

    def get(self, owner: str, kind: str, version: int) -> KeyVersion:
        """Return an active or decrypt_only version, for decrypting data written under it.

        Raises :class:`KeyVersionUnknown`, :class:`KeyNotActive`, :class:`KeyRevoked` or
        :class:`KeyDestroyed` for a version that cannot be used.
        """
        with self._event("get", owner, kind, version):
            owner, kind, version = _check_owner(owner), _check_kind(kind), _check_version(version)
            entry = self._find(self._load(), owner, kind, version)
            self._check_usable(entry)
            return self._key_version(entry)

    def public_key(self, owner: str, version: int) -> bytes:
        """Return the SM2 public key of a signing version for verification.

        Destroyed versions still return their public key. Revoked versions raise
        :class:`KeyRevoked`, because a signature under a compromised key proves nothing.
        """
        with self._event("public_key", owner, KIND_SIGNING, version):
            owner, version = _check_owner(owner), _check_version(version)
            entry = self._find(self._load(), owner, KIND_SIGNING, version)
            if entry["state"] == STATE_REVOKED:
                raise KeyRevoked(owner, KIND_SIGNING, version)
            if entry["state"] == STATE_PENDING:
                raise KeyNotActive(owner, KIND_SIGNING, version)
            return bytes.fromhex(entry["public_key"])

    def _check_usable(self, entry: dict) -> None:
        owner, kind, version, state = entry["owner"], entry["kind"], entry["version"], entry["state"]
        if state == STATE_REVOKED:
            raise KeyRevoked(owner, kind, version)
        if state == STATE_DESTROYED:
            raise KeyDestroyed(owner, kind, version)
        if state == STATE_PENDING:
            raise KeyNotActive(owner, kind, version)

    def _key_version(self, entry: dict) -> KeyVersion:
        public_key = bytes.fromhex(entry["public_key"]) if entry["public_key"] else None
        return KeyVersion(entry["owner"], entry["kind"], entry["version"], self._unwrap(self.master, entry), public_key)

    def metadata(self) -> dict[str, Any]:
        """Return the master key id and every version's state and times, without key material.

        Signing versions include their public key as hex, which is not secret.
        """
        with self._event("metadata", "*", "*"):
            keys = self._load()
            listed = [{name: value for name, value in entry.items() if name != "wrapped"} for entry in keys]
            return {"master_key_id": self.master.key_id, "keys": listed}

    # --- master key rotation, backup and restore ---

    def rewrap_all(self, new_master: MasterKeyProvider) -> None:
        """Re-wrap every key under ``new_master`` in one atomic write; afterwards only it opens the store.

        If any key fails to unwrap or wrap, nothing is written and the old master stays in use.
        """
        with self._event("rewrap_all", "*", "*") as event:
            event.detail["old_master_key_id"] = self.master.key_id
            event.detail["new_master_key_id"] = new_master.key_id
            with self._locked():
                keys = self._load()
                rewrapped = []
                for entry in keys:
                    entry = dict(entry)
                    if entry["wrapped"] is not None:
                        material = self._unwrap(self.master, entry)
                        aad = _wrap_aad(entry["owner"], entry["kind"], entry["version"])
                        blob = new_master.wrap(material, aad)
                        if new_master.unwrap(blob, aad) != material:
                            raise KeyStoreCorrupt(self.path, "新主密钥封装后的校验失败")
                        entry["wrapped"] = base64.b64encode(blob).decode("ascii")
                    rewrapped.append(entry)
                self._save(rewrapped, new_master)
                self.master = new_master
            event.detail["keys"] = len(keys)

    def backup(self, destination: Path, backup_key: bytes) -> None:
        """Write every key, encrypted as one SM4-GCM message under the operator's 16-byte ``backup_key``.

        Destroyed versions are included without material. The file is written atomically with mode 0600.
        """
        with self._event("backup", "*", "*") as event:
            backup_key = _check_backup_key(backup_key)
            destination = Path(destination)
            event.detail["destination"] = str(destination)
            keys = self._load()
            entries = []
            for entry in keys:
                exported = {name: value for name, value in entry.items() if name != "wrapped"}
                material = self._unwrap(self.master, entry) if entry["wrapped"] is not None else None
                exported["material"] = base64.b64encode(material).decode("ascii") if material is not None else None
                entries.append(exported)
            document = {"format": _BACKUP_FORMAT, "format_version": 1, "created_at": _now(),
                        "source_master_key_id": self.master.key_id, "keys": entries}
            nonce = _random.token_bytes(GCM_NONCE_SIZE)
            ciphertext = sm4_gcm_encrypt(backup_key, nonce, _canonical(document), _BACKUP_MAGIC)
            write_private_file(destination, _BACKUP_MAGIC + nonce + ciphertext)
            event.detail["keys"] = len(entries)

    def restore(self, source: Path, backup_key: bytes, *, replace: bool = False) -> int:
        """Restore keys from a backup, wrapped under this store's master key; return the number of versions.

        The backup's tag is verified before anything is written. A store that already contains keys
        is only overwritten with ``replace=True``.
        """
        with self._event("restore", "*", "*") as event:
            backup_key = _check_backup_key(backup_key)
            source = Path(source)
            event.detail["source"] = str(source)
            entries = _read_backup(source, backup_key)
            with self._locked():
                if self._load() and not replace:
                    raise KeyStoreInputInvalid(
                        "keystore_not_empty",
                        f"密钥库 {self.path} 已有密钥，恢复会覆盖它们。确认要覆盖时请使用 replace=True。",
                    )
                keys = [self._restored_entry(source, entry) for entry in entries]
                _check_restored_set(source, keys)
                self._save(keys)
            event.detail["keys"] = len(keys)
            return len(keys)

    def _restored_entry(self, source: Path, entry: dict) -> dict:
        try:
            owner, kind = _check_owner(entry["owner"]), _check_kind(entry["kind"])
            version, state = _check_version(entry["version"]), entry["state"]
            material_text = entry["material"]
            restored = {name: entry[name] for name in _ENTRY_FIELDS}
        except (KeyError, KeyStoreInputInvalid, TypeError):
            raise BackupInvalid(source, "备份中的密钥记录缺少字段或字段无效") from None
        label = f"{owner}/{kind}/v{version}"
        if state not in STATES or (material_text is None) != (state == STATE_DESTROYED):
            raise BackupInvalid(source, f"密钥 {label} 的状态与密钥材料不一致")
        restored["wrapped"] = None
        if material_text is not None:
            try:
                material = base64.b64decode(material_text, validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise BackupInvalid(source, f"密钥 {label} 的编码不正确") from None
            if len(material) != _MATERIAL_SIZES[kind]:
                raise BackupInvalid(source, f"密钥 {label} 的长度不正确")
            if kind == KIND_SIGNING and sm2_public_key_from_private(material).hex() != entry.get("public_key"):
                raise BackupInvalid(source, f"签名密钥 {label} 的公钥与私钥不匹配")
            restored["wrapped"] = base64.b64encode(self.master.wrap(material, _wrap_aad(owner, kind, version))).decode("ascii")
        return restored


def _check_restored_set(source: Path, keys: list[dict]) -> None:
    """Reject a backup with a repeated version, or with two active versions of one owner and kind."""
    seen: set[tuple[str, str, int]] = set()
    active: set[tuple[str, str]] = set()
    for entry in keys:
        identity = (entry["owner"], entry["kind"], entry["version"])
        if identity in seen:
            raise BackupInvalid(source, f"密钥 {'/'.join(map(str, identity))} 在备份中出现多次")
        seen.add(identity)
        if entry["state"] == STATE_ACTIVE:
            if identity[:2] in active:
                raise BackupInvalid(source, f"{identity[0]}/{identity[1]} 在备份中有多个启用版本")
            active.add(identity[:2])


def _read_backup(source: Path, backup_key: bytes) -> list[dict]:
    try:
        blob = source.read_bytes()
    except OSError as error:
        raise BackupInvalid(source, f"文件无法读取（{error.strerror}）") from None
    header = len(_BACKUP_MAGIC)
    if len(blob) < header + GCM_NONCE_SIZE or blob[:header] != _BACKUP_MAGIC:
        raise BackupInvalid(source, "文件不是本平台的密钥库备份")
    nonce = blob[header : header + GCM_NONCE_SIZE]
    try:
        plaintext = sm4_gcm_decrypt(backup_key, nonce, blob[header + GCM_NONCE_SIZE :], _BACKUP_MAGIC)
    except DecryptionFailed:
        raise BackupInvalid(source, "完整性校验失败（备份被修改或备份密钥错误）") from None
    try:
        document = json.loads(plaintext)
        if document.get("format") != _BACKUP_FORMAT or not isinstance(document.get("keys"), list):
            raise ValueError("format")
        if not all(isinstance(entry, dict) for entry in document["keys"]):
            raise ValueError("entry")
    except (ValueError, AttributeError):
        raise BackupInvalid(source, "备份内容格式不正确") from None
    return document["keys"]
