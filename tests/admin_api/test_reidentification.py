"""令牌反查: who may look up the raw value behind an extract token, the checks on a request, and its audit trail.

The module has its own environment per backend with the demo warehouse loaded and the extracts of
bank_a and bank_b built by :mod:`extracts.builder`, so every token comes from a real extract. The
hourly limit and the key rotation at the end change state that other modules must not see.
"""

from __future__ import annotations

import io
import json
import re
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from sqlalchemy import func, select

from admin_api.db import utc_now
from admin_api.models import AuditEvent
from extracts.builder import build_extract
from extracts.demo_data import load_demo
from extracts.warehouse import read_partition_bytes
from regsandbox_core.crypto import keyed_token
from regsandbox_core.keystore import KIND_TOKEN
from regsandbox_core.platform_keys import open_keystore

from .conftest import BACKENDS, Env, backend_env
from .helpers import audit_events, console_cookie
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS, served_admin_api  # noqa: F401 - fixture
from tests.extract_setup import approve_shipped_policy

PATH = "/api/v1/reidentification"
CASE = "沪金稽〔2026〕15号"
REASON = "核查该客户在多家机构的共债情况"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from backend_env(request.param, tmp_path_factory, "reident")


@pytest.fixture(scope="module")
def warehouse(env: Env) -> dict[str, pl.DataFrame]:
    """Load the demo warehouse, build the extracts of bank_a and bank_b, and return their raw rows."""
    load_demo(env.settings)
    approve_shipped_policy(env.settings)
    store = open_keystore(env.settings)
    raw = {}
    for code in ("bank_a", "bank_b"):
        build_extract(env.settings, code)
        raw[code] = pl.read_parquet(io.BytesIO(read_partition_bytes(env.settings, store, code)))
    return raw


def extract_tokens(env: Env, institution: str) -> set[str]:
    folder = env.settings.extracts_dir / institution
    return set(pl.read_parquet(folder / "applications.parquet")["id_number"].to_list())


def token_of(env: Env, institution: str, value: str, version: int | None = None) -> str:
    store = open_keystore(env.settings)
    key = store.current(institution, KIND_TOKEN) if version is None else store.get(institution, KIND_TOKEN, version)
    return keyed_token(key.key, value)


def lookup(env: Env, username: str | None, request_id: str | None = None, **fields: Any) -> Any:
    body = {"institution": "bank_a", "table": "applications", "column": "id_number", "case_number": CASE,
            "reason": REASON, **fields}
    headers = env.auth(username) if username else {}
    if request_id:
        headers = {**headers, "X-Request-ID": request_id}
    return env.client.post(PATH, headers=headers, json=body)


def new_request_id() -> str:
    return f"reid-{secrets.token_hex(6)}"


# --- lookups ---------------------------------------------------------------------------------------


def test_reviewer_finds_raw_value(env: Env, warehouse: dict[str, pl.DataFrame]) -> None:
    raw_id = warehouse["bank_a"]["id_number"][3]
    token = token_of(env, "bank_a", raw_id)
    assert token in extract_tokens(env, "bank_a")
    request_id = new_request_id()

    response = lookup(env, "reviewer", request_id, token=token.upper())

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["value"] == raw_id
    assert body["key_version"] == 1
    assert body["table"] == "applications"
    assert body["case_number"] == CASE
    assert body["institution_name"] == "浦东示范银行甲"
    events = audit_events(env, request_id)
    assert [(event.action, event.outcome, event.resource) for event in events] == [
        ("tokens.reidentify", "success", "token:bank_a/applications/id_number")]
    detail = json.loads(events[0].detail)
    assert detail["case_number"] == CASE
    assert detail["reason"] == REASON
    assert detail["token"] == token
    assert detail["token_key_version"] == 1
    assert events[0].actor == "reviewer"
    assert raw_id not in events[0].detail


def test_template_code_names_table(env: Env, warehouse: dict[str, pl.DataFrame]) -> None:
    raw_id = warehouse["bank_b"]["id_number"][0]

    response = lookup(env, "reviewer", institution="bank_b", token=token_of(env, "bank_b", raw_id),
                      table="APPLICATIONS")

    assert response.status_code == 200, response.text
    assert response.json()["value"] == raw_id


def test_lookup_writes_no_file(env: Env, warehouse: dict[str, pl.DataFrame]) -> None:
    def files() -> set[Path]:
        return {path for path in env.settings.data_dir.rglob("*") if not path.name.startswith("admin.db")}

    before = files()
    response = lookup(env, "reviewer", token=token_of(env, "bank_a", warehouse["bank_a"]["id_number"][5]))

    assert response.status_code == 200, response.text
    assert files() == before


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("username", ["reporter_a", "instadmin_a", "modeller_a", "analyst", "steward", "sysadmin",
                                      "secadmin", "auditor"])
def test_other_roles_denied(env: Env, warehouse: dict[str, pl.DataFrame], username: str) -> None:
    request_id = new_request_id()

    response = lookup(env, username, request_id, token=token_of(env, "bank_a", warehouse["bank_a"]["id_number"][0]))

    assert response.status_code == 403, response.text
    assert response.json()["code"] == "FORBIDDEN"
    assert "value" not in response.json()
    assert [(event.action, event.outcome) for event in audit_events(env, request_id)] == [
        ("tokens.reidentify", "denied")]


def test_not_grantable_to_institution_roles(env: Env) -> None:
    response = env.client.post("/api/v1/roles", headers=env.auth("sysadmin"), json={
        "code": f"reid_{secrets.token_hex(3)}", "name": f"机构反查-{secrets.token_hex(3)}", "scope": "institution",
        "capabilities": ["me.read", "tokens.reidentify"]})

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "ROLE_CAPABILITY_INVALID"
    assert "tokens.reidentify" in response.json()["detail"]


def test_anonymous_denied(env: Env) -> None:
    response = lookup(env, None, token="0" * 32)

    assert response.status_code == 401
    assert response.json()["code"] == "NOT_AUTHENTICATED"


@pytest.mark.parametrize(("field", "code"), [("case_number", "CASE_NUMBER_MISSING"), ("reason", "REASON_MISSING"),
                                             ("institution", "INSTITUTION_MISSING"), ("column", "COLUMN_MISSING")])
def test_missing_field_rejected(env: Env, warehouse: dict[str, pl.DataFrame], field: str, code: str) -> None:
    token = token_of(env, "bank_a", warehouse["bank_a"]["id_number"][0])
    request_id = new_request_id()

    response = lookup(env, "reviewer", request_id, token=token, **{field: "  "})

    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert "请填写" in response.json()["detail"]
    events = audit_events(env, request_id)
    assert [(event.action, event.outcome) for event in events] == [("tokens.reidentify", "failed")]
    detail = json.loads(events[0].detail)
    assert detail["code"] == code
    assert detail["token"] == token


def test_omitted_case_number_rejected(env: Env) -> None:
    response = env.client.post(PATH, headers=env.auth("reviewer"), json={
        "institution": "bank_a", "table": "applications", "column": "id_number", "token": "a" * 32,
        "reason": REASON})

    assert response.status_code == 422
    assert response.json()["code"] == "CASE_NUMBER_MISSING"


def test_unknown_token_not_found(env: Env, warehouse: dict[str, pl.DataFrame]) -> None:
    request_id = new_request_id()
    token = secrets.token_hex(16)

    response = lookup(env, "reviewer", request_id, token=token)

    assert response.status_code == 404, response.text
    body = response.json()
    assert body["code"] == "TOKEN_NOT_FOUND"
    assert "没有找到令牌" in body["detail"]
    assert token[:12] in body["detail"]
    events = audit_events(env, request_id)
    assert [(event.action, event.outcome) for event in events] == [("tokens.reidentify", "failed")]
    assert json.loads(events[0].detail)["code"] == "TOKEN_NOT_FOUND"


def test_other_institution_token_not_found(env: Env, warehouse: dict[str, pl.DataFrame]) -> None:
    raw_id = warehouse["bank_b"]["id_number"][2]
    token = token_of(env, "bank_b", raw_id)
    assert token in extract_tokens(env, "bank_b")

    response = lookup(env, "reviewer", institution="bank_a", token=token)

    assert response.status_code == 404, response.text
    assert response.json()["code"] == "TOKEN_NOT_FOUND"
    assert raw_id not in response.text


def test_invalid_token_rejected(env: Env) -> None:
    response = lookup(env, "reviewer", token="not-a-token")

    assert response.status_code == 422
    assert response.json()["code"] == "TOKEN_INVALID"
    assert "32 位十六进制" in response.json()["detail"]


def test_untokenised_column_rejected(env: Env) -> None:
    response = lookup(env, "reviewer", column="name", token="a" * 32)

    assert response.status_code == 422
    assert response.json()["code"] == "COLUMN_NOT_TOKENISED"
    assert "id_number" in response.json()["detail"]


def test_unknown_table_rejected(env: Env) -> None:
    response = lookup(env, "reviewer", table="loans", token="a" * 32)

    assert response.status_code == 404
    assert response.json()["code"] == "REIDENTIFY_TABLE_UNKNOWN"
    assert "applications" in response.json()["detail"]


def test_institution_without_extract_rejected(env: Env, warehouse: dict[str, pl.DataFrame]) -> None:
    response = lookup(env, "reviewer", institution="bank_c", token="a" * 32)

    assert response.status_code == 409
    assert response.json()["code"] == "EXTRACT_NOT_PUBLISHED"


def test_unknown_institution_rejected(env: Env) -> None:
    response = lookup(env, "reviewer", institution="zz_missing", token="a" * 32)

    assert response.status_code == 404
    assert response.json()["code"] == "INSTITUTION_NOT_FOUND"


# --- console ---------------------------------------------------------------------------------------


def test_console_form_and_result(env: Env, warehouse: dict[str, pl.DataFrame]) -> None:
    cookie = console_cookie(env, "reviewer")
    page = env.client.get("/console/reidentification", headers=cookie)
    assert page.status_code == 200
    assert 'id="nav-reidentification"' in page.text
    csrf = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    raw_id = warehouse["bank_a"]["id_number"][7]
    form = {"csrf_token": csrf, "institution": "bank_a", "table": "applications", "column": "id_number",
            "token": token_of(env, "bank_a", raw_id), "case_number": CASE, "reason": REASON}

    result_page = env.client.post("/console/reidentification", headers=cookie, data=form)
    missing = env.client.post("/console/reidentification", headers=cookie, data={**form, "case_number": ""})
    forged = env.client.post("/console/reidentification", headers=cookie, data={**form, "csrf_token": "x"})
    bad_version = env.client.post("/console/reidentification", headers=cookie, data={**form, "key_version": "v1"})
    named_version = env.client.post("/console/reidentification", headers=cookie, data={**form, "key_version": "1"})

    assert result_page.status_code == 200, result_page.text
    assert result_page.headers["cache-control"] == "no-store"
    assert f'<code id="reidentify-value">{raw_id}</code>' in result_page.text
    assert missing.status_code == 422
    assert "请填写案件编号" in missing.text
    assert raw_id not in missing.text
    assert forged.status_code == 403
    assert bad_version.status_code == 422
    assert "令牌化密钥版本“v1”无效" in bad_version.text
    assert named_version.status_code == 200, named_version.text
    assert "第 1 版" in named_version.text


def test_console_hidden_from_analyst(env: Env) -> None:
    cookie = console_cookie(env, "analyst")

    assert env.client.get("/console/reidentification", headers=cookie).status_code == 403
    assert 'id="nav-reidentification"' not in env.client.get("/console/", headers=cookie).text


def test_console_walkthrough_in_chromium(env: Env, warehouse: dict[str, pl.DataFrame],
                                        served_admin_api: str) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    raw_id = warehouse["bank_a"]["id_number"][13]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", "reviewer")
            page.fill("input[name=password]", env.passwords["reviewer"])
            page.click("button[type=submit]")
            page.wait_for_load_state()
            page.click("header a:has-text('令牌反查')")
            page.wait_for_load_state()

            page.select_option("#reidentify-institution", "bank_a")
            page.fill("#reidentify-table", "applications")
            page.fill("#reidentify-column", "id_number")
            page.fill("#reidentify-token", token_of(env, "bank_a", raw_id))
            page.fill("#reidentify-reason", REASON)
            page.click("#reidentify-submit")
            page.wait_for_load_state()
            # The browser refuses the form without a case number, so nothing was sent.
            assert page.locator("#reidentify-result").count() == 0

            page.fill("#reidentify-case", CASE)
            page.click("#reidentify-submit")
            page.wait_for_load_state()
            assert page.locator("#reidentify-value").inner_text() == raw_id
            assert page.locator("#reidentify-case").input_value() == CASE
        finally:
            browser.close()


# --- limit and key rotation (change state, so they run last) ---------------------------------------


def test_hourly_limit(env: Env, warehouse: dict[str, pl.DataFrame], monkeypatch: pytest.MonkeyPatch) -> None:
    with env.db() as session:
        done = session.scalar(select(func.count(AuditEvent.id)).where(
            AuditEvent.actor == "reviewer", AuditEvent.action == "tokens.reidentify",
            AuditEvent.outcome == "success", AuditEvent.occurred_at >= utc_now() - timedelta(hours=1)))
    monkeypatch.setattr(env.client.app.state.settings, "reidentify_max_per_hour", done + 1)
    token = token_of(env, "bank_a", warehouse["bank_a"]["id_number"][9])

    allowed = lookup(env, "reviewer", token=token)
    request_id = new_request_id()
    limited = lookup(env, "reviewer", request_id, token=token)
    missing = lookup(env, "reviewer", token=secrets.token_hex(16))

    assert allowed.status_code == 200, allowed.text
    assert limited.status_code == 429, limited.text
    assert limited.json()["code"] == "REIDENTIFY_RATE_LIMITED"
    assert f"上限 {done + 1} 个" in limited.json()["detail"]
    assert [(event.action, event.outcome) for event in audit_events(env, request_id)] == [
        ("tokens.reidentify", "failed")]
    assert missing.status_code == 429


def test_tokens_of_earlier_key_version(env: Env, warehouse: dict[str, pl.DataFrame]) -> None:
    raw_id = warehouse["bank_a"]["id_number"][11]
    old_token = token_of(env, "bank_a", raw_id, version=1)
    store = open_keystore(env.settings)
    new_version = store.rotate("bank_a", KIND_TOKEN)
    new_token = token_of(env, "bank_a", raw_id, version=new_version)
    assert new_token != old_token

    old = lookup(env, "reviewer", token=old_token)
    new = lookup(env, "reviewer", token=new_token)
    named_old = lookup(env, "reviewer", token=old_token, key_version=1)
    named_wrong = lookup(env, "reviewer", token=old_token, key_version=new_version)
    named_missing = lookup(env, "reviewer", token=old_token, key_version=99)
    store.revoke("bank_a", KIND_TOKEN, 1, reason="测试：吊销旧令牌化密钥")
    revoked = lookup(env, "reviewer", token=old_token)
    named_revoked = lookup(env, "reviewer", token=old_token, key_version=1)

    assert old.status_code == 200, old.text
    assert (old.json()["value"], old.json()["key_version"]) == (raw_id, 1)
    assert new.status_code == 200, new.text
    assert (new.json()["value"], new.json()["key_version"]) == (raw_id, new_version)
    assert revoked.status_code == 404, revoked.text
    assert revoked.json()["code"] == "TOKEN_NOT_FOUND"
    assert named_old.status_code == 200, named_old.text
    assert named_old.json()["key_version"] == 1
    assert named_wrong.status_code == 404
    assert named_wrong.json()["code"] == "TOKEN_NOT_FOUND"
    assert named_missing.status_code == 422
    assert named_missing.json()["code"] == "KEY_VERSION_UNUSABLE"
    assert named_revoked.status_code == 422
    assert named_revoked.json()["code"] == "KEY_VERSION_UNUSABLE"
    assert f"第 {new_version} 版" in named_revoked.json()["detail"]
