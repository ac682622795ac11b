"""数据提取 and 脱敏策略 in admin_api: audited builds, policy approval with four-eyes, rebuild after a class change, lineage.

The environment contains the demo warehouse (applications of bank_a, bank_b and bank_c) and its
key store. The tests run in file order on one environment per backend: first without an approved
policy, then with the shipped default approved by ``manage policy-approve-default``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select

from admin_api import manage
from admin_api.extract_builds import BuildActor, run_builds
from admin_api.models import AuditEvent, MaskingPolicyDraft, User
from admin_api.security import csrf_token, hash_password
from extracts.builder import MANIFEST_NAME
from extracts.demo_data import load_demo
from extracts.policy import DEFAULT_POLICY_FILE, approved_dir, approved_path, approved_versions, load_approved_policy
from extracts.publish import current_build, extract_dir
from regsandbox_core.crypto import sm3_file
from regsandbox_core.keystore import KIND_TOKEN
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings

from .conftest import BACKENDS, Env, backend_env
from .helpers import audit_events, console_cookie, serve_admin_api
from .test_catalog import _accepted_partition
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS

POLICIES = "/api/v1/masking-policies"


@pytest.fixture(scope="module", params=BACKENDS)
def extract_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    for built in backend_env(request.param, tmp_path_factory, "extracts"):
        load_demo(built.settings)
        yield built


def rid() -> str:
    return f"ext-{secrets.token_hex(6)}"


def build(env: Env, code: str | None, user: str = "sysadmin", purpose: str = "测试重新生成", request_id: str | None = None):  # noqa: ANN201
    path = f"/api/v1/extracts/{code}/build" if code else "/api/v1/extracts/build"
    headers = {**env.auth(user), **({"X-Request-ID": request_id} if request_id else {})}
    return env.client.post(path, json={"purpose": purpose}, headers=headers)


def build_events(env: Env, resource: str) -> list[AuditEvent]:
    with env.db() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == "extracts.build",
                                                              AuditEvent.resource == resource)
                                    .order_by(AuditEvent.id)))


def policy_text(version: int, *, keep_c3: bool = False) -> str:
    text = DEFAULT_POLICY_FILE.read_text("utf-8").replace("version: 1", f"version: {version}")
    if keep_c3:
        text = text.replace("    match: {pi_categories: [C3]}\n    treatment: drop",
                            "    match: {pi_categories: [C3]}\n    treatment: token")
    return text


def add_security_admin(env: Env) -> str:
    """Store a second security administrator, so that a draft of ``secadmin`` can be approved by someone else."""
    username, password = f"sec_{secrets.token_hex(3)}", f"Pw-{secrets.token_urlsafe(12)}"
    with env.db() as session:
        session.add(User(username=username, display_name="第二安全管理员", email=f"{username}@regulator.example",
                         role="security_admin", password_hash=hash_password(password), is_active=True))
        session.commit()
    env.passwords[username] = password
    return username


def console_post(env: Env, username: str, path: str, data: dict, files: dict | None = None):  # noqa: ANN201
    cookie = console_cookie(env, username)
    session_token = cookie["Cookie"].split("=", 1)[1]
    form = {**data, "csrf_token": csrf_token(env.secrets.session_secret, session_token)}
    return env.client.post(path, data=form, files=files, headers=cookie, follow_redirects=False)


# --- without an approved policy ----------------------------------------------------------------------


def test_build_without_policy_fails_audited(extract_env: Env) -> None:
    request_id = rid()

    response = build(extract_env, "bank_a", request_id=request_id)

    assert response.status_code == 409
    assert response.json()["code"] == "POLICY_NOT_APPROVED"
    assert "脱敏策略" in response.json()["detail"]
    events = audit_events(extract_env, request_id)
    assert [(event.action, event.resource, event.outcome) for event in events] == [
        ("extracts.build", "extract:bank_a", "failed")]
    detail = json.loads(events[0].detail)
    assert (detail["code"], detail["trigger"], detail["reason"]) == ("POLICY_NOT_APPROVED", "manual", "测试重新生成")
    assert approved_versions(extract_env.settings) == []
    assert current_build(extract_env.settings, "bank_a") is None


def test_manage_approves_default_as_system(extract_env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    first = manage.policy_approve_default(extract_env.settings)
    second = manage.policy_approve_default(extract_env.settings)

    assert (first, second) == (0, 0)
    assert approved_versions(extract_env.settings) == [1]
    with extract_env.db() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "policies.approve")).all()
        rows = session.scalars(select(MaskingPolicyDraft)).all()
    assert [(event.actor, event.outcome, event.resource) for event in events] == [
        ("system:regsandbox-init", "success", "policy:v1")]
    assert json.loads(events[0].detail)["source"] == "shipped_default"
    assert [(row.state, row.uploaded_by, row.decided_by) for row in rows] == [
        ("approved", "system:regsandbox-init", "system:regsandbox-init")]
    err = capsys.readouterr().err
    assert "已审批平台默认脱敏策略" in err
    assert "未作改动" in err


def test_manage_extracts_build_audits_each(extract_env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    # The prefix the launcher and the API use, so that the rebuild below finds the same owner and group
    # whether or not the Unix groups exist on this machine.
    status = manage.extracts_build(extract_env.settings, None, extract_env.settings.unix_prefix)

    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["institution"], line["status"]) for line in lines] == [
        ("bank_a", "published"), ("bank_b", "published"), ("bank_c", "published")]
    for line in lines:
        events = build_events(extract_env, f"extract:{line['institution']}")
        detail = json.loads(events[-1].detail)
        assert events[-1].outcome == "success"
        assert events[-1].actor.startswith("cli:")
        assert events[-1].role == "operator"
        assert detail["trigger"] == "operator"
        assert detail["build_id"] == line["build_id"]
        assert detail["policy"]["version"] == 1
        manifest = extract_dir(extract_env.settings, line["institution"]) / MANIFEST_NAME
        assert detail["manifest_sm3"] == sm3_file(manifest)


# --- builds through the API ----------------------------------------------------------------------------


def test_rebuild_unchanged_audited(extract_env: Env) -> None:
    before = current_build(extract_env.settings, "bank_b")
    request_id = rid()

    response = build(extract_env, "bank_b", user="secadmin", purpose="轮换密钥后核对", request_id=request_id)

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "unchanged"
    assert current_build(extract_env.settings, "bank_b") == before
    events = audit_events(extract_env, request_id)
    assert [(event.actor, event.outcome) for event in events] == [("secadmin", "success")]
    detail = json.loads(events[0].detail)
    assert (detail["status"], detail["reason"]) == ("unchanged", "轮换密钥后核对")


def test_extract_detail_from_manifest(extract_env: Env) -> None:
    response = extract_env.client.get("/api/v1/extracts/bank_a", headers=extract_env.auth("reviewer"))

    assert response.status_code == 200
    published = response.json()["published"]
    manifest_path = extract_dir(extract_env.settings, "bank_a") / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text("utf-8"))
    assert published["status"] == "published"
    assert published["build_id"] == manifest["build_id"]
    assert published["manifest_sm3"] == sm3_file(manifest_path)
    assert published["policy"]["version"] == 1
    assert published["token_key"] == "bank_a/token/v1"
    assert [(table["name"], table["rows"]) for table in published["tables"]] == [
        (table["name"], table["row_count"]) for table in manifest["tables"]]
    assert published["tables"][0]["rows"] > 0
    history = response.json()["history"]
    assert history[0]["build_id"] == manifest["build_id"]
    assert history[-1]["code"] == "POLICY_NOT_APPROVED"


def test_tampered_manifest_shown_invalid(extract_env: Env) -> None:
    manifest_path = extract_dir(extract_env.settings, "bank_c") / MANIFEST_NAME
    original = manifest_path.read_bytes()
    manifest_path.write_bytes(original.replace(b'"row_count": ', b'"row_count": 1'))
    try:
        response = extract_env.client.get("/api/v1/extracts/bank_c", headers=extract_env.auth("analyst"))
    finally:
        manifest_path.write_bytes(original)

    assert response.status_code == 200
    assert response.json()["published"]["status"] == "invalid"
    assert "SM2 签名验证失败" in response.json()["published"]["error"]


def test_institution_user_sees_own_only(extract_env: Env) -> None:
    listing = extract_env.client.get("/api/v1/extracts", headers=extract_env.auth("modeller_a"))
    own = extract_env.client.get("/api/v1/extracts/bank_a", headers=extract_env.auth("instadmin_a"))
    request_id = rid()
    other = extract_env.client.get("/api/v1/extracts/bank_b",
                                   headers={**extract_env.auth("modeller_a"), "X-Request-ID": request_id})

    assert [item["institution"] for item in listing.json()] == ["bank_a"]
    assert own.status_code == 200
    assert all(item["institution"] in ("bank_a", "*") for item in own.json()["history"])
    assert other.status_code == 403
    assert other.json()["code"] == "INSTITUTION_FORBIDDEN"
    assert [(event.action, event.outcome) for event in audit_events(extract_env, request_id)] == [
        ("extracts.read", "denied")]


def test_console_other_institution_denied(extract_env: Env) -> None:
    page = extract_env.client.get("/console/extracts", headers=console_cookie(extract_env, "modeller_a"))
    other = extract_env.client.get("/console/extracts/bank_b", headers=console_cookie(extract_env, "modeller_a"))

    assert page.status_code == 200
    assert 'id="extract-bank_a"' in page.text
    assert "bank_b" not in page.text
    assert "重新生成全部机构" not in page.text
    assert other.status_code == 403


@pytest.mark.parametrize("user", ["reporter_a", "auditor"])
def test_extract_read_denied(extract_env: Env, user: str) -> None:
    response = extract_env.client.get("/api/v1/extracts", headers=extract_env.auth(user))

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


@pytest.mark.parametrize("user", ["reviewer", "analyst", "steward", "auditor", "modeller_a", "instadmin_a"])
def test_build_denied_by_role(extract_env: Env, user: str) -> None:
    before = current_build(extract_env.settings, "bank_a")
    request_id = rid()

    response = build(extract_env, "bank_a", user=user, request_id=request_id)

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"
    assert [(event.action, event.outcome) for event in audit_events(extract_env, request_id)] == [
        ("extracts.build", "denied")]
    assert current_build(extract_env.settings, "bank_a") == before


def test_history_leaves_out_denials(extract_env: Env) -> None:
    assert build(extract_env, "bank_a", user="analyst").status_code == 403

    page = extract_env.client.get("/console/extracts", headers=console_cookie(extract_env, "reviewer"))
    detail = extract_env.client.get("/api/v1/extracts/bank_a", headers=extract_env.auth("reviewer"))

    assert page.status_code == 200
    assert 'id="build-history"' in page.text
    assert {item["outcome"] for item in detail.json()["history"]} <= {"success", "failed"}


def test_build_needs_purpose_and_known_code(extract_env: Env) -> None:
    missing = extract_env.client.post("/api/v1/extracts/bank_a/build", json={}, headers=extract_env.auth("sysadmin"))
    unknown = build(extract_env, "zz_nowhere")

    assert missing.status_code == 422
    assert "重新生成原因" in missing.json()["detail"]
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "EXTRACT_INSTITUTION_NOT_FOUND"


@pytest.fixture
def copied_settings(extract_env: Env, tmp_path: Path) -> Settings:
    """Settings of a copy of the environment's data directory (same database), for damage the other tests must not see."""
    copy = tmp_path / "data"
    shutil.copytree(extract_env.settings.data_dir, copy, symlinks=True,
                    ignore=shutil.ignore_patterns("admin.db*"))
    # copytree keeps modes but not owners. An extract shared with an institution's Unix group (when
    # the group exists on this machine) would otherwise differ from what a rebuild wants.
    source = extract_env.settings.data_dir
    for path in [copy, *copy.rglob("*")]:
        status = (source / path.relative_to(copy)).lstat()
        os.lchown(path, status.st_uid, status.st_gid)
    return Settings(data_dir=copy, database_url=extract_env.settings.database_url)


def test_bad_input_failures_audited(extract_env: Env, copied_settings: Settings) -> None:
    store = open_keystore(copied_settings)
    store.revoke("bank_c", KIND_TOKEN, store.current("bank_c", KIND_TOKEN).version, "测试吊销")
    actor = BuildActor(f"tester-{secrets.token_hex(3)}", "security_admin")

    results = run_builds(extract_env.session_factory, copied_settings, store, actor, ["bank_a", "bank_c"],
                         unix_group_prefix=copied_settings.unix_prefix)

    assert [(result.institution, result.status) for result in results] == [("bank_a", "unchanged"),
                                                                            ("bank_c", "failed")]
    assert results[1].error.code == "EXTRACT_KEY_MISSING"
    with extract_env.db() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.actor == actor.username)
                                 .order_by(AuditEvent.id)).all()
    assert [(event.resource, event.outcome) for event in events] == [("extract:bank_a", "success"),
                                                                     ("extract:bank_c", "failed")]
    failure = json.loads(events[1].detail)
    assert failure["code"] == "EXTRACT_KEY_MISSING"
    assert "令牌化密钥" in failure["message"]


def test_unwritable_extract_dir_audited(extract_env: Env, copied_settings: Settings) -> None:
    shutil.rmtree(copied_settings.extracts_dir)
    copied_settings.extracts_dir.write_text("not a folder")
    actor = BuildActor(f"tester-{secrets.token_hex(3)}", "system_admin")

    results = run_builds(extract_env.session_factory, copied_settings, open_keystore(copied_settings), actor,
                         ["bank_a"])

    assert results[0].error.code == "EXTRACT_DIR_NOT_WRITABLE"
    with extract_env.db() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.actor == actor.username)).one()
    assert event.outcome == "failed"
    assert "EXTRACT_DIR_NOT_WRITABLE" in event.detail


def test_tampered_policy_fails_every_build(extract_env: Env, copied_settings: Settings) -> None:
    with approved_path(copied_settings, 1).open("a", encoding="utf-8") as stream:
        stream.write("# changed after approval\n")
    actor = BuildActor(f"tester-{secrets.token_hex(3)}", "security_admin")

    results = run_builds(extract_env.session_factory, copied_settings, open_keystore(copied_settings), actor)

    assert {result.error.code for result in results} == {"POLICY_SIGNATURE_INVALID"}
    assert len(results) == 3
    with extract_env.db() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.actor == actor.username)).all()
    assert sorted(event.resource for event in events) == ["extract:bank_a", "extract:bank_b", "extract:bank_c"]
    assert {event.outcome for event in events} == {"failed"}


# --- masking policy approval ---------------------------------------------------------------------------


def test_policy_keeping_c3_rejected(extract_env: Env) -> None:
    request_id = rid()

    response = extract_env.client.post(f"{POLICIES}/drafts", json={"content": policy_text(7, keep_c3=True)},
                                       headers={**extract_env.auth("steward"), "X-Request-ID": request_id})

    assert response.status_code == 422
    assert response.json()["code"] == "POLICY_C3_NOT_DROPPED"
    assert "C3" in response.json()["detail"]
    assert [(event.action, event.outcome) for event in audit_events(extract_env, request_id)] == [
        ("policies.draft", "failed")]
    with extract_env.db() as session:
        assert session.scalars(select(MaskingPolicyDraft).where(MaskingPolicyDraft.version == 7)).first() is None


def test_approved_version_cannot_be_uploaded(extract_env: Env) -> None:
    response = extract_env.client.post(f"{POLICIES}/drafts", json={"content": policy_text(1)},
                                       headers=extract_env.auth("secadmin"))

    assert response.status_code == 409
    assert response.json()["code"] == "POLICY_VERSION_EXISTS"


def test_draft_approved_by_other_person(extract_env: Env) -> None:
    uploaded = extract_env.client.post(f"{POLICIES}/drafts", json={"content": policy_text(2)},
                                       headers=extract_env.auth("steward"))
    assert uploaded.status_code == 201, uploaded.text
    draft = uploaded.json()
    steward_try = extract_env.client.post(f"{POLICIES}/drafts/{draft['id']}/approve",
                                          headers=extract_env.auth("steward"))
    request_id = rid()

    approved = extract_env.client.post(f"{POLICIES}/drafts/{draft['id']}/approve",
                                       headers={**extract_env.auth("secadmin"), "X-Request-ID": request_id})
    again = extract_env.client.post(f"{POLICIES}/drafts/{draft['id']}/approve", headers=extract_env.auth("secadmin"))

    assert draft["state"] == "draft"
    mask_mobile = next(rule for rule in draft["rules"] if rule["id"] == "mask-mobile")
    assert mask_mobile["treatment_name"] == "部分遮盖：手机号码保留前 3 位和后 4 位"
    assert next(rule for rule in draft["rules"] if rule["id"] == "drop-c3")["categories"] == "C3"
    assert steward_try.status_code == 403
    assert approved.status_code == 200, approved.text
    assert (approved.json()["state"], approved.json()["decided_by"]) == ("approved", "secadmin")
    assert again.status_code == 409
    assert again.json()["code"] == "POLICY_DRAFT_DECIDED"
    policy = load_approved_policy(extract_env.settings, open_keystore(extract_env.settings), 2)
    assert policy.signature_key == approved.json()["signature_key"]
    events = audit_events(extract_env, request_id)
    assert [(event.action, event.actor, event.outcome) for event in events] == [
        ("policies.approve", "secadmin", "success")]
    assert json.loads(events[0].detail)["uploaded_by"] == "steward"


def test_uploader_cannot_approve_own(extract_env: Env) -> None:
    uploaded = extract_env.client.post(f"{POLICIES}/drafts", json={"content": policy_text(3)},
                                       headers=extract_env.auth("secadmin"))
    assert uploaded.status_code == 201, uploaded.text
    draft_id = uploaded.json()["id"]
    request_id = rid()

    own = extract_env.client.post(f"{POLICIES}/drafts/{draft_id}/approve",
                                  headers={**extract_env.auth("secadmin"), "X-Request-ID": request_id})
    duplicate = extract_env.client.post(f"{POLICIES}/drafts", json={"content": policy_text(3)},
                                        headers=extract_env.auth("steward"))
    other = extract_env.client.post(f"{POLICIES}/drafts/{draft_id}/approve",
                                    headers=extract_env.auth(add_security_admin(extract_env)))

    assert own.status_code == 403
    assert own.json()["code"] == "POLICY_FOUR_EYES"
    assert "另一名安全管理员" in own.json()["detail"]
    assert [(event.action, event.outcome) for event in audit_events(extract_env, request_id)] == [
        ("policies.approve", "failed")]
    assert duplicate.status_code == 409
    assert duplicate.json()["code"] == "POLICY_DRAFT_EXISTS"
    assert other.status_code == 200, other.text
    assert 3 in approved_versions(extract_env.settings)


def test_reject_draft_with_reason(extract_env: Env) -> None:
    uploaded = extract_env.client.post(f"{POLICIES}/drafts", json={"content": policy_text(4)},
                                       headers=extract_env.auth("steward"))
    draft_id = uploaded.json()["id"]

    no_reason = extract_env.client.post(f"{POLICIES}/drafts/{draft_id}/reject", json={"rejection_reason": ""},
                                        headers=extract_env.auth("secadmin"))
    rejected = extract_env.client.post(f"{POLICIES}/drafts/{draft_id}/reject",
                                       json={"rejection_reason": "未说明修改依据"}, headers=extract_env.auth("secadmin"))

    assert no_reason.status_code == 422
    assert "驳回原因" in no_reason.json()["detail"]
    assert rejected.status_code == 200
    assert (rejected.json()["state"], rejected.json()["decision_reason"]) == ("rejected", "未说明修改依据")
    assert 4 not in approved_versions(extract_env.settings)


@pytest.mark.parametrize(("user", "method", "path"), [
    ("analyst", "POST", f"{POLICIES}/drafts"),
    ("sysadmin", "POST", f"{POLICIES}/drafts"),
    ("steward", "POST", f"{POLICIES}/drafts/1/approve"),
    ("sysadmin", "POST", f"{POLICIES}/drafts/1/approve"),
    ("modeller_a", "GET", POLICIES),
    ("reviewer", "GET", POLICIES),
])
def test_policy_routes_denied(extract_env: Env, user: str, method: str, path: str) -> None:
    body = {"content": policy_text(9)} if path.endswith("drafts") else None

    response = extract_env.client.request(method, path, json=body, headers=extract_env.auth(user))

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


def test_new_policy_reaches_build(extract_env: Env) -> None:
    response = build(extract_env, "bank_a", user="secadmin", purpose="审批脱敏策略第 3 版后重新生成")

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "published"
    manifest = json.loads((extract_dir(extract_env.settings, "bank_a") / MANIFEST_NAME).read_text("utf-8"))
    assert manifest["policy"]["version"] == 3
    listing = extract_env.client.get(POLICIES, headers=extract_env.auth("auditor"))
    assert [item["version"] for item in listing.json()["approved"]] == [3, 2, 1]
    assert all(item["valid"] for item in listing.json()["approved"])


# --- rebuild after a class change, and lineage ----------------------------------------------------------


def manifest_column(settings: Settings, code: str, table: str, column: str) -> tuple[dict, dict]:
    manifest = json.loads((extract_dir(settings, code) / MANIFEST_NAME).read_text("utf-8"))
    entry = next(item for item in manifest["tables"] if item["source"]["table"] == table)
    found = next(item for item in entry["columns"] + entry["dropped_columns"] if item["name"] == column)
    return manifest, found


def test_class_change_rebuilds_extract(extract_env: Env, tmp_path: Path) -> None:
    _accepted_partition(extract_env, "EAST_DBHTB", "bank_a", date(2020, 6, 30),
                        {"DBHTH": [f"DB{index:05d}" for index in range(12)], "DBHTZT": ["01"] * 12}, tmp_path)
    assert build(extract_env, "bank_a").status_code == 200
    _manifest, before = manifest_column(extract_env.settings, "bank_a", "EAST_DBHTB", "DBHTZT")
    version = extract_env.client.get("/api/v1/catalog/columns/EAST_DBHTB/DBHTZT",
                                     headers=extract_env.auth("steward")).json()["version"]
    request_id = rid()

    response = extract_env.client.post(
        "/api/v1/catalog/columns/EAST_DBHTB/DBHTZT/classification",
        json={"level": 2, "kind": "other", "version": version},
        headers={**extract_env.auth("steward"), "X-Request-ID": request_id})
    finished = extract_env.client.app.state.extract_rebuilds.wait_idle(timeout=120)

    assert response.status_code == 200, response.text
    assert response.headers["X-Extract-Rebuilds"] == "bank_a"
    assert finished
    assert before["class"]["level"] == 4
    assert before["treatment"] == "token"
    manifest, after = manifest_column(extract_env.settings, "bank_a", "EAST_DBHTB", "DBHTZT")
    assert after["class"] == {"level": 2, "pi_category": None, "kind": "other"}
    assert after["treatment"] == "keep"
    events = sorted(audit_events(extract_env, request_id), key=lambda event: event.id)
    assert [(event.action, event.outcome) for event in events] == [("catalog.confirm", "success"),
                                                                   ("extracts.build", "success")]
    detail = json.loads(events[1].detail)
    assert (detail["trigger"], detail["build_id"]) == ("catalog_change", manifest["build_id"])
    assert "EAST_DBHTB.DBHTZT" in detail["reason"]


def test_lineage_from_signed_manifest(extract_env: Env) -> None:
    manifest, entry = manifest_column(extract_env.settings, "bank_a", "EAST_DBHTB", "DBHTZT")

    response = extract_env.client.get("/api/v1/catalog/columns/EAST_DBHTB/DBHTZT/lineage",
                                      headers=extract_env.auth("reviewer"))
    page = extract_env.client.get("/console/catalog/columns/EAST_DBHTB/DBHTZT",
                                  headers=console_cookie(extract_env, "steward"))

    assert response.status_code == 200
    extracts = response.json()["extracts"]
    assert extracts["status"] == "built"
    assert extracts["columns"] == [{
        "institution": "bank_a", "build_id": manifest["build_id"], "built_at": manifest["built_at"],
        "policy_version": 3, "extract_table": "east_dbhtb", "extract_file": "east_dbhtb.parquet",
        "extract_column": "DBHTZT", "treatment": "keep", "treatment_name": "保留", "rule": entry["rule"],
        "class": {"level": 2, "pi_category": None, "kind": "other"}}]
    assert 'id="lineage-extracts"' in page.text
    assert manifest["build_id"] in page.text


def test_lineage_ignores_unverified_manifest(extract_env: Env) -> None:
    manifest_path = extract_dir(extract_env.settings, "bank_a") / MANIFEST_NAME
    original = manifest_path.read_bytes()
    manifest_path.write_bytes(original.replace(b'"keep"', b'"drop"', 1))
    try:
        response = extract_env.client.get("/api/v1/catalog/columns/EAST_DBHTB/DBHTZT/lineage",
                                          headers=extract_env.auth("reviewer"))
    finally:
        manifest_path.write_bytes(original)

    extracts = response.json()["extracts"]
    assert extracts["status"] == "not_built"
    assert extracts["columns"] == []
    assert extracts["invalid"][0]["institution"] == "bank_a"


# --- console pages ---------------------------------------------------------------------------------------


def test_console_extract_page_and_rebuild(extract_env: Env) -> None:
    manifest_sm3 = sm3_file(extract_dir(extract_env.settings, "bank_b") / MANIFEST_NAME)
    page = extract_env.client.get("/console/extracts/bank_b", headers=console_cookie(extract_env, "sysadmin"))
    no_purpose = console_post(extract_env, "sysadmin", "/console/extracts/bank_b/build", {"purpose": ""})
    rebuilt = console_post(extract_env, "sysadmin", "/console/extracts/bank_b/build", {"purpose": "控制台重新生成"})

    assert page.status_code == 200
    assert 'id="build-one"' in page.text
    assert manifest_sm3 in page.text
    assert no_purpose.status_code == 422
    assert "重新生成的原因" in no_purpose.text
    assert rebuilt.status_code == 303
    assert rebuilt.headers["location"].startswith("/console/extracts/bank_b?done=built")
    events = build_events(extract_env, "extract:bank_b")
    assert (events[-1].actor, json.loads(events[-1].detail)["reason"]) == ("sysadmin", "控制台重新生成")


def test_console_policy_upload_and_four_eyes(extract_env: Env) -> None:
    invalid = console_post(extract_env, "steward", "/console/policies/drafts", {},
                           files={"file": ("bad.yaml", policy_text(8, keep_c3=True).encode("utf-8"), "text/yaml")})
    uploaded = console_post(extract_env, "secadmin", "/console/policies/drafts", {},
                            files={"file": ("v8.yaml", policy_text(8).encode("utf-8"), "text/yaml")})
    draft_page = extract_env.client.get(uploaded.headers["location"], headers=console_cookie(extract_env, "secadmin"))
    draft_id = uploaded.headers["location"].split("/")[-1].split("?")[0]
    own = console_post(extract_env, "secadmin", f"/console/policies/drafts/{draft_id}/approve", {})
    policies = extract_env.client.get("/console/policies", headers=console_cookie(extract_env, "auditor"))

    assert invalid.status_code == 422
    assert "bad.yaml 未上传" in invalid.text
    assert "C3" in invalid.text
    assert uploaded.status_code == 303
    assert "rule-mask-mobile" in draft_page.text
    assert "须由其他安全管理员审批" in draft_page.text
    assert 'id="approve"' not in draft_page.text
    assert own.status_code == 403
    assert "双人复核" in own.text
    assert policies.status_code == 200
    assert f'id="draft-{draft_id}"' in policies.text
    assert "upload-policy" not in policies.text
    assert approved_dir(extract_env.settings).is_dir()


@pytest.fixture
def served_extract_env(extract_env: Env, tmp_path: Path) -> Iterator[str]:
    """Serve the extract environment with uvicorn on 127.0.0.1 for the browser; return its URL."""
    with serve_admin_api(extract_env, tmp_path / "uvicorn.log", REGSANDBOX_TOTP_REQUIRED_ROLES="[]") as url:
        yield url


def _sign_in(browser, url: str, env: Env, username: str):  # noqa: ANN001, ANN202
    page = browser.new_context().new_page()
    page.goto(f"{url}/console/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", env.passwords[username])
    page.click("button[type=submit]")
    page.wait_for_load_state()
    return page


def test_policy_approval_in_chromium(extract_env: Env, served_extract_env: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            steward = _sign_in(browser, served_extract_env, extract_env, "steward")
            steward.click("header a:has-text('脱敏策略')")
            steward.wait_for_load_state()
            steward.set_input_files("#upload-policy input[type=file]", files=[
                {"name": "v5.yaml", "mimeType": "text/yaml", "buffer": policy_text(5).encode("utf-8")}])
            steward.click("#upload-policy button[type=submit]")
            steward.wait_for_load_state()
            assert "须经安全管理员审批" in steward.locator("p.notice").inner_text()
            draft_url = steward.url.split("?")[0]

            admin = _sign_in(browser, served_extract_env, extract_env, "secadmin")
            admin.goto(draft_url)
            assert "手机号码保留前 3 位和后 4 位" in admin.locator("#rule-mask-mobile").inner_text()
            admin.click("#approve button[type=submit]")
            admin.wait_for_load_state()
            assert admin.locator("#draft-state").inner_text() == "已审批"

            admin.click("header a:has-text('数据提取')")
            admin.wait_for_load_state()
            admin.click("#extract-bank_c a")
            admin.wait_for_load_state()
            admin.fill("#build-one input[name=purpose]", "审批第 5 版后重新生成")
            admin.click("#build-one button[type=submit]")
            admin.wait_for_load_state()
            assert "1 家机构发布了新版本" in admin.locator("p.notice").inner_text()
            assert "第 5 版" in admin.locator("#published").inner_text()
        finally:
            browser.close()
