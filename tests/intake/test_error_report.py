"""Tests of intake.error_report: findings written as XLSX and CSV reports for the reporter."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from intake import error_report
from intake.error_report import HEADER, Waiver, write_csv_report, write_xlsx_report
from intake.template_model import TemplateCatalog
from intake.validate import FINDINGS_SCHEMA, validate_staged
from regsandbox_core.cells import escape_cell
from tests.intake.test_validate import context, loan_row, stage


def findings_file(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=FINDINGS_SCHEMA), path)
    return path


def finding(line: int | None, value: str = "x", message: str = "问题", severity: str = "error",
            explained: bool = False) -> dict:
    return {
        "line": line, "field_code": "JJYE", "field_name": "借据余额", "value": value, "rule_id": "R-JJ-009",
        "rule_name": "借据余额不大于借据金额", "rule_kind": "compare", "severity": severity, "explained": explained,
        "message": message,
    }


def read_csv(path: Path) -> list[list[str]]:
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")
    return list(csv.reader(io.StringIO(data[3:].decode("utf-8"), newline="")))


def read_xlsx(path: Path) -> list[list]:
    workbook = openpyxl.load_workbook(path, read_only=True)
    try:
        return [list(row) for row in workbook.worksheets[0].iter_rows(values_only=True)]
    finally:
        workbook.close()


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return findings_file(
        tmp_path / "findings.parquet",
        [
            finding(None, value=None, message="文件级问题", severity="warning"),
            finding(2, value="=HYPERLINK(\"http://x\")", message="+1 公式"),
            finding(3, value="-5", message="@SUM(A1)", severity="warning", explained=True),
            finding(4, value="12\x01", message="\t制表符"),
        ],
    )


def test_csv_report(tmp_path: Path, sample: Path) -> None:
    rows = read_csv(write_csv_report(sample, tmp_path / "report.csv"))
    assert rows[0] == list(HEADER)
    assert rows[1][0] == "全文件"
    assert rows[1][6] == "提示"
    assert rows[1][7] == "否"
    assert rows[2][:4] == ["2", "JJYE", "借据余额", "'=HYPERLINK(\"http://x\")"]
    assert rows[2][6] == "错误"
    assert rows[2][8] == "'+1 公式"
    assert rows[3][3] == "'-5"
    assert rows[3][7] == "是"
    assert rows[3][8] == "'@SUM(A1)"
    assert rows[4][8] == "'\t制表符"
    assert not list(tmp_path.glob(".*tmp"))


def test_csv_writers_write_same_bytes(tmp_path: Path) -> None:
    # DuckDB writes the rows without waivers and the csv module with them: both must give the same file
    values = ["", "a,b", 'say "hi"', "line\nbreak", "cr\r", " lead", "=1+1", "-", "中文,“引号”", "\t"]
    source = findings_file(
        tmp_path / "findings.parquet",
        [finding(None, value=None, message="", severity="warning")]
        + [finding(number + 2, value=value, message=value or "x", explained=number % 2 == 0)
           for number, value in enumerate(values)],
    )
    fast = write_csv_report(source, tmp_path / "fast.csv").read_bytes()
    unused_waiver = Waiver("R-OTHER", None, "不适用")
    python = write_csv_report(source, tmp_path / "python.csv", [unused_waiver]).read_bytes()
    assert fast == python
    assert read_csv(tmp_path / "fast.csv")[3][3] == "a,b"
    assert not list(tmp_path.glob("*.rows"))


def test_xlsx_report_is_text_and_escaped(tmp_path: Path, sample: Path) -> None:
    path = write_xlsx_report(sample, tmp_path / "report.xlsx")
    workbook = openpyxl.load_workbook(path)
    sheet = workbook.worksheets[0]
    assert [cell.value for cell in sheet[1]] == list(HEADER)
    for row in sheet.iter_rows(min_row=2):
        for cell in row:
            assert cell.data_type in ("s", "inlineStr")  # text, never a formula or a number
    assert sheet["A3"].value == "2"
    assert sheet["D3"].value == "'=HYPERLINK(\"http://x\")"
    assert sheet["I3"].value == "'+1 公式"
    assert sheet["D4"].value == "'-5"
    assert sheet["D5"].value == "12\ufffd"  # a control character XML cannot hold
    assert sheet.max_row == 5


def test_waivers_in_both_reports(tmp_path: Path) -> None:
    source = findings_file(tmp_path / "f.parquet", [
        finding(None, severity="warning"),
        finding(2, severity="warning"),
        finding(3, severity="warning"),
        finding(4, severity="warning", explained=True),
        finding(5),
    ])
    waivers = [Waiver("R-JJ-009", frozenset({2}), "=已核实"), Waiver("R-JJ-009", None, "全部核实")]

    csv_rows = read_csv(write_csv_report(source, tmp_path / "r.csv", waivers))
    xlsx_rows = read_xlsx(write_xlsx_report(source, tmp_path / "r.xlsx", waivers))

    assert HEADER[-1] == "审核豁免"
    expected = ["已豁免：全部核实", "已豁免：=已核实", "已豁免：全部核实", "", ""]
    assert [row[9] for row in csv_rows[1:]] == expected  # an explained warning and an error are never waived
    assert [row[9] or "" for row in xlsx_rows[1:]] == expected
    unwaived = read_csv(write_csv_report(source, tmp_path / "plain.csv"))
    assert [row[9] for row in unwaived[1:]] == [""] * 5


def test_xlsx_cap_adds_note_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(error_report, "XLSX_MAX_ROWS", 6)
    monkeypatch.setattr(error_report, "BATCH_ROWS", 2)
    source = findings_file(tmp_path / "f.parquet", [finding(line) for line in range(2, 12)])
    rows = read_xlsx(write_xlsx_report(source, tmp_path / "r.xlsx"))
    assert len(rows) == 6
    assert [row[0] for row in rows[1:5]] == ["2", "3", "4", "5"]
    assert "共有 10 条问题" in rows[5][8]
    assert "前 4 条" in rows[5][8]
    assert "CSV" in rows[5][8]
    # the CSV report contains them all
    assert len(read_csv(write_csv_report(source, tmp_path / "r.csv"))) == 11
    # exactly full: no note
    exact = findings_file(tmp_path / "g.parquet", [finding(line) for line in range(2, 7)])
    assert len(read_xlsx(write_xlsx_report(exact, tmp_path / "s.xlsx"))) == 6


def test_reports_from_validation(tmp_path: Path) -> None:
    catalog = TemplateCatalog.load()
    loan = catalog.get("EAST_DGXDYWJJB")
    rows = [loan_row(1, BEIZ="=1+1", JJJE="-1,000.00")]
    staged = stage(tmp_path, loan, rows)
    result = validate_staged(staged, loan, context(), tmp_path / "work", catalog=catalog)
    csv_rows = read_csv(write_csv_report(result.findings_path, tmp_path / "r.csv"))
    amount = next(row for row in csv_rows if row[4] == "AUTO-FORMAT-JJJE")
    assert amount[3] == "'-1,000.00"
    assert amount[6] == "错误"
    xlsx_rows = read_xlsx(write_xlsx_report(result.findings_path, tmp_path / "r.xlsx"))
    assert len(xlsx_rows) == len(csv_rows)
    assert all(isinstance(cell, str) or cell is None for row in xlsx_rows for cell in row)


def test_escape_cell_moved_to_core() -> None:
    from admin_api import spreadsheets

    assert spreadsheets.escape_cell is escape_cell
    assert escape_cell("=1") == "'=1"
    assert escape_cell("1=") == "1="


def test_arrow_escape_matches_escape_cell() -> None:
    values = ["=1+1", "+86", "-5", "@SUM(A1)", "\tx", "\rx", "a=b", "", "'=", " =1", "１", "中文"]
    escaped = error_report._escaped(pa.array(values, pa.string())).to_pylist()
    assert escaped == [escape_cell(value) for value in values]
