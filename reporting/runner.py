"""One report run: check the approval signature and digest, execute, render, email and archive.

:func:`run_report` takes the run as admin_api's claim endpoint returns it. A failure of the run itself
is returned, not raised, as a :class:`RunResult` that the scheduler sends to
``POST /api/v1/report-runs/{id}/finish``.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import nbformat

from regsandbox_core.crypto import sm3_file
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import KeyStore
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.secrets import PlatformSecrets, load_platform_secrets
from regsandbox_core.settings import PROJECT_ROOT, Settings
from regsandbox_core.signing import SignatureInvalid, verify_object
from reporting import archive
from reporting.config import ReportSettings
from reporting.execute import ExecutionOutcome, first_cell_failure, kernel_environment, run_papermill
from reporting.mailer import MailDeliveryError, send_report, validate_recipients
from reporting.render import render_html

logger = logging.getLogger(__name__)

_TRIGGER_LABELS = {"cron": "定时触发", "manual": "手动触发"}
_UNSAFE_FILENAME = re.compile(r'[\\/:*?"<>|\x00-\x1f]+')
_MAX_ERROR_VALUE = 300
APPROVAL_SIGNATURE_INVALID = "APPROVAL_SIGNATURE_INVALID"


@dataclass(frozen=True)
class RunResult:
    """Outcome of one report run, in the fields of admin_api's finish request."""

    run_id: Any
    status: str
    """``succeeded`` or ``failed``."""
    error_code: str | None = None
    error_message: str | None = None
    """Chinese message for the console; ``None`` when the run succeeded."""
    archive_path: Path | None = None
    """Absolute folder of the archived run; ``None`` when nothing was kept."""

    def finish_payload(self) -> dict[str, Any]:
        """Return the body of the finish request, with ``archive_path`` as an absolute path."""
        return {
            "status": self.status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "archive_path": str(self.archive_path) if self.archive_path is not None else None,
        }


class RunFailure(RegsandboxError):
    """A run that stops early; ``code`` and ``message`` go to the finish request."""


@dataclass
class _Run:
    """Fields of a claimed run after validation."""

    run_id: Any
    folder_id: str
    schedule_id: str
    schedule_name: str
    trigger: str
    notebook_name: str
    notebook_path: Path
    digest: str
    recipients: list[str]
    notebook: dict[str, Any]
    approval_signature: Any = None
    """Envelope of the notebook approval signature from the claim response (``approval_signature``)."""


def _notebook_fields(run: dict[str, Any]) -> dict[str, Any]:
    """Return ``{id, name, path, digest}`` from a nested ``notebook`` object or the flat claim fields.

    admin_api's claim response is flat (``notebook_path``, ``notebook_name``, ``approved_sm3``).
    """
    if isinstance(run.get("notebook"), dict):
        return run["notebook"]
    return {
        "id": run.get("notebook_id"),
        "name": run.get("notebook_name"),
        "path": run["notebook_path"],
        "digest": run["approved_sm3"],
    }


def _parse_run(run: dict[str, Any], project_root: Path) -> _Run:
    try:
        notebook = _notebook_fields(run)
        parsed = _Run(
            run_id=run["id"],
            folder_id=archive.safe_id(run["id"], "run id"),
            schedule_id=archive.safe_id(run["schedule_id"], "schedule id"),
            schedule_name=str(run.get("schedule_name") or run["schedule_id"]),
            trigger=str(run.get("trigger") or "manual"),
            notebook_name=str(notebook.get("name") or notebook["path"]),
            notebook_path=resolve_notebook_path(project_root, str(notebook["path"])),
            digest=str(notebook["digest"]).lower(),
            recipients=list(run.get("recipients") or []),
            notebook=notebook,
            approval_signature=run.get("approval_signature"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RunFailure(
            "RUN_INVALID", f"报表运行记录字段缺失或无效（{error}）。请检查 admin_api 返回的运行记录。"
        ) from error
    if not parsed.digest:
        raise RunFailure(
            "NOTEBOOK_NOT_APPROVED", f"报表笔记本 {parsed.notebook_name} 没有审批记录（缺少 SM3 摘要），本次未执行。请监管审查员先审批该笔记本。"
        )
    return parsed


def _check_approval_signature(settings: Settings, run: _Run, keystore: KeyStore | None) -> None:
    """Verify the SM2 signature of the notebook approval and that it approves this path and digest.

    The digest check of the copied file then compares the file with the signed digest. Raises
    RunFailure APPROVAL_SIGNATURE_INVALID for a missing, invalid or non-matching signature, and
    the key store's own code when the key store cannot be opened.
    """
    name = run.notebook_name
    rerun_hint = "本次未执行。请监管审查员在控制台重新审批该笔记本（审批会重新签名）。"
    if not isinstance(run.approval_signature, dict):
        raise RunFailure(
            APPROVAL_SIGNATURE_INVALID,
            f"报表笔记本 {name} 的审批记录没有平台签名（approval_signature 缺失），无法确认由谁审批了哪个文件。{rerun_hint}",
        )
    try:
        verified = verify_object(run.approval_signature, keystore or open_keystore(settings))
    except SignatureInvalid as error:
        raise RunFailure(APPROVAL_SIGNATURE_INVALID, f"报表笔记本 {name} 的审批{error.message} {rerun_hint}") from None
    except RegsandboxError as error:
        raise RunFailure(error.code, f"无法验证报表笔记本 {name} 的审批签名：{error.message}") from None

    payload = verified.payload
    expected = {"kind": "notebook_approval", "path": run.notebook["path"], "sm3_digest": run.digest}
    signed = {"kind": verified.kind, "path": payload.get("path"), "sm3_digest": str(payload.get("sm3_digest")).lower()}
    if run.notebook.get("id") is not None:
        expected["notebook_id"], signed["notebook_id"] = run.notebook["id"], payload.get("notebook_id")
    for field_name, value in expected.items():
        if signed[field_name] != value:
            raise RunFailure(
                APPROVAL_SIGNATURE_INVALID,
                f"报表笔记本 {name} 的审批签名与本次运行不符：签名中 {field_name} 为 {signed[field_name]!r}，"
                f"运行记录为 {value!r}。{rerun_hint}",
            )


def resolve_notebook_path(project_root: Path, relative: str) -> Path:
    """Return the notebook's absolute path, or raise RunFailure when it leaves the project or does not exist."""
    root = project_root.resolve()
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or not candidate.is_relative_to(root) or candidate.suffix != ".ipynb":
        raise RunFailure(
            "NOTEBOOK_PATH_INVALID",
            f"报表笔记本路径 {relative!r} 无效：必须是项目目录内的 .ipynb 文件相对路径，例如 notebooks/reports/model_inventory.ipynb。",
        )
    if not candidate.is_file():
        raise RunFailure(
            "NOTEBOOK_NOT_FOUND", f"报表笔记本 {relative} 不存在。请确认文件已部署，或在控制台更换报表计划的笔记本。"
        )
    return candidate


def run_report(
    settings: Settings,
    run: dict[str, Any],
    *,
    secrets: PlatformSecrets | None = None,
    project_root: Path = PROJECT_ROOT,
    report_settings: ReportSettings | None = None,
    keystore: KeyStore | None = None,
) -> RunResult:
    """Execute a claimed run and return its result; failures of the run are returned, not raised.

    ``run`` is the body of ``POST /api/v1/report-runs/{id}/claim``. Notebook paths are relative to
    ``project_root``. ``secrets`` default to the ones stored under the data directory, and
    ``keystore``, which verifies the approval signature, to the platform key store.
    """
    report_settings = report_settings or ReportSettings()
    started_at = datetime.now(timezone.utc)
    try:
        parsed = _parse_run(run, project_root)
        _check_approval_signature(settings, parsed, keystore)
    except RunFailure as failure:
        logger.error("run %s is invalid: %s", run.get("id"), failure.code)
        return RunResult(run.get("id"), "failed", failure.code, failure.message)

    logger.info("run %s of schedule %s started: notebook %s", parsed.run_id, parsed.schedule_id, parsed.notebook_name)
    staging = archive.create_staging(settings, parsed.folder_id)
    try:
        result = _execute_run(settings, parsed, staging, started_at, secrets, report_settings)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("run %s finished: %s %s", parsed.run_id, result.status, result.error_code or "")
    return result


def _execute_run(
    settings: Settings,
    run: _Run,
    staging: Path,
    started_at: datetime,
    secrets: PlatformSecrets | None,
    report_settings: ReportSettings,
) -> RunResult:
    zone = ZoneInfo(report_settings.timezone)
    report_date = started_at.astimezone(zone).date()
    manifest: dict[str, Any] = {
        "run_id": run.run_id,
        "schedule_id": run.schedule_id,
        "schedule_name": run.schedule_name,
        "trigger": run.trigger,
        "notebook": {"name": run.notebook_name, "path": run.notebook["path"], "digest": run.digest},
        "recipients": run.recipients,
        "report_date": report_date.isoformat(),
        "kernel": report_settings.kernel,
        "started_at": started_at.isoformat(),
    }

    # Execute a private copy whose digest was checked, so the file cannot change between check and run.
    input_copy = staging / ".input.ipynb"
    shutil.copyfile(run.notebook_path, input_copy)
    current_digest = sm3_file(input_copy)
    if current_digest != run.digest:
        shutil.rmtree(staging)
        logger.warning("run %s: notebook %s digest %s differs from approved %s", run.run_id, run.notebook_name,
                       current_digest, run.digest)
        return RunResult(
            run.run_id, "failed", "NOTEBOOK_CHANGED",
            f"报表笔记本 {run.notebook_name} 在审批后已被修改（当前 SM3 摘要 {current_digest[:16]}…，"
            f"审批时 {run.digest[:16]}…），本次未执行。请监管审查员重新审查并审批该笔记本。",
        )

    try:
        recipients = validate_recipients(run.recipients)
        secrets = secrets or load_platform_secrets(settings)
    except RegsandboxError as error:
        shutil.rmtree(staging)
        return RunResult(run.run_id, "failed", error.code, error.message)

    env = kernel_environment(settings.admin_api_url, secrets.service_token)
    outcome = run_papermill(
        input_copy, staging / "output.ipynb", {"run_id": run.run_id, "report_date": report_date.isoformat()},
        env, report_settings,
    )
    input_copy.unlink()
    if not outcome.succeeded:
        return _fail_execution(settings, run, staging, manifest, outcome, report_settings)

    # Render without code, then send; only a delivered report is archived under its schedule.
    executed = nbformat.read(outcome.output_path, as_version=4)
    title = _report_title(executed, run.notebook_name)
    html = render_html(executed)
    (staging / "report.html").write_text(html, encoding="utf-8")
    try:
        send_report(
            settings, recipients, f"【监管沙箱报表】{title}（{report_date.isoformat()}）",
            _email_body(run, title, report_date.isoformat(), zone),
            [(f"{_safe_filename(title)}-{report_date.strftime('%Y%m%d')}.html", html.encode("utf-8"), "text/html")],
            login=(secrets.smtp_username, secrets.smtp_password) if secrets.smtp_username and secrets.smtp_password else None,
        )
    except MailDeliveryError as error:
        logger.error("run %s: report email failed: %s", run.run_id, error.code)
        failed_folder = _finish_failed(settings, staging, run, manifest, error.code, error.message)
        return RunResult(
            run.run_id, "failed", error.code, f"{error.message} 报表输出已保存在 {failed_folder}。", failed_folder
        )

    manifest.update(status="succeeded", finished_at=datetime.now(timezone.utc).isoformat())
    archive.write_manifest(settings, staging, manifest)
    archived = archive.archive_delivered(settings, staging, run.schedule_id, run.folder_id)
    return RunResult(run.run_id, "succeeded", archive_path=archived)


def _fail_execution(
    settings: Settings,
    run: _Run,
    staging: Path,
    manifest: dict[str, Any],
    outcome: ExecutionOutcome,
    report_settings: ReportSettings,
) -> RunResult:
    """Keep the output notebook and Papermill's log under failed/ and describe the failing cell."""
    (staging / "papermill.log").write_text(outcome.stderr_tail, encoding="utf-8")
    failure = None
    if outcome.output_path.exists():
        failure = first_cell_failure(nbformat.read(outcome.output_path, as_version=4))

    if outcome.timed_out:
        message = f"报表笔记本 {run.notebook_name} 执行超时（单元上限 {report_settings.cell_timeout:.0f} 秒）。"
    elif failure is not None:
        cell = f"第 {failure.execution_count} 个执行单元" if failure.execution_count else "某个单元"
        message = (
            f"报表笔记本 {run.notebook_name} 在{cell}执行失败：{failure.error_name}: "
            f"{failure.error_value[:_MAX_ERROR_VALUE].rstrip('。. ')}。"
        )
    else:
        message = f"报表笔记本 {run.notebook_name} 未能执行（内核 {report_settings.kernel} 启动失败或 Papermill 出错）。"

    failed_folder = _finish_failed(settings, staging, run, manifest, "NOTEBOOK_FAILED", message)
    return RunResult(
        run.run_id, "failed", "NOTEBOOK_FAILED",
        f"{message}输出笔记本已保存在 {failed_folder}，请查看标记的失败单元。", failed_folder,
    )


def _finish_failed(
    settings: Settings, staging: Path, run: _Run, manifest: dict[str, Any], code: str, message: str
) -> Path:
    manifest.update(
        status="failed", error_code=code, error_message=message, finished_at=datetime.now(timezone.utc).isoformat()
    )
    archive.write_manifest(settings, staging, manifest)
    return archive.archive_failed(settings, staging, run.folder_id)


def _report_title(notebook: nbformat.NotebookNode, fallback: str) -> str:
    title = notebook.metadata.get("regsandbox", {}).get("title")
    return str(title) if title else Path(fallback).stem


def _safe_filename(title: str) -> str:
    return _UNSAFE_FILENAME.sub("_", title).strip(" .") or "report"


def _email_body(run: _Run, title: str, report_date: str, zone: ZoneInfo) -> str:
    generated = datetime.now(zone).strftime("%Y-%m-%d %H:%M:%S")
    trigger = _TRIGGER_LABELS.get(run.trigger, run.trigger)
    return (
        "您好：\n\n"
        f"附件是监管沙箱平台自动生成的报表「{title}」，报表日期 {report_date}。\n\n"
        f"报表计划：{run.schedule_name}（{trigger}）\n"
        f"运行编号：{run.run_id}\n"
        f"报表笔记本：{run.notebook_name}，审批时 SM3 摘要 {run.digest}\n"
        f"生成时间：{generated}（{zone.key}）\n\n"
        "附件为 HTML 文件，可直接用浏览器离线打开。本邮件由系统自动发送，请勿直接回复。\n"
    )
