"""``regsandbox audit``: operator commands for the audit log.

    regsandbox audit verify              check the SM3 chain of every audit event, in id order
    regsandbox audit archive --out FILE  copy events older than the retention period to a signed file

``verify`` prints the first broken event (edited content, or a deleted event) by id and exits 0 when
the chain is intact, 1 when it is broken, and 2 when the admin database cannot be read. Each run is
itself stored as an audit event: actor ``cli:<Unix user>``, role ``operator``, action
``audit.verify``, outcome ``success`` (intact) or ``failed`` (broken). ``archive`` writes the file
described in admin_api.audit_archive with ``<file>.sig`` beside it, deletes nothing, exits 0 or 1 and
is audited as ``audit.archive``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from launcher.keys_cli import OPERATOR_ROLE, operator_name
from regsandbox_core.settings import Settings

log = logging.getLogger(__name__)

EXIT_INTACT, EXIT_BROKEN, EXIT_UNAVAILABLE = 0, 1, 2


class AuditCommandError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``audit`` and its subcommands to the ``regsandbox`` parser."""
    audit = commands.add_parser("audit", help="审计日志运维：校验审计日志的 SM3 哈希链（每次操作写入审计日志）")
    operations = audit.add_subparsers(dest="audit_command", required=True)
    operations.add_parser(
        "verify", help="按编号顺序校验全部审计事件的 SM3 哈希链，报告第一处被修改或缺失的事件；完整退出码 0，断裂 1，无法校验 2"
    )
    operations.add_parser(
        "checkpoint", help="立即为审计日志链头生成一个 SM2 签名的检查点文件（管理服务运行时也会定期生成）"
    )
    archive = operations.add_parser(
        "archive",
        help="把早于保留期限（REGSANDBOX_AUDIT_RETENTION_DAYS 天）的审计事件导出为带 SM2 签名的归档文件；数据库中的事件不删除",
    )
    archive.add_argument("--out", type=Path, required=True, help="归档文件的路径（须不存在），签名写入 <文件>.sig")


def open_sessions(settings: Settings) -> Any:
    """Return a session factory of the migrated admin database, or raise AuditCommandError."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from admin_api.db import make_engine, make_session_factory
    from admin_api.migrate import current_revision, head_revision

    url = settings.sqlalchemy_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        raise AuditCommandError(
            "audit_database_missing",
            f"管理数据库 {parsed.database} 不存在，无法校验审计日志。"
            "请确认 REGSANDBOX_DATA_DIR 指向平台数据目录，或先运行 `regsandbox init`。",
        )
    try:
        engine = make_engine(url)
        revision = current_revision(engine)
    except SQLAlchemyError as error:
        raise AuditCommandError(
            "audit_database_unavailable",
            f"无法连接管理数据库（{type(error).__name__}），无法校验审计日志。请检查 REGSANDBOX_DATABASE_URL 与数据库服务。",
        ) from None
    if revision != head_revision():
        raise AuditCommandError(
            "audit_database_not_migrated",
            f"管理数据库版本为 {revision or '空'}，需要 {head_revision()}，无法校验审计日志。"
            "请先运行 `python -m admin_api.manage migrate`。",
        )
    return make_session_factory(engine)


def verify(settings: Settings) -> int:
    """Verify the audit chain, store the ``audit.verify`` event and print the result in Chinese."""
    logging.getLogger("alembic").setLevel(logging.ERROR)
    try:
        sessions = open_sessions(settings)
    except AuditCommandError as error:
        print(f"{error.message}（{error.code}）", file=sys.stderr)
        return EXIT_UNAVAILABLE

    from sqlalchemy.exc import SQLAlchemyError

    from admin_api.audit import record_operator_event
    from admin_api.audit_chain import verify_chain
    from admin_api.audit_checkpoint import checkpoint_files, verify_checkpoints
    from regsandbox_core.errors import RegsandboxError

    try:
        # The key store is needed only to check signatures, so a log without checkpoints verifies without it.
        trusted = _open_keystore(settings) if checkpoint_files(settings) else {}
        with sessions() as session:
            result = verify_chain(session)
            checkpoints = verify_checkpoints(session, settings, trusted)
    except SQLAlchemyError as error:
        print(f"读取审计日志失败（{type(error).__name__}），未完成校验。请检查数据库后重试。（audit_database_unavailable）",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RegsandboxError as error:
        print(f"无法打开密钥库，未完成校验：{error.message}（{error.code}）", file=sys.stderr)
        return EXIT_UNAVAILABLE

    detail: dict[str, Any] = {"rows": result.rows, "last_id": result.last_id, "checkpoints": checkpoints.checked}
    if not result.intact:
        detail.update({"code": result.code, "broken_id": result.broken_id})
    elif not checkpoints.intact:
        detail["code"] = checkpoints.code
    try:
        record_operator_event(sessions, operator_name(), "audit.verify", "audit_events",
                              "success" if result.intact else "failed", detail, role=OPERATOR_ROLE)
    except SQLAlchemyError as error:
        log.error("audit event audit.verify could not be stored: %s", type(error).__name__)
        print(f"警告：审计事件 audit.verify 未能写入管理数据库（{type(error).__name__}）。", file=sys.stderr)

    if not result.intact:
        print(f"{result.message}（{result.code}）", file=sys.stderr)
        print(f"已校验 {result.rows} 条完整的事件。请从数据库备份核对编号 {result.broken_id} 附近的事件。", file=sys.stderr)
        return EXIT_BROKEN
    if not checkpoints.intact:
        print(f"{checkpoints.message}（{checkpoints.code}）", file=sys.stderr)
        return EXIT_BROKEN
    print(result.message)
    print(checkpoints.message)
    return EXIT_INTACT


def _open_keystore(settings: Settings) -> Any:
    from regsandbox_core.keystore import KeyStore, master_key_from_environment

    return KeyStore(settings.keys_dir / "keystore.json", master_key_from_environment(settings.data_dir))


def checkpoint(settings: Settings) -> int:
    """Write a signed checkpoint of the audit chain head now and store the ``audit.checkpoint`` event."""
    logging.getLogger("alembic").setLevel(logging.ERROR)
    try:
        sessions = open_sessions(settings)
    except AuditCommandError as error:
        print(f"{error.message}（{error.code}）", file=sys.stderr)
        return 1

    from sqlalchemy.exc import SQLAlchemyError

    from admin_api.audit import record_operator_event
    from admin_api.audit_checkpoint import write_checkpoint
    from regsandbox_core.errors import RegsandboxError

    try:
        keystore = _open_keystore(settings)
        with sessions() as session:
            path = write_checkpoint(session, settings, keystore)
    except (RegsandboxError, SQLAlchemyError, OSError) as error:
        code = getattr(error, "code", None) or type(error).__name__
        reason = getattr(error, "message", None) or type(error).__name__
        print(f"生成审计检查点失败：{reason}（{code}）。未写入检查点，请检查密钥库、数据库和数据目录权限后重试。",
              file=sys.stderr)
        return 1
    try:
        record_operator_event(sessions, operator_name(), "audit.checkpoint", "audit_events", "success",
                              {"file": path.name if path else None}, role=OPERATOR_ROLE)
    except SQLAlchemyError as error:
        log.error("audit event audit.checkpoint could not be stored: %s", type(error).__name__)
        print(f"警告：审计事件 audit.checkpoint 未能写入管理数据库（{type(error).__name__}）。", file=sys.stderr)
    if path is None:
        print("审计日志自上一个检查点以来没有新事件，未生成新的检查点。")
    else:
        print(f"已生成审计检查点 {path}。")
    return 0


def archive(settings: Settings, out: Path) -> int:
    """Export events older than the retention period to ``out``, sign it and store the ``audit.archive`` event."""
    logging.getLogger("alembic").setLevel(logging.ERROR)
    logging.getLogger("regsandbox_core.keystore").setLevel(logging.ERROR)
    if out.exists() or out.is_symlink():
        print(f"归档文件 {out} 已存在，未覆盖。请指定一个新路径。（audit_archive_exists）", file=sys.stderr)
        return 1
    if not out.parent.is_dir():
        print(f"归档文件的目录 {out.parent} 不存在。请先创建该目录。（audit_archive_folder_missing）", file=sys.stderr)
        return 1
    try:
        sessions = open_sessions(settings)
    except AuditCommandError as error:
        print(f"{error.message}（{error.code}）", file=sys.stderr)
        return 1

    from sqlalchemy.exc import SQLAlchemyError

    from admin_api.audit import record_operator_event
    from admin_api.audit_archive import SIGNATURE_KIND, write_archive
    from admin_api.db import utc_now
    from regsandbox_core.errors import RegsandboxError
    from regsandbox_core.keystore import KeyStore, master_key_from_environment
    from regsandbox_core.signing import sign_file

    cutoff = utc_now() - timedelta(days=settings.audit_retention_days)
    detail: dict[str, Any] = {"retention_days": settings.audit_retention_days}
    try:
        keystore = KeyStore(settings.keys_dir / "keystore.json", master_key_from_environment(settings.data_dir))
        with sessions() as session:
            summary = write_archive(session, out, cutoff, settings.audit_retention_days)
        signature = sign_file(keystore, out, SIGNATURE_KIND)
    except (RegsandboxError, SQLAlchemyError, OSError) as error:
        out.unlink(missing_ok=True)
        code = getattr(error, "code", None) or type(error).__name__
        reason = getattr(error, "message", None) or type(error).__name__
        print(f"审计日志归档失败：{reason}（{code}）。未写入归档文件，请检查密钥库和数据库后重试。", file=sys.stderr)
        outcome, detail["code"] = "failed", code
    else:
        outcome = "success"
        detail.update({"rows": summary.rows, "first_id": summary.first_id, "last_id": summary.last_id,
                       "cutoff": summary.cutoff})
    try:
        record_operator_event(sessions, operator_name(), "audit.archive", f"file:{out.resolve()}", outcome, detail,
                              role=OPERATOR_ROLE)
    except SQLAlchemyError as error:
        log.error("audit event audit.archive could not be stored: %s", type(error).__name__)
        print(f"警告：审计事件 audit.archive 未能写入管理数据库（{type(error).__name__}）。", file=sys.stderr)
        return 1
    if outcome == "failed":
        return 1
    print(f"已归档 {summary.rows} 条早于 {summary.cutoff}（UTC）的审计事件到 {out}，签名文件 {signature}。"
          "数据库中的事件未删除；可用 `regsandbox verify` 验证签名。")
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``regsandbox audit`` command."""
    if args.audit_command == "verify":
        return verify(settings)
    if args.audit_command == "archive":
        return archive(settings, args.out)
    if args.audit_command == "checkpoint":
        return checkpoint(settings)
    raise ValueError(f"unknown audit command {args.audit_command!r}")
