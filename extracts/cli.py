"""Operator command ``python -m extracts``: load the demo warehouse and build masked extracts."""

from __future__ import annotations

import argparse
import logging
import stat
import sys

from regsandbox_core.errors import RegsandboxError
from regsandbox_core.logs import configure_logging
from regsandbox_core.settings import Settings

from extracts.builder import InvalidInstitutionError, build_all, build_extract
from extracts.demo_data import load_demo

EXIT_INVALID_INPUT = 2
EXIT_FAILED = 1


def _parser(default_prefix: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m extracts", description="演示数据导入与脱敏数据提取。")
    commands = parser.add_subparsers(dest="command", required=True, metavar="命令")
    commands.add_parser("load-demo", help="把德国信贷演示数据（附合成的中国个人标识）写入数据仓库")
    build = commands.add_parser("build", help="为机构生成脱敏数据提取（姓名、身份证号、手机号替换为 HMAC-SM3 令牌）")
    build.add_argument("--institution", metavar="CODE", help="只生成该机构的提取，例如 bank_a；默认生成数据仓库中的全部机构")
    build.add_argument(
        "--unix-group-prefix",
        metavar="PREFIX",
        default=default_prefix,
        help=f"机构 Unix 组名前缀，组名为 <前缀><机构代码>；以 root 运行且该组存在时，提取目录对该组只读开放。默认 {default_prefix}",
    )
    return parser


def _load_demo(settings: Settings) -> None:
    counts = load_demo(settings)
    for code, rows in counts.items():
        print(f"已写入机构 {code} 的演示申请数据 {rows} 条。")
    print(f"数据仓库位置：{settings.warehouse_dir}（共 {sum(counts.values())} 条）")


def _build(settings: Settings, institution: str | None, prefix: str) -> None:
    if institution is not None:
        folders = {institution: build_extract(settings, institution, f"{prefix}{institution}")}
    else:
        folders = build_all(settings, prefix)
    for code, folder in folders.items():
        print(f"已生成机构 {code} 的脱敏数据提取：{folder}")
        if not folder.stat().st_mode & stat.S_IRWXG:
            print(f"  提示：Unix 组 {prefix}{code} 不存在或当前不是 root，该目录仅当前用户可读；创建该组后请重新运行本命令。")


def main(argv: list[str] | None = None) -> int:
    """Run the command and return the exit status: 0 done, 2 invalid input, 1 other failure."""
    configure_logging(logging.WARNING)
    settings = Settings()
    arguments = _parser(settings.unix_prefix).parse_args(argv)
    try:
        if arguments.command == "load-demo":
            _load_demo(settings)
        else:
            _build(settings, arguments.institution, arguments.unix_group_prefix)
    except InvalidInstitutionError as error:
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
