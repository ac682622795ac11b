"""The console page 机构管理: which roles may open it, the forms, the import error table, and one run in headless Chromium."""

from __future__ import annotations

import csv
import io
import secrets

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from admin_api.models import AuditEvent, Institution

from .conftest import Env
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS, _signed_in, served_admin_api  # noqa: F401
from .test_institutions import create, env, make_uscc  # noqa: F401  (env: this module's own environment)


def form_fields(**overrides: str) -> dict[str, str]:
    code = f"c_{secrets.token_hex(5)}"
    fields = {"code": code, "name": f"控制台银行{code}", "type": "保险", "uscc": make_uscc(), "licence_no": "",
              "parent_code": "", "contact_name": "李四", "contact_phone": "", "contact_email": ""}
    fields.update(overrides)
    return fields


def stored(env: Env, code: str) -> Institution | None:
    with env.db() as session:
        return session.scalars(select(Institution).where(Institution.code == code)).first()


def test_page_sysadmin_forms(env: Env) -> None:
    admin, _ = _signed_in(env, "sysadmin")

    page = admin.get("/console/institutions")

    assert page.status_code == 200
    assert "<h2>机构管理</h2>" in page.text
    assert 'id="institution-bank_a"' in page.text
    assert 'id="create-institution"' in page.text
    assert 'id="import-institutions"' in page.text
    assert 'href="/console/institutions/export?format=xlsx"' in page.text
    assert 'href="/console/institutions"' in page.text


def test_page_institution_user_own_only(env: Env) -> None:
    browser, _ = _signed_in(env, "modeller_b")

    page = browser.get("/console/institutions")

    assert page.status_code == 200
    assert 'id="institution-bank_b"' in page.text
    assert 'id="institution-bank_a"' not in page.text
    assert "<form method=\"post\" action=\"/console/institutions\"" not in page.text
    assert "您只能查看本机构" in page.text


def test_page_search_and_paging(env: Env) -> None:
    marker = secrets.token_hex(3)
    for index in range(3):
        create(env, name=f"翻页银行{marker}{index}")
    admin, _ = _signed_in(env, "sysadmin")

    page = admin.get("/console/institutions", params={"q": f"翻页银行{marker}"})

    assert "共 3 个机构，当前显示第 1–3 个" in page.text
    assert page.text.count(f"<td>翻页银行{marker}") == 3


def test_create_form_and_audit(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    fields = form_fields()

    response = admin.post("/console/institutions", data={**fields, "csrf_token": csrf}, follow_redirects=False)

    assert response.status_code == 303
    assert f"已新建机构 {fields['code']}" in admin.get(response.headers["location"]).text
    assert stored(env, fields["code"]).uscc == fields["uscc"]


def test_create_form_invalid_uscc_keeps_values(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    fields = form_fields(uscc="91310115MA1K4A001X")

    response = admin.post("/console/institutions", data={**fields, "csrf_token": csrf})

    assert response.status_code == 422
    assert "校验码错误" in response.text
    assert f'value="{fields["code"]}"' in response.text
    assert stored(env, fields["code"]) is None


def test_create_form_csrf_rejected(env: Env) -> None:
    admin, _ = _signed_in(env, "sysadmin")
    fields = form_fields()

    response = admin.post("/console/institutions", data={**fields, "csrf_token": "wrong"})

    assert response.status_code == 403
    assert stored(env, fields["code"]) is None


@pytest.mark.parametrize("username", ["reviewer", "secadmin", "auditor", "reporter_a"])
def test_create_form_other_roles_forbidden(env: Env, username: str) -> None:
    browser, csrf = _signed_in(env, username)
    fields = form_fields()

    response = browser.post("/console/institutions", data={**fields, "csrf_token": csrf})

    assert response.status_code == 403
    assert stored(env, fields["code"]) is None


def test_edit_form(env: Env) -> None:
    created = create(env)
    admin, csrf = _signed_in(env, "sysadmin")
    page = admin.get(f"/console/institutions/{created['code']}/edit")
    fields = {key: created[key] or "" for key in ("name", "type", "uscc", "licence_no", "parent_code",
                                                    "contact_name", "contact_phone", "contact_email")}

    response = admin.post(f"/console/institutions/{created['code']}/edit",
                          data={**fields, "contact_name": "新联系人", "csrf_token": csrf}, follow_redirects=False)

    assert page.status_code == 200
    assert f'value="{created["uscc"]}"' in page.text
    assert response.status_code == 303
    assert stored(env, created["code"]).contact_name == "新联系人"


def test_deactivate_form(env: Env) -> None:
    created = create(env)
    admin, csrf = _signed_in(env, "sysadmin")

    response = admin.post(f"/console/institutions/{created['code']}/deactivate", data={"csrf_token": csrf},
                          follow_redirects=False)

    assert response.status_code == 303
    assert stored(env, created["code"]).status == "inactive"


def test_import_form_error_table(env: Env) -> None:
    admin, csrf = _signed_in(env, "sysadmin")
    code = f"c_{secrets.token_hex(5)}"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["机构代码", "机构名称", "统一社会信用代码", "机构类型"])
    writer.writerow([code, f"导入表单{code}", make_uscc(), "银行"])
    writer.writerow([f"{code}_x", f"导入表单{code}x", "123", "银行"])

    response = admin.post("/console/institutions/import", data={"csrf_token": csrf, "mode": "all_or_nothing"},
                          files={"file": ("机构.csv", buffer.getvalue().encode("utf-8"))})

    assert response.status_code == 422
    assert "本次未导入任何机构" in response.text
    assert "<td>3</td><td>统一社会信用代码</td><td><code>123</code></td>" in response.text
    assert "长度错误" in response.text
    assert stored(env, code) is None


def test_export_link_downloads(env: Env) -> None:
    admin, _ = _signed_in(env, "auditor")

    response = admin.get("/console/institutions/export", params={"format": "csv"})

    assert response.status_code == 200
    assert response.content.decode("utf-8-sig").startswith("机构代码,机构名称")


def test_page_anonymous_to_login(env: Env) -> None:
    response = TestClient(env.client.app).get("/console/institutions", follow_redirects=False)

    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"


def test_institutions_page_in_chromium(env: Env, served_admin_api: str) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    code = f"web_{secrets.token_hex(4)}"
    name = f"浏览器测试银行{code}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", "sysadmin")
            page.fill("input[name=password]", env.passwords["sysadmin"])
            page.click("button[type=submit]")
            page.wait_for_load_state()
            assert "退出登录" in page.content(), page.locator("main").inner_text()
            page.click("header a:has-text('机构管理')")
            page.wait_for_load_state()

            form = page.locator("#create-institution")
            form.locator("input[name=code]").fill(code)
            form.locator("input[name=name]").fill(name)
            form.locator("input[name=uscc]").fill(make_uscc())
            form.locator("select[name=type]").select_option("证券")
            form.locator("input[name=contact_name]").fill("周八")
            form.locator("button[type=submit]").click()
            page.wait_for_load_state()
            assert f"已新建机构 {code}" in page.locator("p.notice").inner_text()

            page.fill("input[name=q]", code)
            page.click("form.search button[type=submit]")
            page.wait_for_load_state()
            row = page.locator(f"#institution-{code}")
            assert name in row.inner_text()
            assert "证券" in row.inner_text()
        finally:
            browser.close()

    with env.db() as session:
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "institutions.create",
                                                              AuditEvent.resource == f"institution:{code}")))
    assert [(event.actor, event.outcome) for event in events] == [("sysadmin", "success")]
