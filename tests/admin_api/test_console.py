"""The Chinese console through the login form: sessions, CSRF, model review, schedules and audit pages."""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from admin_api.models import AuditEvent, ModelReview, ReportRun

from .conftest import Env
from .helpers import approved_schedule

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _browser(env: Env) -> TestClient:
    """A second client on the same app with its own cookie jar, like a separate browser."""
    return TestClient(env.client.app)


def _csrf(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def _newest_event(env: Env, action: str) -> AuditEvent:
    with env.db() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id.desc())
        ).first()
    assert event is not None
    return event


def _login(env: Env, browser: TestClient, username: str, password: str | None = None):  # type: ignore[no-untyped-def]
    form = browser.get("/console/login")
    return browser.post(
        "/console/login",
        data={"username": username, "password": password or env.passwords[username], "csrf_token": _csrf(form.text)},
        follow_redirects=False,
    )


def test_login_sets_strict_cookie(env: Env) -> None:
    browser = _browser(env)

    response = _login(env, browser, "reviewer")

    cookie = response.headers["set-cookie"]
    assert response.status_code == 303
    assert response.headers["location"] == "/console/"
    assert "regsandbox_session=" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "samesite=lax" in cookie.lower()
    home = browser.get("/console/")
    assert "欢迎，赵敏（监管审查员）" in home.text
    assert "模型审查" in home.text


def test_login_wrong_password_message(env: Env) -> None:
    browser = _browser(env)

    response = _login(env, browser, "sysadmin", "wrong-password")

    assert response.status_code == 401
    assert "用户名或密码错误" in response.text
    assert "regsandbox_session" not in browser.cookies
    with env.db() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "console.login", AuditEvent.actor == "sysadmin")
            .order_by(AuditEvent.id.desc())
        ).first()
    assert event is not None
    assert event.outcome == "failed"


def test_login_without_csrf_refused(env: Env) -> None:
    browser = _browser(env)

    response = browser.post(
        "/console/login", data={"username": "reviewer", "password": env.passwords["reviewer"], "csrf_token": "x"},
        follow_redirects=False,
    )

    assert response.status_code == 403
    assert "regsandbox_session" not in browser.cookies


def test_anonymous_redirected_to_login(env: Env) -> None:
    response = _browser(env).get("/console/models", follow_redirects=False)

    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"


def test_review_form_approves(env: Env) -> None:
    browser = _browser(env)
    _login(env, browser, "reviewer")
    page = browser.get("/console/models")
    assert page.status_code == 200
    assert "浦东示范银行甲" in page.text
    assert "0.7812" in page.text
    assert "未归属" in page.text

    response = browser.post(
        "/console/models/review",
        data={"name": "bank_a.scorecard", "version": "2", "decision": "approved", "comment": "表单审查通过",
              "csrf_token": _csrf(page.text)},
    )

    assert response.status_code == 200
    assert "已保存对 bank_a.scorecard 版本 2 的审查结论" in response.text
    assert env.registry.versions[("bank_a.scorecard", "2")]["tags"]["regsandbox.review.comment"] == "表单审查通过"


def test_review_form_return_without_comment(env: Env) -> None:
    browser = _browser(env)
    _login(env, browser, "reviewer")
    page = browser.get("/console/models")

    response = browser.post(
        "/console/models/review",
        data={"name": "bank_c.lgd", "version": "1", "decision": "returned", "comment": "",
              "csrf_token": _csrf(page.text)},
    )

    assert response.status_code == 422
    assert "退回模型版本时必须填写审查意见" in response.text
    event = _newest_event(env, "models.review")
    assert (event.actor, event.resource, event.outcome) == ("reviewer", "model:bank_c.lgd/1", "failed")
    assert json.loads(event.detail or "{}") == {"code": "COMMENT_REQUIRED"}


def test_review_form_bad_csrf_changes_nothing(env: Env) -> None:
    browser = _browser(env)
    _login(env, browser, "reviewer")
    with env.db() as session:
        before = len(list(session.scalars(select(ModelReview.id))))

    response = browser.post(
        "/console/models/review",
        data={"name": "bank_c.lgd", "version": "1", "decision": "approved", "comment": "", "csrf_token": "forged"},
    )

    assert response.status_code == 403
    assert "CSRF_INVALID" in response.text
    with env.db() as session:
        assert len(list(session.scalars(select(ModelReview.id)))) == before


def test_models_page_modeller_own_institution_read_only(env: Env) -> None:
    comment = f"请补充压力情景下的区分度分析-{env.backend}"
    returned = env.client.post("/api/v1/models/bank_a.scorecard/versions/1/review", headers=env.auth("reviewer"),
                               json={"decision": "returned", "comment": comment})
    assert returned.status_code == 200, returned.text
    browser = _browser(env)
    _login(env, browser, "modeller_a")

    response = browser.get("/console/models")

    assert response.status_code == 200
    assert "<h2>本机构模型</h2>" in response.text
    assert "<td>bank_a.scorecard</td>" in response.text
    assert comment in response.text
    assert "已退回" in response.text
    for other in ("bank_b.pd_model", "bank_c.lgd", "scratch_model", "浦东示范银行乙", "未归属"):
        assert other not in response.text
    assert "/console/models/review" not in response.text


def test_review_form_by_modeller_refused(env: Env) -> None:
    browser = _browser(env)
    _login(env, browser, "modeller_a")
    page = browser.get("/console/models")

    response = browser.post(
        "/console/models/review",
        data={"name": "bank_a.scorecard", "version": "1", "decision": "approved", "comment": "",
              "csrf_token": _csrf(page.text)},
    )

    assert response.status_code == 403
    assert "无权执行此操作" in response.text


def test_schedules_run_now(env: Env) -> None:
    schedule = approved_schedule(env)
    browser = _browser(env)
    _login(env, browser, "sysadmin")
    page = browser.get("/console/schedules")
    assert "报告调度" in page.text

    response = browser.post(f"/console/schedules/{schedule}/run", data={"csrf_token": _csrf(page.text)})

    assert response.status_code == 200
    assert "已加入运行队列" in response.text
    with env.db() as session:
        newest = session.scalars(select(ReportRun).order_by(ReportRun.id.desc())).first()
    assert newest is not None
    assert (newest.schedule_id, newest.requested_by, newest.trigger) == (schedule, "sysadmin", "manual")


def test_audit_page_auditor_only(env: Env) -> None:
    auditor, admin, reviewer = _browser(env), _browser(env), _browser(env)
    _login(env, auditor, "auditor")
    _login(env, admin, "sysadmin")
    _login(env, reviewer, "reviewer")

    assert "审计日志" in auditor.get("/console/audit").text
    assert admin.get("/console/audit").status_code == 403
    assert reviewer.get("/console/audit").status_code == 403
    assert 'href="/console/audit"' in auditor.get("/console/").text
    assert 'href="/console/audit"' not in admin.get("/console/").text


def test_logout_ends_session(env: Env) -> None:
    browser = _browser(env)
    _login(env, browser, "reviewer")
    home = browser.get("/console/")
    cookie = browser.cookies["regsandbox_session"]

    response = browser.post("/console/logout", data={"csrf_token": _csrf(home.text)}, follow_redirects=False)

    assert response.status_code == 303
    replay = _browser(env).get("/console/", headers={"Cookie": f"regsandbox_session={cookie}"},
                               follow_redirects=False)
    assert replay.status_code == 303
