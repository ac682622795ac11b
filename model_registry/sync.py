"""Synchronise MLflow users and grants with the platform's users and institutions.

Rules, applied on every run:

- Active modellers and regulator reviewers have an MLflow user whose password is
  :func:`regsandbox_core.secrets.mlflow_password`. Every other platform user (inactive, reporter,
  system admin) has none: an existing one is deleted, which removes its grants. Deletion comes
  first in a run, right after the MLflow user list is read, so a disabled user loses access
  before the slower per-institution and per-user checks. The password of an existing MLflow user
  is set when the user is created and not rewritten by later runs: MLflow hashes every password it
  stores, and rewriting all of them made each run take 0.3 to 1 s per user on a 2-core test machine.
- An experiment named ``<code>/...`` or a registered model named ``<code>.<...>`` belongs to the
  institution ``<code>``. Every institution has an experiment ``<code>/sandbox``.
- Modellers of the institution get MANAGE on its objects; regulator reviewers get READ.
- An object on which anyone else has a grant (a user of another institution, a regulator with
  more than READ, an MLflow user unknown to the platform) before the sync has adopted it is
  quarantined: it gets no grants, now or later, and a warning is logged. This way a modeller of
  bank_a who creates ``bank_b.x`` gives bank_b nothing, and bank_b never sees bank_a's content.
- On an object already adopted for its institution, a grant held by such an outsider was given
  by a member of the institution; the sync revokes it and logs a warning.

Adopted and quarantined objects are remembered in ``<data_dir>/mlflow/sync_state.json`` (0600),
so deleting the outsider's user does not release a quarantined object.

``python -m model_registry.sync --loop`` runs the sync every ``REGSANDBOX_REGISTRY_SYNC_SECONDS``
(default 15, at most 30) seconds, so a disabled user loses MLflow access within one interval plus
the start of one run. The loop keeps the platform users in a
:class:`regsandbox_core.admin_users.UserDirectory`: it lists all users at the first run and every
5 minutes, and in between asks admin_api only for the users changed since the previous run (minus
a 2-minute overlap). Disabling a user changes its row, so the next run receives the user as
inactive, and every run still works on the full set of users.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regsandbox_core.admin_users import UserDirectory, fetch_all_users
from regsandbox_core.errors import ConfigurationError, RegsandboxError
from regsandbox_core.logs import configure_logging
from regsandbox_core.secrets import (
    PlatformSecrets,
    load_platform_secrets,
    mlflow_password,
    write_private_file,
)
from regsandbox_core.settings import Settings, get_settings

from model_registry.client import RESOURCE_EXPERIMENT, RESOURCE_REGISTERED_MODEL, MlflowAdmin
from model_registry.server import ADMIN_USERNAME

log = logging.getLogger("model_registry.sync")  # not __name__, which is "__main__" under python -m

MODELLER = "modeller"
REGULATOR = "regulator_reviewer"
SANDBOX_EXPERIMENT = "sandbox"
INSTITUTION_ROLES = (MODELLER, "reporter")
INSTITUTION_CODE = re.compile(r"^[a-z][a-z0-9_]{1,31}$")


@dataclass(frozen=True)
class Grant:
    """One grant the sync made or confirmed."""

    username: str
    resource_type: str
    resource_id: str
    resource_name: str
    permission: str
    changed: bool


@dataclass(frozen=True)
class NamespacedObject:
    """An experiment or registered model that belongs to an institution by its name."""

    resource_type: str
    resource_id: str
    name: str
    institution: str

    @property
    def key(self) -> str:
        return f"{self.resource_type}:{self.resource_id}"


@dataclass
class SyncReport:
    """Outcome of one run of :func:`sync_permissions`."""

    users_synced: list[str] = field(default_factory=list)
    users_removed: list[str] = field(default_factory=list)
    sandbox_experiments: dict[str, str] = field(default_factory=dict)
    grants: list[Grant] = field(default_factory=list)
    quarantined: list[NamespacedObject] = field(default_factory=list)
    revoked: list[tuple[str, NamespacedObject]] = field(default_factory=list)

    @property
    def changed_grants(self) -> list[Grant]:
        return [grant for grant in self.grants if grant.changed]


# Platform users


def fetch_users(settings: Settings, secrets: PlatformSecrets, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Fetch every platform user from admin_api ``GET /api/v1/users``, page by page, as the registry service.

    Raises ``RegsandboxError`` (ADMIN_API_UNAVAILABLE, ADMIN_API_REQUEST_FAILED) rather than return a
    partial list, because a user missing from the list would lose its MLflow user.
    """
    return fetch_all_users(settings.admin_api_url, secrets.service_token, "registry", timeout=timeout)


def institution_codes(users: list[dict[str, Any]]) -> set[str]:
    """Return the valid institution codes of the users who belong to an institution (modellers, reporters)."""
    codes = set()
    for user in users:
        code = user.get("institution_code")
        if user.get("role") not in INSTITUTION_ROLES or not code:
            continue
        if not INSTITUTION_CODE.match(str(code)):
            log.warning("ignoring invalid institution code %r of user %r", code, user.get("username"))
            continue
        codes.add(str(code))
    return codes


def _wants_mlflow_user(user: dict[str, Any]) -> bool:
    if not user.get("is_active"):
        return False
    if user.get("role") == MODELLER:
        return bool(INSTITUTION_CODE.match(str(user.get("institution_code") or "")))
    return user.get("role") == REGULATOR


# Sync state


def _state_path(settings: Settings) -> Path:
    return settings.mlflow_dir / "sync_state.json"


def _load_state(settings: Settings) -> dict[str, dict[str, Any]]:
    path = _state_path(settings)
    if not path.exists():
        return {"adopted": {}, "quarantined": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        # Without the state the sync cannot tell which objects are quarantined, so it stops.
        raise RegsandboxError(
            "SYNC_STATE_INVALID",
            f"权限同步状态文件 {path} 无法读取（{type(error).__name__}）。请从备份恢复该文件后重试。不要直接删除它：删除后，建立者已被删除的隔离对象会被解除隔离。",
            status=500,
        ) from error
    return {"adopted": dict(state.get("adopted", {})), "quarantined": dict(state.get("quarantined", {}))}


def _save_state(settings: Settings, state: dict[str, dict[str, Any]]) -> None:
    data = json.dumps(state, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
    write_private_file(_state_path(settings), data)


# Objects and who holds grants on them


def namespaced_objects(
    experiments: list[dict[str, Any]], models: list[dict[str, Any]], institutions: set[str]
) -> list[NamespacedObject]:
    """Return the experiments and registered models whose name starts with a known institution code."""
    objects = []
    for experiment in experiments:
        code, separator, _ = str(experiment["name"]).partition("/")
        if separator and code in institutions:
            objects.append(
                NamespacedObject(RESOURCE_EXPERIMENT, str(experiment["experiment_id"]), experiment["name"], code)
            )
    for model in models:
        code, separator, _ = str(model["name"]).partition(".")
        if separator and code in institutions:
            objects.append(NamespacedObject(RESOURCE_REGISTERED_MODEL, model["name"], model["name"], code))
    return objects


def _holders_by_resource(admin: MlflowAdmin, usernames: list[str]) -> dict[str, dict[str, str]]:
    """Map ``<resource_type>:<resource_id>`` to ``{username: permission}`` over the given users."""
    holders: dict[str, dict[str, str]] = {}
    for username in usernames:
        for row in admin.list_user_permissions(username):
            key = f"{row.get('resource_type')}:{row.get('resource_pattern')}"
            holders.setdefault(key, {})[username] = str(row.get("permission"))
    return holders


def _outsiders(
    obj: NamespacedObject, holders: dict[str, str], platform_users: dict[str, dict[str, Any]]
) -> dict[str, str]:
    """Return the holders of grants on ``obj`` that the rules do not allow."""
    outsiders = {}
    for username, permission in holders.items():
        if username == ADMIN_USERNAME:
            continue
        user = platform_users.get(username)
        if user is not None and user.get("institution_code") == obj.institution:
            continue
        if user is not None and user.get("role") == REGULATOR and permission == "READ":
            continue
        outsiders[username] = permission
    return outsiders


# The sync


def sync_permissions(
    settings: Settings, secrets: PlatformSecrets, users: list[dict[str, Any]] | None = None
) -> SyncReport:
    """Bring MLflow's users and grants in line with the platform users (see the module docstring).

    ``users`` are admin_api user records ``{username, role, institution_code, is_active, email}``;
    when None they are fetched from admin_api. Raises ``RegistryUnavailable`` when MLflow cannot
    be reached and a ``RegsandboxError`` when admin_api cannot.
    """
    if users is None:
        users = fetch_users(settings, secrets)
    platform_users = {str(user["username"]): user for user in users}
    institutions = institution_codes(users)
    report = SyncReport()
    state = _load_state(settings)

    with MlflowAdmin(settings.mlflow_url, ADMIN_USERNAME, secrets.mlflow_admin_password) as admin:
        # Each removed user's grants are read before it is deleted, so a removed outsider still
        # quarantines the objects it created.
        mlflow_usernames = [user["username"] for user in admin.list_users()]
        holders = _remove_unwanted_users(admin, platform_users, mlflow_usernames, report)
        removed = set(report.users_removed)
        remaining = [username for username in mlflow_usernames if username not in removed]

        for code in sorted(institutions):
            report.sandbox_experiments[code] = admin.get_or_create_experiment(f"{code}/{SANDBOX_EXPERIMENT}")
        for key, granted in _holders_by_resource(admin, remaining).items():
            holders.setdefault(key, {}).update(granted)
        objects = namespaced_objects(admin.list_experiments(), admin.list_registered_models(), institutions)
        _classify_objects(admin, objects, holders, platform_users, state, report, removed)
        _save_state(settings, state)

        _create_users(admin, secrets, platform_users, remaining, report)
        _grant_adopted(admin, objects, holders, platform_users, state, report)

    log.info(
        "permission sync done: %d users, %d removed, %d grants changed, %d objects quarantined",
        len(report.users_synced),
        len(report.users_removed),
        len(report.changed_grants),
        len(state["quarantined"]),
    )
    return report


def _classify_objects(
    admin: MlflowAdmin,
    objects: list[NamespacedObject],
    holders: dict[str, dict[str, str]],
    platform_users: dict[str, dict[str, Any]],
    state: dict[str, dict[str, Any]],
    report: SyncReport,
    removed: set[str],
) -> None:
    """Quarantine new objects that outsiders hold grants on, and revoke outsiders' grants on adopted ones.

    Users in ``removed`` were deleted earlier in this run: their grants still count for quarantine
    but went with the user, so nothing is revoked for them.
    """
    for obj in objects:
        outsiders = _outsiders(obj, holders.get(obj.key, {}), platform_users)
        if obj.key in state["quarantined"]:
            report.quarantined.append(obj)
            continue
        if obj.key in state["adopted"]:
            for username in sorted(set(outsiders) - removed):
                log.warning(
                    "revoking %s of %r on %s %r of institution %s: the user is outside the institution",
                    outsiders[username], username, obj.resource_type, obj.name, obj.institution,
                )
                if obj.resource_type == RESOURCE_EXPERIMENT:
                    admin.revoke_experiment(username, obj.resource_id)
                else:
                    admin.revoke_registered_model(username, obj.resource_id)
                report.revoked.append((username, obj))
            continue
        if outsiders:
            log.warning(
                "quarantined %s %r in the namespace of %s: held by %s outside the institution; no grants are made",
                obj.resource_type, obj.name, obj.institution, sorted(outsiders),
            )
            state["quarantined"][obj.key] = {"name": obj.name, "institution": obj.institution, "holders": outsiders}
            report.quarantined.append(obj)
            continue
        state["adopted"][obj.key] = {"name": obj.name, "institution": obj.institution}


def _remove_unwanted_users(
    admin: MlflowAdmin,
    platform_users: dict[str, dict[str, Any]],
    mlflow_usernames: list[str],
    report: SyncReport,
) -> dict[str, dict[str, str]]:
    """Delete the MLflow users of platform users that the rules do not want; return the grants they held.

    The grants are returned as :func:`_holders_by_resource` maps them, read just before each deletion.
    """
    holders: dict[str, dict[str, str]] = {}
    for username in mlflow_usernames:
        user = platform_users.get(username)
        if username == ADMIN_USERNAME or user is None or _wants_mlflow_user(user):
            continue
        for key, granted in _holders_by_resource(admin, [username]).items():
            holders.setdefault(key, {}).update(granted)
        admin.delete_user(username)
        log.info("deleted MLflow user %r (active=%s, role %s)", username, user.get("is_active"), user.get("role"))
        report.users_removed.append(username)
    return holders


def _create_users(
    admin: MlflowAdmin,
    secrets: PlatformSecrets,
    platform_users: dict[str, dict[str, Any]],
    mlflow_usernames: list[str],
    report: SyncReport,
) -> None:
    """Create the MLflow users the rules want that do not exist yet; existing ones keep their password."""
    existing = set(mlflow_usernames)
    for username, user in sorted(platform_users.items()):
        if not _wants_mlflow_user(user):
            continue
        if username not in existing:
            admin.create_user(username, mlflow_password(secrets, username))
            log.info("created MLflow user %r (%s)", username, user.get("role"))
        report.users_synced.append(username)

    for username in mlflow_usernames:
        if username != ADMIN_USERNAME and username not in platform_users:
            log.warning("MLflow user %r is not a platform user; left unchanged and treated as an outsider", username)


def _grant_adopted(
    admin: MlflowAdmin,
    objects: list[NamespacedObject],
    holders: dict[str, dict[str, str]],
    platform_users: dict[str, dict[str, Any]],
    state: dict[str, dict[str, Any]],
    report: SyncReport,
) -> None:
    """Grant MANAGE to the institution's modellers and READ to regulators on every adopted object."""
    active = [user for user in platform_users.values() if _wants_mlflow_user(user)]
    regulators = sorted(str(user["username"]) for user in active if user["role"] == REGULATOR)
    for obj in objects:
        if obj.key not in state["adopted"]:
            continue
        modellers = sorted(
            str(user["username"])
            for user in active
            if user["role"] == MODELLER and user.get("institution_code") == obj.institution
        )
        expected_grants = [(name, "MANAGE") for name in modellers] + [(name, "READ") for name in regulators]
        for username, permission in expected_grants:
            current = holders.get(obj.key, {}).get(username)
            changed = admin.grant(username, obj.resource_type, obj.resource_id, permission, current=current)
            if changed:
                log.info("granted %s on %s %r to %r", permission, obj.resource_type, obj.name, username)
            else:
                log.debug("kept %s on %s %r for %r", permission, obj.resource_type, obj.name, username)
            report.grants.append(Grant(username, obj.resource_type, obj.resource_id, obj.name, permission, changed))


# Command line


def main(argv: list[str] | None = None) -> int:
    """Run the sync once, or every ``--loop`` seconds for at most ``--max-runs`` runs."""
    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="python -m model_registry.sync", description="按平台用户与机构同步 MLflow 用户和权限。"
    )
    parser.add_argument(
        "--loop", type=float, nargs="?", const=settings.registry_sync_seconds, metavar="SECONDS",
        help="每隔 SECONDS 秒同步一次；只写 --loop 时取 REGSANDBOX_REGISTRY_SYNC_SECONDS"
        f"（当前 {settings.registry_sync_seconds} 秒）；不指定时只同步一次。",
    )
    parser.add_argument(
        "--max-runs", type=int, default=10_000_000,
        help="循环模式下最多同步的次数，达到后正常退出（默认 10000000，按 15 秒间隔约合 4.7 年）。",
    )
    args = parser.parse_args(argv)
    if args.loop is not None and args.loop <= 0:
        parser.error(f"--loop 必须为正数（秒），收到 {args.loop}。")
    if args.max_runs <= 0:
        parser.error(f"--max-runs 必须为正整数，收到 {args.max_runs}。")

    configure_logging()
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        log.info("received signal %d, stopping after the current run", signum)

    signal.signal(signal.SIGTERM, _stop)

    # Without the master key nothing can be synced, so refuse to start instead of failing every run.
    try:
        load_platform_secrets(settings)
    except ConfigurationError as error:
        log.error("registry sync not started: %s", error.code)
        print(error.message, file=sys.stderr)
        return 2

    runs = 1 if args.loop is None else args.max_runs
    if args.loop is not None:
        log.info("registry sync started: every %.1f s", args.loop)
    failed = False
    directory: UserDirectory | None = None
    for run in range(runs):
        started = time.monotonic()
        try:
            platform_secrets = load_platform_secrets(settings)
            if directory is None or directory.service_token != platform_secrets.service_token:
                directory = UserDirectory(settings.admin_api_url, platform_secrets.service_token, "registry")
            sync_permissions(settings, platform_secrets, list(directory.refresh().values()))
            failed = False
        except RegsandboxError as error:
            failed = True
            log.error("permission sync failed: %s", error.code)
            print(error.message, file=sys.stderr)
        if stopping or run == runs - 1:
            break
        elapsed = time.monotonic() - started
        if elapsed > args.loop:
            log.warning("permission sync run took %.1f s, longer than the interval of %.1f s", elapsed, args.loop)
        # Runs start every --loop seconds (not --loop seconds after the previous run ended), so a
        # slow run does not stretch the time in which a disabled user keeps MLflow access.
        deadline = started + args.loop
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
