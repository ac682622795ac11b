"""Operations shared by the API routes and the console.

They cover sign-in, model review, report notebook approval, schedules and report runs.

Each function checks its input, writes its change together with the audit event in one
transaction, and raises :class:`~admin_api.errors.ApiError` with a Chinese message when it cannot.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from admin_api.audit import add_event, record_event
from admin_api import passwords, totp
from admin_api.cron import parse_cron
from admin_api.db import utc_now
from admin_api.errors import ApiError, conflict, forbidden, invalid, not_found, unauthenticated
from admin_api.keyaccess import request_keystore
from admin_api.messages import post_message
from admin_api.models import AuditEvent, Institution, ModelReview, ReportNotebook, ReportRun, Schedule, User
from admin_api.registry import REVIEW_TAG_PREFIX, ModelRegistry, call_registry
from admin_api.roles import is_cross_institution
from admin_api.security import Principal, hash_password, password_needs_rehash, verify_password
from admin_api.signatures import (
    KIND_APPROVAL,
    KIND_REVIEW,
    SigningFailed,
    approval_payload,
    check_signing_key,
    review_payload,
    review_signature,
    sign_decision,
)
from regsandbox_core.signing import TrustedKeys
from regsandbox_core.crypto import sm3_file

logger = logging.getLogger(__name__)

UNASSIGNED_INSTITUTION = "未归属"
DECISIONS = {"approved": "通过", "returned": "退回"}
STATUS_LABELS = {"approved": "已通过", "returned": "已退回"}
REVIEW_STATUS_NAMES = {"pending": "待审查", **STATUS_LABELS}


# --- sign-in -----------------------------------------------------------------------------------


def user_principal(user: User) -> Principal:
    return Principal(kind="user", username=user.username, role=user.role, institution_code=user.institution_code)


SIGN_IN_ACTIONS = ("auth.token", "auth.verify", "console.login")
SIGN_IN_WINDOW = timedelta(minutes=15)
MAX_FAILED_SIGN_INS = 10
"""Failed sign-ins of one unknown user name within SIGN_IN_WINDOW after which further attempts get 429."""


def _recent_failures(session: Session, username: str) -> int:
    since = utc_now() - SIGN_IN_WINDOW
    query = select(func.count()).select_from(AuditEvent).where(
        AuditEvent.actor == username,
        AuditEvent.action.in_(SIGN_IN_ACTIONS),
        AuditEvent.outcome == "failed",
        AuditEvent.occurred_at >= since,
    )
    return session.scalar(query) or 0


def _release_connection(session: Session) -> None:
    """End the session's read-only transaction, so its pooled connection is free during the argon2id check.

    One check takes about 0.25 s of CPU (argon2-cffi defaults: 3 passes over 64 MiB, 4 lanes). Holding
    the connection meanwhile let a burst of sign-ins take every connection of the pool, and then every
    other request waited for one until the pool timeout (30 s). A session with pending changes is left
    alone, because a commit would store them early. Loaded objects stay usable: sessions do not expire
    them on commit (admin_api.db).
    """
    if not (session.new or session.dirty or session.deleted):
        session.commit()


def authenticate(
    session: Session, request: Request, username: str, password: str, *, action: str, ip: str | None = None,
    totp_code: str | None = None, purpose: str = "sign_in",
) -> User:
    """Check a user name and password; audit the outcome and return the user on success.

    The password is checked before the active flag, so only a caller with the right password
    learns that an account is disabled. An existing user is locked after ``sign_in_max_failures``
    consecutive wrong passwords (429 ACCOUNT_LOCKED, see admin_api.passwords). For an unknown user
    name, after MAX_FAILED_SIGN_INS failures within SIGN_IN_WINDOW (counted in the audit log) every
    attempt gets 429 TOO_MANY_ATTEMPTS until the window has passed.

    ``purpose`` is ``sign_in``, ``password`` (the change-password endpoints) or ``totp_enrol``. A user
    with a confirmed TOTP secret also needs ``totp_code``, except to enrol; a wrong code counts as a
    failed sign-in. For ``sign_in``, a user whose role requires TOTP but who has not enrolled gets
    403 TOTP_ENROLMENT_REQUIRED. An expired or administrator-issued password gets 403 unless the
    purpose is ``password``. The caller commits the success event.
    """
    settings = request.app.state.settings
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None and _recent_failures(session, username[:64]) >= MAX_FAILED_SIGN_INS:
        actor = Principal(kind="user", username=username[:64], role="unknown")
        record_event(request, actor, action, f"user:{username[:64]}", "denied", {"code": "TOO_MANY_ATTEMPTS"}, ip)
        raise ApiError(
            "TOO_MANY_ATTEMPTS",
            f"用户 {username[:64]} 在 {int(SIGN_IN_WINDOW.total_seconds() // 60)} 分钟内登录失败次数过多，"
            "请稍后再试；如忘记密码，请联系系统管理员。",
            status=429,
        )
    locked = passwords.locked_error(user, settings) if user is not None else None
    if user is not None and locked is not None:
        record_event(request, user_principal(user), action, f"user:{username}", "denied", {"code": locked.code}, ip)
        raise locked
    _release_connection(session)
    if user is None or not verify_password(user.password_hash, password):
        actor = Principal(kind="user", username=username[:64] or "(空)", role=user.role if user else "unknown",
                          institution_code=user.institution_code if user else None)
        detail = {"code": "INVALID_CREDENTIALS"}
        if user is not None and passwords.record_failure(session, user, settings):
            detail["locked_until"] = user.locked_until.isoformat()
        record_event(request, actor, action, f"user:{username[:64]}", "failed", detail, ip)
        raise unauthenticated("INVALID_CREDENTIALS", "用户名或密码错误。")
    if not user.is_active:
        record_event(request, user_principal(user), action, f"user:{username}", "denied", {"code": "USER_DISABLED"}, ip)
        raise forbidden("USER_DISABLED", f"用户 {username} 已被停用，请联系系统管理员。")
    if password_needs_rehash(user.password_hash):
        # stored with another argon2id cost than REGSANDBOX_PASSWORD_HASH_*: store it with the current one
        user.password_hash = hash_password(password)
    if totp.is_enrolled(user) and purpose != "totp_enrol":
        try:
            totp.check_code(session, request, user, totp_code)
        except ApiError as error:
            session.rollback()
            if error.code == "TOTP_INVALID":
                passwords.record_failure(session, user, settings)
            record_event(request, user_principal(user), action, f"user:{username}", "failed", {"code": error.code}, ip)
            raise
    passwords.reset_failures(user)
    refusal = passwords.change_required(user, settings) if purpose != "password" else None
    if refusal is None and purpose == "sign_in" and not totp.is_enrolled(user) and totp.is_required(user, request):
        refusal = totp.enrolment_required_error(user)
    if refusal is not None:
        add_event(session, request, user_principal(user), action, f"user:{username}", "denied", {"code": refusal.code}, ip)
        session.commit()
        raise refusal
    add_event(session, request, user_principal(user), action, f"user:{username}", "success", None, ip)
    return user


# --- model review ------------------------------------------------------------------------------


def _pick_metric(metrics: dict[str, Any], name: str) -> float | None:
    """Return the metric called ``name`` (any case), else the first one ending with ``_name``."""
    lowered = {str(key).lower(): value for key, value in metrics.items()}
    if name in lowered:
        return lowered[name]
    for key in sorted(lowered):
        if key.endswith(f"_{name}"):
            return lowered[key]
    return None


def _version_key(item: dict[str, Any]) -> tuple[str, str, int, str]:
    version = str(item["version"])
    return (item["institution_code"] or "~", item["name"], int(version) if version.isdigit() else 0, version)


def institution_names(session: Session) -> dict[str, str]:
    return {code: name for code, name in session.execute(select(Institution.code, Institution.name))}


def model_institution(name: str, known: dict[str, str]) -> str | None:
    """Return the institution code of a registered model: its name before the first '.', if known."""
    prefix, dot, _ = name.partition(".")
    return prefix if dot and prefix in known else None


def latest_reviews(session: Session) -> dict[tuple[str, str], ModelReview]:
    latest: dict[tuple[str, str], ModelReview] = {}
    for review in session.scalars(select(ModelReview).order_by(ModelReview.id)):
        latest[(review.model_name, review.model_version)] = review
    return latest




def visible_models(items: list[dict[str, Any]], principal: Principal) -> list[dict[str, Any]]:
    """Keep the model versions ``principal`` may read.

    Regulators and platform services read all of them. Any other caller reads only the versions
    of its own institution; 未归属 versions and a caller without an institution get nothing.
    """
    if is_cross_institution(principal):
        return items
    own = principal.institution_code
    return [item for item in items if own is not None and item["institution_code"] == own]


def list_models(session: Session, registry: ModelRegistry, trusted: TrustedKeys | None = None) -> list[dict[str, Any]]:
    """Return every registered model version with its institution, AUC/KS and review status.

    With ``trusted`` public keys, a version with a stored review also gets ``review_id`` and the
    ``signature`` summary ``{key, signed_at, valid}`` of that review (None when it is unsigned).
    """
    versions = call_registry(registry.list_model_versions)
    known = institution_names(session)
    reviews = latest_reviews(session)
    items = []
    for version in versions:
        name, number = str(version["name"]), str(version["version"])
        tags = {str(k): str(v) for k, v in (version.get("tags") or {}).items()}
        metrics = dict(version.get("metrics") or {})
        code = model_institution(name, known)
        review = reviews.get((name, number))
        status = review.decision if review else tags.get(f"{REVIEW_TAG_PREFIX}status", "pending")
        items.append({
            "name": name,
            "version": number,
            "run_id": version.get("run_id"),
            "creation_timestamp": version.get("creation_timestamp"),
            "institution_code": code,
            "institution_name": known[code] if code else UNASSIGNED_INSTITUTION,
            "metrics": metrics,
            "auc": _pick_metric(metrics, "auc"),
            "ks": _pick_metric(metrics, "ks"),
            "tags": tags,
            "review_status": status if status in REVIEW_STATUS_NAMES else "pending",
            "review_comment": review.comment if review else tags.get(f"{REVIEW_TAG_PREFIX}comment"),
            "reviewer": review.reviewer if review else tags.get(f"{REVIEW_TAG_PREFIX}reviewer"),
            "decided_at": review.decided_at.isoformat() if review else tags.get(f"{REVIEW_TAG_PREFIX}decided_at"),
            "review_id": review.id if review else None,
            "signature": review_signature(review, trusted) if review and trusted is not None else None,
        })
    return sorted(items, key=_version_key)


def review_model(
    session: Session,
    request: Request,
    principal: Principal,
    registry: ModelRegistry,
    name: str,
    version: str,
    decision: str,
    comment: str,
) -> ModelReview:
    """Tag a model version in MLflow with a review decision, then store, sign and audit it in one commit.

    MLflow is tagged first and no database transaction is open meanwhile, so a slow MLflow does
    not hold a SQLite write lock, and when MLflow is unreachable nothing is stored. The platform
    signing key is checked before MLflow is tagged. When signing fails, nothing is stored, the
    failure is audited and SIGNING_FAILED (503) is raised.
    """
    comment = comment.strip()
    if decision not in DECISIONS:
        raise invalid("INVALID_DECISION", f"审查结论 {decision!r} 无效，只能是 approved（通过）或 returned（退回）。")
    if decision == "returned" and not comment:
        raise invalid("COMMENT_REQUIRED", "退回模型版本时必须填写审查意见，说明需要修改的内容。")
    if len(comment) > 2000:
        raise invalid("COMMENT_TOO_LONG", f"审查意见共 {len(comment)} 字，超过上限 2000 字，请精简后重试。")

    versions = call_registry(registry.list_model_versions)
    if not any(str(item["name"]) == name and str(item["version"]) == version for item in versions):
        raise not_found("MODEL_VERSION_NOT_FOUND", f"模型注册中心中没有模型 {name} 的版本 {version}，请刷新列表后重试。")
    code = model_institution(name, institution_names(session))
    session.rollback()  # ends the read transaction before the MLflow calls
    if code is None and decision == "approved":
        raise conflict(
            "MODEL_UNASSIGNED",
            f"模型 {name} 的名称前缀不是已登记的机构代码（{UNASSIGNED_INSTITUTION}），不能审查通过；"
            "请让建模人员按 “<机构代码>.<模型名>” 重新注册。",
        )

    keystore = request_keystore(request)
    subject = f"模型 {name} 版本 {version} 的审查结论"
    try:
        check_signing_key(keystore, subject)
    except SigningFailed as error:
        _audit_signing_failure(request, principal, "models.review", f"model:{name}/{version}", error)
        raise

    decided_at = utc_now()
    call_registry(registry.set_model_version_tags, name, version, {
        f"{REVIEW_TAG_PREFIX}status": decision,
        f"{REVIEW_TAG_PREFIX}comment": comment,
        f"{REVIEW_TAG_PREFIX}reviewer": principal.username,
        f"{REVIEW_TAG_PREFIX}decided_at": decided_at.isoformat(),
    })

    review = ModelReview(model_name=name, model_version=version, institution_code=code, decision=decision,
                         comment=comment, reviewer=principal.username, decided_at=decided_at)
    session.add(review)
    session.flush()
    try:
        review.signature = sign_decision(keystore, KIND_REVIEW, review_payload(review), subject)
    except SigningFailed as error:
        session.rollback()
        logger.error("review of model %s version %s is tagged in MLflow but not stored: signing failed", name, version)
        _audit_signing_failure(request, principal, "models.review", f"model:{name}/{version}", error)
        raise
    if code is not None:  # the modellers of the model's institution learn the decision in 系统消息
        post_message(
            session, category="model_review", role="modeller", institution=code,
            title=f"模型审查结论：{name} 版本 {version} {REVIEW_STATUS_NAMES.get(decision, decision)}",
            body=f"审查结论：{REVIEW_STATUS_NAMES.get(decision, decision)}\n审查人：{principal.username}\n"
                 f"审查意见：{comment or '（无）'}",
            link="/console/models",
        )
    add_event(session, request, principal, "models.review", f"model:{name}/{version}", "success",
              {"decision": decision, "institution_code": code, "comment": comment, "review_id": review.id})
    try:
        session.commit()
    except Exception:
        logger.error("review of model %s version %s is tagged in MLflow but could not be stored", name, version)
        raise
    return review


def _audit_signing_failure(
    request: Request, principal: Principal, action: str, resource: str, error: SigningFailed
) -> None:
    """Store the failed decision in the audit log and mark ``error``, so the console does not store it twice."""
    record_event(request, principal, action, resource, "failed", {"code": error.code})
    error.audited = True


# --- report notebooks, schedules and runs ------------------------------------------------------

_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
MAX_RECIPIENTS = 50


def validate_recipients(recipients: list[str]) -> list[str]:
    """Return the recipients stripped and without duplicates, or raise 422 INVALID_RECIPIENT."""
    cleaned: list[str] = []
    for recipient in recipients:
        address = recipient.strip()
        if len(address) > 254 or not _EMAIL.match(address):
            raise invalid("INVALID_RECIPIENT", f"收件人 {recipient!r} 不是有效的电子邮件地址，请改为如 name@example.cn 的格式。")
        if address.lower() not in (item.lower() for item in cleaned):
            cleaned.append(address)
    if not cleaned:
        raise invalid("INVALID_RECIPIENT", "收件人列表为空，请至少填写一个电子邮件地址。")
    if len(cleaned) > MAX_RECIPIENTS:
        raise invalid("INVALID_RECIPIENT", f"收件人共 {len(cleaned)} 个，超过上限 {MAX_RECIPIENTS} 个。")
    return cleaned


def notebook_file(project_root: Path, notebook: ReportNotebook) -> Path:
    """Return the absolute path of a registered notebook; it must stay inside the project root."""
    path = (project_root / notebook.path).resolve()
    if not path.is_relative_to(project_root.resolve()):
        raise conflict("NOTEBOOK_PATH_INVALID", f"报告笔记本 {notebook.name} 的路径 {notebook.path} 不在项目目录内，已拒绝。")
    return path


def require_approved(notebook: ReportNotebook) -> None:
    if notebook.status != "approved" or not notebook.sm3_digest:
        raise conflict(
            "NOTEBOOK_NOT_APPROVED",
            f"报告笔记本 {notebook.name}（编号 {notebook.id}）尚未审批通过，请先由监管审查员审批后再调度。",
        )


def get_schedule(session: Session, schedule_id: int) -> Schedule:
    schedule = session.get(Schedule, schedule_id)
    if schedule is None:
        raise not_found("SCHEDULE_NOT_FOUND", f"报告调度 {schedule_id} 不存在。")
    return schedule


def queue_run(session: Session, request: Request, principal: Principal, schedule_id: int, trigger: str) -> ReportRun:
    """Queue a run of a schedule (manual runs also for disabled schedules), audit it and commit."""
    schedule = get_schedule(session, schedule_id)
    require_approved(schedule.notebook)
    if trigger == "cron" and not schedule.enabled:
        raise conflict("SCHEDULE_DISABLED", f"报告调度 {schedule.name} 已停用，不能按计划触发运行；如需运行请手动触发。")
    run = ReportRun(schedule_id=schedule.id, trigger=trigger, status="queued", requested_by=principal.username)
    session.add(run)
    session.flush()
    add_event(session, request, principal, "runs.queue", f"report_run:{run.id}", "success",
              {"schedule_id": schedule.id, "trigger": trigger})
    session.commit()
    return run


def claim_run(session: Session, request: Request, principal: Principal, run_id: int) -> ReportRun:
    """Take a queued run with one conditional UPDATE, so of two concurrent claims exactly one wins."""
    if session.get(ReportRun, run_id) is None:
        raise not_found("RUN_NOT_FOUND", f"报告运行 {run_id} 不存在。")
    session.rollback()

    result = session.execute(
        update(ReportRun)
        .where(ReportRun.id == run_id, ReportRun.status == "queued")
        .values(status="running", claimed_by=principal.username, claimed_at=datetime.now(UTC))
    )
    if result.rowcount != 1:
        session.rollback()
        raise conflict("RUN_ALREADY_CLAIMED", f"报告运行 {run_id} 已被领取或已结束，不能再次领取。")
    add_event(session, request, principal, "runs.claim", f"report_run:{run_id}")
    session.commit()
    run = session.get(ReportRun, run_id, populate_existing=True)
    assert run is not None
    return run


def get_notebook(session: Session, notebook_id: int) -> ReportNotebook:
    notebook = session.get(ReportNotebook, notebook_id)
    if notebook is None:
        raise not_found("NOTEBOOK_NOT_FOUND", f"报告笔记本 {notebook_id} 不存在。")
    return notebook


def approve_notebook(
    session: Session, request: Request, principal: Principal, project_root: Path, notebook_id: int
) -> ReportNotebook:
    """Approve a report notebook file as it is now: record its SM3 digest, sign the approval, audit and commit.

    When signing fails, nothing is stored, the failure is audited and SIGNING_FAILED (503) is raised.
    """
    notebook = get_notebook(session, notebook_id)
    path = notebook_file(project_root, notebook)
    try:
        digest = sm3_file(path)
    except OSError as error:
        raise not_found(
            "NOTEBOOK_FILE_NOT_FOUND", f"报告笔记本文件 {notebook.path} 无法读取（{type(error).__name__}），请确认文件存在。"
        ) from error
    notebook.status, notebook.sm3_digest = "approved", digest
    notebook.approved_by, notebook.approved_at = principal.username, utc_now()
    try:
        notebook.signature = sign_decision(request_keystore(request), KIND_APPROVAL, approval_payload(notebook),
                                           f"报告笔记本 {notebook.name} 的审批")
    except SigningFailed as error:
        session.rollback()
        _audit_signing_failure(request, principal, "notebooks.approve", f"report_notebook:{notebook_id}", error)
        raise
    # system administrators create the schedules, so they learn that the notebook may now be scheduled
    post_message(
        session, category="notebook_approval", role="system_admin",
        title=f"报告笔记本已审批：{notebook.name}",
        body=f"报告笔记本 {notebook.name}（编号 {notebook.id}，{notebook.path}）已由 {principal.username} 审批通过，"
             "现在可以为它新建或启用报告调度。",
        link="/console/schedules",
    )
    add_event(session, request, principal, "notebooks.approve", f"report_notebook:{notebook.id}", "success",
              {"path": notebook.path, "sm3": digest})
    session.commit()
    return notebook


MAX_SCHEDULE_NAME = 100


def create_schedule(
    session: Session,
    request: Request,
    principal: Principal,
    *,
    name: str,
    notebook_id: int,
    cron: str,
    recipients: list[str],
    enabled: bool,
) -> Schedule:
    """Create a schedule, audit it and commit.

    An enabled schedule needs an approved notebook; a disabled one may wait for the approval.
    Raises 422 for a bad name, cron expression or recipient, 404 for an unknown notebook and
    409 for an unapproved notebook or a name in use.
    """
    name = name.strip()
    if not name:
        raise invalid("INVALID_NAME", "调度名称不能为空，请填写一个便于识别的名称，如“季度风险监测报告”。")
    if len(name) > MAX_SCHEDULE_NAME:
        raise invalid("INVALID_NAME", f"调度名称共 {len(name)} 个字符，超过上限 {MAX_SCHEDULE_NAME} 个，请缩短。")
    cron, _trigger = parse_cron(cron)
    recipients = validate_recipients(recipients)
    notebook = get_notebook(session, notebook_id)
    if enabled:
        require_approved(notebook)
    if session.scalars(select(Schedule).where(Schedule.name == name)).first() is not None:
        raise conflict("SCHEDULE_EXISTS", f"调度名称 {name} 已被使用，请换一个名称。")

    schedule = Schedule(name=name, notebook_id=notebook.id, cron=cron, recipients=recipients,
                        enabled=enabled, created_by=principal.username)
    session.add(schedule)
    try:
        session.flush()
    except IntegrityError as error:
        session.rollback()
        raise conflict("SCHEDULE_EXISTS", f"调度名称 {name} 已被使用，请换一个名称。") from error
    add_event(session, request, principal, "schedules.create", f"schedule:{schedule.id}", "success",
              {"name": name, "notebook_id": notebook.id, "cron": cron, "enabled": enabled})
    session.commit()
    return schedule


def update_schedule(
    session: Session,
    request: Request,
    principal: Principal,
    schedule_id: int,
    *,
    cron: str | None = None,
    recipients: list[str] | None = None,
    enabled: bool | None = None,
) -> Schedule:
    """Change the given fields of a schedule (None leaves a field as it is), audit and commit.

    Enabling needs an approved notebook (409 NOTEBOOK_NOT_APPROVED).
    """
    schedule = get_schedule(session, schedule_id)
    changes: dict[str, object] = {}
    if cron is not None:
        schedule.cron, _trigger = parse_cron(cron)
        changes["cron"] = schedule.cron
    if recipients is not None:
        schedule.recipients = validate_recipients(recipients)
        changes["recipients"] = len(schedule.recipients)
    if enabled is not None:
        if enabled:
            require_approved(schedule.notebook)
        schedule.enabled = enabled
        changes["enabled"] = enabled
    add_event(session, request, principal, "schedules.update", f"schedule:{schedule.id}", "success", changes)
    session.commit()
    return schedule
