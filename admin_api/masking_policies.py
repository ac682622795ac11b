"""Approval of masking policies (脱敏策略) by a person, with four-eyes.

A data steward or a security administrator uploads a policy version as a draft
(:func:`upload_draft`, capability ``policies.draft``). The YAML is validated on upload with
:func:`extracts.policy.parse_policy`, so a policy that keeps a C3 column, leaves a class without
a rule or keeps level 4 values is rejected with the Chinese message of that check and nothing
is stored. A security administrator other than the uploader approves the draft
(:func:`approve_draft`, ``policies.approve``): :func:`extracts.policy.approve_policy` validates
the same bytes again, stores them as ``<data_dir>/policies/masking/v<version>.yaml`` and signs
them with the platform SM2 key. Extract builds use only such signed files. A security
administrator may also reject a draft, with a reason. Every upload, approval and rejection is
audited with the actor; the routes audit rejected requests with outcome ``failed``.

``regsandbox init`` approves the shipped default policy when none is approved yet
(:func:`approve_shipped_default`), recorded as an approval by the system, not by a person.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from fastapi import Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.errors import ApiError, conflict, forbidden, invalid, not_found
from admin_api.models import AuditEvent, MaskingPolicyDraft
from admin_api.security import Principal
from catalog.classes import KINDS, PI_CATEGORIES, SECURITY_LEVELS
from extracts.policy import (
    DEFAULT_POLICY_FILE,
    GENERALISATIONS,
    PARTIAL_MASKS,
    TREATMENTS,
    MaskingPolicy,
    PolicyInvalid,
    Rule,
    approve_policy,
    approved_dir,
    approved_versions,
    load_approved_policy,
    parse_policy,
)
from regsandbox_core.crypto import sm3_hex
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.files import make_private_dirs
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

MAX_POLICY_BYTES = 256 * 1024
"""Largest policy file accepted; the shipped default is about 5 KiB."""
REASON_MAX_LENGTH = 500
SYSTEM_ACTOR = "system:regsandbox-init"
"""Uploader and approver recorded for the shipped default policy that ``regsandbox init`` approves."""
STATE_NAMES = {"draft": "待审批", "approved": "已审批", "rejected": "已驳回"}
PARTIAL_MASK_NAMES = {"mobile": "保留前 3 位和后 4 位", "resident_id": "保留前 6 位和后 4 位",
                      "bank_card": "保留前 6 位和后 4 位", "person_name": "只保留姓氏"}
GENERALISATION_NAMES = {"birth_date": "只保留年份", "address": "只保留省、市", "amount": "按金额区间"}


class DraftUpload(BaseModel):
    """A masking policy version to approve, as the YAML text of the policy file."""

    content: str = Field(min_length=1, max_length=MAX_POLICY_BYTES,
                         description="脱敏策略 YAML 全文（格式见 extracts/policies/default.v1.yaml）")


class Rejection(BaseModel):
    rejection_reason: str = Field(min_length=2, max_length=REASON_MAX_LENGTH, description="驳回原因，2 至 500 个字符")


# --- reading a policy in the words of the console ------------------------------------------------------


def _listing(chosen: frozenset, everything: dict, names: dict, every_label: str) -> str:
    if chosen >= frozenset(everything):
        return every_label
    return "、".join(names.get(item, str(item)) for item in everything if item in chosen)


def describe_rule(rule: Rule) -> dict[str, Any]:
    """Return a rule in Chinese: the classes it matches and its treatment with what the treatment keeps."""
    categories = {**{code: code for code in PI_CATEGORIES}, None: "非个人信息"}
    treatment = TREATMENTS[rule.treatment]
    if rule.treatment == "partial_mask":
        treatment += "：" + "；".join(f"{KINDS[kind]}{PARTIAL_MASK_NAMES[kind]}" for kind in KINDS
                                      if kind in rule.kinds and (kind in PARTIAL_MASKS or kind == "person_name"))
    elif rule.treatment == "generalise":
        treatment += "：" + "；".join(f"{KINDS[kind]}{GENERALISATION_NAMES[kind]}" for kind in KINDS
                                      if kind in rule.kinds and kind in GENERALISATIONS)
    return {
        "id": rule.id,
        "treatment": rule.treatment,
        "treatment_name": treatment,
        "levels": _listing(rule.levels, SECURITY_LEVELS, {level: f"{level} 级" for level in SECURITY_LEVELS}, "全部级别"),
        "categories": _listing(rule.pi_categories, categories, categories, "全部类别（含非个人信息）"),
        "kinds": _listing(rule.kinds, KINDS, KINDS, "全部类型"),
        "bands": [band.label for band in rule.bands],
        "description": rule.description,
    }


def describe_policy(policy: MaskingPolicy) -> dict[str, Any]:
    return {"name": policy.name, "version": policy.version, "description": policy.description, "sm3": policy.sm3,
            "rules": [describe_rule(rule) for rule in policy.rules]}


def parse_upload(data: bytes) -> MaskingPolicy:
    """Validate an uploaded policy file; raise 422 with the Chinese message of the first failed check."""
    if len(data) > MAX_POLICY_BYTES:
        raise invalid("POLICY_FILE_TOO_LARGE",
                      f"脱敏策略文件为 {len(data)} 字节，超过上限 {MAX_POLICY_BYTES} 字节。请检查是否上传了正确的 YAML 文件。")
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise invalid("POLICY_FORMAT_INVALID",
                      f"脱敏策略文件不是合法的 UTF-8 YAML（{type(error).__name__}）。请用 UTF-8 编码保存后重新上传。") from None
    try:
        return parse_policy(document, sm3=sm3_hex(data))
    except PolicyInvalid as error:
        raise invalid(error.code, error.message) from None


def draft_out(row: MaskingPolicyDraft, *, with_rules: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {
        "id": row.id, "name": row.name, "version": row.version, "description": row.description, "sm3": row.sm3,
        "state": row.state, "state_name": STATE_NAMES.get(row.state, row.state), "uploaded_by": row.uploaded_by,
        "uploaded_at": row.uploaded_at, "decided_by": row.decided_by, "decided_at": row.decided_at,
        "decision_reason": row.decision_reason, "signature_key": row.signature_key,
    }
    if with_rules:
        result["rules"] = describe_policy(parse_upload(row.content.encode("utf-8")))["rules"]
        result["content"] = row.content
    return result


def approved_policies(settings: Settings, keystore: KeyStore) -> list[dict[str, Any]]:
    """Return every approved version, newest first, each after verifying its SM2 signature."""
    policies = []
    for version in reversed(approved_versions(settings)):
        try:
            policy = load_approved_policy(settings, keystore, version)
        except RegsandboxError as error:
            policies.append({"version": version, "valid": False, "code": error.code, "message": error.message})
            continue
        policies.append({**describe_policy(policy), "valid": True, "signature_key": policy.signature_key})
    return policies


def list_drafts(session: Session) -> list[MaskingPolicyDraft]:
    return list(session.scalars(select(MaskingPolicyDraft).order_by(MaskingPolicyDraft.id.desc()).limit(200)))


def find_draft(session: Session, draft_id: int, *, lock: bool = False) -> MaskingPolicyDraft:
    query = select(MaskingPolicyDraft).where(MaskingPolicyDraft.id == draft_id)
    row = session.scalars(query.with_for_update() if lock else query).first()
    if row is None:
        raise not_found("POLICY_DRAFT_NOT_FOUND", f"脱敏策略草稿 {draft_id} 不存在，请刷新策略列表。")
    return row


# --- writes ------------------------------------------------------------------------------------------


def upload_draft(session: Session, request: Request, caller: Principal, data: bytes) -> MaskingPolicyDraft:
    """Validate a policy file and store it as a draft; audited and committed."""
    policy = parse_upload(data)
    settings: Settings = request.app.state.settings
    if policy.version in approved_versions(settings):
        raise conflict("POLICY_VERSION_EXISTS",
                       f"脱敏策略第 {policy.version} 版已审批，已审批的版本不可修改。请把 version 加一后重新上传。")
    pending = session.scalars(select(MaskingPolicyDraft).where(
        MaskingPolicyDraft.version == policy.version, MaskingPolicyDraft.state == "draft")).first()
    if pending is not None:
        raise conflict("POLICY_DRAFT_EXISTS",
                       f"脱敏策略第 {policy.version} 版已有待审批的草稿（编号 {pending.id}，{pending.uploaded_by} 上传）。"
                       "请先审批或驳回该草稿，或把 version 加一后重新上传。")
    row = MaskingPolicyDraft(name=policy.name, version=policy.version, description=policy.description or None,
                             content=data.decode("utf-8"), sm3=policy.sm3, state="draft",
                             uploaded_by=caller.username)
    session.add(row)
    session.flush()
    add_event(session, request, caller, "policies.draft", f"policy:v{policy.version}", "success",
              {"draft_id": row.id, "name": policy.name, "version": policy.version, "sm3": policy.sm3})
    session.commit()
    logger.info("masking policy draft %s (version %s) uploaded by %s", row.id, policy.version, caller.username)
    return row


def _sign(settings: Settings, keystore: KeyStore, content: str) -> MaskingPolicy:
    """Approve and sign the bytes of a draft through a private temporary file (approve_policy reads a path)."""
    work = settings.data_dir / "policies"
    make_private_dirs(work, settings.data_dir)
    handle, name = tempfile.mkstemp(prefix=".policy-draft-", suffix=".yaml", dir=work)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content.encode("utf-8"))
        return approve_policy(settings, keystore, Path(name))
    finally:
        Path(name).unlink(missing_ok=True)


def approve_draft(session: Session, request: Request, caller: Principal, draft_id: int,
                  keystore: KeyStore) -> MaskingPolicyDraft:
    """Approve and SM2-sign a draft uploaded by someone else; audited and committed.

    Raises 403 ``POLICY_FOUR_EYES`` for the uploader, 409 for a draft already decided or a version
    approved meanwhile with other content, 422 when the policy no longer validates.
    """
    row = find_draft(session, draft_id, lock=True)
    if row.state != "draft":
        raise conflict("POLICY_DRAFT_DECIDED",
                       f"脱敏策略草稿 {draft_id} 已{STATE_NAMES.get(row.state, row.state)}（{row.decided_by}），不能再次审批。")
    if row.uploaded_by == caller.username:
        raise forbidden("POLICY_FOUR_EYES",
                        f"脱敏策略草稿 {draft_id} 由您本人上传。按双人复核要求，须由另一名安全管理员审批。")
    try:
        policy = _sign(request.app.state.settings, keystore, row.content)
    except PolicyInvalid as error:
        raise ApiError(error.code, error.message, status=409 if error.code == "POLICY_VERSION_EXISTS" else 422) from None
    except RegsandboxError as error:
        raise ApiError(error.code, error.message, status=error.status) from None

    row.state, row.decided_by, row.decided_at = "approved", caller.username, utc_now()
    row.signature_key = policy.signature_key
    add_event(session, request, caller, "policies.approve", f"policy:v{row.version}", "success",
              {"draft_id": row.id, "name": row.name, "version": row.version, "sm3": policy.sm3,
               "uploaded_by": row.uploaded_by, "signature_key": policy.signature_key})
    session.commit()
    logger.info("masking policy version %s approved by %s (draft %s)", row.version, caller.username, row.id)
    return row


def reject_draft(session: Session, request: Request, caller: Principal, draft_id: int, reason: str) -> MaskingPolicyDraft:
    """Reject a draft with a reason (the uploader may withdraw their own); audited and committed."""
    reason = reason.strip()
    if len(reason) < 2:
        raise invalid("POLICY_REASON_REQUIRED", f"请填写驳回原因（2 至 {REASON_MAX_LENGTH} 个字符）。")
    row = find_draft(session, draft_id, lock=True)
    if row.state != "draft":
        raise conflict("POLICY_DRAFT_DECIDED",
                       f"脱敏策略草稿 {draft_id} 已{STATE_NAMES.get(row.state, row.state)}（{row.decided_by}），不能驳回。")
    row.state, row.decided_by, row.decided_at, row.decision_reason = "rejected", caller.username, utc_now(), reason
    add_event(session, request, caller, "policies.reject", f"policy:v{row.version}", "success",
              {"draft_id": row.id, "version": row.version, "reason": reason})
    session.commit()
    return row


def approve_shipped_default(session_factory: sessionmaker[Session], settings: Settings, keystore: KeyStore,
                            invoked_by: str) -> MaskingPolicy | None:
    """Approve the shipped default policy when no policy is approved yet; return it, or None when one was.

    The approval is recorded as a draft row uploaded and approved by :data:`SYSTEM_ACTOR`, and as
    the audit event ``policies.approve`` naming the operator who ran the command.
    """
    if approved_versions(settings):
        return None
    data = DEFAULT_POLICY_FILE.read_bytes()
    policy = approve_policy(settings, keystore, DEFAULT_POLICY_FILE)
    with session_factory() as session:
        row = MaskingPolicyDraft(name=policy.name, version=policy.version, description=policy.description or None,
                                 content=data.decode("utf-8"), sm3=policy.sm3, state="approved",
                                 uploaded_by=SYSTEM_ACTOR, decided_by=SYSTEM_ACTOR, decided_at=utc_now(),
                                 decision_reason="平台初始化时审批随平台发布的默认脱敏策略",
                                 signature_key=policy.signature_key)
        session.add(row)
        session.flush()
        session.add(AuditEvent(actor=SYSTEM_ACTOR, role="operator", action="policies.approve",
                               resource=f"policy:v{policy.version}", outcome="success",
                               detail=_json({"draft_id": row.id, "name": policy.name, "version": policy.version,
                                             "sm3": policy.sm3, "source": "shipped_default",
                                             "invoked_by": invoked_by[:64], "signature_key": policy.signature_key})))
        session.commit()
    logger.info("approved the shipped default masking policy version %s (%s)", policy.version, approved_dir(settings))
    return policy


def _json(detail: dict[str, Any]) -> str:
    return json.dumps(detail, ensure_ascii=False, sort_keys=True)
