"""API参数配置: endpoint CRUD, encrypted credentials, key rotation, the test connection and client_for.

Every outgoing request goes to a small HTTP server this module starts on 127.0.0.1. The server
returns 200 only when the authentication header it expects for the requested path arrives, so a
successful test proves that the credentials were decrypted correctly.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select

from admin_api.api_endpoints import client_for, validate_base_url
from admin_api.errors import ApiError
from admin_api.models import ApiEndpoint, AuditEvent

from .conftest import Env, free_port
from .helpers import audit_events

SLOW_SECONDS = 3


class _Handler(BaseHTTPRequestHandler):
    server: _TargetServer

    def do_GET(self) -> None:  # noqa: N802 (name fixed by http.server)
        path = self.path.split("?")[0].rstrip("/") or "/"
        self.server.seen.append((path, dict(self.headers.items())))
        if path.startswith("/slow"):
            time.sleep(SLOW_SECONDS)
        expected = self.server.expectations.get(path)
        allowed = expected is None or self.headers.get(expected[0]) == expected[1]
        body = b"ok" if allowed else b"unauthorised"
        self.send_response(200 if allowed else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature fixed by http.server)
        return


class _TargetServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.expectations: dict[str, tuple[str, str]] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def target() -> Iterator[_TargetServer]:
    server = _TargetServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _name() -> str:
    return f"ep_{secrets.token_hex(5)}"


def _create(env: Env, body: dict[str, Any], username: str = "sysadmin", request_id: str | None = None) -> Any:
    headers = env.auth(username)
    if request_id:
        headers["X-Request-ID"] = request_id
    return env.client.post("/api/v1/api-endpoints", json=body, headers=headers)


def _bearer_endpoint(env: Env, target: _TargetServer, token: str, **extra: Any) -> str:
    name = _name()
    target.expectations[f"/{name}"] = ("Authorization", f"Bearer {token}")
    response = _create(env, {"name": name, "display_name": "征信查询接口", "base_url": f"{target.url}/{name}",
                             "auth_type": "bearer", "credentials": {"token": token}, "timeout_seconds": 5, **extra})
    assert response.status_code == 201, response.text
    return name


def _test(env: Env, name: str, request_id: str | None = None) -> Any:
    headers = env.auth("sysadmin")
    if request_id:
        headers["X-Request-ID"] = request_id
    return env.client.post(f"/api/v1/api-endpoints/{name}/test", headers=headers)


def _row(env: Env, name: str) -> ApiEndpoint:
    with env.db() as session:
        return session.scalars(select(ApiEndpoint).where(ApiEndpoint.name == name)).one()


def _all_audit_text(env: Env) -> str:
    with env.db() as session:
        return "\n".join(f"{e.resource} {e.detail or ''}" for e in session.scalars(select(AuditEvent)))


def test_endpoint_create_masks_credentials(env: Env, target: _TargetServer) -> None:
    token = f"tok-{secrets.token_hex(16)}"
    name = _bearer_endpoint(env, target, token)

    got = env.client.get(f"/api/v1/api-endpoints/{name}", headers=env.auth("sysadmin"))
    listed = env.client.get("/api/v1/api-endpoints?limit=200", headers=env.auth("sysadmin"))

    assert got.status_code == 200
    body = got.json()
    assert body["credentials_set"] is True
    assert body["credentials_hint"] == f"****{token[-4:]}"
    assert body["credentials_key"].startswith("platform/data/v")
    assert body["auth_type_name"] == "Bearer 令牌"
    assert "credentials" not in body
    assert token not in got.text
    assert token not in listed.text
    assert name in {item["name"] for item in listed.json()["items"]}
    row = _row(env, name)
    assert row.credentials_ciphertext is not None
    assert token not in row.credentials_ciphertext
    assert token.encode() not in base64.b64decode(row.credentials_ciphertext)


def test_endpoint_basic_and_api_key_auth(env: Env, target: _TargetServer) -> None:
    basic, keyed = _name(), _name()
    password, key = secrets.token_urlsafe(18), secrets.token_urlsafe(24)
    expected_basic = "Basic " + base64.b64encode(f"svc_user:{password}".encode()).decode()
    target.expectations[f"/{basic}"] = ("Authorization", expected_basic)
    target.expectations[f"/{keyed}"] = ("X-Bureau-Key", key)

    created_basic = _create(env, {"name": basic, "display_name": "基本认证接口", "base_url": f"{target.url}/{basic}",
                                  "auth_type": "basic", "credentials": {"username": "svc_user", "password": password}})
    created_key = _create(env, {"name": keyed, "display_name": "密钥认证接口", "base_url": f"{target.url}/{keyed}",
                                "auth_type": "api_key", "api_key_header": "X-Bureau-Key", "credentials": {"key": key}})

    assert created_basic.status_code == 201, created_basic.text
    assert created_basic.json()["credentials_hint"] == "s***:****"
    assert created_key.status_code == 201, created_key.text
    assert created_key.json()["api_key_header"] == "X-Bureau-Key"
    assert _test(env, basic).json()["ok"] is True
    assert _test(env, keyed).json()["ok"] is True


def test_connection_success_audited(env: Env, target: _TargetServer) -> None:
    token = secrets.token_hex(12)
    name = _bearer_endpoint(env, target, token)
    request_id = f"ep-test-ok-{env.backend}-{secrets.token_hex(3)}"

    response = _test(env, name, request_id)

    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["ok"], result["code"], result["status_code"]) == (True, "OK", 200)
    assert result["elapsed_ms"] >= 0
    assert result["message"].startswith("连接成功")
    assert "HTTP 200" in result["message"]
    seen_paths = [path for path, _headers in target.seen]
    assert f"/{name}" in seen_paths
    events = [e for e in audit_events(env, request_id) if e.action == "api_endpoints.test"]
    assert [(e.actor, e.outcome) for e in events] == [("sysadmin", "success")]
    assert token not in (events[0].detail or "")


def test_connection_wrong_credentials(env: Env, target: _TargetServer) -> None:
    name = _bearer_endpoint(env, target, "expected-token-value")
    target.expectations[f"/{name}"] = ("Authorization", "Bearer a-different-token")

    result = _test(env, name).json()

    assert (result["ok"], result["code"], result["status_code"]) == (False, "HTTP_ERROR_STATUS", 401)
    assert "HTTP 401" in result["message"]
    assert "请检查凭据" in result["message"]


def test_connection_refused_port(env: Env) -> None:
    name = _name()
    port = free_port()  # nothing listens there
    assert _create(env, {"name": name, "display_name": "未启动的接口",
                         "base_url": f"http://127.0.0.1:{port}/api"}).status_code == 201
    request_id = f"ep-refused-{env.backend}-{secrets.token_hex(3)}"

    response = _test(env, name, request_id)

    assert response.status_code == 200
    result = response.json()
    assert (result["ok"], result["code"], result["status_code"]) == (False, "CONNECT_FAILED", None)
    assert f"无法连接 http://127.0.0.1:{port}/api" in result["message"]
    assert "请检查地址和端口" in result["message"]
    events = [e for e in audit_events(env, request_id) if e.action == "api_endpoints.test"]
    assert [(e.outcome, '"code": "CONNECT_FAILED"' in (e.detail or "")) for e in events] == [("failed", True)]


def test_connection_timeout(env: Env, target: _TargetServer) -> None:
    name = _name()
    assert _create(env, {"name": name, "display_name": "慢接口", "base_url": f"{target.url}/slow/{name}",
                         "timeout_seconds": 1}).status_code == 201

    started = time.monotonic()
    result = _test(env, name).json()
    elapsed = time.monotonic() - started

    assert (result["ok"], result["code"]) == (False, "READ_TIMEOUT")
    assert "超时" in result["message"]
    assert "超过 1 秒" in result["message"]
    assert elapsed < SLOW_SECONDS


def test_rotation_keeps_credentials_readable(env: Env, target: _TargetServer) -> None:
    first_token = secrets.token_hex(16)
    name = _bearer_endpoint(env, target, first_token)
    keystore = env.client.app.state.keystore
    original = keystore.current("platform", "data").version
    assert _row(env, name).credentials_key_version == original

    rotated = env.client.post("/api/v1/keys/platform/data/rotate", headers=env.auth("secadmin"))
    assert rotated.status_code == 201, rotated.text
    newer = rotated.json()["version"]
    try:
        # written before the rotation: decrypts with the decrypt_only version
        assert _test(env, name).json()["ok"] is True
        with env.db() as session, client_for(session, keystore, name) as client:
            assert client.get("").status_code == 200

        second_token = secrets.token_hex(16)
        target.expectations[f"/{name}"] = ("Authorization", f"Bearer {second_token}")
        updated = env.client.put(f"/api/v1/api-endpoints/{name}", json={"credentials": {"token": second_token}},
                                 headers=env.auth("sysadmin"))
        assert updated.status_code == 200, updated.text
        assert updated.json()["credentials_key"] == f"platform/data/v{newer}"
        assert _test(env, name).json()["ok"] is True
    finally:
        restored = env.client.post(f"/api/v1/keys/platform/data/versions/{original}/activate",
                                   headers=env.auth("secadmin"))
        assert restored.status_code == 200, restored.text
    # after undoing the rotation the newer version only decrypts, which is enough
    assert _test(env, name).json()["ok"] is True


def test_credentials_bound_to_endpoint(env: Env, target: _TargetServer) -> None:
    source = _bearer_endpoint(env, target, secrets.token_hex(16))
    other = _bearer_endpoint(env, target, secrets.token_hex(16))
    with env.db() as session:
        rows = {row.name: row for row in session.scalars(select(ApiEndpoint).where(ApiEndpoint.name.in_([source, other])))}
        rows[other].credentials_ciphertext = rows[source].credentials_ciphertext
        session.commit()

    response = _test(env, other)

    assert response.status_code == 409
    assert response.json()["code"] == "CREDENTIALS_UNREADABLE"
    assert "请重新填写该接口的凭据" in response.json()["detail"]


def test_update_keeps_credentials_unless_given(env: Env, target: _TargetServer) -> None:
    token = secrets.token_hex(16)
    name = _bearer_endpoint(env, target, token)
    before = _row(env, name).credentials_ciphertext

    response = env.client.put(f"/api/v1/api-endpoints/{name}", json={"display_name": "新名称", "retries": 2},
                              headers=env.auth("sysadmin"))

    assert response.status_code == 200, response.text
    assert (response.json()["display_name"], response.json()["retries"]) == ("新名称", 2)
    assert _row(env, name).credentials_ciphertext == before
    assert _test(env, name).json()["ok"] is True

    switched = env.client.put(f"/api/v1/api-endpoints/{name}", json={"auth_type": "basic"},
                              headers=env.auth("sysadmin"))
    assert switched.status_code == 422
    assert switched.json()["code"] == "CREDENTIALS_REQUIRED"
    assert _row(env, name).auth_type == "bearer"

    cleared = env.client.put(f"/api/v1/api-endpoints/{name}", json={"auth_type": "none"}, headers=env.auth("sysadmin"))
    assert cleared.status_code == 200
    assert (cleared.json()["credentials_set"], cleared.json()["credentials_hint"]) == (False, None)
    assert _row(env, name).credentials_ciphertext is None


@pytest.mark.parametrize(("url", "fragment"), [
    ("ftp://127.0.0.1/files", "只接受 http:// 或 https://"),
    ("file:///etc/passwd", "只接受 http:// 或 https://"),
    ("javascript:alert(1)", "只接受 http:// 或 https://"),
    ("http:///no-host", "缺少主机名"),
    ("http://user:pw@127.0.0.1/", "不能包含用户名或密码"),
    ("http://127.0.0.1:99999/", "格式无效"),
    ("http://127.0.0.1/a b", "空白字符"),
])
def test_base_url_rejected(env: Env, url: str, fragment: str) -> None:
    request_id = f"ep-bad-url-{env.backend}-{secrets.token_hex(3)}"
    response = _create(env, {"name": _name(), "display_name": "错误地址", "base_url": url}, request_id=request_id)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "INVALID_BASE_URL"
    assert fragment in response.json()["detail"]
    assert [(e.action, e.outcome) for e in audit_events(env, request_id)] == [("api_endpoints.create", "failed")]


@pytest.mark.parametrize(("body", "code"), [
    ({"name": "Bad-Name", "display_name": "x", "base_url": "http://127.0.0.1/"}, "INVALID_ENDPOINT_NAME"),
    ({"display_name": "x", "base_url": "http://127.0.0.1/", "auth_type": "oauth"}, "INVALID_AUTH_TYPE"),
    ({"display_name": "x", "base_url": "http://127.0.0.1/", "auth_type": "bearer"}, "CREDENTIALS_REQUIRED"),
    ({"display_name": "x", "base_url": "http://127.0.0.1/", "auth_type": "bearer",
      "credentials": {"password": "p"}}, "INVALID_CREDENTIALS"),
    ({"display_name": "x", "base_url": "http://127.0.0.1/", "credentials": {"token": "t"}}, "CREDENTIALS_NOT_ALLOWED"),
    ({"display_name": "x", "base_url": "http://127.0.0.1/", "auth_type": "api_key", "api_key_header": "Host",
      "credentials": {"key": "k"}}, "INVALID_API_KEY_HEADER"),
    ({"display_name": "x", "base_url": "http://127.0.0.1/", "timeout_seconds": 0}, "INVALID_REQUEST"),
])
def test_endpoint_input_rejected(env: Env, body: dict[str, Any], code: str) -> None:
    response = _create(env, {"name": _name(), **body})

    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert response.json()["detail"]


def test_duplicate_name_conflict(env: Env) -> None:
    name = _name()
    body = {"name": name, "display_name": "接口", "base_url": "http://127.0.0.1:1/"}
    assert _create(env, body).status_code == 201

    again = _create(env, body)

    assert again.status_code == 409
    assert again.json()["code"] == "API_ENDPOINT_EXISTS"


def test_delete_and_client_for_errors(env: Env) -> None:
    name = _name()
    assert _create(env, {"name": name, "display_name": "停用接口", "base_url": "http://127.0.0.1:1/",
                         "enabled": False}).status_code == 201
    keystore = env.client.app.state.keystore

    with env.db() as session, pytest.raises(ApiError) as disabled:
        client_for(session, keystore, name)
    assert disabled.value.code == "API_ENDPOINT_DISABLED"
    assert "已停用" in disabled.value.message

    assert env.client.delete(f"/api/v1/api-endpoints/{name}", headers=env.auth("sysadmin")).status_code == 204
    with env.db() as session, pytest.raises(ApiError) as unknown:
        client_for(session, keystore, name)
    assert unknown.value.code == "API_ENDPOINT_NOT_FOUND"
    assert "不存在" in unknown.value.message
    missing = env.client.get(f"/api/v1/api-endpoints/{name}", headers=env.auth("sysadmin"))
    assert missing.status_code == 404


def test_client_for_configures_timeout_and_retries(env: Env, target: _TargetServer) -> None:
    token = secrets.token_hex(16)
    name = _bearer_endpoint(env, target, token, retries=3)

    with env.db() as session, client_for(session, env.client.app.state.keystore, name) as client:
        response = client.get("")
        assert client.timeout.read == 5.0
        assert client._transport._pool._retries == 3  # type: ignore[attr-defined]

    assert response.status_code == 200
    assert target.seen[-1][1]["Authorization"] == f"Bearer {token}"


@pytest.mark.parametrize("username", ["modeller_a", "reporter_a", "reviewer", "auditor", "secadmin"])
def test_endpoint_writes_denied(env: Env, username: str) -> None:
    request_id = f"ep-denied-{username}-{env.backend}-{secrets.token_hex(3)}"
    headers = {**env.auth(username), "X-Request-ID": request_id}

    response = env.client.post("/api/v1/api-endpoints", headers=headers,
                               json={"name": _name(), "display_name": "x", "base_url": "http://127.0.0.1:1/"})

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"
    assert "管理接口参数配置" in response.json()["detail"]
    assert [(e.action, e.outcome, e.actor) for e in audit_events(env, request_id)] == [
        ("api_endpoints.write", "denied", username)]


@pytest.mark.parametrize(("username", "status"), [
    ("modeller_a", 403), ("reporter_a", 403), ("reviewer", 403), ("auditor", 403), ("secadmin", 200),
])
def test_endpoint_reads_by_role(env: Env, username: str, status: int) -> None:
    response = env.client.get("/api/v1/api-endpoints", headers=env.auth(username))

    assert response.status_code == status
    anonymous = env.client.get("/api/v1/api-endpoints")
    assert anonymous.status_code == 401


def test_secrets_absent_from_responses_logs_audit(env: Env, target: _TargetServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token, password = f"SCAN{secrets.token_hex(16)}", f"SCAN{secrets.token_hex(16)}"
    texts: list[str] = []
    name = _name()
    target.expectations[f"/{name}"] = ("Authorization", f"Bearer {token}")
    body = {"name": name, "display_name": "扫描接口", "base_url": f"{target.url}/{name}", "auth_type": "bearer",
            "credentials": {"token": token}}
    texts.append(_create(env, body).text)
    texts.append(env.client.get(f"/api/v1/api-endpoints/{name}", headers=env.auth("sysadmin")).text)
    texts.append(env.client.get("/api/v1/api-endpoints?limit=200", headers=env.auth("secadmin")).text)
    texts.append(_test(env, name).text)
    texts.append(env.client.put(f"/api/v1/api-endpoints/{name}", headers=env.auth("sysadmin"), json={
        "auth_type": "basic", "credentials": {"username": "scanner", "password": password}}).text)
    texts.append(_test(env, name).text)
    texts.append(_create(env, {**body, "name": "BAD"}).text)
    texts.append(env.client.put(f"/api/v1/api-endpoints/{name}", headers=env.auth("sysadmin"), json={
        "credentials": {"token": token}}).text)
    texts.append(env.client.get(f"/api/v1/api-endpoints/{name}", headers=env.auth("sysadmin")).text)

    everything = "\n".join(texts + [caplog.text, _all_audit_text(env)])
    assert token not in everything
    assert password not in everything
    assert token[4:] not in everything
    assert "INVALID_CREDENTIALS" in texts[7]


def test_validate_base_url_accepts_https() -> None:
    assert validate_base_url(" https://api.example.cn:8443/v1?x=1 ") == "https://api.example.cn:8443/v1?x=1"
