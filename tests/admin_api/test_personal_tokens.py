"""Personal API tokens: scopes honoured by require(), expiry limit, listing without the token, revocation."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from admin_api.db import utc_now
from admin_api.models import ApiToken
from admin_api.security import token_digest

from .conftest import Env
from .helpers import audit_events
from .test_passwords import make_user, sign_in


def user_with_token(env: Env, role: str = "regulator_reviewer") -> tuple[str, dict[str, str]]:
    username, password = make_user(env, role=role)
    token = sign_in(env, username, password).json()["access_token"]
    return username, {"Authorization": f"Bearer {token}"}


def create(env: Env, headers: dict[str, str], **fields):  # noqa: ANN003, ANN201
    body = {"name": "季度报送脚本", "scopes": ["models.read"], "expires_in_days": 30, **fields}
    return env.client.post("/api/v1/me/tokens", headers=headers, json=body)


def test_create_shown_once_stored_as_sm3(env: Env) -> None:
    _username, headers = user_with_token(env)

    response = create(env, headers)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["scopes"] == ["models.read"]
    assert timedelta(days=29) < datetime.fromisoformat(body["expires_at"]) - utc_now() <= timedelta(days=30)
    with env.db() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.id == body["id"])).one()
    assert row.token_sm3 == token_digest(body["token"])
    listed = env.client.get("/api/v1/me/tokens", headers=headers).json()
    assert [item["id"] for item in listed] == [body["id"]]
    assert "token" not in listed[0]


def test_scopes_honoured(env: Env) -> None:
    _username, headers = user_with_token(env)
    token = create(env, headers, scopes=["models.read"]).json()["token"]
    personal = {"Authorization": f"Bearer {token}", "X-Request-ID": f"scope-{token[:8]}"}

    allowed = env.client.get("/api/v1/models", headers={"Authorization": f"Bearer {token}"})
    outside = env.client.get("/api/v1/report-notebooks", headers=personal)
    mint = create(env, {"Authorization": f"Bearer {token}"})
    public = env.client.get("/healthz", headers={"Authorization": f"Bearer {token}"})

    assert allowed.status_code == 200
    assert outside.status_code == 403
    assert outside.json()["code"] == "TOKEN_SCOPE_FORBIDDEN"
    assert "notebooks.read" in outside.json()["detail"]
    events = audit_events(env, f"scope-{token[:8]}")
    assert [(e.action, e.outcome) for e in events] == [("notebooks.read", "denied")]
    assert mint.status_code == 403
    assert public.status_code == 200


def test_sign_in_token_keeps_full_role(env: Env) -> None:
    _username, headers = user_with_token(env)

    assert env.client.get("/api/v1/report-notebooks", headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"scopes": ["users.write"]}, "TOKEN_SCOPES_INVALID", "users.write 不在您的角色可授予的范围内"),
        ({"scopes": ["public"]}, "TOKEN_SCOPES_INVALID", "public"),
        ({"scopes": []}, "TOKEN_SCOPES_MISSING", "至少选择一项权限"),
        ({"expires_in_days": 91}, "TOKEN_EXPIRY_INVALID", "须在 1 到 90 天之间"),
        ({"expires_in_days": 0}, "TOKEN_EXPIRY_INVALID", "为 0 天"),
        ({"name": "  "}, "TOKEN_NAME_MISSING", "令牌名称（name）不能为空"),
    ],
)
def test_create_rejections(env: Env, fields: dict, code: str, fragment: str) -> None:
    _username, headers = user_with_token(env)

    response = create(env, headers, **fields)

    assert response.status_code == 422
    assert response.json()["code"] == code
    assert fragment in response.json()["detail"]
    assert env.client.get("/api/v1/me/tokens", headers=headers).json() == []


def test_expired_personal_token_rejected(env: Env) -> None:
    _username, headers = user_with_token(env)
    body = create(env, headers).json()
    with env.db() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.id == body["id"])).one()
        row.expires_at = utc_now() - timedelta(seconds=1)
        session.commit()

    response = env.client.get("/api/v1/models", headers={"Authorization": f"Bearer {body['token']}"})

    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_TOKEN"


def test_revoke_stops_token(env: Env) -> None:
    _username, headers = user_with_token(env)
    body = create(env, headers).json()
    personal = {"Authorization": f"Bearer {body['token']}"}
    assert env.client.get("/api/v1/models", headers=personal).status_code == 200

    revoked = env.client.delete(f"/api/v1/me/tokens/{body['id']}", headers={**headers, "X-Request-ID": f"rv-{body['id']}"})

    assert revoked.status_code == 204
    assert env.client.get("/api/v1/models", headers=personal).status_code == 401
    assert env.client.get("/api/v1/me/tokens", headers=headers).json()[0]["revoked_at"] is not None
    events = audit_events(env, f"rv-{body['id']}")
    assert [(e.action, e.outcome) for e in events] == [("tokens.revoke", "success")]
    assert json.loads(events[0].detail)["name"] == "季度报送脚本"


def test_cannot_revoke_other_users_token(env: Env) -> None:
    _owner, owner_headers = user_with_token(env)
    _other, other_headers = user_with_token(env)
    body = create(env, owner_headers).json()

    response = env.client.delete(f"/api/v1/me/tokens/{body['id']}", headers=other_headers)

    assert response.status_code == 404
    assert response.json()["code"] == "TOKEN_NOT_FOUND"
    assert env.client.get("/api/v1/models", headers={"Authorization": f"Bearer {body['token']}"}).status_code == 200


def test_disable_revokes_personal_tokens(env: Env) -> None:
    username, headers = user_with_token(env)
    personal = {"Authorization": f"Bearer {create(env, headers).json()['token']}"}

    assert env.client.post(f"/api/v1/users/{username}/disable", headers=env.auth("sysadmin")).status_code == 200

    assert env.client.get("/api/v1/models", headers=personal).status_code == 401


def test_anonymous_cannot_manage_tokens(env: Env) -> None:
    response = env.client.get("/api/v1/me/tokens")

    assert response.status_code == 401
    assert response.json()["code"] == "NOT_AUTHENTICATED"


def test_grantable_scopes_follow_role(env: Env) -> None:
    reporter = env.client.get("/api/v1/me/tokens/scopes", headers=env.auth("reporter_a")).json()
    reviewer = env.client.get("/api/v1/me/tokens/scopes", headers=env.auth("reviewer")).json()

    assert "me.read" in reporter
    assert "models.read" not in reporter
    assert "models.review" in reviewer
    assert not {"public", "console.use", "me.tokens", "users.write"} & set(reviewer)


def test_personal_token_use_recorded(env: Env) -> None:
    _username, headers = user_with_token(env)
    created = create(env, headers).json()
    with env.db() as session:
        assert session.scalars(select(ApiToken.last_seen_at).where(ApiToken.id == created["id"])).one() is None

    assert env.client.get("/api/v1/models", headers={"Authorization": f"Bearer {created['token']}"}).status_code == 200

    with env.db() as session:
        last_seen = session.scalars(select(ApiToken.last_seen_at).where(ApiToken.id == created["id"])).one()
    assert last_seen is not None
    assert utc_now() - last_seen < timedelta(minutes=1)
