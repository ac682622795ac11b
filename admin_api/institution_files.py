"""Bulk import and export of institutions as CSV or XLSX with Chinese column headers.

Import reads the whole file, checks every row (field rules, duplicates within the file and against
the database, parent references) and then either imports all rows or nothing (mode
``all_or_nothing``, the default), or imports only the good rows (mode ``valid_only``). Both modes
return every rejected row. The rows are added in the caller's session and committed once.

Export escapes cells that a spreadsheet would run as a formula (leading = + - @, tab or carriage
return) with a leading apostrophe.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from fastapi import Request
from openpyxl import Workbook, load_workbook
from openpyxl.utils.exceptions import InvalidFileException
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.display import beijing
from admin_api.errors import invalid
from admin_api.institutions import FIELD_LABELS, STATUS_NAMES, clean_fields
from admin_api.models import Institution
from admin_api.security import Principal

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_ROWS = 5000
MAX_COLUMNS = 40

COLUMNS = ["机构代码", "机构名称", "统一社会信用代码", "金融许可证号", "机构类型", "上级机构代码", "联系人", "联系电话",
           "联系邮箱", "状态"]
COLUMN_FIELDS = {label: key for key, label in FIELD_LABELS.items()}
REQUIRED_COLUMNS = ["机构代码", "机构名称", "统一社会信用代码", "机构类型"]
STATUS_VALUES = {name: key for key, name in STATUS_NAMES.items()}
MODES = ("all_or_nothing", "valid_only")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
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


@dataclass
class ImportResult:
    mode: str
    total_rows: int
    imported: int
    errors: list[RowError]

    @property
    def rejected_rows(self) -> int:
        return len({error.row for error in self.errors})


# --- reading ---------------------------------------------------------------------------------

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


def read_rows(data: bytes, filename: str) -> list[SourceRow]:
    """Parse an uploaded CSV or XLSX file into rows keyed by field; blank rows are skipped.

    Raises 422 for an unreadable file, unknown or missing columns, or more than MAX_ROWS rows.
    """
    lower = filename.lower()
    if lower.endswith((".xls", ".et", ".ods", ".numbers")):
        raise invalid("IMPORT_FORMAT_UNSUPPORTED",
                      f"不支持文件 {filename} 的格式，请另存为 .xlsx 或 .csv（UTF-8 或 GB18030 编码）后上传。")
    if len(data) > MAX_FILE_BYTES:
        raise invalid("IMPORT_FILE_TOO_LARGE",
                      f"文件 {filename} 大小为 {len(data) / 1024 / 1024:.1f} MB，超过上限 {MAX_FILE_BYTES // 1024 // 1024} MB。"
                      f"请拆分为多个文件（每个最多 {MAX_ROWS} 行）后分别导入。")
    if not data.strip():
        raise invalid("IMPORT_FILE_EMPTY", f"文件 {filename} 为空，请使用导入模板填写后上传。")
    records = _xlsx_rows(data) if data.startswith(_XLSX_MAGIC) else _csv_rows(data)

    header: list[str] | None = None
    rows: list[SourceRow] = []
    for number, record in enumerate(records, start=1):
        if header is None:
            header = [text for text, _numeric in record]
            while header and not header[-1]:
                header.pop()
            _check_header(header)
            continue
        if not any(text for text, _numeric in record):
            continue
        if len(rows) >= MAX_ROWS:
            raise invalid("IMPORT_TOO_MANY_ROWS",
                          f"文件 {filename} 的数据超过 {MAX_ROWS} 行，请拆分为多个文件后分别导入。")
        source = SourceRow(row=number, values={})
        for index, label in enumerate(header):
            text, numeric = record[index] if index < len(record) else ("", False)
            source.values[COLUMN_FIELDS[label]] = text
            if numeric:
                source.numeric.add(COLUMN_FIELDS[label])
        rows.append(source)
    if header is None:
        raise invalid("IMPORT_FILE_EMPTY", f"文件 {filename} 没有表头行，请使用导入模板填写后上传。")
    return rows


def _check_header(header: list[str]) -> None:
    unknown = [label or "（空）" for label in header if label not in COLUMN_FIELDS]
    if unknown:
        raise invalid("IMPORT_COLUMN_UNKNOWN",
                      f"表头含有无法识别的列：{'、'.join(unknown)}。可用的列为：{'、'.join(COLUMNS)}。")
    repeated = sorted({label for label in header if header.count(label) > 1})
    if repeated:
        raise invalid("IMPORT_COLUMN_REPEATED", f"表头中的列 {'、'.join(repeated)} 出现了多次，请只保留一列。")
    missing = [label for label in REQUIRED_COLUMNS if label not in header]
    if missing:
        raise invalid("IMPORT_COLUMNS_MISSING", f"表头缺少必填列：{'、'.join(missing)}。请使用导入模板。")


# --- checking --------------------------------------------------------------------------------

_NUMERIC_HINT = "（该单元格为数字格式，可能已丢失前导零或末尾数位，请把该列设为文本格式后重新填写）"


class _Checker:
    """Collects the errors of every row; a row with at least one error is not imported."""

    def __init__(self) -> None:
        self.errors: list[RowError] = []
        self.bad: set[int] = set()

    def add(self, source: SourceRow, field_name: str, value: str, code: str, message: str) -> None:
        if field_name in source.numeric:
            message = message.rstrip("。") + _NUMERIC_HINT + "。"
        self.errors.append(RowError(source.row, FIELD_LABELS[field_name], value, code, message))
        self.bad.add(source.row)


def _existing(session: Session, column: Any, values: set[str]) -> dict[str, Institution]:
    found: dict[str, Institution] = {}
    ordered = sorted(values)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start:start + 500]
        for item in session.scalars(select(Institution).where(column.in_(chunk))).unique():
            found[getattr(item, column.key)] = item
    return found


def check_rows(session: Session, rows: list[SourceRow], mode: str) -> tuple[list[tuple[SourceRow, dict[str, Any]]], list[RowError]]:
    """Return the rows that can be imported with their cleaned values, and the errors of the others."""
    checker = _Checker()
    cleaned_rows: list[tuple[SourceRow, dict[str, Any]]] = []
    for source in rows:
        given = {key: value for key, value in source.values.items() if key != "status"}
        for required in ("code", "name", "uscc", "type"):
            given.setdefault(required, "")
        values, problems = clean_fields(given)
        for problem in problems:
            checker.add(source, problem.field, problem.value, problem.code, problem.message)
        status_text = source.values.get("status", "").strip() or STATUS_NAMES["active"]
        if status_text not in STATUS_VALUES:
            checker.add(source, "status", status_text, "INSTITUTION_STATUS_INVALID",
                        f"状态 {status_text} 无效，只能是 正常 或 停用（留空表示正常）。")
        values["status"] = STATUS_VALUES.get(status_text, "active")
        cleaned_rows.append((source, values))

    _check_duplicates(session, cleaned_rows, checker)
    _check_parents(session, cleaned_rows, checker, mode)
    good = [(source, values) for source, values in cleaned_rows if source.row not in checker.bad]
    return good, sorted(checker.errors, key=lambda error: (error.row, error.column))


def _check_duplicates(session: Session, cleaned_rows: list[tuple[SourceRow, dict[str, Any]]], checker: _Checker) -> None:
    for field_name, column, code in (("code", Institution.code, "INSTITUTION_CODE_EXISTS"),
                                     ("name", Institution.name, "INSTITUTION_NAME_EXISTS"),
                                     ("uscc", Institution.uscc, "INSTITUTION_USCC_EXISTS")):
        label = FIELD_LABELS[field_name]
        present = {values[field_name] for _source, values in cleaned_rows if values.get(field_name)}
        stored = _existing(session, column, present)
        first_row: dict[str, int] = {}
        for source, values in cleaned_rows:
            value = values.get(field_name)
            if not value:
                continue
            if value in stored:
                other = stored[value]
                checker.add(source, field_name, value, code,
                            f"{label} {value} 已被现有机构 {other.code}（{other.name}）使用。")
            elif value in first_row:
                checker.add(source, field_name, value, "IMPORT_DUPLICATE_IN_FILE",
                            f"{label} {value} 与第 {first_row[value]} 行重复。")
            else:
                first_row[value] = source.row


def _check_parents(session: Session, cleaned_rows: list[tuple[SourceRow, dict[str, Any]]], checker: _Checker,
                   mode: str) -> None:
    in_file: dict[str, tuple[SourceRow, dict[str, Any]]] = {}
    for source, values in cleaned_rows:
        if values.get("code"):
            in_file.setdefault(values["code"], (source, values))
    parent_codes = {values["parent_code"] for _source, values in cleaned_rows if values.get("parent_code")}
    stored = _existing(session, Institution.code, parent_codes - set(in_file))
    dependants: list[tuple[SourceRow, str, SourceRow]] = []
    for source, values in cleaned_rows:
        parent_code = values.get("parent_code")
        if not parent_code:
            continue
        if parent_code == values.get("code"):
            checker.add(source, "parent_code", parent_code, "INSTITUTION_PARENT_CYCLE",
                        f"上级机构代码 {parent_code} 是本机构自己，会形成循环隶属关系。")
        elif parent_code in in_file:
            parent_source, parent_values = in_file[parent_code]
            if parent_values.get("parent_code"):
                checker.add(source, "parent_code", parent_code, "INSTITUTION_PARENT_NOT_LEGAL_ENTITY",
                            f"上级机构 {parent_code}（第 {parent_source.row} 行）本身是分支机构；分支机构的上级必须是法人机构。")
            elif parent_values["status"] != "active":
                checker.add(source, "parent_code", parent_code, "INSTITUTION_PARENT_INACTIVE",
                            f"上级机构 {parent_code}（第 {parent_source.row} 行）的状态为停用，不能作为上级机构。")
            else:
                dependants.append((source, parent_code, parent_source))
        elif parent_code in stored:
            parent = stored[parent_code]
            if parent.parent_id is not None:
                checker.add(source, "parent_code", parent_code, "INSTITUTION_PARENT_NOT_LEGAL_ENTITY",
                            f"上级机构 {parent_code} 本身是分支机构；分支机构的上级必须是法人机构。")
            elif parent.status != "active":
                checker.add(source, "parent_code", parent_code, "INSTITUTION_PARENT_INACTIVE",
                            f"上级机构 {parent_code} 已停用，请先恢复该机构或选择其他上级机构。")
        else:
            checker.add(source, "parent_code", parent_code, "INSTITUTION_PARENT_NOT_FOUND",
                        f"上级机构代码 {parent_code} 在系统和本文件中都不存在。")
    if mode != "valid_only":
        return
    # A branch whose parent row is rejected cannot be imported alone. The parent rows have no
    # parent of their own, so one pass finds every such branch.
    for source, parent_code, parent_source in dependants:
        if parent_source.row in checker.bad and source.row not in checker.bad:
            checker.add(source, "parent_code", parent_code, "IMPORT_PARENT_ROW_INVALID",
                        f"上级机构 {parent_code} 所在的第 {parent_source.row} 行有错误未导入，本行因此也未导入。")


# --- importing -------------------------------------------------------------------------------

def import_institutions(request: Request, session: Session, caller: Principal, rows: list[SourceRow], mode: str,
                        filename: str) -> ImportResult:
    """Check ``rows`` and add the importable ones with one audit event; the caller commits.

    In mode ``all_or_nothing`` a single bad row means nothing is added.
    """
    good, errors = check_rows(session, rows, mode)
    if errors and mode != "valid_only":
        good = []
    legal_entities = [(source, values) for source, values in good if not values.get("parent_code")]
    branches = [(source, values) for source, values in good if values.get("parent_code")]
    created: dict[str, Institution] = {}
    for group in (legal_entities, branches):
        for _source, values in group:
            parent_code = values.get("parent_code")
            parent = None
            if parent_code:
                parent = created.get(parent_code) or session.scalars(
                    select(Institution).where(Institution.code == parent_code)).one()
            institution = Institution(
                code=values["code"], name=values["name"], type=values["type"], uscc=values["uscc"],
                licence_no=values.get("licence_no"), parent_id=parent.id if parent else None,
                contact_name=values.get("contact_name"), contact_phone=values.get("contact_phone"),
                contact_email=values.get("contact_email"), status=values["status"],
            )
            session.add(institution)
            created[institution.code] = institution
        session.flush()
    result = ImportResult(mode=mode, total_rows=len(rows), imported=len(created), errors=errors)
    if created:
        add_event(session, request, caller, "institutions.import", "institutions",
                  detail={"file": filename[:200], "mode": mode, "rows": result.total_rows,
                          "imported": result.imported, "rejected": result.rejected_rows})
    return result


# --- exporting -------------------------------------------------------------------------------

def escape_cell(value: str) -> str:
    """Prefix text a spreadsheet would evaluate as a formula with an apostrophe."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def export_rows(institutions: Iterable[Institution]) -> Iterator[list[str]]:
    """Yield the header and one row per institution, every cell escaped, in the import column order."""
    yield COLUMNS + ["创建时间（北京时间）", "更新时间（北京时间）"]
    for item in institutions:
        cells = [item.code, item.name, item.uscc or "", item.licence_no or "", item.type, item.parent_code or "",
                 item.contact_name or "", item.contact_phone or "", item.contact_email or "",
                 STATUS_NAMES.get(item.status, item.status), beijing(item.created_at), beijing(item.updated_at)]
        yield [escape_cell(cell) for cell in cells]


def write_csv(rows: Iterable[list[str]]) -> bytes:
    """Write UTF-8 CSV with a byte order mark, so Excel shows the Chinese text correctly."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(rows)
    return b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8")


def write_xlsx(rows: Iterable[list[str]]) -> bytes:
    """Write an XLSX workbook with every cell stored as text."""
    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet("机构")
    for row in rows:
        sheet.append(row)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def template_rows() -> list[list[str]]:
    return [COLUMNS]
