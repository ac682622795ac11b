"""Queries over accepted report data in the warehouse: aggregates by group and pages of detail rows.

A :class:`ReportQuery` names one template, the institutions, a range of period ends, filters on
code-list fields, the group-by dimensions and the aggregates. :func:`build_query` checks every
field code against the template and raises :class:`ReportQueryError` (422) with a Chinese message
naming the value and the valid choices. SQL is assembled only from field codes that exist in the
template (quoted as identifiers) and from fixed function names. Every filter value is a bound
parameter.

Plaintext stays in memory, never on disk. Partitions are read one at a time: a partition is
decrypted into a ``BytesIO``, only the columns the query needs are read into Arrow, and an
in-memory DuckDB connection computes partial aggregates (count, sum, count of values, min, max per
group) or the requested detail rows. The partials are then combined in Python, so peak memory is
one partition's plaintext Parquet bytes plus its projected columns, whatever the number of
partitions. DuckDB gets ``temp_directory=''`` (nothing spills to disk), ``memory_limit``
:data:`DUCKDB_MEMORY_LIMIT`, and no file access (``enable_external_access=false``, locked).

Only accepted data is read: a partition counts when its manifest names one of the submission ids
the caller passes as accepted (admin_api reads them from the review events). A partition that is
listed but does not decrypt raises ``REPORT_PARTITION_UNREADABLE`` instead of being left out,
because a report that silently misses an institution's period would show wrong totals.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from intake.template_model import MULTI_VALUE_SEPARATOR, NUMERIC_TYPES, Template, TemplateField
from intake.validate import mask_kind, mask_value
from intake.warehouse import (
    PARTITION_NAME,
    PERIOD_COLUMN,
    WarehouseLoadError,
    institution_dir,
    partition_associated_data,
    read_manifest,
)
from regsandbox_core.documents import decrypt_document
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

__all__ = [
    "AGGREGATE_FUNCTIONS",
    "Aggregate",
    "AggregateResult",
    "DetailResult",
    "DetailTally",
    "GROUP_INSTITUTION",
    "GROUP_PERIOD",
    "Group",
    "ReportQuery",
    "ReportQueryError",
    "build_query",
    "code_fields",
    "detail_rows",
    "iter_detail_rows",
    "mask_kind",
    "numeric_fields",
    "parse_period_text",
    "run_aggregate",
]

logger = logging.getLogger(__name__)

GROUP_INSTITUTION = "institution"
GROUP_PERIOD = "period"
AGGREGATE_FUNCTIONS = {"count": "记录数", "sum": "合计", "avg": "平均值", "min": "最小值", "max": "最大值"}
"""Aggregate functions with the Chinese word their column names end with."""
MAX_GROUP_BY = 3
MAX_AGGREGATES = 20
MAX_FILTER_VALUES = 100
DUCKDB_MEMORY_LIMIT = "512MB"
"""Memory limit of each query's DuckDB connection. Nothing spills to disk, so a query above it fails."""
DUCKDB_THREADS = 2
AVERAGE_EXTRA_DIGITS = 2
"""Averages keep the field's scale plus this many digits, rounded half up."""
_PERIOD_FOLDER = re.compile(r"^period=([0-9]{8})$")
_PERIOD_TEXT = re.compile(r"^[0-9]{8}$")
_ROW_COLUMN = "_row"


class ReportQueryError(RegsandboxError):
    """A report query that names something the template does not have, or a partition that cannot be read."""

    status = 422


# --- the query -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregate:
    """One aggregate column: ``count`` of rows, or ``sum``/``avg``/``min``/``max`` of a numeric field."""

    function: str
    field: str | None = None

    @property
    def key(self) -> str:
        return self.function if self.field is None else f"{self.function}_{self.field}"


@dataclass(frozen=True)
class ReportQuery:
    """A checked query over one template's accepted data. Build it with :func:`build_query`."""

    template: Template
    institutions: tuple[str, ...]
    period_from: date
    period_to: date
    filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    group_by: tuple[str, ...] = ()
    aggregates: tuple[Aggregate, ...] = ()

    @property
    def measure_fields(self) -> tuple[str, ...]:
        """Numeric fields that some aggregate reads, in first-use order."""
        seen: dict[str, None] = {}
        for item in self.aggregates:
            if item.field is not None:
                seen.setdefault(item.field)
        return tuple(seen)

    @property
    def code_dimensions(self) -> tuple[str, ...]:
        return tuple(code for code in self.group_by if code not in (GROUP_INSTITUTION, GROUP_PERIOD))


def parse_period_text(text: str, label: str) -> date:
    """Parse a period end given as YYYYMMDD, or raise ``PERIOD_INVALID`` naming ``label`` (such as 起始报告期)."""
    value = text.strip()
    problem = f"{label}“{value[:20]}”无效，应为 YYYYMMDD 格式的真实日期，例如 20261130。"
    if not _PERIOD_TEXT.match(value):
        raise ReportQueryError("PERIOD_INVALID", problem)
    try:
        return datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise ReportQueryError("PERIOD_INVALID", problem) from None


def _field_list(fields: Sequence[TemplateField]) -> str:
    return "、".join(f"{item.code}（{item.name}）" for item in fields) or "无"


def code_fields(template: Template) -> list[TemplateField]:
    """Fields with a code list (or the report line field of an aggregate template): the ones to group and filter by."""
    return [item for item in template.fields if template.allowed_codes(item.code) is not None]


def numeric_fields(template: Template) -> list[TemplateField]:
    return [item for item in template.fields if item.type in NUMERIC_TYPES]


def _known_field(template: Template, code: str, purpose: str) -> TemplateField:
    if not template.has_field(code):
        raise ReportQueryError(
            "REPORT_FIELD_UNKNOWN",
            f"字段代码“{code[:64]}”不是报表 {template.code}（{template.name}）的字段，不能用于{purpose}。"
            f"该报表的字段有：{_field_list(template.fields)}。")
    return template.field(code)


def _code_field(template: Template, code: str, purpose: str, error_code: str) -> TemplateField:
    item = _known_field(template, code, purpose)
    if template.allowed_codes(code) is None:
        raise ReportQueryError(
            error_code,
            f"字段 {code}（{item.name}）没有代码表，不能用于{purpose}。可用于{purpose}的代码字段有："
            f"{_field_list(code_fields(template))}。")
    return item


def _check_group_by(template: Template, group_by: Sequence[str]) -> tuple[str, ...]:
    if len(group_by) > MAX_GROUP_BY:
        raise ReportQueryError("REPORT_GROUP_INVALID", f"分组维度最多 {MAX_GROUP_BY} 个，收到 {len(group_by)} 个，请减少分组维度。")
    if len(set(group_by)) != len(group_by):
        raise ReportQueryError("REPORT_GROUP_INVALID", "分组维度有重复，请每个维度只选一次。")
    multi = []
    for code in group_by:
        if code in (GROUP_INSTITUTION, GROUP_PERIOD):
            continue
        item = _code_field(template, code, "分组", "REPORT_GROUP_INVALID")
        if item.multi:
            multi.append(item)
    if len(multi) > 1:
        raise ReportQueryError("REPORT_GROUP_INVALID",
                               f"多值字段 {_field_list(multi)} 最多选一个作为分组维度，请只保留其中一个。")
    return tuple(group_by)


def _check_aggregates(template: Template, aggregates: Sequence[tuple[str, str | None]]) -> tuple[Aggregate, ...]:
    if len(aggregates) > MAX_AGGREGATES:
        raise ReportQueryError("REPORT_AGGREGATE_INVALID",
                               f"汇总指标最多 {MAX_AGGREGATES} 个，收到 {len(aggregates)} 个，请减少汇总指标。")
    checked: dict[str, Aggregate] = {}
    for function, code in aggregates:
        if function not in AGGREGATE_FUNCTIONS:
            known = "、".join(f"{name}（{label}）" for name, label in AGGREGATE_FUNCTIONS.items())
            raise ReportQueryError("REPORT_AGGREGATE_INVALID", f"汇总函数“{function[:32]}”无效，可选：{known}。")
        if function == "count":
            if code:
                raise ReportQueryError("REPORT_AGGREGATE_INVALID",
                                       f"count（记录数）统计行数，不带字段；请删除字段“{code[:64]}”。")
            item = Aggregate("count")
        else:
            if not code:
                raise ReportQueryError("REPORT_AGGREGATE_INVALID",
                                       f"汇总函数 {function}（{AGGREGATE_FUNCTIONS[function]}）须指定一个数值字段。"
                                       f"可选：{_field_list(numeric_fields(template))}。")
            target = _known_field(template, code, "汇总")
            if target.type not in NUMERIC_TYPES:
                raise ReportQueryError(
                    "REPORT_AGGREGATE_INVALID",
                    f"字段 {code}（{target.name}）不是数值字段，不能计算{AGGREGATE_FUNCTIONS[function]}。"
                    f"可汇总的数值字段有：{_field_list(numeric_fields(template))}。")
            item = Aggregate(function, code)
        checked.setdefault(item.key, item)
    return tuple(checked.values())


def _check_filters(template: Template, filters: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    checked: dict[str, tuple[str, ...]] = {}
    for code, values in filters.items():
        item = _code_field(template, code, "筛选", "REPORT_FILTER_INVALID")
        allowed = template.allowed_codes(code) or {}
        if not values:
            raise ReportQueryError("REPORT_FILTER_INVALID", f"筛选字段 {code}（{item.name}）没有选择任何代码，请至少选择一个或删除该筛选条件。")
        if len(values) > MAX_FILTER_VALUES:
            raise ReportQueryError("REPORT_FILTER_INVALID",
                                   f"筛选字段 {code}（{item.name}）最多选择 {MAX_FILTER_VALUES} 个代码。")
        unknown = [value for value in values if value not in allowed]
        if unknown:
            listed = "、".join(f"{key}（{label}）" for key, label in allowed.items())
            raise ReportQueryError("REPORT_FILTER_INVALID",
                                   f"筛选字段 {code}（{item.name}）的代码“{str(unknown[0])[:32]}”不在代码表中。可选：{listed}。")
        checked[code] = tuple(dict.fromkeys(values))
    return checked


def build_query(
    template: Template,
    *,
    institutions: Sequence[str],
    period_from: date,
    period_to: date,
    filters: Mapping[str, Sequence[str]] | None = None,
    group_by: Sequence[str] = (),
    aggregates: Sequence[tuple[str, str | None]] = (),
) -> ReportQuery:
    """Check a query against ``template`` and return it. Raises :class:`ReportQueryError` (422) on a bad part."""
    if period_from > period_to:
        raise ReportQueryError("PERIOD_INVALID", f"起始报告期 {period_from:%Y%m%d} 晚于截止报告期 {period_to:%Y%m%d}，"
                                                 "请把起始报告期改为不晚于截止报告期的日期。")
    return ReportQuery(
        template=template, institutions=tuple(sorted(set(institutions))), period_from=period_from,
        period_to=period_to, filters=_check_filters(template, filters or {}),
        group_by=_check_group_by(template, group_by), aggregates=_check_aggregates(template, aggregates))


# --- partitions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Partition:
    institution: str
    period: str
    path: Path


def _partitions(settings: Settings, query: ReportQuery,
                accepted: Mapping[str, Collection[int]]) -> Iterator[_Partition]:
    """Yield the accepted partitions of the query, sorted by institution and period."""
    low, high = f"{query.period_from:%Y%m%d}", f"{query.period_to:%Y%m%d}"
    for institution in query.institutions:
        try:
            top = institution_dir(settings, query.template.code, institution)
        except WarehouseLoadError:
            continue
        if not top.is_dir():
            continue
        ids = accepted.get(institution, ())
        for folder in sorted(top.iterdir()):
            match = _PERIOD_FOLDER.match(folder.name)
            if match is None or not low <= match.group(1) <= high:
                continue
            source = folder / PARTITION_NAME
            manifest = read_manifest(folder)
            if not source.is_file() or manifest is None or manifest.submission_id not in ids:
                if source.is_file():
                    logger.warning("warehouse partition %s left out of a report query: its manifest names "
                                   "no accepted submission", source)
                continue
            yield _Partition(institution, match.group(1), source)


def _unreadable(template: Template, partition: _Partition, error: Exception) -> ReportQueryError:
    code = getattr(error, "code", type(error).__name__)
    logger.warning("warehouse partition %s of %s not readable for a report query: %s", partition.path,
                   partition.institution, code)
    return ReportQueryError(
        "REPORT_PARTITION_UNREADABLE",
        f"报表 {template.code} 机构 {partition.institution} 报告期 {partition.period} 的数据仓库分区无法读取（{code}），"
        "查询未完成。请联系平台管理员检查该机构的数据密钥和数据仓库文件。", status=500)


@contextlib.contextmanager
def _opened(store: KeyStore, template: Template, partition: _Partition) -> Iterator[Callable[[Sequence[str]], pa.Table]]:
    """Decrypt a partition into memory and yield a function that reads some of its columns as Arrow.

    The plaintext buffer is closed when the block ends. A column missing from an older partition
    (a field added by a later template version) reads as empty.
    """
    buffer = io.BytesIO()
    try:
        try:
            decrypt_document(store, partition.institution, partition.path, buffer,
                             partition_associated_data(template.code, partition.institution, partition.period))
        except (RegsandboxError, OSError) as error:
            raise _unreadable(template, partition, error) from error

        def read(columns: Sequence[str]) -> pa.Table:
            try:
                buffer.seek(0)
                present = set(pq.read_schema(buffer).names)
                buffer.seek(0)
                table = pq.read_table(buffer, columns=[name for name in columns if name in present])
            except (pa.ArrowException, OSError) as error:
                raise _unreadable(template, partition, error) from error
            for name in columns:
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
            return table

        yield read
    finally:
        buffer.close()


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute("SET temp_directory=''")
    con.execute(f"SET memory_limit='{DUCKDB_MEMORY_LIMIT}'")
    con.execute(f"SET threads={DUCKDB_THREADS}")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    return con


# --- SQL pieces ----------------------------------------------------------------------------------


def _quoted(code: str) -> str:
    """Quote a field code that :class:`Template` already restricts to ``[A-Z][A-Z0-9_]*``."""
    return '"' + code.replace('"', '""') + '"'


def _typed(item: TemplateField) -> str:
    column = f"NULLIF({_quoted(item.code)}, '')"
    if item.type == "integer":
        return f"TRY_CAST({column} AS BIGINT)"
    return f"TRY_CAST({column} AS DECIMAL(38, {item.scale if item.scale is not None else 6}))"


def _where(query: ReportQuery) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for code, values in query.filters.items():
        if query.template.field(code).multi:
            clauses.append(f"list_has_any(string_split(coalesce({_quoted(code)}, ''), "
                           f"'{MULTI_VALUE_SEPARATOR}'), ?::VARCHAR[])")
        else:
            clauses.append(f"list_contains(?::VARCHAR[], {_quoted(code)})")
        params.append(list(values))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _dimension(template: Template, code: str, alias: str) -> str:
    if template.field(code).multi:
        return (f"unnest(CASE WHEN coalesce({_quoted(code)}, '') = '' THEN [NULL]::VARCHAR[] "
                f"ELSE string_split({_quoted(code)}, '{MULTI_VALUE_SEPARATOR}') END) AS {alias}")
    return f"NULLIF({_quoted(code)}, '') AS {alias}"


def _aggregate_sql(query: ReportQuery, dimensions: Sequence[str]) -> tuple[str, list[Any]]:
    """SQL of the partial aggregates of one partition: dimension values, row count, then per measure sum, count, min, max."""
    template = query.template
    inner = [_dimension(template, code, f"d{index}") for index, code in enumerate(dimensions)]
    inner += [f"{_typed(template.field(code))} AS m{index}" for index, code in enumerate(query.measure_fields)]
    outer = [f"d{index}" for index in range(len(dimensions))] + ["count(*)"]
    for index in range(len(query.measure_fields)):
        outer += [f"sum(m{index})", f"count(m{index})", f"min(m{index})", f"max(m{index})"]
    where, params = _where(query)
    group = f" GROUP BY {', '.join(f'd{index}' for index in range(len(dimensions)))}" if dimensions else ""
    return f"SELECT {', '.join(outer)} FROM (SELECT {', '.join(inner) or '1 AS one'} FROM part{where}){group}", params


def _select(con: duckdb.DuckDBPyConnection, table: pa.Table, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    con.register("part", table)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.unregister("part")


def _count(con: duckdb.DuckDBPyConnection, table: pa.Table, sql: str, params: list[Any]) -> int:
    return _select(con, table, sql, params)[0][0]


# --- aggregates ----------------------------------------------------------------------------------


@dataclass
class _Partial:
    count: int = 0
    measures: dict[str, list[Any]] = field(default_factory=dict)
    """Field code → [sum, count of values, min, max]."""

    def add(self, count: int, values: Sequence[Any], fields: Sequence[str]) -> None:
        self.count += count
        for index, code in enumerate(fields):
            total, filled, low, high = values[index * 4: index * 4 + 4]
            current = self.measures.setdefault(code, [None, 0, None, None])
            if total is not None:
                current[0] = total if current[0] is None else current[0] + total
            current[1] += filled or 0
            if low is not None and (current[2] is None or low < current[2]):
                current[2] = low
            if high is not None and (current[3] is None or high > current[3]):
                current[3] = high

    def value(self, aggregate: Aggregate, template: Template) -> Any:
        if aggregate.field is None:
            return self.count
        total, filled, low, high = self.measures.get(aggregate.field, [None, 0, None, None])
        if aggregate.function == "sum":
            return total
        if aggregate.function == "min":
            return low
        if aggregate.function == "max":
            return high
        if not filled:
            return None
        scale = (template.field(aggregate.field).scale or 0) + AVERAGE_EXTRA_DIGITS
        return (Decimal(total) / filled).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Group:
    """One result row: the group's key in ``group_by`` order (None for an empty value) and its aggregate values."""

    key: tuple[str | None, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class AggregateResult:
    """Groups sorted by key (at most ``max_groups``), the totals over all matching rows, and counts."""

    groups: list[Group]
    totals: tuple[Any, ...]
    group_count: int
    row_count: int
    partitions: int

    @property
    def truncated(self) -> bool:
        return self.group_count > len(self.groups)


def _sort_key(key: tuple[str | None, ...]) -> tuple[tuple[bool, str], ...]:
    return tuple((part is None, part or "") for part in key)


def run_aggregate(settings: Settings, store: KeyStore, query: ReportQuery,
                  accepted: Mapping[str, Collection[int]], max_groups: int) -> AggregateResult:
    """Aggregate the accepted rows of the query's partitions by ``group_by``.

    Without aggregates the result counts rows. A multi-value field used as a dimension counts a
    row once under each of its codes, while the totals count every row once, so the groups of
    such a field can add up to more than the totals.
    """
    aggregates = query.aggregates or (Aggregate("count"),)
    dimensions = query.code_dimensions
    fields = query.measure_fields
    # The period column is in every partition, so a count-only query still registers a table with a column.
    columns = list(dict.fromkeys([PERIOD_COLUMN, *dimensions, *query.filters, *fields]))
    group_sql, params = _aggregate_sql(query, dimensions)
    total_sql, total_params = _aggregate_sql(query, ())
    partials: dict[tuple[str | None, ...], _Partial] = {}
    overall = _Partial()
    partitions = 0
    with _connect() as con:
        for partition in _partitions(settings, query, accepted):
            with _opened(store, query.template, partition) as read:
                table = read(columns)
            partitions += 1
            for row in _select(con, table, group_sql, params):
                codes = dict(zip(dimensions, row[:len(dimensions)]))
                key = tuple(partition.institution if name == GROUP_INSTITUTION
                            else partition.period if name == GROUP_PERIOD else codes[name]
                            for name in query.group_by)
                partials.setdefault(key, _Partial()).add(row[len(dimensions)], row[len(dimensions) + 1:], fields)
            total = _select(con, table, total_sql, total_params)[0]
            overall.add(total[0], total[1:], fields)
            del table
    keys = sorted((key for key, partial in partials.items() if partial.count), key=_sort_key)
    groups = [Group(key, tuple(partials[key].value(item, query.template) for item in aggregates))
              for key in keys[:max_groups]]
    totals = tuple(overall.value(item, query.template) for item in aggregates)
    return AggregateResult(groups, totals, len(keys), overall.count, partitions)


# --- detail rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetailResult:
    """One page of detail rows (institution, period, then the template's fields) and the number of matching rows."""

    rows: list[tuple[Any, ...]]
    row_count: int
    partitions: int


@dataclass
class DetailTally:
    """Matching rows and partitions read, filled in by :func:`iter_detail_rows` when its iteration ends."""

    rows: int = 0
    partitions: int = 0


def _detail_sql(query: ReportQuery, fields: Sequence[TemplateField]) -> tuple[str, str, list[Any]]:
    selected = [_typed(item) if item.type in NUMERIC_TYPES else _quoted(item.code) for item in fields]
    where, params = _where(query)
    count_sql = f"SELECT count(*) FROM part{where}"
    rows_sql = f"SELECT {', '.join(selected)} FROM part{where} ORDER BY {_ROW_COLUMN} LIMIT ? OFFSET ?"
    return count_sql, rows_sql, params


def _masked(row: Sequence[Any], kinds: Sequence[str | None]) -> tuple[Any, ...]:
    return tuple(mask_value(kind, value) if kind is not None and isinstance(value, str) else value
                 for value, kind in zip(row, kinds))


def _numbered(table: pa.Table) -> pa.Table:
    """Add the row's position in the partition, so that pages keep the file order."""
    return table.append_column(_ROW_COLUMN, pa.array(range(table.num_rows), pa.int64()))


def iter_detail_rows(settings: Settings, store: KeyStore, query: ReportQuery, accepted: Mapping[str, Collection[int]],
                     offset: int, limit: int | None, tally: DetailTally | None = None) -> Iterator[tuple[Any, ...]]:
    """Yield the matching rows from ``offset`` (at most ``limit``) as (institution, period, *field values).

    Numeric fields are Decimal or int, other fields text with personal data masked. Rows come in
    institution, period and file order. With ``tally``, every partition is read so that the
    number of matching rows can be counted, and iteration goes on after ``limit`` rows with
    counting only. Without it, iteration stops after ``limit`` rows.
    """
    fields = list(query.template.fields)
    kinds = [mask_kind(query.template, item.code) for item in fields]
    columns = [item.code for item in fields]
    count_sql, rows_sql, params = _detail_sql(query, fields)
    seen = partitions = 0
    remaining = limit
    with _connect() as con:
        for partition in _partitions(settings, query, accepted):
            if remaining == 0 and tally is None:
                break
            with _opened(store, query.template, partition) as read:
                # Counting reads the filter columns only. The other columns are read for a partition in the page.
                matching = _count(con, _numbered(read([PERIOD_COLUMN, *query.filters])), count_sql, params)
                start = max(offset - seen, 0)
                if start < matching and remaining != 0:
                    take = matching - start if remaining is None else min(remaining, matching - start)
                    for row in _select(con, _numbered(read(columns)), rows_sql, [*params, take, start]):
                        yield (partition.institution, partition.period, *_masked(row, kinds))
                    if remaining is not None:
                        remaining -= take
            partitions += 1
            seen += matching
    if tally is not None:
        tally.rows, tally.partitions = seen, partitions


def detail_rows(settings: Settings, store: KeyStore, query: ReportQuery, accepted: Mapping[str, Collection[int]],
                offset: int, limit: int) -> DetailResult:
    """Return one page of masked detail rows and the number of matching rows."""
    tally = DetailTally()
    rows = list(iter_detail_rows(settings, store, query, accepted, offset, limit, tally))
    return DetailResult(rows, tally.rows, tally.partitions)
