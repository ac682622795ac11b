"""Drafts (草稿), their submission and discarding, and reviewers' waivers (豁免) of warnings (提示).

Each test uses its own reporting period in 2022, apart from the periods of test_submissions.py and
test_tasks.py, because the environment of a database backend is shared by the whole session.
"""

from __future__ import annotations

import csv
import io
import secrets
from typing import Any

from sqlalchemy import select

from admin_api.models import ReportSubmission

from .conftest import Env
from .helpers import audit_events, console_cookie
from .test_institutions import make_uscc
from .test_submissions import (  # noqa: F401  # bank_a_licence: bank_a gets the test files' 金融许可证号
    LOANS,
    accept_referenced,
    actions,
    bank_a_licence,
    contract_row,
    customer_row,
    intake_files,
    loan_row,
    messages_of,
    text_file,
    upload,
    upload_batch,
)

CUSTOMERS = "EAST_DGKHXXB"
EARLY_RELATION = "20090101"
"""建立客户关系日期 before the 成立日期 20100101 of customer_row: rule R-KH-009 gives a warning."""
WARNING_RULE = "R-KH-009"


def customer(number: int, period: str, **changes: str) -> dict[str, str]:
    """A customer row with its own 证件号码, so rule R-KH-002 (证件号码在文件内唯一) finds nothing."""
    return {**customer_row(number, period), "ZJHM": make_uscc(number), **changes}


def save_draft(env: Env, period: str, rows: list[dict[str, str]], username: str = "reporter_a") -> Any:
    return env.client.post(
        "/api/v1/submissions", headers=env.auth(username),
        data={"template_code": CUSTOMERS, "period_end": period, "draft": "true"},
        files={"file": ("客户草稿.txt", text_file(CUSTOMERS, rows), "text/plain")},
    )


def post(env: Env, username: str | None, path: str, body: dict[str, Any] | None = None) -> Any:
    headers = env.auth(username) if username else {}
    return env.client.post(f"/api/v1/submissions{path}", headers=headers, json=body)


def detail(env: Env, submission_id: int, username: str = "reporter_a") -> dict[str, Any]:
    response = env.client.get(f"/api/v1/submissions/{submission_id}", headers=env.auth(username))
    assert response.status_code == 200, response.text
    return response.json()


def warned_customers(period: str) -> list[dict[str, str]]:
    """Four customers: lines 2 and 3 have an unexplained R-KH-009 warning, line 4 explains it in 备注, line 5 is clean."""
    return [customer(1, period, JLKHGXRQ=EARLY_RELATION), customer(2, period, JLKHGXRQ=EARLY_RELATION),
            customer(3, period, JLKHGXRQ=EARLY_RELATION, BEIZ="客户成立前已有个人业务往来"), customer(4, period)]


# --- drafts ----------------------------------------------------------------------------------------


def test_draft_submit_supersedes(env: Env) -> None:
    period = "20220131"
    first = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, [customer(1, period)])).json()
    assert first["state"] == "pending_review"

    saved = save_draft(env, period, [customer(1, period), customer(2, period)])

    assert saved.status_code == 201, saved.text
    draft = saved.json()
    assert (draft["state"], draft["state_name"], draft["version"]) == ("draft", "草稿", 2)
    assert detail(env, first["id"])["state"] == "pending_review"
    assert messages_of(env, "reporter_a")[-1].title.startswith(f"报表 {CUSTOMERS} 2022-01-31 第 2 版草稿已保存")
    regulator_list = env.client.get(f"/api/v1/submissions?period_end={period}", headers=env.auth("reviewer")).json()
    assert [item["id"] for item in regulator_list] == [first["id"]]
    hidden = env.client.get(f"/api/v1/submissions/{draft['id']}", headers=env.auth("reviewer"))
    assert (hidden.status_code, hidden.json()["code"]) == (404, "SUBMISSION_NOT_FOUND")
    own_list = env.client.get(f"/api/v1/submissions?period_end={period}&state=draft", headers=env.auth("reporter_a"))
    assert [item["id"] for item in own_list.json()] == [draft["id"]]

    submitted = post(env, "instadmin_a", f"/{draft['id']}/submit")

    assert submitted.status_code == 200, submitted.text
    body = submitted.json()
    assert (body["state"], body["submitted_by"]) == ("pending_review", "instadmin_a")
    assert [(event["from_state"], event["to_state"]) for event in body["events"]] == [
        (None, "draft"), ("draft", "submitted"), ("submitted", "pending_review")]
    old = detail(env, first["id"])
    assert old["state"] == "superseded"
    assert old["events"][-1]["comment"] == "已被第 2 版替代"
    assert messages_of(env, "instadmin_a")[-1].title == (
        f"报表 {CUSTOMERS} 2022-01-31 第 2 版已通过校验，待审核：提示 0 条（已说明 0 条）")
    assert messages_of(env, "instadmin_a")[-1].link == f"/console/submissions/{draft['id']}"
    assert actions(env, f"submission:{draft['id']}") == [
        ("submissions.save_draft", "success", "reporter_a"), ("submissions.submit_draft", "success", "instadmin_a")]
    again = post(env, "reporter_a", f"/{draft['id']}/submit")
    assert (again.status_code, again.json()["code"]) == (409, "SUBMISSION_STATE_INVALID")
    assert "草稿" in again.json()["detail"]
    visible = env.client.get(f"/api/v1/submissions/{draft['id']}", headers=env.auth("reviewer"))
    assert visible.status_code == 200


def test_draft_with_errors_fails(env: Env) -> None:
    period = "20220228"
    draft = save_draft(env, period, [customer(1, period, ZCZB="-1.00")]).json()
    assert (draft["state"], draft["error_count"]) == ("draft", 1)

    body = post(env, "reporter_a", f"/{draft['id']}/submit").json()

    assert body["state"] == "validation_failed"
    assert [event["to_state"] for event in body["events"]] == ["draft", "submitted", "validation_failed"]
    assert "校验未通过：错误 1 条" in messages_of(env, "reporter_a")[-1].title


def test_discard_draft_kept(env: Env) -> None:
    period = "20220331"
    first = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, [customer(1, period)])).json()
    draft = save_draft(env, period, [customer(2, period)]).json()
    files = intake_files(env)

    discarded = post(env, "reporter_a", f"/{draft['id']}/discard")

    assert discarded.status_code == 200, discarded.text
    body = discarded.json()
    assert (body["state"], body["state_name"]) == ("withdrawn", "已作废")
    assert [(event["from_state"], event["to_state"]) for event in body["events"]] == [
        (None, "draft"), ("draft", "withdrawn")]
    assert detail(env, first["id"])["state"] == "pending_review"
    assert intake_files(env) == files  # the discarded file and its findings stay for the audit trail
    assert ("submissions.discard", "success", "reporter_a") in actions(env, f"submission:{draft['id']}")
    for action in ("submit", "discard"):
        late = post(env, "reporter_a", f"/{draft['id']}/{action}")
        assert (late.status_code, late.json()["code"]) == (409, "SUBMISSION_STATE_INVALID"), action
    hidden = env.client.get(f"/api/v1/submissions/{draft['id']}", headers=env.auth("analyst"))
    assert hidden.status_code == 404
    third = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, [customer(3, period)])).json()
    assert third["version"] == 3
    assert detail(env, draft["id"])["state"] == "withdrawn"  # a new upload does not supersede a discarded draft
    assert detail(env, first["id"])["state"] == "superseded"


def test_outdated_draft_refused(env: Env) -> None:
    period = "20220831"
    draft = save_draft(env, period, [customer(1, period)]).json()
    newer = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, [customer(2, period)])).json()
    assert (draft["version"], newer["version"]) == (1, 2)

    refused = post(env, "reporter_a", f"/{draft['id']}/submit")

    assert (refused.status_code, refused.json()["code"]) == (409, "DRAFT_OUTDATED")
    assert "第 2 版" in refused.json()["detail"]
    assert (detail(env, draft["id"])["state"], detail(env, newer["id"])["state"]) == ("draft", "pending_review")
    assert ("submissions.submit_draft", "failed", "reporter_a") in actions(env, f"submission:{draft['id']}")


# --- waivers ---------------------------------------------------------------------------------------


def test_accept_needs_warnings_resolved(env: Env) -> None:
    period = "20220430"
    created = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, warned_customers(period))).json()
    submission = created["id"]
    assert (created["state"], created["warning_count"], created["explained_warning_count"]) == ("pending_review", 3, 1)
    assert created["unresolved_warning_count"] == 2
    findings = env.client.get(f"/api/v1/submissions/{submission}/findings?severity=warning",
                              headers=env.auth("reviewer")).json()
    assert findings["total"] == 3
    assert [(item["line"], item["rule_id"], item["explained"]) for item in findings["items"]] == [
        (2, WARNING_RULE, False), (3, WARNING_RULE, False), (4, WARNING_RULE, True)]

    refused = post(env, "reviewer", f"/{submission}/accept", {"comment": "同意"})

    assert (refused.status_code, refused.json()["code"]) == (409, "WARNINGS_UNRESOLVED")
    assert "尚有 2 条提示" in refused.json()["detail"]
    assert "已说明 1 条，已豁免 0 条" in refused.json()["detail"]

    blank = post(env, "reviewer", f"/{submission}/waivers", {"rule_id": WARNING_RULE, "reason": "  "})
    unknown = post(env, "reviewer", f"/{submission}/waivers", {"rule_id": "R-KH-001", "reason": "核实"})
    clean_line = post(env, "reviewer", f"/{submission}/waivers", {"rule_id": WARNING_RULE, "lines": [2, 5],
                                                                   "reason": "核实"})
    explained_line = post(env, "reviewer", f"/{submission}/waivers", {"rule_id": WARNING_RULE, "lines": [4],
                                                                       "reason": "核实"})
    assert (blank.status_code, blank.json()["code"]) == (422, "WAIVER_REASON_REQUIRED")
    assert (unknown.status_code, unknown.json()["code"]) == (422, "WAIVER_RULE_INVALID")
    assert f"{WARNING_RULE}（2 条）" in unknown.json()["detail"]
    assert (clean_line.status_code, clean_line.json()["code"]) == (422, "WAIVER_LINES_INVALID")
    assert "第 5" in clean_line.json()["detail"]
    assert (explained_line.status_code, explained_line.json()["code"]) == (422, "WAIVER_LINES_INVALID")

    one = post(env, "reviewer", f"/{submission}/waivers", {"rule_id": WARNING_RULE, "lines": [2],
                                                           "reason": "已电话核实，客户关系早于工商登记"})
    assert one.status_code == 200, one.text
    assert (one.json()["waived_warning_count"], one.json()["unresolved_warning_count"]) == (1, 1)
    still = post(env, "reviewer", f"/{submission}/accept", {"comment": "同意"})
    assert (still.status_code, still.json()["code"]) == (409, "WARNINGS_UNRESOLVED")
    assert "尚有 1 条提示" in still.json()["detail"]
    report_before = env.client.get(f"/api/v1/submissions/{submission}/errors.csv", headers=env.auth("reporter_a"))
    assert report_before.status_code == 200

    rest = post(env, "reviewer", f"/{submission}/waivers", {"rule_id": WARNING_RULE, "reason": "批量核实无误"})

    assert rest.status_code == 200, rest.text
    body = rest.json()
    assert (body["waived_warning_count"], body["unresolved_warning_count"]) == (2, 0)
    assert [(item["rule_id"], item["lines"], item["finding_count"], item["author"]) for item in body["waivers"]] == [
        (WARNING_RULE, [2], 1, "reviewer"), (WARNING_RULE, None, 1, "reviewer")]
    nothing_left = post(env, "reviewer", f"/{submission}/waivers", {"rule_id": WARNING_RULE, "reason": "再次"})
    assert (nothing_left.status_code, nothing_left.json()["code"]) == (422, "WAIVER_RULE_INVALID")
    report = env.client.get(f"/api/v1/submissions/{submission}/errors.csv", headers=env.auth("reporter_a"))
    table = list(csv.reader(io.StringIO(report.content.decode("utf-8-sig"))))
    assert table[0][-1] == "审核豁免"
    waived = {(line[0], line[-1]) for line in table[1:] if line[4] == WARNING_RULE}
    assert waived == {("2", "已豁免：已电话核实，客户关系早于工商登记"), ("3", "已豁免：批量核实无误"), ("4", "")}
    shown = env.client.get(f"/api/v1/submissions/{submission}/findings", headers=env.auth("reporter_a")).json()
    assert [item["waiver_reason"] for item in shown["items"] if item["rule_id"] == WARNING_RULE] == [
        "已电话核实，客户关系早于工商登记", "批量核实无误", None]

    accepted = post(env, "reviewer", f"/{submission}/accept", {"comment": "同意"})

    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["state"] == "accepted"
    assert [entry for entry in actions(env, f"submission:{submission}") if entry[0] == "submissions.waive"] == [
        ("submissions.waive", "failed", "reviewer")] * 4 + [("submissions.waive", "success", "reviewer")] * 2 + [
        ("submissions.waive", "failed", "reviewer")]
    late = post(env, "reviewer", f"/{submission}/waivers", {"rule_id": WARNING_RULE, "reason": "审核后"})
    assert (late.status_code, late.json()["code"]) == (409, "SUBMISSION_STATE_INVALID")


def test_findings_paged(env: Env) -> None:
    period = "20220531"
    created = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, warned_customers(period))).json()
    url = f"/api/v1/submissions/{created['id']}/findings"

    first = env.client.get(f"{url}?limit=2", headers=env.auth("reporter_a")).json()
    second = env.client.get(f"{url}?limit=2&offset=2", headers=env.auth("reporter_a")).json()
    bad = env.client.get(f"{url}?severity=fatal", headers=env.auth("reporter_a"))

    assert first["total"] == second["total"] == 3
    assert [item["line"] for item in first["items"]] == [2, 3]
    assert [item["line"] for item in second["items"]] == [4]
    assert first["items"][0]["severity_name"] == "提示"
    assert (bad.status_code, bad.json()["code"]) == (422, "SEVERITY_INVALID")
    assert ("submissions.findings_read", "success", "reporter_a") in actions(env, f"submission:{created['id']}")


# --- denied ----------------------------------------------------------------------------------------


def test_workflow_denied(env: Env) -> None:
    period = "20220630"
    draft = save_draft(env, period, warned_customers(period)).json()
    pending_file = text_file(CUSTOMERS, warned_customers("20220731"))
    pending = upload(env, "reporter_a", CUSTOMERS, "20220731", pending_file).json()
    waiver = {"rule_id": WARNING_RULE, "reason": "越权豁免"}

    for path in ("", "/errors.csv", "/findings"):
        request_id = f"deny-{secrets.token_hex(6)}"
        response = env.client.get(f"/api/v1/submissions/{draft['id']}{path}",
                                  headers={**env.auth("reporter_b"), "X-Request-ID": request_id})
        assert (response.status_code, response.json()["code"]) == (403, "INSTITUTION_FORBIDDEN"), path
        assert [(event.action, event.outcome) for event in audit_events(env, request_id)] == [
            ("submissions.read", "denied")]
    for action in ("submit", "discard"):
        other = post(env, "reporter_b", f"/{draft['id']}/{action}")
        assert (other.status_code, other.json()["code"]) == (403, "INSTITUTION_FORBIDDEN"), action
        for regulator in ("reviewer", "analyst"):
            wrong_role = post(env, regulator, f"/{draft['id']}/{action}")
            assert (wrong_role.status_code, wrong_role.json()["code"]) == (403, "FORBIDDEN"), (regulator, action)
        anonymous = post(env, None, f"/{draft['id']}/{action}")
        assert anonymous.status_code == 401, action
    for username in ("reporter_a", "instadmin_a", "reporter_b", "analyst"):
        refused = post(env, username, f"/{pending['id']}/waivers", waiver)
        assert (refused.status_code, refused.json()["code"]) == (403, "FORBIDDEN"), username
    assert post(env, None, f"/{pending['id']}/waivers", waiver).status_code == 401
    assert env.client.get(f"/api/v1/submissions/{pending['id']}/findings").status_code == 401
    reviewer_upload = env.client.post(
        "/api/v1/submissions", headers=env.auth("reviewer"), data={"template_code": CUSTOMERS, "period_end": period},
        files={"file": ("x.txt", text_file(CUSTOMERS, [customer(1, period)]), "text/plain")})
    assert (reviewer_upload.status_code, reviewer_upload.json()["code"]) == (403, "FORBIDDEN")
    draft_waiver = post(env, "reviewer", f"/{draft['id']}/waivers", waiver)
    assert (draft_waiver.status_code, draft_waiver.json()["code"]) == (404, "SUBMISSION_NOT_FOUND")
    with env.db() as session:
        states = dict(session.execute(select(ReportSubmission.id, ReportSubmission.state).where(
            ReportSubmission.id.in_([draft["id"], pending["id"]]))).all())
        waived = session.get(ReportSubmission, pending["id"]).waived_warning_count
    assert states == {draft["id"]: "draft", pending["id"]: "pending_review"}
    assert waived == 0


def test_workbench_lists_own_drafts(env: Env) -> None:
    period = "20220930"
    saved = save_draft(env, period, [customer(1, period)])
    assert saved.status_code == 201, saved.text
    draft_id = saved.json()["id"]

    own = env.client.get("/console/workbench", headers=console_cookie(env, "reporter_a")).text
    other = env.client.get("/console/workbench", headers=console_cookie(env, "reporter_b")).text
    assert post(env, "reporter_a", f"/{draft_id}/discard").status_code == 200
    after_discard = env.client.get("/console/workbench", headers=console_cookie(env, "reporter_a")).text

    drafts = own.split('id="drafts"', 1)[1].split("</section>", 1)[0]
    assert f'id="drafts-{draft_id}"' in drafts
    assert f'href="/console/submissions/{draft_id}"' in drafts
    assert f'id="drafts-{draft_id}"' not in other
    assert f'id="drafts-{draft_id}"' not in after_discard


# --- batches ---------------------------------------------------------------------------------------


def test_accept_waits_for_referenced_tables(env: Env) -> None:
    period = "20240930"
    upload_batch(env, period, (1,))
    loans = upload(env, "reporter_a", LOANS, period, text_file(LOANS, [loan_row(1, period)])).json()
    assert loans["state"] == "pending_review", loans

    early = post(env, "reviewer", f"/{loans['id']}/accept", {"comment": "先审借据"})
    accept_referenced(env, loans["id"])
    after = post(env, "reviewer", f"/{loans['id']}/accept", {"comment": "数据完整"})

    assert (early.status_code, early.json()["code"]) == (409, "BATCH_NOT_ACCEPTED")
    assert "EAST_DGKHXXB" in early.json()["detail"]
    assert "EAST_XDHTB" in early.json()["detail"]
    assert "请先审核这些报表" in early.json()["detail"]
    assert after.status_code == 200, after.text


def test_failed_upload_keeps_pending_version(env: Env) -> None:
    period = "20221031"
    good = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, [customer(1, period)])).json()
    bad = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, [customer(1, period, ZCZB="-1.00")])).json()
    assert (good["state"], bad["state"]) == ("pending_review", "validation_failed")
    assert detail(env, good["id"])["state"] == "pending_review"

    fixed = upload(env, "reporter_a", CUSTOMERS, period, text_file(CUSTOMERS, [customer(2, period)])).json()

    assert fixed["state"] == "pending_review"
    assert detail(env, good["id"])["state"] == "superseded"
    assert detail(env, bad["id"])["state"] == "superseded"


def test_failed_table_not_used_as_batch(env: Env) -> None:
    period = "20241031"
    customers = upload(env, "reporter_a", CUSTOMERS, period,
                       text_file(CUSTOMERS, [customer_row(1, period) | {"ZCZB": "-1.00"}])).json()
    assert customers["state"] == "validation_failed"

    contracts = upload(env, "reporter_a", "EAST_XDHTB", period, text_file("EAST_XDHTB", [contract_row(1, period)])).json()

    assert contracts["state"] == "validation_failed"
    report = env.client.get(f"/api/v1/submissions/{contracts['id']}/errors.csv", headers=env.auth("reporter_a"))
    rows = list(csv.DictReader(io.StringIO(report.content.decode("utf-8-sig"))))
    assert any(row["字段代码"] == "KHTYBH" and "对公客户信息表" in row["问题说明"] for row in rows), rows


def test_upload_names_template_version(env: Env) -> None:
    period = "20221130"
    content = text_file(CUSTOMERS, [customer(1, period)])
    headers = env.auth("reporter_a")

    named = env.client.post("/api/v1/submissions", headers=headers,
                            data={"template_code": CUSTOMERS, "period_end": period, "template_version": "1"},
                            files={"file": ("客户.txt", content, "text/plain")})
    unknown = env.client.post("/api/v1/submissions", headers=headers,
                              data={"template_code": CUSTOMERS, "period_end": period, "template_version": "99"},
                              files={"file": ("客户.txt", content, "text/plain")})

    assert named.status_code == 201, named.text
    assert named.json()["template_version"] == 1
    assert (unknown.status_code, unknown.json()["code"]) == (422, "TEMPLATE_NOT_FOUND")
    assert "没有第 99 版" in unknown.json()["detail"]
