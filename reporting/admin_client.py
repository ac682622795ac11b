"""HTTP client of the admin_api endpoints that the scheduler uses, authenticated as the ``scheduler`` service."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from regsandbox_core.errors import RegsandboxError
from regsandbox_core.secrets import PlatformSecrets, service_headers
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = "scheduler"


class AdminApiError(RegsandboxError):
    """admin_api is unreachable (``ADMIN_API_UNAVAILABLE``) or returned an error status or invalid body (``ADMIN_API_ERROR``)."""

    status = 502

    def __init__(self, code: str, message: str, *, http_status: int | None = None) -> None:
        super().__init__(code, message)
        self.http_status = http_status  # None when admin_api was not reached

    @property
    def retryable(self) -> bool:
        """Whether sending the same request later may succeed: admin_api unreachable or a 5xx status."""
        return self.http_status is None or self.http_status >= 500


class AdminApiClient:
    """Calls of the scheduler to admin_api; every method raises AdminApiError on failure."""

    def __init__(self, settings: Settings, secrets: PlatformSecrets, *, timeout: float = 10.0) -> None:
        self.base_url = settings.admin_api_url
        self._http = httpx.Client(
            base_url=f"{self.base_url}/api/v1",
            headers=service_headers(secrets.service_token, SERVICE_NAME),
            timeout=timeout,
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise AdminApiError(
                "ADMIN_API_UNAVAILABLE",
                f"无法连接管理服务 {self.base_url}（{type(error).__name__}）。请确认 admin_api 已启动，"
                "并检查 REGSANDBOX_HOST 和 REGSANDBOX_ADMIN_API_PORT 配置。",
            ) from error

    def _json(self, response: httpx.Response, method: str, path: str) -> Any:
        if response.status_code >= 400:
            code, detail = _error_body(response)
            logger.warning("admin_api %s %s returned %d %s", method, path, response.status_code, code)
            hint = detail
            if response.status_code in (401, 403):
                hint = "请检查调度服务使用的服务令牌是否与加密的平台密钥文件 secrets/platform.enc.json 一致。"
            raise AdminApiError(
                "ADMIN_API_ERROR",
                f"管理服务拒绝了请求 {method} {path}（HTTP {response.status_code}，{code}）。{hint}",
                http_status=response.status_code,
            )
        try:
            return response.json()
        except ValueError as error:
            raise AdminApiError(
                "ADMIN_API_ERROR", f"管理服务对 {method} {path} 返回了无效的 JSON。", http_status=response.status_code
            ) from error

    def list_schedules(self) -> list[dict[str, Any]]:
        """Return every schedule ``{id, name, notebook_id, cron, recipients, enabled}``."""
        return _items(self._json(self._request("GET", "/schedules"), "GET", "/schedules"))

    def queue_run(self, schedule_id: Any, trigger: str = "cron") -> dict[str, Any]:
        """Queue a run of a schedule and return it."""
        path = f"/schedules/{schedule_id}/runs"
        return self._json(self._request("POST", path, json={"trigger": trigger}), "POST", path)

    def list_queued_runs(self) -> list[dict[str, Any]]:
        """Return the runs waiting for a runner, oldest first as admin_api lists them."""
        response = self._request("GET", "/report-runs", params={"status": "queued"})
        return _items(self._json(response, "GET", "/report-runs"))

    def claim_run(self, run_id: Any) -> dict[str, Any] | None:
        """Take a queued run; return None when another runner took it first (409)."""
        path = f"/report-runs/{run_id}/claim"
        response = self._request("POST", path)
        if response.status_code == 409:
            return None
        return self._json(response, "POST", path)

    def finish_run(self, run_id: Any, payload: dict[str, Any]) -> None:
        """Report the end of a run: ``{status, error_code, error_message, archive_path}``."""
        path = f"/report-runs/{run_id}/finish"
        self._json(self._request("POST", path, json=payload), "POST", path)


def _items(body: Any) -> list[dict[str, Any]]:
    """Accept a bare JSON list or a page object ``{"items": [...]}``."""
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        return body["items"]
    if isinstance(body, list):
        return body
    raise AdminApiError(
        "ADMIN_API_ERROR", "管理服务返回的列表格式无效（既不是数组也不含 items 字段）。", http_status=200
    )


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """Return ``(code, detail)`` of an admin_api error body, or placeholders when it has another shape."""
    try:
        body = response.json()
        return str(body.get("code", "-")), str(body.get("detail", ""))
    except (ValueError, AttributeError):
        return "-", ""
