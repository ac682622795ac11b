"""数据质量: completeness, validity and timeliness of report data per institution, template and period.

The measures come from existing tables and the stored validation findings:

- submission completeness (报送完整性, API key ``completeness``) = received / expected. Expected
  are the targets (one institution × one collection task) whose deadline has passed. A target
  counts as received when a submission of the task's template and period reached 待审核 or 审核通过
  at some time, as in :mod:`admin_api.task_statistics`.
- field completeness (字段完整性) = non-empty values / (rows × fields), and required-field
  completeness (必填字段完整性) the same over the template's required fields. Each report
  (institution, template, period) counts once, with its current version: the highest version in a
  state of :data:`CURRENT_STATES`, which excludes drafts and superseded versions. The non-empty
  values were counted when the upload was validated (:class:`~admin_api.models.SubmissionFieldCount`).
  A current version uploaded before those counts existed is left out of both sums.
- timeliness (及时性) = on time / expected, where on time means that first submission time is no
  later than the task's deadline.
- validity (有效性, rule pass rate) = rows without an error finding / rows validated, over every
  validated upload that was submitted (states 校验未通过, 待审核, 审核通过, 已退回 and 已被新版本替代).
  Drafts and withdrawn drafts do not count. A row with an error finding is counted once however
  many errors it has. Findings about the whole file (no line number) mark no row.

Each measure is None where its denominator is 0. Rows are grouped by any of institution,
template and period (:data:`DIMENSIONS`). Ratios of a group are ratios of its summed counts, so
the totals row is exact too.

Cost: three grouped SQL queries (targets, uploads, field counts) whatever the number of institutions
and tasks.
The error-row counts of uploads with errors are read from their findings Parquet files with DuckDB,
many files per query, and kept in a process-wide cache. That is safe because findings never change
after an upload is stored. Uploads without errors need no file.

Access: regulators and the data steward see every institution. Institution users see their own
institution only, and naming another is refused with 403 ``INSTITUTION_FORBIDDEN`` (audited).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import duckdb
from fastapi import Request
from sqlalchemy import BigInteger, and_, case, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.deps import check_institution
from admin_api.errors import invalid
from admin_api.models import Institution, ReportSubmission, ReportTask, ReportTaskTarget, SubmissionFieldCount
from admin_api.security import Principal
from admin_api.submissions import catalog
from admin_api.task_statistics import first_submissions
from intake.warehouse_query import parse_period_text
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

CAPABILITY = "quality.read"
DIMENSIONS = {"institution": "机构", "template": "报表模板", "period": "报告期"}
"""Grouping dimensions in their fixed column order, with their Chinese names."""
SORT_KEYS = {"key": "分组", "completeness": "报送完整性", "field_completeness": "字段完整性",
             "required_field_completeness": "必填字段完整性", "validity": "有效性", "timeliness": "及时性"}
VALIDATED_STATES = ("validation_failed", "pending_review", "accepted", "returned", "superseded")
"""Submission states whose validation counts: every submitted upload, not drafts or withdrawn drafts."""
CURRENT_STATES = ("validation_failed", "pending_review", "accepted", "returned")
"""States of the version whose fields count for a report: submitted and not replaced by a newer version."""
MAX_PAGE_SIZE = 500
FILES_PER_QUERY = 500
"""Findings files read by one DuckDB query when error rows are counted."""
CACHE_MAX_ENTRIES = 500_000
"""Error-row counts kept in memory (one int per upload). The cache is emptied when it is full."""


@dataclass(frozen=True)
class QualityFilter:
    """A checked request: optional institution, template and period range, and the grouping dimensions."""

    institution: str | None = None
    template_code: str | None = None
    period_from: date | None = None
    period_to: date | None = None
    group_by: tuple[str, ...] = tuple(DIMENSIONS)


COUNTS = ("expected", "received", "on_time", "uploads", "rows_validated", "rows_with_errors", "reports",
          "field_reports", "cells", "present_values", "required_cells", "required_present_values")
"""Counts of a :class:`QualityRow`, summed into the totals row."""


@dataclass
class QualityRow:
    """Counts of one group (or of the whole selection); the measures are derived from them."""

    institution: str | None = None
    institution_name: str | None = None
    template_code: str | None = None
    period_end: date | None = None
    expected: int = 0
    received: int = 0
    on_time: int = 0
    uploads: int = 0
    rows_validated: int = 0
    rows_with_errors: int = 0
    reports: int = 0
    """Reports (institution, template, period) with a current validated version."""
    field_reports: int = 0
    """Of those, the reports whose current version has field counts."""
    cells: int = 0
    """Rows × fields over the current versions with field counts."""
    present_values: int = 0
    required_cells: int = 0
    required_present_values: int = 0

    @property
    def completeness(self) -> float | None:
        return self.received / self.expected if self.expected else None

    @property
    def field_completeness(self) -> float | None:
        return self.present_values / self.cells if self.cells else None

    @property
    def required_field_completeness(self) -> float | None:
        return self.required_present_values / self.required_cells if self.required_cells else None

    @property
    def timeliness(self) -> float | None:
        return self.on_time / self.expected if self.expected else None

    @property
    def validity(self) -> float | None:
        return (self.rows_validated - self.rows_with_errors) / self.rows_validated if self.rows_validated else None

    def add(self, other: QualityRow) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, Any]:
        return {
            "institution": self.institution, "institution_name": self.institution_name,
            "template_code": self.template_code,
            "period_end": f"{self.period_end:%Y%m%d}" if self.period_end else None,
            **{name: getattr(self, name) for name in COUNTS},
            "completeness": self.completeness, "timeliness": self.timeliness, "validity": self.validity,
            "field_completeness": self.field_completeness,
            "required_field_completeness": self.required_field_completeness,
        }


@dataclass(frozen=True)
class QualityReport:
    """One page of groups, the totals over every group, and how many uploads' error rows were estimated."""

    rows: list[QualityRow]
    total: QualityRow
    group_count: int
    offset: int
    limit: int
    estimated_uploads: int = 0
    """Uploads whose findings file could not be read. Their error count is used in place of their error rows."""
    notes: list[str] = field(default_factory=list)


# --- request -------------------------------------------------------------------------------------


def parse_filter(request: Request, caller: Principal, session: Session, *, institution: str = "",
                 template_code: str = "", period_from: str = "", period_to: str = "",
                 group_by: Sequence[str] = ()) -> QualityFilter:
    """Check the request; raise 422 naming a bad value, or 403 (audited) for another institution's code."""
    code = institution.strip() or None
    if caller.institution_code is not None:
        if code is not None:
            check_institution(request, caller, CAPABILITY, code)
        code = caller.institution_code
    elif code is not None and session.scalar(select(Institution.id).where(Institution.code == code)) is None:
        raise invalid("INSTITUTION_NOT_FOUND", f"机构代码“{code[:32]}”不存在，请检查机构代码或在机构列表中选择。")
    template = template_code.strip() or None
    if template is not None and template not in catalog().codes():
        raise invalid("TEMPLATE_NOT_FOUND", f"报表模板“{template[:64]}”不存在，请在报表模板列表中选择，或留空统计全部模板。")
    low = parse_period_text(period_from, "起始报告期") if period_from.strip() else None
    high = parse_period_text(period_to, "截止报告期") if period_to.strip() else None
    if low and high and low > high:
        raise invalid("PERIOD_INVALID", f"起始报告期 {low:%Y%m%d} 晚于截止报告期 {high:%Y%m%d}，请调换或修改。")
    unknown = [item for item in group_by if item not in DIMENSIONS]
    if unknown:
        listed = "、".join(f"{key}（{name}）" for key, name in DIMENSIONS.items())
        raise invalid("GROUP_INVALID", f"分组维度“{unknown[0][:32]}”无效，可选：{listed}。")
    dimensions = tuple(item for item in DIMENSIONS if item in group_by) if group_by else tuple(DIMENSIONS)
    return QualityFilter(code, template, low, high, dimensions)


# --- grouped SQL ---------------------------------------------------------------------------------


def _dimension_columns(quality_filter: QualityFilter, template_column: Any, period_column: Any) -> list[Any]:
    columns: list[Any] = []
    if "institution" in quality_filter.group_by:
        columns += [Institution.code, Institution.name]
    if "template" in quality_filter.group_by:
        columns.append(template_column)
    if "period" in quality_filter.group_by:
        columns.append(period_column)
    return columns


def _conditions(quality_filter: QualityFilter, template_column: Any, period_column: Any) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if quality_filter.institution:
        conditions.append(Institution.code == quality_filter.institution)
    if quality_filter.template_code:
        conditions.append(template_column == quality_filter.template_code)
    if quality_filter.period_from:
        conditions.append(period_column >= quality_filter.period_from)
    if quality_filter.period_to:
        conditions.append(period_column <= quality_filter.period_to)
    return conditions


def _key(quality_filter: QualityFilter, values: Sequence[Any]) -> tuple[tuple, str | None]:
    """Return the group key (institution, template, period; None where not grouped) and the institution name."""
    values = list(values)
    institution = name = template = period = None
    if "institution" in quality_filter.group_by:
        institution, name = values.pop(0), values.pop(0)
    if "template" in quality_filter.group_by:
        template = values.pop(0)
    if "period" in quality_filter.group_by:
        period = values.pop(0)
    return (institution, template, period), name


def _row(groups: dict[tuple, QualityRow], key: tuple, name: str | None) -> QualityRow:
    if key not in groups:
        groups[key] = QualityRow(institution=key[0], institution_name=name, template_code=key[1], period_end=key[2])
    return groups[key]


def _add_targets(session: Session, quality_filter: QualityFilter, groups: dict[tuple, QualityRow],
                 now: datetime) -> None:
    first = first_submissions()
    dimensions = _dimension_columns(quality_filter, ReportTask.template_code, ReportTask.period_end)
    query = (
        select(*dimensions, func.count(ReportTaskTarget.id),
               func.sum(case((first.c.first_at.is_not(None), 1), else_=0)),
               func.sum(case((first.c.first_at <= ReportTask.deadline, 1), else_=0)))
        .select_from(ReportTaskTarget)
        .join(ReportTask, ReportTask.id == ReportTaskTarget.task_id)
        .join(Institution, Institution.id == ReportTaskTarget.institution_id)
        .outerjoin(first, and_(first.c.institution_id == ReportTaskTarget.institution_id,
                               first.c.template_code == ReportTask.template_code,
                               first.c.period_end == ReportTask.period_end))
        .where(ReportTask.deadline <= now,
               *_conditions(quality_filter, ReportTask.template_code, ReportTask.period_end))
        .group_by(*dimensions)
    )
    width = len(dimensions)
    for values in session.execute(query):
        key, name = _key(quality_filter, values[:width])
        row = _row(groups, key, name)
        row.expected, row.received, row.on_time = (int(value or 0) for value in values[width:])


def _uploads_query(quality_filter: QualityFilter) -> Any:
    return (
        select()
        .select_from(ReportSubmission)
        .join(Institution, Institution.id == ReportSubmission.institution_id)
        .where(ReportSubmission.findings_path.is_not(None), ReportSubmission.state.in_(VALIDATED_STATES),
               *_conditions(quality_filter, ReportSubmission.template_code, ReportSubmission.period_end))
    )


def _add_uploads(session: Session, settings: Settings, quality_filter: QualityFilter,
                 groups: dict[tuple, QualityRow]) -> int:
    """Add upload and row counts to ``groups``; return the number of uploads whose error rows were estimated."""
    dimensions = _dimension_columns(quality_filter, ReportSubmission.template_code, ReportSubmission.period_end)
    grouped = _uploads_query(quality_filter).add_columns(
        *dimensions, func.count(ReportSubmission.id), func.sum(ReportSubmission.row_count)).group_by(*dimensions)
    width = len(dimensions)
    for values in session.execute(grouped):
        key, name = _key(quality_filter, values[:width])
        row = _row(groups, key, name)
        row.uploads, row.rows_validated = int(values[width]), int(values[width + 1] or 0)

    with_errors = _uploads_query(quality_filter).add_columns(
        *dimensions, ReportSubmission.id, ReportSubmission.findings_path, ReportSubmission.row_count,
        ReportSubmission.error_count).where(ReportSubmission.error_count > 0)
    listed = [(tuple(values[:width]), *values[width:]) for values in session.execute(with_errors)]
    counts, estimated = error_rows(settings, [(upload_id, path, rows, errors)
                                              for _, upload_id, path, rows, errors in listed])
    for dimension_values, upload_id, _path, _rows, _errors in listed:
        key, name = _key(quality_filter, dimension_values)
        _row(groups, key, name).rows_with_errors += counts[upload_id]
    return estimated


def newest_versions(quality_filter: QualityFilter) -> Any:
    """Subquery of the current version of each report: (institution_id, template_code, period_end, version)."""
    return (
        select(ReportSubmission.institution_id, ReportSubmission.template_code, ReportSubmission.period_end,
               func.max(ReportSubmission.version).label("version"))
        .join(Institution, Institution.id == ReportSubmission.institution_id)
        .where(ReportSubmission.findings_path.is_not(None), ReportSubmission.state.in_(CURRENT_STATES),
               *_conditions(quality_filter, ReportSubmission.template_code, ReportSubmission.period_end))
        .group_by(ReportSubmission.institution_id, ReportSubmission.template_code, ReportSubmission.period_end)
        .subquery("newest")
    )


def _add_field_counts(session: Session, quality_filter: QualityFilter, groups: dict[tuple, QualityRow]) -> None:
    """Add the field completeness counts of the current version of each report to ``groups``."""
    newest = newest_versions(quality_filter)
    counts = SubmissionFieldCount
    dimensions = _dimension_columns(quality_filter, ReportSubmission.template_code, ReportSubmission.period_end)
    rows = cast(counts.row_count, BigInteger)  # rows × fields can pass 2**31 on PostgreSQL's integer
    query = (
        select(*dimensions, func.count(ReportSubmission.id), func.count(counts.submission_id),
               func.sum(rows * counts.field_count), func.sum(counts.present_values),
               func.sum(rows * counts.required_field_count), func.sum(counts.required_present_values))
        .select_from(ReportSubmission)
        .join(newest, and_(newest.c.institution_id == ReportSubmission.institution_id,
                           newest.c.template_code == ReportSubmission.template_code,
                           newest.c.period_end == ReportSubmission.period_end,
                           newest.c.version == ReportSubmission.version))
        .join(Institution, Institution.id == ReportSubmission.institution_id)
        .outerjoin(counts, counts.submission_id == ReportSubmission.id)
        .group_by(*dimensions)
    )
    width = len(dimensions)
    for values in session.execute(query):
        key, name = _key(quality_filter, values[:width])
        row = _row(groups, key, name)
        (row.reports, row.field_reports, row.cells, row.present_values, row.required_cells,
         row.required_present_values) = (int(value or 0) for value in values[width:])


# --- error rows from findings files --------------------------------------------------------------

# Keyed by the findings file's resolved path, which names the data directory and the submission, so
# two databases served by one process (or ids reused after a database reset) never share an entry.
_cache: dict[str, int] = {}
_cache_lock = threading.Lock()


def clear_error_row_cache() -> None:
    """Empty the process-wide cache of error-row counts, so the next report reads the findings files again."""
    with _cache_lock:
        _cache.clear()


def _count_files(paths: dict[str, int]) -> dict[int, int]:
    """Count the rows with an error finding in each findings file (path -> upload id), in one DuckDB query."""
    listing = list(paths)
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute(
            "SELECT filename, count(DISTINCT line) FROM read_parquet(?, filename=true) "
            "WHERE severity = 'error' AND line IS NOT NULL GROUP BY filename", [listing]).fetchall()
    finally:
        con.close()
    counts = {upload_id: 0 for upload_id in paths.values()}
    for filename, count in rows:
        counts[paths[filename]] = int(count)
    return counts


def error_rows(settings: Settings, uploads: Sequence[tuple[int, str, int, int]]) -> tuple[dict[int, int], int]:
    """Return upload id -> rows with an error finding, and how many uploads had to be estimated.

    ``uploads`` are (id, findings path relative to the data directory, row count, error count). An
    upload whose findings file is missing or unreadable is estimated as min(error count, row count),
    logged, and not cached.
    """
    root = settings.data_dir.resolve()
    keys = {upload_id: str((settings.data_dir / relative).resolve()) for upload_id, relative, *_ in uploads}
    with _cache_lock:
        counts = {upload_id: _cache[key] for upload_id, key in keys.items() if key in _cache}
    pending = [item for item in uploads if item[0] not in counts]
    estimated = 0
    readable: dict[str, int] = {}
    for upload_id, relative, rows, errors in pending:
        path = (settings.data_dir / relative).resolve()
        if path.is_relative_to(root) and path.is_file():
            readable[str(path)] = upload_id
        else:
            logger.warning("findings file %s of submission %s is missing; error rows estimated", relative, upload_id)
            counts[upload_id] = min(errors, rows)
            estimated += 1
    found = _read_batches(readable)
    for upload_id, relative, rows, errors in pending:
        if upload_id in found:
            counts[upload_id] = found[upload_id]
        elif upload_id not in counts:
            logger.warning("findings file %s of submission %s is unreadable; error rows estimated", relative, upload_id)
            counts[upload_id] = min(errors, rows)
            estimated += 1
    with _cache_lock:
        if len(_cache) + len(found) > CACHE_MAX_ENTRIES:
            _cache.clear()
        _cache.update({keys[upload_id]: count for upload_id, count in found.items()})
    return counts, estimated


def _read_batches(paths: dict[str, int]) -> dict[int, int]:
    """Count error rows batch by batch; a batch that fails is read file by file, so one bad file loses only itself."""
    found: dict[int, int] = {}
    items = list(paths.items())
    for start in range(0, len(items), FILES_PER_QUERY):
        batch = dict(items[start:start + FILES_PER_QUERY])
        try:
            found.update(_count_files(batch))
        except duckdb.Error:
            for path, upload_id in batch.items():
                try:
                    found.update(_count_files({path: upload_id}))
                except duckdb.Error as error:
                    logger.warning("findings file %s not readable: %s", Path(path).name, type(error).__name__)
    return found


# --- report --------------------------------------------------------------------------------------


def _sort_key(sort: str) -> Any:
    def by_key(row: QualityRow) -> tuple:
        return (row.institution or "", row.template_code or "", row.period_end or date.min)

    if sort == "key":
        return by_key
    return lambda row: (getattr(row, sort) is None, getattr(row, sort) or 0.0, by_key(row))


def quality_report(session: Session, settings: Settings, quality_filter: QualityFilter, *, sort: str = "key",
                   offset: int = 0, limit: int = 100, now: datetime | None = None) -> QualityReport:
    """Compute the measures of every group, sort them (worst first for a measure, None last) and return one page."""
    if sort not in SORT_KEYS:
        raise invalid("SORT_INVALID", f"排序字段“{sort[:32]}”无效，可选：{'、'.join(f'{k}（{v}）' for k, v in SORT_KEYS.items())}。")
    groups: dict[tuple, QualityRow] = {}
    _add_targets(session, quality_filter, groups, now or utc_now())
    estimated = _add_uploads(session, settings, quality_filter, groups)
    _add_field_counts(session, quality_filter, groups)
    rows = sorted(groups.values(), key=_sort_key(sort))
    total = QualityRow(institution_name="合计")
    for row in rows:
        total.add(row)
    notes = []
    if estimated:
        notes.append(f"有 {estimated} 个报送的校验结果文件无法读取，其错误行数按错误数估计（不超过其行数）。请联系平台管理员检查数据目录。")
    if total.reports > total.field_reports:
        notes.append(f"有 {total.reports - total.field_reports} 份报表的当前版本上传时尚未统计字段非空值，"
                     "未计入字段完整性；重新上传后即可统计。")
    return QualityReport(rows[offset:offset + limit], total, len(rows), offset, limit, estimated, notes)


def record_read(session: Session, request: Request, caller: Principal, quality_filter: QualityFilter,
                report: QualityReport) -> None:
    """Store the audit event of a data quality read and commit it."""
    add_event(session, request, caller, "quality.read", "data_quality", "success", {
        "institution": quality_filter.institution, "template": quality_filter.template_code,
        "period_from": f"{quality_filter.period_from:%Y%m%d}" if quality_filter.period_from else None,
        "period_to": f"{quality_filter.period_to:%Y%m%d}" if quality_filter.period_to else None,
        "group_by": list(quality_filter.group_by), "row_count": report.group_count})
    session.commit()
