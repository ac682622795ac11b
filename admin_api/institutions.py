"""The institution registry: field rules, the legal entity / branch hierarchy, search and writes.

The API routes (:mod:`admin_api.routes.institutions`), the console page and the bulk import all
call these functions, so one set of rules and Chinese messages applies everywhere. Writes add
their audit event to the caller's session; the caller commits both together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session
from stdnum.cn import uscc as uscc_number
from stdnum.exceptions import InvalidChecksum, InvalidFormat, InvalidLength, ValidationError

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.errors import ApiError, conflict, invalid, not_found
from admin_api.models import Institution
from admin_api.security import Principal

INSTITUTION_TYPES = ("银行", "保险", "证券", "基金", "期货", "信托", "地方金融组织", "其他")
STATUS_NAMES = {"active": "正常", "inactive": "停用"}

CODE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{1,31}$")
"""Same rule as key owners and Unix group names (regsandbox_core.keystore, hub_config.spawner)."""
RESERVED_CODES = frozenset({"export", "import"})
"""Codes that would collide with the paths /institutions/export and /institutions/import."""
_PHONE = re.compile(r"^\+?[0-9][0-9 ()-]{5,30}$")
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
NAME_MAX = 200
LICENCE_MAX = 32
CONTACT_NAME_MAX = 100
LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 500


class InstitutionOut(BaseModel):
    code: str
    name: str
    type: str
    uscc: str | None
    licence_no: str | None
    parent_code: str | None
    is_legal_entity: bool
    contact_name: str | None
    contact_phone: str | None
    contact_email: str | None
    status: str
    status_name: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, item: Institution) -> InstitutionOut:
        return cls(
            code=item.code, name=item.name, type=item.type, uscc=item.uscc, licence_no=item.licence_no,
            parent_code=item.parent_code, is_legal_entity=item.is_legal_entity, contact_name=item.contact_name,
            contact_phone=item.contact_phone, contact_email=item.contact_email, status=item.status,
            status_name=STATUS_NAMES.get(item.status, item.status), created_at=item.created_at,
            updated_at=item.updated_at,
        )


class InstitutionFields(BaseModel):
    """Fields an administrator may set; each is checked again by :func:`clean_fields`."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=400)
    type: str | None = Field(default=None, max_length=50)
    uscc: str | None = Field(default=None, max_length=64)
    licence_no: str | None = Field(default=None, max_length=200)
    parent_code: str | None = Field(default=None, max_length=64)
    contact_name: str | None = Field(default=None, max_length=400)
    contact_phone: str | None = Field(default=None, max_length=100)
    contact_email: str | None = Field(default=None, max_length=400)


class InstitutionCreate(InstitutionFields):
    code: str = Field(max_length=64)
    name: str = Field(max_length=400)
    type: str = Field(max_length=50)
    uscc: str = Field(max_length=64)


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field value: the field, the value as given and the Chinese message."""

    field: str
    value: str
    code: str
    message: str


FIELD_LABELS = {
    "code": "机构代码",
    "name": "机构名称",
    "uscc": "统一社会信用代码",
    "licence_no": "金融许可证号",
    "type": "机构类型",
    "parent_code": "上级机构代码",
    "contact_name": "联系人",
    "contact_phone": "联系电话",
    "contact_email": "联系邮箱",
    "status": "状态",
}


def check_uscc(value: str) -> tuple[str | None, FieldProblem | None]:
    """Return the compact USCC, or a problem naming the value and what is wrong with it."""
    try:
        return uscc_number.validate(value), None
    except InvalidLength:
        compact = uscc_number.compact(value)
        message = (f"统一社会信用代码 {value} 长度错误：应为 18 位，实际为 {len(compact)} 位。"
                   "请核对营业执照或金融许可证上的代码。")
    except InvalidChecksum:
        compact = uscc_number.compact(value)
        expected = uscc_number.calc_check_digit(compact[:17])
        message = (f"统一社会信用代码 {value} 校验码错误：第 18 位应为 {expected}，实际为 {compact[-1]}。"
                   "请核对是否有错位或输错的字符。")
    except (InvalidFormat, ValidationError):
        message = (f"统一社会信用代码 {value} 格式错误：前 8 位应为数字，其余只能是数字或除 I、O、Z、S、V 以外的"
                   "大写字母。")
    return None, FieldProblem("uscc", value, "INSTITUTION_USCC_INVALID", message)


def _optional(value: str | None) -> str | None:
    if value is None:
        return None
    stripped = value.strip()
    return stripped or None


def clean_fields(values: dict[str, str | None]) -> tuple[dict[str, str | None], list[FieldProblem]]:
    """Trim and check the given fields; return the cleaned values and every problem found.

    Only keys present in ``values`` are checked. Uniqueness and the parent are checked elsewhere
    because they need the database.
    """
    cleaned: dict[str, str | None] = {}
    problems: list[FieldProblem] = []

    def problem(field: str, raw: str, code: str, message: str) -> None:
        problems.append(FieldProblem(field, raw, code, message))

    for field, raw in values.items():
        value = _optional(raw)
        if field == "code":
            if value is None:
                problem(field, "", "INSTITUTION_CODE_MISSING", "机构代码为必填项。")
            elif not CODE_PATTERN.match(value):
                problem(field, value, "INSTITUTION_CODE_INVALID",
                        f"机构代码 {value} 格式无效：应为 2–32 位小写字母、数字或下划线，并以小写字母开头，如 bank_d。")
            elif value in RESERVED_CODES:
                problem(field, value, "INSTITUTION_CODE_RESERVED", f"机构代码 {value} 为系统保留字，请换一个代码。")
        elif field == "name":
            if value is None:
                problem(field, "", "INSTITUTION_NAME_MISSING", "机构名称为必填项。")
            elif len(value) > NAME_MAX:
                problem(field, value, "INSTITUTION_NAME_TOO_LONG",
                        f"机构名称 {value[:40]}… 共 {len(value)} 个字符，超过上限 {NAME_MAX} 个。")
        elif field == "uscc":
            if value is None:
                problem(field, "", "INSTITUTION_USCC_MISSING", "统一社会信用代码为必填项。")
            else:
                value, uscc_problem = check_uscc(value)
                if uscc_problem:
                    problems.append(uscc_problem)
        elif field == "type":
            if value not in INSTITUTION_TYPES:
                problem(field, value or "", "INSTITUTION_TYPE_INVALID",
                        f"机构类型 {value or '（空）'} 无效，只能是：{'、'.join(INSTITUTION_TYPES)}。")
        elif field == "licence_no":
            if value is not None and len(value) > LICENCE_MAX:
                problem(field, value, "INSTITUTION_LICENCE_TOO_LONG",
                        f"金融许可证号 {value} 共 {len(value)} 个字符，超过上限 {LICENCE_MAX} 个。")
        elif field == "contact_name":
            if value is not None and len(value) > CONTACT_NAME_MAX:
                problem(field, value, "INSTITUTION_CONTACT_TOO_LONG",
                        f"联系人 {value[:40]} 共 {len(value)} 个字符，超过上限 {CONTACT_NAME_MAX} 个。")
        elif field == "contact_phone":
            if value is not None and not _PHONE.match(value):
                problem(field, value, "INSTITUTION_PHONE_INVALID",
                        f"联系电话 {value} 格式无效：只能包含数字、空格、括号、连字符和开头的 +，如 021-12345678。")
        elif field == "contact_email":
            if value is not None and (len(value) > 254 or not _EMAIL.match(value)):
                problem(field, value, "INSTITUTION_EMAIL_INVALID",
                        f"联系邮箱 {value} 不是有效的电子邮件地址，请改为如 name@example.cn 的格式。")
        cleaned[field] = value
    return cleaned, problems


def _first_error(problems: list[FieldProblem]) -> ApiError:
    """Return one 422 error that lists every problem, with the code of the first one."""
    return invalid(problems[0].code, "；".join(p.message.rstrip("。") for p in problems) + "。")


def find_institution(session: Session, code: str) -> Institution:
    institution = session.scalars(select(Institution).where(Institution.code == code)).first()
    if institution is None:
        raise not_found("INSTITUTION_NOT_FOUND", f"机构代码 {code} 不存在。")
    return institution


def _check_unique(session: Session, values: dict[str, str | None], own_id: int | None) -> None:
    for field, column, code in (("code", Institution.code, "INSTITUTION_CODE_EXISTS"),
                                ("name", Institution.name, "INSTITUTION_NAME_EXISTS"),
                                ("uscc", Institution.uscc, "INSTITUTION_USCC_EXISTS")):
        value = values.get(field)
        if value is None:
            continue
        other = session.scalars(select(Institution).where(column == value)).first()
        if other is not None and other.id != own_id:
            raise conflict(code, f"{FIELD_LABELS[field]} {value} 已被机构 {other.code}（{other.name}）使用，请核对后重试。")


def _check_parent(session: Session, institution: Institution | None, parent_code: str) -> Institution:
    """Return the parent named by ``parent_code`` for ``institution`` (None when creating), or raise."""
    parent = session.scalars(select(Institution).where(Institution.code == parent_code)).first()
    if parent is None:
        raise invalid("INSTITUTION_PARENT_NOT_FOUND", f"上级机构代码 {parent_code} 不存在，请先创建上级法人机构。")
    if institution is not None:
        ancestor: Institution | None = parent
        for _ in range(100):  # the hierarchy has two levels; the bound only guards against corrupt rows
            if ancestor is None:
                break
            if ancestor.id == institution.id:
                raise conflict("INSTITUTION_PARENT_CYCLE",
                               f"不能把 {parent_code} 设为机构 {institution.code} 的上级机构：这会形成循环隶属关系。")
            ancestor = ancestor.parent
    if parent.parent_id is not None:
        raise conflict("INSTITUTION_PARENT_NOT_LEGAL_ENTITY",
                       f"上级机构 {parent_code} 本身是分支机构；分支机构的上级必须是法人机构（没有上级的机构）。")
    if parent.status != "active":
        raise conflict("INSTITUTION_PARENT_INACTIVE", f"上级机构 {parent_code} 已停用，请先恢复该机构或选择其他上级机构。")
    if institution is not None:
        branches = session.scalar(select(func.count()).select_from(Institution)
                                  .where(Institution.parent_id == institution.id))
        if branches:
            raise conflict("INSTITUTION_HAS_BRANCHES",
                           f"机构 {institution.code} 下有 {branches} 个分支机构，不能再设为其他机构的分支机构。")
    return parent


def _changes(institution: Institution, before: dict[str, Any]) -> dict[str, Any]:
    after = InstitutionOut.of(institution).model_dump(include=set(before))
    return {key: [before[key], after[key]] for key in before if before[key] != after[key]}


def create_institution(request: Request, session: Session, caller: Principal, body: InstitutionCreate) -> Institution:
    """Check and add a new institution with its audit event; the caller commits."""
    values, problems = clean_fields(body.model_dump())
    if problems:
        raise _first_error(problems)
    _check_unique(session, values, None)
    parent = _check_parent(session, None, values["parent_code"]) if values["parent_code"] else None
    institution = Institution(
        code=values["code"], name=values["name"], type=values["type"], uscc=values["uscc"],
        licence_no=values["licence_no"], parent_id=parent.id if parent else None, contact_name=values["contact_name"],
        contact_phone=values["contact_phone"], contact_email=values["contact_email"], status="active",
    )
    institution.parent = parent
    session.add(institution)
    session.flush()
    add_event(session, request, caller, "institutions.create", f"institution:{institution.code}",
              detail={"name": institution.name, "uscc": institution.uscc, "parent_code": institution.parent_code})
    return institution


def update_institution(request: Request, session: Session, caller: Principal, code: str,
                       body: InstitutionFields) -> Institution:
    """Apply the fields present in ``body`` (``code`` cannot change); the caller commits.

    An empty string clears an optional field; name, type and USCC cannot be cleared.
    """
    institution = find_institution(session, code)
    given = body.model_dump(exclude_unset=True)
    for required in ("name", "type", "uscc"):
        if required in given and given[required] is None:
            given[required] = ""
    values, problems = clean_fields(given)
    if problems:
        raise _first_error(problems)
    _check_unique(session, values, institution.id)
    before = InstitutionOut.of(institution).model_dump(include=set(values))
    if "parent_code" in values:
        parent_code = values.pop("parent_code")
        parent = _check_parent(session, institution, parent_code) if parent_code else None
        institution.parent_id = parent.id if parent else None
        institution.parent = parent
    for field, value in values.items():
        setattr(institution, field, value)
    institution.updated_at = utc_now()
    session.flush()
    add_event(session, request, caller, "institutions.update", f"institution:{institution.code}",
              detail={"changes": _changes(institution, before)})
    return institution


def set_status(request: Request, session: Session, caller: Principal, code: str, status: str) -> Institution:
    """Deactivate (``inactive``) or reactivate (``active``) an institution; the caller commits.

    A legal entity with active branches cannot be deactivated, and a branch of an inactive legal
    entity cannot be reactivated.
    """
    institution = find_institution(session, code)
    if status == "inactive":
        active_branches = session.scalar(select(func.count()).select_from(Institution).where(
            Institution.parent_id == institution.id, Institution.status == "active"))
        if active_branches:
            raise conflict("INSTITUTION_HAS_ACTIVE_BRANCHES",
                           f"机构 {code} 下还有 {active_branches} 个正常状态的分支机构，请先停用这些分支机构。")
    elif institution.parent is not None and institution.parent.status != "active":
        raise conflict("INSTITUTION_PARENT_INACTIVE",
                       f"机构 {code} 的上级机构 {institution.parent.code} 已停用，请先恢复上级机构。")
    previous = institution.status
    institution.status = status
    institution.updated_at = utc_now()
    session.flush()
    action = "institutions.deactivate" if status == "inactive" else "institutions.reactivate"
    add_event(session, request, caller, action, f"institution:{code}",
              detail={"previous_state": previous, "state": status})
    return institution


def search_query(caller: Principal, text: str | None = None, kind: str | None = None, status: str | None = None) -> Any:
    """Build the SELECT of institutions visible to ``caller`` matching the filters, ordered by code.

    ``text`` matches a substring of the name, code or USCC. Institution users see their own
    institution only.
    """
    query = select(Institution)
    if caller.institution_code is not None:
        query = query.where(Institution.code == caller.institution_code)
    if text and text.strip():
        pattern = "%" + text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(or_(Institution.name.like(pattern, escape="\\"),
                                Institution.code.like(pattern, escape="\\"),
                                Institution.uscc.like(pattern.upper(), escape="\\")))
    if kind:
        query = query.where(Institution.type == kind)
    if status:
        query = query.where(Institution.status == status)
    return query


def search_institutions(session: Session, caller: Principal, *, text: str | None = None, kind: str | None = None,
                        status: str | None = None, limit: int = LIST_LIMIT_DEFAULT,
                        offset: int = 0) -> tuple[list[Institution], int]:
    """Return one page of matching institutions and the total number of matches."""
    query = search_query(caller, text, kind, status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = list(session.scalars(query.order_by(Institution.code).limit(limit).offset(offset)).unique())
    return page, total
