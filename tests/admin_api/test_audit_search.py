"""Audit search and CSV export: filters, paging, input checks, escaping, auditing and denials.

The last test drives the console page in headless Chromium against admin_api served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import secrets
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from admin_api import console
from admin_api.display import BEIJING
from admin_api.security import csrf_token
from regsandbox_core.settings import Settings

from .conftest import Env
from .helpers import audit_events, console_cookie
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS, served_admin_api  # noqa: F401 - fixture

NON_AUDIT_USERS = ["sysadmin", "reviewer", "modeller_a", "reporter_a", "secadmin"]
INJECTION = "' OR 1=1 --"


def _append(env: Env, actor: str, action: str = "hub.spawn", outcome: str = "success",
            institution: str | None = "bank_a", resource: str = "server:x", detail: str | None = None) -> dict:
    response = env.client.post("/api/v1/audit/events", headers=env.service("hub"), json={
        "actor": actor, "action": action, "resource": resource, "outcome": outcome,
        "institution_code": institution, "detail": detail,
    })
    assert response.status_code == 201, response.text
    return response.json()


def _search(env: Env, **params: object) -> list[dict]:
    response = env.client.get("/api/v1/audit/events", headers=env.auth("auditor"), params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _actor() -> str:
    return f"rst-search-{secrets.token_hex(4)}"


def _csv(response_bytes: bytes) -> list[list[str]]:
    assert response_bytes.startswith(b"\xef\xbb\xbf")
    return list(csv.reader(io.StringIO(response_bytes[3:].decode("utf-8"))))


def test_search_filters(env: Env) -> None:
    actor = _actor()
    first = _append(env, actor, action="hub.spawn", outcome="success", institution="bank_a")
    second = _append(env, actor, action="hub.stop", outcome="failed", institution="bank_b")
    third = _append(env, actor, action="hub.spawn", outcome="denied", institution="bank_a")
    _append(env, _actor(), action="hub.spawn")

    assert [e["id"] for e in _search(env, actor=actor)] == [third["id"], second["id"], first["id"]]
    assert [e["id"] for e in _search(env, actor=actor, action="hub.spawn")] == [third["id"], first["id"]]
    assert [e["id"] for e in _search(env, actor=actor, outcome="failed")] == [second["id"]]
    assert [e["id"] for e in _search(env, actor=actor, institution="bank_b")] == [second["id"]]
    assert [e["id"] for e in _search(env, actor=actor, action="hub.spawn", outcome="denied",
                                     institution="bank_a")] == [third["id"]]


def test_search_time_range(env: Env) -> None:
    actor = _actor()
    events = [_append(env, actor) for _ in range(3)]
    middle = datetime.fromisoformat(events[1]["occurred_at"])

    from_middle = _search(env, actor=actor, **{"from": middle.isoformat()})
    assert [e["id"] for e in from_middle] == [events[2]["id"], events[1]["id"]]
    before_middle = _search(env, actor=actor, to=middle.isoformat())
    assert [e["id"] for e in before_middle] == [events[0]["id"]]

    # A time without an offset is 北京时间.
    naive_beijing = middle.astimezone(BEIJING).replace(tzinfo=None).isoformat()
    assert [e["id"] for e in _search(env, actor=actor, **{"from": naive_beijing})] == [e["id"] for e in from_middle]
    later = (middle + timedelta(days=1)).isoformat()
    assert _search(env, actor=actor, **{"from": later}) == []


def test_search_keyset_paging(env: Env) -> None:
    actor = _actor()
    ids = [_append(env, actor)["id"] for _ in range(5)]

    first_page = _search(env, actor=actor, limit=2)
    second_page = _search(env, actor=actor, limit=2, before_id=first_page[-1]["id"])
    last_page = _search(env, actor=actor, limit=2, before_id=second_page[-1]["id"])

    assert [e["id"] for e in first_page] == [ids[4], ids[3]]
    assert [e["id"] for e in second_page] == [ids[2], ids[1]]
    assert [e["id"] for e in last_page] == [ids[0]]


@pytest.mark.parametrize(("params", "code", "words"), [
    ({"from": "yesterday"}, "INVALID_AUDIT_TIME", "起始时间 'yesterday' 无效"),
    ({"to": "2026-13-01"}, "INVALID_AUDIT_TIME", "截止时间 '2026-13-01' 无效"),
    ({"from": "2026-12-02", "to": "2026-12-01"}, "INVALID_AUDIT_TIME_RANGE", "起始时间 2026-12-02 不早于截止时间"),
    ({"outcome": "maybe"}, "INVALID_AUDIT_OUTCOME", "结果筛选值 'maybe' 无效"),
    ({"actor": "a" * 65}, "INVALID_AUDIT_FILTER", "操作人筛选值过长：65 个字符，最多 64 个"),
    ({"institution": "b" * 33}, "INVALID_AUDIT_FILTER", "机构代码筛选值过长"),
])
def test_search_rejects_invalid(env: Env, params: dict, code: str, words: str) -> None:
    for path in ("/api/v1/audit/events", "/api/v1/audit/events.csv"):
        response = env.client.get(path, headers=env.auth("auditor"), params=params)
        assert response.status_code == 422, response.text
        assert response.json()["code"] == code
        assert words in response.json()["detail"]


@pytest.mark.parametrize("field", ["actor", "action", "institution"])
def test_search_sql_like_text(env: Env, field: str) -> None:
    _append(env, _actor())

    assert _search(env, **{field: INJECTION}) == []
    response = env.client.get("/api/v1/audit/events.csv", headers=env.auth("auditor"), params={field: INJECTION})
    assert response.status_code == 200, response.text
    assert len(_csv(response.content)) == 1


def test_export_escapes_formulas(env: Env) -> None:
    actor = _actor()
    _append(env, actor, resource='=HYPERLINK("http://127.0.0.1/x")', detail="+1+1")
    _append(env, actor, resource="-2", detail="@SUM(A1)")
    _append(env, actor, resource="普通对象，含逗号", detail="第一行\n第二行")

    response = env.client.get("/api/v1/audit/events.csv", headers=env.auth("auditor"), params={"actor": actor})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = _csv(response.content)
    header = rows[0]
    resource, detail = header.index("对象"), header.index("详情")
    assert header[0] == "编号"
    assert [row[resource] for row in rows[1:]] == ["普通对象，含逗号", "'-2", "'=HYPERLINK(\"http://127.0.0.1/x\")"]
    assert [row[detail] for row in rows[1:]] == ["第一行\n第二行", "'@SUM(A1)", "'+1+1"]
    assert {row[header.index("操作人")] for row in rows[1:]} == {actor}


def test_export_max_rows(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    actor = _actor()
    ids = [_append(env, actor)["id"] for _ in range(3)]
    monkeypatch.setattr(env.client.app.state.settings, "audit_export_max_rows", 2)

    response = env.client.get("/api/v1/audit/events.csv", headers=env.auth("auditor"), params={"actor": actor})

    assert response.headers["x-audit-export-max-rows"] == "2"
    assert [int(row[0]) for row in _csv(response.content)[1:]] == [ids[2], ids[1]]


def test_export_audited(env: Env) -> None:
    actor = _actor()
    _append(env, actor)
    request_id = f"export-{secrets.token_hex(6)}"

    response = env.client.get("/api/v1/audit/events.csv", params={"actor": actor, "outcome": "success"},
                              headers={**env.auth("auditor"), "X-Request-ID": request_id})

    assert response.status_code == 200
    events = audit_events(env, request_id)
    assert [(e.action, e.outcome, e.actor) for e in events] == [("audit.export", "success", "auditor")]
    detail = json.loads(events[0].detail or "{}")
    assert detail["filter"] == {"actor": actor, "outcome": "success"}


@pytest.mark.parametrize("username", [*NON_AUDIT_USERS, "service"])
@pytest.mark.parametrize("path", ["/api/v1/audit/events", "/api/v1/audit/events.csv"])
def test_search_denied_other_roles(env: Env, username: str, path: str) -> None:
    request_id = f"deny-{secrets.token_hex(6)}"
    headers = env.service("hub") if username == "service" else env.auth(username)

    response = env.client.get(path, headers={**headers, "X-Request-ID": request_id})

    assert response.status_code == 403, response.text
    assert "查看审计日志" in response.json()["detail"]
    denials = audit_events(env, request_id)
    assert [(e.action, e.outcome) for e in denials] == [("audit.read", "denied")]


# --- console -----------------------------------------------------------------------------------------


def test_console_filter_and_paging(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    actor = _actor()
    failed = _append(env, actor, outcome="failed")
    _append(env, actor, outcome="success")
    newest = _append(env, actor, outcome="failed")
    cookie = console_cookie(env, "auditor")
    monkeypatch.setattr(console, "AUDIT_PAGE_ROWS", 1)

    page = env.client.get("/console/audit", headers=cookie, params={"actor": actor, "outcome": "failed"})
    next_link = re.search(r'id="audit-next" href="([^"]+)"', page.text)
    assert next_link is not None
    second = env.client.get(html.unescape(next_link.group(1)), headers=cookie)

    assert page.status_code == 200
    assert page.text.count(f"<td>{actor}</td>") == 1
    assert f"<td>{newest['id']}</td>" in page.text
    assert 'id="audit-export"' in page.text
    assert f'name="actor" value="{actor}"' in page.text
    assert second.status_code == 200
    assert f"<td>{failed['id']}</td>" in second.text
    assert second.text.count(f"<td>{actor}</td>") == 1


def test_console_rejects_bad_filter(env: Env) -> None:
    cookie = console_cookie(env, "auditor")

    page = env.client.get("/console/audit", headers=cookie, params={"from": "明天"})

    assert page.status_code == 422
    assert "起始时间 '明天' 无效" in html.unescape(page.text)
    bad_page = env.client.get("/console/audit", headers=cookie, params={"before_id": "abc"})
    assert bad_page.status_code == 422
    assert "分页位置 before_id='abc' 无效" in html.unescape(bad_page.text)


def test_console_export(env: Env) -> None:
    actor = _actor()
    _append(env, actor, resource="=1+1")
    cookie = console_cookie(env, "auditor")
    session_token = cookie["Cookie"].split("=", 1)[1]
    form = {"actor": actor, "from": "", "to": "", "action": "", "institution": "", "outcome": ""}

    response = env.client.post("/console/audit/export", headers=cookie,
                               data={**form, "csrf_token": csrf_token(env.secrets.session_secret, session_token)})
    forged = env.client.post("/console/audit/export", headers=cookie, data={**form, "csrf_token": "forged"})

    assert response.status_code == 200, response.text
    rows = _csv(response.content)
    assert [row[rows[0].index("对象")] for row in rows[1:]] == ["'=1+1"]
    assert forged.status_code == 403


@pytest.mark.parametrize("username", NON_AUDIT_USERS)
def test_console_denied_other_roles(env: Env, username: str) -> None:
    cookie = console_cookie(env, username)
    session_token = cookie["Cookie"].split("=", 1)[1]

    page = env.client.get("/console/audit", headers=cookie)
    export = env.client.post("/console/audit/export", headers=cookie,
                             data={"csrf_token": csrf_token(env.secrets.session_secret, session_token)})

    assert page.status_code == 403
    assert export.status_code == 403


def test_console_export_bad_filter(env: Env) -> None:
    cookie = console_cookie(env, "auditor")
    session_token = cookie["Cookie"].split("=", 1)[1]
    request_id = f"export-bad-{secrets.token_hex(6)}"

    response = env.client.post(
        "/console/audit/export", headers={**cookie, "X-Request-ID": request_id},
        data={"outcome": "maybe", "csrf_token": csrf_token(env.secrets.session_secret, session_token)},
    )

    assert response.status_code == 422
    assert "结果筛选值 &#39;maybe&#39; 无效" in response.text
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("audit.export", "failed")]


def test_retention_setting_minimum() -> None:
    assert Settings().audit_retention_days == 180
    assert Settings(audit_retention_days=365).audit_retention_days == 365
    with pytest.raises(ValidationError, match="审计日志保留天数 179 无效：不能少于 180 天"):
        Settings(audit_retention_days=179)


@pytest.fixture
def no_totp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the served admin_api sign in the demo auditor without a second factor, as the env's app does."""
    monkeypatch.setenv("REGSANDBOX_TOTP_REQUIRED_ROLES", "[]")


@pytest.fixture
def console_url(no_totp: None, served_admin_api: str) -> str:
    return served_admin_api


def test_console_audit_in_chromium(env: Env, console_url: str) -> None:
    from playwright.sync_api import sync_playwright

    actor = _actor()
    _append(env, actor, resource='=HYPERLINK("http://127.0.0.1/x")', outcome="failed")
    _append(env, actor, resource="other", outcome="success")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{console_url}/console/login")
            page.fill("input[name=username]", "auditor")
            page.fill("input[name=password]", env.passwords["auditor"])
            page.click("button[type=submit]")
            page.click("header a:has-text('审计日志')")
            page.wait_for_load_state()
            page.fill("#audit-actor", actor)
            page.select_option("#audit-outcome", "failed")
            page.click("#audit-filter button[type=submit]")
            page.wait_for_load_state()
            table = page.locator("table.audit tbody").inner_text()
            assert actor in table
            assert "other" not in table

            with page.expect_download() as download_info:
                page.click("#audit-export button[type=submit]")
            content = Path(download_info.value.path()).read_bytes()
        finally:
            browser.close()
    rows = _csv(content)
    assert [row[rows[0].index("对象")] for row in rows[1:]] == ["'=HYPERLINK(\"http://127.0.0.1/x\")"]
