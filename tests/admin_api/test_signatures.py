"""SM2 signatures of review decisions and notebook approvals: stored, summarised, downloadable and verifiable."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select, text

from admin_api.models import AuditEvent, ModelReview, ReportNotebook
from regsandbox_core.keystore import FileMasterKey, KeyStore
from regsandbox_core.signing import verify_object

from .conftest import BACKENDS, Env, build_env, make_project_root
from .helpers import approved_schedule, console_cookie, insert_run, notebook_id

REGSANDBOX = str(Path(sys.executable).parent / "regsandbox")


def _keystore(env: Env) -> KeyStore:
    return KeyStore(env.settings.keys_dir / "keystore.json", FileMasterKey(env.settings.secrets_dir / "master.key"))


def _new_version(env: Env, institution: str = "bank_a") -> tuple[str, str]:
    name = f"{institution}.signed_{secrets.token_hex(3)}"
    env.registry.add(name, "1", auc=0.75, ks=0.4)
    return name, "1"


def _review(env: Env, name: str, version: str, decision: str = "approved", comment: str = "区分度达标") -> dict:
    response = env.client.post(
        f"/api/v1/models/{name}/versions/{version}/review", headers=env.auth("reviewer"),
        json={"decision": decision, "comment": comment},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _listed(env: Env, name: str, version: str) -> dict:
    response = env.client.get("/api/v1/models", headers=env.auth("reviewer"))
    assert response.status_code == 200
    return next(item for item in response.json() if (item["name"], item["version"]) == (name, version))


def _verify_cli(env: Env, path: Path) -> subprocess.CompletedProcess:
    process_env = {key: value for key, value in os.environ.items() if not key.startswith("REGSANDBOX_")}
    process_env["REGSANDBOX_DATA_DIR"] = str(env.settings.data_dir)
    return subprocess.run([REGSANDBOX, "verify", str(path)], env=process_env, capture_output=True, text=True,
                          timeout=60)


def test_review_signed_with_payload(env: Env) -> None:
    name, version = _new_version(env)

    body = _review(env, name, version)

    assert body["signature"]["key"] == "platform/signing/v1"
    assert body["signature"]["valid"] is True
    assert body["signature"]["signed_at"]
    with env.db() as session:
        stored = session.get(ModelReview, body["id"]).signature
    verified = verify_object(json.loads(stored), _keystore(env))
    assert verified.kind == "model_review"
    assert verified.payload["review_id"] == body["id"]
    assert verified.payload["model_name"] == name
    assert verified.payload["model_version"] == version
    assert verified.payload["institution_code"] == "bank_a"
    assert verified.payload["decision"] == "approved"
    assert verified.payload["comment"] == "区分度达标"
    assert verified.payload["reviewer"] == "reviewer"
    assert verified.payload["decided_at"].startswith(body["decided_at"][:19])


def test_models_list_signature_summary(env: Env) -> None:
    name, version = _new_version(env)
    review = _review(env, name, version)

    item = _listed(env, name, version)

    assert item["review_id"] == review["id"]
    assert item["signature"] == review["signature"]


def test_tampered_review_row_invalid(env: Env) -> None:
    name, version = _new_version(env)
    review = _review(env, name, version, decision="returned", comment="样本期过短")

    with env.db() as session:
        session.execute(text("UPDATE model_reviews SET decision = 'approved' WHERE id = :id"), {"id": review["id"]})
        session.commit()
    item = _listed(env, name, version)

    assert item["review_status"] == "approved"
    assert item["signature"]["valid"] is False
    assert item["signature"]["key"] == "platform/signing/v1"


def test_tampered_review_envelope_invalid(env: Env) -> None:
    name, version = _new_version(env)
    review = _review(env, name, version)

    with env.db() as session:
        row = session.get(ModelReview, review["id"])
        envelope = json.loads(row.signature)
        envelope["payload"]["comment"] = "改过的意见"
        row.signature, row.comment = json.dumps(envelope, ensure_ascii=False), "改过的意见"
        session.commit()

    assert _listed(env, name, version)["signature"]["valid"] is False


def test_review_signature_download_verifies(env: Env, tmp_path: Path) -> None:
    name, version = _new_version(env)
    review = _review(env, name, version)

    response = env.client.get(f"/api/v1/model-reviews/{review['id']}/signature", headers=env.auth("reviewer"))
    path = tmp_path / "review.json"
    path.write_bytes(response.content)
    result = _verify_cli(env, path)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert "attachment" in response.headers["content-disposition"]
    assert f"model-review-{review['id']}.json" in response.headers["content-disposition"]
    assert result.returncode == 0, result.stderr
    assert "model_review（模型评审意见）" in result.stdout
    assert "platform/signing/v1" in result.stdout


def test_edited_review_download_fails_verify(env: Env, tmp_path: Path) -> None:
    name, version = _new_version(env)
    review = _review(env, name, version)
    response = env.client.get(f"/api/v1/model-reviews/{review['id']}/signature", headers=env.auth("reviewer"))
    envelope = response.json()
    envelope["payload"]["decision"] = "returned"
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(envelope, ensure_ascii=False), encoding="utf-8")

    result = _verify_cli(env, path)

    assert result.returncode == 1
    assert "签名与内容不符" in result.stderr
    assert "Traceback" not in result.stderr


def test_modeller_downloads_own_review(env: Env) -> None:
    name, version = _new_version(env, "bank_a")
    review = _review(env, name, version)

    response = env.client.get(f"/api/v1/model-reviews/{review['id']}/signature", headers=env.auth("modeller_a"))

    assert response.status_code == 200
    assert response.json()["payload"]["review_id"] == review["id"]


def test_modeller_denied_other_institution_review(env: Env) -> None:
    name, version = _new_version(env, "bank_b")
    review = _review(env, name, version)

    response = env.client.get(f"/api/v1/model-reviews/{review['id']}/signature", headers=env.auth("modeller_a"))

    assert response.status_code == 403
    assert response.json()["code"] == "INSTITUTION_FORBIDDEN"
    with env.db() as session:
        denial = session.scalars(select(AuditEvent).where(AuditEvent.actor == "modeller_a")
                                 .order_by(AuditEvent.id.desc())).first()
    assert (denial.outcome, denial.action) == ("denied", "models.read")
    assert f"/model-reviews/{review['id']}/signature" in denial.resource


def test_modeller_denied_unassigned_review(env: Env) -> None:
    review = _review(env, "scratch_model", "1", decision="returned", comment="请按机构代码命名")

    response = env.client.get(f"/api/v1/model-reviews/{review['id']}/signature", headers=env.auth("modeller_a"))

    assert response.status_code == 403
    assert response.json()["code"] == "INSTITUTION_FORBIDDEN"


@pytest.mark.parametrize("username, status, code", [("reporter_a", 403, "FORBIDDEN"), (None, 401, "NOT_AUTHENTICATED")])
def test_review_download_denied_roles(env: Env, username: str | None, status: int, code: str) -> None:
    name, version = _new_version(env)
    review = _review(env, name, version)
    headers = env.auth(username) if username else {}

    response = env.client.get(f"/api/v1/model-reviews/{review['id']}/signature", headers=headers)

    assert response.status_code == status
    assert response.json()["code"] == code


def test_review_download_unknown_id(env: Env) -> None:
    response = env.client.get("/api/v1/model-reviews/999999/signature", headers=env.auth("reviewer"))

    assert response.status_code == 404
    assert response.json()["code"] == "REVIEW_NOT_FOUND"


def test_unsigned_old_review_not_found(env: Env) -> None:
    name, version = _new_version(env)
    review = _review(env, name, version)
    with env.db() as session:
        session.execute(text("UPDATE model_reviews SET signature = NULL WHERE id = :id"), {"id": review["id"]})
        session.commit()

    response = env.client.get(f"/api/v1/model-reviews/{review['id']}/signature", headers=env.auth("reviewer"))

    assert response.status_code == 404
    assert response.json()["code"] == "SIGNATURE_NOT_FOUND"
    assert _listed(env, name, version)["signature"] is None


def _approve_quarterly(env: Env) -> dict:
    quarterly = notebook_id(env, "quarterly_risk")
    response = env.client.post(f"/api/v1/report-notebooks/{quarterly}/approve", headers=env.auth("reviewer"))
    assert response.status_code == 200, response.text
    return response.json()


def test_notebook_approval_signed(env: Env) -> None:
    body = _approve_quarterly(env)

    listed = env.client.get("/api/v1/report-notebooks", headers=env.auth("reviewer")).json()

    assert body["signature"]["valid"] is True
    assert body["signature"]["key"] == "platform/signing/v1"
    assert next(item for item in listed if item["id"] == body["id"])["signature"] == body["signature"]
    with env.db() as session:
        stored = session.get(ReportNotebook, body["id"]).signature
    verified = verify_object(json.loads(stored), _keystore(env))
    assert verified.kind == "notebook_approval"
    assert verified.payload["notebook_id"] == body["id"]
    assert verified.payload["path"] == "notebooks/reports/quarterly_risk.ipynb"
    assert verified.payload["sm3_digest"] == body["sm3_digest"]
    assert verified.payload["approved_by"] == "reviewer"
    assert verified.payload["name"] == body["name"]
    assert verified.payload["approved_at"]


def test_notebook_signature_download_verifies(env: Env, tmp_path: Path) -> None:
    body = _approve_quarterly(env)

    response = env.client.get(f"/api/v1/report-notebooks/{body['id']}/signature", headers=env.auth("sysadmin"))
    path = tmp_path / "approval.json"
    path.write_bytes(response.content)
    result = _verify_cli(env, path)

    assert response.status_code == 200
    assert f"notebook-approval-{body['id']}.json" in response.headers["content-disposition"]
    assert result.returncode == 0, result.stderr
    assert "notebook_approval（笔记本审批）" in result.stdout


@pytest.mark.parametrize("username", ["modeller_a", "reporter_a"])
def test_notebook_signature_denied_roles(env: Env, username: str) -> None:
    body = _approve_quarterly(env)

    response = env.client.get(f"/api/v1/report-notebooks/{body['id']}/signature", headers=env.auth(username))

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


def test_unapproved_notebook_no_signature(env: Env) -> None:
    with env.db() as session:
        notebook = ReportNotebook(name="未审批", path=f"notebooks/reports/pending_{secrets.token_hex(3)}.ipynb",
                                  status="pending")
        session.add(notebook)
        session.commit()
        pending = notebook.id

    response = env.client.get(f"/api/v1/report-notebooks/{pending}/signature", headers=env.auth("reviewer"))
    listed = env.client.get("/api/v1/report-notebooks", headers=env.auth("reviewer")).json()

    assert response.status_code == 404
    assert response.json()["code"] == "SIGNATURE_NOT_FOUND"
    assert next(item for item in listed if item["id"] == pending)["signature"] is None


def test_claim_carries_approval_envelope(env: Env) -> None:
    schedule = approved_schedule(env, fresh=True)
    run = insert_run(env, schedule, "queued")

    response = env.client.post(f"/api/v1/report-runs/{run}/claim", headers=env.service())

    assert response.status_code == 200, response.text
    body = response.json()
    verified = verify_object(body["approval_signature"], _keystore(env))
    assert verified.kind == "notebook_approval"
    assert verified.payload["sm3_digest"] == body["approved_sm3"]
    assert verified.payload["path"] == body["notebook_path"]
    assert verified.payload["notebook_id"] == body["notebook_id"]


def test_console_shows_signature_markers(env: Env) -> None:
    name, version = _new_version(env)
    _review(env, name, version)
    tampered_name, tampered_version = _new_version(env)
    tampered = _review(env, tampered_name, tampered_version)
    with env.db() as session:
        session.execute(text("UPDATE model_reviews SET comment = '改过' WHERE id = :id"), {"id": tampered["id"]})
        session.commit()
    _approve_quarterly(env)

    models_page = env.client.get("/console/models", headers=console_cookie(env, "reviewer")).text
    schedules_page = env.client.get("/console/schedules", headers=console_cookie(env, "reviewer")).text

    row = models_page.split(f"<td>{name}</td>", 1)[1].split("</tr>", 1)[0]
    tampered_row = models_page.split(f"<td>{tampered_name}</td>", 1)[1].split("</tr>", 1)[0]
    assert "已签名" in row
    assert "签名无效" in tampered_row
    notebook_row = schedules_page.split("<code>notebooks/reports/quarterly_risk.ipynb</code>", 1)[1].split("</tr>", 1)[0]
    assert "已签名" in notebook_row


# --- signing failure: a separate app, because the session-wide one must keep its signing key ---


@pytest.fixture
def revoked_env(request: pytest.FixtureRequest, database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    built = build_env(request.node.callspec.params["database_url"], database_url, data_dir,
                      make_project_root(tmp_path / "project"))
    with built.client:
        _keystore(built).revoke("platform", "signing", 1, "测试：签名密钥泄露")
        yield built
    built.client.app.state.engine.dispose()
    built.session_factory.kw["bind"].dispose()


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_revoked_key_review_not_stored(revoked_env: Env) -> None:
    env = revoked_env

    response = env.client.post(
        "/api/v1/models/bank_a.scorecard/versions/1/review", headers=env.auth("reviewer"),
        json={"decision": "approved", "comment": ""},
    )

    assert response.status_code == 503
    assert response.json()["code"] == "SIGNING_FAILED"
    assert "未保存" in response.json()["detail"]
    assert "platform/signing" in response.json()["detail"]
    with env.db() as session:
        assert session.scalars(select(ModelReview)).all() == []
        failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "models.review")).all()
    assert [(event.outcome, json.loads(event.detail)["code"]) for event in failed] == [("failed", "SIGNING_FAILED")]
    assert env.registry.versions[("bank_a.scorecard", "1")]["tags"] == {}


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_revoked_key_approval_not_stored(revoked_env: Env) -> None:
    env = revoked_env
    quarterly = notebook_id(env, "quarterly_risk")

    response = env.client.post(f"/api/v1/report-notebooks/{quarterly}/approve", headers=env.auth("reviewer"))

    assert response.status_code == 503
    assert response.json()["code"] == "SIGNING_FAILED"
    with env.db() as session:
        notebook = session.get(ReportNotebook, quarterly)
        assert (notebook.status, notebook.sm3_digest, notebook.signature) == ("pending", None, None)
        failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "notebooks.approve")).all()
    assert [event.outcome for event in failed] == ["failed"]


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_revoked_key_console_review_audited_once(revoked_env: Env) -> None:
    env = revoked_env
    cookie = console_cookie(env, "reviewer")
    page = env.client.get("/console/models", headers=cookie).text
    csrf = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]

    response = env.client.post("/console/models/review", headers=cookie, data={
        "csrf_token": csrf, "name": "bank_a.scorecard", "version": "1", "decision": "approved", "comment": "",
    })

    assert response.status_code == 503
    assert "未保存" in response.text
    with env.db() as session:
        failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "models.review")).all()
    assert len(failed) == 1
