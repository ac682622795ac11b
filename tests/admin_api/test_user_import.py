"""Bulk import of users from CSV (UTF-8, GB18030) and XLSX: all or nothing, valid rows only, passwords, denials."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import secrets
import time
from collections.abc import Iterator

import pytest
from openpyxl import Workbook, load_workbook
from sqlalchemy import select

from admin_api.institution_files import RowError
from admin_api.models import AuditEvent, User
from admin_api.user_files import MAX_ROWS, error_report_rows, password_rows, write_csv

from .conftest import BACKENDS, Env, backend_env
from .helpers import audit_events
from .test_console_keys import _signed_in
from .test_passwords import sign_in

HEADER = ["用户名", "姓名", "电子邮箱", "角色", "机构代码"]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
INJECTION = '=HYPERLINK("http://127.0.0.1/x","点我")'


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """An environment of the module's own, so the imported users stay out of other modules' user lists."""
    yield from backend_env(request.param, tmp_path_factory, "userimport")


def prefix() -> str:
    return f"u{secrets.token_hex(4)}"


def rows_for(name_prefix: str, count: int) -> list[list[str]]:
    """Return ``count`` valid rows cycling through an institution role, a Chinese role name and a regulator role."""
    kinds = [("reporter", "bank_a"), ("建模人员", "bank_b"), ("regulator_reviewer", "")]
    rows = []
    for index in range(count):
        role, code = kinds[index % len(kinds)]
        rows.append([f"{name_prefix}_{index:04d}", f"导入用户{index:04d}", f"u{index}@import.example", role, code])
    return rows


def csv_bytes(rows: list[list[str]], header: list[str] = HEADER, encoding: str = "utf-8") -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode(encoding)


def xlsx_bytes(rows: list[list[object]], header: list[str] = HEADER) -> bytes:
    workbook = Workbook()
    sheet = workbook.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def upload(env: Env, content: bytes, name: str = "用户.csv", mode: str | None = None,
           request_id: str | None = None, username: str = "sysadmin"):  # noqa: ANN201
    headers = env.auth(username)
    if request_id:
        headers = {**headers, "X-Request-ID": request_id}
    params = {"mode": mode} if mode else {}
    return env.client.post("/api/v1/users/import", params=params, headers=headers, files={"file": (name, content)})


def stored_users(env: Env, name_prefix: str) -> list[User]:
    with env.db() as session:
        query = select(User).where(User.username.like(f"{name_prefix}\\_%", escape="\\")).order_by(User.username)
        return list(session.scalars(query).unique())


def import_events(env: Env, request_id: str) -> list[AuditEvent]:
    return [event for event in audit_events(env, request_id) if event.action == "users.import"]


def thousand_rows_with_bad(name_prefix: str) -> tuple[list[list[str]], dict[int, tuple[str, str]]]:
    """Return 1,000 rows with 11 bad ones, and {sheet row: (column, error code)} of the bad rows."""
    rows = rows_for(name_prefix, 1000)
    rows[9][0] = "Bad Name"
    rows[99][2] = "not-an-email"
    rows[199][3] = "典当员"
    rows[300][4] = ""  # index 300 is a reporter of bank_a
    rows[401][4] = "bank_a"  # index 401 is a regulator_reviewer
    rows[501][4] = "no_such_bank"  # index 501 is a modeller
    rows[599][0] = rows[3][0]
    rows[699][0] = "reviewer"
    rows[799][1] = ""
    rows[998][1] = "长" * 101
    rows[999][0] = INJECTION
    bad = {
        11: ("用户名", "USERNAME_INVALID"),
        101: ("电子邮箱", "EMAIL_INVALID"),
        201: ("角色", "ROLE_INVALID"),
        302: ("机构代码", "INSTITUTION_REQUIRED"),
        403: ("机构代码", "INSTITUTION_NOT_ALLOWED"),
        503: ("机构代码", "INSTITUTION_NOT_FOUND"),
        601: ("用户名", "IMPORT_DUPLICATE_IN_FILE"),
        701: ("用户名", "USER_EXISTS"),
        801: ("姓名", "IMPORT_VALUE_MISSING"),
        1000: ("姓名", "IMPORT_VALUE_TOO_LONG"),
        1001: ("用户名", "USERNAME_INVALID"),
    }
    return rows, bad


def test_thousand_rows_all_or_nothing(env: Env) -> None:
    name_prefix = prefix()
    rows, bad = thousand_rows_with_bad(name_prefix)
    request_id = f"uimp-{secrets.token_hex(6)}"

    started = time.monotonic()
    response = upload(env, csv_bytes(rows), request_id=request_id)
    elapsed = time.monotonic() - started

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "IMPORT_ROWS_INVALID"
    assert "本次未导入任何用户" in body["detail"]
    assert (body["total_rows"], body["imported"], body["rejected_rows"]) == (1000, 0, 11)
    assert {error["row"]: (error["column"], error["code"]) for error in body["errors"]} == bad
    by_row = {error["row"]: error for error in body["errors"]}
    assert by_row[11]["value"] == "Bad Name"
    assert "以小写字母开头" in by_row[11]["message"]
    assert "no_such_bank" in by_row[503]["message"]
    assert "与第 5 行重复" in by_row[601]["message"]
    assert "已被使用" in by_row[701]["message"]
    assert by_row[1001]["value"] == INJECTION
    assert body["passwords"] == []
    assert stored_users(env, name_prefix) == []
    events = import_events(env, request_id)
    assert [event.outcome for event in events] == ["failed"]
    assert json.loads(events[0].detail)["rejected"] == 11
    assert elapsed < 60, f"checking 1,000 rows took {elapsed:.1f} s"


def test_valid_only_imports_good_rows(env: Env) -> None:
    name_prefix = prefix()
    rows = rows_for(name_prefix, 12)
    rows[2][0] = "x"  # too short
    rows[5][3] = "no_role"
    rows[7][4] = "no_such_bank"
    request_id = f"uimp-{secrets.token_hex(6)}"

    response = upload(env, csv_bytes(rows), mode="valid_only", request_id=request_id)

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["code"] == "IMPORT_DONE"
    assert (body["imported"], body["rejected_rows"]) == (9, 3)
    assert {error["row"] for error in body["errors"]} == {4, 7, 9}
    expected = [row[0] for index, row in enumerate(rows) if index not in (2, 5, 7)]
    assert [item["username"] for item in body["passwords"]] == expected
    assert [user.username for user in stored_users(env, name_prefix)] == sorted(expected)
    assert all(user.must_change_password for user in stored_users(env, name_prefix))
    modeller = next(user for user in stored_users(env, name_prefix) if user.username == rows[1][0])
    assert (modeller.role, modeller.institution_code) == ("modeller", "bank_b")
    passwords = {item["username"]: item["password"] for item in body["passwords"]}
    assert not any(password.startswith(FORMULA_START) for password in passwords.values())
    first = sign_in(env, rows[0][0], passwords[rows[0][0]])
    assert first.status_code == 403
    assert first.json()["code"] == "PASSWORD_CHANGE_REQUIRED"
    events = import_events(env, request_id)
    assert [event.outcome for event in events] == ["success"]
    detail = json.loads(events[0].detail)
    assert detail == {"file": "用户.csv", "mode": "valid_only", "rows": 12, "imported": 9, "rejected": 3,
                      "usernames": expected}
    assert not any(password in events[0].detail for password in passwords.values())


def test_all_good_rows_imported(env: Env) -> None:
    name_prefix = prefix()

    response = upload(env, csv_bytes(rows_for(name_prefix, 3)))

    assert response.status_code == 200, response.text
    assert response.json()["detail"] == "已导入全部 3 个用户。"
    assert len(stored_users(env, name_prefix)) == 3


def test_xlsx_chinese_headers(env: Env) -> None:
    name_prefix = prefix()
    rows: list[list[object]] = [[f"{name_prefix}_x1", "表格用户甲", "x1@import.example", "报送人员", "bank_c"],
                                [f"{name_prefix}_x2", "表格用户乙", "x2@import.example", "监管审查员", None]]

    response = upload(env, xlsx_bytes(rows), name="用户.xlsx")

    assert response.status_code == 200, response.text
    stored = {user.username: user for user in stored_users(env, name_prefix)}
    assert (stored[f"{name_prefix}_x1"].role, stored[f"{name_prefix}_x1"].institution_code) == ("reporter", "bank_c")
    assert (stored[f"{name_prefix}_x2"].role, stored[f"{name_prefix}_x2"].institution_code) == (
        "regulator_reviewer", None)
    assert stored[f"{name_prefix}_x1"].display_name == "表格用户甲"


def test_gb18030_csv(env: Env) -> None:
    name_prefix = prefix()
    rows = [[f"{name_prefix}_g1", "欧阳锋", "g1@import.example", "建模人员", "bank_a"]]

    response = upload(env, csv_bytes(rows, encoding="gb18030"))

    assert response.status_code == 200, response.text
    assert [user.display_name for user in stored_users(env, name_prefix)] == ["欧阳锋"]


def test_utf8_bom_english_headers(env: Env) -> None:
    name_prefix = prefix()
    header = ["Username", "display_name", "email", "role", "institution_code"]
    rows = [[f"{name_prefix}_e1", "英文表头", "e1@import.example", "reporter", "bank_b"]]

    response = upload(env, b"\xef\xbb\xbf" + csv_bytes(rows, header=header))

    assert response.status_code == 200, response.text
    assert [user.institution_code for user in stored_users(env, name_prefix)] == ["bank_b"]


@pytest.mark.parametrize(
    ("content", "name", "code", "fragment"),
    [
        (csv_bytes([["a_1", "甲", "a@x.example", "reporter", "bank_a", "Pass-word-123"]], header=HEADER + ["密码"]),
         "用户.csv", "IMPORT_COLUMN_UNKNOWN", "密码"),
        (csv_bytes([["a_1", "甲", "reporter"]], header=["用户名", "姓名", "角色"]), "用户.csv",
         "IMPORT_COLUMNS_MISSING", "电子邮箱"),
        (csv_bytes([], header=HEADER), "用户.csv", "IMPORT_FILE_EMPTY", "没有数据行"),
        (b"", "用户.csv", "IMPORT_FILE_EMPTY", "为空"),
        (b"\xd0\xcf\x11\xe0", "用户.xls", "IMPORT_FORMAT_UNSUPPORTED", ".xlsx"),
        (b"\xff\xfe\x00\xd8\x00\x00", "用户.csv", "IMPORT_ENCODING_INVALID", "UTF-8"),
        (b"PK\x03\x04broken", "用户.xlsx", "IMPORT_FILE_INVALID", "XLSX"),
    ],
)
def test_file_rejected(env: Env, content: bytes, name: str, code: str, fragment: str) -> None:
    request_id = f"uimp-{secrets.token_hex(6)}"

    response = upload(env, content, name=name, request_id=request_id)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert fragment in response.json()["detail"]
    assert [(event.outcome, json.loads(event.detail)["code"]) for event in import_events(env, request_id)] == [
        ("failed", code)]


def test_too_many_rows_rejected(env: Env) -> None:
    name_prefix = prefix()

    response = upload(env, csv_bytes(rows_for(name_prefix, MAX_ROWS + 1)))

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_TOO_MANY_ROWS"
    assert f"超过 {MAX_ROWS} 行" in response.json()["detail"]
    assert stored_users(env, name_prefix) == []


def test_oversized_file_rejected(env: Env) -> None:
    name_prefix = prefix()
    padding = [[f"{name_prefix}_p", "填" * 100, "p@import.example", "reporter", "bank_a"]] * 20000

    response = upload(env, csv_bytes(padding))

    assert response.status_code == 422
    assert response.json()["code"] == "IMPORT_FILE_TOO_LARGE"
    assert "5 MB" in response.json()["detail"]
    assert stored_users(env, name_prefix) == []


def test_template_download(env: Env) -> None:
    xlsx = env.client.get("/api/v1/users/import/template", headers=env.auth("sysadmin"))
    csv_file = env.client.get("/api/v1/users/import/template", params={"format": "csv"},
                              headers=env.auth("sysadmin"))

    assert xlsx.status_code == 200
    sheet = load_workbook(io.BytesIO(xlsx.content)).active
    assert [cell.value for cell in sheet[1]] == HEADER
    assert csv_file.content.decode("utf-8-sig").strip() == ",".join(HEADER)


def test_report_files_escape_formulas() -> None:
    errors = [RowError(3, "用户名", INJECTION, "USERNAME_INVALID", "用户名无效")]

    report = write_csv(error_report_rows(errors)).decode("utf-8-sig")
    passwords = write_csv(password_rows([("alice_1", "+Abc-123"), ("bob_1", "@Home-99")])).decode("utf-8-sig")

    assert list(csv.reader(io.StringIO(report)))[1] == ["3", "用户名", "'" + INJECTION, "USERNAME_INVALID", "用户名无效"]
    assert list(csv.reader(io.StringIO(passwords)))[1:] == [["alice_1", "'+Abc-123"], ["bob_1", "'@Home-99"]]


@pytest.mark.parametrize("username", ["reporter_a", "reviewer", "modeller_a", "secadmin", "auditor", "analyst"])
def test_other_roles_forbidden(env: Env, username: str) -> None:
    name_prefix = prefix()
    request_id = f"uimp-{secrets.token_hex(6)}"

    response = upload(env, csv_bytes(rows_for(name_prefix, 2)), request_id=request_id, username=username)

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"
    assert stored_users(env, name_prefix) == []
    denials = [(event.actor, event.action, event.outcome) for event in audit_events(env, request_id)]
    assert denials == [(username, "users.write", "denied")]


def test_anonymous_rejected(env: Env) -> None:
    response = env.client.post("/api/v1/users/import", files={"file": ("用户.csv", csv_bytes(rows_for(prefix(), 1)))})

    assert response.status_code == 401
    assert response.json()["code"] == "NOT_AUTHENTICATED"


def test_institution_admin_own_institution(env: Env) -> None:
    name_prefix = prefix()
    rows = [[f"{name_prefix}_a1", "本行用户", "a1@bank-a.example", "reporter", ""],
            [f"{name_prefix}_a2", "本行用户乙", "a2@bank-a.example", "modeller", "bank_a"],
            [f"{name_prefix}_b1", "他行用户", "b1@bank-b.example", "reporter", "bank_b"],
            [f"{name_prefix}_r1", "监管用户", "r1@regulator.example", "regulator_reviewer", ""]]

    rejected = upload(env, csv_bytes(rows), username="instadmin_a")
    imported = upload(env, csv_bytes(rows), mode="valid_only", username="instadmin_a")

    assert rejected.status_code == 422
    assert {error["row"]: error["code"] for error in rejected.json()["errors"]} == {
        4: "INSTITUTION_FORBIDDEN", 5: "ROLE_NOT_ASSIGNABLE"}
    assert imported.status_code == 200, imported.text
    assert [(user.username, user.institution_code) for user in stored_users(env, name_prefix)] == [
        (f"{name_prefix}_a1", "bank_a"), (f"{name_prefix}_a2", "bank_a")]



# --- console form ----------------------------------------------------------------------------

_DATA_URI = re.compile(r'id="{}" download="[^"]+" href="data:text/csv;charset=utf-8;base64,([A-Za-z0-9+/=]+)"')


def data_uri_rows(page: str, element_id: str) -> list[list[str]]:
    """Decode the CSV file that the page offers as a data: URI link with ``element_id``."""
    match = re.search(_DATA_URI.pattern.format(element_id), page)
    assert match, f"no data: URI link #{element_id}"
    text = base64.b64decode(match.group(1)).decode("utf-8")
    assert text.startswith("\ufeff")
    return list(csv.reader(io.StringIO(text[1:])))


def test_console_page_has_import_form(env: Env) -> None:
    admin, _ = _signed_in(env, "sysadmin")

    page = admin.get("/console/users")

    assert 'id="import-users"' in page.text
    assert 'href="/console/users/import/template?format=xlsx"' in page.text


def test_console_import_passwords_once(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    name_prefix = prefix()
    rows = rows_for(name_prefix, 2)

    response = admin.post("/console/users/import", data={"csrf_token": csrf, "mode": "all_or_nothing"},
                          files={"file": ("用户.csv", csv_bytes(rows))})

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert "已导入全部 2 个用户" in response.text
    shown = re.findall(r'<code class="import-password">([^<]+)</code>', response.text)
    assert len(shown) == 2
    downloaded = data_uri_rows(response.text, "download-passwords")
    assert downloaded == [["用户名", "一次性初始密码"], [rows[0][0], shown[0]], [rows[1][0], shown[1]]]
    assert sign_in(env, rows[1][0], shown[1]).json()["code"] == "PASSWORD_CHANGE_REQUIRED"
    later = admin.get("/console/users", params={"q": name_prefix})
    assert f'id="user-{rows[0][0]}"' in later.text
    assert shown[0] not in later.text


def test_console_import_errors_escaped(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    name_prefix = prefix()
    rows = rows_for(name_prefix, 3)
    rows[1][0] = INJECTION
    rows[2][1] = "<script>alert(1)</script>"
    rows[2][2] = "=cmd|' /C calc'!A0"

    response = admin.post("/console/users/import", data={"csrf_token": csrf, "mode": "all_or_nothing"},
                          files={"file": ("用户.csv", csv_bytes(rows))})

    assert response.status_code == 422
    assert "本次未导入任何用户" in response.text
    assert "<script>alert(1)</script>" not in response.text
    assert 'id="download-passwords"' not in response.text
    report = data_uri_rows(response.text, "download-import-errors")
    assert report[0] == ["行号", "列", "值", "错误代码", "错误说明"]
    assert report[1][:4] == ["3", "用户名", "'" + INJECTION, "USERNAME_INVALID"]
    assert report[2][:4] == ["4", "电子邮箱", "'=cmd|' /C calc'!A0", "EMAIL_INVALID"]
    assert all(not cell.startswith(FORMULA_START) for row in report for cell in row)
    assert stored_users(env, name_prefix) == []


def test_console_import_without_csrf(env: Env) -> None:
    admin, _ = _signed_in(env, "sysadmin")
    name_prefix = prefix()

    response = admin.post("/console/users/import", data={"mode": "all_or_nothing"},
                          files={"file": ("用户.csv", csv_bytes(rows_for(name_prefix, 1)))})

    assert response.status_code == 403
    assert "表单已过期" in response.text
    assert stored_users(env, name_prefix) == []


def test_console_import_reporter_forbidden(env: Env) -> None:
    browser, csrf = _signed_in(env, "reporter_a")
    name_prefix = prefix()

    response = browser.post("/console/users/import", data={"csrf_token": csrf},
                            files={"file": ("用户.csv", csv_bytes(rows_for(name_prefix, 1)))})

    assert response.status_code == 403
    assert stored_users(env, name_prefix) == []


def test_console_import_oversized_file(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    name_prefix = prefix()
    padding = [[f"{name_prefix}_p", "填" * 100, "p@import.example", "reporter", "bank_a"]] * 20000

    response = admin.post("/console/users/import", data={"csrf_token": csrf},
                          files={"file": ("用户.csv", csv_bytes(padding))})

    assert response.status_code == 422
    assert "超过上限 5 MB" in response.text
    assert stored_users(env, name_prefix) == []
