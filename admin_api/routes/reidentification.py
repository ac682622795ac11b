"""令牌反查: POST /api/v1/reidentification returns the raw value behind a token for a named case.

Only roles with ``tokens.reidentify`` are admitted. A rejected request is audited with outcome
``failed``, its error code and the case, institution, table, column and token it named.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from admin_api import reidentification
from admin_api.audit import record_event
from admin_api.deps import get_session, require
from admin_api.keyaccess import request_keystore
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError

router = APIRouter()


def run_audited(request: Request, session: Session, caller: Principal,
                body: reidentification.ReidentificationIn) -> reidentification.ReidentificationOut:
    """Run the lookup. On a platform error, roll back, store a ``failed`` event with the request's fields, re-raise.

    A 403 comes from :func:`admin_api.deps.deny`, which stored a ``denied`` event already.
    """
    try:
        return reidentification.reidentify(session, request, caller, request_keystore(request),
                                           request.app.state.settings, body)
    except RegsandboxError as error:
        session.rollback()
        if error.status == 403:  # deny() stored the denial already
            raise
        record_event(request, caller, reidentification.ACTION, reidentification.audit_resource(body), "failed",
                     {**reidentification.audit_detail(body), "code": error.code})
        raise


@router.post("/reidentification", response_model=reidentification.ReidentificationOut)
def reidentify_token(
    body: reidentification.ReidentificationIn, request: Request, session: Session = Depends(get_session),
    caller: Principal = Depends(require(reidentification.CAPABILITY)),
) -> JSONResponse:
    """Look up the raw value behind an extract token for a named case (audited, rate-limited)."""
    result = run_audited(request, session, caller, body)
    return JSONResponse(result.model_dump(), headers={"Cache-Control": "no-store"})
