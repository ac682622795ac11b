"""JupyterHub authenticator that checks passwords against admin_api.

admin_api owns the accounts. The hub stores no password. Each login sends
``POST /api/v1/auth/verify`` with the service token, and the response decides the login,
the hub group (the user's institution code) and the auth state that the spawner reads.
"""

from __future__ import annotations

import httpx
from jupyterhub.auth import Authenticator
from tornado import web
from traitlets import Float, Unicode, default

from regsandbox_core.secrets import service_headers as platform_service_headers
from regsandbox_core.settings import get_settings

SERVICE_NAME = "hub"
"""Value of the ``X-Regsandbox-Service`` header on every call the hub makes to admin_api."""

MESSAGE_USER_DISABLED = "账号已停用，请联系系统管理员。"
MESSAGE_SERVICE_UNAVAILABLE = "身份认证服务暂时不可用，请稍后重试；如持续出现请联系系统管理员。"
MESSAGE_TOO_MANY_ATTEMPTS = "登录失败次数过多，账号已暂时锁定，请 15 分钟后再试或联系系统管理员。"


def service_headers(service_token: str) -> dict[str, str]:
    """Return the headers with which the hub authenticates to admin_api as a service."""
    return platform_service_headers(service_token, SERVICE_NAME)


class AdminApiAuthenticator(Authenticator):
    """Sign users in with the accounts and roles kept by admin_api.

    A successful login returns ``{name, groups: [institution_code], auth_state: {role,
    institution_code, display_name}}``. Because ``manage_groups`` is on, the hub group of a
    user is the institution that admin_api reported at the last login. Regulator accounts
    (no institution) belong to no group.

    A wrong password returns None (the login page shows 用户名或密码错误). A disabled account
    and an unreachable admin_api raise ``web.HTTPError``, whose Chinese message the login
    page shows instead.
    """

    admin_api_url = Unicode(
        help="""Base URL of admin_api, without the ``/api/v1`` prefix.

        Default: ``http://<REGSANDBOX_HOST>:<REGSANDBOX_ADMIN_API_PORT>`` from the platform
        settings. Example: ``c.AdminApiAuthenticator.admin_api_url = "http://127.0.0.1:8700"``.
        """,
    ).tag(config=True)

    @default("admin_api_url")
    def _default_admin_api_url(self) -> str:
        return get_settings().admin_api_url

    service_token = Unicode(
        help="""Service token sent as ``Authorization: Bearer`` to admin_api.

        Set it from ``PlatformSecrets.service_token`` in jupyterhub_config.py. Never logged
        and never passed to single-user servers. Empty means every login fails.
        """,
    ).tag(config=True)

    request_timeout = Float(
        10.0,
        help="""Seconds to wait for admin_api to respond to a login check before the login fails.

        Default 10. Example: ``c.AdminApiAuthenticator.request_timeout = 5``.
        """,
    ).tag(config=True)

    @default("manage_groups")
    def _default_manage_groups(self) -> bool:
        return True

    @default("enable_auth_state")
    def _default_enable_auth_state(self) -> bool:
        return True

    @default("allow_all")
    def _default_allow_all(self) -> bool:
        # admin_api decides who may sign in; the spawner decides who may start a sandbox.
        return True

    @default("refresh_pre_spawn")
    def _default_refresh_pre_spawn(self) -> bool:
        # Role and institution are read again from admin_api right before every start.
        return True

    @property
    def verify_url(self) -> str:
        return f"{self.admin_api_url.rstrip('/')}/api/v1/auth/verify"

    async def authenticate(self, handler, data):
        """Check ``data["username"]`` and ``data["password"]`` with admin_api.

        Returns the auth model on success and None for wrong credentials. Raises
        ``web.HTTPError`` (403 disabled account, 503 admin_api unreachable or answering
        an unexpected status) with a Chinese message for the login page.
        """
        username = (data.get("username") or "").strip()
        password = data.get("password") or ""
        if not username or not password:
            return None
        source_ip = handler.request.remote_ip if handler is not None else None

        if not self.service_token:
            self.log.error("AdminApiAuthenticator.service_token is empty; rejecting login of %r", username)
            raise web.HTTPError(503, MESSAGE_SERVICE_UNAVAILABLE)

        try:
            async with httpx.AsyncClient(timeout=self.request_timeout) as client:
                response = await client.post(
                    self.verify_url,
                    json={"username": username, "password": password, "source_ip": source_ip},
                    headers=service_headers(self.service_token),
                )
        except httpx.HTTPError as error:
            self.log.error("admin_api login check for %r failed at %s: %s", username, self.verify_url, error)
            raise web.HTTPError(503, MESSAGE_SERVICE_UNAVAILABLE) from error

        if response.status_code == 401:
            self.log.info("admin_api rejected the credentials of %r", username)
            return None
        if response.status_code == 403:
            self.log.info("admin_api reports account %r as disabled (%s)", username, _error_code(response))
            raise web.HTTPError(403, MESSAGE_USER_DISABLED)
        if response.status_code == 429:
            self.log.warning("admin_api locked sign-in of %r after repeated failures", username)
            detail = _error_detail(response) or MESSAGE_TOO_MANY_ATTEMPTS
            raise web.HTTPError(429, detail)
        if response.status_code != 200:
            self.log.error(
                "admin_api login check for %r returned HTTP %s (%s)",
                username,
                response.status_code,
                _error_code(response),
            )
            raise web.HTTPError(503, MESSAGE_SERVICE_UNAVAILABLE)

        return self._auth_model(username, response)

    async def refresh_user(self, user, handler=None):
        """Re-read the user's role, institution and state from ``GET /api/v1/users``.

        Called every ``auth_refresh_age`` seconds of activity and before each spawn. Returns
        False (sign in again) for a disabled or deleted account, the new auth model otherwise,
        and True (keep the stored auth state) when admin_api cannot be reached.
        """
        await super().refresh_user(user, handler)
        url = f"{self.admin_api_url.rstrip('/')}/api/v1/users"
        try:
            async with httpx.AsyncClient(timeout=self.request_timeout) as client:
                response = await client.get(url, headers=service_headers(self.service_token))
            response.raise_for_status()
            accounts = {account["username"]: account for account in response.json()}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            self.log.warning("Could not refresh %s from %s, keeping the stored auth state: %s", user.name, url, error)
            return True

        account = accounts.get(user.name)
        if account is None or not account.get("is_active", False):
            self.log.info("Account %s is disabled or deleted in admin_api; sign-in required", user.name)
            # NOTE: JupyterHub 6.1.1 reads handler._token_authenticated after a failed refresh but
            # sets it only for token-authenticated requests, so cookie requests ended in HTTP 500.
            if handler is not None and not hasattr(handler, "_token_authenticated"):
                handler._token_authenticated = False
            return False
        return self._model_of(account)

    def _auth_model(self, username: str, response: httpx.Response) -> dict:
        try:
            account = response.json()
            name = account["username"]
            role = account["role"]
        except (ValueError, KeyError, TypeError) as error:
            self.log.error("admin_api login check for %r returned an unreadable body: %s", username, error)
            raise web.HTTPError(503, MESSAGE_SERVICE_UNAVAILABLE) from error

        self.log.info("admin_api accepted %r (role %s, institution %s)", name, role, account.get("institution_code"))
        return self._model_of(account)

    @staticmethod
    def _model_of(account: dict) -> dict:
        """Return the hub auth model of an admin_api user record."""
        name = account["username"]
        institution_code = account.get("institution_code") or None
        return {
            "name": name,
            "groups": [institution_code] if institution_code else [],
            "auth_state": {
                "role": account["role"],
                "institution_code": institution_code,
                "display_name": account.get("display_name") or name,
            },
        }


def _error_detail(response: httpx.Response) -> str | None:
    """Return the Chinese ``detail`` of an admin_api error body, or None when there is none."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return None
    return detail if isinstance(detail, str) else None


def _error_code(response: httpx.Response) -> str:
    """Return the stable error code of an admin_api error body, or the status when there is none."""
    try:
        return str(response.json().get("code"))
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}"
