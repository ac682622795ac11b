"""Audited builds of the masked extracts (数据提取) and what the extract pages show about them.

:func:`run_builds` builds the extracts of one, several or all institutions with the classes of
the data catalog (:func:`admin_api.data_catalog.extract_classes`, unconfirmed columns at level 4)
and the newest approved masking policy. It never approves a policy: without an approved policy
every build fails with ``POLICY_NOT_APPROVED``. Each institution's outcome becomes one audit event
``extracts.build`` on ``extract:<code>``, committed at once. A published or unchanged build is
``success`` with the build id, policy, token key, tables and manifest SM3. Any other outcome is
``failed`` with the error code and Chinese message (missing token key, a policy that does not
verify, an unwritable extract folder, ...). A build refused for k-anonymity
(``EXTRACT_K_ANONYMITY_BELOW``) also stores k and the figures of the tables below k under
``k_anonymity``. A failure that concerns no single institution (no data in the warehouse) is
audited on ``extract:*``.

Callers are the API and console (:mod:`admin_api.routes.extracts`), the operator command
``python -m admin_api.manage extracts-build`` that ``regsandbox init`` runs, and the rebuild after
a class change (:mod:`admin_api.extract_rebuilds`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from admin_api.audit import source_ip
from admin_api.data_catalog import extract_classes
from admin_api.errors import not_found
from admin_api.extract_manifests import manifest_summary, published_manifest
from admin_api.models import AuditEvent, Institution
from admin_api.security import Principal
from catalog.classes import ColumnClass
from extracts.builder import WORK_DIR_PREFIX, ExtractOutcome, WarehouseMissingError, build_institution, warehouse_codes
from extracts.features import CrossInstitutionFeatures
from extracts.kanon import KAnonymityBelowError, KOverride, KOverrideInvalid
from extracts.policy import MaskingPolicy, PolicyNotApproved, load_approved_policy
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

BUILD_ACTION = "extracts.build"
OVERRIDE_ACTION = "extracts.override_k"
K_BELOW_CODE = "EXTRACT_K_ANONYMITY_BELOW"
ALL_RESOURCE = "extract:*"
HISTORY_LIMIT = 50
STATUS_NAMES = {"published": "已发布新版本", "unchanged": "数据未变化", "failed": "失败"}
TRIGGER_NAMES = {"manual": "人工触发", "init": "平台初始化", "catalog_change": "分级分类变更", "operator": "运维命令",
                 "submission_accepted": "报送数据审核通过",
                 "k_override": "安全管理员强制发布"}


@dataclass(frozen=True)
class BuildActor:
    """The requester of a build, as its audit events name them."""

    username: str
    role: str
    institution_code: str | None = None
    request_id: str | None = None
    source_ip: str | None = None

    @classmethod
    def of_request(cls, request: Request, principal: Principal) -> BuildActor:
        return cls(principal.username, principal.role, principal.institution_code,
                   getattr(request.state, "request_id", None), source_ip(request))


@dataclass(frozen=True)
class BuildResult:
    """One institution's build: ``outcome`` when it was published or unchanged, ``error`` when it failed."""

    institution: str
    outcome: ExtractOutcome | None = None
    error: RegsandboxError | None = None

    @property
    def status(self) -> str:
        return self.outcome.status if self.outcome is not None else "failed"

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"institution": self.institution, "status": self.status,
                                  "status_name": STATUS_NAMES[self.status]}
        if self.outcome is not None:
            result["build_id"] = self.outcome.build_id
            result["tables"] = [{"name": table.name, "rows": table.rows, "rebuilt": table.rebuilt}
                                for table in self.outcome.tables]
        if self.error is not None:
            result["code"], result["message"] = self.error.code, self.error.message
            if isinstance(self.error, KAnonymityBelowError):
                result["k_anonymity"] = self.error.k_anonymity
        return result


class ExtractBuildError(RegsandboxError):
    """A build that raised something other than a RegsandboxError, e.g. a DuckDB error on a damaged file."""

    status = 500


def catalog_classes(session: Session) -> dict[tuple[str, str], ColumnClass]:
    """Return the class masking applies to every catalog column (unconfirmed columns at level 4 at least)."""
    return {(entry["table"], entry["column"]): ColumnClass(entry["level"], entry["pi_category"], entry["kind"])
            for entry in extract_classes(session)}


def _store_event(session_factory: sessionmaker[Session], actor: BuildActor, resource: str, outcome: str,
                 detail: dict[str, Any], action: str = BUILD_ACTION) -> None:
    session = session_factory()
    try:
        session.add(AuditEvent(
            request_id=actor.request_id, actor=actor.username[:64], role=actor.role,
            institution_code=actor.institution_code, source_ip=actor.source_ip, action=action,
            resource=resource, outcome=outcome, detail=json.dumps(detail, ensure_ascii=False, sort_keys=True),
        ))
        session.commit()
    finally:
        session.close()


def _audit(session_factory: sessionmaker[Session], actor: BuildActor, result: BuildResult,
           context: dict[str, Any]) -> None:
    if result.outcome is not None:
        _store_event(session_factory, actor, f"extract:{result.institution}", "success",
                     {**context, **result.outcome.audit_detail()})
        return
    assert result.error is not None
    detail = {**context, "institution": result.institution, "code": result.error.code,
              "message": result.error.message}
    if isinstance(result.error, KAnonymityBelowError):
        detail["k_anonymity"] = result.error.k_anonymity
    _store_event(session_factory, actor, f"extract:{result.institution}", "failed", detail)


def _unix_group(prefix: str | None, code: str) -> str | None:
    """Return the Unix group of an institution's extract: only as root, because only root can hand it over."""
    if prefix is None or os.geteuid() != 0:
        return None
    return f"{prefix}{code}"


def _build_one(settings: Settings, keystore: KeyStore, code: str, classes: dict, policy: MaskingPolicy,
               unix_group_prefix: str | None, features: CrossInstitutionFeatures,
               k_override: KOverride | None) -> BuildResult:
    try:
        outcome = build_institution(settings, code, classes=classes, policy=policy, keystore=keystore,
                                    unix_group=_unix_group(unix_group_prefix, code), features=features,
                                    k_override=k_override, policy_verified=True)
    except RegsandboxError as error:
        logger.warning("extract of %s not built: %s", code, error.code)
        return BuildResult(code, error=error)
    except Exception:  # noqa: BLE001 - one institution's unexpected failure must not stop the others
        logger.exception("extract of %s failed unexpectedly", code)
        return BuildResult(code, error=ExtractBuildError(
            "EXTRACT_BUILD_ERROR",
            f"生成机构 {code} 的数据提取时发生内部错误，未发布新的数据提取，原有提取保持不变。请查看 admin_api 日志后重试。"))
    return BuildResult(code, outcome=outcome)


def _policy_error(error: RegsandboxError) -> RegsandboxError:
    """Return the error of a missing approved policy with the admin_api ways to approve one."""
    if error.code != "POLICY_NOT_APPROVED":
        return error
    return PolicyNotApproved(
        "POLICY_NOT_APPROVED",
        "尚无已审批的脱敏策略，未生成数据提取，原有提取保持不变。请在控制台“脱敏策略”页面上传策略并由另一名安全管理员审批，"
        "或由运维人员运行 `python -m admin_api.manage policy-approve-default` 审批平台默认策略。")


def run_builds(
    session_factory: sessionmaker[Session],
    settings: Settings,
    keystore: KeyStore,
    actor: BuildActor,
    institutions: list[str] | None = None,
    *,
    trigger: str = "manual",
    reason: str | None = None,
    unix_group_prefix: str | None = None,
    on_result: Callable[[BuildResult], None] | None = None,
    k_override: KOverride | None = None,
) -> list[BuildResult]:
    """Build the extracts of ``institutions`` (default: every institution in the warehouse), one at a time.

    Every outcome is audited as described in the module docstring before the next build starts,
    and passed to ``on_result``. ``trigger`` (a key of :data:`TRIGGER_NAMES`) and ``reason`` go
    into the audit detail. ``k_override`` publishes builds below k; the caller must have checked
    that its actor has ``extracts.override_k`` (see :func:`override_k`). Returns the results in
    build order.
    """
    context: dict[str, Any] = {"trigger": trigger, **({"reason": reason} if reason else {})}
    with session_factory() as session:
        classes = catalog_classes(session)
    codes = list(institutions) if institutions is not None else warehouse_codes(settings)
    if not codes:
        error = WarehouseMissingError(
            "WAREHOUSE_EMPTY",
            f"数据仓库 {settings.warehouse_dir} 中没有数据，没有可生成的数据提取。请先审核通过报送数据，或导入演示数据。")
        _store_event(session_factory, actor, ALL_RESOURCE, "failed",
                     {**context, "code": error.code, "message": error.message})
        raise error

    # The approved policy is loaded, and its signature verified, once per run. The builds below do
    # not verify it again, and a failure here fails every build.
    try:
        policy = load_approved_policy(settings, keystore)
    except RegsandboxError as error:
        logger.warning("no extract built, the masking policy is unusable: %s", error.code)
        policy, policy_error = None, _policy_error(error)
    else:
        policy_error = None

    results = []
    # The cross-institution features are computed at most once for all the institutions of the run.
    with CrossInstitutionFeatures(settings, keystore, work_dir_prefix=WORK_DIR_PREFIX) as features:
        for code in codes:
            if policy is None:
                assert policy_error is not None
                result = BuildResult(code, error=policy_error)
            else:
                result = _build_one(settings, keystore, code, classes, policy, unix_group_prefix, features, k_override)
            _audit(session_factory, actor, result, context)
            if on_result is not None:
                on_result(result)
            results.append(result)
    return results


def _tables_below_k(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the figures of the tables below k in a manifest's ``k_anonymity`` section."""
    return [{key: table.get(key) for key in ("table", "quasi_identifiers", "rows", "min_class_size",
                                             "classes_below_k", "records_below_k", "share_below_k")}
            for table in section.get("tables", []) if table.get("classes_below_k")]


def override_k(
    session_factory: sessionmaker[Session],
    settings: Settings,
    keystore: KeyStore,
    actor: BuildActor,
    institution_code: str,
    reason: str,
    *,
    unix_group_prefix: str | None = None,
) -> tuple[BuildResult, dict[str, Any]]:
    """Build one institution's extract with a k-anonymity override by ``actor`` and audit the decision.

    The caller must have checked that ``actor`` has ``extracts.override_k``. A missing or too
    long ``reason`` raises KOverrideInvalid (400) before anything is built, audited ``failed``.
    The build is audited by :func:`run_builds` as ``extracts.build`` with trigger ``k_override``.
    Then one ``extracts.override_k`` event on ``extract:<code>`` records the reason, k, the tables
    below k with their figures, the build id and ``override_applied``. It is ``failed`` with the
    error code when the build failed. When the build meets k, the override is not needed: the
    build is published or unchanged like any rebuild, its manifest records no override, and
    ``override_applied`` is false. Returns the build result and the detail of that event.
    """
    resource = f"extract:{institution_code}"
    try:
        override = KOverride(actor.username, reason)
    except KOverrideInvalid as error:
        _store_event(session_factory, actor, resource, "failed",
                     {"institution": institution_code, "code": error.code, "message": error.message},
                     action=OVERRIDE_ACTION)
        raise

    result = run_builds(session_factory, settings, keystore, actor, [institution_code], trigger="k_override",
                        reason=override.reason, unix_group_prefix=unix_group_prefix, k_override=override)[0]

    detail: dict[str, Any] = {"institution": institution_code, "reason": override.reason, "status": result.status}
    if result.outcome is None:
        assert result.error is not None
        detail.update(code=result.error.code, message=result.error.message, override_applied=False)
        _store_event(session_factory, actor, resource, "failed", detail, action=OVERRIDE_ACTION)
        return result, detail
    section = result.outcome.k_anonymity
    # An unchanged build keeps the published one, whose manifest may record an earlier override.
    applied = result.outcome.status == "published" and section.get("override") is not None
    detail.update(build_id=result.outcome.build_id, k=section.get("k"), override_applied=applied,
                  tables_below_k=_tables_below_k(section) if applied else [])
    _store_event(session_factory, actor, resource, "success", detail, action=OVERRIDE_ACTION)
    logger.info("k-anonymity override of %s by %s: build %s, %s, applied %s", institution_code, actor.username,
                result.outcome.build_id, result.outcome.status, applied)
    return result, detail


# --- what the pages show ----------------------------------------------------------------------------


def institution_codes(session: Session, settings: Settings) -> list[str]:
    """Return the institutions that have warehouse data or a published extract, registered or not."""
    codes = set(warehouse_codes(settings))
    if settings.extracts_dir.is_dir():
        codes.update(path.name for path in settings.extracts_dir.iterdir() if path.is_symlink())
    codes.update(session.scalars(select(Institution.code)))
    return sorted(codes)


def visible_codes(session: Session, settings: Settings, caller: Principal) -> list[str]:
    """Return the institutions whose extract metadata ``caller`` may read: their own, or all for regulator-side roles."""
    if caller.institution_code is not None:
        return [caller.institution_code]
    return institution_codes(session, settings)


def check_known(session: Session, settings: Settings, institution_code: str) -> None:
    """Raise 404 unless ``institution_code`` is registered or has warehouse data or an extract."""
    if institution_code in institution_codes(session, settings):
        return
    raise not_found("EXTRACT_INSTITUTION_NOT_FOUND",
                    f"机构 {institution_code[:32]} 不存在，也没有数据仓库数据或数据提取。请检查机构代码。")


def published(settings: Settings, keystore: KeyStore, institution_code: str) -> dict[str, Any]:
    """Return the summary of the published build of one institution (``status`` ``none`` when nothing is published)."""
    manifest = published_manifest(settings, keystore, institution_code)
    if manifest is None:
        return {"status": "none", "status_name": "尚未生成", "error": None}
    return manifest_summary(manifest)


def build_history(session: Session, institution_code: str | None, limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
    """Return the newest ``extracts.build`` audit events of one institution (with the ``extract:*`` ones), or of all."""
    # Denied requests are audited under the same action with the request path as resource; they are not builds.
    query = select(AuditEvent).where(AuditEvent.action == BUILD_ACTION, AuditEvent.resource.like("extract:%"))
    if institution_code is not None:
        query = query.where(or_(AuditEvent.resource == f"extract:{institution_code}",
                                AuditEvent.resource == ALL_RESOURCE))
    events = session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)).all()
    history = []
    for event in events:
        detail = json.loads(event.detail) if event.detail else {}
        status = detail.get("status", "failed") if event.outcome == "success" else "failed"
        history.append({
            "at": event.occurred_at, "actor": event.actor, "role": event.role, "outcome": event.outcome,
            "institution": event.resource.removeprefix("extract:"), "status": status,
            "status_name": STATUS_NAMES.get(status, status),
            "trigger": detail.get("trigger"), "trigger_name": TRIGGER_NAMES.get(detail.get("trigger"), detail.get("trigger")),
            "reason": detail.get("reason"), "build_id": detail.get("build_id"),
            "policy_version": (detail.get("policy") or {}).get("version"), "token_key": detail.get("token_key"),
            "manifest_sm3": detail.get("manifest_sm3"), "code": detail.get("code"), "message": detail.get("message"),
            "k_anonymity": detail.get("k_anonymity"),
        })
    return history


def k_refusal(history: list[dict[str, Any]], institution_code: str) -> dict[str, Any] | None:
    """Return the newest build of ``institution_code`` in ``history`` when it was refused for k-anonymity, else None."""
    own = [item for item in history if item["institution"] == institution_code]
    if own and own[0]["code"] == K_BELOW_CODE:
        return own[0]
    return None
