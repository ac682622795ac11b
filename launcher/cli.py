"""``regsandbox`` command line: ``init``, ``up``, ``down`` and ``status``.

Messages for the operator are in Chinese; logs are in English.
"""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.processes import ProcessGroup, ProcessSpec, http_ok, pid_alive, port_is_open, read_pid, stop_process_group
from regsandbox_core.logs import configure_logging
from regsandbox_core.secrets import ensure_platform_secrets, write_private_file
from regsandbox_core.settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger("launcher")

VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")

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


def _institution_codes(settings: Settings) -> list[str]:
    partitions = settings.warehouse_dir / "applications"
    if not partitions.is_dir():
        return []
    return sorted(p.name.split("=", 1)[1] for p in partitions.iterdir() if p.name.startswith("institution="))


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


def init(settings: Settings) -> dict[str, str]:
    """Initialise the data directory idempotently; return the credentials of users created now."""
    prepare_data_dir(settings)
    ensure_platform_secrets(settings)

    _run_step(settings, "数据库迁移", [PYTHON, "-m", "admin_api.manage", "migrate"])
    created = json.loads(_run_step(settings, "加载示范机构与用户", [PYTHON, "-m", "admin_api.manage", "seed-demo"]) or "{}")
    if created:
        _save_credentials(settings, created)

    if not _institution_codes(settings):
        _run_step(settings, "加载示范信贷数据", [PYTHON, "-m", "extracts", "load-demo"])

    build = [PYTHON, "-m", "extracts", "build"]
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
            argv=[str(VENV_BIN / "uvicorn"), "admin_api.app:create_app", "--factory",
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
            name="registry_sync", argv=[PYTHON, "-m", "model_registry.sync", "--loop", "30"], env=env,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regsandbox", description="regsandbox 监管数据服务平台")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init", help="初始化数据目录、数据库、示范数据与脱敏数据集（可重复运行）")
    commands.add_parser("up", help="初始化并启动全部服务，按 Ctrl-C 停止")
    commands.add_parser("down", help="停止 `regsandbox up` 启动的全部服务")
    commands.add_parser("status", help="显示各服务是否在运行")
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
    return status(settings)


if __name__ == "__main__":
    sys.exit(main())
