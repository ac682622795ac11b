"""报表应用: query accepted report data by template, institution and period, with aggregates and exports.

The caller names a template, institutions (none means every institution it may read), a range of
period ends, filters on code-list fields, group-by dimensions and aggregates.
:mod:`intake.warehouse_query` checks the query against the template and reads the warehouse
partitions, decrypted in memory only. This module decides which institutions the caller may read,
which submissions count as accepted, turns the result into columns with Chinese names, writes the
CSV and XLSX exports. It audits every query and export with the template, institutions, periods,
grouping and row counts, never the data.

Access: regulators (监管审查员, 监管分析员) read every institution. Institution users (报送人员,
机构管理员) read their own institution only; naming another institution is refused with 403 and
audited as ``denied``. Every caller sees personal data in detail rows masked as in the validation
reports (IDs and cards keep the first 6 and last 4 characters, mobiles 3 and 4, names the surname),
so no role reads unmasked personal data here.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from datetime import date
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import quote

from fastapi import Request
from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.deps import check_institution
from admin_api.errors import invalid
from admin_api.models import Institution, ReportSubmission, SubmissionEvent
from admin_api.security import Principal
from admin_api.submissions import get_template
from intake.template_model import Template
from intake.warehouse_query import (
    AGGREGATE_FUNCTIONS,
    GROUP_INSTITUTION,
    GROUP_PERIOD,
    Aggregate,
    AggregateResult,
    DetailTally,
    ReportQuery,
    build_query,
    detail_rows,
    iter_detail_rows,
    mask_kind,
    parse_period_text,
    run_aggregate,
)
from regsandbox_core.cells import escape_cell
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

CAPABILITY = "report_data.read"
MAX_GROUPS = 10_000
"""Maximum result rows of an aggregate query or export. More groups set ``truncated``."""
MAX_PAGE_SIZE = 200
EXPORT_MAX_DETAIL_ROWS = 50_000
"""Maximum detail rows of one export. The export is built in memory, so this bounds its size."""
MAX_INSTITUTIONS = 1000
EMPTY_CODE_LABEL = "（未填报）"
TOTAL_LABEL = "合计"
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


# --- request and response ------------------------------------------------------------------------


class AggregateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function: str = Field(max_length=16, description="count、sum、avg、min 或 max")
    field: str | None = Field(default=None, max_length=64, description="数值字段代码；count 不带字段")


class ReportQueryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template_code: str = Field(max_length=64, description="报表模板代码，如 EAST_DGXDYWJJB")
    institutions: list[str] | None = Field(default=None, max_length=MAX_INSTITUTIONS,
                                           description="机构代码；不填表示可查询的全部机构")
    period_from: str = Field(max_length=16, description="起始报告期末日期，YYYYMMDD")
    period_to: str = Field(max_length=16, description="截止报告期末日期，YYYYMMDD")
    filters: dict[str, list[str]] = Field(default_factory=dict, max_length=20,
                                          description="代码字段 → 选中的代码，如 {\"WJFL\": [\"03\", \"04\", \"05\"]}")
    group_by: list[str] = Field(default_factory=list, max_length=3,
                                description="institution（机构）、period（报告期）或代码字段，如 WJFL")
    aggregates: list[AggregateIn] = Field(default_factory=list, max_length=20)
    mode: Literal["aggregate", "detail"] = Field(default="aggregate",
                                                 description="aggregate 为分组汇总，detail 为明细（分页，个人信息脱敏）")
    offset: int = Field(default=0, ge=0, le=100_000_000, description="明细分页起点")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE_SIZE, description="明细每页行数")


class ReportColumn(BaseModel):
    key: str
    name: str
    type: str


class ReportDataOut(BaseModel):
    template_code: str
    template_name: str
    template_version: int
    mode: str
    institutions: list[str]
    period_from: str
    period_to: str
    group_by: list[str]
    columns: list[ReportColumn]
    rows: list[list[Any]]
    totals: list[Any] | None
    row_count: int
    """Matching data rows (detail rows, or the rows the aggregates cover)."""
    group_count: int | None
    truncated: bool
    offset: int
    limit: int
    partitions: int
    masked_fields: list[str]
    notes: list[str]


# --- access --------------------------------------------------------------------------------------


def _institution_names(session: Session, codes: Sequence[str] | None) -> dict[str, str]:
    statement = select(Institution.code, Institution.name).order_by(Institution.code)
    if codes is not None:
        statement = statement.where(Institution.code.in_(sorted(set(codes))))
    return dict(session.execute(statement).all())


def readable_institutions(session: Session, request: Request, caller: Principal,
                          requested: Sequence[str] | None) -> dict[str, str]:
    """Return code → name of the institutions to query.

    An institution user gets its own institution, and naming another raises 403 ``INSTITUTION_FORBIDDEN``
    (audited). A regulator gets the named institutions, or all of them. An unknown code raises 422.
    """
    codes = [code.strip() for code in requested or () if code.strip()]
    if caller.institution_code is not None:
        for code in codes:
            check_institution(request, caller, CAPABILITY, code)
        return _institution_names(session, [caller.institution_code])
    if not codes:
        return _institution_names(session, None)
    names = _institution_names(session, codes)
    unknown = [code for code in codes if code not in names]
    if unknown:
        raise invalid("INSTITUTION_NOT_FOUND", f"机构代码“{unknown[0][:32]}”不存在，请检查机构代码或在机构列表中选择。")
    return names


def accepted_submission_ids(session: Session, template_code: str, codes: Sequence[str], period_from: date,
                            period_to: date) -> dict[str, set[int]]:
    """Ids of the submissions of ``template_code`` that a reviewer accepted, by institution code.

    A submission accepted and later superseded by a new upload still counts: its partition stays
    in the warehouse until a newer version is accepted.
    """
    rows = session.execute(
        select(Institution.code, ReportSubmission.id)
        .join(Institution, Institution.id == ReportSubmission.institution_id)
        .join(SubmissionEvent, SubmissionEvent.submission_id == ReportSubmission.id)
        .where(ReportSubmission.template_code == template_code, Institution.code.in_(sorted(codes)),
               ReportSubmission.period_end >= period_from, ReportSubmission.period_end <= period_to,
               SubmissionEvent.to_state == "accepted")
    )
    accepted: dict[str, set[int]] = {}
    for code, submission_id in rows:
        accepted.setdefault(code, set()).add(submission_id)
    return accepted


def prepare(session: Session, request: Request, caller: Principal,
            body: ReportQueryIn) -> tuple[ReportQuery, dict[str, str], dict[str, set[int]]]:
    """Check the request and return the query, the institutions' names and the accepted submission ids."""
    template = get_template(body.template_code.strip())
    period_from = parse_period_text(body.period_from, "起始报告期")
    period_to = parse_period_text(body.period_to, "截止报告期")
    names = readable_institutions(session, request, caller, body.institutions)
    query = build_query(
        template, institutions=list(names), period_from=period_from, period_to=period_to, filters=body.filters,
        group_by=body.group_by, aggregates=[(item.function.strip(), (item.field or "").strip() or None)
                                            for item in body.aggregates])
    accepted = accepted_submission_ids(session, template.code, list(names), period_from, period_to)
    session.rollback()  # Release the connection while partitions are decrypted.
    return query, names, accepted


# --- columns and cells ---------------------------------------------------------------------------


def _group_columns(template: Template, group_by: Sequence[str]) -> list[ReportColumn]:
    columns = []
    for name in group_by:
        if name == GROUP_INSTITUTION:
            columns += [ReportColumn(key="institution", name="机构代码", type="text"),
                        ReportColumn(key="institution_name", name="机构名称", type="text")]
        elif name == GROUP_PERIOD:
            columns.append(ReportColumn(key="period", name="报告期", type="date"))
        else:
            item = template.field(name)
            columns += [ReportColumn(key=name, name=f"{item.name}代码", type="code"),
                        ReportColumn(key=f"{name}_label", name=item.name, type="text")]
    return columns


def _aggregate_columns(query: ReportQuery) -> list[ReportColumn]:
    columns = []
    for item in query.aggregates or (Aggregate("count"),):
        if item.field is None:
            columns.append(ReportColumn(key=item.key, name=AGGREGATE_FUNCTIONS["count"], type="integer"))
        else:
            target = query.template.field(item.field)
            columns.append(ReportColumn(key=item.key, name=f"{target.name}{AGGREGATE_FUNCTIONS[item.function]}",
                                        type=target.type))
    return columns


def _period_label(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:]}"


def _group_cells(query: ReportQuery, key: Sequence[str | None], names: dict[str, str]) -> list[Any]:
    cells: list[Any] = []
    for dimension, value in zip(query.group_by, key):
        if dimension == GROUP_INSTITUTION:
            cells += [value, names.get(value or "", value)]
        elif dimension == GROUP_PERIOD:
            cells.append(_period_label(value or ""))
        else:
            labels = query.template.allowed_codes(dimension) or {}
            cells += [value or "", EMPTY_CODE_LABEL if value is None else labels.get(value, value)]
    return cells


def _totals_row(group_width: int, totals: Sequence[Any]) -> list[Any]:
    lead = [TOTAL_LABEL] + [""] * (group_width - 1) if group_width else []
    return lead + list(totals)


def _json_cell(value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value


def _aggregate_notes(query: ReportQuery, result: AggregateResult) -> list[str]:
    notes = []
    multi = [query.template.field(code) for code in query.code_dimensions if query.template.field(code).multi]
    for item in multi:
        notes.append(f"{item.name}为多值字段：填报多个代码的记录在每个代码下各计一次，合计行按记录计一次，"
                     "因此各分组之和可能大于合计。")
    if result.truncated:
        notes.append(f"分组结果共 {result.group_count} 行，只返回前 {len(result.groups)} 行。请增加筛选条件或减少分组维度。")
    return notes


def _detail_columns(template: Template) -> list[ReportColumn]:
    return ([ReportColumn(key="institution", name="机构代码", type="text"),
             ReportColumn(key="institution_name", name="机构名称", type="text"),
             ReportColumn(key="period", name="报告期", type="date")]
            + [ReportColumn(key=item.code, name=item.name, type=item.type) for item in template.fields])


def _detail_cells(row: Sequence[Any], names: dict[str, str]) -> list[Any]:
    institution, period, *values = row
    return [institution, names.get(institution, institution), _period_label(period), *values]


# --- query ---------------------------------------------------------------------------------------


def _audit_detail(query: ReportQuery, body: ReportQueryIn, **counts: Any) -> dict[str, Any]:
    everyone = not body.institutions
    return {
        "template": query.template.code, "mode": body.mode,
        "institutions": "*" if everyone else list(query.institutions),
        "institution_count": len(query.institutions),
        "period_from": f"{query.period_from:%Y%m%d}", "period_to": f"{query.period_to:%Y%m%d}",
        "group_by": list(query.group_by), "aggregates": [item.key for item in query.aggregates],
        "filters": {code: list(values) for code, values in query.filters.items()}, **counts,
    }


def _output(query: ReportQuery, body: ReportQueryIn, **fields: Any) -> ReportDataOut:
    template = query.template
    masked = [item.code for item in template.fields if mask_kind(template, item.code)] if body.mode == "detail" else []
    return ReportDataOut(
        template_code=template.code, template_name=template.name, template_version=template.version, mode=body.mode,
        institutions=list(query.institutions), period_from=f"{query.period_from:%Y%m%d}",
        period_to=f"{query.period_to:%Y%m%d}", group_by=list(query.group_by), masked_fields=masked, **fields)


def run_query(session: Session, request: Request, caller: Principal, store: KeyStore, settings: Settings,
              body: ReportQueryIn) -> ReportDataOut:
    """Run a query (aggregates, or one page of detail rows), audit it as ``report_data.query`` and return the result."""
    query, names, accepted = prepare(session, request, caller, body)
    if body.mode == "detail":
        page = detail_rows(settings, store, query, accepted, body.offset, body.limit)
        output = _output(query, body, columns=_detail_columns(query.template),
                         rows=[[_json_cell(cell) for cell in _detail_cells(row, names)] for row in page.rows],
                         totals=None, row_count=page.row_count, group_count=None,
                         truncated=body.offset + len(page.rows) < page.row_count, offset=body.offset,
                         limit=body.limit, partitions=page.partitions, notes=[])
        counts = {"rows": len(page.rows), "matching_rows": page.row_count, "offset": body.offset,
                  "partitions": page.partitions}
    else:
        result = run_aggregate(settings, store, query, accepted, MAX_GROUPS)
        width = len(_group_columns(query.template, query.group_by))
        rows = [[_json_cell(cell) for cell in _group_cells(query, group.key, names) + list(group.values)]
                for group in result.groups]
        output = _output(query, body, columns=_group_columns(query.template, query.group_by) + _aggregate_columns(query),
                         rows=rows, totals=[_json_cell(cell) for cell in _totals_row(width, result.totals)],
                         row_count=result.row_count, group_count=result.group_count, truncated=result.truncated,
                         offset=0, limit=MAX_GROUPS, partitions=result.partitions,
                         notes=_aggregate_notes(query, result))
        counts = {"rows": len(rows), "matching_rows": result.row_count, "partitions": result.partitions}
    add_event(session, request, caller, "report_data.query", f"report_data:{query.template.code}", "success",
              _audit_detail(query, body, **counts))
    session.commit()
    logger.info("report query on %s by %s: %s institutions, %s partitions, %s rows", query.template.code,
                caller.username, len(query.institutions), counts["partitions"], counts["rows"])
    return output


# --- export --------------------------------------------------------------------------------------


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, Decimal)):
        return str(value)  # A number never starts a formula, so it is written as is.
    return escape_cell(str(value))


def _xlsx_cell(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (int, Decimal)):
        return value
    return ILLEGAL_CHARACTERS_RE.sub("\ufffd", escape_cell(str(value)))


def write_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """Write UTF-8 CSV with a byte order mark, so Excel shows the Chinese text. Text cells are escaped, numbers not."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([escape_cell(name) for name in header])
    for row in rows:
        writer.writerow([_csv_cell(cell) for cell in row])
    return b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8")


def write_xlsx(header: Sequence[str], rows: Iterable[Sequence[Any]], sheet_name: str) -> bytes:
    """Write an XLSX workbook of one sheet: numbers as numbers, text escaped so no cell runs as a formula."""
    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet(sheet_name)
    sheet.append([_xlsx_cell(name) for name in header])
    for row in rows:
        sheet.append([_xlsx_cell(cell) for cell in row])
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def _export_content(settings: Settings, store: KeyStore, query: ReportQuery, body: ReportQueryIn,
                    names: dict[str, str], accepted: dict[str, set[int]]) -> tuple[list[ReportColumn], list[list[Any]], dict[str, Any]]:
    """Return the columns and rows of an export and the counts for its audit event."""
    if body.mode == "detail":
        tally = DetailTally()
        rows = [_detail_cells(row, names)
                for row in iter_detail_rows(settings, store, query, accepted, 0, EXPORT_MAX_DETAIL_ROWS, tally)]
        exported = len(rows)
        if tally.rows > exported:
            rows.append([f"共 {tally.rows} 行，导出上限为 {EXPORT_MAX_DETAIL_ROWS} 行，此处只列出前 {exported} 行。"
                         "请缩小机构、报告期范围或增加筛选条件后分批导出。"])
        return _detail_columns(query.template), rows, {"rows": exported, "matching_rows": tally.rows,
                                                       "partitions": tally.partitions}

    result = run_aggregate(settings, store, query, accepted, MAX_GROUPS)
    group_columns = _group_columns(query.template, query.group_by)
    rows = [_group_cells(query, group.key, names) + list(group.values) for group in result.groups]
    rows.append(_totals_row(len(group_columns), result.totals))
    rows += [[note] for note in _aggregate_notes(query, result)]
    return (group_columns + _aggregate_columns(query), rows,
            {"rows": len(result.groups), "matching_rows": result.row_count, "partitions": result.partitions})


def export_table(session: Session, request: Request, caller: Principal, store: KeyStore, settings: Settings,
                 body: ReportQueryIn, kind: str) -> tuple[bytes, str]:
    """Build the CSV or XLSX export of a query (every detail row up to the cap), audit it and return it with its name.

    The file is built in memory and never written to disk.
    """
    query, names, accepted = prepare(session, request, caller, body)
    columns, rows, counts = _export_content(settings, store, query, body, names, accepted)
    header = [column.name for column in columns]
    content = write_csv(header, rows) if kind == "csv" else write_xlsx(header, rows, query.template.name[:31])
    add_event(session, request, caller, "report_data.export", f"report_data:{query.template.code}", "success",
              _audit_detail(query, body, format=kind, bytes=len(content), **counts))
    session.commit()
    mode = "明细" if body.mode == "detail" else "汇总"
    name = f"{query.template.code}_{query.period_from:%Y%m%d}-{query.period_to:%Y%m%d}_{mode}.{kind}"
    return content, name


def content_disposition(filename: str) -> str:
    """Return an attachment header with the UTF-8 file name (RFC 6266) and an ASCII fallback."""
    fallback = filename.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=utf-8''{quote(filename)}"
