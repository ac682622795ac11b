"""Tests of the DuckDB staging of well-formed "|" files (``stage_file(..., direct=True)``).

Every file here is staged twice, by the text parser and with ``direct=True``, and both results
must be identical: the same staging rows and line numbers (rows sorted by line), encoding and
digest, or the same error. Files that a screen sends back to the text parser are listed with the screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from intake import reader
from intake.reader import MAX_LINE_BYTES, FileLayout, IntakeFileError, stage_file
from intake.template_model import Template, TemplateCatalog
from intake.validate import validate_staged
from tests.intake.test_reader import HEADER_CODES, HEADER_NAMES, layout
from tests.intake.test_validate import batch_for, context, loan_row, write_text

GBK_NAME = "北京测试科技有限公司".encode("gbk")

# Files the DuckDB staging accepts: (id, bytes, layout changes).
DIRECT_FILES: list[tuple[str, bytes, dict[str, Any]]] = [
    ("plain", f"{HEADER_NAMES}\n110101|客户甲|12.50|说明\n110102|客户乙|0|\n".encode(), {}),
    ("codes_header", f"{HEADER_CODES}\n110101|客户甲|12.50|x\n".encode(), {}),
    ("empty_fields", f"{HEADER_NAMES}\n|||\n110102||| \n".encode(), {}),
    ("crlf", f"{HEADER_NAMES}\r\n110101|客户甲|12.50|x\r\n110102|客户乙|3|y\r\n".encode(), {}),
    ("bom", b"\xef\xbb\xbf" + f"{HEADER_NAMES}\n110101|客户甲|12.50|x\n".encode(), {}),
    ("no_final_line_end", f"{HEADER_NAMES}\n110101|客户甲|12.50|x\n110102|客户乙|3|y".encode(), {}),
    ("spaces_trimmed", f"{HEADER_NAMES}\n  110101 | 客户甲 |  12.50  | x \n".encode(), {}),
    ("quotes_kept", f'{HEADER_NAMES}\n"110101"|"客户,甲"|1|#a\\b\n'.encode(), {}),
    ("no_header", "110101|客户甲|12.50|x\n110102|客户乙|3|y\n".encode(), {"header": False}),
    ("forbidden_rule", f"{HEADER_NAMES}\n110101|客户甲|12.50|x\n".encode(), {"trailing_delimiter": "forbidden"}),
    ("header_trailing_delimiter", f"{HEADER_NAMES}|\n110101|客户甲|12.50|x\n".encode(), {}),
    ("full_width_in_text_field", f"{HEADER_NAMES}\n110101|客户\u3000甲１２|12.50|\u3000x\n".encode(), {}),
    ("many_rows", (HEADER_NAMES + "\n" + "".join(f"{i:06d}|客户{i}|{i}.5|\n" for i in range(5000))).encode(), {}),
]

# Files a screen sends to the text parser: (id, bytes, layout changes). The id names the screen.
PARSER_FILES: list[tuple[str, bytes, dict[str, Any]]] = [
    ("blank_line", f"{HEADER_NAMES}\n110101|客户甲|1|x\n\n110102|客户乙|2|y\n".encode(), {}),
    ("blank_line_at_end", f"{HEADER_NAMES}\n110101|客户甲|1|x\n\n".encode(), {}),
    ("blank_line_before_header", f"\n{HEADER_NAMES}\n110101|客户甲|1|x\n".encode(), {}),
    ("blank_crlf_line", f"{HEADER_NAMES}\r\n110101|客户甲|1|x\r\n\r\n110102|客户乙|2|y\r\n".encode(), {}),
    ("spaces_only_line", f"{HEADER_NAMES}\n110101|客户甲|1|x\n   \n".encode(), {}),
    ("trailing_delimiter_one_line", f"{HEADER_NAMES}\n110101|客户甲|1|x|\n110102|客户乙|2|y\n".encode(), {}),
    ("trailing_delimiter_every_line", f"{HEADER_NAMES}|\n110101|客户甲|1|x|\n110102|客户乙|2||\n".encode(), {}),
    ("two_trailing_delimiters", f"{HEADER_NAMES}\n110101|客户甲|1|x||\n".encode(), {}),
    ("trailing_delimiter_forbidden", f"{HEADER_NAMES}\n110101|客户甲|1|x|\n".encode(),
     {"trailing_delimiter": "forbidden"}),
    ("required_rule", f"{HEADER_NAMES}|\n110101|客户甲|1|x|\n".encode(), {"trailing_delimiter": "required"}),
    ("required_rule_missing", f"{HEADER_NAMES}|\n110101|客户甲|1|x\n".encode(), {"trailing_delimiter": "required"}),
    ("short_row", f"{HEADER_NAMES}\n110101|客户甲|1|x\n110102|客户乙|2\n".encode(), {}),
    ("long_row", f"{HEADER_NAMES}\n110101|客户甲|1|x|y\n".encode(), {}),
    # One line with an extra empty field and one with a field too few: the pipe total is right.
    ("ragged_rows_balanced", f"{HEADER_NAMES}\n110101|客户甲|1|x||\n110102|客户乙|2\n".encode(), {}),
    ("gbk", f"{HEADER_NAMES}\n".encode("gbk") + b"110101|" + GBK_NAME + b"|1|x\n", {}),
    ("gbk_late", f"{HEADER_NAMES}\n".encode() + b"110101|a|1|x\n" * 50 + b"110102|" + GBK_NAME + b"|2|y\n", {}),
    ("bom_then_invalid_utf8", b"\xef\xbb\xbf" + f"{HEADER_NAMES}\n110101|".encode() + GBK_NAME + b"|1|x\n", {}),
    ("surrogate_bytes", f"{HEADER_NAMES}\n110101|".encode() + b"\xed\xa0\x80|1|x\n", {}),
    ("overlong_bytes", f"{HEADER_NAMES}\n110101|".encode() + b"\xc0\x80|1|x\n", {}),
    ("nul_byte", f"{HEADER_NAMES}\n110101|客户\x00甲|1|x\n".encode(), {}),
    ("tab_in_text_field", f"{HEADER_NAMES}\n110101|客户\t甲|1|x\n".encode(), {}),
    ("tab_around_number", f"{HEADER_NAMES}\n110101|客户甲|\t12.5\t|x\n".encode(), {}),
    ("control_character", f"{HEADER_NAMES}\n110101|客户甲|1\x1f|x\n".encode(), {}),
    ("lone_cr_in_field", f"{HEADER_NAMES}\n110101|客户\r甲|1|x\n".encode(), {}),
    ("cr_cr_lf", f"{HEADER_NAMES}\r\n110101|客户甲|1|x\r\r\n".encode(), {}),
    ("cr_at_end_of_file", f"{HEADER_NAMES}\r\n110101|客户甲|1|x\r".encode(), {}),
    ("mixed_line_ends", f"{HEADER_NAMES}\r\n110101|客户甲|1|x\n110102|客户乙|2|y\r\n".encode(), {}),
    ("full_width_digits_in_number", f"{HEADER_NAMES}\n110101|客户甲|１２.５|x\n".encode(), {}),
    ("ideographic_space_around_code", f"{HEADER_NAMES}\n\u3000110101\u3000|客户甲|1|x\n".encode(), {}),
    ("no_break_space_around_number", f"{HEADER_NAMES}\n110101|客户甲|\u00a012.5|x\n".encode(), {}),
    ("header_mismatch", "证件号码|名称|金额|备注\n110101|客户甲|1|x\n".encode(), {}),
    ("header_only", f"{HEADER_NAMES}\n".encode(), {}),
    ("only_blank_lines", b"\n\n\n", {}),
    ("utf16", "\ufeff证件号码|客户名称\n".encode("utf-16-le"), {}),
    ("pdf", b"%PDF-1.7\n" + b"x" * 100, {}),
    ("line_too_long", f"{HEADER_NAMES}\n110101|客户甲|1|".encode() + b"x" * (MAX_LINE_BYTES + 10) + b"\n", {}),
    ("ordinality_column", b"ORDINALITY|B\n1|2\n",
     {"columns": ("ORDINALITY", "B"), "column_names": ("序号", "乙"), "normalised": frozenset()}),
]


def _outcome(source: Path, file_layout: FileLayout, target: Path, direct: bool) -> dict[str, Any]:
    """Stage ``source`` and describe the result, or the error, in comparable values."""
    target.mkdir()
    try:
        staged = stage_file(source, "report.txt", file_layout, target, direct=direct)
    except IntakeFileError as error:
        assert list(target.iterdir()) == [], "nothing may be left in the target folder after an error"
        return {"error": (error.code, error.message, error.line, error.column)}
    leftovers = [path.name for path in target.iterdir() if path != staged.path]
    assert leftovers == [], "only the staging file may remain in the target folder"
    # The DuckDB staging may write rows out of file order; _line keeps their place.
    table = pq.read_table(staged.path).sort_by(reader.LINE_COLUMN)
    return {
        "rows": staged.rows,
        "encoding": staged.encoding,
        "size": staged.size,
        "sm3": staged.sm3,
        "findings": staged.findings,
        "schema": [(field.name, str(field.type)) for field in table.schema],
        "values": table.to_pylist(),
    }


def _stage_both(tmp_path: Path, data: bytes, changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Stage ``data`` both ways; return both outcomes and whether the DuckDB staging accepted the file."""
    file_layout = layout(**changes)
    source = tmp_path / "upload.txt"
    source.write_bytes(data)
    parsed = _outcome(source, file_layout, tmp_path / "parsed", direct=False)
    direct = _outcome(source, file_layout, tmp_path / "direct", direct=True)
    probe = tmp_path / "probe"
    probe.mkdir()
    accepted = reader._stage_direct(source, "report.txt", file_layout, source.stat().st_size, probe) is not None
    return parsed, direct, accepted


@pytest.mark.parametrize(("data", "changes"), [case[1:] for case in DIRECT_FILES], ids=[c[0] for c in DIRECT_FILES])
def test_direct_staging_equals_parser(tmp_path: Path, data: bytes, changes: dict[str, Any]) -> None:
    parsed, direct, accepted = _stage_both(tmp_path, data, changes)
    assert accepted, "the DuckDB staging should accept this well-formed file"
    assert "error" not in parsed
    assert direct == parsed


@pytest.mark.parametrize(("data", "changes"), [case[1:] for case in PARSER_FILES], ids=[c[0] for c in PARSER_FILES])
def test_screened_file_uses_parser(tmp_path: Path, data: bytes, changes: dict[str, Any]) -> None:
    parsed, direct, accepted = _stage_both(tmp_path, data, changes)
    assert not accepted, "a screen should send this file to the text parser"
    assert direct == parsed


def test_direct_staging_line_numbers(tmp_path: Path) -> None:
    body = "".join(f"{i:06d}|客户|{i}|\n" for i in range(1, 3001))
    source = tmp_path / "upload.txt"
    source.write_bytes(f"{HEADER_NAMES}\n{body}".encode())
    target = tmp_path / "out"
    target.mkdir()
    staged = stage_file(source, "report.txt", layout(), target, direct=True)
    rows = pq.read_table(staged.path).sort_by(reader.LINE_COLUMN).to_pylist()
    assert [row["_line"] for row in rows] == list(range(2, 3002))
    assert all(int(row["ZJHM"]) == row["_line"] - 1 for row in rows)


# --- validation of both staging files ------------------------------------------------------------


def _loan_rows() -> list[dict[str, str]]:
    return [
        loan_row(1),
        loan_row(2, DKFFRQ="20230230"),
        loan_row(3, DKDQRQ="2025-01-15"),
        loan_row(4, JJJE="1000000.123"),
        loan_row(5, ZJHM="91110000600037341A"),
        loan_row(6, KHMC=""),
        loan_row(7, YQTS="1.5"),
        loan_row(8, MXKMBH="13-01"),
        loan_row(9, JRXKZH="B0001H11100000"),
        loan_row(10, JJJE=" 500.00 "),
        loan_row(1),
    ]


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_validation_findings_equal(tmp_path: Path, loan: Template, catalog: TemplateCatalog, line_end: str) -> None:
    rows = _loan_rows()
    source = write_text(loan, rows, tmp_path / "loans.txt")
    source.write_bytes(source.read_bytes().replace(b"\n", line_end.encode()))
    batch = batch_for(tmp_path, catalog, rows)
    results = {}
    for direct in (False, True):
        folder = tmp_path / f"staging-{direct}"
        folder.mkdir()
        staged = stage_file(source, "loans.txt", loan.file_layout(), folder, direct=direct)
        assert staged.rows == len(rows)
        result = validate_staged(staged, loan, context(batch), tmp_path / f"work-{direct}", catalog=catalog)
        results[direct] = [
            (row["line"], row["field_code"], row["rule_id"], row["value"], row["message"])
            for row in pq.read_table(result.findings_path).to_pylist()
        ]
    assert results[False], "the planted errors should produce findings"
    assert results[True] == results[False]
    probe = tmp_path / "probe"
    probe.mkdir()
    assert reader._stage_direct(source, "loans.txt", loan.file_layout(), source.stat().st_size, probe) is not None
