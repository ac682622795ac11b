"""Console forms for report notebooks and schedules, 北京时间 on pages, the audit page and the home pages."""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime

from fastapi.testclient import TestClient
from sqlalchemy import select

from admin_api.display import beijing, detail_lines
from admin_api.models import AuditEvent, ReportNotebook, ReportRun, Schedule

from .conftest import Env, write_notebook
from .helpers import approved_schedule, notebook_id

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _signed_in(env: Env, username: str) -> tuple[TestClient, str]:
    """Return a browser signed in as ``username`` and the CSRF token of its session."""
    browser = TestClient(env.client.app)
    form = browser.get("/console/login")
    response = browser.post(
        "/console/login",
        data={"username": username, "password": env.passwords[username],
              "csrf_token": _CSRF.search(form.text).group(1)},  # type: ignore[union-attr]
        follow_redirects=False,
    )
    assert response.status_code == 303
    page = browser.get("/console/schedules" if username in ("sysadmin", "reviewer") else "/console/")
    return browser, _CSRF.search(page.text).group(1)  # type: ignore[union-attr]


def _newest_event(env: Env, action: str) -> AuditEvent:
    with env.db() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id.desc())
        ).first()
    assert event is not None
    return event


def _new_notebook(env: Env, status: str = "pending") -> int:
    """Register a new report notebook file with ``status`` (default pending) and return its id."""
    stem = f"console_{secrets.token_hex(4)}"
    write_notebook(env.project_root / "notebooks" / "reports" / f"{stem}.ipynb", f"表单测试报告 {stem}")
    with env.db() as session:
        notebook = ReportNotebook(name=f"表单测试报告 {stem}", path=f"notebooks/reports/{stem}.ipynb", status=status)
        session.add(notebook)
        session.commit()
        return notebook.id


def _schedule_form(env: Env, csrf: str, **fields: str) -> dict[str, str]:
    approved_schedule(env)
    form = {"name": f"表单调度-{secrets.token_hex(4)}", "notebook_id": str(notebook_id(env, "quarterly_risk")),
            "cron": "30  7 * * 1-5", "recipients": "risk@regulator.example,\nlead@regulator.example", "enabled": "on",
            "csrf_token": csrf}
    return {**form, **fields}


def test_notebooks_listed_with_approve_button_for_reviewer(env: Env) -> None:
    pending = _new_notebook(env)
    reviewer, _ = _signed_in(env, "reviewer")
    admin, _ = _signed_in(env, "sysadmin")

    reviewer_page = reviewer.get("/console/schedules").text
    admin_page = admin.get("/console/schedules").text

    assert "<h3>报告笔记本</h3>" in reviewer_page
    assert "待审批" in reviewer_page
    assert f"/console/report-notebooks/{pending}/approve" in reviewer_page
    assert "审批时间（北京时间）" in reviewer_page
    assert "<h3>报告笔记本</h3>" in admin_page
    assert f"/console/report-notebooks/{pending}/approve" not in admin_page
    assert "新建调度" not in reviewer_page.replace("可在下方“新建调度”中创建", "")
    assert 'action="/console/schedules"' in admin_page


def test_approve_form_records_digest(env: Env) -> None:
    pending = _new_notebook(env)
    reviewer, csrf = _signed_in(env, "reviewer")

    response = reviewer.post(f"/console/report-notebooks/{pending}/approve", data={"csrf_token": csrf})

    assert response.status_code == 200
    assert f"已审批通过报告笔记本（编号 {pending}）" in response.text
    with env.db() as session:
        notebook = session.get(ReportNotebook, pending)
        assert notebook is not None
        assert (notebook.status, notebook.approved_by) == ("approved", "reviewer")
        digest = notebook.sm3_digest or ""
    assert len(digest) == 64
    assert digest[:12] in response.text
    event = _newest_event(env, "notebooks.approve")
    assert (event.actor, event.resource, event.outcome) == ("reviewer", f"report_notebook:{pending}", "success")


def test_approve_form_missing_file_shown_and_audited(env: Env) -> None:
    pending = _new_notebook(env)
    with env.db() as session:
        notebook = session.get(ReportNotebook, pending)
        assert notebook is not None
        (env.project_root / notebook.path).unlink()
    reviewer, csrf = _signed_in(env, "reviewer")

    response = reviewer.post(f"/console/report-notebooks/{pending}/approve", data={"csrf_token": csrf})

    assert response.status_code == 404
    assert "无法读取" in response.text
    assert "<h3>报告笔记本</h3>" in response.text
    event = _newest_event(env, "notebooks.approve")
    assert (event.resource, event.outcome) == (f"report_notebook:{pending}", "failed")
    assert json.loads(event.detail or "{}") == {"code": "NOTEBOOK_FILE_NOT_FOUND"}


def test_approve_form_bad_csrf_changes_nothing(env: Env) -> None:
    pending = _new_notebook(env)
    reviewer, _ = _signed_in(env, "reviewer")

    response = reviewer.post(f"/console/report-notebooks/{pending}/approve", data={"csrf_token": "forged"})

    assert response.status_code == 403
    assert "CSRF_INVALID" in response.text
    with env.db() as session:
        assert session.get(ReportNotebook, pending).status == "pending"  # type: ignore[union-attr]


def test_create_form_stores_schedule(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    page = admin.get("/console/schedules").text
    assert "北京时间 Asia/Shanghai" in page
    form = _schedule_form(env, csrf)

    response = admin.post("/console/schedules", data=form)

    assert response.status_code == 200
    assert "已新建报告调度" in response.text
    with env.db() as session:
        schedule = session.scalars(select(Schedule).where(Schedule.name == form["name"])).one()
        assert (schedule.cron, schedule.enabled, schedule.created_by) == ("30 7 * * 1-5", True, "sysadmin")
        assert schedule.recipients == ["risk@regulator.example", "lead@regulator.example"]
    event = _newest_event(env, "schedules.create")
    assert (event.resource, event.outcome) == (f"schedule:{schedule.id}", "success")


def test_create_form_bad_cron_shown_on_page(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    form = _schedule_form(env, csrf, cron="61 7 * * *")

    response = admin.post("/console/schedules", data=form)

    assert response.status_code == 422
    assert response.headers["content-type"].startswith("text/html")
    assert "定时表达式 &#39;61 7 * * *&#39; 无效" in response.text
    assert f'value="{form["name"]}"' in response.text
    with env.db() as session:
        assert session.scalars(select(Schedule).where(Schedule.name == form["name"])).first() is None
    event = _newest_event(env, "schedules.create")
    assert (event.actor, event.resource, event.outcome) == ("sysadmin", f"schedule:{form['name']}", "failed")
    assert json.loads(event.detail or "{}") == {"code": "INVALID_CRON"}


def test_create_form_bad_recipient_and_no_notebook(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")

    bad_recipient = admin.post("/console/schedules", data=_schedule_form(env, csrf, recipients="风险部"))
    no_notebook = admin.post("/console/schedules", data=_schedule_form(env, csrf, notebook_id=""))

    assert bad_recipient.status_code == 422
    assert "收件人 &#39;风险部&#39; 不是有效的电子邮件地址" in bad_recipient.text
    assert no_notebook.status_code == 422
    assert "请选择一个已审批的报告笔记本" in no_notebook.text
    assert json.loads(_newest_event(env, "schedules.create").detail or "{}") == {"code": "INVALID_NOTEBOOK"}


def test_create_form_unapproved_notebook_enabled_409(env: Env) -> None:
    pending = _new_notebook(env)
    admin, csrf = _signed_in(env, "sysadmin")

    response = admin.post("/console/schedules", data=_schedule_form(env, csrf, notebook_id=str(pending)))

    assert response.status_code == 409
    assert "尚未审批通过" in response.text


def test_toggle_form_disables_and_enables(env: Env) -> None:
    schedule = approved_schedule(env, fresh=True)
    admin, csrf = _signed_in(env, "sysadmin")

    disabled = admin.post(f"/console/schedules/{schedule}/enabled", data={"enabled": "false", "csrf_token": csrf})
    with env.db() as session:
        assert session.get(Schedule, schedule).enabled is False  # type: ignore[union-attr]
    enabled = admin.post(f"/console/schedules/{schedule}/enabled", data={"enabled": "true", "csrf_token": csrf})

    assert f"已停用报告调度（编号 {schedule}）" in disabled.text
    assert f"已启用报告调度（编号 {schedule}）" in enabled.text
    with env.db() as session:
        assert session.get(Schedule, schedule).enabled is True  # type: ignore[union-attr]
    event = _newest_event(env, "schedules.update")
    assert (event.resource, event.outcome, json.loads(event.detail or "{}")) == (
        f"schedule:{schedule}", "success", {"enabled": True})


def test_toggle_form_refusals_audited(env: Env) -> None:
    pending = _new_notebook(env)
    created = env.client.post("/api/v1/schedules", headers=env.auth("sysadmin"), json={
        "name": f"待审批调度-{secrets.token_hex(4)}", "notebook_id": pending, "cron": "0 9 * * *",
        "recipients": ["a@regulator.example"], "enabled": False})
    assert created.status_code == 201, created.text
    schedule = created.json()["id"]
    admin, csrf = _signed_in(env, "sysadmin")

    not_approved = admin.post(f"/console/schedules/{schedule}/enabled", data={"enabled": "true", "csrf_token": csrf})
    bad_value = admin.post(f"/console/schedules/{schedule}/enabled", data={"enabled": "maybe", "csrf_token": csrf})

    assert not_approved.status_code == 409
    assert "尚未审批通过" in not_approved.text
    assert bad_value.status_code == 422
    assert "启用状态 &#39;maybe&#39; 无效" in bad_value.text
    with env.db() as session:
        events = list(session.scalars(select(AuditEvent).where(
            AuditEvent.action == "schedules.update", AuditEvent.resource == f"schedule:{schedule}"
        ).order_by(AuditEvent.id)))
        assert session.get(Schedule, schedule).enabled is False  # type: ignore[union-attr]
    assert [(e.outcome, json.loads(e.detail or "{}")["code"]) for e in events] == [
        ("failed", "NOTEBOOK_NOT_APPROVED"), ("failed", "INVALID_ENABLED")]


def test_run_times_in_beijing_time(env: Env) -> None:
    schedule = approved_schedule(env)
    with env.db() as session:
        run = ReportRun(schedule_id=schedule, trigger="manual", status="succeeded", requested_by="sysadmin",
                        queued_at=datetime(2026, 3, 1, 23, 30, 5, tzinfo=UTC),
                        finished_at=datetime(2026, 3, 1, 23, 31, 0, tzinfo=UTC))
        session.add(run)
        session.commit()
    admin, _ = _signed_in(env, "sysadmin")

    page = admin.get("/console/schedules").text

    assert "排队时间（北京时间）" in page
    assert "（UTC）" not in page
    assert "2026-03-02 07:30:05" in page
    assert "2026-03-02 07:31:00" in page


def test_beijing_formatting() -> None:
    assert beijing(datetime(2026, 12, 31, 16, 0, tzinfo=UTC)) == "2027-01-01 00:00:00"
    assert beijing(datetime(2026, 1, 1, 0, 0)) == "2026-01-01 08:00:00"
    assert beijing("2026-06-01T02:03:04+00:00") == "2026-06-01 10:03:04"
    assert beijing(None) == ""


def test_detail_lines_readable() -> None:
    assert detail_lines('{"code": "COMMENT_REQUIRED", "enabled": false, "n": 3}') == [
        "错误代码（code）: COMMENT_REQUIRED", "启用（enabled）: 否", "n: 3"]
    assert detail_lines("plain text") == ["plain text"]
    assert detail_lines(None) == []


def test_audit_page_chinese_labels_and_wrapping(env: Env) -> None:
    reviewer, _ = _signed_in(env, "reviewer")
    page = reviewer.get("/console/models")
    reviewer.post("/console/models/review", data={
        "name": "bank_c.lgd", "version": "1", "decision": "returned", "comment": "",
        "csrf_token": _CSRF.search(page.text).group(1)})  # type: ignore[union-attr]
    _signed_in(env, "sysadmin")
    auditor, _ = _signed_in(env, "auditor")

    audit = auditor.get("/console/audit").text

    assert '<table class="wrap audit">' in audit
    assert "时间（北京时间）" in audit
    assert "监管审查员<br><code>regulator_reviewer</code>" in audit
    assert "系统管理员<br><code>system_admin</code>" in audit
    assert "模型审查<br><code>models.review</code>" in audit
    assert "<li>错误代码（code）: COMMENT_REQUIRED</li>" in audit
    assert "{&#34;code&#34;" not in audit
    assert '{"code"' not in audit


def test_reporter_home_links_workbench_and_tasks(env: Env) -> None:
    reporter, _ = _signed_in(env, "reporter_a")

    home = reporter.get("/console/").text

    assert '<a href="/console/workbench">工作台</a>' in home
    assert "要求本机构报送的任务及本机构的报送状态" in home
    assert "报送统计" not in home
    assert "JupyterHub" not in home
    assert "系统管理员" in home
    with env.db() as session:
        from admin_api.models import User

        admin_email = session.scalars(select(User.email).where(User.username == "sysadmin")).one()
    assert admin_email in home


def test_modeller_home_links_own_models(env: Env) -> None:
    modeller, _ = _signed_in(env, "modeller_a")

    home = modeller.get("/console/").text

    assert '<a href="/console/models">本机构模型</a>' in home
    assert "JupyterHub" in home
    assert "报表报送功能" not in home
