"""``regsandbox`` command line: ``init``, ``up``, ``down``, ``status``, ``verify``, ``keys`` (launcher.keys_cli),
``secrets`` (launcher.secrets_cli) and ``audit`` (launcher.audit_cli).

Messages for the operator are in Chinese; logs are in English.
"""

from __future__ import annotations

import argparse
import datetime
import grp
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher import audit_cli, keys_cli, secrets_cli
from launcher.processes import ProcessGroup, ProcessSpec, http_ok, pid_alive, port_is_open, read_pid, stop_process_group
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import KeyStore, KeyStoreError, master_key_from_environment
from regsandbox_core.logs import configure_logging
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import ensure_platform_secrets, write_private_file
from regsandbox_core.settings import PROJECT_ROOT, Settings, get_settings
from regsandbox_core.signing import (
    KIND_LABELS,
    SignatureInvalid,
    VerifiedFile,
    VerifiedObject,
    read_envelope,
    signature_path,
    verify_file,
    verify_object,
)

log = logging.getLogger("launcher")

VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")
SAMPLES_DIR = "samples"
"""Folder of the data directory with the demo report files of intake.samples, one subfolder per demo bank."""

# Start order matters: the hub authenticates against admin_api and the scheduler reads it,
# and the registry sync needs both admin_api and MLflow.
PROCESS_NAMES = ("smtp", "admin_api", "mlflow", "registry_sync", "hub", "scheduler")


class LaunchError(Exception):
    """A step of ``init`` or ``up`` failed; the message is for the operator (Chinese)."""


def _child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["REGSANDBOX_DATA_DIR"] = str(settings.data_dir)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_step(settings: Settings, description: str, argv: list[str]) -> str:
    """Run one initialisation command and return its stdout, or raise LaunchError naming its log."""
    log_path = settings.logs_dir / "init.log"
    result = subprocess.run(argv, env=_child_env(settings), cwd=PROJECT_ROOT, capture_output=True, text=True)
    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {' '.join(argv)}\n{result.stderr}\n")
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise LaunchError(f"{description}失败（退出码 {result.returncode}），详见 {log_path}：\n{tail}")
    return result.stdout


def prepare_data_dir(settings: Settings) -> None:
    """Create the data directory with its permissions (see docs/architecture.md)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Traversable but not listable, so sandbox users reach their own extract folder only.
    os.chmod(settings.data_dir, 0o711)
    for folder in (settings.secrets_dir, settings.keys_dir, settings.warehouse_dir, settings.mlflow_dir,
                   settings.hub_dir, settings.reports_dir, settings.mail_dir, settings.logs_dir, settings.run_dir):
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o700)
    settings.extracts_dir.mkdir(exist_ok=True)
    os.chmod(settings.extracts_dir, 0o711)


def sample_period(today: datetime.date) -> str:
    """Return the end of the month before ``today`` (YYYYMMDD), the period of the demo report files."""
    return (today.replace(day=1) - datetime.timedelta(days=1)).strftime("%Y%m%d")


def _institution_codes(settings: Settings) -> list[str]:
    """Return the institutions with demo partitions or accepted report data in the warehouse."""
    folders = list(settings.warehouse_dir.glob("applications/institution=*"))
    folders += settings.warehouse_dir.glob("intake/*/institution=*")
    return sorted({folder.name.split("=", 1)[1] for folder in folders if folder.is_dir()})


def _ensure_unix_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", name], check=True)
        log.info("created Unix group %s", name)


def _save_credentials(settings: Settings, created: dict[str, str]) -> None:
    path = settings.credentials_file
    known: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if "\t" in line and not line.startswith("#"):
                user, password = line.split("\t", 1)
                known[user] = password
    known.update(created)
    lines = ["# regsandbox 初始账号（用户名<TAB>密码）。请妥善保管，登录后及时修改密码。"]
    lines += [f"{user}\t{password}" for user, password in sorted(known.items())]
    write_private_file(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _ensure_keys(settings: Settings) -> None:
    """Create the master key, key store, platform signing key and token keys that are missing."""
    try:
        ensure_platform_keys(settings, _institution_codes(settings))
    except RegsandboxError as error:
        raise LaunchError(f"初始化密钥库失败：{error.message}（{error.code}）") from error


def init(settings: Settings) -> dict[str, str]:
    """Initialise the data directory idempotently; return the credentials of users created now."""
    prepare_data_dir(settings)
    try:
        ensure_platform_secrets(settings)
    except RegsandboxError as error:
        raise LaunchError(f"初始化平台密钥文件失败：{error.message}（{error.code}）") from error

    _run_step(settings, "数据库迁移", [PYTHON, "-m", "admin_api.manage", "migrate"])
    created = json.loads(_run_step(settings, "加载示范机构与用户", [PYTHON, "-m", "admin_api.manage", "seed-demo"]) or "{}")
    if created:
        _save_credentials(settings, created)

    if not any(settings.warehouse_dir.glob("applications/institution=*")):
        _run_step(settings, "加载示范信贷数据", [PYTHON, "-m", "extracts", "load-demo"])
    samples = settings.data_dir / SAMPLES_DIR
    if not samples.exists():
        from admin_api.seed import DEMO_LICENCES  # noqa: PLC0415 - keeps the CLI start light

        institutions = [f"--institution={code}:{licence}" for code, licence in DEMO_LICENCES.items()]
        _run_step(settings, "生成示范报表文件", [PYTHON, "-m", "intake.samples", "--out", str(samples),
                                          "--period", sample_period(datetime.date.today()), *institutions])
    _ensure_keys(settings)

    # Masking follows the data catalog: unconfirmed columns are masked at level 4 (fail closed). The
    # demo needs an approved policy, so the shipped default is approved here, audited as the system;
    # every build outcome is audited by admin_api.
    _run_step(settings, "同步数据目录", [PYTHON, "-m", "admin_api.manage", "catalog-sync"])
    _run_step(settings, "审批平台默认脱敏策略", [PYTHON, "-m", "admin_api.manage", "policy-approve-default"])
    build = [PYTHON, "-m", "admin_api.manage", "extracts-build"]
    if os.geteuid() == 0:
        for code in _institution_codes(settings):
            _ensure_unix_group(f"{settings.unix_prefix}{code}")
        build += ["--unix-group-prefix", settings.unix_prefix]
    _run_step(settings, "生成脱敏数据集", build)
    return created


def _process_specs(settings: Settings) -> list[ProcessSpec]:
    env = _child_env(settings)
    host = settings.host
    specs = []
    if settings.smtp_sink:
        specs.append(ProcessSpec(
            name="smtp", argv=[PYTHON, "-m", "reporting.smtp_sink"], env=env,
            ready=lambda: port_is_open(settings.smtp_host, settings.smtp_port),
            description="SMTP 邮件接收（本地）", url=f"smtp://{settings.smtp_host}:{settings.smtp_port}",
        ))
    specs += [
        ProcessSpec(
            name="admin_api",
            argv=[str(VENV_BIN / "uvicorn"), "admin_api.app:create_server_app", "--factory",
                  "--host", host, "--port", str(settings.admin_api_port), "--no-access-log"],
            env=env, cwd=PROJECT_ROOT, ready=http_ok(f"{settings.admin_api_url}/healthz"),
            description="管理服务与控制台", url=f"{settings.admin_api_url}/console/",
        ),
        ProcessSpec(
            name="mlflow", argv=[PYTHON, "-m", "model_registry.server"], env=env, cwd=settings.mlflow_dir,
            ready=http_ok(f"{settings.mlflow_url}/health"), ready_timeout=120,
            description="MLflow 模型注册中心", url=settings.mlflow_url,
        ),
        ProcessSpec(
            name="registry_sync", argv=[PYTHON, "-m", "model_registry.sync", "--loop"], env=env,
            ready=lambda: True, description="模型注册中心权限同步",
        ),
        ProcessSpec(
            name="hub",
            argv=[str(VENV_BIN / "jupyterhub"), "-f", str(PROJECT_ROOT / "hub_config" / "jupyterhub_config.py")],
            env=env, cwd=settings.hub_dir, ready=http_ok(f"{settings.hub_url}/hub/api/"),
            description="JupyterHub 建模沙箱", url=f"{settings.hub_url}/hub/login",
        ),
        ProcessSpec(
            name="scheduler", argv=[PYTHON, "-m", "reporting.scheduler"], env=env,
            ready=lambda: True, description="报告调度",
        ),
    ]
    return specs


def _ports(settings: Settings) -> dict[str, int]:
    ports = {
        "REGSANDBOX_ADMIN_API_PORT": settings.admin_api_port,
        "REGSANDBOX_HUB_PORT": settings.hub_port,
        "REGSANDBOX_HUB_API_PORT": settings.hub_api_port,
        "REGSANDBOX_PROXY_API_PORT": settings.proxy_api_port,
        "REGSANDBOX_MLFLOW_PORT": settings.mlflow_port,
    }
    if settings.smtp_sink:
        ports["REGSANDBOX_SMTP_PORT"] = settings.smtp_port
    return ports


def _print_banner(settings: Settings, specs: list[ProcessSpec], created: dict[str, str]) -> None:
    print("\n平台已启动，所有服务仅监听 127.0.0.1：")
    for spec in specs:
        print(f"  {spec.description}：{spec.url or '后台运行'}")
    print(f"  数据目录：{settings.data_dir}")
    if created:
        print("\n初始账号（仅显示这一次，已保存到 {}，权限 0600）：".format(settings.credentials_file))
        for user, password in sorted(created.items()):
            print(f"  {user:<12} {password}")
    else:
        print(f"\n初始账号见 {settings.credentials_file}（权限 0600）。")
    required = settings.totp_required_roles
    if required:
        from admin_api.models import ROLE_NAMES

        names = "、".join(ROLE_NAMES.get(role, role) for role in required)
        print(f"\n{names}登录控制台须使用动态口令（TOTP）。首次登录前请打开 "
              f"{settings.admin_api_url}/console/totp 绑定身份验证器应用。")
    print("\n按 Ctrl-C 或在另一个终端运行 `regsandbox down` 停止全部服务。", flush=True)


def up(settings: Settings) -> int:
    """Initialise, start every process, wait for Ctrl-C or SIGTERM, then stop them all."""
    up_pid_file = settings.run_dir / "up.pid"
    running = read_pid(up_pid_file)
    if running:
        print(f"平台已在运行（进程 {running}）。管理控制台：{settings.admin_api_url}/console/ ，"
              f"建模沙箱：{settings.hub_url}/hub/login 。如需重启，请先运行 `regsandbox down`。")
        return 0
    busy = [f"{name}={port}" for name, port in _ports(settings).items() if port_is_open(settings.host, port)]
    if busy:
        print(f"以下端口已被其他程序占用：{', '.join(busy)}。请停止占用端口的程序，或用对应的环境变量改用其他端口。",
              file=sys.stderr)
        return 1

    try:
        created = init(settings)
    except LaunchError as error:
        print(f"初始化失败：{error}", file=sys.stderr)
        return 1

    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    up_pid_file.write_text(str(os.getpid()))

    group = ProcessGroup(settings.run_dir, settings.logs_dir)
    specs = _process_specs(settings)
    exit_code = 0
    try:
        for spec in specs:
            if stop_requested:
                break
            print(f"正在启动 {spec.description} …", flush=True)
            group.start(spec)
        else:
            _print_banner(settings, specs, created)
        reported: set[str] = set()
        while not stop_requested:
            # A process that exits is reported once; the others keep serving until `down`.
            for spec, code in group.exited():
                if spec.name not in reported:
                    reported.add(spec.name)
                    log.error("%s exited with code %s", spec.name, code)
                    print(f"{spec.description}意外退出（退出码 {code}），日志：{settings.logs_dir / (spec.name + '.log')}。"
                          "其他服务继续运行；排查后请运行 `regsandbox down` 再重新 `make up`。", file=sys.stderr, flush=True)
            time.sleep(0.5)
    except RuntimeError as error:
        log.error("start failed: %s", error)
        print(f"启动失败：{error}", file=sys.stderr)
        exit_code = 1
    finally:
        print("正在停止全部服务 …", flush=True)
        group.stop_all()
        up_pid_file.unlink(missing_ok=True)
        print("全部服务已停止。", flush=True)
    return exit_code


def down(settings: Settings, timeout: float = 90.0) -> int:
    """Stop the platform started by ``up``, from another shell."""
    up_pid = read_pid(settings.run_dir / "up.pid")
    if up_pid:
        os.kill(up_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(up_pid) and time.monotonic() < deadline:
            time.sleep(0.3)
        if pid_alive(up_pid):
            print(f"进程 {up_pid} 在 {timeout:.0f} 秒内未退出，改为逐个停止服务。", file=sys.stderr)
    # Processes whose supervisor died (or did not finish) are stopped from their pid files.
    stopped_any = bool(up_pid)
    for name in reversed(PROCESS_NAMES):
        pid_file = settings.run_dir / f"{name}.pid"
        pid = read_pid(pid_file)
        if pid:
            stop_process_group(pid, name)
            stopped_any = True
        pid_file.unlink(missing_ok=True)
    print("全部服务已停止。" if stopped_any else "平台没有在运行。")
    return 0


def status(settings: Settings) -> int:
    """Print which processes of the platform run."""
    any_running = False
    for name in PROCESS_NAMES:
        pid = read_pid(settings.run_dir / f"{name}.pid")
        any_running |= bool(pid)
        print(f"{name:<14} {'运行中，进程 ' + str(pid) if pid else '未运行'}")
    return 0 if any_running else 3


def _describe_value(value: object) -> str:
    if isinstance(value, dict):
        return f"对象，{len(value)} 个字段"
    if isinstance(value, list):
        return f"列表，{len(value)} 项"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "…"


def _print_payload_summary(payload: dict, limit: int = 20) -> None:
    print("  签名内容：")
    for name, value in list(payload.items())[:limit]:
        print(f"    {name}：{_describe_value(value)}")
    if len(payload) > limit:
        print(f"    …… 另有 {len(payload) - limit} 个字段未显示")


def _print_file_result(data_file: Path, result: VerifiedFile) -> None:
    print(f"签名有效：文件 {data_file} 自签名后未被修改。")
    print(f"  签名类型：{result.kind}（{KIND_LABELS.get(result.kind, '其他')}）")
    if result.name != data_file.name:
        print(f"  签名时的文件名：{result.name}")
    print(f"  文件大小：{result.size} 字节")
    print(f"  SM3 杂凑值：{result.sm3}")


def _print_object_result(target: Path, verified: VerifiedObject) -> None:
    print(f"签名有效：签名对象 {target} 自签名后未被修改。")
    print(f"  签名类型：{verified.kind}（{KIND_LABELS.get(verified.kind, '其他')}）")
    _print_payload_summary(verified.payload)


def _open_keystore(settings: Settings) -> KeyStore:
    path = settings.keys_dir / "keystore.json"
    if not path.is_file():
        raise KeyStoreError("keystore_missing", f"密钥库 {path} 不存在，无法取得平台签名公钥。请确认数据目录（REGSANDBOX_DATA_DIR）正确。")
    return KeyStore(path, master_key_from_environment(settings.data_dir))


_VERIFY_OUTCOMES = {0: ("success", None), 1: ("failed", "signature_invalid"), 2: ("failed", "unverifiable")}


def _audit_verification(settings: Settings, target: Path, code: int) -> None:
    """Store a ``signature.verify`` audit event; warn on stderr when the admin database cannot take it.

    The exit code is the verification result either way, because a check that only reads must work on
    a copy of the key store without the database.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from admin_api.audit import record_operator_event

    logging.getLogger("alembic").setLevel(logging.ERROR)  # revision lookup lines would bury the result
    outcome, reason = _VERIFY_OUTCOMES.get(code, ("failed", "unverifiable"))
    try:
        sessions = keys_cli.audit_sessions(settings)
        record_operator_event(sessions, keys_cli.operator_name(), "signature.verify", f"file:{target.resolve()}",
                              outcome, {"code": reason} if reason else None, role=keys_cli.OPERATOR_ROLE)
    except (RegsandboxError, SQLAlchemyError) as error:
        log.warning("signature.verify of %s (%s) not audited: %s", target, outcome, type(error).__name__)
        print(f"提示：本次验证结果未能写入审计日志（{getattr(error, 'message', type(error).__name__)}）。",
              file=sys.stderr)


def verify(settings: Settings, target: Path) -> int:
    """Verify a signed JSON envelope or a file with ``<file>.sig`` beside it; exit 0 valid, 1 invalid, 2 unusable."""
    # The Chinese result printed below already names the key and why it was not usable.
    logging.getLogger("regsandbox_core.keystore").setLevel(logging.ERROR)
    if not target.is_file():
        print(f"文件 {target} 不存在或不是普通文件。用法：regsandbox verify <签名对象.json 或 带 .sig 的文件>", file=sys.stderr)
        return 2
    data_file = target
    if target.name.endswith(".sig") and target.with_name(target.name[:-4]).is_file():
        data_file = target.with_name(target.name[:-4])
    detached = signature_path(data_file).is_file()
    if not detached:
        try:
            envelope = read_envelope(target)
        except SignatureInvalid:
            envelope = None
        if not isinstance(envelope, dict) or "regsandbox_signed" not in envelope:
            print(f"{target} 不是签名对象（JSON 中没有 regsandbox_signed），旁边也没有 {signature_path(target).name}。",
                  file=sys.stderr)
            return 2
    try:
        keystore = _open_keystore(settings)
        if detached:
            result = verify_file(data_file, keystore)
        else:
            verified = verify_object(envelope, keystore)
    except SignatureInvalid as error:
        print(error.message, file=sys.stderr)
        return 1
    except RegsandboxError as error:
        print(f"无法验证：{error.message}（{error.code}）", file=sys.stderr)
        return 2

    if detached:
        _print_file_result(data_file, result)
        key, signed_at = result.key, result.signed_at
    else:
        _print_object_result(target, verified)
        key, signed_at = verified.key, verified.signed_at
    print(f"  签名密钥：{key}（SM2-SM3）")
    print(f"  签名时间：{signed_at}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regsandbox", description="regsandbox 监管数据服务平台")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init", help="初始化数据目录、数据库、示范数据与脱敏数据集（可重复运行）")
    commands.add_parser("up", help="初始化并启动全部服务，按 Ctrl-C 停止")
    commands.add_parser("down", help="停止 `regsandbox up` 启动的全部服务")
    commands.add_parser("status", help="显示各服务是否在运行")
    verify_parser = commands.add_parser(
        "verify", help="验证平台签名：签名对象（JSON）或旁边带 .sig 签名文件的文件；有效退出码 0，无效 1，无法验证 2"
    )
    verify_parser.add_argument("file", type=Path, help="签名对象 JSON 文件，或旁边有 <文件名>.sig 的文件")
    keys_cli.add_parser(commands)
    secrets_cli.add_parser(commands)
    audit_cli.add_parser(commands)
    args = parser.parse_args(argv)

    configure_logging()
    # One line per readiness poll would bury the operator's messages.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = get_settings()
    if args.command == "init":
        try:
            created = init(settings)
        except LaunchError as error:
            print(f"初始化失败：{error}", file=sys.stderr)
            return 1
        print(f"初始化完成，数据目录：{settings.data_dir}")
        for user, password in sorted(created.items()):
            print(f"  {user:<12} {password}")
        return 0
    if args.command == "up":
        return up(settings)
    if args.command == "down":
        return down(settings)
    if args.command == "verify":
        code = verify(settings, args.file)
        _audit_verification(settings, args.file, code)
        return code
    if args.command == "keys":
        return keys_cli.run(settings, args)
    if args.command == "secrets":
        return secrets_cli.run(settings, args)
    if args.command == "audit":
        return audit_cli.run(settings, args)
    return status(settings)


if __name__ == "__main__":
    sys.exit(main())
