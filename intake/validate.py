"""Validation of a submitted report file against its template, in DuckDB.

:func:`validate_staged` reads the text-only staging Parquet file that :func:`intake.reader.stage_file`
wrote and checks every row against :meth:`Template.effective_rules`. Each rule becomes generated
SQL; no Python code runs per data row. :func:`validate_text` checks a ``|`` text file in place,
without a staging file, when :func:`intake.reader.direct_text` found its bytes fit for that; it
reads the file in one parallel scan (see :class:`_TextRun`) and then runs the same steps over
the columns it kept, with the same findings as staging the file would give. There the
18-character check digits run as numpy functions over whole DuckDB vectors
(:mod:`intake.check_digits`). The steps of :func:`validate_staged`:

1. A view ``typed`` over the staging file adds, for every field, its typed value ``_v_<code>``:
   the text of text and code fields, a ``DECIMAL(38, scale)`` for numbers and a ``DATE`` for dates.
   A typed value is NULL when the cell is empty or not a valid value of its type, so a comparison,
   reconciliation or fluctuation that uses it skips that row instead of adding a second finding
   to the format error.
2. One scan evaluates every row-level check (not_null, code_list, format, compare and the
   institution check) as a boolean column and keeps only the rows that fail at least one of them
   in a temporary table. The messages, with masked values, are built from that small table.
3. Uniqueness, references, reconciliations and fluctuations run as their own queries (hash
   aggregates and anti-joins); reconciliations and fluctuations share one aggregate scan.
4. One aggregate scan counts the non-empty values of every field (:attr:`ValidationResult.field_values`),
   the input of the field completeness measure (字段完整性).
5. All findings and the reader's findings are sorted by line and written to one Parquet file.

A rule whose data is absent produces no finding: no target table for a reference, no G01 for a
reconciliation, no accepted previous period for a fluctuation, no earlier period for history
uniqueness. :attr:`ValidationResult.skipped_rules` lists such a rule with a Chinese reason.

Values of fields that hold personal data (resident ID, bank card and mobile numbers, personal
names) appear masked in every finding and message.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from pydantic import BaseModel

from intake.check_digits import RESIDENT_ID_FUNCTION, USCC_FUNCTION, USCC_VALID_FUNCTION
from intake.check_digits import register as register_check_digits
from intake.reader import LINE_COLUMN, DirectText, StagedFile
from intake.template_model import (
    CHECKS,
    MULTI_VALUE_SEPARATOR,
    AllOf,
    AnyOf,
    CodeListRule,
    CompareRule,
    Condition,
    FluctuationRule,
    FormatRule,
    NotNullRule,
    Operand,
    ReconcileRule,
    ReferenceRule,
    Template,
    TemplateCatalog,
    TemplateField,
    UniqueRule,
)
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import atomic_path

__all__ = [
    "FINDINGS_SCHEMA",
    "SkippedRule",
    "ValidationContext",
    "ValidationError",
    "ValidationResult",
    "check_sql",
    "validate_staged",
    "validate_text",
]

logger = logging.getLogger(__name__)

MASKED_CHECKS = frozenset({"resident_id", "bank_card", "mobile"})
"""Checks whose fields hold personal numbers: their values are always shown masked."""
PERSONAL_NAME_MARKER = "姓名"
"""Word in the Chinese name of a field that contains a personal name: only the surname is shown."""
MESSAGE_VALUE_LIMIT = 100
"""Characters of a value quoted in a message; longer values are clipped."""
CODES_LISTED = 20
"""Codes of a code list named in a message at most."""

FINDINGS_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("field_code", pa.string()),
        ("field_name", pa.string()),
        ("value", pa.string()),
        ("rule_id", pa.string()),
        ("rule_name", pa.string()),
        ("rule_kind", pa.string()),
        ("severity", pa.string()),
        ("explained", pa.bool_()),
        ("message", pa.string()),
    ]
)
"""Columns of the findings Parquet file. ``line`` is NULL for findings about the whole file."""

INSTITUTION_RULE_PREFIX = "AUTO-INSTITUTION-"
READER_RULE_KIND = "reader"
INSTITUTION_RULE_KIND = "institution"

STEP_WORKERS = 3
"""Validation steps that run at the same time after the scan (see :func:`_execute`)."""
DUCKDB_MEMORY_SHARE = 0.5
"""Share of ``ValidationContext.memory_limit`` given to DuckDB's buffer pool. On the 2 GB file of
benchmarks/intake_validation.py --memory-check (2 cores), staging and validation with a 1GB budget
peaked at 931 MiB RSS with a share of 0.6 and at 795 to 865 MiB with 0.5 (three runs). Giving
DuckDB all of it had peaked at 1,221 MiB."""
_MEMORY_UNITS = {
    "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}

_OP_NAMES = {
    "=": "等于",
    "!=": "不等于",
    ">": "大于",
    ">=": "不小于",
    "<": "小于",
    "<=": "不大于",
    "in": "属于",
    "not_in": "不属于",
}
_WARNING_HINT = "如数据属实，请在备注中说明原因。"
_ELEMENT = "_e"
"""Lambda variable for one value of a multi field; field codes start with a letter, so it never names a column."""
_THOUSANDS_PATTERN = r"[+-]?[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?"
_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_ORG_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_RIC_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


class ValidationError(RegsandboxError):
    """Validation could not run (not a finding about the data): memory, a broken input file, a template pattern."""

    status = 500


@dataclass(frozen=True)
class ValidationContext:
    """Inputs of a validation beyond the file: the period, the institution and related data."""

    period_end: date
    period_start: date
    institution_identifiers: frozenset[str]
    """Values the template's institution field may hold for the submitting institution (金融许可证号)."""
    batch: Mapping[str, Path] = field(default_factory=dict)
    """Template code → staging Parquet file of another file of the same submission batch."""
    warehouse: Mapping[str, Sequence[Path]] = field(default_factory=dict)
    """Template code → Parquet files of the institution's accepted data, with a ``_period`` column (YYYYMMDD)."""
    memory_limit: str = "1GB"
    """Memory budget of the validating process, as DuckDB writes sizes ("1GB", "512MiB").

    DuckDB's own ``memory_limit`` gets ``DUCKDB_MEMORY_SHARE`` of it, because that limit covers
    DuckDB's buffer pool only. The rest is left for Python, pyarrow and DuckDB's other
    allocations, which nothing limits."""
    threads: int | None = None


@dataclass(frozen=True)
class SkippedRule:
    """A rule that did not run because the data it compares with is absent, with the reason in Chinese."""

    rule_id: str
    rule_name: str
    rule_kind: str
    reason: str


@dataclass(frozen=True)
class ValidationResult:
    findings_path: Path
    counts: Mapping[str, int]
    """Findings by severity: ``{"error": n, "warning": n}``."""
    explained_warnings: int
    """Warnings on rows whose remark field (备注) is filled."""
    rule_counts: Mapping[str, int]
    """Findings by rule id (reader findings by their code)."""
    rows_checked: int
    seconds: float
    skipped_rules: tuple[SkippedRule, ...]
    accepted_possible: bool
    """True when no finding is an error."""
    step_seconds: Mapping[str, float] = field(default_factory=dict)
    """Wall-clock seconds of each step: connect (and scan, in place), then row_checks, unique_checks,
    reference_checks, aggregate_checks, reader_findings and field_counts, which run side by side so
    their seconds overlap, and write."""
    field_values: Mapping[str, int] = field(default_factory=dict)
    """Field code → rows whose value is non-empty, in template order. Empty means NULL, or blank
    after trimming for text fields: the reading of the not_null rule."""

    @property
    def errors(self) -> int:
        return self.counts.get("error", 0)

    @property
    def warnings(self) -> int:
        return self.counts.get("warning", 0)


@dataclass(frozen=True)
class _PseudoRule:
    """A check that is not a template rule (the institution check, reader findings)."""

    id: str
    name: str
    kind: str
    severity: str


# --- SQL helpers ---------------------------------------------------------------------------------


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def _path_list(paths: Iterable[Path]) -> str:
    return "[" + ", ".join(_lit(str(path)) for path in paths) + "]"


def _number_literal(value: Any) -> str:
    number = Decimal(str(value))
    return f"CAST({_lit(format(number, 'f'))} AS DECIMAL(38, {max(0, -number.as_tuple().exponent)}))" if (
        number != number.to_integral_value()
    ) else format(number.to_integral_value(), "f")


def _date_literal(text: str) -> str:
    return f"DATE {_lit(f'{text[:4]}-{text[4:6]}-{text[6:8]}')}"


def _period_text(day: date) -> str:
    return day.strftime("%Y%m%d")


def _regex(expr: str, pattern: str) -> str:
    return f"regexp_full_match({expr}, {_lit(pattern)})"


def _digit(expr: str, position: int) -> str:
    return f"(ascii(substr({expr}, {position}, 1)) - 48)"


def _re2_literal(text: str) -> str:
    """Return an RE2 pattern matching ``text`` literally: ASCII other than letters and digits as ``\\x{..}``."""
    return "".join(
        char if char.isalnum() or ord(char) > 127 else f"\\x{{{ord(char):02x}}}" for char in text
    )


def _multi_codes_pattern(codes: Iterable[str]) -> str | None:
    """Return an RE2 pattern for texts whose ``;``-separated values are all in ``codes``, or None.

    None when the codes are empty or one contains the separator: splitting the text would then
    cut that code apart, which a pattern cannot mirror.
    """
    codes = list(codes)
    if not codes or any(MULTI_VALUE_SEPARATOR in value for value in codes):
        return None
    any_code = "(?:" + "|".join(_re2_literal(value) for value in codes) + ")"
    return f"{any_code}(?:{_re2_literal(MULTI_VALUE_SEPARATOR)}{any_code})*"


def _date_sql(expr: str) -> str:
    """Return SQL for the TIMESTAMP of a YYYYMMDD text, NULL unless it is 8 ASCII digits naming a calendar date.

    ``try_strptime`` with ``%Y%m%d`` rejects every 8-byte text other than 8 digits, except one
    that starts or ends with whitespace ("2026113 "). The values reaching it never do: the parser
    trims code, number and date fields, and the direct scan reads a file whose fields have no
    whitespace at their edges, or trims those fields. Testing the byte length instead of
    ``regexp_full_match('[0-9]{8}')`` halves the cost of a date (tests/intake/test_validate.py
    compares both on every kind of text).
    """
    return f"CASE WHEN strlen({expr}) = 8 THEN try_strptime({expr}, '%Y%m%d') END"


def _length_within(expr: str, limit: int) -> str:
    """Return SQL that is true when the text has at most ``limit`` characters; counts them only beyond ``limit`` bytes."""
    return f"(strlen({expr}) <= {limit} OR length({expr}) <= {limit})"


def _clip_sql(expr: str) -> str:
    return (
        f"CASE WHEN length({expr}) > {MESSAGE_VALUE_LIMIT} "
        f"THEN left({expr}, {MESSAGE_VALUE_LIMIT - 1}) || '…' ELSE {expr} END"
    )


# --- check digits ----------------------------------------------------------------------------------


def _ric_checksum_ok(x: str) -> str:
    total = " + ".join(f"{_digit(x, i + 1)} * {w}" for i, w in enumerate(_RIC_WEIGHTS))
    return f"(substr('10X98765432', (({total}) % 11) + 1, 1) = substr({x}, 18, 1))"


def _uscc_checksum_ok(x: str) -> str:
    terms = []
    for i, weight in enumerate(_USCC_WEIGHTS):
        position = i + 1
        value = _digit(x, position) if position <= 8 else f"(instr({_lit(_USCC_ALPHABET)}, substr({x}, {position}, 1)) - 1)"
        terms.append(f"{value} * {weight}")
    total = " + ".join(terms)
    return f"(substr({_lit(_USCC_ALPHABET)}, ((31 - (({total}) % 31)) % 31) + 1, 1) = substr({x}, 18, 1))"


def _luhn_ok(x: str) -> str:
    padded = f"lpad({x}, 19, '0')"
    terms = []
    for position in range(1, 20):
        digit = _digit(padded, position)
        # Counted from the right, the check digit is 1; every second digit from it is doubled.
        terms.append(f"(2 * {digit} - CASE WHEN {digit} > 4 THEN 9 ELSE 0 END)" if position % 2 == 0 else digit)
    return f"((({' + '.join(terms)}) % 10) = 0)"


def _org_checksum_ok(x: str) -> str:
    compact = f"replace({x}, '-', '')"
    total = " + ".join(
        f"(instr({_lit(_ORG_ALPHABET)}, substr({compact}, {i + 1}, 1)) - 1) * {w}" for i, w in enumerate(_ORG_WEIGHTS)
    )
    return f"(substr('0X987654321', (({total}) % 11) + 1, 1) = substr({compact}, 9, 1))"


def _check_steps(check: str, x: str, udf: bool = False) -> list[tuple[str, str]]:
    """Return the steps of a named check as (SQL condition that holds for a good value, Chinese reason).

    Every condition is safe on any text (no error for malformed input); the first failing step
    names the problem. With ``udf`` the 18-character check digits call the functions of
    :mod:`intake.check_digits`, which the connection must have registered.
    """
    if check == "resident_id":
        return [
            (f"length({x}) = 18", f"'应为 18 位，当前为 ' || length({x}) || ' 位'"),
            (_regex(x, "[0-9]{17}[0-9Xx]"), "'前 17 位应为数字，末位应为数字或 X'"),
            (f"right({x}, 1) <> 'x'", "'末位校验码 x 应写成大写 X'"),
            (
                f"(substr({x}, 7, 4) <> '0000' AND try_strptime(substr({x}, 7, 8), '%Y%m%d') IS NOT NULL)",
                "'第 7 至 14 位的出生日期不是有效日期'",
            ),
            (
                f"{RESIDENT_ID_FUNCTION}({x})" if udf else _ric_checksum_ok(x),
                "'末位校验码与前 17 位不符（GB 11643），号码可能抄错'",
            ),
        ]
    if check == "uscc":
        return [
            (f"length({x}) = 18", f"'应为 18 位，当前为 ' || length({x}) || ' 位'"),
            (
                _regex(x, "[0-9]{8}[0-9A-HJ-NP-RTUW-Y]{10}"),
                "'前 8 位应为数字，其余为数字或大写字母（不含 I、O、S、V、Z）'",
            ),
            (
                f"{USCC_FUNCTION}({x})" if udf else _uscc_checksum_ok(x),
                "'末位校验码与前 17 位不符（GB 32100），代码可能抄错'",
            ),
        ]
    if check == "bank_card":
        return [
            (_regex(x, "[0-9]{13,19}"), f"'应为 13 至 19 位数字，当前为 ' || length({x}) || ' 个字符'"),
            (_luhn_ok(x), "'末位校验码不正确（Luhn 算法），卡号可能抄错'"),
        ]
    if check == "mobile":
        return [
            (_regex(x, "[0-9]{11}"), f"'应为 11 位数字，当前为 ' || length({x}) || ' 个字符'"),
            (_regex(x, "1[3-9][0-9]{9}"), "'应以 1 开头，第 2 位为 3 至 9'"),
        ]
    if check == "license_no":
        return [
            (
                _regex(x, "[A-Z][0-9]{4}[A-Z][0-9]{9}"),
                "'应为 15 位：1 位大写字母、4 位数字、1 位大写字母、9 位数字，如 B0001H111000001'",
            ),
        ]
    if check == "org_code":
        return [
            (_regex(x, "[0-9A-Z]{8}-?[0-9X]"), "'应为 9 位数字或大写字母（可写成 8 位-1 位），末位为数字或 X'"),
            (_org_checksum_ok(x), "'末位校验码不正确（GB 11714），代码可能抄错'"),
        ]
    raise ValueError(f"unknown check {check!r}")


def check_sql(check: str, x: str, udf: bool = False) -> str:
    """Return a SQL boolean that is true when the text ``x`` (a SQL expression) passes the named check."""
    if udf and check == "uscc":
        # One numpy pass tests what the length, the pattern and the check digit test one after another.
        return f"{USCC_VALID_FUNCTION}({x})"
    return "(" + " AND ".join(condition for condition, _reason in _check_steps(check, x, udf)) + ")"


def _check_reason_sql(check: str, x: str, udf: bool = False) -> str:
    steps = _check_steps(check, x, udf)
    branches = " ".join(f"WHEN NOT ({condition}) THEN {reason}" for condition, reason in steps)
    return f"CASE {branches} ELSE '未通过检查' END"


# --- fields -----------------------------------------------------------------------------------------


class _FieldSql:
    """SQL expressions for the fields of one template over a relation with its raw text columns."""

    def __init__(self, template: Template, masked: frozenset[str] = frozenset(), *,
                 plain_edges: bool = False, null_empty: bool = False, udf: bool = False,
                 known_dates: Mapping[str, date] | None = None) -> None:
        self.template = template
        self.masked = masked
        self.known_dates = dict(known_dates or {})
        """Field code → the date that nearly every row contains (the period end): parsed once, not per row."""
        self.plain_edges = plain_edges or null_empty
        """No value starts with whitespace: a text value is blank only when it is empty."""
        self.null_empty = null_empty
        """Besides :attr:`plain_edges`, every empty value is NULL (DuckDB's ``read_csv``), so NULL tests decide."""
        self.udf = udf
        """Check digits call the functions of :mod:`intake.check_digits`."""
        self._mask_kinds: dict[str, str | None] = {}

    def item(self, code: str) -> TemplateField:
        return self.template.field(code)

    @staticmethod
    def raw(code: str) -> str:
        return _q(code)

    @staticmethod
    def typed(code: str) -> str:
        return _q(f"_v_{code}")

    def present(self, code: str) -> str:
        item = self.item(code)
        raw = self.raw(code)
        if self.null_empty:
            return f"({raw} IS NOT NULL)"
        if item.type == "text" and not self.plain_edges:
            return f"(coalesce(trim({raw}), '') <> '')"
        return f"(coalesce({raw}, '') <> '')"

    def empty(self, code: str) -> str:
        return f"(NOT {self.present(code)})"

    def type_ok(self, code: str) -> str | None:
        """Return the SQL test that a present value is a valid value of the field's type (numbers, dates)."""
        item = self.item(code)
        raw = self.raw(code)
        if item.type == "integer":
            digits = min(item.length or 38, 38)
            return _regex(raw, f"[+-]?[0-9]{{1,{digits}}}")
        if item.type == "decimal":
            precision, scale = item.precision or 38, item.scale or 0
            integer_digits = max(precision - scale, 1)
            if scale == 0:
                return _regex(raw, f"[+-]?[0-9]{{1,{integer_digits}}}")
            return _regex(raw, f"[+-]?[0-9]{{1,{integer_digits}}}(\\.[0-9]{{1,{scale}}})?")
        if item.type == "date":
            return f"({_date_sql(raw)} IS NOT NULL)"
        return None

    def type_valid(self, code: str) -> str | None:
        """Like :meth:`type_ok`, over a relation that has the typed values: reuses them instead of parsing again."""
        if self.item(code).type in ("integer", "decimal", "date"):
            return f"({self.typed(code)} IS NOT NULL)"
        return None

    def typed_expr(self, code: str) -> str:
        item = self.item(code)
        raw = self.raw(code)
        if item.type in ("text", "code"):
            return raw if self.null_empty else f"CASE WHEN {self.present(code)} THEN {raw} END"
        ok = self.type_ok(code)
        if item.type == "integer":
            return f"CASE WHEN {ok} THEN CAST({raw} AS DECIMAL(38, 0)) END"
        if item.type == "decimal":
            return f"CASE WHEN {ok} THEN CAST({raw} AS DECIMAL(38, {item.scale or 0})) END"
        typed = f"CAST({_date_sql(raw)} AS DATE)"
        known = self.known_dates.get(code)
        if known is None:
            return typed
        return f"CASE WHEN {raw} = {_lit(_period_text(known))} THEN {_date_literal(_period_text(known))} ELSE {typed} END"

    def typed_select(self, source: str, codes: Iterable[str] | None = None) -> str:
        """``SELECT *, typed values FROM source``; the optimizer drops the typed values a query does not use."""
        wanted = [item.code for item in self.template.fields if codes is None or item.code in set(codes)]
        if not wanted:
            return f"SELECT * FROM {source}"
        typed = ", ".join(f"{self.typed_expr(code)} AS {self.typed(code)}" for code in wanted)
        return f"SELECT *, {typed} FROM {source}"

    # format

    def elements_ok(self, code: str, predicate: Callable[[str], str]) -> str:
        """Apply ``predicate`` (a builder of SQL over a value) to the value, or to each value of a multi field."""
        raw = self.raw(code)
        if self.item(code).multi:
            return (
                f"coalesce(list_bool_and(list_transform(string_split({raw}, {_lit(MULTI_VALUE_SEPARATOR)}), "
                f"lambda {_ELEMENT}: coalesce({predicate(_ELEMENT)}, false))), false)"
            )
        return predicate(raw)

    def codes_ok(self, code: str, codes: Iterable[str], member: Callable[[str], str]) -> str:
        """Return SQL that is true when the value, or each value of a multi field, is one of ``codes``.

        ``member`` builds the membership test of one value. For a multi field, one regular
        expression tests the whole text, because splitting it into a list took about 2.5 times as
        long. The pattern needs codes without the separator.
        """
        pattern = _multi_codes_pattern(codes) if self.item(code).multi else None
        if pattern is None:
            return self.elements_ok(code, member)
        return f"coalesce({_regex(self.raw(code), pattern)}, false)"

    def bad_elements(self, code: str, predicate: Callable[[str], str]) -> str:
        """SQL text listing the values of a multi field that fail ``predicate``."""
        raw = self.raw(code)
        return (
            f"array_to_string(list_filter(string_split({raw}, {_lit(MULTI_VALUE_SEPARATOR)}), "
            f"lambda {_ELEMENT}: NOT coalesce({predicate(_ELEMENT)}, false)), {_lit(MULTI_VALUE_SEPARATOR)})"
        )

    def base_steps(self, code: str, extra_pattern: str | None = None, extra_check: str | None = None,
                   base: bool = True) -> list[tuple[str, str]]:
        """Return (condition that holds for a good present value, SQL message) pairs of a format check."""
        item = self.item(code)
        label = f"{item.name}（{item.code}）"
        raw = self.raw(code)
        shown = self.shown(code, raw)
        steps: list[tuple[str, str]] = []
        if base:
            if item.type in ("text", "code") and item.length is not None:
                steps.append(
                    (
                        _length_within(raw, item.length),
                        f"{_lit(label + '的长度为 ')} || length({raw}) || "
                        f"{_lit(f' 个字符，超过上限 {item.length} 个字符。请缩短后重新报送。')}",
                    )
                )
            type_ok = self.type_valid(code)
            if type_ok is not None:
                steps.append((type_ok, self._type_message(item, label, shown)))
            if item.format is not None:
                if item.format.pattern is not None:
                    steps.append(self._pattern_step(item, label, shown, item.format.pattern))
                if item.format.check is not None:
                    steps.append(self._check_step(item, label, shown, item.format.check))
        if extra_pattern is not None:
            steps.append(self._pattern_step(item, label, shown, extra_pattern))
        if extra_check is not None:
            steps.append(self._check_step(item, label, shown, extra_check))
        return steps

    def _pattern_step(self, item: TemplateField, label: str, shown: str, pattern: str) -> tuple[str, str]:
        def matches(x: str) -> str:
            return _regex(x, pattern)

        condition = self.elements_ok(item.code, matches)
        if item.multi and item.code not in self.masked:
            quoted = f"{_lit('“')} || {self.bad_elements(item.code, matches)} || {_lit('”')}"
            message = f"{_lit(label + '中的值 ')} || {quoted} || {_lit(f'不符合格式要求（正则表达式 {pattern}）。请按格式更正。')}"
        else:
            message = f"{_lit(label + '“')} || {shown} || {_lit(f'”不符合格式要求（正则表达式 {pattern}）。请按格式更正。')}"
        return condition, message

    def _check_step(self, item: TemplateField, label: str, shown: str, check: str) -> tuple[str, str]:
        condition = self.elements_ok(item.code, lambda x: check_sql(check, x, self.udf))
        description = CHECKS[check].split("：", 1)[0]
        if item.multi:
            message = (
                f"{_lit(label + '“')} || {shown} || {_lit(f'”中有值未通过{description}检查（{CHECKS[check]}）。请逐个核对。')}"
            )
        else:
            message = (
                f"{_lit(label + '“')} || {shown} || {_lit(f'”未通过{description}检查：')} || "
                f"{_check_reason_sql(check, self.raw(item.code), self.udf)} || {_lit('。请核对后更正。')}"
            )
        return condition, message

    def _type_message(self, item: TemplateField, label: str, shown: str) -> str:
        raw = self.raw(item.code)
        prefix = _lit(label + "“") + f" || {shown} || "
        if item.type == "date":
            branches = [
                (_regex(raw, "[0-9]{8}"), "”不是有效的日历日期（如 2 月 30 日、13 月）。请填写真实日期，格式为 YYYYMMDD。"),
                (
                    _regex(raw, "[0-9]{4}[-/.年][0-9]{1,2}[-/.月][0-9]{1,2}日?"),
                    "”带有分隔符。日期须写成 8 位数字 YYYYMMDD，例如 20240131，请去掉分隔符。",
                ),
            ]
            default = "”不是 YYYYMMDD 格式的日期。请写成 8 位数字，例如 20240131。"
        else:
            if item.type == "integer":
                digits = min(item.length or 38, 38)
                scale = 0
                limit = f"至多 {digits} 位数字"
                example = "例如 30"
            else:
                precision, scale = item.precision or 38, item.scale or 0
                digits = max(precision - scale, 1)
                limit = f"整数部分至多 {digits} 位、小数至多 {scale} 位"
                example = "例如 1234567.89" if scale else "例如 1234567"
            plain = f"replace({raw}, ',', '')"
            branches = [
                (
                    _regex(raw, _THOUSANDS_PATTERN),
                    None,  # message built with the value without separators
                ),
                (f"contains({raw}, '%')", "”带有百分号。请去掉 %，按百分数的数值填报，例如 4.35 表示 4.35%。"),
                (_regex(raw, r"[+-]?[0-9]+\.[0-9]+"),
                 "”不是整数。该字段须填整数，不能有小数。" if item.type == "integer" or scale == 0
                 else f"”的小数超过 {scale} 位。请按规定保留至多 {scale} 位小数。"),
                (_regex(raw, r"[+-]?[0-9]+"), f"”的位数超过上限（{limit}）。请核对数值和单位。"),
                (_regex(raw, r"[+-]?\.[0-9]+|[+-]?[0-9]+\."), "”的小数点前后须有数字，例如写成 0.5，而不是 .5 或 5.。"),
                (_regex(raw, r"[+-]?[0-9]+(\.[0-9]+)?[eE][+-]?[0-9]+"), "”是科学计数法。请写成普通数字，不要用 E 表示。"),
            ]
            default = f"”不是有效的数值。请只填数字，可带负号和小数点（{limit}），{example}。"
            whens = []
            for condition, text in branches:
                if text is None:
                    separator_message = (
                        f"{_lit('”带有千位分隔符。数值不能带千位分隔符，请去掉逗号，写成“')} || {plain} || {_lit('”。')}"
                    )
                    whens.append(f"WHEN {condition} THEN {prefix}{separator_message}")
                else:
                    whens.append(f"WHEN {condition} THEN {prefix}{_lit(text)}")
            return f"CASE {' '.join(whens)} ELSE {prefix}{_lit(default)} END"
        whens = [f"WHEN {condition} THEN {prefix}{_lit(text)}" for condition, text in branches]
        return f"CASE {' '.join(whens)} ELSE {prefix}{_lit(default)} END"

    # display

    def mask_kind(self, code: str) -> str | None:
        if code not in self.masked:
            return None
        if code not in self._mask_kinds:
            self._mask_kinds[code] = mask_kind(self.template, code)
        return self._mask_kinds[code]

    def shown(self, code: str, expr: str | None = None) -> str:
        """Return the value as a report may show it: masked for personal data, clipped when long."""
        expr = expr or self.raw(code)
        kind = self.mask_kind(code)
        if kind is None:
            return f"coalesce({_clip_sql(expr)}, '')"
        return f"coalesce({mask_sql(kind, expr)}, '')"


def mask_sql(kind: str, expr: str) -> str:
    """Mask a personal value: IDs and cards keep the first 6 and last 4 characters, mobiles 3 and 4, names the surname."""
    if kind == "name":
        return f"CASE WHEN length({expr}) = 0 THEN '' ELSE left({expr}, 1) || repeat('*', greatest(length({expr}) - 1, 1)) END"
    head, tail = (3, 4) if kind == "mobile" else (6, 4)
    return (
        f"CASE WHEN length({expr}) > {head + tail} THEN left({expr}, {head}) || repeat('*', length({expr}) - {head + tail}) "
        f"|| right({expr}, {tail}) ELSE repeat('*', length({expr})) END"
    )


def mask_value(kind: str, value: str) -> str:
    """Python twin of :func:`mask_sql`, for the few reader findings."""
    if kind == "name":
        return value[:1] + "*" * max(len(value) - 1, 1) if value else ""
    head, tail = (3, 4) if kind == "mobile" else (6, 4)
    if len(value) > head + tail:
        return value[:head] + "*" * (len(value) - head - tail) + value[-tail:]
    return "*" * len(value)


def _masked_check_from_rules(template: Template, code: str) -> str | None:
    for rule in template.effective_rules():
        if isinstance(rule, FormatRule) and code in rule.fields and rule.check in MASKED_CHECKS:
            return rule.check
    return None


def masked_fields(template: Template) -> frozenset[str]:
    """Fields whose values are personal data: a resident ID, bank card or mobile check, or a personal name."""
    codes = set()
    for item in template.fields:
        check = item.format.check if item.format else None
        if check in MASKED_CHECKS or PERSONAL_NAME_MARKER in item.name:
            codes.add(item.code)
        elif _masked_check_from_rules(template, item.code):
            codes.add(item.code)
    return frozenset(codes)


def mask_kind(template: Template, code: str) -> str | None:
    """Return how :func:`mask_value` masks a field (resident_id, bank_card, mobile or name), or None when it is not personal."""
    if code not in masked_fields(template):
        return None
    item = template.field(code)
    check = item.format.check if item.format else None
    if check in MASKED_CHECKS:
        return check
    if PERSONAL_NAME_MARKER in item.name:
        return "name"
    return _masked_check_from_rules(template, code) or "resident_id"


# --- conditions and operands -------------------------------------------------------------------------


def _constant(item: TemplateField, value: Any) -> str:
    if item.type in ("integer", "decimal"):
        return _number_literal(value)
    if item.type == "date":
        return _date_literal(str(value))
    return _lit(str(value))


def _operand_sql(fields: _FieldSql, left: TemplateField, operand: Operand, context: ValidationContext) -> str:
    if operand.field is not None:
        return fields.typed(operand.field)
    if operand.value is not None:
        return _constant(left, operand.value)
    if operand.period is not None:
        day = context.period_start if operand.period == "start" else context.period_end
        return _date_literal(_period_text(day))
    return "(" + " + ".join(fields.typed(code) for code in operand.sum or ()) + ")"


def _when_sql(fields: _FieldSql, when: Any, context: ValidationContext) -> str:
    """SQL for a ``when`` clause over the typed view; NULL (an invalid value) counts as false by the caller."""
    if when is None:
        return "true"
    if isinstance(when, AllOf):
        return "(" + " AND ".join(_when_sql(fields, clause, context) for clause in when.all) + ")"
    if isinstance(when, AnyOf):
        return "(" + " OR ".join(_when_sql(fields, clause, context) for clause in when.any) + ")"
    assert isinstance(when, Condition)
    if when.op == "is_null":
        return fields.empty(when.field)
    if when.op == "not_null":
        return fields.present(when.field)
    item = fields.item(when.field)
    left = fields.typed(when.field)
    if when.op in ("in", "not_in"):
        values = ", ".join(_constant(item, value) for value in when.values or ())
        return f"({left} {'IN' if when.op == 'in' else 'NOT IN'} ({values}))"
    assert when.right is not None
    return f"({left} {when.op} {_operand_sql(fields, item, when.right, context)})"


def _when_true(fields: _FieldSql, when: Any, context: ValidationContext) -> str:
    return f"coalesce({_when_sql(fields, when, context)}, false)"


def _comparison_sql(left: str, op: str, right: str, tolerance: Decimal | None) -> str:
    if tolerance is None or tolerance == 0:
        sql_op = "<>" if op == "!=" else op
        return f"({left} {sql_op} {right})"
    tol = _number_literal(tolerance)
    return {
        "=": f"(abs({left} - {right}) <= {tol})",
        "!=": f"(abs({left} - {right}) > {tol})",
        ">": f"({left} > {right} - {tol})",
        ">=": f"({left} >= {right} - {tol})",
        "<": f"({left} < {right} + {tol})",
        "<=": f"({left} <= {right} + {tol})",
    }[op]


# --- row checks ----------------------------------------------------------------------------------------


@dataclass
class _RowCheck:
    """One rule applied to one field, evaluated for every row in the single scan."""

    rule: Any
    field: TemplateField
    fail: str
    """SQL boolean over the typed view: true when the row fails (never NULL)."""
    message: str
    """SQL text over the typed view of the failing rows."""
    value: str
    """SQL text: the value shown in the report."""
    order: int


def _row_checks(template: Template, fields: _FieldSql, context: ValidationContext,
                skipped: list[SkippedRule]) -> list[_RowCheck]:
    checks: list[_RowCheck] = []
    order = 0

    def add(rule: Any, item: TemplateField, fail: str, message: str, value: str | None = None) -> None:
        nonlocal order
        checks.append(_RowCheck(rule, item, fail, message, value or fields.shown(item.code), order))
        order += 1

    institution = template.institution_field
    if institution is not None:
        pseudo = _PseudoRule(
            f"{INSTITUTION_RULE_PREFIX}{institution.code}", f"{institution.name}须为本机构的{institution.name}",
            INSTITUTION_RULE_KIND, "error",
        )
        identifiers = sorted(context.institution_identifiers)
        if identifiers:
            allowed = ", ".join(_lit(value) for value in identifiers)
            own = "、".join(identifiers)
            add(
                pseudo,
                institution,
                f"({fields.present(institution.code)} AND {fields.raw(institution.code)} NOT IN ({allowed}))",
                f"{_lit(f'{institution.name}（{institution.code}）为“')} || {fields.shown(institution.code)} || "
                f"{_lit(f'”，不是本机构的{institution.name}（{own}）：该行是其他机构的数据。请删除该行，或确认上传的是本机构的文件。')}",
            )
        else:
            skipped.append(SkippedRule(pseudo.id, pseudo.name, pseudo.kind, f"未提供本机构的{institution.name}，机构归属检查未执行"))

    for rule in template.effective_rules():
        if isinstance(rule, NotNullRule):
            when = _when_true(fields, rule.when, context)
            for code in rule.fields:
                item = fields.item(code)
                text = f"{item.name}（{item.code}）为空。规则“{rule.name}”要求填报该项，请补充后重新报送。"
                if rule.severity == "warning":
                    text += _WARNING_HINT
                add(rule, item, f"({fields.empty(code)} AND {when})", _lit(text))
        elif isinstance(rule, CodeListRule):
            when = _when_true(fields, rule.when, context)
            for code in rule.fields:
                item = fields.item(code)
                if rule.code_list is not None:
                    codes = template.code_list(rule.code_list).codes
                    list_name = f"代码表“{rule.code_list}”"
                else:
                    codes = template.allowed_codes(code) or {}
                    list_name = f"代码表“{item.code_list}”" if item.code_list else "报表项目列表"
                allowed = ", ".join(_lit(value) for value in codes)
                listed = "、".join(f"{key} {label}" for key, label in list(codes.items())[:CODES_LISTED])
                if len(codes) > CODES_LISTED:
                    listed += f" 等 {len(codes)} 个"
                def member(x: str, allowed: str = allowed) -> str:
                    return f"({x} IN ({allowed}))"

                good = fields.codes_ok(code, codes, member)
                label = f"{item.name}（{item.code}）"
                if item.multi and code not in fields.masked:
                    bad_values = fields.bad_elements(code, member)
                    message = (
                        f"{_lit(label + '“')} || {fields.shown(code)} || {_lit('”中的值“')} || {bad_values} || "
                        f"{_lit(f'”不在{list_name}中（多个值用半角分号;分隔，不能有空值）。可选代码：{listed}。请改为代码表中的代码。')}"
                    )
                else:
                    message = (
                        f"{_lit(label + '的值“')} || {fields.shown(code)} || "
                        f"{_lit(f'”不在{list_name}中。可选代码：{listed}。请改为代码表中的代码。')}"
                    )
                if rule.severity == "warning":
                    message += f" || {_lit(_WARNING_HINT)}"
                add(rule, item, f"({fields.present(code)} AND NOT {good} AND {when})", message)
        elif isinstance(rule, FormatRule):
            when = _when_true(fields, rule.when, context)
            base = rule.pattern is None and rule.check is None
            for code in rule.fields:
                item = fields.item(code)
                steps = fields.base_steps(code, rule.pattern, rule.check, base=base)
                if not steps:
                    continue
                if not base:
                    # The rule's extra pattern or check applies to values of a valid type only.
                    type_ok = fields.type_valid(code)
                    if type_ok is not None:
                        steps = [(type_ok, "''"), *steps]
                        first_is_guard = True
                    else:
                        first_is_guard = False
                else:
                    first_is_guard = False
                conditions = [condition for condition, _message in steps]
                if first_is_guard:
                    fail = f"({fields.present(code)} AND {when} AND {conditions[0]} AND NOT ({' AND '.join(conditions[1:])}))"
                    steps = steps[1:]
                else:
                    fail = f"({fields.present(code)} AND {when} AND NOT ({' AND '.join(conditions)}))"
                message = "CASE " + " ".join(f"WHEN NOT ({c}) THEN {m}" for c, m in steps) + " ELSE '' END"
                if rule.severity == "warning":
                    message = f"({message}) || {_lit(_WARNING_HINT)}"
                add(rule, item, fail, message)
        elif isinstance(rule, CompareRule):
            item = fields.item(rule.left)
            when = _when_true(fields, rule.when, context)
            left = fields.typed(rule.left)
            label = f"{item.name}（{item.code}）"
            if rule.op in ("in", "not_in"):
                values = ", ".join(_constant(item, value) for value in rule.values or ())
                condition = f"({left} {'IN' if rule.op == 'in' else 'NOT IN'} ({values}))"
                listed = "、".join(str(value) for value in rule.values or ())
                verb = "应为" if rule.op == "in" else "不应为"
                message = (
                    f"{_lit(label + '为“')} || {fields.shown(rule.left)} || "
                    f"{_lit(f'”，按规则“{rule.name}”{verb} {listed} 之一。请核对后更正。')}"
                )
            else:
                assert rule.right is not None
                right = _operand_sql(fields, item, rule.right, context)
                condition = _comparison_sql(left, rule.op, right, rule.tolerance)
                right_label, right_shown = _operand_display(fields, rule.right, context, right)
                tolerance = f"（允许误差 {rule.tolerance}）" if rule.tolerance else ""
                message = (
                    f"{_lit(label + '为“')} || {fields.shown(rule.left)} || {_lit('”，' + right_label + '为“')} || "
                    f"{right_shown} || {_lit(f'”，不满足规则“{rule.name}”：{item.name}应{_OP_NAMES[rule.op]}{right_label}{tolerance}。请核对后更正。')}"
                )
            if rule.severity == "warning":
                message += f" || {_lit(_WARNING_HINT)}"
            # NULL (an empty or invalid operand) is not a failure: the format rule reports it.
            fail = _date_text_fail(fields, rule, context) or f"coalesce(NOT {condition}, false)"
            add(rule, item, f"({fail} AND {when})", message)
    return checks


def _date_text_fail(fields: _FieldSql, rule: CompareRule, context: ValidationContext) -> str | None:
    """Return SQL that is true when a date comparison fails, comparing the YYYYMMDD text first.

    Valid dates are exactly the values matching ``[0-9]{8}`` that parse, and such texts sort like
    the dates they name. So the text comparison decides for valid operands. DuckDB evaluates a
    later term of a conjunction only on the rows that passed the earlier ones, so the costlier
    parse (the typed value) runs on the few rows whose text comparison fails. Returns None for
    comparisons this does not cover.
    """
    if fields.item(rule.left).type != "date" or rule.op in ("in", "not_in") or rule.tolerance:
        return None
    operand = rule.right
    assert operand is not None
    if operand.field is not None and fields.item(operand.field).type == "date":
        right_text, right_valid = fields.raw(operand.field), fields.type_valid(operand.field)
    elif operand.period is not None:
        day = context.period_start if operand.period == "start" else context.period_end
        right_text, right_valid = _lit(_period_text(day)), "true"
    else:
        return None
    text_holds = _comparison_sql(fields.raw(rule.left), rule.op, right_text, None)
    return f"(NOT {text_holds} AND {fields.type_valid(rule.left)} AND {right_valid})"


def _operand_display(fields: _FieldSql, operand: Operand, context: ValidationContext, sql: str) -> tuple[str, str]:
    if operand.field is not None:
        item = fields.item(operand.field)
        return f"{item.name}（{item.code}）", fields.shown(operand.field)
    if operand.value is not None:
        return "规定值", _lit(str(operand.value))
    if operand.period is not None:
        day = context.period_start if operand.period == "start" else context.period_end
        return ("本期期初日期" if operand.period == "start" else "本期期末日期"), _lit(_period_text(day))
    names = "与".join(f"{fields.item(code).name}" for code in operand.sum or ())
    return f"{names}之和", f"CAST({sql} AS VARCHAR)"


# --- the run ------------------------------------------------------------------------------------------


_FINDINGS_TABLE = """
CREATE TABLE findings (
    line BIGINT, field_code VARCHAR, field_name VARCHAR, value VARCHAR, rule_id VARCHAR,
    rule_name VARCHAR, rule_kind VARCHAR, severity VARCHAR, explained BOOLEAN, message VARCHAR,
    sort_rule INTEGER, sort_field INTEGER
)
"""


@functools.lru_cache(maxsize=1)
def _default_catalog() -> TemplateCatalog:
    return TemplateCatalog.load()


class _Run:
    def __init__(
        self,
        staged: StagedFile,
        template: Template,
        context: ValidationContext,
        work_dir: Path,
        catalog: TemplateCatalog | None,
    ) -> None:
        self.staged = staged
        self.template = template
        self.context = context
        self.work_dir = work_dir
        self._catalog = catalog
        self.fields = _FieldSql(template, masked_fields(template))
        self.skipped: list[SkippedRule] = []
        self.rule_order = {rule.id: index for index, rule in enumerate(template.effective_rules())}
        self.field_order = {item.code: index for index, item in enumerate(template.fields)}
        self.period = _period_text(context.period_end)
        self.con: duckdb.DuckDBPyConnection | None = None
        self._local = threading.local()  # the cursor of a step running in a worker thread
        self._cursors: list[duckdb.DuckDBPyConnection] = []

    @property
    def catalog(self) -> TemplateCatalog:
        if self._catalog is None:
            self._catalog = _default_catalog()
        return self._catalog

    # setup

    def _open(self) -> duckdb.DuckDBPyConnection:
        temp_dir = self.work_dir / "duckdb-tmp"
        temp_dir.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(":memory:")
        duckdb_bytes = int(memory_bytes(self.context.memory_limit) * DUCKDB_MEMORY_SHARE)
        con.execute(f"SET memory_limit = '{duckdb_bytes}B'")
        con.execute(f"SET temp_directory = {_lit(str(temp_dir))}")
        con.execute("SET preserve_insertion_order = false")
        if self.context.threads is not None:
            con.execute(f"SET threads = {int(self.context.threads)}")
        con.execute(_FINDINGS_TABLE)
        self.con = con
        return con

    def connect(self) -> duckdb.DuckDBPyConnection:
        con = self._open()
        con.execute(
            f"CREATE VIEW typed AS {self.fields.typed_select(f'read_parquet({_lit(str(self.staged.path))})')}"
        )
        return con

    def connection(self) -> duckdb.DuckDBPyConnection:
        """Return the connection of the calling thread: a worker's own cursor, else the main connection."""
        cursor = getattr(self._local, "con", None)
        if cursor is not None:
            return cursor
        assert self.con is not None
        return self.con

    def in_cursor(self, step: Callable[[], Any]) -> Callable[[], Any]:
        """Wrap ``step`` to run on a cursor of its own, so it can run beside the other steps."""

        def run_step() -> Any:
            assert self.con is not None
            # A cursor is a new connection to the same database, so it can use the tables, views
            # and Python functions that the main connection created.
            cursor = self.con.cursor()
            self._cursors.append(cursor)
            self._local.con = cursor
            try:
                return step()
            finally:
                self._local.con = None

        run_step.__name__ = step.__name__
        return run_step

    def close(self) -> None:
        for cursor in self._cursors:
            cursor.close()
        if self.con is not None:
            self.con.close()

    def sql(self, statement: str) -> None:
        self.connection().execute(statement)

    def fetch(self, statement: str) -> list[tuple]:
        return self.connection().sql(statement).fetchall()

    def explained_sql(self, severity: str) -> str:
        remark = self.template.remark_field
        if severity != "warning" or remark is None:
            return "false"
        return self.fields.present(remark.code)

    def _insert(self, select_rows: str, rule: Any, item: TemplateField | None, value: str, message: str,
                line: str = LINE_COLUMN, sort_rule: int | None = None) -> str:
        code = item.code if item else None
        name = item.name if item else None
        return (
            f"SELECT {_q(line) if line == LINE_COLUMN else line} AS line, "
            f"{_lit(code) if code else 'NULL'}, {_lit(name) if name else 'NULL'}, {value}, "
            f"{_lit(rule.id)}, {_lit(rule.name)}, {_lit(rule.kind)}, {_lit(rule.severity)}, "
            f"{self.explained_sql(rule.severity)}, {message}, "
            f"{sort_rule if sort_rule is not None else self.rule_order.get(rule.id, -1)}, "
            f"{self.field_order.get(code, -1) if code else -1} "
            f"FROM {select_rows}"
        )

    # steps

    def row_checks(self) -> None:
        checks = _row_checks(self.template, self.fields, self.context, self.skipped)
        if not checks:
            return
        self.collect_bad_rows(checks)
        self.insert_row_findings(checks)

    def collect_bad_rows(self, checks: Sequence[_RowCheck]) -> None:
        """Keep the rows that fail at least one row check, with the raw text of every field, in table ``bad``."""
        raw_columns = ", ".join([_q(LINE_COLUMN), *(_q(item.code) for item in self.template.fields)])
        # One scan keeps the rows that fail any check, with the checks evaluated once in the filter.
        # Flags computed in a projection below the filter ran twice, because DuckDB copied them into the pushed-down filter.
        any_failure = " OR ".join(check.fail for check in checks)
        self.sql(f"CREATE TABLE bad AS SELECT {raw_columns} FROM typed WHERE {any_failure}")

    def insert_row_findings(self, checks: Sequence[_RowCheck]) -> None:
        # The failing rows are few. One pass over them stores which checks failed, with the typed
        # values, so that each check's findings are a plain filter on its flag.
        flags = ", ".join(f"{check.fail} AS {_q(f'__fail_{index}')}" for index, check in enumerate(checks))
        self.sql(f"CREATE TABLE bad_typed AS SELECT *, {flags} FROM ({self.fields.typed_select('bad')})")
        self.insert_flagged_findings(checks, "bad_typed", lambda index: _q(f"__fail_{index}"))

    def insert_flagged_findings(self, checks: Sequence[_RowCheck], relation: str, flag: Callable[[int], str],
                                indexes: Iterable[int] | None = None) -> None:
        """Insert the findings of the checks (those at ``indexes``) from the rows of ``relation`` where ``flag(index)`` is true."""
        parts = []
        for index in range(len(checks)) if indexes is None else indexes:
            check = checks[index]
            parts.append(
                self._insert(
                    f"{relation} WHERE {flag(index)}", check.rule, check.field, check.value, check.message,
                    sort_rule=self.rule_order.get(check.rule.id, -1),
                )
            )
        if parts:
            self.sql("INSERT INTO findings " + " UNION ALL ".join(parts))

    def unique_checks(self) -> None:
        for number, rule in enumerate(self.template.effective_rules()):
            if not isinstance(rule, UniqueRule):
                continue
            if rule.scope == "history":
                self._history_unique(rule, number)
            else:
                self._file_unique(rule, number)

    def _key_description(self, codes: Sequence[str]) -> tuple[str, str]:
        """Chinese names of key fields and the SQL showing their values."""
        names = "、".join(self.fields.item(code).name for code in codes)
        shown = " || '，' || ".join(self.fields.shown(code) for code in codes)
        return names, shown

    def _file_unique(self, rule: UniqueRule, number: int) -> None:
        keys = [_q(code) for code in rule.fields]
        present = " AND ".join(self.fields.present(code) for code in rule.fields)
        when = _when_true(self.fields, rule.when, self.context)
        table = _q(f"dup_{number}")
        self.sql(
            f"CREATE TABLE {table} AS SELECT {', '.join(keys)}, count(*) AS __n, min({_q(LINE_COLUMN)}) AS __first "
            f"FROM typed WHERE {present} AND {when} GROUP BY ALL HAVING count(*) > 1"
        )
        join = " AND ".join(f"t.{key} = d.{key}" for key in keys)
        names, shown = self._key_description(rule.fields)
        item = self.fields.item(rule.fields[-1])
        message = (
            f"{_lit(names + '为“')} || {shown} || {_lit('”的记录在文件中出现 ')} || __n || "
            f"{_lit(' 次（首次在第 ')} || __first || {_lit(f' 行），按规则“{rule.name}”应唯一。请删除重复行或更正后重新报送。')}"
        )
        if rule.severity == "warning":
            message += f" || {_lit(_WARNING_HINT)}"
        rows = (
            f"(SELECT t.*, d.__n, d.__first FROM typed t JOIN {table} d ON {join} WHERE {when})"
        )
        self.sql("INSERT INTO findings " + self._insert(rows, rule, item, self.fields.shown(item.code), message))

    def _warehouse_relation(self, code: str, columns: Iterable[str], where: str | None) -> str | None:
        paths = [Path(path) for path in self.context.warehouse.get(code, ())]
        if not paths:
            return None
        cols = ", ".join(_q(column) for column in columns)
        condition = f" WHERE {where}" if where else ""
        return f"SELECT {cols} FROM read_parquet({_path_list(paths)}, union_by_name = true){condition}"

    def _history_unique(self, rule: UniqueRule, number: int) -> None:
        relation = self._warehouse_relation(self.template.code, rule.fields, f"{_q('_period')} < {_lit(self.period)}")
        count = 0
        table = _q(f"hist_{number}")
        if relation is not None:
            present = " AND ".join(f"coalesce({_q(code)}, '') <> ''" for code in rule.fields)
            self.sql(f"CREATE VIEW {table} AS SELECT * FROM ({relation}) WHERE {present}")
            count = len(self.fetch(f"SELECT 1 FROM {table} LIMIT 1"))
        if count == 0:
            self.skip(rule, f"未找到{self.template.name}以前期次已接受的数据，跨期唯一性检查未执行")
            return
        keys = [_q(code) for code in rule.fields]
        present = " AND ".join(self.fields.present(code) for code in rule.fields)
        when = _when_true(self.fields, rule.when, self.context)
        join = " AND ".join(f"t.{key} = h.{key}" for key in keys)
        names, shown = self._key_description(rule.fields)
        item = self.fields.item(rule.fields[-1])
        message = (
            f"{_lit(names + '为“')} || {shown} || "
            f"{_lit(f'”的记录已出现在以前期次已接受的数据中，按规则“{rule.name}”不应重复。请核对是否重复报送或编号有误。')}"
        )
        if rule.severity == "warning":
            message += f" || {_lit(_WARNING_HINT)}"
        rows = f"(SELECT t.* FROM typed t SEMI JOIN {table} h ON {join} WHERE {present} AND {when})"
        self.sql("INSERT INTO findings " + self._insert(rows, rule, item, self.fields.shown(item.code), message))

    def reference_checks(self) -> None:
        for number, rule in enumerate(self.template.effective_rules()):
            if isinstance(rule, ReferenceRule):
                self._reference(rule, number)

    def _reference(self, rule: ReferenceRule, number: int) -> None:
        target_code = rule.target.template
        target_name = self._template_name(target_code, rule.target.version)
        aliases = [f"k{index}" for index in range(len(rule.fields))]
        select = ", ".join(f"{_q(column)} AS {alias}" for column, alias in zip(rule.target.fields, aliases))
        sources = []
        if rule.source in ("batch", "batch_or_warehouse") and target_code in self.context.batch:
            sources.append(f"SELECT {select} FROM read_parquet({_lit(str(self.context.batch[target_code]))})")
        if rule.source in ("warehouse", "batch_or_warehouse"):
            where = f"{_q('_period')} = {_lit(self.period)}" if rule.period == "same" else None
            relation = self._warehouse_relation(target_code, [*rule.target.fields, "_period"], where)
            if relation is not None:
                sources.append(f"SELECT {select} FROM ({relation})")
        table = _q(f"ref_{number}")
        multi = len(rule.fields) == 1 and self.fields.item(rule.fields[0]).multi
        if sources:
            present = " AND ".join(f"coalesce({alias}, '') <> ''" for alias in aliases)
            # A view, not a table: the anti-join below builds its hash table from it once.
            self.sql(f"CREATE VIEW {table} AS SELECT * FROM ({' UNION ALL '.join(sources)}) WHERE {present}")
        else:
            # Neither the batch nor the accepted data has the target table, so no referenced record
            # exists: every row that names one fails, and its message requests the target table.
            empty = ", ".join(f"NULL::VARCHAR AS {alias}" for alias in aliases)
            self.sql(f"CREATE VIEW {table} AS SELECT {empty} WHERE false")
        present = " AND ".join(self.fields.present(code) for code in rule.fields)
        when = _when_true(self.fields, rule.when, self.context)
        institution = self.template.institution_field
        shown_codes = [code for code in rule.fields if institution is None or code != institution.code] or list(rule.fields)
        item = self.fields.item(shown_codes[0])
        names = "、".join(self.fields.item(code).name for code in shown_codes)
        if multi:
            code = rule.fields[0]
            missing = _q(f"missing_{number}")
            self.sql(
                f"CREATE TABLE {missing} AS SELECT {_q(LINE_COLUMN)} AS __line, string_agg(e, ';') AS __missing "
                f"FROM (SELECT {_q(LINE_COLUMN)}, unnest(string_split({_q(code)}, ';')) AS e FROM typed "
                f"WHERE {present} AND {when}) AS s ANTI JOIN {table} r ON r.k0 = s.e GROUP BY ALL"
            )
            rows = f"(SELECT t.*, m.__missing FROM typed t JOIN {missing} m ON t.{_q(LINE_COLUMN)} = m.__line)"
            missing_shown = "__missing" if code not in self.fields.masked else "'（已遮蔽）'"
            message = (
                f"{_lit(f'{item.name}（{item.code}）中的值“')} || {missing_shown} || "
                f"{_lit(f'”在{target_name}（{target_code}）中不存在。请核对{names}，或一并报送包含这些记录的{target_name}。')}"
            )
        else:
            join = " AND ".join(f"r.{alias} = t.{_q(code)}" for alias, code in zip(aliases, rule.fields))
            rows = f"(SELECT t.* FROM typed t ANTI JOIN {table} r ON {join} WHERE {present} AND {when})"
            _names, shown = self._key_description(shown_codes)
            message = (
                f"{_lit(names + '“')} || {shown} || "
                f"{_lit(f'”在{target_name}（{target_code}）中不存在，不满足规则“{rule.name}”。请核对{names}，或一并报送包含该记录的{target_name}。')}"
            )
        if rule.severity == "warning":
            message += f" || {_lit(_WARNING_HINT)}"
        self.sql("INSERT INTO findings " + self._insert(rows, rule, item, self.fields.shown(item.code), message))

    def _template_name(self, code: str, version: int | None = None) -> str:
        if code == self.template.code:
            return self.template.name
        try:
            return self.catalog.get(code, version).name
        except RegsandboxError:
            return code

    # aggregates: reconcile and fluctuation

    def aggregate_checks(self) -> None:
        rules = [rule for rule in self.template.effective_rules() if isinstance(rule, (ReconcileRule, FluctuationRule))]
        if not rules:
            return
        expressions = []
        for index, rule in enumerate(rules):
            measure = rule.left if isinstance(rule, ReconcileRule) else rule.measure
            value, invalid = self._aggregate_sql(self.fields, measure)
            expressions.append(f"{value} AS a{index}, {invalid} AS i{index}")
        row = self.fetch(f"SELECT {', '.join(expressions)} FROM typed")[0]
        for index, rule in enumerate(rules):
            current, invalid = row[2 * index], row[2 * index + 1]
            measure = rule.left if isinstance(rule, ReconcileRule) else rule.measure
            if invalid:
                item = self.fields.item(measure.field) if measure.field else None
                name = f"{item.name}（{item.code}）" if item else "数值"
                self.skip(rule, f"有 {invalid} 行的{name}不是有效数值，汇总不可靠，本规则未执行；请先更正这些格式错误")
                continue
            current = Decimal(current or 0)
            if isinstance(rule, ReconcileRule):
                self._reconcile(rule, current)
            else:
                self._fluctuation(rule, current)

    def _aggregate_sql(self, fields: _FieldSql, measure: Any, context: ValidationContext | None = None) -> tuple[str, str]:
        """SQL for an aggregate (value) and for the count of included rows whose value is not a valid number."""
        when = _when_true(fields, measure.when, context or self.context)
        if measure.function == "count":
            return f"count(*) FILTER (WHERE {when})", "0"
        typed = fields.typed(measure.field)
        value = f"coalesce(sum({typed}) FILTER (WHERE {when}), 0)"
        invalid = f"count(*) FILTER (WHERE {when} AND {fields.present(measure.field)} AND {typed} IS NULL)"
        return value, invalid

    def _reconcile(self, rule: ReconcileRule, left: Decimal) -> None:
        target_code = rule.right.template
        try:
            target = self.template if target_code == self.template.code else self.catalog.get(target_code, rule.right.version)
        except RegsandboxError:
            self.skip(rule, f"未找到报表模板 {target_code}，跨表核对未执行")
            return
        relation, where_label = self._same_period_relation(target, rule.source)
        if relation is None:
            self.skip(rule, f"未找到同期 {target.code} 报表（{target.name}），跨表核对未执行")
            return
        target_fields = _FieldSql(target)
        source = f"({target_fields.typed_select(f'({relation})')})"
        if rule.right.aggregate is not None:
            value, invalid = self._aggregate_sql(target_fields, rule.right.aggregate)
            result = self.fetch(f"SELECT {value}, {invalid}, count(*) FROM {source}")[0]
            if result[1]:
                self.skip(rule, f"{where_label}{target.name}有 {result[1]} 行数值格式不正确，跨表核对未执行")
                return
            right_value = Decimal(result[0] or 0)
            right_label = f"{target.name}（{target.code}）的汇总值"
        else:
            line_field = target.line_field
            column = rule.right.column
            assert line_field is not None and column is not None
            result = self.fetch(
                f"SELECT count(*), count({target_fields.typed(column)}), sum({target_fields.typed(column)}) "
                f"FROM {source} WHERE {_q(line_field)} = {_lit(rule.right.line or '')}"
            )[0]
            line_name = next((line.name for line in target.lines if line.code == rule.right.line), "")
            column_name = target.field(column).name
            place = f"{target.code} 项目 {rule.right.line}（{line_name}）的{column_name}"
            if result[0] == 0:
                self.skip(rule, f"{where_label}{target.code} 报表中没有项目 {rule.right.line}（{line_name}），跨表核对未执行")
                return
            if result[0] > 1 or result[1] != 1:
                self.skip(rule, f"{where_label}{place}出现多次或不是有效数值，跨表核对未执行")
                return
            right_value = Decimal(result[2])
            right_label = place
        factor = rule.right.factor
        scaled = right_value * factor
        difference = left - scaled
        tolerance = _tolerance(rule, scaled)
        ok = {
            "=": abs(difference) <= tolerance,
            "<=": difference <= tolerance,
            ">=": difference >= -tolerance,
        }[rule.op]
        if ok:
            return
        left_label = self._measure_label(rule.left)
        factor_text = "" if factor == 1 else f"，乘以 {_plain(factor)} 后为 {_plain(scaled)}"
        message = (
            f"{left_label}为 {_plain(left)}，{where_label}{right_label}为 {_plain(right_value)}{factor_text}；"
            f"差额 {_plain(difference)}，不满足规则“{rule.name}”（应{_OP_NAMES[rule.op]}，允许误差 {_plain(tolerance)}）。"
            f"请核对两张报表的数据后更正。"
        )
        if rule.severity == "warning":
            message += "如差异属实，请在报送说明中解释原因。"
        self._file_finding(rule, rule.left.field, message)

    def _same_period_relation(self, target: Template, source: str) -> tuple[str | None, str]:
        if target.code == self.template.code:
            return f"SELECT * FROM read_parquet({_lit(str(self.staged.path))})", "本文件中的"
        if source in ("batch", "batch_or_warehouse") and target.code in self.context.batch:
            return f"SELECT * FROM read_parquet({_lit(str(self.context.batch[target.code]))})", "本批次的"
        if source in ("warehouse", "batch_or_warehouse"):
            relation = self._warehouse_relation(
                target.code, [item.code for item in target.fields], f"{_q('_period')} = {_lit(self.period)}"
            )
            if relation is not None and self.fetch(f"SELECT count(*) FROM ({relation})")[0][0] > 0:
                return relation, "已接受的同期"
        return None, ""

    def _fluctuation(self, rule: FluctuationRule, current: Decimal) -> None:
        if rule.baseline == "previous_period":
            baseline_day = self.context.period_start - timedelta(days=1)
            baseline_name = "上期"
        else:
            baseline_day = _year_before(self.context.period_end)
            baseline_name = "上年同期"
        baseline_text = _period_text(baseline_day)
        relation = self._warehouse_relation(
            self.template.code, [item.code for item in self.template.fields],
            f"{_q('_period')} = {_lit(baseline_text)}",
        )
        rows = 0
        baseline = Decimal(0)
        if relation is not None:
            value, _invalid = self._aggregate_sql(self.fields, rule.measure)
            rows, result = self.fetch(f"SELECT count(*), {value} FROM ({self.fields.typed_select(f'({relation})')})")[0]
            baseline = Decimal(result or 0)
        if rows == 0:
            self.skip(rule, f"未找到{baseline_name}（{baseline_text}）已接受的{self.template.name}数据，波动检查未执行")
            return
        if baseline == 0 or (rule.min_baseline is not None and abs(baseline) < rule.min_baseline):
            self.skip(rule, f"{baseline_name}（{baseline_text}）的基数为 {_plain(baseline)}，过小，波动检查未执行")
            return
        change = (current - baseline) / abs(baseline)
        flagged = {
            "both": abs(change) > rule.threshold,
            "increase": change > rule.threshold,
            "decrease": -change > rule.threshold,
        }[rule.direction]
        if not flagged:
            return
        label = self._measure_label(rule.measure)
        message = (
            f"{label}本期为 {_plain(current)}，{baseline_name}（{baseline_text}）为 {_plain(baseline)}，"
            f"变动 {change * 100:+.2f}%，超过规则“{rule.name}”允许的 {_plain(rule.threshold * 100)}%。"
            f"请核对本期数据是否完整、准确；如变动属实，请在报送说明中解释原因。"
        )
        self._file_finding(rule, rule.measure.field, message)

    def _measure_label(self, measure: Any) -> str:
        if measure.function == "count":
            return "本文件符合条件的记录数"
        item = self.fields.item(measure.field)
        return f"本文件符合条件的{item.name}（{item.code}）合计"

    def _file_finding(self, rule: Any, code: str | None, message: str) -> None:
        item = self.fields.item(code) if code else None
        self.sql(
            "INSERT INTO findings VALUES (NULL, "
            f"{_lit(item.code) if item else 'NULL'}, {_lit(item.name) if item else 'NULL'}, NULL, "
            f"{_lit(rule.id)}, {_lit(rule.name)}, {_lit(rule.kind)}, {_lit(rule.severity)}, false, {_lit(message)}, "
            f"{self.rule_order.get(rule.id, -1)}, -1)"
        )

    def reader_findings(self) -> None:
        findings = list(self.staged.findings)
        if not findings:
            return
        lines, codes, names, values, rule_ids, messages, field_sort = [], [], [], [], [], [], []
        for finding in findings:
            value, message = finding.value, finding.message
            if self.template.has_field(finding.column) and finding.column in self.fields.masked:
                kind = self.fields.mask_kind(finding.column) or "resident_id"
                masked = mask_value(kind, value)
                message = message.replace(value, masked) if value else message
                value = masked
            lines.append(finding.line)
            codes.append(finding.column)
            names.append(finding.column_name)
            values.append(value)
            rule_ids.append(finding.code)
            messages.append(message)
            field_sort.append(self.field_order.get(finding.column, -1))
        if self.staged.findings_omitted:
            lines.append(None)
            codes.append(None)
            names.append(None)
            values.append(None)
            rule_ids.append("READER-FINDINGS-OMITTED")
            messages.append(f"另有 {self.staged.findings_omitted} 个同类单元格问题未逐条列出，请按上述说明检查整列后重新报送。")
            field_sort.append(-1)
        count = len(lines)
        table = pa.table(
            {
                "line": pa.array(lines, pa.int64()),
                "field_code": pa.array(codes, pa.string()),
                "field_name": pa.array(names, pa.string()),
                "value": pa.array(values, pa.string()),
                "rule_id": pa.array(rule_ids, pa.string()),
                "rule_name": pa.array(["读取文件时发现的单元格问题"] * count, pa.string()),
                "rule_kind": pa.array([READER_RULE_KIND] * count, pa.string()),
                "severity": pa.array(["error"] * count, pa.string()),
                "explained": pa.array([False] * count, pa.bool_()),
                "message": pa.array(messages, pa.string()),
                "sort_rule": pa.array([-2] * count, pa.int32()),
                "sort_field": pa.array(field_sort, pa.int32()),
            }
        )
        con = self.connection()
        con.register("reader_findings", table)
        self.sql("INSERT INTO findings SELECT * FROM reader_findings")
        con.unregister("reader_findings")

    def field_counts(self) -> dict[str, int]:
        """Count the non-empty values of every field in one aggregate scan of the staging file."""
        codes = [item.code for item in self.template.fields]
        counts = ", ".join(f"count_if({self.fields.present(code)})" for code in codes)
        row = self.fetch(f"SELECT {counts} FROM read_parquet({_lit(str(self.staged.path))})")[0]
        return {code: int(value or 0) for code, value in zip(codes, row, strict=True)}

    def skip(self, rule: Any, reason: str) -> None:
        self.skipped.append(SkippedRule(rule.id, rule.name, rule.kind, reason))

    def write(self) -> tuple[Path, dict[str, int], int, dict[str, int]]:
        target = self.work_dir / f"findings-{uuid.uuid4().hex}.parquet"
        with atomic_path(target) as temp_path:
            self.sql("SET preserve_insertion_order = true")
            self.sql(
                "COPY (SELECT line, field_code, field_name, value, rule_id, rule_name, rule_kind, severity, explained, "
                "message FROM findings ORDER BY line NULLS FIRST, sort_rule, sort_field) "
                f"TO {_lit(str(temp_path))} (FORMAT parquet, COMPRESSION zstd)"
            )
        counts = {"error": 0, "warning": 0}
        explained = 0
        rule_counts: dict[str, int] = {}
        for rule_id, severity, is_explained, number in self.fetch(
            "SELECT rule_id, severity, explained, count(*) FROM findings GROUP BY ALL ORDER BY rule_id"
        ):
            counts[severity] = counts.get(severity, 0) + number
            rule_counts[rule_id] = rule_counts.get(rule_id, 0) + number
            if severity == "warning" and is_explained:
                explained += number
        return target, counts, explained, rule_counts


class _DirectTextRejected(Exception):
    """Internal: DuckDB's reading of the text differs from the parser's; the file must be staged."""


_MASK_BITS = 62
"""Flags per BIGINT column of the direct scan's bit columns (non-empty fields, failed checks)."""
_UNIT_SEPARATOR = "chr(31)"
"""Separator of the raw fields of a failing row in the direct scan. The byte screen of
:func:`intake.reader.direct_text` rules out every control character but LF and CR, so no value contains it."""
MIN_ROWS_PER_PART = 50_000
"""Data lines per part of the direct scan below which fewer parts (and threads) are used."""
SKIP_COST_SHARE = 0.1
"""Cost of skipping a line, as a share of the cost of scanning it, for sizing the parts of the direct scan.

A part reads and discards the lines before its first one (``read_csv``'s ``skip``). On the
1,000,000-line file of benchmarks/intake_validation.py, one thread of DuckDB 2.0 skipped a line
in 0.24 µs, and the scan took about 3 CPU µs per line with the 借据表 template's checks. A template
with fewer checks makes the share larger, so an estimate a little above 0.08 is used."""


def _bit_words(prefix: str, conditions: Sequence[str]) -> list[tuple[str, str]]:
    """Return (column name, SQL) pairs that pack the boolean ``conditions`` into BIGINT bits, ``_MASK_BITS`` per column."""
    words = []
    for start in range(0, len(conditions), _MASK_BITS):
        sums = " + ".join(
            f"(CAST({condition} AS BIGINT) << {bit})"
            for bit, condition in enumerate(conditions[start : start + _MASK_BITS])
        )
        words.append((f"{prefix}_{start // _MASK_BITS}", sums))
    return words


def _bit_sql(prefix: str, index: int) -> str:
    """Return SQL for bit ``index`` (0 or 1) of the columns that :func:`_bit_words` named after ``prefix``."""
    return f"(({_q(f'{prefix}_{index // _MASK_BITS}')} >> {index % _MASK_BITS}) & 1)"


def _field_codes_in(value: Any, codes: frozenset[str], found: set[str]) -> None:
    """Add to ``found`` every string in ``value`` (a rule model, tuple, mapping…) that is one of ``codes``."""
    if isinstance(value, str):
        if value in codes:
            found.add(value)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _field_codes_in(getattr(value, name), codes, found)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _field_codes_in(key, codes, found)
            _field_codes_in(item, codes, found)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _field_codes_in(item, codes, found)


class _TextRun(_Run):
    """Validation of a ``|`` text file read in place by DuckDB (:func:`validate_text`).

    One scan parses the file in parts, each numbered by ``WITH ORDINALITY`` from its first line,
    so the parts run on separate threads. It evaluates every row check and writes the table
    ``scan``. For each row, that table has the line, the text of the keys that the later steps
    join on, the typed values of the measures and conditions they read, and flags of the
    non-empty fields. For a row that fails a check, it also has the raw text of every field. The
    later steps read ``scan`` (through the view ``typed``) instead of parsing the file again.
    """

    def __init__(self, direct: DirectText, template: Template, context: ValidationContext, work_dir: Path,
                 catalog: TemplateCatalog | None) -> None:
        super().__init__(None, template, context, work_dir, catalog)  # type: ignore[arg-type]
        self.direct = direct
        self.fields = _FieldSql(template, masked_fields(template), plain_edges=direct.plain_edges, udf=True)
        self.checks = _row_checks(template, self.fields, context, self.skipped)
        # The scan reads the file itself, where an empty field is NULL, but the tables after it hold ''.
        # So the scan's checks test for NULL (the same rows fail), and the steps after it use self.checks.
        period = template.period_field
        scan_fields = _FieldSql(template, masked_fields(template), plain_edges=direct.plain_edges,
                                null_empty=direct.plain_edges, udf=True,
                                known_dates={period.code: context.period_end} if period else None)
        self.scan_fields = scan_fields
        self.scan_checks = [self._with_known_values(check) for check in _row_checks(template, scan_fields, context, [])]
        self.codes = [item.code for item in template.fields]
        self.normalised = [code for code in self.codes if code in template.file_layout().normalised]
        self.rows = 0

    def _with_known_values(self, check: _RowCheck) -> _RowCheck:
        """Return ``check`` with its format test decided once for the institution's own identifiers.

        In nearly every row the institution field contains one of them. For such a row the test
        becomes the same test on a literal, which DuckDB's optimizer folds to a constant, so the
        pattern runs only on the other rows.
        """
        institution = self.template.institution_field
        identifiers = sorted(self.context.institution_identifiers)
        if institution is None or check.field.code != institution.code or check.rule.kind != "format" or not identifiers:
            return check
        column = _q(institution.code)
        branches = " ".join(
            f"WHEN {column} = {_lit(value)} THEN {check.fail.replace(column, _lit(value))}" for value in identifiers
        )
        return dataclasses.replace(check, fail=f"(CASE {branches} ELSE {check.fail} END)")

    def _later_codes(self) -> tuple[set[str], set[str]]:
        """Return the fields that the rules of the steps after the scan name, and those of them that are keys.

        Keys (the fields of uniqueness and reference rules) are joined on and shown in messages.
        The other fields are read as typed values or tested for being empty: measures and conditions.
        """
        field_codes = frozenset(self.codes)
        named: set[str] = set()
        keys: set[str] = set()
        for rule in self.template.effective_rules():
            if isinstance(rule, (UniqueRule, ReferenceRule, ReconcileRule, FluctuationRule)):
                _field_codes_in(rule, field_codes, named)
            if isinstance(rule, (UniqueRule, ReferenceRule)):
                keys.update(rule.fields)
        return named, keys

    def presence_codes(self) -> list[str]:
        """Return the fields that the steps after the scan only test for being empty or read as typed values.

        These are the number and date fields that the later rules name other than as keys, and
        the remark field, whose filling decides whether a warning is explained. The scan keeps
        their non-empty flags (and the typed values, :meth:`scan`) instead of their text. Storing the
        text of the benchmark template's three such fields and its period field cost the scan about
        0.5 CPU seconds on 1,000,000 rows (an estimate from probes on a shared machine).
        """
        named, keys = self._later_codes()
        remark = self.template.remark_field
        flagged_only = {
            code for code in named - keys if self.template.field(code).type in ("integer", "decimal", "date")
        }
        if remark is not None and remark.code not in named:
            flagged_only.add(remark.code)
        return [code for code in self.codes if code in flagged_only]

    def carried_codes(self) -> list[str]:
        """Return the fields whose text the steps after the scan read, in template order."""
        named, _keys = self._later_codes()
        presence = set(self.presence_codes())
        return [code for code in self.codes if code in named and code not in presence]

    def unguarded_codes(self) -> list[str]:
        """Return the normalised fields where a character other than ASCII may pass every row check.

        A value of such a field could read differently after NFKC, so the scan tests it for
        every row. In the other normalised fields an unconditional type or code list check
        fails on any such character, so only the failing rows need that test.
        """
        guarded = set()
        for check in self.checks:
            rule, item = check.rule, check.field
            if getattr(rule, "when", None) is not None:
                continue
            if rule.kind == "code_list" or (rule.kind == "format" and item.type in ("integer", "decimal", "date")):
                guarded.add(item.code)
            elif rule.kind == "format" and _format_needs_ascii(rule, item):
                guarded.add(item.code)
        return [code for code in self.normalised if code not in guarded]

    def source(self) -> str:
        """Return SQL for the rows of the file (``_line`` and the raw fields), read in parts that run in parallel."""
        from intake.reader import csv_source

        direct = self.direct
        threads = int(self.context.threads or self.fetch("SELECT current_setting('threads')")[0][0])
        parts = max(1, min(threads, direct.lines // MIN_ROWS_PER_PART))
        sizes = _part_sizes(direct.lines, parts, SKIP_COST_SHARE)
        values = []
        for code in self.codes:
            value = _q(code)
            if code in self.normalised and not direct.plain_edges:
                # The parser trims spaces in code, number and date fields, and the byte screen saw one at a field edge.
                value = f"CASE WHEN {value} LIKE ' %' OR {value} LIKE '% ' THEN trim({value}, ' ') ELSE {value} END"
            values.append(f"{value} AS {_q(code)}")
        selects = []
        skip = direct.skip
        for size in sizes:
            selects.append(
                f"(SELECT ordinality + {skip} AS {_q(LINE_COLUMN)}, {', '.join(values)} "
                f"FROM {csv_source(direct.path, self.codes, skip)} WITH ORDINALITY LIMIT {size})"
            )
            skip += size
        return "(" + " UNION ALL ".join(selects) + ")"

    def scan_present(self, code: str) -> str:
        """Return SQL that is true when the field is non-empty, over the rows of :meth:`source`."""
        if self.direct.plain_edges:
            # DuckDB reads an empty field as NULL, and no field starts with whitespace, so the
            # NULL test alone decides.
            return f"({_q(code)} IS NOT NULL)"
        return self.fields.present(code)

    def connect(self) -> duckdb.DuckDBPyConnection:
        con = self._open()
        register_check_digits(con)
        return con

    def scan(self) -> None:
        carried = self.carried_codes()
        presence = self.presence_codes()
        pre_typed = [
            code for code in self.codes
            if code in {*carried, *presence} and self.template.field(code).type in ("integer", "decimal", "date")
        ]
        fail = " OR ".join(check.fail for check in self.scan_checks) or "false"

        masks = [
            f"{sums} AS {_q(name)}"
            for name, sums in _bit_words("__present", [self.scan_present(code) for code in self.flagged_codes()])
        ]
        raw = f"concat_ws({_UNIT_SEPARATOR}, " + ", ".join(f"coalesce({_q(code)}, '')" for code in self.codes) + ")"
        wide = " OR ".join(f"strlen({_q(code)}) <> length({_q(code)})" for code in self.unguarded_codes()) or "false"

        columns = [
            _q(LINE_COLUMN),
            *(f"coalesce({_q(code)}, '') AS {_q(code)}" for code in carried),
            # The scan computed their typed values for its checks; keeping them spares the later steps a second parse.
            *(self.fields.typed(code) for code in pre_typed),
            *masks,
            f"CASE WHEN __bad THEN {raw} END AS __raw",
            "__bad",
            f"coalesce({wide}, false) AS __wide",
        ]
        try:
            self.sql(
                f"CREATE TABLE scan AS SELECT {', '.join(columns)} "
                f"FROM (SELECT *, ({fail}) AS __bad FROM ({self.scan_fields.typed_select(self.source())}))"
            )
        except duckdb.OutOfMemoryException:
            raise
        except duckdb.Error as exc:  # invalid UTF-8, a line with too few fields, a line too long
            raise _DirectTextRejected(f"DuckDB could not read the file: {exc}") from exc

        rows, wide_rows = self.fetch("SELECT count(*), count(*) FILTER (WHERE __wide) FROM scan")[0]
        if rows != self.direct.lines:
            raise _DirectTextRejected(f"DuckDB read {rows} rows from {self.direct.lines} data lines")
        if wide_rows:
            raise _DirectTextRejected(f"{wide_rows} rows contain other than ASCII in a normalised field")

        split = ", ".join(f"coalesce(__parts[{index + 1}], '') AS {_q(code)}" for index, code in enumerate(self.codes))
        self.sql(
            f"CREATE TABLE bad AS SELECT {_q(LINE_COLUMN)}, {split} FROM "
            f"(SELECT {_q(LINE_COLUMN)}, string_split(__raw, {_UNIT_SEPARATOR}) AS __parts FROM scan WHERE __bad)"
        )
        if self.normalised:
            other = " OR ".join(f"strlen({_q(code)}) <> length({_q(code)})" for code in self.normalised)
            found = self.fetch(f"SELECT count(*) FROM bad WHERE {other}")[0][0]
            if found:
                raise _DirectTextRejected(f"{found} failing rows contain other than ASCII in a normalised field")
        # A field of presence_codes() has no text in ``scan``. The view gives it '1' when it is non-empty and ''
        # when it is empty, which is all that the steps after the scan read of it.
        # NOTE: a later step that showed such a field's value would show '1'.
        # Such a field belongs in the keys of _later_codes().
        flagged = self.flagged_codes()
        stand_ins = ", ".join(
            f"CASE WHEN {_bit_sql('__present', flagged.index(code))} = 1 THEN '1' ELSE '' END AS {_q(code)}"
            for code in presence
        )
        source = f"(SELECT *, {stand_ins} FROM scan)" if stand_ins else "scan"
        self.sql(
            f"CREATE VIEW typed AS {self.fields.typed_select(source, [c for c in carried if c not in pre_typed])}"
        )
        self.rows = int(rows)

    def row_checks(self) -> None:
        if not self.checks:
            return
        # The scan kept the failing rows without saying which checks they fail. Evaluating the checks
        # again for these few rows took 0.07 s on 1,000,000 rows. Storing the bits in the scan for the
        # failing rows alone cost about 0.6 CPU s, because DuckDB's CASE paid for every chunk.
        # The bits and the typed values are stored once for the messages.
        words = _bit_words("__failed", [check.fail for check in self.checks])
        bits = ", ".join(f"{sums} AS {_q(name)}" for name, sums in words)
        self.sql(f"CREATE TABLE bad_typed AS SELECT *, {bits} FROM ({self.fields.typed_select('bad')})")
        seen = self.fetch(f"SELECT {', '.join(f'bit_or({_q(name)})' for name, _sums in words)} FROM bad_typed")[0]
        failing = [index for index in range(len(self.checks)) if (seen[index // _MASK_BITS] or 0) >> (index % _MASK_BITS) & 1]
        if not failing:
            return
        # Only the checks that some row fails get a part in the statement. With a part for every check
        # of the benchmark's template, DuckDB took about as long to plan the statement as to run it.
        self.insert_flagged_findings(
            self.checks,
            "bad_typed",
            lambda index: f"{_bit_sql('__failed', index)} = 1",
            failing,
        )

    def reader_findings(self) -> None:
        """Add nothing: the parser adds reader findings only for XLSX cells, and this file is text."""

    def flagged_codes(self) -> list[str]:
        """Return the fields whose non-empty flags the scan keeps: all but those that may never be empty.

        An unconditional not_null check fails every row where its field is empty, so such a
        row is in table ``bad`` with its text, and :meth:`field_counts` counts the empty values
        there. Flags for the other fields cost the scan about 0.01 CPU seconds per field and 1,000,000 rows.
        The fields of :meth:`presence_codes` are flagged even when required: the flag replaces their text.
        """
        required = {
            check.field.code for check in self.checks
            if check.rule.kind == "not_null" and getattr(check.rule, "when", None) is None
        } - set(self.presence_codes())
        return [code for code in self.codes if code not in required]

    def field_counts(self) -> dict[str, int]:
        flagged = self.flagged_codes()
        counted = {code: index for index, code in enumerate(flagged)}
        sums = [
            f"sum({_bit_sql('__present', index)})" for index in range(len(flagged))
        ]
        values: dict[str, int] = {}
        if flagged:
            values.update(zip(flagged, self.fetch(f"SELECT {', '.join(sums)} FROM scan")[0], strict=True))
        required = [code for code in self.codes if code not in counted]
        if required:
            empty = ", ".join(f"count(*) FILTER (WHERE {self.fields.empty(code)})" for code in required)
            row = self.fetch(f"SELECT {empty} FROM bad")[0]
            values.update((code, self.rows - missing) for code, missing in zip(required, row, strict=True))
        return {code: int(values[code] or 0) for code in self.codes}


def _format_needs_ascii(rule: FormatRule, item: TemplateField) -> bool:
    """Return whether every value that passes the format rule ``rule`` on ``item`` is ASCII.

    True when the rule applies a named check (all of them take ASCII digits and letters) or a
    pattern that matches ASCII only (:func:`_ascii_only_pattern`).
    """
    if rule.pattern is not None or rule.check is not None:
        patterns, check = [rule.pattern], rule.check
    elif item.format is not None:
        patterns, check = [item.format.pattern], item.format.check
    else:
        return False
    return check is not None or any(pattern is not None and _ascii_only_pattern(pattern) for pattern in patterns)


def _ascii_only_pattern(pattern: str) -> bool:
    """Return whether every text that RE2 fully matches with ``pattern`` is ASCII (False when unsure).

    Parses the pattern with Python's ``re`` parser, whose syntax RE2 shares for these constructs.
    It accepts ASCII literals, character classes of ASCII characters, ranges and ``\\d``, ``\\w``,
    ``\\s`` (ASCII only in RE2), anchors, groups, alternation and repetition, without case folding.
    Anything else, such as ``.`` or a negated class, matches other characters too.
    """
    import re._constants as constants  # noqa: PLC0415
    import re._parser as parser  # noqa: PLC0415

    ascii_categories = {constants.CATEGORY_DIGIT, constants.CATEGORY_WORD, constants.CATEGORY_SPACE}

    def ascii_items(items: Any) -> bool:
        for op, value in items:
            if op is constants.LITERAL:
                if value > 127:
                    return False
            elif op is constants.IN:
                for class_op, class_value in value:
                    if class_op is constants.LITERAL and class_value <= 127:
                        continue
                    if class_op is constants.RANGE and class_value[1] <= 127:
                        continue
                    if class_op is constants.CATEGORY and class_value in ascii_categories:
                        continue
                    return False
            elif op is constants.AT:
                continue
            elif op is constants.SUBPATTERN:
                # Case folding lets an ASCII letter match a non-ASCII one in RE2 (k and the Kelvin sign).
                if value[1] & constants.SRE_FLAG_IGNORECASE or not ascii_items(value[-1]):
                    return False
            elif op in (constants.MAX_REPEAT, constants.MIN_REPEAT, constants.POSSESSIVE_REPEAT):
                if not ascii_items(value[-1]):
                    return False
            elif op is constants.BRANCH:
                if not all(ascii_items(branch) for branch in value[1]):
                    return False
            else:
                return False
        return True

    try:
        parsed = parser.parse(pattern)
    except (re.error, RecursionError, TypeError, ValueError):
        return False
    return not parsed.state.flags & constants.SRE_FLAG_IGNORECASE and ascii_items(parsed)


def _part_sizes(lines: int, parts: int, skip_share: float) -> list[int]:
    """Split ``lines`` into ``parts`` consecutive parts that cost about the same to scan.

    A part also pays ``skip_share`` of a line's cost for every line before it, so each part is
    smaller than the one before. Every part has at least one line when ``lines >= parts``.
    """
    # Part k scans n_k lines after skipping s_k; equal costs give n_k = n_0 − share × s_k.
    weights = [1.0]
    for _ in range(parts - 1):
        weights.append(max(weights[-1] * (1 - skip_share), 0.0))
    total = sum(weights)
    sizes = [max(1, int(lines * weight / total)) for weight in weights]
    sizes[0] += lines - sum(sizes)
    return sizes


def memory_bytes(size: str) -> int:
    """Return the bytes of a size such as "1GB" (10**9) or "512MiB" (2**29); raise ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", size)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _MEMORY_UNITS:
        raise ValueError(f"invalid memory size {size!r}: expected a number and one of {', '.join(_MEMORY_UNITS)}")
    return int(Decimal(match.group(1)) * _MEMORY_UNITS[unit])


def _tolerance(rule: ReconcileRule, right: Decimal) -> Decimal:
    if rule.tolerance is None:
        return Decimal(0)
    parts = []
    if rule.tolerance.absolute is not None:
        parts.append(rule.tolerance.absolute)
    if rule.tolerance.relative is not None:
        parts.append(rule.tolerance.relative * abs(right))
    return max(parts) if rule.tolerance.combine == "any" else min(parts)


def _plain(value: Decimal) -> str:
    """Format a number for a message: no exponent, no separators, at most 6 decimals."""
    text = format(Decimal(value).quantize(Decimal("0.000001")).normalize(), "f")
    return "0" if text in ("-0", "") else text


def _year_before(day: date) -> date:
    try:
        return day.replace(year=day.year - 1)
    except ValueError:  # 29 February
        return day.replace(year=day.year - 1, day=28)


def validate_staged(
    staged: StagedFile,
    template: Template,
    context: ValidationContext,
    work_dir: Path,
    *,
    catalog: TemplateCatalog | None = None,
) -> ValidationResult:
    """Check every row of ``staged`` against ``template`` and write the findings to a Parquet file in ``work_dir``.

    ``catalog`` resolves the templates that reconciliations refer to; the shipped catalog is
    loaded when it is not given. Raises :class:`ValidationError` when the check itself cannot run.
    """
    run = _Run(staged, template, context, Path(work_dir), catalog)
    return _execute(run, (run.connect,), lambda: staged.rows)


def validate_text(
    direct: DirectText,
    template: Template,
    context: ValidationContext,
    work_dir: Path,
    *,
    catalog: TemplateCatalog | None = None,
) -> ValidationResult | None:
    """Validate a ``|`` text file in place, as :func:`validate_staged` validates its staging file.

    ``direct`` comes from :func:`intake.reader.direct_text`. The findings, line numbers and
    field counts are those of staging the file and validating the staging file.

    Returns None, leaving no findings file, when DuckDB's reading differs from the parser's: it
    rejects a line or skips a blank one, or a code, number or date field contains a character that
    NFKC could change. The caller then stages the file. Raises :class:`ValidationError` as
    :func:`validate_staged` does.
    """
    run = _TextRun(direct, template, context, Path(work_dir), catalog)
    try:
        return _execute(run, (run.connect, run.scan), lambda: run.rows)
    except _DirectTextRejected as exc:
        logger.info("validating %s through the staging file: %s", direct.path.name, exc)
        return None


def _execute(run: _Run, first_steps: Sequence[Callable[[], Any]], rows: Callable[[], int]) -> ValidationResult:
    started = time.perf_counter()
    run.work_dir.mkdir(parents=True, exist_ok=True)
    step_seconds: dict[str, float] = {}

    def timed(step: Callable[[], Any]) -> Any:
        step_started = time.perf_counter()
        result = step()
        step_seconds[step.__name__] = time.perf_counter() - step_started
        return result

    template, context = run.template, run.context
    # The steps after the first ones only read what those built and insert into ``findings``, so
    # they run side by side, each on its own cursor. Each is a few DuckDB queries with serial parts
    # (building a hash table, finishing an aggregate), which leave a core idle when run one by one.
    later = (run.row_checks, run.unique_checks, run.reference_checks, run.aggregate_checks, run.reader_findings,
             run.field_counts)
    try:
        for step in first_steps:
            timed(step)
        with ThreadPoolExecutor(max_workers=STEP_WORKERS, thread_name_prefix="validate-step") as pool:
            futures = [pool.submit(timed, run.in_cursor(step)) for step in later]
            wait(futures)
            outcomes = [future.result() for future in futures]
        field_values = outcomes[-1]
        path, counts, explained, rule_counts = timed(run.write)
    except duckdb.OutOfMemoryException as exc:
        raise ValidationError(
            "VALIDATION_OUT_OF_MEMORY",
            f"校验文件时超出内存上限 {context.memory_limit}，校验未完成。请联系平台管理员调高校验内存上限后重新校验。",
        ) from exc
    except duckdb.Error as exc:
        raise ValidationError(
            "VALIDATION_FAILED",
            f"按模板 {template.label} 校验文件时出错，校验未完成。请联系平台管理员，并提供模板代码和报送批次。",
        ) from exc
    finally:
        run.close()
    order = run.rule_order
    return ValidationResult(
        findings_path=path,
        counts=counts,
        explained_warnings=explained,
        rule_counts=rule_counts,
        rows_checked=rows(),
        seconds=time.perf_counter() - started,
        skipped_rules=tuple(sorted(run.skipped, key=lambda rule: (order.get(rule.rule_id, -1), rule.rule_id))),
        accepted_possible=counts.get("error", 0) == 0,
        step_seconds=step_seconds,
        field_values=field_values,
    )
