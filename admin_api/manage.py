"""Operator commands of admin_api.

    python -m admin_api.manage migrate                     upgrade the database to the newest revision
    python -m admin_api.manage seed-demo                   create the demo data; prints {username: password}
                                                           of the users created now as JSON on stdout
    python -m admin_api.manage set-active USER --disable   disable (or --enable) a user
    python -m admin_api.manage catalog-sync [--table CODE] [--resample]
                                                           sync the data catalog with the report templates and
                                                           sample accepted warehouse data; prints the counts as JSON
    python -m admin_api.manage catalog-classes --out FILE  write the class masking applies to every catalog column,
                                                           the --classes file of python -m extracts build
    python -m admin_api.manage policy-approve-default      approve the shipped default masking policy when no
                                                           policy is approved yet (audited as the system)
    python -m admin_api.manage extracts-build [--institution CODE] [--unix-group-prefix PREFIX]
                                                           build the masked extracts with the catalog's classes
                                                           and the newest approved policy; every outcome is audited

Messages for the operator go to stderr in Chinese; exit status 0 on success, 1 on error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from admin_api.catalog_sync import sync_by_operator
from admin_api.data_catalog import extract_classes
from admin_api.extract_builds import BuildActor, BuildResult, run_builds
from admin_api.masking_policies import approve_shipped_default
from admin_api.db import make_engine, make_session_factory, utc_now
from admin_api.keyaccess import open_platform_keystore
from admin_api.migrate import current_revision, head_revision, upgrade_to_head
from admin_api.models import ApiToken, User
from admin_api.seed import seed_demo
from intake.template_model import TemplateCatalog
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import write_private_file
from regsandbox_core.logs import configure_logging
from regsandbox_core.settings import Settings, get_settings


def _session_factory(settings: Settings) -> sessionmaker[Session]:
    engine = make_engine(settings.sqlalchemy_url)
    if current_revision(engine) != head_revision():
        raise SystemExit("管理数据库尚未迁移到最新版本，请先运行 `python -m admin_api.manage migrate`。")
    return make_session_factory(engine)


def _session(settings: Settings):  # type: ignore[no-untyped-def]
    return _session_factory(settings)()


def migrate(settings: Settings) -> int:
    upgrade_to_head(settings.sqlalchemy_url)
    print(f"管理数据库已迁移到最新版本 {head_revision()}。", file=sys.stderr)
    return 0


def seed(settings: Settings) -> int:
    with _session(settings) as session:
        created = seed_demo(session, settings)
    print(json.dumps(created, ensure_ascii=False))
    print(f"演示数据已就绪，本次新建用户 {len(created)} 个。", file=sys.stderr)
    return 0


def set_active(settings: Settings, username: str, active: bool) -> int:
    with _session(settings) as session:
        user = session.scalars(select(User).where(User.username == username)).first()
        if user is None:
            print(f"用户 {username} 不存在，请检查用户名。", file=sys.stderr)
            return 1
        user.is_active = active
        if not active:
            for token in session.scalars(select(ApiToken).where(ApiToken.user_id == user.id)):
                token.revoked_at = token.revoked_at or utc_now()
        session.commit()
    print(f"用户 {username} 已{'启用' if active else '停用'}。", file=sys.stderr)
    return 0


def catalog_sync(settings: Settings, table_code: str | None, resample: bool) -> int:
    """Sync the data catalog as the operator ``cli:<user>``; the key store decrypts the sampled partitions."""
    try:
        store = open_platform_keystore(settings)
        with _session(settings) as session:
            result = sync_by_operator(session, settings, store, TemplateCatalog.load(), f"cli:{getpass.getuser()}",
                                      resample=resample, table_code=table_code)
    except RegsandboxError as error:
        print(f"数据目录同步失败：{error.message}", file=sys.stderr)
        return 1
    print(result.model_dump_json())
    print(f"数据目录已同步：新增 {result.created} 个字段，更新 {result.updated} 个字段，"
          f"抽样 {len(result.sampled_tables)} 张表。", file=sys.stderr)
    return 0


def catalog_classes(settings: Settings, out: Path) -> int:
    """Write the classes masking applies to every catalog column to ``out`` (JSON, mode 0600) for the extract builder."""
    with _session(settings) as session:
        entries = extract_classes(session)
    write_private_file(out, json.dumps(entries, ensure_ascii=False, indent=1).encode("utf-8"))
    confirmed = sum(entry["confirmed"] for entry in entries)
    print(f"已导出 {len(entries)} 个字段的分级分类到 {out}（其中 {confirmed} 个已确认，其余按 4 级处理）。", file=sys.stderr)
    return 0


def policy_approve_default(settings: Settings) -> int:
    """Approve the shipped default masking policy unless a policy is approved already; audited as the system."""
    try:
        store = open_platform_keystore(settings)
        policy = approve_shipped_default(_session_factory(settings), settings, store, f"cli:{getpass.getuser()}")
    except RegsandboxError as error:
        print(f"审批平台默认脱敏策略失败：[{error.code}] {error.message}", file=sys.stderr)
        return 1
    if policy is None:
        print("已有审批通过的脱敏策略，未作改动。", file=sys.stderr)
    else:
        print(f"已审批平台默认脱敏策略 {policy.name} 第 {policy.version} 版（签名密钥 {policy.signature_key}），"
              "审计日志记为系统操作。", file=sys.stderr)
    return 0


def _print_result(result: BuildResult) -> None:
    if result.error is not None:
        print(f"机构 {result.institution} 的数据提取未生成：[{result.error.code}] {result.error.message}", file=sys.stderr)
        return
    assert result.outcome is not None
    rebuilt = sum(table.rebuilt for table in result.outcome.tables)
    verb = "已生成" if result.status == "published" else "数据未变化，保留"
    print(f"{verb}机构 {result.institution} 的脱敏数据提取 {result.outcome.build_id}（{len(result.outcome.tables)} 张表，"
          f"重新生成 {rebuilt} 张，脱敏策略第 {result.outcome.policy_version} 版）", file=sys.stderr)


def extracts_build(settings: Settings, institution: str | None, unix_group_prefix: str | None) -> int:
    """Build the masked extracts as the operator ``cli:<user>``; print one JSON line per institution on stdout."""
    actor = BuildActor(f"cli:{getpass.getuser()}", "operator")
    try:
        store = open_platform_keystore(settings)
        results = run_builds(_session_factory(settings), settings, store, actor, [institution] if institution else None,
                             trigger="operator", unix_group_prefix=unix_group_prefix, on_result=_print_result)
    except RegsandboxError as error:
        print(f"数据提取未生成：[{error.code}] {error.message}", file=sys.stderr)
        return 1
    for result in results:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    failed = [result.institution for result in results if result.error is not None]
    if failed:
        print(f"共 {len(results)} 家机构，{len(failed)} 家失败：{'、'.join(failed)}。失败原因已记入审计日志。", file=sys.stderr)
        return 1
    print(f"共 {len(results)} 家机构的数据提取已就绪，结果已记入审计日志。", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m admin_api.manage", description="admin_api 运维命令")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="把管理数据库升级到最新版本（alembic upgrade head）")
    commands.add_parser("seed-demo", help="创建演示机构、用户和报告笔记本；以 JSON 输出本次新建用户的密码")
    active = commands.add_parser("set-active", help="停用或启用一个用户")
    active.add_argument("username", help="用户名")
    state = active.add_mutually_exclusive_group(required=True)
    state.add_argument("--disable", action="store_true", help="停用该用户并吊销其全部令牌与会话")
    state.add_argument("--enable", action="store_true", help="重新启用该用户")
    sync = commands.add_parser("catalog-sync", help="按报表模板同步数据目录，并抽样已入仓数据提出分级分类建议")
    sync.add_argument("--table", default=None, help="只同步这一张数据表（报表模板代码）")
    sync.add_argument("--resample", action="store_true", help="重新抽样已抽样过的数据表")
    classes = commands.add_parser("catalog-classes", help="导出各字段用于脱敏的分级分类（JSON），供 python -m extracts build --classes 使用")
    classes.add_argument("--out", type=Path, required=True, help="输出文件，权限 0600")
    commands.add_parser("policy-approve-default",
                        help="尚无已审批的脱敏策略时，审批并签署随平台发布的默认脱敏策略（审计日志记为系统操作）")
    build = commands.add_parser("extracts-build",
                                help="按数据目录的分级分类和最新审批的脱敏策略生成数据提取，每家机构的结果记入审计日志")
    build.add_argument("--institution", metavar="CODE", default=None, help="只生成该机构的提取，例如 bank_a；默认全部机构")
    build.add_argument("--unix-group-prefix", metavar="PREFIX", default=None,
                       help="机构 Unix 组名前缀，组名为 <前缀><机构代码>；以 root 运行且该组存在时，提取目录对该组只读开放")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    configure_logging()
    settings = get_settings()
    try:
        if arguments.command == "migrate":
            return migrate(settings)
        if arguments.command == "seed-demo":
            return seed(settings)
        if arguments.command == "catalog-sync":
            return catalog_sync(settings, arguments.table, arguments.resample)
        if arguments.command == "catalog-classes":
            return catalog_classes(settings, arguments.out)
        if arguments.command == "policy-approve-default":
            return policy_approve_default(settings)
        if arguments.command == "extracts-build":
            return extracts_build(settings, arguments.institution, arguments.unix_group_prefix)
        return set_active(settings, arguments.username, active=arguments.enable)
    except SQLAlchemyError as error:
        print(f"访问管理数据库失败：{type(error).__name__}。请检查 REGSANDBOX_DATABASE_URL 与数据库服务。", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
