"""Bulk import of users from CSV or XLSX, with English or Chinese column headers.

Import reads the whole file and checks every row with :func:`admin_api.users.check_new_user`, the
same checks as ``POST /api/v1/users``, plus empty and over-long cells and user names repeated
within the file. Then it imports either all rows or nothing (mode ``all_or_nothing``, the
default), or only the good rows (mode ``valid_only``). Both modes return every rejected row. Only
then does it stage each user with :func:`admin_api.users.stage_user`, so a rejected file costs no
password hashing. The users are added in the caller's session with one ``users.import`` audit
event, and :func:`run_import` commits them once.

Each imported user gets a generated one-time password that must be changed at the first sign-in.
The passwords are returned once in the result and never stored in clear. They are generated here
rather than in ``stage_user`` so that none starts with a character that a spreadsheet reads as a
formula. The CSV of user names and passwords then opens in Excel unchanged.

Hashing a password with argon2id takes about 0.16 s (measured on a 2-core test machine), so all
passwords are hashed before the write transaction opens. SQLite allows one writer at a time, and
other writers give up after its busy timeout of 15 s. The transaction then only inserts the rows.
The request itself still takes those 0.16 s per user. Hashing on more Python threads was slower
there, because libargon2 already runs the four lanes of each hash on threads of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admin_api import passwords, roles, spreadsheets, users
from admin_api.audit import add_event, record_event
from admin_api.errors import ApiError, conflict, invalid
from admin_api.spreadsheets import RowError, SourceRow, read_table, write_csv
from admin_api.security import Principal, hash_one_time_password
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_ROWS = 5000
MODES = ("all_or_nothing", "valid_only")

FIELD_LABELS = {"username": "用户名", "display_name": "姓名", "email": "电子邮箱", "role": "角色",
                "institution_code": "机构代码"}
COLUMNS = list(FIELD_LABELS.values())
REQUIRED_FIELDS = ("username", "display_name", "email", "role")
HEADER_FIELDS = {
    **{label: key for key, label in FIELD_LABELS.items()},
    **{key: key for key in FIELD_LABELS},
    "邮箱": "email",
    "所属机构代码": "institution_code",
}
"""Accepted header texts: the Chinese labels, the API field names (any case) and two common variants."""
MAX_LENGTHS = {"username": 64, "display_name": 100, "email": 254, "role": 32, "institution_code": 32}
"""Longest cell per field, as ``POST /api/v1/users`` accepts."""
WHOLE_ROW = "整行"
"""Column named in an error that no single column explains."""
_ERROR_VALUE_LENGTH = 200
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

# Error codes of users.check_new_user, by the prefix that names the column at fault.
_CODE_FIELDS = (("USERNAME", "username"), ("USER_", "username"), ("DISPLAY_NAME", "display_name"),
                ("EMAIL", "email"), ("ROLE", "role"), ("ADMIN_ROLE", "role"), ("INSTITUTION", "institution_code"))


@dataclass
class ImportResult:
    mode: str
    total_rows: int
    imported: int
    errors: list[RowError]
    passwords: list[tuple[str, str]] = field(default_factory=list)
    """(user name, one-time password) of every imported user, in file order; shown once."""

    @property
    def rejected_rows(self) -> int:
        return len({error.row for error in self.errors})


# --- reading ---------------------------------------------------------------------------------

def _header_field(text: str) -> str | None:
    return HEADER_FIELDS.get(text) or HEADER_FIELDS.get(text.lower())


def _check_header(header: list[str]) -> list[str]:
    """Return the field of each header cell; raise 422 for unknown, repeated or missing columns."""
    unknown = [text or "（空）" for text in header if _header_field(text) is None]
    if unknown:
        raise invalid("IMPORT_COLUMN_UNKNOWN",
                      f"表头含有无法识别的列：{'、'.join(unknown)}。可用的列为：{'、'.join(COLUMNS)}"
                      f"（也可用英文列名 {', '.join(FIELD_LABELS)}）。初始密码由系统生成，文件中不能包含密码列。")
    fields = [_header_field(text) or "" for text in header]
    repeated = sorted({FIELD_LABELS[name] for name in fields if fields.count(name) > 1})
    if repeated:
        raise invalid("IMPORT_COLUMN_REPEATED", f"表头中的列 {'、'.join(repeated)} 出现了多次，请只保留一列。")
    missing = [FIELD_LABELS[name] for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise invalid("IMPORT_COLUMNS_MISSING", f"表头缺少必填列：{'、'.join(missing)}。请使用导入模板。")
    return fields


def read_rows(data: bytes, filename: str) -> list[SourceRow]:
    """Parse an uploaded CSV or XLSX file into rows keyed by field (see admin_api.spreadsheets.read_table)."""
    return read_table(data, filename, max_bytes=MAX_FILE_BYTES, max_rows=MAX_ROWS, header_fields=_check_header)


# --- checking --------------------------------------------------------------------------------

def _shown(value: str) -> str:
    return value if len(value) <= _ERROR_VALUE_LENGTH else value[:_ERROR_VALUE_LENGTH] + "…"


def _field_of(code: str) -> str | None:
    for prefix, name in _CODE_FIELDS:
        if code.startswith(prefix):
            return name
    return None


def _role_codes() -> dict[str, str]:
    """Map role codes and Chinese role names, built-in and custom, to role codes."""
    known = roles.all_roles()
    return {**{info.name: code for code, info in known.items()}, **{code: code for code in known}}


def _row_error(source: SourceRow, field_name: str | None, code: str, message: str) -> RowError:
    if field_name is None:
        return RowError(source.row, WHOLE_ROW, "", code, message)
    return RowError(source.row, FIELD_LABELS[field_name], _shown(source.values.get(field_name, "")), code, message)


def _cell_errors(source: SourceRow, values: dict[str, str]) -> list[RowError]:
    errors = []
    required = "、".join(FIELD_LABELS[name] for name in REQUIRED_FIELDS)
    for name in REQUIRED_FIELDS:
        if not values[name]:
            errors.append(_row_error(source, name, "IMPORT_VALUE_MISSING",
                                     f"{FIELD_LABELS[name]}为空，请填写（必填列：{required}）。"))
    for name, limit in MAX_LENGTHS.items():
        if len(values[name]) > limit:
            errors.append(_row_error(source, name, "IMPORT_VALUE_TOO_LONG",
                                     f"{FIELD_LABELS[name]}有 {len(values[name])} 个字符，超过上限 {limit}，请缩短。"))
    return errors


def check_rows(session: Session, caller: Principal,
               rows: list[SourceRow]) -> tuple[list[tuple[SourceRow, dict[str, str]]], list[RowError]]:
    """Return the rows that can be imported with their values, and the errors of the others.

    Each row gets the errors of its cells, or else the first error of ``users.check_new_user``.
    A user name repeated in the file is an error of every row after the first.
    """
    role_codes = _role_codes()
    good: list[tuple[SourceRow, dict[str, str]]] = []
    errors: list[RowError] = []
    first_row: dict[str, int] = {}
    for source in rows:
        values = {name: source.values.get(name, "").strip() for name in FIELD_LABELS}
        values["role"] = role_codes.get(values["role"], values["role"])
        cell_errors = _cell_errors(source, values)
        if cell_errors:
            errors.extend(cell_errors)
            continue
        username = values["username"]
        if username in first_row:
            errors.append(_row_error(source, "username", "IMPORT_DUPLICATE_IN_FILE",
                                     f"用户名 {username} 与第 {first_row[username]} 行重复，每个用户名只能出现一次。"))
            continue
        first_row[username] = source.row
        try:
            users.check_new_user(session, caller, username=username, display_name=values["display_name"],
                                 email=values["email"], role=values["role"],
                                 institution_code=values["institution_code"] or None)
        except ApiError as error:
            errors.append(_row_error(source, _field_of(error.code), error.code, error.message))
            continue
        good.append((source, values))
    return good, errors


# --- importing -------------------------------------------------------------------------------

def one_time_password(username: str, settings: Settings) -> str:
    """Return a generated password for ``username`` that no spreadsheet reads as a formula."""
    for _attempt in range(100):
        password = passwords.generate_password(username, settings)
        if not password.startswith(_FORMULA_START):
            return password
    raise RuntimeError("could not generate a password without a formula character first in 100 attempts")


def import_users(request: Request, session: Session, caller: Principal, rows: list[SourceRow], mode: str,
                 filename: str) -> ImportResult:
    """Check ``rows`` and stage the importable users with one audit event; the caller commits.

    In mode ``all_or_nothing`` a single bad row means nothing is staged. A row that passed the
    check but fails when staged (changed by a concurrent write) raises 409 ``IMPORT_CONFLICT``.
    """
    started = time.monotonic()
    good, errors = check_rows(session, caller, rows)
    if errors and mode != "valid_only":
        good = []
    session.rollback()  # end the read transaction of the checks; nothing was written
    settings: Settings = request.app.state.settings
    one_time = [one_time_password(values["username"], settings) for _source, values in good]
    hashes = [hash_one_time_password(password) for password in one_time]
    created: list[tuple[str, str]] = []
    for (source, values), password, password_hash in zip(good, one_time, hashes, strict=True):
        try:
            users.stage_user(session, request, caller, username=values["username"],
                             display_name=values["display_name"], email=values["email"], role=values["role"],
                             institution_code=values["institution_code"] or None, password=password,
                             password_hash=password_hash)
        except ApiError as error:
            raise conflict("IMPORT_CONFLICT",
                           f"第 {source.row} 行在检查之后被其他操作改变：{error.message}本次未导入任何用户，请重新上传。"
                           ) from None
        created.append((values["username"], password))
    result = ImportResult(mode=mode, total_rows=len(rows), imported=len(created),
                          errors=sorted(errors, key=lambda error: error.row), passwords=created)
    if created:
        add_event(session, request, caller, "users.import", "users",
                  detail={"file": filename[:200], "mode": mode, "rows": result.total_rows,
                          "imported": result.imported, "rejected": result.rejected_rows,
                          "usernames": [username for username, _password in created]})
    logger.info("user import of %s by %s: %d rows, %d staged, %d rejected in %.1f s", filename[:200],
                caller.username, result.total_rows, result.imported, result.rejected_rows,
                time.monotonic() - started)
    return result


def _audit_failure(request: Request, caller: Principal, error: ApiError, detail: dict[str, Any]) -> None:
    outcome = "denied" if error.status == 403 else "failed"
    record_event(request, caller, "users.import", "users", outcome, {"code": error.code, **detail})


def run_import(request: Request, session: Session, caller: Principal, data: bytes, filename: str,
               mode: str) -> ImportResult:
    """Parse, check and import one file in one transaction.

    A rejected file, or a result with nothing imported, is rolled back and audited as ``failed``.
    """
    try:
        rows = read_rows(data, filename)
        result = import_users(request, session, caller, rows, mode, filename)
    except ApiError as error:
        session.rollback()
        _audit_failure(request, caller, error, {"file": filename[:200]})
        raise
    if not result.imported:
        session.rollback()
        record_event(request, caller, "users.import", "users", "failed",
                     {"code": "IMPORT_ROWS_INVALID", "file": filename[:200], "mode": mode,
                      "rows": result.total_rows, "imported": 0, "rejected": result.rejected_rows})
        return result
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        logger.warning("user import of %s hit a unique constraint", filename[:200])
        error = conflict("IMPORT_CONFLICT", "导入期间有用户名被其他操作占用，本次未导入任何用户。请重新上传。")
        _audit_failure(request, caller, error, {"file": filename[:200]})
        raise error from None
    return result


def import_summary(result: ImportResult) -> str:
    if not result.errors:
        return f"已导入全部 {result.imported} 个用户。"
    if result.mode == "valid_only" and result.imported:
        return (f"共 {result.total_rows} 行，已导入 {result.imported} 行；{result.rejected_rows} 行有错误未导入，"
                "请按错误列表修正这些行后重新导入。")
    if result.mode == "valid_only":
        return f"共 {result.total_rows} 行，全部有错误，本次未导入任何用户。请按错误列表修正后重新上传。"
    return (f"共 {result.total_rows} 行，其中 {result.rejected_rows} 行有错误，本次未导入任何用户。"
            "请按错误列表修正后重新上传；如只想导入正确的行，请选择“仅导入正确的行”（mode=valid_only）。")


def result_body(result: ImportResult) -> dict[str, Any]:
    """Return the JSON body of an import: code, Chinese summary, counts, rejected rows and one-time passwords."""
    return {
        "code": "IMPORT_DONE" if result.imported else "IMPORT_ROWS_INVALID",
        "detail": import_summary(result),
        "mode": result.mode,
        "total_rows": result.total_rows,
        "imported": result.imported,
        "rejected_rows": result.rejected_rows,
        "errors": [{"row": e.row, "column": e.column, "value": e.value, "code": e.code, "message": e.message}
                   for e in result.errors],
        "passwords": [{"username": username, "password": password} for username, password in result.passwords],
    }


# --- files -----------------------------------------------------------------------------------

def write_xlsx(rows: Iterable[list[str]]) -> bytes:
    return spreadsheets.write_xlsx(rows, "用户")


def template_rows() -> list[list[str]]:
    return [COLUMNS]


def error_report_rows(errors: Iterable[RowError]) -> Iterator[list[str]]:
    yield ["行号", "列", "值", "错误代码", "错误说明"]
    for error in errors:
        yield [str(error.row), error.column, error.value, error.code, error.message]


def password_rows(created: Iterable[tuple[str, str]]) -> Iterator[list[str]]:
    yield ["用户名", "一次性初始密码"]
    for username, password in created:
        yield [username, password]
