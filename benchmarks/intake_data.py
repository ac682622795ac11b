"""Deterministic test data for the report-intake benchmark (benchmarks/intake_validation.py).

Writes a realistic 对公信贷业务借据表 (EAST_DGXDYWJJB) file for the period 2026-11 with about
2 % of rows failing, spread over the rule kinds of the template, plus what its reference,
reconcile, history and fluctuation rules need:

- ``EAST_XDHTB.txt`` (信贷合同表) and ``EAST_DGKHXXB.txt`` (对公客户信息表): every contract and
  customer that the good rows refer to;
- ``G01.csv``: the report whose line 7.1 (对公贷款, 人民币, 万元) matches the loan balances;
- ``warehouse/EAST_DGXDYWJJB-202610.parquet``: the accepted previous period (2026-10), text
  columns like a staging file plus ``_period`` (YYYYMMDD), as ``ValidationContext.warehouse`` expects.

Values follow the template: 金融许可证号 (license_no), 统一社会信用代码 with a valid GB 32100
check digit and an embedded GB 11714 organisation code, dates as YYYYMMDD, amounts as
DECIMAL(20,2) text, codes from the template's code lists and multi-value 担保方式 with ``;``.

Rows are built with NumPy and Polars in chunks, so memory stays bounded for any size. The same
seed and size give the same bytes.

Usage: python benchmarks/intake_data.py OUT_DIR [--rows N | --scale-bytes N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

PERIOD_START = date(2026, 11, 1)
PERIOD_END = date(2026, 11, 30)
PREVIOUS_END = date(2026, 10, 31)
LICENSE_NO = "B0001H244010001"
"""金融许可证号 of the reporting institution: letter, 4 digits, letter, 9 digits."""
INSTITUTION_NAME = "示例银行股份有限公司"
CHUNK_ROWS = 200_000
FAIL_SHARE = 0.02

LOAN_COLUMNS = (
    "JRXKZH", "NBJGH", "YHJGMC", "MXKMBH", "KHTYBH", "KHMC", "ZJLX", "ZJHM", "JJH", "HTH",
    "XDYWZL", "BZ", "JJJE", "JJYE", "DKFFRQ", "DKDQRQ", "ZQDQRQ", "LLLX", "SJLL", "DKTXHY",
    "DKYT", "WJFL", "DKZT", "HKFS", "DBFS", "STZFBS", "YQTS", "BNQXYE", "CJRQ", "BEIZ",
)

FAILURE_KINDS = (
    # Each entry: the name of the failure, the rule it breaks and that rule's severity.
    ("null_required", "AUTO-NOTNULL-KHMC / R-JJ-001", "error"),
    ("duplicate_key", "R-JJ-003", "error"),
    ("bad_code", "R-JJ-005", "error"),
    ("bad_multi_code", "AUTO-CODELIST-DBFS", "error"),
    ("bad_date", "R-JJ-007", "error"),
    ("bad_check_digit", "R-JJ-006", "error"),
    ("bad_license_no", "R-JJ-007 (license_no)", "error"),
    ("bad_decimal", "AUTO-FORMAT-JJJE", "error"),
    ("bad_pattern", "AUTO-FORMAT-DKTXHY", "error"),
    ("too_long", "AUTO-FORMAT-ZJLX", "error"),
    ("due_before_issue", "R-JJ-008", "error"),
    ("balance_over_amount", "R-JJ-009", "error"),
    ("wrong_period", "R-JJ-010", "error"),
    ("closed_with_balance", "R-JJ-013", "error"),
    ("negative_rate", "R-JJ-014", "error"),
    ("overdue_without_days", "R-JJ-017", "error"),
    ("extension_without_date", "R-JJ-002", "error"),
    ("unknown_contract", "R-JJ-018", "error"),
    ("unknown_customer", "R-JJ-019", "error"),
    ("high_rate", "R-JJ-015", "warning"),
    ("overdue_classified_normal", "R-JJ-016", "warning"),
    ("extension_not_later", "R-JJ-012", "warning"),
    ("history_duplicate", "R-JJ-004", "warning"),
)
KIND_INDEX = {name: number for number, (name, _, _) in enumerate(FAILURE_KINDS)}

BRANCHES = ("天河", "越秀", "海珠", "荔湾", "白云", "番禺", "黄埔", "花都", "南沙", "增城", "从化", "琶洲")
NAME_PLACES = ("广州", "深圳", "佛山", "东莞", "珠海", "中山", "惠州", "江门", "汕头", "湛江")
NAME_WORDS = ("华信", "宏达", "恒通", "鑫源", "瑞丰", "锦程", "东方", "南粤", "永泰", "中联", "海天", "粤港", "天成", "嘉禾")
NAME_TRADES = ("科技", "制造", "贸易", "建设", "物流", "实业", "电子", "食品", "能源", "医药", "纺织", "化工")
NAME_FORMS = ("有限公司", "股份有限公司", "集团有限公司")
INDUSTRY_CODES = ("C3011", "C2614", "C3311", "C3912", "F5123", "F5137", "K7010", "E4710", "I6510", "A0111", "G5431", "D4411")
PURPOSES = ("补充流动资金", "购置生产设备", "支付货款", "厂房建设", "技术改造", "项目建设", "日常经营周转")
ACCOUNTS = ("13030101", "13030102", "13050101", "13070101")
GUARANTEES = ("01", "02", "03", "04", "02;03", "03;04", "02;03;04", "05", "02;05")
PERSON_REGIONS = ("110101", "110102", "110105", "110108", "310104", "310105", "310106", "310110")
"""Region codes valid for every birth year from 1955 to 1995 (python-stdnum's table), for resident IDs."""
REGIONS = ("440103", "440104", "440105", "440106", "440111", "440112", "440113", "440114", "440115", "440304", "440305", "440604")

USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
USCC_WEIGHTS = np.array([1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28])
ORG_WEIGHTS = np.array([3, 7, 9, 10, 5, 8, 4, 2])
RESIDENT_WEIGHTS = np.array([pow(2, 17 - i, 11) for i in range(17)])
_EPOCH = date(1970, 1, 1)


@dataclass
class DataSet:
    """Paths and facts of one generated data set."""

    directory: Path
    loans: Path
    contracts: Path
    customers: Path
    g01: Path
    warehouse: Path
    rows: int = 0
    size: int = 0
    contract_rows: int = 0
    customer_rows: int = 0
    warehouse_rows: int = 0
    planted: dict[str, int] = field(default_factory=dict)
    """Failing rows planted per failure kind."""
    cny_balance: str = "0"
    seed: int = 0

    @property
    def failing_rows(self) -> int:
        return sum(self.planted.values())

    def to_json(self) -> str:
        data = asdict(self)
        data = {key: str(value) if isinstance(value, Path) else value for key, value in data.items()}
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> DataSet:
        data = json.loads(text)
        for key in ("directory", "loans", "contracts", "customers", "g01", "warehouse"):
            data[key] = Path(data[key])
        return cls(**data)


# --- identifiers with check digits ---------------------------------------------------------------


def _chars(codes: np.ndarray, alphabet: str) -> np.ndarray:
    """Turn an (n, k) array of alphabet indices into n strings of k characters."""
    table = np.frombuffer(alphabet.encode("ascii"), dtype=np.uint8)
    raw = np.ascontiguousarray(table[codes])
    return raw.view(f"S{codes.shape[1]}").ravel().astype(str)


def org_codes(rng: np.random.Generator, count: int) -> np.ndarray:
    """Generate GB 11714 organisation codes: 8 digits and a check character (0-9 or X)."""
    body = rng.integers(0, 10, size=(count, 8))
    body[:, 0] = rng.integers(1, 10, size=count)
    check = (11 - (body @ ORG_WEIGHTS) % 11) % 11  # A check value of 10 is written as X.
    digits = np.concatenate([body, check[:, None]], axis=1)
    return _chars(digits, "0123456789X")


def usccs(rng: np.random.Generator, count: int) -> np.ndarray:
    """Generate GB 32100 codes: 91 (a company registered by market regulation), a region, an organisation code and the check character."""
    orgs = org_codes(rng, count)
    index = {char: number for number, char in enumerate(USCC_ALPHABET)}
    regions = np.array(REGIONS)[rng.integers(0, len(REGIONS), size=count)]
    body = np.array([[index[c] for c in "91" + region + org] for region, org in zip(regions, orgs)])
    check = (31 - (body @ USCC_WEIGHTS) % 31) % 31
    return _chars(np.concatenate([body, check[:, None]], axis=1), USCC_ALPHABET)


def resident_ids(rng: np.random.Generator, count: int) -> np.ndarray:
    """Generate GB 11643 resident ID numbers: region, birth date, sequence and the check character."""
    regions = np.array([[int(c) for c in r] for r in PERSON_REGIONS])[rng.integers(0, len(PERSON_REGIONS), size=count)]
    births = _day_numbers(date(1955, 1, 1), date(1995, 12, 31), rng, count)
    birth_text = np.array([[int(c) for c in text] for text in _date_text(births)])
    sequence = rng.integers(0, 10, size=(count, 3))
    body = np.concatenate([regions, birth_text, sequence], axis=1)
    check = (12 - (body @ RESIDENT_WEIGHTS) % 11) % 11  # A check value of 10 is written as X.
    return _chars(np.concatenate([body, check[:, None]], axis=1), "0123456789X")


# --- dates and amounts ---------------------------------------------------------------------------------


def _day_numbers(first: date, last: date, rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers((first - _EPOCH).days, (last - _EPOCH).days + 1, size=count)


def _date_text(days: np.ndarray) -> np.ndarray:
    return np.char.replace(np.datetime_as_string(days.astype("datetime64[D]"), unit="D"), "-", "")


def _dates(days: pl.Expr) -> pl.Expr:
    return days.cast(pl.Int32).cast(pl.Date).dt.strftime("%Y%m%d")


def _money(cents: pl.Expr) -> pl.Expr:
    """Format non-negative integer cents as DECIMAL(20,2) text."""
    return pl.format("{}.{}", cents // 100, (cents % 100).cast(pl.String).str.zfill(2))


def _pick(options: tuple[str, ...] | list[str], rng: np.random.Generator, count: int, p=None) -> np.ndarray:
    return np.array(options)[rng.choice(len(options), size=count, p=p)]


# --- the pools of customers and contracts --------------------------------------------------------------


def _company_names(rng: np.random.Generator, count: int) -> np.ndarray:
    parts = [_pick(NAME_PLACES, rng, count), _pick(NAME_WORDS, rng, count), _pick(NAME_TRADES, rng, count),
             _pick(NAME_FORMS, rng, count)]
    return np.char.add(np.char.add(np.char.add(parts[0], parts[1]), parts[2]), parts[3])


def _customers(rng: np.random.Generator, count: int) -> pl.DataFrame:
    kinds = _pick(("01", "02", "03"), rng, count, p=(0.88, 0.08, 0.04))
    uscc = usccs(rng, count)
    orgs = org_codes(rng, count)
    licences = np.char.add("4401", rng.integers(10**10, 10**11, size=count).astype(str))
    numbers = np.where(kinds == "01", uscc, np.where(kinds == "02", orgs, licences))
    founded = _day_numbers(date(1990, 1, 1), date(2020, 12, 31), rng, count)
    related = founded + rng.integers(30, 2000, size=count)
    return pl.DataFrame({
        "JRXKZH": LICENSE_NO,
        "NBJGH": np.char.add("44010", rng.integers(100, 100 + len(BRANCHES), size=count).astype(str)),
        "KHTYBH": np.char.add("KH", np.char.zfill(np.arange(1, count + 1).astype(str), 10)),
        "KHMC": _company_names(rng, count),
        "ZJLX": kinds,
        "ZJHM": numbers,
        "ZCDZ": np.char.add(np.char.add("广东省", _pick(NAME_PLACES, rng, count)), "市示例路 1 号"),
        "XZQHDM": _pick(REGIONS, rng, count),
        "SSHY": _pick(INDUSTRY_CODES, rng, count),
        "QYGM": _pick(("01", "02", "03", "04"), rng, count, p=(0.1, 0.3, 0.45, 0.15)),
        "ZCZB": np.char.add(rng.integers(100, 100_000, size=count).astype(str), "0000.00"),
        "ZCZBBZ": "CNY",
        "CLRQ": _date_text(founded),
        "FDDBRXM": _pick(("张伟", "王芳", "李娜", "刘洋", "陈静", "杨磊", "赵敏", "黄强"), rng, count),
        "FDDBRZJLX": "01",
        "FDDBRZJHM": resident_ids(rng, count),
        "CWLXRSJ": np.char.add("13", rng.integers(10**8, 10**9, size=count).astype(str)),
        "SFJTKH": _pick(("Y", "N"), rng, count, p=(0.1, 0.9)),
        "JLKHGXRQ": _date_text(related),
        "CJRQ": PERIOD_END.strftime("%Y%m%d"),
        "BEIZ": "",
    }).with_columns(
        pl.when(pl.col("JLKHGXRQ") > pl.col("CJRQ")).then(pl.col("CJRQ")).otherwise(pl.col("JLKHGXRQ")).alias("JLKHGXRQ")
    )


def _contracts(rng: np.random.Generator, count: int, customers: pl.DataFrame) -> pl.DataFrame:
    owner = rng.integers(0, customers.height, size=count)
    start = _day_numbers(date(2018, 1, 1), PERIOD_END, rng, count)
    term = rng.integers(365, 3650, size=count)
    cents = rng.integers(5_000_000, 20_000_000_000, size=count) // 100 * 100
    guarantee = _pick(GUARANTEES, rng, count)
    return pl.DataFrame({
        "JRXKZH": LICENSE_NO,
        "NBJGH": customers["NBJGH"].to_numpy()[owner],
        "HTH": np.char.add("HT2026", np.char.zfill(np.arange(1, count + 1).astype(str), 10)),
        "KHTYBH": customers["KHTYBH"].to_numpy()[owner],
        "KHMC": customers["KHMC"].to_numpy()[owner],
        "XDYWZL": _pick(("01", "02", "03", "04", "05", "09"), rng, count, p=(0.55, 0.2, 0.05, 0.1, 0.07, 0.03)),
        "BZ": _pick(("CNY", "USD", "EUR", "HKD"), rng, count, p=(0.9, 0.06, 0.02, 0.02)),
        "_cents": cents,
        "_start": start,
        "_end": start + term,
        "HTZT": "01",
        "DBFS": guarantee,
        "SFXHDK": _pick(("Y", "N"), rng, count, p=(0.2, 0.8)),
        "XDYGH": np.char.add("E", rng.integers(10000, 99999, size=count).astype(str)),
    }).with_columns(
        _money(pl.col("_cents")).alias("HTJE"),
        _dates(pl.col("_start")).alias("HTQSRQ"),
        _dates(pl.col("_end")).alias("HTDQRQ"),
        pl.when(pl.col("DBFS").str.contains("0[2-4]"))
        .then(pl.format("DB{}", pl.col("HTH").str.slice(2)))
        .otherwise(None)
        .alias("DBHTH"),
        pl.lit(PERIOD_END.strftime("%Y%m%d")).alias("CJRQ"),
        pl.lit(None, dtype=pl.String).alias("BEIZ"),
    )


CONTRACT_COLUMNS = ("JRXKZH", "NBJGH", "HTH", "KHTYBH", "KHMC", "XDYWZL", "BZ", "HTJE", "HTQSRQ", "HTDQRQ", "HTZT",
                    "DBFS", "DBHTH", "SFXHDK", "XDYGH", "CJRQ", "BEIZ")


# --- loans ----------------------------------------------------------------------------------------------------


def _loan_chunk(rng: np.random.Generator, first: int, count: int, contracts: pl.DataFrame) -> pl.DataFrame:
    """Build ``count`` good loan rows numbered from ``first``, with a ``_kind`` column (-1 = good)."""
    contract = rng.integers(0, contracts.height, size=count)
    pick = contracts[contract]
    status = _pick(("01", "02", "03", "04", "05", "06"), rng, count, p=(0.85, 0.03, 0.02, 0.07, 0.015, 0.015))

    new_in_period = rng.random(count) < 0.03
    issue = np.where(
        new_in_period,
        _day_numbers(PERIOD_START, PERIOD_END, rng, count),
        _day_numbers(date(2019, 1, 1), PERIOD_START - timedelta(days=1), rng, count),
    )
    due = issue + rng.integers(180, 3650, size=count)
    amount = rng.integers(1_000_000, 5_000_000_000, size=count) // 100 * 100
    balance = np.where(np.isin(status, ("04", "05", "06")), 0, (amount * rng.uniform(0.05, 1.0, size=count)).astype(np.int64))
    overdue_days = np.where(status == "02", rng.integers(1, 400, size=count), 0)
    grade = np.where(
        overdue_days > 90,
        _pick(("03", "04", "05"), rng, count),
        _pick(("01", "02"), rng, count, p=(0.93, 0.07)),
    )
    branch = rng.integers(0, len(BRANCHES), size=count)
    rate_micro = rng.integers(2_500_000, 8_000_000, size=count)

    fail = rng.random(count) < FAIL_SHARE
    fail[0] = False  # The first row never fails, because a duplicate key copies the previous row.
    kind = np.where(fail, rng.integers(0, len(FAILURE_KINDS), size=count), -1)
    return pl.DataFrame({
        "_kind": kind,
        "JRXKZH": np.full(count, LICENSE_NO),
        "NBJGH": np.char.add("44010", (100 + branch).astype(str)),
        "YHJGMC": np.char.add(np.char.add(INSTITUTION_NAME + "广州", np.array(BRANCHES)[branch]), "支行"),
        "MXKMBH": _pick(ACCOUNTS, rng, count),
        "KHTYBH": pick["KHTYBH"],
        "KHMC": pick["KHMC"],
        "_contract": contract,
        "JJH": np.char.add("JJ2026", np.char.zfill(np.arange(first + 1, first + count + 1).astype(str), 12)),
        "HTH": pick["HTH"],
        "XDYWZL": pick["XDYWZL"],
        "BZ": pick["BZ"],
        "_amount": amount,
        "_balance": balance,
        "_issue": issue,
        "_due": due,
        "LLLX": _pick(("01", "02"), rng, count, p=(0.4, 0.6)),
        "_rate": rate_micro,
        "DKTXHY": _pick(INDUSTRY_CODES, rng, count),
        "DKYT": _pick(PURPOSES + ("",), rng, count),
        "WJFL": grade,
        "DKZT": status,
        "HKFS": _pick(("01", "02", "03", "04", "05", "09"), rng, count),
        "DBFS": pick["DBFS"],
        "STZFBS": _pick(("Y", "N"), rng, count, p=(0.6, 0.4)),
        "_overdue": overdue_days,
        "_interest": np.where(status == "02", rng.integers(0, 50_000_000, size=count), 0),
        "_extension": due + rng.integers(90, 365, size=count),
    }).with_columns(
        _money(pl.col("_amount")).alias("JJJE"),
        _money(pl.col("_balance")).alias("JJYE"),
        _dates(pl.col("_issue")).alias("DKFFRQ"),
        _dates(pl.col("_due")).alias("DKDQRQ"),
        pl.when(pl.col("DKZT") == "03").then(_dates(pl.col("_extension"))).otherwise(None).alias("ZQDQRQ"),
        pl.format("{}.{}", pl.col("_rate") // 1_000_000, (pl.col("_rate") % 1_000_000).cast(pl.String).str.zfill(6)).alias("SJLL"),
        pl.when(pl.col("DKZT") == "02").then(pl.col("_overdue").cast(pl.String)).otherwise(None).alias("YQTS"),
        pl.when(pl.col("DKZT") == "02").then(_money(pl.col("_interest"))).otherwise(pl.lit("0.00")).alias("BNQXYE"),
        pl.lit(PERIOD_END.strftime("%Y%m%d")).alias("CJRQ"),
        pl.when(pl.col("DKZT") == "03").then(pl.lit("借款人经营周期延长，经审批展期")).otherwise(None).alias("BEIZ"),
    )


def _plant(chunk: pl.DataFrame, customers: pl.DataFrame) -> pl.DataFrame:
    """Apply one failure per failing row, by the row's ``_kind``."""
    k = pl.col("_kind")

    def when(kind: str, value: pl.Expr | str, column: str) -> pl.Expr:
        value = pl.lit(value) if isinstance(value, str) else value
        return pl.when(k == KIND_INDEX[kind]).then(value).otherwise(pl.col(column)).alias(column)

    def when_any(kinds: list[tuple[str, pl.Expr | str]], column: str) -> pl.Expr:
        expr = None
        for kind, value in kinds:
            value = pl.lit(value) if isinstance(value, str) else value
            expr = (pl.when(k == KIND_INDEX[kind]).then(value) if expr is None
                    else expr.when(k == KIND_INDEX[kind]).then(value))
        return expr.otherwise(pl.col(column)).alias(column)

    # Good rows carry the customer's own 证件类型 and 证件号码.
    owner_index = customers.select("KHTYBH", "ZJLX", "ZJHM").rename({"ZJLX": "_zjlx", "ZJHM": "_zjhm"})
    chunk = chunk.join(owner_index, on="KHTYBH", how="left", maintain_order="left")
    chunk = chunk.with_columns(
        pl.col("_zjlx").alias("ZJLX"),
        pl.col("_zjhm").alias("ZJHM"),
        # A planted row carries no remark, so a warning is not explained away.
        pl.when(k >= 0).then(None).otherwise(pl.col("BEIZ")).alias("BEIZ"),
    )
    flip_check = pl.concat_str(
        pl.col("ZJHM").str.slice(0, 17),
        pl.when(pl.col("ZJHM").str.slice(17, 1) == "0").then(pl.lit("1")).otherwise(pl.lit("0")),
    )
    chunk = chunk.with_columns(
        when("null_required", pl.lit(None, dtype=pl.String), "KHMC"),
        when("duplicate_key", pl.col("JJH").shift(1), "JJH"),
        when("bad_code", "RMB", "BZ"),
        when("bad_multi_code", "02;07", "DBFS"),
        when_any([("bad_date", "20260231"), ("history_duplicate", "20261115")], "DKFFRQ"),
        when_any([("bad_check_digit", "01"), ("too_long", "011")], "ZJLX"),
        when("bad_check_digit", flip_check, "ZJHM"),
        when("bad_license_no", "B0001H24401000", "JRXKZH"),
        when("bad_decimal", pl.format("{}0", pl.col("JJJE")), "JJJE"),
        when("bad_pattern", "C30X", "DKTXHY"),
        when_any([("due_before_issue", pl.lit("20180101")), ("extension_not_later", pl.lit("20271231")),
                  ("history_duplicate", pl.lit("20291115"))], "DKDQRQ"),
        when_any([("balance_over_amount", _money(pl.col("_amount") + 10_000)),
                  ("closed_with_balance", "1000.00")], "JJYE"),
        when("wrong_period", "20261031", "CJRQ"),
        when_any([("closed_with_balance", "04"), ("overdue_without_days", "02"), ("extension_without_date", "03"),
                  ("extension_not_later", "03"), ("overdue_classified_normal", "02")], "DKZT"),
        when_any([("negative_rate", "-1.250000"), ("high_rate", "24.500000")], "SJLL"),
        when_any([("overdue_without_days", "0"), ("overdue_classified_normal", "120")], "YQTS"),
        when_any([("overdue_classified_normal", "01")], "WJFL"),
        when_any([("extension_without_date", pl.lit(None, dtype=pl.String)), ("extension_not_later", "20270101")], "ZQDQRQ"),
        when("unknown_contract", pl.format("HTX{}", pl.col("JJH").str.slice(6)), "HTH"),
        when("unknown_customer", pl.format("KHX{}", pl.col("JJH").str.slice(6)), "KHTYBH"),
    )
    return chunk


def _cny_balance_cents(chunk: pl.DataFrame) -> int:
    """Return the sum of JJYE in cents as R-JJ-020 defines it: valid amounts of CNY loans not settled, written off or sold."""
    cents = (
        pl.col("JJYE").str.replace(r"\.", "").cast(pl.Int64, strict=False)
    )
    total = chunk.filter(
        (pl.col("BZ") == "CNY") & ~pl.col("DKZT").is_in(["04", "05", "06"])
        & pl.col("JJYE").str.contains(r"^\d{1,18}\.\d{2}$")
    ).select(cents.sum()).item()
    return int(total or 0)


# --- writing ---------------------------------------------------------------------------------------------------


def _write_text(frame: pl.DataFrame, handle, delimiter: str, header: bool) -> None:
    frame.write_csv(handle, separator=delimiter, include_header=header, quote_style="never", null_value="")


def _g01(cny_cents: int) -> pl.DataFrame:
    """Build G01 in 万元: line 7.1 RMB equals the CNY corporate loan balance, and the other lines add up."""
    loans_rmb = round(cny_cents / 100 / 10_000, 2)
    values = {
        "1": (12_000.00, 300.00), "2": (0.0, 0.0), "3": (860_000.00, 2_100.00), "4": (150_000.00, 9_000.00),
        "5": (40_000.00, 0.0), "6": (25_000.00, 0.0), "7.1": (loans_rmb, 180_000.00), "7.2": (1_200_000.00, 0.0),
        "8": (900_000.00, 30_000.00), "9": (60_000.00, 1_000.00),
        "11": (50_000.00, 0.0), "12": (300_000.00, 5_000.00), "13": (80_000.00, 2_000.00), "14": (30_000.00, 0.0),
        "15.1": (2_400_000.00, 60_000.00), "15.2": (1_900_000.00, 20_000.00), "16": (200_000.00, 0.0), "17": (90_000.00, 500.00),
    }

    values["7"] = tuple(values["7.1"][i] + values["7.2"][i] for i in range(2))
    values["15"] = tuple(values["15.1"][i] + values["15.2"][i] for i in range(2))
    values["10"] = tuple(sum(values[line][i] for line in ("1", "2", "3", "4", "5", "6", "7", "8", "9")) for i in range(2))
    values["18"] = tuple(sum(values[line][i] for line in ("11", "12", "13", "14", "15", "16", "17")) for i in range(2))
    values["19"] = tuple(values["10"][i] - values["18"][i] for i in range(2))
    values["20"] = values["10"]
    names = {
        "1": "现金", "2": "贵金属", "3": "存放中央银行款项", "4": "存放同业款项", "5": "拆放同业", "6": "买入返售资产",
        "7": "各项贷款", "7.1": "其中：对公贷款", "7.2": "其中：个人贷款", "8": "投资", "9": "其他资产", "10": "资产总计",
        "11": "向中央银行借款", "12": "同业存放款项", "13": "同业拆入", "14": "卖出回购款项", "15": "各项存款",
        "15.1": "其中：对公存款", "15.2": "其中：个人存款", "16": "应付债券", "17": "其他负债", "18": "负债合计",
        "19": "所有者权益合计", "20": "负债及所有者权益合计",
    }

    lines = list(names)
    return pl.DataFrame({
        "JRXKZH": [LICENSE_NO] * len(lines),
        "XMDM": lines,
        "XMMC": [names[line] for line in lines],
        "RMB": [f"{values[line][0]:.2f}" for line in lines],
        "WBZRMB": [f"{values[line][1]:.2f}" for line in lines],
        "BWBHJ": [f"{values[line][0] + values[line][1]:.2f}" for line in lines],
        "CJRQ": [PERIOD_END.strftime("%Y%m%d")] * len(lines),
        "BEIZ": [None] * len(lines),
    }, schema_overrides={"BEIZ": pl.String})


def _previous_period(chunk: pl.DataFrame) -> pl.DataFrame:
    """Return the accepted rows of 2026-10: the good loans issued before this period and the planted history duplicates."""
    previous = chunk.filter(
        ((pl.col("_kind") == -1) & (pl.col("_issue") < (PERIOD_START - _EPOCH).days))
        | (pl.col("_kind") == KIND_INDEX["history_duplicate"])
    )
    return previous.with_columns(
        pl.when(pl.col("DKZT").is_in(["04", "05", "06"]))
        .then(pl.col("_amount") // 3)
        .otherwise(pl.min_horizontal(pl.col("_amount"), pl.col("_balance") * 102 // 100))
        .pipe(_money)
        .alias("JJYE"),
        pl.when(pl.col("_kind") == KIND_INDEX["history_duplicate"]).then(pl.lit("20260915")).otherwise(pl.col("DKFFRQ")).alias("DKFFRQ"),
        pl.when(pl.col("DKZT").is_in(["04", "05", "06"])).then(pl.lit("01")).otherwise(pl.col("DKZT")).alias("DKZT"),
        pl.lit(PREVIOUS_END.strftime("%Y%m%d")).alias("CJRQ"),
        pl.lit(PREVIOUS_END.strftime("%Y%m%d")).alias("_period"),
    ).select(*LOAN_COLUMNS, "_period")


def estimate_rows(scale_bytes: int, seed: int = 20261130) -> int:
    """Estimate the rows that make a loan file of about ``scale_bytes`` bytes, from a sample of 20,000 rows."""
    rng = np.random.default_rng(seed)
    customers = _customers(rng, 4_000)
    contracts = _contracts(rng, 10_000, customers)
    sample = _plant(_loan_chunk(rng, 0, 20_000, contracts), customers).select(LOAN_COLUMNS)
    per_row = len(sample.write_csv(separator="|", include_header=False, quote_style="never").encode("utf-8")) / sample.height
    return max(1_000, int(scale_bytes / per_row))


def generate(directory: Path, rows: int = 1_000_000, seed: int = 20261130, log=print) -> DataSet:
    """Write the data set into ``directory`` (created if missing) and return its description."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "warehouse").mkdir(exist_ok=True)
    data = DataSet(
        directory=directory,
        loans=directory / "EAST_DGXDYWJJB.txt",
        contracts=directory / "EAST_XDHTB.txt",
        customers=directory / "EAST_DGKHXXB.txt",
        g01=directory / "G01.csv",
        warehouse=directory / "warehouse" / "EAST_DGXDYWJJB-202610.parquet",
        rows=rows,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    customers = _customers(rng, max(200, rows // 5))
    contracts = _contracts(rng, max(500, rows // 2), customers)
    with data.customers.open("wb") as handle:
        _write_text(customers, handle, "|", True)
    with data.contracts.open("wb") as handle:
        _write_text(contracts.select(CONTRACT_COLUMNS), handle, "|", True)
    data.customer_rows, data.contract_rows = customers.height, contracts.height

    planted = {name: 0 for name, _, _ in FAILURE_KINDS}
    cny_cents = 0
    writer = None
    chunks = (rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    with data.loans.open("wb") as handle:
        for number in range(chunks):
            first = number * CHUNK_ROWS
            count = min(CHUNK_ROWS, rows - first)
            chunk = _plant(_loan_chunk(rng, first, count, contracts), customers)
            for kind, amount in chunk.group_by("_kind").len().iter_rows():
                if kind >= 0:
                    planted[FAILURE_KINDS[kind][0]] += amount
            cny_cents += _cny_balance_cents(chunk)
            _write_text(chunk.select(LOAN_COLUMNS), handle, "|", number == 0)
            previous = _previous_period(chunk).to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(data.warehouse, previous.schema, compression="zstd")
            writer.write_table(previous)
            data.warehouse_rows += previous.num_rows
            if log and chunks > 1:
                log(f"  generated {first + count:,} of {rows:,} rows")
    if writer is not None:
        writer.close()
    with data.g01.open("wb") as handle:
        _write_text(_g01(cny_cents), handle, ",", True)
    data.planted = planted
    data.cny_balance = f"{cny_cents // 100}.{cny_cents % 100:02d}"
    data.size = data.loans.stat().st_size
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--scale-bytes", type=int, default=None, help="build a loan file of about this many bytes instead")
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args(argv)
    rows = estimate_rows(args.scale_bytes, args.seed) if args.scale_bytes else args.rows
    data = generate(args.out_dir, rows, args.seed)
    print(data.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
