"""Read admin_api's user list as a platform service, page by page.

``GET /api/v1/users`` returns at most ``limit`` users (1 to 1000) ordered by user name, with the
number of matches across all pages in the ``X-Total-Count`` header. The hub and the registry sync
use :func:`fetch_all_users` so they never depend on one unbounded response.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from regsandbox_core.errors import RegsandboxError
from regsandbox_core.secrets import service_headers

log = logging.getLogger(__name__)

PAGE_SIZE = 1000
"""Users per request: the maximum that admin_api accepts."""
MAX_PAGES = 1000
"""Bound on the requests of one listing: 1,000,000 users at PAGE_SIZE, far above the 20,000 the platform is built for."""


def fetch_all_users(
    admin_api_url: str,
    service_token: str,
    service: str,
    *,
    filters: dict[str, str] | None = None,
    timeout: float = 10.0,
    page_size: int = PAGE_SIZE,
) -> list[dict[str, Any]]:
    """Return every user matching ``filters`` (``q``, ``role``, ``institution_code``, ``active``, ``updated_since``).

    Pages with ``limit``/``offset`` until a short page or ``X-Total-Count`` ends the listing. A user
    that appears on two pages (a user was created meanwhile) is returned once. Raises
    :class:`RegsandboxError` with ``ADMIN_API_UNAVAILABLE`` (not reached) or ``ADMIN_API_REQUEST_FAILED``
    (error status or invalid body), so callers never act on a partial list.
    """
    url = f"{admin_api_url.rstrip('/')}/api/v1/users"
    users: dict[str, dict[str, Any]] = {}
    offset = 0
    with httpx.Client(headers=service_headers(service_token, service), timeout=timeout, trust_env=False) as client:
        for _page in range(MAX_PAGES):
            params = {**(filters or {}), "limit": str(page_size), "offset": str(offset)}
            rows, total = _fetch_page(client, url, params)
            for row in rows:
                users.setdefault(str(row["username"]), row)
            offset += len(rows)
            if len(rows) < page_size or (total is not None and offset >= total):
                return list(users.values())
    log.error("user listing at %s did not end within %d pages of %d", url, MAX_PAGES, page_size)
    raise RegsandboxError(
        "ADMIN_API_REQUEST_FAILED",
        f"平台管理服务的用户列表超过 {MAX_PAGES} 页（每页 {page_size} 个），已停止读取。请检查管理服务的分页参数是否生效。",
        status=502,
    )


def _fetch_page(client: httpx.Client, url: str, params: dict[str, str]) -> tuple[list[dict[str, Any]], int | None]:
    try:
        response = client.get(url, params=params)
    except httpx.HTTPError as error:
        raise RegsandboxError(
            "ADMIN_API_UNAVAILABLE",
            f"平台管理服务暂时无法访问：{url}（{type(error).__name__}）。请确认管理服务已启动后重试。",
            status=503,
        ) from error
    if response.status_code != 200:
        raise RegsandboxError(
            "ADMIN_API_REQUEST_FAILED",
            f"平台管理服务拒绝了用户列表请求：HTTP {response.status_code}。如为 401 或 403，请检查服务令牌"
            "（加密的平台密钥文件 secrets/platform.enc.json）是否与管理服务一致；其他情况请查看管理服务日志。",
            status=502,
        )
    try:
        rows = response.json()
    except ValueError:
        rows = None
    if not isinstance(rows, list) or not all(isinstance(row, dict) and row.get("username") for row in rows):
        log.error("admin_api returned an invalid user list from %s", url)
        raise RegsandboxError(
            "ADMIN_API_REQUEST_FAILED", "平台管理服务返回的用户列表格式无效（应为含 username 的对象列表）。", status=502
        )
    header = response.headers.get("X-Total-Count")
    total = int(header) if header is not None and header.isdigit() else None
    return rows, total
