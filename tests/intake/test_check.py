"""Tests of intake.check: a submitted file validated in place must find what its staging file finds.

Every file here is validated twice: by ``check_file`` (in place when the byte screens allow it)
and by ``stage_file`` + ``validate_staged``. Both must report the same findings, counts and
field counts, or raise the same error. Each case also states which path ``check_file`` takes.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from intake import validate
from intake.check import check_file
from intake.reader import IntakeFileError, _ByteScreen, direct_text, read_received, receive_file, stage_file
from intake.template_model import Template, TemplateCatalog
from intake.validate import validate_staged
from regsandbox_core.crypto import sm3_file
from tests.intake.test_validate import (
    PREVIOUS_PERIOD, batch_for, comparable, context, loan_row, warehouse_file, write_text,
)

IN_PLACE, STAGED = "in place", "staging file"


def _rows() -> list[dict[str, str]]:
    return [
        loan_row(1),
        loan_row(2, DKFFRQ="20230230"),
        loan_row(3, JJJE="1,000,000.00"),
        loan_row(4, ZJHM="91110000600037341A"),
        loan_row(5, KHMC=""),
        loan_row(6, BZ="RMB"),
        loan_row(7, DBFS="02;07"),
        loan_row(8, JJYE="2000000.00"),
        loan_row(9, JRXKZH="B0002H222000002"),
        loan_row(1),
    ]


def _text(loan: Template, tmp_path: Path, rows: list[dict[str, str]] | None = None) -> bytes:
    return write_text(loan, rows or _rows(), tmp_path / "base.txt").read_bytes()


def _both(tmp_path: Path, loan: Template, catalog: TemplateCatalog, data: bytes,
          name: str = "loans.txt") -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Validate ``data`` both ways; return both outcomes and the path check_file took (None on an error)."""
    source = tmp_path / name
    source.write_bytes(data)
    rows = _rows()
    ctx = context(batch_for(tmp_path, catalog, rows))
    outcomes: list[dict[str, Any]] = []
    path = None
    try:
        checked = check_file(read_received(source), name, loan, ctx, tmp_path / "checked", catalog=catalog)
        path = IN_PLACE if checked.staging_path is None else STAGED
        outcomes.append({"rows": checked.rows, "encoding": checked.encoding, **comparable(checked.result)})
    except IntakeFileError as error:
        outcomes.append({"error": (error.code, error.message, error.line)})
    folder = tmp_path / "staged"
    folder.mkdir()
    try:
        staged = stage_file(source, name, loan.file_layout(), folder)
        result = validate_staged(staged, loan, ctx, tmp_path / "validated", catalog=catalog)
        outcomes.append({"rows": staged.rows, "encoding": staged.encoding, **comparable(result)})
    except IntakeFileError as error:
        outcomes.append({"error": (error.code, error.message, error.line)})
    return outcomes[0], outcomes[1], path


def _with_field(data: bytes, line: int, field: int, value: bytes) -> bytes:
    """Replace field ``field`` (0-based) of line ``line`` (1-based) in a "|" file."""
    lines = data.split(b"\n")
    parts = lines[line - 1].split(b"|")
    parts[field] = value
    lines[line - 1] = b"|".join(parts)
    return b"\n".join(lines)


def _field_index(loan: Template, code: str) -> int:
    return [item.code for item in loan.fields].index(code)


# (id, change to the base file, expected path). The changes cover each kind of text a reporter's
# tool writes that DuckDB could read differently from the parser.
CASES = [
    ("plain", lambda data, loan: data, IN_PLACE),
    ("crlf", lambda data, loan: data.replace(b"\n", b"\r\n"), IN_PLACE),
    ("bom", lambda data, loan: b"\xef\xbb\xbf" + data, IN_PLACE),
    ("no_final_line_end", lambda data, loan: data.rstrip(b"\n"), IN_PLACE),
    ("space_around_code",
     lambda data, loan: _with_field(data, 3, _field_index(loan, "BZ"), b" CNY "), IN_PLACE),
    ("space_before_amount",
     lambda data, loan: _with_field(data, 2, _field_index(loan, "JJJE"), b"  1000000.00"), IN_PLACE),
    ("spaces_only_in_text_field",
     lambda data, loan: _with_field(data, 4, _field_index(loan, "KHMC"), b"   "), IN_PLACE),
    ("ideographic_space_only_in_text_field",
     lambda data, loan: _with_field(data, 4, _field_index(loan, "KHMC"), "\u3000\u3000".encode()), IN_PLACE),
    ("no_break_space_starts_text_field",
     lambda data, loan: _with_field(data, 4, _field_index(loan, "YHJGMC"), "\u00a0测试银行".encode()), IN_PLACE),
    ("ideographic_space_inside_text", lambda data, loan: _with_field(
        data, 4, _field_index(loan, "KHMC"), "北京\u3000测试".encode()), IN_PLACE),
    ("full_width_digits_in_amount",
     lambda data, loan: _with_field(data, 2, _field_index(loan, "JJJE"), "１２３４５".encode()), STAGED),
    ("full_width_code", lambda data, loan: _with_field(data, 3, _field_index(loan, "BZ"), "ＣＮＹ".encode()), STAGED),
    ("full_width_semicolon_in_codes",
     lambda data, loan: _with_field(data, 3, _field_index(loan, "DBFS"), "02；03".encode()), STAGED),
    # DKTXHY is guarded by its ASCII-only pattern, not by a type or code list
    ("full_width_letter_in_pattern_field",
     lambda data, loan: _with_field(data, 3, _field_index(loan, "DKTXHY"), "Ｃ".encode()), STAGED),
    ("ideographic_space_after_date",
     lambda data, loan: _with_field(data, 3, _field_index(loan, "DKFFRQ"), "20230115\u3000".encode()), STAGED),
    ("gbk_name", lambda data, loan: data.decode().encode("gb18030"), STAGED),
    ("blank_line", lambda data, loan: data.replace(b"\n", b"\n\n", 3), STAGED),
    ("trailing_delimiter_every_line", lambda data, loan: data.replace(b"\n", b"|\n"), STAGED),
    ("ragged_row", lambda data, loan: data.replace(b"|N|", b"|N||", 1), STAGED),
    ("tab_in_text", lambda data, loan: _with_field(data, 2, _field_index(loan, "DKYT"), b"a\tb"), STAGED),
    ("mixed_line_ends", lambda data, loan: data.replace(b"\n", b"\r\n", 2), STAGED),
]


@pytest.mark.parametrize(("change", "path"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_in_place_equals_staging(tmp_path: Path, loan: Template, catalog: TemplateCatalog, change, path: str) -> None:
    checked, staged, path_taken = _both(tmp_path, loan, catalog, change(_text(loan, tmp_path), loan))
    assert checked == staged
    if "error" not in staged:
        assert staged["findings"], "the planted errors should produce findings"
        assert path_taken == path


def test_bad_input_same_error(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    for name, data in (("empty.txt", b""), ("header.txt", _text(loan, tmp_path).split(b"\n")[0] + b"\n"),
                       ("short.txt", _text(loan, tmp_path).replace(b"|N|", b"|", 1))):
        folder = tmp_path / name
        folder.mkdir()
        checked, staged, path_taken = _both(folder, loan, catalog, data, name)
        assert "error" in staged, name
        assert checked == staged, name
        assert path_taken is None


def _in_place_as_staged(tmp_path: Path, source: Path, loan: Template, ctx: validate.ValidationContext,
                        catalog: TemplateCatalog) -> validate.ValidationResult:
    """Validate ``source`` in place and through its staging file, and return the staging file's result.

    Asserts that ``check_file`` took the in-place path and that both results are equal.
    """
    checked = check_file(read_received(source), source.name, loan, ctx, tmp_path / "checked", catalog=catalog)
    assert checked.staging_path is None
    folder = tmp_path / "staged"
    folder.mkdir()
    result = validate_staged(stage_file(source, source.name, loan.file_layout(), folder), loan, ctx,
                             tmp_path / "validated", catalog=catalog)
    assert comparable(checked.result) == comparable(result)
    return result


def test_parts_number_lines_in_file_order(tmp_path: Path, loan: Template, catalog: TemplateCatalog,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Several parts, each numbered from its first line, give every finding its own line."""
    monkeypatch.setattr(validate, "MIN_ROWS_PER_PART", 7)
    rows = [loan_row(number, BZ="RMB" if number % 5 == 0 else "CNY") for number in range(1, 61)]
    data = _text(loan, tmp_path, rows)
    source = tmp_path / "loans.txt"
    source.write_bytes(data)
    ctx = context(batch_for(tmp_path, catalog, rows), threads=3)
    result = _in_place_as_staged(tmp_path, source, loan, ctx, catalog)
    bad_lines = sorted(row["line"] for row in comparable(result)["findings"] if row["rule_id"] == "R-JJ-005")
    assert bad_lines == [number + 1 for number in range(5, 61, 5)]


def test_later_rules_over_flagged_fields(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    """Check the later rules over 借据余额, 贷款发放日期 and 备注, which the in-place scan keeps as flags.

    The history rule's warning is explained by a filled remark, and the aggregates count an
    invalid and an empty balance, as over the staging file.
    """
    rows = [
        loan_row(1, DKFFRQ="20240105", BEIZ="借据展期后沿用原借据号"),
        loan_row(2, DKFFRQ="20240106"),
        loan_row(3, JJYE="12x.00"),
        loan_row(4, JJYE=""),
        loan_row(5),
    ]
    source = tmp_path / "loans.txt"
    source.write_bytes(_text(loan, tmp_path, rows))
    earlier = [loan_row(1), loan_row(2)]
    warehouse = {"EAST_DGXDYWJJB": [warehouse_file(tmp_path / "earlier.parquet", loan, earlier, PREVIOUS_PERIOD)]}
    ctx = context(batch_for(tmp_path, catalog, rows), warehouse)
    result = _in_place_as_staged(tmp_path, source, loan, ctx, catalog)
    history = [row for row in comparable(result)["findings"] if row["rule_id"] == "R-JJ-004"]
    assert [(row["line"], row["explained"]) for row in history] == [(2, True), (3, False)]
    skipped = {rule.rule_id: rule.reason for rule in result.skipped_rules}
    assert "有 1 行" in skipped["R-JJ-020"]
    assert result.field_values["JJYE"] == 4
    assert result.field_values["BEIZ"] == 1


def test_direct_text_screens(tmp_path: Path, loan: Template) -> None:
    data = _text(loan, tmp_path)
    source = tmp_path / "loans.txt"
    source.write_bytes(data)
    direct = direct_text(read_received(source), "loans.txt", loan.file_layout())
    assert direct is not None
    assert (direct.skip, direct.lines, direct.plain_edges) == (1, len(_rows()), True)
    assert direct_text(read_received(source), "loans.xlsx", loan.file_layout()) is None
    assert direct_text(read_received(source), "loans.txt", loan.file_layout(), max_bytes=len(data) - 1) is None
    source.write_bytes(_with_field(data, 2, _field_index(loan, "BZ"), b"CNY "))
    edged = direct_text(read_received(source), "loans.txt", loan.file_layout())
    assert edged is not None and not edged.plain_edges


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096])
def test_byte_screen_across_chunks(chunk: int) -> None:
    cases = {
        b"A|B\n1|2\n": (0, 0),
        b"A|B\n 1|2\n": (1, 0),
        b"A|B\n1 |2\n": (1, 0),
        b"A|B\n1|2 ": (1, 0),
        b"A|B\n1|2 \r\n": (1, 0),
        b"A|B\n1|\xe3\x80\x80x\n": (1, 0),
        b"A|B\n1|\xc2\xa0x\n": (1, 0),
        b"A|B\n1|x\xe3\x80\x80\n": (0, 0),
        b"A|B\n\n1|2\n": (0, 1),
        b"A|B\r\n\r\n1|2\r\n": (0, 1),
        b"\nA|B\n": (0, 1),
        b"A|B\n\r\n\n": (0, 2),
    }
    for data, (edges, blank_lines) in cases.items():
        screen = _ByteScreen()
        for start in range(0, len(data), chunk):
            screen.add(data[start : start + chunk])
        screen.finish()
        assert (screen.edges, screen.blank_lines) == (edges, blank_lines), data


def test_receive_file_hashes_and_screens(tmp_path: Path) -> None:
    data = ("证件号码|名称\n" + "".join(f"{i:06d}|客户{i}\n" for i in range(20_000))).encode()
    received = receive_file(io.BytesIO(data), tmp_path / "upload.source", chunk_bytes=65_536)
    assert received.path.read_bytes() == data
    assert stat.S_IMODE(os.stat(received.path).st_mode) == 0o600
    assert received.size == len(data)
    assert received.sm3 == sm3_file(received.path) == read_received(received.path).sm3
    assert (received.screen.newlines, received.screen.pipes, received.screen.edges) == (20_001, 20_001, 0)
    with pytest.raises(FileExistsError):
        receive_file(io.BytesIO(b"x"), received.path)


def test_context_gathered_after_reading(tmp_path: Path, loan: Template, catalog: TemplateCatalog) -> None:
    """A context given as a function is built once, and only for a file that could be read."""
    calls: list[int] = []

    def gather() -> Any:
        calls.append(1)
        return context()

    for name, data, expected_calls in (("empty.txt", b"", 0), ("loans.txt", _text(loan, tmp_path), 1),
                                       ("gbk.txt", _text(loan, tmp_path).decode().encode("gb18030"), 1)):
        calls.clear()
        source = tmp_path / name
        source.write_bytes(data)
        work = tmp_path / f"work-{name}"
        if expected_calls:
            check_file(read_received(source), name, loan, gather, work, catalog=catalog)
        else:
            with pytest.raises(IntakeFileError):
                check_file(read_received(source), name, loan, gather, work, catalog=catalog)
        assert len(calls) == expected_calls, name
