"""Password policy and sign-in lockout of console and API users.

The policy (settings ``password_*``): a password has at least ``password_min_length`` characters
from at least three of four classes (upper case, lower case, digit, symbol), does not contain the
user name, and differs from the user's latest ``password_history_size`` passwords. A password
older than ``password_max_age_days``, or one issued by an administrator, can only be changed.

Lockout (settings ``sign_in_*``): after ``sign_in_max_failures`` consecutive wrong passwords the
account is locked for the next duration of ``sign_in_lockout_minutes``. A successful sign-in
resets both counters, and a system administrator can unlock the account at once.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from admin_api.db import utc_now
from admin_api.display import BEIJING
from admin_api.errors import ApiError, invalid
from admin_api.models import PasswordHistory, User
from admin_api import security
from admin_api.security import hash_one_time_password, hash_password, verify_password
from regsandbox_core.settings import Settings

GENERATED_LENGTH = 20
CLASS_NAMES = ("大写字母", "小写字母", "数字", "符号")


def _classes(password: str) -> list[bool]:
    return [
        any(c.isupper() for c in password),
        any(c.islower() for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password),
    ]


def check_strength(password: str, username: str, settings: Settings) -> None:
    """Raise ApiError (422) naming the first rule of the policy that ``password`` breaks."""
    if len(password) < settings.password_min_length:
        raise invalid(
            "PASSWORD_TOO_SHORT",
            f"密码只有 {len(password)} 个字符，至少需要 {settings.password_min_length} 个字符，请设置更长的密码。",
        )
    present = _classes(password)
    if sum(present) < 3:
        missing = "、".join(name for name, found in zip(CLASS_NAMES, present, strict=True) if not found)
        raise invalid(
            "PASSWORD_TOO_SIMPLE",
            f"密码须包含大写字母、小写字母、数字、符号中的至少三类，当前缺少：{missing}。请补充其中至少 {3 - sum(present)} 类。",
        )
    if username and username.lower() in password.lower():
        raise invalid(
            "PASSWORD_CONTAINS_USERNAME", f"密码不能包含用户名 {username}（不区分大小写），请换一个密码。"
        )


def _recent_hashes(session: Session, user: User, settings: Settings) -> list[str]:
    query = (
        select(PasswordHistory.password_hash)
        .where(PasswordHistory.user_id == user.id)
        .order_by(PasswordHistory.created_at.desc(), PasswordHistory.id.desc())
        .limit(settings.password_history_size)
    )
    return list(session.scalars(query))


def set_password(session: Session, user: User, password: str, settings: Settings, *, must_change: bool,
                 password_hash: str | None = None, one_time: bool = False) -> None:
    """Check ``password`` against the policy and the history, then store it as the user's password.

    ``must_change`` marks an administrator-issued password that the user has to replace at the next
    sign-in. ``one_time`` marks a password the platform generated, stored with
    :func:`~admin_api.security.hash_one_time_password`. ``password_hash``, when given, must be the
    hash of ``password`` made earlier: bulk import hashes before it opens its write transaction,
    because SQLite allows one writer at a time. The user row must be flushed (it needs an id).
    The caller commits.
    """
    check_strength(password, user.username, settings)
    recent = _recent_hashes(session, user, settings)
    if user.password_hash and user.password_hash not in recent:
        recent.append(user.password_hash)
    if any(verify_password(old, password) for old in recent):
        raise invalid(
            "PASSWORD_REUSED",
            f"新密码与最近 {settings.password_history_size} 次使用过的密码之一相同，请设置一个未用过的密码。",
        )

    now = utc_now()
    if password_hash is None:
        password_hash = hash_one_time_password(password) if one_time else hash_password(password)
    user.password_hash = password_hash
    user.password_changed_at = now
    user.must_change_password = must_change
    session.add(PasswordHistory(user_id=user.id, password_hash=user.password_hash, created_at=now))
    session.flush()
    keep = select(PasswordHistory.id).where(PasswordHistory.user_id == user.id).order_by(
        PasswordHistory.created_at.desc(), PasswordHistory.id.desc()
    ).limit(settings.password_history_size)
    session.execute(delete(PasswordHistory).where(
        PasswordHistory.user_id == user.id, PasswordHistory.id.not_in(list(session.scalars(keep)))
    ))


def generate_password(username: str, settings: Settings) -> str:
    """Return a random password that satisfies the policy for ``username`` (20 characters or the minimum length)."""
    for _attempt in range(100):
        password = security.generate_password(max(GENERATED_LENGTH, settings.password_min_length))
        if username.lower() not in password.lower():
            return password
    raise RuntimeError("could not generate a password without the user name in 100 attempts")


# --- expiry ------------------------------------------------------------------------------------


def password_expires_at(user: User, settings: Settings) -> datetime | None:
    """Return when the user's password expires, or None when passwords never expire."""
    if settings.password_max_age_days == 0:
        return None
    changed = user.password_changed_at or user.created_at
    return changed + timedelta(days=settings.password_max_age_days)


def change_required(user: User, settings: Settings) -> ApiError | None:
    """Return the 403 error a sign-in of ``user`` gets while its password must be changed, else None."""
    how = ("请先修改密码：在控制台登录页点击“修改密码”（/console/password），或调用 POST /api/v1/auth/password "
           "提交用户名、原密码和新密码，然后用新密码登录。")
    if user.must_change_password:
        return ApiError("PASSWORD_CHANGE_REQUIRED", f"用户 {user.username} 的密码由管理员设置，首次使用前必须修改。{how}",
                        status=403)
    expires_at = password_expires_at(user, settings)
    if expires_at is not None and expires_at <= utc_now():
        return ApiError(
            "PASSWORD_EXPIRED",
            f"用户 {user.username} 的密码已超过 {settings.password_max_age_days} 天未修改，已过期。{how}",
            status=403,
        )
    return None


# --- lockout -----------------------------------------------------------------------------------


def locked_error(user: User, settings: Settings) -> ApiError | None:
    """Return the 429 error of a locked account, or None when ``user`` may try to sign in."""
    if user.locked_until is None or user.locked_until <= utc_now():
        return None
    beijing = user.locked_until.astimezone(BEIJING)
    return ApiError(
        "ACCOUNT_LOCKED",
        f"用户 {user.username} 因连续 {settings.sign_in_max_failures} 次登录失败已被锁定，"
        f"请在北京时间 {beijing:%Y-%m-%d %H:%M} 后重试，或联系系统管理员解锁。",
        status=429,
    )


def record_failure(session: Session, user: User, settings: Settings) -> bool:
    """Count a wrong password of ``user`` and lock the account at the limit; commit; return whether it locked.

    The counter is incremented in the database, so concurrent failures are all counted.
    """
    session.execute(update(User).where(User.id == user.id).values(failed_sign_ins=User.failed_sign_ins + 1))
    session.refresh(user)
    locked = user.failed_sign_ins >= settings.sign_in_max_failures
    if locked:
        durations = settings.sign_in_lockout_minutes
        minutes = durations[min(user.lockouts, len(durations) - 1)]
        user.locked_until = utc_now() + timedelta(minutes=minutes)
        user.lockouts += 1
        user.failed_sign_ins = 0
    session.commit()
    return locked


def reset_failures(user: User) -> None:
    """Clear the failure and lockout counters after a successful sign-in or an unlock; the caller commits."""
    if user.failed_sign_ins or user.lockouts or user.locked_until is not None:
        user.failed_sign_ins = 0
        user.lockouts = 0
        user.locked_until = None

