"""Bulk import and export of institutions as CSV or XLSX with Chinese column headers.

Import reads the whole file, checks every row (field rules, duplicates within the file and against
the database, parent references) and then either imports all rows or nothing (mode
``all_or_nothing``, the default), or imports only the good rows (mode ``valid_only``). Both modes
return every rejected row. The rows are added in the caller's session and committed once.

Reading and writing the files, with the escape of formula-like cells, is in :mod:`admin_api.spreadsheets`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api import spreadsheets
from admin_api.audit import add_event
from admin_api.display import beijing
from admin_api.errors import invalid
from admin_api.institutions import FIELD_LABELS, STATUS_NAMES, clean_fields
from admin_api.models import Institution
from admin_api.security import Principal
from admin_api.spreadsheets import RowError, SourceRow, escape_cell, read_table

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_ROWS = 5000

COLUMNS = ["机构代码", "机构名称", "统一社会信用代码", "金融许可证号", "机构类型", "上级机构代码", "联系人", "联系电话",
           "联系邮箱", "状态"]
COLUMN_FIELDS = {label: key for key, label in FIELD_LABELS.items()}
REQUIRED_COLUMNS = ["机构代码", "机构名称", "统一社会信用代码", "机构类型"]
STATUS_VALUES = {name: key for key, name in STATUS_NAMES.items()}
MODES = ("all_or_nothing", "valid_only")


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

def read_rows(data: bytes, filename: str) -> list[SourceRow]:
    """Parse an uploaded CSV or XLSX file into rows keyed by field (see admin_api.spreadsheets.read_table)."""
    return read_table(data, filename, max_bytes=MAX_FILE_BYTES, max_rows=MAX_ROWS, header_fields=_check_header)


def _check_header(header: list[str]) -> list[str]:
    """Return the field of each header cell; raise 422 for unknown, repeated or missing columns."""
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
    return [COLUMN_FIELDS[label] for label in header]


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

def export_rows(institutions: Iterable[Institution]) -> Iterator[list[str]]:
    """Yield the header and one row per institution, every cell escaped, in the import column order."""
    yield COLUMNS + ["创建时间（北京时间）", "更新时间（北京时间）"]
    for item in institutions:
        cells = [item.code, item.name, item.uscc or "", item.licence_no or "", item.type, item.parent_code or "",
                 item.contact_name or "", item.contact_phone or "", item.contact_email or "",
                 STATUS_NAMES.get(item.status, item.status), beijing(item.created_at), beijing(item.updated_at)]
        yield [escape_cell(cell) for cell in cells]


def write_xlsx(rows: Iterable[list[str]]) -> bytes:
    return spreadsheets.write_xlsx(rows, "机构")


def template_rows() -> list[list[str]]:
    return [COLUMNS]
