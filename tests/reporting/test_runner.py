"""run_report with the real Papermill, the python3 kernel of the venv, the SMTP sink and an in-memory admin_api."""

from __future__ import annotations

import json
import stat

import nbformat
import pytest

from regsandbox_core.crypto import sm3_file
from regsandbox_core.keystore import FileMasterKey, KeyStore
from regsandbox_core.secrets import PlatformSecrets
from regsandbox_core.settings import PROJECT_ROOT
from reporting.runner import run_report
from tests.conftest import free_port

from .conftest import INVENTORY_PATH, make_run, read_archived, read_mail, sign_approval, write_notebook

MODELS = [
    {
        "name": "bank_a.retail_scorecard",
        "version": "3",
        "institution_code": "bank_a",
        "institution_name": "甲银行",
        "metrics": {"auc": 0.7712, "ks": 0.4123},
        "review": {"status": "approved", "comment": "区分度达标", "reviewer": "reviewer1"},
    },
    {
        "name": "bank_a.sme_pd",
        "version": "1",
        "institution_code": "bank_a",
        "institution_name": "甲银行",
        "metrics": {"auc": 0.69, "ks": 0.31},
        "review": {"status": "pending", "comment": None, "reviewer": None},
    },
    {
        "name": "bank_b.card_fraud",
        "version": "2",
        "institution_code": "bank_b",
        "institution_name": "乙银行",
        "metrics": {"val_auc": 0.81, "val_ks": 0.5},
        "auc": 0.81,
        "ks": 0.5,
        "review_status": "returned",
        "review_comment": "<b>样本期过短</b>",
        "reviewer": "reviewer2",
    },
]


def _inventory_run(keystore, run_id: int = 11) -> dict:
    return make_run(run_id, PROJECT_ROOT / INVENTORY_PATH, PROJECT_ROOT, keystore=keystore)


def test_inventory_emailed_and_archived(settings, keystore, secrets, admin_api, smtp_sink, report_settings):
    admin_api.models = MODELS

    result = run_report(settings, _inventory_run(keystore), secrets=secrets, report_settings=report_settings)

    assert (result.status, result.error_code) == ("succeeded", None), result.error_message
    archive = settings.reports_dir / "7" / "11"
    assert result.archive_path == archive
    assert result.finish_payload()["archive_path"] == str(archive)
    assert sorted(path.name for path in archive.iterdir()) == [
        "manifest.json", "manifest.json.sig", "output.ipynb.rssg", "report.html.rssg"]
    assert stat.S_IMODE(archive.stat().st_mode) == 0o700
    assert stat.S_IMODE((archive / "report.html.rssg").stat().st_mode) == 0o600
    assert not list((settings.reports_dir / ".staging").iterdir())

    manifest = json.loads((archive / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["run_id"] == 11
    assert manifest["status"] == "succeeded"
    assert manifest["notebook"]["digest"] == sm3_file(PROJECT_ROOT / INVENTORY_PATH)
    assert manifest["recipients"] == ["reviewer@regulator.example.cn"]
    assert manifest["encryption"] == "SM4-GCM-segmented/1"
    for name in ("report.html", "output.ipynb"):
        entry = manifest["files"][name]
        assert entry["ciphertext"] == f"{name}.rssg"
        assert entry["key"] == "platform/data/v1"
        assert entry["ciphertext_sm3"] == sm3_file(archive / f"{name}.rssg")
        assert entry["ciphertext_size"] == (archive / f"{name}.rssg").stat().st_size
    assert b"bank_a.retail_scorecard" not in (archive / "report.html.rssg").read_bytes()

    (message,) = read_mail(settings)
    assert message["Subject"].startswith("【监管沙箱报表】模型清单（")
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_filename() == f"模型清单-{manifest['report_date'].replace('-', '')}.html"
    html = attachment.get_payload(decode=True).decode("utf-8")
    assert "bank_a.retail_scorecard" in html
    assert "bank_b.card_fraud" in html
    assert "甲银行（bank_a）" in html
    assert "<td>0.7712</td>" in html
    assert "<td>0.8100</td>" in html
    for label in ("待审查", "已通过", "已退回"):
        assert label in html
    assert "&lt;b&gt;样本期过短&lt;/b&gt;" in html
    assert html == read_archived(settings, archive, "report.html").decode("utf-8")


def test_report_html_has_no_code(settings, keystore, secrets, admin_api, smtp_sink, report_settings):
    admin_api.models = MODELS

    result = run_report(settings, _inventory_run(keystore), secrets=secrets, report_settings=report_settings)

    html = read_archived(settings, result.archive_path, "report.html").decode("utf-8")
    assert "X-Regsandbox-Service" not in html
    assert "import httpx" not in html
    assert "def review_of" not in html
    assert "run_id = 11" not in html
    assert "https://cdnjs" not in html
    assert "模型清单" in html


def test_token_not_in_outputs(settings, keystore, secrets, admin_api, smtp_sink, report_settings):
    admin_api.models = MODELS

    result = run_report(settings, _inventory_run(keystore), secrets=secrets, report_settings=report_settings)

    for name in ("output.ipynb", "report.html"):
        assert secrets.service_token not in read_archived(settings, result.archive_path, name).decode("utf-8")
    assert secrets.service_token not in (result.archive_path / "manifest.json").read_text(encoding="utf-8")
    assert secrets.service_token not in read_mail(settings)[0].as_string()
    output = nbformat.reads(read_archived(settings, result.archive_path, "output.ipynb").decode("utf-8"), as_version=4)
    injected = next(cell for cell in output.cells if "injected-parameters" in cell.metadata.get("tags", []))
    assert "run_id = 11" in injected.source
    assert "TOKEN" not in injected.source


def test_inventory_empty_list(settings, keystore, secrets, admin_api, smtp_sink, report_settings):
    result = run_report(settings, _inventory_run(keystore, 12), secrets=secrets, report_settings=report_settings)

    assert result.status == "succeeded", result.error_message
    html = read_archived(settings, result.archive_path, "report.html").decode("utf-8")
    assert "暂无已登记的模型版本" in html


def test_unreachable_smtp_archives_nothing(settings, keystore, secrets, admin_api, report_settings):
    settings.smtp_port = free_port()
    admin_api.models = MODELS

    result = run_report(settings, _inventory_run(keystore, 13), secrets=secrets, report_settings=report_settings)

    assert result.status == "failed"
    assert result.error_code == "SMTP_UNREACHABLE"
    assert "REGSANDBOX_SMTP_HOST" in result.error_message
    assert not (settings.reports_dir / "7").exists()
    kept = settings.reports_dir / "failed" / "13"
    assert result.archive_path == kept
    assert sorted(path.name for path in kept.iterdir()) == [
        "manifest.json", "manifest.json.sig", "output.ipynb.rssg", "report.html.rssg"]
    assert "模型清单" in read_archived(settings, kept, "report.html").decode("utf-8")
    manifest = json.loads((kept / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "failed"
    assert manifest["error_code"] == "SMTP_UNREACHABLE"


def test_changed_notebook_not_executed(settings, keystore, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('已审批版本')"])
    run = make_run(21, path, project_root, keystore=keystore)
    write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('审批后被修改')"])

    result = run_report(settings, run, secrets=secrets, project_root=project_root, report_settings=report_settings)

    assert result.status == "failed"
    assert result.error_code == "NOTEBOOK_CHANGED"
    assert "重新审查" in result.error_message
    assert result.archive_path is None
    assert not (settings.reports_dir / "failed").exists()
    assert not (settings.reports_dir / "7").exists()
    assert not list((settings.reports_dir / ".staging").iterdir())


def test_failing_notebook_keeps_output(settings, keystore, secrets, project_root, smtp_sink, report_settings):
    path = write_notebook(
        project_root, "notebooks/reports/broken.ipynb",
        ["print('第一步完成')", "raise ValueError('样本数据缺失')", "print('不会执行')"],
    )

    result = run_report(
        settings, make_run(22, path, project_root, keystore=keystore), secrets=secrets, project_root=project_root,
        report_settings=report_settings,
    )

    assert result.status == "failed"
    assert result.error_code == "NOTEBOOK_FAILED"
    assert "ValueError: 样本数据缺失" in result.error_message
    kept = settings.reports_dir / "failed" / "22"
    assert result.archive_path == kept
    assert not (kept / "output.ipynb").exists()
    output = nbformat.reads(read_archived(settings, kept, "output.ipynb").decode("utf-8"), as_version=4)
    failing = [cell for cell in output.cells if cell.get("metadata", {}).get("papermill", {}).get("exception")]
    assert len(failing) == 1
    assert "样本数据缺失" in failing[0].outputs[-1]["evalue"]
    assert (kept / "manifest.json").is_file()
    assert not (settings.reports_dir / "7").exists()
    assert read_mail(settings) == []


def test_path_outside_project_rejected(settings, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["1"])
    run = make_run(23, path, project_root)
    run["notebook"]["path"] = "../../etc/passwd.ipynb"

    result = run_report(settings, run, secrets=secrets, project_root=project_root, report_settings=report_settings)

    assert result.error_code == "NOTEBOOK_PATH_INVALID"
    assert result.archive_path is None


def test_missing_notebook_reported(settings, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["1"])
    run = make_run(24, path, project_root)
    path.unlink()

    result = run_report(settings, run, secrets=secrets, project_root=project_root, report_settings=report_settings)

    assert result.error_code == "NOTEBOOK_NOT_FOUND"


def test_unsafe_run_id_rejected(settings, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["1"])
    run = make_run(25, path, project_root)
    run["id"] = "../25"

    result = run_report(settings, run, secrets=secrets, project_root=project_root, report_settings=report_settings)

    assert result.error_code == "RUN_INVALID"
    assert not settings.reports_dir.exists() or not (settings.reports_dir / "25").exists()


def test_cell_timeout_fails_run(settings, keystore, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/slow.ipynb", ["import time\ntime.sleep(30)"])
    report_settings.cell_timeout = 2

    result = run_report(
        settings, make_run(26, path, project_root, keystore=keystore), secrets=secrets, project_root=project_root,
        report_settings=report_settings,
    )

    assert result.status == "failed"
    assert result.error_code == "NOTEBOOK_FAILED"
    assert "超时" in result.error_message
    kept = settings.reports_dir / "failed" / "26"
    assert (kept / "papermill.log.rssg").is_file()
    assert not (kept / "papermill.log").exists()
    read_archived(settings, kept, "papermill.log")


def test_inventory_rejected_token_fails(settings, keystore, secrets, admin_api, smtp_sink, report_settings):
    wrong = PlatformSecrets("wrong-service-token", "s", "f", "p", "d")

    result = run_report(settings, _inventory_run(keystore, 27), secrets=wrong, report_settings=report_settings)

    assert result.status == "failed"
    assert result.error_code == "NOTEBOOK_FAILED"
    assert "HTTP 401" in result.error_message
    assert "服务令牌" in result.error_message
    assert "wrong-service-token" not in read_archived(settings, result.archive_path, "output.ipynb").decode("utf-8")
    assert read_mail(settings) == []


def test_unapproved_notebook_not_executed(settings, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["1"])
    run = make_run(28, path, project_root)
    run["notebook"]["digest"] = ""

    result = run_report(settings, run, secrets=secrets, project_root=project_root, report_settings=report_settings)

    assert result.error_code == "NOTEBOOK_NOT_APPROVED"
    assert result.archive_path is None


def _approval_failure(settings, run, project_root, report_settings, secrets):
    result = run_report(settings, run, secrets=secrets, project_root=project_root, report_settings=report_settings)
    assert result.status == "failed"
    assert result.archive_path is None
    staging = settings.reports_dir / ".staging"
    assert not staging.exists() or not list(staging.iterdir())
    return result


def test_missing_approval_signature_rejected(settings, keystore, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('不应执行')"])
    run = make_run(31, path, project_root)

    result = _approval_failure(settings, run, project_root, report_settings, secrets)

    assert result.error_code == "APPROVAL_SIGNATURE_INVALID"
    assert "没有平台签名" in result.error_message
    assert "重新审批" in result.error_message


def test_edited_approval_signature_rejected(settings, keystore, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('不应执行')"])
    run = make_run(32, path, project_root, keystore=keystore)
    run["approval_signature"]["payload"]["approved_by"] = "someone_else"

    result = _approval_failure(settings, run, project_root, report_settings, secrets)

    assert result.error_code == "APPROVAL_SIGNATURE_INVALID"
    assert "签名与内容不符" in result.error_message


def test_approval_of_other_digest_rejected(settings, keystore, secrets, project_root, report_settings):
    """A valid signature of another file's digest does not approve this file, even if the claim's digest matches."""
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('不应执行')"])
    run = make_run(33, path, project_root)
    run["approval_signature"] = sign_approval(keystore, {**run["notebook"], "digest": "0" * 64})

    result = _approval_failure(settings, run, project_root, report_settings, secrets)

    assert result.error_code == "APPROVAL_SIGNATURE_INVALID"
    assert "sm3_digest" in result.error_message


def test_approval_of_other_path_rejected(settings, keystore, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('不应执行')"])
    run = make_run(34, path, project_root)
    run["approval_signature"] = sign_approval(keystore, {**run["notebook"], "path": "notebooks/reports/other.ipynb"})

    result = _approval_failure(settings, run, project_root, report_settings, secrets)

    assert result.error_code == "APPROVAL_SIGNATURE_INVALID"
    assert "path" in result.error_message


def test_approval_by_foreign_key_rejected(settings, keystore, secrets, project_root, report_settings, tmp_path):
    foreign = KeyStore(tmp_path / "foreign" / "keystore.json", FileMasterKey.create(tmp_path / "foreign" / "master.key"))
    foreign.generate("platform", "signing")
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('不应执行')"])
    run = make_run(35, path, project_root)
    run["approval_signature"] = sign_approval(foreign, run["notebook"])

    result = _approval_failure(settings, run, project_root, report_settings, secrets)

    assert result.error_code == "APPROVAL_SIGNATURE_INVALID"
    assert "公钥" in result.error_message


def test_approval_under_revoked_key_rejected(settings, keystore, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('不应执行')"])
    run = make_run(36, path, project_root, keystore=keystore)
    keystore.revoke("platform", "signing", 1, "测试吊销")

    result = _approval_failure(settings, run, project_root, report_settings, secrets)

    assert result.error_code == "APPROVAL_SIGNATURE_INVALID"
    assert "已吊销" in result.error_message


def test_changed_file_with_valid_signature_rejected(settings, keystore, secrets, project_root, report_settings):
    """The signature and claim agree, but the file on disk is not the approved one."""
    path = write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('已审批版本')"])
    run = make_run(37, path, project_root, keystore=keystore)
    write_notebook(project_root, "notebooks/reports/demo.ipynb", ["print('审批后被修改')"])

    result = _approval_failure(settings, run, project_root, report_settings, secrets)

    assert result.error_code == "NOTEBOOK_CHANGED"


def test_archive_without_data_key_keeps_nothing(settings, keystore, secrets, project_root, report_settings):
    """A run whose files cannot be encrypted leaves no plaintext behind, in the archive or in staging."""
    from reporting.archive import ArchiveSealFailed

    path = write_notebook(project_root, "notebooks/reports/broken.ipynb", ["raise ValueError('样本数据缺失')"])
    keystore.revoke("platform", "data", 1, "test: no active platform data key")

    with pytest.raises(ArchiveSealFailed) as raised:
        run_report(settings, make_run(41, path, project_root, keystore=keystore), secrets=secrets,
                   project_root=project_root, report_settings=report_settings)

    assert raised.value.code == "ARCHIVE_ENCRYPTION_FAILED"
    assert "platform/data" in raised.value.message
    assert not (settings.reports_dir / "failed").exists()
    assert not list((settings.reports_dir / ".staging").iterdir())


def test_archive_after_rotation_uses_new_key(settings, keystore, secrets, project_root, report_settings):
    path = write_notebook(project_root, "notebooks/reports/broken.ipynb", ["raise ValueError('样本数据缺失')"])
    keystore.rotate("platform", "data")

    result = run_report(settings, make_run(42, path, project_root, keystore=keystore), secrets=secrets,
                        project_root=project_root, report_settings=report_settings)

    manifest = json.loads((result.archive_path / "manifest.json").read_text(encoding="utf-8"))
    assert {entry["key"] for entry in manifest["files"].values()} == {"platform/data/v2"}
    assert b"ValueError" in read_archived(settings, result.archive_path, "output.ipynb")
