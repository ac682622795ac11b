"""The institution registry API: search, read, create, edit, deactivate, bulk import and export.

Every user reads institutions (institution users only their own); writes need
``institutions.write`` (system administrators). Each write is audited with outcome ``success``
in the same transaction, and each rejected write with outcome ``failed`` and the error code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admin_api.audit import add_event, record_event
from admin_api.deps import check_institution, get_session, require
from admin_api.errors import ApiError, conflict
from admin_api.institution_files import (
    MAX_FILE_BYTES,
    ImportResult,
    export_rows,
    import_institutions,
    read_rows,
    template_rows,
    write_xlsx,
)
from admin_api.institutions import (
    INSTITUTION_TYPES,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    InstitutionCreate,
    InstitutionFields,
    InstitutionOut,
    create_institution,
    find_institution,
    search_institutions,
    search_query,
    set_status,
    update_institution,
)
from admin_api.limits import MAX_UPLOAD_BODY_BYTES
from admin_api.models import Institution
from admin_api.security import Principal
from admin_api.spreadsheets import write_csv

logger = logging.getLogger(__name__)
router = APIRouter()

T = TypeVar("T")

EXPORT_MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


def audited_write(request: Request, session: Session, caller: Principal, action: str, resource: str,
                  write: Callable[[], T]) -> T:
    """Run ``write`` and commit; on a rejected write roll back and audit it as ``failed``.

    A unique constraint violated by a concurrent write of the same code, name or USCC becomes 409
    ``INSTITUTION_CONFLICT``.
    """
    try:
        result = write()
        session.commit()
    except ApiError as error:
        session.rollback()
        record_event(request, caller, action, resource, "failed", {"code": error.code})
        raise
    except IntegrityError:
        session.rollback()
        logger.warning("institution write %s on %s hit a unique constraint", action, resource)
        error = conflict("INSTITUTION_CONFLICT", "机构代码、名称或统一社会信用代码刚被其他操作占用，请刷新后重试。")
        record_event(request, caller, action, resource, "failed", {"code": error.code})
        raise error from None
    return result


@router.get("/institutions", response_model=list[InstitutionOut])
def list_institutions(
    response: Response,
    q: str | None = Query(default=None, max_length=200, description="机构名称、代码或统一社会信用代码的片段"),
    type: Literal[INSTITUTION_TYPES] | None = Query(default=None),  # type: ignore[valid-type]
    status: Literal["active", "inactive"] | None = Query(default=None),
    limit: int = Query(default=LIST_LIMIT_DEFAULT, ge=1, le=LIST_LIMIT_MAX),
    offset: int = Query(default=0, ge=0),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.read")),
) -> list[InstitutionOut]:
    """List the institutions visible to the caller (institution users: their own), ordered by code.

    The header ``X-Total-Count`` contains the number of matches across all pages.
    """
    page, total = search_institutions(session, caller, text=q, kind=type, status=status, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [InstitutionOut.of(item) for item in page]


@router.get("/institutions/export")
def export_institutions(
    request: Request,
    format: Literal["csv", "xlsx"] = Query(default="csv"),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.read")),
) -> Response:
    """Download the institutions visible to the caller as CSV (UTF-8 with BOM) or XLSX; audited."""
    return export_response(request, session, caller, format)


def export_response(request: Request, session: Session, caller: Principal, file_format: str) -> Response:
    query = search_query(caller).order_by(Institution.code).execution_options(yield_per=500)
    institutions = session.scalars(query)
    rows = list(export_rows(institutions))
    content = write_csv(rows) if file_format == "csv" else write_xlsx(rows)
    add_event(session, request, caller, "institutions.export", "institutions",
              detail={"format": file_format, "rows": len(rows) - 1})
    session.commit()
    return Response(content, media_type=EXPORT_MEDIA_TYPES[file_format], headers={
        "Content-Disposition": f'attachment; filename="institutions.{file_format}"'})


@router.get("/institutions/import/template")
def import_template(
    format: Literal["csv", "xlsx"] = Query(default="xlsx"),
    _caller: Principal = Depends(require("institutions.write")),
) -> Response:
    """Download an empty import file with the Chinese column headers."""
    content = write_csv(template_rows()) if format == "csv" else write_xlsx(template_rows())
    return Response(content, media_type=EXPORT_MEDIA_TYPES[format], headers={
        "Content-Disposition": f'attachment; filename="institutions_template.{format}"'})


def import_body(result: ImportResult) -> dict[str, Any]:
    return {
        "mode": result.mode,
        "total_rows": result.total_rows,
        "imported": result.imported,
        "rejected_rows": result.rejected_rows,
        "errors": [{"row": e.row, "column": e.column, "value": e.value, "code": e.code, "message": e.message}
                   for e in result.errors],
    }


def import_summary(result: ImportResult) -> str:
    if not result.errors:
        return f"已导入全部 {result.imported} 个机构。"
    if result.mode == "valid_only":
        return (f"共 {result.total_rows} 行，已导入 {result.imported} 行；{result.rejected_rows} 行有错误未导入，"
                "请按错误列表修正这些行后重新导入。")
    return (f"共 {result.total_rows} 行，其中 {result.rejected_rows} 行有错误，本次未导入任何机构。"
            "请按错误列表修正后重新上传；如只想导入正确的行，请选择“仅导入正确的行”（mode=valid_only）。")


def run_import(request: Request, session: Session, caller: Principal, data: bytes, filename: str,
               mode: str) -> ImportResult:
    """Parse, check and import one file in one transaction; a rejected file or all-bad result is audited as failed."""
    try:
        rows = read_rows(data, filename)
        result = import_institutions(request, session, caller, rows, mode, filename)
    except ApiError as error:
        session.rollback()
        record_event(request, caller, "institutions.import", "institutions", "failed",
                     {"code": error.code, "file": filename[:200]})
        raise
    if result.imported:
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            logger.warning("institution import of %s hit a unique constraint", filename)
            error = conflict("INSTITUTION_CONFLICT", "导入期间有机构代码、名称或统一社会信用代码被其他操作占用，未导入任何机构。请重新上传。")
            record_event(request, caller, "institutions.import", "institutions", "failed",
                         {"code": error.code, "file": filename[:200]})
            raise error from None
    else:
        session.rollback()
        record_event(request, caller, "institutions.import", "institutions", "failed",
                     {"code": "IMPORT_ROWS_INVALID", "file": filename[:200], "mode": mode,
                      "rows": result.total_rows, "imported": 0, "rejected": result.rejected_rows})
    return result


@router.post("/institutions/import", max_body_size=MAX_UPLOAD_BODY_BYTES)
def import_file(
    request: Request,
    file: UploadFile = File(description="CSV（UTF-8 或 GB18030）或 XLSX 文件，首行为中文表头"),
    mode: Literal["all_or_nothing", "valid_only"] = Query(default="all_or_nothing"),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.write")),
) -> JSONResponse:
    """Import institutions from a file; by default nothing is imported when any row is bad.

    Returns 200 with the counts and the rejected rows when at least one row was imported, else
    422 ``IMPORT_ROWS_INVALID`` with the same body.
    """
    data = file.file.read(MAX_FILE_BYTES + 1)
    result = run_import(request, session, caller, data, file.filename or "upload", mode)
    body = {"code": "IMPORT_DONE" if result.imported else "IMPORT_ROWS_INVALID", "detail": import_summary(result),
            **import_body(result)}
    return JSONResponse(body, status_code=200 if result.imported else 422)


@router.get("/institutions/{code}", response_model=InstitutionOut)
def get_institution(
    code: str,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.read")),
) -> InstitutionOut:
    """Return one institution; institution users may only read their own."""
    check_institution(request, caller, "institutions.read", code)
    return InstitutionOut.of(find_institution(session, code))


@router.post("/institutions", response_model=InstitutionOut, status_code=201)
def create(
    body: InstitutionCreate,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.write")),
) -> InstitutionOut:
    """Create an institution. Duplicates return 409, invalid fields and an unknown parent 422."""
    institution = audited_write(request, session, caller, "institutions.create", f"institution:{body.code}",
                                lambda: create_institution(request, session, caller, body))
    return InstitutionOut.of(institution)


@router.patch("/institutions/{code}", response_model=InstitutionOut)
def edit(
    code: str,
    body: InstitutionFields,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.write")),
) -> InstitutionOut:
    """Change the given fields of an institution; the code cannot change."""
    institution = audited_write(request, session, caller, "institutions.update", f"institution:{code}",
                                lambda: update_institution(request, session, caller, code, body))
    return InstitutionOut.of(institution)


@router.post("/institutions/{code}/deactivate", response_model=InstitutionOut)
def deactivate(
    code: str,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.write")),
) -> InstitutionOut:
    """Set the status to 停用 (inactive)."""
    institution = audited_write(request, session, caller, "institutions.deactivate", f"institution:{code}",
                                lambda: set_status(request, session, caller, code, "inactive"))
    return InstitutionOut.of(institution)


@router.post("/institutions/{code}/reactivate", response_model=InstitutionOut)
def reactivate(
    code: str,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("institutions.write")),
) -> InstitutionOut:
    """Set the status back to 正常 (active)."""
    institution = audited_write(request, session, caller, "institutions.reactivate", f"institution:{code}",
                                lambda: set_status(request, session, caller, code, "active"))
    return InstitutionOut.of(institution)
