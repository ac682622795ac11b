"""Report scheduler: fires cron schedules and runs queued report runs, talking to admin_api over HTTP.

Run as ``python -m reporting.scheduler``. Every ``REGSANDBOX_SCHEDULER_POLL_SECONDS`` it reloads the
schedules and claims the queued runs (on-demand runs are queued by admin_api). A cron fire queues a
run through ``POST /api/v1/schedules/{id}/runs`` and wakes the loop, so cron runs take the same
claim path. Runs execute one at a time in the loop's thread.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from regsandbox_core.errors import ConfigurationError, RegsandboxError
from regsandbox_core.logs import configure_logging
from regsandbox_core.secrets import PlatformSecrets, load_platform_secrets
from regsandbox_core.settings import PROJECT_ROOT, Settings, get_settings
from reporting.admin_client import AdminApiClient, AdminApiError
from reporting.archive import check_archive_keys
from reporting.config import ReportSettings
from regsandbox_core.cron import CronExpressionError, parse_cron
from reporting.runner import run_report

logger = logging.getLogger(__name__)

MAX_RUNS_PER_POLL = 50
"""Upper bound of runs claimed in one poll, so schedule changes are picked up between long batches."""

FAILED_POLL_LOG_EVERY = 20
"""While admin_api is down, a warning is logged for the first failed poll and every this many after it."""


class RunProcessor:
    """Claims queued runs, executes them and reports their end. Finish requests that fail are retried at the next poll."""

    def __init__(
        self,
        settings: Settings,
        secrets: PlatformSecrets,
        client: AdminApiClient,
        *,
        project_root: Path = PROJECT_ROOT,
        report_settings: ReportSettings | None = None,
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self.client = client
        self.project_root = project_root
        self.report_settings = report_settings or ReportSettings()
        self.unsent_finishes: dict[Any, dict[str, Any]] = {}

    def process_queued(self, stop: threading.Event | None = None) -> int:
        """Execute every queued run that this process can claim and return how many ran.

        Raises AdminApiError when the list of queued runs cannot be read. A run that raises
        unexpectedly is reported as failed with code ``RUN_ERROR`` and the loop goes on.
        """
        self.retry_finishes()
        executed = 0
        for queued in self.client.list_queued_runs()[:MAX_RUNS_PER_POLL]:
            if stop is not None and stop.is_set():
                break
            run_id = queued.get("id")
            try:
                run = self.client.claim_run(run_id)
            except AdminApiError as error:
                logger.warning("claiming run %s failed: %s", run_id, error.code)
                continue
            if run is None:
                logger.info("run %s was claimed by another runner", run_id)
                continue

            executed += 1
            self._finish(run.get("id", run_id), self._run(run))
        return executed

    def _run(self, run: dict[str, Any]) -> dict[str, Any]:
        try:
            result = run_report(
                self.settings, run, secrets=self.secrets, project_root=self.project_root,
                report_settings=self.report_settings,
            )
        except RegsandboxError as error:
            # For example ARCHIVE_ENCRYPTION_FAILED: the runner deleted the run's output, keep the code.
            logger.error("run %s failed: %s", run.get("id"), error.code)
            return {"status": "failed", "error_code": error.code, "error_message": error.message, "archive_path": None}
        except Exception:
            logger.exception("run %s failed with an unexpected error", run.get("id"))
            return {
                "status": "failed",
                "error_code": "RUN_ERROR",
                "error_message": "报表运行出现内部错误，未生成报表。请查看报表调度服务日志后重新运行。",
                "archive_path": None,
            }
        return result.finish_payload()

    def _finish(self, run_id: Any, payload: dict[str, Any]) -> None:
        try:
            self.client.finish_run(run_id, payload)
        except AdminApiError as error:
            if error.retryable:
                logger.error("reporting the end of run %s failed (%s); retrying at the next poll", run_id, error.code)
                self.unsent_finishes[run_id] = payload
                return
            logger.error("admin_api rejected the end of run %s: %s", run_id, error.message)
        self.unsent_finishes.pop(run_id, None)

    def retry_finishes(self) -> None:
        """Send the finish requests that failed earlier."""
        for run_id, payload in list(self.unsent_finishes.items()):
            logger.info("retrying finish of run %s", run_id)
            self._finish(run_id, payload)


def process_queued_runs(
    settings: Settings,
    secrets: PlatformSecrets,
    *,
    project_root: Path = PROJECT_ROOT,
    report_settings: ReportSettings | None = None,
) -> int:
    """Claim and execute every queued run once and return how many ran. Raises AdminApiError when admin_api is down."""
    with AdminApiClient(settings, secrets) as client:
        processor = RunProcessor(settings, secrets, client, project_root=project_root, report_settings=report_settings)
        return processor.process_queued()


class ReportScheduler:
    """Long-running loop around an APScheduler BackgroundScheduler with one cron job per enabled schedule."""

    def __init__(
        self,
        settings: Settings,
        secrets: PlatformSecrets,
        *,
        project_root: Path = PROJECT_ROOT,
        report_settings: ReportSettings | None = None,
    ) -> None:
        self.settings = settings
        self.report_settings = report_settings or ReportSettings()
        self.client = AdminApiClient(settings, secrets)
        self.processor = RunProcessor(
            settings, secrets, self.client, project_root=project_root, report_settings=self.report_settings
        )
        self._scheduler = BackgroundScheduler(
            timezone=self.report_settings.timezone,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60},
        )
        self._crons: dict[str, str] = {}
        self._invalid_crons: dict[str, str] = {}
        self._fired: set[str] = set()
        self._fired_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.failed_polls = 0  # polls in a row that could not reach admin_api

    @property
    def scheduled(self) -> dict[str, str]:
        """Cron expression of each schedule id that has a job."""
        return dict(self._crons)

    def stop(self) -> None:
        """Ask the loop to end after the current run. Safe to call from a signal handler."""
        self._stop.set()
        self._wake.set()

    def run_forever(self) -> None:
        """Poll until :meth:`stop`; admin_api failures are logged and retried at the next poll."""
        self._scheduler.start()
        logger.info(
            "scheduler started: admin_api %s, poll every %.1f s, time zone %s",
            self.client.base_url, self.settings.scheduler_poll_seconds, self.report_settings.timezone,
        )
        try:
            while not self._stop.is_set():
                try:
                    self.poll_once()
                except Exception:
                    # A malformed schedule or run from admin_api must not end the process.
                    logger.exception("poll failed unexpectedly; retrying at the next poll")
                self._wake.wait(timeout=self.settings.scheduler_poll_seconds)
                self._wake.clear()
        finally:
            self._scheduler.shutdown(wait=False)
            self.client.close()
            logger.info("scheduler stopped")

    def poll_once(self) -> int:
        """Reload schedules, queue fired cron runs and run queued runs; return how many ran."""
        try:
            self.sync_schedules(self.client.list_schedules())
        except AdminApiError as error:
            self._log_failed_poll("loading schedules", error)
            return 0
        self._queue_fired()
        try:
            executed = self.processor.process_queued(self._stop)
        except AdminApiError as error:
            self._log_failed_poll("reading queued runs", error)
            return 0

        if self.failed_polls:
            logger.info("admin_api %s reachable again after %d failed polls", self.client.base_url, self.failed_polls)
            self.failed_polls = 0
        return executed

    def _log_failed_poll(self, step: str, error: AdminApiError) -> None:
        # An outage fails every poll; log the first failure and then every FAILED_POLL_LOG_EVERY-th one.
        self.failed_polls += 1
        if self.failed_polls == 1 or self.failed_polls % FAILED_POLL_LOG_EVERY == 0:
            logger.warning(
                "%s from %s failed (%s, %d failed polls in a row); retrying at the next poll",
                step, self.client.base_url, error.code, self.failed_polls,
            )

    def sync_schedules(self, schedules: list[dict[str, Any]]) -> None:
        """Add, change and remove cron jobs so that each enabled schedule has exactly one."""
        enabled_crons: dict[str, str] = {}
        for schedule in schedules:
            if schedule.get("enabled", True) and schedule.get("cron"):
                enabled_crons[str(schedule["id"])] = str(schedule["cron"]).strip()

        for schedule_id in set(self._crons) - set(enabled_crons):
            self._scheduler.remove_job(_job_id(schedule_id))
            del self._crons[schedule_id]
            logger.info("schedule %s removed or disabled, cron job dropped", schedule_id)

        for schedule_id, expression in enabled_crons.items():
            if self._crons.get(schedule_id) == expression or self._invalid_crons.get(schedule_id) == expression:
                continue
            self._add_job(schedule_id, expression)

    def _add_job(self, schedule_id: str, expression: str) -> None:
        try:
            trigger = parse_cron(expression, self.report_settings.timezone)
        except CronExpressionError:
            logger.warning("schedule %s has an invalid cron expression %r; it will not fire", schedule_id, expression)
            self._invalid_crons[schedule_id] = expression
            if schedule_id in self._crons:
                self._scheduler.remove_job(_job_id(schedule_id))
                del self._crons[schedule_id]
            return

        self._invalid_crons.pop(schedule_id, None)
        self._scheduler.add_job(
            self._on_cron_fire, trigger, args=[schedule_id], id=_job_id(schedule_id), replace_existing=True
        )
        logger.info("schedule %s scheduled with cron %r", schedule_id, expression)
        self._crons[schedule_id] = expression

    def _on_cron_fire(self, schedule_id: str) -> None:
        # Runs in APScheduler's worker thread: only record the fire and wake the loop, which owns the HTTP client.
        logger.info("schedule %s fired", schedule_id)
        with self._fired_lock:
            self._fired.add(schedule_id)
        self._wake.set()

    def _queue_fired(self) -> None:
        with self._fired_lock:
            fired, self._fired = self._fired, set()
        for schedule_id in sorted(fired):
            try:
                run = self.client.queue_run(schedule_id, "cron")
            except AdminApiError as error:
                logger.warning("queueing a cron run of schedule %s failed (%s); retrying at the next poll",
                               schedule_id, error.code)
                with self._fired_lock:
                    self._fired.add(schedule_id)
                continue
            logger.info("queued cron run %s of schedule %s", run.get("id"), schedule_id)


def _job_id(schedule_id: str) -> str:
    return f"schedule-{schedule_id}"


def main() -> int:
    """Run the scheduler until SIGTERM or SIGINT; return the process exit status."""
    configure_logging()
    settings = get_settings()
    try:
        secrets = load_platform_secrets(settings)
        check_archive_keys(settings)
        report_settings = ReportSettings()
    except (ConfigurationError, ValueError) as error:
        logger.error("scheduler not started: %s", getattr(error, "code", type(error).__name__))
        print(getattr(error, "message", f"报表调度配置无效：{error}"), file=sys.stderr)
        return 1

    scheduler = ReportScheduler(settings, secrets, report_settings=report_settings)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: scheduler.stop())
    scheduler.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
