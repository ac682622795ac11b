"""The sync of the data catalog with the report templates and the accepted warehouse data.

:func:`sync_catalog` creates a :class:`~admin_api.models.CatalogColumn` for every field of every
report template, with a class proposed by :mod:`catalog.detectors` from the field's declaration
and, when accepted data of the table exists in the warehouse, from sampled values. admin_api runs
it at start (:func:`sync_at_start`) and a data steward can run it again (:func:`sync_by_request`,
``POST /api/v1/catalog/sync``), for example after new data was accepted. Sampling decrypts
partitions through the key store, reads values only in memory and stores match counts, never values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

import pyarrow as pa
from fastapi import Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.data_catalog import append_history
from admin_api.db import utc_now
from admin_api.errors import not_found
from admin_api.models import AuditEvent, CatalogColumn, Institution, ReportSubmission
from admin_api.security import Principal
from catalog.detectors import Proposal, propose
from catalog.sampling import SAMPLE_PARTITIONS, PartitionRef, sample_columns
from intake.template_model import Template, TemplateCatalog, TemplateField
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

SYNC_ACTOR = "admin_api:catalog-sync"
"""Actor of the history rows and the audit event of the sync at start-up."""

Sampler = Callable[[Template, list[str]], dict[str, list[str | None]] | None]
"""Returns sampled values by column code for a template's table, or None when the table has no accepted data."""


class SyncRequest(BaseModel):
    table_code: str | None = Field(default=None, max_length=64, description="只同步这一张表；不填则同步全部模板")
    resample: bool = Field(default=True, description="是否重新抽样已入仓数据")


class SyncResult(BaseModel):
    created: int
    updated: int
    sampled_tables: list[str]


def _declarations(template_catalog: TemplateCatalog) -> dict[str, list[tuple[Template, TemplateField]]]:
    """Return, per table code, each column's newest declaration (newest template version that has the field)."""
    tables: dict[str, list[tuple[Template, TemplateField]]] = {}
    for code in template_catalog.codes():
        seen: set[str] = set()
        columns: list[tuple[Template, TemplateField]] = []
        for version in sorted(template_catalog.versions(code), reverse=True):
            template = template_catalog.get(code, version)
            for item in template.fields:
                if item.code not in seen:
                    seen.add(item.code)
                    columns.append((template, item))
        tables[code] = columns
    return tables


def _apply_proposal(row: CatalogColumn, template: Template, item: TemplateField, proposal: Proposal,
                    sampled: bool) -> bool:
    """Write the declaration and proposal into ``row``; return whether anything changed."""
    new = {
        "name": item.name, "description": item.description, "data_type": item.type, "length": item.length,
        "template_code": template.code, "template_version": template.version,
        "proposed_level": proposal.column_class.level, "proposed_category": proposal.column_class.pi_category,
        "proposed_kind": proposal.column_class.kind, "proposed_confidence": proposal.confidence,
        "evidence": proposal.evidence_dicts(),
    }
    changed = any(getattr(row, key) != value for key, value in new.items())
    for key, value in new.items():
        setattr(row, key, value)
    if sampled:
        row.sampled_at = utc_now()
    return changed


REOPEN_REASON = "模板字段的名称或类型已变更，原确认的分级分类失效，须重新确认。"


def _reopen(row: CatalogColumn) -> None:
    """Clear a confirmed class whose field was redeclared, so the column is masked at level 4 until confirmed again."""
    row.confirmed_level = row.confirmed_category = row.confirmed_kind = None
    row.confirmed_by = row.confirmed_at = None


def _needs_sample(rows: Iterable[CatalogColumn | None]) -> bool:
    return any(row is None or row.sampled_at is None for row in rows)


def _sync_column(session: Session, table_code: str, template: Template, item: TemplateField,
                 row: CatalogColumn | None, values: list[str | None] | None, actor: str) -> str | None:
    """Create or refresh one column; return ``created``, ``updated`` or None when nothing changed."""
    declared_same = row is not None and (row.template_version, row.name, row.data_type) == (
        template.version, item.name, item.type)
    if declared_same and values is None:
        return None
    proposal = propose(template, item, values)
    if row is None:
        row = CatalogColumn(table_code=table_code, column_code=item.code, version=1, evidence=[])
        _apply_proposal(row, template, item, proposal, values is not None)
        session.add(row)
        session.flush()
        append_history(session, row, "created", actor)
        return "created"

    redeclared = row.confirmed_level is not None and (row.name, row.data_type) != (item.name, item.type)
    if not _apply_proposal(row, template, item, proposal, values is not None) and not redeclared:
        return None
    if redeclared:
        _reopen(row)
    row.version += 1
    session.flush()
    append_history(session, row, "reopened" if redeclared else "proposed", actor,
                    REOPEN_REASON if redeclared else None)
    return "updated"


def sync_catalog(session: Session, template_catalog: TemplateCatalog, *, actor: str = SYNC_ACTOR,
                 sampler: Sampler | None = None, resample: bool = False,
                 table_code: str | None = None) -> SyncResult:
    """Create or refresh the catalog rows of every template field; flush, the caller audits and commits.

    A table is sampled (when ``sampler`` is given) if ``resample`` is set or one of its columns is
    new or has never had value evidence. Rows whose declaration is unchanged and that were not
    sampled keep their proposal. A confirmed class is kept unless a newer template version changes
    the field's name or type: then the confirmation is cleared (history ``reopened``), because it
    was made for another field.
    """
    created = updated = 0
    sampled_tables: list[str] = []
    existing = {(row.table_code, row.column_code): row for row in session.scalars(select(CatalogColumn))}
    for code, columns in _declarations(template_catalog).items():
        if table_code is not None and code != table_code:
            continue
        rows = [existing.get((code, item.code)) for _template, item in columns]
        samples = None
        if sampler is not None and (resample or _needs_sample(rows)):
            samples = sampler(columns[0][0], [item.code for _template, item in columns])
            if samples is not None:
                sampled_tables.append(code)
        for (template, item), row in zip(columns, rows, strict=True):
            values = samples.get(item.code) if samples is not None else None
            outcome = _sync_column(session, code, template, item, row, values, actor)
            created += outcome == "created"
            updated += outcome == "updated"
    session.flush()
    return SyncResult(created=created, updated=updated, sampled_tables=sampled_tables)


def accepted_partitions(session: Session, table_code: str, limit: int = SAMPLE_PARTITIONS) -> list[PartitionRef]:
    """Return the newest accepted period of up to ``limit`` institutions for ``table_code``."""
    rows = session.execute(
        select(Institution.code, ReportSubmission.period_end, ReportSubmission.id)
        .join(Institution, Institution.id == ReportSubmission.institution_id)
        .where(ReportSubmission.template_code == table_code, ReportSubmission.state == "accepted")
        .order_by(ReportSubmission.period_end.desc(), ReportSubmission.id.desc())
    ).all()
    chosen: dict[str, PartitionRef] = {}
    for code, period_end, submission_id in rows:
        if code in chosen:
            if chosen[code].period_end == period_end:
                chosen[code] = PartitionRef(code, period_end, (*chosen[code].accepted_ids, submission_id))
            continue
        if len(chosen) >= limit:
            continue
        chosen[code] = PartitionRef(code, period_end, (submission_id,))
    return list(chosen.values())


def warehouse_sampler(session: Session, settings: Settings, store: KeyStore) -> Sampler:
    """Return a sampler that reads accepted partitions of the warehouse through ``store``."""

    def sample(template: Template, columns: list[str]) -> dict[str, list[str | None]] | None:
        partitions = accepted_partitions(session, template.code)
        if not partitions:
            return None
        try:
            samples = sample_columns(settings, store, template.code, partitions, columns)
        except (OSError, pa.ArrowException) as error:
            # A damaged partition must not stop the catalog: the table keeps its template-only proposals.
            logger.warning("sampling warehouse table %s failed: %s", template.code, type(error).__name__)
            return None
        return samples if any(samples.values()) else None

    return sample


def sync_at_start(session: Session, settings: Settings, store: KeyStore,
                  template_catalog: TemplateCatalog) -> SyncResult:
    """Run the catalog sync when admin_api starts, with sampling of tables not sampled yet; commit and audit.

    Two processes starting together may insert the same column. The one that loses the race rolls
    back and syncs once more, which then finds the other's rows.
    """
    try:
        result = sync_by_operator(session, settings, store, template_catalog, SYNC_ACTOR, role="service")
    except IntegrityError:
        session.rollback()
        logger.info("data catalog rows were created by another process at the same time; syncing again")
        result = sync_by_operator(session, settings, store, template_catalog, SYNC_ACTOR, role="service")
    logger.info("data catalog synced at start: %d created, %d updated, %d tables sampled",
                result.created, result.updated, len(result.sampled_tables))
    return result


def sync_by_operator(session: Session, settings: Settings, store: KeyStore, template_catalog: TemplateCatalog,
                     actor: str, *, role: str = "operator", resample: bool = False,
                     table_code: str | None = None) -> SyncResult:
    """Run the sync outside a request (start-up or ``python -m admin_api.manage catalog-sync``); commit.

    The audit event names ``actor`` and is written when the sync changed or sampled anything, or
    always for an operator, whose command should leave a trace even when it found nothing new.
    """
    if table_code is not None and table_code not in template_catalog:
        raise not_found("CATALOG_TABLE_NOT_FOUND",
                        f"数据表“{table_code}”不存在。现有数据表：{'、'.join(template_catalog.codes())}。")
    result = sync_catalog(session, template_catalog, actor=actor, sampler=warehouse_sampler(session, settings, store),
                          resample=resample, table_code=table_code)
    if role == "operator" or result.created or result.updated or result.sampled_tables:
        session.add(AuditEvent(actor=actor[:64], role=role, action="catalog.sync",
                               resource=f"catalog:{table_code or '*'}", outcome="success",
                               detail=_sync_detail(result)))
    session.commit()
    return result


def _sync_detail(result: SyncResult) -> str:
    return json.dumps({"created": result.created, "updated": result.updated, "tables": result.sampled_tables},
                      ensure_ascii=False, sort_keys=True)


def sync_by_request(session: Session, request: Request, caller: Principal, template_catalog: TemplateCatalog,
                    body: SyncRequest, store: KeyStore) -> SyncResult:
    """Run the sync for a steward's request, sampling every table (or ``body.table_code``); audit and commit."""
    if body.table_code is not None and body.table_code not in template_catalog:
        known = "、".join(template_catalog.codes())
        raise not_found("CATALOG_TABLE_NOT_FOUND", f"数据表“{body.table_code}”不存在。现有数据表：{known}。")
    settings = request.app.state.settings
    sampler = warehouse_sampler(session, settings, store)
    result = sync_catalog(session, template_catalog, actor=caller.username, sampler=sampler,
                          resample=body.resample, table_code=body.table_code)
    add_event(session, request, caller, "catalog.sync", f"catalog:{body.table_code or '*'}", "success",
              {"created": result.created, "updated": result.updated, "tables": result.sampled_tables})
    session.commit()
    return result
