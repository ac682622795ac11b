"""Bulk import (CSV in UTF-8 or GB18030, XLSX) and export of institutions, with formula escaping."""

from __future__ import annotations

import csv
import io
import json
import secrets

from openpyxl import Workbook, load_workbook
from sqlalchemy import func, select
from stdnum.cn import uscc as uscc_number

from admin_api.institution_files import MAX_ROWS
from admin_api.models import AuditEvent, Institution

from .conftest import Env
from .helpers import audit_events
from .test_institutions import create, env, make_uscc  # noqa: F401  (env: this module's own environment)

HEADER = ["机构代码", "机构名称", "统一社会信用代码", "金融许可证号", "机构类型", "上级机构代码", "联系人", "联系电话", "联系邮箱"]


def rows_for(prefix: str, count: int, seed: int) -> list[list[str]]:
    """Return ``count`` valid rows with unique codes, names and USCCs."""
    return [[f"{prefix}_{index:04d}", f"导入机构{prefix}{index:04d}", make_uscc(seed + index), f"L{index:05d}", "银行",
             "", "联系人", "021-5555 0000", f"c{index}@bank.example"] for index in range(count)]


def csv_bytes(rows: list[list[str]], header: list[str] = HEADER, encoding: str = "utf-8") -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode(encoding)


def upload(env: Env, content: bytes, name: str = "机构.csv", mode: str | None = None, request_id: str | None = None):
    headers = env.auth("sysadmin")
    if request_id:
        headers = {**headers, "X-Request-ID": request_id}
    params = {"mode": mode} if mode else {}
    return env.client.post("/api/v1/institutions/import", params=params, headers=headers,
                           files={"file": (name, content)})


def codes_with_prefix(env: Env, prefix: str) -> int:
    with env.db() as session:
        return session.scalar(select(func.count()).select_from(Institution)
                              .where(Institution.code.like(f"{prefix}\\_%", escape="\\"))) or 0


def prefix() -> str:
    return f"i{secrets.token_hex(4)}"


def thousand_rows_three_bad(code_prefix: str) -> tuple[list[list[str]], dict[int, str]]:
    """Return 1,000 rows where rows 11, 501 and 1001 of the sheet are bad, with the column each breaks."""
    rows = rows_for(code_prefix, 1000, seed=secrets.randbelow(10**8))
    good_uscc = rows[9][2]
    rows[9][2] = good_uscc[:-1] + ("0" if good_uscc[-1] != "0" else "1")  # wrong check character, sheet row 11
    rows[499][4] = "典当行"  # not an institution type, sheet row 501
    rows[999][0] = rows[3][0]  # same code as sheet row 5, sheet row 1001
    return rows, {11: "统一社会信用代码", 501: "机构类型", 1001: "机构代码"}


def test_import_all_or_nothing_rejects(env: Env) -> None:
    code_prefix = prefix()
    rows, bad = thousand_rows_three_bad(code_prefix)
    request_id = f"imp-{secrets.token_hex(6)}"

    response = upload(env, csv_bytes(rows), request_id=request_id)

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "IMPORT_ROWS_INVALID"
    assert "未导入任何机构" in body["detail"]
    assert (body["total_rows"], body["imported"], body["rejected_rows"]) == (1000, 0, 3)
    assert {(error["row"], error["column"]) for error in body["errors"]} == set(bad.items())
    by_row = {error["row"]: error for error in body["errors"]}
    assert "校验码错误" in by_row[11]["message"]
    assert by_row[11]["value"] == rows[9][2]
    assert "典当行" in by_row[501]["message"]
    assert "与第 5 行重复" in by_row[1001]["message"]
    assert codes_with_prefix(env, code_prefix) == 0
    failed = [event for event in audit_events(env, request_id) if event.action == "institutions.import"]
    assert [event.outcome for event in failed] == ["failed"]
    assert json.loads(failed[0].detail)["rejected"] == 3


def test_import_valid_only_imports_good(env: Env) -> None:
    code_prefix = prefix()
    rows, bad = thousand_rows_three_bad(code_prefix)
    request_id = f"imp-{secrets.token_hex(6)}"

    response = upload(env, csv_bytes(rows), mode="valid_only", request_id=request_id)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["imported"], body["rejected_rows"]) == (997, 3)
    assert {error["row"] for error in body["errors"]} == set(bad)
    assert codes_with_prefix(env, code_prefix) == 997
    stored = [event for event in audit_events(env, request_id) if event.action == "institutions.import"]
    assert [event.outcome for event in stored] == ["success"]
    assert json.loads(stored[0].detail) == {"file": "机构.csv", "mode": "valid_only", "rows": 1000,
                                            "imported": 997, "rejected": 3}
    with env.db() as session:
        sample = session.scalars(select(Institution).where(Institution.code == f"{code_prefix}_0000")).one()
    assert (sample.licence_no, sample.contact_phone, sample.status) == ("L00000", "021-5555 0000", "active")


def test_import_all_good_commits(env: Env) -> None:
    code_prefix = prefix()

    response = upload(env, b"\xef\xbb\xbf" + csv_bytes(rows_for(code_prefix, 3, seed=secrets.randbelow(10**8))))

    assert response.status_code == 200, response.text
    assert response.json()["imported"] == 3
    assert response.json()["errors"] == []
    assert codes_with_prefix(env, code_prefix) == 3


def test_import_gb18030_csv(env: Env) -> None:
    code_prefix = prefix()
    rows = rows_for(code_prefix, 2, seed=secrets.randbelow(10**8))

    response = upload(env, csv_bytes(rows, encoding="gb18030"))

    assert response.status_code == 200, response.text
    with env.db() as session:
        names = sorted(session.scalars(select(Institution.name).where(Institution.code.like(f"{code_prefix}%"))))
    assert names == [f"导入机构{code_prefix}0000", f"导入机构{code_prefix}0001"]


def test_import_duplicates_against_database(env: Env) -> None:
    existing = create(env)
    code_prefix = prefix()
    rows = rows_for(code_prefix, 3, seed=secrets.randbelow(10**8))
    rows[0][0] = existing["code"]
    rows[1][1] = existing["name"]
    rows[2][2] = existing["uscc"]

    response = upload(env, csv_bytes(rows))

    assert response.status_code == 422
    errors = {(error["row"], error["column"]): error["message"] for error in response.json()["errors"]}
    assert set(errors) == {(2, "机构代码"), (3, "机构名称"), (4, "统一社会信用代码")}
    assert all(existing["code"] in message for message in errors.values())


def test_import_parent_in_file(env: Env) -> None:
    code_prefix = prefix()
    rows = rows_for(code_prefix, 3, seed=secrets.randbelow(10**8))
    rows[0][5] = rows[2][0]  # branch listed before its parent
    rows[1][5] = "bank_a"

    response = upload(env, csv_bytes(rows))

    assert response.status_code == 200, response.text
    with env.db() as session:
        branch = session.scalars(select(Institution).where(Institution.code == rows[0][0])).one()
        other = session.scalars(select(Institution).where(Institution.code == rows[1][0])).one()
        assert (branch.parent_code, other.parent_code) == (rows[2][0], "bank_a")


def test_import_parent_errors(env: Env) -> None:
    code_prefix = prefix()
    rows = rows_for(code_prefix, 5, seed=secrets.randbelow(10**8))
    rows[0][5] = "no_such_parent"
    rows[1][5] = rows[1][0]  # itself
    rows[2][5] = rows[3][0]  # row 5 is a branch of bank_a
    rows[3][5] = "bank_a"

    response = upload(env, csv_bytes(rows))

    codes = {error["row"]: error["code"] for error in response.json()["errors"]}
    assert codes == {2: "INSTITUTION_PARENT_NOT_FOUND", 3: "INSTITUTION_PARENT_CYCLE",
                     4: "INSTITUTION_PARENT_NOT_LEGAL_ENTITY"}


def test_import_valid_only_skips_branch_of_bad_parent(env: Env) -> None:
    code_prefix = prefix()
    rows = rows_for(code_prefix, 2, seed=secrets.randbelow(10**8))
    rows[0][4] = "钱庄"
    rows[1][5] = rows[0][0]

    response = upload(env, csv_bytes(rows), mode="valid_only")

    assert response.status_code == 422
    codes = {error["row"]: error["code"] for error in response.json()["errors"]}
    assert codes == {2: "INSTITUTION_TYPE_INVALID", 3: "IMPORT_PARENT_ROW_INVALID"}
    assert codes_with_prefix(env, code_prefix) == 0


def xlsx_bytes(rows: list[list[object]], header: list[str] = HEADER) -> bytes:
    workbook = Workbook()
    sheet = workbook.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def digit_only_uscc(*, float_breaks: bool = False) -> str:
    """Return a valid all-digit USCC; with ``float_breaks``, one that a float cannot keep valid."""
    for _attempt in range(1000):
        candidate = make_uscc()
        if not candidate.isdigit():
            continue
        rounded = str(int(float(candidate)))
        if not float_breaks or (rounded != candidate and not uscc_number.is_valid(rounded)):
            return candidate
    raise AssertionError("no suitable all-digit USCC found in 1,000 attempts")


def test_import_xlsx_numeric_and_text_cells(env: Env) -> None:
    code_prefix = prefix()
    text_uscc = digit_only_uscc()
    text_row = rows_for(code_prefix, 2, seed=secrets.randbelow(10**8))[1]
    text_row[3] = "00012345"  # licence number with leading zeros, stored as a text cell
    # Numbers up to 15 digits survive a numeric cell; an 18-digit USCC does not (next test).
    numeric_row: list[object] = [f"{code_prefix}_num", f"数字单元格{code_prefix}", text_uscc, 12345, "证券", None,
                                 "赵六", 13800138000, None]

    response = upload(env, xlsx_bytes([numeric_row, text_row]), name="机构.xlsx")

    assert response.status_code == 200, response.text
    with env.db() as session:
        numeric = session.scalars(select(Institution).where(Institution.code == f"{code_prefix}_num")).one()
        text = session.scalars(select(Institution).where(Institution.code == text_row[0])).one()
    assert (numeric.uscc, numeric.licence_no, numeric.contact_phone) == (text_uscc, "12345", "13800138000")
    assert text.licence_no == "00012345"


def test_import_xlsx_numeric_uscc_precision_lost(env: Env) -> None:
    numeric_uscc = digit_only_uscc(float_breaks=True)
    rounded = float(numeric_uscc)  # Excel and openpyxl store numbers as IEEE doubles, 15 to 17 significant digits
    row: list[object] = [f"{prefix()}_float", "精度丢失机构", rounded, None, "银行", None, None, None, None]

    response = upload(env, xlsx_bytes([row]), name="机构.xlsx")

    assert response.status_code == 422
    error = response.json()["errors"][0]
    assert error["column"] == "统一社会信用代码"
    assert "数字格式" in error["message"]


def test_import_unknown_column(env: Env) -> None:
    response = upload(env, csv_bytes([], header=HEADER + ["备注"]))

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_COLUMN_UNKNOWN"
    assert "备注" in response.json()["detail"]


def test_import_missing_column(env: Env) -> None:
    response = upload(env, csv_bytes([], header=["机构代码", "机构名称"]))

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_COLUMNS_MISSING"
    assert "统一社会信用代码、机构类型" in response.json()["detail"]


def test_import_too_many_rows(env: Env) -> None:
    rows = [[f"x_{index}", f"n{index}", "", "", "银行", "", "", "", ""] for index in range(MAX_ROWS + 1)]

    response = upload(env, csv_bytes(rows))

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_TOO_MANY_ROWS"
    assert "5000" in response.json()["detail"]


def test_import_too_large(env: Env) -> None:
    response = upload(env, csv_bytes([]) + b"#" * (10 * 1024 * 1024))

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_FILE_TOO_LARGE"
    assert "10 MB" in response.json()["detail"]


def test_import_undecodable(env: Env) -> None:
    response = upload(env, csv_bytes([]) + b"\xff\xff\xff")

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_ENCODING_INVALID"


def test_import_broken_xlsx(env: Env) -> None:
    response = upload(env, b"PK\x03\x04 not really a zip", name="机构.xlsx")

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_FILE_INVALID"


def test_import_xls_rejected(env: Env) -> None:
    response = upload(env, b"\xd0\xcf\x11\xe0", name="机构.xls")

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_FORMAT_UNSUPPORTED"


def test_export_csv_escapes_formulas(env: Env) -> None:
    created = create(env, name=f"=HYPERLINK(\"x\"){secrets.token_hex(3)}", contact_name="@SUM(1)",
                     contact_phone="+86 21 1234 5678")
    request_id = f"exp-{secrets.token_hex(6)}"

    response = env.client.get("/api/v1/institutions/export", params={"format": "csv"},
                              headers={**env.auth("sysadmin"), "X-Request-ID": request_id})

    assert response.status_code == 200
    assert response.content.startswith(b"\xef\xbb\xbf")
    records = list(csv.reader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert records[0][:9] == HEADER
    row = next(record for record in records if record[0] == created["code"])
    assert row[1] == "'" + created["name"]
    assert row[6] == "'@SUM(1)"
    assert row[7] == "'+86 21 1234 5678"
    assert row[2] == created["uscc"]
    stored = [event for event in audit_events(env, request_id) if event.action == "institutions.export"]
    assert [event.outcome for event in stored] == ["success"]


def test_export_xlsx_escapes_formulas(env: Env) -> None:
    created = create(env, name=f"-{secrets.token_hex(3)}银行", contact_name="=1+1")

    response = env.client.get("/api/v1/institutions/export", params={"format": "xlsx"}, headers=env.auth("sysadmin"))

    assert response.status_code == 200
    sheet = load_workbook(io.BytesIO(response.content)).worksheets[0]
    rows = {row[0].value: row for row in sheet.iter_rows(min_row=2)}
    row = rows[created["code"]]
    assert row[1].value == "'" + created["name"]
    assert row[1].data_type == "s"
    assert row[6].value == "'=1+1"
    assert row[6].data_type == "s"


def test_export_institution_user_own_only(env: Env) -> None:
    response = env.client.get("/api/v1/institutions/export", headers=env.auth("reporter_b"))

    records = list(csv.reader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert [record[0] for record in records[1:]] == ["bank_b"]


def test_export_reimports_cleanly(env: Env) -> None:
    """An exported row is accepted by the import checks, apart from the duplicates it now is."""
    created = create(env)
    exported = env.client.get("/api/v1/institutions/export", headers=env.auth("sysadmin")).content
    records = list(csv.reader(io.StringIO(exported.decode("utf-8-sig"))))
    header = records[0][:10]
    row = next(record for record in records if record[0] == created["code"])[:10]

    response = upload(env, csv_bytes([row], header=header))

    columns = {error["column"] for error in response.json()["errors"]}
    assert columns == {"机构代码", "机构名称", "统一社会信用代码"}


def test_template_download(env: Env) -> None:
    response = env.client.get("/api/v1/institutions/import/template", params={"format": "xlsx"},
                              headers=env.auth("sysadmin"))

    assert response.status_code == 200
    sheet = load_workbook(io.BytesIO(response.content)).worksheets[0]
    assert [cell.value for cell in next(sheet.iter_rows(max_row=1))] == HEADER + ["状态"]


def test_demo_uscc_survive_import_check(env: Env) -> None:
    with env.db() as session:
        usccs = list(session.scalars(select(Institution.uscc).where(Institution.code.in_(["bank_a", "bank_b", "bank_c"]))))
    assert len(usccs) == 3
    assert all(uscc_number.is_valid(value) for value in usccs)


def test_import_failure_audited_once(env: Env) -> None:
    request_id = f"imp-{secrets.token_hex(6)}"

    upload(env, csv_bytes([], header=["机构代码"]), request_id=request_id)

    with env.db() as session:
        stored = list(session.scalars(select(AuditEvent).where(AuditEvent.request_id == request_id,
                                                               AuditEvent.action == "institutions.import")))
    assert [(event.outcome, json.loads(event.detail)["code"]) for event in stored] == [
        ("failed", "IMPORT_COLUMNS_MISSING")]


def test_import_header_only_rejected(env: Env) -> None:
    response = upload(env, csv_bytes([]))

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_FILE_EMPTY"
    assert "只有表头" in response.json()["detail"]
