"""JupyterHub authenticator that checks passwords against admin_api.

admin_api owns the accounts. The hub stores no password. Each login sends
``POST /api/v1/auth/verify`` with the service token, the password and the TOTP code of the form,
and the response decides the login, the hub group (the user's institution code) and the auth
state that the spawner reads. A refused login shows admin_api's Chinese ``detail`` on the form.
"""

from __future__ import annotations

import asyncio

import httpx
from jupyterhub.auth import Authenticator
from tornado import web
from traitlets import Float, Unicode, default

from regsandbox_core.admin_users import fetch_all_users
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.secrets import service_headers as platform_service_headers
from regsandbox_core.settings import get_settings

SERVICE_NAME = "hub"
"""Value of the ``X-Regsandbox-Service`` header on every call the hub makes to admin_api."""

MESSAGE_USER_DISABLED = "账号已停用，请联系系统管理员。"
MESSAGE_SERVICE_UNAVAILABLE = "身份认证服务暂时不可用，请稍后重试；如持续出现请联系系统管理员。"
MESSAGE_TOO_MANY_ATTEMPTS = "登录失败次数过多，账号已暂时锁定，请 15 分钟后再试或联系系统管理员。"
MESSAGE_SIGN_IN_REFUSED = "登录被拒绝，请联系系统管理员。"

# Field limits of admin_api's sign-in body. Longer values are rejected here, because admin_api's
# validation message would repeat the value, and a password must never be shown.
MAX_USERNAME_LENGTH = 64
MAX_PASSWORD_LENGTH = 1024
MAX_TOTP_LENGTH = 16

FALLBACK_MESSAGES = {
    "USER_DISABLED": MESSAGE_USER_DISABLED,
    "PASSWORD_EXPIRED": "密码已过期，请先在控制台修改密码（/console/password）后再登录。",
    "PASSWORD_CHANGE_REQUIRED": "密码由管理员设置，请先在控制台修改密码（/console/password）后再登录。",
    "TOTP_REQUIRED": "该账号已绑定动态验证码，请同时填写身份验证器应用中显示的 6 位动态验证码。",
    "TOTP_INVALID": "动态验证码错误或已过期，请输入身份验证器应用中当前显示的 6 位数字。",
    "TOTP_REUSED": "该动态验证码已使用过，请等待身份验证器显示下一个验证码后重试。",
    "TOTP_ENROLMENT_REQUIRED": "该账号必须使用动态验证码登录，请先在控制台绑定动态验证码（/console/totp）。",
    "ACCOUNT_LOCKED": MESSAGE_TOO_MANY_ATTEMPTS,
    "TOO_MANY_ATTEMPTS": MESSAGE_TOO_MANY_ATTEMPTS,
}
"""Chinese messages by admin_api error code, used when an error body has no ``detail``."""

TOTP_ERROR_CODES = frozenset({"TOTP_REQUIRED", "TOTP_INVALID", "TOTP_REUSED"})
"""401 codes of ``/auth/verify`` that concern the second factor: unlike a wrong password, they get their own message."""


def service_headers(service_token: str) -> dict[str, str]:
    """Return the headers with which the hub authenticates to admin_api as a service."""
    return platform_service_headers(service_token, SERVICE_NAME)


class AdminApiAuthenticator(Authenticator):
    """Sign users in with the accounts and roles kept by admin_api.

    A successful login returns ``{name, admin: False, groups: [institution_code], auth_state:
    {role, institution_code, display_name}}``. Because ``manage_groups`` is on, the hub group of a
    user is the institution that admin_api reported at the last login or refresh; between those,
    the user sync service (:mod:`hub_config.user_sync`) moves it. Regulator accounts (no
    institution) belong to no group. No one is a hub admin, because a hub admin can open every
    institution's sandbox.

    A wrong user name or password returns None (the login page shows 用户名或密码错误). Every
    other refusal (disabled account, second factor missing or wrong, expired password, lockout)
    and an unreachable admin_api raise ``web.HTTPError`` with admin_api's Chinese ``detail``,
    which the login page shows instead.
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

    console_url = Unicode(
        help="""Address of the admin console as users reach it, without a trailing slash.

        The login page links to ``<console_url>/password`` and ``<console_url>/totp`` when a
        sign-in is refused for an expired password or a missing second factor. Default:
        ``REGSANDBOX_CONSOLE_PUBLIC_URL`` + ``/console``, else ``<admin_api_url>/console``.
        """,
    ).tag(config=True)

    @default("console_url")
    def _default_console_url(self) -> str:
        settings = get_settings()
        return f"{settings.console_public_url or settings.admin_api_url}/console"

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

    @property
    def password_change_url(self) -> str:
        """Console page where users change an expired or administrator-issued password."""
        return f"{self.console_url.rstrip('/')}/password"

    @property
    def totp_enrol_url(self) -> str:
        """Console page where users enrol their TOTP second factor."""
        return f"{self.console_url.rstrip('/')}/totp"

    async def authenticate(self, handler, data):
        """Check ``data["username"]``, ``data["password"]`` and ``data["totp"]`` with admin_api.

        Returns the auth model on success and None for a wrong user name or password. Raises
        ``web.HTTPError`` with a Chinese message for the login page otherwise: admin_api's status
        and ``detail`` for a refused sign-in (403 disabled, expired password or missing TOTP
        enrolment, 401 missing or wrong TOTP code, 429 locked), 400 for an over-long field, and
        503 when admin_api is unreachable or returns an unexpected status.
        """
        username = (data.get("username") or "").strip()
        password = data.get("password") or ""
        totp_code = (data.get("totp") or "").strip()
        if not username or not password:
            return None
        self._check_lengths(username, password, totp_code)
        source_ip = handler.request.remote_ip if handler is not None else None

        if not self.service_token:
            self.log.error("AdminApiAuthenticator.service_token is empty; rejecting login of %r", username)
            raise web.HTTPError(503, MESSAGE_SERVICE_UNAVAILABLE)

        body = {"username": username, "password": password, "source_ip": source_ip}
        if totp_code:
            body["totp"] = totp_code
        try:
            async with httpx.AsyncClient(timeout=self.request_timeout) as client:
                response = await client.post(self.verify_url, json=body, headers=service_headers(self.service_token))
        except httpx.HTTPError as error:
            self.log.error("admin_api login check for %r failed at %s: %s", username, self.verify_url, error)
            raise web.HTTPError(503, MESSAGE_SERVICE_UNAVAILABLE) from error

        if response.status_code == 200:
            return self._auth_model(username, response)
        code = _error_code(response)
        if response.status_code == 401 and code not in TOTP_ERROR_CODES:
            self.log.info("admin_api rejected the credentials of %r (%s)", username, code)
            return None
        if response.status_code in (401, 403, 429):
            self.log.info("admin_api rejected sign-in of %r: HTTP %s %s", username, response.status_code, code)
            message = _error_detail(response) or FALLBACK_MESSAGES.get(code, MESSAGE_SIGN_IN_REFUSED)
            raise web.HTTPError(response.status_code, message)
        self.log.error("admin_api login check for %r returned HTTP %s (%s)", username, response.status_code, code)
        raise web.HTTPError(503, MESSAGE_SERVICE_UNAVAILABLE)

    @staticmethod
    def _check_lengths(username: str, password: str, totp_code: str) -> None:
        """Raise HTTP 400 for a field longer than admin_api accepts, without repeating a secret."""
        if len(username) > MAX_USERNAME_LENGTH:
            raise web.HTTPError(400, f"用户名过长（{len(username)} 个字符），最多 {MAX_USERNAME_LENGTH} 个字符，请检查后重新输入。")
        if len(password) > MAX_PASSWORD_LENGTH:
            raise web.HTTPError(400, f"密码过长（{len(password)} 个字符），最多 {MAX_PASSWORD_LENGTH} 个字符，请检查后重新输入。")
        if len(totp_code) > MAX_TOTP_LENGTH:
            raise web.HTTPError(400, "动态验证码格式无效：应为身份验证器应用中显示的 6 位数字，请重新输入。")

    async def refresh_user(self, user, handler=None):
        """Re-read the user's role, institution and state from ``GET /api/v1/users?q=<name>``.

        Called every ``auth_refresh_age`` seconds of activity and before each spawn. Returns
        False (sign in again) for a disabled or deleted account, the new auth model otherwise,
        and True (keep the stored auth state) when admin_api cannot be reached.
        """
        await super().refresh_user(user, handler)
        try:
            # q matches substrings of user names and display names; the exact name is picked below.
            matches = await asyncio.to_thread(
                fetch_all_users,
                self.admin_api_url,
                self.service_token,
                SERVICE_NAME,
                filters={"q": user.name},
                timeout=self.request_timeout,
            )
        except RegsandboxError as error:
            self.log.warning("Could not refresh %s from admin_api, keeping the stored auth state: %s", user.name, error.code)
            return True

        account = next((row for row in matches if row.get("username") == user.name), None)
        if account is None or not account.get("is_active", False):
            self.log.info("Account %s is disabled or deleted in admin_api; sign-in required", user.name)
            # NOTE: JupyterHub 6.1.1 reads handler._token_authenticated after a failed refresh but
            # sets it only for token-authenticated requests, so cookie requests ended in HTTP 500.
            if handler is not None and not hasattr(handler, "_token_authenticated"):
                handler._token_authenticated = False
            return False
        try:
            return self._model_of(account)
        except (KeyError, TypeError) as error:
            self.log.warning("admin_api returned an unreadable record for %s, keeping the stored auth state: %s", user.name, error)
            return True

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
            "admin": False,
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
