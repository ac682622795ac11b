"""Streaming reader of uploaded report files into a text-only staging Parquet file.

:func:`stage_file` reads one submitted file (CSV/TXT or XLSX) and writes every data row to a
Parquet file whose columns are all ``string`` apart from ``_line`` (the 1-based line number in
the text file, or the row number in the worksheet). Nothing is converted to a number or a date
here: the validator (DuckDB) reads the staging file and checks types, so leading zeros and
values such as ``1,234,567.89`` reach it exactly as the reporter wrote them.

Memory stays bounded whatever the file size. Text is read in blocks of ``READ_CHUNK_BYTES``
cut at a line end. Rows are split with Arrow compute kernels (``|`` files) or the ``csv``
module (``,`` files). ``pyarrow.parquet.ParquetWriter`` writes row groups of
``ROW_GROUP_ROWS`` rows, or fewer once they reach ``ROW_GROUP_MAX_BYTES``. XLSX files are read
with openpyxl in read-only mode, which streams the sheet XML.

NOTE: openpyxl still loads a workbook's shared-strings table whole, so an XLSX file with
millions of distinct strings needs memory in proportion to them.

Encoding of text files, decided in this order and never guessed the other way round:

1. a UTF-8 byte order mark: UTF-8, and any invalid byte after it is an error;
2. else the whole file decodes as UTF-8: UTF-8;
3. else GB18030 (a superset of GBK and GB2312), which must decode the whole file.

The parse first runs as UTF-8 and restarts as GB18030 at the first invalid UTF-8 sequence. A
row error found on the way is reported only after the whole file has been checked as UTF-8,
so no error message comes from a wrongly guessed encoding.

Blank lines and blank worksheet rows are skipped, and line numbers still count them.

Every user-facing failure raises :class:`IntakeFileError` (a ``RegsandboxError``) with a stable
code and a Chinese message, and leaves nothing in ``target_dir``: the Parquet file is written
under a temporary name, fsynced and renamed with ``os.replace``, and deleted on any error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import shutil
import tempfile
import unicodedata
import uuid
import warnings
import zipfile
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.hazmat.primitives import hashes

from regsandbox_core.crypto import sm3_file
from regsandbox_core.errors import RegsandboxError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DirectText",
    "FileLayout",
    "IntakeFileError",
    "LINE_COLUMN",
    "ReceivedFile",
    "RowFinding",
    "StagedFile",
    "direct_text",
    "read_received",
    "receive_file",
    "stage_file",
]

DEFAULT_MAX_BYTES = 2 * 1024**3
LINE_COLUMN = "_line"
ROW_GROUP_ROWS = 65_536
ROW_GROUP_MAX_BYTES = 32 * 1024**2
# Rows parsed into Python lists (CSV and XLSX) are handed to Arrow in batches of this size,
# because each Python string costs at least 49 bytes more than the same text in an Arrow array.
ROW_BATCH_ROWS = 2_048
READ_CHUNK_BYTES = 1024**2
# A line longer than this without a line end is rejected, so memory stays bounded.
MAX_LINE_BYTES = 1024**2
# Maximum row findings listed in StagedFile.findings. Further findings are only counted.
MAX_FINDINGS = 10_000
# Excel's own row limit. A worksheet with more rows was not written by Excel.
XLSX_MAX_ROWS = 1_048_576
# The staging file is temporary and read once or twice, so it is not compressed. On the
# 1,000,000-row file of benchmarks/intake_validation.py (301 MB, 2 cores), zstd cost about 0.6 CPU
# seconds and DuckDB scanned both files in the same time. Dictionary encoding alone makes the
# file about half the size of the text.
PARQUET_COMPRESSION = "none"

TEXT_EXTENSIONS = frozenset({".csv", ".txt"})
XLSX_EXTENSIONS = frozenset({".xlsx"})
TRAILING_DELIMITER_RULES = frozenset({"forbidden", "allowed", "required"})

ENCODING_UTF8_BOM = "utf-8-sig"
ENCODING_UTF8 = "utf-8"
ENCODING_GB18030 = "gb18030"

_BOM_UTF8 = b"\xef\xbb\xbf"
_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Leading bytes of binary formats a reporter may upload by mistake, with a Chinese name.
_BINARY_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (_ZIP_MAGIC, "ZIP 压缩包"),
    (b"PK\x05\x06", "ZIP 压缩包"),
    (_OLE_MAGIC, "旧版 Office 文档（如 .xls、.doc）或加密的 Office 文件"),
    (b"%PDF-", "PDF 文档"),
    (b"\x1f\x8b", "GZIP 压缩包"),
    (b"Rar!\x1a\x07", "RAR 压缩包"),
    (b"7z\xbc\xaf\x27\x1c", "7z 压缩包"),
    (b"\x89PNG\r\n\x1a\n", "PNG 图片"),
    (b"\xff\xd8\xff", "JPEG 图片"),
    (b"GIF8", "GIF 图片"),
    (b"SQLite format 3\x00", "SQLite 数据库"),
    (b"PAR1", "Parquet 文件"),
)
_SCIENTIFIC = re.compile(r"[Ee][+-]")
_QUOTED = re.compile(r'"[^"]*"')
_THOUSANDS = re.compile(r"(?<![\d.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])")


# --- interface ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileLayout:
    columns: tuple[str, ...]  # field codes in file order
    column_names: tuple[str, ...]  # Chinese names, same order (for messages and header matching)
    normalised: frozenset[str]  # codes of code/number/date fields: NFKC + strip applied
    delimiter: str = "|"  # "|" or ","
    header: bool = True  # first line or row contains codes or Chinese names
    trailing_delimiter: str = "allowed"  # "forbidden" | "allowed" | "required"


@dataclass(frozen=True)
class RowFinding:
    """A problem in one cell that does not stop staging; the validator adds it to the report."""

    line: int  # line number in the text file, or row number in the worksheet
    column: str  # field code
    column_name: str  # Chinese field name
    value: str  # the text staged for the cell
    code: str  # stable English code, e.g. XLSX_NUMBER_PRECISION_LOST
    message: str  # Chinese message for the reporter


@dataclass(frozen=True)
class StagedFile:
    """Result of staging: the staging Parquet file and facts learned while reading the submitted file."""

    path: Path  # the staging Parquet file
    rows: int  # data rows (header excluded)
    encoding: str | None  # "utf-8-sig", "utf-8" or "gb18030"; None for XLSX
    size: int  # bytes of the submitted file
    sm3: str  # SM3 digest of the submitted bytes, 64 hex characters
    findings: tuple[RowFinding, ...]  # row-level findings (XLSX), at most MAX_FINDINGS
    findings_omitted: int = 0  # findings beyond MAX_FINDINGS, counted but not listed
    file_type: str = "text"  # "text" or "xlsx"
    sheet: str | None = None  # worksheet read, for XLSX


class IntakeFileError(RegsandboxError):
    """A submitted file that cannot be staged; ``line`` and ``column`` locate it when known."""

    status = 422

    def __init__(
        self,
        code: str,
        message: str,
        *,
        line: int | None = None,
        column: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(code, message, status=status)
        self.line = line
        self.column = column


class _NotUtf8(Exception):
    """Internal: the tentative UTF-8 parse met an invalid sequence; restart as GB18030."""

    def __init__(self, offset: int, line: int, raw: bytes) -> None:
        super().__init__(offset)
        self.offset = offset
        self.line = line
        self.raw = raw


# --- entry point ----------------------------------------------------------------------------


def stage_file(
    source: Path,
    original_name: str,
    layout: FileLayout,
    target_dir: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    sheet: str | None = None,
    text_columns: Collection[str] | None = None,
    direct: bool = False,
    sm3: str | None = None,
) -> StagedFile:
    """Read ``source`` (uploaded as ``original_name``) and write its rows to a staging Parquet file.

    ``original_name`` chooses the format by its extension (.csv/.txt or .xlsx) and appears in
    messages. ``sheet`` names the worksheet to read when the workbook has one of that name
    (usually the template code), else the first visible worksheet is read. ``text_columns``
    limits the XLSX precision check to those field codes (identifiers, codes); ``None`` checks
    every column. Raises :class:`IntakeFileError`; on any error ``target_dir`` is left as it was.

    With ``direct=True`` DuckDB reads a ``|`` text file that passes the screens of
    :func:`_stage_direct` and writes the staging Parquet file itself, in parallel and without a
    Python parse. The rows, values and line numbers are those the text parser would write, but
    the rows may be out of file order. Any other file, and any file that fails a screen, is
    staged by the text parser.

    ``sm3`` is the digest of ``source`` when the caller already has it (:func:`receive_file`),
    so the file is not hashed again.
    """
    _check_layout(layout)
    source = Path(source)
    target_dir = Path(target_dir)
    name = _display_name(original_name)
    extension = _extension(original_name)
    if extension not in TEXT_EXTENSIONS | XLSX_EXTENSIONS:
        raise _unsupported_type(name, extension)
    size = source.stat().st_size
    if size > max_bytes:
        raise IntakeFileError(
            "FILE_TOO_LARGE",
            f"文件“{name}”大小为 {_human_size(size)}，超过平台允许的上限 {_human_size(max_bytes)}。"
            "请确认导出的数据范围是否正确；确需报送更大的文件，请联系平台管理员。",
            status=413,
        )
    if size == 0:
        raise _empty_file(name)
    if direct and extension in TEXT_EXTENSIONS:
        staged = _stage_direct(source, name, layout, size, target_dir)
        if staged is not None:
            return staged
    checked_columns = frozenset(layout.columns if text_columns is None else text_columns)

    handle, temp_name = tempfile.mkstemp(dir=target_dir, prefix=".staging-", suffix=".parquet.tmp")
    os.close(handle)
    temp_path = Path(temp_name)
    # regsandbox_core.crypto offers sm3_file(path) but no incremental hasher. A second reader
    # hashes in a thread while the file is parsed, because SM3 hashing releases the GIL.
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-sm3")
    digest_future: Future[str] | None = None if sm3 is not None else hasher.submit(sm3_file, source)
    try:
        if extension in XLSX_EXTENSIONS:
            rows, findings, omitted, sheet_used = _stage_xlsx(
                source, name, layout, temp_path, sheet, checked_columns
            )
            encoding, file_type = None, "xlsx"
        else:
            rows, encoding = _stage_text(source, name, layout, temp_path, max_bytes)
            findings, omitted, sheet_used, file_type = (), 0, None, "text"
        _fsync_file(temp_path)
        digest = digest_future.result() if digest_future is not None else sm3
        final_path = target_dir / f"staging-{uuid.uuid4().hex}.parquet"
        os.replace(temp_path, final_path)
    except BaseException:
        with suppress(FileNotFoundError):
            temp_path.unlink()
        raise
    finally:
        # On an error the hash thread still finishes reading the file in the background.
        hasher.shutdown(wait=False, cancel_futures=True)
    _fsync_dir(target_dir)
    return StagedFile(
        path=final_path,
        rows=rows,
        encoding=encoding,
        size=size,
        sm3=digest,
        findings=tuple(findings),
        findings_omitted=omitted,
        file_type=file_type,
        sheet=sheet_used,
    )


def _check_layout(layout: FileLayout) -> None:
    """Reject a layout the reader cannot apply (a programming or template error, not the user's)."""
    if not layout.columns:
        raise ValueError("FileLayout.columns is empty")
    if len(layout.columns) != len(layout.column_names):
        raise ValueError("FileLayout.columns and column_names differ in length")
    if len(set(layout.columns)) != len(layout.columns):
        raise ValueError("FileLayout.columns has duplicate codes")
    if LINE_COLUMN in layout.columns:
        raise ValueError(f"FileLayout.columns must not contain {LINE_COLUMN!r}")
    if layout.delimiter not in ("|", ","):
        raise ValueError(f"unsupported delimiter {layout.delimiter!r}")
    if layout.trailing_delimiter not in TRAILING_DELIMITER_RULES:
        raise ValueError(f"unsupported trailing_delimiter {layout.trailing_delimiter!r}")
    unknown = set(layout.normalised) - set(layout.columns)
    if unknown:
        raise ValueError(f"FileLayout.normalised names unknown columns {sorted(unknown)}")


# --- staging Parquet ------------------------------------------------------------------------


def _schema(layout: FileLayout) -> pa.Schema:
    return pa.schema([(LINE_COLUMN, pa.int64())] + [(code, pa.string()) for code in layout.columns])


class _Sink:
    """Collects record batches and writes row groups of ``ROW_GROUP_ROWS`` rows.

    A row group is written early once the waiting rows contain ``ROW_GROUP_MAX_BYTES``, so wide
    rows do not raise the memory bound. Row groups are encoded and written in a writer thread
    (pyarrow releases the GIL there) while the caller parses the next block. At most one row
    group is in that thread at a time, so memory stays bounded.
    """

    def __init__(self, path: Path, layout: FileLayout) -> None:
        self.layout = layout
        self.schema = _schema(layout)
        self.normalised = [i for i, code in enumerate(layout.columns) if code in layout.normalised]
        self.writer = pq.ParquetWriter(str(path), self.schema, compression=PARQUET_COMPRESSION)
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        self.rows = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-parquet")
        self.in_flight: Future[None] | None = None

    def add_columns(self, lines: np.ndarray | pa.Array, columns: list[pa.Array]) -> None:
        """Add rows given column-wise; normalised columns get NFKC and whitespace trimming."""
        for index in self.normalised:
            column = columns[index]
            # NFKC maps every ASCII character to itself, so only columns with other text need it.
            if not pc.all(pc.string_is_ascii(column)).as_py():
                column = pc.utf8_normalize(column, "NFKC")
            columns[index] = pc.utf8_trim_whitespace(column)
        batch = pa.RecordBatch.from_arrays([pa.array(lines, pa.int64()), *columns], schema=self.schema)
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        self.pending_bytes += batch.nbytes
        self.rows += batch.num_rows
        while self.pending_rows >= ROW_GROUP_ROWS:
            self._write(ROW_GROUP_ROWS)
        if self.pending_bytes >= ROW_GROUP_MAX_BYTES:
            self._write(self.pending_rows)

    def add_rows(self, lines: list[int], rows: list[list[str]]) -> None:
        """Add rows given row-wise, each a list of exactly ``len(layout.columns)`` strings."""
        columns = [pa.array(values, pa.string()) for values in zip(*rows, strict=True)]
        self.add_columns(np.asarray(lines, dtype=np.int64), columns)

    def _write(self, count: int) -> None:
        table = pa.Table.from_batches(self.pending, schema=self.schema)
        self._wait()
        self.in_flight = self.executor.submit(self.writer.write_table, table.slice(0, count), row_group_size=count)
        rest = table.slice(count)
        self.pending = rest.to_batches()
        self.pending_rows = rest.num_rows
        self.pending_bytes = rest.nbytes

    def _wait(self) -> None:
        """Wait for the row group in the writer thread and raise its error, if any."""
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            in_flight.result()

    def close(self) -> None:
        if self.pending_rows:
            self._write(self.pending_rows)
        self._wait()
        self.executor.shutdown()
        self.writer.close()

    def abort(self) -> None:
        self.pending = []
        with suppress(Exception):
            self._wait()
        self.executor.shutdown()
        with suppress(Exception):
            self.writer.close()


# --- DuckDB staging of well-formed "|" files ----------------------------------------------

# Bytes hashed and screened per read while a file is screened for DuckDB staging.
SCREEN_CHUNK_BYTES = 4 * 1024**2
# DuckDB memory_limit while it writes a staging file; it spills to target_dir beyond it. With it,
# staging and validating a 2 GB file (benchmarks/intake_validation.py --memory-check, 1GB
# validation budget, 2 cores) peaked at 704 and 708 MiB RSS in two runs.
DIRECT_MEMORY_LIMIT = "512MB"
_CR, _LF, _PIPE, _SPACE = 13, 10, ord("|"), 32


_FIELD_ENDS = (_PIPE, _CR, _LF)


class _ByteScreen:
    """Byte counts of a whole text file, gathered while the file is hashed or received."""

    def __init__(self) -> None:
        self.pipes = 0
        self.newlines = 0
        self.returns = 0
        self.crlf = 0  # CR bytes directly followed by LF
        self.controls = 0  # bytes below 0x20, including NUL, tab, CR and LF
        self.blank_lines = 0  # lines with no byte, or only a CR, before their LF
        self.edges = 0  # places where a field may start with whitespace or ends with a space
        self.last = -1  # the file's last byte, -1 while nothing was read
        self._offset = 0  # bytes read before the current chunk
        self._last_newline = -1  # file offset of the last LF read, -1 before the first
        self._space_at_end = False  # the previous chunk ended with a space

    def add(self, chunk: bytes) -> None:
        if not chunk:
            return
        array = np.frombuffer(chunk, np.uint8)
        self.pipes += int(np.count_nonzero(array == _PIPE))
        self.controls += int(np.count_nonzero(array < _SPACE))
        newlines = np.flatnonzero(array == _LF)
        self.newlines += len(newlines)
        returns = int(np.count_nonzero(array == _CR))
        if returns or self.last == _CR:
            self.returns += returns
            self.crlf += int(np.count_nonzero((array[:-1] == _CR) & (array[1:] == _LF)))
            self.crlf += int(self.last == _CR and array[0] == _LF)
        self._add_blank_lines(array, newlines)
        self._add_edges(array)
        self.last = int(array[-1])
        self._offset += len(array)

    def finish(self) -> None:
        """Count what only the end of the file decides: a space as its last byte."""
        if self._space_at_end:
            self.edges += 1
            self._space_at_end = False

    def _add_blank_lines(self, array: np.ndarray, newlines: np.ndarray) -> None:
        if not len(newlines):
            return
        # A line is blank when its LF follows the previous LF (or the file start) directly, or
        # with only a CR between them.
        starts = np.empty(len(newlines), dtype=np.int64)
        starts[0] = self._last_newline + 1 - self._offset
        starts[1:] = newlines[:-1] + 1
        widths = newlines - starts
        self.blank_lines += int(np.count_nonzero(widths == 0))
        one_byte_lines = np.flatnonzero(widths == 1)
        for index in one_byte_lines:  # rare, and blank only when that byte is a CR
            start = int(starts[index])
            byte = int(array[start]) if start >= 0 else self.last
            self.blank_lines += int(byte == _CR)
        self._last_newline = self._offset + int(newlines[-1])

    def _add_edges(self, array: np.ndarray) -> None:
        if self._space_at_end:
            self.edges += int(array[0] in _FIELD_ENDS)
            self._space_at_end = False
        # The space, and the lead bytes of the other characters DuckDB's trim() removes (Unicode
        # category Zs): U+00A0 (C2), U+1680 (E1), U+2000 to U+205F (E2) and U+3000 (E3).
        # On the 301 MB benchmark file, these five tests took 0.2 s and a numpy lookup table 0.44 s.
        candidates = np.flatnonzero(
            (array == _SPACE) | (array == 0xE3) | (array == 0xE2) | (array == 0xC2) | (array == 0xE1)
        )
        if not len(candidates):
            return
        # A field starts after "|" or a line end, or at the first byte of the file.
        before = array[np.maximum(candidates - 1, 0)].astype(np.int16)
        if candidates[0] == 0:
            before[0] = self.last if self.last >= 0 else _LF
            if self._offset == 0 and bytes(array[:3]) == _BOM_UTF8:
                before[0] = -1  # the byte order mark is not part of a field
        self.edges += int(np.count_nonzero((before == _PIPE) | (before == _LF)))
        spaces = candidates[array[candidates] == _SPACE]
        if not len(spaces):
            return
        if spaces[-1] == len(array) - 1:
            self._space_at_end = True
            spaces = spaces[:-1]
        after = array[spaces + 1]
        self.edges += int(np.count_nonzero((after == _PIPE) | (after == _CR) | (after == _LF)))


class _Hasher:
    """SM3 over a stream of chunks: hashlib's OpenSSL SM3 when present (it releases the GIL), else cryptography's."""

    def __init__(self) -> None:
        try:
            self._hashlib = hashlib.new("sm3")
        except ValueError:
            self._hashlib = None
            self._digest = hashes.Hash(hashes.SM3())

    def update(self, chunk: bytes) -> None:
        if self._hashlib is not None:
            self._hashlib.update(chunk)
        else:
            self._digest.update(chunk)

    def hexdigest(self) -> str:
        return self._hashlib.hexdigest() if self._hashlib is not None else self._digest.finalize().hex()


@dataclass(frozen=True)
class ReceivedFile:
    """A submitted file on disk, with its size, SM3 digest and byte counts from one read of its bytes."""

    path: Path
    size: int
    sm3: str
    screen: _ByteScreen


def receive_file(stream: BinaryIO, target: Path, chunk_bytes: int = SCREEN_CHUNK_BYTES) -> ReceivedFile:
    """Copy ``stream`` to a new file ``target`` (0600), hashing and screening the bytes on the way.

    Memory stays at one chunk whatever the size. The file is fsynced before this returns.
    """
    target = Path(target)
    hasher = _Hasher()
    screen = _ByteScreen()
    size = 0
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        while chunk := stream.read(chunk_bytes):
            handle.write(chunk)
            hasher.update(chunk)
            screen.add(chunk)
            size += len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    screen.finish()
    return ReceivedFile(path=target, size=size, sm3=hasher.hexdigest(), screen=screen)


def read_received(source: Path) -> ReceivedFile:
    """Hash and screen a file already on disk, as :func:`receive_file` does while copying."""
    source = Path(source)
    hasher = _Hasher()
    screen = _ByteScreen()
    size = 0
    with open(source, "rb") as handle:
        while chunk := handle.read(SCREEN_CHUNK_BYTES):
            hasher.update(chunk)
            screen.add(chunk)
            size += len(chunk)
    screen.finish()
    return ReceivedFile(path=source, size=size, sm3=hasher.hexdigest(), screen=screen)


def _direct_head(source: Path, name: str, layout: FileLayout) -> tuple[bool, int] | None:
    """Screen the start of a ``|`` file for DuckDB: return (UTF-8 byte order mark, ``|`` in the header), or None.

    None means a UTF-16 byte order mark, a binary signature, or a header line that is missing,
    not UTF-8 or not the layout's header.
    """
    with open(source, "rb") as handle:
        head = handle.read(MAX_LINE_BYTES + len(_BOM_UTF8) + 2)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or any(head.startswith(magic) for magic, _ in _BINARY_SIGNATURES):
        return None
    bom = head.startswith(_BOM_UTF8)
    if not layout.header:
        return bom, 0
    end = head.find(b"\n")
    if end < 0:
        return None
    first = head[len(_BOM_UTF8) if bom else 0 : end].rstrip(b"\r")
    try:
        _check_header(first.decode("utf-8").split("|"), 1, name, layout)
    except (UnicodeDecodeError, IntakeFileError):
        return None
    return bom, first.count(b"|")


@dataclass(frozen=True)
class DirectText:
    """A ``|`` text file whose bytes allow DuckDB to read it in place with the parser's values and line numbers.

    Built by :func:`direct_text`. DuckDB must still read it without an error and return
    ``lines`` rows. A normalised field must also not contain a character other than ASCII,
    because NFKC could change it. The validator checks both and falls back to staging otherwise.
    """

    path: Path
    skip: int  # lines before the first data line (the header)
    lines: int  # data lines, each of which must be one row
    encoding: str
    size: int
    sm3: str
    plain_edges: bool
    """No field starts with whitespace or ends with a space, so no value changes when trimmed
    and a text value is blank only when it is empty."""


def direct_text(received: ReceivedFile, original_name: str, layout: FileLayout,
                max_bytes: int = DEFAULT_MAX_BYTES) -> DirectText | None:
    """Return how DuckDB may read ``received`` in place, or None when the text parser must stage it.

    The screens, all decided from the bytes, accept a file only when each of its lines is one
    row with the parser's line number:

    - a ``.csv`` or ``.txt`` name, ``|`` delimiter and a trailing-delimiter rule other than
      "required"; no field code starting with ``_`` or named ``ordinality``;
    - a size from 1 byte to ``max_bytes``; no UTF-16 byte order mark or binary signature;
    - the first line is a header that passes :func:`_check_header`, when the layout has one;
    - no byte below 0x20 except LF and CR; no CR at all, or every line ends with CRLF;
    - no blank line; the ``|`` count of the data lines equals lines × (fields − 1).
    """
    _check_layout(layout)
    if _extension(original_name) not in TEXT_EXTENSIONS:
        return None
    if layout.delimiter != "|" or layout.trailing_delimiter == "required":
        return None
    if any(code.casefold() == "ordinality" or code.startswith("_") for code in layout.columns):
        return None
    if not 0 < received.size <= max_bytes:
        return None
    head = _direct_head(received.path, _display_name(original_name), layout)
    if head is None:
        return None
    bom, header_pipes = head
    skip = 1 if layout.header else 0
    screen = received.screen
    lines = screen.newlines + (0 if screen.last == _LF else 1) - skip
    if (
        lines <= 0
        or screen.controls != screen.newlines + screen.returns
        or (screen.returns and not screen.returns == screen.crlf == screen.newlines)
        or screen.blank_lines
        or screen.pipes - header_pipes != lines * (len(layout.columns) - 1)
    ):
        return None
    return DirectText(
        path=received.path,
        skip=skip,
        lines=lines,
        encoding=ENCODING_UTF8_BOM if bom else ENCODING_UTF8,
        size=received.size,
        sm3=received.sm3,
        plain_edges=screen.edges == 0,
    )


def csv_source(path: Path, columns: Sequence[str], skip: int) -> str:
    """Return DuckDB's ``read_csv`` of a ``|`` file with every field as text and no quoting."""
    spec = ", ".join(f"{_sql_text(code)}: 'VARCHAR'" for code in columns)
    # strict_mode rejects a line with too few fields or with extra non-empty fields. It accepts
    # extra empty fields at the end of a line, which the pipe count of _stage_direct rules out.
    return (
        f"read_csv({_sql_text(str(path))}, delim = '|', quote = '', escape = '', header = false, "
        f"skip = {skip}, columns = {{{spec}}}, auto_detect = false, strict_mode = true, null_padding = false, "
        f"max_line_size = {MAX_LINE_BYTES})"
    )


def _direct_select(source: Path, layout: FileLayout, skip: int) -> str:
    """Return SQL for the rows the text parser would stage: ``_line`` and the text of each field."""
    values = []
    for code in layout.columns:
        # DuckDB reads an empty field as NULL, and the text parser stages "".
        value = f"coalesce({_sql_name(code)}, '')"
        if code in layout.normalised:
            # The screens leave only ASCII without control characters in these fields, so NFKC changes
            # nothing and Arrow's utf8_trim_whitespace removes spaces only. DuckDB's trim() without
            # a character list would also remove U+3000 and other Unicode spaces. Testing for a space
            # first costs about 1 CPU second less than trimming every value of the benchmark file.
            value = f"CASE WHEN {value} LIKE ' %' OR {value} LIKE '% ' THEN trim({value}, ' ') ELSE {value} END"
        values.append(f"{value} AS {_sql_name(code)}")
    return (
        f"SELECT ordinality + {skip} AS {LINE_COLUMN}, {', '.join(values)} "
        f"FROM {csv_source(source, layout.columns, skip)} WITH ORDINALITY"
    )


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_name(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _stage_direct(source: Path, name: str, layout: FileLayout, size: int, target_dir: Path) -> StagedFile | None:
    """Stage a well-formed ``|`` text file with DuckDB; return None when a screen fails, leaving nothing behind.

    Each screen below accepts a file only when the text parser would stage exactly the rows,
    values and line numbers of :func:`_direct_select` and would raise no error:

    - ``|`` delimiter and a trailing-delimiter rule other than "required". DuckDB drops extra
      empty fields at a line end, so the field count of each line is only known when no line
      has a trailing delimiter, which the "required" rule demands;
    - no UTF-16 byte order mark or binary signature, and no field code named ``ordinality``;
    - the first line is a header that passes :func:`_check_header`, when the layout has one;
    - DuckDB reads the file without error. It rejects invalid UTF-8 (which the parser would
      read as GB18030), lines with too few fields, extra non-empty fields, lines over
      ``MAX_LINE_BYTES`` and a mix of LF and CRLF line ends;
    - no byte below 0x20 except LF and CR: no NUL (FILE_BINARY), and no tab or other control
      character that utf8_trim_whitespace would trim;
    - no CR at all, or every line ends with CRLF (CR count = CRLF count = LF count). The parser
      removes CRs at a line end, and DuckDB removes the CRLF;
    - DuckDB's row count equals the number of lines after the header. DuckDB skips blank lines
      and the parser counts them in line numbers, so equal counts mean no blank line and
      ``ordinality + skip`` is the line number;
    - the ``|`` count of the data lines equals rows × (fields − 1). DuckDB rejects a line with
      fewer, so every line has exactly fields − 1 delimiters and no trailing delimiter;
    - every value of a normalised field (code, number, date) is ASCII, so NFKC changes nothing.
      Trimming spaces does not change that, so the staged (trimmed) values are checked.
    """
    if layout.delimiter != "|" or layout.trailing_delimiter == "required":
        return None
    if any(code.casefold() == "ordinality" for code in layout.columns):
        return None
    head = _direct_head(source, name, layout)
    if head is None:
        return None
    bom, header_pipes = head
    skip = 1 if layout.header else 0

    handle_number, temp_name = tempfile.mkstemp(dir=target_dir, prefix=".staging-", suffix=".parquet.tmp")
    os.close(handle_number)
    temp_path = Path(temp_name)
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-sm3")
    accepted = False
    try:
        hashed = hasher.submit(read_received, source)
        written = _direct_write(source, layout, skip, temp_path, target_dir)
        received = hashed.result()
        digest, screen = received.sm3, received.screen
        if written is None:
            return None
        rows, non_ascii = written
        lines = screen.newlines + (0 if screen.last == _LF else 1) - skip
        if (
            screen.controls != screen.newlines + screen.returns
            or (screen.returns and not screen.returns == screen.crlf == screen.newlines)
            or rows == 0
            or rows != lines
            or screen.pipes - header_pipes != rows * (len(layout.columns) - 1)
            or non_ascii
        ):
            return None
        _fsync_file(temp_path)
        final_path = target_dir / f"staging-{uuid.uuid4().hex}.parquet"
        os.replace(temp_path, final_path)
        accepted = True
    finally:
        hasher.shutdown(wait=True)
        if not accepted:
            with suppress(FileNotFoundError):
                temp_path.unlink()
    _fsync_dir(target_dir)
    return StagedFile(
        path=final_path,
        rows=rows,
        encoding=ENCODING_UTF8_BOM if bom else ENCODING_UTF8,
        size=size,
        sm3=digest,
        findings=(),
    )


def _direct_write(
    source: Path, layout: FileLayout, skip: int, temp_path: Path, target_dir: Path
) -> tuple[int, int] | None:
    """Write the staging Parquet file with DuckDB; return (rows, rows with a non-ASCII normalised value).

    Returns None when DuckDB cannot read the file.
    """
    import duckdb  # imported here because the text parser does not need it

    non_ascii = " OR ".join(
        f"strlen({_sql_name(code)}) <> length({_sql_name(code)})" for code in layout.columns if code in layout.normalised
    ) or "false"
    spill = target_dir / f".duckdb-{uuid.uuid4().hex}"
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET enable_progress_bar = false")
        con.execute(f"SET memory_limit = '{DIRECT_MEMORY_LIMIT}'")
        con.execute(f"SET temp_directory = {_sql_text(str(spill))}")
        # Rows may leave the file order, which made the COPY of the benchmark file about 1.5 s
        # faster on 2 cores. ``_line`` keeps each row's place; validation sorts findings by it.
        con.execute("SET preserve_insertion_order = false")
        con.execute(
            f"COPY ({_direct_select(source, layout, skip)}) TO {_sql_text(str(temp_path))} "
            f"(FORMAT parquet, COMPRESSION uncompressed, ROW_GROUP_SIZE {ROW_GROUP_ROWS})"
        )
        rows, non_ascii_rows = con.sql(
            f"SELECT count(*), count(*) FILTER (WHERE {non_ascii}) FROM read_parquet({_sql_text(str(temp_path))})"
        ).fetchall()[0]
    except duckdb.Error:
        return None
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    return int(rows), int(non_ascii_rows)


# --- text files -----------------------------------------------------------------------------


def _stage_text(
    source: Path, name: str, layout: FileLayout, temp_path: Path, max_bytes: int
) -> tuple[int, str]:
    """Stage a CSV/TXT file; return (rows, encoding)."""
    with open(source, "rb") as handle:
        head = handle.read(64)
    if head.startswith(_BOM_UTF8):
        rows = _parse_text(source, name, layout, temp_path, ENCODING_UTF8_BOM, len(_BOM_UTF8), max_bytes)
        return rows, ENCODING_UTF8_BOM
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise IntakeFileError(
            "FILE_ENCODING_UNKNOWN",
            f"文件“{name}”是 UTF-16（Unicode）编码，平台只接受 UTF-8 或 GB18030（含 GBK）编码。"
            "请用 UTF-8 编码重新导出；在 Excel 中可“另存为”“CSV UTF-8（逗号分隔）”。",
        )
    _reject_binary_signature(source, head, name)

    not_utf8: _NotUtf8 | None = None
    try:
        rows = _parse_text(source, name, layout, temp_path, ENCODING_UTF8, 0, max_bytes)
        return rows, ENCODING_UTF8
    except _NotUtf8 as exc:
        not_utf8 = exc
    except IntakeFileError:
        # Report the error only if UTF-8 was the right guess for the whole file.
        not_utf8 = _first_invalid_utf8(source)
        if not_utf8 is None:
            raise
    rows = _parse_text(source, name, layout, temp_path, ENCODING_GB18030, 0, max_bytes, not_utf8)
    return rows, ENCODING_GB18030


class _TextSource:
    """A text file read as blocks of whole lines in one encoding, with error positions."""

    def __init__(
        self, path: Path, name: str, encoding: str, start: int, max_bytes: int, not_utf8: _NotUtf8 | None
    ) -> None:
        self.path = path
        self.name = name
        self.encoding = encoding
        self.start = start
        self.max_bytes = max_bytes
        self.not_utf8 = not_utf8

    def blocks(self) -> Iterator[tuple[bytes, int]]:
        """Yield (block, file offset): whole lines, at most READ_CHUNK_BYTES + MAX_LINE_BYTES bytes.

        Raises FILE_BINARY at the first NUL byte and ROW_TOO_LONG for a line longer than
        ``MAX_LINE_BYTES`` without a line end.
        """
        pending = b""
        offset = self.start  # file offset of the next block
        with open(self.path, "rb") as handle:
            handle.seek(self.start)
            read = self.start
            while chunk := handle.read(READ_CHUNK_BYTES):
                read += len(chunk)
                if read > self.max_bytes:
                    raise IntakeFileError(
                        "FILE_TOO_LARGE",
                        f"文件“{self.name}”在读取过程中超过了平台允许的上限 {_human_size(self.max_bytes)}。"
                        "请确认文件没有被同时改写后重新上传。",
                        status=413,
                    )
                nul = chunk.find(b"\x00")
                if nul >= 0:
                    at = read - len(chunk) + nul
                    line = self.line_at(at)
                    raise IntakeFileError(
                        "FILE_BINARY",
                        f"文件“{self.name}”不是文本文件：第 {line} 行（文件偏移量 {at} 字节）出现了空字符（NUL），"
                        "无法按 CSV/TXT 读取。请从业务系统重新导出为文本文件后上传；Excel 工作簿请以 .xlsx 文件上传。",
                        line=line,
                    )
                data = pending + chunk if pending else chunk
                cut = data.rfind(b"\n") + 1
                if len(data) - cut > MAX_LINE_BYTES:
                    line = self.line_at(offset + cut)
                    raise IntakeFileError(
                        "ROW_TOO_LONG",
                        f"文件“{self.name}”第 {line} 行超过 {MAX_LINE_BYTES // 1024} KiB 仍没有换行符，"
                        "不像是逐行记录的报表文件。请检查换行符和文件格式后重新导出。",
                        line=line,
                    )
                if cut == 0:
                    pending = data
                    continue
                pending = data[cut:]
                yield data[:cut], offset
                offset += cut
        if pending:
            yield pending, offset

    def line_at(self, offset: int) -> int:
        """Count the line ends before ``offset`` and return the 1-based line number of that byte.

        It reads the file from the start, so only error paths call it.
        """
        newlines = 0
        with open(self.path, "rb") as handle:
            remaining = offset
            while remaining > 0 and (chunk := handle.read(min(READ_CHUNK_BYTES, remaining))):
                newlines += chunk.count(b"\n")
                remaining -= len(chunk)
        return newlines + 1

    def decode(self, block: bytes, offset: int) -> str:
        """Decode one block strictly; an invalid sequence raises _NotUtf8 (UTF-8) or FILE_ENCODING_UNKNOWN."""
        try:
            return block.decode(ENCODING_GB18030 if self.encoding == ENCODING_GB18030 else "utf-8")
        except UnicodeDecodeError as exc:
            self._invalid(block, offset, exc)

    def utf8(self, block: bytes, offset: int) -> bytes:
        """Validate a UTF-8 block in place, or convert a GB18030 block, and return UTF-8 bytes."""
        if self.encoding == ENCODING_GB18030:
            return self.decode(block, offset).encode("utf-8")
        try:
            _one_string(block).validate(full=True)
        except pa.ArrowInvalid:
            self.decode(block, offset)  # raises with the exact position
        return block

    def _invalid(self, block: bytes, offset: int, exc: UnicodeDecodeError) -> NoReturn:
        at = offset + exc.start
        line = self.line_at(at)
        raw = block[exc.start : max(exc.end, exc.start + 1)][:4]
        if self.encoding == ENCODING_UTF8:
            raise _NotUtf8(at, line, raw) from None
        hex_bytes = _hex(raw)
        if self.encoding == ENCODING_UTF8_BOM:
            message = (
                f"文件“{self.name}”以 UTF-8 BOM 开头，但第 {line} 行（文件偏移量 {at} 字节）的字节 {hex_bytes} "
                "不是有效的 UTF-8 字符，文件可能混入了其他编码的内容。请用 UTF-8 编码重新导出整个文件。"
            )
        else:
            first = ""
            if self.not_utf8 is not None:
                first = (
                    f"第 {self.not_utf8.line} 行（文件偏移量 {self.not_utf8.offset} 字节）的字节 "
                    f"{_hex(self.not_utf8.raw)} 不是 UTF-8，"
                )
            message = (
                f"无法识别文件“{self.name}”的编码：{first}按 GB18030（含 GBK）读取时第 {line} 行"
                f"（文件偏移量 {at} 字节）的字节 {hex_bytes} 也无法识别。"
                "请用 UTF-8 或 GB18030 编码重新导出整个文件，不要混用编码。"
            )
        raise IntakeFileError("FILE_ENCODING_UNKNOWN", message, line=line) from None


def _parse_text(
    source: Path,
    name: str,
    layout: FileLayout,
    temp_path: Path,
    encoding: str,
    start: int,
    max_bytes: int,
    not_utf8: _NotUtf8 | None = None,
) -> int:
    """Parse the whole text file in ``encoding`` into the staging file; return the data row count."""
    text = _TextSource(source, name, encoding, start, max_bytes, not_utf8)
    sink = _Sink(temp_path, layout)
    try:
        if layout.delimiter == "|":
            seen_line = _parse_pipe(text, layout, sink)
        else:
            seen_line = _parse_csv(text, layout, sink)
        if not seen_line:
            raise _empty_file(name)
        if sink.rows == 0:
            raise _no_rows(name)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return sink.rows


def _parse_pipe(text: _TextSource, layout: FileLayout, sink: _Sink) -> bool:
    """Split ``|`` lines with Arrow kernels (no quoting); return whether any non-blank line was seen."""
    width = len(layout.columns)
    header_pending = layout.header
    seen = False
    line = 1
    for block, offset in text.blocks():
        pieces = pc.list_flatten(pc.split_pattern(_one_string(text.utf8(block, offset)), "\n"))
        first_line, line = line, line + len(pieces) - 1
        lines = pieces.slice(0, len(pieces) - 1) if block.endswith(b"\n") else pieces
        numbers = np.arange(first_line, first_line + len(lines), dtype=np.int64)
        lines = pc.utf8_rtrim(lines, characters="\r")
        filled = pc.greater(pc.binary_length(lines), 0)
        if not pc.all(filled).as_py():
            numbers = numbers[filled.to_numpy(zero_copy_only=False)]
            lines = lines.filter(filled)
        if len(lines) == 0:
            continue
        seen = True
        if header_pending:
            _check_header(lines[0].as_py().split("|"), int(numbers[0]), text.name, layout)
            header_pending = False
            lines, numbers = lines.slice(1), numbers[1:]
            if len(lines) == 0:
                continue
        fields = pc.split_pattern(lines, "|")
        counts = pc.list_value_length(fields).to_numpy()
        ends = pc.ends_with(lines, "|").to_numpy(zero_copy_only=False)
        rule = layout.trailing_delimiter
        if rule == "forbidden":
            ok = counts == width
        elif rule == "allowed":
            ok = (counts == width) | ((counts == width + 1) & ends)
        else:
            ok = (counts == width + 1) & ends
        if not ok.all():
            bad = int(np.argmin(ok))
            raise _field_count_error(
                text.name, layout, int(numbers[bad]), int(counts[bad]), bool(ends[bad]), lines[bad].as_py()
            )
        # Each column gets its own buffers, so a waiting row group contains no data twice.
        stride = int(counts[0])
        if not (counts == stride).all():
            # Lines with and without a trailing delimiter: cut every line to its first ``width`` fields.
            fields, stride = pc.list_slice(fields, 0, width, return_fixed_size_list=True), width
        values = fields.flatten()
        total = len(lines) * stride
        sink.add_columns(numbers, [values.take(np.arange(j, total, stride)) for j in range(width)])
    return seen


def _one_string(data: bytes) -> pa.Array:
    """Wrap ``data`` in a one-element Arrow string array without copying or validating it."""
    offsets = np.array([0, len(data)], dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _decoded_lines(text: _TextSource) -> Iterator[str]:
    for block, offset in text.blocks():
        yield from io.StringIO(text.decode(block, offset), newline="\n")


def _parse_csv(text: _TextSource, layout: FileLayout, sink: _Sink) -> bool:
    """Parse ``,`` files with the csv module (standard quoting); return whether any record was seen."""
    width = len(layout.columns)
    name = text.name
    reader = csv.reader(_decoded_lines(text), strict=True)
    header_pending = layout.header
    seen = False
    lines: list[int] = []
    rows: list[list[str]] = []
    previous = 0  # reader.line_num after the previous record: its last physical line

    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise _quoting_error(name, previous + 1, str(exc)) from None
        line, previous = previous + 1, reader.line_num
        if not record or record == [""]:
            continue
        seen = True
        if header_pending:
            _check_header(record, line, name, layout)
            header_pending = False
            continue

        count = len(record)
        ends = record[-1] == ""
        if count != width:
            if count == width + 1 and ends and layout.trailing_delimiter != "forbidden":
                record.pop()
            else:
                raise _field_count_error(name, layout, line, count, ends, ",".join(record))
        elif layout.trailing_delimiter == "required":
            raise _field_count_error(name, layout, line, count, ends, ",".join(record))

        lines.append(line)
        rows.append(record)
        if len(rows) >= ROW_BATCH_ROWS:
            sink.add_rows(lines, rows)
            lines, rows = [], []
    if rows:
        sink.add_rows(lines, rows)
    return seen


def _first_invalid_utf8(source: Path) -> _NotUtf8 | None:
    """Scan the whole file with an incremental UTF-8 decoder; return the first invalid sequence."""
    with open(source, "rb") as handle:
        start = len(_BOM_UTF8) if handle.read(3) == _BOM_UTF8 else 0
        handle.seek(start)
        offset, line, carry = start, 1, b""
        while chunk := handle.read(READ_CHUNK_BYTES):
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data" and len(data) - exc.start < 4:
                    carry = data[exc.start :]
                    data = data[: exc.start]
                else:
                    at_line = line + data.count(b"\n", 0, exc.start)
                    return _NotUtf8(offset + exc.start, at_line, data[exc.start : exc.end])
            line += data.count(b"\n")
            offset += len(data)
        if carry:
            return _NotUtf8(offset, line, carry)
    return None


# --- header and row checks ------------------------------------------------------------------


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


def _check_header(fields: list[str], line: int, name: str, layout: FileLayout) -> None:
    """Check that the header lists each column's code or Chinese name in order, after NFKC and strip."""
    width = len(layout.columns)
    got = list(fields)
    if layout.trailing_delimiter != "forbidden" and len(got) == width + 1 and _norm(got[-1]) == "":
        got.pop()
    for index, (code, label) in enumerate(zip(layout.columns, layout.column_names, strict=True)):
        position = index + 1
        if index >= len(got):
            raise IntakeFileError(
                "HEADER_MISMATCH",
                f"文件“{name}”第 {line} 行的表头只有 {len(got)} 列，缺少第 {position} 列“{label}”（{code}）。"
                "表头应按模板顺序列出全部字段的代码或中文名称。",
                line=line,
                column=code,
            )
        value = _norm(got[index])
        if value not in (_norm(code), _norm(label)):
            raise IntakeFileError(
                "HEADER_MISMATCH",
                f"文件“{name}”第 {line} 行表头的第 {position} 列是“{_clip(value)}”，应为“{label}”或“{code}”。"
                "表头应按模板顺序列出全部字段的代码或中文名称；请检查是否用错了模板、漏列或多列。",
                line=line,
                column=code,
            )
    if len(got) > width:
        extra = _clip(_norm(got[width]))
        hint = (
            "模板不允许行尾分隔符，请删除表头末尾多余的分隔符。"
            if extra == "" and len(got) == width + 1
            else f"模板只有 {width} 列，请删除多余的列。"
        )
        raise IntakeFileError(
            "HEADER_MISMATCH",
            f"文件“{name}”第 {line} 行的表头有 {len(got)} 列，第 {width + 1} 列“{extra}”是多余的。{hint}",
            line=line,
        )


def _field_count_error(
    name: str, layout: FileLayout, line: int, count: int, ends: bool, text: str
) -> IntakeFileError:
    """Build the error for a line whose field count does not fit the layout.

    ``count`` includes a trailing empty field, and ``ends`` is whether the line ends with the delimiter.
    """
    width = len(layout.columns)
    mark = layout.delimiter
    rule = layout.trailing_delimiter
    if rule == "required" and count == width and not ends:
        return IntakeFileError(
            "ROW_TRAILING_DELIMITER",
            f"文件“{name}”第 {line} 行末尾缺少分隔符“{mark}”：模板要求每行以“{mark}”结尾。"
            f"请在每行最后一个字段后加上“{mark}”后重新上传。",
            line=line,
        )
    # A final delimiter ends the line under "required", and under "allowed" when the line has
    # too many fields even without it. On a short line it begins an empty last field, which counts.
    if ends and (rule == "required" or (rule == "allowed" and count - 1 > width)):
        found = count - 1
    else:
        found = count
    hints = []
    if rule == "forbidden" and ends and count == width + 1:
        hints.append(f"模板不允许行尾分隔符，请删除行末多余的“{mark}”。")
    elif rule == "required":
        hints.append(f"模板要求每行以“{mark}”结尾。")
    if mark == "," and found > width:
        amount = _THOUSANDS.search(text)
        if amount:
            written = amount.group(0)
            plain = written.replace(",", "")
            hints.append(
                f"疑似金额“{written}”带有千位分隔符：金额不能带千位分隔符，应写成“{plain}”；"
                "含逗号的文本请用英文双引号括起来。"
            )
        else:
            hints.append("金额不能带千位分隔符；含逗号的文本请用英文双引号括起来。")
    if not hints:
        hints.append(f"请检查该行是否漏填或多填了分隔符“{mark}”。")
    return IntakeFileError(
        "ROW_FIELD_COUNT",
        f"文件“{name}”第 {line} 行有 {found} 个字段，应为 {width} 个（分隔符为“{mark}”）。" + "".join(hints)
        + "读取在此行停止，之后的行如有同样问题也请一并更正。",
        line=line,
    )


def _quoting_error(name: str, line: int, reason: str) -> IntakeFileError:
    if "unexpected end of data" in reason:
        detail = "引号没有闭合，一直到文件末尾"
    elif "field larger than field limit" in reason:
        detail = f"字段超过 {csv.field_size_limit()} 个字符，通常是引号没有闭合"
    elif "expected after" in reason:
        detail = "右引号后面应紧跟逗号或换行"
    elif "new-line character" in reason:
        detail = "未加引号的字段中出现了回车符"
    else:
        detail = "引号使用不正确"
    return IntakeFileError(
        "ROW_QUOTING_INVALID",
        f"文件“{name}”从第 {line} 行开始的记录无法解析：{detail}。"
        "含逗号、引号或换行的字段请整体用英文双引号括起来，字段内的双引号写成两个双引号。",
        line=line,
    )


# --- XLSX -----------------------------------------------------------------------------------


def _stage_xlsx(
    source: Path,
    name: str,
    layout: FileLayout,
    temp_path: Path,
    sheet: str | None,
    checked_columns: frozenset[str],
) -> tuple[int, list[RowFinding], int, str]:
    """Stage the chosen worksheet; return (rows, findings, findings omitted, sheet title)."""
    with open(source, "rb") as handle:
        head = handle.read(512)
        if not head.startswith(_ZIP_MAGIC):
            raise _not_a_workbook(name, head)
        handle.seek(0)
        # openpyxl checks the extension of a path it is given, and an upload's stored name may
        # have none, so it reads from the open file instead.
        return _stage_workbook(handle, head, name, layout, temp_path, sheet, checked_columns)


def _stage_workbook(
    handle: io.BufferedReader,
    head: bytes,
    name: str,
    layout: FileLayout,
    temp_path: Path,
    sheet: str | None,
    checked_columns: frozenset[str],
) -> tuple[int, list[RowFinding], int, str]:
    import openpyxl  # imported here because text files do not need it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workbook = openpyxl.load_workbook(handle, read_only=True, data_only=True)
    except Exception as exc:
        raise _not_a_workbook(name, head) from exc
    sink: _Sink | None = None
    try:
        worksheet = _choose_sheet(workbook, sheet)
        if worksheet is None:
            raise _not_a_workbook(name, head)
        title = worksheet.title
        sink = _Sink(temp_path, layout)
        findings: list[RowFinding] = []
        omitted = _read_sheet(worksheet, name, title, layout, sink, checked_columns, findings)
        sink.close()
        return sink.rows, findings, omitted, title
    except IntakeFileError:
        if sink is not None:
            sink.abort()
        raise
    except Exception as exc:
        # openpyxl raises many exception types (zip, XML, KeyError) on a damaged workbook.
        if sink is not None:
            sink.abort()
        raise IntakeFileError(
            "FILE_XLSX_INVALID",
            f"Excel 文件“{name}”内容已损坏，读取工作表时出错。请在 Excel 中打开并重新保存为 .xlsx 后上传。",
        ) from exc
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        with suppress(Exception):
            workbook.close()


def _choose_sheet(workbook, sheet_name: str | None):  # noqa: ANN001, ANN202 - openpyxl types
    """Return the worksheet called ``sheet_name`` (NFKC, any case), else the first visible one."""
    sheets = list(workbook.worksheets)
    if not sheets:
        return None
    if sheet_name:
        key = _norm(sheet_name).casefold()
        for candidate in sheets:
            if _norm(candidate.title).casefold() == key:
                return candidate
    for candidate in sheets:
        if getattr(candidate, "sheet_state", "visible") == "visible":
            return candidate
    return sheets[0]


def _read_sheet(
    worksheet,  # noqa: ANN001 - openpyxl ReadOnlyWorksheet
    name: str,
    title: str,
    layout: FileLayout,
    sink: _Sink,
    checked_columns: frozenset[str],
    findings: list[RowFinding],
) -> int:
    """Stream the worksheet rows into ``sink``; return how many findings were not kept."""
    width = len(layout.columns)
    checked = [code in checked_columns for code in layout.columns]
    header_pending = layout.header
    seen = False
    omitted = 0
    lines: list[int] = []
    rows: list[list[str]] = []
    worksheet.reset_dimensions()
    for row_number, cells in enumerate(worksheet.iter_rows(), start=1):
        if row_number > XLSX_MAX_ROWS:
            raise IntakeFileError(
                "FILE_XLSX_INVALID",
                f"Excel 文件“{name}”的工作表“{title}”超过 {XLSX_MAX_ROWS} 行，不是有效的 Excel 工作簿。"
                "请检查文件来源，或改为 CSV/TXT 文本文件上传。",
            )
        texts: list[str] = []
        suspects: list[int] = []
        for index, cell in enumerate(cells):
            text, suspect = _cell_text(cell)
            texts.append(text)
            if suspect and index < width and checked[index]:
                suspects.append(index)
        if all(not text.strip() for text in texts):
            continue
        while len(texts) > width and not texts[-1].strip():
            texts.pop()
        seen = True
        if header_pending:
            _check_header(texts, row_number, name, layout)
            header_pending = False
            continue
        if len(texts) > width:
            column = _column_letter(width + 1 + next(i for i, t in enumerate(texts[width:]) if t.strip()))
            raise IntakeFileError(
                "ROW_FIELD_COUNT",
                f"Excel 文件“{name}”工作表“{title}”第 {row_number} 行的 {column} 列还有内容，"
                f"但模板只有 {width} 列（A 至 {_column_letter(width)} 列）。请删除模板列之外的内容后重新上传。",
                line=row_number,
            )
        texts.extend([""] * (width - len(texts)))
        for index in suspects:
            if len(findings) < MAX_FINDINGS:
                findings.append(_precision_finding(row_number, layout, index, texts[index]))
            else:
                omitted += 1
        lines.append(row_number)
        rows.append(texts)
        if len(rows) >= ROW_BATCH_ROWS:
            sink.add_rows(lines, rows)
            lines, rows = [], []
    if rows:
        sink.add_rows(lines, rows)
    if not seen:
        raise IntakeFileError(
            "FILE_EMPTY",
            f"Excel 文件“{name}”的工作表“{title}”没有任何内容。请确认数据填在第一个工作表中后重新上传。",
        )
    if sink.rows == 0:
        raise _no_rows(name)
    return omitted


def _cell_text(cell) -> tuple[str, bool]:  # noqa: ANN001 - openpyxl cell
    """Return the cell as text and whether it is a number that may have lost digits."""
    value = cell.value
    if value is None:
        return "", False
    if isinstance(value, str):
        return value, False
    if isinstance(value, bool):
        return ("TRUE" if value else "FALSE"), False
    if isinstance(value, int | float):
        # Excel stores every number as a double and keeps 15 significant digits. openpyxl returns
        # an int when the stored text has no decimal point or exponent, and a float otherwise.
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value), False
        exact = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
        if isinstance(value, int):
            text = str(value)
        elif value.is_integer() and abs(value) < 1e15:
            text = str(int(value))
        else:
            text = format(exact, "f")
        digits = len(exact.normalize().as_tuple().digits)
        number_format = _QUOTED.sub("", getattr(cell, "number_format", None) or "")
        scientific = _SCIENTIFIC.search(number_format) is not None
        return text, abs(value) >= 1e15 or digits > 15 or scientific
    if isinstance(value, datetime | date):
        return f"{value.year:04d}{value.month:02d}{value.day:02d}", False
    if isinstance(value, time):
        return value.isoformat(), False
    if isinstance(value, timedelta):
        return str(value), False
    return str(value), False


def _precision_finding(row: int, layout: FileLayout, index: int, text: str) -> RowFinding:
    code = layout.columns[index]
    label = layout.column_names[index]
    return RowFinding(
        line=row,
        column=code,
        column_name=label,
        value=text,
        code="XLSX_NUMBER_PRECISION_LOST",
        message=(
            f"第 {row} 行“{label}”（{code}）的单元格是数值格式，读出的值为 {text}。"
            "Excel 的数值只保留 15 位有效数字，超过 15 位的号码（如 18 位身份证号、长账号）会丢失末尾数字或显示为科学计数法。"
            "请将该列设置单元格格式为“文本”后重新输入。"
        ),
    )


def _column_letter(number: int) -> str:
    letters = ""
    while number:
        number, remainder = divmod(number - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return letters


# --- file-level checks and messages ---------------------------------------------------------


def _reject_binary_signature(source: Path, head: bytes, name: str) -> None:
    """Reject a text upload whose first bytes belong to a known binary format."""
    for magic, label in _BINARY_SIGNATURES:
        if head.startswith(magic):
            if magic == _ZIP_MAGIC and _is_xlsx(source):
                raise IntakeFileError(
                    "FILE_BINARY",
                    f"文件“{name}”实际是 Excel 工作簿（.xlsx），只是扩展名为 {_extension(name) or '文本'}。"
                    "请把扩展名改为 .xlsx 后按 XLSX 文件上传，或在 Excel 中“另存为”CSV 文件后再上传。",
                )
            if magic == _OLE_MAGIC:
                hint = "旧版 Excel（.xls）请在 Excel 中“另存为”.xlsx 或 CSV 文件后上传。"
            else:
                hint = "请上传从业务系统导出的 CSV/TXT 文本文件或 .xlsx 工作簿。"
            raise IntakeFileError(
                "FILE_BINARY",
                f"文件“{name}”的内容是{label}，不是 CSV/TXT 文本文件。{hint}",
            )


def _is_xlsx(source: Path) -> bool:
    try:
        with zipfile.ZipFile(source) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return "xl/workbook.xml" in names


def _not_a_workbook(name: str, head: bytes) -> IntakeFileError:
    if head.startswith(_OLE_MAGIC):
        detail = "它是旧版 Excel（.xls）文件或设置了打开密码的工作簿。请取消密码，或在 Excel 中“另存为”.xlsx 后上传。"
    elif b"\x00" not in head and head:
        detail = "它看起来是文本文件。若是 CSV/TXT 文件，请把扩展名改为 .csv 或 .txt 后上传。"
    else:
        detail = "文件可能已损坏或不是 Excel 工作簿。请在 Excel 中打开并重新保存为 .xlsx 后上传。"
    return IntakeFileError("FILE_XLSX_INVALID", f"文件“{name}”的扩展名为 .xlsx，但无法作为 Excel 工作簿读取：{detail}")


def _unsupported_type(name: str, extension: str) -> IntakeFileError:
    extension_text = f"“{extension}”" if extension else "（无扩展名）"
    hint = "旧版 .xls 请在 Excel 中“另存为”.xlsx 后上传。" if extension == ".xls" else ""
    return IntakeFileError(
        "FILE_TYPE_UNSUPPORTED",
        f"文件“{name}”的扩展名{extension_text}不受支持，请上传 .csv、.txt 或 .xlsx 文件。{hint}",
        status=415,
    )


def _empty_file(name: str) -> IntakeFileError:
    return IntakeFileError(
        "FILE_EMPTY",
        f"文件“{name}”没有任何内容（空文件或只有空行）。请检查导出步骤，确认文件已完整生成后重新上传。",
    )


def _no_rows(name: str) -> IntakeFileError:
    return IntakeFileError(
        "FILE_NO_ROWS",
        f"文件“{name}”只有表头，没有数据行。请确认导出了本期数据后重新上传。",
    )


def _extension(original_name: str) -> str:
    base = re.split(r"[\\/]", original_name)[-1]
    if "." not in base.strip("."):
        return ""
    return "." + base.rsplit(".", 1)[1].strip().lower()


def _display_name(original_name: str) -> str:
    """Return the base name without control characters, clipped to 120 characters."""
    base = re.split(r"[\\/]", original_name)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    return _clip(base or "（未命名）", 120)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hex(raw: bytes) -> str:
    return " ".join(f"0x{byte:02X}" for byte in raw)


def _human_size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}（{size} 字节）"
    return f"{size} 字节"


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_dir(path: Path) -> None:
    with suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
