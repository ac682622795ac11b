"""Small admin_api stand-in with the three endpoints the hub calls.

It implements ``POST /api/v1/auth/verify``, ``GET /api/v1/users`` (paged with ``limit``, ``offset``
and ``q``, with ``X-Total-Count``) and ``POST /api/v1/audit/events`` as the admin_api contract
describes them (service token, ``X-Regsandbox-Service`` header, error bodies ``{code, detail}``),
plus ``GET /api/v1/audit/events`` so tests can read what the hub sent.
Accounts are fixed below. Run with
``uvicorn --app-dir tests/hub_config admin_api_stub:create_app --factory``.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Header, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from regsandbox_core.crypto import constant_time_equal
from regsandbox_core.secrets import load_platform_secrets
from regsandbox_core.settings import get_settings

PASSWORD = "Passw0rd-测试"

ACCOUNTS = {
    "hub_alice": {"role": "modeller", "institution_code": "hubtest_a", "display_name": "建模甲", "is_active": True},
    "hub_bob": {"role": "modeller", "institution_code": "hubtest_b", "display_name": "建模乙", "is_active": True},
    "hub_rita": {"role": "reporter", "institution_code": "hubtest_a", "display_name": "报送甲", "is_active": True},
    "hub_dora": {"role": "modeller", "institution_code": "hubtest_a", "display_name": "停用甲", "is_active": False},
    "hub_erin": {"role": "modeller", "institution_code": "hubtest_a", "display_name": "过期甲", "is_active": True},
}
EXPIRED_DETAIL = (
    "用户 hub_erin 的密码已超过 90 天未修改，已过期。请先修改密码：在控制台登录页点击“修改密码”（/console/password），"
    "然后用新密码登录。"
)
"""Detail that admin_api returns for PASSWORD_EXPIRED; hub_erin's password is always expired here."""


class VerifyRequest(BaseModel):
    username: str
    password: str
    totp: str | None = None
    source_ip: str | None = None


class AuditEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str
    action: str
    resource: str
    outcome: Literal["success", "denied", "failed"]
    institution_code: str | None = None
    detail: str | None = None
    source_ip: str | None = None
    role: str | None = None


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"code": code, "detail": detail}, status_code=status)


def create_app() -> FastAPI:
    service_token = load_platform_secrets(get_settings()).service_token
    app = FastAPI()
    app.state.audit_events = []

    def is_service(authorization: str | None, service: str | None) -> bool:
        return bool(authorization) and bool(service) and constant_time_equal(authorization, f"Bearer {service_token}")

    @app.get("/healthz")
    def health():
        return {"status": "ok"}

    @app.post("/api/v1/auth/verify")
    def verify(
        body: VerifyRequest,
        authorization: str | None = Header(default=None),
        x_regsandbox_service: str | None = Header(default=None),
    ):
        if not is_service(authorization, x_regsandbox_service):
            return _error(401, "SERVICE_TOKEN_INVALID", "服务令牌无效")
        account = ACCOUNTS.get(body.username)
        if account is None or body.password != PASSWORD:
            return _error(401, "INVALID_CREDENTIALS", "用户名或密码错误")
        if not account["is_active"]:
            return _error(403, "USER_DISABLED", "账号已停用")
        if body.username == "hub_erin":
            return _error(403, "PASSWORD_EXPIRED", EXPIRED_DETAIL)
        return {
            "username": body.username,
            "display_name": account["display_name"],
            "role": account["role"],
            "institution_code": account["institution_code"],
            "institution_name": account["institution_code"],
            "email": f"{body.username}@example.com",
        }

    @app.get("/api/v1/users")
    def list_users(
        response: Response,
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
        q: str | None = Query(default=None),
        authorization: str | None = Header(default=None),
        x_regsandbox_service: str | None = Header(default=None),
    ):
        if not is_service(authorization, x_regsandbox_service):
            return _error(401, "SERVICE_TOKEN_INVALID", "服务令牌无效")
        rows = [
            {
                "username": username,
                "display_name": account["display_name"],
                "role": account["role"],
                "institution_code": account["institution_code"],
                "is_active": account["is_active"],
                "email": f"{username}@example.com",
            }
            for username, account in sorted(ACCOUNTS.items())
            if not q or q in username or q in account["display_name"]
        ]
        response.headers["X-Total-Count"] = str(len(rows))
        return rows[offset : offset + limit]

    @app.post("/api/v1/audit/events", status_code=201)
    def add_event(
        event: AuditEvent,
        authorization: str | None = Header(default=None),
        x_regsandbox_service: str | None = Header(default=None),
    ):
        if not is_service(authorization, x_regsandbox_service):
            return _error(401, "SERVICE_TOKEN_INVALID", "服务令牌无效")
        app.state.audit_events.append(event.model_dump() | {"service": x_regsandbox_service})
        return {"id": len(app.state.audit_events)}

    @app.get("/api/v1/audit/events")
    def list_events(authorization: str | None = Header(default=None)):
        if not is_service(authorization, "test"):
            return _error(401, "SERVICE_TOKEN_INVALID", "服务令牌无效")
        return list(reversed(app.state.audit_events))

    return app
