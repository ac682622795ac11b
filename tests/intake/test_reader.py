"""Tests of intake.reader: text and XLSX report files staged into a text-only Parquet file."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import textwrap
import unicodedata
import zipfile
from datetime import date, datetime
from pathlib import Path

import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from intake import reader
from intake.reader import FileLayout, IntakeFileError, StagedFile, stage_file
from regsandbox_core.crypto import sm3_file

REPO = Path(__file__).resolve().parents[2]

CODES = ("ZJHM", "KHMC", "JE", "BZ")
NAMES = ("证件号码", "客户名称", "金额", "备注")
HEADER_NAMES = "|".join(NAMES)
HEADER_CODES = "|".join(CODES)


def layout(**changes: object) -> FileLayout:
    base: dict[str, object] = {
        "columns": CODES,
        "column_names": NAMES,
        "normalised": frozenset({"ZJHM", "JE"}),
        "delimiter": "|",
        "header": True,
        "trailing_delimiter": "allowed",
    }
    base.update(changes)
    return FileLayout(**base)  # type: ignore[arg-type]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    return target


def write(tmp_path: Path, data: bytes) -> Path:
    """Save an upload under a neutral name: only ``original_name`` may decide the format."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    path = folder / "upload.bin"
    path.write_bytes(data)
    return path


def stage(tmp_path: Path, out: Path, data: bytes, name: str = "report.txt", **kwargs: object) -> StagedFile:
    file_layout = kwargs.pop("file_layout", None) or layout()
    return stage_file(write(tmp_path, data), name, file_layout, out, **kwargs)  # type: ignore[arg-type]


def rejected(
    tmp_path: Path, out: Path, data: bytes, name: str = "report.txt", **kwargs: object
) -> IntakeFileError:
    """Stage ``data``, expect an IntakeFileError and check that the target folder stayed empty."""
    with pytest.raises(IntakeFileError) as caught:
        stage(tmp_path, out, data, name, **kwargs)
    assert list(out.iterdir()) == [], "nothing may be left in the target folder after an error"
    return caught.value


def rows_of(staged: StagedFile) -> list[dict[str, object]]:
    return pq.read_table(staged.path).to_pylist()


def xlsx_bytes(build) -> bytes:  # noqa: ANN001 - a function filling an openpyxl workbook
    workbook = openpyxl.Workbook()
    build(workbook)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


# --- result and schema ----------------------------------------------------------------------


def test_result_schema_and_digest(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_NAMES}\n000123|张三|100.00|首行\n000456|李四|200.50|\n".encode()
    staged = stage(tmp_path, out, data)
    assert staged.rows == 2
    assert staged.encoding == "utf-8"
    assert staged.size == len(data)
    assert staged.sm3 == sm3_file(tmp_path / "in" / "upload.bin")
    assert staged.findings == ()
    assert staged.file_type == "text"
    assert staged.path.parent == out
    assert staged.path.suffix == ".parquet"
    assert [p.name for p in out.iterdir()] == [staged.path.name]
    schema = pq.read_schema(staged.path)
    assert schema.names == ["_line", *CODES]
    assert schema.field("_line").type == pa.int64()
    assert all(schema.field(code).type == pa.string() for code in CODES)
    assert rows_of(staged) == [
        {"_line": 2, "ZJHM": "000123", "KHMC": "张三", "JE": "100.00", "BZ": "首行"},
        {"_line": 3, "ZJHM": "000456", "KHMC": "李四", "JE": "200.50", "BZ": ""},
    ]


# --- encodings ------------------------------------------------------------------------------


def test_gbk_file_read_as_gb18030(tmp_path: Path, out: Path) -> None:
    text = f"{HEADER_NAMES}\n110101199001011234|欧阳娜娜|1.00|中国工商银行股份有限公司\n"
    staged = stage(tmp_path, out, text.encode("gbk"))
    assert staged.encoding == "gb18030"
    assert rows_of(staged)[0]["KHMC"] == "欧阳娜娜"
    assert rows_of(staged)[0]["BZ"] == "中国工商银行股份有限公司"


def test_gb18030_four_byte_characters(tmp_path: Path, out: Path) -> None:
    text = f"{HEADER_NAMES}\n1|𠀀䶵€|1|\n"  # characters outside GBK need GB18030 four-byte sequences
    staged = stage(tmp_path, out, text.encode("gb18030"))
    assert staged.encoding == "gb18030"
    assert rows_of(staged)[0]["KHMC"] == "𠀀䶵€"


def test_utf8_bom_from_excel(tmp_path: Path, out: Path) -> None:
    # Excel's "CSV UTF-8": a BOM, commas, CRLF line ends.
    text = "证件号码,客户名称,金额,备注\r\n000123,张三,100.00,备注一\r\n"
    data = b"\xef\xbb\xbf" + text.encode()
    staged = stage(tmp_path, out, data, "report.csv", file_layout=layout(delimiter=","))
    assert staged.encoding == "utf-8-sig"
    assert rows_of(staged) == [{"_line": 2, "ZJHM": "000123", "KHMC": "张三", "JE": "100.00", "BZ": "备注一"}]


def test_utf8_late_chinese_stays_utf8(tmp_path: Path, out: Path) -> None:
    # More than two read chunks of pure ASCII before the first Chinese character: still UTF-8.
    ascii_rows = "".join(f"{i:06d}|name{i}|{i}.00|\n" for i in range(150_000))
    data = f"{HEADER_CODES}\n{ascii_rows}999999|张三|1.00|结尾\n".encode()
    assert len(data) > 2 * reader.READ_CHUNK_BYTES
    staged = stage(tmp_path, out, data)
    assert staged.encoding == "utf-8"
    last = pq.read_table(staged.path).slice(staged.rows - 1).to_pylist()[0]
    assert last == {"_line": 150_002, "ZJHM": "999999", "KHMC": "张三", "JE": "1.00", "BZ": "结尾"}


def test_gbk_late_chinese_detected(tmp_path: Path, out: Path) -> None:
    ascii_rows = "".join(f"{i:06d}|name{i}|{i}.00|\n" for i in range(150_000))
    data = f"{HEADER_CODES}\n{ascii_rows}999999|张三|1.00|结尾\n".encode("gbk")
    staged = stage(tmp_path, out, data)
    assert staged.encoding == "gb18030"
    assert staged.rows == 150_001
    last = pq.read_table(staged.path).slice(staged.rows - 1).to_pylist()[0]
    assert last["KHMC"] == "张三"
    assert last["_line"] == 150_002


def test_gbk_row_error_before_chinese(tmp_path: Path, out: Path) -> None:
    # The ragged row comes before the first non-ASCII byte: it is reported once GB18030 is known.
    data = f"{HEADER_CODES}\n1|a|1|\n2|b\n3|张三|1|\n".encode("gbk")
    error = rejected(tmp_path, out, data)
    assert error.code == "ROW_FIELD_COUNT"
    assert error.line == 3


def test_utf8_row_error_rechecked_as_gb18030(tmp_path: Path, out: Path) -> None:
    # Read as UTF-8, line 2 is "1|中|x|y|z" (five fields). Read as GB18030, 0xAD 0x7C is one
    # character, so the line has four fields. The first invalid UTF-8 byte is far later.
    early = b"1|\xe4\xb8\xad|x|y|z\n"
    filler = "".join(f"{i}|a|1|\n" for i in range(200_000)).encode()
    data = HEADER_CODES.encode() + b"\n" + early + filler + "9|张三|1|\n".encode("gbk")
    staged = stage(tmp_path, out, data)
    assert staged.encoding == "gb18030"
    assert rows_of(staged)[0] == {"_line": 2, "ZJHM": "1", "KHMC": "涓瓅x", "JE": "y", "BZ": "z"}


def test_gbk_trail_byte_not_delimiter(tmp_path: Path, out: Path) -> None:
    # 亅 is 0x81 0x7C in GBK: its second byte is "|" and must not split the field.
    assert "亅".encode("gbk") == b"\x81|"
    staged = stage(tmp_path, out, f"{HEADER_CODES}\n1|亅|1|\n".encode("gbk"))
    assert rows_of(staged)[0]["KHMC"] == "亅"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (f"{HEADER_CODES}\n1|\xff\xfe|1|\n".encode("latin-1"), "第 2 行"),
        (HEADER_CODES.encode() + b"\n1|a|1|\n2|a\x81\n", "第 3 行"),  # a GBK lead byte before a line end
    ],
)
def test_undecodable_bytes(tmp_path: Path, out: Path, data: bytes, fragment: str) -> None:
    error = rejected(tmp_path, out, data)
    assert error.code == "FILE_ENCODING_UNKNOWN"
    assert fragment in error.message
    assert "GB18030" in error.message
    assert "偏移量" in error.message


def test_bom_then_invalid_utf8(tmp_path: Path, out: Path) -> None:
    # The BOM decides UTF-8, so a GBK line after it is an error, not a reason to try GB18030.
    data = b"\xef\xbb\xbf" + f"{HEADER_CODES}\n1|张三|1|\n".encode() + "2|李四|1|\n".encode("gbk")
    error = rejected(tmp_path, out, data)
    assert error.code == "FILE_ENCODING_UNKNOWN"
    assert error.line == 3
    assert "BOM" in error.message


def test_utf16_file_rejected(tmp_path: Path, out: Path) -> None:
    error = rejected(tmp_path, out, f"{HEADER_CODES}\n1|张三|1|\n".encode("utf-16"))
    assert error.code == "FILE_ENCODING_UNKNOWN"
    assert "UTF-16" in error.message


# --- normalisation and text preservation ----------------------------------------------------


def test_full_width_normalised_fields_only(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_NAMES}\n　１２３４５ |　张三 | １２３４５．６７|１２３４５ \n".encode()
    row = rows_of(stage(tmp_path, out, data))[0]
    assert row["ZJHM"] == "12345"  # normalised: NFKC and stripped (including the ideographic space)
    assert row["JE"] == "12345.67"
    assert row["KHMC"] == "　张三 "  # not normalised: kept as written
    assert row["BZ"] == "１２３４５ "


def test_ascii_normalised_fields_still_trimmed(tmp_path: Path, out: Path) -> None:
    # ZJHM is ASCII in every row, so the reader skips NFKC for it but must still trim it.
    # JE has one full-width value, so that column goes through NFKC.
    data = f"{HEADER_NAMES}\n 00123\t|张三| 1.00 |x\n00456 |李四|２．５０|y\n".encode()
    rows = rows_of(stage(tmp_path, out, data))
    assert [row["ZJHM"] for row in rows] == ["00123", "00456"]
    assert [row["JE"] for row in rows] == ["1.00", "2.50"]
    assert [row["BZ"] for row in rows] == ["x", "y"]


def test_ascii_and_full_width_batches_agree(tmp_path: Path, out: Path) -> None:
    # The same values written in ASCII and in full-width forms stage identically after NFKC.
    ascii_rows = "".join(f" {i:05d} |名{i}|{i}.50|备注\n" for i in range(50))
    wide_rows = "".join(f"　{i:05d}　|名{i}|{i}.50|备注\n".translate(_FULL_WIDTH) for i in range(50))
    narrow = rows_of(stage(tmp_path, out, f"{HEADER_CODES}\n{ascii_rows}".encode()))
    (tmp_path / "wide").mkdir()
    wide = rows_of(stage(tmp_path / "wide", out, f"{HEADER_CODES}\n{wide_rows}".encode()))
    assert [(row["ZJHM"], row["JE"]) for row in wide] == [(row["ZJHM"], row["JE"]) for row in narrow]
    assert narrow[7]["ZJHM"] == "00007"
    assert narrow[7]["JE"] == "7.50"


_FULL_WIDTH = str.maketrans("0123456789.", "０１２３４５６７８９．")


def _expected_rows(text: str, file_layout: FileLayout) -> list[dict[str, object]]:
    """Split ``text`` line by line in plain Python, as the reader's contract describes."""
    width = len(file_layout.columns)
    rows: list[dict[str, object]] = []
    header_pending = file_layout.header
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        if header_pending:
            header_pending = False
            continue
        fields = line.split("|")
        if len(fields) == width + 1 and fields[-1] == "":
            fields.pop()
        assert len(fields) == width
        row: dict[str, object] = {"_line": number}
        for code, value in zip(file_layout.columns, fields, strict=True):
            if code in file_layout.normalised:
                value = unicodedata.normalize("NFKC", value).strip()
            row[code] = value
        rows.append(row)
    return rows


def test_pipe_rows_match_plain_python(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks and row groups put block ends, row group ends and ASCII-only batches
    # of a normalised column at many places in one file.
    monkeypatch.setattr(reader, "READ_CHUNK_BYTES", 4096)
    monkeypatch.setattr(reader, "ROW_GROUP_ROWS", 300)
    rng = random.Random(20261205)
    pieces = ["1", "23", "AB", "x", "张三", "１２", "ＡＢ", "．", " ", "\t", "\u3000"]
    lines = [HEADER_CODES]
    for index in range(3000):
        if index % 97 == 0:
            lines.append("")  # a blank line: skipped, but counted in line numbers
        # Long ASCII-only stretches leave whole batches of ZJHM and JE without full-width text.
        wide = index % 1000 > 700
        values = [
            "".join(rng.choice(pieces if wide and column in (0, 2) else pieces[:4] + pieces[8:10])
                    for _ in range(rng.randrange(0, 4)))
            for column in range(4)
        ]
        line = "|".join(values) + ("|" if rng.random() < 0.3 else "")
        lines.append(line + ("\r" if index % 11 == 0 else ""))
    text = "\n".join(lines) + "\n"

    rows = rows_of(stage(tmp_path, out, text.encode()))

    expected = _expected_rows(text, layout())
    assert len(rows) == len(expected)
    assert rows == expected


def test_leading_zeros_kept(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_NAMES}\n000000000000000001|0|007.50|0012\n".encode()
    row = rows_of(stage(tmp_path, out, data))[0]
    assert (row["ZJHM"], row["KHMC"], row["JE"], row["BZ"]) == ("000000000000000001", "0", "007.50", "0012")


def test_thousands_separators_kept_pipe(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_NAMES}\n1|张三|1,234,567.89|\n".encode()
    assert rows_of(stage(tmp_path, out, data))[0]["JE"] == "1,234,567.89"


def test_thousands_separators_ragged_comma(tmp_path: Path, out: Path) -> None:
    data = "证件号码,客户名称,金额,备注\n1,张三,100.00,\n2,李四,1,234,567.89,\n".encode()
    error = rejected(tmp_path, out, data, "report.csv", file_layout=layout(delimiter=","))
    assert error.code == "ROW_FIELD_COUNT"
    assert error.line == 3
    assert "千位分隔符" in error.message
    assert "“1,234,567.89”" in error.message
    assert "“1234567.89”" in error.message


def test_quoted_thousands_separators_kept_comma(tmp_path: Path, out: Path) -> None:
    data = '证件号码,客户名称,金额,备注\n1,张三,"1,234,567.89",\n'.encode()
    staged = stage(tmp_path, out, data, "report.csv", file_layout=layout(delimiter=","))
    assert rows_of(staged)[0]["JE"] == "1,234,567.89"


# --- trailing delimiter ---------------------------------------------------------------------


TRAILING = f"{HEADER_CODES}|\n1|张三|1.00||\n2|李四|2.00|备注|\n".encode()
NOT_TRAILING = f"{HEADER_CODES}\n1|张三|1.00|\n2|李四|2.00|备注\n".encode()


@pytest.mark.parametrize("rule", ["allowed", "required"])
def test_trailing_delimiter_accepted(tmp_path: Path, out: Path, rule: str) -> None:
    rows = rows_of(stage(tmp_path, out, TRAILING, file_layout=layout(trailing_delimiter=rule)))
    assert [(r["ZJHM"], r["BZ"]) for r in rows] == [("1", ""), ("2", "备注")]


def test_trailing_delimiter_allowed_per_line(tmp_path: Path, out: Path) -> None:
    # "1|张三|1.00|" has four fields (the last empty); "2|李四|2.00|备注|" has a trailing delimiter.
    data = f"{HEADER_CODES}\n1|张三|1.00|\n2|李四|2.00|备注|\n".encode()
    rows = rows_of(stage(tmp_path, out, data))
    assert [(r["ZJHM"], r["BZ"]) for r in rows] == [("1", ""), ("2", "备注")]


@pytest.mark.parametrize("body", [
    "1|张三|1.00|备注|\n2|李四|2.00||\n",  # every line ends with the delimiter
    "1|张三|1.00|备注\n2|李四|2.00||\n",  # only the second line does
    "1|张三|1.00|备注\n2|李四|2.00|\n",  # no line does
])
def test_trailing_delimiter_columns_align(tmp_path: Path, out: Path, body: str) -> None:
    rows = rows_of(stage(tmp_path, out, f"{HEADER_CODES}\n{body}".encode()))
    assert rows == [
        {"_line": 2, "ZJHM": "1", "KHMC": "张三", "JE": "1.00", "BZ": "备注"},
        {"_line": 3, "ZJHM": "2", "KHMC": "李四", "JE": "2.00", "BZ": ""},
    ]


def test_trailing_delimiter_forbidden(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_CODES}\n1|张三|1.00|备注|\n".encode()
    error = rejected(tmp_path, out, data, file_layout=layout(trailing_delimiter="forbidden"))
    assert error.code == "ROW_FIELD_COUNT"
    assert error.line == 2
    assert "有 5 个字段，应为 4 个" in error.message
    assert "不允许行尾分隔符" in error.message


def test_trailing_delimiter_forbidden_absent(tmp_path: Path, out: Path) -> None:
    staged = stage(tmp_path, out, NOT_TRAILING, file_layout=layout(trailing_delimiter="forbidden"))
    assert staged.rows == 2


def test_trailing_delimiter_required_but_missing(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_CODES}|\n1|张三|1.00||\n2|李四|2.00|备注\n".encode()
    error = rejected(tmp_path, out, data, file_layout=layout(trailing_delimiter="required"))
    assert error.code == "ROW_TRAILING_DELIMITER"
    assert error.line == 3
    assert "结尾" in error.message


def test_trailing_delimiter_comma_files(tmp_path: Path, out: Path) -> None:
    data = "证件号码,客户名称,金额,备注,\n1,张三,1.00,,\n".encode()
    required = layout(delimiter=",", trailing_delimiter="required")
    assert rows_of(stage(tmp_path, out, data, "report.csv", file_layout=required))[0]["BZ"] == ""

    other = tmp_path / "other"
    other.mkdir()
    forbidden = layout(delimiter=",", trailing_delimiter="forbidden")
    error = rejected(tmp_path, other, data, "report.csv", file_layout=forbidden)
    assert error.code == "HEADER_MISMATCH"
    assert "不允许行尾分隔符" in error.message


# --- file-level rejections ------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf", b"\n\r\n\n"])
def test_empty_file(tmp_path: Path, out: Path, data: bytes) -> None:
    error = rejected(tmp_path, out, data)
    assert error.code == "FILE_EMPTY"
    assert "report.txt" in error.message


@pytest.mark.parametrize(
    "data", [HEADER_NAMES.encode(), f"{HEADER_NAMES}\r\n".encode(), f"{HEADER_NAMES}\n\n\n".encode()]
)
def test_header_only_file(tmp_path: Path, out: Path, data: bytes) -> None:
    assert rejected(tmp_path, out, data).code == "FILE_NO_ROWS"


def test_header_only_comma_file(tmp_path: Path, out: Path) -> None:
    data = "证件号码,客户名称,金额,备注\n".encode()
    error = rejected(tmp_path, out, data, "r.csv", file_layout=layout(delimiter=","))
    assert error.code == "FILE_NO_ROWS"


def test_random_binary_renamed_csv(tmp_path: Path, out: Path) -> None:
    noise = bytes(random.Random(5).randrange(1, 256) for _ in range(5000))
    error = rejected(tmp_path, out, b"abc" + noise[:100] + b"\x00" + noise, "data.csv")
    assert error.code == "FILE_BINARY"
    assert "空字符" in error.message


def test_nul_late_in_text_file(tmp_path: Path, out: Path) -> None:
    rows = "".join(f"{i}|a|1|\n" for i in range(300_000))
    data = f"{HEADER_CODES}\n{rows}".encode() + b"1|\x00|1|\n"
    error = rejected(tmp_path, out, data)
    assert error.code == "FILE_BINARY"
    assert error.line == 300_002


def test_xlsx_renamed_csv(tmp_path: Path, out: Path) -> None:
    data = xlsx_bytes(lambda wb: wb.active.append(list(NAMES)))
    error = rejected(tmp_path, out, data, "report.csv")
    assert error.code == "FILE_BINARY"
    assert "扩展名改为 .xlsx" in error.message
    assert "按 XLSX 文件上传" in error.message


@pytest.mark.parametrize(
    ("data", "label"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "PDF"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100, ".xls"),
        (b"\x1f\x8b\x08\x00" + b"\x01" * 100, "GZIP"),
    ],
)
def test_known_binary_signatures(tmp_path: Path, out: Path, data: bytes, label: str) -> None:
    error = rejected(tmp_path, out, data, "report.txt")
    assert error.code == "FILE_BINARY"
    assert label in error.message


def test_plain_zip_renamed_txt(tmp_path: Path, out: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.txt", "1|2|3|4\n")
    error = rejected(tmp_path, out, buffer.getvalue(), "report.txt")
    assert error.code == "FILE_BINARY"
    assert "ZIP" in error.message


@pytest.mark.parametrize("name", ["report.xls", "report.json", "report", "report.csv.exe", "报表.DOCX"])
def test_unsupported_extension(tmp_path: Path, out: Path, name: str) -> None:
    error = rejected(tmp_path, out, b"a|b|c|d\n1|2|3|4\n", name)
    assert error.code == "FILE_TYPE_UNSUPPORTED"
    assert error.status == 415
    assert ".csv、.txt 或 .xlsx" in error.message


def test_extension_case_insensitive(tmp_path: Path, out: Path) -> None:
    assert stage(tmp_path, out, f"{HEADER_CODES}\n1|a|1|\n".encode(), "REPORT.TXT").rows == 1


def test_size_limit(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_CODES}\n1|a|1|\n".encode()
    error = rejected(tmp_path, out, data, max_bytes=len(data) - 1)
    assert error.code == "FILE_TOO_LARGE"
    assert error.status == 413
    assert stage(tmp_path, out, data, max_bytes=len(data)).rows == 1
    assert reader.DEFAULT_MAX_BYTES == 2 * 1024**3


def test_size_limit_xlsx(tmp_path: Path, out: Path) -> None:
    data = xlsx_bytes(lambda wb: wb.active.append(list(NAMES)))
    assert rejected(tmp_path, out, data, "r.xlsx", max_bytes=1000).code == "FILE_TOO_LARGE"


def test_line_without_line_end(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_CODES}\n1|a|1|\n".encode() + b"x" * (reader.MAX_LINE_BYTES + reader.READ_CHUNK_BYTES)
    error = rejected(tmp_path, out, data)
    assert error.code == "ROW_TOO_LONG"
    assert error.line == 3


# --- rows and header ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "found"),
    # "3|王五|" is three fields, the last one empty, as in a file whose last field is often blank.
    [("3|王五|1.00", 3), ("3|王五|1.00|备注|多余|", 5), ("3", 1), ("3|王五|", 3), ("3|", 2)],
)
def test_ragged_row_line_and_counts(tmp_path: Path, out: Path, line: str, found: int) -> None:
    data = f"{HEADER_CODES}\n1|张三|1.00|\n\n2|李四|1.00|\n{line}\n".encode()
    error = rejected(tmp_path, out, data)
    assert error.code == "ROW_FIELD_COUNT"
    assert error.line == 5
    assert f"第 5 行有 {found} 个字段，应为 4 个" in error.message


def test_ragged_row_later_block(tmp_path: Path, out: Path) -> None:
    rows = "".join(f"{i}|a|1|\n" for i in range(400_000))
    data = f"{HEADER_CODES}\n{rows}x|y\n".encode()
    error = rejected(tmp_path, out, data)
    assert error.code == "ROW_FIELD_COUNT"
    assert error.line == 400_002


def test_ragged_comma_row(tmp_path: Path, out: Path) -> None:
    data = "证件号码,客户名称,金额,备注\n1,张三,1.00\n".encode()
    error = rejected(tmp_path, out, data, "r.csv", file_layout=layout(delimiter=","))
    assert error.code == "ROW_FIELD_COUNT"
    assert error.line == 2
    assert "有 3 个字段，应为 4 个" in error.message


@pytest.mark.parametrize(
    ("header", "column", "fragment"),
    [
        ("证件号码|客户姓名|金额|备注", "KHMC", "第 2 列是“客户姓名”"),
        ("证件号码|客户名称|金额", "BZ", "缺少第 4 列“备注”"),
        ("客户名称|证件号码|金额|备注", "ZJHM", "第 1 列是“客户名称”"),
        ("证件号码|客户名称|金额|备注|其他", None, "第 5 列“其他”是多余的"),
    ],
)
def test_header_mismatch(tmp_path: Path, out: Path, header: str, column: str | None, fragment: str) -> None:
    error = rejected(tmp_path, out, f"{header}\n1|a|1|\n".encode())
    assert error.code == "HEADER_MISMATCH"
    assert error.line == 1
    assert error.column == column
    assert fragment in error.message


def test_header_codes_names_or_mixed(tmp_path: Path, out: Path) -> None:
    for header in (HEADER_CODES, HEADER_NAMES, "ZJHM|客户名称| ＪＥ |备注 ", "ZJHM|KHMC|JE|BZ|"):
        staged = stage(tmp_path, out, f"{header}\n1|a|1|\n".encode())
        assert staged.rows == 1


def test_no_header_layout(tmp_path: Path, out: Path) -> None:
    staged = stage(tmp_path, out, "1|张三|1|\n2|李四|2|\n".encode(), file_layout=layout(header=False))
    assert [r["_line"] for r in rows_of(staged)] == [1, 2]


def test_crlf_line_endings(tmp_path: Path, out: Path) -> None:
    data = f"{HEADER_NAMES}\r\n1|张三|1.00|备注\r\n\r\n2|李四|2.00|\r\n".encode()
    rows = rows_of(stage(tmp_path, out, data))
    assert rows == [
        {"_line": 2, "ZJHM": "1", "KHMC": "张三", "JE": "1.00", "BZ": "备注"},
        {"_line": 4, "ZJHM": "2", "KHMC": "李四", "JE": "2.00", "BZ": ""},
    ]


def test_crlf_in_comma_file(tmp_path: Path, out: Path) -> None:
    data = "证件号码,客户名称,金额,备注\r\n1,张三,1.00,备注\r\n".encode()
    staged = stage(tmp_path, out, data, "r.csv", file_layout=layout(delimiter=","))
    assert rows_of(staged)[0]["BZ"] == "备注"


def test_no_final_line_end(tmp_path: Path, out: Path) -> None:
    staged = stage(tmp_path, out, f"{HEADER_CODES}\n1|a|1|x\n2|b|2|y".encode())
    assert [r["BZ"] for r in rows_of(staged)] == ["x", "y"]


def test_comma_file_quoting(tmp_path: Path, out: Path) -> None:
    data = (
        "证件号码,客户名称,金额,备注\n"
        '1,"张三, 李四",1.00,"他说""好"""\n'
        '2,王五,2.00,"第一行\n第二行"\n'
        "3,赵六,3.00,\n"
    ).encode()
    staged = stage(tmp_path, out, data, "r.csv", file_layout=layout(delimiter=","))
    rows = rows_of(staged)
    assert [(r["_line"], r["KHMC"], r["BZ"]) for r in rows] == [
        (2, "张三, 李四", '他说"好"'),
        (3, "王五", "第一行\n第二行"),
        (5, "赵六", ""),
    ]


def test_quotes_plain_text_pipe(tmp_path: Path, out: Path) -> None:
    staged = stage(tmp_path, out, f'{HEADER_CODES}\n1|"张三|1|a,b\n'.encode())
    assert rows_of(staged)[0]["KHMC"] == '"张三'


@pytest.mark.parametrize(
    ("body", "line"),
    [('1,"张三,1.00,\n2,李四,1,\n', 2), ('1,张三,1.00,\n2,"李四"x,1,\n', 3)],
)
def test_bad_quoting_comma_file(tmp_path: Path, out: Path, body: str, line: int) -> None:
    data = f"证件号码,客户名称,金额,备注\n{body}".encode()
    error = rejected(tmp_path, out, data, "r.csv", file_layout=layout(delimiter=","))
    assert error.code == "ROW_QUOTING_INVALID"
    assert error.line == line


def test_gbk_comma_file(tmp_path: Path, out: Path) -> None:
    data = '证件号码,客户名称,金额,备注\n001,"张,三",1,备注\n'.encode("gbk")
    staged = stage(tmp_path, out, data, "r.csv", file_layout=layout(delimiter=","))
    assert staged.encoding == "gb18030"
    assert rows_of(staged)[0]["KHMC"] == "张,三"


def test_row_groups(tmp_path: Path, out: Path) -> None:
    rows = "".join(f"{i:06d}|a|1|\n" for i in range(reader.ROW_GROUP_ROWS * 2 + 10))
    staged = stage(tmp_path, out, f"{HEADER_CODES}\n{rows}".encode())
    metadata = pq.ParquetFile(staged.path).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [
        reader.ROW_GROUP_ROWS,
        reader.ROW_GROUP_ROWS,
        10,
    ]
    lines = pq.read_table(staged.path, columns=["_line", "ZJHM"])
    assert lines["_line"][-1].as_py() == reader.ROW_GROUP_ROWS * 2 + 11
    assert lines["ZJHM"][-1].as_py() == f"{reader.ROW_GROUP_ROWS * 2 + 9:06d}"


def test_error_after_written_row_groups(tmp_path: Path, out: Path) -> None:
    # Two row groups have gone to the writer thread when line 2 × ROW_GROUP_ROWS + 7 fails.
    good = "".join(f"{i:06d}|a|1|\n" for i in range(reader.ROW_GROUP_ROWS * 2 + 5))
    error = rejected(tmp_path, out, f"{HEADER_CODES}\n{good}1|2\n".encode())
    assert error.code == "ROW_FIELD_COUNT"
    assert error.line == reader.ROW_GROUP_ROWS * 2 + 7
    assert f"第 {reader.ROW_GROUP_ROWS * 2 + 7} 行有 2 个字段" in error.message


# --- XLSX -----------------------------------------------------------------------------------


def _report_sheet(workbook) -> None:  # noqa: ANN001
    sheet = workbook.active
    sheet.title = "Sheet1"
    sheet.append(list(NAMES))
    sheet.append(["000123", "张三", 1234.5, date(2024, 1, 31)])
    # An 18-digit ID typed into a General cell: Excel stores 3.10115198001011E+17.
    sheet.append([3.10115198001011e17, "李四", 42, datetime(2024, 2, 29, 13, 5)])
    sheet.append([None, None, None, None])  # an empty row is skipped
    sheet.append(["ABC", "  王五 ", 100.0, "备注"])
    small = sheet.cell(row=6, column=1, value=12345)
    small.number_format = "0.00E+00"
    sheet.cell(row=6, column=2, value="赵六")
    sheet.cell(row=6, column=3, value=1234567890.123456)  # 16 significant digits


def test_xlsx_cells_as_text(tmp_path: Path, out: Path) -> None:
    staged = stage(tmp_path, out, xlsx_bytes(_report_sheet), "report.xlsx")
    assert staged.file_type == "xlsx"
    assert staged.encoding is None
    assert staged.sheet == "Sheet1"
    rows = rows_of(staged)
    assert rows[0] == {"_line": 2, "ZJHM": "000123", "KHMC": "张三", "JE": "1234.5", "BZ": "20240131"}
    assert rows[1]["ZJHM"] == "310115198001011000"  # the digits Excel kept: the last three are lost
    assert rows[1]["JE"] == "42"
    assert rows[1]["BZ"] == "20240229"
    assert rows[2] == {"_line": 5, "ZJHM": "ABC", "KHMC": "  王五 ", "JE": "100", "BZ": "备注"}
    assert rows[3]["ZJHM"] == "12345"
    assert rows[3]["JE"] == "1234567890.123456"
    assert rows[3]["BZ"] == ""


def test_xlsx_precision_findings(tmp_path: Path, out: Path) -> None:
    staged = stage(tmp_path, out, xlsx_bytes(_report_sheet), "report.xlsx")
    found = {(f.line, f.column): f for f in staged.findings}
    assert set(found) == {(3, "ZJHM"), (6, "ZJHM"), (6, "JE")}
    id_finding = found[(3, "ZJHM")]
    assert id_finding.code == "XLSX_NUMBER_PRECISION_LOST"
    assert id_finding.column_name == "证件号码"
    assert id_finding.value == "310115198001011000"
    assert "设置单元格格式为“文本”后重新输入" in id_finding.message
    assert "第 3 行" in id_finding.message
    assert staged.findings_omitted == 0


def test_xlsx_precision_text_columns_only(tmp_path: Path, out: Path) -> None:
    staged = stage(tmp_path, out, xlsx_bytes(_report_sheet), "report.xlsx", text_columns={"ZJHM"})
    assert {(f.line, f.column) for f in staged.findings} == {(3, "ZJHM"), (6, "ZJHM")}


def test_xlsx_findings_cap(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "MAX_FINDINGS", 2)
    staged = stage(tmp_path, out, xlsx_bytes(_report_sheet), "report.xlsx")
    assert len(staged.findings) == 2
    assert staged.findings_omitted == 1


def test_xlsx_sheet_named_like_template(tmp_path: Path, out: Path) -> None:
    def build(workbook) -> None:  # noqa: ANN001
        workbook.active.title = "说明"
        workbook.active.append(["本工作簿第一页是填报说明"])
        data = workbook.create_sheet("GRKHXX")
        data.append(list(CODES))
        data.append(["1", "张三", 1, None])

    staged = stage(tmp_path, out, xlsx_bytes(build), "report.xlsx", sheet="grkhxx")
    assert staged.sheet == "GRKHXX"
    assert staged.rows == 1
    other = tmp_path / "other"
    other.mkdir()
    error = rejected(tmp_path, other, xlsx_bytes(build), "report.xlsx")  # without the name: first sheet
    assert error.code == "HEADER_MISMATCH"


def test_xlsx_header_only_and_empty(tmp_path: Path, out: Path) -> None:
    header_only = xlsx_bytes(lambda wb: wb.active.append(list(NAMES)))
    assert rejected(tmp_path, out, header_only, "r.xlsx").code == "FILE_NO_ROWS"
    assert rejected(tmp_path, out, xlsx_bytes(lambda wb: None), "r.xlsx").code == "FILE_EMPTY"


def test_xlsx_cell_beyond_template(tmp_path: Path, out: Path) -> None:
    def build(workbook) -> None:  # noqa: ANN001
        workbook.active.append(list(NAMES))
        workbook.active.append(["1", "张三", 1, "备注", None, "多余"])

    error = rejected(tmp_path, out, xlsx_bytes(build), "r.xlsx")
    assert error.code == "ROW_FIELD_COUNT"
    assert error.line == 2
    assert "F 列" in error.message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (f"{HEADER_CODES}\n1|a|1|\n".encode(), ".csv"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 600, "密码"),
        (b"PK\x03\x04" + b"\x00" * 200, "损坏"),
    ],
)
def test_not_a_workbook(tmp_path: Path, out: Path, data: bytes, fragment: str) -> None:
    error = rejected(tmp_path, out, data, "report.xlsx")
    assert error.code == "FILE_XLSX_INVALID"
    assert fragment in error.message


def test_xlsx_damaged_sheet(tmp_path: Path, out: Path) -> None:
    source = zipfile.ZipFile(io.BytesIO(xlsx_bytes(_report_sheet)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as damaged:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                content = content[: len(content) // 2]  # the sheet XML ends in the middle of a row
            damaged.writestr(item, content)
    error = rejected(tmp_path, out, buffer.getvalue(), "report.xlsx")
    assert error.code == "FILE_XLSX_INVALID"
    assert "损坏" in error.message


# --- nothing left behind --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "name", "code"),
    [
        (b"", "r.txt", "FILE_EMPTY"),
        (f"{HEADER_CODES}\n".encode(), "r.txt", "FILE_NO_ROWS"),
        (b"\x00\x01\x02", "r.csv", "FILE_BINARY"),
        (b"\xff\xff\xff\n", "r.txt", "FILE_ENCODING_UNKNOWN"),
        (f"{HEADER_CODES}\n1|a\n".encode(), "r.txt", "ROW_FIELD_COUNT"),
        (b"X|Y|Z|W\n1|a|1|\n", "r.txt", "HEADER_MISMATCH"),
        (b"1|2|3|4\n", "r.pdf", "FILE_TYPE_UNSUPPORTED"),
        (b"not a workbook", "r.xlsx", "FILE_XLSX_INVALID"),
    ],
)
def test_no_staging_file_after_error(tmp_path: Path, out: Path, data: bytes, name: str, code: str) -> None:
    assert rejected(tmp_path, out, data, name).code == code


def test_late_error_removes_written_groups(tmp_path: Path, out: Path) -> None:
    rows = "".join(f"{i}|a|1|\n" for i in range(reader.ROW_GROUP_ROWS * 3))
    error = rejected(tmp_path, out, f"{HEADER_CODES}\n{rows}bad\n".encode())
    assert error.code == "ROW_FIELD_COUNT"


def test_error_dict_code_and_detail(tmp_path: Path, out: Path) -> None:
    error = rejected(tmp_path, out, b"", "..\\..\\上报\x07文件.txt")
    assert error.as_dict()["code"] == "FILE_EMPTY"
    assert "“上报文件.txt”" in error.as_dict()["detail"]


def test_invalid_layout_raises_value_error(tmp_path: Path, out: Path) -> None:
    with pytest.raises(ValueError):
        stage(tmp_path, out, b"a\n", file_layout=layout(delimiter=";"))
    with pytest.raises(ValueError):
        stage(tmp_path, out, b"a\n", file_layout=layout(columns=("A", "B", "C", "_line")))


# --- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", ["|", ","])
def test_memory_bounded_large_file(tmp_path: Path, delimiter: str) -> None:
    """Stage 200,000 rows (about 270 MiB) in a fresh process and check its peak RSS grows far less."""
    script = textwrap.dedent(
        """
        import json, resource, sys
        from pathlib import Path
        from intake.reader import FileLayout, stage_file

        work, delimiter = Path(sys.argv[1]), sys.argv[2]
        codes = tuple(f"F{i:02d}" for i in range(30))
        layout = FileLayout(codes, codes, frozenset(codes[:20]), delimiter=delimiter)
        tail = delimiter.join(f"{i:05d}值{'x' * 40}" for i in range(29)) + "\\n"

        def make(path, rows):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(delimiter.join(codes) + "\\n")
                for start in range(0, rows, 1000):
                    batch = range(start, min(rows, start + 1000))
                    handle.write("".join(f"{i:018d}{delimiter}" + tail for i in batch))

        (work / "out").mkdir()
        make(work / "small.txt", 1000)
        # The first call loads the libraries, so it runs before the measurement starts.
        stage_file(work / "small.txt", "small.txt", layout, work / "out")
        big = work / "big.txt"
        make(big, 200_000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        staged = stage_file(big, "big.txt", layout, work / "out")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        size = big.stat().st_size
        big.unlink()
        print(json.dumps({"rows": staged.rows, "size": size, "growth": after - before}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), delimiter],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["rows"] == 200_000
    assert measured["size"] > 250 * 1024**2
    assert measured["growth"] < measured["size"] / 2, measured
