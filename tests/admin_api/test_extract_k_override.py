"""Publishing an extract below k: the refused build's audit figures, the security administrator's override, denials.

The environment has the demo warehouse and k = 8 (``REGSANDBOX_EXTRACT_K_ANONYMITY``). Under the
default policy the smallest class over age band and personal_status_and_sex has 6 records at
bank_a, 8 at bank_b and 7 at bank_c, so bank_a and bank_c are refused and bank_b meets k. The
tests run in file order on one environment per backend.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from admin_api import manage
from admin_api.models import AuditEvent
from extracts.builder import MANIFEST_NAME
from extracts.demo_data import load_demo
from extracts.publish import current_build, extract_dir
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.signing import verify_file

from .conftest import BACKENDS, Env, backend_env
from .helpers import audit_events, console_cookie, serve_admin_api
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS
from .test_extracts import _sign_in, build, console_post

K = 8
SMALLEST_CLASS = {"bank_a": 6, "bank_b": 8, "bank_c": 7}
OVERRIDE_ROLES_DENIED = ["sysadmin", "reviewer", "analyst", "steward", "auditor", "modeller_a", "instadmin_a",
                         "reporter_a"]
"""One user of every role except the security administrator."""


@pytest.fixture(scope="module", params=BACKENDS)
def k_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REGSANDBOX_EXTRACT_K_ANONYMITY", str(K))
        for built in backend_env(request.param, tmp_path_factory, "k-override"):
            assert built.settings.extract_k_anonymity == K
            load_demo(built.settings)
            assert manage.policy_approve_default(built.settings) == 0
            yield built


def rid() -> str:
    return f"kov-{secrets.token_hex(6)}"


def override(env: Env, code: str, reason: str | None, user: str = "secadmin", request_id: str | None = None):  # noqa: ANN201
    headers = {**env.auth(user), **({"X-Request-ID": request_id} if request_id else {})}
    body = {} if reason is None else {"override_reason": reason}
    return env.client.post(f"/api/v1/extracts/{code}/publish-below-k", json=body, headers=headers)


def manifest(env: Env, code: str) -> dict:
    return json.loads((extract_dir(env.settings, code) / MANIFEST_NAME).read_text("utf-8"))


def override_events(env: Env, code: str) -> list[AuditEvent]:
    with env.db() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == "extracts.override_k",
                                                              AuditEvent.resource == f"extract:{code}")
                                    .order_by(AuditEvent.id)))


@pytest.mark.parametrize("code", ["bank_a", "bank_c"])
def test_build_below_k_audited_with_figures(k_env: Env, code: str) -> None:
    request_id = rid()

    response = build(k_env, code, request_id=request_id)

    assert response.status_code == 409
    assert response.json()["code"] == "EXTRACT_K_ANONYMITY_BELOW"
    assert f"最小等价类 {SMALLEST_CLASS[code]} 条" in response.json()["detail"]
    assert current_build(k_env.settings, code) is None
    (event,) = audit_events(k_env, request_id)
    assert (event.action, event.resource, event.outcome) == ("extracts.build", f"extract:{code}", "failed")
    detail = json.loads(event.detail)
    assert detail["code"] == "EXTRACT_K_ANONYMITY_BELOW"
    assert detail["k_anonymity"]["k"] == K
    (table,) = detail["k_anonymity"]["tables_below_k"]
    assert table["table"] == "applications"
    assert table["quasi_identifiers"] == ["age_in_years", "personal_status_and_sex"]
    assert table["min_class_size"] == SMALLEST_CLASS[code]
    assert 0 < table["records_below_k"] < table["rows"]


def test_refusal_shown_on_console(k_env: Env) -> None:
    as_security = k_env.client.get("/console/extracts/bank_a", headers=console_cookie(k_env, "secadmin"))
    as_system = k_env.client.get("/console/extracts/bank_a", headers=console_cookie(k_env, "sysadmin"))

    assert as_security.status_code == 200
    assert 'id="k-report"' in as_security.text
    assert "<td>6</td>" in as_security.text
    assert 'id="override-k"' in as_security.text
    assert as_system.status_code == 200
    assert 'id="k-report"' in as_system.text
    assert 'id="override-k"' not in as_system.text


@pytest.mark.parametrize("user", OVERRIDE_ROLES_DENIED)
def test_override_denied_by_role(k_env: Env, user: str) -> None:
    request_id = rid()

    response = override(k_env, "bank_a", "测试越权强制发布", user=user, request_id=request_id)

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"
    assert [(event.action, event.outcome) for event in audit_events(k_env, request_id)] == [
        ("extracts.override_k", "denied")]
    assert current_build(k_env.settings, "bank_a") is None


def test_console_override_denied_for_sysadmin(k_env: Env) -> None:
    response = console_post(k_env, "sysadmin", "/console/extracts/bank_a/publish-below-k",
                            {"override_reason": "系统管理员不应能强制发布"})

    assert response.status_code == 403
    assert current_build(k_env.settings, "bank_a") is None


def test_override_without_reason_rejected(k_env: Env) -> None:
    missing = override(k_env, "bank_a", None)
    request_id = rid()
    blank = override(k_env, "bank_a", "   ", request_id=request_id)

    assert missing.status_code == 422
    assert "缺少字段 override_reason（强制发布理由）" in missing.json()["detail"]
    assert blank.status_code == 400
    assert blank.json()["code"] == "EXTRACT_K_OVERRIDE_INVALID"
    assert "须填写理由" in blank.json()["detail"]
    assert [(event.action, event.outcome) for event in audit_events(k_env, request_id)] == [
        ("extracts.override_k", "failed")]
    assert current_build(k_env.settings, "bank_a") is None


def test_override_unknown_institution(k_env: Env) -> None:
    request_id = rid()

    response = override(k_env, "zz_nowhere", "测试不存在的机构", request_id=request_id)

    assert response.status_code == 404
    assert response.json()["code"] == "EXTRACT_INSTITUTION_NOT_FOUND"
    assert [(event.action, event.resource, event.outcome) for event in audit_events(k_env, request_id)] == [
        ("extracts.override_k", "extract:zz_nowhere", "failed")]


def test_override_publishes_below_k(k_env: Env) -> None:
    request_id = rid()
    reason = "监管专项检查急需，已确认小等价类不含敏感组合"

    response = override(k_env, "bank_a", reason, request_id=request_id)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["override_applied"], body["k"]) == ("published", True, K)
    assert [table["table"] for table in body["tables_below_k"]] == ["applications"]
    document = manifest(k_env, "bank_a")
    section = document["k_anonymity"]
    assert (section["k"], section["passed"]) == (K, False)
    assert (section["override"]["actor"], section["override"]["reason"]) == ("secadmin", reason)
    assert section["override"]["tables"] == ["applications"]
    verify_file(extract_dir(k_env.settings, "bank_a") / MANIFEST_NAME, open_keystore(k_env.settings))
    events = sorted(audit_events(k_env, request_id), key=lambda event: event.id)
    assert [(event.action, event.actor, event.outcome) for event in events] == [
        ("extracts.build", "secadmin", "success"), ("extracts.override_k", "secadmin", "success")]
    build_detail = json.loads(events[0].detail)
    assert (build_detail["trigger"], build_detail["reason"]) == ("k_override", reason)
    decision = json.loads(events[1].detail)
    assert decision["build_id"] == document["build_id"] == body["build_id"]
    assert (decision["reason"], decision["override_applied"], decision["k"]) == (reason, True, K)
    (table,) = decision["tables_below_k"]
    assert (table["table"], table["min_class_size"]) == ("applications", SMALLEST_CLASS["bank_a"])


def test_published_override_shown(k_env: Env) -> None:
    page = k_env.client.get("/console/extracts/bank_a", headers=console_cookie(k_env, "reviewer"))

    assert page.status_code == 200
    assert 'id="published-k"' in page.text
    assert "由安全管理员 secadmin" in page.text
    assert 'id="k-report"' not in page.text


def test_override_when_k_met_not_recorded(k_env: Env) -> None:
    request_id = rid()

    response = override(k_env, "bank_b", "核对：该机构已满足 k", request_id=request_id)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["override_applied"], body["tables_below_k"]) == ("published", False, [])
    section = manifest(k_env, "bank_b")["k_anonymity"]
    assert (section["passed"], section["override"]) == (True, None)
    decision = json.loads(override_events(k_env, "bank_b")[-1].detail)
    assert (decision["override_applied"], decision["status"]) == (False, "published")


def test_console_blank_reason_rejected(k_env: Env) -> None:
    refused = k_env.client.get("/console/extracts/bank_c", headers=console_cookie(k_env, "secadmin"))

    blank = console_post(k_env, "secadmin", "/console/extracts/bank_c/publish-below-k", {"override_reason": " "})

    assert 'id="override-k"' in refused.text
    assert blank.status_code == 400
    assert "须填写理由" in blank.text
    assert 'id="override-k"' in blank.text
    assert current_build(k_env.settings, "bank_c") is None
    assert [event.outcome for event in override_events(k_env, "bank_c")] == ["failed"]


@pytest.fixture
def served_k_env(k_env: Env, tmp_path: Path) -> Iterator[str]:
    """Serve the environment with uvicorn on 127.0.0.1 for the browser; return its URL."""
    with serve_admin_api(k_env, tmp_path / "uvicorn.log", REGSANDBOX_TOTP_REQUIRED_ROLES="[]",
                         REGSANDBOX_EXTRACT_K_ANONYMITY=str(K)) as url:
        yield url


def test_override_in_chromium(k_env: Env, served_k_env: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            admin = _sign_in(browser, served_k_env, k_env, "secadmin")
            admin.click("header a:has-text('数据提取')")
            admin.wait_for_load_state()
            admin.click("#extract-bank_c a")
            admin.wait_for_load_state()
            figures = admin.locator("#k-report tbody tr").inner_text()
            admin.fill("#override-k textarea[name=override_reason]", "浏览器中强制发布测试")
            admin.click("#override-k button[type=submit]")
            admin.wait_for_load_state()
            notice = admin.locator("p.notice").inner_text()
            published = admin.locator("#published-k").inner_text()
            form_left = admin.locator("#override-k").count()
        finally:
            browser.close()

    assert "applications" in figures
    assert str(SMALLEST_CLASS["bank_c"]) in figures.split()
    assert "已按安全管理员的决定强制发布" in notice
    assert "由安全管理员 secadmin" in published
    assert "浏览器中强制发布测试" in published
    assert form_left == 0
    assert manifest(k_env, "bank_c")["k_anonymity"]["override"]["reason"] == "浏览器中强制发布测试"
    assert [event.outcome for event in override_events(k_env, "bank_c")] == ["failed", "success"]
