"""The console pages 报送任务, 报送统计 and 工作台 through the test client, including the denied cases.

Tasks get periods of their own (2022 and 2018) so the tests of other modules, which share the
environment, do not see them in their lists. Workbench data belongs to an institution made here.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from admin_api.db import utc_now
from admin_api.display import BEIJING
from admin_api.models import AuditEvent, Institution, ReportTask, User
from admin_api.security import csrf_token

from .conftest import Env
from .helpers import console_cookie
from .task_data import Seeder, Upload

TEMPLATE = "EAST_DGKHXXB"


def signed_in(env: Env, username: str) -> tuple[TestClient, str]:
    """Return a client with a console session of ``username`` and the CSRF token of that session."""
    browser = TestClient(env.client.app)
    token = console_cookie(env, username)["Cookie"].split("=", 1)[1]
    browser.cookies.set("regsandbox_session", token)
    return browser, csrf_token(env.secrets.session_secret, token)


def events(env: Env, action: str, actor: str | None = None) -> list[AuditEvent]:
    with env.db() as session:
        query = select(AuditEvent).where(AuditEvent.action == action)
        if actor:
            query = query.where(AuditEvent.actor == actor)
        return list(session.scalars(query.order_by(AuditEvent.id)))


def beijing_in(days: float) -> str:
    return (utc_now() + timedelta(days=days)).astimezone(BEIJING).strftime("%Y-%m-%dT%H:%M")


def task_form(csrf: str, **fields: Any) -> dict[str, Any]:
    return {"csrf_token": csrf, "template": f"{TEMPLATE}:1", "period_end": "20220131", "frequency": "",
            "deadline": beijing_in(10), "target_kind": "institutions", "institution_codes": "bank_a",
            "reminder_days": "3,1", **fields}


def publish(env: Env, **fields: Any) -> int:
    reviewer, csrf = signed_in(env, "reviewer")
    response = reviewer.post("/console/tasks", data=task_form(csrf, **fields), follow_redirects=False)
    assert response.status_code == 303, response.text
    match = re.fullmatch(r"/console/tasks/(\d+)\?done=created", response.headers["location"])
    assert match, response.headers["location"]
    return int(match.group(1))


def task_count(env: Env) -> int:
    with env.db() as session:
        return len(session.scalars(select(ReportTask.id)).all())


# --- 报送任务 ------------------------------------------------------------------------------------------


def test_publish_by_codes(env: Env) -> None:
    deadline = beijing_in(5)
    task_id = publish(env, period_end="20220228", deadline=deadline, institution_codes="bank_a，bank_b\nbank_a")
    reviewer, _ = signed_in(env, "reviewer")

    page = reviewer.get(f"/console/tasks/{task_id}?done=created")

    assert page.status_code == 200
    assert f"已发布报送任务 {task_id}" in page.text
    assert 'id="target-bank_a"' in page.text
    assert 'id="target-bank_b"' in page.text
    assert page.text.count("未报送") >= 2
    assert 'id="close-task"' in page.text
    with env.db() as session:
        task = session.get(ReportTask, task_id)
        assert task.deadline.astimezone(BEIJING).strftime("%Y-%m-%dT%H:%M") == deadline
        assert (task.reminder_days, task.target_values) == ([3, 1], ["bank_a", "bank_b"])
    assert any(event.resource == f"task:{task_id}" for event in events(env, "tasks.create", "reviewer"))


def test_publish_by_type(env: Env) -> None:
    task_id = publish(env, period_end="20220331", target_kind="types", institution_codes="",
                      institution_types=["银行"], template=TEMPLATE)
    reviewer, _ = signed_in(env, "reviewer")

    page = reviewer.get(f"/console/tasks/{task_id}").text

    for code in ("bank_a", "bank_b", "bank_c"):
        assert f'id="target-{code}"' in page
    assert "按机构类型：银行" in page


def test_publish_bad_deadline_keeps_form(env: Env) -> None:
    reviewer, csrf = signed_in(env, "reviewer")
    before = task_count(env)

    response = reviewer.post("/console/tasks", data=task_form(csrf, deadline="2022/13/01 18:00",
                                                              period_end="20220430"))

    assert response.status_code == 422
    assert "截止时间“2022/13/01 18:00”格式无效" in response.text
    assert 'value="20220430"' in response.text
    assert task_count(env) == before
    assert events(env, "tasks.create", "reviewer")[-1].outcome == "failed"


def test_publish_past_deadline_and_bad_reminders(env: Env) -> None:
    reviewer, csrf = signed_in(env, "reviewer")

    past = reviewer.post("/console/tasks", data=task_form(csrf, deadline=beijing_in(-1)))
    reminders = reviewer.post("/console/tasks", data=task_form(csrf, reminder_days="3, 一"))
    period = reviewer.post("/console/tasks", data=task_form(csrf, period_end="20220215"))
    unknown = reviewer.post("/console/tasks", data=task_form(csrf, institution_codes="bank_a zz_none"))

    assert (past.status_code, reminders.status_code, period.status_code, unknown.status_code) == (422, 422, 422, 422)
    assert "已过" in past.text
    assert "提醒天数“一”无效" in reminders.text
    assert "20220215 不是报告期末" in period.text
    assert "zz_none" in unknown.text


def test_publish_bad_csrf_or_role(env: Env) -> None:
    reviewer, _ = signed_in(env, "reviewer")
    reporter, reporter_csrf = signed_in(env, "reporter_a")
    before = task_count(env)

    forged = reviewer.post("/console/tasks", data=task_form("forged"))
    by_reporter = reporter.post("/console/tasks", data=task_form(reporter_csrf))

    assert forged.status_code == 403
    assert "表单已过期" in forged.text
    assert by_reporter.status_code == 403
    assert task_count(env) == before


def test_list_filters_and_institution_view(env: Env) -> None:
    own = publish(env, period_end="20220531", institution_codes="bank_a bank_b")
    other = publish(env, period_end="20220531", institution_codes="bank_b")
    reviewer, _ = signed_in(env, "reviewer")
    reporter, _ = signed_in(env, "reporter_a")

    regulator_page = reviewer.get("/console/tasks?period_end=20220531").text
    filtered = reviewer.get("/console/tasks?period_end=20220531&institution_code=bank_a").text
    reporter_page = reporter.get("/console/tasks?period_end=20220531&institution_code=bank_b").text

    assert f'id="task-{own}"' in regulator_page
    assert f'id="task-{other}"' in regulator_page
    assert 'id="create-task"' in regulator_page
    assert f'id="task-{own}"' in filtered
    assert f'id="task-{other}"' not in filtered
    assert f'id="task-{own}"' in reporter_page
    assert f'id="task-{other}"' not in reporter_page
    assert 'id="create-task"' not in reporter_page
    assert f'href="/console/submissions/new?task={own}"' in reporter_page
    assert "报送机构代码" not in reporter_page


def test_list_bad_filter_message(env: Env) -> None:
    reviewer, _ = signed_in(env, "reviewer")

    status = reviewer.get("/console/tasks?status=paused")
    period = reviewer.get("/console/tasks?period_end=2022-01")

    assert status.status_code == 422
    assert "任务状态“paused”无效" in status.text
    assert period.status_code == 422


def test_institution_user_other_task_denied(env: Env) -> None:
    task_id = publish(env, period_end="20220630", institution_codes="bank_b")
    reporter, _ = signed_in(env, "reporter_a")
    admin_a, _ = signed_in(env, "instadmin_a")
    reporter_b, _ = signed_in(env, "reporter_b")

    denied = reporter.get(f"/console/tasks/{task_id}")
    denied_admin = admin_a.get(f"/console/tasks/{task_id}")
    own = reporter_b.get(f"/console/tasks/{task_id}")

    assert denied.status_code == 403
    assert "您只能访问本机构（bank_a）的数据" in denied.text
    assert "bank_b" not in denied.text.split("您只能", 1)[0]
    assert denied_admin.status_code == 403
    assert own.status_code == 200
    assert "本机构报送状态" in own.text
    assert 'id="task-counts"' not in own.text
    assert events(env, "tasks.read", "reporter_a")[-1].outcome == "denied"


def test_upload_link_fills_task_form(env: Env) -> None:
    own = publish(env, period_end="20220831", institution_codes="bank_a")
    other = publish(env, period_end="20220831", institution_codes="bank_b")
    reporter, _ = signed_in(env, "reporter_a")
    reviewer, _ = signed_in(env, "reviewer")

    opened = reporter.get(f"/console/submissions/new?task={own}", follow_redirects=False)
    form = reporter.get(opened.headers["location"]).text
    denied = reporter.get(f"/console/submissions/new?task={other}")
    missing = reporter.get("/console/submissions/new?task=999999")
    not_a_reporter = reviewer.get(f"/console/submissions/new?task={own}")
    without_task = reporter.get("/console/submissions/new", follow_redirects=False)

    assert opened.status_code == 303
    assert opened.headers["location"] == f"/console/submissions?template={TEMPLATE}&period=20220831&version=1#upload"
    assert f'<option value="{TEMPLATE}" selected>' in form
    assert 'name="period_end" value="20220831"' in form
    assert '<input type="hidden" name="template_version" value="1">' in form
    assert "使用模板第 1 版校验" in form
    assert denied.status_code == 403
    assert "您只能访问本机构（bank_a）的数据" in denied.text
    assert missing.status_code == 404
    assert "报送任务 999999 不存在" in missing.text
    assert not_a_reporter.status_code == 403
    assert without_task.status_code == 303
    assert without_task.headers["location"] == "/console/submissions#upload"


def test_institution_user_sees_own_target_only(env: Env) -> None:
    task_id = publish(env, period_end="20220731", institution_codes="bank_a bank_b")
    reporter, _ = signed_in(env, "reporter_a")

    page = reporter.get(f"/console/tasks/{task_id}").text

    assert 'id="target-bank_a"' in page
    assert 'id="target-bank_b"' not in page
    assert 'id="close-task"' not in page
    assert 'id="state-filter"' not in page


def test_anonymous_sent_to_login(env: Env) -> None:
    anonymous = TestClient(env.client.app)

    for path in ("/console/tasks", "/console/tasks/1", "/console/tasks/statistics", "/console/workbench"):
        response = anonymous.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"] == "/console/login"
    posted = anonymous.post("/console/tasks", data={"csrf_token": "x"}, follow_redirects=False)
    assert posted.status_code == 303


def test_close_task_twice(env: Env) -> None:
    task_id = publish(env, period_end="20220831")
    reviewer, csrf = signed_in(env, "reviewer")

    closed = reviewer.post(f"/console/tasks/{task_id}/close", data={"csrf_token": csrf}, follow_redirects=False)
    again = reviewer.post(f"/console/tasks/{task_id}/close", data={"csrf_token": csrf})
    missing = reviewer.post("/console/tasks/999999/close", data={"csrf_token": csrf})
    page = reviewer.get(f"/console/tasks/{task_id}").text

    assert closed.status_code == 303
    assert again.status_code == 409
    assert f"报送任务 {task_id} 已关闭" in again.text
    assert missing.status_code == 404
    assert "已关闭" in page
    assert 'id="close-task"' not in page
    assert [event.outcome for event in events(env, "tasks.close", "reviewer")
            if event.resource == f"task:{task_id}"] == ["success", "failed"]


def test_close_denied_to_analyst_and_reporter(env: Env) -> None:
    task_id = publish(env, period_end="20220930")
    analyst, analyst_csrf = signed_in(env, "analyst")
    reporter, reporter_csrf = signed_in(env, "reporter_a")

    by_analyst = analyst.post(f"/console/tasks/{task_id}/close", data={"csrf_token": analyst_csrf})
    by_reporter = reporter.post(f"/console/tasks/{task_id}/close", data={"csrf_token": reporter_csrf})
    page = analyst.get(f"/console/tasks/{task_id}").text

    assert (by_analyst.status_code, by_reporter.status_code) == (403, 403)
    assert 'id="close-task"' not in page
    with env.db() as session:
        assert session.get(ReportTask, task_id).status == "open"


# --- 报送统计 ------------------------------------------------------------------------------------------


def test_statistics_page_regulators_only(env: Env) -> None:
    analyst, _ = signed_in(env, "analyst")
    reporter, _ = signed_in(env, "reporter_a")
    admin_a, _ = signed_in(env, "instadmin_a")

    page = analyst.get("/console/tasks/statistics?sort=missing&order=desc")
    by_reporter = reporter.get("/console/tasks/statistics")
    by_admin = admin_a.get("/console/tasks/statistics")

    assert page.status_code == 200
    assert 'id="institution-rates"' in page.text
    assert 'id="task-rates"' in page.text
    assert "未报送 ↓" in page.text
    assert by_reporter.status_code == 403
    assert "查看报送统计" in by_reporter.text
    assert by_admin.status_code == 403
    assert events(env, "tasks.statistics", "analyst")[-1].outcome == "success"
    assert events(env, "tasks.statistics", "reporter_a")[-1].outcome == "denied"


def test_statistics_bad_year_and_sort(env: Env) -> None:
    analyst, _ = signed_in(env, "analyst")

    year = analyst.get("/console/tasks/statistics?year=20x6")
    sort = analyst.get("/console/tasks/statistics?sort=password")

    assert year.status_code == 422
    assert "年度“20x6”无效" in year.text
    assert sort.status_code == 422
    assert "排序字段“password”无效" in sort.text


def test_statistics_page_rates(env: Env) -> None:
    """One institution of its own: one task on time and accepted, one missing, in reporting year 2018."""
    code = f"wbs_{secrets.token_hex(3)}"
    deadline = datetime(2018, 2, 10, tzinfo=UTC)
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        institution_id = seed.institutions([code])[code]
        seed.task(TEMPLATE, date(2018, 1, 31), deadline, [institution_id])
        seed.task(TEMPLATE, date(2018, 2, 28), deadline + timedelta(days=28), [institution_id])
        seed.uploads(institution_id, TEMPLATE, date(2018, 1, 31), [
            Upload("accepted", [("pending_review", deadline - timedelta(days=1)), ("accepted", deadline)])])
        seed.flush()
        session.commit()
    analyst, _ = signed_in(env, "analyst")

    page = analyst.get(f"/console/tasks/statistics?year=2018&template_code={TEMPLATE}").text

    row = re.search(rf'<tr id="rate-{code}">(.*?)</tr>', page, re.S)
    assert row, page
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    assert cells[3:] == ["2", "1", "0", "1", "1", "50.0%", "100.0%"]
    assert "按时报送 1，逾期报送 0，未报送 1" in page


# --- 工作台 --------------------------------------------------------------------------------------------


def workbench_institution(env: Env, old: datetime = datetime(2001, 1, 1, tzinfo=UTC)) -> tuple[str, str]:
    """Make an institution with a reporter, open tasks and submissions uploaded at ``old``; return (code, user).

    Of three open tasks, one is overdue with a returned submission, one is due in two days without
    a submission, and one has a submission pending review. A submission of another template failed validation.
    """
    code = f"wb_{secrets.token_hex(3)}"
    username = f"wbr_{secrets.token_hex(3)}"
    now = utc_now()
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        institution_id = seed.institutions([code])[code]
        session.add(User(username=username, display_name="工作台报送员", email=f"{username}@wb.example",
                         role="reporter", institution_id=institution_id, password_hash="", is_active=True))
        seed.task(TEMPLATE, date(2017, 1, 31), now + timedelta(days=2, hours=1), [institution_id])
        seed.task(TEMPLATE, date(2017, 2, 28), now - timedelta(days=3, hours=1), [institution_id])
        seed.task(TEMPLATE, date(2017, 3, 31), now + timedelta(days=5), [institution_id])
        seed.uploads(institution_id, TEMPLATE, date(2017, 2, 28), [
            Upload("returned", [("pending_review", old), ("returned", old + timedelta(hours=2))],
                   review_comment="第 3 行注册资本与营业执照不符")])
        seed.uploads(institution_id, TEMPLATE, date(2017, 3, 31), [
            Upload("pending_review", [("pending_review", old + timedelta(minutes=5))], warning_count=7)])
        seed.uploads(institution_id, "EAST_XDHTB", date(2017, 1, 31), [
            Upload("validation_failed", [("validation_failed", old)], error_count=12)])
        seed.flush()
        session.commit()
    return code, username


def test_workbench_reporter_widgets(env: Env) -> None:
    code, username = workbench_institution(env)
    reporter, _ = signed_in(env, username)

    page = reporter.get("/console/workbench").text

    due = page.split('id="due-tasks"', 1)[1].split("</section>", 1)[0]
    assert "待报送任务（2）" in due
    assert due.index("20170228") < due.index("20170131")  # the overdue task comes first
    assert "已逾期 3 天" in due
    assert "剩余 2 天" in due
    assert "20170331" not in due  # submitted, pending review
    assert "已退回" in due
    returned = page.split('id="returned"', 1)[1].split("</section>", 1)[0]
    assert "第 3 行注册资本与营业执照不符" in returned
    failed = page.split('id="failed"', 1)[1].split("</section>", 1)[0]
    assert "12 个错误" in failed
    assert 'id="drafts"' in page
    assert "没有未提交的草稿" in page
    assert 'id="review-queue"' not in page
    assert 'id="worst-institutions"' not in page
    assert code not in page.split("<main>", 1)[0]


def test_workbench_reviewer_queue_oldest_first(env: Env) -> None:
    code, _ = workbench_institution(env, old=datetime(1999, 1, 1, tzinfo=UTC))
    reviewer, _ = signed_in(env, "reviewer")

    page = reviewer.get("/console/workbench").text

    queue = page.split('id="review-queue"', 1)[1].split("</section>", 1)[0]
    first_row = re.search(r'<tr id="queue-(\d+)">(.*?)</tr>', queue, re.S)
    assert first_row is not None
    assert code in first_row.group(2)  # submitted in 1999, older than any other pending submission
    assert re.search(r'<td class="warnings">7</td>', first_row.group(2))
    assert f'id="queue-template-{TEMPLATE}"' in queue
    assert 'href="/console/reviews"' in queue
    assert 'id="due-tasks"' not in page
    assert 'id="worst-institutions"' in page


def test_workbench_widgets_per_role(env: Env) -> None:
    analyst, _ = signed_in(env, "analyst")
    auditor, _ = signed_in(env, "auditor")
    admin_a, _ = signed_in(env, "instadmin_a")
    modeller, _ = signed_in(env, "modeller_a")

    analyst_page = analyst.get("/console/workbench").text
    auditor_page = auditor.get("/console/workbench").text
    admin_page = admin_a.get("/console/workbench").text
    modeller_page = modeller.get("/console/workbench").text

    assert 'id="worst-institutions"' in analyst_page
    assert 'id="review-queue"' not in analyst_page
    assert 'id="no-widgets"' in auditor_page
    assert 'id="due-tasks"' in admin_page
    assert 'id="returned"' in admin_page
    assert 'id="worst-institutions"' not in admin_page
    assert 'id="no-widgets"' in modeller_page
    for page in (analyst_page, auditor_page, admin_page, modeller_page):
        assert re.search(r'<strong>监管沙箱管理控制台</strong>\s*<a href="/console/workbench" id="nav-workbench">工作台</a>',
                         page)


def test_workbench_other_institution_hidden(env: Env) -> None:
    code, _ = workbench_institution(env)
    reporter, _ = signed_in(env, "reporter_a")

    page = reporter.get("/console/workbench").text

    assert code not in page
    assert "第 3 行注册资本与营业执照不符" not in page
    with env.db() as session:
        assert session.scalars(select(Institution.id).where(Institution.code == code)).one()


def test_workbench_steward_sees_unconfirmed_columns(env: Env) -> None:
    steward, _ = signed_in(env, "steward")
    reporter, _ = signed_in(env, "reporter_a")

    page = steward.get("/console/workbench").text
    reporter_page = reporter.get("/console/workbench").text

    section = page.split('id="catalog-review"', 1)[1].split("</section>", 1)[0]
    count = re.search(r"待确认的数据分级分类（(\d+)）", section)
    assert count is not None
    assert int(count.group(1)) > 0  # the start-up sync catalogues every template field, none confirmed yet
    assert 'href="/console/catalog/review"' in section
    assert 'id="no-widgets"' not in page
    assert 'id="catalog-review"' not in reporter_page
