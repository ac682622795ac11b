"""Report submissions (报表报送) and the first step of their review (报表审核).

An institution user uploads a report file for a template and a reporting period. :func:`submit`
copies it to disk with :func:`intake.reader.receive_file` (which hashes and screens the bytes on
the way), reads and validates it with :func:`intake.check.check_file` against the template
(in place for a well-formed ``|`` file, else through a staging file), encrypts the submitted
bytes under the institution's active data key and stores one :class:`~admin_api.models.ReportSubmission` row:

    <data_dir>/intake/<institution code>/<submission id>/raw.rssg        the file, SM4-GCM (documents format)
    <data_dir>/intake/<institution code>/<submission id>/findings.parquet the validation findings (masked values)
    <data_dir>/intake/<institution code>/<submission id>/errors.csv|xlsx  error reports, written on first download

Folders are 0700 and files 0600. All work happens in a hidden folder ``.upload-*`` beside the
submission folders, which is renamed to the submission id only once everything succeeded, so an
upload that fails leaves no row and no file. The plaintext copy of the upload and the staging
Parquet files are deleted before the rename.

States: ``validation_failed`` (errors found) or ``pending_review`` after the upload; a reviewer
moves ``pending_review`` to ``accepted`` or ``returned``. A new upload for the same institution,
template and period gets the next version and marks the previous versions ``superseded``, except
that a version failing validation replaces only earlier failed versions.
An upload saved as a ``draft`` is validated and stored the same way but supersedes nothing and is
hidden from regulators until the institution submits it (:mod:`admin_api.submission_workflow`).
Accepting requires every warning (提示) to be explained in the remark field or waived by a reviewer.

The validation batch of an upload (``ValidationContext.batch``) is the latest submission that passed
validation (:data:`BATCH_STATES`) of each template that the uploaded template's reference and
reconcile rules name, of the same institution and period. Their encrypted files are decrypted into the work folder and
staged again, then deleted, so no plaintext staging file outlives a request.

Accepted data enters the warehouse (:mod:`intake.warehouse`). Accepting a submission decrypts its
file, stages it again and writes the partition of its template, institution and period before the
state change is committed. When that fails, the submission stays ``pending_review``, the partition
is as it was, and the reviewer gets ``WAREHOUSE_LOAD_FAILED``. An upload's validation reads the
partitions of the periods its history-uniqueness, fluctuation, reference and reconcile rules need
(``ValidationContext.warehouse``), decrypted into the work folder and deleted with it. Only a
partition whose manifest names a submission that was accepted is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from calendar import monthrange
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.deps import check_institution, deny
from admin_api.errors import ApiError, conflict, forbidden, invalid, not_found
from admin_api.keyaccess import request_keystore
from admin_api.messages import post_message
from admin_api.models import (
    SUBMISSION_STATES,
    Institution,
    ReportSubmission,
    SubmissionEvent,
    SubmissionFieldCount,
    SubmissionRowComment,
    SubmissionWaiver,
    User,
)
from admin_api.security import Principal
from intake.check import check_file
from intake.reader import receive_file, stage_file
from intake.template_model import Template, TemplateCatalog
from intake.warehouse import PeriodSelection, decrypt_for_validation, load_submission, warehouse_needs
from regsandbox_core.documents import decrypt_document, encrypt_document
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import fsync_directory, make_private_dirs
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

from intake.validate import ValidationContext
try:
    from intake.error_report import Waiver, write_csv_report, write_xlsx_report
except ImportError:  # pragma: no cover - depends on the checkout
    write_csv_report = write_xlsx_report = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

INTAKE_DIR = "intake"
RAW_NAME = "raw.rssg"
FINDINGS_NAME = "findings.parquet"
REVIEW_LOCK_NAME = ".review.lock"
BATCH_STATES = ("pending_review", "returned", "accepted")
"""States of the submissions whose rows other tables of the same batch may refer to: those that passed validation."""
ASSOCIATED_DATA_PREFIX = "regsandbox-intake/1"
MAX_PAGE_SIZE = 200
MAX_ROW_COMMENTS = 1000
MAX_COMMENT_LENGTH = 2000
_PERIOD = re.compile(r"^[0-9]{8}$")
_QUARTER_ENDS = (3, 6, 9, 12)
PRIVATE_STATES = ("draft", "withdrawn")
"""States of uploads that were never submitted: only their own institution can read them."""
FREQUENCY_NAMES = {"monthly": "月报", "quarterly": "季报", "semiannual": "半年报", "annual": "年报", "ad_hoc": "不定期"}


@functools.lru_cache(maxsize=1)
def catalog() -> TemplateCatalog:
    """Return the shipped report templates, loaded once per process."""
    return TemplateCatalog.load()


# --- inputs -------------------------------------------------------------------------------------


def get_template(code: str, version: int | None = None) -> Template:
    """Return version ``version`` (the newest when None) of template ``code``, or raise 422 ``TEMPLATE_NOT_FOUND``."""
    templates = catalog()
    if code not in templates:
        known = "、".join(f"{item}（{templates.get(item).name}）" for item in templates.codes())
        raise invalid("TEMPLATE_NOT_FOUND", f"报表模板代码“{code[:64]}”不存在。可报送的模板有：{known}。请检查模板代码后重新上传。")
    if version is not None and version not in templates.versions(code):
        known_versions = "、".join(f"第 {item} 版" for item in templates.versions(code))
        raise invalid("TEMPLATE_NOT_FOUND", f"报表模板 {code} 没有第 {version} 版，已有：{known_versions}。"
                                            "请按报送任务要求的版本报送，或不指定版本以使用最新版本。")
    return templates.get(code, version)


def parse_period(text: str) -> date:
    """Parse a period end given as YYYYMMDD, or raise 422 ``PERIOD_INVALID`` when it is not a real date."""
    value = text.strip()
    problem = f"报告期末日期“{value[:20]}”无效，应为 YYYYMMDD 格式的真实日期，例如 20261130。"
    if not _PERIOD.match(value):
        raise invalid("PERIOD_INVALID", problem)
    try:
        return datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise invalid("PERIOD_INVALID", problem) from None


def check_period_end(template: Template, day: date) -> None:
    """Check that a period end fits the template's frequency (月末, 季末, 半年末, 年末). Ad hoc reports accept any day."""
    month_end = day.day == monthrange(day.year, day.month)[1]
    months = {"monthly": range(1, 13), "quarterly": _QUARTER_ENDS, "semiannual": (6, 12), "annual": (12,)}
    allowed = months.get(template.frequency)
    if allowed is None or (month_end and day.month in allowed):
        return
    frequency = FREQUENCY_NAMES.get(template.frequency, template.frequency)
    valid = {
        "monthly": "每月最后一天，例如 20261130",
        "quarterly": "3、6、9、12 月的最后一天，例如 20260930",
        "semiannual": "6 月 30 日或 12 月 31 日，例如 20260630",
        "annual": "12 月 31 日，例如 20261231",
    }[template.frequency]
    raise invalid("PERIOD_INVALID", f"报表 {template.code}（{template.name}）为{frequency}，报告期末日期 {day:%Y%m%d} 不是报告期末。"
                                    f"有效的报告期末日期为{valid}。")


def period_start(template: Template, day: date) -> date:
    """Return the first day of the reporting period that ends on ``day``."""
    span = {"monthly": 1, "quarterly": 3, "semiannual": 6, "annual": 12}.get(template.frequency)
    if span is None:
        return day
    month = day.month - span + 1
    year = day.year
    if month < 1:
        month += 12
        year -= 1
    return date(year, month, 1)


def clean_filename(name: str | None) -> str:
    """Return the last path component of an uploaded file name, without control characters, at most 200 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(char for char in base if char.isprintable()).strip()
    return base[-200:] if base else "upload"


# --- storage ------------------------------------------------------------------------------------


def institution_dir(settings: Settings, institution_code: str) -> Path:
    return settings.data_dir / INTAKE_DIR / institution_code


def submission_dir(settings: Settings, row: ReportSubmission) -> Path:
    return settings.data_dir / Path(row.raw_path).parent


def raw_associated_data(institution_code: str, raw_sm3: str) -> bytes:
    """Associated data binding an encrypted upload to its institution and to the SM3 digest stored in its row."""
    return f"{ASSOCIATED_DATA_PREFIX}|{institution_code}|{raw_sm3}".encode("ascii")


def _relative(settings: Settings, path: Path) -> str:
    return path.relative_to(settings.data_dir).as_posix()


@dataclass(frozen=True)
class _BatchSource:
    """Another submission of the batch, read before the long file work so no connection is held meanwhile."""

    template_code: str
    template_version: int
    original_filename: str
    raw_path: str
    raw_sm3: str


def _related_codes(template: Template) -> set[str]:
    """Codes of the templates that the rules of ``template`` look up (references and reconciliations)."""
    codes = set()
    for rule in template.effective_rules():
        for target in (getattr(rule, "target", None), getattr(rule, "right", None)):
            code = getattr(target, "template", None)
            if isinstance(code, str):
                codes.add(code)
    codes.discard(template.code)
    return codes


def _unaccepted_batch(session: Session, row: ReportSubmission) -> list[ReportSubmission]:
    """Return the newest batch submission of each template ``row`` refers to, where that submission is not accepted.

    The rows of such a submission may be what ``row``'s references found at validation, so
    accepting ``row`` first would put rows into the warehouse whose referenced records are not there.
    """
    try:
        codes = _related_codes(catalog().get(row.template_code, row.template_version))
    except RegsandboxError:
        return []
    if not codes:
        return []
    newest: dict[str, ReportSubmission] = {}
    for item in session.scalars(
        select(ReportSubmission)
        .where(ReportSubmission.institution_id == row.institution_id, ReportSubmission.period_end == row.period_end,
               ReportSubmission.template_code.in_(sorted(codes)), ReportSubmission.state.in_(BATCH_STATES))
        .order_by(ReportSubmission.template_code, ReportSubmission.version.desc())
    ):
        newest.setdefault(item.template_code, item)
    return [item for _code, item in sorted(newest.items()) if item.state != "accepted"]


def _batch_sources(session: Session, institution_id: int, period_end: date, codes: set[str]) -> list[_BatchSource]:
    if not codes:
        return []
    rows = session.scalars(
        select(ReportSubmission)
        .where(ReportSubmission.institution_id == institution_id, ReportSubmission.period_end == period_end,
               ReportSubmission.template_code.in_(sorted(codes)),
               ReportSubmission.state.in_(BATCH_STATES))
        .order_by(ReportSubmission.template_code, ReportSubmission.version.desc())
    )
    latest: dict[str, _BatchSource] = {}
    for row in rows:
        latest.setdefault(row.template_code, _BatchSource(row.template_code, row.template_version,
                                                          row.original_filename, row.raw_path, row.raw_sm3))
    return list(latest.values())


def _stage_batch(settings: Settings, store: KeyStore, institution_code: str, sources: list[_BatchSource],
                 work: Path) -> dict[str, Path]:
    """Decrypt and stage the batch files into ``work/batch``. A file that cannot be read again is left out and logged."""
    staged: dict[str, Path] = {}
    if not sources:
        return staged
    folder = work / "batch"
    folder.mkdir(mode=0o700)
    for source in sources:
        plain = folder / f"{source.template_code}.source"
        try:
            template = catalog().get(source.template_code, source.template_version)
            decrypt_document(store, institution_code, settings.data_dir / source.raw_path, plain,
                             raw_associated_data(institution_code, source.raw_sm3))
            result = stage_file(plain, source.original_filename, template.file_layout(), folder, sheet=template.code)
            staged[source.template_code] = result.path
        except RegsandboxError as error:
            logger.warning("batch file %s of %s left out of the validation: %s", source.raw_path, institution_code,
                           error.code)
        finally:
            plain.unlink(missing_ok=True)
    return staged


def _accepted_ids(session: Session, institution_id: int,
                  needs: dict[str, PeriodSelection]) -> dict[str, set[int]]:
    """Ids of the institution's submissions of the templates in ``needs`` that a reviewer accepted, by template.

    A submission accepted and later superseded by a new upload still counts: its data stay in the
    warehouse until a newer version is accepted.
    """
    if not needs:
        return {}
    rows = session.execute(
        select(ReportSubmission.template_code, ReportSubmission.id)
        .join(SubmissionEvent, SubmissionEvent.submission_id == ReportSubmission.id)
        .where(ReportSubmission.institution_id == institution_id,
               ReportSubmission.template_code.in_(sorted(needs)), SubmissionEvent.to_state == "accepted")
    )
    accepted: dict[str, set[int]] = {}
    for template_code, submission_id in rows:
        accepted.setdefault(template_code, set()).add(submission_id)
    return accepted


def _load_warehouse(settings: Settings, store: KeyStore, row: ReportSubmission) -> Any:
    """Decrypt and stage the submission's file again and write it as its warehouse partition.

    Returns the :class:`intake.warehouse.LoadOutcome`. Raises ``WAREHOUSE_LOAD_FAILED`` (Chinese
    message naming the cause's code), and then the partition is as it was and no plaintext remains.
    """
    code = row.institution.code
    folder = submission_dir(settings, row)
    work = Path(tempfile.mkdtemp(prefix=".accept-", dir=folder))  # mode 0700
    try:
        template = catalog().get(row.template_code, row.template_version)
        plain = work / "upload.source"
        decrypt_document(store, code, settings.data_dir / row.raw_path, plain, raw_associated_data(code, row.raw_sm3))
        text_columns = [item.code for item in template.fields if item.type in ("text", "code")]
        staged = stage_file(plain, row.original_filename, template.file_layout(), work, sheet=template.code,
                            text_columns=text_columns)
        plain.unlink(missing_ok=True)
        if staged.sm3 != row.raw_sm3:
            raise RegsandboxError("RAW_DIGEST_MISMATCH", f"解密后的文件摘要 {staged.sm3[:16]}… 与报送记录中的 "
                                                         f"{row.raw_sm3[:16]}… 不一致。")
        return load_submission(
            settings, store, institution_code=code, template_code=template.code, template_version=template.version,
            field_codes=[item.code for item in template.fields], period_end=row.period_end, staged_path=staged.path,
            submission_id=row.id, version=row.version, raw_sm3=row.raw_sm3)
    except RegsandboxError as error:
        logger.warning("submission %s not loaded into the warehouse: %s", row.id, error.code)
        raise ApiError("WAREHOUSE_LOAD_FAILED",
                       f"{label(row)}未能写入数据仓库（{error.code}：{error.message}），审核结果未保存，报送仍为“待审核”。"
                       "请稍后重试；如仍失败，请联系平台管理员检查机构数据密钥和数据目录。",
                       status=409 if error.status == 409 else 500) from error
    except OSError as error:
        logger.warning("submission %s not loaded into the warehouse: %s", row.id, error)
        raise ApiError("WAREHOUSE_LOAD_FAILED",
                       f"{label(row)}未能写入数据仓库（文件系统错误 {type(error).__name__}），审核结果未保存，"
                       "报送仍为“待审核”。请稍后重试；如仍失败，请联系平台管理员检查数据目录的空间和权限。",
                       status=500) from error
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- output -------------------------------------------------------------------------------------


class RowCommentOut(BaseModel):
    line: int
    field_code: str | None
    comment: str
    author: str
    at: datetime


class EventOut(BaseModel):
    from_state: str | None
    to_state: str
    to_state_name: str
    actor: str
    comment: str | None
    at: datetime


class SubmissionOut(BaseModel):
    id: int
    institution_code: str
    institution_name: str
    template_code: str
    template_name: str | None
    template_version: int
    template_digest: str
    period_end: date
    version: int
    state: str
    state_name: str
    original_filename: str
    file_type: str
    encoding: str | None
    byte_size: int
    raw_sm3: str
    key_version: int
    row_count: int
    error_count: int
    warning_count: int
    explained_warning_count: int
    waived_warning_count: int
    unresolved_warning_count: int
    """Warnings neither explained in the remark field nor waived: accepting needs 0."""
    has_error_report: bool
    submitted_by: str
    submitted_at: datetime
    reviewed_by: str | None
    reviewed_at: datetime | None
    review_comment: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def fields_of(cls, row: ReportSubmission) -> dict[str, Any]:
        try:
            template_name: str | None = catalog().get(row.template_code, row.template_version).name
        except RegsandboxError:
            template_name = None
        return dict(
            id=row.id, institution_code=row.institution.code, institution_name=row.institution.name,
            template_code=row.template_code, template_name=template_name, template_version=row.template_version,
            template_digest=row.template_digest, period_end=row.period_end, version=row.version, state=row.state,
            state_name=SUBMISSION_STATES.get(row.state, row.state), original_filename=row.original_filename,
            file_type=row.file_type, encoding=row.encoding, byte_size=row.byte_size, raw_sm3=row.raw_sm3,
            key_version=row.key_version, row_count=row.row_count, error_count=row.error_count,
            warning_count=row.warning_count, explained_warning_count=row.explained_warning_count,
            waived_warning_count=row.waived_warning_count, unresolved_warning_count=unresolved_warnings(row),
            has_error_report=row.findings_path is not None, submitted_by=row.submitter.username,
            submitted_at=row.submitted_at, reviewed_by=row.reviewer.username if row.reviewer else None,
            reviewed_at=row.reviewed_at, review_comment=row.review_comment, created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @classmethod
    def of(cls, row: ReportSubmission) -> SubmissionOut:
        return cls(**cls.fields_of(row))


class WaiverOut(BaseModel):
    id: int
    rule_id: str
    lines: list[int] | None
    finding_count: int
    reason: str
    author: str
    at: datetime


class SubmissionDetail(SubmissionOut):
    events: list[EventOut]
    row_comments: list[RowCommentOut]
    waivers: list[WaiverOut]

    @classmethod
    def load(cls, session: Session, row: ReportSubmission) -> SubmissionDetail:
        events = session.scalars(select(SubmissionEvent).where(SubmissionEvent.submission_id == row.id)
                                 .order_by(SubmissionEvent.id))
        comments = session.scalars(select(SubmissionRowComment).where(SubmissionRowComment.submission_id == row.id)
                                   .order_by(SubmissionRowComment.line, SubmissionRowComment.id))
        return cls(
            **cls.fields_of(row),
            events=[EventOut(from_state=item.from_state, to_state=item.to_state,
                             to_state_name=SUBMISSION_STATES.get(item.to_state, item.to_state), actor=item.actor,
                             comment=item.comment, at=item.at) for item in events],
            row_comments=[RowCommentOut(line=item.line, field_code=item.field_code, comment=item.comment,
                                        author=item.author, at=item.at) for item in comments],
            waivers=[WaiverOut(id=item.id, rule_id=item.rule_id, lines=item.lines, finding_count=item.finding_count,
                               reason=item.reason, author=item.author, at=item.at)
                     for item in waivers_of(session, row.id)],
        )


def waivers_of(session: Session, submission_id: int) -> list[SubmissionWaiver]:
    return list(session.scalars(select(SubmissionWaiver).where(SubmissionWaiver.submission_id == submission_id)
                                .order_by(SubmissionWaiver.id)))


def report_waivers(session: Session, submission_id: int) -> list[Waiver]:
    """Return the waivers of a submission in the form :mod:`intake.error_report` matches findings against."""
    return [Waiver(item.rule_id, None if item.lines is None else frozenset(item.lines), item.reason)
            for item in waivers_of(session, submission_id)]


def unresolved_warnings(row: ReportSubmission) -> int:
    """Return the warnings (提示) of a submission that are neither explained in 备注 nor waived by a reviewer."""
    return max(0, row.warning_count - row.explained_warning_count - (row.waived_warning_count or 0))


def label(row: ReportSubmission) -> str:
    """Return the name of a submission in messages, such as ``报表 EAST_DGXDYWJJB 2026-11-30 第 2 版``."""
    return f"报表 {row.template_code} {row.period_end:%Y-%m-%d} 第 {row.version} 版"


# --- submit -------------------------------------------------------------------------------------


def _caller_institution(session: Session, request: Request, caller: Principal) -> Institution:
    institution = None
    if caller.institution_code is not None:
        institution = session.scalars(select(Institution).where(Institution.code == caller.institution_code)).first()
    if institution is None:
        raise deny(request, caller, "submissions.submit", forbidden(
            "INSTITUTION_REQUIRED", "只有所属机构的用户才能报送报表；当前账号不属于任何机构。请使用本机构报送人员的账号上传。"))
    if institution.status != "active":
        raise deny(request, caller, "submissions.submit", forbidden(
            "INSTITUTION_INACTIVE", f"机构 {institution.code} 已停用，不能报送报表。如有疑问请联系监管方系统管理员。"))
    return institution


def submit(
    session: Session,
    request: Request,
    caller: Principal,
    store: KeyStore,
    settings: Settings,
    *,
    template_code: str,
    period_text: str,
    filename: str | None,
    stream: BinaryIO,
    draft: bool = False,
    template_version: int | None = None,
) -> ReportSubmission:
    """Stage, validate, encrypt and record one uploaded file, and return the committed row.

    A ``draft`` is stored in state ``draft``: it supersedes nothing until it is submitted. The file
    is checked against ``template_version`` of the template (a collection task names one), or the
    newest version when it is None.

    Raises the reader's :class:`~intake.reader.IntakeFileError` (422, 413 for a file too large),
    :class:`~admin_api.errors.ApiError` for a bad template or period, and the validator's or key
    store's errors. On any error nothing is stored: no row, no file.
    """
    template = get_template(template_code.strip(), template_version)
    period_end = parse_period(period_text)
    check_period_end(template, period_end)
    institution = _caller_institution(session, request, caller)
    institution_id, code = institution.id, institution.code
    identifiers = frozenset({institution.licence_no}) if institution.licence_no else frozenset()
    batch_sources = _batch_sources(session, institution_id, period_end, _related_codes(template))
    needs = warehouse_needs(template, period_end, period_start(template, period_end))
    accepted_ids = _accepted_ids(session, institution_id, needs)
    submitter_id = caller.user_id if caller.user_id is not None else session.scalars(
        select(User.id).where(User.username == caller.username)).one()
    # Release the connection while the file is read, which may take minutes for a large file.
    session.rollback()

    original_name = clean_filename(filename)
    top = institution_dir(settings, code)
    make_private_dirs(top, settings.data_dir)
    work = Path(tempfile.mkdtemp(prefix=".upload-", dir=top))  # mode 0700
    final_dir: Path | None = None
    try:
        stream.seek(0)
        # The copy hashes (SM3) and screens the bytes as they pass, so nothing reads the file for that again.
        received = receive_file(stream, work / "upload.source")
        source = received.path
        text_columns = [item.code for item in template.fields if item.type in ("text", "code")]
        # The upload is encrypted while it is read and validated, because the SM4 stream cipher and
        # DuckDB both release the GIL. Leaving the block waits for the encryption, also when reading fails.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="submission-encrypt") as encryption:
            encrypting = encryption.submit(encrypt_document, store, code, source, work / RAW_NAME,
                                           raw_associated_data(code, received.sm3))

            def context() -> ValidationContext:
                batch = _stage_batch(settings, store, code, batch_sources, work)
                warehouse = decrypt_for_validation(settings, store, code, needs, work / "warehouse", accepted_ids)
                return ValidationContext(period_end=period_end, period_start=period_start(template, period_end),
                                         institution_identifiers=identifiers, batch=batch, warehouse=warehouse)

            checked = check_file(received, original_name, template, context, work, catalog=catalog(),
                                 text_columns=text_columns)
            result = checked.result
            os.replace(result.findings_path, work / FINDINGS_NAME)
            errors, warnings, explained = result.errors, result.warnings, result.explained_warnings
            has_findings = True
            field_values = dict(result.field_values)
        encrypted = encrypting.result()
        for leftover in (source, checked.staging_path):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
        for folder in ("batch", "validation", "warehouse"):
            shutil.rmtree(work / folder, ignore_errors=True)

        version = (session.scalar(
            select(func.max(ReportSubmission.version)).where(
                ReportSubmission.institution_id == institution_id, ReportSubmission.template_code == template.code,
                ReportSubmission.period_end == period_end)
        ) or 0) + 1
        if draft:
            state = "draft"
        else:
            state = "validation_failed" if errors else "pending_review"
        row = ReportSubmission(
            institution_id=institution_id, template_code=template.code, template_version=template.version,
            template_digest=template.digest, period_end=period_end, version=version, state=state,
            original_filename=original_name, file_type=checked.file_type, encoding=checked.encoding,
            byte_size=checked.size, raw_sm3=checked.sm3, raw_path="", key_version=encrypted.version,
            row_count=checked.rows, error_count=errors, warning_count=warnings, explained_warning_count=explained,
            submitted_by=submitter_id,
        )
        session.add(row)
        session.flush()
        target = top / str(row.id)
        if target.exists():  # A crash before a commit left it, so its id was never committed.
            logger.warning("removing uncommitted submission folder %s", target)
            shutil.rmtree(target)
        os.rename(work, target)
        final_dir = target
        fsync_directory(top)
        row.raw_path = _relative(settings, target / RAW_NAME)
        row.findings_path = _relative(settings, target / FINDINGS_NAME) if has_findings else None
        session.add(SubmissionEvent(submission_id=row.id, from_state=None, to_state=state, actor=caller.username))
        if field_values is not None:
            session.add(field_count_row(row.id, template, checked.rows, field_values))
        previous = [] if draft else supersede_previous(session, row, caller)

        add_event(session, request, caller, "submissions.save_draft" if draft else "submissions.submit",
                  f"submission:{row.id}", "success", {
            "template": template.code, "template_version": template.version, "period_end": f"{period_end:%Y%m%d}",
            "version": version, "state": state, "errors": errors, "warnings": warnings, "rows": checked.rows,
            "sm3": checked.sm3, "key_version": encrypted.version,
            "superseded": [old.id for old in previous],
        })
        session.flush()
        session.refresh(row)
        post_outcome_message(session, row, caller)
        session.commit()
    except BaseException as error:
        session.rollback()
        shutil.rmtree(work, ignore_errors=True)
        if final_dir is not None:
            shutil.rmtree(final_dir, ignore_errors=True)
        if isinstance(error, IntegrityError):
            logger.warning("concurrent upload of %s %s for %s: %s", template.code, period_end, code, error)
            raise conflict("SUBMISSION_CONFLICT", f"报表 {template.code} {period_end:%Y-%m-%d} 同时有另一次上传在保存，"
                                                  "本次上传未保存。请稍后重新上传。") from None
        raise
    logger.info("submission %s stored: %s %s v%s %s", row.id, template.code, period_end, version, state)
    return row


def field_count_row(submission_id: int, template: Template, rows: int,
                    field_values: dict[str, int]) -> SubmissionFieldCount:
    """Build the field completeness counts of an upload from the validator's non-empty values per field."""
    required = {item.code for item in template.fields if item.required}
    return SubmissionFieldCount(
        submission_id=submission_id, row_count=rows, field_count=len(template.fields),
        required_field_count=len(required), present_values=sum(field_values.values()),
        required_present_values=sum(count for code, count in field_values.items() if code in required),
        field_values=field_values)


def supersede_previous(session: Session, row: ReportSubmission, caller: Principal) -> list[ReportSubmission]:
    """Mark the other submitted versions of the row's institution, template and period ``superseded``; return them.

    Drafts and discarded drafts are left as they are, because they were never submitted. A version
    that failed validation replaces only earlier failed versions: a version waiting for review,
    returned or accepted stays as it is until a version that passed validation is submitted.
    """
    replaced_states = ("validation_failed",) if row.state == "validation_failed" else None
    query = select(ReportSubmission).where(
        ReportSubmission.institution_id == row.institution_id, ReportSubmission.template_code == row.template_code,
        ReportSubmission.period_end == row.period_end, ReportSubmission.id != row.id,
        ReportSubmission.state.notin_(("superseded", *PRIVATE_STATES)))
    if replaced_states is not None:
        query = query.where(ReportSubmission.state.in_(replaced_states))
    previous = session.scalars(query).all()
    for old in previous:
        session.add(SubmissionEvent(submission_id=old.id, from_state=old.state, to_state="superseded",
                                    actor=caller.username, comment=f"已被第 {row.version} 版替代"))
        old.state = "superseded"
    return list(previous)


def post_outcome_message(session: Session, row: ReportSubmission, caller: Principal) -> None:
    """Send the caller the validation outcome of an upload, a saved draft or a submitted draft as a system message."""
    errors, warnings, explained = row.error_count, row.warning_count, row.explained_warning_count
    counts = f"错误 {errors} 条，提示 {warnings} 条（已说明 {explained} 条）"
    if row.state == "draft":
        outcome = f"草稿已保存：{counts}"
        advice = "草稿只有本机构可见，确认无误后请在报送详情中提交。"
    elif errors:
        outcome = f"校验未通过：错误 {errors} 条，提示 {warnings} 条"
        advice = "请下载校验结果，修正错误后重新上传。"
    else:
        outcome = f"已通过校验，待审核：提示 {warnings} 条（已说明 {explained} 条）"
        advice = "监管方审核后将另行通知。"
    body = f"文件“{row.original_filename}”共 {row.row_count} 行，{outcome}。{advice}"
    post_message(session, category="system", title=f"{label(row)}{outcome}", body=body,
                 link=f"/console/submissions/{row.id}", usernames=[caller.username])


# --- read ---------------------------------------------------------------------------------------


def visible_submission(session: Session, request: Request, caller: Principal, submission_id: int,
                       capability: str) -> ReportSubmission:
    """Return a submission the caller may see. Raise 404 for an unknown id and 403 (audited) for another institution's."""
    row = session.get(ReportSubmission, submission_id)
    missing = not_found("SUBMISSION_NOT_FOUND", f"报送记录 {submission_id} 不存在，请刷新报送列表后重试。")
    if row is None:
        raise missing
    check_institution(request, caller, capability, row.institution.code)
    if row.state in PRIVATE_STATES and caller.institution_code is None:
        raise missing  # A draft exists for its own institution only.
    return row


def list_submissions(
    session: Session,
    request: Request,
    caller: Principal,
    *,
    template_code: str | None,
    period_text: str | None,
    state: str | None,
    institution_code: str | None,
    offset: int,
    limit: int,
) -> tuple[list[ReportSubmission], int]:
    """Return one page of submissions, newest first, and the total. Institution users see their own institution only."""
    conditions = []
    if caller.institution_code is not None:
        if institution_code and institution_code != caller.institution_code:
            check_institution(request, caller, "submissions.read", institution_code)
        conditions.append(Institution.code == caller.institution_code)
    elif institution_code:
        conditions.append(Institution.code == institution_code)
    if caller.institution_code is None:
        conditions.append(ReportSubmission.state.notin_(PRIVATE_STATES))
    if template_code:
        conditions.append(ReportSubmission.template_code == template_code)
    if period_text:
        conditions.append(ReportSubmission.period_end == parse_period(period_text))
    if state:
        if state not in SUBMISSION_STATES:
            known = "、".join(f"{code}（{name}）" for code, name in SUBMISSION_STATES.items())
            raise invalid("STATE_INVALID", f"报送状态“{state[:32]}”无效，可选：{known}。")
        conditions.append(ReportSubmission.state == state)
    base = select(ReportSubmission).join(Institution, Institution.id == ReportSubmission.institution_id).where(*conditions)
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = list(session.scalars(base.order_by(ReportSubmission.id.desc()).offset(offset).limit(limit)))
    return rows, total


def error_report(session: Session, request: Request, caller: Principal, settings: Settings, submission_id: int,
                 kind: str) -> tuple[Path, str]:
    """Return the CSV or XLSX error report of a submission (written once, then reused) and its download name."""
    row = visible_submission(session, request, caller, submission_id, "submissions.read")
    writer = {"csv": write_csv_report, "xlsx": write_xlsx_report}[kind]
    if row.findings_path is None or writer is None:
        raise not_found("ERROR_REPORT_UNAVAILABLE", f"报送记录 {submission_id} 没有校验结果（文件未经校验），无法生成校验报告。")
    findings = settings.data_dir / row.findings_path
    target = findings.parent / f"errors.{kind}"
    if not target.exists():  # A new waiver deletes the reports, so they are written again with it.
        writer(findings, target, report_waivers(session, row.id))
    add_event(session, request, caller, "submissions.error_report", f"submission:{row.id}", "success", {"format": kind})
    session.commit()
    return target, f"{row.template_code}_{row.period_end:%Y%m%d}_v{row.version}_校验结果.{kind}"


def decrypt_raw(session: Session, request: Request, caller: Principal, store: KeyStore, settings: Settings,
                submission_id: int) -> tuple[Path, str]:
    """Decrypt the submitted file into a temporary file (0600) of the submission folder, which the caller deletes.

    The access is audited as a read of protected data.

    NOTE: the plaintext is on disk in the submission folder while it is downloaded, because
    decrypting to a path is all-or-nothing while a stream would send unverified segments.
    """
    row = visible_submission(session, request, caller, submission_id, "submissions.review")
    folder = submission_dir(settings, row)
    target = folder / f".download-{uuid.uuid4().hex}"
    decrypt_document(store, row.institution.code, settings.data_dir / row.raw_path, target,
                     raw_associated_data(row.institution.code, row.raw_sm3))
    add_event(session, request, caller, "submissions.raw_read", f"submission:{row.id}", "success", {
        "institution": row.institution.code, "sm3": row.raw_sm3, "key_version": row.key_version,
        "bytes": row.byte_size})
    try:
        session.commit()
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target, row.original_filename


# --- review -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowCommentIn:
    line: int
    field_code: str | None
    comment: str


def review(
    session: Session,
    request: Request,
    caller: Principal,
    submission_id: int,
    decision: str,
    comment: str | None,
    row_comments: Sequence[RowCommentIn] = (),
    store: KeyStore | None = None,
    settings: Settings | None = None,
) -> ReportSubmission:
    """Accept or return a submission that is pending review, record the event and tell the submitter.

    Accepting loads the submission into the warehouse first (``store`` and ``settings`` default to
    the app's), and the load is undone when the commit fails.

    Two reviews of one submission run one after the other: :func:`_reviewing` holds a lock file in
    the submission's folder (one host) and the row lock of ``SELECT ... FOR UPDATE`` (PostgreSQL)
    from the state check to the commit, so a second accept or return finds the state changed and
    gets ``SUBMISSION_STATE_INVALID`` before it loads anything.
    """
    row = visible_submission(session, request, caller, submission_id, "submissions.review")
    settings = settings or request.app.state.settings
    with _reviewing(session, settings, row):
        row = _review_locked(session, request, caller, row, decision, comment, row_comments, store, settings)
    if decision == "accepted":
        # Accepted data reaches the institution's masked extract through a rebuild in the background,
        # audited as the reviewer's (admin_api.extract_rebuilds).
        from admin_api.extract_rebuilds import schedule_after_accept

        schedule_after_accept(request, caller, row.institution.code, row.template_code, row.period_end.strftime("%Y%m%d"))
    return row


def _review_locked(session: Session, request: Request, caller: Principal, row: ReportSubmission, decision: str,
                   comment: str | None, row_comments: Sequence[RowCommentIn], store: KeyStore | None,
                   settings: Settings) -> ReportSubmission:
    comment = (comment or "").strip()

    if row.state != "pending_review":
        raise conflict("SUBMISSION_STATE_INVALID",
                       f"{label(row)}当前状态为“{SUBMISSION_STATES.get(row.state, row.state)}”，只有“待审核”的报送可以审核。")
    if decision == "returned" and not comment:
        raise invalid("REVIEW_COMMENT_REQUIRED", "退回报表须填写退回意见，说明需要机构修改的内容。")
    if decision == "accepted" and row_comments:
        raise invalid("ROW_COMMENTS_NOT_ALLOWED", "审核通过时不能附带行级意见；如需机构修改，请退回报表。")
    if decision == "accepted" and unresolved_warnings(row):
        raise conflict("WARNINGS_UNRESOLVED",
                       f"{label(row)}尚有 {unresolved_warnings(row)} 条提示既未在备注中说明也未豁免"
                       f"（提示共 {row.warning_count} 条，已说明 {row.explained_warning_count} 条，"
                       f"已豁免 {row.waived_warning_count} 条），不能审核通过。"
                       "请逐条核实后豁免这些提示，或退回报表请机构在备注中说明。")
    if decision == "accepted":
        waiting = _unaccepted_batch(session, row)
        if waiting:
            listed = "、".join(f"{label(item)}（报送编号 {item.id}，{SUBMISSION_STATES.get(item.state, item.state)}）"
                              for item in waiting)
            raise conflict("BATCH_NOT_ACCEPTED",
                           f"{label(row)}的校验引用了同一报告期尚未审核通过的报表：{listed}。"
                           "请先审核这些报表：审核通过后再审核本报表；如退回，请待机构重新报送后一并审核。")
    if len(row_comments) > MAX_ROW_COMMENTS:
        raise invalid("ROW_COMMENTS_TOO_MANY", f"行级意见最多 {MAX_ROW_COMMENTS} 条，收到 {len(row_comments)} 条。")
    try:
        field_codes = {item.code for item in catalog().get(row.template_code, row.template_version).fields}
    except RegsandboxError:
        field_codes = None
    for item in row_comments:
        if item.field_code and field_codes is not None and item.field_code not in field_codes:
            raise invalid("ROW_COMMENT_FIELD_UNKNOWN",
                          f"行级意见的字段代码“{item.field_code[:64]}”不是报表 {row.template_code} 的字段，请使用模板中的字段代码。")
        if not item.comment.strip():
            raise invalid("ROW_COMMENT_EMPTY", f"第 {item.line} 行的行级意见为空，请填写意见或删除该条。")

    reviewer_id = caller.user_id if caller.user_id is not None else session.scalars(
        select(User.id).where(User.username == caller.username)).one()
    loaded = None
    if decision == "accepted":
        loaded = _load_warehouse(settings, store or request_keystore(request), row)
    try:
        previous_state = row.state
        row.state = decision
        row.reviewed_by = reviewer_id
        row.reviewed_at = utc_now()
        row.review_comment = comment or None
        session.add(SubmissionEvent(submission_id=row.id, from_state=previous_state, to_state=decision,
                                    actor=caller.username, comment=comment or None))
        for item in row_comments:
            session.add(SubmissionRowComment(submission_id=row.id, line=item.line, field_code=item.field_code or None,
                                             comment=item.comment.strip(), author=caller.username))

        action = "submissions.accept" if decision == "accepted" else "submissions.return"
        add_event(session, request, caller, action, f"submission:{row.id}", "success", {
            "institution": row.institution.code, "template": row.template_code, "period_end": f"{row.period_end:%Y%m%d}",
            "version": row.version, "row_comments": len(row_comments),
            **({"warehouse_rows": loaded.manifest.rows, "warehouse_written": loaded.written} if loaded else {})})

        if decision == "accepted":
            title = f"报表审核通过：{label(row)}"
            body = f"{label(row)}已由监管方审核通过。" + (f"审核意见：{comment}" if comment else "")
        else:
            title = f"报表已退回：{label(row)}"
            body = f"{label(row)}已被监管方退回，请按意见修改后重新报送。退回意见：{comment}"
            if row_comments:
                body += f"（另有 {len(row_comments)} 条行级意见，请在报送详情中查看。）"
        post_message(session, category="system", title=title, body=body, link=f"/console/submissions/{row.id}",
                     usernames=[row.submitter.username])

        session.commit()
    except BaseException:
        if loaded is not None:
            loaded.undo()
        raise
    if loaded is not None:
        loaded.finish()
    session.refresh(row)
    return row


@contextlib.contextmanager
def _reviewing(session: Session, settings: Settings, row: ReportSubmission) -> Iterator[None]:
    """Hold the review lock of ``row`` and reload it, so the state checked is the state committed last."""
    descriptor = os.open(submission_dir(settings, row) / REVIEW_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        session.execute(select(ReportSubmission.id).where(ReportSubmission.id == row.id).with_for_update())
        session.refresh(row)
        yield
    finally:
        os.close(descriptor)
