"""数据目录: search the catalog, read a column with its history and lineage, confirm or change classes.

Regulators (监管审查员, 监管分析员) and the data steward (数据治理专员) read the catalog
(``catalog.read``); only the data steward confirms or changes a class and re-runs the sync
(``catalog.classify``). Rejected writes are audited with outcome ``failed``.
"""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from sqlalchemy.orm import Session

from admin_api import catalog_sync, data_catalog
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.extract_rebuilds import schedule_after_classification
from admin_api.keyaccess import request_keystore
from admin_api.security import Principal
from admin_api.submissions import catalog as template_catalog
from regsandbox_core.errors import RegsandboxError

router = APIRouter()


@router.get("/catalog/tables", response_model=list[data_catalog.TableOut])
def list_tables(session: Session = Depends(get_session),
                _caller: Principal = Depends(require("catalog.read"))) -> list[data_catalog.TableOut]:
    """List the warehouse tables of the catalog with their column and unconfirmed counts."""
    return data_catalog.list_tables(session, template_catalog())


@router.get("/catalog/columns", response_model=list[data_catalog.ColumnOut])
def list_columns(
    response: Response,
    table_code: str | None = Query(default=None, max_length=64, description="数据表（报表模板）代码"),
    level: int | None = Query(default=None, description="当前生效的安全级别 1–5"),
    category: str | None = Query(default=None, max_length=8, description="C1、C2、C3，或 none（非个人信息）"),
    kind: str | None = Query(default=None, max_length=32, description="字段语义类型"),
    unconfirmed: bool | None = Query(default=None, description="true：只列未确认的字段；false：只列已确认的"),
    mismatch: bool | None = Query(default=None, description="true：只列确认类型与最新建议不一致、需复核的字段"),
    q: str | None = Query(default=None, max_length=100, description="按字段代码、中文名称、表代码或说明搜索"),
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=100, ge=1, le=data_catalog.MAX_PAGE_SIZE),
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("catalog.read")),
) -> list[data_catalog.ColumnOut]:
    """Search catalog columns by table, effective level, category, kind and text; the total is in X-Total-Count."""
    search = data_catalog.ColumnFilter(table_code=table_code, level=level, category=category, kind=kind,
                                       unconfirmed=unconfirmed, mismatch=mismatch, text=q)
    rows, total = data_catalog.list_columns(session, search, offset, limit)
    response.headers["X-Total-Count"] = str(total)
    return [data_catalog.column_out(row) for row in rows]


@router.get("/catalog/review-queue", response_model=list[data_catalog.ColumnOut])
def review_queue(
    response: Response,
    table_code: str | None = Query(default=None, max_length=64),
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=100, ge=1, le=data_catalog.MAX_PAGE_SIZE),
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("catalog.read")),
) -> list[data_catalog.ColumnOut]:
    """List the columns no steward has confirmed yet, with their proposals and evidence."""
    search = data_catalog.ColumnFilter(table_code=table_code, unconfirmed=True)
    rows, total = data_catalog.list_columns(session, search, offset, limit)
    response.headers["X-Total-Count"] = str(total)
    return [data_catalog.column_out(row) for row in rows]


@router.get("/catalog/columns/{table_code}/{column_code}", response_model=data_catalog.ColumnDetail)
def read_column(table_code: str, column_code: str, session: Session = Depends(get_session),
                _caller: Principal = Depends(require("catalog.read"))) -> data_catalog.ColumnDetail:
    """Return a column with its proposal, evidence, confirmed and effective class, and every version."""
    return data_catalog.column_detail(session, table_code, column_code)


@router.get("/catalog/columns/{table_code}/{column_code}/lineage", response_model=data_catalog.LineageOut)
def column_lineage(table_code: str, column_code: str, request: Request, session: Session = Depends(get_session),
                   _caller: Principal = Depends(require("catalog.read"))) -> data_catalog.LineageOut:
    """Return the lineage of a column: template versions → warehouse partitions → extract columns."""
    return data_catalog.lineage(session, request.app.state.settings, template_catalog(), table_code, column_code,
                                request_keystore(request))


@router.post("/catalog/columns/{table_code}/{column_code}/classification", response_model=data_catalog.ColumnDetail)
def classify_column(
    table_code: str, column_code: str, body: data_catalog.Classification, request: Request, response: Response,
    session: Session = Depends(get_session), caller: Principal = Depends(require("catalog.classify")),
) -> data_catalog.ColumnDetail:
    """Confirm or change the class of a column; a reason is required to change a confirmed class.

    The extracts of the institutions with data of the table are rebuilt in the background; the
    header X-Extract-Rebuilds lists them.
    """
    try:
        data_catalog.classify(session, request, caller, table_code, column_code, body)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "catalog.classify", f"catalog:{table_code[:64]}.{column_code[:32]}", "failed",
                     {"code": error.code})
        raise
    response.headers["X-Extract-Rebuilds"] = ",".join(
        schedule_after_classification(request, caller, table_code, column_code))
    return data_catalog.column_detail(session, table_code, column_code)


@router.post("/catalog/sync", response_model=catalog_sync.SyncResult)
def sync_catalog(
    request: Request, body: catalog_sync.SyncRequest = Body(default_factory=catalog_sync.SyncRequest),
    session: Session = Depends(get_session), caller: Principal = Depends(require("catalog.classify")),
) -> catalog_sync.SyncResult:
    """Create missing catalog columns and propose classes again from templates and sampled warehouse values."""
    try:
        return catalog_sync.sync_by_request(session, request, caller, template_catalog(), body,
                                            request_keystore(request))
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "catalog.sync", f"catalog:{(body.table_code or '*')[:64]}", "failed",
                     {"code": error.code})
        raise
