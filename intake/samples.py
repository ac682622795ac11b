"""Demo report files for trying report intake (报表报送) with the demo banks.

``python -m intake.samples --out DIR --institution CODE:LICENCE ... --period YYYYMMDD`` writes, per
institution, ``DIR/<code>/`` with three files that pass validation together: 对公客户信息表
(EAST_DGKHXXB), 信贷合同表 (EAST_XDHTB) and 对公信贷业务借据表 (EAST_DGXDYWJJB); the loans file has
one 提示 (a 实际利率 above 24 % with no explanation in 备注) for a reviewer to waive. A fourth file,
``EAST_DGXDYWJJB_含错误.txt``, has the same loans with three rows broken, so the reporter gets
row-level findings: a 借据余额 above the 借据金额, an unknown 五级分类 code and a 到期日期 before
the 发放日期. Files are UTF-8, ``|``-delimited, with a header line of field codes, as EAST files are.

The customers, their 统一社会信用代码 and all amounts are fictitious; each code's check character is
computed with python-stdnum so that the format rules pass.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

from stdnum.cn import uscc as uscc_number

from intake.template_model import TemplateCatalog

CUSTOMERS, CONTRACTS, LOANS = "EAST_DGKHXXB", "EAST_XDHTB", "EAST_DGXDYWJJB"
BROKEN_LOANS_NAME = f"{LOANS}_含错误.txt"
ROWS = 20
HIGH_RATE = "25.000000"
"""实际利率 of loan 5: above the 24 % that rule R-JJ-015 requires reporters to explain."""
_COMPANY_NAMES = ("浦江精密机械有限公司", "临港新能源科技有限公司", "张江生物医药有限公司", "外高桥国际贸易有限公司",
                  "金桥汽车零部件有限公司")
_GRADES = ("01", "01", "01", "02", "01")  # 五级分类: mostly 正常, some 关注


def customer_uscc(institution_index: int, number: int) -> str:
    """Return a valid, fictitious 统一社会信用代码 for customer ``number`` of the ``institution_index``-th bank."""
    body = f"91310115{institution_index:03d}{number:06d}"
    return body + uscc_number.calc_check_digit(body)


def _customer_name(number: int) -> str:
    return f"示范{_COMPANY_NAMES[number % len(_COMPANY_NAMES)]}{number}"


def _customer(licence: str, index: int, number: int, period: str) -> dict[str, str]:
    return {
        "JRXKZH": licence, "NBJGH": "001", "KHTYBH": f"C{number:04d}", "KHMC": _customer_name(number), "ZJLX": "01",
        "ZJHM": customer_uscc(index, number), "ZCDZ": f"上海市浦东新区示范路 {number} 号", "XZQHDM": "310115",
        "SSHY": "C13", "QYGM": "02", "ZCZB": f"{5_000_000 + number * 100_000:.2f}", "ZCZBBZ": "CNY",
        "CLRQ": "20100101", "FDDBRXM": "张三", "FDDBRZJLX": "01", "FDDBRZJHM": "11010519491231002X",
        "CWLXRSJ": "13812345678", "SFJTKH": "N", "JLKHGXRQ": "20150101", "CJRQ": period, "BEIZ": "",
    }


def _contract(licence: str, number: int, period: str) -> dict[str, str]:
    return {
        "JRXKZH": licence, "NBJGH": "001", "HTH": f"HT{number:06d}", "KHTYBH": f"C{number:04d}",
        "KHMC": _customer_name(number), "XDYWZL": "01", "BZ": "CNY", "HTJE": f"{1_000_000 + number * 10_000:.2f}", "HTQSRQ": "20230110",
        "HTDQRQ": "20270115", "HTZT": "01", "DBFS": "02", "DBHTH": "", "SFXHDK": "N", "XDYGH": "E001",
        "CJRQ": period, "BEIZ": "",
    }


def _loan(licence: str, index: int, number: int, period: str) -> dict[str, str]:
    amount = 1_000_000 + number * 10_000
    return {
        "JRXKZH": licence, "NBJGH": "001", "YHJGMC": "示范银行浦东支行", "MXKMBH": "130101",
        "KHTYBH": f"C{number:04d}", "KHMC": _customer_name(number), "ZJLX": "01", "ZJHM": customer_uscc(index, number),
        "JJH": f"JJ{number:06d}", "HTH": f"HT{number:06d}", "XDYWZL": "01", "BZ": "CNY", "JJJE": f"{amount:.2f}",
        "JJYE": f"{amount * 0.8:.2f}", "DKFFRQ": "20230115", "DKDQRQ": "20270115", "ZQDQRQ": "", "LLLX": "01",
        "SJLL": "4.350000", "DKTXHY": "C13", "DKYT": "流动资金周转", "WJFL": _GRADES[number % len(_GRADES)],
        "DKZT": "01", "HKFS": "03", "DBFS": "02", "STZFBS": "N", "YQTS": "0", "BNQXYE": "0.00", "CJRQ": period,
        "BEIZ": "",
    }


def _broken(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    broken = [dict(row) for row in rows]
    broken[1]["JJYE"] = f"{float(broken[1]['JJJE']) * 2:.2f}"  # 借据余额 above 借据金额
    broken[2]["WJFL"] = "09"  # not a 五级分类 code
    broken[3]["DKDQRQ"] = "20220101"  # 到期日期 before 发放日期
    return broken


def _write(path: Path, codes: Sequence[str], rows: list[dict[str, str]]) -> None:
    lines = ["|".join(codes)] + ["|".join(row.get(code, "") for code in codes) for row in rows]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def write_samples(folder: Path, licence: str, institution_index: int, period: str,
                  catalog: TemplateCatalog | None = None) -> list[Path]:
    """Write the demo files of one institution into ``folder`` and return their paths."""
    catalog = catalog or TemplateCatalog.load()
    folder.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[int], dict[str, str]]] = {
        CUSTOMERS: lambda number: _customer(licence, institution_index, number, period),
        CONTRACTS: lambda number: _contract(licence, number, period),
        LOANS: lambda number: _loan(licence, institution_index, number, period),
    }
    written = []
    for code, build in builders.items():
        codes = [item.code for item in catalog.get(code).fields]
        rows = [build(number) for number in range(1, ROWS + 1)]
        if code == LOANS:
            rows[4]["SJLL"] = HIGH_RATE  # a 提示 (R-JJ-015) with no explanation in 备注, for the reviewer to waive
        _write(folder / f"{code}.txt", codes, rows)
        written.append(folder / f"{code}.txt")
        if code == LOANS:
            _write(folder / BROKEN_LOANS_NAME, codes, _broken(rows))
            written.append(folder / BROKEN_LOANS_NAME)
    return written


def _period(text: str) -> str:
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"报告期末“{text}”不是有效日期，请写成 YYYYMMDD，例如 20251130。") from None
    if len(text) != 8 or not text.isdigit():
        raise argparse.ArgumentTypeError(f"报告期末“{text}”格式不对，请写成 8 位数字 YYYYMMDD，例如 20251130。")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m intake.samples", description="生成用于试用报表报送的示范报表文件。")
    parser.add_argument("--out", type=Path, required=True, help="输出目录，每个机构一个子目录")
    parser.add_argument("--period", type=_period, required=True, help="报告期末（月末），YYYYMMDD")
    parser.add_argument("--institution", action="append", required=True, metavar="CODE:金融许可证号",
                        help="机构代码和金融许可证号，可重复")
    args = parser.parse_args(argv)
    for index, item in enumerate(args.institution, start=1):
        code, _, licence = item.partition(":")
        if not code or not licence:
            parser.error(f"--institution “{item}” 应写成 机构代码:金融许可证号，例如 bank_a:B9001H231000001")
        write_samples(args.out / code, licence, index, args.period)
    print(f"示范报表文件已写入 {args.out}（报告期末 {args.period}）。")
    return 0


if __name__ == "__main__":
    sys.exit(main())
