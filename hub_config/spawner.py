"""Spawner that starts each modeller's sandbox as a Unix user of the modeller's institution.

When the hub runs as root, a modeller ``alice`` of institution ``bank_a`` gets the Unix user
``rs-alice`` whose primary group is ``rs-bank_a`` (prefix from ``REGSANDBOX_UNIX_PREFIX``), a
home of mode 0700, and read access to ``<data_dir>/extracts/bank_a`` (root:rs-bank_a 0750) only.
The operating system then keeps institutions apart, whatever code runs in the notebooks.

Without root the servers run as the hub's own Unix user and institutions are NOT isolated.
The spawner logs a warning on every start in that mode.

Before anything is prepared, :func:`check_published_extract` verifies the institution's published
extract: the SM2 signature of its manifest against ``extracts/platform_signing_keys.json`` and,
by default, the SM3 digest of every table file. An extract that does not verify refuses the
start with a Chinese message and a ``sandbox.spawn`` audit event with outcome ``denied`` and code
``EXTRACT_MANIFEST_INVALID``. An institution without a published extract is allowed to start,
because a new institution has no data yet, and the kernel helper then reports ``EXTRACT_DIR_MISSING``
in the notebook.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import re
import stat
import subprocess
import threading
from pathlib import Path

import httpx
from jupyterhub.spawner import LocalProcessSpawner, SpawnException, set_user_setuid
from traitlets import Bool, Float, List, Unicode, default

from hub_config.authenticator import service_headers
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.secrets import PlatformSecrets, load_platform_secrets, mlflow_password
from regsandbox_core.settings import PROJECT_ROOT, Settings, get_settings
from regsandbox_kernel.extract import TRUSTED_KEYS_NAME, verify_extract

_INSTITUTION_CODE = re.compile(r"^[a-z][a-z0-9_]{1,31}$")
_UNIX_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_NOLOGIN_SHELL = "/usr/sbin/nologin"

MESSAGE_ROLE_DENIED = "仅建模人员可以启动建模沙箱"
MESSAGE_NO_ACCOUNT_STATE = "未找到您的角色信息，请退出后重新登录再启动建模沙箱。"
EXTRACT_INVALID_CODE = "EXTRACT_MANIFEST_INVALID"
AUDIT_MESSAGE_MAX = 1500
"""Characters of a refusal message kept in the audit detail, which admin_api limits to 4,000."""

# Unix users and groups are created by one spawn at a time, so two modellers of one
# institution starting together do not both run groupadd for the same group.
_PROVISION_LOCK = threading.Lock()


_SECRETS_CACHE: dict[Path, PlatformSecrets] = {}


def _platform_secrets(settings: Settings) -> PlatformSecrets:
    """Return the platform secrets, read once per secrets folder (Settings is not hashable)."""
    if settings.secrets_dir not in _SECRETS_CACHE:
        _SECRETS_CACHE[settings.secrets_dir] = load_platform_secrets(settings)
    return _SECRETS_CACHE[settings.secrets_dir]


def check_published_extract(settings: Settings, institution_code: str, *, tables: bool = True) -> str | None:
    """Verify the published extract of ``institution_code``; return its build folder name, or None when none exists.

    ``extracts/<code>`` that does not exist at all means nothing is published yet. A link that
    exists but leads nowhere, or a folder that does not verify, raises the RegsandboxError of
    :func:`regsandbox_kernel.verify_extract`. ``tables`` also compares every table file with its
    SM3 digest, which reads the whole extract once.
    """
    link = settings.extracts_dir / institution_code
    if not os.path.lexists(link):
        return None
    verify_extract(link, institution_code, settings.extracts_dir / TRUSTED_KEYS_NAME, tables=tables)
    return Path(os.path.realpath(link)).name


def extract_refusal(institution_code: str, error: RegsandboxError) -> tuple[SpawnException, str]:
    """Return the SpawnException shown to the modeller and the JSON audit detail for an extract that does not verify."""
    message = (
        f"机构 {institution_code} 的数据提取未通过完整性校验，为防止使用被篡改或不完整的数据，已拒绝启动建模沙箱。"
        f"原因：{error.message} 请联系系统管理员重新生成本机构的数据提取后再启动。"
    )
    detail = json.dumps(
        {"code": EXTRACT_INVALID_CODE, "cause": error.code, "institution": institution_code,
         "message": error.message[:AUDIT_MESSAGE_MAX]},
        ensure_ascii=False,
    )
    return SpawnException(message, reason="extract_invalid", status_code=500), detail


async def post_spawn_audit(spawner, admin_api_url: str, timeout: float, outcome: str, role: str | None,
                           institution_code: str | None, detail: str) -> None:
    """Send a ``sandbox.spawn`` audit event of ``spawner``'s user to admin_api.

    A failed post is logged, not raised, so it never changes whether the sandbox starts.
    """
    event = {
        "actor": spawner.user.name,
        "role": role,
        "action": "sandbox.spawn",
        "resource": f"sandbox:{spawner.user.name}",
        "outcome": outcome,
        "institution_code": institution_code,
        "detail": detail,
    }
    if getattr(spawner, "handler", None) is not None:
        event["source_ip"] = spawner.handler.request.remote_ip
    url = f"{admin_api_url.rstrip('/')}/api/v1/audit/events"
    try:
        secrets = _platform_secrets(get_settings())
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.post(url, json=event, headers=service_headers(secrets.service_token))
        response.raise_for_status()
    except Exception as error:
        spawner.log.error("Could not store audit event %s/%s for %s: %s", "sandbox.spawn", outcome, spawner.user.name,
                          error)


class InstitutionSpawner(LocalProcessSpawner):
    """LocalProcessSpawner that allows modellers only and runs each as its own Unix user.

    ``start`` reads the role and institution from the auth state written by
    :class:`hub_config.authenticator.AdminApiAuthenticator`, rejects other roles with HTTP
    403, prepares the Unix user, group, home and extract permissions when the hub is root,
    checks that the sandbox interpreter can run as that user and then starts
    ``jupyterhub-singleuser`` of the sandbox interpreter.
    """

    spawn_roles = List(
        Unicode(),
        default_value=["modeller"],
        help="""Role codes of admin_api that may start a sandbox. Every other role gets HTTP 403.

        Default ``["modeller"]``. Example: ``c.InstitutionSpawner.spawn_roles = ["modeller"]``.
        """,
    ).tag(config=True)

    unix_prefix = Unicode(
        help="""Prefix of the Unix users and groups created for modellers and institutions.

        Default: ``REGSANDBOX_UNIX_PREFIX`` (``rs-``). The user of modeller ``alice`` is
        ``<prefix>alice``, the group of institution ``bank_a`` is ``<prefix>bank_a``.
        """,
    ).tag(config=True)

    @default("unix_prefix")
    def _default_unix_prefix(self) -> str:
        return get_settings().unix_prefix

    sandbox_home_root = Unicode(
        help="""Folder under which sandbox Unix users get their home, created with mode 0700.

        Default: ``REGSANDBOX_SANDBOX_HOME_ROOT`` (``/home``). Used only when the hub runs as root.
        """,
    ).tag(config=True)

    @default("sandbox_home_root")
    def _default_sandbox_home_root(self) -> str:
        return str(get_settings().sandbox_home_root)

    sandbox_python = Unicode(
        help="""Interpreter of the sandbox runtime. Servers start ``<its bin>/jupyterhub-singleuser``.

        Default: ``REGSANDBOX_SANDBOX_PYTHON``. Every sandbox Unix user must be able to execute
        it, so it must not live under a mode 0700 folder such as ``/root``.
        """,
    ).tag(config=True)

    @default("sandbox_python")
    def _default_sandbox_python(self) -> str:
        return str(get_settings().sandbox_python)

    admin_api_url = Unicode(
        help="""Base URL of admin_api, to which denied and allowed spawns are sent as audit events.

        Default: ``http://<REGSANDBOX_HOST>:<REGSANDBOX_ADMIN_API_PORT>``.
        """,
    ).tag(config=True)

    @default("admin_api_url")
    def _default_admin_api_url(self) -> str:
        return get_settings().admin_api_url

    mlflow_url = Unicode(
        help="""MLflow tracking URI given to sandboxes as ``MLFLOW_TRACKING_URI``.

        Default: ``http://<REGSANDBOX_HOST>:<REGSANDBOX_MLFLOW_PORT>``.
        """,
    ).tag(config=True)

    @default("mlflow_url")
    def _default_mlflow_url(self) -> str:
        return get_settings().mlflow_url

    sync_mlflow_permissions = Bool(
        True,
        help="""Call ``model_registry.sync.sync_permissions`` before each start, when that module exists.

        A failing sync is logged and the sandbox starts anyway. Default True.
        """,
    ).tag(config=True)

    mlflow_sync_timeout = Float(
        20.0,
        help="""Seconds a start waits for the MLflow permission sync before it goes on without it. Default 20.""",
    ).tag(config=True)

    audit_timeout = Float(
        5.0,
        help="Seconds to wait for admin_api to store an audit event. A failed post is logged, not fatal. Default 5.",
    ).tag(config=True)

    verify_extract_tables = Bool(
        True,
        help="""Before each start, also compare every table file of the institution's extract with its SM3 digest.

        The SM2 signature of the manifest is verified on every start in any case. This adds one
        read of the whole extract. Default True. Example:
        ``c.InstitutionSpawner.verify_extract_tables = False`` for extracts too large to read at each start.
        """,
    ).tag(config=True)

    interpreter_probe_timeout = Float(
        60.0,
        help="""Seconds that the check "can the sandbox user run the interpreter" may take. Default 60.""",
    ).tag(config=True)

    starter_notebooks = Unicode(
        str(PROJECT_ROOT / "notebooks" / "starter"),
        help="""Folder of example notebooks copied into each new sandbox as ``<home>/starter/``.

        Files already in the home are never overwritten, so a modeller's edits survive restarts.
        Default: ``<checkout>/notebooks/starter``. An empty string copies nothing.
        """,
    ).tag(config=True)

    @default("cmd")
    def _default_cmd(self) -> list[str]:
        return [str(Path(self.sandbox_python).parent / "jupyterhub-singleuser")]

    @default("args")
    def _default_args(self) -> list[str]:
        # One kernel in the launcher: "Python 3 (监管沙箱)", which new notebooks get by default.
        return [
            "--KernelSpecManager.allowed_kernelspecs=regsandbox",
            "--MappingKernelManager.default_kernel_name=regsandbox",
        ]

    @default("default_url")
    def _default_default_url(self) -> str:
        return "/lab"

    @default("env_keep")
    def _env_keep_default(self) -> list[str]:
        # PATH, PYTHONPATH and VIRTUAL_ENV of the hub must not leak into sandboxes:
        # user_env sets PATH to the sandbox runtime itself.
        return ["LANG", "LC_ALL", "TZ"]

    # Values of the spawn in progress, set by start() before LocalProcessSpawner.start runs.
    _unix_user: str | None = None
    _home: str | None = None
    _institution_code: str | None = None
    _role: str | None = None

    @property
    def platform_settings(self) -> Settings:
        return get_settings()

    @property
    def isolated(self) -> bool:
        """True when the hub is root and servers run as per-user Unix accounts."""
        return os.geteuid() == 0

    def unix_user_name(self) -> str:
        return f"{self.unix_prefix}{self.user.name}"

    def unix_group_name(self, institution_code: str) -> str:
        return f"{self.unix_prefix}{institution_code}"

    def extract_dir(self, institution_code: str) -> Path:
        return self.platform_settings.extracts_dir / institution_code

    async def start(self):
        """Check the role, prepare the Unix account and start the single-user server."""
        account = await self._account()
        role = account.get("role")
        institution_code = account.get("institution_code")

        if role not in self.spawn_roles:
            self.log.warning("Rejecting spawn of %s: role %r may not start a sandbox", self._log_name, role)
            await self._post_audit("denied", role, institution_code, f"角色 {role} 无权启动建模沙箱")
            raise SpawnException(MESSAGE_ROLE_DENIED, reason="role_denied", status_code=403)
        if not institution_code or not _INSTITUTION_CODE.match(institution_code):
            self.log.error("Rejecting spawn of %s: invalid institution code %r", self._log_name, institution_code)
            raise SpawnException(
                f"账号的机构代码 {institution_code!r} 无效，无法启动建模沙箱。请联系系统管理员核对账号所属机构。",
                reason="invalid_institution",
                status_code=403,
            )
        self._institution_code = institution_code
        self._role = role

        # A tampered or incomplete extract must not reach a sandbox, so it is checked before anything is prepared.
        build = await self.check_extract(role, institution_code)

        # Unix account, home and extract permissions: blocking commands, run off the event loop.
        if self.isolated:
            self._unix_user, self._home = await asyncio.to_thread(self._provision_unix_account, institution_code)
        else:
            self.log.warning(
                "Hub is not running as root: %s runs as Unix user %s and institutions are NOT isolated",
                self._log_name,
                pwd.getpwuid(os.geteuid()).pw_name,
            )
            self._unix_user = pwd.getpwuid(os.geteuid()).pw_name
            self._home = await asyncio.to_thread(self._shared_home)

        await asyncio.to_thread(self._check_interpreter)
        await asyncio.to_thread(self._copy_starter_notebooks)
        if self.sync_mlflow_permissions:
            try:
                await asyncio.wait_for(asyncio.to_thread(self._sync_mlflow_permissions), self.mlflow_sync_timeout)
            except TimeoutError:
                # The sync goes on in its thread; the sandbox starts without waiting for it.
                self.log.warning(
                    "MLflow permission sync for %s takes longer than %s s; starting without waiting",
                    self._log_name,
                    self.mlflow_sync_timeout,
                )

        try:
            address = await super().start()
        except Exception as error:
            await self._post_audit("failed", role, institution_code, f"启动建模沙箱失败：{type(error).__name__}")
            raise
        extract_note = f"数据提取 {build} 已通过签名校验" if build else "本机构尚无数据提取"
        await self._post_audit("success", role, institution_code,
                               f"以 Unix 用户 {self._unix_user} 启动建模沙箱；{extract_note}")
        return address

    async def check_extract(self, role: str | None, institution_code: str) -> str | None:
        """Verify the institution's published extract; return its build folder name, or None when none is published.

        When it does not verify, posts a ``denied`` ``sandbox.spawn`` event with code
        ``EXTRACT_MANIFEST_INVALID`` and the verifier's code as ``cause``, then raises SpawnException (500).
        """
        try:
            return await asyncio.to_thread(
                check_published_extract, self.platform_settings, institution_code, tables=self.verify_extract_tables
            )
        except RegsandboxError as error:
            self.log.error("Rejecting spawn of %s: extract of %s does not verify: %s", self._log_name, institution_code,
                           error.code)
            refusal, detail = extract_refusal(institution_code, error)
            await self._post_audit("denied", role, institution_code, detail)
            raise refusal from error

    def get_state(self):
        """Add the role and institution the server was started for, which the user sync compares with admin_api."""
        state = super().get_state()
        if self._institution_code:
            state["institution_code"] = self._institution_code
        if self._role:
            state["role"] = self._role
        return state

    def load_state(self, state):
        super().load_state(state)
        self._institution_code = state.get("institution_code")
        self._role = state.get("role")

    def clear_state(self):
        super().clear_state()
        self._institution_code = None
        self._role = None

    async def _account(self) -> dict:
        auth_state = await self.user.get_auth_state()
        if not auth_state or "role" not in auth_state:
            self.log.warning("Rejecting spawn of %s: no role in auth state", self._log_name)
            raise SpawnException(MESSAGE_NO_ACCOUNT_STATE, reason="no_auth_state", status_code=403)
        return auth_state

    def _provision_unix_account(self, institution_code: str) -> tuple[str, str]:
        """Create or repair the Unix group, user and home; return (user name, home)."""
        user_name = self.unix_user_name()
        group_name = self.unix_group_name(institution_code)
        for name in (user_name, group_name):
            if not _UNIX_NAME.match(name):
                raise SpawnException(
                    f"Unix 名称 {name!r} 无效（只能含小写字母、数字、下划线、点和连字符，最长 32 个字符），"
                    "无法启动建模沙箱。请联系系统管理员修改用户名或 REGSANDBOX_UNIX_PREFIX。",
                    reason="invalid_unix_name",
                    status_code=400,
                )

        with _PROVISION_LOCK:
            group = self._ensure_group(group_name)
            account = self._ensure_user(user_name, group)
            self._ensure_home(account)
        self._apply_extract_permissions(institution_code, group.gr_gid)
        return user_name, account.pw_dir

    def _ensure_group(self, group_name: str) -> grp.struct_group:
        try:
            return grp.getgrnam(group_name)
        except KeyError:
            pass
        self.log.info("Creating Unix group %s", group_name)
        _run_admin_command(["groupadd", group_name])
        return grp.getgrnam(group_name)

    def _ensure_user(self, user_name: str, group: grp.struct_group) -> pwd.struct_passwd:
        try:
            account = pwd.getpwnam(user_name)
        except KeyError:
            home = str(Path(self.sandbox_home_root) / user_name)
            self.log.info("Creating Unix user %s (group %s, home %s)", user_name, group.gr_name, home)
            _run_admin_command(
                [
                    "useradd",
                    "--no-create-home",
                    "--home-dir",
                    home,
                    "--gid",
                    group.gr_name,
                    "--shell",
                    _NOLOGIN_SHELL,
                    "--comment",
                    f"regsandbox sandbox of {self.user.name}",
                    user_name,
                ]
            )
            return pwd.getpwnam(user_name)

        if account.pw_uid == 0:
            raise SpawnException(
                f"Unix 用户 {user_name} 是 root 账号，不能用于建模沙箱。请联系系统管理员。",
                reason="root_unix_user",
                status_code=500,
            )
        if account.pw_gid != group.gr_gid:
            # The modeller moved to another institution: the primary group follows.
            self.log.warning("Moving Unix user %s to primary group %s", user_name, group.gr_name)
            _run_admin_command(["usermod", "--gid", group.gr_name, user_name])
            account = pwd.getpwnam(user_name)
        if os.getgrouplist(user_name, account.pw_gid) != [account.pw_gid]:
            # A supplementary group (for example another institution's) would widen what the sandbox reads.
            self.log.warning("Removing supplementary groups of Unix user %s", user_name)
            _run_admin_command(["usermod", "--groups", "", user_name])
        return account

    def _ensure_home(self, account: pwd.struct_passwd) -> None:
        home = Path(account.pw_dir)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = home.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (0, account.pw_uid):
            raise SpawnException(
                f"主目录 {home} 不是目录或属于其他用户，无法启动建模沙箱。请联系系统管理员。",
                reason="home_conflict",
                status_code=500,
            )
        os.chown(home, account.pw_uid, account.pw_gid, follow_symlinks=False)
        os.chmod(home, 0o700)

    def _apply_extract_permissions(self, institution_code: str, gid: int) -> None:
        """Make the institution's extract root:<group> 0750 (files 0640) and its parent traversable."""
        link = self.extract_dir(institution_code)
        # The published extract is a symlink to its current build (extracts/<code>.builds/<id>),
        # so the build folder itself and every folder on the way to it must be fixed.
        extract = Path(os.path.realpath(link))
        for parent in dict.fromkeys([link.parent, extract.parent]):
            if parent.is_dir() and not parent.stat().st_mode & stat.S_IXOTH:
                os.chmod(parent, stat.S_IMODE(parent.stat().st_mode) | 0o711)
        if not extract.is_dir():
            self.log.warning("Extract folder %s of institution %s does not exist yet", extract, institution_code)
            return

        for folder, subfolders, files in os.walk(extract):
            os.chown(folder, 0, gid, follow_symlinks=False)
            os.chmod(folder, 0o750)
            for name in files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    continue
                os.chown(path, 0, gid, follow_symlinks=False)
                os.chmod(path, 0o640)

        data_dir = self.platform_settings.data_dir
        if not data_dir.stat().st_mode & stat.S_IXOTH:
            self.log.warning(
                "Data directory %s is not traversable by other users (expected mode 0711): "
                "sandbox users cannot reach their extract",
                data_dir,
            )

    def _shared_home(self) -> str:
        home = self.platform_settings.hub_dir / "homes" / self.user.name
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return str(home)

    def _check_interpreter(self) -> None:
        """Raise SpawnException unless the sandbox user can run the sandbox interpreter."""
        python = self.sandbox_python
        singleuser = self.cmd[0]
        for program in (python, singleuser):
            if not os.path.isfile(program):
                raise SpawnException(
                    f"建模沙箱运行环境缺少程序 {program}，无法启动。请联系系统管理员检查 REGSANDBOX_SANDBOX_PYTHON。",
                    reason="interpreter_missing",
                    status_code=500,
                )
        if not self.isolated:
            if not os.access(python, os.X_OK):
                raise SpawnException(self._interpreter_message(), reason="interpreter_denied", status_code=500)
            return

        # Run the interpreter as the sandbox user: this covers every folder on the path,
        # symlinks, ACLs and the readability of its site-packages.
        try:
            probe = subprocess.run(
                [python, "-I", "-c", "import jupyterhub"],
                preexec_fn=set_user_setuid(self._unix_user),
                env={"PATH": "/usr/bin:/bin", "HOME": self._home},
                capture_output=True,
                timeout=self.interpreter_probe_timeout,
            )
        except (PermissionError, subprocess.SubprocessError) as error:
            self.log.error("Unix user %s cannot run %s: %s", self._unix_user, python, error)
            raise SpawnException(self._interpreter_message(), reason="interpreter_denied", status_code=500) from error
        if probe.returncode != 0:
            self.log.error(
                "Unix user %s cannot import jupyterhub with %s (exit %s): %s",
                self._unix_user,
                python,
                probe.returncode,
                probe.stderr.decode("utf-8", "replace")[-500:],
            )
            raise SpawnException(self._interpreter_message(), reason="interpreter_denied", status_code=500)

    def _interpreter_message(self) -> str:
        return (
            f"建模沙箱用户 {self._unix_user} 无法运行沙箱解释器 {self.sandbox_python}。"
            "请联系系统管理员：解释器及其所在的每一级目录都必须允许其他用户执行（例如不能位于权限为 0700 的 /root 下），"
            "可通过 REGSANDBOX_SANDBOX_PYTHON 指定位于 /opt 或 /usr 下的解释器。"
        )

    def _copy_starter_notebooks(self) -> None:
        """Copy the example notebooks into ``<home>/starter`` without overwriting the modeller's files.

        The copy runs as the sandbox user, so a symlink the user placed in their home cannot
        make root write outside it.
        """
        source = Path(self.starter_notebooks)
        if not self.starter_notebooks or not source.is_dir():
            return
        command = ["cp", "-r", "--no-clobber", "--no-preserve=mode,ownership", f"{source}/.", f"{self._home}/starter/"]
        if self.isolated:
            prepare = ["runuser", "-u", self._unix_user, "--", "mkdir", "-p", f"{self._home}/starter"]
            command = ["runuser", "-u", self._unix_user, "--", *command]
        else:
            prepare = ["mkdir", "-p", f"{self._home}/starter"]
        for step in (prepare, command):
            result = subprocess.run(step, capture_output=True, text=True, timeout=60, cwd="/")
            if result.returncode != 0:
                # The sandbox is still usable without the examples; log and go on.
                self.log.warning("Copying starter notebooks for %s failed: %s", self._log_name, result.stderr.strip())
                return

    def _sync_mlflow_permissions(self) -> None:
        try:
            from model_registry.sync import sync_permissions
        except ImportError:
            self.log.debug("model_registry.sync is not available; skipping MLflow permission sync")
            return
        try:
            sync_permissions(self.platform_settings, _platform_secrets(self.platform_settings))
        except RegsandboxError as error:
            self.log.error("MLflow permission sync before starting %s failed; starting anyway: %s", self._log_name, error)
        except Exception:
            self.log.exception("MLflow permission sync before starting %s failed; starting anyway", self._log_name)

    async def _post_audit(self, outcome: str, role: str | None, institution_code: str | None, detail: str) -> None:
        """Send a ``sandbox.spawn`` audit event (outcome ``success``, ``denied`` or ``failed``) to admin_api."""
        await post_spawn_audit(self, self.admin_api_url, self.audit_timeout, outcome, role, institution_code, detail)

    def make_preexec_fn(self, name):
        """Return the function that switches the server process to the sandbox Unix user.

        ``name`` is the hub user name, which differs from the Unix user name, so it is ignored.
        """
        if self.isolated:
            return set_user_setuid(self._unix_user)
        home = self._home

        def change_to_home() -> None:
            os.chdir(home)

        return change_to_home

    def user_env(self, env):
        """Add the sandbox's HOME, PATH, extract folder and MLflow credentials to ``env``.

        Only these values and the JUPYTERHUB_* variables of the base class reach the server:
        platform secrets such as the service token are never added.
        """
        bin_dir = str(Path(self.sandbox_python).parent)
        code = self._institution_code
        env.update(
            {
                "USER": self._unix_user,
                "LOGNAME": self._unix_user,
                "HOME": self._home,
                # The Unix account has no login shell; Jupyter terminals still need one.
                "SHELL": "/bin/bash",
                "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
                "REGSANDBOX_EXTRACT_DIR": str(self.extract_dir(code)),
                "REGSANDBOX_INSTITUTION": code,
                "MLFLOW_TRACKING_URI": self.mlflow_url,
                "MLFLOW_TRACKING_USERNAME": self.user.name,
                "MLFLOW_TRACKING_PASSWORD": mlflow_password(_platform_secrets(self.platform_settings), self.user.name),
                # Sandboxes have no route out; MLflow's usage telemetry would only time out.
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
            }
        )
        return env

    def get_env(self):
        env = super().get_env()
        secrets = _platform_secrets(self.platform_settings)
        forbidden = {
            secrets.service_token,
            secrets.session_secret,
            secrets.mlflow_flask_secret,
            secrets.mlflow_admin_password,
            secrets.derivation_key,
        }
        leaked = sorted(key for key, value in env.items() if value in forbidden)
        if leaked:
            # Reached only through a misconfigured Spawner.environment or env_keep.
            self.log.error("Removing platform secrets from the environment of %s: %s", self._log_name, leaked)
            for key in leaked:
                del env[key]
        return env


def _run_admin_command(command: list[str]) -> None:
    """Run a user-management command as root; raise SpawnException with its error output on failure."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SpawnException(
            f"创建建模沙箱的 Unix 账号失败（{command[0]}：{result.stderr.strip()}）。请联系系统管理员。",
            reason="unix_account_failed",
            status_code=500,
        )
