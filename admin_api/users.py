"""User management: create, edit, disable and enable, unlock, reset password, and self-service password change.

Each function checks its input, writes the change with its audit event in one transaction and
raises :class:`~admin_api.errors.ApiError` with a Chinese message when it cannot. The route wraps
each call so that a rejected write is audited as ``failed`` on its own transaction.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from admin_api import passwords, totp
from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.errors import conflict, invalid, not_found
from admin_api.models import ROLE_NAMES, ApiToken, Institution, User
from admin_api.security import Principal

USERNAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{2,27}$")
"""3 to 28 characters: sandbox Unix users are the unix_prefix plus the user name, and Linux allows 32."""
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
ADMINISTRATOR_ROLES = frozenset({"system_admin", "security_admin", "audit_admin"})
"""The three separated administrators: no account may move from one of them to another."""
INSTITUTION_ROLES = frozenset({"modeller", "reporter"})
"""Roles that belong to an institution; every other role is a regulator role without one."""


def find_user(session: Session, username: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None:
        raise not_found("USER_NOT_FOUND", f"用户 {username} 不存在，请检查用户名。")
    return user


def _check_role(role: str) -> None:
    if role not in ROLE_NAMES:
        choices = "、".join(f"{code}（{name}）" for code, name in ROLE_NAMES.items())
        raise invalid("ROLE_INVALID", f"角色 {role!r} 无效，可选：{choices}。")


def _institution_for(session: Session, role: str, code: str | None) -> Institution | None:
    """Return the institution a user of ``role`` belongs to, checking that the role allows ``code``."""
    if role in INSTITUTION_ROLES:
        if not code:
            raise invalid("INSTITUTION_REQUIRED", f"角色 {ROLE_NAMES[role]} 必须属于一个机构，请填写机构代码（institution_code）。")
        institution = session.scalars(select(Institution).where(Institution.code == code)).first()
        if institution is None:
            raise invalid("INSTITUTION_NOT_FOUND", f"机构代码 {code} 不存在，请先登记该机构或检查代码。")
        return institution
    if code:
        raise invalid(
            "INSTITUTION_NOT_ALLOWED",
            f"角色 {ROLE_NAMES[role]} 是监管方角色，不能属于机构 {code}；请删除机构代码（institution_code）。",
        )
    return None


def _check_contact(display_name: str, email: str) -> None:
    if not display_name.strip():
        raise invalid("DISPLAY_NAME_MISSING", "姓名（display_name）不能为空，请填写用户姓名。")
    if not EMAIL_PATTERN.match(email):
        raise invalid("EMAIL_INVALID", f"电子邮箱 {email!r} 格式无效，应形如 name@example.com。")


def revoke_tokens(session: Session, user: User) -> int:
    """Revoke every unrevoked access token and console session of ``user``; return how many. The caller commits."""
    result = session.execute(
        update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None)).values(revoked_at=utc_now())
    )
    return result.rowcount or 0


def create_user(
    session: Session, request: Request, caller: Principal, *, username: str, display_name: str, email: str,
    role: str, institution_code: str | None, password: str | None,
) -> tuple[User, str | None]:
    """Create a user whose password must be changed at the first sign-in; commit.

    Returns the user and the generated password, or None when ``password`` was given (and checked).
    """
    settings = request.app.state.settings
    if not USERNAME_PATTERN.match(username):
        raise invalid(
            "USERNAME_INVALID",
            f"用户名 {username!r} 无效：须为 3 到 28 个字符，以小写字母开头，只含小写字母、数字和下划线。",
        )
    _check_role(role)
    _check_contact(display_name, email)
    institution = _institution_for(session, role, institution_code)
    if session.scalars(select(User.id).where(User.username == username)).first() is not None:
        raise conflict("USER_EXISTS", f"用户名 {username} 已被使用，请换一个用户名。")

    user = User(username=username, display_name=display_name.strip(), email=email, role=role,
                institution_id=institution.id if institution else None, password_hash="", is_active=True)
    session.add(user)
    session.flush()
    generated = passwords.generate_password(username, settings) if password is None else None
    passwords.set_password(session, user, generated or password or "", settings, must_change=True)
    add_event(session, request, caller, "users.create", f"user:{username}", "success",
              {"role": role, "institution_code": institution_code, "generated_password": generated is not None})
    session.commit()
    return user, generated


def update_user(session: Session, request: Request, caller: Principal, username: str, changes: dict[str, Any]) -> User:
    """Apply ``changes`` (display_name, email, role, institution_code) to a user; commit.

    A role change between two of the three administrator roles is rejected: the separation of the
    system, security and audit administrators requires a new account instead.
    """
    user = find_user(session, username)
    role = changes.get("role", user.role)
    _check_role(role)
    if role != user.role and user.role in ADMINISTRATOR_ROLES and role in ADMINISTRATOR_ROLES:
        raise conflict(
            "ADMIN_ROLE_CHANGE_FORBIDDEN",
            f"用户 {username} 是{ROLE_NAMES[user.role]}，不能改为{ROLE_NAMES[role]}：系统管理员、安全管理员和审计管理员"
            "必须由不同账号担任。请为新职责新建用户，并按需停用本账号。",
        )
    if role != user.role and user.username == caller.username:
        raise conflict("OWN_ROLE_CHANGE_FORBIDDEN", "不能修改本人的角色，请由另一位系统管理员操作。")
    code = changes["institution_code"] if "institution_code" in changes else user.institution_code
    institution = _institution_for(session, role, code)
    display_name = changes.get("display_name", user.display_name)
    email = changes.get("email", user.email)
    _check_contact(display_name, email)

    before = {"display_name": user.display_name, "email": user.email, "role": user.role,
              "institution_code": user.institution_code}
    user.display_name = display_name.strip()
    user.email = email
    user.role = role
    user.institution_id = institution.id if institution else None
    user.institution = institution
    after = {"display_name": user.display_name, "email": user.email, "role": user.role,
             "institution_code": institution.code if institution else None}
    changed = {key: {"from": before[key], "to": after[key]} for key in after if before[key] != after[key]}
    add_event(session, request, caller, "users.update", f"user:{username}", "success", {"changes": changed})
    session.commit()
    return user


def set_active(session: Session, request: Request, caller: Principal, username: str, active: bool) -> User:
    """Enable or disable a user; disabling revokes all their tokens and console sessions in the same commit."""
    user = find_user(session, username)
    if not active and user.username == caller.username:
        raise conflict("OWN_ACCOUNT_DISABLE_FORBIDDEN", "不能停用本人账号，请由另一位系统管理员操作。")
    user.is_active = active
    detail: dict[str, Any] = {}
    if not active:
        detail["revoked_tokens"] = revoke_tokens(session, user)
    add_event(session, request, caller, "users.enable" if active else "users.disable", f"user:{username}", "success",
              detail or None)
    session.commit()
    return user


def unlock_user(session: Session, request: Request, caller: Principal, username: str) -> User:
    """Clear the lockout and the failure counters of a user; commit."""
    user = find_user(session, username)
    detail = {"locked_until": user.locked_until.isoformat() if user.locked_until else None,
              "failed_sign_ins": user.failed_sign_ins}
    passwords.reset_failures(user)
    add_event(session, request, caller, "users.unlock", f"user:{username}", "success", detail)
    session.commit()
    return user


def reset_password(session: Session, request: Request, caller: Principal, username: str) -> tuple[User, str]:
    """Give a user a new generated password that must be changed at the next sign-in; commit.

    The user's tokens and console sessions are revoked and a lockout is cleared. Returns the user and
    the password, which is shown once and not stored in clear.
    """
    settings = request.app.state.settings
    user = find_user(session, username)
    password = passwords.generate_password(username, settings)
    passwords.set_password(session, user, password, settings, must_change=True)
    passwords.reset_failures(user)
    revoked = revoke_tokens(session, user)
    add_event(session, request, caller, "users.reset_password", f"user:{username}", "success",
              {"revoked_tokens": revoked})
    session.commit()
    return user, password


def start_totp_enrolment(session: Session, request: Request, user: User) -> tuple[str, str]:
    """Store a new pending TOTP secret for ``user`` and return (secret, otpauth URI); commit.

    The caller has checked the password with ``authenticate(..., action="auth.totp_enrol")``,
    whose success event is committed here.
    """
    secret, uri = totp.start_enrolment(session, request, user)
    session.commit()
    return secret, uri


def confirm_totp_enrolment(session: Session, request: Request, user: User, code: str) -> None:
    """Confirm the pending secret with a first code; commit with the ``auth.totp_confirm`` event of ``authenticate``."""
    totp.confirm_enrolment(session, request, user, code)
    session.commit()


def reset_totp(session: Session, request: Request, caller: Principal, username: str) -> User:
    """Remove a user's second factor (lost device); the user must enrol again. Commit."""
    user = find_user(session, username)
    had_secret = user.totp_secret is not None
    totp.reset(user)
    add_event(session, request, caller, "users.totp_reset", f"user:{username}", "success", {"had_secret": had_secret})
    session.commit()
    return user


def change_own_password(session: Session, request: Request, user: User, new_password: str) -> None:
    """Replace the password of ``user`` and revoke their tokens and sessions; commit.

    The caller has checked the old password with ``authenticate(..., action="auth.password")``,
    whose success event is committed here with the change.
    """
    passwords.set_password(session, user, new_password, request.app.state.settings, must_change=False)
    revoke_tokens(session, user)
    session.commit()
