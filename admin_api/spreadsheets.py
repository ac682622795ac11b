"""Reading and writing the CSV and XLSX files of the bulk imports and exports (institutions, users).

Reading detects the CSV encoding (UTF-8 with or without BOM, then GB18030) and reads every cell as
text. It remembers which XLSX cells were numbers, because they may have lost leading zeros. Blank
rows are skipped, and rows are numbered as a spreadsheet shows them, with the header as row 1. Writing escapes cells that a
spreadsheet would run as a formula (leading = + - @, tab or carriage return) with an apostrophe.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from openpyxl import Workbook, load_workbook
from openpyxl.utils.exceptions import InvalidFileException

from admin_api.errors import invalid
from regsandbox_core.cells import _FORMULA_START, escape_cell  # noqa: F401 - re-exported

MAX_COLUMNS = 40
UNSUPPORTED_SUFFIXES = (".xls", ".et", ".ods", ".numbers")
_XLSX_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class RowError:
    row: int
    """Row number as the spreadsheet shows it: the header is row 1."""
    column: str
    value: str
    code: str
    message: str


@dataclass
class SourceRow:
    row: int
    values: dict[str, str]
    numeric: set[str] = field(default_factory=set)
    """Fields whose XLSX cell was a number, which may have lost leading zeros or digits."""


def _cell_text(value: Any) -> tuple[str, bool]:
    """Return a cell as text and whether it was a number; integral numbers lose their ``.0``."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return ("TRUE" if value else "FALSE"), False
    if isinstance(value, int):
        return str(value), True
    if isinstance(value, float):
        return (str(int(value)) if value.is_integer() else repr(value)), True
    if isinstance(value, (datetime, date)):
        return value.isoformat(), False
    return str(value).strip(), False


def _decode_csv(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030")
    except UnicodeDecodeError:
        raise invalid("IMPORT_ENCODING_INVALID",
                      "无法识别 CSV 文件的编码：文件既不是 UTF-8 也不是 GB18030。请在 Excel 中另存为“CSV UTF-8”后重新上传。"
                      ) from None


def _csv_rows(data: bytes) -> Iterator[list[tuple[str, bool]]]:
    reader = csv.reader(io.StringIO(_decode_csv(data), newline=""))
    try:
        for record in reader:
            yield [(cell.strip(), False) for cell in record]
    except csv.Error as error:
        raise invalid("IMPORT_FILE_INVALID",
                      f"CSV 文件第 {reader.line_num} 行格式错误（{error}），请检查引号是否成对后重新上传。") from None


def _xlsx_rows(data: bytes) -> Iterator[list[tuple[str, bool]]]:
    try:
        workbook = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
        raise invalid("IMPORT_FILE_INVALID",
                      f"无法读取 XLSX 文件（{type(error).__name__}），请确认文件未损坏且为 Excel 2007 及以上格式。") from None
    try:
        sheet = workbook.worksheets[0]
        for record in sheet.iter_rows(values_only=True, max_col=MAX_COLUMNS):
            yield [_cell_text(value) for value in record]
    finally:
        workbook.close()


def read_table(data: bytes, filename: str, *, max_bytes: int, max_rows: int,
               header_fields: Callable[[list[str]], list[str]]) -> list[SourceRow]:
    """Parse an uploaded CSV or XLSX file into rows keyed by field; blank rows are skipped.

    ``header_fields`` maps the header cells to field names and raises 422 for bad columns. Raises
    422 for an unsupported, oversized or unreadable file, a file without a header, or more than
    ``max_rows`` data rows.
    """
    if filename.lower().endswith(UNSUPPORTED_SUFFIXES):
        raise invalid("IMPORT_FORMAT_UNSUPPORTED",
                      f"不支持文件 {filename} 的格式，请另存为 .xlsx 或 .csv（UTF-8 或 GB18030 编码）后上传。")
    if len(data) > max_bytes:
        raise invalid("IMPORT_FILE_TOO_LARGE",
                      f"文件 {filename} 大小为 {len(data) / 1024 / 1024:.1f} MB，超过上限 {max_bytes // 1024 // 1024} MB。"
                      f"请拆分为多个文件（每个最多 {max_rows} 行）后分别导入。")
    if not data.strip():
        raise invalid("IMPORT_FILE_EMPTY", f"文件 {filename} 为空，请使用导入模板填写后上传。")
    records = _xlsx_rows(data) if data.startswith(_XLSX_MAGIC) else _csv_rows(data)

    fields: list[str] | None = None
    rows: list[SourceRow] = []
    for number, record in enumerate(records, start=1):
        if fields is None:
            header = [text for text, _numeric in record]
            while header and not header[-1]:
                header.pop()
            fields = header_fields(header)
            continue
        if not any(text for text, _numeric in record):
            continue
        if len(rows) >= max_rows:
            raise invalid("IMPORT_TOO_MANY_ROWS",
                          f"文件 {filename} 的数据超过 {max_rows} 行，请拆分为多个文件后分别导入。")
        source = SourceRow(row=number, values={})
        for index, name in enumerate(fields):
            text, numeric = record[index] if index < len(record) else ("", False)
            source.values[name] = text
            if numeric:
                source.numeric.add(name)
        rows.append(source)
    if fields is None:
        raise invalid("IMPORT_FILE_EMPTY", f"文件 {filename} 没有表头行，请使用导入模板填写后上传。")
    if not rows:
        raise invalid("IMPORT_FILE_EMPTY", f"文件 {filename} 只有表头，没有数据行。请每行填写一条记录后重新上传。")
    return rows


def write_csv(rows: Iterable[list[str]]) -> bytes:
    """Write UTF-8 CSV with a byte order mark, so Excel shows the Chinese text, every cell escaped."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows([escape_cell(str(cell)) for cell in row] for row in rows)
    return b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8")


def write_xlsx(rows: Iterable[list[str]], sheet_name: str) -> bytes:
    """Write an XLSX workbook of one sheet with every cell stored as text and escaped.

    openpyxl stores a string that starts with ``=`` as a formula, so the escape matters here too.
    """
    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet(sheet_name)
    for row in rows:
        sheet.append([escape_cell(str(cell)) for cell in row])
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()
