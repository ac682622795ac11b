"""系统消息: the per-user inbox API, its isolation between users, the senders wired into decisions, and the console page.

The last test drives the console in headless Chromium against the env's app served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from sqlalchemy import select

from admin_api.messages import post_message
from admin_api.models import Message, ReportNotebook, User

from .conftest import Env, free_port
from .helpers import audit_events, console_cookie, notebook_id

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _post(env: Env, title: str, **recipients: object) -> int:
    with env.db() as session:
        count = post_message(session, category="system", title=title, body="正文", link="/console/", **recipients)
        session.commit()
    return count


def _inbox(env: Env, username: str, **params: object) -> dict:
    response = env.client.get("/api/v1/messages", params=params, headers=env.auth(username))
    assert response.status_code == 200, response.text
    return response.json()


def _message_id(env: Env, username: str, title: str) -> int:
    with env.db() as session:
        return session.scalars(
            select(Message.id).join(User, Message.user_id == User.id)
            .where(User.username == username, Message.title == title)
        ).one()


def test_post_to_usernames_and_list(env: Env) -> None:
    title = f"通知-{secrets.token_hex(4)}"
    before = _inbox(env, "reporter_b")["unread"]

    assert _post(env, title, usernames=["reporter_b", "nobody_here"]) == 1

    inbox = _inbox(env, "reporter_b")
    assert inbox["unread"] == before + 1
    first = inbox["items"][0]
    assert (first["title"], first["category"], first["category_name"]) == (title, "system", "系统通知")
    assert (first["body"], first["link"], first["read_at"]) == ("正文", "/console/", None)
    assert title not in str(_inbox(env, "reporter_a"))


def test_post_by_institution_and_role(env: Env) -> None:
    title = f"机构通知-{secrets.token_hex(4)}"

    assert _post(env, title, institution="bank_c", role="reporter") == 1

    assert _inbox(env, "reporter_c")["items"][0]["title"] == title
    assert title not in str(_inbox(env, "reporter_b"))
    assert title not in str(_inbox(env, "modeller_c"))


def test_post_skips_inactive_users(env: Env) -> None:
    with env.db() as session:
        user = User(username=f"rst_off_{secrets.token_hex(3)}", display_name="停用用户", email="off@bank.example",
                    role="reporter", password_hash="x", is_active=False)
        session.add(user)
        session.commit()
        name = user.username

    assert _post(env, "不会送达", usernames=[name]) == 0


@pytest.mark.parametrize(("arguments", "fragment"), [
    ({"category": "unknown", "title": "t", "usernames": ["reviewer"]}, "unknown message category"),
    ({"category": "system", "title": "  ", "usernames": ["reviewer"]}, "title is empty"),
    ({"category": "system", "title": "t", "link": "https://elsewhere.example/", "usernames": ["reviewer"]}, "link"),
    ({"category": "system", "title": "t", "link": "//elsewhere.example/", "usernames": ["reviewer"]}, "link"),
    ({"category": "system", "title": "t"}, "needs usernames or a role"),
])
def test_post_message_rejects(env: Env, arguments: dict, fragment: str) -> None:
    with env.db() as session, pytest.raises(ValueError, match=fragment):
        post_message(session, **arguments)


def test_paging_and_unread_only(env: Env) -> None:
    prefix = f"分页-{secrets.token_hex(3)}"
    with env.db() as session:
        for index in range(5):
            post_message(session, category="system", title=f"{prefix}-{index}", usernames=["modeller_c"])
        session.commit()

    page = _inbox(env, "modeller_c", offset=1, limit=2)

    assert [item["title"] for item in page["items"]] == [f"{prefix}-3", f"{prefix}-2"]
    assert (page["offset"], page["limit"]) == (1, 2)
    assert page["total"] >= 5
    oversized = env.client.get("/api/v1/messages?limit=1000", headers=env.auth("modeller_c"))
    assert oversized.status_code == 422


def test_mark_read_one_and_all(env: Env) -> None:
    first, second = f"已读-{secrets.token_hex(4)}", f"已读-{secrets.token_hex(4)}"
    _post(env, first, usernames=["reporter_a"])
    _post(env, second, usernames=["reporter_a"])
    message = _message_id(env, "reporter_a", first)
    unread = _inbox(env, "reporter_a")["unread"]
    request_id = f"msg-read-{env.backend}-{secrets.token_hex(3)}"

    marked = env.client.post(f"/api/v1/messages/{message}/read",
                             headers={**env.auth("reporter_a"), "X-Request-ID": request_id})

    assert marked.status_code == 200
    assert marked.json() == {"count": 1, "unread": unread - 1}
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("messages.read", "success")]
    again = env.client.post(f"/api/v1/messages/{message}/read", headers=env.auth("reporter_a"))
    assert again.json()["count"] == 0
    assert _message_id(env, "reporter_a", second) in {
        item["id"] for item in _inbox(env, "reporter_a", unread_only=True)["items"]}

    everything = env.client.post("/api/v1/messages/read-all", headers=env.auth("reporter_a"))
    assert everything.status_code == 200
    assert everything.json() == {"count": unread - 1, "unread": 0}
    assert _inbox(env, "reporter_a")["unread"] == 0


def test_delete_own_message(env: Env) -> None:
    title = f"删除-{secrets.token_hex(4)}"
    _post(env, title, usernames=["reporter_c"])
    message = _message_id(env, "reporter_c", title)

    deleted = env.client.delete(f"/api/v1/messages/{message}", headers=env.auth("reporter_c"))

    assert deleted.status_code == 200
    assert title not in str(_inbox(env, "reporter_c"))
    twice = env.client.delete(f"/api/v1/messages/{message}", headers=env.auth("reporter_c"))
    assert twice.status_code == 404
    assert twice.json()["code"] == "MESSAGE_NOT_FOUND"


@pytest.mark.parametrize("operation", ["read", "delete"])
def test_other_users_message_denied(env: Env, operation: str) -> None:
    title = f"私信-{secrets.token_hex(4)}"
    _post(env, title, usernames=["modeller_a"])
    message = _message_id(env, "modeller_a", title)
    request_id = f"msg-other-{operation}-{env.backend}-{secrets.token_hex(3)}"
    headers = {**env.auth("modeller_b"), "X-Request-ID": request_id}

    if operation == "read":
        response = env.client.post(f"/api/v1/messages/{message}/read", headers=headers)
    else:
        response = env.client.delete(f"/api/v1/messages/{message}", headers=headers)

    assert response.status_code == 404
    assert response.json()["code"] == "MESSAGE_NOT_FOUND"
    assert title not in response.text
    assert [(e.action, e.outcome, e.actor) for e in audit_events(env, request_id)] == [
        ("messages.own", "denied", "modeller_b")]
    with env.db() as session:
        row = session.get(Message, message)
        assert (row.read_at, row.deleted) == (None, False)
    assert title not in str(_inbox(env, "modeller_b"))
    assert title in str(_inbox(env, "modeller_a"))


def test_messages_need_a_user(env: Env) -> None:
    anonymous = env.client.get("/api/v1/messages")
    service = env.client.get("/api/v1/messages", headers=env.service())

    assert anonymous.status_code == 401
    assert service.status_code == 403
    assert service.json()["code"] == "FORBIDDEN"


def test_review_decision_notifies_modellers(env: Env) -> None:
    model = f"bank_a.notify_{secrets.token_hex(3)}"
    env.registry.add(model, "1", auc=0.8, ks=0.4)
    try:
        response = env.client.post(f"/api/v1/models/{model}/versions/1/review",
                                   json={"decision": "returned", "comment": "请补充压力测试结果"},
                                   headers=env.auth("reviewer"))
    finally:
        del env.registry.versions[(model, "1")]  # other tests list the registry's versions exactly

    assert response.status_code == 200, response.text
    item = next(i for i in _inbox(env, "modeller_a")["items"] if model in i["title"])
    assert item["title"] == f"模型审查结论：{model} 版本 1 已退回"
    assert item["category_name"] == "模型审查结论"
    assert "审查意见：请补充压力测试结果" in item["body"]
    assert item["link"] == "/console/models"
    for other in ("modeller_b", "reporter_a", "reviewer"):
        assert model not in str(_inbox(env, other, limit=100))


def test_notebook_approval_notifies_admins(env: Env) -> None:
    plain = notebook_id(env, "plain_report")

    try:
        response = env.client.post(f"/api/v1/report-notebooks/{plain}/approve", headers=env.auth("reviewer"))
    finally:
        with env.db() as session:  # other tests expect the seeded plain notebook to stay pending
            notebook = session.get(ReportNotebook, plain)
            notebook.status, notebook.sm3_digest, notebook.signature = "pending", None, None  # type: ignore[union-attr]
            notebook.approved_by = notebook.approved_at = None  # type: ignore[union-attr]
            session.commit()

    assert response.status_code == 200, response.text
    titles = [item["title"] for item in _inbox(env, "sysadmin")["items"]]
    assert any(title.startswith("报告笔记本已审批：") for title in titles)


# --- console ---------------------------------------------------------------------------------


def test_console_inbox_badge_and_forms(env: Env) -> None:
    title = f"控制台消息-{secrets.token_hex(4)}"
    _post(env, title, usernames=["reporter_b"])
    message = _message_id(env, "reporter_b", title)
    cookie = console_cookie(env, "reporter_b")

    page = env.client.get("/console/messages", headers=cookie)

    assert page.status_code == 200
    assert "<h2>系统消息</h2>" in page.text
    assert title in page.text
    unread = _inbox(env, "reporter_b")["unread"]
    assert f'系统消息 <span class="badge" title="未读消息数">{unread}</span>' in page.text
    csrf = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]

    forged = env.client.post(f"/console/messages/{message}/read", data={"csrf_token": "forged"}, headers=cookie)
    assert forged.status_code == 403
    read = env.client.post(f"/console/messages/{message}/read", data={"csrf_token": csrf, "page": "1"},
                           headers=cookie, follow_redirects=False)
    assert read.status_code == 303
    assert _inbox(env, "reporter_b")["unread"] == unread - 1
    after = env.client.get(read.headers["location"], headers=cookie)
    assert "已将消息标记为已读。" in after.text

    deleted = env.client.post(f"/console/messages/{message}/delete", data={"csrf_token": csrf}, headers=cookie,
                              follow_redirects=False)
    assert deleted.status_code == 303
    assert title not in env.client.get("/console/messages", headers=cookie).text

    env.client.post("/console/messages/read-all", data={"csrf_token": csrf}, headers=cookie)
    home = env.client.get("/console/", headers=cookie)
    assert 'id="nav-messages">系统消息</a>' in home.text


def test_console_other_users_message_denied(env: Env) -> None:
    title = f"他人消息-{secrets.token_hex(4)}"
    _post(env, title, usernames=["reporter_a"])
    message = _message_id(env, "reporter_a", title)
    cookie = console_cookie(env, "reporter_c")
    csrf = _CSRF.search(env.client.get("/console/messages", headers=cookie).text).group(1)  # type: ignore[union-attr]

    response = env.client.post(f"/console/messages/{message}/delete", data={"csrf_token": csrf}, headers=cookie)

    assert response.status_code == 404
    assert "消息" in response.text
    with env.db() as session:
        assert session.get(Message, message).deleted is False  # type: ignore[union-attr]


@pytest.fixture
def served_app(env: Env) -> Iterator[str]:
    """Serve the env's app (with its in-memory model registry) with uvicorn in a thread on 127.0.0.1."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(env.client.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        assert thread.is_alive(), "uvicorn stopped during start-up"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_review_message_in_chromium(env: Env, served_app: str) -> None:
    model = f"bank_a.browser_{secrets.token_hex(3)}"
    env.registry.add(model, "1", auc=0.81, ks=0.45)
    try:
        _review_and_read_in_chromium(env, served_app, model)
    finally:
        del env.registry.versions[(model, "1")]  # other tests list the registry's versions exactly


def _review_and_read_in_chromium(env: Env, served_app: str, model: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            reviewer = browser.new_context().new_page()
            reviewer.goto(f"{served_app}/console/login")
            reviewer.fill("input[name=username]", "reviewer")
            reviewer.fill("input[name=password]", env.passwords["reviewer"])
            reviewer.click("button[type=submit]")
            reviewer.click("header a:has-text('模型审查')")
            row = reviewer.locator("tr", has_text=model)
            row.locator("textarea[name=comment]").fill("区分度达标，同意上线")
            row.locator("button:has-text('通过')").click()
            reviewer.wait_for_load_state()
            assert f"已保存对 {model} 版本 1 的审查结论" in reviewer.locator("p.notice").inner_text()

            modeller = browser.new_context().new_page()
            modeller.goto(f"{served_app}/console/login")
            modeller.fill("input[name=username]", "modeller_a")
            modeller.fill("input[name=password]", env.passwords["modeller_a"])
            modeller.click("button[type=submit]")
            assert modeller.locator("#nav-messages .badge").inner_text().strip() != ""
            modeller.click("#nav-messages")
            modeller.wait_for_load_state()
            message = modeller.locator("tr", has_text=model)
            assert f"模型审查结论：{model} 版本 1 已通过" in message.inner_text()
            assert "区分度达标，同意上线" in message.inner_text()
            assert "未读" in message.inner_text()
            message.locator("button:has-text('标记已读')").click()
            modeller.wait_for_load_state()
            assert "已读" in modeller.locator("tr", has_text=model).inner_text()
        finally:
            browser.close()
