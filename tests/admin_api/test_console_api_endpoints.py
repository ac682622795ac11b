"""The console page API参数配置: which roles may open it, the create, edit, test and delete forms, and masked credentials."""

from __future__ import annotations

import re
import secrets

import pytest
from sqlalchemy import select

from admin_api.models import ApiEndpoint

from .conftest import Env, free_port
from .helpers import audit_events, console_cookie
from .test_api_endpoints import _TargetServer, target  # noqa: F401 (fixture)

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _csrf(env: Env, cookie: dict[str, str]) -> str:
    return _CSRF.search(env.client.get("/console/api-endpoints", headers=cookie).text).group(1)  # type: ignore[union-attr]


def _form(name: str, base_url: str, **extra: str) -> dict[str, str]:
    return {"name": name, "display_name": "控制台接口", "base_url": base_url, "auth_type": "none",
            "timeout_seconds": "5", "retries": "0", "enabled": "1", **extra}


def test_page_nav_by_role(env: Env) -> None:
    for username, status in (("sysadmin", 200), ("secadmin", 200), ("modeller_a", 403), ("auditor", 403)):
        cookie = console_cookie(env, username)
        page = env.client.get("/console/api-endpoints", headers=cookie)
        home = env.client.get("/console/", headers=cookie)

        assert page.status_code == status, username
        assert ('href="/console/api-endpoints"' in home.text) is (status == 200), username
        assert 'href="/console/messages"' in home.text


def test_security_admin_read_only(env: Env) -> None:
    page = env.client.get("/console/api-endpoints", headers=console_cookie(env, "secadmin"))

    assert "您的角色只能查看接口参数" in page.text
    assert 'action="/console/api-endpoints"' not in page.text


def test_create_edit_test_delete(env: Env, target: _TargetServer) -> None:  # noqa: F811
    cookie = console_cookie(env, "sysadmin")
    csrf = _csrf(env, cookie)
    name = f"cons_{secrets.token_hex(4)}"
    token = f"console-token-{secrets.token_hex(12)}"
    target.expectations[f"/{name}"] = ("Authorization", f"Bearer {token}")

    created = env.client.post("/console/api-endpoints", headers=cookie, follow_redirects=False, data={
        **_form(name, f"{target.url}/{name}", auth_type="bearer", secret=token), "csrf_token": csrf})
    assert created.status_code == 303, created.text
    listing = env.client.get(created.headers["location"], headers=cookie)
    assert f"已新建外部接口 {name}。" in listing.text
    assert f'id="endpoint-{name}"' in listing.text
    assert token not in listing.text

    detail = env.client.get(f"/console/api-endpoints/{name}", headers=cookie)
    assert f"****{token[-4:]}" in detail.text
    assert token not in detail.text

    tested = env.client.post(f"/console/api-endpoints/{name}/test", headers=cookie, data={"csrf_token": csrf})
    assert tested.status_code == 200
    assert 'class="notice" id="test-result"' in tested.text
    assert "连接成功" in tested.text

    saved = env.client.post(f"/console/api-endpoints/{name}", headers=cookie, follow_redirects=False, data={
        "display_name": "改名后的接口", "base_url": f"{target.url}/{name}", "auth_type": "bearer",
        "timeout_seconds": "7", "retries": "1", "enabled": "1", "csrf_token": csrf})
    assert saved.status_code == 303, saved.text
    with env.db() as session:
        row = session.scalars(select(ApiEndpoint).where(ApiEndpoint.name == name)).one()
        assert (row.display_name, row.timeout_seconds, row.retries) == ("改名后的接口", 7, 1)
    assert "连接成功" in env.client.post(f"/console/api-endpoints/{name}/test", headers=cookie,
                                       data={"csrf_token": csrf}).text  # credentials kept

    deleted = env.client.post(f"/console/api-endpoints/{name}/delete", headers=cookie, follow_redirects=False,
                              data={"csrf_token": csrf})
    assert deleted.status_code == 303
    assert f'id="endpoint-{name}"' not in env.client.get("/console/api-endpoints", headers=cookie).text


def test_form_errors_shown_in_chinese(env: Env) -> None:
    cookie = console_cookie(env, "sysadmin")
    csrf = _csrf(env, cookie)
    request_id = f"cons-ep-bad-{env.backend}-{secrets.token_hex(3)}"

    bad_url = env.client.post("/console/api-endpoints", headers={**cookie, "X-Request-ID": request_id},
                              data={**_form(f"cons_{secrets.token_hex(4)}", "ftp://127.0.0.1/x"), "csrf_token": csrf})
    bad_timeout = env.client.post("/console/api-endpoints", headers=cookie, data={
        **_form(f"cons_{secrets.token_hex(4)}", "http://127.0.0.1:1/", timeout_seconds="abc"), "csrf_token": csrf})

    assert bad_url.status_code == 422
    assert "只接受 http:// 或 https://" in bad_url.text
    assert 'value="ftp://127.0.0.1/x"' in bad_url.text  # the form keeps what was typed
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("api_endpoints.create", "failed")]
    assert bad_timeout.status_code == 422
    assert "timeout_seconds" in bad_timeout.text


def test_console_test_refused_shows_error(env: Env) -> None:
    cookie = console_cookie(env, "sysadmin")
    csrf = _csrf(env, cookie)
    name = f"cons_{secrets.token_hex(4)}"
    port = free_port()
    env.client.post("/console/api-endpoints", headers=cookie, data={
        **_form(name, f"http://127.0.0.1:{port}/"), "csrf_token": csrf})

    tested = env.client.post(f"/console/api-endpoints/{name}/test", headers=cookie, data={"csrf_token": csrf})

    assert 'class="error" id="test-result"' in tested.text
    assert f"无法连接 http://127.0.0.1:{port}/" in tested.text


@pytest.mark.parametrize("path", ["", "/x_endpoint", "/x_endpoint/test", "/x_endpoint/delete"])
def test_console_writes_denied(env: Env, path: str) -> None:
    cookie = console_cookie(env, "secadmin")
    csrf = _CSRF.search(env.client.get("/console/", headers=cookie).text).group(1)  # type: ignore[union-attr]
    request_id = f"cons-ep-denied-{env.backend}-{secrets.token_hex(3)}"

    response = env.client.post(f"/console/api-endpoints{path}", headers={**cookie, "X-Request-ID": request_id},
                               data={**_form("x_endpoint", "http://127.0.0.1:1/"), "csrf_token": csrf})

    assert response.status_code == 403
    assert "管理接口参数配置" in response.text
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("api_endpoints.write", "denied")]
