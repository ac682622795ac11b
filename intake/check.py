"""Reading and validating one submitted file, in place when DuckDB can read it as the parser would.

:func:`check_file` takes a file that :func:`intake.reader.receive_file` wrote (with its SM3
digest and byte counts) and returns the facts the submission records and the validation
result. A ``|`` text file that passes the byte screens of :func:`intake.reader.direct_text` is
validated where it lies by :func:`intake.validate.validate_text`, with no staging file. Every
other file, and a text file for which DuckDB's reading turns out to differ from the parser's,
is staged by :func:`intake.reader.stage_file` and validated by
:func:`intake.validate.validate_staged`. Both paths produce the same findings, line numbers
and field counts for the same file; only the time differs.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from intake.reader import DEFAULT_MAX_BYTES, ReceivedFile, direct_text, stage_file
from intake.template_model import Template, TemplateCatalog
from intake.validate import ValidationContext, ValidationResult, validate_staged, validate_text

__all__ = ["CheckedFile", "check_file"]

VALIDATION_FOLDER = "validation"


@dataclass(frozen=True)
class CheckedFile:
    """Result of reading and validating a submitted file."""

    rows: int  # data rows (header excluded)
    encoding: str | None  # "utf-8-sig", "utf-8" or "gb18030"; None for XLSX
    size: int  # bytes of the submitted file
    sm3: str  # SM3 digest of the submitted bytes
    file_type: str  # "text" or "xlsx"
    staging_path: Path | None  # the staging Parquet file, None when the text was validated in place
    result: ValidationResult


def check_file(
    received: ReceivedFile,
    original_name: str,
    template: Template,
    context: ValidationContext | Callable[[], ValidationContext],
    work_dir: Path,
    *,
    catalog: TemplateCatalog | None = None,
    text_columns: Collection[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> CheckedFile:
    """Read ``received`` (uploaded as ``original_name``) and validate it against ``template``.

    The staging file, when one is needed, and the findings go under ``work_dir``. Raises the
    reader's :class:`~intake.reader.IntakeFileError` for a file that cannot be read and the
    validator's :class:`~intake.validate.ValidationError`.

    ``context`` may be a function that returns it. It is then called once, after the file passed
    the byte screens or was staged, so a file that cannot be read fails before the caller gathers
    the batch and warehouse data of the validation.
    """
    resolve = functools.cache(context) if callable(context) else (lambda: context)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    layout = template.file_layout()
    direct = direct_text(received, original_name, layout, max_bytes)
    if direct is not None:
        result = validate_text(direct, template, resolve(), work_dir / VALIDATION_FOLDER, catalog=catalog)
        if result is not None:
            return CheckedFile(rows=result.rows_checked, encoding=direct.encoding, size=received.size,
                               sm3=received.sm3, file_type="text", staging_path=None, result=result)
        shutil.rmtree(work_dir / VALIDATION_FOLDER, ignore_errors=True)
    staged = stage_file(received.path, original_name, layout, work_dir, max_bytes=max_bytes, sheet=template.code,
                        text_columns=text_columns, sm3=received.sm3)
    result = validate_staged(staged, template, resolve(), work_dir / VALIDATION_FOLDER, catalog=catalog)
    return CheckedFile(rows=staged.rows, encoding=staged.encoding, size=staged.size, sm3=staged.sm3,
                       file_type=staged.file_type, staging_path=staged.path, result=result)
