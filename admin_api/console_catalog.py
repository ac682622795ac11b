"""Console pages of the data catalog: 数据目录 (browser), 分级分类审核 (review queue) and a column's lineage.

Regulators and the data steward read the pages (``catalog.read``). The forms that confirm or
change a class and re-run the sync need ``catalog.classify`` and call the same functions as the API
(:mod:`admin_api.data_catalog`), so every change is versioned and audited the same way. A rejected
form shows the Chinese message above the page and stores an audit event with outcome ``failed``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from admin_api import catalog_sync, data_catalog
from admin_api.console import _check_csrf, _failed, _page
from admin_api.deps import get_session, require
from admin_api.extract_rebuilds import schedule_after_classification
from admin_api.errors import invalid
from admin_api.keyaccess import request_keystore
from admin_api.security import Principal
from admin_api.submissions import catalog as template_catalog
from catalog.classes import KINDS, PI_CATEGORIES, SECURITY_LEVELS
from catalog.detectors import SOURCE_NAMES
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)

PAGE_SIZE = 100
_NOTICES = {
    "confirmed": "已保存字段 {} 的分级分类。",
    "synced": "已重新同步数据目录：新增 {} 个字段，更新 {} 个字段的建议。",
    "rebuilds": "已在后台安排重新生成 {} 家有该表数据的机构的数据提取，结果见“数据提取”页面和审计日志。",
}


def _choices() -> dict[str, Any]:
    return {"levels": SECURITY_LEVELS, "categories": PI_CATEGORIES, "kinds": KINDS, "source_names": SOURCE_NAMES,
            "reason_max": data_catalog.REASON_MAX_LENGTH}


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done", "")
    if done == "confirmed":
        notice = _NOTICES["confirmed"].format(request.query_params.get("column", "")[:100])
        rebuilds = request.query_params.get("rebuilds", "0")[:6]
        if rebuilds.isdigit() and int(rebuilds) > 0:
            notice += _NOTICES["rebuilds"].format(int(rebuilds))
        return notice
    if done == "synced":
        return _NOTICES["synced"].format(request.query_params.get("created", "0")[:6],
                                         request.query_params.get("updated", "0")[:6])
    return None


def _parse_level(text: str, *, required: bool = False) -> int | None:
    if not text.strip():
        if required:
            raise invalid("CATALOG_LEVEL_INVALID", "请选择安全级别（1 至 5 级）。")
        return None
    if not text.strip().isdigit():
        raise invalid("CATALOG_LEVEL_INVALID", f"安全级别“{text[:8]}”无效，可选 1 至 5。")
    return int(text)


def _unconfirmed(text: str) -> bool | None:
    return {"yes": True, "no": False}.get(text)


def _browser(request: Request, session: Session, caller: Principal, *, table_code: str, level: str, category: str,
             kind: str, unconfirmed: str, q: str, offset: int, status_code: int = 200,
             error: str | None = None) -> Response:
    filters = {"table_code": table_code, "level": level, "category": category, "kind": kind,
               "unconfirmed": unconfirmed, "q": q}
    try:
        search = data_catalog.ColumnFilter(
            table_code=table_code or None, level=_parse_level(level), category=category or None, kind=kind or None,
            unconfirmed=_unconfirmed(unconfirmed), text=q or None)
        rows, total = data_catalog.list_columns(session, search, offset, PAGE_SIZE)
    except RegsandboxError as failure:
        rows, total, status_code, error = [], 0, failure.status, failure.message
    query = "&".join(f"{key}={quote(value)}" for key, value in filters.items() if value)
    return _page(request, "catalog.html", caller, status_code=status_code, error=error,
                 notice=None if error else _notice(request),
                 tables=data_catalog.list_tables(session, template_catalog()),
                 columns=[data_catalog.column_out(row) for row in rows], total=total, offset=offset,
                 page_size=PAGE_SIZE, filters=filters, query=query, **_choices())


@router.get("/catalog", response_class=HTMLResponse)
def catalog_page(
    request: Request,
    table_code: str = Query(default="", max_length=64),
    level: str = Query(default="", max_length=8),
    category: str = Query(default="", max_length=8),
    kind: str = Query(default="", max_length=32),
    unconfirmed: str = Query(default="", max_length=8),
    q: str = Query(default="", max_length=100),
    offset: int = Query(default=0, ge=0),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("catalog.read", console=True)),
) -> Response:
    """Show the catalog columns with search and filters by table, level, category, kind and confirmation."""
    return _browser(request, session, caller, table_code=table_code, level=level, category=category, kind=kind,
                    unconfirmed=unconfirmed, q=q, offset=offset)


def _review(request: Request, session: Session, caller: Principal, table_code: str, *, status_code: int = 200,
            error: str | None = None) -> Response:
    search = data_catalog.ColumnFilter(table_code=table_code or None, unconfirmed=True)
    rows, total = data_catalog.list_columns(session, search, 0, PAGE_SIZE)
    recheck, _recheck_total = data_catalog.list_columns(
        session, data_catalog.ColumnFilter(table_code=table_code or None, mismatch=True), 0, PAGE_SIZE)
    return _page(request, "catalog_review.html", caller, status_code=status_code, error=error,
                 notice=None if error else _notice(request), columns=[data_catalog.column_out(row) for row in rows],
                 recheck=[data_catalog.column_out(row) for row in recheck], total=total, table_code=table_code,
                 tables=data_catalog.list_tables(session, template_catalog()),
                 **_choices())


@router.get("/catalog/review", response_class=HTMLResponse)
def review_page(request: Request, table_code: str = Query(default="", max_length=64),
                session: Session = Depends(get_session),
                caller: Principal = Depends(require("catalog.read", console=True))) -> Response:
    """Show the unconfirmed columns with their proposals and evidence; stewards get the confirm forms."""
    return _review(request, session, caller, table_code)


def _column_page(request: Request, session: Session, caller: Principal, table_code: str, column_code: str, *,
                 status_code: int = 200, error: str | None = None) -> Response:
    detail = data_catalog.column_detail(session, table_code, column_code)
    lineage = data_catalog.lineage(session, request.app.state.settings, template_catalog(), table_code, column_code,
                                   request_keystore(request))
    return _page(request, "catalog_column.html", caller, status_code=status_code, error=error,
                 notice=None if error else _notice(request), column=detail, lineage=lineage, **_choices())


@router.get("/catalog/columns/{table_code}/{column_code}", response_class=HTMLResponse)
def column_page(table_code: str, column_code: str, request: Request, session: Session = Depends(get_session),
                caller: Principal = Depends(require("catalog.read", console=True))) -> Response:
    """Show one column: its classes, evidence, every version and its lineage (template → warehouse → extracts)."""
    return _column_page(request, session, caller, table_code, column_code)


@router.post("/catalog/columns/{table_code}/{column_code}/classify", response_class=HTMLResponse)
def classify_form(
    table_code: str,
    column_code: str,
    request: Request,
    level: str = Form(default="", max_length=8),
    pi_category: str = Form(default="", max_length=8),
    kind: str = Form(default="", max_length=32),
    reason: str = Form(default="", max_length=data_catalog.REASON_MAX_LENGTH),
    data_owner: str = Form(default="", max_length=100),
    version: str = Form(default="", max_length=12),
    back: str = Form(default="column", max_length=16),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("catalog.classify", console=True)),
) -> Response:
    """Confirm or change a column's class (same as POST /api/v1/catalog/columns/{table}/{column}/classification)."""
    _check_csrf(request, caller, "catalog.classify", csrf)
    try:
        body = data_catalog.Classification(
            level=_parse_level(level, required=True) or 0, pi_category=pi_category or None, kind=kind, reason=reason,
            data_owner=data_owner if data_owner.strip() else None,
            version=int(version) if version.isdigit() and int(version) > 0 else None)
        data_catalog.classify(session, request, caller, table_code, column_code, body)
    except RegsandboxError as error:
        _failed(request, session, caller, "catalog.classify", f"catalog:{table_code[:64]}.{column_code[:32]}", error)
        if back == "review":  # the queue lists many columns, so the message names the one that failed
            return _review(request, session, caller, "", status_code=error.status,
                           error=f"字段 {table_code[:64]}.{column_code[:32]} 未保存：{error.message}")
        return _column_page(request, session, caller, table_code, column_code, status_code=error.status,
                            error=error.message)
    queued = len(schedule_after_classification(request, caller, table_code, column_code))
    label = quote(f"{table_code}.{column_code}")
    if back == "review":
        return RedirectResponse(f"/console/catalog/review?done=confirmed&column={label}&rebuilds={queued}",
                                status_code=303)
    return RedirectResponse(f"/console/catalog/columns/{quote(table_code)}/{quote(column_code)}"
                            f"?done=confirmed&column={label}&rebuilds={queued}", status_code=303)


@router.post("/catalog/sync", response_class=HTMLResponse)
def sync_form(
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("catalog.classify", console=True)),
) -> Response:
    """Re-run the catalog sync with sampling of every table (same as POST /api/v1/catalog/sync)."""
    _check_csrf(request, caller, "catalog.classify", csrf)
    try:
        result = catalog_sync.sync_by_request(session, request, caller, template_catalog(),
                                              catalog_sync.SyncRequest(), request_keystore(request))
    except RegsandboxError as error:
        _failed(request, session, caller, "catalog.sync", "catalog:*", error)
        return _review(request, session, caller, "", status_code=error.status, error=error.message)
    return RedirectResponse(f"/console/catalog/review?done=synced&created={result.created}&updated={result.updated}",
                            status_code=303)
