"""令牌反查: a regulator looks up the raw value behind a token of an institution's extract, for a named case.

Only roles with ``tokens.reidentify`` may call it (the built-in 监管审查员, see
:data:`admin_api.security.CAPABILITIES`). Every request names the institution, the extract table
and column, the token, a case number (案件编号) and a reason, and all six are required. The lookup
itself is :mod:`extracts.reidentify`: tokens are recomputed in memory from the warehouse values,
and nothing is written to disk.

Every request is audited as ``tokens.reidentify`` with the case number, reason, institution,
table, column and token, and on success the key version and period that matched. The raw value is
never put in an audit event or a log line; it goes only into the response, which is marked
``Cache-Control: no-store``. A user may re-identify at most ``reidentify_max_per_hour`` values in any
60 minutes. The count comes from the user's successful ``tokens.reidentify`` audit events, so it applies
across processes and restarts.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.deps import deny
from admin_api.errors import ApiError, forbidden, invalid, not_found
from admin_api.models import AuditEvent, Institution
from admin_api.security import Principal
from extracts.reidentify import find_raw_value, published_token_column, token_key_versions
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

CAPABILITY = "tokens.reidentify"
ACTION = "tokens.reidentify"
RATE_WINDOW = timedelta(hours=1)
TOKEN_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MIN_REASON_LENGTH = 4
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ReidentificationIn(BaseModel):
    """A re-identification request. Missing texts default to empty, so the check can name each one in Chinese."""

    model_config = ConfigDict(extra="forbid")

    institution: str = Field(default="", max_length=32, description="机构代码，如 bank_a")
    table: str = Field(default="", max_length=64, description="数据提取中的表名或报表模板代码，如 applications")
    column: str = Field(default="", max_length=64, description="令牌化字段代码，如 id_number")
    token: str = Field(default="", max_length=128, description="数据提取中的令牌：32 位十六进制")
    case_number: str = Field(default="", max_length=64, description="案件编号，如 沪金稽〔2026〕15号")
    reason: str = Field(default="", max_length=500, description="反查理由")
    key_version: int | None = Field(default=None, ge=1, le=10_000,
                                    description="令牌化密钥版本；不填时先试数据提取清单所列版本，再试该机构其他可用版本")


class ReidentificationOut(BaseModel):
    institution: str
    institution_name: str
    table: str
    column: str
    token: str
    value: str
    """The raw value. Shown to the caller only, never stored."""
    key_version: int
    period: str | None
    """Reporting period end (YYYYMMDD) of the partition the value was found in; None for the demo table."""
    case_number: str


def audit_detail(body: ReidentificationIn) -> dict[str, Any]:
    """Return what an audit event records about a request: everything the caller sent, clipped, never a raw value."""
    return {"institution": body.institution.strip()[:32], "table": body.table.strip()[:64],
            "column": body.column.strip()[:64], "token": body.token.strip().lower()[:128],
            "case_number": body.case_number.strip()[:64], "reason": body.reason.strip()[:500],
            "requested_key_version": body.key_version}


def audit_resource(body: ReidentificationIn) -> str:
    detail = audit_detail(body)
    return f"token:{detail['institution']}/{detail['table']}/{detail['column']}"


def _required(value: str, code: str, label: str, hint: str) -> str:
    """Return the trimmed value, or raise 422 ``code`` when it is empty or contains a line break or control character."""
    text = value.strip()
    if not text:
        raise invalid(code, f"请填写{label}，{hint}")
    if _CONTROL.search(text):
        raise invalid(code, f"{label}含有换行或控制字符，请删除后重新提交。")
    return text


def check_request(body: ReidentificationIn) -> ReidentificationIn:
    """Return the request with trimmed values, or raise 422 naming the missing or invalid field."""
    institution = _required(body.institution, "INSTITUTION_MISSING", "机构代码", "例如 bank_a。")
    table = _required(body.table, "TABLE_MISSING", "数据提取表名", "可填表名或报表模板代码，例如 applications。")
    column = _required(body.column, "COLUMN_MISSING", "令牌化字段代码", "例如 id_number。")
    case_number = _required(body.case_number, "CASE_NUMBER_MISSING", "案件编号",
                            "反查必须对应一个已立案的具体案件，例如 沪金稽〔2026〕15号。")
    reason = _required(body.reason, "REASON_MISSING", "反查理由", "说明为何需要查看该令牌对应的原始值。")
    if len(reason) < MIN_REASON_LENGTH:
        raise invalid("REASON_TOO_SHORT", f"反查理由“{reason}”过短，请至少写 {MIN_REASON_LENGTH} 个字，说明查看原始值的必要性。")
    token = body.token.strip().lower()
    if not TOKEN_PATTERN.match(token):
        raise invalid("TOKEN_INVALID", f"令牌“{body.token.strip()[:80]}”格式无效：应为数据提取中的 32 位十六进制字符串"
                                       "（0–9、a–f），请从数据提取中完整复制。")
    return ReidentificationIn(institution=institution, table=table, column=column, token=token,
                              case_number=case_number, reason=reason, key_version=body.key_version)


def _institution_name(session: Session, code: str) -> str:
    name = session.scalar(select(Institution.name).where(Institution.code == code))
    if name is None:
        raise not_found("INSTITUTION_NOT_FOUND", f"机构代码“{code}”不存在，请检查机构代码。")
    return name


def _check_rate(session: Session, caller: Principal, settings: Settings) -> None:
    since = utc_now() - RATE_WINDOW
    done = session.scalar(select(func.count(AuditEvent.id)).where(
        AuditEvent.actor == caller.username, AuditEvent.action == ACTION, AuditEvent.outcome == "success",
        AuditEvent.occurred_at >= since))
    limit = settings.reidentify_max_per_hour
    if (done or 0) >= limit:
        raise ApiError("REIDENTIFY_RATE_LIMITED",
                       f"您在最近 60 分钟内已反查 {done} 个令牌，达到上限 {limit} 个。请稍后再试；"
                       "如案件确需批量反查，请联系系统管理员调整 REGSANDBOX_REIDENTIFY_MAX_PER_HOUR。", status=429)


def reidentify(session: Session, request: Request, caller: Principal, store: KeyStore, settings: Settings,
               body: ReidentificationIn) -> ReidentificationOut:
    """Look up the raw value behind the token, audit the lookup and return the value.

    Raises 422 for a missing or invalid field, 404 for an unknown institution or table, 429 above the
    hourly limit, 404 ``TOKEN_NOT_FOUND`` when no warehouse value has this token, and the errors of
    :func:`extracts.reidentify.published_token_column`. The caller audits those as ``failed``.
    """
    if caller.institution_code is not None:
        # No institution role can be granted the capability (admin_api.roles.grantable_capabilities),
        # so this only guards against a change to that rule.
        raise deny(request, caller, CAPABILITY, forbidden(
            "REIDENTIFY_FORBIDDEN", "令牌反查只对监管机构用户开放，机构用户不能反查任何机构的令牌。"))
    checked = check_request(body)
    institution_name = _institution_name(session, checked.institution)
    _check_rate(session, caller, settings)
    session.rollback()  # Release the connection while partitions are decrypted.

    target = published_token_column(settings, store, checked.institution, checked.table, checked.column)
    versions = token_key_versions(store, checked.institution, target.manifest_key_version, checked.key_version)
    found = find_raw_value(settings, store, target, checked.token, versions)
    if found is None:
        tried = "、".join(f"第 {key.version} 版" for key in versions) or "（无可用版本）"
        raise not_found(
            "TOKEN_NOT_FOUND",
            f"在机构 {checked.institution} 数据提取表 {target.table} 字段 {checked.column} 的数据仓库数据中，"
            f"用该机构令牌化密钥的{tried}都没有找到令牌 {checked.token[:12]}… 对应的原始值。"
            "请核对令牌是否复制完整、是否来自该机构该字段（不同机构的令牌互不相通），"
            "或该期数据是否已被更正后的报送替换。")

    detail = {**audit_detail(checked), "table": target.table, "token_key_version": found.key_version,
              "period": found.period, "build_id": target.build_id}
    add_event(session, request, caller, ACTION, audit_resource(checked), "success", detail)
    session.commit()
    logger.info("token re-identified by %s for case %s: %s/%s/%s with key v%s", caller.username, checked.case_number,
                checked.institution, target.table, checked.column, found.key_version)
    return ReidentificationOut(institution=checked.institution, institution_name=institution_name, table=target.table,
                               column=checked.column, token=checked.token, value=found.value,
                               key_version=found.key_version, period=found.period, case_number=checked.case_number)
