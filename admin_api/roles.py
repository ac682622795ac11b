"""Roles as data: the built-in roles, custom roles defined by the system administrator, and their rules.

A role is a named set of capabilities (see :data:`admin_api.security.CAPABILITIES`) with a scope:
``regulator`` roles act across institutions and their users belong to no institution, while
``institution`` roles act only on their own institution's users and data. The eight built-in
roles are defined in code and cannot be changed. Custom roles live in the ``roles`` table, and
this module keeps an in-process copy of them that every process reloads at most
:data:`RELOAD_INTERVAL` after a change made by another process.

Separation of the three administrators (三员分立): each user has exactly one role, and the built-in
system, security and audit administrator roles are separate. A custom role may not combine
capabilities reserved to two of them, so no user gets the powers of two of the three.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.errors import conflict, invalid, not_found
from admin_api.models import ROLE_NAMES, Role, User
from admin_api.security import ANONYMOUS, CAPABILITIES, SERVICE, Principal

REGULATOR = "regulator"
INSTITUTION = "institution"
SCOPE_NAMES = {REGULATOR: "监管方", INSTITUTION: "机构"}

BUILTIN_SCOPES: dict[str, str] = {
    "system_admin": REGULATOR,
    "security_admin": REGULATOR,
    "audit_admin": REGULATOR,
    "regulator_reviewer": REGULATOR,
    "regulator_analyst": REGULATOR,
    "data_steward": REGULATOR,
    "institution_admin": INSTITUTION,
    "modeller": INSTITUTION,
    "reporter": INSTITUTION,
}
ADMINISTRATOR_ROLES = frozenset({"system_admin", "security_admin", "audit_admin"})

SEPARATED_DUTIES: dict[str, frozenset[str]] = {
    "system_admin": frozenset({"users.write", "roles.write", "institutions.write", "schedules.write",
                               "api_endpoints.write"}),
    "security_admin": frozenset({"keys.operate", "policies.approve", "extracts.override_k"}),
    "audit_admin": frozenset({"audit.read"}),
}
"""Capabilities reserved to each of the three administrators; a custom role may draw on one of these sets at most."""

STEWARD_DUTY = frozenset({"catalog.classify"})
"""Capabilities of the data steward (数据治理专员). The classes decide what every extract exposes, so a
custom role holding them may hold no capability reserved to one of the three administrators."""

SERVICE_ONLY = frozenset({"public", "auth.verify", "audit.append", "runs.work"})
"""Capabilities of platform services (or of everyone), never granted through a custom role."""

ROLE_CODE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{2,31}$")
RELOAD_INTERVAL = 5.0
"""Seconds after which a process reloads the custom roles, so a change made elsewhere applies within this time."""


@dataclass(frozen=True)
class RoleInfo:
    code: str
    name: str
    scope: str
    capabilities: frozenset[str]
    builtin: bool
    description: str = ""


class _Registry:
    """The custom roles of this process, reloaded from the database at most every RELOAD_INTERVAL seconds.

    A session bound to another database than the last load (two apps in one test process) reloads at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._custom: dict[str, RoleInfo] = {}
        self._loaded_at = float("-inf")
        self._source = ""

    def custom(self) -> dict[str, RoleInfo]:
        return self._custom

    def load(self, session: Session) -> None:
        rows = session.scalars(select(Role)).all()
        custom = {row.code: RoleInfo(row.code, row.name, row.scope, frozenset(row.capabilities or ()), False,
                                     row.description or "") for row in rows}
        with self._lock:
            self._custom = custom
            self._loaded_at = time.monotonic()
            self._source = _database_of(session)

    def refresh_if_stale(self, session: Session) -> None:
        if time.monotonic() - self._loaded_at >= RELOAD_INTERVAL or self._source != _database_of(session):
            self.load(session)


def _database_of(session: Session) -> str:
    return session.get_bind().url.render_as_string(hide_password=True)


registry = _Registry()


def builtin_roles() -> dict[str, RoleInfo]:
    return {
        code: RoleInfo(code, name, BUILTIN_SCOPES[code],
                       frozenset(cap for cap, (_label, holders) in CAPABILITIES.items() if code in holders), True)
        for code, name in ROLE_NAMES.items()
    }


def all_roles() -> dict[str, RoleInfo]:
    """Return the built-in roles followed by the custom roles, by code."""
    return {**builtin_roles(), **registry.custom()}


def get_role(code: str) -> RoleInfo | None:
    if code in ROLE_NAMES:
        return builtin_roles()[code]
    return registry.custom().get(code)


def role_allows(role: str, capability: str) -> bool:
    """Return whether a custom role ``role`` has ``capability``; built-in roles are checked by security.allows."""
    info = registry.custom().get(role)
    return info is not None and capability in info.capabilities


def role_name(code: str) -> str:
    """Return the Chinese name of a role code, including the service, anonymous and unknown ones."""
    if code == SERVICE:
        return "平台服务"
    if code == ANONYMOUS:
        return "未登录"
    info = get_role(code)
    return info.name if info else code


def is_institution_role(code: str) -> bool:
    info = get_role(code)
    return info is not None and info.scope == INSTITUTION


def is_cross_institution(principal: Principal) -> bool:
    """Return whether ``principal`` acts across institutions: services and users of regulator roles."""
    if principal.role == SERVICE:
        return True
    return principal.kind == "user" and principal.institution_code is None and not is_institution_role(principal.role)


def assignable_roles(caller: Principal) -> dict[str, RoleInfo]:
    """Return the roles ``caller`` may give to a user.

    A regulator caller may give any role. An institution caller (机构管理员) may give only the
    institution roles other than 机构管理员 itself, so institution administrators are appointed
    by the regulator.
    """
    roles = all_roles()
    if caller.institution_code is None:
        return roles
    return {code: info for code, info in roles.items() if info.scope == INSTITUTION and code != "institution_admin"}


def grantable_capabilities(scope: str) -> dict[str, str]:
    """Return the capabilities a custom role of ``scope`` may hold, with their Chinese names.

    Institution roles may hold only what some built-in institution role holds, because those
    capabilities are the ones whose routes check the caller's institution.
    """
    allowed = {cap: label for cap, (label, _holders) in CAPABILITIES.items() if cap not in SERVICE_ONLY}
    if scope == INSTITUTION:
        institution_caps = set().union(*(info.capabilities for info in builtin_roles().values()
                                         if info.scope == INSTITUTION))
        allowed = {cap: label for cap, label in allowed.items() if cap in institution_caps}
    return allowed


def _duty_of(capabilities: frozenset[str]) -> str | None:
    return next((admin for admin, reserved in SEPARATED_DUTIES.items() if capabilities & reserved), None)


def admin_duty(code: str) -> str | None:
    """Return which of the three administrators (system_admin, security_admin, audit_admin) ``code`` acts as, if any.

    A custom role acts as one when it contains a capability reserved to it. create_role and
    update_role allow at most one such administrator per role.
    """
    if code in ADMINISTRATOR_ROLES:
        return code
    info = registry.custom().get(code)
    return _duty_of(info.capabilities) if info else None


def requires_totp(code: str, required_roles: list[str]) -> bool:
    """Return whether users of ``code`` must sign in with a TOTP code.

    Built-in roles follow the setting ``totp_required_roles``. A custom regulator role, or a custom
    role holding any capability reserved to one of the three administrators, always requires it.
    """
    if code in required_roles:
        return True
    info = registry.custom().get(code)
    if info is None:
        return False
    reserved = set().union(*SEPARATED_DUTIES.values())
    return info.scope == REGULATOR or bool(info.capabilities & reserved)


# ---- writes --------------------------------------------------------------------------------------------------


def _check_capabilities(scope: str, capabilities: list[str]) -> frozenset[str]:
    grantable = grantable_capabilities(scope)
    unknown = [cap for cap in capabilities if cap not in grantable]
    if unknown:
        raise invalid(
            "ROLE_CAPABILITY_INVALID",
            f"权限 {'、'.join(unknown)} 不能授予{SCOPE_NAMES[scope]}自定义角色。可选权限："
            + "、".join(f"{cap}（{label}）" for cap, label in grantable.items()) + "。",
        )
    chosen = frozenset(capabilities)
    duties = [ROLE_NAMES[admin] for admin, reserved in SEPARATED_DUTIES.items() if chosen & reserved]
    if len(duties) > 1:
        raise conflict(
            "ROLE_SEPARATION_OF_DUTIES",
            f"同一角色不能同时包含{'与'.join(duties)}的专属权限（三员分立）。请把这些权限分到不同角色，由不同用户担任。",
        )
    if duties and chosen & STEWARD_DUTY:
        raise conflict(
            "ROLE_STEWARD_SEPARATION",
            f"同一角色不能同时包含数据治理专员的分级分类权限（{'、'.join(sorted(chosen & STEWARD_DUTY))}）"
            f"与{duties[0]}的专属权限。请把这些权限分到不同角色，由不同用户担任。",
        )
    return chosen


def _check_texts(name: str, description: str) -> tuple[str, str]:
    name = name.strip()
    if not name or len(name) > 50:
        raise invalid("ROLE_NAME_INVALID", f"角色名称 {name!r} 无效：不能为空，最多 50 个字符。")
    if len(description) > 500:
        raise invalid("ROLE_DESCRIPTION_TOO_LONG", "角色说明最多 500 个字符，请删减后重试。")
    return name, description.strip()


def _check_name_free(session: Session, name: str, own_code: str | None = None) -> None:
    taken = name in {info.name for code, info in builtin_roles().items()}
    row = session.scalars(select(Role).where(Role.name == name)).first()
    if taken or (row is not None and row.code != own_code):
        raise conflict("ROLE_NAME_EXISTS", f"角色名称“{name}”已被使用，请换一个名称。")


def find_custom_role(session: Session, code: str) -> Role:
    if code in ROLE_NAMES:
        raise conflict("ROLE_BUILTIN_IMMUTABLE", f"{ROLE_NAMES[code]}（{code}）是内置角色，不能修改或删除。可新建自定义角色。")
    row = session.scalars(select(Role).where(Role.code == code)).first()
    if row is None:
        raise not_found("ROLE_NOT_FOUND", f"角色 {code} 不存在，请检查角色代码。")
    return row


def holders(session: Session, code: str) -> int:
    return session.scalar(select(func.count()).select_from(User).where(User.role == code)) or 0


def create_role(session: Session, request: Request, caller: Principal, *, code: str, name: str, scope: str,
                capabilities: list[str], description: str = "") -> Role:
    """Store a custom role and its audit event; commit and reload this process's roles."""
    if not ROLE_CODE_PATTERN.match(code):
        raise invalid("ROLE_CODE_INVALID",
                      f"角色代码 {code!r} 无效：须为 3 到 32 个字符，以小写字母开头，只含小写字母、数字和下划线。")
    if code in ROLE_NAMES or code in (SERVICE, ANONYMOUS, "operator"):
        raise conflict("ROLE_EXISTS", f"角色代码 {code} 已被内置角色使用，请换一个代码。")
    if session.scalars(select(Role.id).where(Role.code == code)).first() is not None:
        raise conflict("ROLE_EXISTS", f"角色代码 {code} 已存在，请换一个代码。")
    if scope not in SCOPE_NAMES:
        raise invalid("ROLE_SCOPE_INVALID", f"角色范围 {scope!r} 无效，可选：regulator（监管方）、institution（机构）。")
    name, description = _check_texts(name, description)
    _check_name_free(session, name)
    chosen = _check_capabilities(scope, capabilities)

    row = Role(code=code, name=name, scope=scope, description=description, capabilities=sorted(chosen),
               created_by=caller.username)
    session.add(row)
    add_event(session, request, caller, "roles.create", f"role:{code}", "success",
              {"name": name, "scope": scope, "capabilities": sorted(chosen)})
    session.commit()
    registry.load(session)
    return row


def update_role(session: Session, request: Request, caller: Principal, code: str, changes: dict[str, Any]) -> Role:
    """Change the name, description or capabilities of a custom role; commit and reload.

    The scope is fixed once the role exists, because its users' institution membership depends on it.
    """
    row = find_custom_role(session, code)
    name, description = _check_texts(changes.get("name", row.name), changes.get("description", row.description or ""))
    if name != row.name:
        _check_name_free(session, name, own_code=code)
    chosen = _check_capabilities(row.scope, changes.get("capabilities", row.capabilities or []))
    old_duty = _duty_of(frozenset(row.capabilities or ()))
    new_duty = _duty_of(chosen)
    if old_duty != new_duty and holders(session, code):
        duty_names = [f"{ROLE_NAMES[duty]}职责" if duty else "不含三员职责" for duty in (old_duty, new_duty)]
        raise conflict(
            "ROLE_DUTY_CHANGE_FORBIDDEN",
            f"角色 {row.name} 已有用户，不能从“{duty_names[0]}”改为“{duty_names[1]}”（三员分立）。"
            "请新建角色，再为用户更换角色。",
        )

    before = {"name": row.name, "description": row.description, "capabilities": sorted(row.capabilities or [])}
    row.name, row.description, row.capabilities = name, description, sorted(chosen)
    after = {"name": row.name, "description": row.description, "capabilities": sorted(chosen)}
    changed = {key: {"from": before[key], "to": after[key]} for key in after if before[key] != after[key]}
    add_event(session, request, caller, "roles.update", f"role:{code}", "success", {"changes": changed})
    session.commit()
    registry.load(session)
    return row


def delete_role(session: Session, request: Request, caller: Principal, code: str) -> None:
    """Delete a custom role that no user holds; commit and reload."""
    row = find_custom_role(session, code)
    count = holders(session, code)
    if count:
        raise conflict("ROLE_IN_USE", f"角色 {row.name}（{code}）仍有 {count} 个用户，请先为这些用户更换角色再删除。")
    session.delete(row)
    add_event(session, request, caller, "roles.delete", f"role:{code}", "success",
              {"name": row.name, "capabilities": sorted(row.capabilities or [])})
    session.commit()
    registry.load(session)
