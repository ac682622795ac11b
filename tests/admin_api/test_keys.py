"""Key management API: permissions per role, state transitions, audit events and no key material in responses.

The tests change the keys of bank_c only, because other tests sign and encrypt with the platform's keys.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from admin_api.models import AuditEvent
from regsandbox_core.keystore import KeyDestroyed, KeyStore
from regsandbox_core.secrets import platform_secrets_key_version

from .conftest import Env
from .helpers import audit_events

USERS = {
    "system_admin": "sysadmin",
    "regulator_reviewer": "reviewer",
    "modeller": "modeller_a",
    "reporter": "reporter_a",
    "security_admin": "secadmin",
    "audit_admin": "auditor",
}
ROLES = ["anonymous", "service", *USERS]
OWNER = "bank_c"


def store(env: Env) -> KeyStore:
    return env.client.app.state.keystore


def entry(env: Env, owner: str, kind: str, version: int) -> dict[str, Any]:
    for item in store(env).metadata()["keys"]:
        if (item["owner"], item["kind"], item["version"]) == (owner, kind, version):
            return item
    raise AssertionError(f"no key {owner}/{kind}/v{version}")


def active_version(env: Env, owner: str, kind: str) -> int:
    return next(item["version"] for item in store(env).metadata()["keys"]
                if (item["owner"], item["kind"], item["state"]) == (owner, kind, "active"))


def pending_version(env: Env, kind: str) -> int:
    """Generate a pending bank_c version directly in the store, as a target that every operation accepts."""
    return store(env).generate(OWNER, kind, activate=False)


def material_texts(env: Env) -> set[str]:
    """Return hex and Base64 forms of every readable key and of the master key, to search responses for."""
    keys = [base64.b64decode(env.settings.secrets_dir.joinpath("master.key").read_text().strip())]
    for item in store(env).metadata()["keys"]:
        if item["state"] in ("active", "decrypt_only"):
            keys.append(store(env).get(item["owner"], item["kind"], item["version"]).key)
    texts = set()
    for key in keys:
        texts |= {key.hex(), key.hex().upper(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()}
    return texts


def assert_no_material(env: Env, text: str) -> None:
    leaked = [value for value in material_texts(env) if value in text]
    assert leaked == [], "key material appears in a response"


def event_of(env: Env, request_id: str, action: str) -> AuditEvent:
    events = [event for event in audit_events(env, request_id) if event.action == action]
    assert len(events) == 1, [(event.action, event.outcome) for event in audit_events(env, request_id)]
    return events[0]


@dataclass(frozen=True)
class KeyRoute:
    method: str
    path: str
    allowed: frozenset[str]
    ok: int
    kind: str = "token"
    body: Any = None


KEY_ROUTES = {
    "list": KeyRoute("GET", "/api/v1/keys", frozenset({"security_admin", "audit_admin"}), 200),
    "rotate": KeyRoute("POST", "/api/v1/keys/bank_c/token/rotate", frozenset({"security_admin"}), 201),
    "activate": KeyRoute("POST", "/api/v1/keys/bank_c/token/versions/{version}/activate",
                         frozenset({"security_admin"}), 200),
    "revoke": KeyRoute("POST", "/api/v1/keys/bank_c/token/versions/{version}/revoke", frozenset({"security_admin"}),
                       200, body={"reason": "权限测试吊销"}),
    "destroy": KeyRoute("POST", "/api/v1/keys/bank_c/token/versions/{version}/destroy",
                        frozenset({"security_admin"}), 200, body={"confirm": "bank_c/token/v{version}"}),
}


def _headers(env: Env, role: str) -> dict[str, str]:
    if role == "anonymous":
        return {}
    if role == "service":
        return env.service("scheduler")
    return env.auth(USERS[role])


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("route_name", list(KEY_ROUTES))
def test_key_route_permission(env: Env, route_name: str, role: str) -> None:
    route = KEY_ROUTES[route_name]
    version = pending_version(env, route.kind) if "{version}" in route.path else None
    before = store(env).metadata()["keys"]
    body = {key: value.format(version=version) for key, value in route.body.items()} if route.body else None
    request_id = f"keyperm-{secrets.token_hex(8)}"

    response = env.client.request(route.method, route.path.format(version=version), json=body,
                                  headers={**_headers(env, role), "X-Request-ID": request_id})

    if role in route.allowed:
        assert response.status_code == route.ok, response.text
        return
    assert response.status_code == (401 if role == "anonymous" else 403), response.text
    assert set(response.json()) == {"code", "detail"}
    assert store(env).metadata()["keys"] == before
    denials = [event for event in audit_events(env, request_id) if event.outcome == "denied"]
    assert len(denials) == 1
    assert denials[0].actor == (USERS.get(role) or ("service:scheduler" if role == "service" else "anonymous"))
    assert denials[0].action == ("keys.read" if route_name == "list" else "keys.operate")


def test_key_denial_detail_chinese(env: Env) -> None:
    response = env.client.post("/api/v1/keys/bank_c/token/rotate", headers=env.auth("auditor"))

    assert response.status_code == 403
    assert response.json() == {"code": "FORBIDDEN", "detail": "当前角色（审计管理员）无权执行此操作：管理密钥。"}


def test_key_list_fields(env: Env) -> None:
    response = env.client.get("/api/v1/keys", headers={**env.auth("auditor"), "X-Request-ID": f"keylist-{env.backend}"})

    assert response.status_code == 200
    listing = response.json()
    assert set(listing) == {"master_key_id", "keys"}
    assert listing["master_key_id"] == store(env).master.key_id
    versions = {(item["owner"], item["kind"], item["version"]): item for item in listing["keys"]}
    platform_signing = versions[("platform", "signing", 1)]
    assert platform_signing["owner_name"] == "平台"
    assert platform_signing["kind_name"] == "签名密钥（SM2）"
    assert platform_signing["public_key"] == entry(env, "platform", "signing", 1)["public_key"]
    bank_a_data = versions[("bank_a", "data", 1)]
    assert bank_a_data["owner_name"] == "浦东示范银行甲"
    assert bank_a_data["kind_name"] == "数据加密密钥（SM4）"
    assert bank_a_data["public_key"] is None
    assert versions[("bank_a", "token", 1)]["kind_name"] == "令牌化密钥（HMAC-SM3）"
    platform_token = [item for (owner, kind, _version), item in versions.items() if (owner, kind) == ("platform", "token")]
    assert platform_token, "regsandbox init creates the platform's watermark key"
    assert {item["kind_name"] for item in platform_token} == {"数据水印密钥（HMAC-SM3）"}
    assert {item["state_name"] for item in listing["keys"] if item["state"] == "active"} == {"启用"}
    assert set(bank_a_data) == {"owner", "owner_name", "kind", "kind_name", "version", "state", "state_name",
                                "created_at", "activated_at", "deactivated_at", "revoked_at", "revoke_reason",
                                "destroyed_at", "public_key"}
    assert listing["keys"][0]["owner"] == "platform"
    assert_no_material(env, response.text)
    event = event_of(env, f"keylist-{env.backend}", "keys.list")
    assert (event.actor, event.role, event.outcome, event.resource) == ("auditor", "audit_admin", "success", "keys")


def _post(env: Env, path: str, body: Any = None, request_id: str | None = None) -> httpx.Response:
    headers = {**env.auth("secadmin"), "X-Request-ID": request_id or f"keyop-{secrets.token_hex(8)}"}
    response = env.client.post(f"/api/v1/keys/{path}", json=body, headers=headers)
    assert_no_material(env, response.text)
    return response


def test_key_lifecycle_transitions(env: Env) -> None:
    first = active_version(env, OWNER, "data")

    rotated = _post(env, f"{OWNER}/data/rotate", request_id=f"rotate-{env.backend}")
    second = rotated.json()["version"]
    assert rotated.status_code == 201
    assert second > first
    assert (rotated.json()["state"], rotated.json()["state_name"]) == ("active", "启用")
    assert entry(env, OWNER, "data", first)["state"] == "decrypt_only"
    assert entry(env, OWNER, "data", first)["deactivated_at"] is not None
    rotate_event = event_of(env, f"rotate-{env.backend}", "key.rotate")
    assert (rotate_event.actor, rotate_event.outcome) == ("secadmin", "success")
    assert rotate_event.resource == f"key:{OWNER}/data/v{second}"
    assert f'"previous_version": {first}' in (rotate_event.detail or "")

    undone = _post(env, f"{OWNER}/data/versions/{first}/activate")
    assert undone.status_code == 200
    assert undone.json()["state"] == "active"
    assert entry(env, OWNER, "data", second)["state"] == "decrypt_only"

    revoked = _post(env, f"{OWNER}/data/versions/{second}/revoke", {"reason": "  疑似泄露  "})
    assert revoked.status_code == 200
    assert (revoked.json()["state"], revoked.json()["state_name"]) == ("revoked", "已吊销")
    assert revoked.json()["revoke_reason"] == "疑似泄露"
    assert revoked.json()["revoked_at"] is not None

    again = _post(env, f"{OWNER}/data/versions/{second}/revoke", {"reason": "重复吊销"},
                  request_id=f"revoke-again-{env.backend}")
    assert again.status_code == 409
    assert again.json()["code"] == "KEY_STATE_TRANSITION_INVALID"
    assert "已吊销" in again.json()["detail"]
    failure = event_of(env, f"revoke-again-{env.backend}", "key.revoke")
    assert (failure.actor, failure.outcome) == ("secadmin", "failed")
    assert "key_state_transition_invalid" in (failure.detail or "")

    reactivate = _post(env, f"{OWNER}/data/versions/{second}/activate")
    assert reactivate.status_code == 409
    assert reactivate.json()["code"] == "KEY_STATE_TRANSITION_INVALID"

    destroy_active = _post(env, f"{OWNER}/data/versions/{first}/destroy", {"confirm": f"{OWNER}/data/v{first}"})
    assert destroy_active.status_code == 409
    assert "请先轮换或吊销该版本" in destroy_active.json()["detail"]
    assert entry(env, OWNER, "data", first)["state"] == "active"

    destroyed = _post(env, f"{OWNER}/data/versions/{second}/destroy", {"confirm": f"{OWNER}/data/v{second}"},
                      request_id=f"destroy-{env.backend}")
    assert destroyed.status_code == 200
    assert (destroyed.json()["state"], destroyed.json()["state_name"]) == ("destroyed", "已销毁")
    assert destroyed.json()["destroyed_at"] is not None
    with pytest.raises(KeyDestroyed):
        store(env).get(OWNER, "data", second)
    destroy_event = event_of(env, f"destroy-{env.backend}", "key.destroy")
    assert (destroy_event.actor, destroy_event.outcome) == ("secadmin", "success")

    destroy_again = _post(env, f"{OWNER}/data/versions/{second}/destroy", {"confirm": f"{OWNER}/data/v{second}"})
    assert destroy_again.status_code == 409


def test_key_pending_version_transitions(env: Env) -> None:
    active = active_version(env, OWNER, "token")
    pending = pending_version(env, "token")

    activated = _post(env, f"{OWNER}/token/versions/{pending}/activate")

    assert activated.status_code == 200
    assert entry(env, OWNER, "token", pending)["state"] == "active"
    assert entry(env, OWNER, "token", active)["state"] == "decrypt_only"
    pending_destroyed = pending_version(env, "token")
    assert _post(env, f"{OWNER}/token/versions/{pending_destroyed}/destroy",
                 {"confirm": f"{OWNER}/token/v{pending_destroyed}"}).status_code == 200
    assert entry(env, OWNER, "token", pending_destroyed)["state"] == "destroyed"


def test_key_destroy_confirmation_mismatch(env: Env) -> None:
    version = pending_version(env, "data")
    request_id = f"mismatch-{env.backend}"

    response = _post(env, f"{OWNER}/data/versions/{version}/destroy", {"confirm": f"{OWNER}/data/{version}"},
                     request_id=request_id)

    assert response.status_code == 422
    assert response.json()["code"] == "KEY_CONFIRMATION_MISMATCH"
    assert f"请输入 {OWNER}/data/v{version} 确认销毁" in response.json()["detail"]
    assert entry(env, OWNER, "data", version)["state"] == "pending"
    event = event_of(env, request_id, "key.destroy")
    assert (event.actor, event.outcome, event.resource) == ("secadmin", "failed", f"key:{OWNER}/data/v{version}")
    assert "KEY_CONFIRMATION_MISMATCH" in (event.detail or "")


@pytest.mark.parametrize("confirm", ["", " bank_c/data/v{version}", "BANK_C/data/v{version}", "bank_c/token/v{version}"])
def test_key_destroy_confirmation_exact(env: Env, confirm: str) -> None:
    version = pending_version(env, "data")

    response = _post(env, f"{OWNER}/data/versions/{version}/destroy", {"confirm": confirm.format(version=version)})

    assert response.status_code == 422
    assert response.json()["code"] == "KEY_CONFIRMATION_MISMATCH"
    assert entry(env, OWNER, "data", version)["state"] == "pending"


def test_key_unknown_owner_not_found(env: Env) -> None:
    request_id = f"unknown-owner-{env.backend}"

    response = _post(env, "bank_z/data/rotate", request_id=request_id)

    assert response.status_code == 404
    assert response.json()["code"] == "KEY_OWNER_NOT_FOUND"
    assert "'bank_z'" in response.json()["detail"]
    event = event_of(env, request_id, "key.rotate")
    assert (event.actor, event.outcome) == ("secadmin", "failed")
    assert "KEY_OWNER_NOT_FOUND" in (event.detail or "")


def test_key_unknown_kind_invalid(env: Env) -> None:
    response = _post(env, f"{OWNER}/secret/versions/1/revoke", {"reason": "测试类型"})

    assert response.status_code == 422
    assert response.json()["code"] == "KEY_KIND_INVALID"
    assert "'secret'" in response.json()["detail"]
    assert "签名密钥（SM2）" in response.json()["detail"]


def test_key_unknown_version_not_found(env: Env) -> None:
    response = _post(env, f"{OWNER}/data/versions/999/activate")

    assert response.status_code == 404
    assert response.json()["code"] == "KEY_VERSION_UNKNOWN"
    assert f"{OWNER}/data/v999" in response.json()["detail"]


def test_key_rotate_without_active_generates(env: Env) -> None:
    # Institutions get no signing key at init, so a pending one leaves bank_c/signing without an active version.
    signing = [item for item in store(env).metadata()["keys"] if (item["owner"], item["kind"]) == (OWNER, "signing")]
    if not signing:
        store(env).generate(OWNER, "signing", activate=False)
    assert all(item["state"] != "active" for item in signing)

    response = _post(env, f"{OWNER}/signing/rotate")

    assert response.status_code == 201, response.text
    assert response.json()["state"] == "active"
    assert active_version(env, OWNER, "signing") == response.json()["version"]


@pytest.mark.parametrize("operation", ["revoke", "destroy"])
def test_key_secrets_version_protected(env: Env, operation: str) -> None:
    in_use = platform_secrets_key_version(env.settings)
    assert in_use is not None
    label = f"platform/data/v{in_use}"
    body = {"reason": "测试吊销"} if operation == "revoke" else {"confirm": label}

    response = _post(env, f"platform/data/versions/{in_use}/{operation}", body, request_id=f"in-use-{operation}")

    assert response.status_code == 409
    assert response.json()["code"] == "KEY_IN_USE_BY_PLATFORM_SECRETS"
    assert "regsandbox init" in response.json()["detail"]
    assert entry(env, "platform", "data", in_use)["state"] == "active"
    event = event_of(env, f"in-use-{operation}", f"key.{operation}")
    assert event.outcome == "failed"
    assert event.resource == f"key:{label}"


@pytest.mark.parametrize("reason", ["", "短", "x" * 201, "   "])
def test_key_revoke_reason_invalid(env: Env, reason: str) -> None:
    version = pending_version(env, "data")

    response = _post(env, f"{OWNER}/data/versions/{version}/revoke", {"reason": reason})

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_REQUEST"
    assert "吊销原因" in response.json()["detail"]
    assert entry(env, OWNER, "data", version)["state"] == "pending"


def test_key_revoke_reason_missing(env: Env) -> None:
    response = _post(env, f"{OWNER}/data/versions/1/revoke", {})

    assert response.status_code == 422
    assert "缺少字段 reason（吊销原因）" in response.json()["detail"]


def test_key_version_zero_invalid(env: Env) -> None:
    response = _post(env, f"{OWNER}/data/versions/0/activate")

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_REQUEST"


def test_key_responses_hold_no_material(env: Env) -> None:
    texts = material_texts(env)
    assert texts  # the search below would pass trivially without keys

    responses = [
        env.client.get("/api/v1/keys", headers=env.auth("secadmin")),
        env.client.get("/api/v1/keys", headers=env.auth("auditor")),
        _post(env, f"{OWNER}/token/rotate"),
        _post(env, f"{OWNER}/token/versions/999/revoke", {"reason": "不存在的版本"}),
        env.client.get("/api/openapi.json"),
    ]
    for response in responses:
        assert_no_material(env, response.text)
    assert '"wrapped"' not in responses[0].text
