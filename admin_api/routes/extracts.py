"""数据提取 and 脱敏策略: build status and history of the masked extracts, rebuilds, and policy approval.

Regulators, the system and security administrators read every institution's extract metadata;
institution administrators and modellers read their own institution's only (``extracts.read``).
The metadata (build id, policy and key versions, tables, row counts, digests) contains no data
values. The system and security administrators rebuild extracts (``extracts.build``). Only the
security administrator publishes an extract that the k-anonymity check refused
(``extracts.override_k``, with a reason). Policy
drafts are uploaded with ``policies.draft`` and approved or rejected by another security
administrator with ``policies.approve`` (:mod:`admin_api.masking_policies`). Rejected writes are
audited with outcome ``failed``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from admin_api import extract_builds, masking_policies
from admin_api.audit import record_event
from admin_api.deps import check_institution, get_session, require
from admin_api.keyaccess import request_keystore
from admin_api.security import Principal
from extracts.kanon import OVERRIDE_REASON_MAX
from regsandbox_core.errors import RegsandboxError

router = APIRouter()

PURPOSE_MAX_LENGTH = 200


class BuildRequest(BaseModel):
    """A manual rebuild; the purpose is stored in the audit events of the builds."""

    purpose: str = Field(min_length=2, max_length=PURPOSE_MAX_LENGTH,
                         description="重新生成的原因，例如“审批脱敏策略第 2 版后重新生成”，记入审计日志")


class OverrideRequest(BaseModel):
    """A security administrator's decision to publish an extract below k; the reason is stored in the audit log."""

    override_reason: str = Field(min_length=2, max_length=OVERRIDE_REASON_MAX,
                                 description="强制发布的理由，例如“监管检查急需，已确认小组记录不含敏感组合”，记入审计日志和数据提取清单")


def institution_extract(request: Request, session: Session, code: str) -> dict[str, Any]:
    """Return one institution's published build and its build history."""
    settings = request.app.state.settings
    return {"institution": code,
            "published": extract_builds.published(settings, request_keystore(request), code),
            "history": extract_builds.build_history(session, code)}


@router.get("/extracts")
def list_extracts(request: Request, session: Session = Depends(get_session),
                  caller: Principal = Depends(require("extracts.read"))) -> list[dict[str, Any]]:
    """List the published extract of each institution the caller may see (institution users: their own)."""
    settings, store = request.app.state.settings, request_keystore(request)
    return [{"institution": code, "published": extract_builds.published(settings, store, code)}
            for code in extract_builds.visible_codes(session, settings, caller)]


@router.get("/extracts/{code}")
def read_extract(code: str, request: Request, session: Session = Depends(get_session),
                 caller: Principal = Depends(require("extracts.read"))) -> dict[str, Any]:
    """Return an institution's published build (tables, row counts, manifest SM3) and its build history."""
    extract_builds.check_known(session, request.app.state.settings, code)
    check_institution(request, caller, "extracts.read", code)
    return institution_extract(request, session, code)


def _build(request: Request, caller: Principal, codes: list[str] | None,
           purpose: str) -> list[extract_builds.BuildResult]:
    """Run the builds in the request; run_builds audits every outcome, including a raised failure."""
    return extract_builds.run_builds(
        request.app.state.session_factory, request.app.state.settings, request_keystore(request),
        extract_builds.BuildActor.of_request(request, caller), codes, trigger="manual", reason=purpose.strip(),
        unix_group_prefix=request.app.state.settings.unix_prefix)


@router.post("/extracts/build")
def build_all_extracts(body: BuildRequest, request: Request,
                       caller: Principal = Depends(require("extracts.build"))) -> list[dict[str, Any]]:
    """Rebuild the extract of every institution in the warehouse; each outcome, failed ones included, is listed and audited."""
    # NOTE: the builds run one after another inside the request, so with hundreds of institutions
    # the response takes minutes; clients need a matching timeout.
    return [result.as_dict() for result in _build(request, caller, None, body.purpose)]


@router.post("/extracts/{code}/build")
def build_one_extract(code: str, body: BuildRequest, request: Request, session: Session = Depends(get_session),
                      caller: Principal = Depends(require("extracts.build"))) -> dict[str, Any]:
    """Rebuild one institution's extract with the newest approved policy and the catalog's classes; audited."""
    try:
        extract_builds.check_known(session, request.app.state.settings, code)
    except RegsandboxError as error:
        record_event(request, caller, "extracts.build", f"extract:{code[:32]}", "failed", {"code": error.code})
        raise
    session.close()  # the build may take minutes; the request's connection is not needed meanwhile
    result = _build(request, caller, [code], body.purpose)[0]
    if result.error is not None:
        raise result.error
    return result.as_dict()


@router.post("/extracts/{code}/publish-below-k")
def publish_below_k(code: str, body: OverrideRequest, request: Request, session: Session = Depends(get_session),
                    caller: Principal = Depends(require("extracts.override_k"))) -> dict[str, Any]:
    """Publish one institution's extract although a table is below k (security administrator, reason required); audited."""
    try:
        extract_builds.check_known(session, request.app.state.settings, code)
    except RegsandboxError as error:
        record_event(request, caller, extract_builds.OVERRIDE_ACTION, f"extract:{code[:32]}", "failed",
                     {"code": error.code})
        raise
    session.close()  # the build may take minutes; the request's connection is not needed meanwhile
    result, detail = extract_builds.override_k(
        request.app.state.session_factory, request.app.state.settings, request_keystore(request),
        extract_builds.BuildActor.of_request(request, caller), code, body.override_reason,
        unix_group_prefix=request.app.state.settings.unix_prefix)
    if result.error is not None:
        raise result.error
    return {**result.as_dict(), "override_applied": detail["override_applied"], "k": detail["k"],
            "tables_below_k": detail["tables_below_k"]}


# --- masking policies --------------------------------------------------------------------------------


@router.get("/masking-policies")
def list_policies(request: Request, session: Session = Depends(get_session),
                  _caller: Principal = Depends(require("policies.read"))) -> dict[str, Any]:
    """List the approved policy versions (signature verified, rules in Chinese) and the uploaded drafts."""
    return {"approved": masking_policies.approved_policies(request.app.state.settings, request_keystore(request)),
            "drafts": [masking_policies.draft_out(row) for row in masking_policies.list_drafts(session)]}


@router.post("/masking-policies/drafts", status_code=201)
def upload_policy(body: masking_policies.DraftUpload, request: Request, session: Session = Depends(get_session),
                  caller: Principal = Depends(require("policies.draft"))) -> dict[str, Any]:
    """Upload a masking policy version (YAML) as a draft; an invalid policy is rejected with the reason."""
    try:
        row = masking_policies.upload_draft(session, request, caller, body.content.encode("utf-8"))
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "policies.draft", "policy:draft", "failed", {"code": error.code})
        raise
    return masking_policies.draft_out(row, with_rules=True)


@router.get("/masking-policies/drafts/{draft_id}")
def read_policy_draft(draft_id: int, session: Session = Depends(get_session),
                      _caller: Principal = Depends(require("policies.read"))) -> dict[str, Any]:
    """Return a draft with its YAML and its rules in Chinese."""
    return masking_policies.draft_out(masking_policies.find_draft(session, draft_id), with_rules=True)


@router.post("/masking-policies/drafts/{draft_id}/approve")
def approve_policy_draft(draft_id: int, request: Request, session: Session = Depends(get_session),
                         caller: Principal = Depends(require("policies.approve"))) -> dict[str, Any]:
    """Approve and SM2-sign a draft; the uploader may not approve their own upload."""
    try:
        row = masking_policies.approve_draft(session, request, caller, draft_id, request_keystore(request))
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "policies.approve", f"policy-draft:{draft_id}", "failed", {"code": error.code})
        raise
    return masking_policies.draft_out(row)


@router.post("/masking-policies/drafts/{draft_id}/reject")
def reject_policy_draft(draft_id: int, body: masking_policies.Rejection, request: Request,
                        session: Session = Depends(get_session),
                        caller: Principal = Depends(require("policies.approve"))) -> dict[str, Any]:
    """Reject a draft with a reason."""
    try:
        row = masking_policies.reject_draft(session, request, caller, draft_id, body.rejection_reason)
    except RegsandboxError as error:
        session.rollback()
        record_event(request, caller, "policies.reject", f"policy-draft:{draft_id}", "failed", {"code": error.code})
        raise
    return masking_policies.draft_out(row)
