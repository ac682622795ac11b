"""Tests of intake.validate: staged report files checked against the shipped templates in DuckDB."""

from __future__ import annotations

import csv
import itertools
import random
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stdnum import luhn
from stdnum.cn import ric, uscc

from intake.check import check_file
from intake.check_digits import register as register_check_digits
from intake.reader import RowFinding, StagedFile, read_received, stage_file
from intake.template_model import Template, TemplateCatalog
from intake.validate import (
    FINDINGS_SCHEMA,
    ValidationContext,
    ValidationResult,
    _ascii_only_pattern,
    _date_sql,
    _multi_codes_pattern,
    _part_sizes,
    check_sql,
    memory_bytes,
    validate_staged,
)

LICENSE = "B0001H111000001"
OTHER_LICENSE = "B0002H222000002"
PERIOD_START = date(2024, 1, 1)
PERIOD_END = date(2024, 1, 31)
PREVIOUS_PERIOD = "20231231"
CUSTOMER_USCC = "91110000600037341L"


# --- building files ---------------------------------------------------------------------------


def loan_row(number: int = 1, **changes: str) -> dict[str, str]:
    row = {
        "JRXKZH": LICENSE,
        "NBJGH": "001",
        "YHJGMC": "测试银行北京分行",
        "MXKMBH": "130101",
        "KHTYBH": f"C{number:04d}",
        "KHMC": "北京测试科技有限公司",
        "ZJLX": "01",
        "ZJHM": CUSTOMER_USCC,
        "JJH": f"JJ{number:06d}",
        "HTH": f"HT{number:06d}",
        "XDYWZL": "01",
        "BZ": "CNY",
        "JJJE": "1000000.00",
        "JJYE": "800000.00",
        "DKFFRQ": "20230115",
        "DKDQRQ": "20250115",
        "ZQDQRQ": "",
        "LLLX": "01",
        "SJLL": "4.35",
        "DKTXHY": "C13",
        "DKYT": "流动资金周转",
        "WJFL": "01",
        "DKZT": "01",
        "HKFS": "03",
        "DBFS": "02;03",
        "STZFBS": "N",
        "YQTS": "0",
        "BNQXYE": "0.00",
        "CJRQ": "20240131",
        "BEIZ": "",
    }
    row.update(changes)
    return row


def contract_row(number: int = 1, **changes: str) -> dict[str, str]:
    row = {
        "JRXKZH": LICENSE,
        "NBJGH": "001",
        "HTH": f"HT{number:06d}",
        "KHTYBH": f"C{number:04d}",
        "KHMC": "北京测试科技有限公司",
        "XDYWZL": "01",
        "BZ": "CNY",
        "HTJE": "1000000.00",
        "HTQSRQ": "20230110",
        "HTDQRQ": "20250115",
        "HTZT": "01",
        "DBFS": "02",
        "DBHTH": "",
        "SFXHDK": "N",
        "XDYGH": "E001",
        "CJRQ": "20240131",
        "BEIZ": "",
    }
    row.update(changes)
    return row


def customer_row(number: int = 1, **changes: str) -> dict[str, str]:
    row = {
        "JRXKZH": LICENSE,
        "NBJGH": "001",
        "KHTYBH": f"C{number:04d}",
        "KHMC": "北京测试科技有限公司",
        "ZJLX": "01",
        "ZJHM": CUSTOMER_USCC,
        "ZCDZ": "北京市西城区金融大街 1 号",
        "XZQHDM": "110102",
        "SSHY": "C13",
        "QYGM": "02",
        "ZCZB": "5000000.00",
        "ZCZBBZ": "CNY",
        "CLRQ": "20100101",
        "FDDBRXM": "张三丰",
        "FDDBRZJLX": "01",
        "FDDBRZJHM": "11010519491231002X",
        "CWLXRSJ": "13812345678",
        "SFJTKH": "N",
        "JLKHGXRQ": "20150101",
        "CJRQ": "20240131",
        "BEIZ": "",
    }
    row.update(changes)
    return row


def g01_rows(loans_rmb_wan: str, **lines: str) -> list[dict[str, str]]:
    values = {"7": loans_rmb_wan, "7.1": loans_rmb_wan, "7.2": "0", **lines}
    return [
        {
            "JRXKZH": LICENSE, "XMDM": code, "XMMC": "项目", "RMB": amount, "WBZRMB": "0", "BWBHJ": amount,
            "CJRQ": "20240131", "BEIZ": "",
        }
        for code, amount in values.items()
    ]


def write_text(template: Template, rows: Iterable[Mapping[str, str]], path: Path) -> Path:
    codes = [item.code for item in template.fields]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        if template.file.delimiter == ",":
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(codes)
            for row in rows:
                writer.writerow([row.get(code, "") for code in codes])
        else:
            handle.write("|".join(codes) + "\n")
            for row in rows:
                handle.write("|".join(row.get(code, "") for code in codes) + "\n")
    return path


def stage(tmp_path: Path, template: Template, rows: Iterable[Mapping[str, str]], name: str | None = None) -> StagedFile:
    folder = tmp_path / "staging"
    folder.mkdir(exist_ok=True)
    name = name or f"{template.code}.txt"
    source = write_text(template, rows, tmp_path / name)
    return stage_file(source, name, template.file_layout(), folder)


def batch_for(tmp_path: Path, catalog: TemplateCatalog, loans: list[dict[str, str]], *, g01_wan: str | None = None,
              contracts: list[dict[str, str]] | None = None) -> dict[str, Path]:
    """Contracts and customers for every loan row, and a G01 when ``g01_wan`` is given."""
    contract = catalog.get("EAST_XDHTB")
    customer = catalog.get("EAST_DGKHXXB")
    contract_rows = contracts if contracts is not None else [
        contract_row(HTH=row["HTH"], KHTYBH=row["KHTYBH"]) for row in loans
    ]
    customer_rows = [customer_row(KHTYBH=key) for key in sorted({row["KHTYBH"] for row in loans})]
    batch = {
        "EAST_XDHTB": stage(tmp_path, contract, contract_rows).path,
        "EAST_DGKHXXB": stage(tmp_path, customer, customer_rows).path,
    }
    if g01_wan is not None:
        batch["G01"] = stage(tmp_path, catalog.get("G01"), g01_rows(g01_wan), name="G01.csv").path
    return batch


def context(batch: Mapping[str, Path] | None = None, warehouse: Mapping[str, list[Path]] | None = None,
            **changes: Any) -> ValidationContext:
    values: dict[str, Any] = {
        "period_end": PERIOD_END,
        "period_start": PERIOD_START,
        "institution_identifiers": frozenset({LICENSE}),
        "batch": batch or {},
        "warehouse": warehouse or {},
        "threads": 2,
    }
    values.update(changes)
    return ValidationContext(**values)


def warehouse_file(path: Path, template: Template, rows: Iterable[Mapping[str, str]], period: str) -> Path:
    codes = [item.code for item in template.fields]
    rows = list(rows)
    table = pa.table(
        {**{code: pa.array([row.get(code, "") for row in rows], pa.string()) for code in codes},
         "_period": pa.array([period] * len(rows), pa.string())}
    )
    pq.write_table(table, path)
    return path


def findings(result: ValidationResult) -> list[dict[str, Any]]:
    return pq.read_table(result.findings_path).to_pylist()


def by_rule(result: ValidationResult, rule_id: str) -> list[dict[str, Any]]:
    return [row for row in findings(result) if row["rule_id"] == rule_id]


def comparable(result: ValidationResult) -> dict[str, Any]:
    """Return every part of a validation result that reaches the reporter, to compare two ways of validating."""
    return {
        "findings": findings(result),
        "counts": dict(result.counts),
        "explained": result.explained_warnings,
        "rule_counts": dict(result.rule_counts),
        "rows": result.rows_checked,
        "skipped": result.skipped_rules,
        "field_values": dict(result.field_values),
    }


def run(tmp_path: Path, template: Template, rows: list[dict[str, str]], ctx: ValidationContext,
        catalog: TemplateCatalog | None = None) -> ValidationResult:
    """Validate through the staging file, and check that validating the text in place finds the same."""
    staged = stage(tmp_path, template, rows)
    result = validate_staged(staged, template, ctx, tmp_path / "work", catalog=catalog)
    name = f"{template.code}.txt"
    checked = check_file(read_received(tmp_path / name), name, template, ctx, tmp_path / "in-place", catalog=catalog)
    if template.file.delimiter == "|":
        assert checked.staging_path is None, "a well-formed | file should be validated in place"
    assert comparable(checked.result) == comparable(result)
    return result


@pytest.fixture
def clean_batch(tmp_path: Path, catalog: TemplateCatalog) -> tuple[list[dict[str, str]], dict[str, Path]]:
    loans = [loan_row(1), loan_row(2)]
    return loans, batch_for(tmp_path, catalog, loans, g01_wan="160")


# --- the whole file ---------------------------------------------------------------------------------


def test_clean_file_has_no_findings(tmp_path: Path, loan: Template, catalog: TemplateCatalog, clean_batch) -> None:
    loans, batch = clean_batch
    result = run(tmp_path, loan, loans, context(batch), catalog)
    assert findings(result) == []
    assert result.accepted_possible
    assert result.errors == 0
    assert result.warnings == 0
    assert result.rows_checked == 2
    assert pq.read_schema(result.findings_path).names == FINDINGS_SCHEMA.names
    # no warehouse: history uniqueness and fluctuation are skipped with a reason
    skipped = {item.rule_id: item.reason for item in result.skipped_rules}
    assert set(skipped) == {"R-JJ-004", "R-JJ-021"}
    assert "以前期次" in skipped["R-JJ-004"]
    assert "上期（20231231）" in skipped["R-JJ-021"]


def test_findings_file_columns_and_counts(tmp_path: Path, loan: Template, catalog: TemplateCatalog, clean_batch) -> None:
    loans, batch = clean_batch
    loans = [*loans, loan_row(3, JJYE="2000000.00", SJLL="30", BEIZ="")]
    batch = batch_for(tmp_path, catalog, loans, g01_wan="360")
    result = run(tmp_path, loan, loans, context(batch), catalog)
    rows = findings(result)
    assert {row["rule_id"] for row in rows} == {"R-JJ-009", "R-JJ-015"}
    assert result.counts == {"error": 1, "warning": 1}
    assert result.rule_counts == {"R-JJ-009": 1, "R-JJ-015": 1}
    assert not result.accepted_possible
    assert result.seconds > 0
    error = next(row for row in rows if row["rule_id"] == "R-JJ-009")
    assert error["line"] == 4  # header is line 1
    assert error["field_code"] == "JJYE"
    assert error["field_name"] == "借据余额"
    assert error["value"] == "2000000.00"
    assert error["rule_kind"] == "compare"
    assert error["severity"] == "error"
    assert "借据金额" in error["message"]
    assert "2000000.00" in error["message"]


# --- one test per rule kind ---------------------------------------------------------------------------


def test_not_null(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1), loan_row(2, NBJGH=""), loan_row(3, DKZT="03", ZQDQRQ=""), loan_row(4, DKZT="03", ZQDQRQ="20260115")]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    missing = by_rule(result, "R-JJ-001")
    assert [(row["line"], row["field_code"]) for row in missing] == [(3, "NBJGH")]
    assert "内部机构号" in missing[0]["message"]
    assert "为空" in missing[0]["message"]
    extension = by_rule(result, "R-JJ-002")
    assert [row["line"] for row in extension] == [4]


def test_field_values_count_non_empty(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [
        loan_row(1),
        loan_row(2, DKYT="   ", ZJLX="  ", BEIZ="说明"),
        loan_row(3, KHMC="", YQTS="", ZQDQRQ="20260115"),
        loan_row(4, DKYT="\u3000", BNQXYE=""),
    ]
    batch = batch_for(tmp_path, catalog, loans)

    result = run(tmp_path, loan, loans, context(batch), catalog)

    # Blank cells in these four rows, by field: the defaults leave ZQDQRQ and BEIZ blank, and DKYT of
    # rows 2 and 4 holds only spaces (U+3000 in row 4).
    blanks = {"DKYT": 2, "ZJLX": 1, "BEIZ": 3, "KHMC": 1, "YQTS": 1, "ZQDQRQ": 3, "BNQXYE": 1}
    assert list(result.field_values) == [item.code for item in loan.fields]
    assert result.field_values == {item.code: 4 - blanks.get(item.code, 0) for item in loan.fields}
    assert sum(result.field_values.values()) == 4 * len(loan.fields) - 12
    assert "field_counts" in result.step_seconds


def test_unique_in_file(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1), loan_row(2), loan_row(3, JJH="JJ000001")]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    duplicates = by_rule(result, "R-JJ-003")
    assert sorted(row["line"] for row in duplicates) == [2, 4]
    assert all("出现 2 次" in row["message"] and "第 2 行" in row["message"] for row in duplicates)
    assert "AUTO-UNIQUE-PK" not in result.rule_counts  # R-JJ-003 covers the primary key


def test_code_list_and_multi_values(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1), loan_row(2, BZ="RMB"), loan_row(3, DBFS="02;07"), loan_row(4, DBFS="02;")]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    currency = by_rule(result, "R-JJ-005")
    assert [(row["line"], row["value"]) for row in currency] == [(3, "RMB")]
    assert "CNY 人民币" in currency[0]["message"]
    guarantee = by_rule(result, "AUTO-CODELIST-DBFS")
    assert [row["line"] for row in guarantee] == [4, 5]
    assert "“07”" in guarantee[0]["message"]


def test_format_types_and_check_digits(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [
        loan_row(1),
        loan_row(2, DKFFRQ="20230230"),
        loan_row(3, DKDQRQ="2025-01-15"),
        loan_row(4, JJJE="1000000.123"),
        loan_row(5, ZJHM="91110000600037341A"),
        loan_row(6, ZJLX="03", ZJHM="91110000600037341A"),  # check applies to 统一社会信用代码 only
        loan_row(7, YQTS="1.5"),
        loan_row(8, MXKMBH="13-01"),
        loan_row(9, JRXKZH="B0001H11100000"),
    ]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    by_line = {(row["line"], row["rule_id"]): row for row in findings(result)}
    assert "不是有效的日历日期" in by_line[(3, "R-JJ-007")]["message"]
    assert "去掉分隔符" in by_line[(4, "R-JJ-007")]["message"]
    assert "小数超过 2 位" in by_line[(5, "AUTO-FORMAT-JJJE")]["message"]
    assert "校验码" in by_line[(6, "R-JJ-006")]["message"]
    assert not any(line == 7 for line, _rule in by_line)
    assert "不是整数" in by_line[(8, "AUTO-FORMAT-YQTS")]["message"]
    assert "正则表达式" in by_line[(9, "AUTO-FORMAT-MXKMBH")]["message"]
    assert "15 位" in by_line[(10, "R-JJ-007")]["message"]


def test_invalid_values_do_not_add_compare_findings(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    # DKFFRQ invalid: no R-JJ-008/011 on top; JJYE invalid: no R-JJ-009 on top
    loans = [loan_row(1, DKFFRQ="20231301"), loan_row(2, JJYE="abc")]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    assert sorted((row["line"], row["rule_id"]) for row in findings(result)) == [
        (2, "R-JJ-007"), (3, "AUTO-FORMAT-JJYE"),
    ]
    # the reconcile over JJYE is skipped instead of comparing a wrong total
    assert any(item.rule_id == "R-JJ-020" and "不是有效数值" in item.reason for item in result.skipped_rules)


def test_thousands_separators(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1, JJJE="1,234,567.89", JJYE="1,000.00")]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    amount = by_rule(result, "AUTO-FORMAT-JJJE")[0]
    assert amount["value"] == "1,234,567.89"
    assert "千位分隔符" in amount["message"]
    assert "1234567.89" in amount["message"]
    assert "去掉逗号" in amount["message"]
    assert by_rule(result, "AUTO-FORMAT-JJYE")
    assert not by_rule(result, "R-JJ-009")


def test_compare_kinds(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [
        loan_row(1),
        loan_row(2, DKDQRQ="20220101"),  # R-JJ-008 due before issue
        loan_row(3, CJRQ="20240130"),  # R-JJ-010 period end
        loan_row(4, DKZT="04", JJYE="5.00"),  # R-JJ-013 settled with balance (when in)
        loan_row(5, DKZT="04", JJYE="0"),  # passes R-JJ-013
        loan_row(6, YQTS="120", WJFL="02"),  # R-JJ-016 values in, warning
        loan_row(7, DKZT="02", YQTS="0"),  # R-JJ-017
    ]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    got = sorted((row["line"], row["rule_id"]) for row in findings(result) if row["rule_kind"] == "compare")
    assert got == [(3, "R-JJ-008"), (4, "R-JJ-010"), (5, "R-JJ-013"), (7, "R-JJ-016"), (8, "R-JJ-017")]
    period = next(row for row in by_rule(result, "R-JJ-010"))
    assert "本期期末日期" in period["message"]
    assert "20240131" in period["message"]


def test_date_compare_edge_cases(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    # Date comparisons test the YYYYMMDD text first: results must equal comparing the dates.
    loans = [
        loan_row(1, DKDQRQ="20230115"),  # equal dates pass R-JJ-008 (>=)
        loan_row(2, DKDQRQ="20230114"),  # one day early fails R-JJ-008
        loan_row(3, DKDQRQ="20230230"),  # invalid date: R-JJ-007 only
        loan_row(4, DKFFRQ="2023-01-15"),  # invalid date: R-JJ-007 only
        loan_row(5, DKDQRQ="", ZQDQRQ="20250116"),  # empty operand of R-JJ-008 and R-JJ-012
        loan_row(6, DKFFRQ="20240201"),  # later than CJRQ fails R-JJ-011
        loan_row(7, CJRQ="20240131 "),  # trimmed, so it is the period end
        loan_row(8, ZQDQRQ="20250115"),  # not later than DKDQRQ fails R-JJ-012
    ]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    got = sorted(
        (row["line"], row["rule_id"]) for row in findings(result)
        if row["rule_id"] in ("R-JJ-007", "R-JJ-008", "R-JJ-010", "R-JJ-011", "R-JJ-012")
    )
    assert got == [(3, "R-JJ-008"), (4, "R-JJ-007"), (5, "R-JJ-007"), (7, "R-JJ-011"), (9, "R-JJ-012")]


def test_compare_sum_with_tolerance(tmp_path: Path, catalog: TemplateCatalog) -> None:
    g01 = catalog.get("G01")
    rows = g01_rows("100")
    rows[0]["BWBHJ"] = "100.01"  # within 0.01
    rows[1]["BWBHJ"] = "100.02"  # outside
    result = run(tmp_path, g01, rows, context(), catalog)
    assert [row["line"] for row in by_rule(result, "R-G01-003")] == [3]


def test_reference_batch_and_warehouse(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1), loan_row(2), loan_row(3)]
    contracts = [contract_row(HTH="HT000001", KHTYBH="C0001")]
    batch = batch_for(tmp_path, catalog, loans, contracts=contracts)
    contract = catalog.get("EAST_XDHTB")
    warehouse = {
        "EAST_XDHTB": [
            warehouse_file(tmp_path / "wh_same.parquet", contract, [contract_row(HTH="HT000002")], "20240131"),
            warehouse_file(tmp_path / "wh_old.parquet", contract, [contract_row(HTH="HT000003")], "20231231"),
        ]
    }
    result = run(tmp_path, loan, loans, context(batch, warehouse), catalog)
    missing = by_rule(result, "R-JJ-018")
    # HT000002 is in the accepted data of the same period; HT000003 only in an earlier period
    assert [(row["line"], row["field_code"], row["value"]) for row in missing] == [(4, "HTH", "HT000003")]
    assert "信贷合同表" in missing[0]["message"]
    assert missing[0]["rule_kind"] == "reference"


def test_reference_without_target_fails_rows(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1), loan_row(2)]
    batch = batch_for(tmp_path, catalog, loans)
    del batch["EAST_XDHTB"]
    result = run(tmp_path, loan, loans, context(batch), catalog)
    missing = by_rule(result, "R-JJ-018")
    assert [(row["line"], row["value"]) for row in missing] == [(2, "HT000001"), (3, "HT000002")]
    assert "一并报送包含该记录的信贷合同表" in missing[0]["message"]
    assert "R-JJ-018" not in {item.rule_id for item in result.skipped_rules}


def test_other_institution_row(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1), loan_row(2, JRXKZH=OTHER_LICENSE)]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    rows = by_rule(result, "AUTO-INSTITUTION-JRXKZH")
    assert [row["line"] for row in rows] == [3]
    assert rows[0]["severity"] == "error"
    assert OTHER_LICENSE in rows[0]["message"]
    assert "其他机构" in rows[0]["message"]


def test_own_identifier_in_wrong_format(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    # the scan decides the format of the own identifiers once; a malformed one still fails on every row
    malformed = "b0001h111000001"
    loans = [loan_row(1, JRXKZH=malformed), loan_row(2, JRXKZH=malformed), loan_row(3, JRXKZH=LICENSE)]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch, institution_identifiers=frozenset({malformed, LICENSE})), catalog)
    rows = [row for row in findings(result) if row["field_code"] == "JRXKZH" and row["rule_kind"] == "format"]
    assert [row["line"] for row in rows] == [2, 3]
    assert by_rule(result, "AUTO-INSTITUTION-JRXKZH") == []


def test_explained_warning(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1, SJLL="26.5"), loan_row(2, SJLL="25", BEIZ="经总行批准的特殊定价")]
    batch = batch_for(tmp_path, catalog, loans)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    rows = by_rule(result, "R-JJ-015")
    assert [(row["line"], row["severity"], row["explained"]) for row in rows] == [
        (2, "warning", False), (3, "warning", True),
    ]
    assert result.warnings == 2
    assert result.explained_warnings == 1
    assert result.accepted_possible
    assert "备注" in rows[0]["message"]


def test_history_unique_against_warehouse(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [
        loan_row(1, DKFFRQ="20240105"),  # new loan whose number was already accepted earlier
        loan_row(2, DKFFRQ="20240106"),  # new loan, new number
        loan_row(3),  # old loan: rule applies to new loans only
    ]
    batch = batch_for(tmp_path, catalog, loans)
    earlier = [loan_row(1), loan_row(3)]
    warehouse = {"EAST_DGXDYWJJB": [warehouse_file(tmp_path / "loans.parquet", loan, earlier, PREVIOUS_PERIOD)]}
    result = run(tmp_path, loan, loans, context(batch, warehouse), catalog)
    rows = by_rule(result, "R-JJ-004")
    assert [(row["line"], row["value"], row["severity"]) for row in rows] == [(2, "JJ000001", "warning")]
    assert "以前期次" in rows[0]["message"]


def test_fluctuation_against_previous_period(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1, JJYE="800000.00"), loan_row(2, JJYE="800000.00")]
    batch = batch_for(tmp_path, catalog, loans)
    for previous, flagged in (("1000000.00", True), ("1300000.00", False)):
        work = tmp_path / f"case{previous}"
        work.mkdir()
        baseline = [loan_row(1, JJYE=previous, CJRQ=PREVIOUS_PERIOD)]
        warehouse = {"EAST_DGXDYWJJB": [warehouse_file(work / "loans.parquet", loan, baseline, PREVIOUS_PERIOD)]}
        result = run(work, loan, loans, context(batch, warehouse), catalog)
        rows = by_rule(result, "R-JJ-021")
        assert bool(rows) is flagged
        assert "R-JJ-021" not in {item.rule_id for item in result.skipped_rules}
        if flagged:
            (row,) = rows
            assert row["line"] is None
            assert row["severity"] == "warning"
            assert not row["explained"]
            assert "1600000" in row["message"]
            assert "+60.00%" in row["message"]


def test_fluctuation_without_previous_period_is_skipped(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1)]
    batch = batch_for(tmp_path, catalog, loans)
    older = [loan_row(1, JJYE="1.00")]
    warehouse = {"EAST_DGXDYWJJB": [warehouse_file(tmp_path / "loans.parquet", loan, older, "20231130")]}
    result = run(tmp_path, loan, loans, context(batch, warehouse), catalog)
    assert not by_rule(result, "R-JJ-021")
    reason = next(item.reason for item in result.skipped_rules if item.rule_id == "R-JJ-021")
    assert reason.startswith("未找到上期（20231231）")


@pytest.mark.parametrize(
    ("g01_wan", "flagged"),
    [("160", False), ("160.9", False), ("162", True), ("150", True)],
)
def test_reconcile_with_g01_in_batch(tmp_path: Path, loan: Template, catalog: TemplateCatalog,
                                     g01_wan: str, flagged: bool) -> None:
    # loans: 2 × 800,000 CNY = 1,600,000 元; a settled loan and a USD loan do not count
    loans = [loan_row(1), loan_row(2), loan_row(3, DKZT="04", JJYE="0"), loan_row(4, BZ="USD")]
    batch = batch_for(tmp_path, catalog, loans, g01_wan=g01_wan)
    result = run(tmp_path, loan, loans, context(batch), catalog)
    rows = by_rule(result, "R-JJ-020")
    assert bool(rows) is flagged
    if flagged:
        assert rows[0]["line"] is None
        assert rows[0]["rule_kind"] == "reconcile"
        assert "1600000" in rows[0]["message"]
        assert "7.1" in rows[0]["message"]


def test_reconcile_with_g01_in_warehouse(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1)]
    batch = batch_for(tmp_path, catalog, loans)
    g01 = catalog.get("G01")
    warehouse = {"G01": [warehouse_file(tmp_path / "g01.parquet", g01, g01_rows("100"), "20240131")]}
    result = run(tmp_path, loan, loans, context(batch, warehouse), catalog)
    rows = by_rule(result, "R-JJ-020")
    assert len(rows) == 1
    assert "已接受的同期" in rows[0]["message"]


def test_reconcile_without_g01_is_skipped(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    loans = [loan_row(1)]
    batch = batch_for(tmp_path, catalog, loans)
    g01 = catalog.get("G01")
    # a G01 of another period does not count
    warehouse = {"G01": [warehouse_file(tmp_path / "g01.parquet", g01, g01_rows("80"), "20231231")]}
    result = run(tmp_path, loan, loans, context(batch, warehouse), catalog)
    assert not by_rule(result, "R-JJ-020")
    reason = next(item.reason for item in result.skipped_rules if item.rule_id == "R-JJ-020")
    assert reason == "未找到同期 G01 报表（资产负债项目统计表），跨表核对未执行"


def test_reconcile_within_one_report(tmp_path: Path, catalog: TemplateCatalog) -> None:
    g01 = catalog.get("G01")
    rows = g01_rows("100", **{"1": "10", "10": "110", "20": "110"})
    result = run(tmp_path, g01, rows, context(), catalog)
    assert not by_rule(result, "R-G01-004")
    assert not by_rule(result, "R-G01-006")
    other = tmp_path / "other"
    other.mkdir()
    rows = g01_rows("100", **{"1": "10", "10": "111", "20": "110"})
    result = run(other, g01, rows, context(), catalog)
    assert len(by_rule(result, "R-G01-004")) == 1
    assert len(by_rule(result, "R-G01-006")) == 1


# --- masking ----------------------------------------------------------------------------------------------


def test_personal_values_are_masked(tmp_path: Path, catalog: TemplateCatalog) -> None:
    customer = catalog.get("EAST_DGKHXXB")
    bad_id = "110105194912310021"  # wrong check digit
    rows = [
        customer_row(1),
        customer_row(2, FDDBRZJHM=bad_id, CWLXRSJ="12812345678", FDDBRXM="欧阳修文"),
        customer_row(3, FDDBRZJHM=bad_id, BEIZ="=HYPERLINK(1)", FDDBRXM=""),
    ]
    result = run(tmp_path, customer, rows, context(), catalog)
    rows_found = findings(result)
    identity = [row for row in rows_found if row["rule_id"] == "R-KH-005"]
    assert [row["value"] for row in identity] == ["110105********0021", "110105********0021"]
    mobile = by_rule(result, "AUTO-FORMAT-CWLXRSJ")[0]
    assert mobile["value"] == "128****5678"
    name = by_rule(result, "AUTO-NOTNULL-FDDBRXM")
    assert [row["line"] for row in name] == [4]
    for row in rows_found:
        for raw in (bad_id, "12812345678", "欧阳修文"):
            assert raw not in (row["value"] or "") and raw not in row["message"]
        if row["field_code"] == "FDDBRXM" and row["value"]:
            assert row["value"].startswith("欧")
            assert "阳" not in row["value"]


def test_mask_value_examples() -> None:
    from intake.validate import mask_value

    assert mask_value("resident_id", "11010519491231002X") == "110105********002X"
    assert mask_value("bank_card", "6222021234567890123") == "622202*********0123"
    assert mask_value("mobile", "13812345678") == "138****5678"
    assert mask_value("name", "张三") == "张*"
    assert mask_value("resident_id", "12345") == "*****"


def test_reader_findings_are_merged_and_masked(tmp_path: Path, catalog: TemplateCatalog) -> None:
    customer = catalog.get("EAST_DGKHXXB")
    staged = stage(tmp_path, customer, [customer_row(1)])
    raw = "110105194912310000"
    finding = RowFinding(2, "FDDBRZJHM", "法定代表人证件号码", raw, "XLSX_NUMBER_PRECISION_LOST",
                         f"第 2 行单元格读出的值为 {raw}，Excel 只保留 15 位有效数字。")
    staged = StagedFile(**{**staged.__dict__, "findings": (finding,), "findings_omitted": 3})
    result = validate_staged(staged, customer, context(), tmp_path / "work", catalog=catalog)
    rows = by_rule(result, "XLSX_NUMBER_PRECISION_LOST")
    assert len(rows) == 1
    assert rows[0]["value"] == "110105********0000"
    assert raw not in rows[0]["message"]
    assert rows[0]["severity"] == "error"
    assert rows[0]["rule_kind"] == "reader"
    assert by_rule(result, "READER-FINDINGS-OMITTED")
    assert not result.accepted_possible


# --- check digits against python-stdnum -----------------------------------------------------------


def _ric_reference(value: str) -> bool:
    """python-stdnum without its area-code lookup, which rejects many real numbers."""
    if len(value) != 18 or not value[:17].isdigit() or value != value.upper():
        return False
    if value[-1] != ric.calc_check_digit(value):
        return False
    try:
        ric.get_birth_date(value)
    except Exception:
        return False
    return True


def _corrupt(rng: random.Random, value: str, alphabet: str) -> str:
    choice = rng.randrange(5)
    position = rng.randrange(len(value))
    if choice == 0:  # change one character
        return value[:position] + rng.choice(alphabet) + value[position + 1 :]
    if choice == 1:  # swap neighbours
        position = min(position, len(value) - 2)
        return value[:position] + value[position + 1] + value[position] + value[position + 2 :]
    if choice == 2:  # drop a character
        return value[:position] + value[position + 1 :]
    if choice == 3:  # add a character
        return value[:position] + rng.choice(alphabet) + value[position:]
    return value[:-1] + rng.choice(alphabet)  # another check character


def _sql_results(check: str, values: list[str]) -> list[bool]:
    """The check over ``values`` in SQL; asserts that the numpy check digits of intake.check_digits agree."""
    con = duckdb.connect()
    try:
        register_check_digits(con)
        con.register("v", pa.table({"i": list(range(len(values))), "x": values}))
        results = {}
        for udf in (False, True):
            query = f"SELECT i, coalesce({check_sql(check, 'x', udf)}, false) FROM v ORDER BY i"
            results[udf] = [ok for _i, ok in con.sql(query).fetchall()]
        assert results[True] == results[False]
        return results[False]
    finally:
        con.close()


def _valid_ric(rng: random.Random) -> str:
    areas = ("110105", "310104", "440305", "510107", "330106", "420102")
    born = date(1940, 1, 1).toordinal() + rng.randrange(30_000)
    body = rng.choice(areas) + date.fromordinal(born).strftime("%Y%m%d") + f"{rng.randrange(1000):03d}"
    return body + ric.calc_check_digit(body + "0")


def test_resident_id_sql_matches_stdnum() -> None:
    rng = random.Random(11643)
    # stdnum also checks that the area code existed in the birth year; keep the numbers it accepts
    valid = [value for value in (_valid_ric(rng) for _ in range(3000)) if ric.is_valid(value)][:1500]
    assert len(valid) == 1500
    values = valid + [_corrupt(rng, value, "0123456789X") for value in valid]
    values += ["11010519491231002x", "110105194902300011", "000000000000000000", "", "11010519491231002"]
    assert _sql_results("resident_id", values) == [_ric_reference(value) for value in values]


def test_uscc_sql_matches_stdnum() -> None:
    rng = random.Random(32100)
    alphabet = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    valid = []
    for _ in range(1500):
        body = "9" + rng.choice("123") + f"{rng.randrange(10**6):06d}" + "".join(rng.choice(alphabet) for _ in range(9))
        valid.append(body + uscc.calc_check_digit(body))
    values = valid + [_corrupt(rng, value, alphabet + "IOSVZ") for value in valid]
    values += ["91110000600037341L", "91110000600037341l", "A1110000600037341L", ""]
    # a letter among the first 8 characters with a matching check character; 18 bytes that are not 18 characters
    letter_body = "9111000A600037341"
    values += [letter_body + uscc.calc_check_digit(letter_body), "é110000600037341L", "９1110000600037341L"]
    expected = [
        uscc.is_valid(value) and value.isascii() and value == value.upper() and " " not in value and "-" not in value
        for value in values
    ]
    assert _sql_results("uscc", values) == expected
    assert sum(expected) >= 1500


def test_bank_card_sql_matches_luhn() -> None:
    rng = random.Random(7)
    valid = []
    for _ in range(1500):
        body = "62" + "".join(rng.choice("0123456789") for _ in range(rng.randrange(11, 18)))
        valid.append(body + luhn.calc_check_digit(body))
    values = valid + [_corrupt(rng, value, "0123456789") for value in valid] + ["", "4111111111111111", "12345678901234567890"]
    expected = [value.isdigit() and 13 <= len(value) <= 19 and luhn.is_valid(value) for value in values]
    assert _sql_results("bank_card", values) == expected


def test_mobile_sql() -> None:
    values = ["13812345678", "19912345678", "12812345678", "1381234567", "138123456789", "2381234567a", ""]
    assert _sql_results("mobile", values) == [True, True, False, False, False, False, False]


def _differing(values: list[str], fast: str, exact: str) -> list[tuple[str, bool, bool]]:
    """Return the values of ``values`` (column ``x``) where the SQL tests ``fast`` and ``exact`` disagree."""
    con = duckdb.connect()
    try:
        con.register("v", pa.table({"x": values}))
        return con.sql(
            f"SELECT x, coalesce({fast}, false) AS a, coalesce({exact}, false) AS b FROM v WHERE a <> b"
        ).fetchall()
    finally:
        con.close()


def test_date_sql_matches_digit_pattern() -> None:
    # try_strptime accepts some texts other than 8 digits, such as "2026113 ". Each of them has
    # whitespace at an edge, which parsing and the byte screen rule out.
    others = [" ", "\t", "+", "-", ".", ",", ":", "/", "T", "e", "_", "\u00a0", "é", "１", "\u3000"]
    values = set()
    for base in ("20261130", "20240229", "20230229", "00000101", "99999999"):
        for count in (1, 2):
            for positions in itertools.combinations(range(8), count):
                for chars in itertools.product(others, repeat=count):
                    text = list(base)
                    for position, char in zip(positions, chars, strict=True):
                        text[position] = char
                    values.add("".join(text))
        for cut in range(1, 8):
            values.update({base[:cut], base[:cut] + " " + base[cut:], base[:cut] + base[cut + 1 :], base + base[:cut]})
    values = sorted(value for value in values if value == value.strip())
    assert len(values) > 25_000
    exact = "(regexp_full_match(x, '[0-9]{8}') AND try_strptime(x, '%Y%m%d') IS NOT NULL)"
    assert _differing(values, f"({_date_sql('x')} IS NOT NULL)", exact) == []


def test_multi_code_pattern_matches_split() -> None:
    codes = ["01", "02", "a.b", "(x)", "中", "09"]
    pattern = _multi_codes_pattern(codes)
    assert pattern is not None
    pieces = [*codes, "", "03", "a", "ab", "0", "010", "a.bb", "x"]
    values = sorted({";".join(parts) for count in (1, 2, 3) for parts in itertools.product(pieces, repeat=count)})
    allowed = ", ".join("'" + code + "'" for code in codes)
    split = f"list_bool_and(list_transform(string_split(x, ';'), lambda e: coalesce(e IN ({allowed}), false)))"
    escaped = pattern.replace("'", "''")
    assert _differing(values, f"regexp_full_match(x, '{escaped}')", split) == []
    assert _multi_codes_pattern(["01", "0;2"]) is None
    assert _multi_codes_pattern([]) is None


def test_ascii_only_pattern() -> None:
    ascii_only = ["^[A-T]([0-9]{2,4})?$", "[A-Z][0-9]{4}[A-Z][0-9]{9}", r"\d{3}|x", r"[\w-]+", "k"]
    other = [".*", "[^0-9]+", "(?:x|中)", r"\D", "[a-zé]", r"\p{Han}", "(?i)k", "(?i:s)"]
    assert [_ascii_only_pattern(pattern) for pattern in ascii_only] == [True] * len(ascii_only)
    assert [_ascii_only_pattern(pattern) for pattern in other] == [False] * len(other)
    # what RE2 matches: case folding reaches the Kelvin sign, and \d, \w are ASCII
    con = duckdb.connect()
    try:
        texts = ["\u212a", "３", "Ｃ", "é", "٣", "\u017f"]
        for pattern in ascii_only:
            escaped = pattern.replace("'", "''")
            for text in texts:
                for value in (text, "C" + text, text * 3):
                    assert not con.sql(f"SELECT regexp_full_match('{value}', '{escaped}')").fetchall()[0][0]
        assert con.sql("SELECT regexp_full_match('\u212a', '(?i)k')").fetchall()[0][0]
    finally:
        con.close()


def test_part_sizes_balance_skipping() -> None:
    assert _part_sizes(1_000_000, 1, 0.1) == [1_000_000]
    two = _part_sizes(1_000_000, 2, 0.1)
    assert sum(two) == 1_000_000
    # each part costs its lines plus a tenth of the lines it skips
    assert abs(two[0] - (two[1] + 0.1 * two[0])) <= 2
    four = _part_sizes(1_000_003, 4, 0.1)
    assert sum(four) == 1_000_003
    assert four == sorted(four, reverse=True)
    assert _part_sizes(3, 3, 0.1) == [1, 1, 1]


def test_memory_bytes_units() -> None:
    assert memory_bytes("1GB") == 10**9
    assert memory_bytes("512MiB") == 512 * 2**20
    assert memory_bytes(" 1.5 gb ") == 1_500_000_000
    for text in ("", "1", "GB", "1 PB", "-1GB"):
        with pytest.raises(ValueError, match="invalid memory size"):
            memory_bytes(text)
