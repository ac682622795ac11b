"""Collection tasks (报送任务): creation, visibility, target states, overdue flag, reminders, denials.

Each test uses its own reporting period, because the environment (one per database backend) is
shared by every test of the session. Reminders are sent by calling send_due_reminders with a chosen time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from admin_api.db import utc_now
from admin_api.models import AuditEvent, Institution, ReportTask
from admin_api.tasks import send_due_reminders

from .conftest import Env
from .test_submissions import bank_a_licence  # noqa: F401  # module fixture: bank_a gets the test files' 金融许可证号
from .test_submissions import customer_row, messages_of, text_file, upload

TEMPLATE = "EAST_DGKHXXB"


def audit_events(env: Env, action: str) -> list[AuditEvent]:
    with env.db() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def deadline_in(days: float) -> str:
    return (utc_now() + timedelta(days=days)).isoformat()


def create(env: Env, user: str = "reviewer", **fields: Any) -> Any:
    body = {"template_code": TEMPLATE, "period_end": "20230131", "deadline": deadline_in(10),
            "institution_codes": ["bank_a", "bank_b"], **fields}
    return env.client.post("/api/v1/tasks", headers=env.auth(user), json=body)


def created(env: Env, **fields: Any) -> dict[str, Any]:
    response = create(env, **fields)
    assert response.status_code == 201, response.text
    return response.json()


def move_deadline(env: Env, task_id: int, deadline: datetime) -> None:
    with env.db() as session:
        session.get(ReportTask, task_id).deadline = deadline
        session.commit()


def task_titles(env: Env, username: str, period: str) -> list[str]:
    day = f"{period[:4]}-{period[4:6]}-{period[6:]}"
    return [message.title for message in messages_of(env, username)
            if day in message.title and message.title.startswith(("报送提醒", "报送已逾期"))]


def test_create_by_codes_and_type(env: Env) -> None:
    by_codes = created(env, period_end="20230131", reminder_days=[1, 3, 3])
    by_type = created(env, period_end="20230228", institution_codes=None, institution_types=["银行"])

    assert [item["institution_code"] for item in by_codes["targets"]] == ["bank_a", "bank_b"]
    assert (by_codes["status"], by_codes["frequency"], by_codes["template_version"]) == ("open", "monthly", 1)
    assert (by_codes["reminder_days"], by_codes["target_kind"], by_codes["created_by"]) == ([3, 1], "institutions",
                                                                                             "reviewer")
    assert {item["state"] for item in by_codes["targets"]} == {"not_submitted"}
    assert {item["state_name"] for item in by_codes["targets"]} == {"未报送"}
    codes = {item["institution_code"] for item in by_type["targets"]}
    assert {"bank_a", "bank_b", "bank_c"} <= codes
    assert {item["institution_type"] for item in by_type["targets"]} == {"银行"}
    assert (by_type["target_kind"], by_type["target_values"]) == ("types", ["银行"])
    events = audit_events(env, action="tasks.create")
    assert any(event.resource == f"task:{by_type['id']}" and event.outcome == "success" for event in events)

    # an institution that changes type later stays a target of the issued task
    with env.db() as session:
        bank_c = session.scalars(select(Institution).where(Institution.code == "bank_c")).one()
        before, bank_c.type = bank_c.type, "信托"
        session.commit()
    try:
        detail = env.client.get(f"/api/v1/tasks/{by_type['id']}", headers=env.auth("reviewer")).json()
        assert "bank_c" in {item["institution_code"] for item in detail["targets"]}
    finally:
        with env.db() as session:
            session.scalars(select(Institution).where(Institution.code == "bank_c")).one().type = before
            session.commit()

    listing = env.client.get("/api/v1/tasks?period_end=20230131", headers=env.auth("analyst"))
    assert listing.status_code == 200, listing.text
    assert int(listing.headers["X-Total-Count"]) >= 1
    assert by_codes["id"] in [item["id"] for item in listing.json()]


@pytest.mark.parametrize(("fields", "code", "needle"), [
    ({"template_code": "EAST_NOPE"}, "TEMPLATE_NOT_FOUND", "EAST_NOPE"),
    ({"template_version": 9}, "TEMPLATE_NOT_FOUND", "9"),
    ({"period_end": "20230115"}, "PERIOD_FREQUENCY_MISMATCH", "20230115"),
    ({"period_end": "20230228", "frequency": "quarterly"}, "PERIOD_FREQUENCY_MISMATCH", "20230228"),
    ({"period_end": "20231331"}, "PERIOD_INVALID", "20231331"),
    ({"frequency": "weekly"}, "FREQUENCY_INVALID", "weekly"),
    ({"deadline": "2020-01-01T00:00:00+08:00"}, "DEADLINE_PASSED", "2020-01-01"),
    ({"institution_codes": ["bank_a", "bank_zz"]}, "TASK_TARGET_UNKNOWN", "bank_zz"),
    ({"institution_codes": None, "institution_types": ["地方金融组织"]}, "TASK_NO_TARGET", "地方金融组织"),
    ({"institution_types": ["银行"]}, "TASK_TARGETS_INVALID", "institution_codes"),
    ({"reminder_days": [0]}, "REMINDER_DAYS_INVALID", "0"),
])
def test_bad_inputs(env: Env, fields: dict[str, Any], code: str, needle: str) -> None:
    response = create(env, **fields)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert needle in response.json()["detail"]
    assert any(event.outcome == "failed" and code in (event.detail or "")
               for event in audit_events(env, action="tasks.create"))


def test_ad_hoc_and_naive_deadline(env: Env) -> None:
    ad_hoc = create(env, period_end="20230117", frequency="ad_hoc")
    naive = create(env, period_end="20230131", deadline=(utc_now() + timedelta(days=3)).replace(tzinfo=None).isoformat())

    assert ad_hoc.status_code == 201, ad_hoc.text
    assert ad_hoc.json()["frequency_name"] == "不定期"
    assert naive.status_code == 422, naive.text


def test_institution_user_own_tasks(env: Env) -> None:
    period = "20230331"
    task = created(env, period_end=period, institution_codes=["bank_a", "bank_b"])
    other = created(env, period_end=period, institution_codes=["bank_b"])

    before = env.client.get(f"/api/v1/tasks?period_end={period}", headers=env.auth("reporter_a")).json()
    response = upload(env, "reporter_a", TEMPLATE, period, text_file(TEMPLATE, [customer_row(1, period)]))
    assert response.status_code == 201, response.text
    submission_id = response.json()["id"]
    after = env.client.get(f"/api/v1/tasks?period_end={period}", headers=env.auth("reporter_a"))
    detail = env.client.get(f"/api/v1/tasks/{task['id']}", headers=env.auth("reporter_a")).json()
    accepted = env.client.post(f"/api/v1/submissions/{submission_id}/accept", headers=env.auth("reviewer"))
    assert accepted.status_code == 200, accepted.text
    regulator = env.client.get(f"/api/v1/tasks/{task['id']}", headers=env.auth("reviewer")).json()

    assert [item["id"] for item in before] == [task["id"]]
    assert (before[0]["own_state"], before[0]["own_state_name"], before[0]["overdue"]) == (
        "not_submitted", "未报送", False)
    assert after.headers["X-Total-Count"] == "1"
    assert (after.json()[0]["own_state_name"], after.json()[0]["own_submission_id"]) == ("已报送待审核", submission_id)
    assert [item["institution_code"] for item in detail["targets"]] == ["bank_a"]
    assert detail["target_count"] == 2
    assert [item["institution_code"] for item in regulator["targets"]] == ["bank_a", "bank_b"]
    assert [item["state_name"] for item in regulator["targets"]] == ["审核通过", "未报送"]
    assert (regulator["submitted_count"], regulator["on_time_count"], regulator["accepted_count"]) == (1, 1, 1)
    assert regulator["overdue_count"] == 0
    assert other["id"] not in [item["id"] for item in after.json()]


def test_failed_upload_keeps_accepted_state(env: Env) -> None:
    period = "20230831"
    task = created(env, period_end=period, institution_codes=["bank_a"])
    good = upload(env, "reporter_a", TEMPLATE, period, text_file(TEMPLATE, [customer_row(1, period)]))
    assert good.status_code == 201, good.text
    accepted = env.client.post(f"/api/v1/submissions/{good.json()['id']}/accept", headers=env.auth("reviewer"))
    assert accepted.status_code == 200, accepted.text
    bad_row = {**customer_row(1, period), "CLRQ": "20101301"}
    failed = upload(env, "reporter_a", TEMPLATE, period, text_file(TEMPLATE, [bad_row]))
    assert failed.status_code == 201, failed.text
    assert failed.json()["state"] == "validation_failed"

    regulator = env.client.get(f"/api/v1/tasks/{task['id']}", headers=env.auth("reviewer")).json()
    own = env.client.get(f"/api/v1/tasks?period_end={period}", headers=env.auth("reporter_a")).json()

    assert [item["state_name"] for item in regulator["targets"]] == ["审核通过"]
    assert (regulator["submitted_count"], regulator["accepted_count"]) == (1, 1)
    assert (own[0]["own_state"], own[0]["own_submission_id"]) == ("accepted", good.json()["id"])


def test_overdue_flag(env: Env) -> None:
    period = "20230430"
    task = created(env, period_end=period, institution_codes=["bank_a", "bank_b"])
    response = upload(env, "reporter_a", TEMPLATE, period, text_file(TEMPLATE, [customer_row(1, period)]))
    assert response.status_code == 201, response.text
    move_deadline(env, task["id"], utc_now() - timedelta(hours=1))

    regulator = env.client.get(f"/api/v1/tasks/{task['id']}", headers=env.auth("reviewer")).json()
    own_b = env.client.get(f"/api/v1/tasks?period_end={period}", headers=env.auth("reporter_b")).json()

    states = {item["institution_code"]: (item["overdue"], item["overdue_name"], item["on_time"])
              for item in regulator["targets"]}
    assert states == {"bank_a": (False, None, False), "bank_b": (True, "已逾期", False)}
    assert regulator["overdue_count"] == 1
    assert (own_b[0]["overdue"], own_b[0]["overdue_name"], own_b[0]["own_state"]) == (True, "已逾期", "not_submitted")


def test_reminders_once_per_threshold(env: Env) -> None:
    period = "20230531"
    task = created(env, period_end=period, institution_codes=["bank_a", "bank_b"], reminder_days=[3, 1])
    response = upload(env, "reporter_a", TEMPLATE, period, text_file(TEMPLATE, [customer_row(1, period)]))
    assert response.status_code == 201, response.text
    with env.db() as session:
        deadline = session.get(ReportTask, task["id"]).deadline

    with env.db() as session:
        send_due_reminders(session, deadline - timedelta(days=5))
        early = task_titles(env, "reporter_b", period)
        send_due_reminders(session, deadline - timedelta(days=3) + timedelta(minutes=1))
        send_due_reminders(session, deadline - timedelta(days=2))
        after_three_days = task_titles(env, "reporter_b", period)
        send_due_reminders(session, deadline - timedelta(hours=20))
        send_due_reminders(session, deadline - timedelta(hours=10))
        after_one_day = task_titles(env, "reporter_b", period)
        send_due_reminders(session, deadline + timedelta(minutes=1))
        send_due_reminders(session, deadline + timedelta(days=2))

    final = task_titles(env, "reporter_b", period)
    assert early == []
    assert after_three_days == [f"报送提醒：报表 {TEMPLATE} 2023-05-31 距截止还有 3 天"]
    assert after_one_day == after_three_days + [f"报送提醒：报表 {TEMPLATE} 2023-05-31 距截止还有 1 天"]
    assert final == after_one_day + [f"报送已逾期：报表 {TEMPLATE} 2023-05-31"]
    assert task_titles(env, "reporter_a", period) == [], "bank_a submitted and gets no reminder"


def test_close_task_twice(env: Env) -> None:
    period = "20230630"
    task = created(env, period_end=period, institution_codes=["bank_c"])
    closed = env.client.post(f"/api/v1/tasks/{task['id']}/close", headers=env.auth("sysadmin"))
    again = env.client.post(f"/api/v1/tasks/{task['id']}/close", headers=env.auth("sysadmin"))
    with env.db() as session:
        send_due_reminders(session, utc_now() + timedelta(days=30))

    assert closed.status_code == 200, closed.text
    assert (closed.json()["status"], closed.json()["status_name"]) == ("closed", "已关闭")
    assert (again.status_code, again.json()["code"]) == (409, "TASK_STATE_INVALID")
    assert task_titles(env, "reporter_c", period) == []
    outcomes = [(event.outcome, event.actor) for event in audit_events(env, action="tasks.close")
                if event.resource == f"task:{task['id']}"]
    assert outcomes == [("success", "sysadmin"), ("failed", "sysadmin")]


def test_denied(env: Env) -> None:
    period = "20230731"
    task = created(env, period_end=period, institution_codes=["bank_b"])

    by_reporter = create(env, user="reporter_a", period_end=period)
    by_analyst = create(env, user="analyst", period_end=period)
    other_detail = env.client.get(f"/api/v1/tasks/{task['id']}", headers=env.auth("reporter_a"))
    other_list = env.client.get("/api/v1/tasks?institution_code=bank_b", headers=env.auth("reporter_a"))
    close = env.client.post(f"/api/v1/tasks/{task['id']}/close", headers=env.auth("reporter_b"))
    missing = env.client.get("/api/v1/tasks/999999", headers=env.auth("reviewer"))

    assert (by_reporter.status_code, by_analyst.status_code, close.status_code) == (403, 403, 403)
    assert (other_detail.status_code, other_detail.json()["code"]) == (403, "INSTITUTION_FORBIDDEN")
    assert "bank_b" in other_detail.json()["detail"]
    assert (other_list.status_code, other_list.json()["code"]) == (403, "INSTITUTION_FORBIDDEN")
    assert (missing.status_code, missing.json()["code"]) == (404, "TASK_NOT_FOUND")
    denied = [(event.actor, "INSTITUTION_FORBIDDEN" in (event.detail or "")) for event in audit_events(env, action="tasks.read")
              if event.outcome == "denied"]
    assert ("reporter_a", True) in denied
    write_denials = [event.actor for event in audit_events(env, action="tasks.write") if event.outcome == "denied"]
    assert "reporter_b" in write_denials
