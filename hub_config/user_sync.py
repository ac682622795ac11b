"""JupyterHub managed service that keeps the hub's users in line with admin_api.

The hub starts it (``jupyterhub_config.py`` declares it with a ``command``) and restarts it when it
exits, as it does for jupyterhub-idle-culler. It works through the hub's REST API with a token the
hub generates at start-up and the scopes of the role ``regsandbox-user-sync``, so an error here
never blocks the hub's event loop or stops the hub.

Every ``REGSANDBOX_HUB_USER_SYNC_SECONDS`` (default 15) one round brings its copy of the admin_api
users up to date, reads all hub users page by page, and then, for each hub user:

- account disabled, or no longer in admin_api: stop the server, then delete the hub user. Deleting
  removes the user's hub API and OAuth tokens, so the browser's hub and server cookies stop
  working at once, and a new sign-in is refused by admin_api.
- server running for another institution than admin_api now reports, or for a role that may not
  use a sandbox: stop it. Its Unix group and extract belong to the old institution; the next start
  reads the new role and institution (``refresh_pre_spawn``).
- hub group membership differs from the admin_api institution: move it.
- role, institution or name changed since the previous round: write them into the auth state.

The copy of the admin_api users is a :class:`regsandbox_core.admin_users.UserDirectory`: the first
round and one round every 5 minutes list all users (20 requests of 1,000 users at 20,000 users);
the other rounds ask only for the users changed since the previous round minus a 2-minute overlap
(``updated_since``), usually one request with a few rows. Every change to a user row, including
disable, role and institution, bumps its ``updated_at``, so each round still compares every hub
user with the current record of every account. Only a user row deleted directly in admin_api's
database (admin_api itself only disables users) waits for the next full listing. A full listing
without any users removes no hub user (see ``_sync_user``), and the next round lists fully again.

Each forced stop (``sandbox.stop``) and hub-user removal (``hub.user_remove``) is audited through
admin_api. A disabled user therefore loses hub and server within one interval plus the time of one
round: tests/hub_config/test_hub_real_admin_api.py measured 2 to 3.5 s at a 2-second interval on a
2-core machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from regsandbox_core.admin_users import UserDirectory
from regsandbox_core.errors import ConfigurationError, RegsandboxError
from regsandbox_core.logs import configure_logging
from regsandbox_core.secrets import load_platform_secrets, service_headers
from regsandbox_core.settings import get_settings

log = logging.getLogger("hub_config.user_sync")  # not __name__, which is "__main__" under python -m

SERVICE_NAME = "regsandbox-user-sync"
"""Name of this managed service in the hub."""
SERVICE_SCOPES = [
    "admin:users",  # list and delete users, write auth state
    "read:servers",
    "admin:server_state",  # the role and institution a server was started for
    "delete:servers",
    "admin:groups",  # create an institution's group and change its members
]
ADMIN_API_SERVICE = "hub"
"""Value of the ``X-Regsandbox-Service`` header: the sync acts for the hub."""
AUDIT_ACTOR = "hub-user-sync"
HUB_PAGE_SIZE = 200
"""Users per hub API request: JupyterHub's default ``api_page_max_limit``."""
MAX_HUB_PAGES = 1000
STOP_WAIT_SECONDS = 30.0
"""How long a round waits for a stopping server before it goes on; the next round checks again."""
LOG_EVERY_FAILED_ROUNDS = 20
"""After the first failed round, only every 20th further consecutive failure is logged."""


class HubApiError(Exception):
    """A hub REST API call failed: the hub was not reached or returned an unexpected status."""


@dataclass
class RoundReport:
    """Changes made by one round, by hub user name."""

    stopped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    regrouped: list[str] = field(default_factory=list)
    auth_state_updated: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.stopped or self.removed or self.regrouped or self.auth_state_updated or self.errors)


class HubApi:
    """The calls of the hub REST API that the sync makes, as the managed service."""

    def __init__(self, api_url: str, token: str, timeout: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=api_url.rstrip("/"), headers={"Authorization": f"token {token}"}, timeout=timeout, trust_env=False
        )

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, expected: tuple[int, ...], **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise HubApiError(f"{method} {path} failed: {type(error).__name__}: {error}") from error
        if response.status_code not in expected:
            raise HubApiError(f"{method} {path} returned HTTP {response.status_code}: {response.text[:300]}")
        return response

    def list_users(self) -> list[dict[str, Any]]:
        """Return every hub user with groups and active servers (with their state), page by page."""
        users: dict[str, dict[str, Any]] = {}
        offset = 0
        headers = {"Accept": "application/jupyterhub-pagination+json"}
        for _page in range(MAX_HUB_PAGES):
            response = self._request(
                "GET", "/users", (200,), params={"offset": offset, "limit": HUB_PAGE_SIZE}, headers=headers
            )
            try:
                body = response.json()
                items = body["items"]
                for item in items:
                    users.setdefault(item["name"], item)
                following = body["_pagination"].get("next")
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise HubApiError(f"GET /users returned an unreadable page at offset {offset}: {error!r}") from error
            if not following or not items:
                return list(users.values())
            offset = following["offset"]
        raise HubApiError(f"user listing did not end within {MAX_HUB_PAGES} pages")

    def get_user(self, name: str) -> dict[str, Any] | None:
        response = self._request("GET", f"/users/{name}", (200, 404))
        return response.json() if response.status_code == 200 else None

    def stop_server(self, name: str) -> bool:
        """Ask the hub to stop the user's server; return True when it stopped, False while it is still stopping."""
        response = self._request("DELETE", f"/users/{name}/server", (202, 204, 404))
        return response.status_code != 202

    def delete_user(self, name: str) -> None:
        self._request("DELETE", f"/users/{name}", (204, 404))

    def add_to_group(self, group: str, name: str) -> None:
        response = self._request("POST", f"/groups/{group}/users", (200, 404), json={"users": [name]})
        if response.status_code == 404:
            self._request("POST", f"/groups/{group}", (201, 409))
            self._request("POST", f"/groups/{group}/users", (200,), json={"users": [name]})

    def remove_from_group(self, group: str, name: str) -> None:
        self._request("DELETE", f"/groups/{group}/users", (200, 404), json={"users": [name]})

    def set_auth_state(self, name: str, auth_state: dict[str, Any]) -> None:
        self._request("PATCH", f"/users/{name}", (200, 404), json={"auth_state": auth_state})


def default_server(hub_user: dict[str, Any]) -> dict[str, Any] | None:
    """Return the user's active default server model, or None when it has none."""
    return (hub_user.get("servers") or {}).get("")


def sandbox_mismatch(hub_user: dict[str, Any], account: dict[str, Any], spawn_roles: frozenset[str]) -> str | None:
    """Return the Chinese reason to stop the running server of an active account, or None to keep it.

    The server's state contains the role and institution it was started for (InstitutionSpawner);
    a server without them, started by an older spawner, is compared with the hub groups. A server
    that is starting or stopping is left alone: a start reads the role and institution refreshed
    from admin_api and rejects other roles itself, and interrupting it would show the user an
    error instead of that rejection. The next round checks it once it is running.
    """
    server = default_server(hub_user)
    if server is None or server.get("pending"):
        return None
    role = account.get("role")
    if role not in spawn_roles:
        return f"角色已变更为 {role}，该角色不能使用建模沙箱"
    state = server.get("state") or {}
    started_for = state.get("institution_code")
    current = account.get("institution_code")
    if started_for is None:
        if current not in (hub_user.get("groups") or []):
            return f"所属机构已变更为 {current}"
        return None
    if started_for != current:
        return f"所属机构已由 {started_for} 变更为 {current}"
    return None


def auth_state_of(account: dict[str, Any]) -> dict[str, Any]:
    """Return the auth state that AdminApiAuthenticator writes for an admin_api user record."""
    return {
        "role": account.get("role"),
        "institution_code": account.get("institution_code") or None,
        "display_name": account.get("display_name") or account.get("username"),
    }


class UserSync:
    """One hub's user sync: call :meth:`run_round` once per interval."""

    def __init__(
        self,
        hub: HubApi,
        admin_api_url: str,
        service_token: str,
        spawn_roles: frozenset[str],
        *,
        timeout: float = 10.0,
        stop_wait: float = STOP_WAIT_SECONDS,
        directory: UserDirectory | None = None,
    ) -> None:
        self.hub = hub
        self.admin_api_url = admin_api_url.rstrip("/")
        self.service_token = service_token
        self.spawn_roles = spawn_roles
        self.timeout = timeout
        self.stop_wait = stop_wait
        self.directory = directory or UserDirectory(
            self.admin_api_url, service_token, ADMIN_API_SERVICE, timeout=timeout
        )
        """admin_api's users, listed fully every few minutes and by their changes in between."""
        self._seen: dict[str, dict[str, Any]] = {}
        """Auth state of each admin_api account at the previous round, to notice role and institution changes."""
        self._admin_warned: set[str] = set()

    def run_round(self) -> RoundReport:
        """Compare every hub user with admin_api and apply the changes; raise when either listing fails.

        Errors of single users are logged, listed in the report and retried at the next round.
        """
        accounts = self.directory.refresh()
        hub_users = self.hub.list_users()
        report = RoundReport()
        for hub_user in hub_users:
            name = hub_user["name"]
            try:
                self._sync_user(hub_user, accounts.get(name), bool(accounts), report)
            except HubApiError as error:
                log.error("syncing hub user %s failed, retrying next round: %s", name, error)
                report.errors.append(name)
        self._seen = {name: auth_state_of(account) for name, account in accounts.items()}
        return report

    def _sync_user(
        self, hub_user: dict[str, Any], account: dict[str, Any] | None, listing_has_users: bool, report: RoundReport
    ) -> None:
        name = hub_user["name"]
        if account is None and not listing_has_users:
            # A platform always has its administrators: an empty listing means a wrong database or
            # URL, and removing every hub user because of it would lock everyone out.
            log.error("admin_api listed no users at all; not removing hub user %s", name)
            report.errors.append(name)
            return
        if account is None or not account.get("is_active", False):
            reason = "账号已在平台删除" if account is None else "账号已停用"
            self._revoke(hub_user, account, reason, report)
            return

        if hub_user.get("admin") and name not in self._admin_warned:
            self._admin_warned.add(name)
            log.warning("hub user %s is a hub admin, which admin_api never grants; remove it in the hub", name)

        reason = sandbox_mismatch(hub_user, account, self.spawn_roles)
        if reason is not None:
            self._stop(hub_user, account, reason, report)
        self._sync_groups(hub_user, account, report)

        previous = self._seen.get(name)
        current = auth_state_of(account)
        if previous is not None and previous != current:
            self.hub.set_auth_state(name, current)
            log.info("updated auth state of hub user %s: role %s, institution %s", name, current["role"],
                     current["institution_code"])
            report.auth_state_updated.append(name)

    def _revoke(self, hub_user: dict[str, Any], account: dict[str, Any] | None, reason: str, report: RoundReport) -> None:
        """Stop the server of a disabled or deleted account, then delete the hub user."""
        name = hub_user["name"]
        server = default_server(hub_user)
        if server is not None:
            if not self._stop(hub_user, account, reason, report):
                return  # still stopping: the hub refuses to delete the user until it has stopped
        institution_code = (account or {}).get("institution_code") or _started_for(hub_user)
        try:
            self.hub.delete_user(name)
        except HubApiError as error:
            self._audit("hub.user_remove", f"hub-user:{name}", "failed", institution_code,
                        f"{reason}，移除 JupyterHub 用户失败：{error}"[:4000])
            raise
        log.info("removed hub user %s: %s", name, "account deleted" if account is None else "account disabled")
        self._audit("hub.user_remove", f"hub-user:{name}", "success", institution_code,
                    f"{reason}，已移除 JupyterHub 用户及其令牌和登录会话")
        report.removed.append(name)

    def _stop(self, hub_user: dict[str, Any], account: dict[str, Any] | None, reason: str, report: RoundReport) -> bool:
        """Stop the user's server and audit it; return True once it has stopped."""
        name = hub_user["name"]
        institution_code = _started_for(hub_user) or (account or {}).get("institution_code")
        resource = f"sandbox:{name}"
        try:
            stopped = self.hub.stop_server(name) or self._wait_until_stopped(name)
        except HubApiError as error:
            self._audit("sandbox.stop", resource, "failed", institution_code, f"{reason}，强制停止建模沙箱失败：{error}"[:4000])
            raise
        if not stopped:
            log.warning("server of %s is still stopping after %.0f s; checking again next round", name, self.stop_wait)
            self._audit("sandbox.stop", resource, "failed", institution_code,
                        f"{reason}，建模沙箱在 {self.stop_wait:.0f} 秒内未停止，下一轮重试")
            report.errors.append(name)
            return False
        log.info("stopped server of %s: %s", name, reason)
        self._audit("sandbox.stop", resource, "success", institution_code, f"{reason}，已强制停止建模沙箱")
        report.stopped.append(name)
        return True

    def _wait_until_stopped(self, name: str) -> bool:
        deadline = time.monotonic() + self.stop_wait
        while time.monotonic() < deadline:
            time.sleep(0.5)
            hub_user = self.hub.get_user(name)
            if hub_user is None or default_server(hub_user) is None:
                return True
        return False

    def _sync_groups(self, hub_user: dict[str, Any], account: dict[str, Any], report: RoundReport) -> None:
        name = hub_user["name"]
        code = account.get("institution_code")
        wanted = {code} if code else set()
        current = set(hub_user.get("groups") or [])
        if wanted == current:
            return
        for group in sorted(current - wanted):
            self.hub.remove_from_group(group, name)
        for group in sorted(wanted - current):
            self.hub.add_to_group(group, name)
        log.info("moved hub user %s from groups %s to %s", name, sorted(current), sorted(wanted))
        report.regrouped.append(name)

    def _audit(self, action: str, resource: str, outcome: str, institution_code: str | None, detail: str) -> None:
        """Store an audit event in admin_api; a failure is logged, not raised, so the sync goes on."""
        event = {
            "actor": AUDIT_ACTOR,
            "role": "service",
            "action": action,
            "resource": resource,
            "outcome": outcome,
            "institution_code": institution_code,
            "detail": detail,
        }
        url = f"{self.admin_api_url}/api/v1/audit/events"
        try:
            response = httpx.post(url, json=event, headers=service_headers(self.service_token, ADMIN_API_SERVICE),
                                  timeout=self.timeout, trust_env=False)
            response.raise_for_status()
        except httpx.HTTPError as error:
            log.error("could not store audit event %s/%s for %s: %s", action, outcome, resource, error)


def _started_for(hub_user: dict[str, Any]) -> str | None:
    server = default_server(hub_user) or {}
    return (server.get("state") or {}).get("institution_code")


# Command line


def main(argv: list[str] | None = None) -> int:
    """Run rounds every ``--interval`` seconds until SIGTERM or ``--max-rounds``; the hub restarts the process."""
    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="python -m hub_config.user_sync", description="按平台管理服务的用户状态同步 JupyterHub 用户、用户组和建模沙箱。"
    )
    parser.add_argument(
        "--interval", type=float, default=settings.hub_user_sync_seconds, metavar="SECONDS",
        help=f"两轮同步之间的秒数（默认取 REGSANDBOX_HUB_USER_SYNC_SECONDS，当前为 {settings.hub_user_sync_seconds}）。",
    )
    parser.add_argument(
        "--max-rounds", type=int, default=100_000,
        help="最多同步的轮数，达到后正常退出并由 JupyterHub 重新启动（默认 100000）。",
    )
    parser.add_argument(
        "--spawn-roles", default="modeller",
        help="可以使用建模沙箱的角色代码，以逗号分隔，须与 InstitutionSpawner.spawn_roles 一致（默认 modeller）。",
    )
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error(f"--interval 必须为正数（秒），收到 {args.interval}。")
    if args.max_rounds <= 0:
        parser.error(f"--max-rounds 必须为正整数，收到 {args.max_rounds}。")
    spawn_roles = frozenset(role.strip() for role in args.spawn_roles.split(",") if role.strip())

    configure_logging()
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        log.info("received signal %d, stopping after the current round", signum)

    signal.signal(signal.SIGTERM, _stop)

    api_url = os.environ.get("JUPYTERHUB_API_URL", "")
    api_token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    try:
        if not api_url or not api_token:
            raise ConfigurationError(
                "HUB_SERVICE_ENVIRONMENT_MISSING",
                "缺少 JUPYTERHUB_API_URL 或 JUPYTERHUB_API_TOKEN：用户同步须由 JupyterHub 作为托管服务启动"
                "（见 hub_config/jupyterhub_config.py），不能直接运行。",
            )
        secrets = load_platform_secrets(settings)
    except ConfigurationError as error:
        log.error("hub user sync not started: %s", error.code)
        print(error.message, file=sys.stderr)
        # The hub restarts a managed service as soon as it exits: waiting one interval keeps a
        # configuration error from restarting the process in a tight loop.
        time.sleep(args.interval)
        return 2

    # The hub starts managed services in sessions of their own, so a hub that is killed (not
    # stopped) leaves this process behind. Its parent then changes, and the loop below ends.
    hub_pid = os.getppid()
    hub = HubApi(api_url, api_token)
    sync = UserSync(hub, settings.admin_api_url, secrets.service_token, spawn_roles)
    log.info("hub user sync started: every %.1f s against %s and %s", args.interval, api_url, settings.admin_api_url)
    failures = 0
    try:
        for round_number in range(args.max_rounds):
            started = time.monotonic()
            try:
                report = sync.run_round()
            except (RegsandboxError, HubApiError) as error:
                failures += 1
                if failures == 1 or failures % LOG_EVERY_FAILED_ROUNDS == 0:
                    code = error.code if isinstance(error, RegsandboxError) else "HUB_API_FAILED"
                    log.error("round failed (%d in a row), retrying in %.1f s: %s %s", failures, args.interval, code, error)
            else:
                if failures:
                    log.info("round succeeded again after %d failed rounds", failures)
                failures = 0
                if report.changed:
                    log.info(
                        "round done: %d stopped, %d removed, %d regrouped, %d auth states updated, %d errors",
                        len(report.stopped), len(report.removed), len(report.regrouped),
                        len(report.auth_state_updated), len(report.errors),
                    )
            elapsed = time.monotonic() - started
            if elapsed > args.interval:
                log.warning("round %d took %.1f s, longer than the interval of %.1f s", round_number, elapsed, args.interval)
            deadline = started + args.interval
            while not stopping and time.monotonic() < deadline and os.getppid() == hub_pid:
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            if os.getppid() != hub_pid:
                log.warning("the hub (pid %d) has exited without stopping this service; stopping", hub_pid)
                break
            if stopping:
                break
    finally:
        hub.close()
    log.info("hub user sync stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
