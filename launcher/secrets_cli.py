"""``regsandbox secrets``: operator commands for the encrypted platform secrets.

    regsandbox secrets set-smtp --username NAME     store SMTP AUTH credentials; the password is read from
                                                    standard input (a terminal prompts twice without echo)
    regsandbox secrets clear-smtp                   remove them, so report emails are sent without AUTH

The credentials are written only into the encrypted ``secrets/platform.enc.json``, never into
settings or the environment. The scheduler reads them at start, so it must be restarted. Each
command writes an audit event (``secrets.set_smtp`` or ``secrets.clear_smtp``) to the admin
database, and does nothing when that database cannot take it.
Messages for the operator are in Chinese; exit status 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from typing import TextIO

from launcher import keys_cli
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.secrets import set_smtp_credentials
from regsandbox_core.settings import Settings

log = logging.getLogger("launcher.secrets")

MAX_FIELD_LENGTH = 512
RESTART_HINT = "报告调度服务在启动时读取凭据，请运行 `regsandbox down` 后重新启动平台。"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``secrets`` and its subcommands to the ``regsandbox`` parser."""
    parser = commands.add_parser("secrets", help="管理加密保存的平台密钥，例如 SMTP 登录凭据")
    actions = parser.add_subparsers(dest="secrets_command", required=True)
    set_smtp = actions.add_parser(
        "set-smtp", help="设置报表邮件的 SMTP 登录凭据；密码从标准输入读取（终端中输入时不回显）"
    )
    set_smtp.add_argument("--username", required=True, help="SMTP 登录用户名")
    actions.add_parser("clear-smtp", help="删除 SMTP 登录凭据，之后报表邮件不经认证发送")


def _read_password(stdin: TextIO) -> str:
    if stdin.isatty():
        first = getpass.getpass("SMTP 密码（输入时不显示）：")
        second = getpass.getpass("再次输入 SMTP 密码：")
        if first != second:
            raise RegsandboxError("SMTP_PASSWORD_MISMATCH", "两次输入的 SMTP 密码不一致，未作修改。请重新运行命令。")
        return first
    # Scripts pipe the password in: only the first line counts, without its line break.
    return stdin.readline().rstrip("\r\n")


def _check_field(value: str, label: str) -> str:
    if not value:
        raise RegsandboxError("SMTP_CREDENTIALS_INVALID", f"SMTP {label}为空，未作修改。请提供非空的{label}。")
    if len(value) > MAX_FIELD_LENGTH or any(ord(character) < 32 or ord(character) == 127 for character in value):
        raise RegsandboxError(
            "SMTP_CREDENTIALS_INVALID",
            f"SMTP {label}无效：最长 {MAX_FIELD_LENGTH} 个字符，且不能包含换行等控制字符。未作修改。",
        )
    return value


def run(settings: Settings, args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """Run one ``regsandbox secrets`` subcommand, write its audit event and return the exit status."""
    from sqlalchemy.exc import SQLAlchemyError

    from admin_api.audit import record_operator_event

    stdin = stdin if stdin is not None else sys.stdin
    logging.getLogger("alembic").setLevel(logging.ERROR)  # revision lookup lines would bury the result
    action = "secrets." + args.secrets_command.replace("-", "_")
    try:
        sessions = keys_cli.audit_sessions(settings)
    except RegsandboxError as error:
        print(f"操作失败：{error.message}（{error.code}）", file=sys.stderr)
        return 1

    detail: dict[str, str] = {}
    try:
        if args.secrets_command == "set-smtp":
            username = _check_field(args.username.strip(), "用户名")
            detail["username"] = username
            password = _check_field(_read_password(stdin), "密码")
            set_smtp_credentials(settings, username, password)
            message = f"已将 SMTP 用户 {username} 的登录凭据加密保存到平台密钥文件。{RESTART_HINT}"
        else:
            set_smtp_credentials(settings, None, None)
            message = f"已删除 SMTP 登录凭据，之后报表邮件不经认证发送。{RESTART_HINT}"
        outcome = "success"
    except RegsandboxError as error:
        log.error("secrets %s failed: %s", args.secrets_command, error.code)
        detail["code"] = error.code
        message = f"操作失败：{error.message}（{error.code}）"
        outcome = "failed"

    try:
        record_operator_event(sessions, keys_cli.operator_name(), action, "secrets:smtp", outcome, detail or None,
                              role=keys_cli.OPERATOR_ROLE)
    except SQLAlchemyError as audit_error:
        log.error("audit event %s (%s) could not be stored: %s", action, outcome, type(audit_error).__name__)
        print(f"警告：审计事件 {action} 未能写入管理数据库（{type(audit_error).__name__}）。"
              "请检查数据库后在运维记录中补记本次操作。", file=sys.stderr)
        return 1
    if outcome == "failed":
        print(message, file=sys.stderr)
        return 1
    print(message)
    return 0
