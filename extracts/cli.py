"""Operator command ``python -m extracts``: demo data, masking policies, masked extracts and watermark identification."""

from __future__ import annotations

import argparse
import json
import logging
import stat
import sys
from pathlib import Path

from pydantic import ValidationError

from catalog.classes import ColumnClass
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.logs import configure_logging
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings

from extracts.builder import ExtractOutcome, InvalidInstitutionError, build_all, build_institution
from extracts.demo_data import load_demo
from extracts.policy import DEFAULT_POLICY_FILE, PolicyInvalid, approve_policy, load_approved_policy, load_policy
from extracts.watermark import Identification, IdentifyInputInvalid, Score, identify_file

EXIT_INVALID_INPUT = 2
EXIT_FAILED = 1
EXIT_NOT_IDENTIFIED = 3


class ClassesFileInvalid(RegsandboxError):
    """The ``--classes`` file is not a list of column classes."""


def _parser(default_prefix: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m extracts",
                                     description="演示数据导入、脱敏策略审批、脱敏数据提取与泄露文件溯源。")
    commands = parser.add_subparsers(dest="command", required=True, metavar="命令")
    commands.add_parser("load-demo", help="把德国信贷演示数据（附合成的中国个人标识）写入数据仓库")
    build = commands.add_parser("build", help="按已审批的脱敏策略为机构生成数据提取（须先审批脱敏策略：policy approve 或管理控制台“脱敏策略”页）")
    build.add_argument("--institution", metavar="CODE", help="只生成该机构的提取，例如 bank_a；默认生成数据仓库中的全部机构")
    build.add_argument(
        "--unix-group-prefix",
        metavar="PREFIX",
        default=default_prefix,
        help=f"机构 Unix 组名前缀，组名为 <前缀><机构代码>；以 root 运行且该组存在时，提取目录对该组只读开放。默认 {default_prefix}",
    )
    build.add_argument("--classes", metavar="FILE", type=Path,
                       help="列分级分类 JSON 文件：[{\"table\": 模板代码, \"column\": 字段代码, \"level\": 1-5, "
                            "\"pi_category\": \"C1\"|\"C2\"|\"C3\"|null, \"kind\": 类型}]；未列出的列按 4 级处理")
    build.add_argument("--policy-version", metavar="N", type=int, help="使用已审批的第 N 版脱敏策略；默认最新版")
    policy = commands.add_parser("policy", help="检查或审批脱敏策略文件")
    actions = policy.add_subparsers(dest="action", required=True, metavar="操作")
    check = actions.add_parser("check", help="校验策略文件，不审批")
    check.add_argument("file", type=Path, nargs="?", default=DEFAULT_POLICY_FILE, help="策略文件，默认平台默认策略")
    approve = actions.add_parser("approve", help="校验策略文件并以平台 SM2 签名密钥签署，保存为已审批版本")
    approve.add_argument("file", type=Path, help="策略文件")
    identify = commands.add_parser(
        "identify", help="识别数据文件的水印，给出来源机构、构建编号和构建时间",
        description="读取 Parquet 元数据水印（如有），并对照平台水印登记检测数据内嵌水印。"
                    "退出码：0 已识别来源，3 未发现水印，2 文件无法读取。需要读取密钥库和水印登记，请以平台管理账户运行。")
    identify.add_argument("file", type=Path, help="待识别的 Parquet 文件或带表头的 CSV 文件")
    return parser


def _load_demo(settings: Settings) -> None:
    counts = load_demo(settings)
    for code, rows in counts.items():
        print(f"已写入机构 {code} 的演示申请数据 {rows} 条。")
    print(f"数据仓库位置：{settings.warehouse_dir}（共 {sum(counts.values())} 条）")


def read_classes_file(path: Path) -> dict[tuple[str, str], ColumnClass]:
    """Read a JSON list of column classes; raise ClassesFileInvalid naming the faulty entry."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ClassesFileInvalid("CLASSES_FILE_INVALID", f"无法读取列分级分类文件 {path}（{type(error).__name__}）。") from None
    if not isinstance(entries, list):
        raise ClassesFileInvalid("CLASSES_FILE_INVALID", f"列分级分类文件 {path} 必须是 JSON 列表。")
    classes = {}
    for index, entry in enumerate(entries, start=1):
        try:
            key = (str(entry["table"]), str(entry["column"]))
            classes[key] = ColumnClass(int(entry["level"]), entry.get("pi_category"), entry.get("kind", "other"))
        except (KeyError, TypeError, ValueError) as error:
            raise ClassesFileInvalid(
                "CLASSES_FILE_INVALID",
                f"列分级分类文件 {path} 第 {index} 项无效（{error}）。每项须含 table、column、level，可选 pi_category 和 kind。",
            ) from None
    return classes


def _report(code: str, outcome: ExtractOutcome | RegsandboxError, prefix: str) -> bool:
    if isinstance(outcome, RegsandboxError):
        print(f"机构 {code} 的数据提取未生成：错误 [{outcome.code}]：{outcome.message}", file=sys.stderr)
        return False
    verb = "已生成" if outcome.status == "published" else "数据未变化，保留"
    rebuilt = sum(table.rebuilt for table in outcome.tables)
    print(f"{verb}机构 {code} 的脱敏数据提取：{outcome.folder}（{len(outcome.tables)} 张表，重新生成 {rebuilt} 张，"
          f"脱敏策略第 {outcome.policy_version} 版）")
    print(f"  {_k_summary(outcome.k_anonymity)}")
    if not outcome.folder.stat().st_mode & stat.S_IRWXG:
        print(f"  提示：Unix 组 {prefix}{code} 不存在或当前不是 root，该目录仅当前用户可读；创建该组后请重新运行本命令。")
    return True


def _k_summary(section: dict) -> str:
    """Return one line on the k-anonymity report of a build: each table's smallest class, and an override."""
    tables = "；".join(
        f"{table['table']} 最小等价类 {table['min_class_size']} 条" if table["assessed"] else f"{table['table']} 未声明准标识符"
        for table in section.get("tables", [])
    )
    line = f"k 匿名（k = {section.get('k')}）：{tables or '无数据表'}"
    override = section.get("override")
    if override:
        line += f"；低于 k 的表经 {override['actor']} 强制发布，理由：{override['reason']}"
    return line


def _build(settings: Settings, arguments: argparse.Namespace) -> int:
    classes = read_classes_file(arguments.classes) if arguments.classes else None
    prefix = arguments.unix_group_prefix
    policy = None
    if arguments.policy_version is not None:
        policy = load_approved_policy(settings, open_keystore(settings), arguments.policy_version)
    if arguments.institution is not None:
        outcomes: dict = {arguments.institution: build_institution(
            settings, arguments.institution, classes=classes, policy=policy, unix_group=f"{prefix}{arguments.institution}")}
    else:
        outcomes = build_all(settings, prefix, classes=classes, policy=policy)
    results = [_report(code, outcome, prefix) for code, outcome in outcomes.items()]
    return 0 if all(results) else EXIT_FAILED


def _policy(settings: Settings, arguments: argparse.Namespace) -> None:
    if arguments.action == "check":
        policy = load_policy(arguments.file)
        print(f"脱敏策略 {policy.name} 第 {policy.version} 版校验通过：{len(policy.rules)} 条规则，SM3 {policy.sm3}。")
        return
    policy = approve_policy(settings, open_keystore(settings), arguments.file)
    print(f"已审批脱敏策略 {policy.name} 第 {policy.version} 版（签名密钥 {policy.signature_key}）：{policy.path}")


def _score_text(score: Score) -> str:
    chance = f"{score.chance:.1e}" if score.chance > 0 else "< 1e-300"
    return (f"吻合 {score.matched}/{score.total} 个键值（{score.rate:.0%}），"
            f"未加水印的文件偶然达到此吻合度的概率约为 {chance}（已计入 {score.candidates} 个候选）")


def _build_text(build: dict) -> str:
    return f"机构 {build['institution']}，构建编号 {build['build_id']}，构建时间 {build['built_at']}"


def _print_identification(result: Identification) -> None:
    kind = "Parquet" if result.file_format == "parquet" else "CSV"
    print(f"文件：{result.path}（{kind}）")
    if result.metadata_id is None:
        print("Parquet 元数据水印：无" + ("（CSV 文件不含元数据）" if result.file_format == "csv" else ""))
    elif result.metadata_build is None:
        print(f"Parquet 元数据水印：{result.metadata_id}，但平台水印登记中没有该编号（可能来自其他平台或被篡改）")
    else:
        print(f"Parquet 元数据水印：{result.metadata_id}（{_build_text(result.metadata_build)}）")
    if result.institution_score is None:
        print("数据内嵌水印：文件中没有与水印登记相符的键列和承载列，无法检测")
    else:
        print(f"数据内嵌水印（机构）：{result.institution_score.candidate}，{_score_text(result.institution_score)}")
        if result.build_score is not None:
            print(f"数据内嵌水印（构建）：{result.build_score.candidate}，{_score_text(result.build_score)}")
    if result.conflict:
        print("警告：元数据水印与数据内嵌水印指向不同机构，元数据可能被篡改；以下结论以数据内嵌水印为准。")
    if result.institution is None:
        print("结论：未发现本平台的水印，无法确定来源。")
        return
    if result.build is None:
        print(f"结论：来源机构 {result.institution}；构建无法确定（数据内嵌水印的构建部分证据不足）。")
        return
    print(f"结论：来源为{_build_text(result.build)}（水印 {result.build['watermark_id']}）。")
    if result.published_in:
        print(f"  该数据随以下构建发布：{'、'.join(result.published_in)}")


def _identify(settings: Settings, arguments: argparse.Namespace) -> int:
    result = identify_file(settings, open_keystore(settings), arguments.file)
    _print_identification(result)
    return 0 if result.institution is not None else EXIT_NOT_IDENTIFIED


def main(argv: list[str] | None = None) -> int:
    """Run the command and return the exit status: 0 done, 2 invalid input, 1 other failure, 3 no watermark found."""
    configure_logging(logging.WARNING)
    try:
        settings = Settings()
    except ValidationError as error:
        problems = "；".join(str(item["msg"]).removeprefix("Value error, ") for item in error.errors())
        print(f"错误 [SETTINGS_INVALID]：环境变量中的平台设置无效：{problems}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    arguments = _parser(settings.unix_prefix).parse_args(argv)
    try:
        if arguments.command == "load-demo":
            _load_demo(settings)
        elif arguments.command == "policy":
            _policy(settings, arguments)
        elif arguments.command == "identify":
            return _identify(settings, arguments)
        else:
            return _build(settings, arguments)
    except (InvalidInstitutionError, PolicyInvalid, ClassesFileInvalid, IdentifyInputInvalid) as error:
        print(f"错误 [{error.code}]：{error.message}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except RegsandboxError as error:
        print(f"错误 [{error.code}]：{error.message}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(
            f"错误 [FILE_WRITE_FAILED]：读写 {error.filename or settings.data_dir} 失败（{error.strerror}）。"
            "请检查数据目录的权限和磁盘空间后重试。",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0
