"""SM2-signed JSON objects and detached file signatures, under the key store's signing keys.

A signed object is an envelope::

    {"regsandbox_signed": 1,
     "kind": "extract_manifest",
     "payload": {...},
     "signature": {"algorithm": "SM2-SM3", "key": "platform/signing/v3",
                   "public_key": "04…", "signed_at": "2026-12-04T08:00:00+00:00",
                   "user_id": "1234567812345678", "value": "<Base64 DER>"}}

Canonical form: the signature covers the UTF-8 bytes of the JSON statement
``{"key": …, "kind": …, "payload": …, "regsandbox_signed": 1, "signed_at": …}``. Object keys
are sorted at every level and the separators are ``,`` and ``:`` without spaces. Non-ASCII
characters are written as themselves (no ``\\u`` escapes), and NaN or infinity are rejected.
This is Python's ``json.dumps(statement, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)``.
Floats in the payload are written in Python's shortest round-trip form, which other JSON
libraries may print differently, so a verifier outside Python should prefer payloads of strings
and integers. The SM2 user ID is the GM/T 0009 default ``1234567812345678``.

A detached file signature ``<file>.sig`` is a signed object whose payload is
``{"file": {"name": <base name>, "size": <bytes>, "sm3": <hex digest>}}``. Verification compares
size and SM3 digest with the file; the name is recorded for display only, so a renamed copy
still verifies.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

from regsandbox_core.crypto import sm3_file
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import (
    KIND_SIGNING,
    PLATFORM_OWNER,
    KeyNotActive,
    KeyRevoked,
    KeyStore,
    KeyVersionUnknown,
)
from regsandbox_core.files import write_private_file
from regsandbox_core.sm import SM2_DEFAULT_USER_ID, KeyInvalid, sm2_sign, sm2_verify
from regsandbox_core.sm import SignatureInvalid as Sm2SignatureInvalid

__all__ = [
    "ALGORITHM",
    "KIND_LABELS",
    "SignatureInvalid",
    "SignedObjectInvalid",
    "TrustedKeys",
    "VerifiedFile",
    "VerifiedObject",
    "canonical_statement",
    "read_envelope",
    "sign_file",
    "sign_object",
    "signature_path",
    "verify_file",
    "verify_object",
]

ALGORITHM = "SM2-SM3"
ENVELOPE_VERSION = 1
USER_ID = SM2_DEFAULT_USER_ID.decode("ascii")
SIGNATURE_SUFFIX = ".sig"

KIND_LABELS = {
    "extract_manifest": "数据提取清单",
    "extract_file": "数据提取文件",
    "model_review": "模型评审意见",
    "notebook_approval": "笔记本审批",
    "report_manifest": "报告清单",
    "report_file": "报告文件",
}

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_KEY_LABEL = re.compile(r"^([a-z][a-z0-9_]{1,31})/signing/v([1-9][0-9]{0,8})$")

TrustedKeys = Union[KeyStore, Mapping[str, bytes]]
"""A key store, or a mapping from key label (``platform/signing/v1``) to 65-byte SM2 public key."""


class SignatureInvalid(Sm2SignatureInvalid):
    """A signed object or file does not verify: something changed after signing, or the key is not trusted."""

    def __init__(self, reason: str) -> None:
        RegsandboxError.__init__(self, "signature_invalid", f"签名验证失败：{reason}")


class SignedObjectInvalid(RegsandboxError):
    """Input to sign is not a JSON object of allowed values, or a file is not a signed envelope."""


@dataclass(frozen=True)
class VerifiedObject:
    """Content of an envelope whose signature verified."""

    kind: str
    key: str
    signed_at: str
    payload: dict


@dataclass(frozen=True)
class VerifiedFile:
    """A file whose size and SM3 digest match a verified detached signature."""

    kind: str
    key: str
    signed_at: str
    name: str
    size: int
    sm3: str


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise SignedObjectInvalid(
            "signed_kind_invalid",
            f"签名对象类型 {kind!r} 无效：须为小写字母开头、最长 64 位的小写字母、数字或下划线，如 extract_manifest。",
        )
    return kind


def canonical_statement(kind: str, payload: dict, signed_at: str, key: str) -> bytes:
    """Return the bytes that the signature covers (see the module docstring for the form)."""
    statement = {"key": key, "kind": kind, "payload": payload, "regsandbox_signed": ENVELOPE_VERSION,
                 "signed_at": signed_at}
    return json.dumps(statement, ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def _normalise_payload(payload: object) -> dict:
    """Return the payload as it reads back from JSON, so that signer and verifier see the same value."""
    if not isinstance(payload, dict):
        raise SignedObjectInvalid("signed_payload_invalid", f"签名内容必须是 JSON 对象（dict），实际为 {type(payload).__name__}。")
    try:
        return json.loads(json.dumps(payload, ensure_ascii=False, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise SignedObjectInvalid(
            "signed_payload_invalid",
            f"签名内容无法按 JSON 规范编码（{error}）。内容只能包含字符串键、字符串、整数、有限浮点数、布尔值、null、列表和对象。",
        ) from None


def sign_object(keystore: KeyStore, kind: str, payload: dict, *, owner: str = PLATFORM_OWNER) -> dict:
    """Sign ``payload`` with the owner's active SM2 signing key and return the envelope."""
    kind = _check_kind(kind)
    payload = _normalise_payload(payload)
    signing_key = keystore.current(owner, KIND_SIGNING)
    key_label = signing_key.label
    signed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    value = sm2_sign(signing_key.key, canonical_statement(kind, payload, signed_at, key_label))
    return {
        "regsandbox_signed": ENVELOPE_VERSION,
        "kind": kind,
        "payload": payload,
        "signature": {
            "algorithm": ALGORITHM,
            "key": key_label,
            "public_key": signing_key.public_key.hex() if signing_key.public_key else "",
            "signed_at": signed_at,
            "user_id": USER_ID,
            "value": base64.b64encode(value).decode("ascii"),
        },
    }


def _trusted_public_key(trusted: TrustedKeys, key_label: str) -> bytes:
    if not isinstance(trusted, KeyStore):
        public_key = trusted.get(key_label)
        if public_key is None:
            raise SignatureInvalid(f"签名密钥 {key_label} 不在受信任的公钥列表中。")
        return bytes(public_key)
    owner, version = _KEY_LABEL.match(key_label).groups()  # type: ignore[union-attr]
    try:
        return trusted.public_key(owner, int(version))
    except KeyVersionUnknown:
        raise SignatureInvalid(f"签名密钥 {key_label} 不在本平台密钥库中，无法确认签名方。") from None
    except KeyRevoked:
        raise SignatureInvalid(f"签名密钥 {key_label} 已吊销，其签名不再可信。") from None
    except KeyNotActive:
        raise SignatureInvalid(f"签名密钥 {key_label} 尚未启用，不可能产生有效签名。") from None


def _field(mapping: dict, name: str, expected: type, where: str) -> Any:
    value = mapping.get(name)
    if not isinstance(value, expected) or isinstance(value, bool) and expected is not bool:
        raise SignatureInvalid(f"{where}缺少字段 {name} 或其类型不正确，该文件不是完整的签名对象。")
    return value


def verify_object(envelope: dict, trusted: TrustedKeys) -> VerifiedObject:
    """Verify an envelope from :func:`sign_object` against trusted public keys and return its content.

    Raises :class:`SignatureInvalid` when the structure is incomplete, the key is unknown or
    revoked, the envelope's public key differs from the trusted one, or kind, payload, time or
    key label changed after signing.
    """
    if not isinstance(envelope, dict) or envelope.get("regsandbox_signed") != ENVELOPE_VERSION:
        raise SignatureInvalid("内容不是本平台的签名对象（缺少 regsandbox_signed: 1）。")
    kind = _field(envelope, "kind", str, "签名对象")
    payload = _field(envelope, "payload", dict, "签名对象")
    signature = _field(envelope, "signature", dict, "签名对象")
    algorithm = _field(signature, "algorithm", str, "签名信息")
    key_label = _field(signature, "key", str, "签名信息")
    signed_at = _field(signature, "signed_at", str, "签名信息")
    user_id = _field(signature, "user_id", str, "签名信息")
    value_text = _field(signature, "value", str, "签名信息")
    public_text = _field(signature, "public_key", str, "签名信息")

    if algorithm != ALGORITHM:
        raise SignatureInvalid(f"签名算法 {algorithm!r} 不受支持，本平台只接受 {ALGORITHM}。")
    if user_id != USER_ID:
        raise SignatureInvalid(f"SM2 用户标识 {user_id!r} 与本平台约定的 {USER_ID} 不一致。")
    if not _KEY_LABEL.match(key_label):
        raise SignatureInvalid(f"签名密钥标识 {key_label!r} 格式不正确，应为 <所有者>/signing/v<版本号>。")
    try:
        datetime.fromisoformat(signed_at)
        value = base64.b64decode(value_text, validate=True)
    except (ValueError, binascii.Error):
        raise SignatureInvalid("签名时间或签名值的编码不正确。") from None

    public_key = _trusted_public_key(trusted, key_label)
    if public_text.lower() != public_key.hex():
        raise SignatureInvalid(f"签名中附带的公钥与受信任的 {key_label} 公钥不一致。")
    try:
        statement = canonical_statement(kind, payload, signed_at, key_label)
        sm2_verify(public_key, statement, value)
    except (Sm2SignatureInvalid, KeyInvalid, ValueError):
        raise SignatureInvalid(
            f"签名与内容不符。签名后对象类型（{kind}）、内容、签名时间或密钥标识被修改，或签名值已损坏。"
        ) from None
    return VerifiedObject(kind, key_label, signed_at, payload)


def signature_path(path: Path) -> Path:
    """Return the path of the detached signature of ``path``: the same name with ``.sig`` appended."""
    path = Path(path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def sign_file(keystore: KeyStore, path: Path, kind: str, *, owner: str = PLATFORM_OWNER) -> Path:
    """Sign the SM3 digest and size of a file and write the envelope atomically to ``<path>.sig``.

    The signature file gets the data file's read and write permission bits, so users who can read
    the file can also read its signature.
    """
    path = Path(path)
    try:
        info = path.stat()
        digest = sm3_file(path)
    except OSError as error:
        raise SignedObjectInvalid("signed_file_unreadable", f"待签名文件 {path} 无法读取（{error.strerror}）。") from None
    payload = {"file": {"name": path.name, "size": info.st_size, "sm3": digest}}
    envelope = sign_object(keystore, kind, payload, owner=owner)
    destination = signature_path(path)
    write_private_file(destination, (json.dumps(envelope, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    os.chmod(destination, stat.S_IMODE(info.st_mode) & 0o666)
    return destination


def read_envelope(path: Path) -> dict:
    """Read a JSON envelope from a file; raise :class:`SignatureInvalid` when it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SignatureInvalid(f"{path} 不是合法的 JSON 签名对象。") from None


def verify_file(path: Path, trusted: TrustedKeys, *, signature: Path | None = None) -> VerifiedFile:
    """Verify a file against its detached signature (``<path>.sig`` unless ``signature`` is given).

    Raises :class:`SignatureInvalid` when the signature does not verify or the file's size or
    SM3 digest differ from the signed ones, and :class:`SignedObjectInvalid` when a file is missing.
    """
    path = Path(path)
    signature = Path(signature) if signature is not None else signature_path(path)
    if not signature.is_file():
        raise SignedObjectInvalid("signature_missing", f"签名文件 {signature} 不存在。")
    verified = verify_object(read_envelope(signature), trusted)
    record = verified.payload.get("file")
    if (not isinstance(record, dict) or not isinstance(record.get("sm3"), str)
            or not isinstance(record.get("size"), int) or not isinstance(record.get("name"), str)):
        raise SignatureInvalid(f"{signature} 是签名对象，但不是文件签名（缺少 file.name、file.size、file.sm3）。")
    try:
        size = path.stat().st_size
        digest = sm3_file(path)
    except OSError as error:
        raise SignedObjectInvalid("signed_file_unreadable", f"文件 {path} 无法读取（{error.strerror}）。") from None
    if size != record["size"]:
        raise SignatureInvalid(f"文件 {path} 大小为 {size} 字节，签名记录为 {record['size']} 字节，文件在签名后被修改。")
    if digest != record["sm3"]:
        raise SignatureInvalid(f"文件 {path} 的 SM3 杂凑值为 {digest}，与签名记录 {record['sm3']} 不一致，文件在签名后被修改。")
    return VerifiedFile(verified.kind, verified.key, verified.signed_at, record["name"], size, digest)
