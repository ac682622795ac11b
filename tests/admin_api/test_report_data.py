"""报表应用: aggregates, filters, detail pages and exports over accepted warehouse data, and who may query what.

The data are uploaded and accepted through the API for bank_a and bank_b in the periods 20251130
and 20251231, which no other test module uses. Expected numbers are computed by hand from the
rows in LOANS below.
"""

from __future__ import annotations

import csv
import io
import secrets
import tempfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openpyxl import load_workbook
from sqlalchemy import select

import intake.warehouse_query as warehouse_query
from admin_api import report_data
from admin_api.models import Institution
from admin_api.security import csrf_token
from intake.warehouse import load_submission
from regsandbox_core.platform_keys import open_keystore

from .conftest import Env
from .helpers import audit_events, console_cookie
from .test_submissions import LICENSE, accept, catalog, contract_row, customer_row, loan_row, text_file, upload
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS, served_admin_api  # noqa: F401 - fixture
from .test_submissions import bank_a_licence  # noqa: F401  # module fixture: bank_a gets the test files' 金融许可证号

LICENSE_B = "B0002H222000002"
FIRST, SECOND = "20251130", "20251231"
LOAN_TABLE = "EAST_DGXDYWJJB"
CUSTOMER_TABLE = "EAST_DGKHXXB"
CONTRACT_TABLE = "EAST_XDHTB"
FORMULA = "=1+2"
LOANS: dict[tuple[str, str], list[dict[str, str]]] = {
    ("bank_a", FIRST): [
        {"JJJE": "1000000.00", "JJYE": "800000.00", "WJFL": "01", "DBFS": "02;03", "DKYT": FORMULA},
        {"JJJE": "500000.00", "JJYE": "300000.00", "WJFL": "02", "DBFS": "01"},
    ],
    ("bank_a", SECOND): [
        {"JJJE": "1000000.00", "JJYE": "700000.00", "WJFL": "01", "DBFS": "02;03"},
        {"JJJE": "500000.00", "JJYE": "300000.00", "WJFL": "03", "DBFS": "01"},
    ],
    ("bank_b", FIRST): [
        {"JJJE": "2000000.00", "JJYE": "1500000.00", "WJFL": "01", "DBFS": "03"},
    ],
    ("bank_b", SECOND): [
        {"JJJE": "2000000.00", "JJYE": "1400000.00", "WJFL": "02", "DBFS": "03"},
        {"JJJE": "600000.00", "JJYE": "400000.00", "WJFL": "01", "DBFS": "02"},
    ],
}
REPORTERS = {"bank_a": ("reporter_a", LICENSE), "bank_b": ("reporter_b", LICENSE_B)}


@pytest.fixture(scope="module")
def bank_b_licence(env: Env) -> Iterator[None]:
    """Give bank_b the 金融许可证号 of its test files for this module, then restore it."""
    with env.db() as session:
        institution = session.scalars(select(Institution).where(Institution.code == "bank_b")).one()
        before, institution.licence_no = institution.licence_no, LICENSE_B
        session.commit()
    yield
    with env.db() as session:
        institution = session.scalars(select(Institution).where(Institution.code == "bank_b")).one()
        institution.licence_no = before
        session.commit()


def _upload_accepted(env: Env, institution: str, template_code: str, period: str, rows: list[dict[str, str]]) -> None:
    username, _licence = REPORTERS[institution]
    created = upload(env, username, template_code, period, text_file(template_code, rows))
    assert created.status_code == 201, created.text
    assert created.json()["state"] == "pending_review", created.json()
    accepted = accept(env, created.json()["id"])
    assert accepted.status_code == 200, accepted.text


@pytest.fixture(scope="module")
def seeded(env: Env, bank_a_licence: None, bank_b_licence: None) -> Env:  # noqa: F811
    """Upload and accept the customers, contracts and loans of LOANS in that order, so the loans' references hold."""
    for (institution, period), changes in LOANS.items():
        licence = REPORTERS[institution][1]
        numbers = range(1, len(changes) + 1)
        customers = [{**customer_row(number, period), "JRXKZH": licence} for number in numbers]
        _upload_accepted(env, institution, CUSTOMER_TABLE, period, customers)
        contracts = [{**contract_row(number, period), "JRXKZH": licence} for number in numbers]
        _upload_accepted(env, institution, CONTRACT_TABLE, period, contracts)
        loans = [loan_row(number, period, JRXKZH=licence, **change) for number, change in zip(numbers, changes)]
        _upload_accepted(env, institution, LOAN_TABLE, period, loans)
    return env


def query(env: Env, username: str | None, request_id: str | None = None, path: str = "query", **fields: Any) -> Any:
    body = {"template_code": LOAN_TABLE, "period_from": FIRST, "period_to": SECOND, **fields}
    headers = env.auth(username) if username else {}
    if request_id:
        headers = {**headers, "X-Request-ID": request_id}
    return env.client.post(f"/api/v1/report-data/{path}", headers=headers, json=body)


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def by_key(body: dict[str, Any]) -> list[dict[str, Any]]:
    keys = [column["key"] for column in body["columns"]]
    return [dict(zip(keys, row)) for row in body["rows"]]


def events(env: Env, request_id: str) -> list[tuple[str, str, str]]:
    return [(event.action, event.outcome, event.resource) for event in audit_events(env, request_id)]


# --- aggregates ------------------------------------------------------------------------------------


def test_aggregates_by_institution_period(seeded: Env) -> None:
    request_id = f"rd-{secrets.token_hex(6)}"
    body = ok(query(seeded, "analyst", request_id, institutions=["bank_a", "bank_b"],
                    group_by=["institution", "period"],
                    aggregates=[{"function": "count"}, {"function": "sum", "field": "JJYE"},
                                {"function": "avg", "field": "JJYE"}, {"function": "min", "field": "JJYE"},
                                {"function": "max", "field": "JJJE"}]))

    assert [(column["key"], column["name"]) for column in body["columns"]] == [
        ("institution", "机构代码"), ("institution_name", "机构名称"), ("period", "报告期"), ("count", "记录数"),
        ("sum_JJYE", "借据余额合计"), ("avg_JJYE", "借据余额平均值"), ("min_JJYE", "借据余额最小值"),
        ("max_JJJE", "借据金额最大值")]
    assert [row[:1] + row[2:] for row in body["rows"]] == [
        ["bank_a", "2025-11-30", 2, "1100000.00", "550000.0000", "300000.00", "1000000.00"],
        ["bank_a", "2025-12-31", 2, "1000000.00", "500000.0000", "300000.00", "1000000.00"],
        ["bank_b", "2025-11-30", 1, "1500000.00", "1500000.0000", "1500000.00", "2000000.00"],
        ["bank_b", "2025-12-31", 2, "1800000.00", "900000.0000", "400000.00", "2000000.00"],
    ]
    assert body["rows"][2][1] == "浦东示范银行乙"
    # 5,400,000.00 over 7 loans is 771,428.571428…, kept to the field's 2 decimals plus 2.
    assert body["totals"] == ["合计", "", "", 7, "5400000.00", "771428.5714", "300000.00", "2000000.00"]
    assert (body["row_count"], body["group_count"], body["partitions"], body["truncated"]) == (7, 4, 4, False)
    assert events(seeded, request_id) == [("report_data.query", "success", f"report_data:{LOAN_TABLE}")]
    detail = audit_events(seeded, request_id)[0].detail
    assert '"institutions": ["bank_a", "bank_b"]' in detail
    assert '"period_from": "20251130"' in detail
    assert '"rows": 4' in detail
    assert "1100000" not in detail


def test_group_by_five_level_class(seeded: Env) -> None:
    body = ok(query(seeded, "reviewer", institutions=["bank_a", "bank_b"], group_by=["WJFL"],
                    aggregates=[{"function": "count"}, {"function": "sum", "field": "JJYE"}]))

    assert [column["name"] for column in body["columns"]] == ["五级分类代码", "五级分类", "记录数", "借据余额合计"]
    assert body["rows"] == [["01", "正常", 4, "3400000.00"], ["02", "关注", 2, "1700000.00"],
                            ["03", "次级", 1, "300000.00"]]
    assert body["totals"] == ["合计", "", 7, "5400000.00"]
    assert body["notes"] == []


def test_multi_value_guarantee_counts_each(seeded: Env) -> None:
    body = ok(query(seeded, "reviewer", institutions=["bank_a", "bank_b"], group_by=["DBFS"],
                    aggregates=[{"function": "count"}, {"function": "sum", "field": "JJYE"}]))

    assert body["rows"] == [["01", "信用", 2, "600000.00"], ["02", "保证", 3, "1900000.00"],
                            ["03", "抵押", 4, "4400000.00"]]
    assert body["totals"] == ["合计", "", 7, "5400000.00"]
    assert len(body["notes"]) == 1
    assert "担保方式为多值字段" in body["notes"][0]


def test_filters_narrow_rows(seeded: Env) -> None:
    classified = ok(query(seeded, "analyst", institutions=["bank_a", "bank_b"], group_by=["institution"],
                          filters={"WJFL": ["02", "03"]},
                          aggregates=[{"function": "count"}, {"function": "sum", "field": "JJYE"}]))
    guaranteed = ok(query(seeded, "analyst", institutions=["bank_a", "bank_b"], filters={"DBFS": ["01"]},
                          aggregates=[{"function": "sum", "field": "JJYE"}]))
    one_period = ok(query(seeded, "analyst", institutions=["bank_b"], period_from=SECOND,
                          aggregates=[{"function": "count"}]))

    assert [row[:1] + row[2:] for row in classified["rows"]] == [["bank_a", 2, "600000.00"], ["bank_b", 1, "1400000.00"]]
    assert classified["totals"] == ["合计", "", 3, "2000000.00"]
    assert (guaranteed["rows"], guaranteed["totals"]) == ([[ "600000.00"]], ["600000.00"])
    assert (one_period["totals"], one_period["partitions"]) == ([2], 1)


# --- detail rows -----------------------------------------------------------------------------------


def test_detail_pages_masked(seeded: Env) -> None:
    first = ok(query(seeded, "reviewer", template_code=CUSTOMER_TABLE, institutions=["bank_a", "bank_b"],
                     mode="detail", limit=3))
    second = ok(query(seeded, "reviewer", template_code=CUSTOMER_TABLE, institutions=["bank_a", "bank_b"],
                      mode="detail", limit=3, offset=3))
    last = ok(query(seeded, "reviewer", template_code=CUSTOMER_TABLE, institutions=["bank_a", "bank_b"],
                    mode="detail", limit=3, offset=6))

    assert (first["row_count"], len(first["rows"]), first["truncated"]) == (7, 3, True)
    assert [(row["institution"], row["period"], row["KHTYBH"]) for row in by_key(first)] == [
        ("bank_a", "2025-11-30", "C0001"), ("bank_a", "2025-11-30", "C0002"), ("bank_a", "2025-12-31", "C0001")]
    assert [(row["institution"], row["period"], row["KHTYBH"]) for row in by_key(second)] == [
        ("bank_a", "2025-12-31", "C0002"), ("bank_b", "2025-11-30", "C0001"), ("bank_b", "2025-12-31", "C0001")]
    assert [(row["institution"], row["KHTYBH"]) for row in by_key(last)] == [("bank_b", "C0002")]
    assert last["truncated"] is False
    row = by_key(first)[0]
    assert (row["FDDBRXM"], row["FDDBRZJHM"], row["CWLXRSJ"]) == ("张**", "110105********002X", "138****5678")
    assert row["ZCZB"] == "5000000.00"
    assert sorted(first["masked_fields"]) == ["CWLXRSJ", "FDDBRXM", "FDDBRZJHM"]
    assert [column["name"] for column in first["columns"][:4]] == ["机构代码", "机构名称", "报告期", "金融许可证号"]
    text = str(first) + str(second) + str(last)
    for plain in ("张三丰", "11010519491231002X", "13812345678"):
        assert plain not in text


# --- exports ---------------------------------------------------------------------------------------


def test_export_csv_and_xlsx(seeded: Env) -> None:
    fields = {"institutions": ["bank_a", "bank_b"], "group_by": ["WJFL"],
              "aggregates": [{"function": "count"}, {"function": "sum", "field": "JJYE"}]}
    request_id = f"rd-{secrets.token_hex(6)}"
    as_csv = query(seeded, "analyst", request_id, path="export.csv", **fields)
    as_xlsx = query(seeded, "analyst", path="export.xlsx", **fields)

    assert as_csv.status_code == 200, as_csv.text
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert "filename*=utf-8''EAST_DGXDYWJJB_20251130-20251231_" in as_csv.headers["content-disposition"]
    assert as_csv.headers["cache-control"] == "no-store"
    table = list(csv.reader(io.StringIO(as_csv.content.decode("utf-8-sig"))))
    assert table == [["五级分类代码", "五级分类", "记录数", "借据余额合计"], ["01", "正常", "4", "3400000.00"],
                     ["02", "关注", "2", "1700000.00"], ["03", "次级", "1", "300000.00"], ["合计", "", "7", "5400000.00"]]
    assert as_xlsx.status_code == 200, as_xlsx.text
    sheet = load_workbook(io.BytesIO(as_xlsx.content), read_only=True).active
    cells = [list(row) for row in sheet.iter_rows(values_only=True)]
    assert cells[0] == ["五级分类代码", "五级分类", "记录数", "借据余额合计"]
    assert cells[1][:3] == ["01", "正常", 4]
    assert float(cells[1][3]) == 3400000.0
    assert cells[-1][0] == "合计"
    assert events(seeded, request_id) == [("report_data.export", "success", f"report_data:{LOAN_TABLE}")]
    assert '"format": "csv"' in audit_events(seeded, request_id)[0].detail


def test_detail_export_escapes_and_masks(seeded: Env) -> None:
    loans = query(seeded, "reviewer", path="export.csv", institutions=["bank_a"], period_to=FIRST, mode="detail")
    loans_xlsx = query(seeded, "reviewer", path="export.xlsx", institutions=["bank_a"], period_to=FIRST, mode="detail")
    customers = query(seeded, "reviewer", path="export.xlsx", template_code=CUSTOMER_TABLE, institutions=["bank_a"],
                      mode="detail")

    assert loans.status_code == 200, loans.text
    table = list(csv.reader(io.StringIO(loans.content.decode("utf-8-sig"))))
    header = table[0]
    assert header[:3] == ["机构代码", "机构名称", "报告期"]
    purpose = [line[header.index("贷款用途")] for line in table[1:]]
    assert purpose == ["'" + FORMULA, "流动资金周转"]
    assert [line[header.index("借据余额")] for line in table[1:]] == ["800000.00", "300000.00"]
    loan_sheet = load_workbook(io.BytesIO(loans_xlsx.content)).active
    loan_cells = list(loan_sheet.iter_rows())
    column = [cell.value for cell in loan_cells[0]].index("贷款用途")
    assert (loan_cells[1][column].value, loan_cells[1][column].data_type) == ("'" + FORMULA, "s")
    balance = [cell.value for cell in loan_cells[0]].index("借据余额")
    assert (loan_cells[1][balance].value, loan_cells[1][balance].data_type) == (800000, "n")
    assert customers.status_code == 200, customers.text
    sheet = load_workbook(io.BytesIO(customers.content), read_only=True).active
    rows = [list(row) for row in sheet.iter_rows(values_only=True)]
    names = rows[0]
    assert len(rows) == 5
    assert {row[names.index("法定代表人姓名")] for row in rows[1:]} == {"张**"}
    assert {row[names.index("财务联系人手机号码")] for row in rows[1:]} == {"138****5678"}
    for plain in ("张三丰", "11010519491231002X", "13812345678"):
        assert plain.encode("utf-8") not in loans.content
        assert plain not in str(rows)


def test_caps_truncate_with_note(seeded: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_data, "MAX_GROUPS", 2)
    monkeypatch.setattr(report_data, "EXPORT_MAX_DETAIL_ROWS", 3)

    grouped = ok(query(seeded, "reviewer", institutions=["bank_a", "bank_b"], group_by=["WJFL"]))
    exported = query(seeded, "reviewer", path="export.csv", institutions=["bank_a", "bank_b"], mode="detail")

    assert (grouped["rows"], grouped["group_count"], grouped["truncated"]) == ([["01", "正常", 4], ["02", "关注", 2]],
                                                                              3, True)
    assert grouped["totals"] == ["合计", "", 7]
    assert "分组结果共 3 行，只返回前 2 行" in grouped["notes"][0]
    table = list(csv.reader(io.StringIO(exported.content.decode("utf-8-sig"))))
    assert len(table) == 1 + 3 + 1
    assert table[-1][0].startswith("共 7 行，导出上限为 3 行")


# --- access ----------------------------------------------------------------------------------------


def test_institution_user_own_data_only(seeded: Env) -> None:
    own = ok(query(seeded, "reporter_a", aggregates=[{"function": "count"}, {"function": "sum", "field": "JJYE"}]))
    admin = ok(query(seeded, "instadmin_a", institutions=["bank_a"], aggregates=[{"function": "count"}]))
    request_id = f"rd-{secrets.token_hex(6)}"
    other = query(seeded, "reporter_a", request_id, institutions=["bank_a", "bank_b"])
    export_id = f"rd-{secrets.token_hex(6)}"
    other_export = query(seeded, "instadmin_a", export_id, path="export.csv", institutions=["bank_b"])

    assert (own["institutions"], own["totals"]) == (["bank_a"], [4, "2100000.00"])
    assert admin["totals"] == [4]
    assert (other.status_code, other.json()["code"]) == (403, "INSTITUTION_FORBIDDEN")
    assert "bank_b" in other.json()["detail"]
    assert [(action, outcome) for action, outcome, _resource in events(seeded, request_id)] == [
        ("report_data.read", "denied")]
    assert (other_export.status_code, other_export.json()["code"]) == (403, "INSTITUTION_FORBIDDEN")
    assert [(action, outcome) for action, outcome, _resource in events(seeded, export_id)] == [
        ("report_data.read", "denied")]


@pytest.mark.parametrize("username,status,code", [
    (None, 401, "NOT_AUTHENTICATED"), ("modeller_a", 403, "FORBIDDEN"), ("sysadmin", 403, "FORBIDDEN"),
    ("auditor", 403, "FORBIDDEN"),
])
def test_callers_without_capability_denied(seeded: Env, username: str | None, status: int, code: str) -> None:
    for path in ("query", "export.csv", "export.xlsx"):
        response = query(seeded, username, path=path)
        assert (response.status_code, response.json()["code"]) == (status, code), path


def test_institution_without_data_empty(seeded: Env) -> None:
    before = ok(query(seeded, "analyst", institutions=["bank_c"], group_by=["institution"],
                      aggregates=[{"function": "count"}, {"function": "sum", "field": "JJYE"}]))
    # A partition whose manifest names no accepted submission (an accept whose commit failed) is not read.
    source = seeded.settings.data_dir / "bank_c-staged.parquet"
    codes = [item.code for item in catalog().get(LOAN_TABLE).fields]
    pq.write_table(pa.table({code: pa.array(["1.00"], pa.string()) for code in codes}), source)
    load_submission(seeded.settings, open_keystore(seeded.settings), institution_code="bank_c",
                    template_code=LOAN_TABLE, template_version=1, field_codes=codes, period_end=date(2025, 11, 30),
                    staged_path=source, submission_id=999999, version=1, raw_sm3="0" * 64).finish()
    source.unlink()
    after = ok(query(seeded, "analyst", institutions=["bank_c"], aggregates=[{"function": "count"}]))

    assert (before["rows"], before["totals"], before["row_count"]) == ([], ["合计", "", 0, None], 0)
    assert (after["rows"], after["totals"], after["partitions"]) == ([], [0], 0)


BAD_QUERIES = {
    "template": ({"template_code": "EAST_NOPE"}, "TEMPLATE_NOT_FOUND", "EAST_NOPE"),
    "group_field": ({"group_by": ["NOPE"]}, "REPORT_FIELD_UNKNOWN", "NOPE"),
    "group_not_code": ({"group_by": ["JJYE"]}, "REPORT_GROUP_INVALID", "JJYE"),
    "aggregate_text": ({"aggregates": [{"function": "sum", "field": "KHMC"}]}, "REPORT_AGGREGATE_INVALID", "KHMC"),
    "aggregate_function": ({"aggregates": [{"function": "median", "field": "JJYE"}]}, "REPORT_AGGREGATE_INVALID",
                           "median"),
    "filter_code": ({"filters": {"WJFL": ["09"]}}, "REPORT_FILTER_INVALID", "09"),
    "period_text": ({"period_from": "2025-11-30"}, "PERIOD_INVALID", "2025-11-30"),
    "period_date": ({"period_to": "20251331"}, "PERIOD_INVALID", "20251331"),
    "period_order": ({"period_from": SECOND, "period_to": FIRST}, "PERIOD_INVALID", SECOND),
    "institution": ({"institutions": ["zz_none"]}, "INSTITUTION_NOT_FOUND", "zz_none"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUERIES))
def test_bad_query_chinese_message(seeded: Env, case: str) -> None:
    fields, code, named = BAD_QUERIES[case]
    request_id = f"rd-{secrets.token_hex(6)}"

    response = query(seeded, "reviewer", request_id, **fields)

    assert (response.status_code, response.json()["code"]) == (422, code), response.text
    detail = response.json()["detail"]
    assert named in detail
    assert any("\u4e00" <= char <= "\u9fff" for char in detail)
    assert [(action, outcome) for action, outcome, _resource in events(seeded, request_id)] == [
        ("report_data.query", "failed")]


# --- plaintext -------------------------------------------------------------------------------------


def _files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file() and not path.name.startswith("admin.db")}


def test_no_plaintext_left_behind(seeded: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _files(seeded.settings.data_dir)
    done = ok(query(seeded, "reviewer", institutions=["bank_a", "bank_b"], group_by=["DBFS"],
                    aggregates=[{"function": "sum", "field": "JJYE"}]))
    real_read = pq.read_table
    reads: list[int] = []

    def failing_read(*args: Any, **kwargs: Any) -> pa.Table:
        reads.append(1)
        if len(reads) > 1:
            raise pa.ArrowInvalid("damaged partition (test)")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(warehouse_query.pq, "read_table", failing_read)
    request_id = f"rd-{secrets.token_hex(6)}"
    failed = query(seeded, "reviewer", request_id, institutions=["bank_a", "bank_b"], mode="detail")
    monkeypatch.undo()

    assert done["partitions"] == 4
    assert (failed.status_code, failed.json()["code"]) == (500, "REPORT_PARTITION_UNREADABLE")
    assert "查询未完成" in failed.json()["detail"]
    assert [(action, outcome) for action, outcome, _resource in events(seeded, request_id)] == [
        ("report_data.query", "failed")]
    assert _files(seeded.settings.data_dir) == before
    assert list(tmp_path.iterdir()) == []


# --- console ---------------------------------------------------------------------------------------


def test_console_page_result_and_export(seeded: Env) -> None:
    cookie = console_cookie(seeded, "reviewer")
    params = {"template_code": LOAN_TABLE, "shown_template": LOAN_TABLE, "period_from": FIRST, "period_to": SECOND,
              "institutions": ["bank_a", "bank_b"], "group_by": ["WJFL"], "aggregates": ["count:", "sum:JJYE"]}

    empty_form = seeded.client.get("/console/report-data", headers=cookie)
    page = seeded.client.get("/console/report-data", headers=cookie, params=params)
    session_token = cookie["Cookie"].split("=", 1)[1]
    form = {**params, "kind": "csv", "csrf_token": csrf_token(seeded.secrets.session_secret, session_token)}
    exported = seeded.client.post("/console/report-data/export", headers=cookie, data=form)
    forged = seeded.client.post("/console/report-data/export", headers=cookie, data={**form, "csrf_token": "x"})

    assert empty_form.status_code == 200
    assert "报表应用" in empty_form.text
    assert page.status_code == 200, page.text
    assert "<th>借据余额合计</th>" in page.text
    assert "<td>关注</td>" in page.text
    assert "5400000.00" in page.text
    assert exported.status_code == 200, exported.text
    assert exported.content.decode("utf-8-sig").splitlines()[-1] == "合计,,7,5400000.00"
    assert forged.status_code == 403


def test_console_missing_period_message(seeded: Env) -> None:
    cookie = console_cookie(seeded, "reviewer")
    params = {"template_code": LOAN_TABLE, "shown_template": LOAN_TABLE, "period_from": FIRST, "period_to": ""}

    page = seeded.client.get("/console/report-data", headers=cookie, params=params)
    switched = seeded.client.get("/console/report-data", headers=cookie,
                                 params={**params, "shown_template": CUSTOMER_TABLE})

    assert page.status_code == 422
    assert "请填写起始报告期和截止报告期" in page.text
    assert switched.status_code == 200
    assert "请填写起始报告期和截止报告期" not in switched.text


def test_console_other_institution_denied(seeded: Env) -> None:
    cookie = console_cookie(seeded, "reporter_a")
    params = {"template_code": LOAN_TABLE, "shown_template": LOAN_TABLE, "period_from": FIRST, "period_to": SECOND,
              "institutions": ["bank_b"], "aggregates": ["count:"]}

    denied = seeded.client.get("/console/report-data", headers=cookie, params=params)
    own = seeded.client.get("/console/report-data", headers=cookie, params={**params, "institutions": []})
    bad = seeded.client.get("/console/report-data", headers=cookie, params={**params, "institutions": [],
                                                                            "period_from": "2025年"})

    assert denied.status_code == 403
    assert "您只能访问本机构（bank_a）的数据" in denied.text
    assert own.status_code == 200
    assert '<th style="text-align: right">4</th>' in own.text
    assert bad.status_code == 422
    assert "起始报告期“2025年”无效" in bad.text


def test_console_walkthrough_in_chromium(seeded: Env, served_admin_api: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", "analyst")
            page.fill("input[name=password]", seeded.passwords["analyst"])
            page.click("button[type=submit]")
            page.wait_for_load_state()
            page.click("header a:has-text('报表应用')")
            page.wait_for_load_state()

            # Choosing a template reloads the form with that template's fields.
            with page.expect_navigation():
                page.select_option("#report-template", LOAN_TABLE)
            page.select_option("#report-institutions", ["bank_a", "bank_b"])
            page.fill("#report-period-from", FIRST)
            page.fill("#report-period-to", SECOND)
            page.check("#report-group-by input[value=WJFL]")
            page.check("#report-aggregates input[value='sum:JJYE']")
            page.click("#report-submit")
            page.wait_for_load_state()

            table = page.locator("#report-result")
            headers = table.locator("thead th").all_inner_texts()
            assert headers == ["五级分类代码", "五级分类", "记录数", "借据余额合计"]
            assert table.locator("tbody tr").count() == 3
            assert table.locator("tfoot th").all_inner_texts() == ["合计", "", "7", "5400000.00"]
            assert "汇总 7 条记录，共 3 个分组" in page.locator("#report-summary").inner_text()

            with page.expect_download() as download_info:
                page.click("#export-xlsx")
            path = download_info.value.path()
            assert download_info.value.suggested_filename.endswith(".xlsx")
            sheet = load_workbook(io.BytesIO(Path(path).read_bytes()), read_only=True).active
            rows = [list(row) for row in sheet.iter_rows(values_only=True)]
            assert rows[0] == headers
            assert rows[-1][:3] == ["合计", None, 7]

            page.fill("#report-period-from", "2025-11")
            page.click("#report-submit")
            page.wait_for_load_state()
            assert "起始报告期“2025-11”无效" in page.locator("#report-error").inner_text()
        finally:
            browser.close()
