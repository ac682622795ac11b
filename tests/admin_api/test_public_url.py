"""Console cookies behind a TLS gateway: Secure only when the public address is https."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from admin_api.app import create_app
from regsandbox_core.settings import Settings

from .conftest import Env

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _login_cookies(env: Env, public_url: str | None) -> list[str]:
    settings = env.settings.model_copy(update={"console_public_url": public_url})
    app = create_app(settings, registry=env.registry, project_root=env.project_root)
    # A browser sends Secure cookies back only over https, so the client uses the gateway's scheme.
    scheme = "https" if public_url and public_url.startswith("https://") else "http"
    with TestClient(app, base_url=f"{scheme}://127.0.0.1") as browser:
        form = browser.get("/console/login")
        csrf = _CSRF.search(form.text)
        assert csrf, "no CSRF field on the login page"
        login_cookie = form.headers["set-cookie"]
        response = browser.post(
            "/console/login",
            data={"username": "reviewer", "password": env.passwords["reviewer"], "csrf_token": csrf.group(1)},
            follow_redirects=False,
        )
    assert response.status_code == 303, response.text
    session_cookie = [value for value in response.headers.get_list("set-cookie") if "regsandbox_session=" in value]
    assert len(session_cookie) == 1
    return [login_cookie, session_cookie[0]]


def test_cookies_secure_behind_https(env: Env) -> None:
    cookies = _login_cookies(env, "https://console.example")

    for cookie in cookies:
        assert "secure" in cookie.lower().split("; ")


@pytest.mark.parametrize("public_url", [None, "http://console.example"])
def test_cookies_plain_without_https(env: Env, public_url: str | None) -> None:
    cookies = _login_cookies(env, public_url)

    for cookie in cookies:
        assert "secure" not in cookie.lower().split("; ")


@pytest.mark.parametrize("value", ["console.example", "ftp://console.example", "https://console.example/console",
                                   "https://", "https://console.example/?a=1"])
def test_public_url_invalid(value: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(console_public_url=value)

    assert "公开访问地址" in str(raised.value)
    assert "https://console.example" in str(raised.value)


def test_public_url_normalised() -> None:
    settings = Settings(console_public_url=" https://console.example/ ", hub_public_url="")

    assert settings.console_public_url == "https://console.example"
    assert settings.console_cookies_secure is True
    assert settings.hub_public_url is None
