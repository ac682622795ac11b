"""User management: create, edit, disable and enable, unlock, reset password, and self-service password change.

Each function checks its input, writes the change with its audit event in one transaction and
raises :class:`~admin_api.errors.ApiError` with a Chinese message when it cannot. The route wraps
each call so that a rejected write is audited as ``failed`` on its own transaction.
"""

from __future__ import annotations

import re
from typing import Any

from datetime import datetime

from fastapi import Request
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from admin_api import passwords, roles, totp
from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.errors import conflict, forbidden, invalid, not_found
from admin_api.models import ApiToken, Institution, User
from admin_api.roles import role_name
from admin_api.security import Principal

USERNAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{2,27}$")
"""3 to 28 characters: sandbox Unix users are the unix_prefix plus the user name, and Linux allows 32."""
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1000


def find_user(session: Session, username: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None:
        raise not_found("USER_NOT_FOUND", f"用户 {username} 不存在，请检查用户名。")
    return user


def find_managed_user(session: Session, caller: Principal, username: str) -> User:
    """Return the user ``username`` if ``caller`` may manage it: any user for a regulator, own institution's otherwise.

    An institution administrator asking for another institution's user gets 403 ``INSTITUTION_FORBIDDEN``.
    """
    user = find_user(session, username)
    if caller.institution_code is not None and user.institution_code != caller.institution_code:
        raise forbidden(
            "INSTITUTION_FORBIDDEN",
            f"您只能管理本机构（{caller.institution_code}）的用户，用户 {username} 不属于本机构。",
        )
    return user


def check_assignment(caller: Principal, role: str, institution_code: str | None) -> None:
    """Reject a role or institution that ``caller`` may not give: institution administrators stay in their own institution.

    They may give only institution roles other than 机构管理员, and only in their own institution.
    """
    if caller.institution_code is None:
        return
    if role not in roles.assignable_roles(caller):
        choices = "、".join(f"{code}（{info.name}）" for code, info in roles.assignable_roles(caller).items())
        raise forbidden("ROLE_NOT_ASSIGNABLE", f"您不能授予角色 {role_name(role)}（{role}）。机构管理员可授予：{choices}。")
    if institution_code != caller.institution_code:
        raise forbidden(
            "INSTITUTION_FORBIDDEN",
            f"您只能为本机构（{caller.institution_code}）管理用户，不能使用机构代码 {institution_code}。",
        )


def _check_role(role: str) -> None:
    if roles.get_role(role) is None:
        choices = "、".join(f"{code}（{info.name}）" for code, info in roles.all_roles().items())
        raise invalid("ROLE_INVALID", f"角色 {role!r} 无效，可选：{choices}。")


def _institution_for(session: Session, role: str, code: str | None) -> Institution | None:
    """Return the institution a user of ``role`` belongs to, checking that the role allows ``code``."""
    if roles.is_institution_role(role):
        if not code:
            raise invalid("INSTITUTION_REQUIRED",
                          f"角色 {role_name(role)} 必须属于一个机构，请填写机构代码（institution_code）。")
        institution = session.scalars(select(Institution).where(Institution.code == code)).first()
        if institution is None:
            raise invalid("INSTITUTION_NOT_FOUND", f"机构代码 {code} 不存在，请先登记该机构或检查代码。")
        return institution
    if code:
        raise invalid(
            "INSTITUTION_NOT_ALLOWED",
            f"角色 {role_name(role)} 是监管方角色，不能属于机构 {code}；请删除机构代码（institution_code）。",
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


def check_new_user(
    session: Session, caller: Principal, *, username: str, display_name: str, email: str, role: str,
    institution_code: str | None,
) -> Institution | None:
    """Check the fields of a user that ``caller`` wants to create, without writing; return the user's institution.

    Raises ApiError for the first field that is invalid. Bulk import calls this for every row before it
    stages any user, so a file with bad rows is rejected without hashing a single password.
    """
    if not USERNAME_PATTERN.match(username):
        raise invalid(
            "USERNAME_INVALID",
            f"用户名 {username!r} 无效：须为 3 到 28 个字符，以小写字母开头，只含小写字母、数字和下划线。",
        )
    _check_role(role)
    if caller.institution_code is not None and not institution_code:
        institution_code = caller.institution_code  # an institution administrator creates users of their own institution
    check_assignment(caller, role, institution_code)
    _check_contact(display_name, email)
    institution = _institution_for(session, role, institution_code)
    if session.scalars(select(User.id).where(User.username == username)).first() is not None:
        raise conflict("USER_EXISTS", f"用户名 {username} 已被使用，请换一个用户名。")
    return institution


def stage_user(
    session: Session, request: Request, caller: Principal, *, username: str, display_name: str, email: str,
    role: str, institution_code: str | None, password: str | None, password_hash: str | None = None,
) -> tuple[User, str | None]:
    """Check and add a user whose password must be changed at the first sign-in, and flush; the caller audits and commits.

    Returns the user and the generated password, or None when ``password`` was given (and checked).
    ``password_hash`` is the argon2id hash of a given ``password`` made earlier (see passwords.set_password).
    """
    settings = request.app.state.settings
    institution = check_new_user(session, caller, username=username, display_name=display_name, email=email,
                                 role=role, institution_code=institution_code)
    user = User(username=username, display_name=display_name.strip(), email=email, role=role,
                institution_id=institution.id if institution else None, institution=institution, password_hash="",
                is_active=True)
    session.add(user)
    session.flush()
    generated = passwords.generate_password(username, settings) if password is None else None
    passwords.set_password(session, user, generated or password or "", settings, must_change=True,
                           password_hash=password_hash if generated is None else None, one_time=generated is not None)
    return user, generated


def create_user(
    session: Session, request: Request, caller: Principal, *, username: str, display_name: str, email: str,
    role: str, institution_code: str | None, password: str | None,
) -> tuple[User, str | None]:
    """Create a user whose password must be changed at the first sign-in; commit.

    Returns the user and the generated password, or None when ``password`` was given (and checked).
    """
    user, generated = stage_user(session, request, caller, username=username, display_name=display_name, email=email,
                                 role=role, institution_code=institution_code, password=password)
    add_event(session, request, caller, "users.create", f"user:{username}", "success",
              {"role": role, "institution_code": user.institution_code, "generated_password": generated is not None})
    session.commit()
    return user, generated


def update_user(session: Session, request: Request, caller: Principal, username: str, changes: dict[str, Any]) -> User:
    """Apply ``changes`` (display_name, email, role, institution_code) to a user; commit.

    A role change between two of the three administrator roles is rejected: the separation of the
    system, security and audit administrators requires a new account instead.
    """
    user = find_managed_user(session, caller, username)
    role = changes.get("role", user.role)
    _check_role(role)
    old_duty, new_duty = roles.admin_duty(user.role), roles.admin_duty(role)
    if role != user.role and old_duty and new_duty and old_duty != new_duty:
        raise conflict(
            "ADMIN_ROLE_CHANGE_FORBIDDEN",
            f"用户 {username} 是{role_name(user.role)}，不能改为{role_name(role)}：系统管理员、安全管理员和审计管理员"
            "必须由不同账号担任。请为新职责新建用户，并按需停用本账号。",
        )
    if role != user.role and user.username == caller.username:
        raise conflict("OWN_ROLE_CHANGE_FORBIDDEN", "不能修改本人的角色，请由另一位系统管理员操作。")
    code = changes["institution_code"] if "institution_code" in changes else user.institution_code
    if role != user.role or code != user.institution_code:
        check_assignment(caller, role, code)
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
    user = find_managed_user(session, caller, username)
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
    user = find_managed_user(session, caller, username)
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
    user = find_managed_user(session, caller, username)
    password = passwords.generate_password(username, settings)
    passwords.set_password(session, user, password, settings, must_change=True, one_time=True)
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
    user = find_managed_user(session, caller, username)
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


def _search_conditions(session: Session, caller: Principal, text: str | None, role: str | None,
                       institution_code: str | None, active: bool | None,
                       updated_since: datetime | None) -> list[Any] | None:
    """Return the WHERE conditions of a user search by ``caller``, or None when nothing can match.

    ``text`` is matched with ILIKE on PostgreSQL and with LIKE on SQLite, where LIKE already ignores
    ASCII case: SQLAlchemy's ``icontains`` would wrap both sides in lower(), which took SQLite about
    2.5 times as long over 20,000 users.
    """
    if caller.institution_code is not None:
        if institution_code not in (None, caller.institution_code):
            return None  # another institution's users are not visible, so none match
        institution_code = caller.institution_code
    conditions: list[Any] = []
    if text:
        pattern = "%" + text.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"
        if session.get_bind().dialect.name == "postgresql":
            conditions.append(or_(User.username.ilike(pattern, escape="/"), User.display_name.ilike(pattern, escape="/")))
        else:
            conditions.append(or_(User.username.like(pattern, escape="/"), User.display_name.like(pattern, escape="/")))
    if role:
        conditions.append(User.role == role)
    if institution_code:
        conditions.append(User.institution_id.in_(select(Institution.id).where(Institution.code == institution_code)))
    if active is not None:
        conditions.append(User.is_active.is_(active))
    if updated_since is not None:
        conditions.append(User.updated_at > updated_since)
    return conditions


def search_users(session: Session, caller: Principal, *, text: str | None = None, role: str | None = None,
                 institution_code: str | None = None, active: bool | None = None,
                 updated_since: datetime | None = None, limit: int = LIST_LIMIT_DEFAULT,
                 offset: int = 0) -> tuple[list[User], int]:
    """Return one page of the users visible to ``caller``, ordered by user name, and the number of matches.

    Institution administrators see their own institution's users only. ``text`` matches a substring
    of the user name or the display name, ignoring ASCII case.
    NOTE: the substring match cannot use an index, so it scans the users table (20,000 rows at the target scale).
    """
    conditions = _search_conditions(session, caller, text, role, institution_code, active, updated_since)
    if conditions is None:
        return [], 0
    total = session.scalar(select(func.count()).select_from(User).where(*conditions)) or 0
    rows = session.scalars(select(User).where(*conditions).order_by(User.username).limit(limit).offset(offset))
    return list(rows.unique()), total


USER_SUMMARY_FIELDS = ("username", "display_name", "role", "institution_code", "is_active", "email")


def search_user_summaries(session: Session, caller: Principal, *, text: str | None = None, role: str | None = None,
                          institution_code: str | None = None, active: bool | None = None,
                          updated_since: datetime | None = None, limit: int = LIST_LIMIT_DEFAULT,
                          offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Return the same page as :func:`search_users` as dicts of USER_SUMMARY_FIELDS, and the number of matches.

    Selects only those columns, without loading User and Institution objects: the hub and registry
    synchronisation page through every user with this, so it must stay cheap at 20,000 users.
    """
    conditions = _search_conditions(session, caller, text, role, institution_code, active, updated_since)
    if conditions is None:
        return [], 0
    total = session.scalar(select(func.count()).select_from(User).where(*conditions)) or 0
    rows = session.execute(
        select(User.username, User.display_name, User.role, Institution.code, User.is_active, User.email)
        .outerjoin(Institution, Institution.id == User.institution_id)
        .where(*conditions).order_by(User.username).limit(limit).offset(offset)
    )
    return [dict(zip(USER_SUMMARY_FIELDS, row, strict=True)) for row in rows], total
