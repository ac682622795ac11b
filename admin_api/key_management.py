"""Key management for the security administrator: list key versions and change their states.

The API routes (``admin_api.routes.keys``) and the console page (``admin_api.console_keys``) both
call these functions, so they check the same things and write the same audit events. Every key
store call goes through :func:`admin_api.keyaccess.request_keystore`, which audits each operation
and each key store failure as ``key.<operation>``. A request rejected before it reaches the key
store (unknown owner or kind, invalid reason, wrong destroy confirmation) is audited here with the
same action and outcome ``failed``. Nothing here returns, logs or audits key material.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.audit import record_event
from admin_api.errors import ApiError, invalid, not_found
from admin_api.keyaccess import request_keystore
from admin_api.models import Institution
from admin_api.schemas import KeyListOut, KeyVersionOut
from admin_api.security import Principal
from regsandbox_core.errors import ConfigurationError
from regsandbox_core.keystore import (
    KIND_DATA,
    KINDS,
    PLATFORM_OWNER,
    STATE_LABELS,
    KeyStore,
    KeyStoreError,
    KeyStoreInputInvalid,
    NoActiveKey,
)
from regsandbox_core.secrets import platform_secrets_key_version

KIND_NAMES = {
    "data": "数据加密密钥（SM4）",
    "token": "令牌化密钥（HMAC-SM3）",
    "signing": "签名密钥（SM2）",
}
PLATFORM_TOKEN_KIND_NAME = "数据水印密钥（HMAC-SM3）"
"""Name of the platform's own HMAC-SM3 key (``platform/token``): it derives the extract watermark
key, while an institution's HMAC-SM3 key tokenises its data."""
PLATFORM_NAME = "平台"
UNREGISTERED_OWNER_NAME = "未登记的机构"
REASON_MIN_LENGTH = 2
REASON_MAX_LENGTH = 200


def key_label(owner: str, kind: str, version: int | None = None) -> str:
    """Return ``owner/kind`` or ``owner/kind/vN``, the name the key store and the audit log use."""
    return f"{owner}/{kind}" + (f"/v{version}" if version is not None else "")


def _reject(request: Request, caller: Principal, operation: str, resource: str, error: ApiError) -> ApiError:
    """Audit a request rejected before the key store was called and return ``error`` to raise."""
    record_event(request, caller, f"key.{operation}", f"key:{resource}", "failed", {"code": error.code})
    return error


def _api_error(error: KeyStoreError) -> ApiError:
    """Turn a key store error into an API error with an upper-case code and the same Chinese message.

    Invalid input becomes 422 like the other input checks of the API. Every other error keeps the
    key store's status: 404 unknown version, 409 state conflict, 410 destroyed, 500 store unusable.
    """
    status = 422 if isinstance(error, KeyStoreInputInvalid) else error.status
    return ApiError(error.code.upper(), error.message, status=status)


def owner_names(session: Session) -> dict[str, str]:
    """Return {owner: Chinese name} of every owner that may hold keys: the platform and each institution."""
    names = {PLATFORM_OWNER: PLATFORM_NAME}
    names.update({code: name for code, name in session.execute(select(Institution.code, Institution.name))})
    return names


def check_target(request: Request, session: Session, caller: Principal, operation: str, owner: str,
                 kind: str, version: int | None = None) -> None:
    """Reject an unknown kind (422) or an owner that is neither the platform nor an institution (404)."""
    resource = key_label(owner[:40], kind[:20], version)
    if kind not in KINDS:
        choices = "、".join(f"{name}（{KIND_NAMES[name]}）" for name in KINDS)
        raise _reject(request, caller, operation, resource, invalid(
            "KEY_KIND_INVALID", f"密钥类型 {kind!r} 无效。可选：{choices}。"
        ))
    if owner not in owner_names(session):
        raise _reject(request, caller, operation, resource, not_found(
            "KEY_OWNER_NOT_FOUND",
            f"密钥所有者 {owner!r} 不存在：它既不是 platform（平台），也不是已登记的机构代码。"
            "请在密钥列表中确认所有者。",
        ))


def kind_name(owner: str, kind: str) -> str:
    """Return the Chinese name of a key kind for its owner."""
    if owner == "platform" and kind == "token":
        return PLATFORM_TOKEN_KIND_NAME
    return KIND_NAMES.get(kind, kind)


def _describe(entry: dict[str, Any], names: dict[str, str]) -> KeyVersionOut:
    return KeyVersionOut(
        owner=entry["owner"],
        owner_name=names.get(entry["owner"], UNREGISTERED_OWNER_NAME),
        kind=entry["kind"],
        kind_name=kind_name(entry["owner"], entry["kind"]),
        version=entry["version"],
        state=entry["state"],
        state_name=STATE_LABELS.get(entry["state"], entry["state"]),
        created_at=entry.get("created_at"),
        activated_at=entry.get("activated_at"),
        deactivated_at=entry.get("deactivated_at"),
        revoked_at=entry.get("revoked_at"),
        revoke_reason=entry.get("revoke_reason"),
        destroyed_at=entry.get("destroyed_at"),
        public_key=entry.get("public_key") if entry["kind"] == "signing" else None,
    )


def _sort_key(version: KeyVersionOut) -> tuple[int, str, int, int]:
    """Order the platform first, then institutions by code, kinds as KINDS lists them, versions ascending."""
    return (version.owner != PLATFORM_OWNER, version.owner, KINDS.index(version.kind), version.version)


def _metadata(store: KeyStore) -> dict[str, Any]:
    try:
        return store.metadata()
    except KeyStoreError as error:
        raise _api_error(error) from None


def list_keys(request: Request, session: Session, caller: Principal, *, audit: bool = True) -> KeyListOut:
    """Return the master key id and every key version; ``audit`` records the listing as ``keys.list``.

    The console passes ``audit=False`` when it shows the list again below a rejected form, because
    the form's own event is already recorded.
    """
    metadata = _metadata(request_keystore(request))
    names = owner_names(session)
    versions = sorted((_describe(entry, names) for entry in metadata["keys"]), key=_sort_key)
    if audit:
        record_event(request, caller, "keys.list", "keys", "success", {"versions": len(versions)})
    return KeyListOut(master_key_id=metadata["master_key_id"], keys=versions)


def _version_out(store: KeyStore, session: Session, owner: str, kind: str, version: int) -> KeyVersionOut:
    names = owner_names(session)
    for entry in _metadata(store)["keys"]:
        if (entry["owner"], entry["kind"], entry["version"]) == (owner, kind, version):
            return _describe(entry, names)
    raise ApiError("KEY_VERSION_UNKNOWN", f"密钥 {key_label(owner, kind, version)} 不存在。", status=404)


def _check_not_in_use(request: Request, caller: Principal, operation: str, owner: str, kind: str,
                      version: int) -> None:
    """Reject revoking or destroying the platform data key version that encrypts the platform secrets.

    Without that version no service could read its secrets, so the whole platform would stop at
    its next start. Rotating first and running ``regsandbox init`` re-encrypts the secrets file.
    """
    if (owner, kind) != (PLATFORM_OWNER, KIND_DATA):
        return
    try:
        in_use = platform_secrets_key_version(request.app.state.settings)
    except ConfigurationError:
        in_use = None  # an unreadable secrets file is reported by every service at its start
    if in_use == version:
        action = "吊销" if operation == "revoke" else "销毁"
        raise _reject(request, caller, operation, key_label(owner, kind, version), ApiError(
            "KEY_IN_USE_BY_PLATFORM_SECRETS",
            f"平台密钥文件仍由 {key_label(owner, kind, version)} 加密，{action}后平台各服务将无法启动。"
            "请先轮换 platform/data 密钥，再运行 `regsandbox init` 用新版本重新加密平台密钥文件，然后重试。",
            status=409,
        ))


def rotate_key(request: Request, session: Session, caller: Principal, owner: str, kind: str) -> KeyVersionOut:
    """Generate and activate a new version of ``owner/kind``; the old active version becomes decrypt_only.

    When no version is active (all revoked or destroyed, or none made yet), the new version is
    generated and activated on its own, so the owner can encrypt and sign again.
    """
    check_target(request, session, caller, "rotate", owner, kind)
    store = request_keystore(request)
    try:
        try:
            version = store.rotate(owner, kind)
        except NoActiveKey:
            version = store.generate(owner, kind)
    except KeyStoreError as error:
        raise _api_error(error) from None
    return _version_out(store, session, owner, kind, version)


def activate_key(request: Request, session: Session, caller: Principal, owner: str, kind: str,
                 version: int) -> KeyVersionOut:
    """Activate a pending or decrypt_only version; the previous active version becomes decrypt_only."""
    check_target(request, session, caller, "activate", owner, kind, version)
    store = request_keystore(request)
    try:
        store.activate(owner, kind, version)
    except KeyStoreError as error:
        raise _api_error(error) from None
    return _version_out(store, session, owner, kind, version)


def revoke_key(request: Request, session: Session, caller: Principal, owner: str, kind: str, version: int,
               reason: str) -> KeyVersionOut:
    """Revoke a version so that every later use is rejected; ``reason`` (2–200 characters) is stored."""
    check_target(request, session, caller, "revoke", owner, kind, version)
    reason = reason.strip()
    if not REASON_MIN_LENGTH <= len(reason) <= REASON_MAX_LENGTH:
        raise _reject(request, caller, "revoke", key_label(owner, kind, version), invalid(
            "KEY_REVOKE_REASON_INVALID",
            f"吊销原因长度为 {len(reason)} 个字符，应为 {REASON_MIN_LENGTH}–{REASON_MAX_LENGTH} 个字符。"
            "请写明吊销原因，例如“疑似泄露”。",
        ))
    _check_not_in_use(request, caller, "revoke", owner, kind, version)
    store = request_keystore(request)
    try:
        store.revoke(owner, kind, version, reason)
    except KeyStoreError as error:
        raise _api_error(error) from None
    return _version_out(store, session, owner, kind, version)


def destroy_key(request: Request, session: Session, caller: Principal, owner: str, kind: str, version: int,
                confirm: str) -> KeyVersionOut:
    """Erase a version's material (crypto-shredding) after ``confirm`` repeats ``owner/kind/vN`` exactly."""
    check_target(request, session, caller, "destroy", owner, kind, version)
    expected = key_label(owner, kind, version)
    if confirm != expected:
        raise _reject(request, caller, "destroy", expected, invalid(
            "KEY_CONFIRMATION_MISMATCH",
            f"确认文本 {confirm[:80]!r} 与要销毁的密钥不一致。请输入 {expected} 确认销毁；"
            "销毁后该版本的密钥材料被删除，其保护的数据将无法解密。",
        ))
    _check_not_in_use(request, caller, "destroy", owner, kind, version)
    store = request_keystore(request)
    try:
        store.destroy(owner, kind, version)
    except KeyStoreError as error:
        raise _api_error(error) from None
    return _version_out(store, session, owner, kind, version)
