"""TOTP second factor (RFC 6238: 6 digits, 30-second steps, SHA-1, as authenticator apps expect).

Enrolment stores a new random secret and returns it once with its ``otpauth://`` URI; a first
valid code confirms it, and from then on every sign-in needs a current code. Roles listed in the
``totp_required_roles`` setting can only enrol until they have a confirmed secret.

The secret is encrypted with SM4-GCM under the active platform data key of the key store
(``request_keystore``), with the user id and key version as associated data, so a ciphertext
copied to another user's row fails to decrypt. The ``documents`` envelope is meant for files with
their own per-document key, while a 20-byte secret needs only one direct encryption. A code is
accepted for the current step and one step either side (clock drift), and at most once: the step
of the last accepted code is stored, and an atomic UPDATE rejects a replay, even a concurrent one.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import time

import pyotp
from fastapi import Request
from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from admin_api.db import utc_now
from admin_api.errors import ApiError, conflict, unauthenticated
from admin_api.keyaccess import request_keystore
from admin_api.models import User
from admin_api.roles import requires_totp, role_name
from regsandbox_core.keystore import KIND_DATA, PLATFORM_OWNER, KeyStoreError
from regsandbox_core.sm import GCM_NONCE_SIZE, DecryptionFailed, sm4_gcm_decrypt, sm4_gcm_encrypt

logger = logging.getLogger(__name__)

ISSUER = "regsandbox"
STEP_SECONDS = 30
DRIFT_STEPS = 1
"""Steps accepted either side of the current one, for clocks that differ by up to 30 seconds."""


def is_enrolled(user: User) -> bool:
    return user.totp_enabled_at is not None and user.totp_secret is not None


def is_required(user: User, request: Request) -> bool:
    return requires_totp(user.role, request.app.state.settings.totp_required_roles)


def _associated_data(user: User, version: int) -> bytes:
    return f"regsandbox:totp:{user.id}:{version}".encode("ascii")


def _decrypt_secret(request: Request, user: User) -> str:
    version = user.totp_key_version
    try:
        raw = base64.b64decode(user.totp_secret or "", validate=True)
        key = request_keystore(request).get(PLATFORM_OWNER, KIND_DATA, version or 0)
        return sm4_gcm_decrypt(key.key, raw[:GCM_NONCE_SIZE], raw[GCM_NONCE_SIZE:],
                               _associated_data(user, version or 0)).decode("ascii")
    except (KeyStoreError, DecryptionFailed, binascii.Error, ValueError) as error:
        logger.error("TOTP secret of user %s is unreadable under data key v%s: %s", user.username, version,
                     type(error).__name__)
        raise conflict(
            "TOTP_SECRET_UNREADABLE",
            f"用户 {user.username} 的动态验证码密钥无法解密（数据密钥版本 {version}）。请联系系统管理员重置动态验证码绑定后重新绑定。",
        ) from error


def start_enrolment(session: Session, request: Request, user: User) -> tuple[str, str]:
    """Store a new pending secret for ``user`` and return (secret, otpauth URI); the caller audits and commits.

    A pending secret is replaced; a confirmed one must first be reset by a system administrator.
    """
    if is_enrolled(user):
        raise conflict(
            "TOTP_ALREADY_ENROLLED",
            f"用户 {user.username} 已绑定动态验证码。如需更换设备，请联系系统管理员重置绑定后重新绑定。",
        )
    secret = pyotp.random_base32(32)  # 160 bits, the key size RFC 4226 recommends
    key = request_keystore(request).current(PLATFORM_OWNER, KIND_DATA)
    nonce = secrets.token_bytes(GCM_NONCE_SIZE)
    sealed = sm4_gcm_encrypt(key.key, nonce, secret.encode("ascii"), _associated_data(user, key.version))
    user.totp_secret = base64.b64encode(nonce + sealed).decode("ascii")
    user.totp_key_version = key.version
    user.totp_enabled_at = None
    user.totp_last_step = None
    session.flush()
    uri = pyotp.TOTP(secret).provisioning_uri(name=user.username, issuer_name=ISSUER)
    return secret, uri


def _matching_step(secret: str, code: str) -> int | None:
    generator = pyotp.TOTP(secret)
    now_step = int(time.time()) // STEP_SECONDS
    for step in range(now_step - DRIFT_STEPS, now_step + DRIFT_STEPS + 1):
        if hmac.compare_digest(generator.at(step * STEP_SECONDS), code):
            return step
    return None


def check_code(session: Session, request: Request, user: User, code: str | None) -> None:
    """Accept ``code`` once for ``user`` (pending or confirmed secret) or raise ApiError (401).

    The accepted step is written with an atomic UPDATE in the caller's transaction; the caller commits.
    """
    if not code:
        raise unauthenticated(
            "TOTP_REQUIRED",
            f"用户 {user.username} 已绑定动态验证码，请同时提交身份验证器应用中显示的 6 位动态验证码（字段 totp）。",
        )
    code = code.strip()
    step = _matching_step(_decrypt_secret(request, user), code) if code.isdigit() and len(code) == 6 else None
    if step is None:
        raise unauthenticated(
            "TOTP_INVALID",
            "动态验证码错误或已过期。请输入身份验证器应用中当前显示的 6 位数字，并确认本机时间准确。",
        )
    claimed = session.execute(
        update(User)
        .where(User.id == user.id, or_(User.totp_last_step.is_(None), User.totp_last_step < step))
        .values(totp_last_step=step)
    )
    if claimed.rowcount != 1:
        raise unauthenticated(
            "TOTP_REUSED", "该动态验证码已使用过。请等待身份验证器显示下一个验证码（每 30 秒更新）后重试。"
        )
    user.totp_last_step = step


def confirm_enrolment(session: Session, request: Request, user: User, code: str) -> None:
    """Confirm the pending secret of ``user`` with a first code; the caller audits and commits."""
    if is_enrolled(user):
        raise conflict("TOTP_ALREADY_ENROLLED", f"用户 {user.username} 已完成动态验证码绑定，无需再次确认。")
    if user.totp_secret is None:
        raise conflict(
            "TOTP_NOT_STARTED",
            f"用户 {user.username} 尚未开始绑定动态验证码，请先调用 POST /api/v1/auth/totp/enrol 获取密钥。",
        )
    check_code(session, request, user, code)
    user.totp_enabled_at = utc_now()


def reset(user: User) -> None:
    """Remove the second factor of ``user`` (lost device); the caller audits and commits."""
    user.totp_secret = None
    user.totp_key_version = None
    user.totp_enabled_at = None
    user.totp_last_step = None


def enrolment_required_error(user: User) -> ApiError:
    return ApiError(
        "TOTP_ENROLMENT_REQUIRED",
        f"{role_name(user.role)}必须使用动态验证码登录，用户 {user.username} 尚未绑定。请在控制台打开 /console/totp，"
        "或调用 POST /api/v1/auth/totp/enrol 与 /api/v1/auth/totp/confirm 完成绑定后再登录。",
        status=403,
    )
