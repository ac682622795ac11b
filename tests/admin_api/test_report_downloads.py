"""Downloads of encrypted report archives: roles, names, integrity failures, key states and audit events."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from admin_api.models import ReportRun
from regsandbox_core.platform_keys import open_keystore
from reporting import archive

from .conftest import Env, build_env, make_project_root
from .helpers import approved_schedule, audit_events, console_cookie, insert_run

REPORT_HTML = ("<!doctype html><meta charset=\"utf-8\"><h1>季度风险监测报告</h1>" + "<p>指标</p>" * 5000).encode("utf-8")
OUTPUT_NOTEBOOK = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode("utf-8")


def archived_run(env: Env, files: dict[str, bytes] | None = None) -> tuple[int, Path]:
    """Archive ``files`` as the runner does (encrypted, signed manifest) for a new succeeded run."""
    files = files or {"report.html": REPORT_HTML, "output.ipynb": OUTPUT_NOTEBOOK}
    schedule_id = approved_schedule(env)
    run_id = insert_run(env, schedule_id, "succeeded")
    staging = archive.create_staging(env.settings, str(run_id))
    for name, content in files.items():
        (staging / name).write_bytes(content)
    archive.write_manifest(env.settings, staging, {"run_id": run_id, "schedule_id": schedule_id, "status": "succeeded"})
    folder = archive.archive_delivered(env.settings, staging, str(schedule_id), str(run_id))
    with env.db() as session:
        session.get(ReportRun, run_id).archive_path = str(folder)
        session.commit()
    return run_id, folder


def _get(env: Env, run_id: int, name: str, request_id: str, headers: dict[str, str] | None = None):
    return env.client.get(f"/api/v1/report-runs/{run_id}/files/{name}",
                          headers={**(headers if headers is not None else env.auth("reviewer")), "X-Request-ID": request_id})


def _failure_audited(env: Env, request_id: str, code: str) -> None:
    events = [event for event in audit_events(env, request_id) if event.action == "report.download"]
    assert [event.outcome for event in events] == ["failed"]
    assert json.loads(events[0].detail)["code"] == code


@pytest.mark.parametrize("username", ["reviewer", "sysadmin"])
def test_download_decrypted_and_audited(env: Env, username: str) -> None:
    run_id, folder = archived_run(env)
    request_id = f"download-ok-{secrets.token_hex(4)}"

    response = _get(env, run_id, "report.html", request_id, env.auth(username))

    assert response.status_code == 200, response.text
    assert response.content == REPORT_HTML
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert 'attachment; filename="report.html"' in response.headers["content-disposition"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert not (folder / "report.html").exists()
    assert not list((env.settings.reports_dir / ".downloads").iterdir())
    (event,) = [event for event in audit_events(env, request_id) if event.action == "report.download"]
    assert (event.actor, event.outcome) == (username, "success")
    assert event.resource == f"report_run:{run_id}/report.html"
    assert json.loads(event.detail)["key"].startswith("platform/data/v")


def test_service_downloads_notebook(env: Env) -> None:
    run_id, _folder = archived_run(env)

    response = _get(env, run_id, "output.ipynb", f"download-svc-{secrets.token_hex(4)}", env.service("scheduler"))

    assert response.status_code == 200, response.text
    assert response.content == OUTPUT_NOTEBOOK
    assert response.headers["content-type"] == "application/x-ipynb+json"


@pytest.mark.parametrize(("username", "status", "code"), [
    ("modeller_a", 403, "FORBIDDEN"),
    ("reporter_a", 403, "FORBIDDEN"),
    (None, 401, "NOT_AUTHENTICATED"),
])
def test_download_denied(env: Env, username: str | None, status: int, code: str) -> None:
    run_id, _folder = archived_run(env)
    request_id = f"download-denied-{secrets.token_hex(4)}"

    response = _get(env, run_id, "report.html", request_id, env.auth(username) if username else {})

    assert response.status_code == status
    assert response.json()["code"] == code
    assert "季度风险" not in response.text
    assert [event.outcome for event in audit_events(env, request_id)] == ["denied"]


@pytest.mark.parametrize("name", [
    "manifest.json", "manifest.json.sig", "report.html.rssg", "..", "%2e%2e", "..%2Fmanifest.json",
    "..%2F..%2F..%2Fsecrets%2Fplatform.enc.json", "%2Fetc%2Fpasswd", "report.html%00", "REPORT.HTML",
])
def test_names_outside_manifest_404(env: Env, name: str) -> None:
    run_id, _folder = archived_run(env)

    response = _get(env, run_id, name, f"download-name-{secrets.token_hex(4)}")

    assert response.status_code == 404, response.text
    assert response.json()["code"] in ("REPORT_FILE_NOT_FOUND", "NOT_FOUND")
    assert "季度风险" not in response.text


def test_name_not_in_manifest_audited(env: Env) -> None:
    run_id, _folder = archived_run(env)
    request_id = f"download-missing-{secrets.token_hex(4)}"

    response = _get(env, run_id, "papermill.log", request_id)

    assert response.status_code == 404
    assert response.json()["code"] == "REPORT_FILE_NOT_FOUND"
    assert "papermill.log" in response.json()["detail"]
    _failure_audited(env, request_id, "REPORT_FILE_NOT_FOUND")


def test_unknown_run_and_unarchived_run_404(env: Env) -> None:
    queued = insert_run(env, approved_schedule(env), "queued")

    unknown = _get(env, 999999, "report.html", f"download-unknown-{secrets.token_hex(4)}")
    unarchived = _get(env, queued, "report.html", f"download-queued-{secrets.token_hex(4)}")

    assert (unknown.status_code, unknown.json()["code"]) == (404, "RUN_NOT_FOUND")
    assert (unarchived.status_code, unarchived.json()["code"]) == (404, "REPORT_ARCHIVE_NOT_FOUND")


def _edit(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_ciphertext_409(env: Env) -> None:
    run_id, folder = archived_run(env)
    encrypted = folder / "report.html.rssg"
    _edit(encrypted, encrypted.stat().st_size // 2)
    request_id = f"download-tampered-{secrets.token_hex(4)}"

    response = _get(env, run_id, "report.html", request_id)

    assert response.status_code == 409
    assert response.json()["code"] == "REPORT_FILE_TAMPERED"
    assert "篡改" in response.json()["detail"]
    assert "季度风险" not in response.text
    assert not list((env.settings.reports_dir / ".downloads").iterdir())
    _failure_audited(env, request_id, "REPORT_FILE_TAMPERED")


def test_truncated_ciphertext_409(env: Env) -> None:
    run_id, folder = archived_run(env)
    encrypted = folder / "report.html.rssg"
    encrypted.write_bytes(encrypted.read_bytes()[:-40])
    request_id = f"download-truncated-{secrets.token_hex(4)}"

    response = _get(env, run_id, "report.html", request_id)

    assert response.status_code == 409
    assert response.json()["code"] == "REPORT_FILE_TRUNCATED"
    assert "截断" in response.json()["detail"]
    assert "季度风险" not in response.text
    _failure_audited(env, request_id, "REPORT_FILE_TRUNCATED")


def test_edited_manifest_409(env: Env) -> None:
    run_id, folder = archived_run(env)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["files"]["report.html"]["size"] += 1
    manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
    request_id = f"download-manifest-{secrets.token_hex(4)}"

    response = _get(env, run_id, "report.html", request_id)

    assert response.status_code == 409
    assert response.json()["code"] == "REPORT_MANIFEST_INVALID"
    assert "清单" in response.json()["detail"]
    _failure_audited(env, request_id, "REPORT_MANIFEST_INVALID")


def test_unsigned_manifest_409(env: Env) -> None:
    run_id, folder = archived_run(env)
    (folder / "manifest.json.sig").unlink()
    request_id = f"download-unsigned-{secrets.token_hex(4)}"

    response = _get(env, run_id, "report.html", request_id)

    assert response.status_code == 409
    assert response.json()["code"] == "REPORT_MANIFEST_UNSIGNED"
    _failure_audited(env, request_id, "REPORT_MANIFEST_UNSIGNED")


def test_swapped_ciphertext_409(env: Env) -> None:
    """A valid ciphertext of another file under the same name fails: the associated data binds the name."""
    run_id, folder = archived_run(env)
    (folder / "output.ipynb.rssg").replace(folder / "report.html.rssg")
    request_id = f"download-swapped-{secrets.token_hex(4)}"

    response = _get(env, run_id, "report.html", request_id)

    assert response.status_code == 409
    assert response.json()["code"] == "REPORT_FILE_TAMPERED"
    _failure_audited(env, request_id, "REPORT_FILE_TAMPERED")


def test_console_lists_and_downloads(env: Env) -> None:
    run_id, _folder = archived_run(env)
    cookie = console_cookie(env, "sysadmin")

    page = env.client.get("/console/schedules", headers=cookie)
    download = env.client.get(f"/console/report-runs/{run_id}/files/report.html", headers=cookie)

    assert f'href="/console/report-runs/{run_id}/files/report.html"' in page.text
    assert f'href="/console/report-runs/{run_id}/files/output.ipynb"' in page.text
    assert download.status_code == 200
    assert download.content == REPORT_HTML


def test_console_download_denied_to_modeller(env: Env) -> None:
    run_id, _folder = archived_run(env)

    response = env.client.get(f"/console/report-runs/{run_id}/files/report.html",
                              headers=console_cookie(env, "modeller_a"), follow_redirects=False)
    anonymous = env.client.get(f"/console/report-runs/{run_id}/files/report.html", follow_redirects=False)

    assert response.status_code == 403
    assert "季度风险" not in response.text
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == "/console/login"


@pytest.fixture
def own_env(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An env of its own on SQLite, because the key test destroys a platform data key version."""
    built = build_env("sqlite", f"sqlite:///{tmp_path / 'admin.db'}", tmp_path / "data",
                      make_project_root(tmp_path / "project"))
    with built.client:
        yield built
    built.client.app.state.engine.dispose()


def test_revoked_then_destroyed_key(own_env: Env) -> None:
    env = own_env
    store = open_keystore(env.settings, on_event=None)
    encrypted_under = store.rotate("platform", "data")
    run_id, folder = archived_run(env)
    assert json.loads((folder / "manifest.json").read_text())["files"]["report.html"]["key"] == \
        f"platform/data/v{encrypted_under}"
    store.rotate("platform", "data")
    assert _get(env, run_id, "report.html", "key-decrypt-only").content == REPORT_HTML

    store.revoke("platform", "data", encrypted_under, "test: suspected compromise")
    revoked = _get(env, run_id, "report.html", "key-revoked")

    assert revoked.status_code == 409
    assert revoked.json()["code"] == "REPORT_KEY_REVOKED"
    assert f"platform/data/v{encrypted_under}" in revoked.json()["detail"]
    _failure_audited(env, "key-revoked", "REPORT_KEY_REVOKED")

    store.destroy("platform", "data", encrypted_under)
    destroyed = _get(env, run_id, "report.html", "key-destroyed")

    assert destroyed.status_code == 410
    assert destroyed.json()["code"] == "REPORT_KEY_DESTROYED"
    assert "已销毁" in destroyed.json()["detail"]
    assert "季度风险" not in destroyed.text
    _failure_audited(env, "key-destroyed", "REPORT_KEY_DESTROYED")
    key_events = [event for event in audit_events(env, "key-destroyed") if event.action == "key.get"]
    assert [event.outcome for event in key_events] == ["failed"]
