"""Read admin_api's user list as a platform service, page by page.

``GET /api/v1/users`` returns at most ``limit`` users (1 to 1000) ordered by user name, with the
number of matches across all pages in the ``X-Total-Count`` header. The hub and the registry sync
use :func:`fetch_all_users` so they never depend on one unbounded response, and poll it through
:class:`UserDirectory`, which lists all users only every few minutes and otherwise asks for the
users changed since its previous poll (``updated_since``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
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


FULL_LISTING_SECONDS = 300.0
"""Default interval of :class:`UserDirectory`'s full listings."""
OVERLAP_SECONDS = 120.0
"""Default overlap of :class:`UserDirectory`'s change polls with the previous poll."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_updated_since(moment: datetime) -> str:
    """Return ``moment`` as the ``updated_since`` value admin_api accepts: ISO 8601 in UTC ending in ``Z``.

    The ``Z`` suffix keeps a ``+`` out of the query string; admin_api rejects a time without zone.
    """
    if moment.tzinfo is None:
        raise ValueError("updated_since needs an aware datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class UserDirectory:
    """The last known admin_api record of every user, kept current with few requests.

    :meth:`refresh` returns the mapping user name -> record of all users, as one full listing
    would. The first call, every call ``full_every`` seconds after the start of the last full
    listing, and every call after a full listing that returned no users list all users with
    :func:`fetch_all_users` and replace the mapping. The other calls ask only for the users with
    ``updated_at > (start of the previous successful poll) - overlap`` and merge them into the
    mapping. admin_api bumps ``updated_at`` on every change of a user row (disable and enable,
    role, institution, name), has no route that deletes users, and cannot change an
    institution's code, so the merged mapping equals a full listing. The overlap absorbs a clock
    difference between this host and admin_api and transactions that commit up to ``overlap``
    seconds after they wrote ``updated_at``. A change missed beyond that (a clock off by more, a
    row deleted directly in the database) is corrected by the next full listing.

    A failed listing raises as :func:`fetch_all_users` does and leaves the mapping and the poll
    times unchanged, so a caller never acts on a partial list and the next call requests the
    changes from the same time again. ``clock`` returns the current time as an aware ``datetime``,
    and tests pass a clock of their own.
    """

    def __init__(
        self,
        admin_api_url: str,
        service_token: str,
        service: str,
        *,
        full_every: float = FULL_LISTING_SECONDS,
        overlap: float = OVERLAP_SECONDS,
        timeout: float = 10.0,
        page_size: int = PAGE_SIZE,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if full_every <= 0 or overlap < 0:
            raise ValueError(f"full_every must be positive and overlap not negative, got {full_every} and {overlap}")
        self.admin_api_url = admin_api_url
        self.service_token = service_token
        self.service = service
        self.full_every = timedelta(seconds=full_every)
        self.overlap = timedelta(seconds=overlap)
        self.timeout = timeout
        self.page_size = page_size
        self.clock = clock
        self._users: dict[str, dict[str, Any]] = {}
        self._full_started: datetime | None = None
        """Start of the last successful full listing that returned users, or None to force a full listing."""
        self._poll_started: datetime | None = None
        """Start of the last successful listing, full or of changes."""
        self.last_full = False
        """Whether the last successful :meth:`refresh` was a full listing."""
        self.last_rows = 0
        """User rows that the last successful :meth:`refresh` received from admin_api."""

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None:
            raise ValueError("the clock of UserDirectory must return an aware datetime")
        return now.astimezone(UTC)

    def refresh(self) -> dict[str, dict[str, Any]]:
        """Poll admin_api and return a new dict of every known user's record by user name."""
        started = self._now()
        previous = self._poll_started
        if (
            self._full_started is None
            or previous is None
            or started < previous  # a clock that went back would otherwise postpone the next full listing
            or started - self._full_started >= self.full_every
        ):
            rows = fetch_all_users(self.admin_api_url, self.service_token, self.service,
                                   timeout=self.timeout, page_size=self.page_size)
            self._users = {str(row["username"]): row for row in rows}
            # An empty listing (wrong database or URL) is no base for change polls: list fully again.
            self._full_started = started if rows else None
            self.last_full = True
            log.debug("full user listing: %d users", len(rows))
        else:
            since = format_updated_since(previous - self.overlap)
            rows = fetch_all_users(self.admin_api_url, self.service_token, self.service,
                                   filters={"updated_since": since}, timeout=self.timeout, page_size=self.page_size)
            for row in rows:
                self._users[str(row["username"])] = row
            self.last_full = False
            log.debug("user changes since %s: %d users", since, len(rows))
        self._poll_started = started
        self.last_rows = len(rows)
        return dict(self._users)
