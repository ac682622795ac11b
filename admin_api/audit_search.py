"""Search and CSV export of the audit log, shared by the API and the console.

Filters are exact matches on actor, action, institution and outcome, and a time range where
``from`` is inclusive and ``to`` exclusive. A time without a UTC offset is read as 北京时间
(Asia/Shanghai), the time the console shows. Results are ordered newest first and paged by id
(``before_id``), so every page is one indexed range scan however long the log is.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.display import BEIJING, beijing
from admin_api.errors import invalid
from admin_api.models import AuditEvent
from admin_api.security import Principal

OUTCOMES = {"success": "成功", "denied": "拒绝", "failed": "失败"}
EXPORT_BATCH_ROWS = 1000
# Excel and LibreOffice evaluate a cell that starts with one of these as a formula (CSV injection).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_TEXT_LIMITS = {"actor": ("操作人", 64), "action": ("操作", 64), "institution": ("机构代码", 32)}

CSV_HEADER = [
    "编号", "时间（北京时间）", "时间（UTC）", "操作人", "角色", "机构", "来源地址", "操作", "对象", "结果",
    "详情", "请求编号", "写入服务", "链摘要（SM3）",
]


@dataclass(frozen=True)
class AuditFilter:
    """Validated search filter; ``None`` fields do not restrict the result."""

    time_from: datetime | None = None
    time_to: datetime | None = None
    actor: str | None = None
    action: str | None = None
    institution: str | None = None
    outcome: str | None = None

    def detail(self) -> dict[str, str]:
        """Return the filter as the detail of the audit event of a search export."""
        values = {
            "from": self.time_from.isoformat() if self.time_from else None,
            "to": self.time_to.isoformat() if self.time_to else None,
            "actor": self.actor, "action": self.action, "institution": self.institution, "outcome": self.outcome,
        }
        return {key: value for key, value in values.items() if value is not None}


def _parse_time(name: str, label: str, value: str) -> datetime:
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(
            "INVALID_AUDIT_TIME",
            f"{label} {value!r} 无效：应为 ISO 8601 时间，例如 2026-12-01 或 2026-12-01T08:00:00+08:00"
            f"（不带时区时按北京时间），参数 {name}。",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=BEIJING)
    return parsed.astimezone(UTC)


def _text(name: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    label, max_length = _TEXT_LIMITS[name]
    text = value.strip()
    if len(text) > max_length:
        raise invalid(
            "INVALID_AUDIT_FILTER",
            f"{label}筛选值过长：{len(text)} 个字符，最多 {max_length} 个（参数 {name}）。请缩短后重试。",
        )
    return text


def parse_filter(
    time_from: str | None = None,
    time_to: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    institution: str | None = None,
    outcome: str | None = None,
) -> AuditFilter:
    """Validate raw query values into an :class:`AuditFilter`; raise ApiError 422 with a Chinese message."""
    start = _parse_time("from", "起始时间", time_from) if time_from and time_from.strip() else None
    end = _parse_time("to", "截止时间", time_to) if time_to and time_to.strip() else None
    if start and end and start >= end:
        raise invalid(
            "INVALID_AUDIT_TIME_RANGE",
            f"时间范围无效：起始时间 {time_from} 不早于截止时间 {time_to}。请让起始时间早于截止时间（截止时间不含）。",
        )
    result = outcome.strip() if outcome and outcome.strip() else None
    if result is not None and result not in OUTCOMES:
        raise invalid(
            "INVALID_AUDIT_OUTCOME",
            f"结果筛选值 {outcome!r} 无效，只能是 success（成功）、denied（拒绝）或 failed（失败）。",
        )
    return AuditFilter(start, end, _text("actor", actor), _text("action", action),
                       _text("institution", institution), result)


def filtered_query(audit_filter: AuditFilter, before_id: int | None = None) -> Select[tuple[AuditEvent]]:
    """Build the query of events matching ``audit_filter`` with id below ``before_id``, newest first."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc())
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    if audit_filter.time_from is not None:
        query = query.where(AuditEvent.occurred_at >= audit_filter.time_from)
    if audit_filter.time_to is not None:
        query = query.where(AuditEvent.occurred_at < audit_filter.time_to)
    if audit_filter.actor is not None:
        query = query.where(AuditEvent.actor == audit_filter.actor)
    if audit_filter.action is not None:
        query = query.where(AuditEvent.action == audit_filter.action)
    if audit_filter.institution is not None:
        query = query.where(AuditEvent.institution_code == audit_filter.institution)
    if audit_filter.outcome is not None:
        query = query.where(AuditEvent.outcome == audit_filter.outcome)
    return query


def search(session: Session, audit_filter: AuditFilter, limit: int, before_id: int | None = None) -> list[AuditEvent]:
    return list(session.scalars(filtered_query(audit_filter, before_id).limit(limit)))


# --- CSV export ------------------------------------------------------------------------------------


def escape_cell(value: Any) -> str:
    """Return ``value`` as CSV cell text, with a leading apostrophe if a spreadsheet would read a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([escape_cell(value) for value in values])
    return buffer.getvalue()


def _row(event: AuditEvent) -> list[Any]:
    return [
        event.id, beijing(event.occurred_at), event.occurred_at.astimezone(UTC).isoformat(), event.actor,
        event.role, event.institution_code, event.source_ip, event.action, event.resource,
        OUTCOMES.get(event.outcome, event.outcome), event.detail, event.request_id, event.recorded_by,
        event.chain_sm3,
    ]


def export_csv(session_factory: sessionmaker[Session], audit_filter: AuditFilter, max_rows: int) -> Iterator[bytes]:
    """Yield the CSV export in UTF-8 with a byte order mark (so Excel detects UTF-8), newest event first.

    Opens its own session because the response is streamed after the request's session is closed,
    reads ``EXPORT_BATCH_ROWS`` rows per query and stops after ``max_rows`` rows.
    """
    yield ("\ufeff" + _csv_line(CSV_HEADER)).encode("utf-8")
    sent = 0
    before_id: int | None = None
    with session_factory() as session:
        while sent < max_rows:
            batch = search(session, audit_filter, min(EXPORT_BATCH_ROWS, max_rows - sent), before_id)
            if not batch:
                return
            yield "".join(_csv_line(_row(event)) for event in batch).encode("utf-8")
            sent += len(batch)
            before_id = batch[-1].id
            session.expunge_all()


def export_response(request: Request, session: Session, caller: Principal, audit_filter: AuditFilter) -> StreamingResponse:
    """Store the ``audit.export`` event, then stream the CSV; shared by the API and the console."""
    max_rows = request.app.state.settings.audit_export_max_rows
    add_event(session, request, caller, "audit.export", "audit_events", "success",
              {"filter": audit_filter.detail(), "max_rows": max_rows})
    session.commit()
    file_name = f"audit-events-{utc_now():%Y%m%dT%H%M%SZ}.csv"
    return StreamingResponse(
        export_csv(request.app.state.session_factory, audit_filter, max_rows),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{file_name}"',
            "X-Audit-Export-Max-Rows": str(max_rows),
        },
    )
