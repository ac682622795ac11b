"""Roles and capabilities (角色管理): list the built-in and custom roles, define, change and delete custom roles."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from admin_api import roles
from admin_api.deps import get_session, require
from admin_api.errors import not_found
from admin_api.models import User
from admin_api.roles import RoleInfo
from admin_api.routes.users import _audited
from admin_api.security import CAPABILITIES, Principal

router = APIRouter()


class RoleOut(BaseModel):
    code: str
    name: str
    scope: str
    """``regulator`` (监管方) or ``institution`` (机构)."""
    builtin: bool
    description: str
    capabilities: list[str]
    users: int
    """Number of users holding the role."""

    @classmethod
    def of(cls, info: RoleInfo, users: int) -> RoleOut:
        return cls(code=info.code, name=info.name, scope=info.scope, builtin=info.builtin,
                   description=info.description, capabilities=sorted(info.capabilities), users=users)


class CapabilityOut(BaseModel):
    code: str
    name: str
    grantable_scopes: list[str]
    """Scopes of custom roles that may hold the capability; empty for capabilities of services."""
    reserved_to: str | None
    """The one of the three administrators (三员) this capability is reserved to, if any."""


class RoleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(max_length=64)
    name: str = Field(max_length=100)
    scope: str = Field(max_length=16)
    capabilities: list[str] = Field(max_length=64)
    description: str = Field(default="", max_length=1000)


class RoleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=100)
    capabilities: list[str] | None = Field(default=None, max_length=64)
    description: str | None = Field(default=None, max_length=1000)


def holder_counts(session: Session) -> dict[str, int]:
    """Return the number of users of each role code that has any."""
    return {role: count for role, count in session.execute(select(User.role, func.count()).group_by(User.role))}


def _stored(code: str) -> RoleInfo:
    info = roles.get_role(code)
    if info is None:  # deleted by another request since the write
        raise not_found("ROLE_NOT_FOUND", f"角色 {code} 不存在，请检查角色代码。")
    return info


@router.get("/roles", response_model=list[RoleOut])
def list_roles(session: Session = Depends(get_session),
               _caller: Principal = Depends(require("roles.read"))) -> list[RoleOut]:
    """List the built-in roles, then the custom roles, with their capabilities and number of users."""
    counts = holder_counts(session)
    return [RoleOut.of(info, counts.get(code, 0)) for code, info in roles.all_roles().items()]


@router.get("/capabilities", response_model=list[CapabilityOut])
def list_capabilities(_caller: Principal = Depends(require("roles.read"))) -> list[CapabilityOut]:
    """List every capability with its Chinese name and the custom-role scopes that may hold it."""
    grantable = {scope: roles.grantable_capabilities(scope) for scope in roles.SCOPE_NAMES}
    reserved = {cap: admin for admin, caps in roles.SEPARATED_DUTIES.items() for cap in caps}
    return [
        CapabilityOut(code=cap, name=label, grantable_scopes=[scope for scope in grantable if cap in grantable[scope]],
                      reserved_to=reserved.get(cap))
        for cap, (label, _holders) in CAPABILITIES.items()
    ]


@router.get("/roles/{code}", response_model=RoleOut)
def get_role(code: str, session: Session = Depends(get_session),
             _caller: Principal = Depends(require("roles.read"))) -> RoleOut:
    """Return one role."""
    info = roles.get_role(code)
    if info is None:
        raise not_found("ROLE_NOT_FOUND", f"角色 {code} 不存在，请检查角色代码。")
    return RoleOut.of(info, roles.holders(session, code))


@router.post("/roles", response_model=RoleOut, status_code=201)
def create_role(body: RoleCreate, request: Request, session: Session = Depends(get_session),
                caller: Principal = Depends(require("roles.write"))) -> RoleOut:
    """Define a custom role; three-administrator separation and the scope limit which capabilities it may hold."""
    _audited(request, session, caller, "roles.create", f"role:{body.code[:64]}", lambda: roles.create_role(
        session, request, caller, code=body.code, name=body.name, scope=body.scope, capabilities=body.capabilities,
        description=body.description))
    return RoleOut.of(_stored(body.code), 0)


@router.patch("/roles/{code}", response_model=RoleOut)
def update_role(code: str, body: RoleUpdate, request: Request, session: Session = Depends(get_session),
                caller: Principal = Depends(require("roles.write"))) -> RoleOut:
    """Change the name, description or capabilities of a custom role; its users get the new capabilities at once."""
    changes = body.model_dump(exclude_none=True)
    _audited(request, session, caller, "roles.update", f"role:{code[:64]}",
             lambda: roles.update_role(session, request, caller, code, changes))
    return RoleOut.of(_stored(code), roles.holders(session, code))


@router.delete("/roles/{code}", status_code=204)
def delete_role(code: str, request: Request, session: Session = Depends(get_session),
                caller: Principal = Depends(require("roles.write"))) -> None:
    """Delete a custom role that no user holds."""
    _audited(request, session, caller, "roles.delete", f"role:{code[:64]}",
             lambda: roles.delete_role(session, request, caller, code))
