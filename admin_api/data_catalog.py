"""The data catalog (数据目录) in the admin database: search, classification by the data steward, lineage.

The rows are created and refreshed from the report templates by :mod:`admin_api.catalog_sync`.
A data steward (capability ``catalog.classify``) confirms or changes a column's class
(:func:`classify`). Changing an already confirmed class needs a reason. Every change increments
the column's version, appends a :class:`~admin_api.models.CatalogColumnHistory` row and is audited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field
from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.errors import conflict, invalid, not_found
from admin_api.extract_manifests import PublishedManifest, published_manifest
from admin_api.models import CatalogColumn, CatalogColumnHistory, ReportSubmission
from admin_api.security import Principal
from catalog.classes import (
    CATEGORY_MIN_LEVELS,
    KINDS,
    PI_CATEGORIES,
    SECURITY_LEVELS,
    UNCONFIRMED_LEVEL,
    ColumnClass,
    effective_class,
)
from extracts.policy import TREATMENTS
from intake.template_model import TemplateCatalog
from intake.warehouse import INTAKE_TABLE_DIR
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 500
REASON_MAX_LENGTH = 500
CHANGE_NAMES = {"created": "创建", "proposed": "更新建议", "reopened": "重新待审", "confirmed": "确认", "changed": "变更"}



# --- schemas ---------------------------------------------------------------------------------------


class ClassOut(BaseModel):
    level: int
    level_name: str
    pi_category: str | None
    category_name: str | None
    kind: str
    kind_name: str


class ColumnOut(BaseModel):
    table_code: str
    column_code: str
    name: str
    description: str | None
    data_type: str
    length: int | None
    template_code: str
    template_version: int
    data_owner: str | None
    proposed: ClassOut
    proposed_confidence: float
    evidence: list[dict[str, Any]]
    sampled_at: datetime | None
    confirmed: ClassOut | None
    confirmed_by: str | None
    confirmed_at: datetime | None
    effective: ClassOut
    """The class masking applies now: the confirmed one, else level 4 at least (fail closed)."""
    mismatch: bool
    """Whether the confirmed kind differs from the current proposal, e.g. after new values were sampled."""
    version: int


class HistoryOut(BaseModel):
    version: int
    change: str
    change_name: str
    snapshot: dict[str, Any]
    reason: str | None
    actor: str
    at: datetime


class ColumnDetail(ColumnOut):
    history: list[HistoryOut]


class Classification(BaseModel):
    """A steward's decision on a column's class."""

    level: int = Field(description="JR/T 0197 数据安全级别，1 至 5")
    pi_category: str | None = Field(default=None, max_length=8, description="JR/T 0171 类别 C1、C2、C3；非个人信息不填")
    kind: str = Field(max_length=32, description="字段语义类型，如 resident_id、mobile、amount")
    reason: str = Field(default="", max_length=REASON_MAX_LENGTH, description="变更已确认的分级分类时必填")
    data_owner: str | None = Field(default=None, max_length=100, description="数据责任部门或责任人；不填则不变")
    version: int | None = Field(default=None, ge=1, description="客户端看到的版本号；与当前版本不一致时拒绝，防止覆盖他人修改")


class TableOut(BaseModel):
    table_code: str
    template_name: str | None
    columns: int
    unconfirmed: int


class LineageOut(BaseModel):
    table_code: str
    column_code: str
    template: dict[str, Any]
    warehouse: dict[str, Any]
    extracts: dict[str, Any]


# --- conversions -----------------------------------------------------------------------------------


def class_out(value: ColumnClass) -> ClassOut:
    return ClassOut(level=value.level, level_name=SECURITY_LEVELS[value.level], pi_category=value.pi_category,
                    category_name=PI_CATEGORIES.get(value.pi_category) if value.pi_category else None,
                    kind=value.kind, kind_name=KINDS.get(value.kind, value.kind))


def proposed_class(row: CatalogColumn) -> ColumnClass:
    return ColumnClass(level=row.proposed_level, pi_category=row.proposed_category,  # type: ignore[arg-type]
                       kind=row.proposed_kind)


def confirmed_class(row: CatalogColumn) -> ColumnClass | None:
    if row.confirmed_level is None:
        return None
    return ColumnClass(level=row.confirmed_level, pi_category=row.confirmed_category,  # type: ignore[arg-type]
                       kind=row.confirmed_kind or "other")


def column_out(row: CatalogColumn) -> ColumnOut:
    confirmed = confirmed_class(row)
    return ColumnOut(
        table_code=row.table_code, column_code=row.column_code, name=row.name, description=row.description,
        data_type=row.data_type, length=row.length, template_code=row.template_code,
        template_version=row.template_version, data_owner=row.data_owner, proposed=class_out(proposed_class(row)),
        proposed_confidence=row.proposed_confidence, evidence=list(row.evidence or []), sampled_at=row.sampled_at,
        confirmed=class_out(confirmed) if confirmed else None, confirmed_by=row.confirmed_by,
        confirmed_at=row.confirmed_at, effective=class_out(effective_class(proposed_class(row), confirmed)),
        mismatch=confirmed is not None and confirmed.kind != row.proposed_kind, version=row.version,
    )


def extract_classes(session: Session) -> list[dict[str, Any]]:
    """Return the class masking applies to every catalog column, in the ``--classes`` format of ``python -m extracts build``.

    A column no steward has confirmed gets :func:`catalog.classes.effective_class` of its proposal
    (level 4 at least), so the extract stays fail-closed.
    """
    entries = []
    for row in session.scalars(select(CatalogColumn).order_by(CatalogColumn.table_code, CatalogColumn.column_code)):
        confirmed = confirmed_class(row)
        effective = effective_class(proposed_class(row), confirmed)
        entries.append({"table": row.table_code, "column": row.column_code, "level": effective.level,
                        "pi_category": effective.pi_category, "kind": effective.kind,
                        "confirmed": confirmed is not None})
    return entries


def _snapshot(row: CatalogColumn) -> dict[str, Any]:
    confirmed = confirmed_class(row)
    return {
        "name": row.name, "data_type": row.data_type, "length": row.length, "template_code": row.template_code,
        "template_version": row.template_version, "data_owner": row.data_owner,
        "proposed": {"level": row.proposed_level, "pi_category": row.proposed_category, "kind": row.proposed_kind,
                     "confidence": row.proposed_confidence, "evidence": list(row.evidence or [])},
        "confirmed": None if confirmed is None else {"level": confirmed.level, "pi_category": confirmed.pi_category,
                                                     "kind": confirmed.kind},
    }


def append_history(session: Session, row: CatalogColumn, change: str, actor: str, reason: str | None = None) -> None:
    session.add(CatalogColumnHistory(column_id=row.id, version=row.version, change=change, snapshot=_snapshot(row),
                                     reason=reason, actor=actor[:64]))


# --- reads -----------------------------------------------------------------------------------------


def _effective_level():  # type: ignore[no-untyped-def]
    unconfirmed_level = case((CatalogColumn.proposed_level > UNCONFIRMED_LEVEL, CatalogColumn.proposed_level),
                             else_=UNCONFIRMED_LEVEL)
    return case((CatalogColumn.confirmed_level.is_(None), unconfirmed_level), else_=CatalogColumn.confirmed_level)


def _effective_category():  # type: ignore[no-untyped-def]
    return case((CatalogColumn.confirmed_level.is_(None), CatalogColumn.proposed_category),
                else_=CatalogColumn.confirmed_category)


def _effective_kind():  # type: ignore[no-untyped-def]
    return case((CatalogColumn.confirmed_level.is_(None), CatalogColumn.proposed_kind),
                else_=CatalogColumn.confirmed_kind)


@dataclass(frozen=True)
class ColumnFilter:
    """Search of the catalog with optional fields. ``level``, ``category`` and ``kind`` match the effective class."""

    table_code: str | None = None
    level: int | None = None
    category: str | None = None
    kind: str | None = None
    unconfirmed: bool | None = None
    mismatch: bool | None = None
    """True: only confirmed columns whose confirmed kind differs from the latest proposal."""
    text: str | None = None


def check_filter(search: ColumnFilter) -> None:
    """Reject a filter value that cannot match anything with a Chinese message naming the valid values."""
    if search.level is not None and search.level not in SECURITY_LEVELS:
        raise invalid("CATALOG_LEVEL_INVALID", f"安全级别 {search.level} 无效，可选 1 至 5。")
    if search.category is not None and search.category not in (*PI_CATEGORIES, "none"):
        raise invalid("CATALOG_CATEGORY_INVALID",
                      f"个人金融信息类别“{search.category[:8]}”无效，可选 C1、C2、C3 或 none（非个人信息）。")
    if search.kind is not None and search.kind not in KINDS:
        raise invalid("CATALOG_KIND_INVALID", f"字段类型“{search.kind[:32]}”无效，可选：{'、'.join(KINDS)}。")


def list_columns(session: Session, search: ColumnFilter, offset: int, limit: int) -> tuple[list[CatalogColumn], int]:
    """Return one page of the columns matching ``search``, by table and column code, and the total."""
    check_filter(search)

    conditions = []
    if search.table_code:
        conditions.append(CatalogColumn.table_code == search.table_code)
    if search.level is not None:
        conditions.append(_effective_level() == search.level)
    if search.category == "none":
        conditions.append(_effective_category().is_(None))
    elif search.category is not None:
        conditions.append(_effective_category() == search.category)
    if search.kind is not None:
        conditions.append(_effective_kind() == search.kind)
    if search.unconfirmed is not None:
        conditions.append(CatalogColumn.confirmed_level.is_(None) if search.unconfirmed
                          else CatalogColumn.confirmed_level.isnot(None))
    if search.mismatch:
        conditions.append(and_(CatalogColumn.confirmed_level.isnot(None),
                               CatalogColumn.confirmed_kind != CatalogColumn.proposed_kind))
    if search.text:
        literal = search.text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{literal}%"
        conditions.append(or_(*(field.ilike(pattern, escape="\\") for field in (
            CatalogColumn.column_code, CatalogColumn.name, CatalogColumn.table_code, CatalogColumn.description))))

    where = and_(*conditions) if conditions else None
    query = select(CatalogColumn).order_by(CatalogColumn.table_code, CatalogColumn.id)
    count = select(func.count()).select_from(CatalogColumn)
    if where is not None:
        query, count = query.where(where), count.where(where)
    total = session.scalar(count) or 0
    return list(session.scalars(query.offset(offset).limit(limit))), total


def list_tables(session: Session, template_catalog: TemplateCatalog) -> list[TableOut]:
    unconfirmed = func.sum(case((CatalogColumn.confirmed_level.is_(None), 1), else_=0))
    rows = session.execute(select(CatalogColumn.table_code, func.count(), unconfirmed)
                           .group_by(CatalogColumn.table_code).order_by(CatalogColumn.table_code)).all()
    return [TableOut(table_code=code,
                     template_name=template_catalog.get(code).name if code in template_catalog else None,
                     columns=count, unconfirmed=int(open_count or 0)) for code, count, open_count in rows]


def find_column(session: Session, table_code: str, column_code: str, *, lock: bool = False) -> CatalogColumn:
    query = select(CatalogColumn).where(CatalogColumn.table_code == table_code,
                                        CatalogColumn.column_code == column_code)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None:
        raise not_found("CATALOG_COLUMN_NOT_FOUND",
                        f"数据目录中没有字段 {table_code[:64]}.{column_code[:32]}，请检查表代码和字段代码。")
    return row


def column_detail(session: Session, table_code: str, column_code: str) -> ColumnDetail:
    row = find_column(session, table_code, column_code)
    history = session.scalars(select(CatalogColumnHistory).where(CatalogColumnHistory.column_id == row.id)
                              .order_by(CatalogColumnHistory.version.desc())).all()
    return ColumnDetail(**column_out(row).model_dump(), history=[
        HistoryOut(version=item.version, change=item.change, change_name=CHANGE_NAMES.get(item.change, item.change),
                   snapshot=item.snapshot, reason=item.reason, actor=item.actor, at=item.at) for item in history])


# --- classification --------------------------------------------------------------------------------


def check_classification(body: Classification) -> ColumnClass:
    """Return the class of a steward's request, or raise 422 with a Chinese message naming the fix."""
    if body.level not in SECURITY_LEVELS:
        choices = "、".join(f"{level}（{name}）" for level, name in SECURITY_LEVELS.items())
        raise invalid("CATALOG_LEVEL_INVALID", f"安全级别 {body.level} 无效，可选：{choices}。")
    category = body.pi_category or None
    if category is not None and category not in PI_CATEGORIES:
        raise invalid("CATALOG_CATEGORY_INVALID",
                      f"个人金融信息类别“{category}”无效，可选 C1、C2、C3；非个人信息请留空。")
    if body.kind not in KINDS:
        raise invalid("CATALOG_KIND_INVALID", f"字段类型“{body.kind}”无效，可选：{'、'.join(KINDS)}。")
    if category is not None and body.level < CATEGORY_MIN_LEVELS[category]:
        raise invalid("CATALOG_LEVEL_BELOW_CATEGORY",
                      f"{PI_CATEGORIES[category]}的字段级别不能低于 {CATEGORY_MIN_LEVELS[category]} 级，"
                      f"当前为 {body.level} 级。请提高级别或更正类别。")
    if body.kind == "auth_secret" and category != "C3":
        raise invalid("CATALOG_AUTH_SECRET_NOT_C3", "鉴别信息（密码、口令、生物特征等）须归为 C3 类，请把类别改为 C3。")
    return ColumnClass(level=body.level, pi_category=category, kind=body.kind)  # type: ignore[arg-type]


def _class_dict(value: ColumnClass | None) -> dict[str, Any] | None:
    return None if value is None else {"level": value.level, "pi_category": value.pi_category, "kind": value.kind}


def classify(session: Session, request: Request, caller: Principal, table_code: str, column_code: str,
             body: Classification) -> CatalogColumn:
    """Confirm or change a column's class; version, history and audit event are committed together."""
    chosen = check_classification(body)
    row = find_column(session, table_code, column_code, lock=True)
    if body.version is not None and body.version != row.version:
        raise conflict("CATALOG_VERSION_CONFLICT",
                       f"字段 {table_code}.{column_code} 已被修改（当前版本 {row.version}，您看到的是版本 {body.version}）。"
                       "请刷新后重新确认。")
    before = confirmed_class(row)
    reason = body.reason.strip()
    owner = body.data_owner.strip() if body.data_owner is not None else row.data_owner
    if before is not None and before == chosen and owner == row.data_owner:
        raise conflict("CATALOG_UNCHANGED", f"字段 {table_code}.{column_code} 已按该分级分类确认，未作任何修改。")
    if before is not None and before != chosen and len(reason) < 2:
        raise invalid("CATALOG_REASON_REQUIRED",
                      f"字段 {table_code}.{column_code} 的分级分类已确认，变更时须填写变更原因（2 至 {REASON_MAX_LENGTH} 个字符）。")

    change = "confirmed" if before is None else "changed"
    row.confirmed_level, row.confirmed_category, row.confirmed_kind = chosen.level, chosen.pi_category, chosen.kind
    row.confirmed_by, row.confirmed_at = caller.username, utc_now()
    row.data_owner = owner or None
    row.version += 1
    session.flush()
    append_history(session, row, change, caller.username, reason or None)
    add_event(session, request, caller, f"catalog.{'confirm' if change == 'confirmed' else 'change'}",
              f"catalog:{table_code}.{column_code}", "success",
              {"from": _class_dict(before), "to": _class_dict(chosen), "version": row.version,
               **({"reason": reason} if reason else {})})
    session.commit()
    logger.info("catalog column %s.%s %s by %s (version %d)", table_code, column_code, change, caller.username,
                row.version)
    return row


# --- lineage ---------------------------------------------------------------------------------------


def warehouse_institutions(settings: Settings, table_code: str) -> dict[str, int]:
    """Return, per institution with data of intake table ``table_code``, its number of period partitions."""
    top = settings.warehouse_dir / INTAKE_TABLE_DIR / table_code
    if not top.is_dir():
        return {}
    found = {}
    for folder in sorted(top.glob("institution=*")):
        if not folder.is_dir():
            continue
        partitions = sum(1 for child in folder.iterdir() if child.name.startswith("period=") and child.is_dir())
        if partitions:
            found[folder.name.split("=", 1)[1]] = partitions
    return found


def _extract_columns(manifest: PublishedManifest, table_code: str, column_code: str) -> list[dict[str, Any]]:
    """Return the entries of ``table_code.column_code`` in a verified manifest: extract table, column, treatment."""
    assert manifest.document is not None
    document = manifest.document
    found = []
    for table in document.get("tables", []):
        if table.get("source", {}).get("table") != table_code:
            continue
        entries = [(entry, False) for entry in table.get("columns", [])]
        entries += [(entry, True) for entry in table.get("dropped_columns", [])]
        for entry, dropped in entries:
            if entry.get("name") != column_code:
                continue
            treatment = entry.get("treatment")
            found.append({
                "institution": manifest.institution, "build_id": document.get("build_id"),
                "built_at": document.get("built_at"), "policy_version": (document.get("policy") or {}).get("version"),
                "extract_table": table.get("name"), "extract_file": table.get("file"),
                "extract_column": None if dropped else entry.get("name"), "treatment": treatment,
                "treatment_name": TREATMENTS.get(treatment, treatment), "rule": entry.get("rule"),
                "class": entry.get("class"),
            })
    return found


def _extract_lineage(settings: Settings, keystore: KeyStore | None, institutions: list[str], table_code: str,
                     column_code: str) -> dict[str, Any]:
    """Return the extract part of a column's lineage, read from the verified manifests of the published builds."""
    if keystore is None:
        return {"status": "unknown", "status_name": "未读取", "detail": "未提供密钥库，无法验证数据提取清单的签名。",
                "columns": [], "invalid": []}
    columns: list[dict[str, Any]] = []
    invalid_manifests = []
    for code in institutions:
        manifest = published_manifest(settings, keystore, code)
        if manifest is None:
            continue
        if manifest.document is None:
            invalid_manifests.append({"institution": code, "error": manifest.error})
            continue
        columns.extend(_extract_columns(manifest, table_code, column_code))
    if not columns:
        return {"status": "not_built", "status_name": "尚未生成",
                "detail": "有该表数据的机构尚未发布包含此字段的数据提取。", "columns": [], "invalid": invalid_manifests}
    return {"status": "built", "status_name": "已发布",
            "detail": f"{len(columns)} 家机构的已发布数据提取包含此字段（清单 SM2 签名已验证）。",
            "columns": columns, "invalid": invalid_manifests}


def lineage(session: Session, settings: Settings, template_catalog: TemplateCatalog, table_code: str,
            column_code: str, keystore: KeyStore | None = None) -> LineageOut:
    """Return where a column comes from (template versions) and where it goes (warehouse partitions, extracts).

    The extract part lists, per institution with data of the table and a published extract, the
    extract table and column, the treatment and the build id, from the manifest after its SM2
    signature verified against ``keystore``. A manifest that does not verify is listed under
    ``invalid`` and contributes nothing.
    """
    row = find_column(session, table_code, column_code)
    versions = [version for version in template_catalog.versions(row.template_code)
                if template_catalog.get(row.template_code, version).has_field(column_code)] \
        if row.template_code in template_catalog else []
    name = template_catalog.get(row.template_code).name if row.template_code in template_catalog else None
    accepted = session.scalar(select(func.count()).select_from(ReportSubmission).where(
        ReportSubmission.template_code == table_code, ReportSubmission.state == "accepted")) or 0
    institutions = warehouse_institutions(settings, table_code)
    return LineageOut(
        table_code=table_code, column_code=column_code,
        template={"code": row.template_code, "name": name, "versions": versions, "field_name": row.name},
        warehouse={"table": f"intake/{table_code}", "partitions": sum(institutions.values()),
                   "institutions": len(institutions), "accepted_submissions": accepted},
        extracts=_extract_lineage(settings, keystore, list(institutions), table_code, column_code),
    )
