"""Named external HTTP endpoints (API参数配置): settings, encrypted credentials and a configured client.

Other modules call :func:`client_for` with an endpoint name and get an ``httpx.Client`` with the
base URL, timeout, authentication header and connection retries of that endpoint. The system
administrator maintains the endpoints through ``/api/v1/api-endpoints`` and the console page.

Credentials are a small JSON object (``{"username", "password"}`` for basic, ``{"token"}`` for
bearer, ``{"key"}`` for an API key header). They are encrypted with SM4-GCM under the active
platform data key (``platform/data/vN``) with a random 96-bit nonce. The associated data
``regsandbox-api-endpoint/1|<name>|platform/data/v<N>`` binds the ciphertext to the endpoint and
to the key version, and the row stores that version, so credentials written before a rotation
still decrypt while the old version is decrypt_only. Responses, logs and audit events carry only
whether credentials are set and a masked hint.

NOTE: any http(s) host is accepted, including private addresses, because platform services
inside the deployment are legitimate targets. Only the system administrator can set base URLs,
and the test connection does not follow redirects.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admin_api.audit import add_event, record_event
from admin_api.db import utc_now
from admin_api.errors import ApiError, conflict, invalid, not_found
from admin_api.keyaccess import request_keystore
from admin_api.models import ApiEndpoint
from admin_api.security import Principal
from regsandbox_core.keystore import KIND_DATA, PLATFORM_OWNER, KeyStore, KeyStoreError
from regsandbox_core.sm import GCM_NONCE_SIZE, DecryptionFailed, sm4_gcm_decrypt, sm4_gcm_encrypt

logger = logging.getLogger(__name__)

AUTH_TYPES = {
    "none": "无认证",
    "basic": "HTTP Basic（用户名和密码）",
    "bearer": "Bearer 令牌",
    "api_key": "API Key 请求头",
}
CREDENTIAL_FIELDS = {"none": (), "basic": ("username", "password"), "bearer": ("token",), "api_key": ("key",)}
DEFAULT_API_KEY_HEADER = "X-API-Key"
MIN_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS = 1, 300
MAX_RETRIES = 5
MAX_CREDENTIAL_LENGTH = 4096
MAX_PAGE_SIZE = 200

_NAME = re.compile(r"^[a-z][a-z0-9_]{1,63}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "authorization"})
_AAD_FORMAT = "regsandbox-api-endpoint/1|{name}|{label}"


class EndpointIn(BaseModel):
    """Body of POST /api/v1/api-endpoints."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    name: str = Field(max_length=64, description="接口标识：小写字母开头，2–64 位小写字母、数字或下划线；创建后不能修改")
    display_name: str = Field(max_length=100, description="中文显示名称")
    base_url: str = Field(max_length=500, description="基础地址，只接受 http:// 或 https://")
    auth_type: str = Field(default="none", max_length=16, description="none、basic、bearer 或 api_key")
    api_key_header: str | None = Field(default=None, max_length=64, description="api_key 方式的请求头名称，默认 X-API-Key")
    credentials: dict[str, str] | None = Field(
        default=None, description="basic: {username, password}；bearer: {token}；api_key: {key}。加密保存，不会返回"
    )
    timeout_seconds: int = Field(default=10, ge=MIN_TIMEOUT_SECONDS, le=MAX_TIMEOUT_SECONDS, description="超时（秒）")
    retries: int = Field(default=0, ge=0, le=MAX_RETRIES, description="连接失败时的重试次数")
    enabled: bool = True


class EndpointUpdate(BaseModel):
    """Body of PUT /api/v1/api-endpoints/{name}; omitted fields keep their value, credentials included."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    display_name: str | None = Field(default=None, max_length=100)
    base_url: str | None = Field(default=None, max_length=500)
    auth_type: str | None = Field(default=None, max_length=16)
    api_key_header: str | None = Field(default=None, max_length=64)
    credentials: dict[str, str] | None = None
    timeout_seconds: int | None = Field(default=None, ge=MIN_TIMEOUT_SECONDS, le=MAX_TIMEOUT_SECONDS)
    retries: int | None = Field(default=None, ge=0, le=MAX_RETRIES)
    enabled: bool | None = None


class EndpointOut(BaseModel):
    name: str
    display_name: str
    base_url: str
    auth_type: str
    auth_type_name: str
    api_key_header: str | None
    credentials_set: bool
    credentials_hint: str | None
    """Masked hint such as ``****wxyz``; the credentials themselves are never returned."""
    credentials_key: str | None
    """Key version that encrypts the credentials, e.g. ``platform/data/v2``."""
    timeout_seconds: int
    retries: int
    enabled: bool
    created_at: datetime
    updated_by: str
    updated_at: datetime

    @classmethod
    def of(cls, row: ApiEndpoint) -> EndpointOut:
        version = row.credentials_key_version
        return cls(
            name=row.name, display_name=row.display_name, base_url=row.base_url, auth_type=row.auth_type,
            auth_type_name=AUTH_TYPES.get(row.auth_type, row.auth_type), api_key_header=row.api_key_header,
            credentials_set=row.credentials_ciphertext is not None, credentials_hint=row.credentials_hint,
            credentials_key=key_label(version) if version is not None else None,
            timeout_seconds=row.timeout_seconds, retries=row.retries, enabled=row.enabled,
            created_at=row.created_at, updated_by=row.updated_by, updated_at=row.updated_at,
        )


class EndpointPage(BaseModel):
    items: list[EndpointOut]
    total: int
    offset: int
    limit: int


class ConnectionTestOut(BaseModel):
    ok: bool
    code: str
    """``OK``, ``HTTP_ERROR_STATUS``, ``CONNECT_FAILED``, ``CONNECT_TIMEOUT``, ``READ_TIMEOUT`` or ``REQUEST_FAILED``."""
    status_code: int | None
    elapsed_ms: int
    message: str


def key_label(version: int) -> str:
    return f"{PLATFORM_OWNER}/{KIND_DATA}/v{version}"


def _associated_data(name: str, version: int) -> bytes:
    return _AAD_FORMAT.format(name=name, label=key_label(version)).encode("utf-8")


# --- validation ------------------------------------------------------------------------------


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise invalid(
            "INVALID_ENDPOINT_NAME",
            f"接口标识 {name!r} 无效：须以小写字母开头，由 2–64 位小写字母、数字或下划线组成，如 credit_bureau。",
        )
    return name


def validate_display_name(display_name: str) -> str:
    display_name = display_name.strip()
    if not display_name:
        raise invalid("INVALID_DISPLAY_NAME", "显示名称不能为空，请填写便于识别的中文名称，如“征信查询接口”。")
    return display_name


def validate_base_url(url: str) -> str:
    """Accept an absolute http(s) URL with a host and without user name, password or whitespace."""
    url = url.strip()
    if not url or any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise invalid("INVALID_BASE_URL", f"接口地址 {url!r} 为空或含有空白字符，请填写如 https://api.example.cn/v1 的地址。")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise invalid("INVALID_BASE_URL", f"接口地址 {url!r} 格式无效（{error}），请检查主机名和端口。") from error
    if parts.scheme not in ("http", "https"):
        raise invalid(
            "INVALID_BASE_URL",
            f"接口地址 {url!r} 的协议 {parts.scheme or '（空）'} 不受支持，只接受 http:// 或 https://。",
        )
    if not parts.hostname:
        raise invalid("INVALID_BASE_URL", f"接口地址 {url!r} 缺少主机名，请填写如 https://api.example.cn/v1 的地址。")
    if parts.username is not None or parts.password is not None:
        raise invalid(
            "INVALID_BASE_URL",
            "接口地址中不能包含用户名或密码，请删除地址中的 “用户名:密码@” 部分，改在认证方式中填写凭据。",
        )
    if port == 0:
        raise invalid("INVALID_BASE_URL", f"接口地址 {url!r} 的端口 0 无效，请填写 1–65535 之间的端口。")
    return url


def validate_auth_type(auth_type: str) -> str:
    if auth_type not in AUTH_TYPES:
        raise invalid(
            "INVALID_AUTH_TYPE", f"认证方式 {auth_type!r} 无效，只能是 {'、'.join(AUTH_TYPES)}（{'、'.join(AUTH_TYPES.values())}）。"
        )
    return auth_type


def validate_header_name(header: str | None) -> str:
    header = (header or "").strip() or DEFAULT_API_KEY_HEADER
    if not _HEADER_NAME.match(header) or header.lower() in _FORBIDDEN_HEADERS:
        raise invalid(
            "INVALID_API_KEY_HEADER",
            f"API Key 请求头名称 {header!r} 无效：须为 1–64 位字母、数字或连字符，且不能是 Host、Authorization 等保留请求头。",
        )
    return header


def validate_credentials(auth_type: str, credentials: dict[str, str]) -> dict[str, str]:
    """Check that ``credentials`` has exactly the non-empty fields of ``auth_type``; the message never shows values."""
    expected = CREDENTIAL_FIELDS[auth_type]
    if not expected:
        raise invalid("CREDENTIALS_NOT_ALLOWED", "认证方式为“无认证”时不能填写凭据，请清空凭据或改选其他认证方式。")
    if set(credentials) != set(expected):
        raise invalid(
            "INVALID_CREDENTIALS",
            f"认证方式 {auth_type} 的凭据须包含且只包含字段 {'、'.join(expected)}，收到的字段为 "
            f"{'、'.join(sorted(credentials)) or '（无）'}。",
        )
    for field_name in expected:
        value = credentials[field_name]
        if not value or len(value) > MAX_CREDENTIAL_LENGTH or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise invalid(
                "INVALID_CREDENTIALS",
                f"凭据字段 {field_name} 为空、超过 {MAX_CREDENTIAL_LENGTH} 个字符或含有控制字符，请重新填写。",
            )
    if auth_type == "basic" and ":" in credentials["username"]:
        raise invalid("INVALID_CREDENTIALS", "Basic 认证的用户名不能包含英文冒号（:），请检查用户名。")
    return {field_name: credentials[field_name] for field_name in expected}


def _mask(secret: str) -> str:
    """Show the last four characters of a long secret only, so the hint cannot narrow a short one down."""
    return f"****{secret[-4:]}" if len(secret) >= 16 else "****"


def credentials_hint(auth_type: str, credentials: dict[str, str]) -> str:
    if auth_type == "basic":
        return f"{credentials['username'][:1]}***:****"
    return _mask(credentials["token" if auth_type == "bearer" else "key"])


# --- encryption ------------------------------------------------------------------------------


def encrypt_credentials(keystore: KeyStore, name: str, credentials: dict[str, str]) -> tuple[str, int]:
    """Encrypt ``credentials`` under the active platform data key; return (base64 nonce||ciphertext, key version)."""
    key = keystore.current(PLATFORM_OWNER, KIND_DATA)
    nonce = secrets.token_bytes(GCM_NONCE_SIZE)
    plaintext = json.dumps(credentials, ensure_ascii=False, sort_keys=True).encode("utf-8")
    sealed = sm4_gcm_encrypt(key.key, nonce, plaintext, _associated_data(name, key.version))
    return base64.b64encode(nonce + sealed).decode("ascii"), key.version


def decrypt_credentials(keystore: KeyStore, row: ApiEndpoint) -> dict[str, str]:
    """Decrypt the credentials of ``row`` with the key version it records; {} when none are set.

    Raises 409 CREDENTIALS_UNREADABLE when that key version is revoked or destroyed or the
    ciphertext does not verify. The message tells the administrator to enter the credentials again.
    """
    if row.credentials_ciphertext is None or row.credentials_key_version is None:
        return {}
    version = row.credentials_key_version
    try:
        raw = base64.b64decode(row.credentials_ciphertext, validate=True)
        key = keystore.get(PLATFORM_OWNER, KIND_DATA, version)
        plaintext = sm4_gcm_decrypt(key.key, raw[:GCM_NONCE_SIZE], raw[GCM_NONCE_SIZE:],
                                    _associated_data(row.name, version))
        return json.loads(plaintext.decode("utf-8"))
    except KeyStoreError as error:
        logger.error("credentials of API endpoint %s are unreadable: key %s %s",
                     row.name, key_label(version), error.code)
        raise conflict(
            "CREDENTIALS_UNREADABLE",
            f"接口 {row.name} 的凭据无法解密：{error.message} 请在接口参数配置中重新填写该接口的凭据。",
        ) from error
    except (DecryptionFailed, binascii.Error, ValueError) as error:
        logger.error("credentials of API endpoint %s fail to decrypt under %s", row.name, key_label(version))
        raise conflict(
            "CREDENTIALS_UNREADABLE",
            f"接口 {row.name} 的凭据密文校验失败（密钥 {key_label(version)}），可能已被改动。请重新填写该接口的凭据。",
        ) from error


# --- clients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ClientSettings:
    headers: dict[str, str]
    auth: httpx.Auth | None


def _client_settings(row: ApiEndpoint, credentials: dict[str, str]) -> _ClientSettings:
    if row.auth_type == "basic" and credentials:
        return _ClientSettings({}, httpx.BasicAuth(credentials["username"], credentials["password"]))
    if row.auth_type == "bearer" and credentials:
        return _ClientSettings({"Authorization": f"Bearer {credentials['token']}"}, None)
    if row.auth_type == "api_key" and credentials:
        return _ClientSettings({row.api_key_header or DEFAULT_API_KEY_HEADER: credentials["key"]}, None)
    return _ClientSettings({}, None)


def build_client(row: ApiEndpoint, keystore: KeyStore, *, retries: int | None = None) -> httpx.Client:
    """Build an ``httpx.Client`` for ``row`` whether or not it is enabled; the caller closes it.

    httpx retries only failed connection attempts (connect errors and connect timeouts), never a
    request that reached the server, so retries are safe for every method.
    """
    settings = _client_settings(row, decrypt_credentials(keystore, row))
    transport = httpx.HTTPTransport(retries=row.retries if retries is None else retries)
    return httpx.Client(
        base_url=row.base_url, timeout=httpx.Timeout(float(row.timeout_seconds)), headers=settings.headers,
        auth=settings.auth, transport=transport, follow_redirects=False, trust_env=False,
    )


def get_endpoint(session: Session, name: str) -> ApiEndpoint:
    row = session.scalars(select(ApiEndpoint).where(ApiEndpoint.name == name)).first()
    if row is None:
        raise not_found("API_ENDPOINT_NOT_FOUND", f"外部接口 {name!r} 不存在，请在“API参数配置”中确认接口标识。")
    return row


def client_for(session: Session, keystore: KeyStore, name: str) -> httpx.Client:
    """Return a configured client of the enabled endpoint ``name``; the caller closes it (``with client_for(...)``).

    Raises 404 API_ENDPOINT_NOT_FOUND for an unknown name, 409 API_ENDPOINT_DISABLED for a
    disabled endpoint and 409 CREDENTIALS_UNREADABLE when its credentials cannot be decrypted.
    """
    row = get_endpoint(session, name)
    if not row.enabled:
        raise conflict(
            "API_ENDPOINT_DISABLED", f"外部接口 {name}（{row.display_name}）已停用，请由系统管理员启用后再调用。"
        )
    return build_client(row, keystore)


# --- administration --------------------------------------------------------------------------


def list_endpoints(session: Session, offset: int, limit: int) -> EndpointPage:
    total = session.scalar(select(func.count()).select_from(ApiEndpoint)) or 0
    rows = session.scalars(select(ApiEndpoint).order_by(ApiEndpoint.name).offset(offset).limit(limit))
    return EndpointPage(items=[EndpointOut.of(row) for row in rows], total=total, offset=offset, limit=limit)


def _reject(request: Request, caller: Principal, action: str, name: str, error: ApiError) -> ApiError:
    """Audit a rejected write with outcome ``failed`` and return ``error`` to raise."""
    record_event(request, caller, action, f"api_endpoint:{name[:64]}", "failed", {"code": error.code})
    return error


def _set_credentials(request: Request, row: ApiEndpoint, credentials: dict[str, str] | None) -> None:
    if credentials is None:
        row.credentials_ciphertext = row.credentials_key_version = row.credentials_hint = None
        return
    row.credentials_ciphertext, row.credentials_key_version = encrypt_credentials(
        request_keystore(request), row.name, credentials
    )
    row.credentials_hint = credentials_hint(row.auth_type, credentials)


def _key_error(error: KeyStoreError) -> ApiError:
    return ApiError(error.code.upper(), f"无法加密接口凭据：{error.message}", status=error.status)


def create_endpoint(session: Session, request: Request, caller: Principal, body: EndpointIn) -> ApiEndpoint:
    """Validate, encrypt the credentials, store and audit a new endpoint (201); failures are audited as ``failed``."""
    try:
        name = validate_name(body.name)
        auth_type = validate_auth_type(body.auth_type)
        header = validate_header_name(body.api_key_header) if auth_type == "api_key" else None
        row = ApiEndpoint(
            name=name, display_name=validate_display_name(body.display_name),
            base_url=validate_base_url(body.base_url), auth_type=auth_type, api_key_header=header,
            timeout_seconds=body.timeout_seconds, retries=body.retries, enabled=body.enabled,
            updated_by=caller.username,
        )
        credentials = validate_credentials(auth_type, body.credentials) if body.credentials else None
        if auth_type != "none" and credentials is None:
            raise invalid(
                "CREDENTIALS_REQUIRED",
                f"认证方式为 {AUTH_TYPES[auth_type]} 时必须填写凭据（{'、'.join(CREDENTIAL_FIELDS[auth_type])}）。",
            )
        if session.scalars(select(ApiEndpoint.id).where(ApiEndpoint.name == name)).first() is not None:
            raise conflict("API_ENDPOINT_EXISTS", f"接口标识 {name} 已被使用，请换一个标识或修改已有接口。")
        _set_credentials(request, row, credentials)
    except KeyStoreError as error:
        raise _reject(request, caller, "api_endpoints.create", body.name, _key_error(error)) from error
    except ApiError as error:
        raise _reject(request, caller, "api_endpoints.create", body.name, error) from None
    session.add(row)
    try:
        session.flush()
    except IntegrityError as error:
        session.rollback()
        raise _reject(request, caller, "api_endpoints.create", name, conflict(
            "API_ENDPOINT_EXISTS", f"接口标识 {name} 已被使用，请换一个标识或修改已有接口。"
        )) from error
    add_event(session, request, caller, "api_endpoints.create", f"api_endpoint:{name}", "success", {
        "base_url": row.base_url, "auth_type": auth_type, "enabled": row.enabled,
        "key_version": row.credentials_key_version,
    })
    session.commit()
    logger.info("API endpoint %s created by %s", name, caller.username)
    return row


def update_endpoint(
    session: Session, request: Request, caller: Principal, name: str, body: EndpointUpdate
) -> ApiEndpoint:
    """Change the given fields; credentials are replaced only when supplied, and cleared when auth becomes none."""
    row = get_endpoint(session, name)
    changes: dict[str, Any] = {}
    try:
        if body.display_name is not None:
            row.display_name = validate_display_name(body.display_name)
        if body.base_url is not None:
            row.base_url = changes["base_url"] = validate_base_url(body.base_url)
        auth_changed = body.auth_type is not None and body.auth_type != row.auth_type
        if body.auth_type is not None:
            row.auth_type = validate_auth_type(body.auth_type)
        if row.auth_type == "api_key":
            if body.api_key_header is not None or row.api_key_header is None:
                row.api_key_header = validate_header_name(body.api_key_header)
        else:
            row.api_key_header = None
        if auth_changed:
            changes["auth_type"] = row.auth_type
        if body.credentials:
            credentials = validate_credentials(row.auth_type, body.credentials)
            _set_credentials(request, row, credentials)
            changes["credentials_changed"] = True
        elif row.auth_type == "none":
            if row.credentials_ciphertext is not None:
                changes["credentials_changed"] = True
            _set_credentials(request, row, None)
        elif auth_changed:
            raise invalid(
                "CREDENTIALS_REQUIRED",
                f"认证方式改为 {AUTH_TYPES[row.auth_type]} 时必须同时填写新的凭据（{'、'.join(CREDENTIAL_FIELDS[row.auth_type])}）。",
            )
        for field_name in ("timeout_seconds", "retries", "enabled"):
            value = getattr(body, field_name)
            if value is not None:
                setattr(row, field_name, value)
                changes[field_name] = value
    except KeyStoreError as error:
        session.rollback()
        raise _reject(request, caller, "api_endpoints.update", name, _key_error(error)) from error
    except ApiError as error:
        session.rollback()
        raise _reject(request, caller, "api_endpoints.update", name, error) from None
    row.updated_by, row.updated_at = caller.username, utc_now()
    changes["key_version"] = row.credentials_key_version
    add_event(session, request, caller, "api_endpoints.update", f"api_endpoint:{name}", "success", changes)
    session.commit()
    return row


def delete_endpoint(session: Session, request: Request, caller: Principal, name: str) -> None:
    row = get_endpoint(session, name)
    session.delete(row)
    add_event(session, request, caller, "api_endpoints.delete", f"api_endpoint:{name}", "success",
              {"base_url": row.base_url})
    session.commit()


def _failure_text(error: httpx.HTTPError, url: str, timeout: int) -> tuple[str, str]:
    """Return (code, Chinese message) of a failed test request; the message never contains credentials."""
    if isinstance(error, httpx.ConnectTimeout):
        return "CONNECT_TIMEOUT", f"连接 {url} 超时：{timeout} 秒内未能建立连接。请检查地址、网络和防火墙设置。"
    if isinstance(error, httpx.TimeoutException):
        return "READ_TIMEOUT", f"等待 {url} 响应超时：超过 {timeout} 秒未收到响应。请确认对方服务正常，或调大超时时间。"
    if isinstance(error, httpx.ConnectError):
        return "CONNECT_FAILED", (
            f"无法连接 {url}：连接被拒绝或主机不可达（{type(error).__name__}）。请检查地址和端口，并确认对方服务已启动。"
        )
    return "REQUEST_FAILED", f"请求 {url} 失败（{type(error).__name__}）。请检查地址和对方服务。"


def check_connection(session: Session, request: Request, caller: Principal, name: str) -> ConnectionTestOut:
    """Send one GET to the endpoint's base URL with its credentials and report the status code or the error.

    Each phase (connect, send, wait for the response headers) is bounded by the endpoint timeout, no
    retries are made and redirects are not followed. The result is audited (outcome ``success`` or ``failed``).
    """
    row = get_endpoint(session, name)
    try:
        client = build_client(row, request_keystore(request), retries=0)
    except ApiError as error:
        raise _reject(request, caller, "api_endpoints.test", name, error) from None
    url, timeout = row.base_url, row.timeout_seconds
    session.rollback()  # no database transaction stays open during the outgoing request
    started = time.monotonic()
    status_code: int | None = None
    try:
        with client, client.stream("GET", url) as response:  # the exact base URL, without a trailing slash
            status_code = response.status_code
        elapsed_ms = round((time.monotonic() - started) * 1000)
        if status_code < 400:
            code, message = "OK", f"连接成功：{url} 返回 HTTP {status_code}，用时 {elapsed_ms} 毫秒。"
        else:
            code = "HTTP_ERROR_STATUS"
            hint = "请检查凭据是否正确。" if status_code in (401, 403) else "请检查地址和对方服务。"
            message = f"已连接 {url}，但对方返回 HTTP {status_code}（用时 {elapsed_ms} 毫秒）。{hint}"
    except httpx.HTTPError as error:
        elapsed_ms = round((time.monotonic() - started) * 1000)
        code, message = _failure_text(error, url, timeout)
        logger.warning("test of API endpoint %s failed: %s after %d ms", name, type(error).__name__, elapsed_ms)
    ok = code == "OK"
    record_event(request, caller, "api_endpoints.test", f"api_endpoint:{name}", "success" if ok else "failed",
                 {"code": code, "status_code": status_code, "elapsed_ms": elapsed_ms})
    return ConnectionTestOut(ok=ok, code=code, status_code=status_code, elapsed_ms=elapsed_ms, message=message)
