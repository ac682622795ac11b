"""Console pages 数据提取 (published extracts, build history, rebuilds, k-anonymity overrides) and 脱敏策略.

The pages call the same functions as the API (:mod:`admin_api.extract_builds`,
:mod:`admin_api.masking_policies`) with the same capabilities, so every build, upload, approval
and rejection is audited the same way. A rejected form shows the Chinese message on its page and
stores an audit event with outcome ``failed``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from admin_api import extract_builds, masking_policies
from admin_api.console import _check_csrf, _failed, _page
from admin_api.deps import check_institution, get_session, require
from admin_api.errors import invalid
from admin_api.keyaccess import request_keystore
from admin_api.routes.extracts import PURPOSE_MAX_LENGTH, institution_extract
from admin_api.security import Principal
from extracts.kanon import OVERRIDE_REASON_MAX
from regsandbox_core.errors import RegsandboxError

router = APIRouter(prefix="/console", include_in_schema=False)

_NOTICES = {
    "built": "已重新生成：{} 家机构发布了新版本，{} 家数据未变化，{} 家失败（原因见构建记录）。",
    "uploaded": "已上传脱敏策略草稿，须经安全管理员审批后生效（上传者本人不能审批）。",
    "approved": "已审批并以平台 SM2 密钥签署该脱敏策略。新策略在下次生成数据提取时生效，可在“数据提取”页面重新生成。",
    "rejected": "已驳回该脱敏策略草稿。",
    "overridden": "已按安全管理员的决定强制发布该机构的数据提取，理由与低于 k 的表已记入审计日志和数据提取清单。",
    "override_not_needed": "新构建已满足 k 匿名要求，无需强制发布：已按普通重新生成处理，清单中不记录强制发布。",
}


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done", "")
    if done == "built":
        counts = [request.query_params.get(name, "0")[:6] for name in ("published", "unchanged", "failed")]
        return _NOTICES["built"].format(*counts)
    return _NOTICES.get(done)


def _purpose(text: str) -> str:
    if len(text.strip()) < 2:
        raise invalid("EXTRACT_PURPOSE_REQUIRED", f"请填写重新生成的原因（2 至 {PURPOSE_MAX_LENGTH} 个字符），该原因记入审计日志。")
    return text.strip()


def _list_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
               error: str | None = None) -> Response:
    settings, store = request.app.state.settings, request_keystore(request)
    rows = [{"institution": code, "published": extract_builds.published(settings, store, code)}
            for code in extract_builds.visible_codes(session, settings, caller)]
    history = extract_builds.build_history(session, caller.institution_code, limit=20)
    return _page(request, "extracts.html", caller, status_code=status_code, error=error,
                 notice=None if error else _notice(request), rows=rows, history=history,
                 purpose_max=PURPOSE_MAX_LENGTH)


@router.get("/extracts", response_class=HTMLResponse)
def extracts_page(request: Request, session: Session = Depends(get_session),
                  caller: Principal = Depends(require("extracts.read", console=True))) -> Response:
    """Show the published extract of each institution the caller may see, and the newest builds."""
    return _list_page(request, session, caller)


def _detail_page(request: Request, session: Session, caller: Principal, code: str, *, status_code: int = 200,
                 error: str | None = None) -> Response:
    extract = institution_extract(request, session, code)
    return _page(request, "extract_detail.html", caller, status_code=status_code, error=error,
                 notice=None if error else _notice(request), extract=extract,
                 k_refusal=extract_builds.k_refusal(extract["history"], code),
                 purpose_max=PURPOSE_MAX_LENGTH, override_reason_max=OVERRIDE_REASON_MAX)


@router.get("/extracts/{code}", response_class=HTMLResponse)
def extract_page(code: str, request: Request, session: Session = Depends(get_session),
                 caller: Principal = Depends(require("extracts.read", console=True))) -> Response:
    """Show one institution's published build (tables, row counts, manifest SM3) and its build history."""
    extract_builds.check_known(session, request.app.state.settings, code)
    check_institution(request, caller, "extracts.read", code)
    return _detail_page(request, session, caller, code)


def _counts(results: list[extract_builds.BuildResult]) -> str:
    statuses = [result.status for result in results]
    return "&".join(f"{name}={statuses.count(name)}" for name in ("published", "unchanged", "failed"))


@router.post("/extracts/build", response_class=HTMLResponse)
def build_all_form(request: Request, purpose: str = Form(default="", max_length=PURPOSE_MAX_LENGTH),
                   csrf: str = Form(default="", alias="csrf_token", max_length=200),
                   session: Session = Depends(get_session),
                   caller: Principal = Depends(require("extracts.build", console=True))) -> Response:
    """Rebuild every institution's extract (same as POST /api/v1/extracts/build)."""
    _check_csrf(request, caller, "extracts.build", csrf)
    try:
        results = extract_builds.run_builds(
            request.app.state.session_factory, request.app.state.settings, request_keystore(request),
            extract_builds.BuildActor.of_request(request, caller), None, reason=_purpose(purpose),
            unix_group_prefix=request.app.state.settings.unix_prefix)
    except RegsandboxError as error:
        if error.code == "EXTRACT_PURPOSE_REQUIRED":
            _failed(request, session, caller, "extracts.build", extract_builds.ALL_RESOURCE, error)
        return _list_page(request, session, caller, status_code=error.status, error=error.message)
    return RedirectResponse(f"/console/extracts?done=built&{_counts(results)}", status_code=303)


@router.post("/extracts/{code}/build", response_class=HTMLResponse)
def build_one_form(code: str, request: Request, purpose: str = Form(default="", max_length=PURPOSE_MAX_LENGTH),
                   csrf: str = Form(default="", alias="csrf_token", max_length=200),
                   session: Session = Depends(get_session),
                   caller: Principal = Depends(require("extracts.build", console=True))) -> Response:
    """Rebuild one institution's extract (same as POST /api/v1/extracts/{code}/build)."""
    _check_csrf(request, caller, "extracts.build", csrf)
    try:
        extract_builds.check_known(session, request.app.state.settings, code)
        reason = _purpose(purpose)
    except RegsandboxError as error:
        _failed(request, session, caller, "extracts.build", f"extract:{code[:32]}", error)
        if error.status == 404:
            raise
        return _detail_page(request, session, caller, code, status_code=error.status, error=error.message)
    results = extract_builds.run_builds(
        request.app.state.session_factory, request.app.state.settings, request_keystore(request),
        extract_builds.BuildActor.of_request(request, caller), [code], reason=reason,
        unix_group_prefix=request.app.state.settings.unix_prefix)
    if results[0].error is not None:  # audited by run_builds
        return _detail_page(request, session, caller, code, status_code=results[0].error.status,
                            error=f"机构 {code} 的数据提取未生成：{results[0].error.message}")
    return RedirectResponse(f"/console/extracts/{code}?done=built&{_counts(results)}", status_code=303)


@router.post("/extracts/{code}/publish-below-k", response_class=HTMLResponse)
def publish_below_k_form(code: str, request: Request,
                         override_reason: str = Form(default="", max_length=OVERRIDE_REASON_MAX),
                         csrf: str = Form(default="", alias="csrf_token", max_length=200),
                         session: Session = Depends(get_session),
                         caller: Principal = Depends(require("extracts.override_k", console=True))) -> Response:
    """Publish an extract below k with a reason (same as POST /api/v1/extracts/{code}/publish-below-k)."""
    _check_csrf(request, caller, "extracts.override_k", csrf)
    try:
        extract_builds.check_known(session, request.app.state.settings, code)
    except RegsandboxError as error:
        _failed(request, session, caller, extract_builds.OVERRIDE_ACTION, f"extract:{code[:32]}", error)
        raise
    try:
        result, detail = extract_builds.override_k(
            request.app.state.session_factory, request.app.state.settings, request_keystore(request),
            extract_builds.BuildActor.of_request(request, caller), code, override_reason,
            unix_group_prefix=request.app.state.settings.unix_prefix)
    except RegsandboxError as error:  # an invalid reason, audited by override_k
        return _detail_page(request, session, caller, code, status_code=error.status, error=error.message)
    if result.error is not None:
        return _detail_page(request, session, caller, code, status_code=result.error.status,
                            error=f"机构 {code} 的数据提取未强制发布：{result.error.message}")
    done = "overridden" if detail["override_applied"] else "override_not_needed"
    return RedirectResponse(f"/console/extracts/{code}?done={done}", status_code=303)


# --- masking policies --------------------------------------------------------------------------------


def _policies_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
                   error: str | None = None) -> Response:
    approved = masking_policies.approved_policies(request.app.state.settings, request_keystore(request))
    drafts = [masking_policies.draft_out(row) for row in masking_policies.list_drafts(session)]
    return _page(request, "policies.html", caller, status_code=status_code, error=error,
                 notice=None if error else _notice(request), approved=approved, drafts=drafts,
                 max_bytes=masking_policies.MAX_POLICY_BYTES)


@router.get("/policies", response_class=HTMLResponse)
def policies_page(request: Request, session: Session = Depends(get_session),
                  caller: Principal = Depends(require("policies.read", console=True))) -> Response:
    """Show the approved masking policies with their rules in Chinese, the drafts and the upload form."""
    return _policies_page(request, session, caller)


def _draft_page(request: Request, session: Session, caller: Principal, draft_id: int, *, status_code: int = 200,
                error: str | None = None) -> Response:
    draft: dict[str, Any] = masking_policies.draft_out(masking_policies.find_draft(session, draft_id), with_rules=True)
    return _page(request, "policy_draft.html", caller, status_code=status_code, error=error,
                 notice=None if error else _notice(request), draft=draft,
                 reason_max=masking_policies.REASON_MAX_LENGTH)


@router.get("/policies/drafts/{draft_id}", response_class=HTMLResponse)
def draft_page(draft_id: int, request: Request, session: Session = Depends(get_session),
               caller: Principal = Depends(require("policies.read", console=True))) -> Response:
    """Show a draft: its rules in Chinese, its YAML, who uploaded it and the approval forms."""
    return _draft_page(request, session, caller, draft_id)


@router.post("/policies/drafts", response_class=HTMLResponse)
async def upload_form(request: Request, file: UploadFile = File(),
                      csrf: str = Form(default="", alias="csrf_token", max_length=200),
                      session: Session = Depends(get_session),
                      caller: Principal = Depends(require("policies.draft", console=True))) -> Response:
    """Upload a policy file as a draft (same as POST /api/v1/masking-policies/drafts)."""
    _check_csrf(request, caller, "policies.draft", csrf)
    data = await file.read(masking_policies.MAX_POLICY_BYTES + 1)
    try:
        row = masking_policies.upload_draft(session, request, caller, data)
    except RegsandboxError as error:
        _failed(request, session, caller, "policies.draft", "policy:draft", error)
        return _policies_page(request, session, caller, status_code=error.status,
                              error=f"脱敏策略文件 {(file.filename or '')[:100]} 未上传：{error.message}")
    return RedirectResponse(f"/console/policies/drafts/{row.id}?done=uploaded", status_code=303)


@router.post("/policies/drafts/{draft_id}/approve", response_class=HTMLResponse)
def approve_form(draft_id: int, request: Request, csrf: str = Form(default="", alias="csrf_token", max_length=200),
                 session: Session = Depends(get_session),
                 caller: Principal = Depends(require("policies.approve", console=True))) -> Response:
    """Approve and sign a draft (same as POST /api/v1/masking-policies/drafts/{id}/approve)."""
    _check_csrf(request, caller, "policies.approve", csrf)
    try:
        masking_policies.approve_draft(session, request, caller, draft_id, request_keystore(request))
    except RegsandboxError as error:
        _failed(request, session, caller, "policies.approve", f"policy-draft:{draft_id}", error)
        if error.status == 404:
            raise
        return _draft_page(request, session, caller, draft_id, status_code=error.status, error=error.message)
    return RedirectResponse(f"/console/policies/drafts/{draft_id}?done=approved", status_code=303)


@router.post("/policies/drafts/{draft_id}/reject", response_class=HTMLResponse)
def reject_form(draft_id: int, request: Request,
                rejection_reason: str = Form(default="", max_length=masking_policies.REASON_MAX_LENGTH),
                csrf: str = Form(default="", alias="csrf_token", max_length=200),
                session: Session = Depends(get_session),
                caller: Principal = Depends(require("policies.approve", console=True))) -> Response:
    """Reject a draft with a reason (same as POST /api/v1/masking-policies/drafts/{id}/reject)."""
    _check_csrf(request, caller, "policies.approve", csrf)
    try:
        masking_policies.reject_draft(session, request, caller, draft_id, rejection_reason)
    except RegsandboxError as error:
        _failed(request, session, caller, "policies.reject", f"policy-draft:{draft_id}", error)
        if error.status == 404:
            raise
        return _draft_page(request, session, caller, draft_id, status_code=error.status, error=error.message)
    return RedirectResponse(f"/console/policies/drafts/{draft_id}?done=rejected", status_code=303)
