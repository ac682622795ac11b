"""Scheduler against an in-memory admin_api over real HTTP: queued runs, cron fires and admin_api outages."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from regsandbox_core.crypto import sm3_file
from regsandbox_core.secrets import PlatformSecrets
from reporting.admin_client import AdminApiClient, AdminApiError
from reporting.scheduler import FAILED_POLL_LOG_EVERY, ReportScheduler, RunProcessor, process_queued_runs
from tests.conftest import free_port

from .conftest import read_mail, sign_approval, write_notebook


@pytest.fixture
def demo_schedule(admin_api, project_root, keystore):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('报表内容：资本充足率')"], title="测试报表")
    notebook = {"id": 3, "name": "demo.ipynb", "path": "notebooks/reports/demo.ipynb", "digest": sm3_file(path)}
    admin_api.notebooks[3] = {**notebook, "approval_signature": sign_approval(keystore, notebook)}
    schedule = {
        "id": 5, "name": "每日测试报表", "notebook_id": 3, "cron": "0 8 * * 1-5",
        "recipients": ["reviewer@regulator.example.cn"], "enabled": True,
    }
    admin_api.schedules.append(schedule)
    return schedule


def test_queued_run_processed(settings, secrets, admin_api, smtp_sink, demo_schedule, project_root, report_settings):
    admin_api.queue(5, "manual")

    count = process_queued_runs(settings, secrets, project_root=project_root, report_settings=report_settings)

    assert count == 1
    assert admin_api.finished[1]["status"] == "succeeded"
    assert admin_api.finished[1]["error_code"] is None
    assert admin_api.finished[1]["archive_path"] == str(settings.reports_dir / "5" / "1")
    assert (settings.data_dir / "reports/5/1/report.html.rssg").is_file()
    assert not (settings.data_dir / "reports/5/1/report.html").exists()
    assert len(read_mail(settings)) == 1
    assert admin_api.rejected_requests == 0


def test_nothing_queued_returns_zero(settings, secrets, admin_api, demo_schedule, project_root, report_settings):
    assert process_queued_runs(settings, secrets, project_root=project_root, report_settings=report_settings) == 0


def test_failed_run_reported(settings, secrets, admin_api, demo_schedule, project_root, report_settings):
    (project_root / "notebooks/reports/demo.ipynb").write_text("{}", encoding="utf-8")
    admin_api.queue(5, "manual")

    process_queued_runs(settings, secrets, project_root=project_root, report_settings=report_settings)

    assert admin_api.finished[1]["status"] == "failed"
    assert admin_api.finished[1]["error_code"] == "NOTEBOOK_CHANGED"
    assert admin_api.finished[1]["archive_path"] is None


def test_wrong_token_rejected(settings, admin_api, demo_schedule, project_root, report_settings):
    admin_api.queue(5, "manual")
    wrong = PlatformSecrets("not-the-token", "s", "f", "p", "d")

    with pytest.raises(AdminApiError) as caught:
        process_queued_runs(settings, wrong, project_root=project_root, report_settings=report_settings)

    assert caught.value.code == "ADMIN_API_ERROR"
    assert "401" in caught.value.message
    assert admin_api.runs[1]["status"] == "queued"


def test_admin_api_down_raises(settings, secrets, report_settings):
    settings.admin_api_port = free_port()

    with pytest.raises(AdminApiError) as caught:
        process_queued_runs(settings, secrets, report_settings=report_settings)

    assert caught.value.code == "ADMIN_API_UNAVAILABLE"
    assert str(settings.admin_api_port) in caught.value.message


def test_poll_survives_admin_api_down(settings, secrets, report_settings, caplog):
    settings.admin_api_port = free_port()
    scheduler = ReportScheduler(settings, secrets, report_settings=report_settings)
    caplog.set_level(logging.WARNING, logger="reporting.scheduler")

    for _ in range(FAILED_POLL_LOG_EVERY):
        assert scheduler.poll_once() == 0

    warnings = [record for record in caplog.records if "retrying at the next poll" in record.getMessage()]
    assert scheduler.failed_polls == FAILED_POLL_LOG_EVERY
    assert len(warnings) == 2
    assert "ADMIN_API_UNAVAILABLE" in warnings[0].getMessage()
    assert secrets.service_token not in caplog.text
    scheduler.client.close()


def test_failed_finish_retried(settings, secrets, admin_api, smtp_sink, demo_schedule, project_root, report_settings):
    admin_api.finish_failures_left = 1
    admin_api.queue(5, "manual")
    scheduler = ReportScheduler(settings, secrets, project_root=project_root, report_settings=report_settings)

    assert scheduler.poll_once() == 1
    assert admin_api.finished == {}
    assert list(scheduler.processor.unsent_finishes) == [1]

    assert scheduler.poll_once() == 0
    assert admin_api.finished[1]["status"] == "succeeded"
    assert scheduler.processor.unsent_finishes == {}
    assert len(read_mail(settings)) == 1
    scheduler.client.close()


def test_schedules_synced(settings, secrets, admin_api, demo_schedule, report_settings):
    scheduler = ReportScheduler(settings, secrets, report_settings=report_settings)
    schedules = [
        demo_schedule,
        {"id": 6, "name": "停用", "notebook_id": 3, "cron": "* * * * *", "recipients": [], "enabled": False},
        {"id": 8, "name": "无效", "notebook_id": 3, "cron": "61 * * * *", "recipients": [], "enabled": True},
    ]

    scheduler.sync_schedules(schedules)
    assert scheduler.scheduled == {"5": "0 8 * * 1-5"}

    schedules[0] = {**demo_schedule, "cron": "30 9 * * *"}
    scheduler.sync_schedules(schedules)
    assert scheduler.scheduled == {"5": "30 9 * * *"}

    scheduler.sync_schedules([])
    assert scheduler.scheduled == {}
    scheduler.client.close()


@pytest.mark.slow
def test_six_field_cron_fires(settings, secrets, admin_api, smtp_sink, demo_schedule, project_root, report_settings):
    demo_schedule["cron"] = "*/2 * * * * *"
    scheduler = ReportScheduler(settings, secrets, project_root=project_root, report_settings=report_settings)
    thread = threading.Thread(target=scheduler.run_forever, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not admin_api.finished:
            time.sleep(0.2)
    finally:
        scheduler.stop()
        thread.join(timeout=60)

    assert not thread.is_alive()
    assert admin_api.finished, "no cron run finished within 30 s"
    first_id = min(admin_api.finished)
    assert admin_api.runs[first_id]["trigger"] == "cron"
    assert admin_api.finished[first_id]["status"] == "succeeded"
    assert read_mail(settings)


def test_rejected_finish_not_retried(settings, secrets, admin_api, demo_schedule):
    run = admin_api.queue(5, "manual")
    run["status"] = "succeeded"
    payload = {"status": "failed", "error_code": "NOTEBOOK_FAILED", "error_message": "x", "archive_path": None}

    with AdminApiClient(settings, secrets) as client:
        processor = RunProcessor(settings, secrets, client)
        processor.unsent_finishes[run["id"]] = payload
        processor.retry_finishes()

    assert processor.unsent_finishes == {}
    assert run["id"] not in admin_api.finished


def test_archive_failure_reported_with_code(settings, secrets, admin_api, demo_schedule, project_root,
                                            report_settings, monkeypatch):
    """A run whose archive cannot be encrypted is finished as failed with the archive's code, not RUN_ERROR."""
    from regsandbox_core.errors import RegsandboxError
    from reporting.archive import ArchiveSealFailed

    def failing_run(*_args, **_kwargs):
        raise ArchiveSealFailed(RegsandboxError("key_no_active_version", "platform/data 没有处于启用状态的密钥版本。"))

    monkeypatch.setattr("reporting.scheduler.run_report", failing_run)
    admin_api.queue(5, "manual")

    assert process_queued_runs(settings, secrets, project_root=project_root, report_settings=report_settings) == 1

    assert admin_api.finished[1]["status"] == "failed"
    assert admin_api.finished[1]["error_code"] == "ARCHIVE_ENCRYPTION_FAILED"
    assert "key_no_active_version" in admin_api.finished[1]["error_message"]
    assert admin_api.finished[1]["archive_path"] is None


def test_scheduler_refuses_without_signing_key(settings, secrets, keystore, capsys, monkeypatch):
    """The scheduler checks at start that archives can be encrypted and their manifests signed."""
    from reporting import scheduler

    keystore.revoke("platform", "signing", 1, "test: no active platform signing key")
    monkeypatch.setenv("REGSANDBOX_DATA_DIR", str(settings.data_dir))
    monkeypatch.setattr(scheduler, "get_settings", lambda: settings)

    assert scheduler.main() == 1
    error = capsys.readouterr().err
    assert "平台数据密钥和签名密钥" in error
    assert "platform/signing" in error
