"""Report notebooks, schedules and runs: approval digests, cron and recipient checks, atomic claims."""

from __future__ import annotations

import secrets
import threading
from typing import Any

from regsandbox_core.crypto import sm3_file

from .conftest import Env
from .helpers import approved_schedule, insert_run, notebook_id


def _schedule_body(env: Env, **overrides: Any) -> dict[str, Any]:
    body = {"name": f"测试调度-{secrets.token_hex(4)}", "notebook_id": notebook_id(env, "quarterly_risk"),
            "cron": "0 8 * * mon-fri", "recipients": ["risk@regulator.example"]}
    return {**body, **overrides}


def _notebooks(env: Env) -> dict[str, dict[str, Any]]:
    response = env.client.get("/api/v1/report-notebooks", headers=env.auth("reviewer"))
    return {item["path"]: item for item in response.json()}


def test_seeded_notebooks_named(env: Env) -> None:
    notebooks = _notebooks(env)

    assert notebooks["notebooks/reports/quarterly_risk.ipynb"]["name"] == "季度风险监测报告"
    assert notebooks["notebooks/reports/plain_report.ipynb"]["name"] == "plain_report"
    assert notebooks["notebooks/reports/plain_report.ipynb"]["status"] == "pending"


def test_approve_records_current_digest(env: Env) -> None:
    path = env.project_root / "notebooks" / "reports" / "quarterly_risk.ipynb"
    identifier = notebook_id(env, "quarterly_risk")

    first = env.client.post(f"/api/v1/report-notebooks/{identifier}/approve", headers=env.auth("reviewer"))
    assert first.json()["sm3_digest"] == sm3_file(path)
    assert first.json()["status"] == "approved"
    assert first.json()["approved_by"] == "reviewer"

    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n")
        second = env.client.post(f"/api/v1/report-notebooks/{identifier}/approve", headers=env.auth("reviewer"))
        assert second.json()["sm3_digest"] == sm3_file(path)
        assert second.json()["sm3_digest"] != first.json()["sm3_digest"]
    finally:
        path.write_bytes(original)
        env.client.post(f"/api/v1/report-notebooks/{identifier}/approve", headers=env.auth("reviewer"))


def test_approve_unknown_notebook_404(env: Env) -> None:
    response = env.client.post("/api/v1/report-notebooks/9999/approve", headers=env.auth("reviewer"))

    assert response.status_code == 404
    assert response.json()["code"] == "NOTEBOOK_NOT_FOUND"


def test_create_schedule_five_field(env: Env) -> None:
    approved_schedule(env)  # makes sure the quarterly notebook is approved

    response = env.client.post("/api/v1/schedules", headers=env.auth("sysadmin"), json=_schedule_body(env))

    assert response.status_code == 201, response.text
    assert response.json()["cron"] == "0 8 * * mon-fri"
    assert response.json()["enabled"] is True
    assert response.json()["notebook_name"] == "季度风险监测报告"


def test_create_schedule_six_field(env: Env) -> None:
    approved_schedule(env)

    response = env.client.post(
        "/api/v1/schedules", headers=env.auth("sysadmin"), json=_schedule_body(env, cron="30  0 8 * *  mon-fri")
    )

    assert response.status_code == 201, response.text
    assert response.json()["cron"] == "30 0 8 * * mon-fri"


def test_bad_cron_named_in_422(env: Env) -> None:
    for expression in ["61 * * * *", "0 8 * *", "every day", "0 0 8 * * * *", "0 25 * * *"]:
        response = env.client.post(
            "/api/v1/schedules", headers=env.auth("sysadmin"), json=_schedule_body(env, cron=expression)
        )
        assert response.status_code == 422, expression
        assert response.json()["code"] == "INVALID_CRON"
        assert repr(expression) in response.json()["detail"]


def test_bad_recipient_422(env: Env) -> None:
    for recipients in (["not-an-email"], ["a@b"], [], ["ok@regulator.example", "x y@regulator.example"]):
        response = env.client.post(
            "/api/v1/schedules", headers=env.auth("sysadmin"), json=_schedule_body(env, recipients=recipients)
        )
        assert response.status_code == 422, recipients
        assert response.json()["code"] == "INVALID_RECIPIENT"


def test_recipients_deduplicated(env: Env) -> None:
    approved_schedule(env)
    recipients = [" risk@regulator.example", "RISK@regulator.example", "ops@bank-a.example"]

    response = env.client.post(
        "/api/v1/schedules", headers=env.auth("sysadmin"), json=_schedule_body(env, recipients=recipients)
    )

    assert response.json()["recipients"] == ["risk@regulator.example", "ops@bank-a.example"]


def test_unapproved_notebook_409(env: Env) -> None:
    plain = notebook_id(env, "plain_report")

    enabled = env.client.post(
        "/api/v1/schedules", headers=env.auth("sysadmin"), json=_schedule_body(env, notebook_id=plain)
    )
    disabled = env.client.post(
        "/api/v1/schedules", headers=env.auth("sysadmin"),
        json=_schedule_body(env, notebook_id=plain, enabled=False),
    )
    assert enabled.status_code == 409
    assert enabled.json()["code"] == "NOTEBOOK_NOT_APPROVED"
    assert disabled.status_code == 201

    enabling = env.client.patch(
        f"/api/v1/schedules/{disabled.json()['id']}", headers=env.auth("sysadmin"), json={"enabled": True}
    )
    run = env.client.post(f"/api/v1/schedules/{disabled.json()['id']}/runs", headers=env.auth("sysadmin"))
    assert enabling.status_code == 409
    assert enabling.json()["code"] == "NOTEBOOK_NOT_APPROVED"
    assert run.status_code == 409
    assert run.json()["code"] == "NOTEBOOK_NOT_APPROVED"


def test_duplicate_schedule_name_409(env: Env) -> None:
    approved_schedule(env)
    body = _schedule_body(env)

    first = env.client.post("/api/v1/schedules", headers=env.auth("sysadmin"), json=body)
    second = env.client.post("/api/v1/schedules", headers=env.auth("sysadmin"), json=body)

    assert first.status_code == 201
    assert second.status_code == 409
    assert second.json()["code"] == "SCHEDULE_EXISTS"


def test_update_schedule_bad_cron(env: Env) -> None:
    schedule = approved_schedule(env)

    response = env.client.patch(f"/api/v1/schedules/{schedule}", headers=env.auth("sysadmin"), json={"cron": "x"})

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_CRON"


def test_cron_run_of_disabled_schedule_409(env: Env) -> None:
    schedule = approved_schedule(env, fresh=True)
    env.client.patch(f"/api/v1/schedules/{schedule}", headers=env.auth("sysadmin"), json={"enabled": False})

    cron = env.client.post(f"/api/v1/schedules/{schedule}/runs", headers=env.service(), json={"trigger": "cron"})
    manual = env.client.post(f"/api/v1/schedules/{schedule}/runs", headers=env.auth("reviewer"),
                             json={"trigger": "manual"})

    assert cron.status_code == 409
    assert cron.json()["code"] == "SCHEDULE_DISABLED"
    assert manual.status_code == 201


def test_run_lifecycle(env: Env) -> None:
    schedule = approved_schedule(env)
    queued = env.client.post(f"/api/v1/schedules/{schedule}/runs", headers=env.service(), json={"trigger": "cron"})
    run_id = queued.json()["id"]
    assert queued.status_code == 201
    assert queued.json()["status"] == "queued"

    listed = env.client.get("/api/v1/report-runs?status=queued", headers=env.service()).json()
    assert run_id in [item["id"] for item in listed]
    assert {item["status"] for item in listed} == {"queued"}

    claimed = env.client.post(f"/api/v1/report-runs/{run_id}/claim", headers=env.service())
    body = claimed.json()
    notebook_path = env.project_root / "notebooks" / "reports" / "quarterly_risk.ipynb"
    assert claimed.status_code == 200
    assert body["status"] == "running"
    assert body["claimed_by"] == "service:scheduler"
    assert body["notebook_path"] == "notebooks/reports/quarterly_risk.ipynb"
    assert body["notebook_file"] == str(notebook_path.resolve())
    assert body["approved_sm3"] == sm3_file(notebook_path)
    assert body["recipients"] == ["risk@regulator.example"]

    archive = env.settings.reports_dir / str(schedule) / str(run_id)
    finished = env.client.post(
        f"/api/v1/report-runs/{run_id}/finish", headers=env.service(),
        json={"status": "succeeded", "archive_path": str(archive)},
    )
    assert finished.status_code == 200
    assert finished.json()["status"] == "succeeded"
    assert finished.json()["archive_path"] == str(archive.resolve())

    again = env.client.post(f"/api/v1/report-runs/{run_id}/finish", headers=env.service(),
                            json={"status": "failed", "error_code": "X"})
    assert again.status_code == 409
    assert again.json()["code"] == "RUN_NOT_RUNNING"


def test_finish_failed_keeps_error(env: Env) -> None:
    run_id = insert_run(env, approved_schedule(env), "running")

    response = env.client.post(
        f"/api/v1/report-runs/{run_id}/finish", headers=env.service(),
        json={"status": "failed", "error_code": "CELL_ERROR", "error_message": "第 3 个单元格执行失败"},
    )

    assert response.status_code == 200
    assert (response.json()["error_code"], response.json()["error_message"]) == ("CELL_ERROR", "第 3 个单元格执行失败")


def test_finish_archive_outside_reports_422(env: Env) -> None:
    run_id = insert_run(env, approved_schedule(env), "running")

    response = env.client.post(
        f"/api/v1/report-runs/{run_id}/finish", headers=env.service(),
        json={"status": "succeeded", "archive_path": "../secrets/platform.json"},
    )

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_ARCHIVE_PATH"


def test_claim_unknown_run_404(env: Env) -> None:
    response = env.client.post("/api/v1/report-runs/999999/claim", headers=env.service())

    assert response.status_code == 404
    assert response.json()["code"] == "RUN_NOT_FOUND"


def test_concurrent_claims_one_wins(env: Env) -> None:
    schedule = approved_schedule(env)
    for _attempt in range(8):
        run_id = insert_run(env, schedule, "queued")
        barrier = threading.Barrier(2, timeout=10)
        statuses: list[int] = []

        def claim() -> None:
            barrier.wait()
            statuses.append(env.client.post(f"/api/v1/report-runs/{run_id}/claim", headers=env.service()).status_code)

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        assert sorted(statuses) == [200, 409]


def test_wrong_type_chinese_422(env: Env) -> None:
    response = env.client.post(
        "/api/v1/schedules", headers=env.auth("sysadmin"), json=_schedule_body(env, notebook_id="abc", extra=1)
    )

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_REQUEST"
    assert "notebook_id（报告笔记本编号） 的值 'abc'应为整数" in response.json()["detail"]
    assert "extra" in response.json()["detail"]
