"""Report submissions (报表报送) and their review: upload, validation, encrypted storage, versions, access.

Each test uses its own reporting period, because the environment (one per database backend) is
shared by every test of the session.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openpyxl import load_workbook
from sqlalchemy import func, select

import admin_api.submissions as submissions_module
from admin_api.models import AuditEvent, Institution, Message, ReportSubmission, SubmissionEvent, User
from admin_api.submissions import catalog, raw_associated_data
from intake.validate import ValidationError
from intake.warehouse import load_submission, partition_associated_data, partition_dir, read_manifest
from regsandbox_core.crypto import sm3_hex
from regsandbox_core.documents import decrypt_document
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.platform_keys import open_keystore

from .conftest import Env
from .helpers import audit_events

LICENSE = "B0001H111000001"
CUSTOMER_USCC = "91110000600037341L"
FORMULA = "=1+2"


# --- report files ----------------------------------------------------------------------------------


def loan_row(number: int, period: str, **changes: str) -> dict[str, str]:
    row = {
        "JRXKZH": LICENSE, "NBJGH": "001", "YHJGMC": "测试银行北京分行", "MXKMBH": "130101",
        "KHTYBH": f"C{number:04d}", "KHMC": "北京测试科技有限公司", "ZJLX": "01", "ZJHM": CUSTOMER_USCC,
        "JJH": f"JJ{number:06d}", "HTH": f"HT{number:06d}", "XDYWZL": "01", "BZ": "CNY", "JJJE": "1000000.00",
        "JJYE": "800000.00", "DKFFRQ": "20230115", "DKDQRQ": "20250115", "ZQDQRQ": "", "LLLX": "01", "SJLL": "4.35",
        "DKTXHY": "C13", "DKYT": "流动资金周转", "WJFL": "01", "DKZT": "01", "HKFS": "03", "DBFS": "02;03",
        "STZFBS": "N", "YQTS": "0", "BNQXYE": "0.00", "CJRQ": period, "BEIZ": "",
    }
    row.update(changes)
    return row


def contract_row(number: int, period: str) -> dict[str, str]:
    return {
        "JRXKZH": LICENSE, "NBJGH": "001", "HTH": f"HT{number:06d}", "KHTYBH": f"C{number:04d}",
        "KHMC": "北京测试科技有限公司", "XDYWZL": "01", "BZ": "CNY", "HTJE": "1000000.00", "HTQSRQ": "20230110",
        "HTDQRQ": "20250115", "HTZT": "01", "DBFS": "02", "DBHTH": "", "SFXHDK": "N", "XDYGH": "E001",
        "CJRQ": period, "BEIZ": "",
    }


def customer_row(number: int, period: str) -> dict[str, str]:
    return {
        "JRXKZH": LICENSE, "NBJGH": "001", "KHTYBH": f"C{number:04d}", "KHMC": "北京测试科技有限公司", "ZJLX": "01",
        "ZJHM": CUSTOMER_USCC, "ZCDZ": "北京市西城区金融大街 1 号", "XZQHDM": "110102", "SSHY": "C13", "QYGM": "02",
        "ZCZB": "5000000.00", "ZCZBBZ": "CNY", "CLRQ": "20100101", "FDDBRXM": "张三丰", "FDDBRZJLX": "01",
        "FDDBRZJHM": "11010519491231002X", "CWLXRSJ": "13812345678", "SFJTKH": "N", "JLKHGXRQ": "20150101",
        "CJRQ": period, "BEIZ": "",
    }


def text_file(template_code: str, rows: list[Mapping[str, str]]) -> bytes:
    codes = [item.code for item in catalog().get(template_code).fields]
    lines = ["|".join(codes)] + ["|".join(row.get(code, "") for code in codes) for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def upload(env: Env, username: str, template_code: str, period: str, content: bytes,
           name: str | None = None, request_id: str | None = None) -> Any:
    headers = env.auth(username)
    if request_id:
        headers = {**headers, "X-Request-ID": request_id}
    return env.client.post(
        "/api/v1/submissions", headers=headers, data={"template_code": template_code, "period_end": period},
        files={"file": (name or f"{template_code}.txt", content, "text/plain")},
    )


def upload_batch(env: Env, period: str, numbers: tuple[int, ...] = (1, 2)) -> None:
    """Upload the customers and contracts that the loans of ``numbers`` refer to; both must pass."""
    for code, builder in (("EAST_DGKHXXB", customer_row), ("EAST_XDHTB", contract_row)):
        response = upload(env, "reporter_a", code, period, text_file(code, [builder(n, period) for n in numbers]))
        assert response.status_code == 201, response.text
        assert response.json()["state"] == "pending_review", response.json()


@pytest.fixture(scope="module", autouse=True)
def bank_a_licence(env: Env) -> Iterator[None]:
    """Give bank_a the 金融许可证号 of the test files for this module, then restore it."""
    with env.db() as session:
        institution = session.scalars(select(Institution).where(Institution.code == "bank_a")).one()
        before, institution.licence_no = institution.licence_no, LICENSE
        session.commit()
    yield
    with env.db() as session:
        institution = session.scalars(select(Institution).where(Institution.code == "bank_a")).one()
        institution.licence_no = before
        session.commit()


def intake_files(env: Env) -> set[Path]:
    root = env.settings.data_dir / "intake"
    return {path for path in root.rglob("*") if path.is_file()} if root.exists() else set()


def submission_count(env: Env) -> int:
    with env.db() as session:
        return session.scalar(select(func.count()).select_from(ReportSubmission)) or 0


def messages_of(env: Env, username: str) -> list[Message]:
    with env.db() as session:
        user_id = session.scalars(select(User.id).where(User.username == username)).one()
        return list(session.scalars(select(Message).where(Message.user_id == user_id).order_by(Message.id)))


def actions(env: Env, resource: str) -> list[tuple[str, str, str]]:
    with env.db() as session:
        return [(event.action, event.outcome, event.actor) for event in session.scalars(
            select(AuditEvent).where(AuditEvent.resource == resource).order_by(AuditEvent.id))]


# --- tests -----------------------------------------------------------------------------------------


def test_valid_batch_stored_encrypted(env: Env) -> None:
    period = "20240131"
    upload_batch(env, period)
    content = text_file("EAST_DGXDYWJJB", [loan_row(1, period), loan_row(2, period)])

    response = upload(env, "reporter_a", "EAST_DGXDYWJJB", period, content, name="借据表.txt")

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["state"], body["state_name"], body["version"]) == ("pending_review", "待审核", 1)
    assert (body["error_count"], body["row_count"], body["institution_code"]) == (0, 2, "bank_a")
    assert (body["period_end"], body["original_filename"], body["encoding"]) == ("2024-01-31", "借据表.txt", "utf-8")
    assert body["raw_sm3"] == sm3_hex(content)
    assert body["submitted_by"] == "reporter_a"
    assert [event["to_state"] for event in body["events"]] == ["pending_review"]
    with env.db() as session:
        row = session.get(ReportSubmission, body["id"])
        raw_path, digest = row.raw_path, row.template_digest
    assert digest == catalog().get("EAST_DGXDYWJJB").digest
    raw = env.settings.data_dir / raw_path
    assert raw_path == f"intake/bank_a/{body['id']}/raw.rssg"
    assert sorted(path.name for path in raw.parent.iterdir()) == ["findings.parquet", "raw.rssg"]
    assert stat.S_IMODE(raw.stat().st_mode) == 0o600
    assert stat.S_IMODE(raw.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(raw.parent.parent.stat().st_mode) == 0o700
    stored = raw.read_bytes()
    assert "北京测试科技有限公司".encode("utf-8") not in stored
    assert b"JJ000001" not in stored
    assert LICENSE.encode() not in stored
    plain = io.BytesIO()
    decrypt_document(open_keystore(env.settings), "bank_a", raw, plain, raw_associated_data("bank_a", body["raw_sm3"]))
    assert sm3_hex(plain.getvalue()) == body["raw_sm3"]
    assert actions(env, f"submission:{body['id']}") == [("submissions.submit", "success", "reporter_a")]
    assert messages_of(env, "reporter_a")[-1].title == "报表 EAST_DGXDYWJJB 2024-01-31 第 1 版已通过校验，待审核：提示 0 条（已说明 0 条）"


def test_errors_fail_validation(env: Env) -> None:
    period = "20240229"
    customers = upload(env, "reporter_a", "EAST_DGKHXXB", period,
                       text_file("EAST_DGKHXXB", [customer_row(1, period)]))  # no customer of loan 2
    assert customers.json()["state"] == "pending_review"
    rows = [loan_row(1, period, MXKMBH=FORMULA), loan_row(2, period)]

    response = upload(env, "reporter_a", "EAST_DGXDYWJJB", period, text_file("EAST_DGXDYWJJB", rows))

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["state"] == "validation_failed"
    # the bad 明细科目编号, loan 2's customer missing from the batch, and both contracts (no contract table)
    assert body["error_count"] == 4
    title = messages_of(env, "reporter_a")[-1].title
    assert title == (f"报表 EAST_DGXDYWJJB 2024-02-29 第 1 版校验未通过：错误 {body['error_count']} 条，"
                     f"提示 {body['warning_count']} 条")

    report = env.client.get(f"/api/v1/submissions/{body['id']}/errors.csv", headers=env.auth("reporter_a"))
    assert report.status_code == 200, report.text
    assert report.headers["content-type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(report.content.decode("utf-8-sig"))))
    assert table[0][:3] == ["行号", "字段代码", "字段名称"]
    assert len(table) - 1 == body["error_count"] + body["warning_count"]
    values = [line[3] for line in table[1:] if line[1] == "MXKMBH"]
    assert values == ["'" + FORMULA]
    rule_ids = {line[4] for line in table[1:]}
    assert "R-JJ-019" in rule_ids
    assert "R-JJ-018" in rule_ids  # The batch has no contract table, so no referenced contract exists.

    workbook_response = env.client.get(f"/api/v1/submissions/{body['id']}/errors.xlsx",
                                       headers=env.auth("reviewer"))
    assert workbook_response.status_code == 200
    sheet = load_workbook(io.BytesIO(workbook_response.content), read_only=True).active
    cells = [row for row in sheet.iter_rows(values_only=True)]
    assert cells[0][0] == "行号"
    assert [row[3] for row in cells[1:] if row[1] == "MXKMBH"] == ["'" + FORMULA]


def test_resubmission_supersedes(env: Env) -> None:
    period = "20240331"
    first = upload(env, "reporter_a", "EAST_DGXDYWJJB", period,
                   text_file("EAST_DGXDYWJJB", [loan_row(1, period, JJYE="2000000.00")])).json()  # 余额 > 金额
    assert first["state"] == "validation_failed"
    upload_batch(env, period, (1,))

    second = upload(env, "instadmin_a", "EAST_DGXDYWJJB", period,
                    text_file("EAST_DGXDYWJJB", [loan_row(1, period)])).json()

    assert (second["version"], second["state"], second["submitted_by"]) == (2, "pending_review", "instadmin_a")
    old = env.client.get(f"/api/v1/submissions/{first['id']}", headers=env.auth("reporter_a")).json()
    assert (old["state"], old["version"]) == ("superseded", 1)
    assert [(event["from_state"], event["to_state"]) for event in old["events"]] == [
        (None, "validation_failed"), ("validation_failed", "superseded")]
    listing = env.client.get(f"/api/v1/submissions?period_end={period}&template_code=EAST_DGXDYWJJB",
                             headers=env.auth("reporter_a"))
    assert listing.headers["X-Total-Count"] == "2"
    assert [item["version"] for item in listing.json()] == [2, 1]
    pending = env.client.get(f"/api/v1/submissions?period_end={period}&state=pending_review",
                             headers=env.auth("analyst"))
    assert {item["template_code"] for item in pending.json()} == {"EAST_DGXDYWJJB", "EAST_DGKHXXB", "EAST_XDHTB"}


def test_accept_and_return(env: Env) -> None:
    period = "20240430"
    upload_batch(env, period, (1,))
    listing = env.client.get(f"/api/v1/submissions?period_end={period}", headers=env.auth("reviewer")).json()
    customers, contracts = (next(item["id"] for item in listing if item["template_code"] == code)
                            for code in ("EAST_DGKHXXB", "EAST_XDHTB"))

    accepted = env.client.post(f"/api/v1/submissions/{customers}/accept", headers=env.auth("reviewer"),
                               json={"comment": "数据完整"})
    no_comment = env.client.post(f"/api/v1/submissions/{contracts}/return", headers=env.auth("reviewer"),
                                 json={"comment": "  "})
    bad_field = env.client.post(f"/api/v1/submissions/{contracts}/return", headers=env.auth("reviewer"),
                                json={"comment": "请修改", "row_comments": [{"line": 2, "field_code": "NOPE",
                                                                             "comment": "x"}]})
    returned = env.client.post(f"/api/v1/submissions/{contracts}/return", headers=env.auth("reviewer"), json={
        "comment": "合同金额与台账不符", "row_comments": [{"line": 2, "field_code": "HTJE", "comment": "请核对合同金额"}]})
    again = env.client.post(f"/api/v1/submissions/{customers}/accept", headers=env.auth("reviewer"))

    assert accepted.status_code == 200, accepted.text
    assert (accepted.json()["state"], accepted.json()["reviewed_by"]) == ("accepted", "reviewer")
    assert (no_comment.status_code, no_comment.json()["code"]) == (422, "REVIEW_COMMENT_REQUIRED")
    assert (bad_field.status_code, bad_field.json()["code"]) == (422, "ROW_COMMENT_FIELD_UNKNOWN")
    assert returned.status_code == 200, returned.text
    body = returned.json()
    assert (body["state"], body["review_comment"]) == ("returned", "合同金额与台账不符")
    assert [(item["line"], item["field_code"], item["comment"]) for item in body["row_comments"]] == [
        (2, "HTJE", "请核对合同金额")]
    assert [event["to_state"] for event in body["events"]] == ["pending_review", "returned"]
    assert (again.status_code, again.json()["code"]) == (409, "SUBMISSION_STATE_INVALID")
    titles = [message.title for message in messages_of(env, "reporter_a")[-2:]]
    assert titles == [f"报表审核通过：报表 EAST_DGKHXXB {period[:4]}-{period[4:6]}-{period[6:]} 第 1 版",
                      f"报表已退回：报表 EAST_XDHTB {period[:4]}-{period[4:6]}-{period[6:]} 第 1 版"]
    assert "合同金额与台账不符" in messages_of(env, "reporter_a")[-1].body
    assert ("submissions.accept", "success", "reviewer") in actions(env, f"submission:{customers}")
    contract_actions = actions(env, f"submission:{contracts}")
    assert ("submissions.return", "success", "reviewer") in contract_actions
    assert ("submissions.return", "failed", "reviewer") in contract_actions
    with env.db() as session:
        events = session.scalars(select(SubmissionEvent.to_state).where(SubmissionEvent.submission_id == customers))
        assert list(events) == ["pending_review", "accepted"]


BAD_UPLOADS = {
    "empty": ("EAST_XDHTB", "20240531", "EAST_XDHTB.txt", b"", "FILE_EMPTY"),
    "binary": ("EAST_XDHTB", "20240531", "EAST_XDHTB.txt", b"\x89PNG\r\n\x1a\n" + bytes(64), "FILE_BINARY"),
    "encoding": ("EAST_XDHTB", "20240531", "EAST_XDHTB.txt", "HTH|合同\n".encode("utf-8") + b"\x80\xff|x\n",
                 "FILE_ENCODING_UNKNOWN"),
    "ragged": ("EAST_XDHTB", "20240531", "EAST_XDHTB.txt", "ragged", "ROW_FIELD_COUNT"),
    "header": ("EAST_XDHTB", "20240531", "EAST_XDHTB.txt", "header", "HEADER_MISMATCH"),
    "no_rows": ("EAST_XDHTB", "20240531", "EAST_XDHTB.txt", "no_rows", "FILE_NO_ROWS"),
    "type": ("EAST_XDHTB", "20240531", "EAST_XDHTB.pdf", b"%PDF-1.4\n", "FILE_TYPE_UNSUPPORTED"),
    "xlsx": ("EAST_XDHTB", "20240531", "EAST_XDHTB.xlsx", b"not a workbook at all\n", "FILE_XLSX_INVALID"),
    "template": ("EAST_NOPE", "20240531", "EAST_NOPE.txt", b"a|b\n", "TEMPLATE_NOT_FOUND"),
    "period": ("EAST_XDHTB", "20241332", "EAST_XDHTB.txt", b"a|b\n", "PERIOD_INVALID"),
    "period_text": ("EAST_XDHTB", "2024-05-31", "EAST_XDHTB.txt", b"a|b\n", "PERIOD_INVALID"),
    "not_month_end": ("EAST_XDHTB", "20240515", "EAST_XDHTB.txt", b"a|b\n", "PERIOD_INVALID"),
}


def _bad_content(kind: str, content: bytes | str) -> bytes:
    if not isinstance(content, str):
        return content
    good = text_file("EAST_XDHTB", [contract_row(1, "20240531")])
    lines = good.decode("utf-8").splitlines()
    if content == "ragged":
        return ("\n".join([lines[0], lines[1] + "|多余|字段|还有"]) + "\n").encode("utf-8")
    if content == "header":
        return ("\n".join(["甲|乙|丙", lines[1]]) + "\n").encode("utf-8")
    return (lines[0] + "\n").encode("utf-8")


@pytest.mark.parametrize("kind", sorted(BAD_UPLOADS))
def test_bad_upload_stores_nothing(env: Env, kind: str) -> None:
    template_code, period, name, content, code = BAD_UPLOADS[kind]
    files_before, rows_before = intake_files(env), submission_count(env)
    request_id = f"sub-{secrets.token_hex(6)}"

    response = upload(env, "reporter_a", template_code, period, _bad_content(kind, content), name=name,
                      request_id=request_id)

    # The reader rejects an unsupported file type with 415 Unsupported Media Type and every other bad file with 422.
    assert response.status_code == (415 if kind == "type" else 422), response.text
    assert response.json()["code"] == code
    detail = response.json()["detail"]
    assert any("\u4e00" <= char <= "\u9fff" for char in detail)
    if kind == "template":
        assert "EAST_NOPE" in detail
        assert "EAST_DGXDYWJJB" in detail
    if kind.startswith("period"):
        assert period in detail
    assert submission_count(env) == rows_before
    assert intake_files(env) == files_before
    root = env.settings.data_dir / "intake" / "bank_a"
    assert not [path for path in root.iterdir() if path.name.startswith(".upload-")] if root.exists() else True
    events = [(event.action, event.outcome) for event in audit_events(env, request_id)]
    assert events == [("submissions.submit", "failed")]


@pytest.mark.parametrize("broken", ["validation", "encryption"])
def test_failure_beside_encryption_stores_nothing(env: Env, monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    files_before, rows_before = intake_files(env), submission_count(env)
    real_encrypt = submissions_module.encrypt_document
    finished: list[Path] = []

    def encrypt(*args: Any, **kwargs: Any) -> Any:
        if broken == "encryption":
            raise RegsandboxError("TEST_ENCRYPTION_FAILED", "加密失败（测试）。", status=503)
        result = real_encrypt(*args, **kwargs)
        finished.append(Path(args[3]))
        return result

    def validate(*args: Any, **kwargs: Any) -> Any:
        raise ValidationError("VALIDATION_FAILED", "校验未完成（测试）。")

    monkeypatch.setattr(submissions_module, "encrypt_document", encrypt)
    if broken == "validation":
        monkeypatch.setattr(submissions_module, "check_file", validate)
    content = text_file("EAST_DGKHXXB", [customer_row(1, "20240831")])

    response = upload(env, "reporter_a", "EAST_DGKHXXB", "20240831", content)

    expected = {"validation": (500, "VALIDATION_FAILED"), "encryption": (503, "TEST_ENCRYPTION_FAILED")}[broken]
    assert (response.status_code, response.json()["code"]) == expected, response.text
    if broken == "validation":
        # The encryption thread finished before the work folder was removed, so it left no file behind.
        assert len(finished) == 1
        assert not finished[0].exists()
    assert submission_count(env) == rows_before
    assert intake_files(env) == files_before
    root = env.settings.data_dir / "intake" / "bank_a"
    assert not [path for path in root.iterdir() if path.name.startswith(".upload-")]


def test_other_institution_denied(env: Env) -> None:
    period = "20240630"
    created = upload(env, "reporter_a", "EAST_DGKHXXB", period,
                     text_file("EAST_DGKHXXB", [customer_row(1, period)])).json()
    submission = created["id"]

    for path in ("", "/errors.csv", "/errors.xlsx"):
        request_id = f"deny-{secrets.token_hex(6)}"
        response = env.client.get(f"/api/v1/submissions/{submission}{path}",
                                  headers={**env.auth("reporter_b"), "X-Request-ID": request_id})
        assert (response.status_code, response.json()["code"]) == (403, "INSTITUTION_FORBIDDEN"), path
        assert [(event.action, event.outcome) for event in audit_events(env, request_id)] == [
            ("submissions.read", "denied")]
    other_list = env.client.get("/api/v1/submissions?institution_code=bank_a", headers=env.auth("reporter_b"))
    assert (other_list.status_code, other_list.json()["code"]) == (403, "INSTITUTION_FORBIDDEN")
    own_list = env.client.get("/api/v1/submissions", headers=env.auth("reporter_b"))
    assert own_list.status_code == 200
    assert all(item["institution_code"] == "bank_b" for item in own_list.json())
    for username in ("reporter_a", "reporter_b", "analyst", "instadmin_a"):
        raw = env.client.get(f"/api/v1/submissions/{submission}/raw", headers=env.auth(username))
        assert (raw.status_code, raw.json()["code"]) == (403, "FORBIDDEN"), username
        for action in ("accept", "return"):
            review = env.client.post(f"/api/v1/submissions/{submission}/{action}", headers=env.auth(username),
                                     json={"comment": "越权审核"})
            assert (review.status_code, review.json()["code"]) == (403, "FORBIDDEN"), (username, action)
    with env.db() as session:
        assert session.get(ReportSubmission, submission).state == "pending_review"


def test_reviewer_downloads_raw(env: Env) -> None:
    period = "20240731"
    content = text_file("EAST_DGKHXXB", [customer_row(1, period), customer_row(2, period)])
    created = upload(env, "reporter_a", "EAST_DGKHXXB", period, content, name="客户表.txt").json()

    response = env.client.get(f"/api/v1/submissions/{created['id']}/raw", headers=env.auth("reviewer"))

    assert response.status_code == 200, response.text
    assert response.content == content
    assert "filename*=utf-8''" in response.headers["content-disposition"]
    assert ("submissions.raw_read", "success", "reviewer") in actions(env, f"submission:{created['id']}")
    folder = env.settings.data_dir / "intake" / "bank_a" / str(created["id"])
    assert sorted(path.name for path in folder.iterdir()) == ["findings.parquet", "raw.rssg"]
    missing = env.client.get("/api/v1/submissions/999999/raw", headers=env.auth("reviewer"))
    assert (missing.status_code, missing.json()["code"]) == (404, "SUBMISSION_NOT_FOUND")


# --- warehouse ---------------------------------------------------------------------------------------

LOANS = "EAST_DGXDYWJJB"


def _day(period: str) -> date:
    return date(int(period[:4]), int(period[4:6]), int(period[6:]))


def partition_of(env: Env, template_code: str, period: str, institution: str = "bank_a") -> Path:
    return partition_dir(env.settings, template_code, institution, _day(period)) / "part-0.parquet.rssg"


def warehouse_rows(env: Env, template_code: str, period: str, institution: str = "bank_a") -> list[dict[str, str]]:
    buffer = io.BytesIO()
    decrypt_document(open_keystore(env.settings), institution, partition_of(env, template_code, period, institution),
                     buffer, partition_associated_data(template_code, institution, period))
    return pq.read_table(io.BytesIO(buffer.getvalue())).to_pylist()


def waive_open_warnings(env: Env, submission_id: int) -> list[str]:
    """Waive every rule that still has unexplained warnings, as a reviewer who checked them would; return the rules."""
    findings = env.client.get(f"/api/v1/submissions/{submission_id}/findings?severity=warning&limit=200",
                              headers=env.auth("reviewer"))
    assert findings.status_code == 200, findings.text
    rules = sorted({item["rule_id"] for item in findings.json()["items"]
                    if not item["explained"] and item["waiver_reason"] is None})
    for rule_id in rules:
        waived = env.client.post(f"/api/v1/submissions/{submission_id}/waivers", headers=env.auth("reviewer"),
                                 json={"rule_id": rule_id, "reason": "已电话核实，数据属实"})
        assert waived.status_code == 200, waived.text
    return rules


def accept_referenced(env: Env, submission_id: int) -> None:
    """Accept the pending customers and contracts of the submission's institution and period, as a reviewer must first."""
    detail = env.client.get(f"/api/v1/submissions/{submission_id}", headers=env.auth("reviewer")).json()
    if detail["template_code"] != LOANS:
        return
    listing = env.client.get(
        f"/api/v1/submissions?period_end={detail['period_end'].replace('-', '')}&state=pending_review"
        f"&institution_code={detail['institution_code']}", headers=env.auth("reviewer")).json()
    order = {"EAST_DGKHXXB": 0, "EAST_XDHTB": 1}  # contracts refer to customers
    for item in sorted(listing, key=lambda entry: order.get(entry["template_code"], 9)):
        if item["template_code"] in order:
            waive_open_warnings(env, item["id"])
            response = env.client.post(f"/api/v1/submissions/{item['id']}/accept", headers=env.auth("reviewer"),
                                       json={"comment": "同批次数据完整"})
            assert response.status_code == 200, response.text


def settle_rebuilds(env: Env) -> None:
    """Wait until the extract rebuilds that accepts queue in the background are done, so they touch no later check."""
    assert env.client.app.state.extract_rebuilds.wait_idle(120)


def accept(env: Env, submission_id: int, comment: str = "数据完整") -> Any:
    """Accept a submission after the tables it refers to, waiving its open warnings first."""
    accept_referenced(env, submission_id)
    waive_open_warnings(env, submission_id)
    response = env.client.post(f"/api/v1/submissions/{submission_id}/accept", headers=env.auth("reviewer"),
                               json={"comment": comment})
    settle_rebuilds(env)
    return response


def upload_loans(env: Env, period: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    response = upload(env, "reporter_a", LOANS, period, text_file(LOANS, rows))
    assert response.status_code == 201, response.text
    return response.json()


def finding_rules(env: Env, submission_id: int) -> set[str]:
    report = env.client.get(f"/api/v1/submissions/{submission_id}/errors.csv", headers=env.auth("reporter_a"))
    assert report.status_code == 200, report.text
    return {line[4] for line in list(csv.reader(io.StringIO(report.content.decode("utf-8-sig"))))[1:]}


def hidden_leftovers(env: Env) -> list[Path]:
    """Temporary files of the warehouse and work folders of accepts; a partition folder's .lock is not one."""
    settle_rebuilds(env)
    found = [path for path in (env.settings.data_dir / "warehouse" / "intake").rglob(".*")
             if path.name != ".lock"] if (env.settings.data_dir / "warehouse" / "intake").exists() else []
    return found + list((env.settings.data_dir / "intake").rglob(".accept-*"))


def test_concurrent_accepts_load_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    period = "20250831"
    upload_batch(env, period)
    loans = upload_loans(env, period, [loan_row(1, period)])
    accept_referenced(env, loans["id"])
    waive_open_warnings(env, loans["id"])
    load = submissions_module._load_warehouse
    second: dict[str, Any] = {}

    def load_while_second_accept_waits(*args: Any, **kwargs: Any) -> Any:
        if "thread" not in second:  # Only the first accept starts a second one.
            second["thread"] = threading.Thread(target=lambda: second.update(response=env.client.post(
                f"/api/v1/submissions/{loans['id']}/accept", headers=env.auth("reviewer"), json={"comment": "重复"})))
            second["thread"].start()
            second["thread"].join(timeout=1.0)
            second["waited"] = second["thread"].is_alive()
        return load(*args, **kwargs)

    monkeypatch.setattr(submissions_module, "_load_warehouse", load_while_second_accept_waits)
    first = accept(env, loans["id"])
    second["thread"].join(timeout=60)

    assert first.status_code == 200, first.text
    assert second["waited"] is True
    assert (second["response"].status_code, second["response"].json()["code"]) == (409, "SUBMISSION_STATE_INVALID")
    assert [row["JJH"] for row in warehouse_rows(env, LOANS, period)] == ["JJ000001"]
    detail = env.client.get(f"/api/v1/submissions/{loans['id']}", headers=env.auth("reviewer")).json()
    assert [event["to_state"] for event in detail["events"]].count("accepted") == 1


def test_accept_queues_extract_rebuild(env: Env) -> None:
    period = "20250228"
    upload_batch(env, period, (1,))
    listing = env.client.get(f"/api/v1/submissions?period_end={period}", headers=env.auth("reviewer")).json()
    customers = next(item["id"] for item in listing if item["template_code"] == "EAST_DGKHXXB")

    response = accept(env, customers)

    assert response.status_code == 200, response.text
    with env.db() as session:
        code = session.get(ReportSubmission, customers).institution.code
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "extracts.build",
                                                          AuditEvent.resource == f"extract:{code}")).all()
    details = [json.loads(event.detail) if isinstance(event.detail, str) else event.detail for event in events]
    queued = [(event.actor, detail) for event, detail in zip(events, details)
              if detail.get("trigger") == "submission_accepted" and f"报告期 {period}" in detail.get("reason", "")]
    assert len(queued) == 1, details
    actor, detail = queued[0]
    assert actor == "reviewer"
    assert "EAST_DGKHXXB" in detail["reason"]


def test_accept_loads_warehouse_once(env: Env) -> None:
    period = "20250131"
    upload_batch(env, period)
    rows = [loan_row(1, period), loan_row(2, period, JJYE="500000.00")]
    loans = upload_loans(env, period, rows)
    assert loans["state"] == "pending_review", loans

    response = accept(env, loans["id"])

    assert response.status_code == 200, response.text
    assert response.json()["state"] == "accepted"
    codes = [item.code for item in catalog().get(LOANS).fields]
    assert warehouse_rows(env, LOANS, period) == [{**{code: row[code] for code in codes}, "_period": period}
                                                  for row in rows]
    path = partition_of(env, LOANS, period)
    stored = path.read_bytes()
    for value in ("北京测试科技有限公司", "JJ000001", LICENSE, CUSTOMER_USCC, "800000.00"):
        assert value.encode("utf-8") not in stored, value
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    manifest = read_manifest(path.parent)
    assert (manifest.submission_id, manifest.version, manifest.raw_sm3, manifest.rows) == (
        loans["id"], 1, loans["raw_sm3"], 2)
    before = path.stat()

    again = accept(env, loans["id"])
    with env.db() as session:  # A second load of the same submission, as after a commit that failed, writes nothing.
        outcome = submissions_module._load_warehouse(env.settings, open_keystore(env.settings),
                                                     session.get(ReportSubmission, loans["id"]))
        outcome.finish()

    assert (again.status_code, again.json()["code"]) == (409, "SUBMISSION_STATE_INVALID")
    assert not outcome.written
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert hidden_leftovers(env) == []
    with env.db() as session:
        # The first accept's event: the second (409) is audited too, and PostgreSQL returns rows in no fixed order.
        event = session.scalars(select(AuditEvent).where(AuditEvent.resource == f"submission:{loans['id']}",
                                                         AuditEvent.action == "submissions.accept")
                                .order_by(AuditEvent.id)).first()
        detail = json.loads(event.detail) if isinstance(event.detail, str) else event.detail
        assert (event.outcome, detail["warehouse_rows"], detail["warehouse_written"]) == ("success", 2, True)


def test_new_version_replaces_period_only(env: Env) -> None:
    period, other_period = "20250531", "20250630"
    store = open_keystore(env.settings)
    source = env.settings.data_dir / "bank_b-staged.parquet"
    codes = [item.code for item in catalog().get("EAST_DGKHXXB").fields]
    pq.write_table(pa.table({code: pa.array(["B"], pa.string()) for code in codes}), source)
    load_submission(env.settings, store, institution_code="bank_b", template_code="EAST_DGKHXXB", template_version=1,
                    field_codes=codes, period_end=_day(period), staged_path=source, submission_id=999999, version=1,
                    raw_sm3="0" * 64).finish()
    source.unlink()
    other = partition_of(env, "EAST_DGKHXXB", period, "bank_b")
    other_before = (other.read_bytes(), other.stat().st_mtime_ns)
    earlier = upload(env, "reporter_a", "EAST_DGKHXXB", other_period,
                     text_file("EAST_DGKHXXB", [customer_row(5, other_period)])).json()
    assert accept(env, earlier["id"]).status_code == 200
    earlier_before = partition_of(env, "EAST_DGKHXXB", other_period).read_bytes()

    first = upload(env, "reporter_a", "EAST_DGKHXXB", period,
                   text_file("EAST_DGKHXXB", [customer_row(1, period), customer_row(2, period)])).json()
    assert accept(env, first["id"]).status_code == 200
    assert [row["KHTYBH"] for row in warehouse_rows(env, "EAST_DGKHXXB", period)] == ["C0001", "C0002"]
    second = upload(env, "reporter_a", "EAST_DGKHXXB", period,
                    text_file("EAST_DGKHXXB", [customer_row(3, period)])).json()
    assert second["version"] == 2
    # Until the new version is accepted, the warehouse keeps the accepted one.
    assert [row["KHTYBH"] for row in warehouse_rows(env, "EAST_DGKHXXB", period)] == ["C0001", "C0002"]

    response = accept(env, second["id"])

    assert response.status_code == 200, response.text
    assert [row["KHTYBH"] for row in warehouse_rows(env, "EAST_DGKHXXB", period)] == ["C0003"]
    manifest = read_manifest(partition_of(env, "EAST_DGKHXXB", period).parent)
    assert (manifest.submission_id, manifest.version) == (second["id"], 2)
    assert (other.read_bytes(), other.stat().st_mtime_ns) == other_before
    assert partition_of(env, "EAST_DGKHXXB", other_period).read_bytes() == earlier_before
    assert hidden_leftovers(env) == []


def test_failed_load_keeps_pending_review(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    period = "20250731"
    first = upload(env, "reporter_a", "EAST_DGKHXXB", period,
                   text_file("EAST_DGKHXXB", [customer_row(1, period)])).json()
    assert accept(env, first["id"]).status_code == 200
    second = upload(env, "reporter_a", "EAST_DGKHXXB", period,
                    text_file("EAST_DGKHXXB", [customer_row(2, period)])).json()
    folder = partition_of(env, "EAST_DGKHXXB", period).parent
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    real_replace = os.replace

    def crash(source: Any, target: Any) -> None:
        if Path(target).name == "part-0.parquet.rssg":
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash)
    request_id = f"wh-{secrets.token_hex(6)}"
    response = env.client.post(f"/api/v1/submissions/{second['id']}/accept",
                               headers={**env.auth("reviewer"), "X-Request-ID": request_id}, json={"comment": "通过"})
    monkeypatch.setattr(os, "replace", real_replace)

    assert response.status_code == 500, response.text
    assert response.json()["code"] == "WAREHOUSE_LOAD_FAILED"
    detail = response.json()["detail"]
    assert "数据仓库" in detail
    assert "待审核" in detail
    with env.db() as session:
        assert session.get(ReportSubmission, second["id"]).state == "pending_review"
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert hidden_leftovers(env) == []
    assert [(event.action, event.outcome) for event in audit_events(env, request_id)] == [
        ("submissions.accept", "failed")]
    failure = audit_events(env, request_id)[0].detail
    assert (json.loads(failure) if isinstance(failure, str) else failure)["code"] == "WAREHOUSE_LOAD_FAILED"

    def broken_message(*args: Any, **kwargs: Any) -> None:
        raise RegsandboxError("MESSAGE_FAILED", "站内消息发送失败。", status=500)

    monkeypatch.setattr(submissions_module, "post_message", broken_message)
    failed_commit = accept(env, second["id"])
    monkeypatch.undo()

    assert (failed_commit.status_code, failed_commit.json()["code"]) == (500, "MESSAGE_FAILED")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # The load was undone.
    assert hidden_leftovers(env) == []
    with env.db() as session:
        assert session.get(ReportSubmission, second["id"]).state == "pending_review"
    assert accept(env, second["id"]).status_code == 200
    assert [row["KHTYBH"] for row in warehouse_rows(env, "EAST_DGKHXXB", period)] == ["C0002"]


def test_second_period_runs_history_and_fluctuation(env: Env) -> None:
    first_period, second_period = "20250331", "20250430"
    upload_batch(env, first_period)
    first = upload_loans(env, first_period, [loan_row(1, first_period), loan_row(2, first_period)])
    # Without accepted data the history and fluctuation rules are skipped, so no finding names them.
    assert first["state"] == "pending_review"
    assert not {"R-JJ-004", "R-JJ-021"} & finding_rules(env, first["id"])
    assert accept(env, first["id"]).status_code == 200

    upload_batch(env, second_period, (1, 3))
    # Loan 1 again, as if newly granted this period (history), and a balance total down from 1.6 to 0.9 million.
    second = upload_loans(env, second_period, [
        loan_row(1, second_period, DKFFRQ="20250415", DKDQRQ="20270415"),
        loan_row(3, second_period, JJYE="100000.00"),
    ])

    rules = finding_rules(env, second["id"])
    assert {"R-JJ-004", "R-JJ-021"} <= rules, rules
    assert second["warning_count"] >= 2
    report = env.client.get(f"/api/v1/submissions/{second['id']}/errors.csv", headers=env.auth("reporter_a"))
    text = report.content.decode("utf-8-sig")
    assert "20250331" in text  # The fluctuation message names the accepted previous period.
    assert not list((env.settings.data_dir / "intake" / "bank_a").glob(".upload-*"))
    folder = env.settings.data_dir / "intake" / "bank_a" / str(second["id"])
    assert sorted(path.name for path in folder.iterdir()) == ["errors.csv", "findings.parquet", "raw.rssg"]
