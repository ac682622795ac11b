"""``regsandbox keys``: operator commands for the platform key store.

    regsandbox keys list                                           versions and states, no key material
    regsandbox keys new-backup-key --out FILE                      random 16-byte SM4 backup key (Base64, 0600)
    regsandbox keys backup --out FILE --backup-key-file FILE       encrypted backup of every key
    regsandbox keys restore --from FILE --backup-key-file FILE [--replace]
    regsandbox keys rotate-master                                  new master key file, every key re-wrapped

Every command writes one audit event to the admin database: actor ``cli:<Unix user>``, role
``operator``, action ``key.<operation>`` (``key.list``, ``key.new_backup_key``, ``key.backup``,
``key.restore``, ``key.rotate_master``) and outcome ``success`` or ``failed`` (the audit log's word
for a failure). A command does nothing when the admin database is missing, unreachable or not
migrated, because its audit event could not be stored. Messages for the operator are in Chinese;
exit status 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import logging
import os
import pwd
import stat
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import fsync_directory
from regsandbox_core.keystore import (
    MASTER_KEY_ENV,
    STATE_LABELS,
    FileMasterKey,
    KeyStore,
    MasterKeyMismatch,
    master_key_from_environment,
)
from regsandbox_core.platform_keys import keystore_path, log_key_event, master_key_path, open_keystore
from regsandbox_core.settings import Settings
from regsandbox_core.sm import SM4_KEY_SIZE, generate_sm4_key

log = logging.getLogger("launcher.keys")

OPERATOR_ROLE = "operator"
KIND_LABELS = {"data": "数据加密（SM4）", "token": "令牌化（HMAC-SM3）", "signing": "签名（SM2）"}
RESTART_HINT = "正在运行的服务仍使用旧的密钥库内容，请运行 `regsandbox down` 后重新启动平台。"


class KeyCommandError(RegsandboxError):
    """Bad input or a refused operation of a ``regsandbox keys`` command."""


@dataclass
class Outcome:
    """Result of a command: lines for the operator, and the resource and detail of its audit event."""

    resource: str
    lines: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


# --- argument parsing ----------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``keys`` and its subcommands to the ``regsandbox`` parser."""
    keys = commands.add_parser("keys", help="密钥库运维：列出密钥、备份与恢复、轮换主密钥（每次操作写入审计日志）")
    operations = keys.add_subparsers(dest="key_command", required=True)
    operations.add_parser("list", help="列出密钥的所有者、类型、版本和状态（不显示密钥内容）")

    new_key = operations.add_parser("new-backup-key", help="生成随机 16 字节备份密钥（Base64，权限 0600），不覆盖已有文件")
    new_key.add_argument("--out", type=Path, required=True, help="备份密钥文件的路径（须不存在）")

    backup = operations.add_parser("backup", help="用备份密钥把全部密钥加密备份到一个文件（SM4-GCM，权限 0600）")
    backup.add_argument("--out", type=Path, required=True, help="备份文件的路径（须不存在）")
    backup.add_argument("--backup-key-file", type=Path, required=True, help="new-backup-key 生成的备份密钥文件")

    restore = operations.add_parser("restore", help="从加密备份恢复密钥库，密钥用当前主密钥重新封装")
    restore.add_argument("--from", dest="source", type=Path, required=True, help="backup 生成的备份文件")
    restore.add_argument("--backup-key-file", type=Path, required=True, help="制作该备份时使用的备份密钥文件")
    restore.add_argument("--replace", action="store_true", help="密钥库已有密钥时用备份覆盖它们")

    operations.add_parser(
        "rotate-master",
        help=f"生成新主密钥文件并重新封装全部密钥；主密钥来自环境变量 {MASTER_KEY_ENV} 时拒绝执行",
    )


# --- running a command with its audit event ------------------------------------------------------


def operator_name() -> str:
    """Return ``cli:<Unix user name>`` of the effective user, or ``cli:uid<n>`` when it has no name."""
    uid = os.geteuid()
    try:
        return f"cli:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"cli:uid{uid}"


def audit_sessions(settings: Settings) -> Any:
    """Return a session factory of the migrated admin database, or raise KeyCommandError."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from admin_api.db import make_engine, make_session_factory
    from admin_api.migrate import current_revision, head_revision

    url = settings.sqlalchemy_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        raise KeyCommandError(
            "audit_database_missing",
            f"管理数据库 {parsed.database} 不存在，密钥操作无法写入审计日志，因此未执行。"
            "请确认 REGSANDBOX_DATA_DIR 指向平台数据目录，或先运行 `regsandbox init`。",
        )
    try:
        engine = make_engine(url)
        revision = current_revision(engine)
    except SQLAlchemyError as error:
        raise KeyCommandError(
            "audit_database_unavailable",
            f"无法连接管理数据库（{type(error).__name__}），密钥操作无法写入审计日志，因此未执行。"
            "请检查 REGSANDBOX_DATABASE_URL 与数据库服务。",
        ) from None
    if revision != head_revision():
        raise KeyCommandError(
            "audit_database_not_migrated",
            f"管理数据库版本为 {revision or '空'}，需要 {head_revision()}，密钥操作无法写入审计日志，因此未执行。"
            "请先运行 `python -m admin_api.manage migrate`。",
        )
    return make_session_factory(engine)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``regsandbox keys`` command, write its audit event and print the result in Chinese."""
    # The Chinese messages below name every failure, so key store warnings would only repeat them,
    # and Alembic's revision lookup would bury them in plugin lines.
    for name in ("regsandbox_core.keystore", "regsandbox_core.platform_keys", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    operation = args.key_command.replace("-", "_")
    actor = operator_name()
    try:
        sessions = audit_sessions(settings)
    except KeyCommandError as error:
        print(f"{error.message}（{error.code}）", file=sys.stderr)
        return 1

    from admin_api.audit import record_operator_event
    from sqlalchemy.exc import SQLAlchemyError

    handlers: dict[str, Callable[[], Outcome]] = {
        "list": lambda: list_keys(settings),
        "new_backup_key": lambda: new_backup_key(args.out),
        "backup": lambda: backup(settings, args.out, args.backup_key_file),
        "restore": lambda: restore(settings, args.source, args.backup_key_file, args.replace),
        "rotate_master": lambda: rotate_master(settings),
    }
    resource = f"backup_key:{args.out}" if operation == "new_backup_key" else f"keystore:{keystore_path(settings)}"
    try:
        outcome = handlers[operation]()
    except RegsandboxError as error:
        detail = {"code": error.code}
        message = f"{error.message}（{error.code}）"
        result = "failed"
    except OSError as error:
        detail = {"code": "file_error", "error": type(error).__name__}
        message = f"文件操作失败：{error.filename or ''}（{error.strerror or type(error).__name__}）。请检查路径和权限后重试。"
        result = "failed"
    else:
        resource, detail, result = outcome.resource, outcome.detail, "success"

    try:
        record_operator_event(sessions, actor, f"key.{operation}", resource, result, detail, role=OPERATOR_ROLE)
    except SQLAlchemyError as audit_error:
        log.error("audit event key.%s (%s) could not be stored: %s", operation, result, type(audit_error).__name__)
        print(f"警告：审计事件 key.{operation} 未能写入管理数据库（{type(audit_error).__name__}）。"
              "请检查数据库后在运维记录中补记本次操作。", file=sys.stderr)
        if result == "success":
            print("\n".join(outcome.lines))
        return 1

    if result == "failed":
        print(message, file=sys.stderr)
        return 1
    print("\n".join(outcome.lines))
    return 0


# --- backup key files ------------------------------------------------------------------------------


def new_backup_key(out: Path) -> Outcome:
    """Write a random 16-byte SM4 key as Base64 to a new file with mode 0600."""
    try:
        descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyCommandError(
            "backup_key_file_exists",
            f"文件 {out} 已存在，不会覆盖（覆盖会让用旧备份密钥制作的备份无法恢复）。请换一个新的文件名。",
        ) from None
    except FileNotFoundError:
        raise KeyCommandError("backup_key_folder_missing", f"目录 {out.parent} 不存在。请先创建该目录，或换一个路径。") from None
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, base64.b64encode(generate_sm4_key()) + b"\n")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return Outcome(
        resource=f"backup_key:{out}",
        lines=[
            f"已生成备份密钥文件 {out}（16 字节 SM4 密钥的 Base64 编码，权限 0600）。",
            "请把它与密钥库备份分开保存（例如离线介质或保险柜）。没有它，备份无法恢复。",
        ],
        detail={"file": str(out)},
    )


def read_backup_key(path: Path) -> bytes:
    """Read a backup key file: a regular file of mode 0600 or 0400 holding the Base64 text of 16 bytes."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyCommandError(
            "backup_key_file_missing",
            f"备份密钥文件 {path} 不存在。请检查 --backup-key-file 的路径；新备份密钥可用 `regsandbox keys new-backup-key` 生成。",
        ) from None
    except OSError as error:
        raise KeyCommandError(
            "backup_key_file_unreadable", f"备份密钥文件 {path} 无法读取（{error.strerror}）。请确认它不是符号链接且当前用户可读。"
        ) from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise KeyCommandError("backup_key_file_invalid", f"备份密钥路径 {path} 不是普通文件。")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyCommandError(
                "backup_key_file_permissions",
                f"备份密钥文件 {path} 的权限为 {mode:04o}，组用户或其他用户可以访问。请执行 `chmod 600 {path}` 后重试。",
            )
        text = os.read(descriptor, 4096).decode("ascii", errors="replace").strip()
    finally:
        os.close(descriptor)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyCommandError(
            "backup_key_invalid", f"备份密钥文件 {path} 的内容不是合法的 Base64 编码。请使用 new-backup-key 生成的文件。"
        ) from None
    if len(key) != SM4_KEY_SIZE:
        raise KeyCommandError(
            "backup_key_invalid",
            f"备份密钥文件 {path} 解码后为 {len(key)} 字节，SM4 备份密钥必须是 {SM4_KEY_SIZE} 字节。请使用 new-backup-key 生成的文件。",
        )
    return key


# --- key store operations --------------------------------------------------------------------------


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(width - _display_width(text), 0)


def list_keys(settings: Settings) -> Outcome:
    """List owner, kind, version and state of every key version; key material is never read."""
    store = open_keystore(settings, on_event=log_key_event)
    metadata = store.metadata()
    rows = [["所有者", "类型", "版本", "状态", "创建时间（UTC）"]]
    for entry in sorted(metadata["keys"], key=lambda item: (item["owner"], item["kind"], item["version"])):
        rows.append([
            entry["owner"], KIND_LABELS.get(entry["kind"], entry["kind"]), f"v{entry['version']}",
            STATE_LABELS.get(entry["state"], entry["state"]), str(entry.get("created_at") or ""),
        ])
    widths = [max(_display_width(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [f"密钥库 {store.path}，主密钥标识 {metadata['master_key_id']}，共 {len(metadata['keys'])} 个密钥版本："]
    lines += ["  ".join(_pad(cell, width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return Outcome(resource=f"keystore:{store.path}", lines=lines, detail={"keys": len(metadata["keys"])})


def _reject_existing(path: Path, code_prefix: str) -> None:
    if path.exists() or path.is_symlink():
        raise KeyCommandError(f"{code_prefix}_exists", f"文件 {path} 已存在，不会覆盖。请换一个新的文件名，或先移走旧文件。")


def backup(settings: Settings, out: Path, backup_key_file: Path) -> Outcome:
    """Write an encrypted backup of every key to a new file."""
    _reject_existing(out, "backup_file")
    if not out.parent.is_dir():
        raise KeyCommandError("backup_folder_missing", f"目录 {out.parent} 不存在。请先创建该目录，或换一个路径。")
    backup_key = read_backup_key(backup_key_file)
    store = open_keystore(settings, on_event=log_key_event)
    count = len(store.metadata()["keys"])
    store.backup(out, backup_key)
    return Outcome(
        resource=f"keystore:{store.path}",
        lines=[
            f"已把 {count} 个密钥版本加密备份到 {out}（SM4-GCM，权限 0600）。",
            f"恢复时需要备份密钥文件 {backup_key_file}；请将备份与备份密钥分开保存。",
        ],
        detail={"file": str(out), "keys": count},
    )


def _restore_target(settings: Settings) -> tuple[KeyStore, list[str]]:
    """Return the key store to restore into; a data directory without store or master key file gets a new master key."""
    path = keystore_path(settings)
    notes: list[str] = []
    master_file = master_key_path(settings)
    if not path.exists() and not os.environ.get(MASTER_KEY_ENV) and not master_file.exists():
        FileMasterKey.create(master_file)
        notes.append(f"数据目录还没有主密钥，已生成新主密钥文件 {master_file}（权限 0600）。")
    return KeyStore(path, master_key_from_environment(settings.data_dir), log_key_event), notes


def restore(settings: Settings, source: Path, backup_key_file: Path, replace: bool) -> Outcome:
    """Restore every key from an encrypted backup, wrapped under the current master key."""
    if not source.is_file():
        raise KeyCommandError("backup_file_missing", f"备份文件 {source} 不存在或不是普通文件。请检查 --from 的路径。")
    backup_key = read_backup_key(backup_key_file)
    store, notes = _restore_target(settings)
    try:
        count = store.restore(source, backup_key, replace=replace)
    except RegsandboxError as error:
        if error.code == "keystore_not_empty":
            raise KeyCommandError(
                "keystore_not_empty",
                f"密钥库 {store.path} 已有密钥，恢复会覆盖它们（包括备份之后新生成的版本）。确认要覆盖时，请加 --replace 重新运行。",
            ) from None
        raise
    return Outcome(
        resource=f"keystore:{store.path}",
        lines=notes + [f"已从 {source} 恢复 {count} 个密钥版本到 {store.path}，并用当前主密钥重新封装。", RESTART_HINT],
        detail={"file": str(source), "keys": count, "replace": replace},
    )


def _finish_interrupted_rotation(settings: Settings, master_file: Path, pending: Path) -> list[str] | None:
    """Handle a ``master.key.new`` left by an interrupted rotation; return lines when it completed the rotation.

    When the store still opens under the current master key, the leftover file wraps nothing and
    is removed. When it opens only under the leftover key, the rotation had re-wrapped the store
    already, so the leftover replaces the old file.
    """
    current = FileMasterKey(master_file)
    try:
        KeyStore(keystore_path(settings), current).metadata()
    except MasterKeyMismatch:
        candidate = FileMasterKey(pending)
        KeyStore(keystore_path(settings), candidate).metadata()
        os.replace(pending, master_file)
        fsync_directory(master_file.parent)
        log.warning("completed an interrupted master key rotation to %s", candidate.key_id)
        return [
            f"上次主密钥轮换在替换主密钥文件之前中断：密钥库已由 {pending} 中的新主密钥保护。",
            f"现已用它替换 {master_file}，轮换完成（主密钥标识 {candidate.key_id}）。{RESTART_HINT}",
        ]
    pending.unlink()
    log.warning("removed unused master key file %s left by an interrupted rotation", pending)
    return None


def rotate_master(settings: Settings) -> Outcome:
    """Write a new master key file beside the old one, re-wrap every key, then replace the old file atomically."""
    if os.environ.get(MASTER_KEY_ENV):
        raise KeyCommandError(
            "master_key_from_environment",
            f"主密钥来自环境变量 {MASTER_KEY_ENV}，本命令只轮换数据目录中的主密钥文件，未做任何修改。"
            "请在密钥管理系统（KMS）或部署环境中生成新主密钥，按运维流程重新封装密钥库后再更新该环境变量。",
        )
    master_file = master_key_path(settings)
    pending = master_file.with_name(master_file.name + ".new")
    store = open_keystore(settings, on_event=log_key_event)
    resource = f"keystore:{store.path}"
    if pending.exists():
        lines = _finish_interrupted_rotation(settings, master_file, pending)
        if lines is not None:
            return Outcome(resource=resource, lines=lines, detail={"completed_interrupted": True})

    old_id = store.master.key_id
    count = len(store.metadata()["keys"])
    new_master = FileMasterKey.create(pending)
    try:
        store.rewrap_all(new_master)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, master_file)
    fsync_directory(master_file.parent)
    return Outcome(
        resource=resource,
        lines=[
            f"主密钥已轮换：{old_id} → {new_master.key_id}。",
            f"密钥库中 {count} 个密钥版本已用新主密钥重新封装，{master_file} 已替换为新主密钥（权限 0600），旧主密钥不再可用。",
            "已有的密钥库备份由备份密钥保护，不受影响。" + RESTART_HINT,
        ],
        detail={"old_master_key_id": old_id, "new_master_key_id": new_master.key_id, "keys": count},
    )
