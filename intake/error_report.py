"""Error reports of a validated file: the findings Parquet file written as XLSX and as CSV for the reporter.

Both writers stream the findings in batches of ``BATCH_ROWS`` rows, so memory stays bounded
whatever the number of findings. Every cell is text, and text that a spreadsheet would run as
a formula is escaped with :func:`regsandbox_core.cells.escape_cell`. An XLSX worksheet contains at
most ``XLSX_MAX_ROWS`` rows: beyond that the report stops and its last row gives how many
findings are only in the CSV report. Files are written under a temporary name in the target
folder, fsynced and renamed, so no half-written report is left behind.

The column 审核豁免 gives the reason of a reviewer's waiver (:class:`Waiver`) for each unexplained
warning that a waiver covers, and is empty for every other finding.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from intake.reader import _sql_text
from regsandbox_core.cells import escape_cell
from regsandbox_core.files import atomic_path

__all__ = ["HEADER", "XLSX_MAX_ROWS", "Waiver", "waiver_for", "write_csv_report", "write_xlsx_report"]

HEADER = ("行号", "字段代码", "字段名称", "填报值", "规则编号", "规则名称", "严重程度", "已说明", "问题说明", "审核豁免")
COLUMNS = ("line", "field_code", "field_name", "value", "rule_id", "rule_name", "severity", "explained", "message")
SEVERITY_NAMES = {"error": "错误", "warning": "提示"}
FILE_LEVEL_LINE = "全文件"
BATCH_ROWS = 8_192
XLSX_MAX_ROWS = 1_048_576
"""Rows of an Excel worksheet, the header row included."""
SHEET_TITLE = "校验结果"
FORMULA_START_PATTERN = "^[=+\\-@\t\r]"
"""The starts that :func:`regsandbox_core.cells.escape_cell` escapes, as an RE2 pattern for Arrow."""


@dataclass(frozen=True)
class Waiver:
    """A reviewer's waiver of the unexplained warnings of one rule, on the listed lines or on all (``lines`` None)."""

    rule_id: str
    lines: frozenset[int] | None
    reason: str


def waiver_for(waivers: Sequence[Waiver], rule_id: str | None, line: int | None, severity: str | None,
               explained: bool | None) -> Waiver | None:
    """Return the first waiver covering a finding. Only unexplained warnings can be waived."""
    if severity != "warning" or explained:
        return None
    for waiver in waivers:
        if waiver.rule_id == rule_id and (waiver.lines is None or line in waiver.lines):
            return waiver
    return None


def _escaped(column: pa.Array) -> pa.Array:
    """Apply :func:`regsandbox_core.cells.escape_cell` to every text of ``column`` (no NULLs) at once."""
    formula = pc.match_substring_regex(column, FORMULA_START_PATTERN)
    return pc.if_else(formula, pc.binary_join_element_wise("'", column, ""), column)


def _display_columns(batch: pa.RecordBatch, waivers: Sequence[Waiver]) -> list[list[str]]:
    """Return the display texts of a batch of findings, one list per report column, escaped."""
    line = batch.column("line")
    file_level = pc.fill_null(pc.equal(line, 0), True)
    texts = [pc.if_else(file_level, FILE_LEVEL_LINE, pc.cast(line, pa.string()))]
    for name in ("field_code", "field_name", "value", "rule_id", "rule_name"):
        texts.append(pc.fill_null(batch.column(name), ""))
    severity = pc.fill_null(batch.column("severity"), "")
    for code, label in SEVERITY_NAMES.items():
        severity = pc.if_else(pc.equal(severity, code), label, severity)
    texts.append(severity)
    texts.append(pc.if_else(pc.fill_null(batch.column("explained"), False), "是", "否"))
    texts.append(pc.fill_null(batch.column("message"), ""))
    columns = [_escaped(text).to_pylist() for text in texts]
    if waivers:
        raw = [batch.column(name).to_pylist() for name in ("rule_id", "line", "severity", "explained")]
        waived = [waiver_for(waivers, *values) for values in zip(*raw)]
        columns.append([escape_cell(f"已豁免：{waiver.reason}") if waiver else "" for waiver in waived])
    else:
        columns.append([""] * batch.num_rows)
    return columns


def _batches(findings_path: Path, waivers: Sequence[Waiver] = ()) -> Iterator[list[list[str]]]:
    """Yield the findings in file order, ``BATCH_ROWS`` at a time, as columns of escaped display texts."""
    parquet = pq.ParquetFile(findings_path)
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
            yield _display_columns(batch, waivers)
    finally:
        parquet.close()


def _finding_count(findings_path: Path) -> int:
    return pq.ParquetFile(findings_path).metadata.num_rows


def _replace_atomically(target: Path, write) -> Path:  # noqa: ANN001 - callable(temp_path)
    with atomic_path(Path(target)) as temporary:
        write(temporary)
    return Path(target)


def write_csv_report(findings_path: Path, target: Path, waivers: Sequence[Waiver] = ()) -> Path:
    """Write the findings as CSV in UTF-8 with a byte order mark (so Excel shows the Chinese text).

    Without waivers DuckDB writes the rows (:func:`_write_csv_rows_duckdb`); with waivers, which
    are matched in Python, the csv module does. Both write the same bytes.
    """

    def write(path: Path) -> None:
        with open(path, "w", encoding="utf-8-sig", newline="") as handle:
            csv.writer(handle, lineterminator="\r\n").writerow(HEADER)
            if waivers:
                _write_csv_rows(handle, Path(findings_path), waivers)
        if not waivers:
            _write_csv_rows_duckdb(Path(findings_path), path)

    return _replace_atomically(target, write)


def _write_csv_rows(handle: TextIO, findings_path: Path, waivers: Sequence[Waiver]) -> None:
    writer = csv.writer(handle, lineterminator="\r\n")
    for columns in _batches(findings_path, waivers):
        writer.writerows(zip(*columns))


def _write_csv_rows_duckdb(findings_path: Path, path: Path) -> None:
    """Append the findings' rows to the CSV file ``path`` as :func:`_write_csv_rows` writes them, without waivers.

    DuckDB formats and quotes the rows faster than pyarrow and the csv module: the whole report of
    the 24,731 findings of benchmarks/intake_validation.py took 0.07 s instead of 0.13 s. DuckDB
    writes an empty text as ``""``, so empty texts become NULL, which it writes as nothing, like
    the csv module writes an empty text.
    """
    import duckdb  # noqa: PLC0415 - only this writer needs it

    def shown(expression: str) -> str:
        # escape_cell in SQL, then NULL for an empty text
        pattern = _sql_text(FORMULA_START_PATTERN)
        return (
            f"nullif(CASE WHEN regexp_matches({expression}, {pattern}) "
            f"THEN {_sql_text(chr(39))} || {expression} ELSE {expression} END, '')"
        )

    severity = " ".join(f"WHEN {_sql_text(code)} THEN {_sql_text(label)}" for code, label in SEVERITY_NAMES.items())
    columns = [
        f"CASE WHEN line IS NULL OR line = 0 THEN {_sql_text(FILE_LEVEL_LINE)} ELSE CAST(line AS VARCHAR) END",
        *(f"coalesce({name}, '')" for name in ("field_code", "field_name", "value", "rule_id", "rule_name")),
        f"CASE severity {severity} ELSE coalesce(severity, '') END",
        "CASE WHEN coalesce(explained, false) THEN '是' ELSE '否' END",
        "coalesce(message, '')",
    ]
    select = ", ".join(f"{shown(column)} AS c{index}" for index, column in enumerate(columns))
    body = path.with_name(path.name + ".rows")
    con = duckdb.connect(":memory:")
    try:
        # The tenth column (审核豁免) stays empty without waivers.
        con.execute(
            f"COPY (SELECT {select}, NULL AS c{len(columns)} FROM read_parquet({_sql_text(str(findings_path))})) "
            f"TO {_sql_text(str(body))} (FORMAT csv, HEADER false, NEW_LINE '\\r\\n')"
        )
        with open(path, "ab") as output, open(body, "rb") as rows:
            shutil.copyfileobj(rows, output, 1 << 20)
    finally:
        con.close()
        body.unlink(missing_ok=True)


def _xlsx_text(value: str) -> str:
    """Replace the control characters that XML, and so XLSX, cannot store (the text is already escaped)."""
    return ILLEGAL_CHARACTERS_RE.sub("\ufffd", value)


def write_xlsx_report(findings_path: Path, target: Path, waivers: Sequence[Waiver] = ()) -> Path:
    """Write the findings as an XLSX workbook of one worksheet with every cell stored as text.

    openpyxl's write-only mode streams rows to disk and writes strings inline, so memory does
    not grow with the number of findings.
    """
    total = _finding_count(Path(findings_path))
    capacity = XLSX_MAX_ROWS - 1  # the header takes one row
    limit = total if total <= capacity else capacity - 1  # keep one row for the note

    def write(path: Path) -> None:
        workbook = Workbook(write_only=True)
        sheet = workbook.create_sheet(SHEET_TITLE)
        sheet.append(list(HEADER))
        written = 0
        for columns in _batches(Path(findings_path), waivers):
            for row in zip(*columns):
                if written >= limit:
                    break
                sheet.append([_xlsx_text(cell) for cell in row])
                written += 1
            if written >= limit:
                break
        if total > limit:
            sheet.append(
                [
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    f"共有 {total} 条问题，Excel 工作表最多容纳 {XLSX_MAX_ROWS} 行，此处只列出前 {limit} 条。"
                    f"其余 {total - limit} 条请查看 CSV 格式的校验报告。",
                    "",
                ]
            )
        workbook.save(path)

    return _replace_atomically(target, write)
