"""Sign-in, bearer tokens, the service token, disabled users and request ids."""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import select, update

from admin_api.db import utc_now
from admin_api.models import ApiToken, AuditEvent, User
from admin_api.security import token_digest
from admin_api.services import MAX_FAILED_SIGN_INS

from .conftest import Env
from .helpers import audit_events, tokens_of


def _set_active(env: Env, username: str, active: bool) -> None:
    with env.db() as session:
        session.execute(update(User).where(User.username == username).values(is_active=active))
        session.commit()


def test_token_sign_in_returns_user(env: Env) -> None:
    response = env.client.post(
        "/api/v1/auth/token", json={"username": "modeller_b", "password": env.passwords["modeller_b"]}
    )

    body = response.json()
    assert response.status_code == 200
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 8 * 3600
    assert body["user"]["institution_code"] == "bank_b"
    assert body["user"]["institution_name"] == "浦东示范银行乙"
    assert body["user"]["email"] == "modeller_b@bank-b.example"


def test_token_stored_as_sm3_only(env: Env) -> None:
    token = env.client.post(
        "/api/v1/auth/token", json={"username": "reporter_c", "password": env.passwords["reporter_c"]}
    ).json()["access_token"]

    stored = [row.token_sm3 for row in tokens_of(env, "reporter_c")]
    assert token_digest(token) in stored
    assert token not in stored


def test_wrong_password_audited_no_token(env: Env) -> None:
    before = len(tokens_of(env, "modeller_c"))

    response = env.client.post(
        "/api/v1/auth/token", json={"username": "modeller_c", "password": "wrong-password"},
        headers={"X-Request-ID": "wrong-pw-1"},
    )

    assert response.status_code == 401
    assert response.json() == {"code": "INVALID_CREDENTIALS", "detail": "用户名或密码错误。"}
    assert len(tokens_of(env, "modeller_c")) == before
    events = audit_events(env, "wrong-pw-1")
    assert [(e.actor, e.action, e.outcome) for e in events] == [("modeller_c", "auth.token", "failed")]


def test_unknown_user_same_response(env: Env) -> None:
    response = env.client.post("/api/v1/auth/token", json={"username": "nobody", "password": "x"})

    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_CREDENTIALS"


def test_disabled_user_sign_in_refused(env: Env) -> None:
    _set_active(env, "reporter_b", False)
    try:
        before = len(tokens_of(env, "reporter_b"))
        response = env.client.post(
            "/api/v1/auth/token", json={"username": "reporter_b", "password": env.passwords["reporter_b"]},
            headers={"X-Request-ID": "disabled-1"},
        )
        assert response.status_code == 403
        assert response.json()["code"] == "USER_DISABLED"
        assert "已被停用" in response.json()["detail"]
        assert len(tokens_of(env, "reporter_b")) == before
        assert [e.outcome for e in audit_events(env, "disabled-1")] == ["denied"]
    finally:
        _set_active(env, "reporter_b", True)


def test_disabled_user_token_stops_working(env: Env) -> None:
    headers = env.auth("modeller_b")
    _set_active(env, "modeller_b", False)
    try:
        response = env.client.get("/api/v1/me", headers=headers)
        assert response.status_code == 403
        assert response.json()["code"] == "USER_DISABLED"
    finally:
        _set_active(env, "modeller_b", True)
    assert env.client.get("/api/v1/me", headers=headers).status_code == 200


def test_expired_token_rejected(env: Env) -> None:
    token = env.client.post(
        "/api/v1/auth/token", json={"username": "reporter_a", "password": env.passwords["reporter_a"]}
    ).json()["access_token"]
    with env.db() as session:
        session.execute(
            update(ApiToken).where(ApiToken.token_sm3 == token_digest(token))
            .values(expires_at=utc_now() - timedelta(seconds=1))
        )
        session.commit()

    response = env.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_TOKEN"


def test_garbage_token_rejected(env: Env) -> None:
    response = env.client.get("/api/v1/me", headers={"Authorization": "Bearer not-a-token"})

    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_TOKEN"


def test_malformed_authorization_rejected(env: Env) -> None:
    response = env.client.get("/api/v1/me", headers={"Authorization": "Basic abc"})

    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_TOKEN"


def test_service_token_needs_header(env: Env) -> None:
    response = env.client.get("/api/v1/users", headers={"Authorization": f"Bearer {env.secrets.service_token}"})

    assert response.status_code == 401
    assert response.json()["code"] == "SERVICE_HEADER_INVALID"


def test_service_token_unknown_service(env: Env) -> None:
    headers = {"Authorization": f"Bearer {env.secrets.service_token}", "X-Regsandbox-Service": "jupyter"}

    response = env.client.get("/api/v1/users", headers=headers)

    assert response.status_code == 401
    assert "'jupyter'" in response.json()["detail"]


def test_users_list_fields(env: Env) -> None:
    users = {}
    for offset in range(0, 20_000, 1000):  # every page; other tests add users to the shared database
        page = env.client.get("/api/v1/users", params={"limit": 1000, "offset": offset}, headers=env.service("hub"))
        users.update({item["username"]: item for item in page.json()})
        if len(page.json()) < 1000:
            break
    assert set(users) >= {"modeller_a", "modeller_b", "modeller_c", "reporter_a", "reporter_b", "reporter_c",
                          "reviewer", "sysadmin", "secadmin", "auditor"}
    assert users["secadmin"]["role"] == "security_admin"
    assert users["auditor"]["role"] == "audit_admin"
    assert users["modeller_a"]["institution_code"] == "bank_a"
    assert users["reviewer"]["institution_code"] is None
    assert users["reviewer"]["role"] == "regulator_reviewer"
    assert all(item["email"].endswith(".example") for item in users.values())
    assert "password_hash" not in users["sysadmin"]


def test_verify_for_hub_records_ip(env: Env) -> None:
    response = env.client.post(
        "/api/v1/auth/verify",
        headers={**env.service("hub"), "X-Request-ID": "verify-ok-1"},
        json={"username": "modeller_a", "password": env.passwords["modeller_a"], "source_ip": "127.0.0.42"},
    )

    assert response.status_code == 200
    assert response.json() == {
        "username": "modeller_a", "display_name": "李明（甲行建模）", "role": "modeller",
        "institution_code": "bank_a", "institution_name": "浦东示范银行甲", "email": "modeller_a@bank-a.example"}
    events = audit_events(env, "verify-ok-1")
    assert [(e.action, e.outcome, e.source_ip) for e in events] == [("auth.verify", "success", "127.0.0.42")]


def test_verify_wrong_password(env: Env) -> None:
    response = env.client.post(
        "/api/v1/auth/verify", headers=env.service("hub"),
        json={"username": "modeller_a", "password": "nope", "source_ip": "127.0.0.43"},
    )

    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_CREDENTIALS"


def test_request_id_generated_when_absent(env: Env) -> None:
    response = env.client.get("/api/v1/me", headers=env.auth("reviewer"))

    assert len(response.headers["X-Request-ID"]) == 32


def test_request_id_invalid_replaced(env: Env) -> None:
    response = env.client.get("/api/v1/me", headers={**env.auth("reviewer"), "X-Request-ID": "bad id\twith spaces"})

    assert response.headers["X-Request-ID"] != "bad id\twith spaces"


def test_missing_field_chinese_422(env: Env) -> None:
    response = env.client.post("/api/v1/auth/token", json={"username": "reviewer"})

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_REQUEST"
    assert "password" in response.json()["detail"]


def test_unknown_path_404_json(env: Env) -> None:
    response = env.client.get("/api/v1/nothing-here")

    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"


def test_service_appends_audit_event(env: Env) -> None:
    response = env.client.post(
        "/api/v1/audit/events", headers=env.service("hub"),
        json={"actor": "modeller_a", "action": "hub.spawn", "resource": "server:modeller_a", "outcome": "success",
              "institution_code": "bank_a", "detail": "启动沙箱", "source_ip": "127.0.0.7"},
    )

    assert response.status_code == 201
    with env.db() as session:
        event = session.get(AuditEvent, response.json()["id"])
        assert event is not None
        assert (event.actor, event.recorded_by, event.source_ip) == ("modeller_a", "service:hub", "127.0.0.7")


def test_audit_event_bad_outcome(env: Env) -> None:
    response = env.client.post(
        "/api/v1/audit/events", headers=env.service("hub"),
        json={"actor": "x", "action": "y", "resource": "z", "outcome": "maybe"},
    )

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_REQUEST"


def test_audit_list_newest_first(env: Env) -> None:
    response = env.client.get("/api/v1/audit/events?limit=3", headers=env.auth("auditor"))

    ids = [item["id"] for item in response.json()]
    assert response.status_code == 200
    assert ids == sorted(ids, reverse=True)
    assert len(ids) == 3


def test_audit_log_append_only(env: Env) -> None:
    with env.db() as session:
        event = session.scalars(select(AuditEvent).limit(1)).one()
        event.outcome = "success-edited"
        try:
            session.commit()
        except Exception as error:  # the driver's IntegrityError / InternalError differ per backend
            session.rollback()
            assert "append-only" in str(error)
        else:
            raise AssertionError("an UPDATE of audit_events was accepted")


def test_repeated_failures_throttled(env: Env) -> None:
    # An unknown user name: an existing user is locked earlier (test_passwords.py covers the lockout).
    username = f"throttle_{secrets.token_hex(4)}"
    for attempt in range(MAX_FAILED_SIGN_INS):
        failed = env.client.post("/api/v1/auth/token", json={"username": username, "password": f"wrong-{attempt}"})
        assert failed.status_code == 401

    blocked = env.client.post(
        "/api/v1/auth/token", json={"username": username, "password": "right-password-123"},
        headers={"X-Request-ID": f"throttled-{username}"},
    )

    assert blocked.status_code == 429
    assert blocked.json()["code"] == "TOO_MANY_ATTEMPTS"
    assert [e.outcome for e in audit_events(env, f"throttled-{username}")] == ["denied"]


def test_oversized_json_rejected(env: Env) -> None:
    before = env.client.get("/api/v1/institutions?limit=500", headers=env.auth("sysadmin")).headers["X-Total-Count"]
    body = {"code": "big_bank", "name": "大" * (2 * 1024 * 1024), "type": "银行"}

    response = env.client.post("/api/v1/institutions", json=body, headers=env.auth("sysadmin"))

    assert response.status_code == 413
    assert response.json()["code"] == "PAYLOAD_TOO_LARGE"
    assert "1 MB" in response.json()["detail"]
    after = env.client.get("/api/v1/institutions?limit=500", headers=env.auth("sysadmin")).headers["X-Total-Count"]
    assert after == before


def test_oversized_chunked_body_rejected(env: Env) -> None:
    def chunks():  # noqa: ANN202
        for _ in range(3):
            yield b"x" * (512 * 1024)

    headers = {**env.auth("sysadmin"), "Content-Type": "application/json"}
    response = env.client.post("/api/v1/roles", content=chunks(), headers=headers)

    assert response.status_code == 413
    assert response.json()["code"] == "PAYLOAD_TOO_LARGE"


def test_malformed_json_rejected(env: Env) -> None:
    headers = {**env.auth("sysadmin"), "Content-Type": "application/json"}

    response = env.client.post("/api/v1/roles", content=b'{"code": "x",', headers=headers)

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_REQUEST"
    assert "不是有效的 JSON" in response.json()["detail"]


def test_validation_message_hides_password(env: Env) -> None:
    password = "Secret-" + "x" * 1100

    response = env.client.post("/api/v1/auth/token", json={"username": "sysadmin", "password": password})

    assert response.status_code == 422
    assert "password" in response.json()["detail"]
    assert "Secret-" not in response.json()["detail"]
